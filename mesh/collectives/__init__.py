"""Collectives: pure schedules (:mod:`.schedule`) and reductions (:mod:`.reduce`)."""

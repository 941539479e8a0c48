"""bench/hotpath.py: the profiler harness runs one publisher and N subscriber
processes (``--subs``), reports per-thread CPU per delivered message, and leaves
no process behind."""

from __future__ import annotations

import pytest

from bench import hotpath

pytestmark = pytest.mark.timeout(120)


def test_fan_out_to_two_subscriber_processes_reports_every_side() -> None:
    out = hotpath.drive(20_000, None, None, size=1024, subs=2)
    assert out["count"] == 20_000 and out["subs"] == 2 and out["size"] == 1024
    assert out["rate"] > 0 and out["cpu_us_per_delivered"] > 0
    assert out["msgs_per_batch"] > 1, "a 1 KiB publishing loop was not batched"
    assert out["msgs_per_credit_update"] > 1
    # Per-thread CPU comes in clock ticks (10 ms): the publisher's 20,000 publishes
    # take several; a subscriber's share may round to none.
    assert out["pub_threads_us"].get("MainThread", 0) > 0, out["pub_threads_us"]
    assert isinstance(out["sub_threads_us"], dict)

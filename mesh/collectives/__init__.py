"""Collectives: pure schedules (:mod:`.schedule`) and reductions (:mod:`.reduce`),
carried out over the mesh by :class:`.group.Group` (``node.group(name, size)``)."""

from mesh.collectives.group import CollectiveAborted, Group, Member

__all__ = ["CollectiveAborted", "Group", "Member"]

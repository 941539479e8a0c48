"""Frames from nodes that have not said hello (yet): counted, quiet while normal.

During a join such frames are normal: a newcomer learns of the other members
through a seed's peer list and may reach one of them (its interest, its SWIM
probes) on a pipe that overtakes the hello on its other pipe, or a node that just
left or restarted still has a frame in flight; and when a node reconnects with
the same identity, the node's ROUTER hands the identity over to the new
connection and what still arrives on the old one comes from a generated
identity (a zero byte and a counter, never a node id: those are hex). Each one
is dropped and counted;
it is logged at DEBUG, and at WARNING only when frames from one node keep coming
for longer than ``grace`` (the node's peer_timeout) without a hello in between:
then something is wrong (a bug, a forged identity, a node that lost track of
this one). That warning is said once per node id; never for generated
identities, whose node, if any, speaks on its new connection.

Ownership: one instance per Node, used only by the node's I/O thread (which
handles every received frame and every hello); ``stats()`` reads plain ints and
may run on any thread. The core (:meth:`UnknownPeers.frame`) takes the time as
an argument, so tests drive it with an injected clock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("mesh.node")


@dataclass
class _Episode:
    first: float  # when this run of frames without a hello began
    last: float  # the latest frame of the run
    frames: int


class UnknownPeers:
    """Per node id: how long frames have come from it without a hello."""

    def __init__(self, owner: str, grace: float, max_tracked: int = 4096) -> None:
        self.owner = owner  # the node's name, for log lines
        self.grace = grace
        self.max_tracked = max_tracked  # bounded: ids are whatever a sender claims
        self.frames = 0  # every frame dropped as from an unknown node
        self.warnings = 0
        self.replaced = 0  # of frames: those on connections their node replaced
        self._episodes: dict[str, _Episode] = {}
        self._warned: set[str] = set()

    def frame(self, peer_id: str, now: float, detail: str = "") -> bool:
        """Count one dropped frame from ``peer_id``; log it. True when it is the one
        that made this node's frames persist past ``grace`` (the WARNING was said)."""
        self.frames += 1
        if peer_id.startswith("\x00"):  # a connection replaced by its node's reconnect
            self.replaced += 1
            log.debug("%s: dropped a frame that arrived on a replaced connection: %s", self.owner, detail)
            return False
        ep = self._episodes.get(peer_id)
        if ep is None or now - ep.last > self.grace:
            # A new run: after a pause as long as the grace, earlier frames say
            # nothing about this one (e.g. a node that left long ago, then spoke).
            if ep is None and len(self._episodes) >= self.max_tracked:
                self._expire(now)
                if len(self._episodes) >= self.max_tracked:
                    log.debug("%s: dropped a frame from %s (unknown peer; not tracked: too many)",
                              self.owner, peer_id[:32])
                    return False
            ep = self._episodes[peer_id] = _Episode(now, now, 0)
        ep.last = now
        ep.frames += 1
        if now - ep.first > self.grace and peer_id not in self._warned:
            if len(self._warned) < self.max_tracked:
                self._warned.add(peer_id)
            self.warnings += 1
            log.warning(
                "%s: node %s keeps sending without having said hello (%d frames in %.1f s, "
                "dropped); is it of another cluster or secret, or an older zmesh? "
                "(once per node; counted in status()['unknown_peers'])",
                self.owner, peer_id[:32], ep.frames, now - ep.first)
            return True
        log.debug("%s: dropped a frame from %s, which has not said hello yet: %s",
                  self.owner, peer_id[:32], detail)
        return False

    def hello(self, peer_id: str) -> None:
        """``peer_id`` said hello: its earlier frames were only early."""
        self._episodes.pop(peer_id, None)

    def _expire(self, now: float) -> None:
        stale = [pid for pid, ep in self._episodes.items() if now - ep.last > self.grace]
        for pid in stale:
            del self._episodes[pid]

    def stats(self, now: float) -> dict:
        """For status(): frames dropped (``replaced``: of those, the ones that came on a
        connection its node had replaced), nodes sending without hello within the
        last ``grace`` seconds, and warnings said."""
        pending = sum(1 for ep in list(self._episodes.values()) if now - ep.last <= self.grace)
        return {"frames": self.frames, "replaced": self.replaced, "pending": pending,
                "warnings": self.warnings}

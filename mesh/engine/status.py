"""``node.status()``: a JSON-serialisable snapshot, and the counters it reads.

Any thread may call it; it only reads (lists are copied before iterating, since
the I/O thread changes them). mesh/metrics.py scrapes it.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time

from mesh import _build, wire
from mesh.stats import Counters, LatencyHistogram

log = logging.getLogger("mesh")


class StatusView:
    """The status snapshot and the node-wide counters (mixin of ``mesh.Node``)."""

    def _init_status(self) -> None:
        # Counters: every engine thread adds to them (plain increments under the GIL);
        # status() and the metrics read them.
        self.counters = Counters()
        self.gaps = 0
        self.batches_out = 0  # frames that carried several small messages
        # Credit updates sent, by how: "data" (the dispatch thread, on the data pipe),
        # "control" (the I/O thread, on the control pipe), "riding" (in front of a
        # message or batch going to that publisher anyway).
        self.credit_updates = {"data": 0, "control": 0, "riding": 0}
        self.latency = LatencyHistogram()
        self.membership_events: collections.Counter[str] = collections.Counter()
        self.denials: collections.Counter[tuple[str, str]] = collections.Counter()  # (peer, action)

    def _status_snapshot(self) -> dict:
        """A JSON-serialisable snapshot of this node (any thread; it only reads)."""
        now = time.monotonic()
        peers = []
        for p in list(self._peers.values()):
            link = p.link
            peers.append(
                {
                    "id": p.id,
                    "name": p.name,
                    "state": p.state,
                    "transport": link.transport if link else None,
                    # Large arrays: through a bulk channel, or on the transport itself.
                    "bulk": next((c.name for c in self._bulk if c.in_use(link)),
                                 link.transport) if link else None,
                    **{c.name: c.stats(link) if link else None for c in self._bulk},
                    "endpoint": link.endpoint if link else None,
                    "rtt": p.rtt,
                    "since": round(now - p.joined_at, 3) if p.joined_at else None,
                    "interest": len(self._routing.peer_interest(p.id)),
                    # Our credit towards each of its subscriptions (sid -> window).
                    "credits": {
                        str(sid): {"available": w.available, "in_flight": w.in_flight, "queued": w.pending}
                        for sid, w in list(link.windows.items())
                    } if link else {},
                    **p.counters.as_dict(),
                }
            )
        with self._lock:
            subs = [
                {
                    "pattern": s.pattern,
                    "queue": s.queue or None,
                    "sid": s.sid,
                    "delivered": s.delivered,
                    "pending": s.pending,
                    "credits": s.credits,
                    "overflow": s.overflow,
                    "inline": s.inline,
                    # Per publisher: messages received and not yet consumed.
                    "outstanding": {
                        self._peer_name(pub): g.outstanding for pub, g in list(s._grants.items())
                    },
                }
                for s in self._subs
            ]
        return {
            "id": self.id,
            "name": self.name,
            "cluster": self.cluster,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "protocol": wire.PROTOCOL_VERSION,
            "build": _build.describe(),  # the compiled hot path or pure Python
            "uptime": round(now - self._start_time, 3) if self._started else 0.0,
            "closed": self._closed,
            "endpoints": self._advertised,
            "transports": [t.name for t in self._transports],
            "discovery": self.discovery_mode,
            "secured": self._keys is not None,
            "security": self._security_status(),
            "policy": self._policy.describe() if self._policy is not None else None,
            "denied": [
                {"peer": name, "action": action, "count": n} for (name, action), n in self.denials.items()
            ],
            "peers": peers,
            "subscriptions": subs,
            "counters": {
                **self.counters.as_dict(), "gaps": self.gaps, "batches_out": self.batches_out,
                "credit_updates": dict(self.credit_updates),
            },
            "latency": self.latency.summary(),
            "unknown_peers": self._unknown.stats(now),
        }

    def _security_status(self) -> dict | None:
        if self._keys is None:
            return None
        zap = self._zap
        return {
            "mechanism": "CURVE",
            "key": self._keys.fingerprint,
            "accepted": zap.accepted if zap is not None else 0,
            "refused": dict(zap.refused) if zap is not None else {},
        }

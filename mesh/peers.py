"""What a node knows about each peer, and the public ``PeerInfo`` view of it."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from mesh.errors import ProtocolError
from mesh.stats import Counters
from transports.base import Locality


class PeerInfo(NamedTuple):
    id: str
    name: str
    endpoints: tuple[str, ...]
    transports: tuple[str, ...]
    state: str  # "joining" | "alive" | "dead" | "left"
    rtt: float | None  # seconds, from the last heartbeat


class Link:
    """Our outbound DEALERs to one peer.

    ``sock`` carries data: application threads send on it directly (no hop
    through the I/O thread); the lock is the memory barrier ZeroMQ needs to move
    a socket between threads, and keeps multipart sends whole. ``ctl`` carries
    control (hellos, interest, membership probes) and only the I/O thread uses
    it: a second pipe, so the peer's ROUTER fair-queues control past a backlog
    of data and a busy peer is not mistaken for a dead one."""

    __slots__ = (
        "peer_id", "sock", "ctl", "lock", "cond", "windows", "transport", "endpoint", "closed", "counters",
        "batch", "batch_bytes", "batch_count", "batch_cap", "batch_since", "last_send", "shm_out", "rdma", "rdma_off",
        "rdma_trackers", "rdma_order", "credit_in",
    )

    def __init__(
        self, sock: Any, ctl: Any, transport: str, endpoint: str, counters: Counters,
        peer_id: str = "",
    ) -> None:
        self.peer_id = peer_id
        self.sock = sock
        self.ctl = ctl
        self.counters = counters  # the peer's, so publishers count without a lookup
        self.lock = threading.Lock()
        # Publishers blocked on credit wait here; the I/O thread notifies on credit.
        self.cond = threading.Condition(self.lock)
        # Credit updates from the peer not applied yet: the I/O thread never waits for
        # the lock (a publisher may hold it for long: a shared-memory copy, or room
        # awaited on an RDMA link); whoever holds it next applies them (Node._apply_credit).
        self.credit_in: deque[list] = deque()
        self.windows: dict[int, Any] = {}  # subscription id at the peer -> CreditWindow
        # Micro-batching of small messages (see Node._send_locked): runs of messages
        # that share a header, [header, subject or None, last seq, sids, payloads].
        self.batch: list[list] = []
        self.batch_bytes = 0
        self.batch_count = 0  # messages in all runs
        # Messages per batch: half the tightest credit window towards this peer, so
        # a second batch is in flight while the credit for the first comes back
        # (subscribers return credit every quarter window, see node._credit_threshold).
        self.batch_cap = 1 << 30
        self.batch_since = 0.0
        self.last_send = 0.0
        self.shm_out: Any = None  # transports.shm.ShmSender once the peer can map ours
        # transports.rdma.RdmaConnection once connected (the I/O thread drives and
        # closes it; senders use it under the lock); rdma_off: it failed, stay off.
        self.rdma: Any = None
        self.rdma_off = False
        self.rdma_trackers: dict[int, Any] = {}  # rdma msg id -> channel-send tracker
        # transports.rdma_core.SendOrder from the first array sent by RDMA on: keeps the
        # order with socket messages (None: nothing to keep, nothing extra is sent).
        self.rdma_order: Any = None
        self.transport = transport
        self.endpoint = endpoint
        self.closed = False

    def close(self, linger: int = 100) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.sock.close(linger=linger)
                self.ctl.close(linger=linger)
                for window in self.windows.values():
                    window.close("peer gone")
                if self.shm_out is not None:
                    self.shm_out.close()
                self.cond.notify_all()  # blocked publishers see the peer is gone


@dataclass
class Peer:
    id: str
    name: str
    cluster: str
    endpoints: dict[str, list[str]]
    locality: Locality
    state: str = "joining"  # joining | alive | suspect | dead | left
    last_seen: float = 0.0
    joined_at: float = 0.0
    gone_at: float = 0.0
    rtt: float | None = None
    link: Link | None = None
    counters: Counters = field(default_factory=Counters)
    shm_in: Any = None  # transports.shm.ShmReceiver for arrays this peer sends us

    def info(self) -> PeerInfo:
        return PeerInfo(
            self.id,
            self.name,
            tuple(ep for eps in self.endpoints.values() for ep in eps),
            tuple(self.endpoints),
            self.state,
            self.rtt,
        )

    def summary(self) -> dict:
        """What we gossip about this peer so others can connect to it."""
        return {
            "id": self.id,
            "name": self.name,
            "cluster": self.cluster,
            "eps": self.endpoints,
            "host": self.locality.host,
            "proc": self.locality.process,
        }


_MAX_ID = 64
_MAX_NAME = 256


def parse_summary(body: Any) -> dict:
    """Validate a peer summary or hello body from the network."""
    if type(body) is not dict:
        raise ProtocolError("peer summary is not a map", "malformed")
    try:
        node_id, name, cluster = body["id"], body["name"], body["cluster"]
        eps, host, proc = body["eps"], body["host"], body["proc"]
    except KeyError as exc:
        raise ProtocolError(f"peer summary lacks {exc}", "malformed") from None
    if not (
        type(node_id) is str
        and 0 < len(node_id) <= _MAX_ID
        and type(name) is str
        and len(name) <= _MAX_NAME
        and type(cluster) is str
        and type(host) is str
        and type(proc) is str
        and type(eps) is dict
        and all(
            type(k) is str and type(v) is list and all(type(e) is str for e in v)
            for k, v in eps.items()
        )
    ):
        raise ProtocolError("peer summary has fields of the wrong type", "malformed")
    return body

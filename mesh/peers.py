"""What a node knows about each peer, and the public ``PeerInfo`` view of it.

The peer table belongs to the I/O thread (mesh/engine/handshake.py); the link to
each peer is mesh/engine/link.py's ``Link``."""

from __future__ import annotations

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
    link: Any = None  # mesh.engine.link.Link once connected
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

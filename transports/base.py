"""The transport plugin interface and the host/process identity it relies on."""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass


def _read_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return uuid.getnode().to_bytes(6, "big").hex()


def _netns_inode() -> str:
    try:
        return str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        return "0"


@dataclass(frozen=True)
class Locality:
    """Where a node runs: peers with the same ``host`` share a kernel and network
    namespace (ipc, shared memory), with the same ``process`` share a ZeroMQ context."""

    host: str
    process: str

    @classmethod
    def here(cls) -> Locality:
        host = f"{_read_boot_id()}/{_netns_inode()}"
        return cls(host=host, process=f"{host}/{os.getpid()}/{_PROCESS_NONCE}")


_PROCESS_NONCE = uuid.uuid4().hex[:8]

# Best first, for large arrays. Control messages always stay on the zmq transport.
BULK_ORDER = ("inproc", "shm", "rdma", "ipc", "tcp")


def choose_bulk(
    transport: str,
    *,
    shm_both: bool = False,
    rdma_both: bool = False,
    rdma_failed: bool = False,
) -> str:
    """The path large arrays take to a peer, from what both sides offered.

    ``transport`` is the zmq transport chosen for the link (inproc, ipc, tcp);
    ``shm_both``: both offered shared memory and share a host (whatever the
    link's transport: two processes of one host may talk over tcp); ``rdma_both``:
    both advertised a usable verbs device; ``rdma_failed``: a queue pair with
    this peer failed before (the link stays on its socket from then on).
    Pure: the node's hello handling follows it, tests check every case.
    """
    candidates = {transport}
    if transport in ("ipc", "tcp") and shm_both:
        candidates.add("shm")
    if rdma_both and not rdma_failed and transport != "inproc":
        candidates.add("rdma")
    return next(t for t in BULK_ORDER if t in candidates)


def _renew_nonce() -> None:
    # A forked child is another process even if it reuses a pid later.
    global _PROCESS_NONCE
    _PROCESS_NONCE = uuid.uuid4().hex[:8]


os.register_at_fork(after_in_child=_renew_nonce)


class Transport:
    """A way two nodes can talk. Subclasses are registered as entry points in
    the group ``mesh.transports``."""

    name: str = ""
    #: preference: lower is better (inproc 0 < shm 10 < rdma 20 < ipc 30 < tcp 40)
    rank: int = 100

    def available(self) -> bool:
        """Can this host use the transport at all?"""
        return True

    def bind_endpoints(self, listen: Sequence[str], node_id: str) -> list[str]:
        """zmq endpoints to bind for this transport, from the node's ``listen`` list."""
        return []

    def advertise(self, bound: str) -> list[str]:
        """Endpoints peers should connect to, given one endpoint we bound."""
        return [bound]

    def can_reach(self, local: Locality, peer: Locality) -> bool:
        return False

    def pick_endpoint(self, endpoints: Sequence[str], local: Locality, peer: Locality) -> str | None:
        return endpoints[0] if endpoints else None

    def cleanup(self, bound: str) -> None:
        """Release what binding left behind (e.g. an ipc socket file)."""

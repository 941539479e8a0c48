"""Plain TCP streams as a bulk channel (transports/tcp_bulk.py does the work).

Between nodes whose link is tcp (other hosts, or ``shm=False``), unless the
cluster is secured (the stream is not encrypted: CURVE nodes keep every byte
on ZeroMQ) or ``tcp_bulk=False``. The channel is used by the collectives
(mesh/collectives/group.py), which post the destination of each large
segment before it arrives; a pair connects when a group with both forms
(``settle``), not at the hello; publish/send of arrays stays on the ZeroMQ link
(``send_array`` returns None). ``status()["peers"][i]["tcpbulk"]`` says
whether the pair is connected, and if not, why its arrays stay on ZeroMQ.

Threads: ``start``, ``accept``, ``peer_gone`` and ``close`` run on the node's
I/O thread (``start``/``close`` with the node's) and never block (dialling
runs in a thread of the endpoint); the endpoint's own threads are named in
transports/tcp_bulk.py; ``conn``/``settle`` on the collective's thread.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from mesh.peers import Peer
from transports.bulk import BulkChannel

log = logging.getLogger("mesh")


def _host_of(endpoint: str) -> str | None:
    """``tcp://host:port`` -> host (brackets of IPv6 removed); None if not tcp."""
    if not endpoint.startswith("tcp://"):
        return None
    try:
        host = urlsplit(endpoint).hostname
    except ValueError:
        return None
    return host or None


class TcpChannel(BulkChannel):
    """Plain TCP streams behind the bulk-channel interface (transports/bulk.py)."""

    name = "tcpbulk"
    hello_key = "tcpb"

    def __init__(self, node: Any) -> None:
        self.node = node
        self.endpoint: Any = None
        self.why_off = ""

    def start(self) -> None:
        node = self.node
        if not node.options.get("tcp_bulk", True):
            self.why_off = "tcp_bulk=False"
            return
        if node._keys is not None:
            self.why_off = "the cluster is secured (CURVE): the bulk stream would not be encrypted"
            return
        hosts = [h for h in (_host_of(e) for e in node.endpoints) if h]
        if not hosts:
            self.why_off = "this node has no tcp endpoint"
            return
        host = "0.0.0.0" if hosts[0] in ("*", "0.0.0.0") else hosts[0]
        from transports.tcp_bulk import TcpBulkEndpoint

        try:
            self.endpoint = TcpBulkEndpoint(node.id, host)
        except OSError as exc:
            self.why_off = f"cannot listen on {host}: {exc}"
            log.info("%s: no bulk tcp channel (%s); arrays stay on ZeroMQ", node.name, exc)

    def offer(self) -> Any:
        return self.endpoint.offer() if self.endpoint is not None else None

    def accept(self, peer: Peer, hello: dict) -> None:
        ep = self.endpoint
        if ep is None:
            return
        link = peer.link
        offer = hello.get(self.hello_key)
        if link is None or link.transport != "tcp":
            return  # same host over ipc/inproc: shared memory's business
        if (type(offer) is not list or len(offer) != 2 or type(offer[0]) is not int
                or type(offer[1]) is not bytes or len(offer[1]) != 16):
            ep.refuse(peer.id, "the peer offers no bulk tcp channel")
            return
        dialer = self.node.id < peer.id  # the smaller id dials, the other listens
        host = _host_of(link.endpoint) or ""
        if dialer and (not host or host in ("*", "0.0.0.0")):
            ep.refuse(peer.id, f"no host to dial in {link.endpoint!r}")
            return
        ep.learn(peer.id, peer.name, dialer, host, offer[0], offer[1])

    def peer_gone(self, peer: Peer) -> None:
        if self.endpoint is not None:
            self.endpoint.drop(peer.id)

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()

    def stats(self, link: Any) -> dict | None:
        if link.transport != "tcp":
            return None
        if self.endpoint is None:
            return {"state": "off", "why": self.why_off} if self.why_off else None
        return self.endpoint.state(link.peer_id)

    # -- for the collectives ------------------------------------------------------

    def conn(self, peer_id: str) -> Any:
        """The connected stream to this peer, or None (then: ZeroMQ)."""
        ep = self.endpoint
        return ep.conn(peer_id) if ep is not None else None

    def settle(self, peer_ids: list[str], timeout: float) -> None:
        """Wait (bounded) until the stream to each of these peers that can have one
        (linked over tcp) is connected or given up, so that both sides agree."""
        if self.endpoint is None:
            return
        peers = self.node._peers
        tcp = [pid for pid in peer_ids
               if (p := peers.get(pid)) is not None and p.link is not None
               and p.link.transport == "tcp"]
        if tcp:
            self.endpoint.ensure(tcp)
            self.endpoint.settle(tcp, timeout)

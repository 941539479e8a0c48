"""Peer process of tests/test_tcp_bulk.py: one mesh.Node (tcp only, shared memory
off) that obeys commands on the bulk tcp stream to the test's node.

``peer_main`` runs under multiprocessing "spawn" (importable without side
effects). Commands come on ``ctl`` as ``(op, args)``; each is answered on ``out``
with ``(op, ok, value)``. Arrays are never shipped through the queues: both
sides generate them from a seed (``make``) and compare digests.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import traceback
from typing import Any

import numpy as np


def make(seed: int, n: int, dtype: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-100, 100, size=n).astype(dtype)


def digest(data: Any) -> str:
    return hashlib.sha1(memoryview(data).cast("B")).hexdigest()


def _dead_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _break_dialling() -> None:
    """Make this node's bulk stream impossible: it offers, and dials, a dead port."""
    from transports import tcp_bulk

    dead = _dead_port()
    real_dial = tcp_bulk.TcpBulkEndpoint.dial
    tcp_bulk.TcpBulkEndpoint.offer = lambda self: [dead, self.token]  # type: ignore[method-assign]

    def dial(self: Any, peer_id: str, peer_name: str, host: str, port: int, token: bytes) -> None:
        real_dial(self, peer_id, peer_name, host, dead, token)

    tcp_bulk.TcpBulkEndpoint.dial = dial  # type: ignore[method-assign]


def peer_main(name: str, node_kwargs: dict, ctl: Any, out: Any, broken: bool = False) -> None:
    import mesh

    if broken:
        _break_dialling()
    node = mesh.Node(name, **node_kwargs).start()
    out.put(("ready", True, {"id": node.id, "endpoints": list(node.endpoints)}))
    chan = node._bulk_named["tcpbulk"]
    try:
        while True:
            op, args = ctl.get(timeout=120)
            if op == "exit":
                break
            try:
                value = _run(node, chan, op, {**args, "_out": out})
            except Exception:
                out.put((op, False, traceback.format_exc()))
            else:
                out.put((op, True, value))
    finally:
        node.close()


def _run(node: Any, chan: Any, op: str, args: dict) -> Any:
    if op == "wait_conn":  # wait for the bulk stream to the test's node to settle
        deadline = time.monotonic() + 15.0
        while args["peer"] not in {p.id for p in node.peers()} and time.monotonic() < deadline:
            time.sleep(0.01)  # (its hello may still be on the way)
        chan.settle([args["peer"]], 15.0)
        return {p["id"]: p.get("tcpbulk") for p in node.status()["peers"]}
    conn = chan.conn(args["peer"]) if "peer" in args else None
    if op == "echo":
        # Receive each array into a preallocated buffer, send it back under tag+1.
        results = []
        for tag, n, dtype in args["items"]:
            dest = np.empty(n, dtype)
            req = conn.post(("t", tag), dest)
            if not req.wait(30):
                raise TimeoutError(f"tag {tag} did not arrive")
            # (one that came before the post is in a buffer of its own: req.data)
            got = dest if req.into_dest else np.frombuffer(req.data, dtype)
            results.append((digest(got), req.into_dest, req.meta))
            conn.send(("t", tag + 1), req.meta, got).wait(30)
        return results
    if op == "post_all":
        # Post every receive first, say so, then wait for all of them: the test
        # sends them back to back, so that they reach the staging buffer together.
        reqs = [(conn.post(("t", tag), np.empty(n, dtype)), n, dtype)
                for tag, n, dtype in args["items"]]
        out = args["_out"]
        out.put(("posted", True, len(reqs)))
        results = []
        for req, _n, _dtype in reqs:
            if not req.wait(30):
                raise TimeoutError(f"tag {req.tag} did not arrive")
            results.append((digest(req.data), req.into_dest))
        return results
    if op == "send":
        for tag, seed, n, dtype in args["items"]:
            if not conn.send(("t", tag), ["from-peer"], make(seed, n, dtype)).wait(30):
                raise TimeoutError(f"tag {tag} not sent")
        return True
    if op == "send_in_two":
        # Header and the first half, a pause, then the rest: a receiver that relays
        # the message on must have passed the first half on before the rest comes.
        import msgpack

        from transports.tcp_bulk import _FRAME

        data = make(args["seed"], args["n"], "int8")
        head = msgpack.packb([("t", args["tag"]), ["two"]], use_bin_type=True)
        with conn._wlock:  # (the stream's own sends keep out meanwhile)
            conn.sock.sendall(_FRAME.pack(len(head), data.nbytes) + head)
            conn.sock.sendall(memoryview(data)[: data.nbytes // 2])
            time.sleep(args["pause"])
            conn.sock.sendall(memoryview(data)[data.nbytes // 2:])
        return True
    if op == "die_mid_send":
        # Header and half of the data on the raw socket, then die: the receiver is
        # left in the middle of the array.
        import msgpack

        from transports.tcp_bulk import _FRAME

        data = make(1, args["n"], "int8")
        head = msgpack.packb([("t", args["tag"]), ["x"]], use_bin_type=True)
        conn.sock.sendall(_FRAME.pack(len(head), data.nbytes) + head)
        conn.sock.sendall(memoryview(data)[: data.nbytes // 2])
        os._exit(9)
    raise ValueError(op)

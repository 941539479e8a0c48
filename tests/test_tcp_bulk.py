"""The bulk tcp channel (transports/tcp_bulk.py, mesh/engine/bulk_tcp.py) with real
sockets and processes, and the collectives over it (tcp only, shared memory off).

The channel tests run one node in this process and peers in spawned processes
(``tcp_bulk_peer.peer_main``); arrays are generated on both sides from seeds and
compared by digest. Every wait is bounded; every process is reaped, also on failure.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
import uuid
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # spawn children import the helpers from here

import tcp_bulk_peer as tp  # noqa: E402
from test_collectives import Cluster, Worker, assert_all_ok  # noqa: E402

import mesh  # noqa: E402
from mesh.collectives import schedule  # noqa: E402
from transports.tcp_bulk import PARK_MIN  # noqa: E402

_SPAWN = mp.get_context("spawn")
TCP_ONLY = {"listen": ("tcp://127.0.0.1:0",), "shm": False}


class Peer:
    """A peer node in a spawned process (see tcp_bulk_peer)."""

    def __init__(self, name: str, kwargs: dict, broken: bool = False) -> None:
        self.ctl, self.out = _SPAWN.Queue(), _SPAWN.Queue()
        self.proc = _SPAWN.Process(target=tp.peer_main, daemon=True,
                                   args=(name, kwargs, self.ctl, self.out, broken))
        self.proc.start()
        self.info = self._get("ready", 60)

    def _get(self, op: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                got, ok, value = self.out.get(timeout=0.25)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"peer: no answer to {op} in {timeout} s") from None
                if not self.proc.is_alive():
                    raise RuntimeError(f"peer died (exit {self.proc.exitcode}) during {op}") from None
                continue
            assert got == op and ok, value
            return value

    def call(self, op: str, timeout: float = 60, **args: Any) -> Any:
        self.ctl.put((op, args))
        return self._get(op, timeout)

    def start(self, op: str, **args: Any) -> None:
        self.ctl.put((op, args))

    @property
    def id(self) -> str:
        return self.info["id"]

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.ctl.put(("exit", {}))
            except Exception:
                pass
            self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        for q in (self.ctl, self.out):
            q.cancel_join_thread()
            q.close()


@pytest.fixture
def lab():
    """This process's node (tcp only) and a factory of peer processes seeded to it."""
    cluster = f"tcpb-{uuid.uuid4().hex[:8]}"
    node = mesh.Node("here", cluster=cluster, discovery="none", **TCP_ONLY).start()
    peers: list[Peer] = []

    def spawn(name: str, broken: bool = False, **extra: Any) -> Peer:
        kwargs = {"cluster": cluster, "discovery": "static", "seeds": [next(e for e in node.endpoints if e.startswith("tcp://"))],
                  **TCP_ONLY, **extra}
        peer = Peer(name, kwargs, broken)
        peers.append(peer)
        deadline = time.monotonic() + 20
        while peer.id not in {p.id for p in node.peers()}:
            assert time.monotonic() < deadline, f"{name} did not join"
            time.sleep(0.02)
        return peer

    try:
        yield node, spawn
    finally:
        for p in peers:
            p.stop()
        node.close()


def _conn(node: mesh.Node, peer: Peer, timeout: float = 15.0) -> Any:
    """Connect the pair (both sides ask, as a forming group does) and return our end."""
    chan = node._bulk_named["tcpbulk"]
    peer.start("wait_conn", peer=node.id)
    chan.settle([peer.id], timeout)
    assert peer._get("wait_conn", 30)[node.id]["state"] == "ready"
    conn = chan.conn(peer.id)
    assert conn is not None, node.status()["peers"]
    return conn


SIZES = [(0, "int8"), (1, "int8"), (7, "int8"), (4097, "float32"), ((1 << 20) + 3, "int16"),
         ((16 << 20) // 8, "float64")]


def test_arrays_of_every_size_land_in_the_posted_buffer(lab):
    node, spawn = lab
    peer = spawn("p1")
    conn = _conn(node, peer)
    items = [(10 * i, n, dt) for i, (n, dt) in enumerate(SIZES)]
    peer.start("echo", peer=node.id, items=items)
    sent, backs, reqs = [], [], []
    for tag, n, dt in items:
        arr = tp.make(tag, n, dt)
        if n > 8:  # non-contiguous input: sent as its C-order copy
            arr = np.repeat(arr, 2)[::2]
            assert not arr.flags.c_contiguous
        sent.append(np.ascontiguousarray(arr))
        back = np.full(n, 7, dt)
        backs.append(back)
        reqs.append(conn.post(("t", tag + 1), back))
        assert conn.send(("t", tag), ["meta", tag], arr).wait(30)
    answers = peer._get("echo", 60)
    for (digest, into_dest, meta), arr, back, req, (tag, _, _) in zip(
            answers, sent, backs, reqs, items, strict=True):
        assert digest == tp.digest(arr), f"tag {tag}: the peer got other bytes"
        # (a small one that came before the peer's post is read aside at once: PARK_MIN)
        assert into_dest or arr.nbytes <= PARK_MIN, (
            f"tag {tag}: the peer's posted buffer was not filled in place")
        assert meta == ["meta", tag]
        assert req.wait(30) and req.into_dest
        assert np.array_equal(back, arr), f"tag {tag}: the echo differs"
    st = node.status()["peers"][0]["tcpbulk"]
    assert st["state"] == "ready" and st["msgs_out"] == len(items) == st["msgs_in"]
    assert st["bytes_out"] == sum(a.nbytes for a in sent) == st["bytes_in"]


# Around the receiver's 64 KiB staging buffer: messages that fit in it together,
# one that ends exactly at its end, one that straddles it, a large one behind them.
BURST = [(0, "int8"), (1, "int8"), (3, "int16"), (16 << 10, "float32"), ((64 << 10) - 77, "int8"),
         ((64 << 10), "int8"), ((64 << 10) + 1, "int8"), (5, "float64"), ((300 << 10) + 1, "int8"),
         (2, "int32"), ((4 << 20) + 4, "int8"), (1, "int8")]


def test_back_to_back_messages_of_every_size_cross_the_staging_buffer_intact(lab):
    node, spawn = lab
    peer = spawn("p1")
    conn = _conn(node, peer)
    items = [(100 + i, n, dt) for i, (n, dt) in enumerate(BURST)]
    peer.start("post_all", peer=node.id, items=items)
    assert peer._get("posted", 30) == len(items)
    arrays = [tp.make(tag, n, dt) for tag, n, dt in items]
    # all queued at once, none awaited in between: they reach the peer coalesced
    reqs = [conn.send(("t", tag), None, arr) for (tag, _, _), arr in zip(items, arrays, strict=True)]
    assert all(r.wait(30) for r in reqs)
    answers = peer._get("post_all", 60)
    for (tag, n, dt), arr, (got, into_dest) in zip(items, arrays, answers, strict=True):
        assert got == tp.digest(arr), f"tag {tag} ({n} x {dt}): other bytes arrived"
        assert into_dest, f"tag {tag}: not received into the posted buffer"


def test_an_inline_send_writes_from_the_caller_and_is_bounded(lab, monkeypatch):
    """A send the caller writes itself (small, or inline=True) is done on return when
    the stream was idle; one whose peer reads nothing fails within INLINE_SEND_WAIT
    instead of blocking the caller for good."""
    import signal

    import transports.tcp_bulk as tb

    node, spawn = lab
    peer = spawn("p1")
    conn = _conn(node, peer)
    small = conn.send(("t", 1), None, np.ones(1000, np.float32))
    assert small.done and small.error is None  # written by this thread, before returning
    big = tp.make(3, 6 << 20, "int8")
    peer.start("echo", peer=node.id, items=[(2, big.size, "int8")])
    back = np.empty_like(big)
    r = conn.post(("t", 3), back)
    req = conn.send(("t", 2), ["m"], big, inline=True)
    assert req.done  # inline: every byte is in the kernel on return
    assert r.wait(30) and np.array_equal(back, big)
    # (the peer may post its receive after the bytes came: into_dest is not asserted)
    assert peer._get("echo", 30)[0][0] == tp.digest(big)
    monkeypatch.setattr(tb, "INLINE_SEND_WAIT", 1.0)
    os.kill(peer.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        stuck = conn.send(("t", 4), None, np.zeros(256 << 20, np.int8), inline=True)
        took = time.monotonic() - t0
        assert stuck.done and took < 20, took
        with pytest.raises(mesh.BulkLinkError) as info:
            stuck.wait(0)
        assert "took no data" in str(info.value)
        assert conn.broken is not None  # later transfers take ZeroMQ
    finally:
        os.kill(peer.proc.pid, signal.SIGCONT)


def test_a_message_before_its_post_is_kept_and_a_wrong_size_says_so(lab):
    node, spawn = lab
    peer = spawn("p1")
    conn = _conn(node, peer)
    peer.call("send", peer=node.id, items=[(1, 5, 1000, "int32"), (2, 6, 999, "int32")])
    deadline = time.monotonic() + 10
    while conn.stats()["msgs_in"] < 2:  # both arrived with nothing posted
        assert time.monotonic() < deadline
        time.sleep(0.01)
    dest = np.empty(1000, "int32")
    req = conn.post(("t", 1), dest)
    assert req.wait(0) and not req.into_dest  # read aside: one copy more, same bytes
    assert np.array_equal(np.frombuffer(req.data, "int32"), tp.make(5, 1000, "int32"))
    assert req.meta == ["from-peer"]
    req2 = conn.post(("t", 2), np.empty(1000, "int32"))  # the peer sent 999 elements
    assert req2.wait(5) and not req2.into_dest and len(req2.data) == 999 * 4
    assert conn.stats()["early_msgs"] == 2


def test_one_receiver_thread_reads_every_stream_of_a_node(lab):
    """Not a thread per stream: the node's streams to two peers share one reader,
    and messages from both, arriving together, all land in place."""
    import threading

    node, spawn = lab
    peers = [spawn("p1"), spawn("p2")]
    conns = [_conn(node, p) for p in peers]
    readers = [t for t in threading.enumerate() if t.name.startswith("mesh-tcpbulk-recv")]
    assert len(readers) == 1, [t.name for t in threading.enumerate()]
    items = [(20 + i, n, "float32") for i, n in enumerate((1000, 70_000, 1 << 20))]
    reqs = [(c.post(("t", tag), np.empty(n, "float32")), p, tag, n)
            for c, p in zip(conns, peers, strict=True) for tag, n, _ in items]
    for p in peers:
        p.start("send", peer=node.id, items=[(tag, tag, n, dt) for tag, n, dt in items])
    for p in peers:
        assert p._get("send", 60)
    for req, _p, tag, n in reqs:
        assert req.wait(30) and req.into_dest, tag
        assert np.array_equal(np.frombuffer(req.data, "float32"), tp.make(tag, n, "float32"))


def test_a_folded_reduction_runs_under_the_posters_numpy_error_state(lab):
    """The stream's thread reduces a folded receive under the np.seterr of the thread
    that posted it (numpy's error state is per thread): an overflow raises for a
    poster with over="raise" (handed to it, the stream reads on in step), and
    passes silently for one with over="ignore"."""
    import warnings

    node, spawn = lab
    peer = spawn("p1")
    conn = _conn(node, peer)
    n = 300_001  # several fold pieces (tcp_bulk._FOLD_PIECE)
    huge = np.full(n, 3e38, np.float32)  # times the peer's values (-100..99): overflow
    with np.errstate(over="raise"):
        r1 = conn.post(("t", 1), np.empty(n, np.float32), fold=(np.multiply, huge))
    quiet = np.empty(n, np.float32)
    with np.errstate(over="ignore"):
        r2 = conn.post(("t", 2), quiet, fold=(np.multiply, huge))
    ok = np.empty(n, np.float32)
    r3 = conn.post(("t", 3), ok, fold=(np.add, np.ones(n, np.float32)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peer.call("send", peer=node.id, items=[(1, 5, n, "float32"), (2, 5, n, "float32"),
                                               (3, 6, n, "float32")])
        assert r1.wait(30) and r2.wait(30) and r3.wait(30)
    assert r1.folded and isinstance(r1.fold_error, FloatingPointError), r1.fold_error
    assert r2.folded and r2.fold_error is None and np.isinf(quiet).any()
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], caught
    assert r3.fold_error is None and np.array_equal(ok, tp.make(6, n, "float32") + 1)
    assert conn.broken is None


def test_a_small_early_message_is_read_aside_at_once_a_large_one_waits_for_its_post(
        lab, monkeypatch):
    """Nothing posted: a small message (<= PARK_MIN) is read aside at once, so that its
    post completes on the caller's thread without waking the stream's; a large one
    stays in the kernel for up to POST_WAIT and lands in place when posted."""
    import transports.tcp_bulk as tb

    monkeypatch.setattr(tb, "POST_WAIT", 20.0)  # (read by the receiver when it parks)
    node, spawn = lab
    peer = spawn("p1")
    conn = _conn(node, peer)
    small, large = tb.PARK_MIN // 4, tb.PARK_MIN + 4096  # float32 elements: bytes / 4
    peer.call("send", peer=node.id, items=[(1, 3, small, "float32")])
    deadline = time.monotonic() + 10
    while conn.stats()["early_msgs"] < 1:  # read aside well before POST_WAIT
        assert time.monotonic() < deadline, conn.stats()
        time.sleep(0.01)
    req = conn.post(("t", 1), np.empty(small, np.float32))
    assert req.done and not req.into_dest  # completed by post() itself
    assert np.array_equal(np.frombuffer(req.data, np.float32), tp.make(3, small, "float32"))
    peer.call("send", peer=node.id, items=[(2, 4, large, "float32")])
    time.sleep(0.3)
    assert conn.stats()["early_msgs"] == 1  # the large one waits for its post
    dest = np.empty(large, np.float32)
    req = conn.post(("t", 2), dest)
    assert req.wait(10) and req.into_dest
    assert np.array_equal(dest, tp.make(4, large, "float32"))


def test_a_peer_that_dies_mid_transfer_fails_only_that_transfer(lab):
    node, spawn = lab
    victim, other = spawn("victim"), spawn("other")
    conn, conn2 = _conn(node, victim), _conn(node, other)
    dest = np.zeros(8 << 20, np.int8)
    req = conn.post(("t", 99), dest)
    victim.start("die_mid_send", peer=node.id, tag=99, n=dest.size)
    with pytest.raises(mesh.BulkLinkError) as info:
        req.wait(20)
    assert isinstance(info.value, mesh.PeerLostError) and isinstance(info.value, mesh.MeshError)
    assert "victim" in str(info.value) and "ZeroMQ" in str(info.value)
    assert info.value.peer == victim.id
    # a send to it fails the same way, at once
    with pytest.raises(mesh.BulkLinkError):
        conn.send(("t", 100), None, np.ones(10)).wait(5)
    # nothing else is lost: the other peer's stream still carries arrays both ways
    other.start("echo", peer=node.id, items=[(7, 300001, "float32")])
    arr = tp.make(7, 300001, "float32")
    back = np.empty_like(arr)
    r = conn2.post(("t", 8), back)
    assert conn2.send(("t", 7), [1], arr).wait(30) and r.wait(30)
    assert np.array_equal(back, arr) and other._get("echo", 30)[0][1]
    st = {p["name"]: p["tcpbulk"] for p in node.status()["peers"]}
    if "victim" in st and st["victim"] is not None:  # (until the node drops the dead peer)
        assert st["victim"]["state"] == "fallback" and "broke" in st["victim"]["why"]
    assert st["other"]["state"] == "ready"
    alive = {p["name"]: p["state"] for p in node.status()["peers"]}
    assert alive["other"] == "alive"  # its ZeroMQ link is untouched too


def _until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_a_relayed_receive_passes_each_piece_on_as_it_arrives(lab):
    """Cut-through (RecvRequest.relay): the half that has arrived is already on its
    way to the next peer while the sender still holds back the rest."""
    node, spawn = lab
    src, dst = spawn("src"), spawn("dst")
    c_src, c_dst = _conn(node, src), _conn(node, dst)
    n = 6 << 20
    dest = np.zeros(n, np.int8)
    req = c_src.post(("t", 5), dest, relay=[(c_dst, ("t", 50), ["relayed"])])
    dst.start("echo", peer=node.id, items=[(50, n, "int8")])
    back = np.zeros(n, np.int8)
    echo = c_dst.post(("t", 51), back)
    src.start("send_in_two", peer=node.id, tag=5, seed=3, n=n, pause=1.5)
    _until(lambda: req.relayed and req.relayed[0].ready >= n // 2, 20, "no piece relayed")
    assert not req.done, "the relay waited for the whole message"
    assert req.wait(30) and req.into_dest and req.meta == ["two"]
    assert src._get("send_in_two", 30)
    want = tp.make(3, n, "int8")
    assert np.array_equal(dest, want)
    assert req.relayed[0].wait(30)
    (digest, into_dest, meta), = dst._get("echo", 30)
    assert digest == tp.digest(want) and into_dest and meta == ["relayed"]
    assert echo.wait(30) and np.array_equal(back, want)
    st = {p["name"]: p["tcpbulk"] for p in node.status()["peers"]}
    assert st["src"]["relayed_msgs"] == 1 and st["dst"]["bytes_out"] == n


def test_a_relayed_message_that_came_early_goes_on_whole(lab):
    node, spawn = lab
    src, dst = spawn("src"), spawn("dst")
    c_src, c_dst = _conn(node, src), _conn(node, dst)
    n = 1000  # small: read aside at once (PARK_MIN), before the post
    assert src.call("send", peer=node.id, items=[(8, 4, n, "int16")])
    _until(lambda: ("t", 8) in c_src._early, 20, "the early message was not read aside")
    dst.start("echo", peer=node.id, items=[(80, n, "int16")])
    back = np.zeros(n, np.int16)
    echo = c_dst.post(("t", 81), back)
    req = c_src.post(("t", 8), np.zeros(n, np.int16), relay=[(c_dst, ("t", 80), ["on"])])
    assert req.done and len(req.relayed) == 1 and req.relayed[0].wait(30)
    assert echo.wait(30) and np.array_equal(back, tp.make(4, n, "int16"))
    assert dst._get("echo", 30)[0][2] == ["on"]
    with pytest.raises(ValueError, match="folded"):
        c_src.post(("t", 9), back, (np.add, back), relay=[(c_dst, ("t", 90), None)])


def test_a_source_that_dies_mid_relay_breaks_the_relayed_stream_too(lab):
    """Half a frame went on: the next stream cannot be resynchronised, so it breaks
    (its collective fails over to the group's abort) instead of carrying garbage."""
    node, spawn = lab
    victim, dst = spawn("victim"), spawn("dst")
    c_src, c_dst = _conn(node, victim), _conn(node, dst)
    n = 8 << 20
    req = c_src.post(("t", 99), np.zeros(n, np.int8), relay=[(c_dst, ("t", 990), None)])
    victim.start("die_mid_send", peer=node.id, tag=99, n=n)
    with pytest.raises(mesh.BulkLinkError):
        req.wait(20)
    with pytest.raises(mesh.BulkLinkError, match="relay source broke"):
        req.relayed[0].wait(20)
    _until(lambda: c_dst.broken is not None, 10, "the relayed stream stayed up")


def test_no_stream_means_zeromq_and_status_says_why(lab):
    node, spawn = lab
    off = spawn("off", tcp_bulk=False)
    broken = spawn("broken", broken=True)
    chan = node._bulk_named["tcpbulk"]
    deadline = time.monotonic() + 10
    while True:  # a peer can be listed before its hello (with its offer) was handled
        st = {p["name"]: p["tcpbulk"] for p in node.status()["peers"]}
        if (st.get("broken") and st.get("off")) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert st["broken"]["state"] == "idle", st  # nothing connects before a group needs it
    broken.start("wait_conn", peer=node.id)
    chan.settle([off.id, broken.id], 15.0)
    st = {p["name"]: p["tcpbulk"] for p in node.status()["peers"]}
    assert st["off"]["state"] == "fallback" and "offers no bulk" in st["off"]["why"], st
    assert st["broken"]["state"] == "fallback", st
    assert "connect" in st["broken"]["why"], st
    assert chan.conn(off.id) is None and chan.conn(broken.id) is None
    assert broken._get("wait_conn", 30)[node.id]["state"] == "fallback"


# ---------------------------------------------------------------------- collectives


def _cases(size: int) -> list[dict]:
    mib = 1 << 20
    cases = []
    for i, algo in enumerate(("ring", "tree", "direct", "auto")):
        cases.append({"kind": "allreduce", "op": "sum", "dtype": "float32",
                      "shape": (3 * mib // 4 + 5,), "algorithm": algo, "seed": 10 + i})
    cases += [
        {"kind": "allreduce", "op": "max", "dtype": "int64", "shape": (mib // 8 * 5 + 1,),
         "algorithm": "ring", "seed": 20, "out": "inplace"},
        {"kind": "allreduce", "op": "mean", "dtype": "float64", "shape": (700, 1031),
         "algorithm": "auto", "seed": 21, "out": "separate"},
        {"kind": "allreduce", "op": "sum", "dtype": "float32", "shape": (1031, 517),
         "algorithm": "ring", "seed": 22, "layout": "transposed"},
        {"kind": "reduce_scatter", "op": "sum", "dtype": "float32", "n": 2 * mib + 3, "seed": 23},
        {"kind": "allgather", "dtype": "float32",
         "shapes": [(mib // 4 * (r + 1) + r,) for r in range(size)], "seed": 24},
        {"kind": "allgather", "dtype": "float32", "shapes": [(3 * mib // 4 + 1,)] * size,
         "seed": 25, "out": "new"},
    ]
    cases += [{"kind": "broadcast", "root": r, "dtype": "float32", "shape": (5 * mib // 4 + 1,),
               "seed": 30 + r} for r in range(size)]
    # from schedule.TCP_BROADCAST_CHAIN_BYTES down the chain (4 ranks), uneven segments
    cases.append({"kind": "broadcast", "root": size - 1, "dtype": "float32",
                  "shape": (schedule.TCP_BROADCAST_CHAIN_BYTES // 4 + 3,), "seed": 40})
    return cases


@pytest.mark.parametrize("size", [2, 4])
def test_collectives_over_the_bulk_stream(size):
    cluster = Cluster(size, prefix="tb", **TCP_ONLY)
    try:
        cluster.start()
        cluster.form("tcpb", segment_bytes=1 << 20)
        cases = _cases(size)
        assert_all_ok(cluster.cases("tcpb", cases, timeout=120), cases)
        # every pair agreed on its stream at formation
        for w, stats in zip(cluster.workers, cluster.all("stats", group="tcpb"), strict=True):
            assert stats["tcp_streams"] == sorted(x.name for x in cluster.workers if x is not w)
        # the large segments went over the streams, not ZeroMQ; the ring's reducing
        # receives were reduced into place as they arrived
        for states in cluster.all("bulk_stats"):
            assert len(states) == size - 1
            for st in states.values():
                assert st["state"] == "ready" and st["msgs_in"] > 0 and st["msgs_out"] > 0, st
            assert sum(st["folded_msgs"] for st in states.values()) > 0, states
    finally:
        cluster.shutdown()


def test_broadcast_across_hosts_goes_down_a_relayed_tree_or_chain():
    """Members on different hosts (played here by forcing the group's agreed flag on
    every rank): a broadcast of 4 goes down the tree (below
    schedule.TCP_CHAIN_ACROSS_BYTES) or the chain (from it), each forwarding rank
    relaying its stream cut-through; every byte arrives, from every root."""
    cluster = Cluster(4, prefix="rl", **TCP_ONLY)
    try:
        cluster.start()
        cluster.form("relay")
        # one host, really: the group says so (the flag every rank agreed on)
        assert not any(st["across_hosts"] for st in cluster.all("stats", group="relay"))
        before = sum(st["relayed_msgs"] for states in cluster.all("bulk_stats")
                     for st in states.values())
        big = schedule.TCP_CHAIN_ACROSS_BYTES
        cases = [{"kind": "broadcast", "root": r, "dtype": dt, "shape": shape, "seed": 60 + r,
                  "across_hosts": True}
                 for r, dt, shape in [(0, "float32", (3, 70001)), (1, "int16", (5,)),
                                      (2, "float64", (big // 8 + 5,)),
                                      (3, "int8", (big + 4097,)), (3, "float32", (1000,))]]
        assert_all_ok(cluster.cases("relay", cases, timeout=120), cases)
        after = sum(st["relayed_msgs"] for states in cluster.all("bulk_stats")
                    for st in states.values())
        # tree of 4: one forwarding rank per broadcast; chain of 4: two
        assert after - before >= 1 + 1 + 2 + 2 + 1, (before, after)
        # and on one host the same arrays go direct: nothing relayed
        plain = [{**c, "across_hosts": False, "seed": c["seed"] + 10} for c in cases[:2]]
        assert_all_ok(cluster.cases("relay", plain, timeout=60), plain)
        again = sum(st["relayed_msgs"] for states in cluster.all("bulk_stats")
                    for st in states.values())
        assert again == after
    finally:
        cluster.shutdown()


class _MixedCluster(Cluster):
    """Like Cluster, but the last worker gets the options ``last`` (default: no bulk
    stream, tcp_bulk=False)."""

    def __init__(self, n: int, prefix: str, last: dict | None = None, **kw: Any) -> None:
        super().__init__(n, prefix, **kw)
        self.last = {"tcp_bulk": False} if last is None else last

    def start(self) -> Cluster:
        kw = {"cluster": self.cluster, **self.node_kwargs}
        first = Worker(f"{self.prefix}0", {**kw, "discovery": "none"})
        self.workers.append(first)
        first.wait_ready()
        for i in range(1, self.n):
            extra = self.last if i == self.n - 1 else {}
            self.workers.append(Worker(f"{self.prefix}{i}", {**kw, **extra, "discovery": "static",
                                                             "seeds": [first.tcp]}))
        for w in self.workers[1:]:
            w.wait_ready()
        self.all("wait_for_peers", n=self.n - 1)
        return self


def test_collectives_with_one_member_on_zeromq_only():
    """Pairs with the member that has no stream stay on ZeroMQ, the others use theirs."""
    cluster = _MixedCluster(3, prefix="mx", **TCP_ONLY)
    try:
        cluster.start()
        cluster.form("mixed", segment_bytes=1 << 20)
        cases = _cases(3)
        assert_all_ok(cluster.cases("mixed", cases, timeout=120), cases)
        names = [w.name for w in cluster.workers]
        for w, stats in zip(cluster.workers, cluster.all("stats", group="mixed"), strict=True):
            want = [] if w.name == names[-1] else [x for x in names[:-1] if x != w.name]
            assert stats["tcp_streams"] == want, (w.name, stats["tcp_streams"])
        # the last one says why, on every other node
        for w, states in zip(cluster.workers[:-1], cluster.all("bulk_stats",
                                                                 workers=cluster.workers[:-1]),
                             strict=True):
            st = states[names[-1]]
            assert st["state"] == "fallback" and "offers no bulk" in st["why"], (w.name, st)
            other = states[names[1 - names.index(w.name)]]
            assert other["state"] == "ready" and other["msgs_in"] > 0, (w.name, other)
    finally:
        cluster.shutdown()


def test_sigkill_mid_allreduce_over_the_streams_then_reform():
    """A member killed mid-allreduce: the others raise PeerLostError naming it (the
    stream's end of file, not only heartbeats), reform, and reduce correctly again."""
    cluster = Cluster(3, prefix="kt", **TCP_ONLY)
    timeout = 10.0
    try:
        cluster.start()
        cluster.form("killed", timeout=timeout, segment_bytes=1 << 20)
        victim = cluster.by_rank[1]
        survivors = [w for w in cluster.by_rank if w is not victim]
        elems = (32 << 20) // 4
        ids = {w: w.send("allreduce_loop", group="killed", elems=elems, iterations=500)
               for w in cluster.by_rank}
        time.sleep(1.0)
        t_kill = time.time()
        victim.kill()
        for w in survivors:
            res = w.result(ids[w], timeout=timeout + 10, what="allreduce_loop")
            assert res["error"] == "PeerLostError" and res["peer"] == victim.id, res
            assert res["iterations"] > 0, res  # it did run over the streams first
            assert res["t"] - t_kill < timeout, res
        reformed = cluster.all("reform", workers=survivors, group="killed")
        assert {r["size"] for r in reformed} == {2}, reformed
        order = sorted(range(2), key=lambda i: reformed[i]["rank"])
        by_rank = [survivors[i] for i in order]
        cases = [{"kind": "allreduce", "op": "sum", "dtype": "float32", "shape": (elems // 2 + 1,),
                  "algorithm": algo, "seed": 70 + i} for i, algo in enumerate(("ring", "auto"))]
        assert_all_ok(cluster.cases("killed", cases, workers=by_rank), cases)
        for stats in cluster.all("stats", workers=survivors, group="killed"):
            assert len(stats["tcp_streams"]) == 1, stats["tcp_streams"]
    finally:
        cluster.shutdown()



def test_root_killed_mid_relayed_broadcast_is_named_by_every_survivor():
    """Down a relayed chain (0 -> 1 -> 2 -> 3): the root killed mid-message breaks
    rank 1's relay to rank 2 too (half a frame), yet rank 2 names the root, not its
    live neighbour (rank 1's abort says who), and the survivors reform and go on."""
    cluster = Cluster(4, prefix="kc", **TCP_ONLY)
    timeout = 10.0
    try:
        cluster.start()
        cluster.form("chain", timeout=timeout)
        victim = cluster.by_rank[0]
        survivors = cluster.by_rank[1:]
        elems = (schedule.TCP_CHAIN_ACROSS_BYTES * 2) // 4
        ids = {w: w.send("broadcast_loop", group="chain", elems=elems, iterations=2000,
                         across_hosts=True) for w in cluster.by_rank}
        time.sleep(1.0)
        t_kill = time.time()
        victim.kill()
        for w in survivors:
            res = w.result(ids[w], timeout=timeout + 10, what="broadcast_loop")
            assert res["error"] == "PeerLostError" and res["peer"] == victim.id, res
            assert res["iterations"] > 0, res
            assert res["t"] - t_kill < timeout, res
        reformed = cluster.all("reform", workers=survivors, group="chain")
        assert {r["size"] for r in reformed} == {3}, reformed  # nobody alive was excluded
        order = sorted(range(3), key=lambda i: reformed[i]["rank"])
        by_rank = [survivors[i] for i in order]
        cases = [{"kind": "broadcast", "root": 2, "dtype": "float32", "shape": (elems + 1,),
                  "seed": 77, "across_hosts": True}]
        assert_all_ok(cluster.cases("chain", cases, workers=by_rank), cases)
    finally:
        cluster.shutdown()


def test_members_with_different_thresholds_still_agree_on_every_byte():
    """A segment one end sends over the stream and the other expects on ZeroMQ (their
    tcp_bulk_threshold differs) is found on the stream after a poll interval."""
    # (3 members: in a group of 2 every segment takes the stream, whatever the threshold)
    cluster = _MixedCluster(3, prefix="th", last={"tcp_bulk_threshold": 4 << 20}, **TCP_ONLY)
    try:
        cluster.start()
        cluster.form("thr", segment_bytes=1 << 20)
        cases = [{"kind": "allreduce", "op": "sum", "dtype": "float32", "shape": (3 << 18,),
                  "algorithm": "ring", "seed": 80},
                 {"kind": "broadcast", "root": 1, "dtype": "float32", "shape": (5 << 18,),
                  "seed": 81}]
        assert_all_ok(cluster.cases("thr", cases, timeout=60), cases)
    finally:
        cluster.shutdown()


def _stream_msgs(cluster: Cluster) -> list[int]:
    """Per worker: messages received over its bulk streams so far."""
    return [sum(st["msgs_in"] for st in states.values() if st)
            for states in cluster.all("bulk_stats")]


def test_small_segments_take_the_stream_in_groups_of_every_size():
    """Even a 4 KiB collective goes over the streams (the caller writes it, the
    node's one receiver thread hands it over): in a group of 2, in a broadcast,
    and in an allreduce or allgather of 3, where a rank hears from several members
    at once."""
    small = [{"kind": "allreduce", "op": "sum", "dtype": "float32", "shape": (1024,),
              "algorithm": "auto", "seed": 90},
             {"kind": "allgather", "dtype": "float32", "shapes": [(1000,), (1000,)], "seed": 91,
              "out": "new"},
             {"kind": "broadcast", "root": 1, "dtype": "int16", "shape": (77,), "seed": 92}]
    pair = Cluster(2, prefix="sp", **TCP_ONLY)
    try:
        pair.start()
        pair.form("pair")
        before = _stream_msgs(pair)
        assert_all_ok(pair.cases("pair", small, timeout=60), small)
        after = _stream_msgs(pair)
        # one message per collective over each rank's stream (the root of the
        # broadcast receives nothing)
        grew = sorted(a - b for a, b in zip(after, before, strict=True))
        assert grew == [2, 3], (before, after)
    finally:
        pair.shutdown()
    trio = Cluster(3, prefix="st", **TCP_ONLY)
    try:
        trio.start()
        trio.form("trio")
        reduce_only = [{**small[0], "seed": 93}]
        before = _stream_msgs(trio)
        assert_all_ok(trio.cases("trio", reduce_only, timeout=60), reduce_only)
        grew = [a - b for a, b in zip(_stream_msgs(trio), before, strict=True)]
        assert grew == [2, 2, 2], grew  # direct: each rank's input from both others
        gather = [{"kind": "allgather", "dtype": "float32", "shapes": [(1000,)] * 3,
                   "seed": 95, "out": "new"}]
        before = _stream_msgs(trio)
        assert_all_ok(trio.cases("trio", gather, timeout=60), gather)
        grew = [a - b for a, b in zip(_stream_msgs(trio), before, strict=True)]
        assert grew == [2, 2, 2], grew
        before = _stream_msgs(trio)
        bcast = [{"kind": "broadcast", "root": 0, "dtype": "float32", "shape": (1000,),
                  "seed": 94}]
        assert_all_ok(trio.cases("trio", bcast, timeout=60), bcast)
        grew = [a - b for a, b in zip(_stream_msgs(trio), before, strict=True)]
        assert sorted(grew) == [0, 1, 1], grew  # the root sent one to each other rank
    finally:
        trio.shutdown()


def test_allreduce_honours_the_callers_numpy_error_state_on_the_stream(make_node):
    """A ring allreduce of 2 folds its reductions on the stream's thread: an overflow
    there raises FloatingPointError in a caller running under np.errstate(over=
    "raise"), is silent under over="ignore" (inf, no warning), and the group goes on."""
    import threading
    import warnings

    tcp = {**TCP_ONLY, "transports": ("tcp",)}  # (in one process: not inproc)
    a = make_node("fp-a", **tcp)
    b = make_node("fp-b", seeds=[a.endpoints[0]], **tcp)
    a.wait_for_peers(1, timeout=10.0)
    b.wait_for_peers(1, timeout=10.0)
    groups: dict[str, Any] = {}
    forming = [threading.Thread(target=lambda n=n: groups.__setitem__(n.name, n.group("fp", 2, timeout=20)))
               for n in (a, b)]
    for t in forming:
        t.start()
    for t in forming:
        t.join(30)
    assert len(groups) == 2
    x = np.full(1 << 18, 3e38, np.float32)  # 1 MiB: two segments of the ring, summed: inf

    def both(over: str) -> dict[str, Any]:
        got: dict[str, Any] = {}

        def rank(name: str) -> None:
            try:
                with np.errstate(over=over):
                    got[name] = groups[name].allreduce(x, algorithm="ring")
            except Exception as exc:
                got[name] = exc
        ts = [threading.Thread(target=rank, args=(n,)) for n in groups]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert len(got) == 2, got
        return got

    assert groups["fp-a"]._tcp_all and groups["fp-b"]._tcp_all  # the streams carry it
    raised = both("raise")
    assert any(isinstance(v, FloatingPointError) for v in raised.values()), raised
    assert all(isinstance(v, (FloatingPointError, mesh.CollectiveAborted))
               for v in raised.values()), raised
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet = both("ignore")
    for v in quiet.values():
        assert isinstance(v, np.ndarray) and np.isinf(v).all(), v
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], caught
    y = np.ones(1 << 18, np.float32)
    ones = {}

    def rank1(name: str) -> None:
        ones[name] = groups[name].allreduce(y, algorithm="ring")
    ts = [threading.Thread(target=rank1, args=(n,)) for n in groups]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert all(np.array_equal(v, 2 * y) for v in ones.values()), ones
    for g in groups.values():
        g.close()


def _pair_groups(make_node: Any, prefix: str) -> dict[str, Any]:
    """Two in-process nodes on tcp only and their group of 2 (name -> group)."""
    import threading

    tcp = {**TCP_ONLY, "transports": ("tcp",)}  # (in one process: not inproc)
    a = make_node(f"{prefix}-a", **tcp)
    b = make_node(f"{prefix}-b", seeds=[a.endpoints[0]], **tcp)
    a.wait_for_peers(1, timeout=10.0)
    b.wait_for_peers(1, timeout=10.0)
    groups: dict[str, Any] = {}
    forming = [threading.Thread(target=lambda n=n: groups.__setitem__(
        n.name, n.group(prefix, 2, timeout=20))) for n in (a, b)]
    for t in forming:
        t.start()
    for t in forming:
        t.join(30)
    assert len(groups) == 2
    return groups


def _on_both(groups: dict[str, Any], call: Any) -> dict[str, Any]:
    """``call(group)`` on every member at once, each in a thread; name -> result or error."""
    import threading

    got: dict[str, Any] = {}

    def rank(name: str) -> None:
        try:
            got[name] = call(groups[name])
        except Exception as exc:
            got[name] = exc
    ts = [threading.Thread(target=rank, args=(n,)) for n in groups]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert len(got) == len(groups), got
    return got


def test_one_message_broadcasts_of_two_skip_the_general_executor(make_node):
    """A broadcast of 2 over the streams is one whole-buffer message (the lean path,
    Group._whole_on_streams): every byte arrives for any root, dtype and size, into
    the caller's array in place; a strided root input and a read-only receiver input
    work as documented; a root running ahead (its message before the post) is
    found; a shape that differs between the ranks fails on both with ConfigError;
    and the general executor (_execute) ran for none of them."""
    groups = _pair_groups(make_node, "lean")
    g = list(groups.values())
    assert all(x._tcp_all for x in g)  # the streams carry it
    executed: list[str] = []
    for x in g:
        orig = x._execute
        x._execute = lambda *a, _o=orig, **k: (executed.append(a[3]), _o(*a, **k))[1]
    rng = np.random.default_rng(5)
    for root in (0, 1):
        for dtype, n in (("float32", 1), ("float32", 1024), ("int16", 77), ("float64", 3 << 16),
                         ("uint8", 300 << 10)):
            want = (rng.random(n) * 1000).astype(dtype)
            arrays = {x.node.name: (want.copy() if x.rank == root else np.zeros(n, dtype))
                      for x in g}
            got = _on_both(groups, lambda x, r=root, a=arrays: x.broadcast(a[x.node.name], root=r))
            for x in g:
                assert got[x.node.name] is arrays[x.node.name]  # in place, returned as is
                np.testing.assert_array_equal(arrays[x.node.name], want)
    # strided root input (one copy), read-only receiver (a new array returned)
    base = np.arange(2000, dtype=np.float32)
    ro = np.zeros(1000, np.float32)
    ro.flags.writeable = False
    got = _on_both(groups, lambda x: x.broadcast(base[::2] if x.rank == 0 else ro, root=0))
    for v in got.values():
        np.testing.assert_array_equal(v, base[::2])
    assert not ro.any()
    # the root runs ahead: ten in a row, the receiver posts each one late
    def ahead(x: Any) -> list:
        out = []
        for i in range(10):
            if x.rank == 1:
                time.sleep(0.01)
            out.append(x.broadcast(np.full(4096, i if x.rank == 0 else -1, np.float32))[0])
        return out
    assert all(v == list(range(10)) for v in _on_both(groups, ahead).values())
    assert executed == [], executed
    # ranks that disagree on the shape: the receiver fails (the root only sent), the
    # group goes on
    got = _on_both(groups, lambda x: x.broadcast(np.ones(100 + x.rank, np.float32), root=0))
    assert isinstance(got["lean-b"], mesh.ConfigError), got
    assert "same shape" in str(got["lean-b"])
    got = _on_both(groups, lambda x: x.broadcast(np.full(8, 7 if x.rank == 0 else 0, np.int32)))
    assert all((v == 7).all() for v in got.values()), got


def test_a_waiting_caller_is_woken_through_its_eventfd_and_its_waits_are_bounded(monkeypatch):
    """A caller waiting for a receive sleeps on an eventfd of its own that the receiver
    thread writes (tcp_bulk._Request): it is woken with the data in place; a wait for
    a message that never comes returns False in its time, even after a stale wake-up
    count; a burst of small messages, and a large one among them, all land in their
    posted buffers (the one-step path and the completions at the end of a pass); the
    lock of before still works (fd_wait False); and a thread's eventfd closes with it."""
    import gc
    import socket
    import threading

    from transports import tcp_bulk as tb

    a, b = socket.socketpair()
    ca, cb = tb.TcpBulkConn(a, "pa", "pa"), tb.TcpBulkConn(b, "pb", "pb")
    try:
        assert tb._Request.fd_wait  # (Linux: os.eventfd)
        src = np.arange(4096, dtype=np.float32)
        dst = np.zeros_like(src)
        req = cb.post(("w", 1), dst)
        assert req._latch is None
        later = threading.Timer(0.05, lambda: ca.send(("w", 1), ["m"], src))
        later.start()
        assert req.wait(10.0) and req.into_dest and req.meta == ["m"]
        np.testing.assert_array_equal(dst, src)
        later.join()
        # a wait bounded by its timeout, also after a count a finished request left
        done = cb.post(("w", 2), np.zeros(4, np.float32))
        ca.send(("w", 2), None, np.ones(4, np.float32))
        assert done.wait(10.0)
        tb.os.eventfd_write(tb._waker().fd, 1)  # a stale wake-up
        never = cb.post(("w", 3), np.zeros(4, np.float32))
        t0 = time.monotonic()
        assert never.wait(0.2) is False
        assert 0.19 <= time.monotonic() - t0 < 2.0
        never.cancel()
        # a burst, posted first, sent back to back, a 1 MiB message in the middle
        sizes = [1, 16, 4096, 1 << 18, 7, 1, 4096] * 10
        sizes[35] = 1 << 20
        outs = [np.zeros(n, np.uint8) for n in sizes]
        reqs = [cb.post(("b", i), o) for i, o in enumerate(outs)]
        ins = [np.full(n, i % 251, np.uint8) for i, n in enumerate(sizes)]
        sends = [ca.send(("b", i), i, x) for i, x in enumerate(ins)]
        assert all(r.wait(30.0) for r in sends + reqs)
        for i, (r, o, x) in enumerate(zip(reqs, outs, ins, strict=True)):
            assert r.into_dest and r.meta == i
            np.testing.assert_array_equal(o, x)
        # the lock of before
        monkeypatch.setattr(tb._Request, "fd_wait", False)
        monkeypatch.setattr(tb._Receiver, "fast", False)
        old = cb.post(("o", 1), dst)
        assert old._latch is not None
        threading.Timer(0.05, lambda: ca.send(("o", 1), None, src[::-1])).start()
        assert old.wait(10.0)
        np.testing.assert_array_equal(dst, src[::-1])
        monkeypatch.undo()
        # a thread's eventfd is closed when the thread ends
        fds: list[int] = []

        def waiter() -> None:
            r = cb.post(("t", 1), np.zeros(4, np.float32))
            fds.append(tb._waker().fd)
            r.wait(0.01)
            r.cancel()
        t = threading.Thread(target=waiter)
        t.start()
        t.join(10)
        gc.collect()
        try:
            gone = "eventfd" not in os.readlink(f"/proc/self/fd/{fds[0]}")
        except OSError:
            gone = True
        assert gone, "the waiting thread's eventfd outlived it"
    finally:
        ca.close()
        cb.close()

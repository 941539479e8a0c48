"""engine/zcore.py: the I/O thread's libzmq calls from C (compiled build), and the
node paths that use it (both builds: the pure one keeps pyzmq's calls).

Real ZeroMQ sockets (tcp loopback) and, for the node paths, real nodes and a
worker process. The C calls are checked against pyzmq and wire.py, which stay the
reference.
"""

from __future__ import annotations

import errno
import os
import threading
import time

import numpy as np
import pytest
import zmq

from mesh import wire
from mesh.engine import zcore
from tests.meshproc import wait_until

compiled_only = pytest.mark.skipif(not zcore.available(),
                                   reason="zcore's C calls: compiled build only")


@pytest.fixture
def router_dealers():
    """A ROUTER on tcp loopback and a factory of DEALERs connected to it (closed after)."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    endpoint = router.getsockopt(zmq.LAST_ENDPOINT)
    dealers = []

    def dealer(identity: bytes):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(endpoint)
        dealers.append(sock)
        return sock

    yield router, dealer
    for sock in dealers:
        sock.close(0)
    router.close(0)


def _read(router, timeout_ms: int) -> tuple[list[list[bytes]], int]:
    """One zcore.drain, with the rest of a longer message read by pyzmq (as the loop)."""
    msgs, status = zcore.drain(router.underlying, timeout_ms)
    out = [[f if type(f) is bytes else bytes(f) for f in m] for m in msgs]
    if status == zcore.MORE:
        while True:
            frame = router.recv(0, copy=False)
            out[-1].append(frame.bytes)
            if not frame.more:
                break
    return out, status


@compiled_only
def test_drain_reads_whole_messages_in_order_from_several_senders(router_dealers):
    router, dealer = router_dealers
    senders = [dealer(b"d%d" % k) for k in range(3)]
    n = 3000
    sent: dict[bytes, list] = {}

    def send(k: int, sock) -> None:
        out = sent[b"d%d" % k] = []
        for i in range(n):
            parts = [b"%d:%d:%d" % (k, i, j) for j in range(1 + (i * 7 + k) % 4)]
            if len(parts) == 1 and i % 2:
                assert zcore.send_bytes(sock.underlying, parts[0]) == 0
            else:
                sock.send_multipart(parts)
            out.append(parts)

    threads = [threading.Thread(target=send, args=(k, s)) for k, s in enumerate(senders)]
    for thread in threads:
        thread.start()
    got: dict[bytes, list] = {b"d0": [], b"d1": [], b"d2": []}
    deadline = time.monotonic() + 30
    while sum(map(len, got.values())) < 3 * n and time.monotonic() < deadline:
        msgs, status = _read(router, 1000)
        assert status >= 0
        assert len(msgs) <= 64  # ZC_BATCH messages per call at most
        for msg in msgs:
            got[msg[0]].append(msg[1:])
    for thread in threads:
        thread.join(10)
    assert got == sent


@compiled_only
def test_drain_keeps_large_frames_without_a_copy_and_reads_messages_whole(router_dealers):
    """Up to 6 frames a message come whole from one drain; a frame of 64 KiB or more
    is a Frame that owns libzmq's message (no copy): the same bytes, a writable view,
    valid after the socket has moved on and after its sender closed; 7 frames: the
    rest is the caller's to read (MORE)."""
    router, dealer = router_dealers
    sock = dealer(b"d")
    big = os.urandom(1 << 20)
    edge = os.urandom(zcore_zero_copy() - 1)
    sock.send_multipart([b"head", b"desc", big])
    sock.send_multipart([b"a", edge, b"c", b"d", b"e"])
    sock.send_multipart([b"%d" % i for i in range(7)])
    got: list[tuple] = []
    statuses = []
    deadline = time.monotonic() + 10
    while len(got) < 3 and time.monotonic() < deadline:
        msgs, status = zcore.drain(router.underlying, 1000)
        got += msgs
        statuses.append(status)
    assert len(got) == 3 and statuses[-1] == zcore.MORE
    first, second, third = got
    frame_type = zcore.frame_class()
    assert first[:3] == (b"d", b"head", b"desc") and type(first[3]) is frame_type
    frame = first[3]
    assert len(frame) == 1 << 20 and frame.bytes == big and not frame.more
    view = frame.buffer
    assert not view.readonly and view.nbytes == 1 << 20  # writable, as pyzmq's Frame
    assert second == (b"d", b"a", edge, b"c", b"d", b"e")  # < 64 KiB: bytes (copied)
    assert third == (b"d", *(b"%d" % i for i in range(5)))  # 6 frames, the 7th left
    rest = router.recv_multipart()
    assert rest == [b"5", b"6"]
    # The frame outlives what follows on the socket, and its sender.
    for _ in range(3):
        sock.send_multipart([b"h", b"d", os.urandom(1 << 20)])
    n = 0
    while n < 3 and time.monotonic() < deadline:
        n += len(zcore.drain(router.underlying, 1000)[0])
    sock.close(0)
    arr = np.frombuffer(frame, np.uint8)
    assert arr.tobytes() == big and bytes(view) == big
    del frame, view
    assert arr.tobytes() == big  # the array holds the frame alive


def zcore_zero_copy() -> int:
    """The size from which zcore.drain keeps a frame (common.ZERO_COPY_BYTES)."""
    from mesh.engine.common import ZERO_COPY_BYTES

    return ZERO_COPY_BYTES


@compiled_only
def test_drain_waits_for_the_timeout_and_returns_full_batches(router_dealers):
    router, dealer = router_dealers
    sock = dealer(b"d")
    t0 = time.monotonic()
    assert zcore.drain(router.underlying, 60) == ([], zcore.DRAINED)
    assert time.monotonic() - t0 >= 0.05  # it waited (poll without the GIL)
    assert zcore.drain(router.underlying, 0) == ([], zcore.DRAINED)
    for i in range(150):
        sock.send(b"m%d" % i)
    assert wait_until(lambda: router.poll(0), 5)
    time.sleep(0.1)  # all 150 arrived (one tcp connection: in order)
    seen: list[bytes] = []
    statuses = []
    while len(seen) < 150:
        msgs, status = zcore.drain(router.underlying, 1000)
        statuses.append(status)
        seen += [m[1] for m in msgs]
    assert seen == [b"m%d" % i for i in range(150)]
    assert statuses[:2] == [zcore.FULL, zcore.FULL]  # 64, 64, then the 22 left


@compiled_only
def test_drain_says_when_the_context_ends_under_it():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    result: list = []
    waiter = threading.Thread(target=lambda: result.append(zcore.drain(router.underlying, 5000)),
                              daemon=True)
    closer = threading.Thread(target=ctx.term, daemon=True)  # returns once the socket closes
    try:
        waiter.start()
        time.sleep(0.1)  # it waits in zmq_poll, without the GIL (this thread runs)
        closer.start()
        waiter.join(5)
        assert result == [([], -zmq.ETERM)]
    finally:
        router.close(0)
        closer.join(5)
    assert not closer.is_alive()

@compiled_only
def test_send_bytes_says_eagain_and_refuses_what_is_not_bytes():
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        # No peer yet: a DEALER has no pipe to put it in, so it would wait.
        assert zcore.send_bytes(sock.underlying, b"x") == errno.EAGAIN
        assert zcore.send_bytes(sock.underlying, bytearray(b"x")) == -1
        assert zcore.send_bytes(sock.underlying, "x") == -1  # type: ignore[arg-type]
    finally:
        sock.close(0)


@compiled_only
@pytest.mark.parametrize("subject", ["a", "bench.ping", "é.ü/中", "s" * 300])
@pytest.mark.parametrize("size", [0, 1, 64, 1024, wire.ONE_FRAME_MAX])
def test_pack_one_is_wires_one_frame(subject, size):
    data = os.urandom(size)
    for seq, ts, sid, req_id in ((1, 0.0, 1, None), (2**63 - 1, 1.7e9, 2**40, 0),
                                 (12345, -1.5, 7, 2**63 - 1)):
        frame = zcore.pack_one(subject.encode(), seq, ts, sid, -1 if req_id is None else req_id,
                               data)
        assert [frame] == wire.lone_frames(subject, seq, ts, req_id, sid, [data])
        assert wire.unpack_one(frame) == (
            wire.MSG, (subject, seq, ts, 0, None, req_id, [sid]), data)
    with pytest.raises(OverflowError):
        zcore.pack_one(b"a", 2**64, 0.0, 1, -1, data)


def test_a_flood_of_lone_messages_arrives_whole_and_in_order(make_node):
    """More messages than one drain reads (zcore: 32 rounds of 64), waiting in the
    ROUTER while the I/O thread is busy, one frame and two frames (past
    wire.ONE_FRAME_MAX) alternating: all arrive, in order, nothing dropped."""
    a = make_node("a", batch_bytes=0, inline_budget=30.0)  # every message lone
    b = make_node("b", seeds=[a.endpoints[0]], batch_bytes=0)
    b.wait_for_peers(1, timeout=10)
    gate = threading.Event()
    got: list[bytes] = []

    def handler(msg):
        if not got:
            gate.wait(10)  # the I/O thread stays here while the rest piles up
        got.append(bytes(msg.data[:8]))

    a.subscribe("flood", handler, inline=True, credits=10_000, credit_bytes=None)
    b.wait_for_subscribers("flood", 1, timeout=10)
    n = 3000
    for i in range(n):
        pad = wire.ONE_FRAME_MAX + 1 if i % 2 else 56
        b.publish("flood", b"%08d" % i + b"." * pad, timeout=10)
    gate.set()
    assert wait_until(lambda: len(got) == n, 30), len(got)
    assert got == [b"%08d" % i for i in range(n)]
    assert not a.status()["counters"]["drops"]
    assert a.gaps == 0


def test_lone_messages_and_small_replies_cross_processes(procs, make_node, monkeypatch):
    """A worker process's inline handler gets this process's lone messages in order,
    and its plain replies come back in one frame: read here in C (compiled build)."""
    worker = procs.start("worker")
    me = make_node("me", seeds=[worker.tcp])
    # zcore.drain_core hands a lone frame to on_one in C; what on_one declines goes
    # to _handle_one (the Python path): count those.
    in_python = []
    handle_one = me._handle_one

    def spy(ident, head):
        in_python.append(head)
        return handle_one(ident, head)

    monkeypatch.setattr(me, "_handle_one", spy)
    me.wait_for_peers(1, timeout=10)
    sid = worker.call("subscribe", pattern="x", inline=True)
    worker.call("subscribe", pattern="svc", mode="respond_name")
    me.wait_for_subscribers("x", 1, timeout=10)
    me.wait_for_subscribers("svc", 1, timeout=10)
    for i in range(1, 201):
        me.publish("x", str(i).encode())
        if i % 20 == 0:
            assert me.request("svc", b"?", timeout=5).data == b"worker"
    got = worker.call("collected", sid=sid, n=200, timeout=10)
    assert [r["data"] for r in got] == [str(i).encode() for i in range(1, 201)]
    assert not worker.call("status")["counters"]["drops"]
    if zcore.available():
        # Replies read in C: at least one of the 10 never reached the Python path
        # (not all need to: owed credit may ride in front of one, which then has two
        # frames and takes the general path).
        assert len(in_python) < 10
    else:
        assert not in_python  # the pure build reads with pyzmq, never through zcore


def test_default_handlers_ping_pong_past_the_window_with_a_raising_handler(make_node):
    """zcore.dispatch_loop/run_one/return_credit (the dispatch thread's lone message):
    one message at a time, far past a 2-message window, so every credit must come back
    from the dispatch thread; a handler that raises once is counted and the thread
    goes on; the handler runs on the dispatch thread, never the I/O thread."""
    a = make_node("a")
    b = make_node("b", seeds=[a.endpoints[0]])
    b.wait_for_peers(1, timeout=10)
    got: list[bytes] = []
    threads: set[str] = set()
    arrived = threading.Semaphore(0)

    def handler(msg):
        threads.add(threading.current_thread().name)
        arrived.release()
        if msg.data == b"7":
            raise ValueError("raised on purpose by the test")
        got.append(bytes(msg.data))

    b.subscribe("x", handler, credits=2)
    a.wait_for_subscribers("x", 1, timeout=10)
    for i in range(40):
        a.publish("x", str(i).encode(), timeout=5)  # raises when no credit came back
        assert arrived.acquire(timeout=5), f"message {i} never reached the handler"
    assert got == [str(i).encode() for i in range(40) if i != 7]
    assert threads == {f"mesh-dispatch-{b.name}"}
    assert wait_until(lambda: b.status()["counters"]["drops"].get("handler_error") == 1, 5)
    assert "dispatch_error" not in b.status()["counters"]["drops"]


def test_arrays_on_the_socket_arrive_intact_and_independent(make_node):
    """Arrays on the tcp socket (shm=False), 1-d of 1 MiB and 2-d of 512 KiB: in the
    compiled build zcore.drain keeps their data without a copy (a zcore Frame) and
    on_array hands them out; an inline handler and an inbox take the general path.
    Every array arrives with its shape and values, and stays as it was while later
    ones arrive: a handler writing into its own array changes no other."""
    a = make_node("a", shm=False, transports=("tcp",))
    b = make_node("b", seeds=[a.endpoints[0]], shm=False, transports=("tcp",))
    b.wait_for_peers(1, timeout=10)
    kept: list[tuple[int, np.ndarray]] = []
    owners: set = set()
    inline: list[np.ndarray] = []

    def handler(msg):
        arr = msg.array()
        owners.add(type(msg.data.obj))
        kept.append((msg.seq, arr))
        arr.flat[0] = -1.0  # the receiver's own copy: no other array may change

    a.subscribe("arr", handler)
    a.subscribe("arr.inline", lambda msg: inline.append(msg.array().copy()), inline=True)
    inbox = a.subscribe("arr.inbox")
    for subject in ("arr", "arr.inline", "arr.inbox"):
        b.wait_for_subscribers(subject, 1, timeout=10)

    def payload(i: int) -> np.ndarray:
        shape = (1 << 18,) if i % 2 else (256, 512)
        return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) + i

    n = 40
    for i in range(n):
        b.publish("arr", payload(i), timeout=10)
    b.publish("arr.inline", payload(1), timeout=10)
    b.publish("arr.inbox", payload(2), timeout=10)
    assert wait_until(lambda: len(kept) == n and inline, 30), len(kept)
    got = inbox.next(timeout=10).array()
    for i, (seq, arr) in enumerate(kept):
        expected = payload(i)
        expected.flat[0] = -1.0
        assert seq == i + 1 and arr.shape == expected.shape and arr.dtype == np.float32
        assert np.array_equal(arr, expected), f"array {i} changed"
    assert np.array_equal(inline[0], payload(1)) and np.array_equal(got, payload(2))
    if zcore.available():
        assert owners == {zcore.frame_class()}  # no copy on the way
    else:
        assert owners == {zmq.Frame}
    assert not a.status()["counters"]["drops"] and a.gaps == 0


def test_an_array_sent_without_a_copy_is_let_go_once_sent(make_node):
    """An array's data leaves without a copy (compiled: zcore.send_parts, libzmq
    sends from the array's memory); once libzmq is done the node lets go of it (the
    I/O thread's next turn), so the application's array is freed; what arrived is
    what was sent."""
    import gc
    import weakref

    a = make_node("a", shm=False, transports=("tcp",))
    b = make_node("b", seeds=[a.endpoints[0]], shm=False, transports=("tcp",))
    b.wait_for_peers(1, timeout=10)
    got: list[np.ndarray] = []
    a.subscribe("arr", lambda msg: got.append(msg.array()))
    b.wait_for_subscribers("arr", 1, timeout=10)
    refs = []
    for i in range(5):
        arr = np.arange(1 << 18, dtype=np.float32) * (i + 1)
        refs.append(weakref.ref(arr))
        b.publish("arr", arr, timeout=10)
        del arr
    assert wait_until(lambda: len(got) == 5, 10)
    for i, arr in enumerate(got):
        assert np.array_equal(arr, np.arange(1 << 18, dtype=np.float32) * (i + 1))
    assert wait_until(lambda: gc.collect() >= 0 and all(r() is None for r in refs), 10), \
        "a sent array is still held"

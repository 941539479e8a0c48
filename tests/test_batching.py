"""Micro-batching of small messages: invisible to receivers, off for sparse traffic."""

from __future__ import annotations

import threading
import time

import msgpack
import pytest
import zmq

import mesh
from mesh import wire

pytestmark = pytest.mark.timeout(60)


def two_nodes(make_node, **options):
    a = make_node("a", transports=("ipc",), **options)
    b = make_node("b", transports=("ipc",), seeds=[a.endpoints[0]], **options)
    b.wait_for_peers(1, timeout=10)
    return a, b


@pytest.mark.parametrize("batch_bytes", [16384, 0])
def test_a_burst_arrives_whole_and_in_order(make_node, batch_bytes):
    a, b = two_nodes(make_node, batch_bytes=batch_bytes)
    sub = a.subscribe("burst.>", credits=100_000)
    b.wait_for_subscribers("burst.x", 1, timeout=10)
    for i in range(1, 3001):
        b.publish("burst.x", b"%d" % i)
    got = [int(sub.next(timeout=10).data) for _ in range(3000)]
    assert got == list(range(1, 3001))
    assert a.status()["counters"]["gaps"] == 0
    if batch_bytes:
        assert 0 < b.batches_out < 3000, "a burst of small messages was not batched"
        assert len(b._ballast_out) == 0  # small batch frames: none kept
    else:
        assert b.batches_out == 0


def test_sparse_messages_are_not_held_back(make_node):
    a, b = two_nodes(make_node, batch_delay=0.001)
    sub = a.subscribe("sparse")
    b.wait_for_subscribers("sparse", 1, timeout=10)
    for i in range(5):
        b.publish("sparse", b"%d" % i)
        assert sub.next(timeout=5).data == b"%d" % i
        time.sleep(0.01)  # longer than batch_delay: the link is idle again
    assert b.batches_out == 0


def test_a_large_message_after_a_batch_keeps_order(make_node):
    a, b = two_nodes(make_node, batch_delay=0.05)
    sub = a.subscribe("mix.>", credits=10_000)
    b.wait_for_subscribers("mix.x", 1, timeout=10)
    b.publish("mix.x", b"first")
    for i in range(10):
        b.publish("mix.x", b"small %d" % i)  # these wait in a batch
    b.publish("mix.x", b"L" * 100_000)  # must not overtake them
    got = [bytes(sub.next(timeout=5).data)[:8] for _ in range(12)]
    assert got == [b"first"] + [b"small %d" % i for i in range(10)] + [b"L" * 8]


def test_close_flushes_a_waiting_batch(make_node):
    a, b = two_nodes(make_node, batch_delay=5.0)  # only close can send it in time
    sub = a.subscribe("last.>")
    b.wait_for_subscribers("last.x", 1, timeout=10)
    b.publish("last.x", b"0")
    for i in range(1, 6):
        b.publish("last.x", b"%d" % i)
    b.close()
    assert [int(sub.next(timeout=5).data) for _ in range(6)] == list(range(6))


def test_a_burst_of_1_kib_messages_shares_one_batch_by_default(make_node):
    """A batch costs its receiver a fixed ~30 µs or more whatever it holds, so 1 KiB
    messages are batched by the hundred like small ones (not ~60 to a 64 KiB batch):
    400 of them wait in one batch (batch_delay long, so only its size or close()
    can send it), which leaves whole on close, without a copy (over 256 KiB), and
    arrives intact and in order."""
    a, b = two_nodes(make_node, batch_delay=5.0)
    sub = a.subscribe("kib.>")  # the default window: its batch cap is 512 messages
    b.wait_for_subscribers("kib.x", 1, timeout=10)
    n = 401  # the first one leaves at once (no burst yet)
    sent = [b"%04d" % i + bytes([i % 251]) * 1000 for i in range(n)]
    for data in sent:
        b.publish("kib.x", data)
    assert b.batches_out == 0, "a 1 KiB burst was cut into batches of less than 400 KiB"
    b.close()
    got = [sub.next(timeout=10).data for _ in range(n)]
    assert got == sent
    assert b.batches_out == 1
    # The batch frame (over 256 KiB), the highest of its heap, is kept (engine/heap.py).
    # (over 256 KiB: on a loaded machine the first few may have left alone, unbatched)
    assert len(b._ballast_out) == 1 and b._ballast_out.held_bytes > 256 * 1024


def test_bad_batch_option_is_a_config_error():
    with pytest.raises(mesh.ConfigError):
        mesh.Node(discovery="none", batch_bytes=-1)


def test_runs_keep_each_message_its_own_subject_seq_headers_and_bytes(make_node):
    """A batch shares one header among a run of plain messages to the same subject
    and subscriptions; anything else starts a new run. None of it shows."""
    a, b = two_nodes(make_node, batch_delay=0.05)
    # A burst is publishes less than link._BURST_GAP apart; on a loaded machine a
    # preempted publisher may miss it, so the scenario runs again (on fresh subjects)
    # until one burst was batched, up to five times.
    for attempt in range(5):
        batched = b.batches_out
        x, y = f"mix{attempt}.x", f"mix{attempt}.y"
        two = a.subscribe(y, credits=10_000)
        one = a.subscribe(f"mix{attempt}.>", credits=10_000)
        b.wait_for_subscribers(x, 1, timeout=10)  # interest arrives in order: both known
        buf = bytearray(b"original")
        sent = []
        for i in range(40):
            subject = y if i % 7 in (3, 4) else x
            headers = {"i": i} if i % 10 == 5 else None
            b.publish(subject, b"%d" % i, headers=headers)
            sent.append((subject, b"%d" % i, headers or {}))
            if i == 20:
                b.publish(x, buf)  # a buffer the caller reuses at once
                buf[:] = b"reused!!"
                sent.append((x, b"original", {}))
        got = [one.next(timeout=5) for _ in range(len(sent))]
        assert [(m.subject, bytes(m.data), m.headers) for m in got] == sent
        for subject in (x, y):
            seqs = [m.seq for m in got if m.subject == subject]
            assert seqs == list(range(1, len(seqs) + 1))
        on_y = [(m.subject, bytes(m.data)) for m in (two.next(timeout=5) for _ in range(12))]
        assert on_y == [(s, d) for s, d, _ in sent if s == y]
        assert b.batches_out - batched < 20, "a batch per message or two"
        if b.batches_out > batched:
            break
    assert b.batches_out > 0, "the burst was not batched"
    assert a.status()["counters"]["gaps"] == 0


def _counting(node, name: str) -> list:
    """Count calls of one of ``node``'s methods (an instance attribute shadows it)."""
    calls: list = []
    method = getattr(node, name)

    def counted(*args, **kwargs):
        calls.append(args[0] if args else None)
        return method(*args, **kwargs)

    setattr(node, name, counted)
    return calls


def _slow_sink(node, subject: str, window: int) -> list:
    got: list = []

    def handle(msg):
        time.sleep(0.001)  # slower than the publisher: it runs out of credit
        got.append(int(msg.data))

    node.subscribe(subject, handle, credits=window)
    return got


def _wait_for(got: list, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_publisher_that_waited_for_credit_keeps_batching(make_node):
    """Out of credit, the publisher flushes its batch and waits; the message after
    the wait is still part of the burst, so it starts the next batch instead of
    leaving alone (one frame, one header, one wake-up of the receiver each)."""
    a, b = two_nodes(make_node, batch_delay=0.05)
    got = _slow_sink(a, "held", window=8)
    b.wait_for_subscribers("held", 1, timeout=10)
    waits = _counting(b, "_wait_for_credit")
    alone = _counting(b, "_put_frames")  # a message sent outside a batch
    for i in range(200):
        b.publish("held", b"%d" % i, timeout=10)
    _wait_for(got, 200)
    assert got == list(range(200))
    assert len(waits) >= 10, "the publisher never ran out of credit: nothing was tested"
    # Before: one lone message after every wait. A few may still leave alone when
    # this thread loses the CPU for longer than the burst gap.
    assert len(alone) < len(waits) // 4, f"{len(alone)} messages left alone after {len(waits)} waits"


def test_credit_goes_back_on_the_data_socket_without_a_hop(make_node):
    """The dispatch thread sends credit itself on the link's data socket: no command
    to (and no wake-up of) the I/O thread."""
    a, b = two_nodes(make_node)
    commands = _counting(a, "_command")
    got = _slow_sink(a, "direct", window=16)
    b.wait_for_subscribers("direct", 1, timeout=10)
    for i in range(300):
        b.publish("direct", b"%d" % i, timeout=10)
    _wait_for(got, 300)
    assert got == list(range(300))
    kinds = [cmd[0] for cmd in commands]
    assert "credit" not in kinds
    window = next(iter(b._links[a.id].windows.values()))
    assert window.sent == 300 and window.in_flight <= 16


def test_credit_takes_the_io_thread_when_the_link_is_busy(make_node):
    """While another thread holds the link (a publisher sending on it), the dispatch
    thread does not wait for it: the I/O thread sends the credit on the control
    socket, and the publisher still gets every credit back."""
    # shm=False: the shared-memory handshake also takes the link lock on the I/O
    # thread; arriving while the test holds it, it would stall that thread until
    # the peer declared it dead.
    a, b = two_nodes(make_node, shm=False)
    commands = _counting(a, "_command")
    got = _slow_sink(a, "busy", window=16)
    b.wait_for_subscribers("busy", 1, timeout=10)
    with a._links[b.id].lock:  # the subscriber's side of the link, held throughout
        for i in range(100):
            b.publish("busy", b"%d" % i, timeout=10)
        _wait_for(got, 100)
    assert got == list(range(100))
    assert "credit" in [cmd[0] for cmd in commands]


def _wait_until(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_credit_rides_on_replies_to_the_publisher(make_node):
    """Credit the subscriber owes a node it sends to anyway (here: the replies to
    that node's requests) rides in front of those frames: no message of its own.
    It rides once an eighth of the grant's threshold is owed (credits=64: threshold
    16, so two messages' worth), not one message's on every frame. The last
    credit, with nothing after it to ride on, still comes back alone."""
    a, b = two_nodes(make_node)
    a.subscribe("svc", lambda msg: msg.respond(msg.data), credits=64)
    b.wait_for_subscribers("svc", 1, timeout=10)
    for i in range(200):
        assert b.request("svc", b"%d" % i, timeout=5).data == b"%d" % i
    window = next(iter(b._links[a.id].windows.values()))
    assert _wait_until(lambda: window.in_flight == 0), f"{window.in_flight} credits never came back"
    updates = a.status()["counters"]["credit_updates"]
    # Each request's credit is owed once its handler returned; every second reply
    # finds two owed and carries them. Never more rides than that: each carries
    # at least two of the 200 messages' credit.
    assert 80 <= updates["riding"] <= 100, updates
    assert updates["data"] + updates["control"] <= 10, updates
    assert not any(b.status()["counters"]["drops"].values())


def test_credit_for_a_held_link_does_not_stall_the_io_thread(make_node):
    """Credit arriving while a publishing thread holds the link (as one waiting for
    room in a full peer queue does) is left for later: the I/O thread does not wait
    for the lock (it used to, and the node stopped answering anything meanwhile).
    Once the lock is free the credit is applied and the window opens again."""
    # Messages leave at once (no batch waiting for the timer behind the held lock).
    a, b = two_nodes(make_node, shm=False, batch_bytes=0)
    gate = threading.Event()
    got: list = []

    def handle(msg):
        gate.wait(10)
        got.append(int(msg.data))

    a.subscribe("held", handle, credits=8)
    b.wait_for_subscribers("held", 1, timeout=10)
    for i in range(8):
        b.publish("held", b"%d" % i, timeout=5)  # exactly the window
    link = b._links[a.id]
    window = next(iter(link.windows.values()))
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(b.endpoints[0])
    try:
        with link.lock:
            assert window.in_flight == 8
            gate.set()
            _wait_for(got, 8)
            assert len(got) == 8
            assert _wait_until(lambda: bool(link.credit_in))  # it arrived, and waits
            raw.send(wire.pack(wire.STATUS_REQ, 7))  # the I/O thread still answers
            assert raw.poll(5000), "the I/O thread is stuck on the link lock"
            header = msgpack.unpackb(raw.recv_multipart()[0], raw=False, strict_map_key=False)
            assert header[1] == wire.STATUS and header[2][0] == 7
            assert window.in_flight == 8  # not applied behind the holder's back
        assert _wait_until(lambda: window.in_flight == 0)  # applied once the lock is free
    finally:
        raw.close(linger=0)
    assert got == list(range(8))


def test_the_fast_path_follows_route_changes_mid_burst(make_node):
    """The compiled fast path checks a route once and then trusts it while the same
    Route object comes back: a subscription added mid-burst (local, here) makes a new
    route, which must take the local subscriber in from the next message on."""
    a, b = two_nodes(make_node)
    # A burst is publishes less than link._BURST_GAP apart; on a loaded machine a
    # preempted publisher may miss it, so the scenario runs again (on fresh subjects)
    # until one burst was batched, up to five times.
    for attempt in range(5):
        batched = b.batches_out
        remote = a.subscribe(f"rc{attempt}.>", credits=100_000)
        b.wait_for_subscribers(f"rc{attempt}.x", 1, timeout=10)
        for i in range(1, 1001):
            b.publish(f"rc{attempt}.x", b"%d" % i)
        # The route changes under the burst.
        local = b.subscribe(f"rc{attempt}.x", credits=100_000)
        for i in range(1001, 2001):
            b.publish(f"rc{attempt}.x", b"%d" % i)
        assert [int(remote.next(timeout=10).data) for _ in range(2000)] == list(range(1, 2001))
        assert [int(local.next(timeout=10).data) for _ in range(1000)] == list(range(1001, 2001))
        if b.batches_out > batched:
            break
    assert b.batches_out > 0, "the burst was not batched: the fast path was not exercised"


def test_threads_publishing_on_different_subjects_keep_their_own_seqs(make_node):
    """Two threads interleave fast publishes on two subjects (the fast path remembers
    the last route it took): each subject's messages arrive whole and in order, with
    the sequence numbers of their own subject."""
    a, b = two_nodes(make_node)
    subs = {s: a.subscribe(f"tt.{s}", credits=100_000) for s in ("x", "y")}
    for s in subs:
        b.wait_for_subscribers(f"tt.{s}", 1, timeout=10)
    n = 3000

    def burst(s: str) -> None:
        for i in range(1, n + 1):
            b.publish(f"tt.{s}", b"%d" % i, timeout=10)

    threads = [threading.Thread(target=burst, args=(s,)) for s in subs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for s, sub in subs.items():
        msgs = [sub.next(timeout=10) for _ in range(n)]
        assert [int(m.data) for m in msgs] == list(range(1, n + 1))
        assert [m.seq for m in msgs] == list(range(1, n + 1)), s
        assert all(m.subject == f"tt.{s}" for m in msgs)
    assert a.status()["counters"]["gaps"] == 0


def test_with_batching_off_every_small_publish_takes_the_lone_fast_path(make_node):
    """batch_bytes=0 used to send every message down the general path (Python frames,
    pyzmq's send), so turning batching off made a lone message slower than with it on.
    Now each small publish to one remote subscription goes alone through the fast
    path, bursts included, and arrives whole and in order."""
    a, b = two_nodes(make_node, shm=False, batch_bytes=0)
    got: list = []
    a.subscribe("lone", lambda msg: got.append(msg.data))
    b.wait_for_subscribers("lone", 1, timeout=10)
    b.publish("lone", b"first", timeout=5)  # the subject's first message: the general path
    _wait_for(got, 1)
    taken = [b._hot.publish("lone", b"%d" % i, None, 5.0) for i in range(200)]
    assert all(taken)  # a burst too: with batching off there is no batch to start
    _wait_for(got, 201)
    assert got == [b"first"] + [b"%d" % i for i in range(200)]
    assert not b._links[a.id].batch
    assert not any(a.status()["counters"]["drops"].values())

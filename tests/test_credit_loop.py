"""The credit loop's costs (issue #16): credit that finds its link held is looked at
again soon only when someone needs it; a batch is sent keeping the GIL. Real nodes
over ipc in one process (as tests/test_batching.py), raw ZeroMQ sockets for the send."""

from __future__ import annotations

import threading
import time

import pytest
import zmq
from test_batching import two_nodes

from mesh.engine import link as link_mod
from mesh.engine import loop

pytestmark = pytest.mark.timeout(60)


def _wait_until(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def test_credit_for_a_held_link_is_looked_at_soon_only_when_someone_waits(make_node):
    """Credit that finds its link held by a publisher: with nobody waiting for it the
    I/O thread looks again lazily (the publisher applies it when it next publishes);
    with a publisher waiting for credit, soon. Either way it is applied."""
    a, b = two_nodes(make_node, batch_bytes=0, shm=False)
    lazy_gate, urgent_gate = threading.Event(), threading.Event()
    got: dict[str, list] = {"lazy": [], "urgent": []}

    def sink(name, gate):
        def handle(msg):
            gate.wait(10)
            got[name].append(int(msg.data))
        return handle

    a.subscribe("lazy", sink("lazy", lazy_gate), credits=8)
    a.subscribe("urgent", sink("urgent", urgent_gate), credits=8)
    b.wait_for_subscribers("lazy", 1, timeout=10)
    b.wait_for_subscribers("urgent", 1, timeout=10)
    link = b._links[a.id]

    # Nobody waits: looked at again lazily, applied once the lock is free.
    for i in range(8):
        b.publish("lazy", b"%d" % i, timeout=5)
    window = next(w for w in link.windows.values() if w.sent == 8)
    with link.lock:
        lazy_gate.set()
        assert _wait_until(lambda: len(got["lazy"]) == 8)
        assert _wait_until(lambda: bool(link.credit_in))
        assert _wait_until(lambda: b._credit_retry == loop._CREDIT_RETRY_LAZY)
    assert _wait_until(lambda: window.in_flight == 0)

    # A publisher waits for credit: looked at again soon.
    for i in range(8):
        b.publish("urgent", b"%d" % i, timeout=5)
    errors: list = []

    def blocked():
        try:
            b.publish("urgent", b"8", timeout=10)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    publisher = threading.Thread(target=blocked, daemon=True)
    publisher.start()
    try:
        assert _wait_until(lambda: link.waiting == 1), "the publisher never waited for credit"
        with link.lock:  # it waits in cond.wait: the lock is free for us to take
            urgent_gate.set()
            assert _wait_until(lambda: len(got["urgent"]) == 8)
            assert _wait_until(lambda: bool(link.credit_in))
            assert _wait_until(lambda: b._credit_retry == loop._CREDIT_RETRY)
    finally:
        urgent_gate.set()
        publisher.join(15)
    assert not publisher.is_alive() and not errors, errors
    assert _wait_until(lambda: len(got["urgent"]) == 9)
    assert got["urgent"] == list(range(9)) and got["lazy"] == list(range(8))
    assert link.waiting == 0


def test_a_batch_is_sent_whole_keeping_the_gil_and_a_full_queue_raises_again():
    """_send_copied calls libzmq's zmq_send without letting go of the GIL (found in
    this process: pyzmq's wheel loads exactly one libzmq). The frames arrive as one
    multipart message; a queue that takes nothing raises zmq.Again and leaves no
    part behind (the next message arrives whole)."""
    assert link_mod._ZMQ_SEND is not None, "libzmq's zmq_send was not found"
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    lonely = ctx.socket(zmq.DEALER)  # connected to nothing: every send would block
    try:
        for sock in (router, dealer, lonely):
            sock.setsockopt(zmq.LINGER, 0)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        link_mod._send_copied(dealer, [b"head", bytearray(b"body" * 1000), b""])
        assert router.poll(5000)
        frames = router.recv_multipart()
        assert frames[1:] == [b"head", b"body" * 1000, b""]
        with pytest.raises(zmq.Again):
            link_mod._send_copied(lonely, [b"one", b"two"])
        lonely.connect(f"tcp://127.0.0.1:{port}")
        link_mod._send_copied(lonely, [b"three", b"four"])
        assert router.poll(5000)
        assert router.recv_multipart()[1:] == [b"three", b"four"]
        # And pyzmq's send, which lets go of the GIL, when asked (credit runs low).
        link_mod._send_copied(dealer, [b"five"], keep_gil=False)
        assert router.poll(5000)
        assert router.recv_multipart()[1:] == [b"five"]
    finally:
        for sock in (router, dealer, lonely):
            sock.close(linger=0)

"""The credit loop's costs (issue #16): credit that finds its link held is looked at
again soon only when someone needs it (each look is a wake-up of the I/O thread and
a fight for the GIL with the publisher). Real nodes over ipc in one process, as
tests/test_batching.py."""

from __future__ import annotations

import threading
import time

import pytest
from test_batching import two_nodes

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

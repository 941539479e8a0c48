"""The subscriber's batch path (mesh/engine/receive.py): a run of a batch reaches a
handler as one dispatch item; handlers, errors, closing and credit behave as for
single messages. Two real nodes over ipc, batching on (the default)."""

from __future__ import annotations

import threading
import time

import pytest
from test_batching import two_nodes

pytestmark = pytest.mark.timeout(60)



def _wait_until(check, timeout: float = 10.0, step: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def test_a_batch_reaches_handlers_whole_in_order_with_its_fields(make_node):
    a, b = two_nodes(make_node, batch_delay=0.05)
    got: list = []
    others: list = []
    done = threading.Event()

    def handle(msg):
        got.append((msg.subject, msg.seq, msg.sender, msg.data, msg.headers, msg.is_request))
        if len(got) == 2000:
            done.set()

    sub = a.subscribe("run.x", handle)
    probes: list = []
    a.subscribe("run.*", lambda msg: (others if msg.subject == "run.x" else probes).append(msg.seq))
    b.wait_for_subscribers("run.x", 1, timeout=10)
    # The second subscription's interest came after the first's: once a probe reaches
    # it, both are known to the publisher.
    assert _wait_until(lambda: b.publish("run.probe", b"") or bool(probes), step=0.02)
    for i in range(2000):
        b.publish("run.x", b"%d" % i, timeout=10)
    assert done.wait(20), f"{len(got)} of 2000 delivered"
    assert b.batches_out > 0, "nothing was batched: the run path was not tested"
    first = got[0][1]
    assert got == [("run.x", first + i, b.id, b"%d" % i, {}, False) for i in range(2000)]
    assert _wait_until(lambda: len(others) == 2000)
    assert others == [first + i for i in range(2000)]
    assert _wait_until(lambda: sub.delivered == 2000)
    status = a.status()["counters"]
    assert status["gaps"] == 0 and not status["drops"].get("credit_violation")
    # Every message's credit went back to the grant (nothing held for good).
    grant = sub._grants[b.id]
    assert _wait_until(lambda: grant.consumed == 2000 and grant.buffered == 0)


def test_a_handler_that_raises_in_a_batch_loses_nothing_else(make_node):
    """Errors are logged and counted; the rest of the run is handled and the whole
    window comes back (a small window: the publisher would stall otherwise)."""
    a, b = two_nodes(make_node, batch_delay=0.05)
    got: list = []

    def handle(msg):
        got.append(int(msg.data))
        if int(msg.data) % 7 == 0:
            raise ValueError("handler bug")

    sub = a.subscribe("err", handle, credits=64)
    b.wait_for_subscribers("err", 1, timeout=10)
    for i in range(1000):
        b.publish("err", b"%d" % i, timeout=10)  # raises if the window never comes back
    assert _wait_until(lambda: len(got) == 1000), f"{len(got)} of 1000"
    assert got == list(range(1000))
    assert b.batches_out > 0
    assert a.status()["counters"]["drops"].get("handler_error") == len(range(0, 1000, 7))
    assert _wait_until(lambda: sub.delivered == 1000)


def test_a_handler_that_closes_its_subscription_gets_nothing_more(make_node):
    a, b = two_nodes(make_node, batch_delay=0.05)
    got: list = []
    holder: list = []

    def handle(msg):
        got.append(int(msg.data))
        if len(got) == 10:
            holder[0].close()

    holder.append(a.subscribe("close", handle))
    b.wait_for_subscribers("close", 1, timeout=10)
    for i in range(300):  # one burst: the 10th message is in the middle of a run
        b.publish("close", b"%d" % i, timeout=10)
    assert _wait_until(lambda: len(got) >= 10)
    time.sleep(0.3)  # the rest of the burst has arrived meanwhile
    assert got == list(range(10))
    assert b.batches_out > 0


def test_a_slow_handler_gives_credit_back_before_its_batch_is_done(make_node):
    """The credit of what a slow handler finished goes back after _CREDIT_HOLD, not
    when the whole run (here ~0.3 s of handling) is done."""
    a, b = two_nodes(make_node, batch_delay=0.05)
    got: list = []

    def handle(msg):
        time.sleep(0.003)
        got.append(int(msg.data))

    sub = a.subscribe("slow", handle)
    b.wait_for_subscribers("slow", 1, timeout=10)
    for i in range(100):
        b.publish("slow", b"%d" % i, timeout=10)
    assert _wait_until(lambda: b.id in sub._grants)
    grant = sub._grants[b.id]
    assert _wait_until(lambda: grant.consumed >= 10, step=0.001)
    assert len(got) < 90, "the credit waited for the end of the batch"
    assert b.batches_out > 0
    assert _wait_until(lambda: len(got) == 100 and grant.consumed == 100)
    assert got == list(range(100))

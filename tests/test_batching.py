"""Micro-batching of small messages: invisible to receivers, off for sparse traffic."""

from __future__ import annotations

import time

import pytest

import mesh

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


def test_bad_batch_option_is_a_config_error():
    with pytest.raises(mesh.ConfigError):
        mesh.Node(discovery="none", batch_bytes=-1)


def test_runs_keep_each_message_its_own_subject_seq_headers_and_bytes(make_node):
    """A batch shares one header among a run of plain messages to the same subject
    and subscriptions; anything else starts a new run. None of it shows."""
    a, b = two_nodes(make_node, batch_delay=0.05)
    two = a.subscribe("mix.y", credits=10_000)
    one = a.subscribe("mix.>", credits=10_000)
    b.wait_for_subscribers("mix.x", 1, timeout=10)  # interest arrives in order: both known
    buf = bytearray(b"original")
    sent = []
    for i in range(40):
        subject = "mix.y" if i % 7 in (3, 4) else "mix.x"
        headers = {"i": i} if i % 10 == 5 else None
        b.publish(subject, b"%d" % i, headers=headers)
        sent.append((subject, b"%d" % i, headers or {}))
        if i == 20:
            b.publish("mix.x", buf)  # a buffer the caller reuses at once
            buf[:] = b"reused!!"
            sent.append(("mix.x", b"original", {}))
    got = [one.next(timeout=5) for _ in range(len(sent))]
    assert [(m.subject, bytes(m.data), m.headers) for m in got] == sent
    for subject in ("mix.x", "mix.y"):
        seqs = [m.seq for m in got if m.subject == subject]
        assert seqs == list(range(1, len(seqs) + 1))
    on_y = [(m.subject, bytes(m.data)) for m in (two.next(timeout=5) for _ in range(12))]
    assert on_y == [(s, d) for s, d, _ in sent if s == "mix.y"]
    assert 0 < b.batches_out < 20, "the burst was not batched"
    assert a.status()["counters"]["gaps"] == 0

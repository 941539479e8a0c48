"""Credit-based flow control across real processes (API.md, "Flow control").

Publisher P and subscriber S run in separate processes. Consumers are made slow
with a per-message delay, or stopped with a gate the test opens, so that every
count asserted here is exact rather than timing-dependent.
"""

from __future__ import annotations

import time

import pytest
from meshproc import wait_until

pytestmark = pytest.mark.timeout(90)


# ZeroMQ queues of two messages each way: a frozen subscriber (Proc.paused()) fills
# them, and the kernel's socket buffers, after a few messages.
TINY_QUEUES = {"sndhwm": 2, "rcvhwm": 2}
# A frozen node is not a dead one in the tests that freeze it: lenient failure
# detection, so that a loaded machine stretching the freeze cannot make them
# membership tests.
LENIENT = {"peer_timeout": 10.0, "membership": {"suspicion_min": 5.0, "suspicion_max": 8.0}}


def pair(procs, sub_args: dict, **node_kwargs):
    s = procs.start("s", **node_kwargs)
    p = procs.start("p", seeds=[s.tcp], **node_kwargs)
    p.call("wait_for_peers", n=1, timeout=15)
    sid = s.call("subscribe", pattern="f.>", **sub_args)
    p.call("wait_for_subscribers", subject="f.x", count=1, timeout=10)
    return p, s, sid


def numbers(records) -> list[int]:
    return [int(r["data"].rstrip(b".")) for r in records]


def test_block_loses_nothing_and_holds_the_publisher_back(procs):
    p, s, sid = pair(procs, {"credits": 8, "overflow": "block", "delay": 0.005})
    out = p.call("publish_loop", subject="f.x", n=200, timeout=30, call_timeout=60)
    assert out == {"sent": 200, "elapsed": out["elapsed"]}, out
    # 192 messages had to be consumed (>= 5 ms each) before the last could go out.
    assert out["elapsed"] > 0.5, "the publisher was not held back"
    got = s.call("collected", sid=sid, n=200, timeout=30)
    assert numbers(got) == list(range(1, 201))
    assert not p.call("status")["counters"]["drops"]


def test_block_with_timeout_raises_backpressure_error(procs):
    p, s, sid = pair(procs, {"credits": 4, "overflow": "block", "mode": "gated"})
    out = p.call("publish_loop", subject="f.x", n=50, timeout=0.3)
    assert out["error"] == "BackpressureError", out
    assert out["sent"] == 4  # exactly the credit; the fifth waited and timed out
    assert "timeout" in out["text"] and "overflow" in out["text"]  # says what to do


def test_drop_new_keeps_the_oldest_and_counts_exactly(procs):
    p, s, sid = pair(procs, {"credits": 10, "overflow": "drop_new", "mode": "gated"})
    assert p.call("publish_loop", subject="f.x", n=100)["sent"] == 100
    assert p.call("status")["counters"]["drops"].get("drop_new") == 90
    s.call("open_gate")
    got = s.call("collected", sid=sid, n=10, timeout=10)
    assert numbers(got) == list(range(1, 11))
    assert len(s.call("collected", sid=sid, n=11, timeout=0.5)) == 10  # nothing else


def test_drop_oldest_keeps_the_newest_counts_exactly_and_announces_pressure(procs):
    p, s, sid = pair(procs, {"credits": 10, "overflow": "drop_oldest", "mode": "gated"})
    notices = s.call("subscribe", pattern="_mesh.pressure.>")
    p.call("wait_for_subscribers", subject="_mesh.pressure.p", count=1, timeout=10)
    n, backlog = 2000, 1024  # the publisher holds at most `backlog` messages back
    assert p.call("publish_loop", subject="f.x", n=n)["sent"] == n
    dropped = n - 10 - backlog
    assert p.call("status")["counters"]["drops"].get("drop_oldest") == dropped
    s.call("open_gate")
    got = s.call("collected", sid=sid, n=10 + backlog, timeout=30)
    assert numbers(got) == list(range(1, 11)) + list(range(dropped + 11, n + 1))
    notice = s.call("collected", sid=notices, n=1, timeout=10)[0]
    assert notice["subject"] == "_mesh.pressure.p"
    import msgpack

    body = msgpack.unpackb(notice["data"])
    assert body["node"] == "p" and body["reason"] == "drop_oldest"


def test_a_slow_subscriber_does_not_slow_a_fast_one(procs):
    s = procs.start("slow")
    f = procs.start("fast", seeds=[s.tcp])
    p = procs.start("p", seeds=[s.tcp])
    p.call("wait_for_peers", n=2, timeout=15)
    slow = s.call("subscribe", pattern="f.>", credits=4, overflow="drop_oldest", delay=0.05)
    fast = f.call("subscribe", pattern="f.>")
    p.call("wait_for_subscribers", subject="f.x", count=2, timeout=10)
    out = p.call("publish_loop", subject="f.x", n=300, timeout=30, call_timeout=60)
    # The slow one alone would need 15 s for 300 messages.
    assert out["sent"] == 300 and out["elapsed"] < 5.0, out
    assert numbers(f.call("collected", sid=fast, n=300, timeout=20)) == list(range(1, 301))
    assert len(s.call("collected", sid=slow, n=1, timeout=5)) >= 1


def test_blocked_publisher_is_released_when_the_subscriber_dies(procs):
    s = procs.start("s", )
    r = procs.start("r", seeds=[s.tcp])
    p = procs.start("p", seeds=[s.tcp])
    p.call("wait_for_peers", n=2, timeout=15)
    s.call("subscribe", pattern="f.>", credits=2, mode="gated")
    r.call("subscribe", pattern="svc", mode="echo")
    p.call("wait_for_subscribers", subject="f.x", count=1, timeout=10)
    p.call("wait_for_subscribers", subject="svc", count=1, timeout=10)
    p.call("publish_loop_async", key="blocked", subject="f.x", n=100)
    assert p.call("loop_result", key="blocked", timeout=1.0) == {"running": True}
    # Control traffic keeps flowing while a publisher is blocked: requests, membership.
    reply = p.call("request", subject="svc", data=b"still here", timeout=2)
    assert reply["reply"]["data"] == b"still here", reply
    assert p.call("wait_peer_state", name="s", states=["alive"], timeout=1)["ok"]
    t0 = time.monotonic()
    s.kill()
    out = p.call("loop_result", key="blocked", timeout=10.0)
    assert out.get("error") == "PeerLostError", out
    assert out["sent"] == 2 and time.monotonic() - t0 < 6.0
    assert "died" in out["text"]


def test_memory_stays_flat_with_a_fast_publisher_and_a_slow_subscriber(procs):
    p, s, sid = pair(procs, {"credits": 256, "overflow": "block", "delay": 0.01})
    p.call("publish_loop_async", key="flood", subject="f.x", n=10**7, pad=1000)
    wait_until(lambda: len(s.call("collected", sid=sid, n=0, timeout=0)) >= 50, 10)
    before = {w.name: w.call("rss") for w in (p, s)}
    time.sleep(3.0)  # ~300 messages consumed meanwhile; the publisher tries millions
    after = {w.name: w.call("rss") for w in (p, s)}
    for name in before:
        growth = after[name] - before[name]
        assert growth < 16 * 2**20, f"{name} RSS grew {growth / 2**20:.1f} MiB in 3 s"
    status = p.call("status")
    (row,) = [r for r in status["peers"] if r["name"] == "s"]
    (window,) = row["credits"].values()
    assert window["in_flight"] + window["available"] == 256
    (sub,) = [x for x in s.call("status")["subscriptions"] if x["pattern"] == "f.>"]
    assert 0 < sub["outstanding"]["p"] <= 256


def test_a_full_peer_queue_holds_batched_messages_back_instead_of_dropping(procs):
    """With a credit window far larger than the peer's queue, the queue is the limit.
    The subscriber's process is frozen (SIGSTOP): its queue fills, and publish(timeout=)
    waits for room, small batched messages too (they used to be dropped when their
    batch found the queue full), while the publishing node keeps answering requests.
    Once the subscriber thaws, every message arrives, in order, none dropped."""
    n = 4000
    s = procs.start("s", **TINY_QUEUES, **LENIENT)
    r = procs.start("r", seeds=[s.tcp], **LENIENT)
    p = procs.start("p", seeds=[s.tcp], **TINY_QUEUES, **LENIENT)
    p.call("wait_for_peers", n=2, timeout=15)
    sid = s.call("subscribe", pattern="f.>", credits=1_000_000)
    p.call("subscribe", pattern="svc", mode="echo")
    p.call("wait_for_subscribers", subject="f.x", count=1, timeout=10)
    r.call("wait_for_subscribers", subject="svc", count=1, timeout=10)
    with s.paused():
        # ~500 B each: small enough to be batched, large enough to fill the queue
        # (ZeroMQ's two messages each way and the kernel's socket buffers) fast.
        p.call("publish_loop_async", key="fill", subject="f.x", n=n, pad=500, timeout=20)
        # Unblocked, 4,000 publish() calls take well under this; blocked, it runs on.
        assert p.call("loop_result", key="fill", timeout=0.5) == {"running": True}
        # The publishing node is not stuck behind the full link: it answers.
        reply = r.call("request", subject="svc", data=b"alive?", timeout=2)
        assert reply["reply"]["data"] == b"alive?", reply
    out = p.call("loop_result", key="fill", timeout=30.0)
    assert out == {"sent": n, "elapsed": out["elapsed"]}, out
    got = s.call("collected", sid=sid, n=n, timeout=15)
    counters = p.call("status")["counters"]
    # On failure, say where the rest went (drops by reason, what left, peer states).
    peers = [(q["name"], q["state"]) for q in p.call("status")["peers"]]
    assert numbers(got) == list(range(1, n + 1)), (counters["drops"], counters["msgs_out"], peers)
    assert not counters["drops"], counters["drops"]
    assert counters["batches_out"] > 0  # the case at hand: batched messages


def test_default_publish_into_a_full_queue_counts_every_drop_and_keeps_the_last_batch(procs):
    """publish() without a timeout drops what a full peer queue refuses, counted one
    by one before it returns; a batch still waiting when the burst ends is flushed by
    the I/O thread, which keeps it until there is room (it used to drop it, after
    publish() had returned). After the thaw the subscriber has exactly what was not
    counted as dropped, in order, and no drop was added meanwhile."""
    n = 4000
    p, s, sid = pair(procs, {"credits": 1_000_000}, **TINY_QUEUES, **LENIENT)
    with s.paused():
        assert p.call("publish_loop", subject="f.x", n=n, pad=500)["sent"] == n
        dropped = p.call("status")["counters"]["drops"].get("peer_queue_full", 0)
        assert 0 < dropped < n - 100, dropped  # the queue filled; some got through
    got = numbers(s.call("collected", sid=sid, n=n - dropped, timeout=15))
    assert len(got) == n - dropped and got == sorted(got)
    assert len(s.call("collected", sid=sid, n=n - dropped + 1, timeout=0.5)) == n - dropped
    assert p.call("status")["counters"]["drops"] == {"peer_queue_full": dropped}


def test_a_publisher_waiting_for_room_does_not_hold_up_other_threads(procs):
    """A thread that waits for room in a full peer queue (publish(timeout=20)) must not
    make another thread publishing to the same peer wait past its own timeout, nor
    make publish() without a timeout wait at all: each gets its own behaviour (it used
    to wait for the link's lock until the first one's wait ended)."""
    n = 4000
    p, s, sid = pair(procs, {"credits": 1_000_000}, **TINY_QUEUES, **LENIENT)
    with s.paused():
        p.call("publish_loop_async", key="fill", subject="f.x", n=n, pad=500, timeout=20)
        assert p.call("loop_result", key="fill", timeout=0.5) == {"running": True}
        # 5 KiB: never batched, so it meets the full queue itself.
        waited = p.call("publish_loop", subject="f.y", n=1, pad=5000, timeout=0.3,
                        call_timeout=30)
        assert waited["error"] == "BackpressureError" and waited["elapsed"] < 3, waited
        dropped = p.call("publish_loop", subject="f.y", n=1, pad=5000, call_timeout=30)
        assert dropped["sent"] == 1 and dropped["elapsed"] < 3, dropped
        assert p.call("loop_result", key="fill", timeout=0.1) == {"running": True}
    out = p.call("loop_result", key="fill", timeout=30.0)
    assert out == {"sent": n, "elapsed": out["elapsed"]}, out
    got = [r for r in s.call("collected", sid=sid, n=n, timeout=15) if r["subject"] == "f.x"]
    assert numbers(got) == list(range(1, n + 1))
    # The two f.y messages were refused (queue full), counted; nothing else was.
    assert p.call("status")["counters"]["drops"] == {"peer_queue_full": 2}


def test_a_publisher_waiting_for_room_is_released_when_the_subscriber_dies(procs):
    """The subscriber's queue is full (frozen) and a publisher waits for room with a long
    timeout; then the subscriber is killed. Once it is declared dead the publisher goes
    on: its message counts as no_link (the node it was for is gone), and the node's I/O
    thread, which closes the link, does not wait for that publisher's timeout."""
    p, s, _sid = pair(procs, {"credits": 1_000_000}, **TINY_QUEUES)
    with s.paused():
        # 5 KiB: never batched; the queue fills after a few.
        p.call("publish_loop_async", key="fill", subject="f.x", n=400, pad=5000, timeout=60)
        assert p.call("loop_result", key="fill", timeout=0.5) == {"running": True}
        t0 = time.monotonic()
        s.kill()
    out = p.call("loop_result", key="fill", timeout=20.0)
    assert out.get("sent") == 400 and time.monotonic() - t0 < 15.0, out
    assert p.call("wait_peer_state", name="s", states=["dead"], timeout=1)["ok"]
    assert p.call("status")["counters"]["drops"].get("no_link", 0) >= 1


def test_a_message_behind_a_waiting_batch_is_not_sent_to_a_closed_link(procs):
    """A large message waits for the batch in front of it to leave (order), and that
    batch for room in a frozen subscriber's full queue; the subscriber is killed.
    The batch and the message count as no_link, and nothing is put on the closed
    socket (that used to count a send_error)."""
    p, s, _sid = pair(procs, {"credits": 1_000_000}, **TINY_QUEUES)
    with s.paused():
        # Full for certain: a 5 KiB message (never batched) waited 0.2 s in vain.
        out = p.call("publish_loop", subject="f.x", n=10_000, pad=5000, timeout=0.2)
        assert out.get("error") == "BackpressureError", out
        # Three small ones in a burst: the first meets the full queue (dropped), the
        # next wait in a batch (the I/O thread keeps it while the queue is full) if
        # they come within 50 µs of the one before, as they do unless the machine
        # stalls (then the big one meets the full queue itself: the test above).
        assert p.call("publish_loop", subject="f.x", n=3, pad=500)["sent"] == 3
        # Not batched: it waits for that batch to leave first.
        p.call("publish_loop_async", key="big", subject="f.x", n=1, pad=5000, timeout=60)
        assert p.call("loop_result", key="big", timeout=0.5) == {"running": True}
        s.kill()
    out = p.call("loop_result", key="big", timeout=20.0)
    assert out.get("sent") == 1, out
    drops = p.call("status")["counters"]["drops"]
    assert "send_error" not in drops and drops.get("no_link", 0) >= 1, drops


@pytest.mark.parametrize("inline", [False, True], ids=["dispatch", "inline"])
def test_handlers_of_two_nodes_publishing_to_each_other_beyond_their_windows_never_deadlock(
    procs, inline
):
    """Each node's handler, on a kick, publishes 300 messages to a handler of the
    other node whose window holds 2, with no timeout. They used to deadlock: each
    handler waited for credit that only the other's (blocked) dispatch thread could
    return. Now a publish on a node's own thread never waits: beyond the window the
    messages are held in order and leave as credit comes back."""
    a = procs.start("a")
    b = procs.start("b", seeds=[a.tcp])
    a.call("wait_for_peers", n=1, timeout=15)
    n = 300
    sids = {}
    for w, other in ((a, "b"), (b, "a")):
        sids[w.name] = w.call("subscribe", pattern=f"to.{w.name}", mode="burst", credits=2,
                              burst={"subject": f"to.{other}", "n": n}, inline=inline)
    for w, other in ((a, "b"), (b, "a")):
        w.call("wait_for_subscribers", subject=f"to.{other}", count=1, timeout=10)
    for w, other in ((a, "b"), (b, "a")):
        w.call("publish", subject=f"to.{other}", data=b"kick")  # the other's handler bursts
    for w in (a, b):
        got = w.call("collected", sid=sids[w.name], n=n + 1, timeout=40)
        data = [r["data"] for r in got]
        assert len(data) == n + 1, f"{w.name} got {len(data)} of {n + 1}: deadlocked"
        assert data.count(b"kick") == 1
        assert [int(d) for d in data if d != b"kick"] == list(range(1, n + 1))  # in order
        assert w.call("status")["counters"]["drops"] == {}


def test_a_handler_publishing_beyond_the_window_of_its_own_node_keeps_working(procs):
    """The same within one node process: a handler bursts to another handler of its
    own node (window 2): held in order, delivered as that handler consumes."""
    a = procs.start("a")
    b = procs.start("b", seeds=[a.tcp])
    a.call("wait_for_peers", n=1, timeout=15)
    sink = a.call("subscribe", pattern="own.sink", credits=2)
    a.call("subscribe", pattern="own.kick", mode="burst", burst={"subject": "own.sink", "n": 500})
    b.call("wait_for_subscribers", subject="own.kick", count=1, timeout=10)
    b.call("publish", subject="own.kick", data=b"kick")
    got = a.call("collected", sid=sink, n=500, timeout=40)
    assert [int(r["data"]) for r in got] == list(range(1, 501))
    assert a.call("status")["counters"]["drops"] == {}


def test_a_stalled_subscriber_holds_at_most_its_default_window_and_loses_nothing(procs):
    """Issue #16: the default window (credits=1024, credit_bytes=64 MiB, block), a
    subscriber whose handler stalls: it receives one window from the publisher and
    no more (its memory is bounded by it), publish() waits, nothing is lost."""
    p, s, sid = pair(procs, {"mode": "gated"})  # the default window and overflow
    n, pad = 4000, 16 * 1024  # 64 MiB offered; the window is 1024 x 16 KiB = 16 MiB
    before = s.call("rss")
    p.call("publish_loop_async", key="stall", subject="f.x", n=n, pad=pad, timeout=60)
    wait_until(lambda: s.call("status")["counters"]["msgs_in"] >= 1024, 30)
    time.sleep(1.0)  # stalled: nothing beyond the window may arrive meanwhile
    status = s.call("status")
    assert status["counters"]["msgs_in"] == 1024  # the window, exactly: what bounds memory
    assert not status["counters"]["drops"]
    growth = s.call("rss") - before
    # One window plus what receiving costs once (buffers, first-use allocations), far
    # below the 64 MiB offered.
    assert growth < 32 * 2**20, f"subscriber RSS grew {growth / 2**20:.1f} MiB (window 16 MiB)"
    assert p.call("loop_result", key="stall", timeout=0.1) == {"running": True}  # it waits
    s.call("open_gate")
    out = p.call("loop_result", key="stall", timeout=60)
    assert out.get("sent") == n, out
    got = s.call("collected", sid=sid, n=n, timeout=60)
    assert numbers(got) == list(range(1, n + 1))
    assert not p.call("status")["counters"]["drops"]


def test_fan_out_to_four_subscribers_keeps_order_and_credit_on_every_link(procs):
    """One publisher, four subscriber processes: each link batches and takes credit on
    its own (the compiled fast path extends each link's batch, or sends that one link's
    message down the general path with the same seq). A slow consumer with a small
    window and a node with two subscriptions make the links diverge; every
    subscription still gets 1..n in order, nothing dropped."""
    subs = [procs.start(f"s{i}") for i in range(4)]
    p = procs.start("p", seeds=[s.tcp for s in subs])
    p.call("wait_for_peers", n=4, timeout=20)
    sids = [
        (subs[0], subs[0].call("subscribe", pattern="f.>")),
        (subs[1], subs[1].call("subscribe", pattern="f.>", credits=32, overflow="block",
                               delay=0.0005)),
        (subs[2], subs[2].call("subscribe", pattern="f.>", credits=64, overflow="block")),
        (subs[3], subs[3].call("subscribe", pattern="f.>")),
        (subs[3], subs[3].call("subscribe", pattern="f.x")),  # two sids on one link
    ]
    p.call("wait_for_subscribers", subject="f.x", count=4, timeout=15)
    # Both of s3's subscriptions known to the publisher (interest 2), not just the node.
    assert wait_until(lambda: any(
        peer["name"] == "s3" and peer["interest"] == 2 for peer in p.call("status")["peers"]),
        15), p.call("status")["peers"]
    n = 2000
    # ~1 KiB messages; the small windows cap s1's and s2's batches at 16 and 32
    # messages (half the window), so the links flush at different times.
    out = p.call("publish_loop", subject="f.x", n=n, timeout=30, pad=1000, call_timeout=80)
    assert out["sent"] == n, out
    for node, sid in sids:
        assert numbers(node.call("collected", sid=sid, n=n, timeout=40)) == list(range(1, n + 1))
    status = p.call("status")
    assert not status["counters"]["drops"], status["counters"]["drops"]
    assert status["counters"].get("batches_out", 0) > 0, "nothing was batched"

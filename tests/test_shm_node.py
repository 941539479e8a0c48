"""Large arrays between processes of one host travel through shared memory."""

from __future__ import annotations

import glob

import numpy as np
import pytest
from conftest import RemoteError
from meshproc import as_array, wait_until

pytestmark = pytest.mark.timeout(90)


def peer_row(status: dict, name: str) -> dict:
    (row,) = [p for p in status["peers"] if p["name"] == name]
    return row


def shm_pair(procs):
    """A publisher and a subscriber (of "grad.>") on one host, linked by shared memory."""
    s = procs.start("s")
    p = procs.start("p", seeds=[s.tcp])
    p.call("wait_for_peers", n=1, timeout=15)
    assert wait_until(lambda: peer_row(p.call("status"), "s")["bulk"] == "shm", 10)
    sid = s.call("subscribe", pattern="grad.>")
    p.call("wait_for_subscribers", subject="grad.x", count=1, timeout=10)
    return p, s, sid


def test_large_arrays_use_shared_memory_and_slots_come_back(procs):
    p, s, sid = shm_pair(procs)
    arrays = [np.arange(n, dtype=np.float32) * (i + 1) for i, n in enumerate((1 << 18, 1 << 21, 3 << 20))]
    small = np.arange(10, dtype=np.int64)  # under the threshold: stays on the socket
    for arr in [*arrays, small]:
        p.call("publish", subject="grad.x", data=arr, timeout=10)
    got = s.call("collected", sid=sid, n=4, timeout=30)
    for want, rec in zip([*arrays, small], got, strict=True):
        np.testing.assert_array_equal(as_array(rec), want)
    row = peer_row(p.call("status"), "s")
    assert row["shm"]["writes"] == 3  # the three large ones
    # The subscriber dropped each message after recording it: every slot comes back.
    assert wait_until(lambda: peer_row(p.call("status"), "s")["shm"]["in_use"] == 0, 10)


def test_the_last_array_delivered_gives_its_slot_back_with_nothing_after_it(procs):
    # The dispatch thread must let go of a message when its handler is done, not when
    # the next one comes: else the last array's slot stays taken and a publisher
    # sending one array at a time waits for a timer on every slot (seen: 5 ms each).
    p, s, sid = shm_pair(procs)
    arr = np.arange(1 << 18, dtype=np.float32)
    p.call("publish", subject="grad.x", data=arr, timeout=10)
    (rec,) = s.call("collected", sid=sid, n=1, timeout=30)
    np.testing.assert_array_equal(as_array(rec), arr)
    assert peer_row(p.call("status"), "s")["shm"]["writes"] == 1
    assert wait_until(lambda: peer_row(p.call("status"), "s")["shm"]["in_use"] == 0, 10)


@pytest.mark.parametrize("secret", [None, "0123456789abcdef-cluster-secret"], ids=["plain", "curve"])
def test_a_full_pool_waits_for_slots_instead_of_taking_the_socket(procs, secret):
    # 1 MiB arrays far faster than 16 slots come back: publish(timeout=) waits for a
    # slot the subscriber releases rather than sending the bytes through the kernel
    # (which under CurveZMQ would also encrypt them).
    kwargs = {"secret": secret} if secret else {}
    s = procs.start("s", **kwargs)
    p = procs.start("p", seeds=[s.tcp], **kwargs)
    p.call("wait_for_peers", n=1, timeout=15)
    assert wait_until(lambda: peer_row(p.call("status"), "s")["bulk"] == "shm", 10)
    sid = s.call("subscribe", pattern="grad.>")
    p.call("wait_for_subscribers", subject="grad.x", count=1, timeout=10)
    count = 120
    p.call("publish_arrays", subject="grad.x", floats=1 << 18, n=count, timeout=10.0)
    got = s.call("collected", sid=sid, n=count, timeout=30)
    assert [int(as_array(r)[0]) for r in got] == list(range(1, count + 1))
    shm = peer_row(p.call("status"), "s")["shm"]
    assert shm["writes"] == count, shm
    assert shm["slots"] <= 16 and not shm["refused"].get("full"), shm


def test_allreduce_between_local_processes_goes_through_shared_memory(procs):
    a = procs.start("a")
    b = procs.start("b", seeds=[a.tcp])
    a.call("wait_for_peers", n=1, timeout=15)
    assert wait_until(lambda: peer_row(a.call("status"), "b")["bulk"] == "shm", 10)
    # Data through the collective channel: a point-to-point array, checked by the peer.
    arr = np.linspace(0, 1, 1 << 20, dtype=np.float64)
    sid = b.call("subscribe", pattern="p2p.check")
    a.call("wait_for_subscribers", subject="p2p.check", count=1, timeout=10)
    a.call("publish", subject="p2p.check", data=arr, timeout=10)
    np.testing.assert_array_equal(as_array(b.call("collected", sid=sid, n=1)[0]), arr)


def test_no_segments_left_after_nodes_close(procs):
    s = procs.start("s")
    p = procs.start("p", seeds=[s.tcp])
    p.call("wait_for_peers", n=1, timeout=15)
    ids = [w.id for w in (s, p)]
    assert wait_until(lambda: peer_row(p.call("status"), "s")["bulk"] == "shm", 10)
    sid = s.call("subscribe", pattern="x")
    p.call("wait_for_subscribers", subject="x", count=1, timeout=10)
    p.call("publish", subject="x", data=np.ones(1 << 20, dtype=np.float32))
    s.call("collected", sid=sid, n=1)
    assert any(glob.glob(f"/dev/shm/zmesh-{i}*") for i in ids)
    for w in (p, s):
        w.call("close")
    assert wait_until(lambda: not any(glob.glob(f"/dev/shm/zmesh-{i}*") for i in ids), 5)


def test_an_array_refused_by_a_full_queue_gives_its_slot_back(procs):
    """An array copied into a shared-memory slot whose message then finds the peer's
    queue full past its timeout (publish: BackpressureError; a collective's channel
    send: TimeoutError) frees the slot at once: it was never announced to the peer,
    which would never release it (every such timeout shrank the pool for good)."""
    # Not even suspected while frozen: a channel refuses a peer that is not alive.
    lenient = {"peer_timeout": 10.0, "membership": {
        "probe_interval": 5.0, "probe_timeout": 2.5, "suspicion_min": 5.0, "suspicion_max": 8.0}}
    s = procs.start("s", sndhwm=2, rcvhwm=2, **lenient)
    p = procs.start("p", seeds=[s.tcp], sndhwm=2, rcvhwm=2, **lenient)
    p.call("wait_for_peers", n=1, timeout=15)
    assert wait_until(lambda: peer_row(p.call("status"), "s")["bulk"] == "shm", 10)
    s.call("subscribe", pattern="f.>", credits=1_000_000)
    p.call("wait_for_subscribers", subject="f.x", count=1, timeout=10)

    def fill() -> None:
        # 5 KiB messages (never batched: no batch waits in front of the array) until
        # one waits 0.2 s in vain: the queue and the kernel's buffers are full then.
        out = p.call("publish_loop", subject="f.x", n=10_000, pad=5000, timeout=0.2)
        assert out.get("error") == "BackpressureError", out

    with s.paused():
        fill()
        with pytest.raises(RemoteError, match="BackpressureError"):
            p.call("publish_arrays", subject="f.x", floats=1 << 18, n=1, timeout=0.3)
        fill()
        out = p.call("channel_send", peer="s", channel="c", floats=1 << 18, timeout=0.3)
        assert out.get("error") == "TimeoutError", out
        shm = peer_row(p.call("status"), "s")["shm"]
        assert shm["writes"] == 2 and shm["in_use"] == 0, shm


@pytest.mark.parametrize("shm", [True, False], ids=["shm", "no-shm"])
def test_same_host_processes_use_shared_memory_over_a_tcp_only_link(procs, shm):
    """Shared memory does not depend on the link's transport: two processes of one
    host that listen on tcp alone still send large arrays through it (shm=False on
    either side keeps them on the socket)."""
    tcp_only = ("tcp://127.0.0.1:0",)
    s = procs.start("s", listen=tcp_only, shm=shm)
    p = procs.start("p", listen=tcp_only, seeds=[s.tcp])
    p.call("wait_for_peers", n=1, timeout=15)
    sid = s.call("subscribe", pattern="big.>")
    p.call("wait_for_subscribers", subject="big.x", count=1, timeout=10)
    want = "shm" if shm else "tcp"
    assert wait_until(lambda: peer_row(p.call("status"), "s")["bulk"] == want, 10), \
        peer_row(p.call("status"), "s")
    arr = np.arange(1 << 20, dtype=np.float32)
    p.call("publish", subject="big.x", data=arr, timeout=10)
    np.testing.assert_array_equal(as_array(s.call("collected", sid=sid, n=1, timeout=20)[0]), arr)
    row = peer_row(p.call("status"), "s")
    assert row["transport"] == "tcp", row
    if shm:
        assert row["shm"]["writes"] == 1, row
    else:
        assert row["shm"] is None, row

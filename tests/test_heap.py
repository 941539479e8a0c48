"""The C heap under libzmq's receive buffers (mesh/engine/heap.py, issue #16).

Publisher and subscriber run in separate processes (the ``procs`` fixture): the
heap state and page faults asserted are those of a real subscriber process.
"""

from __future__ import annotations

import time

import pytest
from meshproc import wait_until
from test_flow_procs import pair

from mesh.engine import heap
from mesh.flow import CreditGrant

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(heap._malloc_trim is None, reason="needs glibc's malloc_trim"),
]


def test_a_stalled_subscriber_gives_the_freed_receive_buffers_back(procs):
    """The default window (1024 messages), 16 KiB payloads (copied out of their
    frames into bytes), a handler that stalls: the window is full and nothing is
    taken for STALL_CONFIRM seconds, so the subscriber trims its heap and holds
    about one window, not two; nothing is lost."""
    p, s, sid = pair(procs, {"mode": "gated"})
    n, pad = 3000, 16 * 1024
    before = s.call("rss")
    assert s.call("heap")["trims"] == 0
    p.call("publish_loop_async", key="stall", subject="f.x", n=n, pad=pad, timeout=60)
    assert wait_until(lambda: s.call("status")["counters"]["msgs_in"] >= 1024, 30)
    # The window is all there is (the publisher waits for credit); the trim comes
    # STALL_CONFIRM seconds after it filled.
    assert wait_until(lambda: s.call("heap")["trims"] >= 1, 10)
    time.sleep(0.2)
    assert s.call("status")["counters"]["msgs_in"] == 1024
    state = s.call("heap")
    assert state["looks"] == 1 and state["trims"] == 1, state  # one stall: one trim
    assert state["trims_released"] == 1, state  # ... and it gave memory back
    growth = s.call("rss") - before
    # The window is 16 MiB of payloads: +14.6-14.8 MiB measured; without the trim
    # the freed frames stay (+25-36 MiB).
    assert growth < 20 * 2**20, f"subscriber RSS grew {growth / 2**20:.1f} MiB (window 16 MiB)"
    t_open = time.monotonic()
    s.call("open_gate")
    out = p.call("loop_result", key="stall", timeout=60)
    assert out.get("sent") == n, out
    got = s.call("collected", sid=sid, n=n, timeout=60)
    assert [int(r["data"].rstrip(b".")) for r in got] == list(range(1, n + 1))
    # Later full windows (the consumer slower than its publisher) look at most once
    # a TRIM_INTERVAL.
    looks = s.call("heap")["looks"]
    assert looks <= 2 + (time.monotonic() - t_open) / heap.TRIM_INTERVAL, looks


def test_a_full_window_trims_only_when_nothing_is_taken_and_at_most_once_per_interval():
    """A full window looks again STALL_CONFIRM later: a trim if the application took
    nothing meanwhile (a stall), none if it did (a slow consumer); one look at a
    time, the next no sooner than TRIM_INTERVAL after the last (a trim walks every
    arena)."""
    def full_grant() -> CreditGrant:
        grant = CreditGrant(4, None)
        for _ in range(4):
            grant.on_received(100)
        return grant

    heap._last_look = -heap.TRIM_INTERVAL  # as if none ran yet in this process
    stalled = full_grant()
    trims, looks = heap.stats["trims"], heap.stats["looks"]
    t0 = time.monotonic()
    assert heap.window_full(stalled) is True
    assert heap.window_full(full_grant()) is False  # one look at a time
    assert wait_until(lambda: heap.stats["trims"] == trims + 1, 5)
    assert time.monotonic() - t0 >= heap.STALL_CONFIRM
    assert heap.stats["looks"] == looks + 1

    slow = full_grant()
    not_stalled = heap.stats["not_stalled"]
    assert heap.window_full(slow) is True  # set up at once, run after the interval
    slow.on_consumed(100, time.monotonic())  # it takes one meanwhile
    assert wait_until(lambda: heap.stats["not_stalled"] == not_stalled + 1, 5)
    assert time.monotonic() - t0 >= heap.TRIM_INTERVAL * 0.99
    assert heap.stats["trims"] == trims + 1  # no second trim


def test_large_arrays_over_tcp_reuse_the_heap_instead_of_faulting_it_in(procs):
    """1 MiB arrays on the tcp socket (shm=False), a window of 8 arrays: libzmq's
    receive buffers come from a heap whose top the node keeps alive (the ballast),
    so the bursts of frees do not shrink it and the next buffers reuse its pages.
    Without it: 20-90 page faults per array (256 per fresh MiB); with it: ~1-5."""
    p, s, sid = pair(procs, {"mode": "count", "credit_bytes": 8 << 20}, shm=False,
                   transports=("tcp",))
    floats = (1 << 20) // 4
    warm, n = 64, 300
    p.call("publish_arrays", subject="f.x", n=warm, floats=floats, timeout=30, call_timeout=60)
    assert s.call("counted", sid=sid, n=warm, timeout=60) == warm
    state = s.call("heap")
    assert state["ballast_frames"] >= 1 and state["ballast_bytes"] >= 1 << 20, state
    faults0 = state["minflt"]
    p.call("publish_arrays", subject="f.x", n=n, floats=floats, timeout=30, call_timeout=90)
    assert s.call("counted", sid=sid, n=warm + n, timeout=90) == warm + n
    per_array = (s.call("heap")["minflt"] - faults0) / n
    assert per_array < 12, f"{per_array:.1f} page faults per 1 MiB array received"
    peer = next(x for x in p.call("status")["peers"] if x["name"] == "s")
    assert peer["transport"] == "tcp" and not peer.get("shm"), peer  # on the socket

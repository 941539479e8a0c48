"""What the C heap does with libzmq's receive buffers, and two remedies (issue #16).

libzmq's I/O thread allocates every received message of more than 8 KiB with
``malloc``, in that thread's glibc arena; the node frees it later on its own
threads. Two glibc behaviours then cost memory or time, and the node answers
each without touching the process's malloc settings (those are the user's):

* A stalled subscriber: the whole credit window arrives while the node copies
  small payloads (< 64 KiB) out of their frames into ``bytes`` (API.md: what
  ``msg.data`` is), so the arena grows by one more window of freed frames and
  glibc keeps those pages: RSS was two windows. When a subscription's window
  is full of messages nobody has taken (nothing more can come from that
  publisher) and its application still took none ``STALL_CONFIRM`` seconds
  later, :func:`window_full` gives the freed pages back (``malloc_trim``, glibc
  only; a trim walks every arena, ~1 ms). A consumer that is merely slower than
  its publisher also fills its window, but keeps taking messages: no trim.
* Large arrays (>= 64 KiB, kept as views on their frames): glibc shrinks an
  arena's heap whenever a free leaves more than ~2 buffers of free space at its
  top, so a burst of frees (the subscriber caught up) unmaps the heap's top and
  the next buffers fault their pages in again (20-100 page faults per 1 MiB
  message, against 5 for raw PUSH/PULL). :class:`Ballast` keeps the received
  frame at the highest address of each heap alive until a higher one comes:
  the frees below it never reach the top, so the heap is not shrunk and its
  pages are reused. It holds one frame (<= ``BALLAST_MAX``) per heap region.

Threads: ``window_full`` runs on the node's I/O thread (any node's: the trim
state is process-wide, under ``_lock``) and starts a short-lived timer thread
(``mesh-heap-trim``, one at a time, at most one per ``TRIM_INTERVAL``), which
looks again and trims; a ``Ballast`` belongs to one node: its I/O thread calls the receiving one's ``keep``; the
sending one (``_ballast_out``: large batch frames, engine/link.py) is used under its lock by
whichever thread flushes a batch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading
import time
from typing import Any

import numpy as np

log = logging.getLogger("mesh")

# A full window is looked at again this much later (seconds): a stall if its
# application took nothing meanwhile.
STALL_CONFIRM = 0.3
# Looks (and trims) at most this often, whatever the number of subscriptions; a
# window that fills sooner is looked at once the interval is over.
TRIM_INTERVAL = 1.0


def _find_trim() -> Any:
    """glibc's ``malloc_trim``, or None (another libc, another OS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _find_trim()
_lock = threading.Lock()
_last_look = -TRIM_INTERVAL  # monotonic time the last look ran
_look_pending = False  # a timer is set: it will trim whatever is free by then
# Process-wide counters (read by tests and the benchmark): looks set up, trims run,
# how many of those returned memory, looks that found the application consuming.
stats = {"looks": 0, "trims": 0, "trims_released": 0, "trim_seconds": 0.0, "not_stalled": 0}


def window_full(grant: Any) -> bool:
    """``grant`` (a mesh.flow.CreditGrant) holds a full window of messages its
    application has not taken (the caller checked): look again STALL_CONFIRM
    seconds later (or once TRIM_INTERVAL has passed since the last look) and trim
    if it took none meanwhile. None when a look is already set: that one trims
    what is free by then (a trim covers every arena, so every stalled window).
    True when a look was set up."""
    global _look_pending
    if _malloc_trim is None:
        return False
    now = time.monotonic()
    with _lock:
        if _look_pending:
            return False
        _look_pending = True
        delay = max(STALL_CONFIRM, _last_look + TRIM_INTERVAL - now)
        stats["looks"] += 1
    timer = threading.Timer(delay, _look_again, (grant, grant.consumed))
    timer.name = "mesh-heap-trim"
    timer.daemon = True
    timer.start()
    return True


def _look_again(grant: Any, consumed: int) -> None:
    global _look_pending, _last_look
    with _lock:
        _look_pending = False
        _last_look = time.monotonic()
        if grant.consumed != consumed:  # it is consuming: a slow consumer, not a stall
            stats["not_stalled"] += 1
            return
    trim()


def trim() -> None:
    """Give the free pages of every arena back to the kernel (glibc's malloc_trim)."""
    if _malloc_trim is None:
        return
    t0 = time.perf_counter()
    released = _malloc_trim(0)  # ctypes lets go of the GIL meanwhile
    seconds = time.perf_counter() - t0
    with _lock:
        stats["trims"] += 1
        stats["trims_released"] += 1 if released else 0
        stats["trim_seconds"] += seconds


# Frames the ballast considers: below 64 KiB the node copies the payload and frees
# the frame at once; above BALLAST_MAX holding one idle would cost too much (and
# glibc maps buffers of more than 32 MiB on their own anyway).
BALLAST_MIN = 64 << 10
BALLAST_MAX = 8 << 20
# glibc's thread arenas grow in heaps of 64 MiB, aligned to 64 MiB: one frame per
# such region is the highest of its heap.
_REGION_SHIFT = 26
_REGIONS = 2  # heaps tracked at most: the newest heap of an arena holds its top


class Ballast:
    """The highest-addressed received frame of each heap region, kept alive."""

    __slots__ = ("_kept", "held_bytes")

    def __init__(self) -> None:
        self._kept: dict[int, tuple[int, Any, int]] = {}  # region -> (address, frame, nbytes)
        self.held_bytes = 0

    def keep(self, frame: Any, view: memoryview) -> None:
        """A frame whose payload the node hands out as ``view`` (no copy)."""
        nbytes = view.nbytes
        if nbytes < BALLAST_MIN or nbytes > BALLAST_MAX:
            return
        self.keep_at(frame, np.frombuffer(view, np.uint8).__array_interface__["data"][0], nbytes)

    def keep_at(self, frame: Any, address: int, nbytes: int) -> None:
        """:meth:`keep` for a frame whose payload's address is known (zcore's Frame)."""
        if nbytes < BALLAST_MIN or nbytes > BALLAST_MAX:
            return
        region = address >> _REGION_SHIFT
        kept = self._kept
        old = kept.get(region)
        if old is not None:
            if address <= old[0]:
                return
            self.held_bytes -= old[2]
        elif len(kept) >= _REGIONS:
            # A heap not seen before: forget the one seen first (dicts keep order).
            first = next(iter(kept))
            self.held_bytes -= kept.pop(first)[2]
        kept[region] = (address, frame, nbytes)
        self.held_bytes += nbytes

    def release(self) -> None:
        self._kept.clear()
        self.held_bytes = 0

    def __len__(self) -> int:
        return len(self._kept)

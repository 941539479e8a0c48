"""Credit-based flow control and micro-batching, as pure (sans-IO) state machines.

Nothing here touches a socket, a thread or a clock: the I/O thread feeds events
in (with ``now`` from its own clock) and carries out what comes back.

The model is AMQP 1.0 link credit, as TensorPipe also does it. A subscription on
node B grants each publisher A a window of ``credits`` messages (and optionally
``credit_bytes`` bytes):

- :class:`CreditWindow` (on A, one per (subscriber node, subscription)) spends one
  credit per message sent and applies the ``overflow`` policy when none is left.
- :class:`CreditGrant` (on B, one per (subscription, publisher)) returns credit
  when the application has *consumed* a message, not when it arrived. Returns
  are batched: an update is due once half the window is waiting to go back, or
  ``flush_delay`` after the first pending return, so there is never one control
  message per data message. ``take_update(now, force=True)`` lets the I/O layer
  piggyback pending credit on a frame it is sending to that peer anyway.

Both sides count ``nbytes`` the same way (the payload length the publisher
sent); byte credit only works if they agree.

One message larger than ``credit_bytes`` may be in flight alone (when nothing
else is), so an oversized message slows the link down but never wedges it.

:func:`encode_batch` / :func:`decode_batch` put a batch of small messages to one
peer in one frame, as runs of messages that share one header.
"""

from __future__ import annotations

import enum
import math
import struct
import sys
from array import array as _array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from mesh.errors import ClosedError, ConfigError, MeshError, MessageTooLarge, ProtocolError

__all__ = [
    "DEFAULT_CREDITS",
    "DEFAULT_CREDIT_BYTES",
    "DEFAULT_FLUSH_DELAY",
    "OVERFLOW_POLICIES",
    "Action",
    "CreditGrant",
    "CreditWindow",
    "Decision",
    "decode_batch",
    "decode_runs",
    "encode_batch",
    "split_run",
]

T = TypeVar("T")

DEFAULT_CREDITS = 1024
DEFAULT_CREDIT_BYTES = 64 << 20  # the API's default byte bound (with credits, as NATS pairs them)
DEFAULT_FLUSH_DELAY = 0.005  # seconds a consumed credit may wait for company
DEFAULT_MAX_PENDING = 1024
OVERFLOW_POLICIES = ("block", "drop_oldest", "drop_new")


def _check_int(name: str, value: object, minimum: int, hint: str) -> int:
    # bool is an int subclass; credits=True is a bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}; {hint}")
    return value


def _check_delay(name: str, value: object, hint: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(f"{name} must be a finite number of seconds >= 0, got {value!r}; {hint}")
    return float(value)


def _check_nbytes(nbytes: int) -> None:
    if nbytes < 0:
        raise ConfigError(f"nbytes must be >= 0, got {nbytes}; pass the payload length in bytes")


# --------------------------------------------------------------------------
# Receiver side
# --------------------------------------------------------------------------


class CreditGrant:
    """The credit a subscription grants one publisher, seen from the subscriber.

    Call :meth:`on_received` for every data message from the publisher, then
    :meth:`on_consumed` once it has left the subscriber (handler returned,
    ``next()`` handed it out, or it was discarded after arriving within
    credit). Poll :meth:`take_update` after consuming and at
    :meth:`next_deadline`; send what it returns to the publisher.
    """

    __slots__ = (
        "credits",
        "credit_bytes",
        "flush_delay",
        "threshold",
        "_bytes_threshold",
        "outstanding",
        "outstanding_bytes",
        "buffered",
        "_pending",
        "_pending_bytes",
        "_pending_since",
        "received",
        "consumed",
        "dropped",
        "returned",
        "returned_bytes",
        "updates",
        "violations",
    )

    def __init__(
        self,
        credits: int = DEFAULT_CREDITS,  # noqa: A002 - the API's name (subscribe(credits=))
        credit_bytes: int | None = DEFAULT_CREDIT_BYTES,
        *,
        flush_delay: float = DEFAULT_FLUSH_DELAY,
        threshold: int | None = None,
    ) -> None:
        self.credits = _check_int("credits", credits, 1, "grant at least one message (default 1024)")
        self.credit_bytes = (
            None
            if credit_bytes is None
            else _check_int("credit_bytes", credit_bytes, 1, "or pass None for no byte limit")
        )
        self.flush_delay = _check_delay(
            "flush_delay", flush_delay, "a few milliseconds batches credit returns well"
        )
        if threshold is None:
            threshold = (self.credits + 1) // 2  # half the window, rounded up
        self.threshold = _check_int("threshold", threshold, 1, "use 1 to return every credit")
        if self.threshold > self.credits:
            # The sender stalls with a full window before the threshold is reached,
            # so every return would wait for flush_delay.
            raise ConfigError(
                f"threshold ({threshold}) must be <= credits ({credits}); "
                "leave it unset for half the window"
            )
        self._bytes_threshold = None if self.credit_bytes is None else (self.credit_bytes + 1) // 2
        # Received and not yet given back: what the publisher may have in flight.
        self.outstanding = 0
        self.outstanding_bytes = 0
        self.buffered = 0  # received, not yet consumed or dropped
        # Consumed, credit not yet sent back.
        self._pending = 0
        self._pending_bytes = 0
        self._pending_since: float | None = None
        # Counters (monotonic totals).
        self.received = 0
        self.consumed = 0
        self.dropped = 0
        self.returned = 0
        self.returned_bytes = 0
        self.updates = 0
        self.violations = 0

    def on_received(self, nbytes: int) -> bool:
        """Count a message that arrived. Returns False if it exceeded the credit.

        A publisher whose message arrives beyond the window is violating; it
        is counted in :attr:`violations` and the caller decides: accept it
        (then :meth:`on_consumed` later, as usual) or :meth:`on_dropped`.
        Never raises.
        """
        self.received += 1
        self.buffered += 1
        self.outstanding += 1
        self.outstanding_bytes += nbytes
        # A publisher only sends what it believes it has credit for, and it
        # learns of returns after we send them, so "more outstanding than
        # granted" is proof of a violation (never a false alarm).
        ok = self.outstanding <= self.credits and (
            self.credit_bytes is None
            or self.outstanding_bytes <= self.credit_bytes
            or self.outstanding == 1  # an oversized message may travel alone
        )
        if not ok:
            self.violations += 1
        return ok

    def on_received_run(self, sizes: Sequence[int], total: int | None = None) -> int:
        """Count a run of messages that arrived together (``sizes``: their payload
        lengths). Returns how many of them, from the first, are within credit; the
        rest were sent beyond it and are dropped here already (counted in
        :attr:`violations` and :attr:`dropped`): after a violation the rest of a run
        is refused too. Same totals as :meth:`on_received` per message and
        :meth:`on_dropped` for each refused one, in O(1) when the whole run is within
        credit (``total``: the sum of ``sizes``, if the caller has it)."""
        count = len(sizes)
        if total is None:
            total = sum(sizes)
        credit_bytes = self.credit_bytes
        if self.outstanding + count <= self.credits and (
                credit_bytes is None or self.outstanding_bytes + total <= credit_bytes):
            # The common case: every message within credit (the totals only grow).
            self.outstanding += count
            self.outstanding_bytes += total
            self.received += count
            self.buffered += count
            return count
        if credit_bytes is None:
            accepted = min(count, max(0, self.credits - self.outstanding))
            self.outstanding += accepted
            self.outstanding_bytes += sum(sizes[:accepted]) if accepted < count else sum(sizes)
        else:
            accepted = 0
            for nbytes in sizes:
                outstanding = self.outstanding + 1
                in_bytes = self.outstanding_bytes + nbytes
                if outstanding > self.credits or (
                    in_bytes > self.credit_bytes and outstanding != 1
                ):
                    break
                self.outstanding = outstanding
                self.outstanding_bytes = in_bytes
                accepted += 1
        refused = count - accepted
        self.received += count
        self.buffered += accepted
        self.violations += refused
        self.dropped += refused
        return accepted

    def on_consumed(self, nbytes: int, now: float, count: int = 1) -> None:
        """The application took ``count`` received messages (``nbytes`` in all):
        their credit will go back. The dispatch thread reports a whole batch at once."""
        if self.buffered < count or count <= 0:
            raise MeshError(
                "on_consumed() without a matching on_received(): the flow "
                "accounting of this subscription is broken (a bug in the I/O layer)"
            )
        self.buffered -= count
        self.consumed += count
        self._pending += count
        self._pending_bytes += nbytes
        if self._pending_since is None:
            self._pending_since = now

    def on_dropped(self, nbytes: int) -> None:
        """A received message is thrown away without returning its credit.

        Meant for messages that arrived beyond the credit (see
        :meth:`on_received`). A message that arrived within credit must go
        through :meth:`on_consumed` even when discarded, or the publisher
        loses that credit for good.
        """
        if self.buffered <= 0:
            raise MeshError(
                "on_dropped() without a matching on_received(): the flow "
                "accounting of this subscription is broken (a bug in the I/O layer)"
            )
        self.buffered -= 1
        self.dropped += 1
        # It no longer occupies the window on our side.
        self.outstanding -= 1
        self.outstanding_bytes -= nbytes

    @property
    def pending(self) -> tuple[int, int]:
        """(messages, bytes) consumed whose credit has not been sent back yet."""
        return self._pending, self._pending_bytes

    def _threshold_reached(self) -> bool:
        return self._pending >= self.threshold or (
            self._bytes_threshold is not None and self._pending_bytes >= self._bytes_threshold
        )

    def take_update(self, now: float, force: bool = False) -> tuple[int, int] | None:
        """The (messages, bytes) credit to send back now, or None if not due.

        Due when half the window (messages or bytes) is pending, or when the
        oldest pending return has waited ``flush_delay``. ``force=True`` takes
        whatever is pending: use it to piggyback on a frame going to the
        publisher anyway, or when the subscription closes.
        """
        if self._pending == 0:
            return None
        if not force and not self._threshold_reached():
            since = self._pending_since
            if since is None or now < since + self.flush_delay:
                return None
        msgs, nbytes = self._pending, self._pending_bytes
        self._pending = 0
        self._pending_bytes = 0
        self._pending_since = None
        self.outstanding -= msgs
        self.outstanding_bytes -= nbytes
        self.returned += msgs
        self.returned_bytes += nbytes
        self.updates += 1
        return msgs, nbytes

    def next_deadline(self) -> float | None:
        """When :meth:`take_update` becomes due (maybe already past), or None."""
        since = self._pending_since
        if self._pending == 0 or since is None:
            return None
        if self._threshold_reached():
            return since
        return since + self.flush_delay

    def stats(self) -> dict[str, int]:
        return {
            "credits": self.credits,
            "credit_bytes": self.credit_bytes or 0,
            "outstanding": self.outstanding,
            "buffered": self.buffered,
            "pending_return": self._pending,
            "received": self.received,
            "consumed": self.consumed,
            "dropped": self.dropped,
            "returned": self.returned,
            "updates": self.updates,
            "violations": self.violations,
        }


# --------------------------------------------------------------------------
# Sender side
# --------------------------------------------------------------------------


class Action(enum.Enum):
    SEND = "send"  # credit taken: send the message now
    QUEUE = "queue"  # held in the window; on_credit() releases it, in order
    BLOCK = "block"  # not taken: wait for credit, then offer again (or time out)
    DROP_NEW = "drop_new"  # the offered message was dropped
    DROP_OLDEST = "drop_oldest"  # offered one queued; Decision.victim was dropped


@dataclass(frozen=True)
class Decision(Generic[T]):
    """What :meth:`CreditWindow.offer` decided; ``victim`` only for DROP_OLDEST."""

    action: Action
    victim: T | None = None


# Shared instances: offer() is on the hot path.
_SEND: Decision[Any] = Decision(Action.SEND)
_QUEUE: Decision[Any] = Decision(Action.QUEUE)
_BLOCK: Decision[Any] = Decision(Action.BLOCK)
_DROP_NEW: Decision[Any] = Decision(Action.DROP_NEW)


class CreditWindow:
    """The credit one publisher holds for one subscription on one node (items of
    any type ``T``; not a ``Generic``: compiled, it is a C type, see flow.pxd).

    Overflow policies, when no credit is left (or messages are already held,
    which keeps order):

    - ``"block"``: up to ``max_pending`` messages are held (QUEUE) and released
      by :meth:`on_credit`; the publisher waits for its message to be released
      and on timeout calls :meth:`cancel` and raises ``BackpressureError``.
      Beyond ``max_pending`` (or with ``max_pending=0``) the answer is BLOCK:
      nothing is held, wait for credit and offer again.
    - ``"drop_new"``: the new message is dropped (DROP_NEW); nothing is held,
      so what gets through is the oldest.
    - ``"drop_oldest"``: the new message is held; when ``max_pending`` are held
      the oldest held one is dropped (DROP_OLDEST, ``victim``), so what gets
      through is the newest.
    """

    __slots__ = (
        "credits",
        "credit_bytes",
        "overflow",
        "max_pending",
        "in_flight",
        "in_flight_bytes",
        "_pending",
        "pending_bytes",
        "drops",
        "sent",
        "cancelled",
        "excess_credit",
        "closed_reason",
    )

    def __init__(
        self,
        credits: int = DEFAULT_CREDITS,  # noqa: A002 - the API's name (subscribe(credits=))
        credit_bytes: int | None = DEFAULT_CREDIT_BYTES,
        overflow: str = "block",
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        self.credits = _check_int("credits", credits, 1, "use the subscriber's grant (default 1024)")
        self.credit_bytes = (
            None
            if credit_bytes is None
            else _check_int("credit_bytes", credit_bytes, 1, "or pass None for no byte limit")
        )
        if overflow not in OVERFLOW_POLICIES:
            raise ConfigError(
                f"overflow must be one of {', '.join(map(repr, OVERFLOW_POLICIES))}, "
                f"got {overflow!r}"
            )
        self.overflow = overflow
        self.max_pending = _check_int(
            "max_pending", max_pending, 0, "it bounds the messages held while out of credit"
        )
        if overflow == "drop_oldest" and max_pending < 1:
            raise ConfigError(
                "overflow='drop_oldest' needs max_pending >= 1 to keep the newest "
                "messages; with nothing held use overflow='drop_new'"
            )
        self.in_flight = 0  # sent, credit not yet back
        self.in_flight_bytes = 0
        self._pending: deque[tuple[T, int]] = deque()
        self.pending_bytes = 0
        self.drops = {"drop_new": 0, "drop_oldest": 0}
        self.sent = 0
        self.cancelled = 0
        self.excess_credit = 0  # updates that returned more than was in flight
        self.closed_reason: str | None = None

    # -- state ---------------------------------------------------------------

    @property
    def available(self) -> int:
        """Messages that may still be sent before the window is full."""
        return self.credits - self.in_flight

    @property
    def available_bytes(self) -> int | None:
        """Bytes left in the window; None without a byte limit."""
        if self.credit_bytes is None:
            return None
        return max(0, self.credit_bytes - self.in_flight_bytes)

    @property
    def pending(self) -> int:
        """Messages held in the window, waiting for credit."""
        return len(self._pending)

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    def _fits(self, nbytes: int) -> bool:
        if self.in_flight >= self.credits:
            return False
        if self.credit_bytes is None or self.in_flight == 0:
            return True  # an oversized message may travel alone, or it never could
        return self.in_flight_bytes + nbytes <= self.credit_bytes

    def can_send(self, nbytes: int) -> bool:
        """Whether :meth:`offer` of this size would answer SEND right now."""
        return not self._pending and self.closed_reason is None and self._fits(nbytes)

    def _take(self, nbytes: int) -> None:
        self.in_flight += 1
        self.in_flight_bytes += nbytes
        self.sent += 1

    # -- events --------------------------------------------------------------

    def offer(self, item: T, nbytes: int) -> Decision[T]:
        """A message wants to go to the subscriber. See :class:`Action`."""
        if self.closed_reason is not None:
            raise ClosedError(
                f"the credit window is closed ({self.closed_reason}); "
                "the subscriber is gone, stop publishing to it"
            )
        if nbytes < 0:
            _check_nbytes(nbytes)
        # Held messages go first: never overtake them. (_fits and _take, written out:
        # this runs for every message published.)
        in_flight = self.in_flight
        if not self._pending and in_flight < self.credits and (
            self.credit_bytes is None or in_flight == 0
            or self.in_flight_bytes + nbytes <= self.credit_bytes
        ):
            self.in_flight = in_flight + 1
            self.in_flight_bytes += nbytes
            self.sent += 1
            return _SEND
        policy = self.overflow
        if policy == "drop_new":
            self.drops["drop_new"] += 1
            return _DROP_NEW
        if len(self._pending) < self.max_pending:
            self._pending.append((item, nbytes))
            self.pending_bytes += nbytes
            return _QUEUE
        if policy == "block":
            return _BLOCK
        victim, victim_bytes = self._pending.popleft()
        self.pending_bytes -= victim_bytes
        self._pending.append((item, nbytes))
        self.pending_bytes += nbytes
        self.drops["drop_oldest"] += 1
        return Decision(Action.DROP_OLDEST, victim)

    def hold(self, item: T, nbytes: int, limit: int) -> bool:
        """Hold a message that cannot wait for credit (a publisher on one of the node's
        own threads, whose waiting could keep that credit from ever coming back):
        it leaves, in order, when :meth:`on_credit` releases it. False (nothing
        held) once ``limit`` messages are held: the caller drops it and counts."""
        if self.closed_reason is not None:
            return False
        if len(self._pending) >= limit:
            return False
        _check_nbytes(nbytes)
        self._pending.append((item, nbytes))
        self.pending_bytes += nbytes
        return True

    def on_credit(self, msgs: int, nbytes: int) -> list[T]:
        """The subscriber returned credit. Returns held messages now sendable, in order.

        The values come off the network: anything but two non-negative ints
        raises ProtocolError (count and drop it). Returning more than is in
        flight is clamped and counted in :attr:`excess_credit`, so a confused
        peer cannot inflate the window.
        """
        if type(msgs) is not int or type(nbytes) is not int or msgs < 0 or nbytes < 0:
            raise ProtocolError(
                f"credit update must be two non-negative integers, got {msgs!r}, {nbytes!r}",
                "malformed",
            )
        if self.closed_reason is not None:
            return []  # late update from a peer we gave up on
        if msgs > self.in_flight or (
            self.credit_bytes is not None and nbytes > self.in_flight_bytes
        ):
            self.excess_credit += 1
        self.in_flight = max(0, self.in_flight - msgs)
        self.in_flight_bytes = max(0, self.in_flight_bytes - nbytes)
        if self.in_flight == 0:
            self.in_flight_bytes = 0  # nothing in flight means no bytes either
        released: list[T] = []
        pending = self._pending
        while pending and self._fits(pending[0][1]):
            item, size = pending.popleft()
            self.pending_bytes -= size
            self._take(size)
            released.append(item)
        return released

    def cancel(self, item: T) -> bool:
        """Withdraw a held message (a blocked publish timed out). True if it was held."""
        for i, (held, size) in enumerate(self._pending):
            if held is item:
                del self._pending[i]
                self.pending_bytes -= size
                self.cancelled += 1
                return True
        return False

    def close(self, reason: str) -> list[T]:
        """The subscriber is gone. Returns every held message so its publisher can be failed.

        Further :meth:`offer` calls raise ClosedError; late credit is ignored.
        Idempotent: a second close returns [].
        """
        if self.closed_reason is None:
            self.closed_reason = reason or "closed"
        released = [item for item, _ in self._pending]
        self._pending.clear()
        self.pending_bytes = 0
        self.in_flight = 0
        self.in_flight_bytes = 0
        return released

    def stats(self) -> dict[str, int]:
        return {
            "credits": self.credits,
            "available": self.available,
            "in_flight": self.in_flight,
            "in_flight_bytes": self.in_flight_bytes,
            "pending": len(self._pending),
            "pending_bytes": self.pending_bytes,
            "sent": self.sent,
            "drop_new": self.drops["drop_new"],
            "drop_oldest": self.drops["drop_oldest"],
            "cancelled": self.cancelled,
            "excess_credit": self.excess_credit,
        }


# --------------------------------------------------------------------------
# Micro-batching: the batch frame (the node batches inline, in runs; see Node._send_locked)
# --------------------------------------------------------------------------


# Batch frame (version 2), all little-endian:
#   u8 version | u32 run count | per run:
#     u32 header length | header | u32 message count n | n x u32 payload length | payloads
# A run is messages that share one header: the same subject, subscriptions and
# flags, consecutive sequence numbers from the header's. Sharing it is what makes
# a batch cheap: one header to build and parse per run, not per message.
# Pure and bounded: decode never trusts a declared length beyond the bytes present.
BATCH_VERSION = 2
_U32 = struct.Struct("<I")
_HEAD = struct.Struct("<BI")
# array("I") is the batch's u32 size list byte for byte on little-endian hosts with
# 4-byte unsigned ints (all the usual ones); elsewhere struct packs it.
_SIZES_NATIVE = sys.byteorder == "little" and _array("I").itemsize == 4
_U32_MAX = 0xFFFFFFFF

BatchRun = tuple[bytes | bytearray | memoryview, Sequence[bytes | bytearray | memoryview]]


def encode_batch(runs: Sequence[BatchRun]) -> bytes:
    """One frame holding runs of messages: ``(header, payloads)``, one header per run."""
    if len(runs) > _U32_MAX:
        raise MessageTooLarge(f"a batch holds at most {_U32_MAX} runs; send smaller batches")
    pack = _U32.pack
    parts: list[bytes | bytearray | memoryview] = [_HEAD.pack(BATCH_VERSION, len(runs))]
    for header, payloads in runs:
        count = len(payloads)
        # len() is the byte count of bytes (the usual case); others may hold wider items.
        # One pass: the sizes and the largest (no max(), no per-run struct format).
        sizes = []
        largest = 0
        for p in payloads:
            size = len(p) if type(p) is bytes else memoryview(p).nbytes
            if size > largest:
                largest = size
            sizes.append(size)
        hsize = len(header) if type(header) is bytes else memoryview(header).nbytes
        if hsize > _U32_MAX or count > _U32_MAX or largest > _U32_MAX:
            raise MessageTooLarge("a frame over 4 GiB cannot be batched; send it on its own")
        parts.append(pack(hsize))
        parts.append(header)
        parts.append(pack(count))
        # The sizes as little-endian u32s: array's C loop where that is the native layout.
        parts.append(_array("I", sizes).tobytes() if _SIZES_NATIVE else
                     struct.pack(f"<{count}I", *sizes))
        parts.extend(payloads)
    return b"".join(parts)


def decode_batch(data: bytes | bytearray | memoryview) -> list[tuple[bytes, list[bytes]]]:
    """The runs of a batch frame: ``(header, payloads)``. Malformed input raises
    ProtocolError only."""
    return [(header, split_run(blob, sizes, at))
            for header, blob, at, sizes, _total in decode_runs(data)]


def split_run(blob: bytes, sizes: Any, at: int = 0) -> list[bytes]:
    """The payloads of a run: ``blob``'s bytes from ``at`` (theirs, one after the other)
    cut at ``sizes``."""
    # A C pointer in the compiled build (flow.pxd), whose slices are made at once
    # (slicing the bytes object makes a slice object per message).
    start = blob
    payloads: list[bytes] = []
    pos = at
    for n in sizes:
        end = pos + n
        payloads.append(start[pos:end])
        pos = end
    return payloads


def decode_runs(data: bytes | bytearray | memoryview) -> list[tuple[bytes, bytes, int, Any, int]]:
    """The runs of a batch frame, not yet cut into messages: ``(header, blob, at,
    payload lengths, their sum)``, the payloads being ``blob``'s bytes from ``at``, one
    after the other (split_run cuts them; the receiver cuts them on the thread that
    hands them out). ``blob`` is ``data`` itself when that is bytes (no copy of a
    400 KiB batch, nor the fresh pages a copy would fault in), else a copy of the
    run's bytes (``at`` 0). Malformed input raises ProtocolError only."""
    whole = data if type(data) is bytes else None
    try:
        view = memoryview(data).cast("B")
    except (TypeError, ValueError):
        raise ProtocolError("batch frame is not a contiguous byte buffer", "malformed") from None
    size = view.nbytes
    if size < _HEAD.size:
        raise ProtocolError(f"batch frame of {size} bytes is shorter than its header", "malformed")
    version, nruns = _HEAD.unpack_from(view, 0)
    if version != BATCH_VERSION:
        raise ProtocolError(
            f"batch format version {version}, this node reads {BATCH_VERSION}", "version"
        )
    off = _HEAD.size
    # Every run needs at least its two 4-byte counts: refuse absurd counts before
    # looping, so a tiny frame cannot make us spin or allocate.
    if nruns > (size - off) // 8:
        raise ProtocolError(f"batch declares {nruns} runs in {size} bytes", "malformed")
    unpack = _U32.unpack_from
    runs: list[tuple[bytes, bytes, Any, int]] = []
    for _ in range(nruns):
        if size - off < 4:
            raise ProtocolError("batch frame truncated in a run header", "malformed")
        (hsize,) = unpack(view, off)
        off += 4
        if hsize > size - off:
            raise ProtocolError(f"batch run header of {hsize} bytes, {size - off} remain", "malformed")
        header = view[off : off + hsize].tobytes()
        off += hsize
        if size - off < 4:
            raise ProtocolError("batch frame truncated in a message count", "malformed")
        (count,) = unpack(view, off)
        off += 4
        if count > (size - off) // 4:
            raise ProtocolError(f"batch run declares {count} messages", "malformed")
        sizes = struct.unpack_from(f"<{count}I", view, off)
        off += 4 * count
        total = sum(sizes)
        if total > size - off:
            raise ProtocolError(
                f"batch run declares {total} payload bytes, {size - off} remain", "malformed"
            )
        if whole is not None:
            runs.append((header, whole, off, sizes, total))
        else:
            runs.append((header, view[off : off + total].tobytes(), 0, sizes, total))
        off += total
    if off != size:
        raise ProtocolError(f"{size - off} trailing bytes after the batch", "malformed")
    return runs

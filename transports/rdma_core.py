"""The RDMA data path's bookkeeping, with no verbs and no I/O (sans-IO).

The scheme is TensorPipe's ibverbs transport: every connection direction has
a ring buffer that the *receiver* registers (its "inbox"). The sender knows
the ring's address and rkey and RDMA-writes-with-immediate into the next free
region, the immediate carrying the length. Writes on an RC queue pair land in
order, so the receiver only counts bytes. When it has consumed bytes it sends
their count back (a zero-byte SEND with immediate): those are the sender's
credits. The sender never has more than ``capacity`` bytes unacknowledged, so
it never overwrites bytes the receiver has not consumed yet.

The ring is a byte stream. Messages ("frames") are cut into writes that never
cross the end of the ring (that is the wrap-around: one write ends at the end,
the next starts at offset 0) and never exceed the credits, so a message larger
than the ring streams through it as credits come back.

A frame on the stream is ``header | meta | payload``::

    header  = struct "<4sIQQ": magic b"ZMR1", meta length, message id, payload length
    meta    = opaque bytes (the connection puts dtype, shape and the caller's meta there)
    payload = the array's bytes

Also here: the order of a link's messages across its two paths (socket and
RDMA, :class:`SendOrder` and :class:`ReceiveOrder`), the registration cache (registering memory with the NIC is slow,
so registrations of send buffers are kept, keyed by address and size, and the
least recently used unpinned one is dropped past a budget) and the pool of
staging slots that small messages are copied into.

Everything raises typed errors from :mod:`mesh.errors`; a peer that breaks
the protocol gives :class:`~mesh.errors.ProtocolError`.
"""

from __future__ import annotations

import bisect
import math
import struct
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

from mesh.errors import MessageTooLarge, ProtocolError

__all__ = [
    "FRAME_HEADER",
    "FRAME_MAGIC",
    "MAX_IMM",
    "FrameHeader",
    "FrameReader",
    "Outbox",
    "RdmaTag",
    "ReceiveOrder",
    "RegistrationCache",
    "RingReader",
    "RingWriter",
    "SendOrder",
    "SlotPool",
    "Sync",
    "Write",
    "decode_header",
    "encode_header",
]

FRAME_MAGIC = b"ZMR1"
FRAME_HEADER = struct.Struct("<4sIQQ")
#: the immediate is 32 bits: write lengths and acknowledged byte counts must fit
MAX_IMM = (1 << 32) - 1
#: a meta block larger than this is a corrupt stream, not a real message
MAX_META = 1 << 20


# --------------------------------------------------------------------------- frames


class FrameHeader(NamedTuple):
    msg_id: int
    meta_len: int
    payload_len: int


def encode_header(msg_id: int, meta_len: int, payload_len: int) -> bytes:
    return FRAME_HEADER.pack(FRAME_MAGIC, meta_len, msg_id, payload_len)


def decode_header(data: bytes, max_payload: int | None = None) -> FrameHeader:
    """Parse a frame header; a bad one means the stream is corrupt."""
    if len(data) != FRAME_HEADER.size:
        raise ProtocolError(f"rdma frame header is {len(data)} bytes, expected {FRAME_HEADER.size}")
    magic, meta_len, msg_id, payload_len = FRAME_HEADER.unpack(data)
    if magic != FRAME_MAGIC:
        raise ProtocolError(f"rdma stream out of sync: frame magic {magic!r}, expected {FRAME_MAGIC!r}")
    if meta_len > MAX_META:
        raise ProtocolError(f"rdma frame meta of {meta_len} bytes exceeds {MAX_META}")
    if max_payload is not None and payload_len > max_payload:
        raise ProtocolError(
            f"rdma frame payload of {payload_len} bytes exceeds the limit of {max_payload}",
            reason="too_large",
        )
    return FrameHeader(msg_id, meta_len, payload_len)


# --------------------------------------------------------------------------- the ring


class RingWriter:
    """The sender's view of the peer's ring: where to write next and how much.

    ``written`` and ``acked`` are running byte counts; their difference is what
    sits in the ring unconsumed (or in flight), so ``credits`` is never negative.
    """

    def __init__(self, capacity: int) -> None:
        if not 0 < capacity <= MAX_IMM:
            raise ValueError(f"ring capacity must be in 1..{MAX_IMM} bytes, got {capacity}")
        self.capacity = capacity
        self.written = 0
        self.acked = 0

    @property
    def in_flight(self) -> int:
        return self.written - self.acked

    @property
    def credits(self) -> int:
        return self.capacity - self.in_flight

    @property
    def offset(self) -> int:
        """Ring offset of the next byte to write."""
        return self.written % self.capacity

    def contiguous(self) -> int:
        """Bytes writable in one piece now: the credits, cut at the ring's end."""
        return min(self.credits, self.capacity - self.offset)

    def advance(self, nbytes: int) -> int:
        """Claim ``nbytes`` at :attr:`offset` (one contiguous write); returns that offset."""
        if not 0 < nbytes <= self.contiguous():
            raise ValueError(
                f"cannot write {nbytes} bytes: {self.credits} credits, "
                f"{self.capacity - self.offset} bytes before the ring wraps"
            )
        start = self.offset
        self.written += nbytes
        return start

    def on_ack(self, nbytes: int) -> None:
        """The receiver consumed ``nbytes`` more: they are credits again."""
        if nbytes <= 0 or nbytes > self.in_flight:
            raise ProtocolError(
                f"peer acknowledged {nbytes} bytes but only {self.in_flight} are unacknowledged"
            )
        self.acked += nbytes


class RingReader:
    """The receiver's side of its own ring: what arrived, what was consumed and acked."""

    def __init__(self, capacity: int, ack_threshold: int | None = None) -> None:
        if not 0 < capacity <= MAX_IMM:
            raise ValueError(f"ring capacity must be in 1..{MAX_IMM} bytes, got {capacity}")
        self.capacity = capacity
        self.produced = 0  # bytes the peer wrote (announced by immediates)
        self.consumed = 0
        self.acked = 0
        # Acking every consume costs a SEND each; acking at a quarter of the ring
        # keeps the sender streaming. A drained ring is always acked (see take_ack).
        self.ack_threshold = max(1, capacity // 4 if ack_threshold is None else ack_threshold)

    @property
    def readable(self) -> int:
        return self.produced - self.consumed

    @property
    def offset(self) -> int:
        """Ring offset of the next byte to read."""
        return self.consumed % self.capacity

    def on_write(self, nbytes: int) -> None:
        """A write-with-immediate of ``nbytes`` landed (at the current write position)."""
        room = self.capacity - (self.produced - self.acked)
        if nbytes <= 0 or nbytes > room:
            raise ProtocolError(
                f"peer wrote {nbytes} bytes into a ring with {room} bytes of credit: "
                "it overran its credits"
            )
        if self.produced % self.capacity + nbytes > self.capacity:
            raise ProtocolError("peer wrote across the end of the ring instead of wrapping")
        self.produced += nbytes

    def contiguous(self) -> int:
        """Readable bytes in one piece, cut at the ring's end."""
        return min(self.readable, self.capacity - self.offset)

    def consume(self, nbytes: int) -> int:
        """Mark ``nbytes`` at :attr:`offset` read (at most :meth:`contiguous`); returns that offset."""
        if not 0 < nbytes <= self.contiguous():
            raise ValueError(f"cannot consume {nbytes} bytes, {self.contiguous()} are readable here")
        start = self.offset
        self.consumed += nbytes
        return start

    def take_ack(self, force: bool = False) -> int:
        """Bytes to acknowledge now (0: not yet). Always acks once the ring is drained,
        so a sender waiting for credits is never left waiting on a threshold."""
        pending = self.consumed - self.acked
        if pending and (force or pending >= self.ack_threshold or self.readable == 0):
            self.acked = self.consumed
            return pending
        return 0


# --------------------------------------------------------------------------- sending frames


class Write(NamedTuple):
    """One RDMA write: ``length`` bytes of part ``part`` of frame ``frame``, starting at
    ``part_offset``, to ring offset ``ring_offset``. ``last``: the frame's final write."""

    frame: int
    part: int
    part_offset: int
    ring_offset: int
    length: int
    last: bool


@dataclass
class _OutFrame:
    frame: int
    parts: list[int]
    part: int = 0
    part_offset: int = 0

    def remaining_in_part(self) -> int:
        return self.parts[self.part] - self.part_offset

    def skip_empty(self) -> None:
        # Part indices name source buffers, so empty parts are skipped, not removed.
        while self.part < len(self.parts) and self.parts[self.part] == 0:
            self.part += 1


@dataclass
class Outbox:
    """Frames waiting to be written, cut into writes that fit the credits and the ring.

    A frame is a sequence of parts (e.g. a staged header and a registered payload);
    a write never spans two parts, so each write has a single source buffer.
    """

    ring: RingWriter
    max_write: int = 1 << 20
    max_message: int | None = None
    _queue: deque[_OutFrame] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if not 0 < self.max_write <= MAX_IMM:
            raise ValueError(f"max_write must be in 1..{MAX_IMM}, got {self.max_write}")

    def push(self, frame: int, parts: Sequence[int]) -> None:
        total = sum(parts)
        if self.max_message is not None and total > self.max_message:
            raise MessageTooLarge(
                f"a {total}-byte message exceeds this rdma connection's limit of "
                f"{self.max_message} bytes; send it in pieces or raise max_message"
            )
        if any(n < 0 for n in parts) or total == 0:
            raise ValueError(f"a frame needs at least one byte, got parts {list(parts)}")
        out = _OutFrame(frame, list(parts))
        out.skip_empty()
        self._queue.append(out)

    def __len__(self) -> int:
        return len(self._queue)

    def pending_bytes(self) -> int:
        out = 0
        for f in self._queue:
            out += sum(f.parts[f.part :]) - f.part_offset
        return out

    def frames(self) -> list[int]:
        """Frames not yet completely planned, oldest first."""
        return [f.frame for f in self._queue]

    def plan(self, max_writes: int) -> list[Write]:
        """Writes to post now (at most ``max_writes``), in stream order."""
        writes: list[Write] = []
        while self._queue and len(writes) < max_writes:
            room = min(self.ring.contiguous(), self.max_write)
            if room <= 0:
                break
            f = self._queue[0]
            n = min(room, f.remaining_in_part())
            ring_offset = self.ring.advance(n)
            part, part_offset = f.part, f.part_offset
            f.part_offset += n
            if f.part_offset == f.parts[f.part]:
                f.part += 1
                f.part_offset = 0
                f.skip_empty()
            last = f.part == len(f.parts)
            writes.append(Write(f.frame, part, part_offset, ring_offset, n, last))
            if last:
                self._queue.popleft()
        return writes


# --------------------------------------------------------------------------- receiving frames


@dataclass
class FrameReader:
    """Cuts the received byte stream back into frames.

    Loop: ``need()`` says which part comes next and how many bytes of it are
    missing; the caller copies up to that many readable bytes, then calls
    ``feed(data)`` for the header and meta parts or ``advance_payload(n)`` after
    copying payload bytes into its own buffer at ``payload_offset``.
    ``header``/``meta`` describe the frame in progress; ``take_done()`` returns a
    completed frame's header and meta once.
    """

    max_payload: int | None = None
    header: FrameHeader | None = None
    meta: bytes | None = None
    payload_offset: int = 0
    _buf: bytearray = field(default_factory=bytearray)
    _done: tuple[FrameHeader, bytes] | None = None

    HEADER, META, PAYLOAD = "header", "meta", "payload"

    def need(self) -> tuple[str, int]:
        if self.header is None:
            return self.HEADER, FRAME_HEADER.size - len(self._buf)
        if self.meta is None:
            return self.META, self.header.meta_len - len(self._buf)
        return self.PAYLOAD, self.header.payload_len - self.payload_offset

    def feed(self, data: bytes) -> None:
        part, missing = self.need()
        if part == self.PAYLOAD or len(data) > missing:
            raise ValueError(f"fed {len(data)} bytes while {missing} bytes of {part} are missing")
        self._buf += data
        if part == self.HEADER and len(self._buf) == FRAME_HEADER.size:
            self.header = decode_header(bytes(self._buf), self.max_payload)
            self._buf.clear()
            if self.header.meta_len == 0:
                self.meta = b""
        elif part == self.META and len(self._buf) == self.header.meta_len:  # type: ignore[union-attr]
            self.meta = bytes(self._buf)
            self._buf.clear()
        self._maybe_done()

    def advance_payload(self, nbytes: int) -> None:
        part, missing = self.need()
        if part != self.PAYLOAD or not 0 < nbytes <= missing:
            raise ValueError(f"advanced payload by {nbytes} while {missing} bytes of {part} are missing")
        self.payload_offset += nbytes
        self._maybe_done()

    def _maybe_done(self) -> None:
        if (
            self.header is not None
            and self.meta is not None
            and self.payload_offset == self.header.payload_len
        ):
            self._done = (self.header, self.meta)
            self.header, self.meta, self.payload_offset = None, None, 0

    def take_done(self) -> tuple[FrameHeader, bytes] | None:
        done, self._done = self._done, None
        return done


# --------------------------------------------------------------------------- memory


R = TypeVar("R")


@dataclass
class _Entry(Generic[R]):
    reg: R
    owner: object
    pins: int = 0


class RegistrationCache(Generic[R]):
    """Memory registrations keyed by (address, size), least recently used evicted.

    ``acquire`` pins an entry while a write uses it; pinned entries are never
    evicted (the budget is exceeded instead until they are released). Each
    entry keeps a reference to the buffer's owner so the memory cannot be freed
    and its address reused while the registration (which pins the old pages) lives.
    """

    def __init__(
        self,
        register: Callable[[int, int], R],
        deregister: Callable[[R], None],
        max_entries: int = 64,
        max_bytes: int = 1 << 30,
    ) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("a registration cache needs room for at least one entry")
        self._register = register
        self._deregister = deregister
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, int], _Entry[R]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._entries

    def pins(self, addr: int, size: int) -> int:
        entry = self._entries.get((addr, size))
        return entry.pins if entry else 0

    def acquire(self, addr: int, size: int, owner: object = None) -> R:
        key = (addr, size)
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(key)
        else:
            self.misses += 1
            entry = _Entry(self._register(addr, size), owner)
            self._entries[key] = entry
            self.bytes += size
        entry.pins += 1
        self._evict()
        return entry.reg

    def release(self, addr: int, size: int) -> None:
        entry = self._entries.get((addr, size))
        if entry is None or entry.pins == 0:
            raise ValueError(f"release of a registration that is not pinned: {addr:#x}+{size}")
        entry.pins -= 1
        self._evict()

    def _evict(self) -> None:
        if len(self._entries) <= self.max_entries and self.bytes <= self.max_bytes:
            return
        for key in [k for k, e in self._entries.items() if e.pins == 0]:  # oldest first
            if len(self._entries) <= self.max_entries and self.bytes <= self.max_bytes:
                break
            self._drop(key)
            self.evictions += 1

    def _drop(self, key: tuple[int, int]) -> None:
        entry = self._entries.pop(key)
        self.bytes -= key[1]
        self._deregister(entry.reg)

    def clear(self) -> None:
        """Deregister everything, pinned or not (the connection is closing)."""
        for key in list(self._entries):
            self._drop(key)


class SlotPool:
    """Fixed-size staging slots (one registered buffer) handed out and returned."""

    def __init__(self, count: int, size: int) -> None:
        if count < 1 or size < 1:
            raise ValueError("a slot pool needs at least one slot of at least one byte")
        self.count = count
        self.size = size
        self._free = deque(range(count))
        self._used: set[int] = set()

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self) -> int | None:
        if not self._free:
            return None
        slot = self._free.popleft()
        self._used.add(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not in use")
        self._used.remove(slot)
        self._free.append(slot)

    def offset(self, slot: int) -> int:
        return slot * self.size


# --------------------------------------------------------------------------- order across the two paths


class Sync(NamedTuple):
    """A marker in a link's socket stream. ``ordinal`` numbers the markers (1, 2, ...).
    Socket messages after it wait until ``rdma_count`` RDMA messages have been
    delivered; RDMA messages tagged ``k <= ordinal`` wait until it has been processed
    (which means every socket message sent before it was delivered)."""

    epoch: int
    ordinal: int
    rdma_count: int


class RdmaTag(NamedTuple):
    """What an RDMA message carries: its index on the link (1, 2, ...) and ``k``, the
    ordinal of the sync that follows the socket messages sent before it."""

    epoch: int
    index: int
    k: int


class SendOrder:
    """Sender side of the order of one link's messages over its two paths.

    Messages to one peer go either on the ZeroMQ socket or, large arrays, through
    the RDMA queue pair; each path is FIFO, but one can overtake the other. Only
    where the path changes does anything travel: before the first socket message
    after RDMA messages, a :class:`Sync` (in the same ZeroMQ message, so it cannot
    be lost without the message) says how many RDMA messages precede it; after
    socket messages, the next RDMA message is tagged with the ordinal of a sync
    sent on the socket right then. A link that never sends by RDMA has no
    SendOrder at all. Not thread-safe: the node uses it under the link lock.
    ``epoch`` tells one link's numbering from a later link's to the same peer.
    """

    __slots__ = ("epoch", "rdma_count", "syncs", "pending", "_last_rdma")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.rdma_count = 0  # RDMA messages queued so far (the last index)
        self.syncs = 0  # ordinal of the last sync made
        self.pending: Sync | None = None  # made, not on the socket yet
        # Socket messages may have gone before the first RDMA message (before the
        # queue pair was up): the first RDMA message needs a sync too.
        self._last_rdma = False

    def socket(self) -> Sync | None:
        """Before a data message on the socket: the sync to put in front of it (same
        ZeroMQ message), or None. Call :meth:`synced` once that message is queued;
        if it is dropped instead, the sync goes in front of the next one."""
        if self._last_rdma:
            self._last_rdma = False
            self.syncs += 1
            self.pending = Sync(self.epoch, self.syncs, self.rdma_count)
        return self.pending

    def next_rdma(self) -> RdmaTag:
        """The tag for the next RDMA message; nothing changes until :meth:`sent_rdma`."""
        return RdmaTag(self.epoch, self.rdma_count + 1, self.syncs + (0 if self._last_rdma else 1))

    def sent_rdma(self, tag: RdmaTag) -> Sync | None:
        """The message tagged ``tag`` is queued on the RDMA path. Returns a sync to send
        on the socket now, on its own, when socket messages went before it (the RDMA
        message waits for it at the receiver); call :meth:`synced` once it is queued.
        One that cannot be sent stays :attr:`pending`: retry it, and it goes in front
        of the next socket message anyway."""
        if tag != self.next_rdma():
            raise ValueError(f"rdma tag {tag} is not the next one ({self.next_rdma()})")
        sync = None
        if not self._last_rdma:
            self._last_rdma = True
            self.syncs += 1
            # Supersedes an unsent pending sync: a higher ordinal implies the lower.
            self.pending = sync = Sync(self.epoch, self.syncs, self.rdma_count)
        self.rdma_count += 1
        return sync

    def synced(self, sync: Sync) -> None:
        """``sync`` is on the socket now."""
        if self.pending == sync:
            self.pending = None


T = TypeVar("T")


class ReceiveOrder(Generic[T]):
    """Receiver side: puts one peer's messages from both paths back in send order.

    Feed socket messages to :meth:`socket` while :attr:`blocked` (when it is not,
    deliver them at once: the usual case costs one attribute check), syncs to
    :meth:`sync`, and RDMA messages, also those the peer re-sent over the socket
    after its queue pair failed, to :meth:`rdma`. Each returns the items now
    deliverable, in order. RDMA messages go out by index: one re-sent on the
    socket may arrive before an earlier one is read from the ring, so it waits
    for it; one that arrived both ways is dropped (:attr:`duplicates`). Nothing
    waits forever: :meth:`expire` releases what waits for a message that was
    lost (:attr:`forced`), :meth:`flush` everything (the peer is gone). Nothing
    piles up either: beyond ``max_held`` messages held, the oldest wait is given
    up at once (:attr:`overflowed`; a late message still comes, out of order).
    Not thread-safe.
    """

    RETIRED = 8  # epochs of earlier links remembered, to recognise their stragglers
    MAX_SKIPPED = 4096  # indices given up on, remembered so a late one still counts
    # Held messages at most: a peer sending at full speed while one RDMA message is
    # lost would otherwise fill memory for the whole max_hold (the ZeroMQ receive
    # queue's default high-water mark is of the same order).
    MAX_HELD = 100_000

    def __init__(self, epoch: int | None = None, max_held: int = MAX_HELD) -> None:
        if max_held < 1:
            raise ValueError(f"max_held must be >= 1, got {max_held}")
        self.epoch = epoch
        self.max_held = max_held
        self._retired: deque[int] = deque(maxlen=self.RETIRED)
        self.duplicates = 0
        self.forced = 0
        self.overflowed = 0  # waits given up because too much was held (also in forced)
        self._overflowed_taken = 0
        self.progress_at = 0.0  # when the RDMA path last made progress
        self._marker: object = None
        self._reset()

    def _reset(self) -> None:
        self.syncs = 0  # highest sync ordinal processed
        self.wait_for = 0  # socket messages wait until rdma_seen >= wait_for
        self.rdma_seen = 0  # every RDMA index up to this one is delivered (or given up)
        self._skipped: set[int] = set()  # given up on by expire(); may still turn up
        self._sock: deque[tuple[float, Sync | None, T | None]] = deque()
        self._rdma: list[tuple[int, float, int, T]] = []  # (index, arrived, k, item) by index

    @property
    def blocked(self) -> bool:
        """Whether a socket message arriving now must go through :meth:`socket`."""
        return bool(self._sock) or self.rdma_seen < self.wait_for

    @property
    def held(self) -> int:
        return len(self._sock) + len(self._rdma)

    def socket(self, item: T, now: float) -> list[T]:
        """A data message from the socket."""
        self._sock.append((now, None, item))
        out = self._drain([])
        self._overflow(out)
        return out

    def sync(self, sync: Sync, now: float) -> list[T]:
        """A sync from the socket (alone, or in front of a message: pass that to
        :meth:`socket` right after)."""
        out, current = self._epoch(sync.epoch)
        if current:
            self._sock.append((now, sync, None))
            self._drain(out)
            self._overflow(out)
        return out

    def rdma(self, tag: RdmaTag, item: T, now: float) -> list[T]:
        """A message sent by RDMA (arrived through the queue pair or re-sent on the socket)."""
        out, current = self._epoch(tag.epoch)
        if not current:
            out.append(item)  # a straggler of a link that is gone: nothing to order it by
            return out
        index = tag.index
        if index <= self.rdma_seen:
            if index in self._skipped:  # late, not lost: better out of order than never
                self._skipped.discard(index)
                out.append(item)
            else:
                self.duplicates += 1  # both ways after a failure: the first copy counts
            return out
        q = self._rdma
        at = bisect.bisect_left(q, index, key=lambda e: e[0])
        if at < len(q) and q[at][0] == index:
            self.duplicates += 1
            return out
        q.insert(at, (index, now, tag.k, item))
        self.progress_at = now
        self._drain(out)
        self._overflow(out)
        return out

    def take_overflowed(self) -> int:
        """Waits given up for lack of room since the last call (for counting)."""
        new = self.overflowed - self._overflowed_taken
        self._overflowed_taken = self.overflowed
        return new

    def _overflow(self, out: list[T]) -> None:
        """Too much held: give up the oldest waits (as expire() would after max_hold)
        until at most max_held entries (messages and syncs) are left."""
        while self.held > self.max_held and self._give_up_head(math.inf, 0.0):
            self.overflowed += 1
            self._drain(out)

    def progress(self, marker: object, now: float) -> None:
        """The RDMA path reports how far it got (e.g. bytes received): a new marker
        counts as progress, so socket messages waiting for a long array keep waiting."""
        if marker != self._marker:
            self._marker = marker
            self.progress_at = now

    def expire(self, now: float, max_hold: float) -> list[T]:
        """Release what waits for a message that is presumably lost: waiting for an
        RDMA message, once the RDMA path made no progress for ``max_hold`` seconds;
        an RDMA message waiting for a sync, ``max_hold`` seconds after it arrived."""
        out: list[T] = []
        while self._give_up_head(now, max_hold):
            self._drain(out)
        return out

    def _give_up_head(self, now: float, max_hold: float) -> bool:
        """Give up what the first held message waits for, if that wait is overdue
        (see expire(); ``now=math.inf``: every wait is). False when none is."""
        sock, rdma = self._sock, self._rdma
        quiet = now - self.progress_at >= max_hold
        if rdma and rdma[0][0] > self.rdma_seen + 1 and quiet and now - rdma[0][1] >= max_hold:
            self._skip_to(rdma[0][0] - 1)
        elif rdma and rdma[0][2] > self.syncs and now - rdma[0][1] >= max_hold:
            self.syncs = rdma[0][2]
        elif (sock and sock[0][1] is None and self.rdma_seen < self.wait_for and quiet
                and now - sock[0][0] >= max_hold):
            self._skip_to(self.wait_for)
        else:
            return False
        self.forced += 1
        return True

    def flush(self) -> list[T]:
        """Everything held, in the best order known (the peer is gone or started over)."""
        out: list[T] = []
        while self._sock or self._rdma:
            if self._rdma:
                self._skip_to(self._rdma[0][0] - 1)
                self.syncs = max(self.syncs, self._rdma[0][2])
            else:
                self._skip_to(self.wait_for)
            self._drain(out)
        return out

    def _skip_to(self, index: int) -> None:
        """Give up on the RDMA messages up to ``index`` that have not arrived."""
        if index > self.rdma_seen and len(self._skipped) + index - self.rdma_seen <= self.MAX_SKIPPED:
            self._skipped.update(range(self.rdma_seen + 1, index + 1))
        self.rdma_seen = max(self.rdma_seen, index)

    def _epoch(self, epoch: int) -> tuple[list[T], bool]:
        """(released, current): a new epoch (the peer's link was made anew) flushes the
        old one's messages; one of the last few epochs is a straggler (not current)."""
        if epoch == self.epoch:
            return [], True
        if epoch in self._retired:
            return [], False
        out: list[T] = []
        if self.epoch is not None:
            out = self.flush()
            self._retired.append(self.epoch)
        self.epoch = epoch
        self._reset()
        return out, True

    def _drain(self, out: list[T]) -> list[T]:
        sock, rdma = self._sock, self._rdma
        while True:
            if rdma and rdma[0][0] == self.rdma_seen + 1 and rdma[0][2] <= self.syncs:
                index, _, _, item = rdma.pop(0)
                self.rdma_seen = index
                out.append(item)
            elif sock and (sock[0][1] is not None or self.rdma_seen >= self.wait_for):
                _, sync, item = sock.popleft()
                if sync is not None:  # every socket message before it is delivered
                    self.syncs = max(self.syncs, sync.ordinal)
                    self.wait_for = max(self.wait_for, sync.rdma_count)
                else:
                    out.append(item)  # type: ignore[arg-type]
            else:
                return out

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

Also here: the registration cache (registering memory with the NIC is slow,
so registrations of send buffers are kept, keyed by address and size, and the
least recently used unpinned one is dropped past a budget) and the pool of
staging slots that small messages are copied into.

Everything raises typed errors from :mod:`mesh.errors`; a peer that breaks
the protocol gives :class:`~mesh.errors.ProtocolError`.
"""

from __future__ import annotations

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
    "RegistrationCache",
    "RingReader",
    "RingWriter",
    "SlotPool",
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

"""Shared-memory bulk channel: large arrays between two nodes of one host.

The control link (ZeroMQ) carries only a small :class:`ShmDescriptor`; the bytes
travel through POSIX shared memory (files in ``/dev/shm``):

    sender                                       receiver
    ------                                       --------
    desc = sender.write(arr)      (one copy into a slot)
    send [header, tensor-desc, desc] on the control link  ->
                                                 view = receiver.open(desc)   (maps, zero copy)
                                                 arr = array_from_frames(tensor_desc, view.data)
                                                 ... consumer reads arr in place ...
                                                 last reference dropped (or view.release())
                                  <-  receiver.take_releases() -> [(slot, generation), ...]
    sender.on_release(pairs)      (slot reusable)

Design choices, and why:

* **One segment per slot, a pool of slots per peer pair** (the sender owns it).
  Gradients and collective chunks vary in size and are released out of order
  (a ring allreduce frees chunk 3 before chunk 1 when that is the order it
  reduced them), so a byte ring with wrap-around would fragment and stall on
  its oldest entry. A slot holds one array at a time; slots are reused best-fit
  and retired (unlinked) only to make room within the pool's byte budget. One
  pool per peer keeps a slow peer from starving the others of slots.
* **Release by an explicit message, batched**, not an atomic flag in the shared
  header: Python has no atomics or fences over shared memory, so a flag store
  could in principle become visible before the receiver's last loads of the
  slot; a message through a syscall orders everything. It also wakes a sender
  that waits (through its poller) instead of making it spin, lets the receiver
  map segments read-only (its bugs cannot scribble on the sender's data), and
  makes peer loss trivial (the sender unlinks everything; nothing to reset).
* **The release follows the numpy view's lifetime**: :meth:`ShmReceiver.open`
  builds a fresh uint8 array on a slice of the mapping and attaches a
  ``weakref.finalize`` to it. numpy makes every view derived from it (slices,
  reshapes, dtype views, ``memoryview(arr)``, ``frombuffer(arr)``) hold it
  as (or through) its base, so the finalizer runs exactly when the last one
  is gone. ``ShmView.release()`` releases early (the memory stays mapped: no
  crash, but the sender may then overwrite the slot).
* **No ``multiprocessing.shared_memory``**: on Python < 3.13 it registers every
  segment, even one it merely attaches to, with the ``resource_tracker``, which
  unlinks "leaked" segments when the *attaching* process exits (pulling the
  rug from under the sender) and prints warnings. Segments here are plain
  ``os.open`` + ``mmap`` on ``/dev/shm`` (what ``shm_open`` does on Linux), so
  their lifetime is exactly what this module says: the sender's ``close()``,
  an ``atexit`` hook, :func:`cleanup_node`, and :func:`cleanup_stale` for
  processes that died without either.
* **Space is reserved up front** (``posix_fallocate``): a full ``/dev/shm``
  (Docker's default is 64 MiB) fails the segment's creation with ENOSPC, and the
  caller falls back to the zmq path, instead of a SIGBUS when a page is first
  written.

Names are ``zmesh-<node id>-<n>``; each segment starts with a 4 KiB header
(magic, creator pid and its start time and pid namespace, slot, generation,
owner node id); the data starts page-aligned after it. ``zmesh-<node id>-0`` is
the node's :class:`Beacon`: same boot id and network namespace
(:func:`can_use_shm`) do not prove a shared /dev/shm, reading the beacon does.

Everything from the network is untrusted: a descriptor naming another node's
or a missing segment, an offset/size outside it, or a stale/duplicate
generation raises :class:`~mesh.errors.ProtocolError` (never an out-of-bounds
read). Peers with the same uid on one host are otherwise trusted (one could
truncate a segment under our mapping; such a process could equally ptrace us).
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import enum
import errno
import functools
import itertools
import math
import mmap
import os
import re
import stat
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgpack
import numpy as np

from mesh.errors import ClosedError, ConfigError, ProtocolError
from transports.base import Locality, Transport

__all__ = [
    "FULL",
    "Beacon",
    "HEADER_SIZE",
    "SHM_DIR",
    "TOO_LARGE",
    "Grant",
    "Refusal",
    "ReleaseResult",
    "ShmDescriptor",
    "ShmReceiver",
    "ShmSender",
    "ShmTransport",
    "ShmView",
    "SlotPool",
    "can_use_shm",
    "cleanup_node",
    "check_beacon",
    "cleanup_stale",
    "pack_releases",
    "segment_names",
    "shm_usable",
    "unpack_releases",
    "valid_node_id",
]

SHM_DIR = "/dev/shm"
PREFIX = "zmesh-"
PAGE = mmap.PAGESIZE
# The data starts one page in: page-aligned for every dtype and for memcpy.
HEADER_SIZE = max(4096, PAGE)

DEFAULT_MAX_BYTES = 512 << 20  # per peer pair: a few 64-256 MiB gradients in flight
DEFAULT_MAX_SLOTS = 16
DEFAULT_MIN_SLOT_BYTES = 1 << 20
# A receiver refuses to map anything larger (a hostile "segment" of a terabyte).
MAX_SEGMENT_BYTES = 1 << 40
# A segment without a valid header this old is debris of a crash mid-creation.
STALE_HEADERLESS_AGE = 60.0

FULL = "full"  # every slot busy or the budget used: wait for a release, or use zmq
TOO_LARGE = "too_large"  # can never fit this pool: use zmq
NO_SPACE = "no_space"  # /dev/shm refused the segment (ENOSPC, EMFILE...): use zmq

_NODE_ID_RE = re.compile(r"[A-Za-z0-9_]{1,64}")  # mesh ids are 16 hex digits
_NAME_RE = re.compile(r"zmesh-([A-Za-z0-9_]{1,64})-([0-9]{1,19})")
_U63 = (1 << 63) - 1

_MAGIC = b"ZMESHSHM"
_VERSION = 1
# magic, version, header size, pid, pid start time, pid namespace, capacity, slot,
# generation, owner node id
_HEADER = struct.Struct("<8sIIQQQQQQ64s")
_GEN_OFFSET = 8 + 4 + 4 + 8 * 5
_GEN = struct.Struct("<Q")
assert _HEADER.size <= HEADER_SIZE


# ============================================================================ pure core


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
    """A slot handed out by :meth:`SlotPool.acquire`.

    ``create``: the slot is new, the caller creates its segment of ``capacity``
    bytes. ``retire``: free slots dropped to make room; the caller unlinks them.
    """

    slot: int
    generation: int
    capacity: int
    create: bool = False
    retire: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """:meth:`SlotPool.acquire` could not grant: ``reason`` is :data:`FULL`
    (wait for a release or use the zmq path) or :data:`TOO_LARGE` (use zmq)."""

    reason: str


class ReleaseResult(enum.Enum):
    OK = "ok"
    STALE = "stale"  # wrong generation: duplicate, replayed or invented release
    UNKNOWN = "unknown"  # no such slot (never existed, or retired since)


@dataclasses.dataclass(slots=True)
class _Slot:
    capacity: int
    generation: int = 0  # of the latest grant; 0 = never granted
    busy: bool = False
    last_used: int = 0


class SlotPool:
    """Slot accounting for one sender -> receiver pair. Pure: no I/O, no clock.

    A slot holds one array at a time. ``acquire`` picks a free slot best-fit, or
    creates one within ``max_slots`` / ``max_bytes`` (retiring least recently used
    free slots if needed), or refuses. Each grant bumps the slot's generation;
    ``release(slot, generation)`` frees it only if that generation is the one in
    flight, so duplicate, stale or invented releases are detected.
    """

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_slots: int = DEFAULT_MAX_SLOTS,
        min_slot_bytes: int = DEFAULT_MIN_SLOT_BYTES,
    ) -> None:
        if max_slots < 1 or min_slot_bytes < 1 or max_bytes < min_slot_bytes:
            raise ConfigError(
                f"SlotPool(max_bytes={max_bytes}, max_slots={max_slots}, "
                f"min_slot_bytes={min_slot_bytes}): need max_slots >= 1 and "
                "max_bytes >= min_slot_bytes >= 1"
            )
        self.max_bytes = max_bytes
        self.max_slots = max_slots
        self.min_slot_bytes = min_slot_bytes
        self._slots: dict[int, _Slot] = {}
        self._ids = itertools.count(1)
        self._tick = 0
        self.total_bytes = 0  # capacity of every slot, busy or free

    # -- sizing -----------------------------------------------------------------
    def slot_size(self, nbytes: int) -> int:
        """Capacity of a new slot for ``nbytes``: rounded up to a sixteenth of the next
        power of two (under 12.5 % waste) and to whole pages, so similar sizes
        share slots."""
        n = max(nbytes, self.min_slot_bytes, 1)
        step = max(PAGE, 1 << max(0, (n - 1).bit_length() - 4))
        return -(-n // step) * step

    def fits(self, nbytes: int) -> bool:
        """Could ``nbytes`` ever be granted (with every slot free)?"""
        return 0 <= nbytes and self.slot_size(nbytes) <= self.max_bytes

    # -- state --------------------------------------------------------------------
    @property
    def in_use(self) -> int:
        return sum(1 for s in self._slots.values() if s.busy)

    @property
    def busy_bytes(self) -> int:
        return sum(s.capacity for s in self._slots.values() if s.busy)

    def slots(self) -> dict[int, tuple[int, int, bool]]:
        """slot id -> (capacity, generation, busy)."""
        return {i: (s.capacity, s.generation, s.busy) for i, s in self._slots.items()}

    # -- events -------------------------------------------------------------------
    def has_room(self, nbytes: int) -> bool:
        """Might :meth:`acquire` grant ``nbytes`` now: a free slot, or room for a new one.
        (A hint for waiting: acquire decides, and may still refuse.)"""
        if not self.fits(nbytes):
            return False
        if any(not s.busy for s in self._slots.values()):
            return True
        return len(self._slots) < self.max_slots and self.total_bytes + self.slot_size(nbytes) <= self.max_bytes

    def acquire(self, nbytes: int) -> Grant | Refusal:
        if nbytes < 0 or not self.fits(nbytes):
            return Refusal(TOO_LARGE)
        self._tick += 1
        size = self.slot_size(nbytes)
        free = [(s.capacity, i) for i, s in self._slots.items() if not s.busy]
        fitting = [(cap, i) for cap, i in free if cap >= nbytes]
        best = min(fitting) if fitting else None
        # A free slot not much bigger than needed: reuse it (no new memory).
        if best is not None and best[0] <= 4 * size:
            return self._grant(best[1])
        # Room for a new slot of the right size without retiring anything?
        if len(self._slots) < self.max_slots and self.total_bytes + size <= self.max_bytes:
            return self._grant(self._new(size), create=True)
        # An oversized free slot beats retiring slots to make a new one.
        if best is not None:
            return self._grant(best[1])
        # Retire free (too small) slots, least recently used first, if that makes room.
        count, total, retire = len(self._slots), self.total_bytes, []
        for i in sorted((i for _, i in free), key=lambda i: self._slots[i].last_used):
            if count < self.max_slots and total + size <= self.max_bytes:
                break
            retire.append(i)
            count -= 1
            total -= self._slots[i].capacity
        if count >= self.max_slots or total + size > self.max_bytes:
            return Refusal(FULL)
        for i in retire:
            self.total_bytes -= self._slots.pop(i).capacity
        return self._grant(self._new(size), create=True, retire=tuple(retire))

    def release(self, slot: int, generation: int) -> ReleaseResult:
        s = self._slots.get(slot)
        if s is None:
            return ReleaseResult.UNKNOWN
        if not s.busy or s.generation != generation:
            return ReleaseResult.STALE
        s.busy = False
        return ReleaseResult.OK

    def discard(self, slot: int) -> None:
        """Forget a slot whose segment could not be created or was lost."""
        s = self._slots.pop(slot, None)
        if s is not None:
            self.total_bytes -= s.capacity

    def trim(self) -> tuple[int, ...]:
        """Retire every free slot (e.g. when idle); the caller unlinks them."""
        gone = tuple(i for i, s in self._slots.items() if not s.busy)
        for i in gone:
            self.discard(i)
        return gone

    def _new(self, size: int) -> int:
        slot = next(self._ids)
        self._slots[slot] = _Slot(size)
        self.total_bytes += size
        return slot

    def _grant(self, slot: int, create: bool = False, retire: tuple[int, ...] = ()) -> Grant:
        s = self._slots[slot]
        s.generation += 1
        s.busy = True
        s.last_used = self._tick
        return Grant(slot, s.generation, s.capacity, create, retire)


# ============================================================================ wire


def _bad(what: str, reason: str = "shm_malformed") -> ProtocolError:
    return ProtocolError(
        f"shared-memory descriptor rejected: {what}; the message was dropped "
        "(the sender is buggy, hostile, or its segment is gone)",
        reason,
    )


def _uint(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= _U63:
        raise _bad(f"{what} {value!r} is not a non-negative 63-bit integer")
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class ShmDescriptor:
    """Where an array sits: goes on the control link in place of the data frame.

    ``retired``: segments the sender unlinked since its last descriptor, so the
    receiver drops their mappings (they are never named again).
    """

    segment: str
    offset: int
    nbytes: int
    slot: int
    generation: int
    retired: tuple[str, ...] = ()

    MAX_RETIRED = 256
    MAX_PACKED = 32 * 1024

    def to_wire(self) -> list:
        """A msgpack-able list, to embed in a control header."""
        return [self.segment, self.offset, self.nbytes, self.slot, self.generation,
                list(self.retired)]

    @classmethod
    def from_wire(cls, obj: Any) -> ShmDescriptor:
        """Validate types and ranges (not the segment itself: :meth:`ShmReceiver.open`)."""
        if type(obj) not in (list, tuple) or len(obj) != 6:
            raise _bad("not a [segment, offset, nbytes, slot, generation, retired] list")
        segment, offset, nbytes, slot, generation, retired = obj
        if type(segment) is not str or not _NAME_RE.fullmatch(segment):
            raise _bad(f"segment name {str(segment)[:60]!r} is not zmesh-<node id>-<n>",
                       "shm_name")
        if type(retired) not in (list, tuple) or len(retired) > cls.MAX_RETIRED:
            raise _bad("retired is not a short list")
        if not all(type(r) is str and _NAME_RE.fullmatch(r) for r in retired):
            raise _bad("retired holds something other than segment names", "shm_name")
        return cls(segment, _uint(offset, "offset"), _uint(nbytes, "nbytes"),
                   _uint(slot, "slot"), _uint(generation, "generation"), tuple(retired))

    def pack(self) -> bytes:
        """The descriptor as its own frame (msgpack)."""
        return msgpack.packb(self.to_wire(), use_bin_type=True)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> ShmDescriptor:
        if len(buf) > cls.MAX_PACKED:
            raise _bad(f"{len(buf)} bytes")
        try:
            obj = msgpack.unpackb(buf, raw=False, use_list=True)
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise _bad(f"undecodable ({type(exc).__name__})") from None
        return cls.from_wire(obj)


def pack_releases(pairs: Sequence[tuple[int, int]]) -> list:
    """A release batch as a msgpack-able list ``[[slot, generation], ...]``."""
    return [[s, g] for s, g in pairs]


def unpack_releases(obj: Any, max_len: int = 65536) -> list[tuple[int, int]]:
    if type(obj) not in (list, tuple) or len(obj) > max_len:
        raise _bad("release batch is not a list of [slot, generation]", "shm_release")
    out = []
    for item in obj:
        if type(item) not in (list, tuple) or len(item) != 2:
            raise _bad("release entry is not [slot, generation]", "shm_release")
        out.append((_uint(item[0], "slot"), _uint(item[1], "generation")))
    return out


# ============================================================================ host


def valid_node_id(node_id: Any) -> bool:
    """Can this id name segments? (Mesh ids can; use zmq for a peer whose id cannot.)"""
    return isinstance(node_id, str) and _NODE_ID_RE.fullmatch(node_id) is not None


def _check_node_id(node_id: str) -> str:
    if not valid_node_id(node_id):
        raise ConfigError(
            f"node id {node_id!r} cannot name shared-memory segments: use 1-64 letters, "
            "digits or '_' (mesh node ids are hex)"
        )
    return node_id


def _proc_start(pid: int) -> int:
    """The process's start time in clock ticks since boot (0 if unknown): tells a
    live process from a later one that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _pid_ns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


_MY_PID_NS = _pid_ns()


def _pid_gone(pid: int, start: int, pidns: int) -> bool:
    """True only when sure the creating process is dead (never guesses)."""
    if pidns != _MY_PID_NS or pid <= 0:
        return False  # another pid namespace (a container sharing /dev/shm): can't tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, another user's
    now = _proc_start(pid)
    return bool(start and now and now != start)  # pid reused by a younger process


def segment_names(node_id: str | None = None, shm_dir: str = SHM_DIR) -> list[str]:
    """Our segments in ``shm_dir`` (of one node, or of every node)."""
    try:
        entries = os.listdir(shm_dir)
    except OSError:
        return []
    out = []
    for name in entries:
        m = _NAME_RE.fullmatch(name)
        if m and (node_id is None or m.group(1) == node_id):
            out.append(name)
    return sorted(out)


def _unlink(shm_dir: str, name: str) -> bool:
    try:
        os.unlink(os.path.join(shm_dir, name))
        return True
    except OSError:  # gone already, or not a file (a directory someone made)
        return False


def cleanup_node(node_id: str, shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink every segment of ``node_id`` (after it died, or in tests).
    Receivers that mapped them keep valid memory until they unmap."""
    _check_node_id(node_id)
    return [n for n in segment_names(node_id, shm_dir) if _unlink(shm_dir, n)]


def _read_header(path: str) -> tuple | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        raw = os.pread(fd, _HEADER.size, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) < _HEADER.size:
        return None
    fields = _HEADER.unpack(raw)
    return fields if fields[0] == _MAGIC else None


def cleanup_stale(shm_dir: str = SHM_DIR, now: float | None = None) -> list[str]:
    """Unlink segments whose creating process is dead (call on node start).

    The creator's pid, its start time and pid namespace are in each header; a
    segment is removed only when that process surely no longer exists. Headerless
    segments (a crash during creation) go once older than a minute."""
    now = time.time() if now is None else now
    removed = []
    for name in segment_names(None, shm_dir):
        path = os.path.join(shm_dir, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue  # never ours: leave symlinks, directories and FIFOs alone
        header = _read_header(path)
        if header is None:
            if now - st.st_ctime > STALE_HEADERLESS_AGE and _unlink(shm_dir, name):
                removed.append(name)
            continue
        _, _, _, pid, start, pidns, *_ = header
        if _pid_gone(pid, start, pidns) and _unlink(shm_dir, name):
            removed.append(name)
    return removed


@functools.lru_cache(maxsize=8)
def shm_usable(shm_dir: str = SHM_DIR) -> bool:
    """Can this process create, size and map a segment in ``shm_dir``? (A real probe,
    cached: a read-only or missing /dev/shm, or no room for one page, says no.)"""
    if not os.path.isdir(shm_dir):
        return False
    name = f"{PREFIX}probe_{os.getpid()}-{time.monotonic_ns() % 10**12}"
    path = os.path.join(shm_dir, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError:
        return False
    try:
        _reserve(fd, PAGE)
        with mmap.mmap(fd, PAGE) as mm:
            mm[0:4] = b"ping"
            return mm[0:4] == b"ping"
    except OSError:
        return False
    finally:
        os.close(fd)
        _unlink(shm_dir, name)


def can_use_shm(local: Locality, peer: Locality, shm_dir: str = SHM_DIR) -> bool:
    """Two nodes may try shared memory: same boot and network namespace, and a
    usable ``shm_dir`` here. Necessary, not sufficient: containers can share a
    network namespace but not /dev/shm, so confirm with the peer's
    :class:`Beacon` (:func:`check_beacon`) before sending through it."""
    return local.host == peer.host and shm_usable(shm_dir)


class ShmTransport(Transport):
    """The shm bulk channel as a transport plugin, for the brochure of what a node
    has. It binds nothing: arrays still need a zmq control link to the peer."""

    name = "shm"
    rank = 10

    def available(self) -> bool:
        return shm_usable()

    def can_reach(self, local: Locality, peer: Locality) -> bool:
        return can_use_shm(local, peer)

    def pick_endpoint(self, endpoints: Sequence[str], local: Locality,
                      peer: Locality) -> str | None:
        return None  # never a control link


def _reserve(fd: int, size: int) -> None:
    """Size the file and allocate its pages now: ENOSPC here, never SIGBUS later."""
    os.ftruncate(fd, size)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise


# ============================================================================ sender

# Process-wide: names stay unique across a node's pools. 0 is the node's Beacon.
_names = itertools.count(1)
_live_senders: weakref.WeakSet[ShmSender] = weakref.WeakSet()


class _Segment:
    """One slot's segment, mapped read-write by its sender."""

    __slots__ = ("name", "path", "mm", "view", "capacity")

    def __init__(self, shm_dir: str, node_id: str, slot: int, capacity: int,
                 number: int | None = None) -> None:
        size = HEADER_SIZE + capacity
        while True:
            self.name = f"{PREFIX}{node_id}-{next(_names) if number is None else number}"
            self.path = os.path.join(shm_dir, self.name)
            try:
                fd = os.open(
                    self.path,
                    os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
                break
            except FileExistsError:
                if number is not None:
                    raise
                continue  # debris of an earlier process with the same node id
        try:
            _reserve(fd, size)
            # MAP_POPULATE: fault the pages in now rather than on the first write.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self.mm = mmap.mmap(fd, size, flags=flags)
        except BaseException:
            _unlink(shm_dir, self.name)
            raise
        finally:
            os.close(fd)
        self.capacity = capacity
        _HEADER.pack_into(
            self.mm, 0, _MAGIC, _VERSION, HEADER_SIZE, os.getpid(), _proc_start(os.getpid()),
            _MY_PID_NS, capacity, slot, 0, node_id.encode(),
        )
        self.view = memoryview(self.mm)

    def set_generation(self, generation: int) -> None:
        _GEN.pack_into(self.mm, _GEN_OFFSET, generation)

    def destroy(self, unlink: bool) -> None:
        if unlink:
            _unlink(os.path.dirname(self.path), self.name)
        try:
            self.view.release()
            self.mm.close()
        except BufferError:
            pass  # a reserve()/write() view is still alive: unmapped when it dies


class ShmSender:
    """The sending end of one peer pair: a pool of slots in shared memory.

    Thread-safe: ``write``/``reserve`` from any thread, ``on_release`` from the I/O
    thread. ``write`` copies once (into the slot); the caller's array is free to
    change as soon as it returns.
    """

    def __init__(
        self,
        node_id: str,
        *,
        max_bytes: int | None = None,
        max_slots: int = DEFAULT_MAX_SLOTS,
        min_slot_bytes: int = DEFAULT_MIN_SLOT_BYTES,
        shm_dir: str = SHM_DIR,
    ) -> None:
        self.node_id = _check_node_id(node_id)
        self.shm_dir = shm_dir
        if max_bytes is None:
            max_bytes = _default_budget(shm_dir, min_slot_bytes)
        self._pool = SlotPool(max_bytes, max_slots, min_slot_bytes)
        self._segments: dict[int, _Segment] = {}
        self._retired: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._pid = os.getpid()  # a forked child must not unlink its parent's segments
        self.refused: collections.Counter[str] = collections.Counter()
        self.writes = 0
        self.bytes_written = 0
        _live_senders.add(self)

    # -- sending -------------------------------------------------------------------
    def fits(self, nbytes: int) -> bool:
        """Could an array of ``nbytes`` ever go through this pool? (If not, use zmq.)"""
        return self._pool.fits(nbytes)

    def wait_for_room(self, nbytes: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until the pool may have a slot for ``nbytes``
        (the peer releases slots as it consumes). Lets a caller wait before taking
        its own locks; :meth:`write` still decides."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while not self._closed and not self._pool.has_room(nbytes):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return not self._closed

    def reserve(
        self, nbytes: int, timeout: float = 0.0
    ) -> tuple[ShmDescriptor, np.ndarray] | None:
        """A slot for ``nbytes``: (descriptor, writable uint8 view of the slot) to
        fill in place, e.g. as a reduction's output; then send the descriptor, or
        :meth:`abort` it. ``None`` when the pool is full after ``timeout`` seconds,
        the array can never fit, or /dev/shm has no room: use the zmq path."""
        with self._cond:
            grant = self._acquire(nbytes, timeout)
            if grant is None:
                return None
            seg = self._segments[grant.slot]
            retired, self._retired = tuple(self._retired), []
            buf = np.frombuffer(seg.view, np.uint8, nbytes, HEADER_SIZE)
        desc = ShmDescriptor(seg.name, HEADER_SIZE, nbytes, grant.slot, grant.generation, retired)
        return desc, buf

    def write(self, arr: np.ndarray, timeout: float = 0.0) -> ShmDescriptor | None:
        """Copy ``arr`` (any strides) into a slot, C order; return its descriptor.

        ``None`` means use the zmq path: the pool stayed full for ``timeout``
        seconds (``refused["full"]``), the array is larger than the pool can ever
        hold (``"too_large"``), or /dev/shm refused a segment (``"no_space"``)."""
        if not isinstance(arr, np.ndarray):
            arr = np.asarray(arr)
        if arr.dtype.hasobject:
            raise ConfigError("an object array cannot go through shared memory; pickle it")
        got = self.reserve(arr.nbytes, timeout)
        if got is None:
            return None
        desc, buf = got
        try:
            np.copyto(np.ndarray(arr.shape, arr.dtype, buffer=buf), arr, casting="no")
        except BaseException:
            self.abort(desc)
            raise
        self.writes += 1
        self.bytes_written += arr.nbytes
        return desc

    def abort(self, desc: ShmDescriptor) -> None:
        """The descriptor never reached the peer (send failed): free its slot."""
        with self._cond:
            if self._pool.release(desc.slot, desc.generation) is ReleaseResult.OK:
                self._retired[:0] = desc.retired  # still to be announced
                self._cond.notify_all()

    def on_release(self, pairs: Iterable[tuple[int, int]]) -> int:
        """Apply a release batch from the peer; returns how many slots it freed.
        Raises ProtocolError (``shm_release``) after applying the valid ones if
        any entry is stale, duplicate or unknown."""
        freed, bad = 0, []
        with self._cond:
            for slot, generation in pairs:
                result = self._pool.release(slot, generation)
                if result is ReleaseResult.OK:
                    freed += 1
                else:
                    bad.append((slot, generation, result.value))
            if freed:
                self._cond.notify_all()
        if bad:
            raise ProtocolError(
                f"shared-memory release of {len(bad)} slot(s) rejected, e.g. slot "
                f"{bad[0][0]} generation {bad[0][1]} ({bad[0][2]}): duplicate or stale; ignored",
                "shm_release",
            )
        return freed

    def _acquire(self, nbytes: int, timeout: float) -> Grant | None:
        """Called with the lock held; waits (releasing it) while the pool is full."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            if self._closed:
                raise ClosedError("shared-memory sender is closed")
            result = self._pool.acquire(nbytes)
            if isinstance(result, Grant):
                break
            remaining = deadline - time.monotonic()
            if result.reason == TOO_LARGE or remaining <= 0:
                self.refused[result.reason] += 1
                return None
            self._cond.wait(remaining)
        grant = result
        for slot in grant.retire:
            seg = self._segments.pop(slot)
            seg.destroy(unlink=True)
            self._retired.append(seg.name)
        if grant.create:
            try:
                self._segments[grant.slot] = _Segment(
                    self.shm_dir, self.node_id, grant.slot, grant.capacity
                )
            except OSError:
                self._pool.discard(grant.slot)
                self.refused[NO_SPACE] += 1
                return None
        self._segments[grant.slot].set_generation(grant.generation)
        return grant

    # -- state -----------------------------------------------------------------------
    @property
    def in_use(self) -> int:
        with self._cond:
            return self._pool.in_use

    def names(self) -> list[str]:
        with self._cond:
            return sorted(seg.name for seg in self._segments.values())

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "slots": len(self._segments),
                "in_use": self._pool.in_use,
                "bytes": self._pool.total_bytes,
                "max_bytes": self._pool.max_bytes,
                "writes": self.writes,
                "bytes_written": self.bytes_written,
                "refused": dict(self.refused),
            }

    def trim(self) -> int:
        """Unlink every free slot's segment (memory back to the system when idle)."""
        with self._cond:
            gone = self._pool.trim()
            for slot in gone:
                seg = self._segments.pop(slot)
                seg.destroy(unlink=True)
                self._retired.append(seg.name)
            return len(gone)

    def close(self) -> None:
        """Unlink every segment (peer lost, or node closing). Receivers keep valid
        memory until they unmap. Idempotent; waiting writers get ClosedError."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            owner = os.getpid() == self._pid
            for seg in self._segments.values():
                seg.destroy(unlink=owner)
            self._segments.clear()
            self._cond.notify_all()
        _live_senders.discard(self)

    def __enter__(self) -> ShmSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _default_budget(shm_dir: str, min_slot_bytes: int) -> int:
    """DEFAULT_MAX_BYTES, or a quarter of /dev/shm's free space if that is less."""
    try:
        st = os.statvfs(shm_dir)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = DEFAULT_MAX_BYTES
    return max(min_slot_bytes, min(DEFAULT_MAX_BYTES, free // 4))


@atexit.register
def _close_all_senders() -> None:
    for sender in list(_live_senders):
        try:
            sender.close()
        except Exception:
            pass


# ============================================================================ beacon

_TOKEN_BYTES = 16


class Beacon:
    """A one-page segment (``zmesh-<node id>-0``) holding a random token.

    Same boot id and network namespace do not imply the same /dev/shm (two
    containers can share a network namespace but not their IPC mounts). A node
    advertises ``(name, token)`` in its hello; a peer that reads the token back
    with :func:`check_beacon` sees our segments and may receive arrays through
    them, and says so; only then do we send to it through shared memory.
    """

    def __init__(self, node_id: str, shm_dir: str = SHM_DIR) -> None:
        _check_node_id(node_id)
        self._segment = _Segment(shm_dir, node_id, 0, PAGE, number=0)
        self.token = os.urandom(_TOKEN_BYTES).hex()
        self._segment.mm[HEADER_SIZE : HEADER_SIZE + _TOKEN_BYTES] = bytes.fromhex(self.token)
        self.name = self._segment.name
        self._pid = os.getpid()
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._segment.destroy(unlink=os.getpid() == self._pid)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def check_beacon(peer_id: Any, name: Any, token: Any, shm_dir: str = SHM_DIR) -> bool:
    """Can we read ``peer_id``'s beacon? (Untrusted input: any failure is "no".)"""
    if not (valid_node_id(peer_id) and type(name) is str and type(token) is str
            and name == f"{PREFIX}{peer_id}-0" and len(token) == 2 * _TOKEN_BYTES):
        return False
    try:
        want = bytes.fromhex(token)
        fd = os.open(os.path.join(shm_dir, name),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except (ValueError, OSError):
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        header = os.pread(fd, _HEADER.size, 0)
        got = os.pread(fd, _TOKEN_BYTES, HEADER_SIZE)
    except OSError:
        return False
    finally:
        os.close(fd)
    if len(header) < _HEADER.size:
        return False
    fields = _HEADER.unpack(header)
    return fields[0] == _MAGIC and fields[9].rstrip(b"\0") == peer_id.encode() and got == want


# ============================================================================ receiver


class _Mapping:
    """A peer's segment mapped read-only here."""

    __slots__ = ("mm", "view", "size", "capacity", "slot", "last_generation")

    def __init__(self, mm: mmap.mmap, size: int, capacity: int, slot: int) -> None:
        self.mm = mm
        self.view = memoryview(mm)
        self.size = size
        self.capacity = capacity
        self.slot = slot
        self.last_generation = 0

    def unmap(self) -> None:
        try:
            self.view.release()
            self.mm.close()
        except BufferError:
            pass  # views still alive: the kernel unmaps when the last one goes


class _Sink:
    """Where finalizers put releases: lock-free (a deque), since a finalizer may run
    in any thread, even inside the garbage collector while that thread holds a lock."""

    __slots__ = ("pending", "notify", "closed")

    def __init__(self, notify: Callable[[], None] | None) -> None:
        self.pending: collections.deque[tuple[int, int]] = collections.deque()
        self.notify = notify
        self.closed = False

    def release(self, slot: int, generation: int) -> None:
        if self.closed:
            return  # the peer is gone; its slots went with it
        self.pending.append((slot, generation))
        if self.notify is not None and len(self.pending) == 1:
            try:
                self.notify()
            except Exception:
                pass  # must never raise into whoever dropped the last reference


class ShmView:
    """A received array's bytes in the peer's segment, zero copy, read-only.

    The slot is released when the last numpy view derived from ``data`` is gone,
    or at :meth:`release` (early: the memory stays mapped, but the sender may
    then overwrite it)."""

    __slots__ = ("data", "descriptor", "_finalizer", "__weakref__")

    def __init__(self, data: np.ndarray, descriptor: ShmDescriptor,
                 finalizer: weakref.finalize) -> None:
        self.data = data
        self.descriptor = descriptor
        self._finalizer = finalizer

    def array(self, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        """``data`` as ``dtype``/``shape`` (sizes checked); the node uses
        mesh.tensor.array_from_frames(descriptor frame, view.data) instead."""
        dt = np.dtype(dtype)
        count = math.prod(shape)
        if count * dt.itemsize != self.data.nbytes:
            raise _bad(f"shape {shape} of {dt.str} needs {count * dt.itemsize} bytes, "
                       f"the slot holds {self.data.nbytes}", "size_mismatch")
        return self.data.view(dt).reshape(shape)

    @property
    def released(self) -> bool:
        return not self._finalizer.alive

    def release(self) -> None:
        """Release the slot now (idempotent)."""
        self._finalizer()


class ShmReceiver:
    """The receiving end of one peer pair: maps the peer's segments (cached per
    name) and hands out zero-copy read-only views.

    ``notify`` is called (from whatever thread drops a view's last reference,
    possibly inside the garbage collector) when a release batch becomes non-empty:
    it must not block or take a lock the dropping thread might hold; the node's
    I/O thread then sends :meth:`take_releases` to the peer.
    """

    def __init__(
        self,
        peer_id: str,
        *,
        notify: Callable[[], None] | None = None,
        shm_dir: str = SHM_DIR,
        max_mappings: int = 64,
    ) -> None:
        self.peer_id = _check_node_id(peer_id)
        self.shm_dir = shm_dir
        self.max_mappings = max_mappings
        self._name_re = re.compile(rf"zmesh-{re.escape(peer_id)}-[0-9]{{1,19}}")
        self._maps: collections.OrderedDict[str, _Mapping] = collections.OrderedDict()
        self._sink = _Sink(notify)
        self._fins: list[weakref.finalize] = []  # of views handed out, pruned on open
        self._lock = threading.Lock()
        self._closed = False

    def open(self, desc: ShmDescriptor | Any) -> ShmView:
        """Validate ``desc`` against the segment and return a view on its bytes.

        Raises ProtocolError: ``shm_name`` (not this peer's segment), ``shm_missing``
        (no such segment), ``shm_header`` (not a segment of ours), ``shm_bounds``
        (offset/nbytes outside it), ``shm_generation`` (stale or duplicate)."""
        if not isinstance(desc, ShmDescriptor):
            desc = ShmDescriptor.from_wire(desc)
        with self._lock:
            if self._closed:
                raise ClosedError(f"shared-memory receiver for peer {self.peer_id} is closed")
            for name in desc.retired:
                m = self._maps.pop(name, None)
                if m is not None:
                    m.unmap()
            m = self._mapping(desc.segment)
            end = desc.offset + desc.nbytes
            if desc.offset < HEADER_SIZE or end > HEADER_SIZE + m.capacity or end > m.size:
                raise _bad(f"bytes [{desc.offset}, {end}) lie outside segment {desc.segment} "
                           f"(data [{HEADER_SIZE}, {HEADER_SIZE + m.capacity}))", "shm_bounds")
            if desc.slot != m.slot:
                raise _bad(f"slot {desc.slot} but segment {desc.segment} holds slot {m.slot}",
                           "shm_header")
            current = _GEN.unpack_from(m.mm, _GEN_OFFSET)[0]
            if desc.generation != current or desc.generation <= m.last_generation:
                raise _bad(
                    f"generation {desc.generation} of {desc.segment} is stale or a duplicate "
                    f"(segment at {current}, last seen {m.last_generation})", "shm_generation")
            m.last_generation = desc.generation
            mv = m.view[desc.offset : end]
        data = np.frombuffer(mv, np.uint8)
        # numpy collapses a view's base to the first array whose own base is not an
        # array: ``data`` here. So every derived view (slices, reshapes, dtype views,
        # subclasses, memoryview(arr), frombuffer(arr)) keeps ``data`` alive and the
        # finalizer runs exactly when the last of them is gone. (Not on ``mv``:
        # numpy keeps its own memoryview, not ``mv``.)
        fin = weakref.finalize(data, self._sink.release, desc.slot, desc.generation)
        fin.atexit = False
        with self._lock:
            self._fins = [f for f in self._fins if f.alive]
            self._fins.append(fin)
        return ShmView(data, desc, fin)

    def _mapping(self, name: str) -> _Mapping:
        m = self._maps.get(name)
        if m is not None:
            self._maps.move_to_end(name)
            return m
        if not self._name_re.fullmatch(name):
            raise _bad(f"segment {name[:60]!r} does not belong to peer {self.peer_id}",
                       "shm_name")
        path = os.path.join(self.shm_dir, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise _bad(f"cannot open segment {name}: {exc.strerror}", "shm_missing") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or not HEADER_SIZE <= st.st_size <= MAX_SEGMENT_BYTES:
                raise _bad(f"{name} is not a segment ({st.st_size} bytes)", "shm_header")
            mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except OSError as exc:
            raise _bad(f"cannot map segment {name}: {exc}", "shm_missing") from None
        finally:
            os.close(fd)
        magic, version, header_size, _pid, _start, _ns, capacity, slot, _gen, owner = (
            _HEADER.unpack_from(mm, 0)
        )
        if (magic != _MAGIC or version != _VERSION or header_size != HEADER_SIZE
                or owner.rstrip(b"\0") != self.peer_id.encode()
                or HEADER_SIZE + capacity > st.st_size):
            mm.close()
            raise _bad(f"{name} has no valid zmesh segment header", "shm_header")
        m = _Mapping(mm, st.st_size, capacity, slot)
        self._maps[name] = m
        while len(self._maps) > self.max_mappings:
            self._maps.popitem(last=False)[1].unmap()
        return m

    def take_releases(self) -> list[tuple[int, int]]:
        """Drain the (slot, generation) pairs released since the last call."""
        out = []
        pending = self._sink.pending
        while True:
            try:
                out.append(pending.popleft())
            except IndexError:
                return out

    @property
    def live_views(self) -> int:
        """Views handed out and not yet released."""
        with self._lock:
            return sum(1 for f in self._fins if f.alive)

    def mapped(self) -> list[str]:
        with self._lock:
            return list(self._maps)

    def close(self) -> None:
        """Peer lost or node closing: unmap every segment not in use (the rest go
        with their last view) and drop pending and future releases."""
        with self._lock:
            self._closed = True
            self._sink.closed = True
            self._sink.pending.clear()
            for m in self._maps.values():
                m.unmap()
            self._maps.clear()

    def __enter__(self) -> ShmReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Groups: rendezvous by name, then collectives over point-to-point channels.

The I/O half of the collectives. The pure half (who sends which slice to whom,
how partial results combine) lives in :mod:`.schedule` and :mod:`.reduce`;
this module carries out those plans over a node's channel
(:mod:`mesh.channels`) and handles rendezvous, incarnations and faults.

Using it (API.md, "Collectives")::

    group = node.group("trainers", size=4, timeout=30.0)
    group.rank, group.size, group.members          # members: list[Member], rank order
    out = group.allreduce(grad, op="sum", algorithm="auto")   # "direct" | "tree" | "ring" | "auto"
    params = group.broadcast(params, root=0)       # in place on non-roots, returned
    parts = group.allgather(x)                     # list of arrays, one per rank
    mine = group.reduce_scatter(x, op="sum")       # this rank's chunk, 1-D
    group.barrier()
    avg = group.gossip_average(x, rounds=None)     # push-sum, no global step
    group.stats()                                  # per-peer wait time, bytes, ops
    group.reform()                                 # after PeerLostError: survivors only

Every member must call the same collectives in the same order (as with MPI
or torch.distributed); one collective at a time per group object.

Rendezvous (no master, no server)
---------------------------------
Each member subscribes to ``_mesh.group.<name>`` and publishes a *hello*
(node id and name, a fresh random token, the requested size) there, often
at first and then every 0.25 s, until the group has formed. When a member
sees exactly ``size`` hellos from live nodes it computes the incarnation id
``sha1(name, generation, sorted (node id, token))`` and sends a *join*
carrying it over the group's channel to every other member; it is done when
it holds a join with the same id from all of them. A join from a member
proves that member saw every hello, so no one still needs ours: nobody
waits on a member that already left the rendezvous. Ranks are the members
sorted by ``(node name, node id)``: deterministic and identical everywhere.

Incarnations
------------
Every data message is tagged ``(incarnation, op sequence number, phase,
step, segment)`` on the channel named after the group, so messages of an
old incarnation (a segment still in flight when a member died, a straggler
that wakes up late) never match a receive of the new one; they are dropped
from the mailbox when an incarnation starts. Two groups of different names
use different channels and subjects and coexist on the same nodes.

Data path
---------
``allreduce`` copies the input once into a flat accumulator
(:func:`.reduce.accumulator`: the one copy, which also makes non-contiguous
input contiguous; the caller's array is never modified), sends slices of it
as zero-copy frames, reduces each received frame (a numpy view on the
message) into its slice with one ufunc call (``out=``), and returns the
accumulator reshaped. Sends are posted as early as the plan allows (each as
soon as the receive it depends on has been reduced), so with segments one
is on the wire while the next is being reduced. Before a slice that may
still be in flight is overwritten, and before a buffer goes back to the
caller, its zmq trackers are awaited. The direct plan goes in segments too
(each rank reduces segment ``k`` while ``k + 1`` is on the wire), and no
message is larger than a segment: ZeroMQ receives each message into an
allocation of its own, which :func:`_keep_receive_buffers` lets glibc reuse
instead of page-faulting fresh memory in for every segment. Broadcast and
allgather take one step up to :data:`.schedule.DIRECT_MAX_GROUP` ranks (the
root, or every rank, sends to each other rank itself); an allgather part of
up to :data:`.schedule.ALLGATHER_CARRY_BYTES` rides with the shape exchange.

Between members linked over tcp (other hosts, or ``shm=False``), segments of
at least the node's ``tcp_bulk_threshold`` go over a plain TCP stream per pair
instead (mesh/engine/bulk_tcp.py), agreed by both ends when the group forms;
every segment does, however small (:meth:`Group._stream_min`: the caller
writes a small one itself, and the peer's one stream receiver thread hands it
over, one wake-up instead of ZeroMQ's three). In such a group of 3 or more,
``auto`` takes the ring right after the direct plan (the tree's root carries
twice the array each way, the ring's links 2 (n - 1) / n of it) and a
broadcast of 32 MiB or more goes down a chain (each link carries it once);
see :data:`.schedule.TCP_BROADCAST_CHAIN_BYTES`. When the members are on more
than one host (each tells the others its host at formation), a broadcast of 3
or more never takes the direct plan (its root would send the array to every
rank: the wire binds there): the tree below 16 MiB, the chain from there
(:func:`.schedule.broadcast_algorithm_over_tcp`). A rank that forwards a
broadcast posts its receive with a *relay*: the stream's receiver thread
hands every piece that arrives to the next streams' sender threads (cut-
through, 64 KiB pieces), so a tree or chain goes as one message per link,
pipelined by the streams, without waking the forwarding rank's caller.
Its receives are posted ahead, up to ``_POST_AHEAD`` of them, straight into
their slice of the result as soon as :func:`.schedule.post_guards` says
nothing needs the slice's old content: a copying one (allgather half of the
ring, broadcast, allgather) is written there; a reducing one is reduced
there by the stream's receiver thread, 512 KiB at a time as the bytes
arrive, while they are still in that core's cache (``fold``); one that
cannot be posted yet lands in a reusable scratch segment
(``_SCRATCH_SEGMENTS``) this thread reduces from. So the wire and the
reduction overlap and no received byte is copied twice. A rank with nothing
else to do (a broadcast's root; a rank of 2 that only copies, once all its
receives are posted) writes its segments into the streams itself.

Faults
------
Every wait is bounded by the group timeout. A member whose node is declared
dead or left (heartbeats; ``peer_timeout``, 3 s by default) makes every
waiting member raise :class:`mesh.PeerLostError` naming it at once; the
first to notice also publishes an *abort* on the group subject so the others
wake at once. A member that is alive but stops participating is found by
timeout: a rank that waited ``timeout - grace`` publishes a *suspect*
notice (who it waits on); at ``timeout`` it follows the chain of notices to
the member that waits on nobody, names it, and publishes the abort. After a
PeerLostError the group refuses further collectives until ``reform()``,
which runs the rendezvous again among the survivors (generation = the old
incarnation) and gives new ranks and a new incarnation. Any other error in a
collective on one rank (a shape mismatch, say) aborts that collective on
every other rank with :class:`CollectiveAborted` (a :class:`mesh.MeshError`)
saying which rank failed and why; the group stays usable.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Hashable
from functools import lru_cache
from typing import Any, NamedTuple

import msgpack
import numpy as np

from mesh.collectives import reduce as red
from mesh.collectives import schedule as sch
from mesh.errors import (
    BulkLinkError,
    CollectiveAborted,
    ConfigError,
    MeshError,
    PeerLostError,
    TimeoutError,
)
from mesh.subjects import validate_subject

log = logging.getLogger("mesh.collectives")

SUBJECT_PREFIX = "_mesh.group."
# How often a blocked wait looks for abort notices and lost members.
POLL_INTERVAL = 0.1
# Hello period during rendezvous: starts fast, backs off to this.
ANNOUNCE_MAX_INTERVAL = 0.25
# Hellos, joins and aborts are tiny; aborts/suspects older than this many ops are pruned.
_KEEP_NOTICES = 64
# Bulk tcp receives posted ahead of the one being consumed, and scratch segments
# for those that reduce (each one segment: 4 MiB by default).
_POST_AHEAD = 8
# A broken bulk stream from a member that forwards (relays) a broadcast: how long a
# rank waits for another to name the culprit before it blames that member (_recv_bulk).
_BLAME_GRACE = 1.0
# Marks the host entry at the end of a member's stream list at formation (_agree_streams).
_HOST_MARK = "host:"
_SCRATCH_SEGMENTS = 4
# Group formation waits at most this long for the bulk streams to its members to
# connect (or fall back), so that both sides of a pair pick the same path.
_SETTLE = 8.0
# close() waits at most this long (or the group timeout) for the others to close too.
CLOSE_WAIT = 5.0


class Member(NamedTuple):
    """One member of a group, as ``group.members`` lists them (in rank order)."""

    rank: int
    id: str  # node id
    name: str  # node name


class _Compiled(NamedTuple):
    """A plan plus what the executor needs precomputed."""

    plan: tuple[sch.Transfer, ...]
    initial: tuple[sch.Transfer, ...]  # sends that carry the rank's own input
    deps: tuple[tuple[sch.Transfer, ...], ...]  # deps[i]: sends to post after receive i
    recvs: tuple[int, ...]  # indices of the transfers that receive, in plan order
    guards: dict[int, sch.PostGuard]  # when a receive may be posted ahead into its slice
    max_recv: int  # elements of the largest received slice


@lru_cache(maxsize=256)
def _compiled(kind: str, n: int, rank: int, size: int, seg: int, extra: Any = None) -> _Compiled:
    if kind == "ring":
        plan = sch.ring_allreduce_plan(n, rank, size, seg)
    elif kind == "direct":
        plan = sch.direct_allreduce_plan(n, rank, size, seg or None)
    elif kind == "tree":
        plan = sch.tree_allreduce_plan(n, rank, size, 0, seg)
    elif kind == "reduce_scatter":
        plan = sch.reduce_scatter_plan(n, rank, size, seg)
    elif kind == "broadcast":
        plan = sch.broadcast_plan(n, rank, size, extra, seg)
    elif kind == "allgather":
        plan = sch.allgather_plan(list(extra), rank, seg)
    elif kind == "broadcast_direct":
        plan = sch.direct_broadcast_plan(n, rank, size, extra, seg)
    elif kind == "broadcast_chain":
        plan = sch.chain_broadcast_plan(n, rank, size, extra, seg)
    elif kind == "allgather_direct":
        plan = sch.direct_allgather_plan(list(extra), rank, seg)
    else:  # pragma: no cover - internal
        raise ValueError(kind)
    deps: list[list[sch.Transfer]] = [[] for _ in plan]
    initial = []
    for t in plan:
        if t.send is None:
            continue
        if t.send_after is None:
            initial.append(t)
        else:
            deps[t.send_after].append(t)
    recvs = tuple(t.index for t in plan if t.recv is not None)
    max_recv = max((t.recv[1] - t.recv[0] for t in plan if t.recv is not None), default=0)
    return _Compiled(tuple(plan), tuple(initial), tuple(tuple(d) for d in deps), recvs,
                     sch.post_guards(plan), max_recv)


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"group name must be a non-empty string, got {name!r}")
    validate_subject(SUBJECT_PREFIX + name, allow_reserved=True)
    return name


_MALLOC_TUNED = False
# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _unfit_out(out: Any, shape: tuple, dtype: Any) -> str | None:
    """None when ``out`` can take a result of ``shape`` and ``dtype`` in place (a
    writable C-contiguous numpy array of exactly those), else what it is instead."""
    if (isinstance(out, np.ndarray) and out.shape == shape and out.dtype == dtype
            and out.flags.c_contiguous and out.flags.writeable):
        return None
    if not isinstance(out, np.ndarray):
        return type(out).__name__
    return f"{out.dtype} {out.shape}{'' if out.flags.c_contiguous else ' strided'}"


def _keep_receive_buffers() -> None:
    """Let glibc reuse the memory of received messages instead of returning it.

    ZeroMQ allocates every large received message itself (malloc on its I/O
    thread) and the collectives free it once reduced. With glibc's dynamic
    defaults the freed segments go back to the kernel (trimmed heap tops,
    munmap above the mmap threshold), so every next segment is page-faulted
    in again: thousands of faults per allreduce, 15-30 % of a 64 MiB tcp
    allreduce here. Raising the trim threshold keeps up to 256 MiB of freed
    heap for reuse; allocations of 32 MiB and more still get their own
    mappings. It changes the whole process's allocator, so it is opt-in:
    ``ZMESH_MALLOPT=1`` (once per process, glibc only, and never over the user's
    own ``MALLOC_TRIM_THRESHOLD_``/``MALLOC_MMAP_THRESHOLD_``).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    import os
    import sys

    env = os.environ
    if (sys.platform != "linux" or env.get("ZMESH_MALLOPT", "0") != "1"
            or "MALLOC_TRIM_THRESHOLD_" in env or "MALLOC_MMAP_THRESHOLD_" in env):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
            return  # not glibc (musl has no such knobs)
        # An explicit mmap threshold also turns off glibc's dynamic one: set both.
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        pass


class _StreamMessage(NamedTuple):
    """An arrival of the bulk tcp stream, shaped like a channel message."""

    meta: Any
    data: memoryview
    array: None = None


class _PeerStats:
    __slots__ = ("wait_s", "max_wait_s", "bytes_in", "bytes_out", "msgs_in", "msgs_out")

    def __init__(self) -> None:
        self.wait_s = 0.0
        self.max_wait_s = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.msgs_in = 0
        self.msgs_out = 0


class Group:
    """A named set of nodes that run collectives together. See the module docstring.

    Created by ``node.group(name, size, timeout)``; blocks until the group has
    formed (``mesh.TimeoutError`` otherwise). Options: ``direct_bytes``
    (below it ``algorithm="auto"`` takes the direct plan; default
    :func:`.schedule.direct_bytes_for` of the group size), ``crossover_bytes``
    (below it, and from ``direct_bytes`` on, ``auto`` takes the tree, from it
    on the ring; default :func:`.schedule.crossover_bytes_for` of the group
    size), both measured by ``bench/collectives.py``, and ``segment_bytes``
    (pipelining segment, default :data:`.schedule.DEFAULT_SEGMENT_BYTES`).
    Every member must pass the same options (``auto`` must pick the same plan
    everywhere).
    """

    def __init__(
        self,
        node: Any,
        name: str,
        size: int,
        timeout: float = 30.0,
        *,
        crossover_bytes: int | None = None,
        segment_bytes: int | None = None,
        direct_bytes: int | None = None,
    ) -> None:
        self.node = node
        self.name = _check_name(name)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"group size must be an integer >= 1, got {size!r}")
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"group timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.crossover_bytes = None if crossover_bytes is None else int(crossover_bytes)
        self.segment_bytes = (
            sch.DEFAULT_SEGMENT_BYTES if segment_bytes is None else int(segment_bytes)
        )
        self.direct_bytes = None if direct_bytes is None else int(direct_bytes)
        if self.segment_bytes < 1 or min(self.crossover_bytes or 0, self.direct_bytes or 0) < 0:
            raise ConfigError(
                "segment_bytes must be >= 1, crossover_bytes and direct_bytes >= 0"
            )
        self._subject = SUBJECT_PREFIX + self.name
        # Slices below the node's shm (and RDMA, if it has it) thresholds travel as
        # raw bytes (header and data: two frames) instead of a tensor (header,
        # descriptor, data): each frame is a zmq send that drops and retakes the
        # GIL, 10-40 us when the node's I/O thread is busy with the peer's message
        # meanwhile. The receiver knows dtype and length from the plan (_array_of).
        opts = getattr(node, "options", {})
        self._raw_below = opts.get("shm_threshold", 1 << 20)
        bulk = getattr(node, "_bulk_named", {})
        self._tcp = bulk.get("tcpbulk") if getattr(bulk.get("tcpbulk"), "endpoint", None) else None
        self._tcp_min = opts.get("tcp_bulk_threshold", 256 << 10)
        self._small_stream = "all"  # see _stream_min ("pairs": the 2-rank rule; "": off)
        self._inline_sends = True  # see _execute
        self._lean = True  # whole-buffer broadcasts on streams: _whole_on_streams
        self._bcast_plans: dict[tuple, tuple] = {}  # see broadcast
        self._bcast_algo = ""  # (measurements: force "direct", "chain" or "tree" over tcp)
        self._bcast_seg = 0  # (measurements: force the broadcast's segment, bytes)
        self._fold = True  # reducing receives on a stream: reduced as they arrive (_execute)
        self._relay = True  # copies forwarded stream to stream as they arrive (_execute)
        self._scratch: list[np.ndarray] | None = None
        # Members with whom both sides have a bulk tcp stream (agreed at formation),
        # and whether that is every other member (the same answer on every rank).
        self._tcp_peers: set[str] = set()
        self._tcp_all = False
        # Whether the members are on more than one host (each says its own at
        # formation, _agree_streams): the same answer on every rank.
        self._across_hosts = False
        self._scratch_key: tuple | None = None
        if getattr(node, "_rdma", None) is not None:
            self._raw_below = min(self._raw_below, opts.get("rdma_threshold", 1 << 20))

        self._cond = threading.Condition()  # guards the notice tables below
        self._hellos: dict[str, dict] = {}  # node id -> latest hello
        self._suspects: dict[tuple[str, int], dict[str, str]] = defaultdict(dict)
        self._op_aborts: dict[tuple[str, int], tuple[str, str]] = {}  # -> (rank name, why)
        self._broken: tuple[str, str] | None = None  # (culprit node id, why)
        # aborts for an incarnation this node has not installed yet (it is a bit behind)
        self._early_broken: dict[str, tuple[str, str]] = {}
        self._op_lock = threading.Lock()

        self._inc = ""
        self._gen = ""
        self._token = ""
        self._members: list[Member] = []
        self._ids: list[str] = []
        self._rank = -1
        self._seq = 0
        self._dirty = False  # a collective failed: stale messages may linger
        self._excluded: set[str] = set()
        self._closed = False
        self._peer_stats: dict[str, _PeerStats] = defaultdict(_PeerStats)
        self._op_stats: dict[str, list] = defaultdict(lambda: [0, 0.0, 0])  # count, s, bytes
        self.dropped_stale = 0

        _keep_receive_buffers()
        try:
            self._ch = node._open_channel(self._subject)
        except MeshError as exc:
            if "already open" in str(exc):
                raise ConfigError(
                    f"a group named {name!r} is already open on node {node.name}: close it "
                    "first (group.close()), or call group.reform() to rebuild it"
                ) from None
            raise
        try:
            self._sub = node._subscribe_internal(self._subject, self._on_notice)
            self._rendezvous(size=size, gen="", timeout=self.timeout)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ public face

    @property
    def rank(self) -> int:
        """This node's rank, 0..size-1 (members sorted by (node name, node id))."""
        return self._rank

    @property
    def size(self) -> int:
        return len(self._members)

    @property
    def members(self) -> list[Member]:
        """``Member(rank, id, name)`` for every member, in rank order."""
        return list(self._members)

    @property
    def incarnation(self) -> str:
        """The id all members agreed on at the last rendezvous (new on every reform())."""
        return self._inc

    def __repr__(self) -> str:
        return (
            f"<Group {self.name!r} rank {self._rank}/{self.size} "
            f"incarnation {self._inc or '-'}{' broken' if self._broken else ''}>"
        )

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Leave the group on this node. Idempotent.

        Waits (at most ``CLOSE_WAIT`` seconds, or the group timeout) until every
        other live member has closed the group too: a collective returns while
        ZeroMQ may still be sending its last messages (small ones are copied,
        not awaited), which a process that exits right after would drop. Peers
        that still run a collective with us raise PeerLostError only if our
        node goes.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._close_handshake()
        except MeshError:
            pass
        try:
            if self._token:
                self._publish({"k": "bye", "id": self.node.id, "tok": self._token})
        except MeshError:
            pass
        sub = getattr(self, "_sub", None)
        if sub is not None:
            try:
                sub.close()
            except MeshError:
                pass
        ch = getattr(self, "_ch", None)
        if ch is not None:
            ch.close()

    def _close_handshake(self) -> None:
        with self._cond:
            broken = self._broken
        ch = getattr(self, "_ch", None)
        if ch is None or not self._inc or self.size <= 1 or broken is not None:
            return
        tag = ("close", self._inc)
        others = [pid for pid in self._ids if pid != self.node.id]
        for pid in others:
            try:
                ch.send(pid, tag, b"", None, timeout=1.0)
            except MeshError:
                pass  # gone: nothing to wait for
        deadline = time.monotonic() + min(self.timeout, CLOSE_WAIT)
        for pid in others:
            try:
                ch.recv(pid, tag, max(0.0, deadline - time.monotonic()))
            except MeshError:  # gone, or still busy at the deadline: close anyway
                continue

    # -- collectives -------------------------------------------------------------

    def allreduce(
        self,
        array: Any,
        op: str = "sum",
        algorithm: str = "auto",
        *,
        out: np.ndarray | None = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Reduce ``array`` over all members with ``op``; every rank gets the result.

        Returns an array of the input's shape and numpy's result dtype for
        ``op`` (see :mod:`.reduce`: integer sums widen like ``np.sum``, integer
        means are float64), identical on every rank. ``algorithm``: ``"ring"``
        (reduce-scatter + allgather, pipelined segments; bandwidth-optimal),
        ``"tree"`` (binary tree reduce + broadcast; fewer latency terms),
        ``"direct"`` (every rank sends its array to every other and reduces
        all of them in rank order: one step, for small arrays), ``"auto"``
        (:func:`.schedule.choose_algorithm` by size, with the group's
        ``direct_bytes`` and ``crossover_bytes``).

        Without ``out`` the result is a new array and the input is never
        modified (a C-contiguous input in the accumulator dtype is not even
        copied; any other input is copied once). ``out``: a preallocated
        result (C-contiguous, the result's shape and dtype), returned; it may
        be the input itself for an in-place allreduce as torch's
        ``all_reduce``. Reusing one saves allocating, and page-faulting, a
        fresh result on every call (about 7 ms per 64 MiB here).
        """
        arr = np.asarray(array)

        def run(seq: int) -> np.ndarray:
            # Checked inside the collective: a bad call on one rank aborts it everywhere.
            red.check_op_dtype(op, arr.dtype)
            if algorithm != "auto" and algorithm not in sch.ALGORITHMS:
                raise ConfigError(
                    f"algorithm={algorithm!r}: use 'direct', 'tree', 'ring' or 'auto'"
                )
            into_out = out is not None and self._check_out(op, arr, out)
            if into_out:
                buf = out.reshape(-1)  # type: ignore[union-attr]
                if np.may_share_memory(out, arr):
                    same = (arr.flags.c_contiguous and arr.dtype == buf.dtype
                            and arr.ctypes.data == buf.ctypes.data)
                    if not same:
                        raise ConfigError("out= overlaps the input only partly: pass the input "
                                          "itself (in place) or a separate array")
                    src = buf  # in place, as torch's all_reduce
                elif arr.flags.c_contiguous and arr.dtype == buf.dtype:
                    src = arr.reshape(-1)  # read the input, write the result into out
                else:
                    np.copyto(out, arr, casting="safe")  # type: ignore[arg-type]
                    src = buf
                if arr.size == 0:
                    src = None  # type: ignore[assignment]
            else:
                src, buf = self._buffers(op, arr)
            n = buf.size
            algo = algorithm
            if algo == "auto":
                direct, cross = self.direct_bytes, self.crossover_bytes
                if self._tcp_all:  # (agreed by every member alike)
                    if direct is None:
                        direct = sch.direct_bytes_over_tcp(self.size)
                    if cross is None:
                        cross = sch.crossover_bytes_over_tcp(self.size)
                algo = sch.choose_algorithm(buf.nbytes, self.size, cross, direct)
            if src is not None and algo == "direct":
                seg = sch.segment_elems_for(buf.itemsize, self.segment_bytes)
                plan = _compiled(algo, n, self._rank, self.size, seg)
                meta = ["allreduce", n, buf.dtype.str, op, algo]
                self._execute_direct(plan, src, buf, seq, red.ufunc_for(op), meta, timeout)
            elif src is not None:
                seg = sch.segment_elems_for(buf.itemsize, self.segment_bytes)
                plan = _compiled(algo, n, self._rank, self.size, seg)
                meta = ["allreduce", n, buf.dtype.str, op, algo]
                self._execute(plan, buf, seq, "allreduce", red.ufunc_for(op), meta, timeout,
                              src=src, need=(0, n))
            res = red.finalize(op, buf, self.size, arr.dtype)
            if out is None:
                return res.reshape(arr.shape)
            if not into_out:
                np.copyto(out, res.reshape(arr.shape))
            return out

        return self._collective("allreduce", run, arr.nbytes)

    @staticmethod
    def _check_out(op: str, arr: np.ndarray, out: Any) -> bool:
        """Validate ``out``; True when the plan can run in it directly (its dtype is
        the accumulator dtype), False when the result is copied into it at the end."""
        want = red.result_dtype(op, arr.dtype)
        got = _unfit_out(out, arr.shape, want)
        if got is not None:
            raise ConfigError(
                f"out= must be a writable C-contiguous array of shape {arr.shape} and dtype "
                f"{want} (the result of {op!r} on {arr.dtype}), got {got}"
            )
        return red.accumulator_dtype(op, arr.dtype) == want

    def reduce_scatter(
        self, array: Any, op: str = "sum", *, timeout: float | None = None
    ) -> np.ndarray:
        """Reduce ``array`` over all members; return only this rank's chunk.

        The chunk is ``flat[start:stop]`` of the reduced, flattened array, with
        ``(start, stop) = schedule.chunk_bounds(array.size, group.size)[rank]``
        (as even as possible, the first ``n % size`` chunks one element longer),
        as a new 1-D array of numpy's result dtype for ``op``.
        """
        arr = np.asarray(array)

        def run(seq: int) -> np.ndarray:
            red.check_op_dtype(op, arr.dtype)
            src, buf = self._buffers(op, arr)
            n = buf.size
            start, stop = sch.chunk_bounds(n, self.size)[self._rank]
            if src is not None:
                seg = sch.segment_elems_for(buf.itemsize, self.segment_bytes)
                plan = _compiled("reduce_scatter", n, self._rank, self.size, seg)
                meta = ["reduce_scatter", n, buf.dtype.str, op]
                self._execute(plan, buf, seq, "reduce_scatter", red.ufunc_for(op), meta, timeout,
                              src=src, need=(start, stop))
            mine = buf[start:stop].copy()  # let the partial sums of other chunks go
            return red.finalize(op, mine, self.size, arr.dtype)

        return self._collective("reduce_scatter", run, arr.nbytes)

    def allgather(
        self, array: Any, *, out: np.ndarray | None = None, timeout: float | None = None
    ) -> list[np.ndarray]:
        """Every rank's ``array``, as a list indexed by rank (``parts[r]``).

        Shapes may differ between ranks; dtypes must match. The parts are
        views into one buffer holding them end to end (``parts[rank]`` is a
        copy of this rank's input). Shapes travel first in one small message
        to each member, with the data when every part is small
        (``schedule.ALLGATHER_CARRY_BYTES``); otherwise the data follows in
        segments, each rank to every other (up to ``schedule.DIRECT_MAX_GROUP``
        ranks) or round the ring.

        ``out``: a preallocated result of shape ``(size, *array.shape)`` and
        the input's dtype (C-contiguous, writable; as torch's
        ``all_gather_into_tensor``), received into directly and reused across
        calls; ``parts[r]`` is then ``out[r]``. With ``out`` every rank must
        pass the same shape and an ``out`` too: the shapes are known, so no
        shape message goes first (a mismatch in shape fails on every rank; a
        rank without ``out`` while others have one waits for its timeout).
        """
        arr = np.asarray(array)

        def run(seq: int) -> list[np.ndarray]:
            if arr.dtype.kind in "OV" or arr.dtype.hasobject:
                raise ConfigError(f"allgather sends numeric arrays, not dtype {arr.dtype}")
            if out is not None:
                return self._allgather_into(arr, out, seq, timeout)
            # A small part rides along with its shape: one step instead of 1 + (size - 1).
            carry = arr.nbytes <= sch.ALLGATHER_CARRY_BYTES
            shapes, carried = self._exchange_shapes(arr, seq, timeout, carry)
            sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
            bounds = sch.part_bounds(sizes)
            flat = np.empty(bounds[-1][1], dtype=arr.dtype)
            a, b = bounds[self._rank]
            flat[a:b].reshape(arr.shape)[...] = arr  # one copy, also of strided input
            if self.size > 1 and flat.size > 0:
                if carry and len(carried) == self.size - 1:  # every rank carried its part
                    for r, part in carried.items():
                        s_, e_ = bounds[r]
                        if part.shape != (e_ - s_,):
                            raise ConfigError(f"rank {r} sent {part.shape} elements for a part "
                                              f"of shape {shapes[r]}")
                        np.copyto(flat[s_:e_], part)
                else:
                    seg = sch.segment_elems_for(max(1, flat.itemsize), self.segment_bytes)
                    kind = sch.allgather_algorithm(flat.nbytes, self.size)
                    plan = _compiled("allgather_direct" if kind == "direct" else "allgather",
                                     0, self._rank, self.size, seg, tuple(sizes))
                    meta = ["allgather", flat.dtype.str]
                    self._execute(plan, flat, seq, "allgather", None, meta, timeout)
            return [flat[s:e].reshape(shape) for (s, e), shape in zip(bounds, shapes, strict=True)]

        return self._collective("allgather", run, arr.nbytes)

    def _allgather_into(
        self, arr: np.ndarray, out: Any, seq: int, timeout: float | None
    ) -> list[np.ndarray]:
        """allgather(out=): every part the same shape, received straight into ``out``."""
        want = (self.size, *arr.shape)
        got = _unfit_out(out, want, arr.dtype)
        if got is not None:
            raise ConfigError(
                f"allgather out= must be a writable C-contiguous array of shape {want} "
                f"(group size, then the input's shape) and dtype {arr.dtype}, got {got}"
            )
        flat = out.reshape(-1)
        n = arr.size
        a, b = self._rank * n, (self._rank + 1) * n
        mine = flat[a:b]
        if np.may_share_memory(arr, out):
            if not (arr.flags.c_contiguous and n and arr.ctypes.data == mine.ctypes.data):
                raise ConfigError("allgather: the input overlaps out= other than as "
                                  "out[group.rank]: pass out[rank] itself or a separate array")
        else:
            mine.reshape(arr.shape)[...] = arr  # one copy, also of strided input
        if self.size > 1 and flat.size > 0:
            seg = sch.segment_elems_for(max(1, flat.itemsize), self.segment_bytes)
            kind = sch.allgather_algorithm(flat.nbytes, self.size)
            plan = _compiled("allgather_direct" if kind == "direct" else "allgather",
                             0, self._rank, self.size, seg, (n,) * self.size)
            # The shape rides in every message: ranks that disagree fail at once.
            meta = ["allgather", flat.dtype.str, list(arr.shape)]
            self._execute(plan, flat, seq, "allgather", None, meta, timeout)
        return [out[r] for r in range(self.size)]

    def broadcast(self, array: Any, root: int = 0, *, timeout: float | None = None) -> np.ndarray:
        """Give every rank the root's ``array`` (pipelined segments: the root sends to
        every rank itself up to ``schedule.DIRECT_MAX_GROUP`` ranks, a binary tree above;
        over tcp streams between hosts a tree or chain relayed cut-through, see the
        module docstring).

        Like ``torch.distributed.broadcast``, non-root ranks pass an array of
        the same shape and dtype, which is overwritten in place when writable
        (a read-only one is left alone and a new array returned); every rank
        returns the result. The root's array is sent without a copy (when
        C-contiguous) and returned as is.
        """
        arr = array if isinstance(array, np.ndarray) else np.asarray(array)

        def run(seq: int) -> np.ndarray:
            if type(root) is not int and (isinstance(root, bool)
                                          or not isinstance(root, (int, np.integer))):
                raise ConfigError(f"root must be a rank (int), got {root!r}")
            rt = int(root)
            if not 0 <= rt < len(self._members):
                raise ConfigError(f"root {rt} is outside the group (size {self.size})")
            dt = arr.dtype
            if dt.kind in "OV" or dt.hasobject:
                raise ConfigError(f"broadcast sends numeric arrays, not dtype {dt}")
            n = arr.size
            if n == 0 or len(self._members) == 1:
                return arr
            is_root = self._rank == rt
            flags = arr.flags
            inplace = flags.c_contiguous and (is_root or flags.writeable)
            if inplace:
                buf = arr.reshape(-1)  # a view: the root sends it, the others receive into it
            elif is_root:
                buf = np.ascontiguousarray(arr).reshape(-1)  # strided input: one copy
            else:
                buf = np.empty(n, dtype=dt)
            # The plan and its message header depend only on these: worked out once
            # (a small broadcast's own Python is on its critical path).
            key = (arr.shape, dt, rt, self._inc, self.segment_bytes, self._tcp_all,
                   self._across_hosts, self._bcast_algo, self._bcast_seg, self._relay,
                   self._lean)
            planned = self._bcast_plans.get(key)
            if planned is None:
                planned = self._bcast_plan(buf, arr, rt)
                if len(self._bcast_plans) >= 64:
                    self._bcast_plans.clear()
                self._bcast_plans[key] = planned
            plan, meta, whole = planned
            if not (whole and self._whole_on_streams(plan, buf, seq, meta, timeout)):
                self._execute(plan, buf, seq, "broadcast", None, meta, timeout)
            if is_root or inplace:
                return arr
            out = buf.reshape(arr.shape)
            if flags.writeable:
                arr[...] = out
                return arr
            return out

        return self._collective("broadcast", run, arr.nbytes)

    def _bcast_plan(self, buf: np.ndarray, arr: np.ndarray, rt: int) -> tuple:
        """(compiled plan, message meta, one whole-buffer message?) of a broadcast."""
        n = buf.size
        seg = sch.segment_elems_for(max(1, buf.itemsize), self.segment_bytes)
        kind: str = sch.broadcast_algorithm(buf.nbytes, self.size)
        if self._tcp_all:
            kind = self._bcast_algo or sch.broadcast_algorithm_over_tcp(
                buf.nbytes, self.size, self._across_hosts)
        if self._tcp_all and self._relay and kind in ("chain", "tree"):
            # Every forwarding rank relays its receive stream to stream as the bytes
            # arrive (_execute): one message, pipelined by the streams themselves
            # (tcp_bulk.RELAY_PIECE), no per-segment hand-off to this thread.
            # 4 ranks, tcp loopback: the tree 0.9-1.1x the direct plan's time at
            # 64 KiB-16 MiB, where in 1-4 MiB segments it took 1.2-1.4x.
            seg = max(1, n)
        elif kind == "chain":
            seg = sch.segment_elems_for(
                max(1, buf.itemsize), sch.chain_segment_bytes(buf.nbytes, self.segment_bytes))
        elif kind == "direct" and self._tcp_all:
            # Nothing is forwarded or reduced, and every pair has a stream (the
            # same answer on every rank): one message per rank, received in place,
            # costs no per-segment hand-offs. 2 ranks, 64 MiB: 0.84x the time.
            seg = max(1, n)
        if self._bcast_seg:
            seg = sch.segment_elems_for(max(1, buf.itemsize), self._bcast_seg)
        plan = _compiled({"direct": "broadcast_direct", "chain": "broadcast_chain"}.get(
            kind, "broadcast"), n, self._rank, self.size, seg, rt)
        meta = ["broadcast", list(arr.shape), arr.dtype.str, rt]
        return plan, meta, kind == "direct" and seg >= n and self._lean

    def barrier(self, *, timeout: float | None = None) -> None:
        """Return once every member has entered the barrier (dissemination, log2 rounds)."""

        def run(seq: int) -> None:
            if self.size == 1:
                return
            base = (self._inc, seq, "barrier")
            trackers = []
            for rnd in sch.barrier_schedule(self._rank, self.size):
                tag = (*base, rnd.round, 0)
                trackers.append(self._send(rnd.send_to, tag, b"", None, seq, "barrier"))
                self._recv(rnd.recv_from, tag, seq, "barrier", timeout)
            self._wait_trackers(trackers, seq, "barrier")

        self._collective("barrier", run, 0)

    def gossip_average(
        self,
        array: Any,
        rounds: int | None = None,
        *,
        eps: float = 1e-6,
        fanout: int = 1,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Push-sum average (Kempe, Dobra, Gehrke 2003): decentralized, no reduction tree.

        Each round every rank keeps one share of its (value, weight) and pushes
        the others to ``fanout`` random members (targets drawn from a generator
        seeded by the incarnation and op number, so every rank knows whom to
        expect from), then absorbs what it got. With ``rounds=None`` it runs
        :func:`.schedule.push_sum_rounds` ``(size, eps, fanout)`` rounds, after
        which ``max|result - mean| <= eps * max|inputs|`` on every rank. The
        estimates differ slightly between ranks (they converge, they are not
        bit-identical). Returns floats (numpy's result dtype of ``np.mean``).
        """
        arr = np.asarray(array)

        def run(seq: int) -> np.ndarray:
            red.check_op_dtype("mean", arr.dtype)
            if rounds is not None and (
                isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0
            ):
                raise ConfigError(f"rounds must be an integer >= 0 or None, got {rounds!r}")
            ps = sch.PushSum(arr.reshape(-1))
            total = sch.push_sum_rounds(self.size, eps, fanout) if rounds is None else rounds
            if self.size == 1:
                total = 0
            rng = np.random.default_rng([int(self._inc, 16) if self._inc else 0, seq])
            meta_kind = ["gossip", arr.size, ps.x.dtype.str]
            trackers: list = []
            for rnd in range(total):
                targets = [
                    sch.gossip_targets(q, self.size, rnd, fanout, rng) for q in range(self.size)
                ]
                mine = targets[self._rank]
                tag = (self._inc, seq, "gossip", rnd, 0)
                for dst, (share, w) in zip(mine, ps.split(len(mine)), strict=True):
                    trackers.append(self._send(dst, tag, share, [*meta_kind, w], seq, "gossip"))
                for q in range(self.size):
                    if self._rank in targets[q]:
                        msg = self._recv(q, tag, seq, "gossip_average", timeout)
                        meta = msg.meta
                        if type(meta) is not list or meta[:3] != meta_kind:
                            raise ConfigError(
                                f"rank {q} gossips {meta!r}, this rank {meta_kind}: every rank "
                                "must pass arrays of the same size"
                            )
                        ps.absorb(self._array_of(msg, ps.x.dtype), float(meta[3]))
                        del msg
            self._wait_trackers(trackers, seq, "gossip_average")
            est = ps.estimate()
            want = red.result_dtype("mean", arr.dtype)
            return est.astype(want, copy=False).reshape(arr.shape)

        return self._collective("gossip_average", run, arr.nbytes)

    # -- membership ----------------------------------------------------------------

    def reform(self, timeout: float | None = None) -> Group:
        """Rebuild the group from the members still alive; returns ``self``.

        Call it on every survivor after a PeerLostError. Members whose nodes
        are dead or left, and members named in an abort (they stopped
        answering), are left out; the others rendezvous again (generation =
        the old incarnation) and get new ranks and a new incarnation. Raises
        ``mesh.TimeoutError`` if a survivor does not call reform() in time,
        and MeshError on a node that its peers excluded.
        """
        self._check_open()
        with self._op_lock:
            with self._cond:
                if self._broken is not None:
                    self._excluded.add(self._broken[0])
            self._rendezvous(size=None, gen=self._inc, timeout=timeout or self.timeout)
        return self

    def stats(self) -> dict:
        """Per-peer wait time (seconds blocked waiting for its messages), bytes and
        message counts in and out, and per-op counts, seconds and bytes, since the
        group was created (peers are keyed by node name; kept across reform());
        ``tcp_streams``: the members whose large segments go over a bulk tcp stream;
        ``across_hosts``: every pair has one and the members are on more than one
        host (a broadcast of 3 or more then goes down a tree or chain, not direct)."""
        names = {m.id: m.name for m in self._members}
        ranks = {m.id: m.rank for m in self._members}
        peers = {}
        for pid, st in list(self._peer_stats.items()):
            peers[names.get(pid, pid)] = {
                "id": pid,
                "rank": ranks.get(pid),
                "wait_s": round(st.wait_s, 6),
                "max_wait_s": round(st.max_wait_s, 6),
                "bytes_in": st.bytes_in,
                "bytes_out": st.bytes_out,
                "msgs_in": st.msgs_in,
                "msgs_out": st.msgs_out,
            }
        slowest = max(peers, key=lambda k: peers[k]["wait_s"], default=None)
        return {
            "group": self.name,
            "incarnation": self._inc,
            "rank": self._rank,
            "size": self.size,
            "broken": None if self._broken is None else names.get(self._broken[0], self._broken[0]),
            "ops": {
                k: {"count": v[0], "seconds": round(v[1], 6), "bytes": v[2]}
                for k, v in self._op_stats.items()
            },
            "peers": peers,
            "slowest_peer": slowest,
            "dropped_stale": self.dropped_stale,
            # members whose large segments go over a bulk tcp stream (both ends agreed)
            "tcp_streams": sorted(names.get(pid, pid) for pid in self._tcp_peers),
            "across_hosts": self._across_hosts,
        }

    # ------------------------------------------------------------------ rendezvous

    def _publish(self, body: dict) -> None:
        self.node._publish_internal(self._subject, msgpack.packb(body, use_bin_type=True))

    def _on_notice(self, msg: Any) -> None:
        """Dispatch thread: hellos, byes, suspects and aborts on the group subject."""
        try:
            body = msgpack.unpackb(bytes(msg.data), raw=False)
            kind = body["k"]
            sender = body.get("id") if kind in ("hello", "bye") else body.get("from")
            if type(sender) is not str or sender == self.node.id:
                return
            with self._cond:
                if kind == "hello":
                    if type(body.get("tok")) is str and type(body.get("excl")) is list:
                        self._hellos[sender] = body
                elif kind == "bye":
                    old = self._hellos.get(sender)
                    if old is not None and old.get("tok") == body.get("tok"):
                        del self._hellos[sender]
                elif kind == "suspect":
                    self._suspects[(str(body["inc"]), int(body["seq"]))][sender] = str(body["who"])
                elif kind == "abort":
                    inc, seq, culprit, why = body["inc"], int(body["seq"]), body["who"], body["why"]
                    if type(inc) is not str:
                        return
                    if culprit and inc != self._inc:
                        if len(self._early_broken) < 64:
                            self._early_broken.setdefault(inc, (str(culprit), str(why)))
                    elif culprit:
                        if self._broken is None:
                            self._broken = (str(culprit), str(why))
                    else:
                        self._op_aborts[(inc, seq)] = (str(body.get("name", sender)), str(why))
                else:
                    return
                self._cond.notify_all()
        except Exception:  # a malformed notice is dropped, never raised in the dispatch thread
            self.node.counters.drops["malformed_group_notice"] += 1

    def _rendezvous(self, size: int | None, gen: str, timeout: float) -> None:
        """Agree on members and an incarnation id; see the module docstring."""
        node, ch = self.node, self._ch
        me = node.id
        token = uuid.uuid4().hex[:16]
        old_members = {m.id: m for m in self._members}
        with self._cond:
            excluded = set(self._excluded)
        self._token, self._gen = token, gen
        deadline = time.monotonic() + timeout
        interval, next_hello = 0.02, 0.0
        sent_inc: str | None = None
        joined: set[str] = set()
        why_not = "no other member answered"
        while True:
            now = time.monotonic()
            lost = set(ch.lost())
            if now >= next_hello:
                self._publish(
                    {
                        "k": "hello", "id": me, "name": node.name, "tok": token,
                        "size": size or 0, "gen": gen,
                        "excl": sorted(excluded | (lost & set(old_members))),
                    }
                )
                next_hello = now + interval
                interval = min(interval * 2, ANNOUNCE_MAX_INTERVAL)
            alive = {p.id: p.name for p in node.peers()}
            alive[me] = node.name
            with self._cond:
                hellos = {
                    pid: h for pid, h in self._hellos.items()
                    if h.get("gen") == gen and pid in alive and pid not in lost
                }
            chosen: dict[str, str] | None = None  # id -> token
            if size is not None:  # first formation: exactly `size` nodes
                cands = {pid: h for pid, h in hellos.items() if h.get("size") == size}
                if len(cands) + 1 == size:
                    chosen = {pid: str(h["tok"]) for pid, h in cands.items()}
                elif len(cands) + 1 > size:
                    why_not = (
                        f"{len(cands) + 1} nodes want group {self.name!r} of size {size}: "
                        f"{sorted(h.get('name') for h in cands.values())}"
                    )
                else:
                    why_not = f"{len(cands) + 1} of {size} members present"
            else:  # reform: the old members, less the dead and the excluded
                excl = set(excluded) | (lost & set(old_members))
                for h in hellos.values():
                    excl.update(x for x in h.get("excl", ()) if type(x) is str)
                if me in excl:
                    raise MeshError(
                        f"node {node.name} was excluded from group {self.name!r} by its peers "
                        "(it stopped answering or was declared dead); close this group and "
                        "join a new one with node.group()"
                    )
                expected = {pid for pid in old_members if pid not in excl and pid != me}
                missing = expected - set(hellos)
                if not missing:
                    chosen = {pid: str(hellos[pid]["tok"]) for pid in expected}
                else:
                    why_not = "survivors that did not call reform(): " + ", ".join(
                        sorted(old_members[p].name for p in missing)
                    )
            if chosen is not None:
                chosen[me] = token
                names = {pid: alive[pid] for pid in chosen}
                digest = hashlib.sha1(
                    "|".join(
                        [self.name, gen, *(f"{pid}:{chosen[pid]}" for pid in sorted(chosen))]
                    ).encode()
                ).hexdigest()[:16]
                if digest != sent_inc:
                    sent_inc, joined = digest, set()
                    for pid in chosen:
                        if pid != me:
                            try:
                                ch.send(pid, ("join", digest), b"", None, timeout=1.0)
                            except MeshError:
                                pass  # it died or is slow: the loop notices
                for pid in chosen:
                    if pid == me or pid in joined:
                        continue
                    try:
                        ch.recv(pid, ("join", digest), 0)
                        joined.add(pid)
                    except MeshError:
                        pass
                if len(joined) == len(chosen) - 1:
                    self._install(digest, names)
                    return
                why_not = f"waiting for {len(chosen) - 1 - len(joined)} member(s) to confirm"
            if now >= deadline:
                hint = (
                    "check that every member calls node.group() with the same name and size, "
                    "in the same cluster, and can reach the others"
                    if size is not None
                    else "every survivor must call group.reform()"
                )
                raise TimeoutError(
                    f"group {self.name!r} did not form within {timeout} s on {node.name}: "
                    f"{why_not}; {hint}"
                )
            with self._cond:
                self._cond.wait(min(0.01, max(0.0, deadline - now)))

    def _install(self, inc: str, names: dict[str, str]) -> None:
        old_inc = self._inc
        order = sorted(names, key=lambda pid: (names[pid], pid))
        self._members = [Member(r, pid, names[pid]) for r, pid in enumerate(order)]
        self._ids = order
        self._rank = order.index(self.node.id)
        self._seq = 0
        self._dirty = False
        with self._cond:
            self._inc = inc
            self._broken = self._early_broken.pop(inc, None)
            self._early_broken.clear()
            for table in (self._suspects, self._op_aborts):
                for key in [k for k in table if k[0] != inc]:
                    del table[key]
        # Old incarnations' messages (in flight when the last one broke) never match.
        self.dropped_stale += self._ch.discard(
            lambda tag: not (type(tag) is tuple and len(tag) > 1 and (tag[0] == inc or tag[1] == inc))
        )
        if old_inc and self._tcp is not None:  # the old incarnation's arrivals, read aside
            for pid in order:
                conn = self._tcp.conn(pid)
                if conn is not None:
                    self.dropped_stale += conn.discard(
                        lambda tag: type(tag) is tuple and len(tag) > 1 and tag[0] == old_inc)
        self._agree_streams(inc)
        log.debug("%s: group %r formed: rank %d of %d, incarnation %s",
                  self.node.name, self.name, self._rank, len(order), inc)

    # ------------------------------------------------------------------ execution

    def _check_open(self) -> None:
        if self._closed:
            raise MeshError(f"group {self.name!r} is closed; create a new one with node.group()")

    def _collective(self, opname: str, run: Callable[[int], Any], nbytes: int) -> Any:
        self._check_open()
        with self._op_lock:
            self._check_broken()
            seq = self._seq
            self._seq += 1
            if self._dirty:
                inc = self._inc
                def stale(tag: Any) -> bool:
                    return (type(tag) is tuple and len(tag) > 1 and tag[0] == inc
                            and type(tag[1]) is int and tag[1] < seq)

                self.dropped_stale += self._ch.discard(stale)
                for conn in self._bulk_conns() or ():
                    if conn is not None:
                        self.dropped_stale += conn.discard(stale)
                self._dirty = False
            t0 = time.perf_counter()
            try:
                result = run(seq)
            except CollectiveAborted:
                self._dirty = True
                raise
            except PeerLostError as exc:
                self._dirty = True
                culprit = getattr(exc, "peer", None)
                with self._cond:
                    if self._broken is None and culprit in self._ids:
                        self._broken = (culprit, str(exc))
                self._notify_abort(seq, culprit if culprit in self._ids else "", str(exc))
                raise
            except BaseException as exc:
                self._dirty = True
                self._notify_abort(seq, "", f"{type(exc).__name__}: {exc}")
                raise
            st = self._op_stats[opname]
            st[0] += 1
            st[1] += time.perf_counter() - t0
            st[2] += nbytes
            return result

    def _notify_abort(self, seq: int, culprit: str, why: str) -> None:
        try:
            self._publish(
                {"k": "abort", "from": self.node.id, "name": self.node.name,
                 "inc": self._inc, "seq": seq, "who": culprit, "why": why[:500]}
            )
        except MeshError:
            pass

    def _member_name(self, pid: str) -> str:
        for m in self._members:
            if m.id == pid:
                return f"{m.name} (rank {m.rank})"
        return self.node._peer_name(pid)

    def _check_broken(self) -> None:
        broken = self._broken  # (one atomic read: written under _cond, read without it)
        if broken is None:
            return
        culprit, why = broken
        if culprit == self.node.id:
            raise PeerLostError(
                f"this node ({self.node.name}) was declared lost by the other members of group "
                f"{self.name!r} ({why}); it is no longer a member: close this group and join "
                "a new one",
                peer=culprit,
            )
        raise PeerLostError(
            f"group {self.name!r} lost member {self._member_name(culprit)}: {why}; "
            "call group.reform() to continue with the survivors",
            peer=culprit,
        )

    def _lost(self, rank: int, what: str, opname: str, seq: int) -> PeerLostError:
        pid = self._ids[rank]
        err = PeerLostError(
            f"peer {self._member_name(pid)} {what} during {opname} #{seq} of group "
            f"{self.name!r}; call group.reform() to continue with the {self.size - 1} survivors",
            peer=pid,
        )
        return err

    def _check_notices(self, seq: int, opname: str) -> None:
        """Raise if another rank aborted this op or the group lost a member."""
        self._check_broken()
        with self._cond:
            aborted = self._op_aborts.get((self._inc, seq))
        if aborted is not None:
            raise CollectiveAborted(
                f"{opname} #{seq} of group {self.name!r} failed on {aborted[0]}: {aborted[1]}"
            )
        lost = self._ch.lost()
        for r, pid in enumerate(self._ids):
            if pid in lost:
                raise self._lost(r, "left the mesh or stopped answering (node declared it dead)",
                                 opname, seq)

    def _send(self, rank: int, tag: Hashable, data: Any, meta: Any, seq: int, opname: str) -> Any:
        pid = self._ids[rank]
        nbytes = data.nbytes if isinstance(data, (np.ndarray, memoryview)) else len(data)
        if nbytes < self._raw_below and isinstance(data, np.ndarray) and data.flags.c_contiguous:
            data = data.data  # raw bytes: one frame fewer (see _raw_below)
        try:
            tracker = self._ch.send(pid, tag, data, meta, timeout=self.timeout)
        except PeerLostError:
            raise self._lost(rank, "left the mesh or died", opname, seq) from None
        except TimeoutError:
            raise self._lost(rank, f"did not accept data for {self.timeout} s", opname, seq) from None
        st = self._peer_stats[pid]
        st.msgs_out += 1
        st.bytes_out += nbytes
        return tracker

    def _recv(self, rank: int, tag: Hashable, seq: int, opname: str, timeout: float | None) -> Any:
        """The message ``tag`` from ``rank``; never waits longer than the timeout."""
        pid = self._ids[rank]
        ch = self._ch
        t0 = time.monotonic()
        limit = timeout or self.timeout
        st = self._peer_stats[pid]
        try:
            msg = ch.recv(pid, tag, min(POLL_INTERVAL, limit))
        except TimeoutError:
            try:
                msg = self._recv_slow(rank, pid, tag, seq, opname, limit, t0)
            finally:  # a wait that failed counts too: that is how a straggler shows
                waited = time.monotonic() - t0
                st.wait_s += waited
                st.max_wait_s = max(st.max_wait_s, waited)
        except PeerLostError:
            raise self._lost(rank, "left the mesh or stopped answering", opname, seq) from None
        else:
            waited = time.monotonic() - t0
            st.wait_s += waited
            if waited > st.max_wait_s:
                st.max_wait_s = waited
        st.msgs_in += 1
        data = msg.data
        st.bytes_in += data.nbytes if isinstance(data, memoryview) else len(data)
        return msg

    def _recv_slow(
        self, rank: int, pid: str, tag: Hashable, seq: int, opname: str, timeout: float, t0: float
    ) -> Any:
        ch = self._ch
        grace = min(1.0, timeout / 4)
        suspect_at, deadline = t0 + timeout - grace, t0 + timeout
        suspected = False
        while True:
            self._check_notices(seq, opname)
            now = time.monotonic()
            if not suspected and now >= suspect_at:
                suspected = True
                try:
                    self._publish({"k": "suspect", "from": self.node.id, "inc": self._inc,
                                   "seq": seq, "who": pid})
                except MeshError:
                    pass
            if now >= deadline:
                culprit = self._resolve_culprit(seq, pid)
                r = self._ids.index(culprit)
                raise self._lost(
                    r,
                    f"stopped answering (sent nothing for {timeout} s while its node still "
                    "looked alive: a straggler, a stuck process, or a crash not detected yet)",
                    opname, seq,
                )
            if pid in self._tcp_peers:  # its sender took the stream after all (options differ)
                conn = self._tcp.conn(pid)  # type: ignore[union-attr]
                early = conn.take_early(tag) if conn is not None else None
                if early is not None:
                    return _StreamMessage(early[0], memoryview(early[1]))
            try:
                return ch.recv(pid, tag, max(0.0, min(POLL_INTERVAL, deadline - now)))
            except TimeoutError:
                continue
            except PeerLostError:
                raise self._lost(rank, "left the mesh or stopped answering", opname, seq) from None

    def _resolve_culprit(self, seq: int, pid: str) -> str:
        """Follow the suspect notices from ``pid`` to the member that waits on nobody."""
        with self._cond:
            notes = dict(self._suspects.get((self._inc, seq), {}))
        seen = {self.node.id}
        cur = pid
        while cur in notes and cur not in seen:
            seen.add(cur)
            cur = notes[cur]
        if cur in seen or cur not in self._ids:
            return pid  # a cycle: blame whom we wait on
        return cur

    def _wait_trackers(self, trackers: list, seq: int, opname: str) -> None:
        deadline = time.monotonic() + self.timeout
        for tr in trackers:
            if tr.done:
                continue
            try:
                ok = tr.wait(max(0.001, deadline - time.monotonic()))
            except BulkLinkError as exc:
                raise PeerLostError(f"{opname} #{seq} of group {self.name!r}: {exc}; call "
                                    "group.reform() to continue", peer=exc.peer) from None
            except Exception:
                ok = False
            if ok is False:  # (a zmq tracker returns None, a bulk send True when done)
                raise MeshError(
                    f"{opname} #{seq}: a zero-copy send of group {self.name!r} was not released "
                    f"within {self.timeout} s (a peer holds or never took the data)"
                ) from None

    def _whole_on_streams(self, compiled: _Compiled, buf: np.ndarray, seq: int, meta: list,
                          timeout: float | None) -> bool:
        """``_execute`` for a plan of whole-buffer messages with nothing forwarded (a
        direct broadcast in one segment: the root's sends, or one receive) when every
        one has its bulk tcp stream; False (nothing done) when one has none.

        The general executor's bookkeeping (closures, guards, post-ahead, relay and
        fold checks) cost the root ~25 us before its send left and the receiver
        ~25 us after its wake-up, on the critical path of a small broadcast of 2
        (tcp loopback, 16 KiB: ~150 us in all; bench/bcastprobe.py)."""
        tcp, peers, ids = self._tcp, self._tcp_peers, self._ids
        if tcp is None or buf.nbytes < self._stream_min("broadcast"):
            return False
        plan = compiled.plan
        conns = []
        for t in plan:
            pid = ids[t.send_to if t.recv is None else t.recv_from]  # type: ignore[index]
            c = tcp.conn(pid) if pid in peers else None
            if c is None:
                return False
            conns.append(c)
        base = (self._inc, seq)
        if compiled.recvs:  # one receive, straight into buf
            t, c = plan[0], conns[0]
            tag = base + t.tag
            req = c.post(tag, buf)
            try:
                incoming = self._recv_bulk(t.recv_from, c, req, tag, seq,  # type: ignore[arg-type]
                                           "broadcast", timeout, t, meta, buf.size, buf.dtype)
            except BaseException:
                self._cancel_posted({0: (req, None)})
                raise
            if incoming is not None and not req.into_dest:
                np.copyto(buf, incoming)  # (it came before the post, or over ZeroMQ)
            return True
        # The root: each send written by this thread (it has nothing else to do)
        trackers = [self._send_bulk(c, t.send_to, base + t.tag, buf, meta,  # type: ignore[arg-type]
                                    self._inline_sends) for t, c in zip(plan, conns, strict=True)]
        self._wait_trackers(trackers, seq, "broadcast")
        return True

    def _execute(
        self,
        compiled: _Compiled,
        buf: np.ndarray,
        seq: int,
        opname: str,
        ufunc: np.ufunc | None,
        meta: list,
        timeout: float | None,
        src: np.ndarray | None = None,
        need: tuple[int, int] | None = None,
    ) -> None:
        """Run a plan on ``buf`` (flat): post sends as early as their data is ready,
        reduce (``ufunc``) or copy each receive into its slice, in plan order.

        With ``src`` (the caller's input, flat, read only) ``buf`` starts
        empty: a slice not yet written is sent from ``src`` and its first
        reduction reads ``src`` (``ufunc(src, incoming, out=buf)``), which
        saves copying the input. ``need``: the range that must hold the
        result afterwards; what the plan never wrote there is copied from ``src``.
        """
        base = (self._inc, seq)
        inflight: dict[tuple[int, int], list] = {}
        trackers: list = []
        send = self._send
        written: set[tuple[int, int]] | None = None if src is None or src is buf else set()
        plan, deps, guards = compiled.plan, compiled.deps, compiled.guards
        # Large slices to/from peers with a bulk tcp stream go over it (received
        # straight into place), the rest over the group's ZeroMQ channel.
        conns = self._bulk_conns()
        itemsize, tmin = buf.itemsize, self._stream_min(opname)

        def stream(rank: int, a: int, b: int) -> Any:
            if conns is None or (b - a) * itemsize < tmin:
                return None
            return conns[rank]

        posted_sends: set[int] = set()
        # A rank that only sends (a broadcast's root), or only copies what it
        # receives in a group of 2, has nothing to do meanwhile: it writes its sends
        # into the streams itself, one thread hand-off less per segment. The latter
        # only when every receive is posted before (_POST_AHEAD): a caller blocked
        # in a write posts nothing, and a stream whose next message has no posted
        # receive waits for one (tcp_bulk.POST_WAIT) before it reads it aside.
        inline = self._inline_sends and ufunc is None and (
            not compiled.recvs or (self.size == 2 and len(compiled.recvs) <= _POST_AHEAD))

        def post(t: sch.Transfer) -> None:
            a, b = t.send  # type: ignore[misc]
            data = buf[a:b] if written is None or t.send in written else src[a:b]  # type: ignore[index]
            c = stream(t.send_to, a, b)  # type: ignore[arg-type]
            if c is not None:
                tr = self._send_bulk(c, t.send_to, base + t.tag, data, meta,  # type: ignore[arg-type]
                                     inline)
            else:
                tr = send(t.send_to, base + t.tag, data, meta, seq, opname)  # type: ignore[arg-type]
            trackers.append(tr)
            inflight.setdefault(t.send, []).append(tr)  # type: ignore[arg-type]
            posted_sends.add(t.index)

        # Receives posted ahead on bulk streams: plan index -> (request, scratch).
        # A reducing receive lands in a scratch segment (reused across calls), a
        # copying one in its own slice of buf once nothing needs the old content.
        posted: dict[int, tuple[Any, np.ndarray | None]] = {}
        scratch = (self._scratch_pool(buf.dtype, compiled.max_recv)
                   if conns is not None and ufunc is not None else [])
        recvs = compiled.recvs
        state = {"next": 0, "consumed": -1}

        def may_post(i: int) -> bool:
            g = guards[i]
            if g.prev_writer > state["consumed"]:
                return False
            for j in g.readers:
                if j not in posted_sends:
                    return False
                for tr in inflight.get(plan[j].send, ()):  # type: ignore[arg-type]
                    if not tr.done:
                        return False
            return True

        fold = self._fold
        # A copying receive whose data this rank only forwards (a chain or tree
        # broadcast) is relayed by the streams' threads as its bytes arrive (cut-
        # through, tcp_bulk.RecvRequest.relay): plan index -> the sends it carries.
        # (broadcasts only, measured; the ring allgather could relay the same way)
        relayable = self._relay and opname == "broadcast" and conns is not None
        relaying: dict[int, tuple[sch.Transfer, ...]] = {}
        # (a broadcast's sender other than its root forwards: see _recv_bulk)
        root = meta[3] if relayable else None

        def relay_of(t: sch.Transfer) -> list | None:
            if not relayable or not deps[t.index]:
                return None
            a, b = t.recv  # type: ignore[misc]
            out = []
            for d in deps[t.index]:
                c = stream(d.send_to, a, b)  # type: ignore[arg-type]
                if c is None or d.send != t.recv:
                    return None
                out.append((c, base + d.tag, meta))
            relaying[t.index] = deps[t.index]
            return out

        def fold_of(t: sch.Transfer) -> tuple | None:
            """A reducing receive posted into its slice is reduced there by the
            stream's thread as it arrives, with the operand _execute would use."""
            if not t.reduce:
                return None
            a, b = t.recv  # type: ignore[misc]
            first = buf[a:b] if written is None or t.recv in written else src[a:b]  # type: ignore[index]
            return (ufunc, first)

        def post_ahead(upto: int) -> None:
            while state["next"] < len(recvs) and state["next"] <= upto:
                i = recvs[state["next"]]
                t = plan[i]
                a, b = t.recv  # type: ignore[misc]
                c = stream(t.recv_from, a, b)  # type: ignore[arg-type]
                if c is not None:
                    if (fold or not t.reduce) and may_post(i):
                        posted[i] = (c.post(base + t.tag, buf[a:b], fold_of(t), relay_of(t)),
                                     None)
                    elif t.reduce and scratch:
                        sc = scratch.pop()
                        posted[i] = (c.post(base + t.tag, sc[: b - a]), sc)
                    else:
                        return  # in order: it is posted when consumed
                state["next"] += 1

        try:
            # Receives first: a small send is written by this thread itself (and any
            # send when ``inline``), and a stream whose message has no posted receive
            # waits for one (tcp_bulk.POST_WAIT) before it reads it aside.
            post_ahead(_POST_AHEAD)
            for t in compiled.initial:
                post(t)
            for pos, i in enumerate(recvs):
                t = plan[i]
                post_ahead(pos + _POST_AHEAD)
                a, b = t.recv  # type: ignore[misc]
                dst = buf[a:b]
                pending = inflight.pop(t.recv, None)
                if pending:  # our own send of this slice may still be reading it
                    self._wait_trackers(pending, seq, opname)
                entry = posted.pop(i, None)
                c = stream(t.recv_from, a, b)  # type: ignore[arg-type]
                if entry is None and c is not None:
                    if state["next"] == pos:
                        state["next"] += 1  # posted here, not ahead
                    if fold or not t.reduce:
                        # (nothing earlier needs the slice any more: reduce into it as it comes)
                        entry = (c.post(base + t.tag, dst, fold_of(t), relay_of(t)), None)
                    else:
                        sc = scratch.pop() if scratch else np.empty(compiled.max_recv, buf.dtype)
                        entry = (c.post(base + t.tag, sc[: b - a]), sc)
                if entry is not None:
                    req, sc = entry
                    incoming = self._recv_bulk(t.recv_from, c, req, base + t.tag, seq, opname,
                                               timeout, t, meta, b - a, buf.dtype,
                                               root is not None and t.recv_from != root)
                else:
                    sc = None
                    msg = self._recv(t.recv_from, base + t.tag, seq, opname, timeout)  # type: ignore[arg-type]
                    incoming = self._incoming(msg, t, meta, b - a, buf.dtype)
                    del msg
                if incoming is None:
                    pass  # reduced into dst by the stream as it arrived (fold)
                elif not t.reduce:
                    if incoming is not dst and not (incoming.ctypes.data == dst.ctypes.data):
                        np.copyto(dst, incoming)
                elif written is None or t.recv in written:
                    ufunc(dst, incoming, out=dst)  # type: ignore[misc]
                else:
                    ufunc(src[a:b], incoming, out=dst)  # type: ignore[index, misc]
                if written is not None:
                    written.add(t.recv)
                del incoming
                if sc is not None:
                    scratch.append(sc)
                state["consumed"] = i
                sent_on = relaying.pop(i, None)
                if sent_on and entry is not None and entry[0].relayed:
                    for d, tr in zip(sent_on, entry[0].relayed, strict=True):
                        trackers.append(tr)
                        inflight.setdefault(d.send, []).append(tr)  # type: ignore[arg-type]
                        posted_sends.add(d.index)
                        self._peer_stats[self._ids[d.send_to]].bytes_out += (b - a) * itemsize  # type: ignore[index]
                        self._peer_stats[self._ids[d.send_to]].msgs_out += 1  # type: ignore[index]
                else:  # (not relayed: it came over ZeroMQ after all)
                    for d in deps[t.index]:
                        post(d)
        except BaseException:
            self._cancel_posted(posted)
            raise
        if written is not None and need is not None:
            at = need[0]
            for a, b in sorted(written) + [(need[1], need[1])]:
                if a > at and at < need[1]:
                    np.copyto(buf[at:min(a, need[1])], src[at:min(a, need[1])])  # type: ignore[index]
                at = max(at, b)
        self._wait_trackers(trackers, seq, opname)

    # -- the bulk tcp stream (mesh/engine/bulk_tcp.py) ---------------------------------

    def _agree_streams(self, inc: str) -> None:
        """At formation: connect the bulk tcp streams to the other members (bounded),
        then tell each which of them this node has, so that a pair uses its stream
        only when both ends have it, and every rank knows whether all pairs do."""
        self._tcp_peers, self._tcp_all, self._across_hosts = set(), False, False
        others = [pid for pid in self._ids if pid != self.node.id]
        if not others:
            return
        mine = []
        if self._tcp is not None:
            self._tcp.settle(others, min(self.timeout, _SETTLE))
            mine = sorted(pid for pid in others if self._tcp.conn(pid) is not None)
        tag = ("bulk", inc)
        # The list ends with this node's host (Locality: boot id and network namespace),
        # so every rank learns every member's from the member itself.
        here = getattr(getattr(self.node, "_locality", None), "host", None)
        said = mine + ([_HOST_MARK + here] if here else [])
        for pid in others:
            try:
                self._ch.send(pid, tag, b"", said, timeout=1.0)
            except MeshError:
                pass
        deadline = time.monotonic() + min(self.timeout, _SETTLE)
        theirs: dict[str, set] = {}
        for pid in others:
            try:
                meta = self._ch.recv(pid, tag, max(0.0, deadline - time.monotonic())).meta
            except MeshError:
                continue
            theirs[pid] = set(meta) if type(meta) is list else set()
        hosts = {here} | {next((str(x)[len(_HOST_MARK):] for x in got
                                if str(x).startswith(_HOST_MARK)), None)
                          for got in theirs.values()}
        self._tcp_peers = {pid for pid in mine if self.node.id in theirs.get(pid, ())}
        # Every member's list, from every member: the same on every rank.
        self._tcp_all = len(theirs) == len(others) and all(
            set(self._ids) - {pid} <= (theirs[pid] | {pid}) for pid in others
        ) and set(mine) == set(others)
        # (a member that did not say: unknown, taken as one host, as before)
        self._across_hosts = self._tcp_all and None not in hosts and len(hosts) > 1

    def _stream_min(self, opname: str) -> int:
        """Smallest slice (bytes) that goes over a bulk tcp stream in ``opname``.

        Large ones always (``tcp_bulk_threshold``), small ones too: the caller
        writes a small one into the stream itself and the node's one stream
        receiver thread (transports/tcp_bulk.py) hands it over, one wake-up
        instead of ZeroMQ's three (its I/O threads and the node's): 0.7-0.9x the
        time of a 4-64 KiB broadcast, allgather or allreduce of 2 ranks (tcp
        loopback, 2026-12-06). Where a rank receives from several members at once
        (a direct allreduce or allgather of 4), the messages that arrived
        together are handed over in one pass of that thread (when each stream had
        a thread of its own, each woke the caller: 1.2x slower than ZeroMQ).
        ``_small_stream == "pairs"``: only where a rank hears one member per step
        (2 members, or a broadcast), as before.
        """
        if self._small_stream == "all" or (
                self._small_stream and (self.size == 2 or opname == "broadcast")):
            return 1
        return self._tcp_min

    def _bulk_conns(self) -> list | None:
        """Per rank, the connected bulk stream to that member (None: ZeroMQ), or None
        when no member has one."""
        if self._tcp is None or not self._tcp_peers:
            return None
        conns = [self._tcp.conn(pid) if pid in self._tcp_peers else None for pid in self._ids]
        return conns if any(c is not None for c in conns) else None

    def _scratch_pool(self, dtype: np.dtype, elems: int) -> list[np.ndarray]:
        """Reusable receive segments for reducing receives: kept between calls, so
        their pages are faulted in once, not on every collective."""
        dt = np.dtype(dtype)
        # Big enough ones of the same dtype serve (receives use a prefix): a smaller
        # collective in between must not throw away, and fault in again, the large
        # ones every allreduce of the training loop uses.
        if (self._scratch is None or self._scratch_key is None
                or self._scratch_key[0] != dt.str or self._scratch_key[1] < elems):
            self._scratch_key = (dt.str, elems)
            self._scratch = [np.empty(elems, dt) for _ in range(_SCRATCH_SEGMENTS)]
        return self._scratch

    def _cancel_posted(self, posted: dict) -> None:
        """A collective failed: no receive may write into its buffers afterwards."""
        self._scratch = None  # a stream may still be writing into them: new ones next time
        for req, _ in posted.values():
            req.cancel()
        for req, _ in posted.values():
            if not req.done:
                try:
                    req.wait(1.0)  # one already being read finishes first (bounded)
                except MeshError:
                    pass

    def _send_bulk(self, conn: Any, rank: int, tag: Hashable, data: np.ndarray,
                   meta: Any, inline: bool = False) -> Any:
        tr = conn.send(tag, meta, data, inline)
        st = self._peer_stats[self._ids[rank]]
        st.msgs_out += 1
        st.bytes_out += data.nbytes
        return tr

    def _recv_bulk(self, rank: int, conn: Any, req: Any, tag: Hashable, seq: int, opname: str,
                   timeout: float | None, t: sch.Transfer, meta: list, n: int,
                   dtype: np.dtype, forwarded: bool = False) -> np.ndarray | None:
        """Wait for a posted bulk receive (bounded like ``_recv``; a sender that fell
        back to ZeroMQ meanwhile is found on the channel); its array, checked, or
        None when the stream already reduced it into its slice (``fold``)."""
        pid = self._ids[rank]
        st = self._peer_stats[pid]
        t0 = time.monotonic()
        limit = timeout or self.timeout
        msg = None
        try:
            if not req.wait(POLL_INTERVAL):
                grace = min(1.0, limit / 4)
                suspect_at, deadline = t0 + limit - grace, t0 + limit
                suspected = False
                while True:
                    self._check_notices(seq, opname)
                    try:
                        msg = self._ch.recv(pid, tag, 0)  # it took the ZeroMQ path after all
                        req.cancel()
                        break
                    except TimeoutError:
                        pass
                    now = time.monotonic()
                    if not suspected and now >= suspect_at:
                        suspected = True
                        try:
                            self._publish({"k": "suspect", "from": self.node.id,
                                           "inc": self._inc, "seq": seq, "who": pid})
                        except MeshError:
                            pass
                    if now >= deadline:
                        req.cancel()
                        culprit = self._resolve_culprit(seq, pid)
                        raise self._lost(
                            self._ids.index(culprit),
                            f"stopped answering (sent nothing for {limit} s while its node "
                            "still looked alive)", opname, seq)
                    if req.wait(max(0.0, min(POLL_INTERVAL, deadline - now))):
                        break
        except PeerLostError as exc:
            if isinstance(exc, BulkLinkError):
                if forwarded:
                    # The sender relays what it receives: its own source dying mid-message
                    # breaks this stream too (tcp_bulk: the frame cannot be finished). It
                    # names that source in an abort within milliseconds: blame the sender
                    # only if nobody names another culprit by then.
                    self._await_blame(seq, opname, min(_BLAME_GRACE, limit / 4))
                raise self._lost(rank, f"broke its bulk tcp connection ({exc})", opname,
                                 seq) from None
            raise
        finally:
            waited = time.monotonic() - t0
            st.wait_s += waited
            st.max_wait_s = max(st.max_wait_s, waited)
        if msg is not None:
            st.msgs_in += 1
            data = msg.data
            st.bytes_in += data.nbytes if isinstance(data, memoryview) else len(data)
            return self._incoming(msg, t, meta, n, dtype)
        st.msgs_in += 1
        st.bytes_in += len(req.data)
        if req.meta != meta:
            raise ConfigError(
                f"rank {t.recv_from} called {req.meta!r}, this rank (rank {self._rank}) "
                f"{meta!r}: every rank must call the same collective with the same shape, "
                "dtype and options"
            )
        if req.folded:
            if req.fold_error is not None:  # under this thread's np.seterr (tcp_bulk.post)
                raise req.fold_error
            return None  # already reduced into its slice
        if req.into_dest:
            return np.frombuffer(req.dest, dtype=dtype)
        try:
            incoming = np.frombuffer(req.data, dtype=dtype)
        except ValueError:
            incoming = None
        if incoming is None or incoming.shape != (n,):
            raise ConfigError(
                f"rank {t.recv_from} sent {len(req.data)} bytes for slice {t.recv} "
                f"({n} elements of {dtype}): every rank must pass the same shape"
            )
        return incoming

    def _await_blame(self, seq: int, opname: str, grace: float) -> None:
        """Wait up to ``grace`` for a notice that names who failed (raises it)."""
        deadline = time.monotonic() + grace
        while True:
            self._check_notices(seq, opname)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with self._cond:
                self._cond.wait(min(left, 0.02))

    def _execute_direct(
        self,
        compiled: _Compiled,
        src: np.ndarray,
        buf: np.ndarray,
        seq: int,
        ufunc: np.ufunc,
        meta: list,
        timeout: float | None,
    ) -> None:
        """Run a direct plan: send ``src`` (this rank's input, flat) to every peer
        at once, then combine all inputs into ``buf`` in the plan's (rank) order.

        ``src`` may be ``buf`` itself (in place, or the accumulator copy): a
        rank past the second then keeps a copy of its input for its turn, and
        sends still reading ``buf`` (zero-copy, large arrays only: the node
        copies smaller payloads) are awaited before ``buf`` is written.
        """
        base = (self._inc, seq)
        rank = self._rank
        own = src.copy() if src is buf and rank >= 2 else src
        pending = []
        guard: dict[tuple[int, int], list] = {}  # slice -> our zero-copy sends still reading buf
        conns = self._bulk_conns()
        itemsize, tmin = buf.itemsize, self._stream_min("allreduce")

        def stream(r: int, a: int, b: int) -> Any:
            if conns is None or (b - a) * itemsize < tmin:
                return None
            return conns[r]

        # Bulk receives land in scratch segments, posted ahead while one is free.
        scratch = self._scratch_pool(buf.dtype, compiled.max_recv) if conns is not None else []
        posted: dict[int, tuple[Any, np.ndarray]] = {}
        remote = [i for i in compiled.recvs if compiled.plan[i].recv_from != rank]
        nxt = 0

        def post_ahead() -> None:
            nonlocal nxt
            while nxt < len(remote) and scratch:
                t = compiled.plan[remote[nxt]]
                a, b = t.recv  # type: ignore[misc]
                c = stream(t.recv_from, a, b)  # type: ignore[arg-type]
                if c is not None:
                    sc = scratch.pop()
                    posted[t.index] = (c.post(base + t.tag, sc[: b - a]), sc)
                nxt += 1

        # The first operand of each slice waits for the second: one ufunc call
        # writes both into buf, instead of a copy and then a reduction.
        first: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = {}
        try:
            # Receives first: a small send is written by this thread itself, and a
            # stream whose message has no posted receive waits for one (bounded).
            post_ahead()
            for t in compiled.initial:
                a, b = t.send  # type: ignore[misc]
                c = stream(t.send_to, a, b)  # type: ignore[arg-type]
                if c is not None:
                    tr = self._send_bulk(c, t.send_to, base + t.tag, own[a:b], meta)  # type: ignore[arg-type]
                else:
                    tr = self._send(t.send_to, base + t.tag, own[a:b], meta, seq, "allreduce")  # type: ignore[arg-type]
                if own is src and not tr.done:  # (a private copy may stay in flight)
                    pending.append(tr)
                    if own is buf:
                        guard.setdefault(t.send, []).append(tr)  # type: ignore[arg-type]
            for t in compiled.plan:
                if t.recv is None:
                    continue
                a, b = t.recv
                sc = None
                if t.recv_from == rank:
                    incoming = own[a:b]
                else:
                    post_ahead()
                    entry = posted.pop(t.index, None)
                    c = stream(t.recv_from, a, b)  # type: ignore[arg-type]
                    if entry is None and c is not None:
                        sc = scratch.pop() if scratch else np.empty(compiled.max_recv, buf.dtype)
                        entry = (c.post(base + t.tag, sc[: b - a]), sc)
                        if nxt < len(remote) and remote[nxt] == t.index:
                            nxt += 1
                    if entry is not None:
                        req, sc = entry
                        incoming = self._recv_bulk(t.recv_from, c, req, base + t.tag, seq,  # type: ignore[arg-type]
                                                   "allreduce", timeout, t, meta, b - a, buf.dtype)
                    else:
                        msg = self._recv(t.recv_from, base + t.tag, seq, "allreduce", timeout)  # type: ignore[arg-type]
                        incoming = self._incoming(msg, t, meta, b - a, buf.dtype)
                        del msg
                if not t.reduce:
                    first[t.recv] = (incoming, sc)
                    continue
                if guard and t.recv in guard:  # our zero-copy sends still read this slice
                    self._wait_trackers(guard.pop(t.recv), seq, "allreduce")
                if t.recv in first:
                    prev, prev_sc = first.pop(t.recv)
                    ufunc(prev, incoming, out=buf[a:b])
                    if prev_sc is not None:
                        scratch.append(prev_sc)
                else:
                    ufunc(buf[a:b], incoming, out=buf[a:b])
                del incoming
                if sc is not None:
                    scratch.append(sc)
        except BaseException:
            self._cancel_posted(posted)
            raise
        for (a, b), (rest, _) in first.items():  # a lone rank: its input is the result
            np.copyto(buf[a:b], rest)
        if pending:  # the caller may reuse its array once we return
            self._wait_trackers(pending, seq, "allreduce")

    @staticmethod
    def _array_of(msg: Any, dtype: np.dtype) -> np.ndarray | None:
        """The message's array: a tensor, or raw bytes of ``dtype`` (see ``_raw_below``)."""
        if msg.array is not None:
            return msg.array
        try:
            return np.frombuffer(msg.data, dtype=dtype)
        except (TypeError, ValueError):
            return None  # not a whole number of elements: the caller reports it

    def _incoming(
        self, msg: Any, t: sch.Transfer, meta: list, n: int, dtype: np.dtype
    ) -> np.ndarray:
        """The array a message of transfer ``t`` carries, checked against this rank's call."""
        if msg.meta != meta:
            raise ConfigError(
                f"rank {t.recv_from} called {msg.meta!r}, this rank (rank {self._rank}) "
                f"{meta!r}: every rank must call the same collective with the same shape, "
                "dtype and options"
            )
        incoming = self._array_of(msg, dtype)
        if incoming is None or incoming.shape != (n,):
            raise ConfigError(
                f"rank {t.recv_from} sent {None if incoming is None else incoming.shape} "
                f"elements for slice {t.recv}: every rank must pass the same shape"
            )
        return incoming

    @staticmethod
    def _buffers(op: str, arr: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(src, buf) for a reducing plan; ``src`` is None when there is nothing to send.

        The input is copied at most once: when it is C-contiguous and already in
        the accumulator dtype, ``src`` is a flat view of it and ``buf`` a fresh
        empty buffer (see :meth:`_execute`); otherwise ``buf`` is the converted
        or contiguous copy (:func:`.reduce.accumulator`) and ``src is buf``.
        """
        if arr.size == 0:
            return None, red.accumulator(op, arr)
        if arr.flags.c_contiguous and red.accumulator_dtype(op, arr.dtype) == arr.dtype:
            return arr.reshape(-1), np.empty(arr.size, dtype=arr.dtype)
        buf = red.accumulator(op, arr)
        return buf, buf

    def _exchange_shapes(
        self, arr: np.ndarray, seq: int, timeout: float | None, carry: bool = False
    ) -> tuple[list[tuple], dict[int, np.ndarray]]:
        """Every rank's shape (allgather); dtypes must agree. With ``carry`` the
        message also carries this rank's data; returns the parts others carried."""
        shapes: list[tuple] = [()] * self.size
        shapes[self._rank] = tuple(arr.shape)
        carried: dict[int, np.ndarray] = {}
        if self.size == 1:
            return shapes, carried
        tag = (self._inc, seq, "shape", 0, 0)
        mine: list = [list(arr.shape), arr.dtype.str]
        data: Any = b""
        if carry:
            mine.append(1)
            if arr.size:
                data = np.ascontiguousarray(arr).reshape(-1)
        trackers = [
            self._send(r, tag, data, mine, seq, "allgather")
            for r in range(self.size) if r != self._rank
        ]
        bad = []
        for r in range(self.size):
            if r == self._rank:
                continue
            msg = self._recv(r, tag, seq, "allgather", timeout)
            meta = msg.meta
            if (
                type(meta) is not list or len(meta) not in (2, 3) or type(meta[0]) is not list
                or not all(type(d) is int and d >= 0 for d in meta[0])
            ):
                raise ConfigError(f"rank {r} sent a malformed allgather descriptor {meta!r}")
            shapes[r] = tuple(meta[0])
            if meta[1] != arr.dtype.str:
                bad.append(f"rank {r}: {np.dtype(meta[1])}")
            elif len(meta) == 3:
                part = self._array_of(msg, arr.dtype)
                if part is None:
                    raise ConfigError(f"rank {r} sent a part that is not whole {arr.dtype} "
                                      "elements")
                carried[r] = part
        self._wait_trackers(trackers, seq, "allgather")
        if bad:
            raise ConfigError(
                f"allgather needs one dtype on every rank; this rank has {arr.dtype}, "
                + ", ".join(bad)
            )
        return shapes, carried

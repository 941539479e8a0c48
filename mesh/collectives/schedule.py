"""Collective schedules: who sends which slice to whom, at which step.

Pure functions, no sockets, no threads, no clocks (see DESIGN.md, "Pure
cores"). Every rank computes its own plan from the same arguments (element
count, group size, segment size), so the plans of two ranks agree without any
negotiation: the transfer that rank ``a`` sends to ``b`` carries the same
:attr:`Transfer.tag` and the same ``(start, stop)`` slice as the transfer in
which ``b`` receives from ``a``. Slices index the *flattened* array, in
elements (not bytes).

Executing a plan (the I/O layer's contract)
-------------------------------------------
Walk the plan in order. For each transfer: post its send (``buf[start:stop]``
zero-copy to ``send_to``; ZeroMQ queues it), then, if it has a receive, wait
for the frame from ``recv_from`` tagged ``tag`` and either reduce it into
``buf[start:stop]`` (``reduce=True``, :func:`mesh.collectives.reduce.reduce_into`)
or copy it there (``reduce=False``). Receives complete in plan order. A send
may be posted earlier than its position, as soon as the receive named by
``send_after`` has completed (``None``: it sends the rank's own input and may
go at once); the tests check that plans stay deadlock-free when executed in
the plain order above, so eager posting is an optimisation only.

Local receives (direct plans only): a transfer whose ``recv_from`` is the
executing rank itself takes the rank's own input slice instead of a message
(nothing is sent or awaited). A plan with local receives starts from an
empty buffer, reads its sends and local receives from the rank's input (which
must stay unmodified until the plan ends), and writes every slice first with
a copy (``reduce=False``), so its reduction order is the plan's order, the
same on every rank.

Pipelining: a chunk is cut into segments of ``segment_elems``, and transfers
go step-major, segment-minor. Segment ``k`` of step ``s + 1`` forwards exactly
the data received in segment ``k`` of step ``s`` (``send_after`` points at it),
so while a rank reduces segment ``k`` its left neighbour already has segment
``k + 1`` on the wire.

Cost model
----------
In the style of Gloo's ``docs/algorithms.md``. ``P`` ranks, ``S`` bytes per
rank, ``alpha`` the latency of one message, ``beta`` the time per byte on a
link, ``gamma`` the time per byte to reduce; ``D = floor(log2 P)`` the depth of
the binary tree.

* Ring allreduce (Baidu ring / Gloo ``allreduce_ring``): reduce-scatter then
  allgather. Communication steps: ``2 (P - 1)``. Bytes on the wire per rank:
  ``2 (P - 1) / P * S`` (the bandwidth-optimal bound). Time about
  ``2 (P - 1) alpha + 2 (P - 1) / P * S beta + (P - 1) / P * S gamma``; with
  segments of ``s`` bytes each step costs ``ceil(S / (P s))`` messages and the
  reduction hides behind the wire. Best for large arrays.
* Direct allreduce (one-shot): every rank sends its whole array to every
  other rank in one step and combines the ``P`` inputs itself, in rank order
  (``((x0 op x1) op x2) ...``, bit-identical everywhere). Communication
  steps: ``1``. Bytes on the wire per rank: ``(P - 1) S`` out and in, and
  ``(P - 1) S`` reduced. Time about ``alpha + (P - 1) S (beta + gamma)``:
  the latency floor, best for small arrays (in Python each step is a thread
  hand-off of 0.1-0.2 ms, which dominates below a few hundred KiB).
* Tree allreduce (binary tree, reduce to the root then broadcast): steps
  ``2 D`` levels (an inner node serves two children one after the other).
  Bytes on the wire per inner rank: ``3 S`` (``S`` up, ``2 S`` down). Time
  about ``2 D (2 alpha + 2 S beta)``: fewer latency terms than the ring for
  large ``P`` and small ``S``, far more bytes for large ``S``. Best for small
  arrays; :func:`choose_algorithm` picks by a measured crossover.
* Reduce-scatter: ring, ``P - 1`` steps, ``(P - 1) / P * S`` bytes per rank.
* Allgather: ring, ``P - 1`` steps, each rank receives every other part once;
  or direct (every rank sends its part to each other rank: one step, the
  same ``(P - 1) S`` bytes per rank), up to ``DIRECT_MAX_GROUP`` ranks.
* Broadcast: binary tree, segmented. ``D`` levels, inner ranks send ``2 S``;
  pipelined, about ``(D + S / s) (alpha + 2 s beta)`` for segments of ``s``.
  Or direct (the root sends ``(P - 1) S``, one level) up to ``DIRECT_MAX_GROUP``.
  Or a chain (every rank sends ``S`` once, ``P - 1`` levels): about
  ``(P - 2 + S / s) (alpha + s beta)``, the least on the busiest link.
* Barrier: dissemination (Hensgen, Finkel and Manber), ``ceil(log2 P)``
  rounds of one empty message per rank.
* Push-sum gossip (Kempe, Dobra, Gehrke 2003): per round each rank sends
  ``fanout`` messages of ``S`` bytes; relative error ``eps`` after about
  ``O(log P + log 1/eps)`` rounds on a complete graph (see
  :func:`push_sum_rounds`), slower on sparse graphs (mixing time).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from mesh.errors import ConfigError

_KiB, _MiB = 1024, 1024 * 1024

# What "auto" picks, by group size (choose_algorithm): direct below
# DEFAULT_DIRECT_BYTES[size], the tree below DEFAULT_CROSSOVER_BY_SIZE[size],
# the ring from there on. Measured by bench/collectives.py (2-4 processes on the
# project's 2-core machine, 2026-11-22): with 2 ranks direct was the fastest at
# every size up to 64 MiB (the largest measured); with 3 and 4 it ties with the
# tree up to ~128 KiB and loses above; the tree beat the ring up to 8 MiB.
# Groups larger than measured: direct below the 4-rank value scaled by
# 3 / (size - 1) (each rank receives and reduces size - 1 whole arrays), the
# ring from DEFAULT_CROSSOVER_BYTES. A group can pass its own (Group options).
DEFAULT_DIRECT_BYTES: dict[int, int] = {2: 128 * _MiB, 3: 128 * _KiB, 4: 128 * _KiB}
DEFAULT_CROSSOVER_BY_SIZE: dict[int, int] = {2: 4 * _MiB, 3: 8 * _MiB, 4: 8 * _MiB}
DEFAULT_CROSSOVER_BYTES = 2 * _MiB

# Allgather: a part up to this size travels with the shape exchange (one step
# when every rank's part does); larger ones go by allgather_algorithm().
ALLGATHER_CARRY_BYTES = 1 * _MiB
# Up to this group size, and up to the sizes below, the root of a broadcast,
# and every rank of an allgather, sends to every other rank itself (one step,
# no rank waits on a forwarding one); otherwise the tree (broadcast) and the
# ring (allgather), whose per-rank bytes do not grow with the group. Measured
# over tcp with shm off, 4 ranks (bench/collectives.py --tcp, 2026-12-06): a
# direct broadcast 2x faster than the tree at 1 MiB, slower from 16 MiB on
# (the root's 3 S); a direct allgather 0.9x the ring's time at 16 MiB per rank,
# 1.25x at 64 MiB. With 2 ranks the plans are the same either way.
DIRECT_MAX_GROUP = 4
BROADCAST_DIRECT_BYTES = 4 * _MiB  # the array
ALLGATHER_DIRECT_BYTES = 64 * _MiB  # all parts together

# Pipelining segment: big enough that the per-message cost is small against
# the bytes, small enough that a chunk has several segments in flight.
DEFAULT_SEGMENT_BYTES = 4 * _MiB

Phase = Literal["reduce_scatter", "allgather", "reduce", "broadcast", "direct"]
Algorithm = Literal["ring", "tree", "direct"]
ALGORITHMS: tuple[Algorithm, ...] = ("ring", "tree", "direct")
Slice = tuple[int, int]


# --------------------------------------------------------------------------
# argument checks: every bad argument is a ConfigError that says what to do


def _count(value: object, what: str, minimum: int = 0) -> int:
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{what} must be an integer, got {value!r}") from None
    if n < minimum:
        raise ConfigError(f"{what} must be >= {minimum}, got {n}")
    return n


def _rank(rank: object, size: object, what: str = "rank") -> tuple[int, int]:
    p = _count(size, "group size", 1)
    r = _count(rank, what)
    if r >= p:
        raise ConfigError(f"{what} {r} is outside the group (size {p}): use 0..{p - 1}")
    return r, p


# --------------------------------------------------------------------------
# splitting


def chunk_bounds(n: int, parts: int) -> list[Slice]:
    """Split ``n`` elements into ``parts`` contiguous ``(start, stop)`` chunks.

    As even as possible: the first ``n % parts`` chunks hold one element more.
    Works for ``n == 0`` and ``n < parts`` (trailing chunks are empty).
    """
    n = _count(n, "element count")
    parts = _count(parts, "number of parts", 1)
    q, extra = divmod(n, parts)
    bounds: list[Slice] = []
    start = 0
    for i in range(parts):
        stop = start + q + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def segment_bounds(start: int, stop: int, segment_elems: int) -> list[Slice]:
    """Cut ``[start, stop)`` into pipelining segments of ``segment_elems``.

    All segments are full except possibly the last. An empty range has no
    segments, so nothing is sent for it (sender and receiver both skip it).
    """
    start = _count(start, "segment start")
    stop = _count(stop, "segment stop")
    seg = _count(segment_elems, "segment_elems", 1)
    if stop < start:
        raise ConfigError(f"segment range is reversed: start {start} > stop {stop}")
    return [(a, min(a + seg, stop)) for a in range(start, stop, seg)]


def segment_elems_for(itemsize: int, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> int:
    """Elements per segment for arrays of ``itemsize`` bytes (at least one)."""
    itemsize = _count(itemsize, "itemsize", 1)
    segment_bytes = _count(segment_bytes, "segment_bytes", 1)
    return max(1, segment_bytes // itemsize)


# --------------------------------------------------------------------------
# plans


@dataclass(frozen=True, slots=True)
class RingStep:
    """One step of a ring phase, in chunk indices (see :func:`chunk_bounds`)."""

    step: int
    send_to: int
    send_chunk: int
    recv_from: int
    recv_chunk: int
    reduce: bool


@dataclass(frozen=True, slots=True)
class Transfer:
    """One send and/or one receive of a plan, on slices of the flat buffer.

    ``send`` / ``recv`` are ``(start, stop)`` element slices, ``None`` when
    this transfer has no such side (the two chunks of a ring step may have
    different segment counts; tree steps are one-sided). ``reduce`` says
    whether the received slice is reduced into the buffer or copied over it.
    ``send_after`` is the index of the latest earlier transfer whose receive
    wrote the slice being sent (``None``: the slice is the rank's own input).
    """

    index: int
    phase: Phase
    step: int
    segment: int
    send_to: int | None
    send: Slice | None
    recv_from: int | None
    recv: Slice | None
    reduce: bool
    send_after: int | None

    @property
    def tag(self) -> tuple[str, int, int]:
        """Identifies the message: equal on the sending and the receiving side."""
        return (self.phase, self.step, self.segment)


class _PlanBuilder:
    """Numbers transfers and works out ``send_after`` from the slices.

    All slices of one plan come from one segmentation, so two slices are
    either equal or disjoint and a dict keyed by slice finds the dependency.
    """

    def __init__(self) -> None:
        self.transfers: list[Transfer] = []
        self._last_recv: dict[Slice, int] = {}

    def add(
        self,
        phase: Phase,
        step: int,
        segment: int,
        send_to: int | None,
        send: Slice | None,
        recv_from: int | None,
        recv: Slice | None,
        reduce: bool,
    ) -> None:
        index = len(self.transfers)
        after = self._last_recv.get(send) if send is not None else None
        self.transfers.append(
            Transfer(
                index=index,
                phase=phase,
                step=step,
                segment=segment,
                send_to=send_to if send is not None else None,
                send=send,
                recv_from=recv_from if recv is not None else None,
                recv=recv,
                reduce=reduce if recv is not None else False,
                send_after=after,
            )
        )
        if recv is not None:
            self._last_recv[recv] = index


@dataclass(frozen=True)
class PostGuard:
    """When a receive may be posted ahead into its own slice of the buffer.

    A transport that writes a message straight into the destination (the bulk
    tcp channel: ``recv_into``) may do so before the executor reaches the
    receive, but only once nothing still needs the slice's old content:
    ``readers`` (indices of the sends of that slice the executor posts before
    it consumes this receive; they must have been posted and sent) and
    ``prev_writer`` (the last earlier receive into that slice, -1 if none;
    it must have been consumed). The same holds for a reducing receive that
    the transport reduces into the slice as it arrives (the bulk tcp
    channel's ``fold``): it writes the slice, and reads its old content
    (or the input's) as the first operand.
    """

    readers: tuple[int, ...]
    prev_writer: int


def post_guards(plan: Sequence[Transfer]) -> dict[int, PostGuard]:
    """:class:`PostGuard` of every receive of ``plan``, by transfer index.

    Slices of one plan are equal or disjoint (one segmentation), and a send
    with ``send_after = k`` is posted once receive ``k`` has been consumed.
    """
    sends: dict[Slice, list[int]] = {}
    for t in plan:
        if t.send is not None:
            sends.setdefault(t.send, []).append(t.index)
    last: dict[Slice, int] = {}
    out: dict[int, PostGuard] = {}
    for t in plan:
        if t.recv is None:
            continue
        readers = tuple(
            j for j in sends.get(t.recv, ())
            if plan[j].send_after is None or plan[j].send_after < t.index  # type: ignore[operator]
        )
        out[t.index] = PostGuard(readers, last.get(t.recv, -1))
        last[t.recv] = t.index
    return out


def ring_reduce_scatter(rank: int, size: int) -> list[RingStep]:
    """Reduce-scatter steps of the ring; ``size - 1`` of them, none for size 1.

    Convention: afterwards rank ``r`` holds the fully reduced chunk ``r`` (the
    same as :func:`reduce_scatter_plan`, and the torch.distributed
    convention). At step ``s`` rank ``r`` sends chunk ``(r - s - 1) % size`` to
    ``r + 1`` and reduces chunk ``(r - s - 2) % size`` received from ``r - 1``.
    """
    rank, size = _rank(rank, size)
    right, left = (rank + 1) % size, (rank - 1) % size
    return [
        RingStep(s, right, (rank - s - 1) % size, left, (rank - s - 2) % size, True)
        for s in range(size - 1)
    ]


def ring_allgather(rank: int, size: int) -> list[RingStep]:
    """Allgather steps of the ring, starting from rank ``r`` holding chunk ``r``.

    At step ``s`` rank ``r`` sends chunk ``(r - s) % size`` to ``r + 1`` and
    copies chunk ``(r - s - 1) % size`` received from ``r - 1``; after
    ``size - 1`` steps every rank holds every chunk.
    """
    rank, size = _rank(rank, size)
    right, left = (rank + 1) % size, (rank - 1) % size
    return [
        RingStep(s, right, (rank - s) % size, left, (rank - s - 1) % size, False)
        for s in range(size - 1)
    ]


def _add_ring_phase(
    builder: _PlanBuilder,
    phase: Phase,
    steps: list[RingStep],
    bounds: list[Slice],
    segment_elems: int,
) -> None:
    for st in steps:
        sends = segment_bounds(*bounds[st.send_chunk], segment_elems)
        recvs = segment_bounds(*bounds[st.recv_chunk], segment_elems)
        for k in range(max(len(sends), len(recvs))):
            builder.add(
                phase,
                st.step,
                k,
                st.send_to,
                sends[k] if k < len(sends) else None,
                st.recv_from,
                recvs[k] if k < len(recvs) else None,
                st.reduce,
            )


def ring_allreduce_plan(n_elems: int, rank: int, size: int, segment_elems: int) -> list[Transfer]:
    """Ring allreduce for ``n_elems`` elements: reduce-scatter then allgather.

    Chunks follow ``chunk_bounds(n_elems, size)``; after the reduce-scatter
    transfers rank ``r`` holds the reduced chunk ``r``, after the allgather
    transfers every rank holds every reduced chunk, bit-identical on all ranks
    (allgather copies, it never re-reduces). Empty for ``size == 1`` or
    ``n_elems == 0``.
    """
    rank, size = _rank(rank, size)
    bounds = chunk_bounds(n_elems, size)
    seg = _count(segment_elems, "segment_elems", 1)
    builder = _PlanBuilder()
    _add_ring_phase(builder, "reduce_scatter", ring_reduce_scatter(rank, size), bounds, seg)
    _add_ring_phase(builder, "allgather", ring_allgather(rank, size), bounds, seg)
    return builder.transfers


def reduce_scatter_plan(n_elems: int, rank: int, size: int, segment_elems: int) -> list[Transfer]:
    """Ring reduce-scatter: afterwards rank ``r`` holds ``chunk_bounds(n, size)[r]`` reduced.

    The rest of the buffer holds partial results and must not be used.
    """
    rank, size = _rank(rank, size)
    bounds = chunk_bounds(n_elems, size)
    seg = _count(segment_elems, "segment_elems", 1)
    builder = _PlanBuilder()
    _add_ring_phase(builder, "reduce_scatter", ring_reduce_scatter(rank, size), bounds, seg)
    return builder.transfers


def part_bounds(sizes: Sequence[int]) -> list[Slice]:
    """Offsets of variable-size parts laid end to end in one flat buffer."""
    bounds: list[Slice] = []
    start = 0
    for i, n in enumerate(sizes):
        stop = start + _count(n, f"size of part {i}")
        bounds.append((start, stop))
        start = stop
    return bounds


def allgather_plan(sizes: Sequence[int], rank: int, segment_elems: int) -> list[Transfer]:
    """Ring allgather of variable-size parts (part ``i`` comes from rank ``i``).

    The buffer is the concatenation of all parts, ``part_bounds(sizes)`` gives
    each part's slice; rank ``r`` starts with its own part in place. The group
    size is ``len(sizes)``; every rank must pass the same ``sizes`` (exchange
    shapes first).
    """
    rank, size = _rank(rank, len(sizes))
    bounds = part_bounds(sizes)
    seg = _count(segment_elems, "segment_elems", 1)
    builder = _PlanBuilder()
    _add_ring_phase(builder, "allgather", ring_allgather(rank, size), bounds, seg)
    return builder.transfers


# --------------------------------------------------------------------------
# binary tree; any root by relabelling: virtual rank v = (rank - root) % size


def _depth(v: int) -> int:
    return (v + 1).bit_length() - 1


def tree_parent(rank: int, size: int, root: int = 0) -> int | None:
    """Parent of ``rank`` in the binary tree rooted at ``root``; ``None`` for the root."""
    rank, size = _rank(rank, size)
    root, _ = _rank(root, size, "root")
    v = (rank - root) % size
    return None if v == 0 else ((v - 1) // 2 + root) % size


def tree_children(rank: int, size: int, root: int = 0) -> list[int]:
    """Children of ``rank`` (zero, one or two), left child first."""
    rank, size = _rank(rank, size)
    root, _ = _rank(root, size, "root")
    v = (rank - root) % size
    return [(c + root) % size for c in (2 * v + 1, 2 * v + 2) if c < size]


def _segments(n_elems: int, segment_elems: int | None) -> list[Slice]:
    n = _count(n_elems, "element count")
    seg = n if segment_elems is None else _count(segment_elems, "segment_elems", 1)
    return segment_bounds(0, n, max(seg, 1))


def _add_tree_reduce(
    builder: _PlanBuilder, rank: int, size: int, root: int, segs: list[Slice]
) -> None:
    height = _depth(size - 1)
    parent = tree_parent(rank, size, root)
    children = tree_children(rank, size, root)
    # An edge child -> parent runs at step height - depth(child): deepest first.
    for k, sl in enumerate(segs):
        for c in children:
            step = height - _depth((c - root) % size)
            builder.add("reduce", step, k, None, None, c, sl, True)
        if parent is not None:
            step = height - _depth((rank - root) % size)
            builder.add("reduce", step, k, parent, sl, None, None, False)


def _add_tree_broadcast(
    builder: _PlanBuilder, rank: int, size: int, root: int, segs: list[Slice]
) -> None:
    parent = tree_parent(rank, size, root)
    children = tree_children(rank, size, root)
    # An edge parent -> child runs at step depth(parent): root first.
    own = _depth((rank - root) % size)
    for k, sl in enumerate(segs):
        if parent is not None:
            builder.add("broadcast", own - 1, k, None, None, parent, sl, False)
        for c in children:
            builder.add("broadcast", own, k, c, sl, None, None, False)


def tree_reduce_plan(
    n_elems: int, rank: int, size: int, root: int = 0, segment_elems: int | None = None
) -> list[Transfer]:
    """Reduce up the binary tree: afterwards ``root`` holds the full reduction.

    Per segment: receive-and-reduce each child's partial (left child first,
    so the reduction order, and thus float rounding, is fixed), then send the
    result to the parent. ``segment_elems=None`` sends the whole array at once.
    """
    rank, size = _rank(rank, size)
    root, _ = _rank(root, size, "root")
    builder = _PlanBuilder()
    _add_tree_reduce(builder, rank, size, root, _segments(n_elems, segment_elems))
    return builder.transfers


def broadcast_plan(
    n_elems: int, rank: int, size: int, root: int = 0, segment_elems: int | None = None
) -> list[Transfer]:
    """Broadcast ``root``'s buffer down the binary tree (copies, segmented)."""
    rank, size = _rank(rank, size)
    root, _ = _rank(root, size, "root")
    builder = _PlanBuilder()
    _add_tree_broadcast(builder, rank, size, root, _segments(n_elems, segment_elems))
    return builder.transfers


def tree_allreduce_plan(
    n_elems: int, rank: int, size: int, root: int = 0, segment_elems: int | None = None
) -> list[Transfer]:
    """Tree allreduce: :func:`tree_reduce_plan` then :func:`broadcast_plan`.

    Every rank ends with the root's result, bit-identical.
    """
    rank, size = _rank(rank, size)
    root, _ = _rank(root, size, "root")
    segs = _segments(n_elems, segment_elems)
    builder = _PlanBuilder()
    _add_tree_reduce(builder, rank, size, root, segs)
    _add_tree_broadcast(builder, rank, size, root, segs)
    return builder.transfers


def direct_broadcast_plan(
    n_elems: int, rank: int, size: int, root: int = 0, segment_elems: int | None = None
) -> list[Transfer]:
    """Broadcast by the root to every other rank itself (copies, segmented).

    One level instead of the tree's ``D``: fewer hand-offs for small arrays,
    and over sockets on a loaded host no rank waits on a forwarding rank.
    The root sends segment-major, ``root + 1``, ``root + 2``, ... within a
    segment, so every rank gets its first segment early.
    """
    rank, size = _rank(rank, size)
    root, _ = _rank(root, size, "root")
    segs = _segments(n_elems, segment_elems)
    builder = _PlanBuilder()
    for k, seg in enumerate(segs):
        if rank == root:
            for j in range(1, size):
                builder.add("broadcast", 0, k, (root + j) % size, seg, None, None, False)
        else:
            builder.add("broadcast", 0, k, None, None, root, seg, False)
    return builder.transfers


def chain_broadcast_plan(
    n_elems: int, rank: int, size: int, root: int = 0, segment_elems: int | None = None
) -> list[Transfer]:
    """Broadcast along the chain ``root -> root + 1 -> ... -> root - 1`` (copies,
    segmented): each rank forwards a segment as soon as it has it.

    Every link carries the array once, the root's too (the tree's root sends it
    twice, the direct root ``size - 1`` times): where the wire is the limit the
    time is ``S / rate`` plus one segment per hop of pipeline fill.
    """
    rank, size = _rank(rank, size)
    root, _ = _rank(root, size, "root")
    segs = _segments(n_elems, segment_elems)
    v = (rank - root) % size
    builder = _PlanBuilder()
    for k, seg in enumerate(segs):
        if v > 0:  # the edge v - 1 -> v runs at step v - 1
            builder.add("broadcast", v - 1, k, None, None, (rank - 1) % size, seg, False)
        if v + 1 < size:
            builder.add("broadcast", v, k, (rank + 1) % size, seg, None, None, False)
    return builder.transfers


def direct_allgather_plan(sizes: Sequence[int], rank: int, segment_elems: int) -> list[Transfer]:
    """Allgather in one step: every rank sends its part to every other rank itself.

    The same bytes per rank as the ring (each part leaves its rank ``size - 1``
    times) but one step instead of ``size - 1``. Layout as :func:`allgather_plan`.
    """
    rank, size = _rank(rank, len(sizes))
    bounds = part_bounds(sizes)
    seg = _count(segment_elems, "segment_elems", 1)
    builder = _PlanBuilder()
    mine = segment_bounds(*bounds[rank], seg)
    for k, piece in enumerate(mine):
        for j in range(1, size):
            builder.add("allgather", rank, k, (rank + j) % size, piece, None, None, False)
    for j in range(1, size):
        q = (rank - j) % size
        for k, piece in enumerate(segment_bounds(*bounds[q], seg)):
            builder.add("allgather", q, k, None, None, q, piece, False)
    return builder.transfers


# --------------------------------------------------------------------------
# direct (one-shot) allreduce


def direct_allreduce_plan(
    n_elems: int, rank: int, size: int, segment_elems: int | None = None
) -> list[Transfer]:
    """Direct allreduce: one step, the latency-optimal plan for small arrays.

    First the sends: the whole input to every other rank, to ``rank + 1``,
    ``rank + 2``, ... (mod ``size``) so that the ranks do not all start with
    the same peer. Then one receive per rank in rank order ``0 .. size - 1``,
    the one from ``rank`` itself *local* (its own input, no message): the
    first copies, the others reduce, so every rank computes
    ``((x0 op x1) op x2) ...``, the same expression bit for bit (see "Local
    receives" above). Empty for ``n_elems == 0``; a lone rank copies its input.

    With ``segment_elems`` each send is cut into segments (segment-major: the
    first segment to every peer, then the second...) and the receives go
    segment by segment, each in rank order, so a rank reduces segment ``k``
    while ``k + 1`` is on the wire, and no message exceeds a segment (a huge
    one is received into a fresh, page-faulted allocation of its own).
    """
    rank, size = _rank(rank, size)
    n = _count(n_elems, "element count")
    if n == 0:
        return []
    segs = _segments(n, segment_elems)
    builder = _PlanBuilder()
    for s, piece in enumerate(segs):
        for k in range(1, size):
            builder.add("direct", 0, s, (rank + k) % size, piece, None, None, False)
    for s, piece in enumerate(segs):
        for q in range(size):
            builder.add("direct", 0, s, None, None, q, piece, q != 0)
    return builder.transfers


# --------------------------------------------------------------------------
# barrier


@dataclass(frozen=True, slots=True)
class BarrierRound:
    """Round ``round``: send a token to ``send_to``, wait for one from ``recv_from``."""

    round: int
    send_to: int
    recv_from: int


def barrier_schedule(rank: int, size: int) -> list[BarrierRound]:
    """Dissemination barrier: ``ceil(log2 size)`` rounds, none for size 1.

    In round ``k`` rank ``r`` signals ``r + 2**k`` and waits for ``r - 2**k``
    (mod size). A round's token may arrive before the rank reaches that round
    (a faster peer): keep early tokens keyed by (barrier id, round).
    """
    rank, size = _rank(rank, size)
    rounds = (size - 1).bit_length()
    return [
        BarrierRound(k, (rank + (1 << k)) % size, (rank - (1 << k)) % size) for k in range(rounds)
    ]


# --------------------------------------------------------------------------
# push-sum gossip


class PushSum:
    """Push-sum state of one rank (Kempe, Dobra, Gehrke, FOCS 2003).

    Each rank holds a value vector ``x`` (its input) and a weight ``w``
    (1.0). Each round it keeps one share of ``(x, w)`` and pushes the other
    ``out_degree`` equal shares to its gossip targets, then absorbs whatever
    shares arrive. The sums of all ``x`` and of all ``w`` over the group
    never change (mass conservation), so every ``x / w`` converges to the
    mean of the inputs; on a complete graph with random targets the relative
    error falls below ``eps`` after about ``O(log P + log 1/eps)`` rounds
    (:func:`push_sum_rounds`). Shares lost in flight (a rank stops early, a
    peer dies) remove a little mass whose ratio is already close to the
    mean, so the estimate stays a convex combination of the inputs.
    """

    __slots__ = ("x", "w")

    def __init__(self, x: ArrayLike, w: float = 1.0) -> None:
        arr = np.asarray(x)
        if arr.dtype.kind not in "biufc":
            raise ConfigError(f"push-sum averages numbers, not dtype {arr.dtype}")
        dtype = np.result_type(arr.dtype, np.float64)
        self.x: np.ndarray = np.array(arr, dtype=dtype)  # our own copy: we mutate it
        self.w: float = float(w)
        if not self.w > 0.0:
            raise ConfigError(f"push-sum weight must be > 0, got {w}")

    def split(self, out_degree: int) -> list[tuple[np.ndarray, float]]:
        """Keep one of ``out_degree + 1`` equal shares; return the others to send.

        The returned shares are one read-only array repeated (send it
        zero-copy to every target); this rank's ``x`` is a separate buffer.
        """
        k = _count(out_degree, "out_degree") + 1
        share = self.x / k
        share.flags.writeable = False  # shared by every target, possibly in flight
        np.divide(self.x, k, out=self.x)
        self.w /= k
        return [(share, self.w)] * (k - 1)

    def absorb(self, x: np.ndarray, w: float) -> None:
        """Add a share received from a peer."""
        if np.shape(x) != self.x.shape:
            raise ConfigError(
                f"push-sum share has shape {np.shape(x)}, this rank averages {self.x.shape}"
            )
        np.add(self.x, x, out=self.x)
        self.w += float(w)

    def estimate(self) -> np.ndarray:
        """The current estimate of the mean, ``x / w`` (a new array)."""
        return self.x / self.w


def gossip_targets(
    rank: int,
    size: int,
    round: int,  # noqa: A002 - the name the API uses
    fanout: int,
    rng: np.random.Generator | None,
    peers: Sequence[int] | None = None,
) -> list[int]:
    """Ranks that ``rank`` pushes to in round ``round``; never itself.

    ``peers`` restricts the choice to a neighbour list (default: the whole
    group). With ``rng`` the targets are ``min(fanout, len(peers))`` distinct
    uniform picks, deterministic for a seeded generator; with ``rng=None``
    they rotate through the peers by round, so every peer is reached.
    """
    rank, size = _rank(rank, size)
    rnd = _count(round, "round")
    fanout = _count(fanout, "fanout", 1)
    if peers is None:
        candidates = [p for p in range(size) if p != rank]
    else:
        candidates = sorted({_rank(p, size, "peer")[0] for p in peers} - {rank})
    k = min(fanout, len(candidates))
    if k == 0:
        return []
    if rng is not None:
        picks = rng.choice(len(candidates), size=k, replace=False)
        return [candidates[int(i)] for i in picks]
    first = rnd * k
    return [candidates[(first + i) % len(candidates)] for i in range(k)]


def push_sum_rounds(size: int, eps: float = 1e-6, fanout: int = 1) -> int:
    """Synchronous rounds for push-sum on a complete graph to reach ``eps``.

    The error is ``max |estimate - mean| <= eps * max |input|`` on every
    rank. ``O(log P + log 1/eps)``: ``2 log2 P + 2 log2(1/eps) + 10``. The
    constant is measured (random targets, fanout 1, 100-200 seeds per point):
    the worst runs seen needed 48 rounds for P=64, eps=1e-6 (this gives 62)
    and 86 for P=128, eps=1e-12 (this gives 104); the tests pin it. More
    fanout mixes faster, so this is conservative for fanout > 1. Sparse
    neighbour graphs need more (their mixing time): run to a tolerance there.
    """
    size = _count(size, "group size", 1)
    _count(fanout, "fanout", 1)
    if not 0.0 < eps < 1.0:
        raise ConfigError(f"eps must be in (0, 1), got {eps}")
    if size == 1:
        return 0
    return int(np.ceil(2.0 * np.log2(size) + 2.0 * np.log2(1.0 / eps))) + 10


# --------------------------------------------------------------------------
# algorithm choice


def direct_bytes_for(size: int) -> int:
    """Array size below which ``"auto"`` takes the direct plan in a group of ``size``."""
    size = _count(size, "group size", 1)
    if size in DEFAULT_DIRECT_BYTES:
        return DEFAULT_DIRECT_BYTES[size]
    last = max(DEFAULT_DIRECT_BYTES)
    if size < last:  # size 1: nothing to exchange, any value will do
        return DEFAULT_DIRECT_BYTES[min(DEFAULT_DIRECT_BYTES)]
    return DEFAULT_DIRECT_BYTES[last] * (last - 1) // (size - 1)


def crossover_bytes_for(size: int) -> int:
    """Array size from which ``"auto"`` takes the ring (below: the tree) in a group of ``size``."""
    size = _count(size, "group size", 1)
    return DEFAULT_CROSSOVER_BY_SIZE.get(size, DEFAULT_CROSSOVER_BYTES)


def broadcast_algorithm(nbytes: int, size: int) -> Literal["direct", "tree"]:
    """``"direct"`` (the root sends to each rank) with 2 ranks, or up to
    :data:`DIRECT_MAX_GROUP` ranks and :data:`BROADCAST_DIRECT_BYTES`; else ``"tree"``."""
    nbytes = _count(nbytes, "nbytes")
    size = _count(size, "group size", 1)
    if size <= 2 or (size <= DIRECT_MAX_GROUP and nbytes <= BROADCAST_DIRECT_BYTES):
        return "direct"
    return "tree"


def allgather_algorithm(nbytes: int, size: int) -> Literal["direct", "ring"]:
    """``"direct"`` (every rank sends its part to each) with 2 ranks, or up to
    :data:`DIRECT_MAX_GROUP` ranks and :data:`ALLGATHER_DIRECT_BYTES` (all parts
    together, ``nbytes``); else ``"ring"``."""
    nbytes = _count(nbytes, "nbytes")
    size = _count(size, "group size", 1)
    if size <= 2 or (size <= DIRECT_MAX_GROUP and nbytes <= ALLGATHER_DIRECT_BYTES):
        return "direct"
    return "ring"


# Over tcp (every pair of the group on a bulk tcp stream: other hosts, where the
# wire is what limits a large collective), groups of 3 or more: a broadcast from
# TCP_BROADCAST_CHAIN_BYTES goes down a chain in segments (chain_broadcast_plan),
# below that as broadcast_algorithm() says; allreduce takes the ring from where it
# stops taking the direct plan. Measured 2026-12-06 between namespace hosts whose
# links were limited to 1 Gbit/s (bench/collectives.py --tcp --lan-rate 1gbit), 4
# ranks: the tree broadcast's root sends 2 S (2.0x the wire floor at 64 MiB), the
# tree allreduce moved 2-3x the ring's bytes through its root (2.8x Gloo's time at
# 1-4 MiB). On tcp loopback (the 2 cores, not a wire, the limit) the ring is still
# 0.55-0.8x Gloo's time at 256 KiB-4 MiB, while the chain (and a scatter +
# allgather broadcast, tried too) took 1.3-1.5x the direct plan's time up to 4 MiB:
# a direct broadcast's root sends 3 S, which on a slow wire costs 1.07-1.24x Gloo's
# time at 256 KiB-1 MiB (4 ranks, 1 Gbit/s); so members on different hosts plan
# otherwise (TCP_CHAIN_ACROSS_BYTES below), members of one host as here.
TCP_BROADCAST_CHAIN_BYTES = 32 * _MiB
# A chain segment: small enough that the pipeline fills quickly (S / 32), large
# enough that per-message costs stay small.
CHAIN_SEGMENT_MIN = 1 * _MiB


# Members on different hosts (2026-12-06, 4 ranks, bench/collectives.py --tcp --lan and
# --lan-rate 1gbit, every forwarding rank relaying cut-through: tcp_bulk
# RecvRequest.relay): the direct plan's root sends 3 S, which on a 1 Gbit/s wire took
# 1.1-1.6x Gloo's time at 256 KiB-4 MiB; the tree's root sends 2 S (0.6-0.95x Gloo
# there, 0.7-1.0x on the unlimited namespace LAN, where 2 cores, not the wire, are
# the limit); the chain's root S (0.34-0.39x Gloo from 1 MiB at 1 Gbit/s; on the
# unlimited LAN 0.75-0.9x from 16 MiB, 0.8-1.06x at 4 MiB where the tree had
# 0.7-0.74x, 1.1-1.4x below: three hops of latency). So across hosts the tree below
# TCP_CHAIN_ACROSS_BYTES, the chain from there on.
# Members of one host (shm off: tests, benchmarks) keep the plans above: there the
# CPU is the limit and the direct plan has no forwarding hop (loopback, 4 ranks,
# relayed tree 0.99-1.26x the direct plan's median time at 256 KiB-16 MiB).
TCP_CHAIN_ACROSS_BYTES = 16 * _MiB


def broadcast_algorithm_over_tcp(
    nbytes: int, size: int, across_hosts: bool = False
) -> Literal["direct", "tree", "chain"]:
    """:func:`broadcast_algorithm` for a group whose pairs all have bulk tcp streams:
    the chain (:func:`chain_broadcast_plan`) from TCP_BROADCAST_CHAIN_BYTES; with
    ``across_hosts`` (its members are not all on one host: the wire, not the CPU,
    binds) and 3 or more ranks never the direct plan: the tree below
    TCP_CHAIN_ACROSS_BYTES, the chain from there on. Every rank must pass the same
    ``across_hosts`` (the group agrees on it at formation)."""
    nbytes = _count(nbytes, "nbytes")
    size = _count(size, "group size", 1)
    if size > 2 and across_hosts:
        return "chain" if nbytes >= TCP_CHAIN_ACROSS_BYTES else "tree"
    if size > 2 and nbytes >= TCP_BROADCAST_CHAIN_BYTES:
        return "chain"
    return broadcast_algorithm(nbytes, size)


def chain_segment_bytes(nbytes: int, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> int:
    """Segment of a chain broadcast of ``nbytes``: S / 32 within [1 MiB, segment_bytes]."""
    return max(1, min(segment_bytes, max(CHAIN_SEGMENT_MIN, nbytes // 32)))


def crossover_bytes_over_tcp(size: int) -> int | None:
    """``crossover_bytes`` for a group whose pairs all have bulk tcp streams: with 3 or
    more ranks the ring from where the direct plan stops (never the tree, whose root
    carries 2 S each way); None (the ordinary default) for 2."""
    size = _count(size, "group size", 1)
    return direct_bytes_for(size) if size >= 3 else None


# With every pair of the group on a bulk tcp stream (received straight into
# place, mesh/engine/bulk_tcp.py), the ring's allgather half costs no copy, and
# with 2 ranks the ring (which reduces half the array) beats the direct plan
# (which reduces all of it) from this size on: 2 ranks, tcp loopback, shm off,
# 2026-12-06, ring 9.0 / 37.6 ms against direct 10.1 / 41.5 ms at 16 / 64 MiB.
TCP_DIRECT_BYTES: dict[int, int] = {2: 4 * _MiB}


def direct_bytes_over_tcp(size: int) -> int | None:
    """``direct_bytes`` for a group whose pairs all agreed on bulk tcp streams (None:
    the ordinary default, :func:`direct_bytes_for`)."""
    return TCP_DIRECT_BYTES.get(size)


def choose_algorithm(
    nbytes: int,
    size: int,
    crossover_bytes: int | None = None,
    direct_bytes: int | None = None,
) -> Algorithm:
    """``"direct"`` below ``direct_bytes``, else ``"tree"`` below ``crossover_bytes``,
    ``"ring"`` at or above it.

    ``None`` takes the measured defaults for this group size:
    :func:`direct_bytes_for` and :func:`crossover_bytes_for`. On the local
    processes bench/collectives.py runs, one step of the direct plan beats the
    tree's ``2 log2 P`` and the ring's ``2 (P - 1)`` Python-level hops, as long
    as its ``(P - 1) S`` bytes per rank do not cost more (always with 2 ranks,
    up to ~128 KiB with 3-4 on 2 cores); the tree wins up to about 8 MiB.
    """
    nbytes = _count(nbytes, "nbytes")
    size = _count(size, "group size", 1)
    cross = crossover_bytes_for(size) if crossover_bytes is None else _count(
        crossover_bytes, "crossover_bytes")
    direct = direct_bytes_for(size) if direct_bytes is None else _count(direct_bytes, "direct_bytes")
    if size <= 1:
        return "ring"
    if nbytes < direct:
        return "direct"
    if nbytes >= cross:
        return "ring"
    return "tree"

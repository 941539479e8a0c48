"""Pure tests of the collective schedules and reductions (no sockets, no threads).

Plans are executed by an in-memory simulator: every rank walks its own plan
(post the send, then wait for the receive), messages queue per (sender,
receiver) pair, and ranks are stepped in a random interleaving. Sends carry
a *view* of the sender's buffer, as a zero-copy send does, so a schedule that
overwrote a slice still in flight is caught. Contribution matrices (one
column per rank, one-hot) make every double count or miss visible, and
symbolic inputs (expression trees) show the exact reduction order.
"""

from __future__ import annotations

import random
import zlib
from collections import defaultdict, deque
from collections.abc import Callable
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.collectives import reduce as red
from mesh.collectives import schedule as sch
from mesh.collectives.schedule import Transfer
from mesh.errors import ConfigError, MeshError

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sizes = st.integers(1, 64)
counts = st.integers(0, 500)

SendCheck = Callable[[int, Transfer, np.ndarray], None]


# --------------------------------------------------------------------------
# simulator


def simulate(
    plans: list[list[Transfer]],
    bufs: list[np.ndarray],
    op: str = "sum",
    seed: int = 0,
    check_send: SendCheck | None = None,
    src: list[np.ndarray] | None = None,
) -> None:
    """Run every rank's plan to completion; fail on deadlock, mismatch or hazard.

    ``src``: the ranks' inputs, kept apart from ``bufs`` as the executor does
    for plans with local receives (direct): sends that carry the rank's own
    input (``send_after is None``) and local receives read it.
    """
    size = len(plans)
    rnd = random.Random(seed)
    chans: dict[tuple[int, int], deque] = defaultdict(deque)
    pc = [0] * size
    sent = [False] * size  # the current transfer's send is already posted

    def advance(r: int, budget: int) -> bool:
        moved = False
        while budget > 0 and pc[r] < len(plans[r]):
            t = plans[r][pc[r]]
            if t.send is not None and not sent[r]:
                assert t.send_to is not None and t.send_to != r
                own = src is not None and t.send_after is None
                view = (src[r] if own else bufs[r])[t.send[0] : t.send[1]]  # type: ignore[index]
                if check_send is not None:
                    check_send(r, t, view)
                chans[(r, t.send_to)].append((t.tag, t.send, view, view.copy()))
                sent[r] = moved = True
            if t.recv is not None and t.recv_from == r:  # local: the rank's own input
                assert src is not None, "a local receive needs the inputs apart (src)"
                view = src[r][t.recv[0] : t.recv[1]]
                dst = bufs[r][t.recv[0] : t.recv[1]]
                if t.reduce:
                    red.reduce_into(op, dst, view)
                else:
                    dst[...] = view
            elif t.recv is not None:
                q = chans[(t.recv_from, r)]
                if not q:
                    return moved
                tag, sl, view, snapshot = q.popleft()
                assert tag == t.tag, f"rank {r} expected {t.tag} from {t.recv_from}, got {tag}"
                assert sl == t.recv, f"slice mismatch {sl} != {t.recv} at {t.tag}"
                # zero-copy hazard: the sender must not have touched the slice
                assert np.array_equal(view, snapshot, equal_nan=view.dtype.kind in "fc")
                dst = bufs[r][t.recv[0] : t.recv[1]]
                if t.reduce:
                    red.reduce_into(op, dst, view)
                else:
                    dst[...] = view
            pc[r] += 1
            sent[r] = False
            moved = True
            budget -= 1
        return moved

    while any(pc[r] < len(plans[r]) for r in range(size)):
        order = list(range(size))
        rnd.shuffle(order)
        progress = False
        for r in order:
            progress |= advance(r, rnd.randint(1, 4))
        if not progress:
            stuck = {r: plans[r][pc[r]].tag for r in range(size) if pc[r] < len(plans[r])}
            pytest.fail(f"deadlock: ranks waiting at {stuck}")
    assert all(not q for q in chans.values()), "messages left unreceived"


def one_hot(n: int, size: int) -> list[np.ndarray]:
    """Rank r's buffer: n rows, a 1 in column r. Reduced, every cell must be exactly 1."""
    bufs = []
    for r in range(size):
        b = np.zeros((n, size), dtype=np.int64)
        b[:, r] = 1
        bufs.append(b)
    return bufs


def contributors_ring_rs(rank: int, step: int, size: int) -> np.ndarray:
    """Which columns a reduce-scatter send of rank at step must carry: rank-step..rank."""
    want = np.zeros(size, dtype=np.int64)
    want[[(rank - i) % size for i in range(step + 1)]] = 1
    return want


# --------------------------------------------------------------------------
# splitting


@given(n=st.integers(0, 10_000), parts=st.integers(1, 200))
def test_chunk_bounds_partition(n: int, parts: int) -> None:
    b = sch.chunk_bounds(n, parts)
    assert len(b) == parts and b[0][0] == 0 and b[-1][1] == n
    assert all(b[i][1] == b[i + 1][0] for i in range(parts - 1))
    lens = [stop - start for start, stop in b]
    assert max(lens) - min(lens) <= 1 and lens == sorted(lens, reverse=True)
    assert sum(1 for x in lens if x == lens[0]) >= 1


def test_chunk_bounds_edges() -> None:
    assert sch.chunk_bounds(0, 3) == [(0, 0)] * 3
    assert sch.chunk_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert sch.chunk_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert sch.chunk_bounds(5, 1) == [(0, 5)]


@given(start=st.integers(0, 1000), length=st.integers(0, 1000), seg=st.integers(1, 300))
def test_segment_bounds(start: int, length: int, seg: int) -> None:
    b = sch.segment_bounds(start, start + length, seg)
    assert sum(y - x for x, y in b) == length
    assert all(y - x == seg for x, y in b[:-1]) and all(0 < y - x <= seg for x, y in b)
    if b:
        assert b[0][0] == start and b[-1][1] == start + length


@pytest.mark.parametrize(
    "call",
    [
        lambda: sch.chunk_bounds(-1, 2),
        lambda: sch.chunk_bounds(3, 0),
        lambda: sch.chunk_bounds(2.5, 2),
        lambda: sch.segment_bounds(0, 10, 0),
        lambda: sch.segment_bounds(5, 4, 1),
        lambda: sch.ring_allreduce_plan(10, 4, 4, 1),
        lambda: sch.ring_allreduce_plan(10, -1, 4, 1),
        lambda: sch.ring_allreduce_plan(10, 0, 0, 1),
        lambda: sch.tree_parent(0, 4, root=4),
        lambda: sch.barrier_schedule(3, 2),
        lambda: sch.allgather_plan([1, -2], 0, 1),
        lambda: sch.choose_algorithm(-1, 4),
        lambda: sch.choose_algorithm(10, 4, direct_bytes=-1),
        lambda: sch.direct_allreduce_plan(10, 2, 2),
        lambda: sch.direct_allreduce_plan(-1, 0, 2),
        lambda: sch.direct_bytes_for(0),
        lambda: sch.crossover_bytes_for(0),
        lambda: sch.gossip_targets(0, 4, 0, 0, None),
        lambda: sch.push_sum_rounds(4, eps=0.0),
    ],
)
def test_bad_arguments_raise_config_error(call: Callable[[], object]) -> None:
    with pytest.raises(ConfigError):
        call()


# --------------------------------------------------------------------------
# ring allreduce


def test_ring_step_conventions() -> None:
    size = 5
    for r in range(size):
        rs = sch.ring_reduce_scatter(r, size)
        ag = sch.ring_allgather(r, size)
        assert len(rs) == len(ag) == size - 1
        assert rs[-1].recv_chunk == r  # rank r owns chunk r after reduce-scatter
        assert ag[0].send_chunk == r
        assert {s.recv_chunk for s in ag} == set(range(size)) - {r}
        for a, b in pairwise(rs):
            assert b.send_chunk == a.recv_chunk  # forward what was just reduced
        assert all(s.send_to == (r + 1) % size and s.recv_from == (r - 1) % size for s in rs)
    assert sch.ring_reduce_scatter(0, 1) == [] and sch.ring_allgather(0, 1) == []


@FAST
@given(size=sizes, n=counts, seg=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_ring_allreduce_counts_every_contribution_once(
    size: int, n: int, seg: int, seed: int
) -> None:
    plans = [sch.ring_allreduce_plan(n, r, size, seg) for r in range(size)]
    bufs = one_hot(n, size)

    def check(r: int, t: Transfer, data: np.ndarray) -> None:
        # a rank sends only what it has: partial sums of exactly the ranks
        # upstream of it in reduce-scatter, finished chunks in allgather
        want = contributors_ring_rs(r, t.step, size) if t.phase == "reduce_scatter" else 1
        assert np.array_equal(data, np.broadcast_to(want, data.shape)), (r, t)

    simulate(plans, bufs, "sum", seed, check)
    for b in bufs:
        assert np.array_equal(b, np.ones((n, size), dtype=np.int64))


@FAST
@given(size=st.integers(1, 24), n=st.integers(0, 200), seg=st.integers(1, 50))
def test_ring_plan_structure(size: int, n: int, seg: int) -> None:
    bounds = sch.chunk_bounds(n, size)
    for r in range(size):
        plan = sch.ring_allreduce_plan(n, r, size, seg)
        assert [t.index for t in plan] == list(range(len(plan)))
        sent = sum(t.send[1] - t.send[0] for t in plan if t.send is not None)
        # bandwidth term: 2 (P-1)/P * n, exactly 2n minus the two chunks never sent
        own, nxt = bounds[r], bounds[(r + 1) % size]
        expect = 0 if size == 1 else 2 * n - (own[1] - own[0]) - (nxt[1] - nxt[0])
        assert sent == expect
        for t in plan:
            assert t.send is None or t.send[1] > t.send[0]  # no empty messages
            assert t.recv is None or t.recv[1] > t.recv[0]
            assert t.reduce == (t.phase == "reduce_scatter" and t.recv is not None)
            if t.send_after is not None:
                dep = plan[t.send_after]
                assert dep.index < t.index and dep.recv == t.send
                # pipelining: segment k of step s+1 waits only on segment k of step s
                assert dep.segment == t.segment
            elif t.send is not None:
                assert t.phase == "reduce_scatter" and t.step == 0
        keys = [(t.phase, t.step, t.segment) for t in plan]
        assert keys == sorted(keys, key=lambda k: (k[0] != "reduce_scatter", k[1], k[2]))


def test_ring_trivial_cases() -> None:
    assert sch.ring_allreduce_plan(100, 0, 1, 7) == []
    assert all(sch.ring_allreduce_plan(0, r, 5, 7) == [] for r in range(5))
    # n < size: empty chunks are skipped, the rest still flows
    plans = [sch.ring_allreduce_plan(2, r, 7, 1) for r in range(7)]
    bufs = one_hot(2, 7)
    simulate(plans, bufs)
    assert all(np.array_equal(b, np.ones((2, 7), dtype=np.int64)) for b in bufs)


OP_DTYPES = [
    ("sum", np.int64),
    ("sum", np.int8),
    ("sum", np.float64),
    ("mean", np.int32),
    ("mean", np.float32),
    ("mean", np.float16),
    ("min", np.int16),
    ("max", np.float64),
    ("max", np.bool_),
    ("prod", np.int64),
    ("prod", np.float64),
]


def random_inputs(rng: np.random.Generator, size: int, n: int, dtype: type) -> list[np.ndarray]:
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return [rng.integers(0, 2, n).astype(dt) for _ in range(size)]
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return [
            rng.integers(max(info.min, -100), min(info.max, 100), n, dtype=dt) for _ in range(size)
        ]
    return [(rng.standard_normal(n) * 4).astype(dt) for _ in range(size)]


def check_result(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype.kind in "fc":
        tol = 1e-2 if want.dtype == np.float16 else 1e-5
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    else:
        assert np.array_equal(got, want)


def has_local(plan: list[Transfer], rank: int) -> bool:
    return any(t.recv is not None and t.recv_from == rank for t in plan)


def run_allreduce(
    plan_for: Callable[[int], list[Transfer]],
    inputs: list[np.ndarray],
    op: str,
    seed: int,
) -> list[np.ndarray]:
    size = len(inputs)
    plans = [plan_for(r) for r in range(size)]
    accs = [red.accumulator(op, x) for x in inputs]
    if any(has_local(p, r) for r, p in enumerate(plans)):
        # direct: the buffer starts as garbage, the input stays apart
        bufs = [garbage_like(a) for a in accs]
        simulate(plans, bufs, op, seed, src=accs)
    else:
        bufs = accs
        simulate(plans, bufs, op, seed)
    return [red.finalize(op, b, size, inputs[0].dtype) for b in bufs]


def garbage_like(a: np.ndarray) -> np.ndarray:
    """What an uninitialised result buffer might hold: a plan must overwrite it all."""
    out = np.empty_like(a)
    out[...] = 3 if a.dtype.kind != "b" else True
    return out


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(1, 12),
    n=st.integers(0, 60),
    seg=st.integers(1, 16),
    case=st.sampled_from(OP_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_ring_tree_direct_allreduce_values(
    size: int, n: int, seg: int, case: tuple[str, type], seed: int
) -> None:
    op, dtype = case
    rng = np.random.default_rng(seed)
    inputs = random_inputs(rng, size, n, dtype)
    want = red.reference_allreduce(inputs, op)
    root = seed % size
    for plan_for in (
        lambda r: sch.ring_allreduce_plan(n, r, size, seg),
        lambda r: sch.tree_allreduce_plan(n, r, size, root, seg),
        lambda r: sch.tree_allreduce_plan(n, r, size, root),
        lambda r: sch.direct_allreduce_plan(n, r, size),
        lambda r: sch.direct_allreduce_plan(n, r, size, seg),
    ):
        outs = run_allreduce(plan_for, inputs, op, seed)
        for o in outs:
            check_result(o, want)
            assert o.tobytes() == outs[0].tobytes()  # bit-identical on every rank


# --------------------------------------------------------------------------
# direct (one-shot)


@FAST
@given(size=st.integers(1, 16), n=counts, seed=st.integers(0, 2**16))
def test_direct_allreduce_counts_every_contribution_once(size: int, n: int, seed: int) -> None:
    # Segmented plans have size**2 * (n / seg) transfers: 16 ranks keep an example
    # within a second (64 ranks with 1-element segments took minutes to simulate).
    seg = None if seed % 2 else 1 + seed % 7
    plans = [sch.direct_allreduce_plan(n, r, size, seg) for r in range(size)]
    inputs = one_hot(n, size)
    bufs = [garbage_like(b) for b in inputs]

    def check(r: int, t: Transfer, data: np.ndarray) -> None:
        assert np.array_equal(data, inputs[r][t.send[0] : t.send[1]])  # only its own input

    simulate(plans, bufs, "sum", seed, check, src=inputs)
    for b in bufs:  # every rank holds every element, each input counted once
        assert np.array_equal(b, np.ones((n, size), dtype=np.int64))


@given(size=st.integers(1, 40), n=st.integers(0, 50))
def test_direct_plan_structure(size: int, n: int) -> None:
    for r in range(size):
        plan = sch.direct_allreduce_plan(n, r, size)
        if n == 0:
            assert plan == []
            continue
        assert [t.index for t in plan] == list(range(len(plan)))
        sends = [t for t in plan if t.send is not None]
        recvs = [t for t in plan if t.recv is not None]
        assert plan == sends + recvs  # one step: every send posted before any wait
        # the whole input to each peer once, starting with the next rank
        assert [t.send_to for t in sends] == [(r + k) % size for k in range(1, size)]
        assert all(t.send == (0, n) and t.send_after is None for t in sends)
        # rank order, this rank's own input local; the first copies, the rest reduce
        assert [t.recv_from for t in recvs] == list(range(size))
        assert all(t.recv == (0, n) for t in recvs)
        assert [t.reduce for t in recvs] == [False] + [True] * (size - 1)
        assert {t.tag for t in plan} == {("direct", 0, 0)}
        # the receive from q carries what q sends to r
        for t in recvs:
            if t.recv_from != r:
                theirs = sch.direct_allreduce_plan(n, t.recv_from, size)
                assert [u.tag for u in theirs if u.send_to == r] == [t.tag]


@given(size=st.integers(1, 12), n=st.integers(0, 50), seg=st.integers(1, 20))
def test_direct_plan_segmented_structure(size: int, n: int, seg: int) -> None:
    for r in range(size):
        plan = sch.direct_allreduce_plan(n, r, size, seg)
        segs = sch.segment_bounds(0, n, seg)
        sends = [t for t in plan if t.send is not None]
        recvs = [t for t in plan if t.recv is not None]
        assert plan == sends + recvs  # every send posted before any wait
        # segment-major: each segment to every peer, starting with the next rank
        assert [(t.send, t.send_to) for t in sends] == [
            (p, (r + k) % size) for p in segs for k in range(1, size)]
        assert all(t.send_after is None for t in sends)
        # segment by segment, rank order within a segment; the first copies
        assert [(t.recv, t.recv_from) for t in recvs] == [(p, q) for p in segs for q in range(size)]
        assert [t.reduce for t in recvs] == [q != 0 for _ in segs for q in range(size)]
        for t in recvs:  # the receive from q carries what q sends to r
            if t.recv_from != r:
                theirs = sch.direct_allreduce_plan(n, t.recv_from, size, seg)
                assert [u.tag for u in theirs if u.send_to == r and u.send == t.recv] == [t.tag]


class Expr:
    """A symbolic value: ``a + b`` builds the expression tree, in operand order."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __add__(self, other: Expr) -> Expr:
        return Expr(f"({self.text}+{other.text})")

    def leaves(self) -> list[str]:
        return sorted(self.text.replace("(", " ").replace(")", " ").replace("+", " ").split())


def symbolic_inputs(n: int, size: int) -> list[np.ndarray]:
    out = []
    for r in range(size):
        a = np.empty(n, dtype=object)
        a[:] = [Expr(f"x{r}_{i}") for i in range(n)]
        out.append(a)
    return out


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 9), n=st.integers(0, 30), seg=st.integers(1, 8),
       seed=st.integers(0, 2**16))
def test_reduction_order_is_identical_on_every_rank(size: int, n: int, seg: int, seed: int) -> None:
    """Floating-point sums are bit-identical only if every rank evaluates the same
    expression: same operands, same order, same grouping (+ need not be associative)."""
    root = seed % size
    for name, plan_for in (
        ("ring", lambda r: sch.ring_allreduce_plan(n, r, size, seg)),
        ("tree", lambda r: sch.tree_allreduce_plan(n, r, size, root, seg)),
        ("direct", lambda r: sch.direct_allreduce_plan(n, r, size)),
    ):
        plans = [plan_for(r) for r in range(size)]
        inputs = symbolic_inputs(n, size)
        if name == "direct":
            bufs = [np.full(n, None, dtype=object) for _ in range(size)]
            simulate(plans, bufs, "sum", seed, src=inputs)
        else:
            bufs = inputs
            simulate(plans, bufs, "sum", seed)
        for i in range(n):
            texts = {b[i].text for b in bufs}
            assert len(texts) == 1, (name, i, texts)  # the same expression everywhere
            assert bufs[0][i].leaves() == sorted(f"x{r}_{i}" for r in range(size)), name
            if name == "direct":  # a left fold in rank order: ((x0+x1)+x2)...
                want = f"x0_{i}"
                for r in range(1, size):
                    want = f"({want}+x{r}_{i})"
                assert bufs[0][i].text == want


# --------------------------------------------------------------------------
# tree


@given(size=st.integers(1, 70), root=st.integers(0, 69))
def test_tree_shape(size: int, root: int) -> None:
    root %= size
    assert sch.tree_parent(root, size, root) is None
    for r in range(size):
        for c in sch.tree_children(r, size, root):
            assert sch.tree_parent(c, size, root) == r
        # every rank reaches the root, in at most log2(size) hops
        hops, cur = 0, r
        while (p := sch.tree_parent(cur, size, root)) is not None:
            cur, hops = p, hops + 1
        assert cur == root and hops <= size.bit_length()
    assert sum(len(sch.tree_children(r, size, root)) for r in range(size)) == size - 1


@FAST
@given(
    size=sizes,
    n=st.integers(0, 120),
    root=st.integers(0, 63),
    seg=st.none() | st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_tree_allreduce_counts_every_contribution_once(
    size: int, n: int, root: int, seg: int | None, seed: int
) -> None:
    root %= size
    plans = [sch.tree_allreduce_plan(n, r, size, root, seg) for r in range(size)]
    bufs = one_hot(n, size)
    simulate(plans, bufs, "sum", seed)
    for b in bufs:
        assert np.array_equal(b, np.ones((n, size), dtype=np.int64))


@FAST
@given(size=sizes, n=st.integers(0, 80), root=st.integers(0, 63), seed=st.integers(0, 2**16))
def test_tree_reduce_reaches_root(size: int, n: int, root: int, seed: int) -> None:
    root %= size
    plans = [sch.tree_reduce_plan(n, r, size, root) for r in range(size)]
    bufs = one_hot(n, size)
    simulate(plans, bufs, "sum", seed)
    assert np.array_equal(bufs[root], np.ones((n, size), dtype=np.int64))


# --------------------------------------------------------------------------
# broadcast, allgather, reduce-scatter


@FAST
@given(
    size=sizes,
    n=counts,
    root=st.integers(0, 63),
    seg=st.none() | st.integers(1, 100),
    seed=st.integers(0, 2**16),
)
def test_broadcast_from_any_root(size: int, n: int, root: int, seg: int | None, seed: int) -> None:
    root %= size
    data = np.arange(1, n + 1, dtype=np.int64) * 7
    bufs = [data.copy() if r == root else np.full(n, -1, dtype=np.int64) for r in range(size)]

    def check(r: int, t: Transfer, sent: np.ndarray) -> None:
        assert (sent != -1).all()  # only forwards what it has received

    for plan_for in (sch.broadcast_plan, sch.direct_broadcast_plan, sch.chain_broadcast_plan):
        bufs = [data.copy() if r == root else np.full(n, -1, dtype=np.int64)
                for r in range(size)]
        plans = [plan_for(n, r, size, root, seg) for r in range(size)]
        simulate(plans, bufs, "sum", seed, check)
        assert all(np.array_equal(b, data) for b in bufs)
    direct = [sch.direct_broadcast_plan(n, r, size, root, seg) for r in range(size)]
    for r, plan in enumerate(direct):  # one level: only the root sends, each segment once per rank
        if r != root:
            assert all(t.send is None and t.recv_from == root for t in plan)
        else:
            assert all(t.recv is None for t in plan)
            assert len(plan) == (size - 1) * len(sch.segment_bounds(0, n, seg or max(n, 1)))
    nseg = len(sch.segment_bounds(0, n, seg or max(n, 1)))
    for r in range(size):  # chain: each rank hears its predecessor, sends to its successor
        plan = sch.chain_broadcast_plan(n, r, size, root, seg)
        v = (r - root) % size
        assert sum(t.send is not None for t in plan) == (nseg if v + 1 < size else 0)
        assert all(t.send_to == (r + 1) % size for t in plan if t.send is not None)
        assert all(t.recv_from == (r - 1) % size for t in plan if t.recv is not None)


@FAST
@given(
    parts=st.lists(st.integers(0, 30), min_size=1, max_size=64),
    seg=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_allgather_variable_parts(parts: list[int], seg: int, seed: int) -> None:
    size = len(parts)
    bounds = sch.part_bounds(parts)
    total = bounds[-1][1]
    full = np.arange(1, total + 1, dtype=np.int64)
    bufs = []
    for r in range(size):
        b = np.full(total, -1, dtype=np.int64)
        b[bounds[r][0] : bounds[r][1]] = full[bounds[r][0] : bounds[r][1]]
        bufs.append(b)

    def check(r: int, t: Transfer, sent: np.ndarray) -> None:
        assert (sent != -1).all()

    starts = [b.copy() for b in bufs]
    for plan_for in (sch.allgather_plan, sch.direct_allgather_plan):
        bufs = [b.copy() for b in starts]
        plans = [plan_for(parts, r, seg) for r in range(size)]
        simulate(plans, bufs, "sum", seed, check)
        assert all(np.array_equal(b, full) for b in bufs)
    for r in range(size):  # direct: every send is this rank's own part, posted at once
        for t in sch.direct_allgather_plan(parts, r, seg):
            if t.send is not None:
                assert t.send_after is None and bounds[r][0] <= t.send[0] < t.send[1] <= bounds[r][1]


def test_broadcast_and_allgather_choosers() -> None:
    mib = 1 << 20
    assert sch.broadcast_algorithm(1 << 30, 2) == "direct"  # the same plan with 2 ranks
    assert sch.broadcast_algorithm(sch.BROADCAST_DIRECT_BYTES, 4) == "direct"
    assert sch.broadcast_algorithm(sch.BROADCAST_DIRECT_BYTES + 1, 4) == "tree"
    assert sch.broadcast_algorithm(4, sch.DIRECT_MAX_GROUP + 1) == "tree"
    assert sch.allgather_algorithm(1 << 30, 2) == "direct"
    assert sch.allgather_algorithm(16 * mib, 4) == "direct"
    assert sch.allgather_algorithm(sch.ALLGATHER_DIRECT_BYTES + 1, 4) == "ring"
    assert sch.allgather_algorithm(4, sch.DIRECT_MAX_GROUP + 1) == "ring"
    with pytest.raises(ConfigError):
        sch.broadcast_algorithm(-1, 4)
    # over tcp streams: large ones down the chain (each link carries S once)
    assert sch.broadcast_algorithm_over_tcp(1 << 30, 2) == "direct"
    assert sch.broadcast_algorithm_over_tcp(sch.BROADCAST_DIRECT_BYTES, 4) == "direct"
    assert sch.broadcast_algorithm_over_tcp(sch.BROADCAST_DIRECT_BYTES + 1, 3) == "tree"
    assert sch.broadcast_algorithm_over_tcp(sch.TCP_BROADCAST_CHAIN_BYTES, 4) == "chain"
    assert sch.broadcast_algorithm_over_tcp(sch.TCP_BROADCAST_CHAIN_BYTES, 9) == "chain"
    assert sch.chain_segment_bytes(64 * mib) == 2 * mib
    assert sch.chain_segment_bytes(16 << 20) == sch.CHAIN_SEGMENT_MIN
    assert sch.chain_segment_bytes(1 << 34) == sch.DEFAULT_SEGMENT_BYTES
    # allreduce over tcp, 3+ ranks: the ring right after the direct plan, never the tree
    for size in (3, 4, 8):
        cross = sch.crossover_bytes_over_tcp(size)
        assert sch.choose_algorithm(cross - 1, size, cross) == "direct"
        assert sch.choose_algorithm(cross, size, cross) == "ring"
    assert sch.crossover_bytes_over_tcp(2) is None


def test_broadcast_across_hosts_never_takes_the_direct_plan() -> None:
    """Across hosts the wire binds: the root sends the array at most twice (tree) and
    from TCP_CHAIN_ACROSS_BYTES once (chain); one host keeps the CPU's choice."""
    chain_at = sch.TCP_CHAIN_ACROSS_BYTES
    for size in (3, 4, 5, 8):
        for nbytes in (0, 4, 64 << 10, 256 << 10, chain_at - 1):
            assert sch.broadcast_algorithm_over_tcp(nbytes, size, True) == "tree"
        for nbytes in (chain_at, 64 << 20, 1 << 34):
            assert sch.broadcast_algorithm_over_tcp(nbytes, size, True) == "chain"
    # 2 ranks: one send either way
    assert sch.broadcast_algorithm_over_tcp(1 << 20, 2, True) == "direct"
    assert sch.broadcast_algorithm_over_tcp(1 << 30, 2, True) == "direct"
    # one host (the default): as before, direct up to BROADCAST_DIRECT_BYTES with 4
    assert sch.broadcast_algorithm_over_tcp(1 << 20, 4) == "direct"
    assert sch.broadcast_algorithm_over_tcp(1 << 20, 4, False) == "direct"


@pytest.mark.parametrize("kind", ["tree", "chain"])
def test_forwarded_broadcast_sends_are_relayable(kind: str) -> None:
    """What the executor relays cut-through (group._execute, tcp_bulk relay): every send
    of a forwarding rank carries exactly the slice of one earlier receive, and with one
    segment each rank receives once and forwards to its children only."""
    build = sch.broadcast_plan if kind == "tree" else sch.chain_broadcast_plan
    for size in (3, 4, 7):
        for root in range(size):
            edges = set()
            for rank in range(size):
                plan = build(1001, rank, size, root, 1001)
                recvs = [t for t in plan if t.recv is not None]
                assert len(recvs) == (0 if rank == root else 1)
                for t in plan:
                    if t.send is None:
                        continue
                    edges.add((rank, t.send_to))
                    if rank == root:
                        assert t.send_after is None
                    else:
                        assert plan[t.send_after].recv == t.send == (0, 1001)
            # a spanning tree: every other rank reached once; the root sends <= 2 times
            assert sorted(b for _, b in edges) == sorted(set(range(size)) - {root})
            assert sum(a == root for a, _ in edges) == (1 if kind == "chain" else min(2, size - 1))


@FAST
@given(size=sizes, n=counts, seg=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_reduce_scatter_each_rank_owns_its_chunk(size: int, n: int, seg: int, seed: int) -> None:
    plans = [sch.reduce_scatter_plan(n, r, size, seg) for r in range(size)]
    bufs = one_hot(n, size)
    simulate(plans, bufs, "sum", seed)
    for r, (a, b) in enumerate(sch.chunk_bounds(n, size)):
        assert np.array_equal(bufs[r][a:b], np.ones((b - a, size), dtype=np.int64))


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13, 31, 61])
def test_primes_and_small_sizes_all_collectives(size: int) -> None:
    for n in (0, 1, size - 1, size, size + 1, 3 * size + 2):
        for plans in (
            [sch.ring_allreduce_plan(n, r, size, 2) for r in range(size)],
            [sch.tree_allreduce_plan(n, r, size, size // 2, 3) for r in range(size)],
        ):
            bufs = one_hot(n, size)
            simulate(plans, bufs)
            assert all(np.array_equal(b, np.ones((n, size), dtype=np.int64)) for b in bufs)
        plans = [sch.direct_allreduce_plan(n, r, size) for r in range(size)]
        bufs = [garbage_like(b) for b in one_hot(n, size)]
        simulate(plans, bufs, src=one_hot(n, size))
        assert all(np.array_equal(b, np.ones((n, size), dtype=np.int64)) for b in bufs)


# --------------------------------------------------------------------------
# barrier


@given(size=st.integers(1, 200))
def test_dissemination_barrier(size: int) -> None:
    scheds = [sch.barrier_schedule(r, size) for r in range(size)]
    rounds = (size - 1).bit_length()
    assert all(len(s) == rounds for s in scheds)
    heard = [{r} for r in range(size)]
    for k in range(rounds):
        incoming = [set() for _ in range(size)]
        for r in range(size):
            rd = scheds[r][k]
            assert rd.round == k and rd.send_to != r
            assert scheds[rd.send_to][k].recv_from == r  # the peer waits for us
            incoming[rd.send_to] |= heard[r]  # the token carries what r knew
        heard = [h | i for h, i in zip(heard, incoming, strict=True)]
    assert all(h == set(range(size)) for h in heard)


# --------------------------------------------------------------------------
# push-sum gossip


def random_graph(size: int, rng: np.random.Generator) -> list[list[int]]:
    """Connected: a random spanning tree plus random extra edges."""
    adj: list[set[int]] = [set() for _ in range(size)]
    for i in range(1, size):
        j = int(rng.integers(0, i))
        adj[i].add(j)
        adj[j].add(i)
    for _ in range(int(rng.integers(0, 2 * size))):
        a, b = (int(v) for v in rng.integers(0, size, 2))
        if a != b:
            adj[a].add(b)
            adj[b].add(a)
    return [sorted(s) for s in adj]


def gossip_round(
    nodes: list[sch.PushSum],
    rnd: int,
    fanout: int,
    rng: np.random.Generator,
    graph: list[list[int]] | None,
) -> None:
    size = len(nodes)
    inbox: list[list[tuple[np.ndarray, float]]] = [[] for _ in range(size)]
    for r, node in enumerate(nodes):
        peers = None if graph is None else graph[r]
        targets = sch.gossip_targets(r, size, rnd, fanout, rng, peers)
        for t, share in zip(targets, node.split(len(targets)), strict=True):
            inbox[t].append(share)
    for r, node in enumerate(nodes):
        for x, w in inbox[r]:
            node.absorb(x, w)


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(2, 32),
    fanout=st.integers(1, 3),
    complete=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_push_sum_converges_and_conserves_mass(
    size: int, fanout: int, complete: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    xs = rng.uniform(1.0, 100.0, (size, 3))
    mean = xs.mean(axis=0)
    graph = None if complete else random_graph(size, rng)
    nodes = [sch.PushSum(x) for x in xs]
    mass_x, mass_w = xs.sum(axis=0), float(size)
    budget = sch.push_sum_rounds(size, 1e-6) if complete else 5000
    for rnd in range(budget):
        gossip_round(nodes, rnd, fanout, rng, graph)
        np.testing.assert_allclose(sum(n.x for n in nodes), mass_x, rtol=1e-12)
        assert abs(sum(n.w for n in nodes) - mass_w) <= 1e-12 * mass_w
        if all(np.allclose(n.estimate(), mean, rtol=1e-6, atol=0) for n in nodes):
            break
    else:
        worst = max(float(np.max(np.abs(n.estimate() / mean - 1))) for n in nodes)
        pytest.fail(f"no convergence in {budget} rounds: worst relative error {worst:.2e}")


def test_push_sum_split_and_absorb() -> None:
    p = sch.PushSum(np.array([3, 6], dtype=np.int32))
    assert p.x.dtype == np.float64
    shares = p.split(2)
    assert len(shares) == 2 and p.w == pytest.approx(1 / 3)
    x, w = shares[0]
    assert not x.flags.writeable and x is not p.x and w == pytest.approx(1 / 3)
    np.testing.assert_allclose(p.x, [1, 2])
    p.absorb(x, w)
    np.testing.assert_allclose(p.estimate(), [3, 6])
    assert p.split(0) == [] and p.w == pytest.approx(2 / 3)
    with pytest.raises(ConfigError):
        p.absorb(np.zeros(3), 1.0)
    with pytest.raises(ConfigError):
        sch.PushSum(np.array(["a"]))


@given(size=st.integers(1, 40), fanout=st.integers(1, 5), seed=st.integers(0, 1000))
def test_gossip_targets(size: int, fanout: int, seed: int) -> None:
    for r in range(size):
        a = sch.gossip_targets(r, size, 3, fanout, np.random.default_rng(seed))
        b = sch.gossip_targets(r, size, 3, fanout, np.random.default_rng(seed))
        assert a == b  # deterministic given the generator
        assert r not in a and len(set(a)) == len(a) == min(fanout, size - 1)
        assert all(0 <= t < size for t in a)
        # without a generator the rotation reaches every peer
        seen = {t for k in range(size) for t in sch.gossip_targets(r, size, k, fanout, None)}
        assert seen == set(range(size)) - {r}
        nbrs = [(r + 1) % size, (r + 2) % size]
        assert set(
            sch.gossip_targets(r, size, 0, fanout, np.random.default_rng(seed), nbrs)
        ) <= set(nbrs) - {r}


# --------------------------------------------------------------------------
# algorithm choice


def test_choose_algorithm() -> None:
    c = sch.DEFAULT_CROSSOVER_BYTES
    # without the direct plan (direct_bytes=0): tree below the crossover, ring above
    assert sch.choose_algorithm(100, 8, c, 0) == "tree"
    assert sch.choose_algorithm(c, 8, c, 0) == "ring"
    assert sch.choose_algorithm(10 * c, 8) == "ring"
    assert sch.choose_algorithm(0, 8, c, 0) == "tree"
    assert sch.choose_algorithm(100, 2, c, 0) == "tree"
    assert sch.choose_algorithm(100, 1, c) == "ring"
    assert sch.choose_algorithm(100, 64, 50, 0) == "ring"
    # direct below direct_bytes, whatever the other crossover says
    assert sch.choose_algorithm(0, 8) == "direct"
    assert sch.choose_algorithm(100, 2, c) == "direct"
    assert sch.choose_algorithm(999, 4, c, 1000) == "direct"
    assert sch.choose_algorithm(1000, 4, c, 1000) == "tree"
    assert sch.choose_algorithm(1000, 4, 500, 1000) == "ring"
    assert sch.segment_elems_for(8, 1024) == 128 and sch.segment_elems_for(16, 1) == 1


def test_crossover_bytes_for() -> None:
    for size, want in sch.DEFAULT_CROSSOVER_BY_SIZE.items():
        assert sch.crossover_bytes_for(size) == want
        assert sch.choose_algorithm(want, size, direct_bytes=0) == "ring"
        assert sch.choose_algorithm(want - 1, size, direct_bytes=0) == "tree"
    assert sch.crossover_bytes_for(64) == sch.DEFAULT_CROSSOVER_BYTES


@given(size=st.integers(1, 300))
def test_direct_bytes_for(size: int) -> None:
    d = sch.direct_bytes_for(size)
    assert d >= 0
    if size in sch.DEFAULT_DIRECT_BYTES:
        assert d == sch.DEFAULT_DIRECT_BYTES[size]
    # each rank receives (size - 1) whole arrays: the limit never grows with the group
    assert sch.direct_bytes_for(size + 1) <= sch.direct_bytes_for(max(size, 2))
    for nbytes in (0, d - 1, d, d + 1):
        if size > 1 and nbytes >= 0:
            assert (sch.choose_algorithm(nbytes, size) == "direct") == (nbytes < d)


# --------------------------------------------------------------------------
# reductions: ops x dtypes against numpy


DTYPES = [
    np.int8, np.uint8, np.int16, np.int32, np.uint32, np.int64, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128,
]  # fmt: skip


@pytest.mark.parametrize("op", red.OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("size", [1, 2, 5])
def test_reduce_into_and_finalize_match_numpy(op: str, dtype: type, size: int) -> None:
    # A stable seed: hash() of a str changes from run to run (PYTHONHASHSEED).
    rng = np.random.default_rng(zlib.crc32(f"{op}/{np.dtype(dtype).name}/{size}".encode()))
    dt = np.dtype(dtype)
    if dt.kind in "iu":
        # full range: sums and products overflow and must wrap exactly as numpy's
        info = np.iinfo(dt)
        inputs = [
            rng.integers(info.min, info.max, (3, 4), dtype=dt, endpoint=True) for _ in range(size)
        ]
    elif dt.kind == "c":
        inputs = [
            (rng.standard_normal((3, 4)) + 1j * rng.standard_normal((3, 4))).astype(dt)
            for _ in range(size)
        ]
    else:
        inputs = [rng.standard_normal((3, 4)).astype(dt) for _ in range(size)]
    want = red.reference_allreduce(inputs, op)
    acc = red.accumulator(op, inputs[0])
    assert acc.ndim == 1 and acc.dtype == red.accumulator_dtype(op, dt)
    assert not np.shares_memory(acc, inputs[0])
    for x in inputs[1:]:
        red.reduce_into(op, acc, x.reshape(-1))
    got = red.finalize(op, acc, size, dt).reshape(want.shape)
    assert red.result_dtype(op, dt) == want.dtype
    check_result(got, want)
    if dt.kind in "iu" and op == "mean":
        # a mean never wraps: compare with the exact rational mean too
        exact = sum(x.astype(object) for x in inputs)
        # The accumulator is float64: each input is rounded to 53 bits, so the error
        # scales with the inputs' magnitude, not the (possibly cancelled) mean's.
        magnitude = sum(np.abs(x.astype(np.float64)) for x in inputs) / size
        np.testing.assert_allclose(got, (exact / size).astype(np.float64), rtol=1e-12,
                                   atol=float(magnitude.max()) * size * 2.0**-52)


@pytest.mark.parametrize("op", ["min", "max"])
def test_bool_min_max(op: str) -> None:
    inputs = [np.array([True, False, True]), np.array([True, False, False])]
    acc = red.accumulator(op, inputs[0])
    red.reduce_into(op, acc, inputs[1])
    check_result(red.finalize(op, acc, 2, np.bool_), red.reference_allreduce(inputs, op))


@pytest.mark.parametrize(
    ("op", "dtype"),
    [
        ("sum", np.bool_),
        ("mean", np.bool_),
        ("prod", np.bool_),
        ("sum", object),
        ("max", np.str_),
        ("min", np.bytes_),
        ("sum", np.dtype([("a", "i4")])),
        ("sum", np.dtype("V8")),
        ("max", np.dtype("datetime64[s]")),
        ("sum", np.dtype("timedelta64[s]")),
        ("median", np.float64),
        ("add", np.float64),
    ],
)
def test_check_op_dtype_refuses(op: str, dtype: object) -> None:
    with pytest.raises(ConfigError) as info:
        red.check_op_dtype(op, dtype)
    assert isinstance(info.value, MeshError) and str(info.value)


def test_reduce_helpers() -> None:
    assert red.ufunc_for("sum") is np.add and red.ufunc_for("mean") is np.add
    assert red.ufunc_for("min") is np.minimum and red.ufunc_for("max") is np.maximum
    assert red.ufunc_for("prod") is np.multiply
    out = np.arange(4.0)
    assert red.finalize("mean", out, 2) is out  # floats divide in place
    ints = np.array([3, 4])
    assert red.finalize("mean", ints, 2).dtype == np.float64
    with pytest.raises(ConfigError):
        red.reduce_into("sum", np.zeros(3), np.zeros(4))
    with pytest.raises(ConfigError):
        red.reference_allreduce([], "sum")
    with pytest.raises(ConfigError):
        red.reference_allreduce([np.zeros(2), np.zeros(3)], "sum")
    empty = red.reference_allreduce([np.zeros(0, np.float32)] * 3, "max")
    assert empty.shape == (0,) and empty.dtype == np.float32


def _any_plan(kind: str, n: int, rank: int, size: int, seg: int, root: int) -> list[Transfer]:
    if kind == "ring":
        return sch.ring_allreduce_plan(n, rank, size, seg)
    if kind == "tree":
        return sch.tree_allreduce_plan(n, rank, size, 0, seg)
    if kind == "broadcast":
        return sch.broadcast_plan(n, rank, size, root, seg)
    if kind == "broadcast_direct":
        return sch.direct_broadcast_plan(n, rank, size, root, seg)
    if kind == "broadcast_chain":
        return sch.chain_broadcast_plan(n, rank, size, root, seg)
    if kind == "allgather":
        return sch.allgather_plan([n + r for r in range(size)], rank, seg)
    if kind == "allgather_direct":
        return sch.direct_allgather_plan([n + r for r in range(size)], rank, seg)
    return sch.reduce_scatter_plan(n, rank, size, seg)


@FAST
@given(kind=st.sampled_from(["ring", "tree", "broadcast", "broadcast_direct", "broadcast_chain",
                             "allgather",
                             "allgather_direct", "reduce_scatter"]),
       size=st.integers(1, 9), rank=st.integers(0, 8), n=st.integers(0, 60),
       seg=st.integers(1, 9), root=st.integers(0, 8))
def test_post_guards_name_every_earlier_reader_and_writer(
    kind: str, size: int, rank: int, n: int, seg: int, root: int
) -> None:
    """A receive posted ahead into its slice (the bulk tcp stream writes a copy in
    place, or reduces into it as it arrives) must wait for every send of its slice
    that the executor posts before consuming it, and for the last earlier receive
    into the slice (mesh/collectives/group.py)."""
    plan = _any_plan(kind, n, rank % size, size, seg, root % size)
    guards = sch.post_guards(plan)
    slices = {s for t in plan for s in (t.send, t.recv) if s is not None}
    for a in slices:  # one segmentation: equal or disjoint
        for b in slices:
            assert a == b or a[1] <= b[0] or b[1] <= a[0]
    recvs = [t for t in plan if t.recv is not None]
    assert set(guards) == {t.index for t in recvs}
    for t in recvs:
        g = guards[t.index]
        early_reads = {j.index for j in plan if j.send == t.recv
                       and (j.send_after is None or j.send_after < t.index)}
        assert set(g.readers) == early_reads
        writers = [k.index for k in plan if k.recv == t.recv and k.index < t.index]
        assert g.prev_writer == (max(writers) if writers else -1)

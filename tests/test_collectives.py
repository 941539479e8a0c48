"""Collectives over real processes: every collective against numpy, faults, reform.

Each group size (2, 3, 4, 5) starts its worker processes once (module-scoped
fixture ``grp``) and runs many cases inside them in batches; the fault tests
start their own processes since they kill or exclude one. Workers are
``collective_workers.group_host`` (multiprocessing "spawn"); every wait here is
bounded and every process is reaped at teardown, also after a failure.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
import uuid
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # spawn children import the workers from here

import collective_workers as cw  # noqa: E402

import mesh  # noqa: E402

_SPAWN = mp.get_context("spawn")
READY_TIMEOUT = 60.0
CALL_TIMEOUT = 60.0

FLOAT_DTYPES = ["float32", "float64", "float16", "complex64"]
INT_DTYPES = ["int64", "int32", "int8", "uint8"]
OPS = ["sum", "mean", "min", "max", "prod"]
ALGORITHMS = ["ring", "tree", "direct"]


class RemoteError(Exception):
    """A command failed inside a worker process."""


class Worker:
    """Test-side handle of one worker process (one mesh node)."""

    def __init__(self, name: str, node_kwargs: dict) -> None:
        self.name = name
        self.ctl = _SPAWN.Queue()
        self.out = _SPAWN.Queue()
        self.process = _SPAWN.Process(
            target=cw.group_host, args=(name, node_kwargs, self.ctl, self.out),
            name=f"collective-{name}", daemon=True,
        )
        self.info: dict = {}
        self.killed = False
        self._ids = itertools.count(1)
        self.process.start()

    def _get(self, timeout: float, what: str) -> tuple:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no answer to {what!r} within {timeout} s")
            try:
                return self.out.get(timeout=min(remaining, 0.25))
            except queue.Empty:
                if not self.process.is_alive():
                    try:
                        return self.out.get(timeout=0.5)
                    except queue.Empty:
                        raise RemoteError(
                            f"{self.name} died (exit code {self.process.exitcode}) during {what!r}"
                        ) from None

    def wait_ready(self) -> Worker:
        tag, ok, value = self._get(READY_TIMEOUT, "start")
        if tag != cw.READY or not ok:
            raise RemoteError(f"{self.name} failed to start: {value}")
        self.info = value
        return self

    @property
    def id(self) -> str:
        return self.info["id"]

    @property
    def tcp(self) -> str:
        return next(e for e in self.info["endpoints"] if e.startswith("tcp://"))

    def send(self, op: str, **args: Any) -> int:
        cmd_id = next(self._ids)
        self.ctl.put((cmd_id, op, args))
        return cmd_id

    def result(self, cmd_id: int, timeout: float = CALL_TIMEOUT, what: str = "") -> Any:
        while True:
            got, ok, value = self._get(timeout, what or f"command {cmd_id}")
            if got == cmd_id:
                break
        if not ok:
            raise RemoteError(f"{self.name}: {value}")
        return value

    def call(self, op: str, timeout: float = CALL_TIMEOUT, **args: Any) -> Any:
        return self.result(self.send(op, **args), timeout, op)

    def kill(self) -> None:
        self.killed = True
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(timeout=5.0)
        assert not self.process.is_alive(), f"{self.name} survived SIGKILL"


class Cluster:
    """``n`` worker processes on one mesh (static seeds), reaped by ``shutdown()``."""

    def __init__(self, n: int, prefix: str = "w", **node_kwargs: Any) -> None:
        self.n = n
        self.cluster = f"coll-{uuid.uuid4().hex[:10]}"
        self.node_kwargs = node_kwargs
        self.prefix = prefix
        self.workers: list[Worker] = []
        self.by_rank: list[Worker] = []

    def start(self) -> Cluster:
        kw = {"cluster": self.cluster, "listen": ("tcp://127.0.0.1:0", "ipc://auto"),
              **self.node_kwargs}
        first = Worker(f"{self.prefix}0", {**kw, "discovery": "none"})
        self.workers.append(first)
        first.wait_ready()
        rest = [
            Worker(f"{self.prefix}{i}", {**kw, "discovery": "static", "seeds": [first.tcp]})
            for i in range(1, self.n)
        ]
        self.workers += rest
        for w in rest:
            w.wait_ready()
        self.all("wait_for_peers", n=self.n - 1)
        return self

    def all(self, op: str, timeout: float = CALL_TIMEOUT, workers: list[Worker] | None = None,
            **args: Any) -> list[Any]:
        """Run one command on every worker at once; answers in the workers' order."""
        workers = self.workers if workers is None else workers
        ids = [w.send(op, **args) for w in workers]
        return [w.result(i, timeout, op) for w, i in zip(workers, ids, strict=True)]

    def form(self, name: str, timeout: float = 30.0, workers: list[Worker] | None = None,
             **options: Any) -> list[dict]:
        workers = self.workers if workers is None else workers
        infos = self.all("group", workers=workers, name=name, size=len(workers),
                         group_timeout=timeout, options=options)
        ranks = sorted(range(len(workers)), key=lambda i: infos[i]["rank"])
        self.by_rank = [workers[i] for i in ranks]
        return infos

    def cases(self, group: str, cases: list[dict], timeout: float = CALL_TIMEOUT,
              workers: list[Worker] | None = None) -> list[list[dict]]:
        """results[case][rank]."""
        workers = self.by_rank if workers is None else workers
        per_worker = self.all("cases", timeout, workers, group=group, cases=cases)
        return [list(rs) for rs in zip(*per_worker, strict=True)]

    def shutdown(self) -> None:
        for w in self.workers:
            if w.process.is_alive():
                try:
                    w.ctl.put((0, "exit", {}))
                except Exception:
                    pass
        deadline = time.monotonic() + 10.0
        for w in self.workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in self.workers:
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(timeout=3.0)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=3.0)
            for q in (w.ctl, w.out):
                q.cancel_join_thread()
                q.close()
            if w.killed or w.process.exitcode != 0:  # it could not remove its ipc socket
                for ep in w.info.get("endpoints", ()):
                    if ep.startswith("ipc://") and not ep.startswith("ipc://@"):
                        try:
                            os.unlink(ep[len("ipc://"):])
                        except OSError:
                            pass


def assert_all_ok(results: list[list[dict]], cases: list[dict], same: bool = True) -> None:
    for case, per_rank in zip(cases, results, strict=True):
        for rank, res in enumerate(per_rank):
            assert res.get("ok"), f"rank {rank}, case {case}: {res}"
        if same:
            digests = {res["digest"] for res in per_rank}
            assert len(digests) == 1, f"ranks disagree on case {case}"


@pytest.fixture(scope="module", params=[2, 3, 4, 5], ids=lambda p: f"P{p}")
def grp(request):
    cluster = Cluster(request.param)
    try:
        cluster.start()
        cluster.form("main")
        yield cluster
    finally:
        cluster.shutdown()


# ---------------------------------------------------------------------- correctness


def _allreduce_cases() -> list[dict]:
    cases = []
    seed = itertools.count(1)
    for dtype in FLOAT_DTYPES + INT_DTYPES + ["bool"]:
        ops = ["min", "max"] if dtype == "bool" else OPS
        for op in ops:
            for shape in [(0,), (1,), (13,), (1009,), (3, 0, 2)]:
                s = next(seed)
                for algorithm in ALGORITHMS:
                    cases.append({"kind": "allreduce", "op": op, "dtype": dtype, "shape": shape,
                                  "algorithm": algorithm, "seed": s})
    # non-contiguous input (a transposed 2-D array), and a 0-d array
    for dtype, op in [("float64", "sum"), ("int32", "prod"), ("float32", "mean")]:
        s = next(seed)
        for algorithm in [*ALGORITHMS, "auto"]:
            cases.append({"kind": "allreduce", "op": op, "dtype": dtype, "shape": (7, 11),
                          "layout": "transposed", "algorithm": algorithm, "seed": s})
            cases.append({"kind": "allreduce", "op": op, "dtype": dtype, "shape": (),
                          "algorithm": algorithm, "seed": s})
    # signed zeros: np.minimum(+0, -0) depends on the operand order, so ranks that
    # reduced in different orders would disagree bit for bit (the digests)
    for dtype in ["float32", "float64"]:
        for op in OPS:
            s = next(seed)
            for algorithm in [*ALGORITHMS, "auto"]:
                cases.append({"kind": "allreduce", "op": op, "dtype": dtype, "shape": (257,),
                              "layout": "zeros", "algorithm": algorithm, "seed": s})
    return cases


def test_allreduce_matches_numpy_every_dtype_op_size(grp):
    cases = _allreduce_cases()
    results = grp.cases("main", cases)
    assert_all_ok(results, cases)
    # ring, tree and direct give the same answer: bit for bit where numpy is exact
    by_key: dict[tuple, dict[str, str]] = {}
    for case, per_rank in zip(cases, results, strict=True):
        key = (case["dtype"], case["op"], case["shape"], case.get("layout"), case["seed"])
        by_key.setdefault(key, {})[case["algorithm"]] = per_rank[0]["digest"]
    for key, digests in by_key.items():
        exact = key[0] in INT_DTYPES + ["bool"] and key[1] != "mean" or key[1] in ("min", "max")
        if exact and key[3] != "zeros":  # the sign of a zero min/max depends on the order
            assert len(set(digests.values())) == 1, f"algorithms differ on {key}: {digests}"


def test_allreduce_large_ring_tree_auto(grp):
    mib8 = 8 << 20
    cases = [
        {"kind": "allreduce", "op": "sum", "dtype": "float32", "shape": (mib8 // 4,),
         "algorithm": "ring", "seed": 101},
        {"kind": "allreduce", "op": "sum", "dtype": "float32", "shape": (mib8 // 4,),
         "algorithm": "tree", "seed": 101},
        {"kind": "allreduce", "op": "sum", "dtype": "int64", "shape": (mib8 // 8 + 7,),
         "algorithm": "auto", "seed": 102},
        {"kind": "allreduce", "op": "max", "dtype": "float64", "shape": (1024, 1031),
         "algorithm": "auto", "seed": 103},
        # prime sizes, around the segment size
        {"kind": "allreduce", "op": "mean", "dtype": "float32", "shape": (65537,),
         "algorithm": "ring", "seed": 104},
        {"kind": "allreduce", "op": "sum", "dtype": "int32", "shape": (262147,),
         "algorithm": "tree", "seed": 105},
        # direct, around its copy threshold (zero-copy sends awaited above it)
        {"kind": "allreduce", "op": "sum", "dtype": "float32", "shape": (mib8 // 4,),
         "algorithm": "direct", "seed": 101},
        {"kind": "allreduce", "op": "max", "dtype": "float64", "shape": (65537,),
         "algorithm": "direct", "seed": 106},
        {"kind": "allreduce", "op": "mean", "dtype": "float32", "shape": (16383,),
         "algorithm": "direct", "seed": 107},
    ]
    # out=: in place (as torch's all_reduce) and into a separate preallocated result;
    # direct also at sizes where zmq sends the input zero-copy (>= 64 KiB)
    for i, (dtype, op, out) in enumerate([
        ("float32", "sum", "inplace"), ("int64", "max", "inplace"), ("float64", "mean", "inplace"),
        ("float32", "sum", "separate"), ("int32", "sum", "separate"),
        ("float16", "mean", "separate"), ("int8", "mean", "separate"),
    ]):
        for algorithm in ALGORITHMS:
            cases.append({"kind": "allreduce", "op": op, "dtype": dtype, "shape": (333, 7),
                          "algorithm": algorithm, "seed": 110 + i, "out": out})
    for out in ("inplace", "separate"):
        for i, n in enumerate([(64 << 10) // 4, (1 << 20) // 4 + 3]):
            cases.append({"kind": "allreduce", "op": "sum", "dtype": "float32", "shape": (n,),
                          "algorithm": "direct", "seed": 120 + i, "out": out})
    results = grp.cases("main", cases)
    assert_all_ok(results, cases)


def test_reduce_scatter_chunks(grp):
    p = grp.n
    cases = [
        {"kind": "reduce_scatter", "op": op, "dtype": dtype, "n": n, "seed": 200 + i}
        for i, (op, dtype, n) in enumerate(
            itertools.product(["sum", "max", "mean"], ["float32", "int64"],
                              [0, 1, p - 1, p, p + 1, 13, 1009, 65537])
        )
    ]
    results = grp.cases("main", cases)
    assert_all_ok(results, cases)  # digest: the full reduction, equal everywhere


def test_broadcast_from_every_root(grp):
    cases = []
    for root in range(grp.n):
        for dtype, shape in [("float32", (0,)), ("int16", (1,)), ("float64", (13, 3)),
                             ("complex64", (1009,)), ("uint8", (65537,))]:
            cases.append({"kind": "broadcast", "root": root, "dtype": dtype, "shape": shape,
                          "seed": 300 + root})
    cases.append({"kind": "broadcast", "root": grp.n - 1, "dtype": "float32",
                  "shape": ((8 << 20) // 4,), "seed": 399})
    results = grp.cases("main", cases)
    assert_all_ok(results, cases)


def test_allgather_equal_and_ragged_shapes(grp):
    p = grp.n
    cases = [
        {"kind": "allgather", "dtype": "float32", "shapes": [(5,)] * p, "seed": 400},
        {"kind": "allgather", "dtype": "int64", "shapes": [(r,) for r in range(p)], "seed": 401},
        {"kind": "allgather", "dtype": "float64", "shapes": [(2, r + 1) for r in range(p)],
         "seed": 402},
        {"kind": "allgather", "dtype": "uint8", "shapes": [(0,)] * p, "seed": 403},
        {"kind": "allgather", "dtype": "float32", "shapes": [(1 << 19,)] * p, "seed": 404},
        # one part too large to ride with the shape exchange: all go by the plan
        {"kind": "allgather", "dtype": "float32",
         "shapes": [((1 << 18) + 3,) if r == p - 1 else (r + 2,) for r in range(p)],
         "seed": 405},
    ]
    results = grp.cases("main", cases)
    assert_all_ok(results, cases)


def test_allgather_into_out(grp):
    """allgather(out=): received into the caller's (size, *shape) array, no shape message."""
    p = grp.n
    cases = [
        {"kind": "allgather", "dtype": "float32", "shapes": [(5,)] * p, "seed": 410, "out": "new"},
        {"kind": "allgather", "dtype": "int16", "shapes": [(3, 7)] * p, "seed": 411,
         "out": "own"},
        {"kind": "allgather", "dtype": "float64", "shapes": [(0,)] * p, "seed": 412, "out": "new"},
        # larger than the carry size: segments by the plan, into out
        {"kind": "allgather", "dtype": "float32", "shapes": [((1 << 18) + 3,)] * p, "seed": 413,
         "out": "new"},
    ]
    results = grp.cases("main", cases)
    assert_all_ok(results, cases)


def test_allgather_out_shape_mismatch_fails_on_every_rank(grp):
    """Two ranks with out= but the same element count in different shapes: the shape
    rides in every message, so every rank fails fast instead of mixing them up."""
    p = grp.n
    shapes = [(2, 6) if r == 0 else (6, 2) for r in range(p)]
    cases = [{"kind": "allgather", "dtype": "float32", "shapes": shapes, "seed": 414,
              "out": "new"}]
    (per_rank,) = grp.cases("main", cases)
    for r, res in enumerate(per_rank):
        assert res.get("error") in ("ConfigError", "CollectiveAborted"), (r, res)
        assert res["s"] < 10, (r, res)
    grp.cases("main", [{"kind": "allgather", "dtype": "float32", "shapes": [(4,)] * p,
                        "seed": 415}])  # the group still works afterwards


def test_barrier_waits_for_the_last(grp):
    late = grp.n - 1
    cases = [{"kind": "barrier", "late_rank": late, "delay": 0.3}]
    (per_rank,) = grp.cases("main", cases)
    last_in = max(r["entered"] for r in per_rank)
    for rank, r in enumerate(per_rank):
        assert r["left"] >= last_in - 0.005, f"rank {rank} left the barrier before rank {late} came"


def test_gossip_average_converges_within_eps(grp):
    cases = [{"kind": "gossip", "n": 257, "seed": 500, "eps": 1e-6},
             {"kind": "gossip", "n": 0, "seed": 501, "eps": 1e-6}]
    results = grp.cases("main", cases)
    assert_all_ok(results, cases, same=False)


def test_mismatch_and_bad_op_fail_fast_on_every_rank(grp):
    cases = [{"kind": "mismatch", "algorithm": "ring"}, {"kind": "mismatch", "algorithm": "tree"},
             {"kind": "mismatch", "algorithm": "direct"}, {"kind": "bad_op"}]
    results = grp.cases("main", cases)
    for case, per_rank in zip(cases, results, strict=True):
        for rank, res in enumerate(per_rank):
            assert res.get("error") in ("ConfigError", "CollectiveAborted"), (case, rank, res)
            assert res["s"] < 10.0, f"rank {rank} took {res['s']:.1f} s to fail {case}"
    assert any(r["error"] == "ConfigError" for r in results[0])
    assert all(r["error"] == "ConfigError" for r in results[3])
    # the group still works afterwards
    ok = [{"kind": "allreduce", "op": "sum", "dtype": "int64", "shape": (10,), "seed": 600}]
    assert_all_ok(grp.cases("main", ok), ok)


def test_stats_count_ops_bytes_and_waits(grp):
    stats = grp.all("stats", workers=grp.by_rank, group="main")
    for rank, st in enumerate(stats):
        assert st["rank"] == rank and st["size"] == grp.n
        assert st["ops"]["allreduce"]["count"] > 0
        assert len(st["peers"]) >= 1
        for peer in st["peers"].values():
            assert peer["wait_s"] >= 0.0 and peer["bytes_in"] >= 0
        assert sum(p["bytes_out"] for p in st["peers"].values()) > 0


@pytest.mark.parametrize("grp", [3], indirect=True)
def test_two_groups_of_different_names_run_concurrently(grp):
    grp.all("group", name="side", size=grp.n, group_timeout=30.0)
    try:
        main_cases = [{"kind": "allreduce", "op": "sum", "dtype": "float32",
                       "shape": (200_003,), "algorithm": "ring", "seed": 700 + i} for i in range(4)]
        side_cases = [{"kind": "allreduce", "op": "max", "dtype": "int64",
                       "shape": (100_003,), "algorithm": "tree", "seed": 800 + i} for i in range(4)]
        answers = grp.all("concurrent", workers=grp.by_rank,
                          work={"main": main_cases, "side": side_cases})
        # the "side" group's ranks may differ from "main"'s: check each answer on its own
        for name, cases in (("main", main_cases), ("side", side_cases)):
            per_case = [list(rs) for rs in zip(*(a[name] for a in answers), strict=True)]
            assert_all_ok(per_case, cases)
    finally:
        grp.all("close_group", name="side")


# ---------------------------------------------------------------------- faults


def test_sigkill_mid_allreduce_then_reform():
    cluster = Cluster(4, prefix="k")
    timeout = 10.0
    try:
        cluster.start()
        infos = cluster.form("faulty", timeout=timeout)
        old_inc = infos[0]["incarnation"]
        assert {i["incarnation"] for i in infos} == {old_inc}
        victim = cluster.by_rank[2]
        survivors = [w for w in cluster.by_rank if w is not victim]
        elems = (64 << 20) // 4  # 64 MiB of float32
        ids = {w: w.send("allreduce_loop", group="faulty", elems=elems, iterations=200)
               for w in cluster.by_rank}
        time.sleep(1.5)  # well inside the loop of big allreduces
        t_kill = time.time()
        victim.kill()
        for w in survivors:
            res = w.result(ids[w], timeout=timeout + 10, what="allreduce_loop")
            assert res["error"] == "PeerLostError", res
            assert res["peer"] == victim.id, res
            assert victim.name in res["text"] and "reform()" in res["text"], res["text"]
            assert res["t"] - t_kill < timeout, f"{w.name} noticed after {res['t'] - t_kill:.1f} s"
        # survivors build a smaller group: new ranks, new incarnation
        reformed = cluster.all("reform", workers=survivors, group="faulty")
        assert all("error" not in r for r in reformed), reformed
        assert {r["size"] for r in reformed} == {3}
        assert sorted(r["rank"] for r in reformed) == [0, 1, 2]
        new_inc = reformed[0]["incarnation"]
        assert {r["incarnation"] for r in reformed} == {new_inc} and new_inc != old_inc
        assert victim.id not in {m[1] for m in reformed[0]["members"]}
        order = sorted(range(3), key=lambda i: reformed[i]["rank"])
        by_rank = [survivors[i] for i in order]
        # op #0 of the new incarnation: tags differ from the old op #0 only by incarnation,
        # so stale segments of the killed allreduce would corrupt it if they were mixed in
        cases = [
            {"kind": "allreduce", "op": "sum", "dtype": "float32", "shape": (elems // 4,),
             "algorithm": "ring", "seed": 900},
            {"kind": "allreduce", "op": "sum", "dtype": "int64", "shape": (1001,),
             "algorithm": "tree", "seed": 901},
        ]
        results = cluster.cases("faulty", cases, workers=by_rank)
        assert_all_ok(results, cases)
        # a second group() with the same name, after reform(): yet another incarnation
        cluster.all("close_group", workers=survivors, name="faulty")
        again = cluster.form("faulty", timeout=timeout, workers=survivors)
        third = again[0]["incarnation"]
        assert {a["incarnation"] for a in again} == {third} and third not in (old_inc, new_inc)
        assert_all_ok(cluster.cases("faulty", cases[1:]), cases[1:])
    finally:
        cluster.shutdown()


def test_a_rank_that_stalls_is_waited_for_not_declared_lost():
    """A rank frozen for a while (a long GC pause, a loaded machine: SIGSTOP here) is
    suspected by the failure detector, not dead. A collective that sends to it
    meanwhile waits for it, as Gloo would, instead of failing the group with
    PeerLostError ("left the mesh or died"): channels used to refuse every peer that
    was not "alive", suspect ones included."""
    # Suspected soon (default probing), declared dead only after 5 s of suspicion.
    lenient = {"peer_timeout": 10.0, "membership": {"suspicion_min": 5.0, "suspicion_max": 8.0}}
    cluster = Cluster(2, prefix="z", **lenient)
    try:
        cluster.start()
        cluster.form("stall", timeout=10.0)
        a, b = cluster.by_rank
        os.kill(b.process.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 10.0
            while a.call("peer_states").get(b.name) != "suspect":
                assert time.monotonic() < deadline, a.call("peer_states")
                time.sleep(0.05)
            # b runs its part once thawed; a starts now and sends to the suspect b.
            ids = {w: w.send("allreduce_loop", group="stall", elems=1000, iterations=20)
                   for w in (a, b)}
            time.sleep(0.5)
        finally:
            os.kill(b.process.pid, signal.SIGCONT)
        for w in (a, b):
            res = w.result(ids[w], timeout=30.0, what="allreduce_loop")
            assert res["error"] is None and res["iterations"] == 20, res
    finally:
        cluster.shutdown()


def test_straggler_is_named_excluded_and_reported():
    cluster = Cluster(3, prefix="s")
    timeout = 2.0
    try:
        cluster.start()
        cluster.form("slow", timeout=timeout)
        late = cluster.by_rank[1]
        answers = cluster.all("late_allreduce", workers=cluster.by_rank, group="slow",
                              late=[1], delay=timeout + 1.5)
        for rank, res in enumerate(answers):
            # everyone, the straggler included (it was told), names the straggler
            assert res["error"] == "PeerLostError", (rank, res)
            assert res["peer"] == late.id, (rank, res)
            if rank != 1:
                assert res["t"] - res["entered"] <= timeout + 1.5, (rank, res)
                assert late.name in res["text"]
        survivors = [cluster.by_rank[0], cluster.by_rank[2]]
        stats = cluster.all("stats", workers=survivors, group="slow")
        waited = max(st["peers"].get(late.name, {}).get("wait_s", 0.0) for st in stats)
        assert waited >= timeout * 0.5, stats
        # the straggler cannot rejoin the old group; the others reform without it
        ids = {w: w.send("reform", group="slow") for w in cluster.by_rank}
        excluded = late.result(ids[late], what="reform")
        assert excluded["error"] == "MeshError" and "excluded" in excluded["text"], excluded
        reformed = [w.result(ids[w], what="reform") for w in survivors]
        assert [r["size"] for r in reformed] == [2, 2], reformed
        order = sorted(range(2), key=lambda i: reformed[i]["rank"])
        cases = [{"kind": "allreduce", "op": "sum", "dtype": "int64", "shape": (100,),
                  "algorithm": "ring", "seed": 950}]
        assert_all_ok(cluster.cases("slow", cases, workers=[survivors[i] for i in order]), cases)
    finally:
        cluster.shutdown()


# ---------------------------------------------------------------------- in-process


def test_group_of_one_and_argument_errors(make_node):
    node = make_node("solo")
    with node.group("solo.g", 1, timeout=5.0) as g:
        assert (g.rank, g.size) == (0, 1) and g.members[0].name == "solo"
        x = np.arange(6, dtype=np.int16).reshape(2, 3)
        out = g.allreduce(x, op="sum")
        assert out.dtype == np.int64 and np.array_equal(out, x)
        assert g.allreduce(x, op="mean").dtype == np.float64
        assert np.array_equal(g.broadcast(x), x)
        assert np.array_equal(g.allgather(x)[0], x)
        assert np.array_equal(g.reduce_scatter(x), x.ravel())
        g.barrier()
        assert np.allclose(g.gossip_average(x), x)
        with pytest.raises(mesh.ConfigError, match="unknown reduction op"):
            g.allreduce(x, op="median")
        with pytest.raises(mesh.ConfigError, match="algorithm"):
            g.allreduce(x, algorithm="butterfly")
        with pytest.raises(mesh.ConfigError, match="bool"):
            g.allreduce(np.ones(3, bool), op="sum")
        with pytest.raises(mesh.ConfigError, match="root"):
            g.broadcast(x, root=1)
        with pytest.raises(mesh.ConfigError, match="already open"):
            node.group("solo.g", 1, timeout=1.0)
    with pytest.raises(mesh.MeshError, match="closed"):
        g.barrier()
    with pytest.raises(mesh.InvalidSubject):
        node.group("bad name", 1)
    with pytest.raises(mesh.ConfigError):
        node.group("x", 0)


def test_group_that_cannot_form_times_out(make_node):
    node = make_node("alone")
    t0 = time.monotonic()
    with pytest.raises(mesh.TimeoutError, match="1 of 2 members"):
        node.group("never", 2, timeout=0.5)
    assert time.monotonic() - t0 < 3.0
    node.group("never", 1, timeout=1.0).close()  # the name is free again


# ---------------------------------------------------------------------- examples

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.parametrize("script", ["data_parallel_sgd.py", "parameter_server_ssp.py",
                                    "gossip_bap.py"])
def test_example_runs_and_exits_0(script):
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, os.path.join(EXAMPLES, script)], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the example and every worker it spawned
        out, _ = proc.communicate(timeout=10)
        pytest.fail(f"{script} did not finish within 120 s:\n{out}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 0, out
    assert "OK" in out, out


# ---------------------------------------------------------------------- closing


class _StubNode:
    """What a Channel asks of its node, for a channel without sockets."""

    def __init__(self, peers: dict) -> None:
        self._peers = peers

    def _peer_name(self, pid: str) -> str:
        return pid


def test_channel_waits_for_the_last_messages_of_a_peer_that_left():
    import threading
    from types import SimpleNamespace

    from mesh.channels import Channel, ChannelMessage

    now = time.monotonic()
    peers = {"left": SimpleNamespace(state="left", gone_at=now),
             "old": SimpleNamespace(state="left", gone_at=now - 60.0),
             "dead": SimpleNamespace(state="dead", gone_at=now)}
    ch = Channel(_StubNode(peers), "c")  # type: ignore[arg-type]
    for pid in peers:
        ch._peer_lost(pid, f"{pid} is gone")
    # its goodbye overtook a message: the receive still gets it (the node delivers
    # messages of a peer that left for LEFT_GRACE)
    late = threading.Timer(0.2, ch._put, args=(ChannelMessage("left", "t", None, b"x", None),))
    late.start()
    try:
        t0 = time.monotonic()
        assert ch.recv("left", "t", timeout=5.0).data == b"x"
        assert time.monotonic() - t0 < 2.0
    finally:
        late.cancel()
    assert set(ch.lost()) == {"old", "dead"}  # "left" is still within its grace
    t0 = time.monotonic()
    for pid in ("dead", "old"):  # nothing more can come: fail at once
        with pytest.raises(mesh.PeerLostError):
            ch.recv(pid, "t", timeout=5.0)
    assert time.monotonic() - t0 < 0.5


def test_group_close_waits_for_the_others_bounded(make_node):
    import threading

    a = make_node("close-a")
    b = make_node("close-b", seeds=[a.endpoints[0]])
    a.wait_for_peers(1, timeout=10.0)
    b.wait_for_peers(1, timeout=10.0)
    groups: dict[str, Any] = {}

    def form(node: Any, key: str, name: str) -> None:
        groups[key] = node.group(name, 2, timeout=1.0)

    for name in ("g1", "g2"):
        threads = [threading.Thread(target=form, args=(n, f"{k}{name}", name))
                   for n, k in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15.0)
    # b closes 0.4 s after a: a's close returns once b's has come
    closer = threading.Timer(0.4, groups["bg1"].close)
    closer.start()
    t0 = time.monotonic()
    groups["ag1"].close()
    took = time.monotonic() - t0
    closer.join(5.0)
    assert 0.3 <= took < 2.0, took
    # b never closes g2 in time: a's close gives up after the group timeout (1 s)
    t0 = time.monotonic()
    groups["ag2"].close()
    took = time.monotonic() - t0
    assert 0.8 <= took < 3.0, took
    t0 = time.monotonic()
    groups["bg2"].close()  # a's close message is already there
    assert time.monotonic() - t0 < 0.5

"""Allreduce: the mesh's group collectives against torch.distributed (Gloo, CPU).

    python -m bench.collectives            # full run, a few minutes
    python -m bench.collectives --quick    # smoke run, well under a minute
    python -m bench.collectives --profile  # also cProfile mesh rank 0's calling thread
    python -m bench.collectives --sizes 16K,64K,256K --worlds 2   # only these sizes
    python -m bench.collectives --tcp      # tcp only, shm off: allreduce/broadcast/allgather
                                           # vs Gloo, busbw, share of the raw tcp rate
    python -m bench.collectives --tcp --lan   # the same, each rank in a network namespace
                                              # of its own (root; tests/harness/netns_lab.sh)
    python -m bench.collectives --tcp --lan-rate 1gbit   # ... each host's link limited to
                                              # 1 Gbit/s (tc tbf): the wire, not the cores,
                                              # is the limit, as between real hosts
    python -m bench.collectives --tcp --worlds 2 --sizes 4K --reps 201   # a closer look

Every ``--tcp`` cell is the median of interleaved repetitions (mesh and Gloo in a
new random order each repetition), printed with the spread of the per-repetition
ratios (iqr) and a 95 % confidence interval of their median (ci, sign test); the
verdict says loss / win only when that interval excludes 1.

From ``bench/__main__.py``: ``from bench import collectives`` then
``collectives.run(quick=args.quick)``; it prints its own table and returns a
JSON-serialisable dict (``rows``, ``crossover``, ``direct_crossover``, ``segments``,
``memcpy_bytes_per_s``).
``collectives.shm_compare(quick)``: 4 processes, allreduce with the node's shared
memory on (default) vs off (``shm=False``), two nodes per process (one per
mode, separate clusters), interleaved call by call; ``--shm`` runs it alone.

Method. For each world size (2 and 4 processes on this host) one set of
spawned processes runs *both* sides: each rank joins a mesh group and a Gloo
process group (``init_method="tcp://127.0.0.1:PORT"``), and the two are
interleaved repetition by repetition, in a new random order every repetition
(the same on every rank), so load from anything else on the machine, and any
cleanup an op leaves behind for the next one, hits all alike. Each timed
allreduce follows a barrier of its own kind; both reduce in place
(``group.allreduce(x, out=x)`` and ``dist.all_reduce(t)``), the buffer refilled
outside the timing. Three times per repetition (all ranks share one clock,
``perf_counter`` = CLOCK_MONOTONIC):

* ``span`` (the tables' times, ratios and crossovers): from the last rank's
  start to the last rank's end: the allreduce's latency once every rank is in;
* ``own``: the slowest rank's time from its own start (what this benchmark
  reported before 2026-11-22): it also counts the exit skew of the barrier
  before it, up to one message hop of that barrier's implementation, which
  hides the gain of a one-step algorithm such as ``direct``;
* ``b2b``: per allreduce, the slowest rank's time for ``B2B`` more allreduces
  right after the timed one (sizes up to 4 MiB; how training loops call it).

Tables show medians over repetitions. Sizes
(float32): 4 KiB, 16 KiB, 64 KiB, 256 KiB, 1 MiB, 4 MiB, 8 MiB, 16 MiB
(where the mesh runs ``direct``, ``tree`` and ``ring`` too, to measure where
``auto`` should switch from one to the next), then 64 MiB (``auto`` only;
``--sizes`` picks others: up to 16 MiB every algorithm, above only ``auto``). Bus bandwidth is ``2 (n - 1) / n * bytes / time``
(what each link carried, NCCL's definition), also as a fraction of this
machine's numpy memcpy bandwidth (``np.copyto`` of 64 MiB, same run). The
full run also sweeps the mesh's pipelining segment size at 16 and 64 MiB.
The mesh uses the transport it picks between processes of one host (ipc)
unless ``transports=`` says otherwise; Gloo uses TCP over loopback. Without
torch the Gloo half is skipped with the reason printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import queue
import random
import socket
import statistics
import sys
import time
import traceback
import uuid
from typing import Any

import numpy as np

_SPAWN = mp.get_context("spawn")

KiB, MiB = 1 << 10, 1 << 20
# every algorithm and auto at these (the crossovers); auto only at the large ones
ALGORITHMS = ("direct", "tree", "ring")
SMALL_MAX = 16 * MiB
SMALL_SIZES = (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 8 * MiB, 16 * MiB)
LARGE_SIZES = (64 * MiB,)
SEGMENT_SWEEP = (256 * KiB, 1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB)
SWEEP_SIZES = (16 * MiB, 64 * MiB)
WORLDS = (2, 4)
TASK_TIMEOUT = 900.0


def _reps(nbytes: int, quick: bool) -> tuple[int, int]:
    """(warmup, timed) repetitions for one size."""
    if quick:
        return (2, 7) if nbytes <= MiB else (1, 3)
    if nbytes <= 256 * KiB:
        return 5, 40
    if nbytes <= 4 * MiB:
        return 3, 15
    if nbytes <= 16 * MiB:
        return 2, 9
    return 1, 7


# Allreduces run back to back after each timed one, up to B2B_MAX (the "b2b" metric).
B2B, B2B_MAX = 4, 4 * MiB


def _b2b(nbytes: int, quick: bool) -> int:
    return 0 if quick or nbytes > B2B_MAX else B2B


def plan(quick: bool, sizes: list[int] | None = None) -> dict:
    """What runs: small sizes (every algorithm and auto), large sizes (auto), segment
    sweep. ``sizes``: only these (no sweep)."""
    if sizes:
        return {"small": sorted(n for n in sizes if n <= SMALL_MAX),
                "large": sorted(n for n in sizes if n > SMALL_MAX), "sweep": []}
    return {
        "small": [4 * KiB, 64 * KiB, 1 * MiB] if quick else list(SMALL_SIZES),
        "large": [] if quick else list(LARGE_SIZES),
        "sweep": [] if quick else [(n, s) for n in SWEEP_SIZES for s in SEGMENT_SWEEP],
    }


# ====================================================================== ranks


def _quiet_threads() -> None:
    # Two cores and several ranks: no library may start a thread pool of its own.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"


def _rank_main(out: Any, rank: int, world: int, cluster: str, seed_q: Any, gloo_port: int | None,
               cases: dict, quick: bool, transports: tuple[str, ...] | None,
               segment_bytes: int | None, profile_dir: str | None) -> None:
    _quiet_threads()
    try:
        out.put((rank, True, _rank_body(rank, world, cluster, seed_q, gloo_port, cases, quick,
                                        transports, segment_bytes, profile_dir)))
    except BaseException:
        out.put((rank, False, traceback.format_exc()))


def _rank_node(rank: int, world: int, seed_q: Any, kwargs: dict[str, Any]) -> Any:
    """This rank's started node: rank 0 hands its tcp endpoint to the others as their seed."""
    import mesh

    if rank == 0:
        node = mesh.Node(f"bench-r0-{os.getpid()}", discovery="none", **kwargs).start()
        tcp = next(e for e in node.endpoints if e.startswith("tcp://"))
        for _ in range(world - 1):
            seed_q.put(tcp)
        return node
    tcp = seed_q.get(timeout=60)
    return mesh.Node(f"bench-r{rank}-{os.getpid()}", discovery="static", seeds=[tcp],
                     **kwargs).start()


def _rank_body(rank: int, world: int, cluster: str, seed_q: Any, gloo_port: int | None,
               cases: dict, quick: bool, transports: tuple[str, ...] | None,
               segment_bytes: int | None, profile_dir: str | None) -> dict:

    dist = torch = None
    if gloo_port is not None:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{gloo_port}",
                                rank=rank, world_size=world)
    kwargs: dict[str, Any] = {"cluster": cluster, "listen": ("tcp://127.0.0.1:0", "ipc://auto")}
    if transports:
        kwargs["transports"] = transports
    node = _rank_node(rank, world, seed_q, kwargs)
    times: dict[str, list[tuple[float, float, float]]] = {}
    with node:
        node.wait_for_peers(world - 1, timeout=60)
        options = {} if segment_bytes is None else {"segment_bytes": segment_bytes}
        group = node.group("bench.allreduce", world, timeout=120, **options)
        transport = sorted({p["transport"] for p in node.status()["peers"]})

        def mesh_op(x: np.ndarray, algo: str, g: Any = group) -> Any:
            b2b = _b2b(x.nbytes, quick)

            def op() -> tuple[float, float, float]:
                x.fill(1.0)
                g.barrier()
                t0 = time.perf_counter()
                out = g.allreduce(x, algorithm=algo, out=x)  # in place, as Gloo's all_reduce
                t1 = time.perf_counter()
                if out[0] != world:
                    raise RuntimeError(f"mesh: wrong allreduce result {out[0]} != {world}")
                for _ in range(b2b):
                    g.allreduce(x, algorithm=algo, out=x)
                return t0, t1, time.perf_counter() if b2b else t1
            return op

        def gloo_op(nbytes: int) -> Any:
            t = torch.ones(nbytes // 4, dtype=torch.float32)
            b2b = _b2b(nbytes, quick)

            def op() -> tuple[float, float, float]:
                t.fill_(1.0)
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(t)
                t1 = time.perf_counter()
                if float(t[0]) != world:
                    raise RuntimeError(f"gloo: wrong allreduce result {float(t[0])}")
                for _ in range(b2b):
                    dist.all_reduce(t)
                return t0, t1, time.perf_counter() if b2b else t1
            return op

        def interleave(nbytes: int, ops: dict[str, Any]) -> None:
            warm, reps = _reps(nbytes, quick)
            for key in ops:
                times[key] = []
            keys = list(ops)
            order = random.Random(nbytes)  # the same sequence on every rank
            for i in range(warm + reps):
                # A new order every repetition: an op runs measurably slower right
                # after some others (their cleanup overlaps it); that must hit all alike.
                for key in order.sample(keys, len(keys)):
                    stamps = ops[key]()
                    if i >= warm:
                        times[key].append(stamps)

        for nbytes in cases["small"]:
            x = np.ones(nbytes // 4, dtype=np.float32)
            ops = {f"{nbytes}:{a}": mesh_op(x, a) for a in (*ALGORITHMS, "auto")}
            if dist is not None:
                ops[f"{nbytes}:gloo"] = gloo_op(nbytes)
            interleave(nbytes, ops)
        for nbytes in cases["large"]:
            x = np.ones(nbytes // 4, dtype=np.float32)
            ops = {f"{nbytes}:auto": mesh_op(x, "auto")}
            if dist is not None:
                ops[f"{nbytes}:gloo"] = gloo_op(nbytes)
            interleave(nbytes, ops)
        if cases["sweep"]:
            groups = {s: node.group(f"bench.seg{s}", world, timeout=120, segment_bytes=s)
                      for s in sorted({s for _, s in cases["sweep"]})}
            for nbytes in sorted({n for n, _ in cases["sweep"]}):
                x = np.ones(nbytes // 4, dtype=np.float32)
                interleave(nbytes, {f"{nbytes}:seg{s}": mesh_op(x, "ring", g)
                                    for s, g in groups.items()})
            for g in groups.values():
                g.close()
        if profile_dir and rank == 0:
            import cProfile
            import pstats

            nbytes = max(cases["large"] or cases["small"])
            x = np.ones(nbytes // 4, dtype=np.float32)
            prof = cProfile.Profile()
            for _ in range(3):
                group.barrier()
                prof.enable()
                group.allreduce(x, out=x)
                prof.disable()
            path = os.path.join(profile_dir, f"collectives_w{world}_{nbytes >> 20}MiB")
            with open(path + ".txt", "w") as fh:
                st = pstats.Stats(prof, stream=fh)
                st.strip_dirs().sort_stats("tottime").print_stats(25)
            prof.dump_stats(path + ".prof")
        elif profile_dir:
            nbytes = max(cases["large"] or cases["small"])
            x = np.ones(nbytes // 4, dtype=np.float32)
            for _ in range(3):
                group.barrier()
                group.allreduce(x, out=x)
        stats = group.stats()
        group.close()
    if dist is not None:
        dist.destroy_process_group()
    return {"times": times, "transport": transport, "stats": stats}


# ====================================================================== parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(target: Any, world: int, args_for: Any, timeout: float = TASK_TIMEOUT) -> list:
    """Run ``target(out, rank, *args_for(rank))`` in ``world`` spawned processes; collect
    one answer per rank from ``out``; reap every process (bounded waits) whatever happens."""
    out = _SPAWN.Queue()
    procs = [_SPAWN.Process(target=target, args=(out, r, *args_for(r)), daemon=True)
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{target.__name__}: no answer within {timeout:.0f} s")
            try:
                rank, ok, value = out.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if all(p.is_alive() for p in procs):
                    continue
                try:
                    rank, ok, value = out.get(timeout=2.0)
                except queue.Empty:
                    raise RuntimeError(f"{target.__name__}: a rank died silently") from None
            if not ok:
                raise RuntimeError(f"{target.__name__} rank {rank} failed:\n{value}")
            answers[rank] = value
        return [answers[r] for r in range(world)]
    finally:
        for p in procs:
            p.join(timeout=10.0)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=3.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=3.0)
        out.cancel_join_thread()
        out.close()


METRICS = ("span", "own", "b2b")


def _per_rep(answers: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Each repetition's time per metric (see the module docstring; all ranks run on
    this host, so their ``perf_counter`` is one clock, CLOCK_MONOTONIC):

    * ``span``: from the last rank's start to the last rank's end (the latency of
      the collective once every rank has arrived);
    * ``own``: the slowest rank's time from its own start (includes the exit skew
      of the barrier before it: up to one message hop);
    * ``b2b``: the slowest rank's time per allreduce of the ``B2B`` that follow
      back to back (None when there are none).
    """
    out: dict[str, dict[str, list[float]]] = {m: {} for m in METRICS}
    for key, first in answers[0]["times"].items():
        reps = [[a["times"][key][i] for a in answers] for i in range(len(first))]
        out["span"][key] = [max(t1 for _, t1, _ in r) - max(t0 for t0, _, _ in r) for r in reps]
        out["own"][key] = [max(t1 - t0 for t0, t1, _ in r) for r in reps]
        if any(t2 > t1 for _, t1, t2 in reps[0]):
            k = B2B
            out["b2b"][key] = [max(t2 - t1 for _, t1, t2 in r) / k for r in reps]
    return out


def memcpy_bandwidth(nbytes: int = 64 * MiB, reps: int = 7) -> float:
    """Bytes per second of ``np.copyto`` between two preallocated arrays (median)."""
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times)


def torch_available() -> str | None:
    """None when torch.distributed with Gloo can run, else the reason it cannot."""
    try:
        import torch
        import torch.distributed as dist
    except Exception as exc:  # ImportError, or a broken install
        return (f"torch is not importable ({type(exc).__name__}: {exc}); install the "
                "reference with `.venv/bin/pip install torch==2.13.0`")
    if not dist.is_available() or not dist.is_gloo_available():
        return f"torch {torch.__version__} has no Gloo backend"
    return None


def _crossover(med: dict[str, float], world: int, sizes: list[int]) -> dict:
    """Where the ring starts to beat the tree, from the measured medians.

    ``bytes``: the first size from which the ring is never slower again;
    ``suggested``: the power of two nearest the geometric mean of that size
    and the largest size below it (what ``schedule.DEFAULT_CROSSOVER_BY_SIZE[world]``
    should be).
    """
    if not sizes:
        return {"bytes": None, "suggested": None, "note": "not measured"}
    ring_ok = [med[f"{n}:ring"] <= med[f"{n}:tree"] for n in sizes]
    first = next((i for i in range(len(sizes)) if all(ring_ok[i:])), None)
    if first is None:
        return {"bytes": None, "suggested": None,
                "note": f"tree at least as fast up to {sizes[-1]} B: crossover above it"}
    if first == 0:
        return {"bytes": sizes[0], "suggested": sizes[0],
                "note": f"ring already faster at {sizes[0]} B"}
    lo, hi = sizes[first - 1], sizes[first]
    suggested = 1 << round(np.log2(np.sqrt(lo * hi)))
    return {"bytes": hi, "suggested": suggested, "note": f"tree faster at {lo} B, ring from {hi} B"}


def _direct_crossover(med: dict[str, float], world: int, sizes: list[int]) -> dict:
    """Up to where the direct plan beats both the tree and the ring.

    ``bytes``: the first size from which direct is never the fastest again;
    ``suggested``: the power of two nearest the geometric mean of that size and
    the largest size below it (what ``schedule.DEFAULT_DIRECT_BYTES[world]``
    should be).
    """
    if not sizes:
        return {"bytes": None, "suggested": None, "note": "not measured"}
    best_other = {n: min(med[f"{n}:tree"], med[f"{n}:ring"]) for n in sizes}
    direct_ok = [med[f"{n}:direct"] <= best_other[n] for n in sizes]
    last = next((i for i in range(len(sizes) - 1, -1, -1) if direct_ok[i]), None)
    if last is None:
        return {"bytes": sizes[0], "suggested": sizes[0],
                "note": f"direct already slower at {sizes[0]} B"}
    if last == len(sizes) - 1:
        return {"bytes": None, "suggested": None,
                "note": f"direct the fastest up to {sizes[-1]} B: crossover above it"}
    lo, hi = sizes[last], sizes[last + 1]
    suggested = 1 << round(np.log2(np.sqrt(lo * hi)))
    return {"bytes": hi, "suggested": suggested,
            "note": f"direct fastest at {lo} B, slower from {hi} B"}


def _fmt_bytes(n: int) -> str:
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    return f"{n // KiB} KiB" if n % KiB == 0 else f"{n} B"


def parse_sizes(text: str) -> list[int]:
    """``"16K,1M,4096"`` -> bytes (K = KiB, M = MiB); multiples of 4 (float32)."""
    out = []
    for part in (p.strip().upper() for p in text.split(",") if p.strip()):
        mult = {"K": KiB, "M": MiB}.get(part[-1], 1)
        n = int(part[:-1] if mult > 1 else part) * mult
        if n < 4 or n % 4:
            raise ValueError(f"size {part!r}: a positive multiple of 4 bytes (float32)")
        out.append(n)
    return out


def run(quick: bool = False, *, transports: tuple[str, ...] | None = None,
        segment_bytes: int | None = None, profile_dir: str | None = None,
        worlds: tuple[int, ...] = WORLDS, sizes: list[int] | None = None) -> dict:
    """Run the allreduce benchmark, print its table, return every number."""
    started = time.monotonic()
    cases = plan(quick, sizes)
    memcpy = memcpy_bandwidth()
    gloo_reason = torch_available()
    result: dict[str, Any] = {
        "bench": "collectives", "mode": "quick" if quick else "full",
        "memcpy_bytes_per_s": memcpy, "gloo_skipped": gloo_reason,
        "rows": [], "crossover": {}, "direct_crossover": {}, "segments": {}, "transport": [],
        "cpus": os.cpu_count(),
        "load_avg_before": os.getloadavg(),
    }
    if gloo_reason:
        print(f"collectives: Gloo reference skipped: {gloo_reason}")
    for world in worlds:
        cluster = f"bench-coll-{uuid.uuid4().hex[:8]}"
        seed_q = _SPAWN.Queue()
        port = None if gloo_reason else _free_port()
        try:
            answers = _run_ranks(
                _rank_main, world,
                lambda r, w=world, c=cluster, q=seed_q, p=port: (
                    w, c, q, p, cases, quick, transports, segment_bytes, profile_dir),
            )
        finally:
            seed_q.cancel_join_thread()
            seed_q.close()
        per_rep = _per_rep(answers)
        med = {key: statistics.median(v) for key, v in per_rep["span"].items()}
        meds = {m: {key: statistics.median(v) for key, v in per_rep[m].items()} for m in METRICS}
        result["crossover"][world] = _crossover(med, world, cases["small"])
        result["direct_crossover"][world] = _direct_crossover(med, world, cases["small"])
        result["transport"] = sorted(set(result["transport"]) | set(answers[0]["transport"]))
        bus_factor = 2 * (world - 1) / world
        for nbytes in cases["small"] + cases["large"]:
            t_mesh, t_gloo = med[f"{nbytes}:auto"], med.get(f"{nbytes}:gloo")
            bus = bus_factor * nbytes
            paired = None
            if t_gloo:  # mesh and Gloo of the same repetition ran one after the other
                paired = statistics.median(
                    m / g for m, g in zip(per_rep["span"][f"{nbytes}:auto"],
                                          per_rep["span"][f"{nbytes}:gloo"], strict=True))
            by_metric = {}
            for m in METRICS:
                a_, g_ = meds[m].get(f"{nbytes}:auto"), meds[m].get(f"{nbytes}:gloo")
                by_metric[m] = {"mesh_s": a_, "gloo_s": g_,
                                "ratio": (a_ / g_) if a_ is not None and g_ else None}
            result["rows"].append({
                "ratio_paired_median": paired,
                "metrics": by_metric,
                "times": {k.split(":", 1)[1]: v for k, v in per_rep["span"].items()
                          if k.split(":", 1)[0] == str(nbytes)},
                "world": world, "bytes": nbytes, "mesh_s": t_mesh,
                "ring_s": med.get(f"{nbytes}:ring"), "tree_s": med.get(f"{nbytes}:tree"),
                "direct_s": med.get(f"{nbytes}:direct"),
                "gloo_s": t_gloo, "ratio_mesh_over_gloo": (t_mesh / t_gloo) if t_gloo else None,
                "mesh_busbw": bus / t_mesh, "gloo_busbw": (bus / t_gloo) if t_gloo else None,
                "mesh_busbw_over_memcpy": bus / t_mesh / memcpy,
                "gloo_busbw_over_memcpy": (bus / t_gloo / memcpy) if t_gloo else None,
            })
        sweep = {}
        for nbytes, seg in cases["sweep"]:
            sweep.setdefault(nbytes, {})[seg] = med[f"{nbytes}:seg{seg}"]
        if sweep:
            result["segments"][world] = sweep
        result.setdefault("mesh_stats_rank0", {})[world] = answers[0]["stats"]
    result["load_avg_after"] = os.getloadavg()
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    print(summary(result))
    return result


# ====================================================================== tcp only

# ``--tcp``: nodes on tcp only with shared memory off (as between two hosts), the
# mesh's allreduce, broadcast and allgather against Gloo's in the same processes,
# and the raw tcp loopback rate measured in the same run (the wire floor).
TCP_SIZES = (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB,
             256 * MiB)
TCP_QUICK_SIZES = (4 * KiB, 1 * MiB, 16 * MiB, 64 * MiB)
TCP_OPS = ("allreduce", "broadcast", "allgather")
# allgather returns world x size per rank: keep it (and broadcast) within memory
TCP_GATHER_MAX = 64 * MiB
WIRE_BYTES, WIRE_FRAME = 256 * MiB, 4 * MiB


def _wire_sink(out: Any, port_q: Any, total: int) -> None:
    """PULL side of :func:`wire_rate`: receive ``total`` bytes, report the last arrival."""
    import zmq

    _quiet_threads()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    port_q.put(port)
    try:
        for _ in range(3):  # warm-up round, then two timed ones
            got = 0
            while got < total:
                got += len(sock.recv(copy=False))
            out.put(time.perf_counter())
    finally:
        sock.close()
        ctx.term()


def wire_rate(total: int = WIRE_BYTES, frame: int = WIRE_FRAME) -> float:
    """Raw tcp loopback rate in bytes/s: zmq PUSH ``send(copy=False)`` of ``frame``-sized
    frames to a PULL in another process (one direction; best of two timed rounds)."""
    import zmq

    out, port_q = _SPAWN.Queue(), _SPAWN.Queue()
    proc = _SPAWN.Process(target=_wire_sink, args=(out, port_q, total), daemon=True)
    proc.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"tcp://127.0.0.1:{port_q.get(timeout=30)}")
        data = np.ones(frame // 8, dtype=np.float64)
        rates = []
        for rnd in range(3):
            t0 = time.perf_counter()
            for _ in range(total // frame):
                sock.send(data, copy=False)
            t1 = out.get(timeout=60)
            if rnd:
                rates.append(total / (t1 - t0))
        return max(rates)
    finally:
        sock.close()
        ctx.term()
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=3)


# ``--lan``: every rank in a network namespace of its own (a "host" of the project's
# namespace lab, tests/harness/netns_lab.sh), all on one bridge: no shared memory
# and no loopback shortcut, for the mesh and Gloo alike. Our own name prefix and
# subnet, so that the lab never collides with the tests' labs.
LAB_SH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "tests", "harness", "netns_lab.sh")
LAB_PREFIX, LAB_NET = "zbtcp-", "10.79.0"
_CLONE_NEWNET = 0x40000000
# Raw-rate rounds (the first is a warm-up; the best of the others counts: the
# machine's other load only ever slows a round down).
RAW_ROUNDS = 5


def _enter_netns(name: str | None) -> None:
    """Move this (spawned, still single-threaded) process into namespace ``name``."""
    if not name:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _lab(*args: str) -> None:
    import subprocess

    env = {**os.environ, "ZMESH_LAB": LAB_PREFIX, "ZMESH_LAB_NET": LAB_NET}
    subprocess.run(["bash", LAB_SH, *args], check=True, env=env, timeout=120,
                   capture_output=True)


_RATE_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}


def parse_rate(text: str) -> float:
    """``"1gbit"``, ``"500mbit"``, ``"10gbit"`` (tc's units) -> bits per second."""
    t = text.strip().lower()
    for unit in ("kbit", "mbit", "gbit", "bit"):
        if t.endswith(unit):
            try:
                value = float(t[: -len(unit)])
            except ValueError:
                break
            if value > 0:
                return value * _RATE_UNITS[unit]
    raise ValueError(f"a link rate as tc writes it, e.g. 1gbit, 10gbit, 500mbit: not {text!r}")


def limit_rate(netns: str, rate: str) -> None:
    """Host ``netns`` sends at most ``rate`` on eth0 (tc tbf): what a real NIC allows.

    The lab's own ``rate`` command (tests/harness/netns_lab.sh) is for slow links
    (a 4 KB burst); at Gbit/s the bucket must hold what the link carries in a
    timer tick or two (1 ms here, at least a 64 KiB TSO segment) or tbf, not the
    rate, sets the pace. Every host's egress limited: each direction of each
    pair is, once; a host sends and receives at the rate at once (full duplex)."""
    import subprocess

    bits = parse_rate(rate)
    burst = max(64 * KiB, int(bits / 8 / 1000))
    subprocess.run(["tc", "-n", netns, "qdisc", "replace", "dev", "eth0", "root", "tbf",
                    "rate", rate, "burst", str(burst), "latency", "100ms"],
                   check=True, timeout=30, capture_output=True)


@contextlib.contextmanager
def namespace_lab(hosts: int) -> Any:
    """``hosts`` namespace hosts (LAB_NET.1 ..), always torn down afterwards."""
    if os.geteuid() != 0:
        raise RuntimeError("--lan needs root (network namespaces)")
    try:
        _lab("up", str(hosts))
        yield [f"{LAB_NET}.{i + 1}" for i in range(hosts)]
    finally:
        _lab("down")


def _socket_sink(out: Any, port_q: Any, total: int, host: str, netns: str | None) -> None:
    """Receiving side of :func:`socket_rate`: ``recv_into`` one preallocated buffer."""
    _enter_netns(netns)
    lsock = socket.socket()
    lsock.bind((host, 0))
    lsock.listen(1)
    port_q.put(lsock.getsockname()[1])
    conn, _ = lsock.accept()
    buf = memoryview(bytearray(WIRE_FRAME))
    try:
        for _ in range(RAW_ROUNDS):  # a warm-up round, then timed ones
            got = 0
            while got < total:
                k = conn.recv_into(buf, min(len(buf), total - got))
                if k == 0:
                    raise ConnectionError("the sender closed early")
                got += k
            out.put(time.perf_counter())
    finally:
        conn.close()
        lsock.close()


def _socket_source(out: Any, host: str, port: int, total: int, netns: str | None) -> None:
    _enter_netns(netns)
    data = memoryview(np.ones(WIRE_FRAME // 8, dtype=np.float64)).cast("B")
    sock = socket.create_connection((host, port), timeout=30)
    try:
        for _ in range(RAW_ROUNDS):
            t0 = time.perf_counter()
            for _ in range(total // WIRE_FRAME):
                sock.sendall(data)
            out.put(("t0", t0))
    finally:
        sock.close()


def socket_rate(total: int = WIRE_BYTES, host: str = "127.0.0.1",
                src_ns: str | None = None, dst_ns: str | None = None) -> float:
    """Raw tcp rate in bytes/s between two processes with plain sockets (``sendall``
    of 4 MiB memoryviews into ``recv_into`` a preallocated buffer; one direction,
    best of the timed rounds): what the wire carries with no messaging on top. With
    namespaces: from ``src_ns`` to ``dst_ns`` (whose address is ``host``)."""
    out, port_q, times = _SPAWN.Queue(), _SPAWN.Queue(), _SPAWN.Queue()
    sink = _SPAWN.Process(target=_socket_sink, args=(out, port_q, total, host, dst_ns),
                          daemon=True)
    sink.start()
    src = None
    try:
        port = port_q.get(timeout=30)
        src = _SPAWN.Process(target=_socket_source, args=(times, host, port, total, src_ns),
                             daemon=True)
        src.start()
        rates = []
        for rnd in range(RAW_ROUNDS):
            t1 = out.get(timeout=120)
            _, t0 = times.get(timeout=120)
            if rnd:
                rates.append(total / (t1 - t0))
        return max(rates)
    finally:
        for proc in (src, sink):
            if proc is None:
                continue
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=3)


def _socket_both_side(out: Any, ports: Any, peer_ports: Any, total: int, host: str,
                      peer_host: str, netns: str | None, dial_first: bool) -> None:
    """One end of :func:`socket_rate_both`: sends ``total`` bytes to the other end
    while a thread receives as many from it, three times; reports each round's time."""
    import threading

    _enter_netns(netns)
    lsock = socket.socket()
    lsock.bind((host, 0))
    lsock.listen(1)
    ports.put(lsock.getsockname()[1])
    port = peer_ports.get(timeout=30)
    if dial_first:
        tx = socket.create_connection((peer_host, port), timeout=30)
        rx, _ = lsock.accept()
    else:
        rx, _ = lsock.accept()
        tx = socket.create_connection((peer_host, port), timeout=30)
    data = memoryview(np.ones(WIRE_FRAME // 8, dtype=np.float64)).cast("B")
    buf = memoryview(bytearray(WIRE_FRAME))

    def drain() -> None:
        got = 0
        while got < total:
            k = rx.recv_into(buf, min(len(buf), total - got))
            if k == 0:
                raise ConnectionError("the other end closed early")
            got += k

    try:
        for _ in range(RAW_ROUNDS):
            th = threading.Thread(target=drain)
            t0, c0 = time.perf_counter(), time.process_time()
            th.start()
            for _ in range(total // WIRE_FRAME):
                tx.sendall(data)
            th.join()
            # (this process's CPU, both threads: the kernel copies of one send and one receive)
            out.put((time.perf_counter() - t0, time.process_time() - c0))
    finally:
        for sock in (tx, rx, lsock):
            sock.close()


def socket_rate_both(total: int = WIRE_BYTES, hosts: tuple[str, str] = ("127.0.0.1",) * 2,
                     netns: tuple[str | None, str | None] = (None, None)) -> float:
    """Like :func:`socket_rate`, but both ends send to each other at once, as every
    rank of a ring or a 2-rank exchange does: bytes/s per direction (slowest end,
    best of the timed rounds). On a host with few cores the two directions share
    them, so this, not the one-way rate, bounds a collective's busbw."""
    out = _SPAWN.Queue()
    pa, pb = _SPAWN.Queue(), _SPAWN.Queue()
    procs = [
        _SPAWN.Process(target=_socket_both_side, daemon=True,
                       args=(out, pa, pb, total, hosts[0], hosts[1], netns[0], True)),
        _SPAWN.Process(target=_socket_both_side, daemon=True,
                       args=(out, pb, pa, total, hosts[1], hosts[0], netns[1], False)),
    ]
    try:
        for proc in procs:
            proc.start()
        rounds = [(out.get(timeout=120), out.get(timeout=120)) for _ in range(RAW_ROUNDS)]
        walls = [max(a[0], b[0]) for a, b in rounds[1:]]
        cpus = [a[1] + b[1] for a, b in rounds[1:]]
        # CPU seconds per byte moved each way at once (both ends, sender and receiver
        # side each): what the kernel's copies alone cost, whoever runs them.
        _RAW_CPU["both_ways_cpu_s_per_byte"] = statistics.median(cpus) / total
        return total / min(walls)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=3)


_RAW_CPU: dict[str, float] = {}


def _tcp_rank_main(out: Any, rank: int, world: int, cluster: str, seed_q: Any, gloo_port: int,
                   sizes: list[int], quick: bool, ops: tuple[str, ...], algos: tuple[str, ...],
                   segment_bytes: int | None, netns: str | None = None,
                   hosts: list[str] | None = None, lan_rate: str | None = None) -> None:
    _quiet_threads()
    try:
        _enter_netns(netns)
        out.put((rank, True, _tcp_rank_body(rank, world, cluster, seed_q, gloo_port, sizes,
                                            quick, ops, algos, segment_bytes, hosts,
                                            lan_rate)))
    except BaseException:
        out.put((rank, False, traceback.format_exc()))


def _bcast_variants() -> list[str]:
    """``--bcast-algos`` (env ``ZMESH_BENCH_BCAST``, read in the ranks): broadcast plans
    forced over the tcp streams, e.g. ``direct,chain,tree-256K`` (``-SIZE``: segment)."""
    return [v for v in os.environ.get("ZMESH_BENCH_BCAST", "").split(",") if v]


@contextlib.contextmanager
def _old_streams(rx: bool = True, fd: bool = True) -> Any:
    """The streams' small-message path of before 2026-12-06 11:30 (A/B in one run):
    the receiver thread as it was (``rx``), the caller woken through a lock (``fd``)."""
    from transports import tcp_bulk
    if rx:
        tcp_bulk._Receiver.fast = False
    if fd:
        tcp_bulk._Request.fd_wait = False
    try:
        yield
    finally:
        tcp_bulk._Receiver.fast = True
        tcp_bulk._Request.fd_wait = hasattr(os, "eventfd")


def _allreduce(group: Any, x: np.ndarray, algo: str) -> Any:
    """``--algos`` entries: an algorithm, or ``ALGO-old`` (see _old_streams; ``-oldrx``
    and ``-oldfd``: one half of it)."""
    name, _, old = algo.partition("-")
    if old in ("old", "oldrx", "oldfd"):
        with _old_streams(rx=old != "oldfd", fd=old != "oldrx"):
            return group.allreduce(x, algorithm=name, out=x)
    return group.allreduce(x, algorithm=algo, out=x)


def _forced_broadcast(group: Any, xb: np.ndarray, variant: str) -> Any:
    algo, *rest = variant.split("-") if variant else [""]
    if algo in ("norelay", "nolean", "old"):  # (a flag alone: the group's own plan)
        algo, rest = "", [algo, *rest]
    if "old" in rest:  # the small-message path of before 2026-12-06 11:30 (A/B)
        with _old_streams():
            return _forced_broadcast(group, xb, "-".join(
                [algo] + [r for r in rest if r != "old"] + ["nolean"]))
    group._bcast_algo = algo  # "" = the group's own choice
    group._lean = "nolean" not in rest  # whole-buffer plans: the lean executor or _execute
    sizes = [r for r in rest if r not in ("norelay", "nolean", "old")]
    group._bcast_seg = parse_sizes(sizes[0])[0] if sizes else 0
    group._relay = "norelay" not in rest  # (forwarding rank: cut-through or via the caller)
    try:
        return group.broadcast(xb, root=0)
    finally:
        group._bcast_algo, group._bcast_seg, group._relay, group._lean = "", 0, True, True


def _tcp_rank_body(rank: int, world: int, cluster: str, seed_q: Any, gloo_port: int | None,
                   sizes: list[int], quick: bool, ops: tuple[str, ...], algos: tuple[str, ...],
                   segment_bytes: int | None, hosts: list[str] | None = None,
                   lan_rate: str | None = None) -> dict:

    # The allreduces sum in place over and over: float32 overflows to inf, on purpose
    # of no one (Gloo's too); the mesh's folded reductions follow this thread's state.
    np.seterr(over="ignore", invalid="ignore")
    # On the namespace LAN each rank is its own host (eth0); else tcp loopback.
    me, first = (hosts[rank], hosts[0]) if hosts else ("127.0.0.1", "127.0.0.1")
    dist = torch = None
    if gloo_port is not None:
        if hosts:
            os.environ["GLOO_SOCKET_IFNAME"] = "eth0"  # not the hostname's address
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://{first}:{gloo_port}",
                                rank=rank, world_size=world)
    # tcp only, shared memory off: what two hosts have
    kwargs: dict[str, Any] = {"cluster": cluster, "listen": (f"tcp://{me}:0",),
                              "shm": False}
    node = _rank_node(rank, world, seed_q, kwargs)
    times: dict[str, list[tuple[float, float, float]]] = {}
    cpu: dict[str, list[float]] = {}  # this process's CPU (every thread) per repetition
    with node:
        node.wait_for_peers(world - 1, timeout=60)
        options = {} if segment_bytes is None else {"segment_bytes": segment_bytes}
        group = node.group("bench.tcp", world, timeout=120, **options)
        status = node.status()
        transport = sorted({str(p["transport"]) for p in status["peers"]})
        bulk = sorted({str(p.get("bulk")) for p in status["peers"]})

        def timed(body: Any, barrier: Any) -> Any:
            def op() -> tuple[float, float, float, float]:
                barrier()
                c0 = time.process_time()
                t0 = time.perf_counter()
                body()
                t1 = time.perf_counter()
                return t0, t1, t1, time.process_time() - c0
            return op

        for nbytes in sizes:
            n = nbytes // 4
            cases: dict[str, Any] = {}
            if "allreduce" in ops:
                x = np.ones(n, dtype=np.float32)
                t = torch.ones(n, dtype=torch.float32) if dist else None
                for a in algos:
                    cases[f"{nbytes}:allreduce:{a}"] = timed(
                        lambda x=x, a=a: _allreduce(group, x, a), group.barrier)
                if dist:
                    cases[f"{nbytes}:allreduce:gloo"] = timed(
                        lambda t=t: dist.all_reduce(t), dist.barrier)
            if nbytes <= TCP_GATHER_MAX and "broadcast" in ops:
                xb = np.ones(n, dtype=np.float32)
                tb = torch.ones(n, dtype=torch.float32) if dist else None
                cases[f"{nbytes}:broadcast:mesh"] = timed(
                    lambda xb=xb: _forced_broadcast(group, xb, ""), group.barrier)
                for v in _bcast_variants():  # forced plans, A/B against auto and Gloo
                    cases[f"{nbytes}:broadcast:mesh-{v}"] = timed(
                        lambda xb=xb, v=v: _forced_broadcast(group, xb, v), group.barrier)
                if dist:
                    cases[f"{nbytes}:broadcast:gloo"] = timed(
                        lambda tb=tb: dist.broadcast(tb, src=0), dist.barrier)
            if nbytes <= TCP_GATHER_MAX and "allgather" in ops:
                xg = np.full(n, rank, dtype=np.float32)
                tg = torch.full((n,), rank, dtype=torch.float32) if dist else None
                touts = [torch.empty(n, dtype=torch.float32) for _ in range(world)] if dist else []

                gout = np.empty((world, n), dtype=np.float32)  # as Gloo's touts: reused

                def check_gather(xg: Any = xg, gout: Any = gout) -> None:
                    parts = group.allgather(xg, out=gout)
                    if parts[-1][0] != world - 1:
                        raise RuntimeError("mesh: wrong allgather result")
                cases[f"{nbytes}:allgather:mesh"] = timed(check_gather, group.barrier)
                if dist:
                    cases[f"{nbytes}:allgather:gloo"] = timed(
                        lambda tg=tg, touts=touts: dist.all_gather(touts, tg), dist.barrier)
            warm, reps = _tcp_reps(nbytes, quick, lan_rate)
            keys = list(cases)
            for key in keys:
                times[key] = []
                cpu[key] = []
            order = random.Random(nbytes)  # the same sequence on every rank
            for i in range(warm + reps):
                for key in order.sample(keys, len(keys)):
                    *stamps, spent = cases[key]()
                    if i >= warm:
                        times[key].append(tuple(stamps))
                        cpu[key].append(spent)
            if "allreduce" in ops:  # every rank summed ones, some of them many times: positive
                if not (x[:1] > 0).all():
                    raise RuntimeError("mesh: wrong allreduce result")
            del cases
        stats = group.stats()
        group.close()
    if dist is not None:
        dist.destroy_process_group()
    tcpbulk = sorted({str((p.get("tcpbulk") or {}).get("state")) for p in status["peers"]})
    return {"times": times, "cpu": cpu, "transport": transport, "bulk": bulk,
            "tcpbulk": tcpbulk, "stats": stats}


def tcp_compare(quick: bool = False, *, worlds: tuple[int, ...] = WORLDS,
                sizes: list[int] | None = None, ops: tuple[str, ...] = TCP_OPS,
                algos: tuple[str, ...] = ("auto",), segment_bytes: int | None = None,
                lan: bool = False, lan_rate: str | None = None) -> dict:
    """The mesh on tcp only with shm=False against Gloo, and the raw wire rate, in one
    run; prints its table and returns every number. Over tcp loopback, or with
    ``lan`` between network-namespace hosts (:func:`namespace_lab`); ``lan_rate``
    (e.g. ``"1gbit"``, implies ``lan``): each host sends at most that rate
    (:func:`limit_rate`), the raw rate measured through the same limit."""
    if lan or lan_rate:
        with namespace_lab(max(worlds)) as hosts:
            if lan_rate:
                for i in range(len(hosts)):
                    limit_rate(f"{LAB_PREFIX}h{i + 1}", lan_rate)
            return _tcp_compare(quick, worlds, sizes, ops, algos, segment_bytes, hosts,
                                lan_rate)
    return _tcp_compare(quick, worlds, sizes, ops, algos, segment_bytes, None)


def _tcp_compare(quick: bool, worlds: tuple[int, ...], sizes: list[int] | None,
                 ops: tuple[str, ...], algos: tuple[str, ...], segment_bytes: int | None,
                 hosts: list[str] | None, lan_rate: str | None = None) -> dict:
    started = time.monotonic()
    gloo_reason = torch_available()
    if gloo_reason:
        print(f"collectives --tcp: Gloo reference skipped: {gloo_reason}")
    sizes = sorted(sizes or (TCP_QUICK_SIZES if quick else TCP_SIZES))
    if lan_rate and not quick:
        # What a rate-limited wire adds is at the large sizes; 256 MiB at 1 Gbit/s
        # takes seconds per op: up to 64 MiB unless --sizes asks for more.
        sizes = [n for n in sizes if n <= TCP_GATHER_MAX] if sizes == sorted(TCP_SIZES) else sizes
    netns = [f"{LAB_PREFIX}h{i + 1}" for i in range(len(hosts))] if hosts else None
    # The wire floor: plain sockets between the ranks' own endpoints (rank 0 -> 1).
    raw = (socket_rate(host=hosts[1], src_ns=netns[0], dst_ns=netns[1]) if hosts and netns
           else socket_rate())
    both = (socket_rate_both(hosts=(hosts[0], hosts[1]), netns=(netns[0], netns[1]))
            if hosts and netns else socket_rate_both())
    zmq_wire = None if hosts else wire_rate()
    wire = raw
    result: dict[str, Any] = {"bench": "collectives-tcp", "mode": "quick" if quick else "full",
                              "lan": bool(hosts), "lan_rate": lan_rate,
                              "wire_bytes_per_s": wire,
                              "wire_both_ways_bytes_per_s": both,
                              "raw_both_ways_cpu_s_per_byte": _RAW_CPU.get(
                                  "both_ways_cpu_s_per_byte"),
                              "zmq_wire_bytes_per_s": zmq_wire, "gloo_skipped": gloo_reason,
                              "cpus": os.cpu_count(), "load_avg_before": os.getloadavg(),
                              "rows": [], "algos": list(algos)}
    for world in worlds:
        cluster = f"bench-tcp-{uuid.uuid4().hex[:8]}"
        seed_q = _SPAWN.Queue()
        port = None if gloo_reason else (29500 + random.randrange(1000) if hosts
                                         else _free_port())
        try:
            answers = _run_ranks(
                _tcp_rank_main, world,
                lambda r, w=world, c=cluster, q=seed_q, p=port: (
                    w, c, q, p, sizes, quick, ops, algos, segment_bytes,
                    netns[r] if netns else None, hosts, lan_rate))
        finally:
            seed_q.cancel_join_thread()
            seed_q.close()
        span = _per_rep(answers)["span"]
        result["transport"] = answers[0]["transport"]
        result["bulk"] = answers[0]["bulk"]
        result["tcpbulk"] = answers[0]["tcpbulk"]
        for key, reps in sorted(span.items(), key=lambda kv: (int(kv[0].split(":")[0]), kv[0])):
            nbytes_s, opname, who = key.split(":")
            if who == "gloo":
                continue
            nbytes = int(nbytes_s)
            # what each rank's link carries (NCCL's busbw factors)
            factor = {"allreduce": 2 * (world - 1) / world, "broadcast": 1.0,
                      "allgather": (world - 1)}[opname]
            t_mesh = statistics.median(reps)
            gl = span.get(f"{nbytes}:{opname}:gloo")
            t_gloo = statistics.median(gl) if gl else None
            ratios = [m / g for m, g in zip(reps, gl, strict=True)] if gl else []
            paired = statistics.median(ratios) if ratios else None
            bus = factor * nbytes
            result["rows"].append({
                "mesh_cpu_s": _cpu_per_op(answers, key),
                "gloo_cpu_s": _cpu_per_op(answers, f"{nbytes}:{opname}:gloo"),
                "world": world, "op": opname, "algo": who, "bytes": nbytes,
                "mesh_s": t_mesh, "gloo_s": t_gloo,
                "ratio": (t_mesh / t_gloo) if t_gloo else None, "ratio_paired": paired,
                # the middle half of the per-repetition ratios: the cell's noise
                "ratio_iqr": _spread(ratios) if ratios else None, "reps": len(reps),
                "ratio_ci": _median_ci(ratios) if ratios else None,
                "mesh_iqr_s": _spread(reps), "gloo_iqr_s": _spread(gl) if gl else None,
                "mesh_busbw": bus / t_mesh, "gloo_busbw": (bus / t_gloo) if t_gloo else None,
                "mesh_wire_share": bus / t_mesh / wire,
                "mesh_both_ways_share": bus / t_mesh / both,
                "gloo_both_ways_share": (bus / t_gloo / both) if t_gloo else None,
                "gloo_wire_share": (bus / t_gloo / wire) if t_gloo else None,
                "wire_floor_s": bus / wire,
            })
        result.setdefault("mesh_stats_rank0", {})[world] = answers[0]["stats"]
    result["load_avg_after"] = os.getloadavg()
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    print(tcp_summary(result))
    return result


def _tcp_reps(nbytes: int, quick: bool, lan_rate: str | None = None) -> tuple[int, int]:
    """(warmup, timed) repetitions of one size in ``--tcp``: enough that the spread of
    the paired ratios (IQR) tells a real loss from the machine's noise, fewer where
    one repetition takes long (large sizes; a rate-limited link). ``--reps N``
    (env ``ZMESH_BENCH_REPS``, read in the ranks) sets the timed ones: to look
    closer at a few cells."""
    if os.environ.get("ZMESH_BENCH_REPS"):
        return 2, int(os.environ["ZMESH_BENCH_REPS"])
    if quick:
        return (2, 7) if nbytes <= MiB else (1, 3)
    if lan_rate is not None and nbytes >= 16 * MiB:
        return 1, 5  # a 64 MiB allgather of 4 at 1 Gbit/s takes ~1.6 s
    if nbytes <= 256 * KiB:
        return 5, 41
    if nbytes <= 4 * MiB:
        return 3, 21
    if nbytes <= 16 * MiB:
        return 2, 11
    if nbytes <= 64 * MiB:
        return 1, 9
    return 1, 5


def _spread(values: list[float]) -> tuple[float, float]:
    """(25th, 75th) percentile: the middle half of the repetitions."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _median_ci(values: list[float]) -> tuple[float, float]:
    """A distribution-free 95 % confidence interval of the median: the order
    statistics n/2 -+ 0.98 sqrt(n) (the sign test's), whatever the noise's shape."""
    v = sorted(values)
    n = len(v)
    k = int(n / 2 - 0.98 * n ** 0.5)
    if k < 0 or n < 6:
        return v[0], v[-1]
    return v[k], v[n - 1 - k]


def verdict(row: dict) -> str:
    """``loss`` when the 95 % confidence interval of the median paired ratio (mesh /
    Gloo, same repetition) lies above 1, ``win`` below 1, else ``~``: within the
    noise of this machine at this many repetitions (``--reps`` for more)."""
    lo, hi = row.get("ratio_ci") or (None, None)
    if lo is None:
        return "-"
    if lo > 1.0:
        return "loss"
    if hi < 1.0:
        return "win"
    return "~"


def _cpu_per_op(answers: list[dict], key: str) -> float | None:
    """CPU seconds of every rank together per op (median over repetitions)."""
    if key not in answers[0].get("cpu", {}):
        return None
    per = zip(*(a["cpu"][key] for a in answers), strict=True)
    return statistics.median(sum(r) for r in per)


def tcp_floor(result: dict, nbytes: int = 64 * MiB) -> list[str]:
    """The allreduce rows of ``nbytes`` against the floors this machine allows: the
    wire one way (busbytes / one-way rate), both ways at once (/ the 2way rate), and
    the CPU (all ranks' CPU seconds per op / the cores: with more work than cores,
    no schedule finishes sooner). The goal of issue #17 is 1.3x the wire floor."""
    wire, both = result["wire_bytes_per_s"], result["wire_both_ways_bytes_per_s"]
    cpus = result.get("cpus") or 1
    raw_cpu = result.get("raw_both_ways_cpu_s_per_byte")
    lines = []
    for row in result["rows"]:
        if row["op"] != "allreduce" and row["bytes"] == nbytes:
            # busbytes / one-way rate: what the busiest link must carry at the least
            fl = row["wire_floor_s"]
            lines.append(
                f"{row['op']} {row['world']} ranks {_fmt_bytes(nbytes)}: wire floor "
                f"{fl * 1e3:.1f} ms; mesh {row['mesh_s'] * 1e3:.1f} ms = "
                f"{row['mesh_s'] / fl:.2f}x" + (
                    f"; Gloo {row['gloo_s'] * 1e3:.1f} ms = {row['gloo_s'] / fl:.2f}x"
                    if row.get("gloo_s") else ""))
        if row["op"] != "allreduce" or row["bytes"] != nbytes:
            continue
        w = row["world"]
        bus = 2 * (w - 1) / w * nbytes
        one, two = bus / wire, bus / both
        lines.append(
            f"allreduce {w} ranks {_fmt_bytes(nbytes)}: wire floor one way {one * 1e3:.1f} ms "
            f"(busbytes {bus / MiB:.0f} MiB / {wire / 1e9:.2f} GB/s), both ways at once "
            f"{two * 1e3:.1f} ms; mesh {row['mesh_s'] * 1e3:.1f} ms = "
            f"{row['mesh_s'] / one:.2f}x one-way, {row['mesh_s'] / two:.2f}x both-ways"
            + (f"; Gloo {row['gloo_s'] * 1e3:.1f} ms = {row['gloo_s'] / one:.2f}x, "
               f"{row['gloo_s'] / two:.2f}x" if row.get("gloo_s") else ""))
        mc, gc = row.get("mesh_cpu_s"), row.get("gloo_cpu_s")
        if mc:
            cpu_line = (f"  CPU, all {w} ranks: mesh {mc * 1e3:.1f} ms per op"
                        + (f", Gloo {gc * 1e3:.1f} ms" if gc else "")
                        + f"; over {cpus} cores the CPU alone takes >= {mc / cpus * 1e3:.1f} ms "
                        f"(mesh), {'' if not gc else f'{gc / cpus * 1e3:.1f} ms (Gloo), '}"
                        f"= {mc / cpus / one:.2f}x the one-way wire floor")
            if raw_cpu:
                # raw_cpu covers a byte sent each way (two sends, two receives); the
                # ranks send w * bus bytes in all, each once sent and once received
                kern = raw_cpu / 2 * bus * w
                cpu_line += (f"; plain sockets moving the same bytes (both ways at once) cost "
                             f"{kern * 1e3:.1f} CPU-ms = {kern / cpus / one:.2f}x the floor "
                             "before any reduction")
            lines.append(cpu_line)
    return lines


def tcp_summary(result: dict) -> str:
    wire = result["wire_bytes_per_s"]
    zw = result.get("zmq_wire_bytes_per_s")
    where = ("LAN: each rank in a network namespace of its own on one bridge "
             f"({LAB_NET}.x, tests/harness/netns_lab.sh)" if result.get("lan")
             else "tcp loopback")
    if result.get("lan_rate"):
        where += (f", every host's egress limited to {result['lan_rate']} (tc tbf): the "
                  "wire, not the CPU, is the limit, as between real hosts")
    lines = [
        "",
        f"=== tcp only, {where} (mesh: tcp listen endpoints, shm=False; Gloo: tcp), float32, "
        "interleaved; median span (last rank in -> last rank out); ratio = mesh / gloo "
        "(< 1: mesh faster), paired = median of per-repetition ratios ===",
        f"busbw: allreduce 2(n-1)/n*bytes/time, broadcast bytes/time, allgather "
        f"(n-1)*bytes/time; wire = raw tcp between the ranks' endpoints with plain sockets "
        f"(sendall -> recv_into), one direction, same run: {wire / 1e9:.2f} GB/s"
        + (f" (zmq PUSH/PULL: {zw / 1e9:.2f} GB/s)" if zw else "")
        + f"; both ways at once (as in a ring): {result['wire_both_ways_bytes_per_s'] / 1e9:.2f}"
        " GB/s per direction (2way = busbw / that)"
        + f"; floor = busbytes / wire (one way); cpu = CPU time of all ranks' processes per op; mesh links {','.join(result.get('transport', []))}, "
        f"bulk tcp stream {','.join(result.get('tcpbulk', []))}; {result['cpus']} cpus, "
        f"load avg {result['load_avg_before'][0]:.1f} before",
    ]
    lines.append("paired = median of the per-repetition ratios, iqr = their middle half "
                 "(25th-75th percentile: the noise), ci = 95 % confidence interval of that "
                 "median, n = repetitions; verdict: loss when the ci is above 1, win below, "
                 "~ within the noise")
    head = (f"{'op':>9} {'algo':>6} {'world':>5} {'size':>7}  {'mesh':>9} {'gloo':>9} "
            f"{'ratio':>6} {'paired':>6} {'iqr':>11} {'ci':>11} {'n':>3} {'verdict':>7}  "
            f"{'mesh busbw':>10} {'gloo busbw':>10} "
            f"{'mesh/wire':>9} {'gloo/wire':>9} {'floor':>9} {'mesh/2way':>9} {'gloo/2way':>9} "
            f"{'mesh cpu':>9} {'gloo cpu':>9}")
    lines += [head, "-" * len(head)]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1e3:.2f}ms"

    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.0%}"

    def iqr(v: Any) -> str:
        return "-" if not v else f"{v[0]:.2f}-{v[1]:.2f}"

    for row in sorted(result["rows"], key=lambda r: (TCP_OPS.index(r["op"]), r["algo"],
                                                      r["world"], r["bytes"])):
        gbw = row["gloo_busbw"]
        lines.append(
            f"{row['op']:>9} {row['algo']:>6} {row['world']:>5} {_fmt_bytes(row['bytes']):>7}  "
            f"{ms(row['mesh_s']):>9} {ms(row['gloo_s']):>9} {x(row['ratio']):>6} "
            f"{x(row['ratio_paired']):>6} {iqr(row.get('ratio_iqr')):>11} "
            f"{iqr(row.get('ratio_ci')):>11} "
            f"{row.get('reps', 0):>3} {verdict(row):>7}  {row['mesh_busbw'] / 1e9:>6.3f}GB/s "
            f"{(f'{gbw / 1e9:6.3f}GB/s' if gbw else '-'):>10} "
            f"{pct(row['mesh_wire_share']):>9} {pct(row['gloo_wire_share']):>9} "
            f"{ms(row['wire_floor_s']):>9} {pct(row.get('mesh_both_ways_share')):>9} "
            f"{pct(row.get('gloo_both_ways_share')):>9} {ms(row.get('mesh_cpu_s')):>9} "
            f"{ms(row.get('gloo_cpu_s')):>9}")
    floor = tcp_floor(result)
    if floor:
        what = (f"the wire is the {result['lan_rate']} limit" if result.get("lan_rate")
                else "unlimited: loopback/veth 'wire' is the kernel's memcpy on the same "
                "cores that reduce, so the CPU, not a wire, sets this floor")
        lines += ["", f"Floors (issue #17 goal: within 1.3x of the wire floor at 64 MiB; "
                  f"{what}):", *floor]
    wins = {v: sum(1 for r in result["rows"] if verdict(r) == v) for v in ("win", "~", "loss")}
    lines.append(f"verdicts: {wins['win']} win, {wins['~']} within noise, {wins['loss']} loss"
                 + ("" if not wins["loss"] else ": " + ", ".join(
                     f"{r['op']} {r['world']}r {_fmt_bytes(r['bytes'])}"
                     for r in result["rows"] if verdict(r) == "loss")))
    if result["gloo_skipped"]:
        lines.append(f"Gloo skipped: {result['gloo_skipped']}")
    lines.append(f"wall time {result['wall_seconds']:.1f} s ({result['mode']} run)")
    return "\n".join(lines)


# ====================================================================== shm on vs off

SHM_SIZES = (4 * MiB, 16 * MiB, 64 * MiB)
SHM_MODES: dict[str, dict[str, Any]] = {"shm": {}, "noshm": {"shm": False}}


def _shm_rank_main(out: Any, rank: int, world: int, cluster: str, seed_q: Any,
                   sizes: list[int], quick: bool) -> None:
    _quiet_threads()
    try:
        out.put((rank, True, _shm_rank_body(rank, world, cluster, seed_q, sizes, quick)))
    except BaseException:
        out.put((rank, False, traceback.format_exc()))


def _shm_rank_body(rank: int, world: int, cluster: str, seed_q: Any, sizes: list[int],
                   quick: bool) -> dict:
    """Two nodes per rank, one per mode of ``SHM_MODES`` (default, and ``shm=False``),
    each in a cluster of its own; the two groups' allreduces interleaved."""
    import mesh

    listen = ("tcp://127.0.0.1:0", "ipc://auto")
    nodes: dict[str, Any] = {}
    times: dict[str, list[float]] = {}
    try:
        if rank == 0:
            for mode, opts in SHM_MODES.items():
                nodes[mode] = mesh.Node(f"bench-r0-{mode}-{os.getpid()}", cluster=f"{cluster}-{mode}",
                                        discovery="none", listen=listen, **opts).start()
            seeds = {mode: next(e for e in n.endpoints if e.startswith("tcp://"))
                     for mode, n in nodes.items()}
            for _ in range(world - 1):
                seed_q.put(seeds)
        else:
            seeds = seed_q.get(timeout=60)
            for mode, opts in SHM_MODES.items():
                nodes[mode] = mesh.Node(f"bench-r{rank}-{mode}-{os.getpid()}",
                                        cluster=f"{cluster}-{mode}", discovery="static",
                                        seeds=[seeds[mode]], listen=listen, **opts).start()
        groups = {}
        for mode, node in nodes.items():
            node.wait_for_peers(world - 1, timeout=60)
            groups[mode] = node.group("bench.shm", world, timeout=120)
        for nbytes in sizes:
            x = np.ones(nbytes // 4, dtype=np.float32)
            warm, reps = _reps(nbytes, quick)
            for mode in SHM_MODES:
                times[f"{nbytes}:{mode}"] = []
            for i in range(warm + reps):
                order = list(SHM_MODES) if i % 2 == 0 else list(SHM_MODES)[::-1]
                for mode in order:
                    g = groups[mode]
                    x.fill(1.0)
                    g.barrier()
                    t0 = time.perf_counter()
                    res = g.allreduce(x, out=x)
                    dt = time.perf_counter() - t0
                    if res[0] != world:
                        raise RuntimeError(f"mesh ({mode}): wrong allreduce result {res[0]}")
                    if i >= warm:
                        times[f"{nbytes}:{mode}"].append(dt)
        status = {mode: n.status() for mode, n in nodes.items()}
        for g in groups.values():
            g.close()
    finally:
        for n in nodes.values():
            n.close()
    return {
        "times": times,
        # How arrays went to the peers: "shm", or the socket's transport.
        "bulk": {mode: sorted({str(p["bulk"]) for p in st["peers"]}) for mode, st in status.items()},
        "transport": {mode: sorted({str(p["transport"]) for p in st["peers"]})
                      for mode, st in status.items()},
        "shm_stats": [p["shm"] for p in status["shm"]["peers"] if p.get("shm")],
    }


def shm_compare(quick: bool = False, world: int = 4) -> dict:
    """Allreduce with the node's shared memory on (default) vs off (``shm=False``),
    ``world`` processes, interleaved call by call; prints its table, returns the numbers.
    Ratio = shm-off time / shm-on time (> 1: shared memory is faster)."""
    started = time.monotonic()
    sizes = list(SHM_SIZES[:2] if quick else SHM_SIZES)
    cluster = f"bench-shm-{uuid.uuid4().hex[:8]}"
    seed_q = _SPAWN.Queue()
    load_before = os.getloadavg()
    try:
        answers = _run_ranks(_shm_rank_main, world,
                             lambda r: (world, cluster, seed_q, sizes, quick))
    finally:
        seed_q.cancel_join_thread()
        seed_q.close()
    bus_factor = 2 * (world - 1) / world
    rows = []
    for nbytes in sizes:
        per_rep = {mode: [max(a["times"][f"{nbytes}:{mode}"][i] for a in answers)
                          for i in range(len(answers[0]["times"][f"{nbytes}:{mode}"]))]
                   for mode in SHM_MODES}
        ratios = [off / on for on, off in zip(per_rep["shm"], per_rep["noshm"], strict=True)]
        on, off = statistics.median(per_rep["shm"]), statistics.median(per_rep["noshm"])
        rows.append({"world": world, "bytes": nbytes, "shm_s": on, "noshm_s": off,
                     "ratio_noshm_over_shm": statistics.median(ratios), "ratios": ratios,
                     "shm_busbw": bus_factor * nbytes / on, "noshm_busbw": bus_factor * nbytes / off})
    result = {"bench": "collectives-shm", "mode": "quick" if quick else "full", "world": world,
              "rows": rows, "bulk": answers[0]["bulk"], "transport": answers[0]["transport"],
              "shm_stats_rank0": answers[0]["shm_stats"], "load_avg_before": load_before,
              "load_avg_after": os.getloadavg(),
              "wall_seconds": round(time.monotonic() - started, 1)}
    print(shm_summary(result))
    return result


def shm_summary(result: dict) -> str:
    bulk = result["bulk"]
    lines = [
        "",
        f"=== allreduce float32, {result['world']} processes: node shm on (default) vs "
        "shm=False, interleaved (median of the slowest rank; ratio = off time / on time, "
        "> 1: shm faster) ===",
        f"links: shm on -> {','.join(result['transport']['shm'])} + bulk "
        f"{','.join(bulk['shm'])}; shm off -> {','.join(result['transport']['noshm'])} + bulk "
        f"{','.join(bulk['noshm'])}; load avg {result['load_avg_before'][0]:.1f} before",
    ]
    head = (f"{'size':>7}  {'off/on':>7}  {'shm on':>9} {'shm off':>9}  "
            f"{'on busbw':>10} {'off busbw':>10}")
    lines += [head, "-" * len(head)]
    for row in result["rows"]:
        lines.append(
            f"{_fmt_bytes(row['bytes']):>7}  {row['ratio_noshm_over_shm']:>6.2f}x  "
            f"{row['shm_s'] * 1e3:>7.1f}ms {row['noshm_s'] * 1e3:>7.1f}ms  "
            f"{row['shm_busbw'] / 1e9:>6.3f}GB/s {row['noshm_busbw'] / 1e9:>6.3f}GB/s")
    lines.append(f"wall time {result['wall_seconds']:.1f} s ({result['mode']} run)")
    return "\n".join(lines)


def summary(result: dict) -> str:
    from mesh.collectives.schedule import (
        DEFAULT_SEGMENT_BYTES,
        crossover_bytes_for,
        direct_bytes_for,
    )

    memcpy = result["memcpy_bytes_per_s"]
    lines = [
        "",
        "=== allreduce float32: mesh vs torch.distributed Gloo, interleaved; times: median "
        "over repetitions of the span (last rank in -> last rank out); ratio = mesh auto / "
        "gloo, < 1 is faster; paired = median of per-repetition span ratios; own = ratio of "
        "the slowest rank's own times (barrier exit skew included); b2b = ratio per allreduce "
        f"of {B2B} back to back ===",
        f"busbw = 2(n-1)/n*bytes/time; numpy memcpy {memcpy / 1e9:.2f} GB/s; mesh transport "
        f"{','.join(result['transport']) or '?'}, gloo tcp loopback; {result['cpus']} cpus, "
        f"load avg {result['load_avg_before'][0]:.1f} before",
    ]
    head = (f"{'world':>5} {'size':>7}  {'mesh auto':>10} {'direct':>9} {'tree':>9} {'ring':>9} "
            f"{'gloo':>9} "
            f"{'ratio':>6} {'paired':>6} {'own':>6} {'b2b':>6}  {'mesh busbw':>10} "
            f"{'gloo busbw':>10} {'mesh/memcpy':>11} {'gloo/memcpy':>11}")
    lines += [head, "-" * len(head)]

    def ms(v: float | None) -> str:
        return "-" if v is None else (f"{v * 1e3:.2f}ms" if v < 1 else f"{v:.2f}s")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    for row in result["rows"]:
        ratio, paired = row["ratio_mesh_over_gloo"], row.get("ratio_paired_median")
        own = row.get("metrics", {}).get("own", {}).get("ratio")
        b2b = row.get("metrics", {}).get("b2b", {}).get("ratio")
        gbw = row["gloo_busbw"]
        lines.append(
            f"{row['world']:>5} {_fmt_bytes(row['bytes']):>7}  {ms(row['mesh_s']):>10} "
            f"{ms(row.get('direct_s')):>9} {ms(row['tree_s']):>9} {ms(row['ring_s']):>9} "
            f"{ms(row['gloo_s']):>9} "
            f"{x(ratio):>6} {x(paired):>6} {x(own):>6} {x(b2b):>6}  "
            f"{row['mesh_busbw'] / 1e9:>6.3f}GB/s {(f'{gbw / 1e9:6.3f}GB/s' if gbw else '-'):>10} "
            f"{pct(row['mesh_busbw_over_memcpy']):>11} {pct(row['gloo_busbw_over_memcpy']):>11}"
        )
    for world, cross in result.get("direct_crossover", {}).items():
        sug = cross.get("suggested")
        lines.append(f"direct crossover, {world} ranks: {cross['note']}; suggested "
                     f"{_fmt_bytes(sug) if sug else '-'} (auto now takes direct below "
                     f"schedule.direct_bytes_for({world}) = "
                     f"{_fmt_bytes(direct_bytes_for(int(world)))})")
    for world, cross in result["crossover"].items():
        sug = cross.get("suggested")
        lines.append(f"tree/ring crossover, {world} ranks: {cross['note']}; suggested "
                     f"{_fmt_bytes(sug) if sug else '-'} (auto now takes the ring from "
                     f"schedule.crossover_bytes_for({world}) = "
                     f"{_fmt_bytes(crossover_bytes_for(int(world)))}, the tree below it "
                     "above the direct range)")
    bests = []
    for world, sweep in result["segments"].items():
        for nbytes, by_seg in sweep.items():
            best = min(by_seg, key=by_seg.get)
            bests.append(best)
            cells = "  ".join(f"{_fmt_bytes(s)}: {ms(t)}" for s, t in sorted(by_seg.items()))
            lines.append(f"segment sweep, {world} ranks, {_fmt_bytes(nbytes)} ring: {cells}  "
                         f"(best {_fmt_bytes(best)})")
    if bests:
        # relative time of each segment size, averaged over the swept cases
        segs = sorted(next(iter(next(iter(result["segments"].values())).values())))
        score = {s: statistics.mean(by[s] / min(by.values())
                                    for sw in result["segments"].values() for by in sw.values())
                 for s in segs}
        best = min(score, key=score.get)
        lines.append(f"segment size: {_fmt_bytes(best)} is on average within "
                     f"{score[best] - 1:.0%} of the best (the group default, "
                     f"schedule.DEFAULT_SEGMENT_BYTES, is {_fmt_bytes(DEFAULT_SEGMENT_BYTES)}: "
                     f"{score.get(DEFAULT_SEGMENT_BYTES, float('nan')) - 1:.0%} off)")
    if result["gloo_skipped"]:
        lines.append(f"Gloo skipped: {result['gloo_skipped']}")
    lines.append(f"wall time {result.get('wall_seconds', 0):.1f} s ({result['mode']} run)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.collectives",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer sizes and reps")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile mesh rank 0's calling thread (largest size) into "
                        "bench/results/profile/")
    parser.add_argument("--transports", default="",
                        help="restrict the mesh's transports, e.g. tcp (default: its own choice)")
    parser.add_argument("--segment-bytes", type=int, default=None,
                        help="the mesh group's pipelining segment (default: the group's)")
    parser.add_argument("--worlds", default="2,4", help="comma-separated world sizes")
    parser.add_argument("--sizes", default="",
                        help="only these sizes, e.g. 16K,64K,256K,1M (every algorithm up to "
                        "16 MiB, auto only above; no segment sweep)")
    parser.add_argument("--shm", action="store_true",
                        help="only the 4-process allreduce with node shm on vs off")
    parser.add_argument("--tcp", action="store_true",
                        help="nodes on tcp only with shm=False: allreduce, broadcast, allgather "
                        "vs Gloo side by side, busbw and share of the raw tcp rate")
    parser.add_argument("--lan", action="store_true",
                        help="with --tcp: every rank in a network namespace of its own "
                        "(tests/harness/netns_lab.sh; root), mesh and Gloo alike")
    parser.add_argument("--lan-rate", default="",
                        help="with --tcp (implies --lan): every namespace host sends at most "
                        "this rate (tc tbf, e.g. 1gbit, 10gbit): the regime of real hosts, "
                        "where the wire, not this machine's cores, is the limit")
    parser.add_argument("--ops", default=",".join(TCP_OPS),
                        help="with --tcp: which collectives (default: all three)")
    parser.add_argument("--algos", default="auto",
                        help="with --tcp: the mesh allreduce algorithms to time (default: auto; "
                        "ALGO-old: with the streams' small-message path of before, A/B)")
    parser.add_argument("--bcast-algos", default="",
                        help="with --tcp: also time the broadcast with these plans forced "
                        "(direct, tree, chain; -SIZE sets the segment, e.g. chain-256K; "
                        "-norelay: forwarded by the caller, not cut-through; nolean: the general "
                        "executor for one-message broadcasts; old: that and the stream's "
                        "small-message path as before 2026-12-06 11:30), each against "
                        "Gloo in the same run")
    parser.add_argument("--reps", type=int, default=0,
                        help="with --tcp: timed repetitions of every cell (default: by size, "
                        "41 small .. 5 at 256 MiB); more to tell a small loss from noise")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.reps > 0:
        os.environ["ZMESH_BENCH_REPS"] = str(args.reps)  # (inherited by the spawned ranks)
    if args.bcast_algos:
        os.environ["ZMESH_BENCH_BCAST"] = args.bcast_algos  # (inherited by the spawned ranks)
    if args.lan_rate:
        parse_rate(args.lan_rate)  # a typo fails before the lab is built
    if args.tcp or args.lan or args.lan_rate:
        result = tcp_compare(args.quick, worlds=tuple(int(w) for w in args.worlds.split(",")),
                             sizes=parse_sizes(args.sizes) or None,
                             ops=tuple(o for o in args.ops.split(",") if o),
                             algos=tuple(a for a in args.algos.split(",") if a),
                             segment_bytes=args.segment_bytes, lan=args.lan,
                             lan_rate=args.lan_rate or None)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1, default=str)
        return 0
    profile_dir = None
    if args.profile:
        profile_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "profile")
        os.makedirs(profile_dir, exist_ok=True)
    if args.shm:
        result = shm_compare(args.quick)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1, default=str)
        return 0
    result = run(args.quick, transports=tuple(t for t in args.transports.split(",") if t) or None,
                 segment_bytes=args.segment_bytes, profile_dir=profile_dir,
                 worlds=tuple(int(w) for w in args.worlds.split(",")),
                 sizes=parse_sizes(args.sizes) or None)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)

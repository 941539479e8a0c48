"""Allreduce: the mesh's group collectives against torch.distributed (Gloo, CPU).

    python -m bench.collectives            # full run, a few minutes
    python -m bench.collectives --quick    # smoke run, well under a minute
    python -m bench.collectives --profile  # also cProfile mesh rank 0 (64 MiB, 4 ranks)

For each world size (2 and 4 processes, all on this host) and array size
(float32: 4 KiB, 16 KiB, 64 KiB, 256 KiB to find the tree/ring crossover, then
1 MiB, 16 MiB, 64 MiB), every rank times ``reps`` allreduces, each after a
barrier; a repetition's time is the slowest rank's, and the table shows the
median over repetitions. Bus bandwidth is ``2 (n - 1) / n * bytes / time``
(NCCL's definition: what each link carried), also shown as a fraction of this
machine's numpy memcpy bandwidth (``np.copyto`` of 64 MiB, measured in the
same run). The mesh runs ``ring`` and ``tree`` at the small sizes (so the
crossover is measured, not guessed) and ``auto`` everywhere; Gloo runs
``dist.all_reduce`` (its own ring / halving-doubling choice) over TCP on
127.0.0.1, rendezvous ``init_method="tcp://127.0.0.1:PORT"``. The mesh uses
whatever transport it picks between processes of one host (ipc: Unix
sockets), unless ``transports=`` says otherwise.

``run(quick) -> dict`` is the entry point for ``bench/__main__.py``; it prints
its own table and returns every number. Without torch the Gloo half is
skipped with the reason printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import queue
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
SMALL_SIZES = (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB)
LARGE_SIZES = (1 * MiB, 16 * MiB, 64 * MiB)
WORLDS = (2, 4)
TASK_TIMEOUT = 600.0


def _reps(nbytes: int, quick: bool) -> tuple[int, int]:
    """(warmup, timed) repetitions for one size."""
    if quick:
        return (2, 5) if nbytes <= MiB else (1, 3)
    if nbytes <= 256 * KiB:
        return 10, 50
    if nbytes <= MiB:
        return 3, 20
    if nbytes <= 16 * MiB:
        return 2, 7
    return 1, 5


def plan(quick: bool) -> list[tuple[int, str]]:
    """(bytes, mesh algorithm) cases, in the order they run."""
    small = SMALL_SIZES[::2] if quick else SMALL_SIZES
    large = LARGE_SIZES[:1] if quick else LARGE_SIZES
    cases = []
    for nbytes in small:
        cases += [(nbytes, "ring"), (nbytes, "tree"), (nbytes, "auto")]
    for nbytes in large:
        cases += [(nbytes, "auto")]
    return cases


# ====================================================================== workers


def _quiet_threads() -> None:
    # Two cores and several ranks: no library may start a thread pool of its own.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"


def _mesh_rank(out: Any, rank: int, world: int, cluster: str, seed_q: Any, cases: list,
               quick: bool, transports: tuple[str, ...] | None, profile_dir: str | None) -> None:
    _quiet_threads()
    try:
        import mesh

        kwargs: dict[str, Any] = {"cluster": cluster,
                                  "listen": ("tcp://127.0.0.1:0", "ipc://auto")}
        if transports:
            kwargs["transports"] = transports
        if rank == 0:
            node = mesh.Node(f"bench-r0-{os.getpid()}", discovery="none", **kwargs).start()
            tcp = next(e for e in node.endpoints if e.startswith("tcp://"))
            for _ in range(world - 1):
                seed_q.put(tcp)
        else:
            tcp = seed_q.get(timeout=60)
            node = mesh.Node(f"bench-r{rank}-{os.getpid()}", discovery="static", seeds=[tcp],
                             **kwargs).start()
        with node:
            node.wait_for_peers(world - 1, timeout=60)
            # rank by name order: bench-r0 < bench-r1 < ... (fewer than 10 ranks)
            group = node.group("bench.allreduce", world, timeout=60)
            transport = {p["name"]: p["transport"] for p in node.status()["peers"]}
            times: dict[str, list[float]] = {}
            for nbytes, algo in cases:
                x = np.ones(nbytes // 4, dtype=np.float32)
                warm, reps = _reps(nbytes, quick)
                key = f"{nbytes}:{algo}"
                times[key] = []
                profiling = (profile_dir and rank == 0 and world == max(WORLDS)
                             and nbytes == max(LARGE_SIZES))
                for i in range(warm + reps):
                    group.barrier()
                    if profiling and i == warm:
                        from bench.profiling import profiled

                        ctx: Any = profiled(os.path.join(profile_dir, "collectives_rank0"))
                    else:
                        ctx = contextlib.nullcontext()
                    with ctx:
                        t0 = time.perf_counter()
                        out_arr = group.allreduce(x, algorithm=algo)
                        dt = time.perf_counter() - t0
                    if i >= warm:
                        times[key].append(dt)
                if out_arr[0] != world:
                    raise RuntimeError(f"wrong allreduce result {out_arr[0]} != {world}")
            stats = group.stats()
            group.close()
        out.put((rank, True, {"times": times, "transport": transport, "stats": stats}))
    except BaseException:
        out.put((rank, False, traceback.format_exc()))


def _gloo_rank(out: Any, rank: int, world: int, port: int, cases: list, quick: bool) -> None:
    _quiet_threads()
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        times: dict[str, list[float]] = {}
        try:
            for nbytes in sorted({n for n, _ in cases}):
                t = torch.ones(nbytes // 4, dtype=torch.float32)
                warm, reps = _reps(nbytes, quick)
                key = f"{nbytes}:gloo"
                times[key] = []
                for i in range(warm + reps):
                    t.fill_(1.0)
                    dist.barrier()
                    t0 = time.perf_counter()
                    dist.all_reduce(t)
                    dt = time.perf_counter() - t0
                    if i >= warm:
                        times[key].append(dt)
                if float(t[0]) != world:
                    raise RuntimeError(f"wrong gloo result {float(t[0])}")
        finally:
            dist.destroy_process_group()
        out.put((rank, True, {"times": times}))
    except BaseException:
        out.put((rank, False, traceback.format_exc()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _combine(answers: list[dict]) -> dict[str, float]:
    """Median over repetitions of the slowest rank's time."""
    keys = answers[0]["times"].keys()
    med = {}
    for key in keys:
        per_rep = [max(a["times"][key][i] for a in answers)
                   for i in range(len(answers[0]["times"][key]))]
        med[key] = statistics.median(per_rep)
    return med


# ====================================================================== parent


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


def _crossover(med: dict[str, float], world: int) -> dict:
    """Smallest measured size where the ring beats the tree (None: the ring always)."""
    sizes = sorted({int(k.split(":")[0]) for k in med if k.endswith(":tree")})
    if world <= 2 or not sizes:
        return {"bytes": 0, "note": "two ranks: the ring always (half the bytes of the tree)"}
    ring_wins = [n for n in sizes if med[f"{n}:ring"] <= med[f"{n}:tree"]]
    tree_wins = [n for n in sizes if med[f"{n}:ring"] > med[f"{n}:tree"]]
    if not ring_wins:
        return {"bytes": None, "note": f"tree faster up to {sizes[-1]} B: crossover above it"}
    first = min(ring_wins)
    below = [n for n in tree_wins if n < first]
    if not below:
        return {"bytes": first, "note": f"ring already faster at {first} B"}
    return {"bytes": first, "note": f"tree faster at {max(below)} B, ring at {first} B"}


def _fmt_bytes(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def run(quick: bool = False, *, transports: tuple[str, ...] | None = None,
        profile_dir: str | None = None, worlds: tuple[int, ...] = WORLDS) -> dict:
    """Run the allreduce benchmark, print its table, return every number."""
    started = time.monotonic()
    cases = plan(quick)
    memcpy = memcpy_bandwidth()
    gloo_reason = torch_available()
    result: dict[str, Any] = {
        "bench": "collectives",
        "mode": "quick" if quick else "full",
        "memcpy_bytes_per_s": memcpy,
        "gloo_skipped": gloo_reason,
        "rows": [],
        "crossover": {},
        "cpus": os.cpu_count(),
    }
    if gloo_reason:
        print(f"collectives: Gloo reference skipped: {gloo_reason}")
    for world in worlds:
        cluster = f"bench-coll-{uuid.uuid4().hex[:8]}"
        seed_q = _SPAWN.Queue()
        mesh_answers = _run_plain(
            _mesh_rank, world,
            lambda r, w=world, c=cluster, q=seed_q: (w, c, q, cases, quick, transports, profile_dir),
        )
        seed_q.close()
        mesh_med = _combine(mesh_answers)
        gloo_med: dict[str, float] = {}
        if not gloo_reason:
            port = _free_port()
            gloo_med = _combine(_run_plain(_gloo_rank, world,
                                           lambda r, w=world, p=port: (w, p, cases, quick)))
        result["crossover"][world] = _crossover(mesh_med, world)
        result["transport"] = sorted({t for a in mesh_answers for t in a["transport"].values()})
        for nbytes in sorted({n for n, _ in cases}):
            algos = {a: mesh_med.get(f"{nbytes}:{a}") for a in ("ring", "tree", "auto")}
            t_mesh = algos["auto"]
            t_gloo = gloo_med.get(f"{nbytes}:gloo")
            bus = 2 * (world - 1) / world * nbytes
            result["rows"].append({
                "world": world, "bytes": nbytes,
                "mesh_s": t_mesh, "ring_s": algos["ring"], "tree_s": algos["tree"],
                "gloo_s": t_gloo,
                "ratio_mesh_over_gloo": (t_mesh / t_gloo) if t_gloo else None,
                "mesh_busbw": bus / t_mesh, "gloo_busbw": (bus / t_gloo) if t_gloo else None,
                "mesh_busbw_over_memcpy": bus / t_mesh / memcpy,
            })
        result.setdefault("mesh_stats", {})[world] = mesh_answers[0]["stats"]
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    print(summary(result))
    return result


def _run_plain(target: Any, world: int, args_for: Any, timeout: float = TASK_TIMEOUT) -> list[dict]:
    """Run ``target(out, rank, *args_for(rank))`` in ``world`` spawned processes; collect
    one answer per rank from ``out``; reap every process (bounded waits) whatever happens."""
    out = _SPAWN.Queue()
    procs = [_SPAWN.Process(target=target, args=(out, r, *args_for(r)), daemon=True)
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        answers: dict[int, dict] = {}
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


def summary(result: dict) -> str:
    memcpy = result["memcpy_bytes_per_s"]
    lines = [
        "",
        f"=== allreduce float32: mesh vs torch.distributed Gloo (median of the slowest rank; "
        f"busbw = 2(n-1)/n*bytes/time; numpy memcpy {memcpy / 1e9:.2f} GB/s; "
        f"mesh transport {','.join(result.get('transport', [])) or '?'}) ===",
    ]
    head = (f"{'world':>5} {'size':>7}  {'mesh auto':>10} {'ring':>9} {'tree':>9} {'gloo':>9} "
            f"{'mesh/gloo':>9}  {'mesh busbw':>11} {'gloo busbw':>11} {'mesh/memcpy':>11}")
    lines += [head, "-" * len(head)]

    def ms(v: float | None) -> str:
        return "-" if v is None else (f"{v * 1e3:.2f}ms" if v < 1 else f"{v:.2f}s")

    for row in result["rows"]:
        gbw = row["gloo_busbw"]
        ratio = row["ratio_mesh_over_gloo"]
        ratio_s = f"{ratio:.2f}x" if ratio else "-"
        gbw_s = f"{gbw / 1e9:8.3f}GB/s" if gbw else "-"
        lines.append(
            f"{row['world']:>5} {_fmt_bytes(row['bytes']):>7}  {ms(row['mesh_s']):>10} "
            f"{ms(row['ring_s']):>9} {ms(row['tree_s']):>9} {ms(row['gloo_s']):>9} "
            f"{ratio_s:>9}  "
            f"{row['mesh_busbw'] / 1e9:>8.3f}GB/s "
            f"{gbw_s:>11} "
            f"{row['mesh_busbw_over_memcpy']:>10.1%}"
        )
    from mesh.collectives.schedule import DEFAULT_CROSSOVER_BYTES

    for world, cross in result["crossover"].items():
        lines.append(f"tree/ring crossover, {world} ranks: "
                     f"{cross['bytes'] if cross['bytes'] is not None else '>max'} B ({cross['note']}); "
                     f"auto uses schedule.DEFAULT_CROSSOVER_BYTES = {DEFAULT_CROSSOVER_BYTES}")
    if result["gloo_skipped"]:
        lines.append(f"Gloo skipped: {result['gloo_skipped']}")
    lines.append(f"wall time {result.get('wall_seconds', 0):.1f} s ({result['mode']} run)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.collectives",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer sizes and reps")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile mesh rank 0 (64 MiB, 4 ranks) into bench/results/profile/")
    parser.add_argument("--transports", default="",
                        help="restrict the mesh's transports, e.g. tcp (default: its own choice)")
    parser.add_argument("--worlds", default="2,4", help="comma-separated world sizes")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args(argv)
    profile_dir = None
    if args.profile:
        profile_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "profile")
        os.makedirs(profile_dir, exist_ok=True)
    transports = tuple(t for t in args.transports.split(",") if t) or None
    result = run(args.quick, transports=transports, profile_dir=profile_dir,
                 worlds=tuple(int(w) for w in args.worlds.split(",")))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a small 2-rank broadcast's time and CPU go, per thread, mesh against Gloo.

``python -m bench.bcastprobe [--size 16K] [--count 300] [--modes ...] [--lan]``

Two spawned ranks, each with a mesh node on tcp only with shared memory off (as
``bench.collectives --tcp``) and a torch Gloo process group. For each mode, in
blocks (``--rounds`` times, in a new order each round): ``count`` repetitions of
the benchmark's step (a barrier of the op's own kind, then the timed op), and the
barrier alone, so that the op's own share shows. Each rank samples its threads
(``/proc/self/task/*``: CPU from schedstat, voluntary and involuntary context
switches from status, named by Python's threads or the kernel's ``comm``) before
and after each block; the parent prints per op and per thread both ranks' CPU and
switches, and the median span (last rank in -> last rank out, as the benchmark).

``--modes`` adds A/B variants in the same run: ``mesh_nolean`` (the general
executor), ``mesh_nodefer`` (the receiver thread as before), ``mesh_latch`` (the
caller woken through a lock). Environment: ``BCASTPROBE_STAMPS=1`` timestamps the
stream's steps of every mesh op (send, the inline write, post, the receiver's
pump, its release, the caller's wake-up) and prints their median from the span's
start; ``BCASTPROBE_SETTLE=SECONDS`` sleeps after each barrier;
``BCASTPROBE_PROFILE=PATH`` writes a cProfile of each rank's mesh blocks.

Who owns what: the parent spawns the ranks (bench.collectives._run_ranks, which reaps
them); each rank owns its node, group and Gloo process group.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from typing import Any

from bench import collectives as coll
from bench.rtprobe import sample  # tid -> (name, run ns, voluntary, involuntary switches)

MODES = ("mesh", "gloo")
# also: mesh_nolean (the general executor), mesh_nodefer (the receiver thread as before: _Receiver.fast False),
# mesh_latch (the caller waits on a lock, not its eventfd): A/B in the same run


def _diff(before: dict, after: dict) -> dict[str, list[float]]:
    """thread name -> [cpu ns, vol, invol] summed over threads of that name."""
    out: dict[str, list[float]] = {}
    for tid, (name, run, vol, invol) in after.items():
        b = before.get(tid, (name, 0, 0, 0))
        row = out.setdefault(name, [0.0, 0.0, 0.0])
        row[0] += run - b[1]
        row[1] += vol - b[2]
        row[2] += invol - b[3]
    return out


def _stamp_points() -> list:
    """Wrap the stream's steps to record (what, perf_counter) (``BCASTPROBE_STAMPS``)."""
    from transports import tcp_bulk as tb
    marks: list = []

    def wrap(cls: Any, name: str, label: str, after: bool = False) -> None:
        fn = getattr(cls, name)

        def inner(*a: Any, **k: Any) -> Any:
            if not after:
                marks.append((label, time.perf_counter()))
            r = fn(*a, **k)
            if after:
                marks.append((label, time.perf_counter()))
            return r
        setattr(cls, name, inner)

    wrap(tb.TcpBulkConn, "send", "send")
    wrap(tb.TcpBulkConn, "_send_inline", "sendmsg")
    wrap(tb.TcpBulkConn, "post", "post")
    wrap(tb.TcpBulkConn, "_pump", "pump")
    wrap(tb.TcpBulkConn, "_finish", "finished", after=True)
    wrap(tb._Receiver, "release", "released", after=True)
    wrap(tb.RecvRequest, "wait", "woken", after=True)
    return marks


def _rank_main(out: Any, rank: int, seed_q: Any, port: int, nbytes: int, count: int,
               rounds: int, modes: tuple[str, ...], netns: str | None,
               hosts: list[str] | None) -> None:
    import traceback
    coll._quiet_threads()
    try:
        coll._enter_netns(netns)
        out.put((rank, True, _rank_body(rank, seed_q, port, nbytes, count, rounds, modes,
                                        hosts)))
    except BaseException:
        out.put((rank, False, traceback.format_exc()))


def _rank_body(rank: int, seed_q: Any, port: int, nbytes: int, count: int, rounds: int,
               modes: tuple[str, ...], hosts: list[str] | None) -> dict:
    import numpy as np
    import torch
    import torch.distributed as dist

    from transports.tcp_bulk import _Receiver as tb
    from transports.tcp_bulk import _Request as rq

    marks = _stamp_points() if os.environ.get("BCASTPROBE_STAMPS") else None
    me, first = (hosts[rank], hosts[0]) if hosts else ("127.0.0.1", "127.0.0.1")
    if hosts:
        os.environ["GLOO_SOCKET_IFNAME"] = "eth0"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{first}:{port}", rank=rank,
                            world_size=2)
    node = coll._rank_node(rank, 2, seed_q, {"cluster": "bcastprobe", "shm": False,
                                              "listen": (f"tcp://{me}:0",)})
    n = nbytes // 4
    res: dict[str, Any] = {}
    with node:
        node.wait_for_peers(1, timeout=60)
        group = node.group("probe", 2, timeout=60)
        xb = np.ones(n, dtype=np.float32)
        tb = torch.ones(n, dtype=torch.float32)
        def nolean() -> None:
            group._lean = False
            try:
                group.broadcast(xb, root=0)
            finally:
                group._lean = True

        def nodefer() -> None:
            tb.fast = False
            try:
                group.broadcast(xb, root=0)
            finally:
                tb.fast = True

        def latch() -> None:
            rq.fd_wait = False
            try:
                group.broadcast(xb, root=0)
            finally:
                rq.fd_wait = True

        ops = {"mesh": (lambda: group.broadcast(xb, root=0), group.barrier),
               "mesh_latch": (latch, group.barrier),
               "mesh_nodefer": (nodefer, group.barrier),
               "mesh_nolean": (nolean, group.barrier),
               "gloo": (lambda: dist.broadcast(tb, src=0), dist.barrier)}
        # "<kind>" = barrier + op, "<kind>:barrier" = the barrier alone
        blocks = [m for k in modes for m in (k, f"{k}:barrier")]
        order = random.Random(7)
        # BCASTPROBE_SETTLE=seconds: sleep after the barrier (its aftermath off the op's path)
        settle = float(os.environ.get("BCASTPROBE_SETTLE", "0"))
        for rnd in range(rounds + 1):
            for block in order.sample(blocks, len(blocks)):
                kind, _, alone = block.partition(":")
                op, barrier = ops[kind]
                stamps = []
                prof = None
                if os.environ.get("BCASTPROBE_PROFILE") and rnd and kind == "mesh" and not alone:
                    import cProfile
                    prof = cProfile.Profile()
                    prof.enable()
                s0 = sample()
                for _ in range(count):
                    barrier()
                    if settle:
                        time.sleep(settle)
                    t0 = time.perf_counter()
                    if not alone:
                        op()
                    stamps.append((t0, time.perf_counter()))
                s1 = sample()
                if marks is not None and kind != "gloo" and not alone and rnd:
                    res.setdefault("marks", {}).setdefault(kind, []).append(
                        (list(stamps), list(marks)))
                if marks is not None:
                    marks.clear()
                if prof is not None:
                    prof.disable()
                    prof.dump_stats(f"{os.environ['BCASTPROBE_PROFILE']}.r{rank}.{rnd}")
                if rnd == 0:
                    continue  # warm-up round
                r = res.setdefault(block, {"stamps": [], "threads": {}})
                r["stamps"] += stamps
                for name, v in _diff(s0, s1).items():
                    acc = r["threads"].setdefault(name, [0.0, 0.0, 0.0])
                    for i in range(3):
                        acc[i] += v[i]
        group.close()
    dist.destroy_process_group()
    return res


def run(nbytes: int, count: int, rounds: int, modes: tuple[str, ...], lan: bool) -> dict:
    import contextlib
    seed_q = coll._SPAWN.Queue()
    with (coll.namespace_lab(2) if lan else contextlib.nullcontext(None)) as hosts:
        netns = [f"{coll.LAB_PREFIX}h{i + 1}" for i in range(2)] if hosts else None
        port = 29500 + random.randrange(1000) if hosts else coll._free_port()
        try:
            answers = coll._run_ranks(
                _rank_main, 2, lambda r: (seed_q, port, nbytes, count, rounds, modes,
                                          netns[r] if netns else None, hosts))
        finally:
            seed_q.cancel_join_thread()
            seed_q.close()
    return {"answers": answers, "ops": count * rounds}


def show(result: dict) -> None:
    answers, ops = result["answers"], result["ops"]
    for block in [b for b in answers[0] if b != "marks"]:
        st = [a[block]["stamps"] for a in answers]
        spans = [max(r[1] for r in reps) - max(r[0] for r in reps)
                 for reps in zip(*st, strict=True)]
        print(f"\n== {block}: median span {statistics.median(spans) * 1e6:.1f} us "
              f"(iqr {statistics.quantiles(spans, n=4)[0] * 1e6:.0f}-"
              f"{statistics.quantiles(spans, n=4)[2] * 1e6:.0f})")
        for rank, a in enumerate(answers):
            rows = sorted(a[block]["threads"].items(), key=lambda kv: -kv[1][0])
            tot = [sum(v[i] for _, v in rows) / ops for i in range(3)]
            print(f"  rank {rank}: total cpu {tot[0] / 1e3:.1f} us, vol {tot[1]:.2f}, "
                  f"invol {tot[2]:.2f} per op")
            for name, v in rows:
                if v[0] / ops < 500 and v[1] / ops < 0.02:
                    continue
                print(f"    {name:28s} cpu {v[0] / ops / 1e3:7.1f} us  vol {v[1] / ops:5.2f}"
                      f"  invol {v[2] / ops:5.2f}")


def show_marks(result: dict) -> None:
    """Median time of each step from the span's start (the later rank's t0), in us."""
    if not all(a.get("marks") for a in result["answers"]):
        return
    for kind in result["answers"][0]["marks"]:
        _show_marks(kind, [a["marks"][kind] for a in result["answers"]])


def _show_marks(kind: str, runs: list) -> None:
    rows: dict[str, list[float]] = {}
    for blocks in zip(*runs, strict=True):  # one timed block of both ranks
        (st0, mk0), (st1, mk1) = blocks
        for (a0, b0), (a1, b1) in zip(st0, st1, strict=True):
            start, lo, hi = max(a0, a1), min(a0, a1), max(b0, b1)
            rows.setdefault("r0 t0", []).append(a0 - start)
            rows.setdefault("r1 t0", []).append(a1 - start)
            for rank, marks in ((0, mk0), (1, mk1)):
                seen = set()
                for label, t in marks:
                    if lo <= t <= hi and label not in seen:
                        seen.add(label)
                        rows.setdefault(f"r{rank} {label}", []).append(t - start)
            rows.setdefault("r0 t1", []).append(b0 - start)
            rows.setdefault("r1 t1", []).append(b1 - start)
    print(f"\n{kind}: steps, median us from the span's start (n):")
    for k, v in sorted(rows.items(), key=lambda kv: statistics.median(kv[1])):
        print(f"  {k:14s} {statistics.median(v) * 1e6:8.1f}  ({len(v)})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bcastprobe", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="16K")
    p.add_argument("--count", type=int, default=300, help="ops per block")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of every block")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--lan", action="store_true", help="each rank in a network namespace (root)")
    a = p.parse_args(argv)
    res = run(coll.parse_sizes(a.size)[0], a.count, a.rounds, tuple(a.modes.split(",")), a.lan)
    show(res)
    show_marks(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""DDP training step: the mesh's comm hook against DDP's own Gloo allreduce.

    python -m bench.torch_ddp            # 2 and 4 ranks, a minute or two
    python -m bench.torch_ddp --quick    # 2 ranks, fewer steps

From ``bench/__main__.py``: ``torch_ddp.run(quick=...)`` prints its table and
returns a JSON-serialisable dict (``rows``; ``skipped`` with the reason when
torch is missing).

Method. For each world size one set of spawned processes runs every variant,
each rank configured as torchrun would (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT`` in its environment): ``dist.init_process_group
("gloo")`` from it, ``mesh.Node.from_env()`` and ``node.group_from_env()``. Each
rank builds three copies of one MLP (same weights): ``gloo`` = DDP with its
default allreduce over Gloo, ``mesh`` = DDP with ``mt.comm_hook(group)``,
``local`` = the bare model (no gradient exchange: the compute floor). DDP
keeps its defaults (25 MiB buckets). Steps of the three are interleaved, in
a new random order every repetition (the same on every rank), each after a
Gloo barrier; a step is ``zero_grad``, forward, backward (which returns when
every bucket is averaged), ``opt.step()``. The time of a repetition is the
slowest rank's; tables show the median. The mesh uses whatever transport it
picks between processes of one host; Gloo uses TCP over loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import traceback
from typing import Any

from bench.collectives import _quiet_threads, _run_ranks, torch_available
from mesh.launch import free_master_port

SIZES = {"features": 512, "hidden": 1024, "classes": 16, "batch": 32}
WORLDS = (2, 4)
VARIANTS = ("mesh", "mesh_sync", "gloo", "local", "mesh_ar", "gloo_ar")


def _reps(quick: bool) -> tuple[int, int]:
    return (2, 8) if quick else (3, 25)


def _rank_main(out: Any, rank: int, world: int, port: int, quick: bool) -> None:
    _quiet_threads()
    try:
        out.put((rank, True, _rank_body(rank, world, port, quick)))
    except BaseException:
        out.put((rank, False, traceback.format_exc()))


def _rank_body(rank: int, world: int, port: int, quick: bool) -> dict:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import mesh
    import mesh.torch as mt

    torch.set_num_threads(1)
    dist.init_process_group("gloo")

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        f, h, c = SIZES["features"], SIZES["hidden"], SIZES["classes"]
        return torch.nn.Sequential(torch.nn.Linear(f, h), torch.nn.ReLU(), torch.nn.Linear(h, h),
                                   torch.nn.ReLU(), torch.nn.Linear(h, c))

    try:
        with mesh.Node.from_env() as node:
            group = node.group_from_env(timeout=120.0)
            transport = sorted({p["transport"] for p in node.status()["peers"]})
            models = {"gloo": DDP(model()), "mesh": DDP(model()), "mesh_sync": DDP(model()),
                      "local": model()}
            hook, sync_hook = mt.comm_hook(group), mt.comm_hook(group, overlap=False)
            models["mesh"].register_comm_hook(None, hook)
            models["mesh_sync"].register_comm_hook(None, sync_hook)
            opts = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in models.items()}
            flat = torch.ones(sum(p.numel() for p in models["local"].parameters()))
            g = torch.Generator().manual_seed(rank)
            x = torch.randn(SIZES["batch"], SIZES["features"], generator=g)
            y = torch.randint(0, SIZES["classes"], (SIZES["batch"],), generator=g)
            times: dict[str, list[float]] = {k: [] for k in VARIANTS}
            warm, reps = _reps(quick)
            order = random.Random(world)  # the same sequence on every rank
            for i in range(warm + reps):
                for key in order.sample(VARIANTS, len(VARIANTS)):
                    dist.barrier()
                    t0 = time.perf_counter()
                    if key == "mesh_ar":  # the gradients' size in one tensor, no DDP
                        mt.allreduce_(group, flat)
                    elif key == "gloo_ar":
                        dist.all_reduce(flat)
                    else:
                        m, opt = models[key], opts[key]
                        opt.zero_grad(set_to_none=True)
                        torch.nn.functional.cross_entropy(m(x), y).backward()
                        opt.step()
                    if i >= warm:
                        times[key].append(time.perf_counter() - t0)
            with torch.no_grad():  # the two DDP copies must have trained alike
                diff = max(float((a - b).abs().max()) for a, b in zip(
                    models["gloo"].parameters(), models["mesh"].parameters(), strict=True))
            hook.close()
            sync_hook.close()
            params = sum(p.numel() for p in models["local"].parameters())
            group.close()
    finally:
        dist.destroy_process_group()
    return {"times": times, "params": params, "max_param_diff": diff, "transport": transport}


def run(quick: bool = False, worlds: tuple[int, ...] | None = None) -> dict:
    """Run the DDP step benchmark, print its table, return every number."""
    started = time.monotonic()
    result: dict[str, Any] = {"bench": "torch_ddp", "mode": "quick" if quick else "full",
                              "model": dict(SIZES), "rows": [], "skipped": torch_available(),
                              "load_avg_before": os.getloadavg()}
    if result["skipped"]:
        print(f"torch_ddp: skipped: {result['skipped']}")
        return result
    for world in worlds or ((2,) if quick else WORLDS):
        port = free_master_port()
        answers = _run_ranks(_rank_main, world, lambda r, w=world, p=port: (w, p, quick),
                             timeout=600.0)
        n = len(answers[0]["times"]["mesh"])
        per_rep = {k: [max(a["times"][k][i] for a in answers) for i in range(n)]
                   for k in VARIANTS}
        med = {k: statistics.median(v) for k, v in per_rep.items()}
        paired = statistics.median(m / g for m, g in zip(per_rep["mesh"], per_rep["gloo"],
                                                         strict=True))
        params = answers[0]["params"]
        result["rows"].append({
            "world": world, "params": params, "grad_bytes": params * 4,
            "mesh_s": med["mesh"], "gloo_s": med["gloo"], "local_s": med["local"],
            "mesh_sync_s": med["mesh_sync"], "mesh_allreduce_s": med["mesh_ar"],
            "gloo_allreduce_s": med["gloo_ar"],
            "ratio_mesh_over_gloo": med["mesh"] / med["gloo"], "ratio_paired_median": paired,
            "comm_mesh_s": med["mesh"] - med["local"], "comm_gloo_s": med["gloo"] - med["local"],
            "max_param_diff": max(a["max_param_diff"] for a in answers),
            "transport": answers[0]["transport"], "steps": n,
        })
    result["load_avg_after"] = os.getloadavg()
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    print(summary(result))
    return result


def summary(result: dict) -> str:
    if result.get("skipped"):
        return f"torch_ddp: skipped: {result['skipped']}"
    m = result["model"]
    lines = [
        "",
        "=== DDP training step: mesh comm hook vs DDP's Gloo allreduce (same processes, "
        "interleaved; median over steps of the slowest rank; ratio = mesh / gloo, < 1 is "
        "faster; local = the same step without DDP; no overlap = comm_hook(overlap=False); "
        "allreduce = one tensor of the gradients' size, mt.allreduce_ vs dist.all_reduce) ===",
        f"MLP {m['features']}-{m['hidden']}-{m['hidden']}-{m['classes']}, batch {m['batch']} "
        f"per rank, DDP default buckets; load avg {result['load_avg_before'][0]:.1f} before",
    ]
    head = (f"{'world':>5} {'params':>9} {'grads':>8}  {'mesh hook':>10} {'gloo':>9} "
            f"{'ratio':>6} {'paired':>6}  {'local':>8}  {'comm mesh':>10} {'comm gloo':>10}  "
            f"{'no overlap':>10}  {'allreduce mesh/gloo':>20}  {'max |diff|':>10}  transport")
    lines += [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(
            f"{r['world']:>5} {r['params']:>9,} {r['grad_bytes'] / 2**20:>6.1f}MB  "
            f"{r['mesh_s'] * 1e3:>8.2f}ms {r['gloo_s'] * 1e3:>7.2f}ms "
            f"{r['ratio_mesh_over_gloo']:>5.2f}x {r['ratio_paired_median']:>5.2f}x  "
            f"{r['local_s'] * 1e3:>6.2f}ms  {r['comm_mesh_s'] * 1e3:>8.2f}ms "
            f"{r['comm_gloo_s'] * 1e3:>8.2f}ms  {r['mesh_sync_s'] * 1e3:>8.2f}ms  "
            f"{r['mesh_allreduce_s'] * 1e3:>8.2f}/{r['gloo_allreduce_s'] * 1e3:.2f}ms"
            f"{'':>4}  {r['max_param_diff']:>10.2g}  "
            f"{','.join(r['transport'])}")
    lines.append(f"wall time {result['wall_seconds']:.1f} s ({result['mode']} run)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.torch_ddp",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 ranks, fewer steps")
    parser.add_argument("--worlds", default="", help="comma-separated world sizes (default 2,4)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args(argv)
    worlds = tuple(int(w) for w in args.worlds.split(",") if w) or None
    result = run(args.quick, worlds)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())

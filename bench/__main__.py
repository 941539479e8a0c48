"""``python -m bench``: every benchmark in one run, ratios first.

    python -m bench            # full run, some minutes
    python -m bench --quick    # smoke run, small counts, about 30 s
    python -m bench --profile  # also cProfile the mesh side into bench/results/profile/

Exit status: 0 when every benchmark produced a result (missed goals are
reported, not failures, unless --strict), 1 when one failed, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any

import zmq

from bench import aio, collectives, pubsub, pubsub_suite, refs, shm, torch_ddp
from bench._runner import BenchError, log, workers

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _fmt_value(row: dict, side: str) -> str:
    values = row[side]
    if row["bench"] == "latency":
        return f"p50 {values['p50_us']:7.1f}  p99 {values['p99_us']:7.1f} µs"
    text = f"{values['msgs_per_s']:>10,.0f} msg/s"
    if "MiB_per_s" in values:
        text += f" ({values['MiB_per_s']:,.0f} MiB/s)"
    return text


def _fmt_ratio(row: dict) -> str:
    if row["bench"] == "throughput":
        return f"{row['ratio']:.0%}"
    if row["bench"] in ("flow control", "curve"):
        return f"cost {row['cost']:.0%}"
    return f"{row['ratio']:.2f}x"


def _extra(row: dict) -> str:
    if row["bench"] == "latency":
        return f"p99 ratio {row['p99_ratio']:.2f}x"
    mesh, raw = row["mesh"], row["raw"]
    if row["bench"] == "batching":
        return (f"CPU/msg {mesh['cpu_us_per_msg']:.1f} vs {raw['cpu_us_per_msg']:.1f} µs "
                f"({row['cpu_ratio']:.2f}x); per rep {', '.join(f'{r:.2f}' for r in row['ratios'])}")
    if row["bench"] in ("flow control", "curve"):
        return (f"CPU/msg {mesh['cpu_us_per_msg']:.1f} vs {raw['cpu_us_per_msg']:.1f} µs "
                f"(CPU cost {row['cpu_cost']:+.0%}); per rep "
                f"{', '.join(f'{c:+.0%}' for c in row['costs'])}")
    drops = sum(mesh["publisher_drops"])
    text = (f"CPU/msg (pub+sub) {mesh['cpu_us_per_msg']:.1f} vs {raw['cpu_us_per_msg']:.1f} µs; "
            f"publish(timeout={row['publish_timeout']}): {drops} dropped")
    if drops:
        text += f", {sum(mesh['received']):,} of {row['count'] * row['reps']:,} received"
    if mesh.get("msgs_per_batch"):
        text += f"; {mesh['msgs_per_batch']:.0f} msgs/batch"
    if "MiB_per_s" in mesh:
        text += (f"; subscriber page faults/msg {mesh['sink_faults_per_msg']:.0f} "
                 f"(raw {raw['sink_faults_per_msg']:.0f}); arrays via {'+'.join(mesh['bulk'])}")
    return text


def summary(rows: list[dict], cfg: pubsub.Config) -> str:
    lines = [
        "",
        "=== pub/sub: mesh vs reference (ratio = mesh/reference, median of per-repetition "
        "ratios; all cases of one transport share one raw reference per repetition) ===",
        f"latency {cfg.lat_reps} x {cfg.lat_count:,} round trips; 64 B {cfg.small_reps} x "
        f"{cfg.small_count:,} msgs; 1 MiB {cfg.array_reps} x {cfg.array_count:,} arrays; "
        "flow control cost = 1 - controlled/uncontrolled",
        "64 B variants: batching off = batch_bytes=0 on both nodes; flow control on = "
        "the default window (credits=1024, credit_bytes=64 MiB, overflow='block'), off = "
        "credits=10**9, overflow='drop_new', 'credits=1024' = the default given explicitly; "
        "all with publish(timeout=5) but 'default publish()'. Latency goal: batch_bytes=0 "
        "on both nodes.",
    ]
    header = (f"{'ratio':>8}  {'goal':<22} {'met':<4}  {'benchmark':<66} {'tp':<7} "
              f"{'mesh':<36} {'reference':<50} notes")
    lines += [header, "-" * len(header)]
    for row in rows:
        if row["bench"] == "references":
            continue  # refs.table prints these side by side
        if row["bench"] == "stall":
            lines.append(
                f"{row['ratio']:>7.2f}x  {'<= 1 window':<22} {'yes' if row['met'] else 'NO':<4}  "
                f"stall {row['case']}: subscriber RSS +{row['rss_growth_mib']:.1f} MiB held "
                f"(peak +{row.get('rss_peak_growth_mib', 0.0):.1f} MiB as it arrived; window "
                f"{row['window_mib']:.0f} MiB, {row['offered_mib']:.0f} MiB offered), "
                f"{row['msgs_in_during_stall']} msgs in during the stall, {row['lost']} lost, "
                f"in order: {row['in_order']}; the publisher waited up to "
                f"{row['publisher_longest_wait_s']:.1f} s")
            continue
        met = {True: "yes", False: "NO", None: "-"}[row["met"]]
        name = f"{row['bench']} {row['case']}"
        ref = f"{row['reference']}: {_fmt_value(row, 'raw')}"
        lines.append(
            f"{_fmt_ratio(row):>8}  {row['goal']:<22} {met:<4}  {name:<66} {row['transport']:<7} "
            f"{_fmt_value(row, 'mesh'):<36} {ref:<50} {_extra(row)}"
        )
    goals = [r for r in rows if r.get("met") is not None]
    missed = [r for r in goals if not r["met"]]
    text = f"goals met: {len(goals) - len(missed)} of {len(goals)}"
    if missed:
        text += " (missed: " + "; ".join(
            f"{r['bench']} {r['case']} {r['transport']}" for r in missed) + ")"
    lines.append(text)
    return "\n".join(lines)


def recap(rows: list[dict], shm_result: dict | None, shm_allreduce: dict | None,
          aio_rows: list[dict] | None = None) -> str:
    """Every goal in one place, ratio first, with its reference."""
    lines = ["", "=== goals (ratio vs reference) ==="]
    for row in aio_rows or []:
        lines.append(f"{row['ratio']:>7.2f}x  {'met' if row['met'] else 'MISSED':<6} "
                     f"{row['goal']:<22} {row['case']} [{row['transport']}] from asyncio "
                     "(mesh.aio) vs the sync request()")
    for row in rows:
        if row.get("met") is None:
            continue
        lines.append(f"{_fmt_ratio(row):>8}  {'met' if row['met'] else 'MISSED':<6} "
                     f"{row['goal']:<22} {row['bench']} {row['case']} [{row['transport']}] "
                     f"vs {row['reference']}")
    if shm_result is not None:
        lines.append(f"{shm_result['ratio']:>7.2f}x  {'met' if shm_result['met'] else 'MISSED':<6} "
                     f"{'shm >= ' + format(shm.GOAL, '.0f') + 'x ipc':<22} shm 64 MiB arrays, "
                     "receiver takes a view [shm] vs zmq ipc PAIR")
    if shm_allreduce is not None:
        for row in shm_allreduce["rows"]:
            lines.append(f"{row['ratio_noshm_over_shm']:>7.2f}x  {'-':<6} {'information only':<22} "
                         f"allreduce {row['bytes'] >> 20} MiB, {row['world']} processes: shm off "
                         "time / shm on time")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run with small counts")
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile the mesh side (per thread) into bench/results/profile/")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--json", default=os.path.join(RESULTS_DIR, "latest.json"),
                        help="where to write the results (default: bench/results/latest.json)")
    parser.add_argument("--transports", default="tcp,ipc", help="comma-separated (default tcp,ipc)")
    parser.add_argument("--suites", default="pubsub,collectives,shm,aio,torch",
                        help="which benchmark suites to run (default: pubsub,collectives,shm,aio,"
                        "torch; shm = bench.shm's 64 MiB shm vs ipc, then a 4-process allreduce "
                        "with the node's shm on vs off; aio = request round trip from asyncio "
                        "beside the sync one; torch = DDP step time, mesh comm hook vs Gloo)")
    parser.add_argument("--only", default="",
                        help="comma-separated substrings of case names, e.g. latency,1MiB/ipc")
    args = parser.parse_args(argv)

    options: dict[str, Any] = {
        "transports": tuple(t for t in args.transports.split(",") if t),
        "only": tuple(o for o in args.only.split(",") if o),
    }
    if args.profile:
        options["profile_dir"] = os.path.join(RESULTS_DIR, "profile")
    cfg = pubsub.Config.quick(**options) if args.quick else pubsub.Config(**options)

    suites = {s for s in args.suites.split(",") if s}
    started = time.monotonic()
    errors: list[str] = []
    rows: list[dict] = []
    collective_results: dict | None = None
    shm_results: dict | None = None
    shm_allreduce: dict | None = None
    aio_rows: list[dict] = []
    ddp_results: dict | None = None
    load_before = os.getloadavg()
    try:
        if "pubsub" in suites:
            with workers() as pair:
                rows = pubsub_suite.run(pair, cfg, errors)
            if rows:
                print(summary(rows, cfg), flush=True)
                print(refs.table(rows), flush=True)
        if "collectives" in suites:
            # Mesh allreduce vs torch.distributed/Gloo, in the same processes.
            try:
                collective_results = collectives.run(
                    quick=args.quick, profile_dir=options.get("profile_dir")
                )
            except RuntimeError as exc:
                errors.append(f"collectives: {exc}")
        if "shm" in suites:
            # 64 MiB arrays between two processes: transports/shm.py vs a zmq ipc socket.
            try:
                shm_results = shm.run(quick=args.quick)
                print(shm.summary(shm_results), flush=True)
            except BenchError as exc:
                errors.append(f"shm: {exc}")
            # The node's own use of it: allreduce, 4 processes, shm on vs shm=False.
            try:
                shm_allreduce = collectives.shm_compare(quick=args.quick)
            except RuntimeError as exc:
                errors.append(f"collectives shm on/off: {exc}")
        if "aio" in suites:
            # Request round trip p50 from asyncio beside the sync one, same node and link.
            with workers() as pair:
                aio_rows = aio.run(pair, options["transports"], args.quick, errors)
            if aio_rows:
                print(aio.summary(aio_rows), flush=True)
        if "torch" in suites:
            # DDP step time: mt.comm_hook(group) vs DDP's own Gloo allreduce, same processes.
            try:
                ddp_results = torch_ddp.run(quick=args.quick)
            except RuntimeError as exc:
                errors.append(f"torch_ddp: {exc}")
    except KeyboardInterrupt:
        log("interrupted; workers stopped")
        return 130
    elapsed = time.monotonic() - started
    import mesh  # the workers run this environment's build: say which
    build = mesh._build.describe()

    print(recap(rows, shm_results, shm_allreduce, aio_rows))
    for error in errors:
        print(f"ERROR: {error}")
    print(f"wall time {elapsed:.1f} s ({'quick' if args.quick else 'full'} run); "
          f"zmesh build: {build}")

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(
            {
                "meta": {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "mode": "quick" if args.quick else "full",
                    "wall_seconds": round(elapsed, 1),
                    "python": platform.python_version(),
                    "build": build,  # the compiled hot path or pure Python (MESH_PURE_PYTHON=1)
                    "pyzmq": zmq.__version__,
                    "libzmq": zmq.zmq_version(),
                    "cpus": os.cpu_count(),
                    "load_avg_before": load_before,
                    "load_avg": os.getloadavg(),
                    "config": dataclasses.asdict(cfg),
                },
                "results": rows,
                "collectives": collective_results,
                "shm": shm_results,
                "collectives_shm": shm_allreduce,
                "aio": aio_rows,
                "torch_ddp": ddp_results,
                "errors": errors,
            },
            fh,
            indent=1,
            default=str,
        )
    print(f"results: {os.path.relpath(args.json)}")
    if errors:
        return 1
    if args.strict and (any(r.get("met") is False for r in [*rows, *aio_rows])
                        or (shm_results is not None and not shm_results["met"])):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

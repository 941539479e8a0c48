"""``python -m bench``: every benchmark in one run, ratios first.

    python -m bench            # full run, a few minutes
    python -m bench --quick    # smoke run, small counts, well under 30 s
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

from bench import collectives, pubsub
from bench._runner import log, workers

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _fmt_value(row: dict, side: str) -> str:
    values = row[side]
    if row["bench"] == "latency":
        return f"p50 {values['p50_us']:7.1f}  p99 {values['p99_us']:7.1f} µs"
    text = f"{values['msgs_per_s']:>10,.0f} msg/s"
    if "MiB_per_s" in values:
        text += f" ({values['MiB_per_s']:,.0f} MiB/s)"
    return text


def _extra(row: dict) -> str:
    if row["bench"] == "latency":
        return f"p99 ratio {row['p99_ratio']:.2f}x"
    mesh, raw = row["mesh"], row["raw"]
    drops = sum(mesh["publisher_drops"])
    text = (f"CPU/msg (pub+sub) {mesh['cpu_us_per_msg']:.1f} vs {raw['cpu_us_per_msg']:.1f} µs; "
            f"publish(timeout={row['publish_timeout']}): {drops} dropped")
    if drops:
        text += f", {sum(mesh['received']):,} of {row['count'] * row['reps']:,} received"
    if "MiB_per_s" in mesh:
        text += (f"; subscriber page faults/msg {mesh['sink_faults_per_msg']:.0f} "
                 f"(raw {raw['sink_faults_per_msg']:.0f})")
    return text


def summary(rows: list[dict], cfg: pubsub.Config) -> str:
    lines = [
        "",
        "=== pub/sub: mesh vs raw pyzmq (ratio = mesh/raw, median of per-repetition ratios) ===",
        f"latency {cfg.lat_reps} x {cfg.lat_count:,} round trips; 64 B {cfg.small_reps} x "
        f"{cfg.small_count:,} msgs; 1 MiB {cfg.array_reps} x {cfg.array_count:,} arrays",
    ]
    header = f"{'ratio':>7}  {'goal':<22} {'met':<4}  {'benchmark':<46} {'tp':<4} {'mesh':<36} {'raw':<36} notes"
    lines += [header, "-" * len(header)]
    for row in rows:
        ratio = f"{row['ratio']:.2f}x" if row["bench"] == "latency" else f"{row['ratio']:.0%}"
        met = {True: "yes", False: "NO", None: "-"}[row["met"]]
        name = f"{row['bench']} {row['case']}"
        lines.append(
            f"{ratio:>7}  {row['goal']:<22} {met:<4}  {name:<46} {row['transport']:<4} "
            f"{_fmt_value(row, 'mesh'):<36} {_fmt_value(row, 'raw'):<36} {_extra(row)}"
        )
    goals = [r for r in rows if r["met"] is not None]
    missed = [r for r in goals if not r["met"]]
    lines.append(f"goals met: {len(goals) - len(missed)} of {len(goals)}")
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
    parser.add_argument("--suites", default="pubsub,collectives",
                        help="which benchmark suites to run (default: pubsub,collectives)")
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
    try:
        if "pubsub" in suites:
            with workers() as pair:
                rows = pubsub.run(pair, cfg, errors)
        if "collectives" in suites:
            # Mesh allreduce vs torch.distributed/Gloo, in the same processes.
            try:
                collective_results = collectives.run(
                    quick=args.quick, profile_dir=options.get("profile_dir")
                )
            except RuntimeError as exc:
                errors.append(f"collectives: {exc}")
    except KeyboardInterrupt:
        log("interrupted; workers stopped")
        return 130
    elapsed = time.monotonic() - started

    if rows:
        print(summary(rows, cfg))
    for error in errors:
        print(f"ERROR: {error}")
    print(f"wall time {elapsed:.1f} s ({'quick' if args.quick else 'full'} run)")

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(
            {
                "meta": {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "mode": "quick" if args.quick else "full",
                    "wall_seconds": round(elapsed, 1),
                    "python": platform.python_version(),
                    "pyzmq": zmq.__version__,
                    "libzmq": zmq.zmq_version(),
                    "cpus": os.cpu_count(),
                    "load_avg": os.getloadavg(),
                    "config": dataclasses.asdict(cfg),
                },
                "results": rows,
                "collectives": collective_results,
                "errors": errors,
            },
            fh,
            indent=1,
            default=str,
        )
    print(f"results: {os.path.relpath(args.json)}")
    if errors:
        return 1
    if args.strict and any(r["met"] is False for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

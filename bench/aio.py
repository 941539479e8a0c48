"""Request/reply round trip from asyncio (``mesh.aio``) beside the sync one.

The right worker runs a sync responder (``msg.respond(msg.data)`` on its
dispatch thread); the left worker has one node and times ``count`` round trips
of ``node.request`` and ``count`` of ``await mesh.aio.Node.wrap(node).request``
(one event loop for all repetitions) on the same link, in alternating order,
``reps`` times. Ratio = median over repetitions of aio p50 / sync p50; goal
<= 1.3x (issue #18).

    python -m bench --suites aio [--quick] [--transports tcp]
    python -m bench.aio [--quick]

Threads: each worker's own (the node's I/O and dispatch threads, and in the
left one the asyncio loop on the task's thread while the aio rows run).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

from bench._runner import BenchError, Control, Pair, log, workers
from bench.pubsub import JOIN_TIMEOUT, _mesh_endpoint, _mesh_node

HERE = __name__
SUBJECT = "bench.rr"
GOAL = 1.3  # aio p50 <= 1.3x sync p50


def _stats(samples_ns: list[int]) -> dict[str, float]:
    us = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
            "mean_us": float(us.mean()), "n": len(samples_ns)}


def responder_task(ctl: Control, transport: str, timeout: float) -> dict:
    with _mesh_node("rr-server", transport) as node:
        node.subscribe(SUBJECT, lambda msg: msg.respond(msg.data))
        ctl.send("ready", _mesh_endpoint(node, transport))
        ctl.wait_stop(timeout)
        return {}


def requester_task(ctl: Control, endpoint: str, transport: str, size: int, count: int,
                   warmup: int, reps: int, timeout: float) -> dict:
    import mesh.aio

    with _mesh_node("rr-client", transport, (endpoint,)) as node:
        node.wait_for_peers(1, timeout=JOIN_TIMEOUT)
        node.wait_for_subscribers(SUBJECT, 1, timeout=JOIN_TIMEOUT)
        payload = os.urandom(size)
        anode = mesh.aio.Node.wrap(node)
        pc = time.perf_counter_ns

        def sync_run() -> list[int]:
            request = node.request
            for _ in range(warmup):
                request(SUBJECT, payload, 5.0)
            samples = [0] * count
            for i in range(count):
                t0 = pc()
                request(SUBJECT, payload, 5.0)
                samples[i] = pc() - t0
            return samples

        async def aio_run() -> list[int]:
            request = anode.request
            for _ in range(warmup):
                await request(SUBJECT, payload, 5.0)
            samples = [0] * count
            for i in range(count):
                t0 = pc()
                await request(SUBJECT, payload, 5.0)
                samples[i] = pc() - t0
            return samples

        loop = asyncio.new_event_loop()
        try:
            out: list[dict[str, Any]] = []
            for rep in range(reps):
                got: dict[str, Any] = {}
                # Alternate the order so a drifting machine favours neither.
                for impl in (("sync", "aio") if rep % 2 == 0 else ("aio", "sync")):
                    samples = sync_run() if impl == "sync" else loop.run_until_complete(aio_run())
                    got[impl] = _stats(samples)
                out.append(got)
                if ctl.stop_requested():
                    raise BenchError("stopped by the parent")
        finally:
            loop.close()
        return {"reps": out}


def run(pair: Pair, transports: tuple[str, ...], quick: bool, errors: list[str]) -> list[dict]:
    """One row per transport: request round trip p50, sync and asyncio, and the ratio."""
    count, warmup, reps = (500, 100, 2) if quick else (2000, 200, 5)
    size = 64
    rows = []
    for transport in transports:
        log(f"aio: request/reply {transport}")
        timeout = 60.0 + reps * count * 0.02
        try:
            _, result = pair.run(
                f"{HERE}:responder_task", f"{HERE}:requester_task",
                server_kw={"transport": transport, "timeout": timeout},
                client_kw={"transport": transport, "size": size, "count": count,
                           "warmup": warmup, "reps": reps, "timeout": timeout},
                timeout=timeout,
            )
        except BenchError as exc:
            errors.append(f"aio request/reply {transport}: {exc}")
            log(f"  FAILED: {exc}")
            continue
        per_rep = result["reps"]
        ratios = [r["aio"]["p50_us"] / r["sync"]["p50_us"] for r in per_rep]
        ratio = float(statistics.median(ratios))
        row = {
            "bench": "request/reply asyncio", "transport": transport,
            "case": f"request round trip {size} B, p50",
            "sync": {q: float(statistics.median(r["sync"][q] for r in per_rep))
                     for q in ("p50_us", "p99_us", "mean_us")},
            "aio": {q: float(statistics.median(r["aio"][q] for r in per_rep))
                    for q in ("p50_us", "p99_us", "mean_us")},
            "ratio": ratio, "ratios": ratios, "reps": reps, "count": count,
            "goal": f"aio p50 <= {GOAL}x sync", "met": ratio <= GOAL,
        }
        log(f"  per rep aio/sync p50: {', '.join(f'{r:.2f}' for r in ratios)}")
        rows.append(row)
    return rows


def summary(rows: list[dict]) -> str:
    lines = ["", "=== request/reply from asyncio (mesh.aio) vs sync, same node and link; "
             "ratio = median of per-repetition aio p50 / sync p50 ==="]
    header = (f"{'ratio':>7}  {'goal':<22} {'met':<4} {'tp':<5} {'sync p50 / p99 µs':<22} "
              f"{'aio p50 / p99 µs':<22} per rep")
    lines += [header, "-" * len(header)]
    for row in rows:
        s, a = row["sync"], row["aio"]
        lines.append(
            f"{row['ratio']:>6.2f}x  {row['goal']:<22} {'yes' if row['met'] else 'NO':<4} "
            f"{row['transport']:<5} {s['p50_us']:>8.1f} / {s['p99_us']:<10.1f} "
            f"{a['p50_us']:>8.1f} / {a['p99_us']:<10.1f} "
            f"{', '.join(f'{r:.2f}' for r in row['ratios'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aio", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts")
    parser.add_argument("--transports", default="tcp,ipc", help="comma-separated (default tcp,ipc)")
    args = parser.parse_args(argv)
    errors: list[str] = []
    with workers() as pair:
        rows = run(pair, tuple(t for t in args.transports.split(",") if t), args.quick, errors)
    print(summary(rows))
    for error in errors:
        print(f"ERROR: {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

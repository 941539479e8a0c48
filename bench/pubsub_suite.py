"""The pub/sub suite: bench/pubsub.py's cases for the mesh and raw pyzmq, then
bench/refs.py's Zenoh and NATS references built on them, in one run."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from bench import pubsub, refs
from bench._runner import BenchError, Pair, log
from bench.pubsub import Config


def run(pair: Pair, cfg: Config, errors: list[str]) -> list[dict]:
    """Every pub/sub benchmark; a failed case is recorded in ``errors`` and skipped."""
    rows: list[dict] = []
    cases: list[tuple[str, Callable[[], list[dict]]]] = []
    for transport in cfg.transports:
        cases.append((f"latency/{transport}", functools.partial(pubsub._latency, pair, cfg, transport)))
    if "tcp" in cfg.transports:
        # Zenoh and NATS beside raw pyzmq and the mesh, 64 B over tcp (issue #15).
        cases.append(("latency-refs/tcp", functools.partial(refs.latency, pair, cfg)))
    for transport in cfg.transports:
        cases.append((f"throughput-64B/{transport}", functools.partial(
            pubsub._throughput, pair, cfg, transport, "bytes", cfg.small_count, cfg.small_reps)))
    for transport in cfg.transports:
        cases.append((f"throughput-1MiB/{transport}", functools.partial(
            pubsub._throughput, pair, cfg, transport, "array", cfg.array_count, cfg.array_reps)))
    if "tcp" in cfg.transports:
        # 64 B / 1 KiB, 1->1, fan-in, fan-out: raw, Zenoh, the mesh (issue #16).
        cases.append(("throughput-refs/tcp", functools.partial(refs.throughput, cfg)))
    if "tcp" in cfg.transports:
        # A subscriber stalled 10 s under the default window (issue #16): RSS, losses.
        cases.append(("stall/tcp", functools.partial(pubsub._stall, pair, cfg, "tcp")))
    if cfg.profile_dir:
        cases.append(("profile", lambda: pubsub._profile(pair, cfg) or []))
    for name, case in cases:
        if cfg.only and not any(part in name for part in cfg.only):
            continue
        log(f"pubsub: {name}")
        t0 = time.monotonic()
        try:
            rows.extend(case())
        except BenchError as exc:
            errors.append(f"pubsub {name}: {exc}")
            log(f"  FAILED: {exc}")
        log(f"  ({time.monotonic() - t0:.1f} s)")
    return rows

"""Shared by the examples: start worker processes on one mesh, a dataset, logistic regression.

``launch(target, n, *args)`` spawns ``n`` processes running
``target(node, rank, n, *args)``. Process 0 starts its node first; the others
use its TCP endpoint as their seed (static discovery: no zeroconf needed on a
laptop or in CI; on a LAN, ``discovery="zeroconf"`` finds peers without any
address). Every process is reaped, with bounded waits, even on failure.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

_SPAWN = mp.get_context("spawn")


# ---------------------------------------------------------------------- processes


def _worker(target: Callable[..., Any], rank: int, n: int, cluster: str, seed_q: Any, out: Any,
            args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import mesh

        kwargs = {"cluster": cluster, "listen": ("tcp://127.0.0.1:0", "ipc://auto")}
        if rank == 0:
            node = mesh.Node(f"worker-{rank}", discovery="none", **kwargs)
            node.start()
            tcp = next(e for e in node.endpoints if e.startswith("tcp://"))
            for _ in range(n - 1):
                seed_q.put(tcp)
        else:
            seed = seed_q.get(timeout=60)
            node = mesh.Node(f"worker-{rank}", discovery="static", seeds=[seed], **kwargs)
            node.start()
        with node:
            node.wait_for_peers(n - 1, timeout=60)
            result = target(node, rank, n, *args)
        out.put((rank, True, result))
    except BaseException:
        out.put((rank, False, traceback.format_exc()))


def launch(target: Callable[..., Any], n: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """Run ``target(node, rank, n, *args)`` in ``n`` processes; return their results by rank."""
    cluster = f"example-{uuid.uuid4().hex[:8]}"
    seed_q, out = _SPAWN.Queue(), _SPAWN.Queue()
    procs = [
        _SPAWN.Process(target=_worker, args=(target, r, n, cluster, seed_q, out, args), daemon=True)
        for r in range(n)
    ]
    results: dict[int, Any] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while len(results) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"workers did not finish within {timeout} s")
            try:
                rank, ok, value = out.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if all(p.is_alive() for p in procs):
                    continue
                try:
                    rank, ok, value = out.get(timeout=2.0)
                except queue.Empty:
                    raise RuntimeError("a worker process died without a word") from None
            if not ok:
                raise RuntimeError(f"worker {rank} failed:\n{value}")
            results[rank] = value
        return [results[r] for r in range(n)]
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
        for q in (seed_q, out):
            q.cancel_join_thread()
            q.close()


def log(rank: int, text: str) -> None:
    print(f"[worker-{rank}] {text}", flush=True)
    sys.stdout.flush()


# ---------------------------------------------------------------------- data and model


def make_dataset(seed: int = 0, n: int = 8000, d: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """A separable-ish binary problem: X ~ N(0, 1), y = [X w* + noise > 0]."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    w_true = rng.standard_normal(d)
    y = (X @ w_true + 0.5 * rng.standard_normal(n) > 0).astype(np.float64)
    return X, y


def loss_and_grad_sum(w: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Summed (not averaged) logistic loss and its gradient over the rows of X."""
    z = X @ w
    # log(1 + exp(z)) - y z, computed stably
    loss = float(np.sum(np.logaddexp(0.0, z) - y * z))
    p = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid, overflow-free
    return loss, X.T @ (p - y)


def full_loss(w: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
    return loss_and_grad_sum(w, X, y)[0] / len(y)

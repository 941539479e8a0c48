"""BSP data-parallel SGD: four processes train a logistic regression with allreduce.

    python examples/data_parallel_sgd.py [--workers 4] [--steps 300]

Bulk synchronous parallel: every step, every worker computes the gradient of
its share of the global mini-batch, the gradients are summed with
``group.allreduce`` (and so is the loss, for the progress line), and every
worker applies the same update. The data (generated here, fixed seed) and the
mini-batch order are the same as in a single-process run, so the two train
the same model up to float rounding: the script checks that the final losses
agree within 1 % and exits 0 when they do.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import full_loss, launch, log, loss_and_grad_sum, make_dataset  # noqa: E402

SEED = 0
BATCH = 256
LR = 0.5


def batches(n_rows: int, steps: int, seed: int = SEED):
    """The global mini-batch index arrays, one per step (same in every process)."""
    rng = np.random.default_rng(seed + 1)
    per_epoch = n_rows // BATCH
    order = np.arange(n_rows)
    for step in range(steps):
        k = step % per_epoch
        if k == 0:
            order = rng.permutation(n_rows)  # a new epoch
        yield order[k * BATCH:(k + 1) * BATCH]


def train_single(steps: int) -> tuple[np.ndarray, float]:
    X, y = make_dataset(SEED)
    w = np.zeros(X.shape[1])
    for idx in batches(len(y), steps):
        _, g = loss_and_grad_sum(w, X[idx], y[idx])
        w -= LR * g / len(idx)
    return w, full_loss(w, X, y)


def worker(node, rank: int, n: int, steps: int) -> dict:
    X, y = make_dataset(SEED)
    group = node.group("sgd.trainers", size=n, timeout=30.0)
    if group.rank == 0:
        log(rank, f"group formed: {[m.name for m in group.members]}")
    w = np.zeros(X.shape[1])
    t0 = time.perf_counter()
    for step, idx in enumerate(batches(len(y), steps)):
        mine = np.array_split(idx, group.size)[group.rank]  # this rank's share of the batch
        loss, g = loss_and_grad_sum(w, X[mine], y[mine])
        packed = np.append(g, loss)  # one allreduce for gradient and loss
        total = group.allreduce(packed, op="sum")
        w -= LR * total[:-1] / len(idx)
        if group.rank == 0 and (step % 50 == 0 or step == steps - 1):
            log(rank, f"step {step:4d}  batch loss {total[-1] / len(idx):.5f}")
    elapsed = time.perf_counter() - t0
    stats = group.stats()
    group.close()
    return {"rank": group.rank, "w": w, "loss": full_loss(w, X, y), "seconds": elapsed,
            "allreduce": stats["ops"]["allreduce"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)

    print(f"single process: {args.steps} steps of SGD, batch {BATCH}", flush=True)
    w_ref, loss_ref = train_single(args.steps)
    print(f"single process: final loss {loss_ref:.6f}", flush=True)

    print(f"data parallel: {args.workers} worker processes, allreduce every step", flush=True)
    results = launch(worker, args.workers, args.steps)
    losses = [r["loss"] for r in results]
    spread = max(float(np.max(np.abs(r["w"] - results[0]["w"]))) for r in results)
    ar = results[0]["allreduce"]
    print(f"data parallel: final loss {losses[0]:.6f} on every worker (max weight difference "
          f"between workers {spread:.1e}); {ar['count']} allreduces, "
          f"{1e3 * ar['seconds'] / max(1, ar['count']):.2f} ms each")
    rel = abs(losses[0] - loss_ref) / loss_ref
    ok = rel <= 0.01 and spread == 0.0
    print(f"{'OK' if ok else 'FAILED'}: data-parallel loss is within {rel:.2e} of the "
          f"single-process loss (tolerance 1e-2)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""BAP: barrierless asynchronous training with push-sum gossip (no global step).

    python examples/gossip_bap.py [--workers 4] [--steps 300]

Barrierless asynchronous parallel as a thin layer over publish/subscribe: each
worker trains on its own data at its own pace (they run at different speeds
on purpose) and, after every local step, keeps half of its push-sum state
``(x, w)`` and publishes the other half to one random peer on
``bap.<peer name>`` (Stochastic Gradient Push, Assran et al., ICML 2019: the
model is ``z = x / w``). Nobody waits for anybody: shares are absorbed
whenever they have arrived. At the end the workers count what they sent to
whom (``group.allgather``) so each absorbs every share still in flight
(mass is conserved), then agree exactly enough with the group's synchronous
push-sum ``group.gossip_average``. The script reports how far apart the
workers drifted while training, checks the consensus and the loss, and exits 0.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import full_loss, launch, log, loss_and_grad_sum, make_dataset  # noqa: E402

SEED = 0
BATCH = 64
LR = 0.3
EPS = 1e-6


def worker(node, rank: int, n: int, steps: int) -> dict:
    X, y = make_dataset(SEED)
    group = node.group("bap.workers", size=n, timeout=30.0)
    me, peers = group.rank, [m for m in group.members if m.rank != group.rank]
    mine = np.array_split(np.arange(len(y)), group.size)[me]
    rng = np.random.default_rng(SEED + 10 + me)

    inbox: collections.deque = collections.deque()
    arrived = threading.Condition()
    received = 0

    def on_share(msg) -> None:  # dispatch thread
        nonlocal received
        share = msg.array()
        with arrived:
            inbox.append((share[:-1].copy(), float(share[-1])))
            received += 1
            arrived.notify_all()

    sub = node.subscribe(f"bap.{node.name}", on_share)
    for p in peers:
        node.wait_for_subscribers(f"bap.{p.name}", 1, timeout=30)
    group.barrier()  # everyone listens before the first share flies

    d = X.shape[1]
    x, w = np.zeros(d), 1.0
    sent = np.zeros(group.size, dtype=np.int64)
    drift = []
    t0 = time.perf_counter()
    for step in range(steps):
        with arrived:  # absorb whatever arrived meanwhile, without waiting for more
            while inbox:
                sx, sw = inbox.popleft()
                x += sx
                w += sw
        idx = rng.choice(mine, BATCH, replace=False)
        _, g = loss_and_grad_sum(x / w, X[idx], y[idx])
        x -= LR * w * g / BATCH  # a step of LR on z = x / w
        target = peers[rng.integers(len(peers))]
        x, w = x / 2, w / 2
        node.publish(f"bap.{target.name}", np.append(x, w), timeout=5.0)
        sent[target.rank] += 1
        time.sleep(0.001 * me)  # workers run at different speeds
        if step % 100 == 0:
            drift.append(x / w)
    elapsed = time.perf_counter() - t0

    # Drain: every share sent to this rank must be absorbed, or mass is lost.
    counts = group.allgather(sent)
    expected = int(sum(c[me] for c in counts))
    with arrived:
        if not arrived.wait_for(lambda: received >= expected, timeout=30):
            raise TimeoutError(f"received {received} of {expected} gossip shares")
        while inbox:
            sx, sw = inbox.popleft()
            x += sx
            w += sw
    sub.close()
    z = x / w
    parts = group.allgather(z)
    spread = float(max(np.max(np.abs(p - np.mean(parts, axis=0))) for p in parts))
    consensus = group.gossip_average(z, eps=EPS)  # synchronous push-sum, to eps
    mean = np.mean(parts, axis=0)
    err = float(np.max(np.abs(consensus - mean)))
    if me == 0:
        log(rank, f"{steps} async steps in {elapsed:.2f} s; workers' models differ by up to "
                  f"{spread:.3f} before consensus")
    group.close()
    return {"rank": me, "z": consensus, "err": err, "bound": EPS * float(np.max(np.abs(parts))),
            "loss": full_loss(consensus, X, y), "sent": int(sent.sum()), "received": received}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    print(f"BAP: {args.workers} workers, {args.steps} local steps each, push-sum gossip over "
          "publish/subscribe, no barrier", flush=True)
    results = launch(worker, args.workers, args.steps)
    X, y = make_dataset(SEED)
    start = full_loss(np.zeros(X.shape[1]), X, y)
    for r in results:
        print(f"worker rank {r['rank']}: sent {r['sent']} shares, absorbed {r['received']}; "
              f"consensus error {r['err']:.1e} (bound {r['bound']:.1e}); loss {r['loss']:.4f}")
    ok = all(r["err"] <= r["bound"] for r in results) and max(r["loss"] for r in results) < 0.5 * start
    print(f"{'OK' if ok else 'FAILED'}: every worker within eps of the average model, loss "
          f"{results[0]['loss']:.4f} (from {start:.4f})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

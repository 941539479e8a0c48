"""SSP: a sharded parameter server over request/reply, with bounded staleness.

    python examples/parameter_server_ssp.py [--servers 2] [--workers 3] [--staleness 2]

Stale synchronous parallel (Ho et al., NIPS 2013) as a thin layer over the
mesh's request/reply: the weight vector is split over ``--servers`` shards,
each a node answering ``ps.<k>.pull`` (send me your slice) and
``ps.<k>.push`` (apply this gradient slice). A worker at clock ``c`` (steps
it has pushed) pulls every shard, computes a mini-batch gradient on its own
data, and pushes the slices back. The bound: a shard answers a pull from a
worker at clock ``c`` only once the slowest worker has pushed at least
``c - s`` steps; until then it holds the request (the reply simply comes
later), so a worker more than ``s`` steps ahead of the slowest waits. One
worker is made slow on purpose; the others show the waiting. The script
checks that no worker ever read parameters more than ``s`` steps stale and
that training brought the loss down, and exits 0.
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
LR = 0.5
SLOW_WORKER_DELAY = 0.01  # seconds added to every step of the first worker


def shard_bounds(d: int, servers: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, d, servers + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def server(node, shard: int, servers: int, workers: int, steps: int, staleness: int) -> dict:
    X, _ = make_dataset(SEED)
    a, b = shard_bounds(X.shape[1], servers)[shard]
    w = np.zeros(b - a)
    names = [f"worker-{servers + i}" for i in range(workers)]
    clocks = dict.fromkeys(names, 0)  # steps pushed by each worker
    held: list = []  # pulls waiting for the slowest worker
    held_max = 0
    done = threading.Event()

    # Both handlers run on the node's one dispatch thread: no locks needed.
    def answer(msg, clock: int) -> None:
        msg.respond(w.copy(), headers={"min_clock": min(clocks.values()), "clock": clock})

    def on_pull(msg) -> None:
        nonlocal held_max
        clock = int(msg.headers["clock"])
        if clock - min(clocks.values()) <= staleness:
            answer(msg, clock)
        else:
            held.append((msg, clock))
            held_max = max(held_max, len(held))

    def on_push(msg) -> None:
        nonlocal w
        w = w - LR * msg.array() / BATCH
        clocks[msg.headers["worker"]] = int(msg.headers["clock"]) + 1
        msg.respond(b"ok")
        slowest = min(clocks.values())
        for item in [h for h in held if h[1] - slowest <= staleness]:
            held.remove(item)
            answer(*item)
        if slowest >= steps:
            done.set()

    subs = [node.subscribe(f"ps.{shard}.pull", on_pull), node.subscribe(f"ps.{shard}.push", on_push)]
    log(node_rank(node), f"shard {shard} serves w[{a}:{b}]")
    if not done.wait(timeout=120):
        raise TimeoutError(f"shard {shard}: workers stopped at clocks {clocks}")
    for sub in subs:
        sub.close()
    return {"role": "server", "shard": shard, "w": w, "max_held": held_max}


def node_rank(node) -> int:
    return int(node.name.rsplit("-", 1)[1])


def worker(node, index: int, servers: int, workers: int, steps: int, staleness: int) -> dict:
    X, y = make_dataset(SEED)
    mine = np.array_split(np.arange(len(y)), workers)[index]  # this worker's data
    bounds = shard_bounds(X.shape[1], servers)
    for k in range(servers):
        for kind in ("pull", "push"):
            node.wait_for_subscribers(f"ps.{k}.{kind}", 1, timeout=30)
    rng = np.random.default_rng(SEED + 100 + index)
    waited, max_stale = 0.0, 0
    w = np.zeros(X.shape[1])
    for clock in range(steps):
        t0 = time.perf_counter()
        for k, (a, b) in enumerate(bounds):
            reply = node.request(f"ps.{k}.pull", b"", timeout=60.0,
                                 headers={"worker": node.name, "clock": clock})
            w[a:b] = reply.array()
            max_stale = max(max_stale, clock - int(reply.headers["min_clock"]))
        waited += time.perf_counter() - t0
        if index == 0:
            time.sleep(SLOW_WORKER_DELAY)  # the straggler
        idx = rng.choice(mine, BATCH, replace=False)
        _, g = loss_and_grad_sum(w, X[idx], y[idx])
        for k, (a, b) in enumerate(bounds):
            node.request(f"ps.{k}.push", np.ascontiguousarray(g[a:b]), timeout=60.0,
                         headers={"worker": node.name, "clock": clock})
    return {"role": "worker", "index": index, "pull_wait_s": waited, "max_staleness": max_stale}


def role(node, rank: int, n: int, servers: int, steps: int, staleness: int) -> dict:
    workers = n - servers
    if rank < servers:
        return server(node, rank, servers, workers, steps, staleness)
    return worker(node, rank - servers, servers, workers, steps, staleness)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--staleness", type=int, default=2)
    args = parser.parse_args(argv)
    n = args.servers + args.workers
    print(f"SSP: {args.servers} parameter shards, {args.workers} workers, staleness bound "
          f"{args.staleness}, {args.steps} steps each; worker 0 is slow", flush=True)
    results = launch(role, n, args.servers, args.steps, args.staleness)
    X, y = make_dataset(SEED)
    w = np.concatenate([r["w"] for r in results if r["role"] == "server"])
    loss, start = full_loss(w, X, y), full_loss(np.zeros_like(w), X, y)
    stats = collections.defaultdict(list)
    for r in results:
        if r["role"] == "worker":
            print(f"worker {r['index']}: waited {r['pull_wait_s']:.2f} s in pulls, "
                  f"max staleness seen {r['max_staleness']}")
            stats["stale"].append(r["max_staleness"])
        else:
            print(f"shard {r['shard']}: at most {r['max_held']} pull(s) held back at once")
    ok = max(stats["stale"]) <= args.staleness and loss < 0.5 * start
    print(f"final loss {loss:.4f} (from {start:.4f}); max staleness {max(stats['stale'])} "
          f"<= {args.staleness}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

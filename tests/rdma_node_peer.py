"""One node of tests/test_rdma_node.py, run as its own process inside the RDMA VM.

    python tests/rdma_node_peer.py a --device rxe1             # prints "ENDPOINT tcp://..."
    python tests/rdma_node_peer.py b --device rxe0 --seed tcp://127.0.0.1:PORT

Both start a Node (discovery="static", control on tcp, shm off, rdma on the given
device), wait until the peer's bulk transport is "rdma", then: ``a`` publishes
arrays (up to 64 MiB) that ``b`` checks, ``b`` publishes one back, and both run a
2-member allreduce checked against numpy. Each prints ``RESULT {json}``; exit 0
only when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import rdma_peer  # noqa: E402

rdma_peer.ensure_pyverbs_importable()

import numpy as np  # noqa: E402

from mesh import Node  # noqa: E402


def arrays() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(66)
    return [
        ("f32x100k", rng.standard_normal(100_000).astype(np.float32)),  # rdma
        ("small_i64", np.arange(15, dtype=np.int64).reshape(3, 5).T),  # socket: below threshold
        ("f16x2d", rng.standard_normal((300, 700)).astype(np.float16)),  # rdma
        ("u8_5mib", rng.integers(0, 255, 5 << 20, dtype=np.uint8)),  # beyond the 4 MiB ring
        ("f32_64mib", np.arange(16 << 20, dtype=np.float32)),  # 64 MiB
    ]


def back_array() -> np.ndarray:
    return np.linspace(0, 1, 300_000).astype(np.float64)


def grads(rank: int) -> np.ndarray:
    return np.random.default_rng(100 + rank).standard_normal(3 << 18).astype(np.float32)  # 3 MiB


def wait_rdma(node: Node, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peers = node.status()["peers"]
        if peers and peers[0]["state"] == "alive" and peers[0]["bulk"] == "rdma":
            return peers[0]
        time.sleep(0.05)
    raise AssertionError(f"no rdma towards the peer within {timeout}s: {node.status()['peers']}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=("a", "b"))
    ap.add_argument("--device", required=True)
    ap.add_argument("--seed", default=None)
    args = ap.parse_args()
    checks: dict[str, bool] = {}
    result: dict = {"role": args.role, "checks": checks}
    node = Node(f"rdma-{args.role}", cluster="rdma-test", discovery="static",
                seeds=[args.seed] if args.seed else [], listen=("tcp://127.0.0.1:0",),
                transports=("tcp", "rdma"), shm=False, rdma_device=args.device,
                peer_timeout=30.0, heartbeat_interval=1.0)
    node.start()
    try:
        if args.role == "a":
            print("ENDPOINT", node.endpoints[0], flush=True)
        node.wait_for_peers(1, timeout=120)
        result["peer_before"] = wait_rdma(node, 120)
        if args.role == "a":
            back = node.subscribe("rdma.back")
            node.wait_for_subscribers("rdma.arrays", 1, timeout=120)
            for name, arr in arrays():
                node.publish("rdma.arrays", arr, headers={"name": name}, timeout=300)
            msg = back.next(timeout=300)
            checks["back"] = bool(np.array_equal(msg.array(), back_array()))
        else:
            sub = node.subscribe("rdma.arrays")
            node.wait_for_subscribers("rdma.back", 1, timeout=120)
            for name, want in arrays():
                msg = sub.next(timeout=300)
                got = msg.array()
                checks[name] = bool(msg.headers["name"] == name and got.dtype == want.dtype
                                    and got.shape == want.shape and np.array_equal(got, want))
            node.publish("rdma.back", back_array(), timeout=300)
        group = node.group("rdma-g", 2, timeout=300)
        out = group.allreduce(grads(group.rank), timeout=300)
        checks["allreduce"] = bool(np.allclose(out, grads(0) + grads(1), rtol=1e-5, atol=1e-5))
        group.close()
        peer = node.status()["peers"][0]
        result["peer_after"] = {k: peer[k] for k in ("bulk", "transport", "rdma", "msgs_out", "msgs_in")
                                if k in peer}
        checks["still_rdma"] = peer["bulk"] == "rdma"
        stats = peer["rdma"] or {}
        checks["rdma_carried"] = stats.get("bytes_sent", 0) + stats.get("bytes_received", 0) > 0
        if args.role == "b":
            checks["64mib_over_rdma"] = stats.get("bytes_received", 0) >= 64 << 20
        time.sleep(1.0)  # let the peer finish before we say goodbye
    except Exception as exc:  # noqa: BLE001 - reported in the result
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        node.close()
    ok = "error" not in result and bool(checks) and all(checks.values())
    result["ok"] = ok
    print("RESULT " + json.dumps(result, default=str), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

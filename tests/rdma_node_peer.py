"""One node of tests/test_rdma_node.py, run as its own process inside the RDMA VM.

    python tests/rdma_node_peer.py a --device rxe1             # prints "ENDPOINT tcp://..."
    python tests/rdma_node_peer.py b --device rxe0 --seed tcp://127.0.0.1:PORT

Both start a Node (discovery="static", control on tcp, shm off, rdma on the given
device). ``--scenario``:

- ``rdma`` (default): wait until the peer's bulk transport is "rdma"; ``a``
  publishes arrays (up to 64 MiB) that ``b`` checks, then large (RDMA) and small
  (socket) messages interleaved on one subject, whose order ``b`` checks; ``b``
  publishes one back; both run a 2-member allreduce checked against numpy. The
  threads that created and connected queue pairs are recorded (never the I/O thread).
- ``no-rdma``: ``b`` offers no rdma (transports=("tcp",)); arrays both ways must go
  over tcp and status must say so, with no warning.
- ``bad-gid``: ``b`` advertises a GID nobody answers (10.99.0.99), so ``a``'s queue
  pair cannot connect: ``a`` logs a warning, both fall back to tcp, arrays arrive.

Each prints ``RESULT {json}``; exit 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import rdma_peer  # noqa: E402

rdma_peer.ensure_pyverbs_importable()

import numpy as np  # noqa: E402

from mesh import Node  # noqa: E402
from transports import rdma as rdma_mod  # noqa: E402

UNREACHABLE_GID = "0000:0000:0000:0000:0000:ffff:0a63:0063"  # 10.99.0.99: nobody there


def arrays() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(66)
    return [
        ("f32x100k", rng.standard_normal(100_000).astype(np.float32)),  # rdma
        ("small_i64", np.arange(15, dtype=np.int64).reshape(3, 5).T),  # socket: below threshold
        ("f16x2d", rng.standard_normal((300, 700)).astype(np.float16)),  # rdma
        ("u8_5mib", rng.integers(0, 255, 5 << 20, dtype=np.uint8)),  # beyond the 4 MiB ring
        ("f32_64mib", np.arange(16 << 20, dtype=np.float32)),  # 64 MiB
    ]


def order_messages() -> list:
    """Large arrays (RDMA) and small messages (socket) interleaved: both path changes,
    runs of each, a 1 MiB array just before small ones (the socket would win)."""
    out: list = []
    for i, kind in enumerate("LSLLSSSLSLLLSSLSLS"):
        if kind == "L":
            n = (1 << 18) if i % 2 else (1 << 15) + 7  # 1 MiB or 128 KiB
            out.append(np.full(n, i, dtype=np.float32))
        elif i % 3:
            out.append(f"small-{i}".encode())
        else:
            out.append(np.full(5, i, dtype=np.int16))  # an array, below the threshold
    return out


def same(got, want) -> bool:
    if isinstance(want, np.ndarray):
        return got is not None and got.dtype == want.dtype and np.array_equal(got, want)
    return bytes(got) == want


def back_array() -> np.ndarray:
    return np.linspace(0, 1, 300_000).astype(np.float64)


def grads(rank: int) -> np.ndarray:
    return np.random.default_rng(100 + rank).standard_normal(3 << 18).astype(np.float32)  # 3 MiB


def peer_row(node: Node) -> dict:
    peers = node.status()["peers"]
    return peers[0] if peers else {}


def wait_for(what: str, predicate, timeout: float, node: Node):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout}s: {node.status()['peers']}")


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


class StallMonitor(threading.Thread):
    """The longest time this process's threads could not run (a C call holding the
    GIL, say): a thread that sleeps 5 ms at a time notes how late it wakes up."""

    def __init__(self) -> None:
        super().__init__(name="stall-monitor", daemon=True)
        self.worst = 0.0

    def run(self) -> None:
        last = time.perf_counter()
        while True:
            time.sleep(0.005)
            now = time.perf_counter()
            self.worst = max(self.worst, now - last - 0.005)
            last = now

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return round(worst, 3)


def record_setup_threads() -> list[list[str]]:
    """Which threads create and connect queue pairs (the real functions still run)."""
    seen: list[list[str]] = []
    connection, connect = rdma_mod.RdmaTransport.connection, rdma_mod.RdmaConnection.connect

    def recorded_connection(self, **options):
        seen.append(["connection", threading.current_thread().name])
        return connection(self, **options)

    def recorded_connect(self, remote):
        seen.append(["connect", threading.current_thread().name])
        return connect(self, remote)

    rdma_mod.RdmaTransport.connection = recorded_connection
    rdma_mod.RdmaConnection.connect = recorded_connect
    return seen


def advertise_unreachable_gid() -> None:
    """Fault injection for --scenario bad-gid: this process's offers and accepts name
    a GID no device answers, so the peer's queue pair cannot connect to it."""
    local_info = rdma_mod.RdmaConnection.local_info
    rdma_mod.RdmaConnection.local_info = lambda self: dict(local_info(self), gid=UNREACHABLE_GID)


def run_rdma(node: Node, role: str, checks: dict, result: dict, stalls: StallMonitor) -> None:
    result["peer_before"] = wait_for("rdma towards the peer",
                                     lambda: (r := peer_row(node)).get("bulk") == "rdma" and r, 120, node)
    # From node.start() to a ready queue pair: setup ran meanwhile (on its thread).
    result["setup_stall_s"] = stalls.take()
    result["setup_membership_events"] = dict(node.membership_events)
    if role == "a":
        back = node.subscribe("rdma.back")
        node.wait_for_subscribers("rdma.order", 1, timeout=120)
        for name, arr in arrays():
            node.publish("rdma.arrays", arr, headers={"name": name}, timeout=300)
        for i, data in enumerate(order_messages()):
            node.publish("rdma.order", data, headers={"i": i}, timeout=300)
        msg = back.next(timeout=300)
        checks["back"] = bool(np.array_equal(msg.array(), back_array()))
    else:
        sub = node.subscribe("rdma.arrays")
        order = node.subscribe("rdma.order")
        node.wait_for_subscribers("rdma.back", 1, timeout=120)
        for name, want in arrays():
            msg = sub.next(timeout=300)
            got = msg.array()
            checks[name] = bool(msg.headers["name"] == name and got.dtype == want.dtype
                                and got.shape == want.shape and np.array_equal(got, want))
        want = order_messages()
        got = [order.next(timeout=300) for _ in want]
        result["order_received"] = [m.headers["i"] for m in got]
        checks["order_kept"] = result["order_received"] == list(range(len(want)))
        checks["order_intact"] = all(
            same(m.array() if isinstance(w, np.ndarray) else m.data, w)
            for m, w in zip(sorted(got, key=lambda m: m.headers["i"]), want, strict=True))
        checks["order_seq"] = [m.seq for m in got] == list(range(got[0].seq, got[0].seq + len(got)))
        node.publish("rdma.back", back_array(), timeout=300)
    group = node.group("rdma-g", 2, timeout=300)
    out = group.allreduce(grads(group.rank), timeout=300)
    checks["allreduce"] = bool(np.allclose(out, grads(0) + grads(1), rtol=1e-5, atol=1e-5))
    group.close()
    peer = peer_row(node)
    result["peer_after"] = {k: peer[k] for k in ("bulk", "transport", "rdma", "msgs_out", "msgs_in")
                            if k in peer}
    checks["still_rdma"] = peer["bulk"] == "rdma"
    stats = peer["rdma"] or {}
    checks["rdma_carried"] = stats.get("bytes_sent", 0) + stats.get("bytes_received", 0) > 0
    if role == "b":
        checks["64mib_over_rdma"] = stats.get("bytes_received", 0) >= 64 << 20
        checks["no_gaps"] = node.status()["counters"]["gaps"] == 0


def run_fallback(node: Node, role: str, scenario: str, warnings: Warnings,
                 checks: dict, result: dict) -> None:
    # Arrays of both sizes each way, once the rdma question is settled.
    if scenario == "bad-gid":
        if role == "a":  # connecting to b's GID fails here: one warning, then tcp
            wait_for("a warning about rdma",
                     lambda: any("rdma" in line for line in warnings.lines), 180, node)
            node.wait_for_subscribers("rdma.settled", 1, timeout=120)
            node.publish("rdma.settled", b"", timeout=60)
        else:
            settled = node.subscribe("rdma.settled")
            settled.next(timeout=240)
        # the other side drops its half when told (control pipe): wait for that too
        wait_for("the peer's queue pair dropped", lambda: peer_row(node).get("rdma") is None
                 and peer_row(node), 60, node)
    other = "b" if role == "a" else "a"
    sub = node.subscribe(f"fb.to{role}")
    node.wait_for_subscribers(f"fb.to{other}", 1, timeout=120)
    mine = [np.arange(1 << 18, dtype=np.float32) * (2 if role == "a" else 3),  # 1 MiB
            np.arange(10, dtype=np.int32)]
    for arr in mine:
        node.publish(f"fb.to{other}", arr, timeout=120)
    theirs = [np.arange(1 << 18, dtype=np.float32) * (3 if role == "a" else 2),
              np.arange(10, dtype=np.int32)]
    got = [sub.next(timeout=180) for _ in theirs]
    checks["arrays_intact"] = all(same(m.array(), w) for m, w in zip(got, theirs, strict=True))
    time.sleep(1.0)  # whatever rdma setup there was has long finished or failed
    peer = peer_row(node)
    result["peer_after"] = {k: peer.get(k) for k in ("bulk", "transport", "rdma", "state")}
    checks["status_tcp"] = peer["transport"] == "tcp" and peer["bulk"] == "tcp"
    checks["no_rdma_conn"] = peer["rdma"] is None
    rdma_warnings = [line for line in warnings.lines if "rdma" in line]
    if scenario == "bad-gid" and role == "a":
        checks["warned_once"] = len(rdma_warnings) == 1
    else:
        checks["quiet"] = not rdma_warnings


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=("a", "b"))
    ap.add_argument("--device", required=True)
    ap.add_argument("--seed", default=None)
    ap.add_argument("--scenario", choices=("rdma", "no-rdma", "bad-gid"), default="rdma")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING,
                        format=f"[{args.role}] %(levelname)s %(name)s: %(message)s")
    warnings = Warnings()
    logging.getLogger("mesh").addHandler(warnings)
    setup_threads = record_setup_threads()
    if args.scenario == "bad-gid" and args.role == "b":
        advertise_unreachable_gid()
    with_rdma = not (args.scenario == "no-rdma" and args.role == "b")
    checks: dict[str, bool] = {}
    result: dict = {"role": args.role, "scenario": args.scenario, "checks": checks}
    node = Node(f"rdma-{args.role}", cluster="rdma-test", discovery="static",
                seeds=[args.seed] if args.seed else [], listen=("tcp://127.0.0.1:0",),
                transports=("tcp", "rdma") if with_rdma else ("tcp",), shm=False,
                rdma_device=args.device if with_rdma else None,
                peer_timeout=30.0, heartbeat_interval=1.0)
    stalls = StallMonitor()
    stalls.start()
    node.start()
    stalls.take()  # from here on
    try:
        if args.role == "a":
            print("ENDPOINT", node.endpoints[0], flush=True)
        node.wait_for_peers(1, timeout=120)
        if args.scenario == "rdma":
            run_rdma(node, args.role, checks, result, stalls)
        else:
            run_fallback(node, args.role, args.scenario, warnings, checks, result)
        time.sleep(1.0)  # let the peer finish before we say goodbye
    except Exception as exc:  # noqa: BLE001 - reported in the result
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        node.close()
    result["setup_threads"] = setup_threads
    result["stall_after_setup_s"] = stalls.take()
    result["membership_events"] = dict(node.membership_events)
    result["warnings"] = warnings.lines
    ok = "error" not in result and bool(checks) and all(checks.values())
    result["ok"] = ok
    print("RESULT " + json.dumps(result, default=str), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

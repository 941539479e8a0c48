"""One side of a real RDMA exchange, run as its own process by tests/test_rdma_vm.py.

    python tests/rdma_peer.py server --device rxe1            # prints "ENDPOINT tcp://..."
    python tests/rdma_peer.py client --device rxe0 --bootstrap tcp://127.0.0.1:PORT

The two bootstrap over a plain ZeroMQ REQ/REP pair (the offer/accept dicts a
node would carry in its control messages), then run the phases: arrays of
several sizes client -> server (checked) and back, a 64 MiB array, and an
allreduce-like exchange of gradient chunks. Each prints one JSON line of
results (``RESULT {...}``); the exit code is 0 only if every check passed.

Also the helpers the VM test needs before anything imports pyverbs:
:func:`prepare_test_process` (:func:`ensure_pyverbs_importable`,
:func:`prepare_guest_network`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from typing import Any

DEBIAN_PYVERBS = "/usr/lib/python3/dist-packages/pyverbs"
LINK_DIR = "pyverbs-link"  # in the venv: holds only a symlink to Debian's pyverbs
PTH_NAME = "zmesh-pyverbs.pth"


def ensure_pyverbs_importable(prefix: str = sys.prefix) -> str | None:
    """Make Debian's pyverbs importable from this venv (what ``make`` does):
    ``<venv>/pyverbs-link/pyverbs -> /usr/lib/python3/dist-packages/pyverbs`` and a
    ``.pth`` naming that directory, so nothing else of dist-packages leaks in.
    Returns the link directory, or None when pyverbs already imports or Debian's
    package is not installed."""
    try:
        import pyverbs  # noqa: F401

        return None
    except ImportError:
        pass
    if not os.path.isdir(DEBIAN_PYVERBS):
        return None
    link_dir = os.path.join(prefix, LINK_DIR)
    os.makedirs(link_dir, exist_ok=True)
    link = os.path.join(link_dir, "pyverbs")
    if not os.path.islink(link):
        os.symlink(DEBIAN_PYVERBS, link)
    site = sysconfig.get_paths(vars={"base": prefix, "platbase": prefix})["purelib"]
    with open(os.path.join(site, PTH_NAME), "w") as f:
        f.write(link_dir + "\n")
    if link_dir not in sys.path:
        sys.path.append(link_dir)  # this process: the .pth only acts at startup
    import importlib

    importlib.invalidate_caches()
    return link_dir


# veth0 and veth1 sit in one network namespace, so the kernel routes
# 10.99.0.1 -> 10.99.0.2 through lo, where no rxe device listens, and the RC
# connect times out (ETIMEDOUT resolving the GID). Packets from the QP are
# routed with the rxe's netdev as output interface: send those out of that veth,
# and accept packets whose source is a local address.
_GUEST_NET = [
    "sysctl -qw net.ipv4.conf.all.accept_local=1 net.ipv4.conf.all.rp_filter=0",
    "sysctl -qw net.ipv4.conf.veth0.accept_local=1 net.ipv4.conf.veth0.rp_filter=0",
    "sysctl -qw net.ipv4.conf.veth1.accept_local=1 net.ipv4.conf.veth1.rp_filter=0",
    "ip route replace 10.99.0.0/24 dev veth0 src 10.99.0.1 table 100",
    "ip route replace 10.99.0.0/24 dev veth1 src 10.99.0.2 table 101",
    "ip rule add pref 10 oif veth0 lookup 100",
    "ip rule add pref 11 oif veth1 lookup 101",
    "ip rule add pref 1000 lookup local",
    "ip rule del pref 0",
]


def vm_skip_reason(test_file: str) -> str | None:
    """Why the two-device RDMA tests of ``test_file`` cannot run here; None inside
    the RDMA VM with rxe0 and rxe1 (call after ensure_pyverbs_importable)."""
    if os.environ.get("RDMA_VM") != "1":
        return ("not in the RDMA VM (RDMA_VM unset): run tests/harness/rdma_vm/run -- "
                f".venv/bin/python -m pytest tests/{os.path.basename(test_file)}")
    from transports.rdma import list_devices

    devices = list_devices()
    if not {"rxe0", "rxe1"} <= set(devices):
        return f"no verbs devices rxe0/rxe1 here (found {devices or 'none'})"
    return None


def prepare_test_process() -> None:
    """What an RDMA test module does at import, before anything imports pyverbs:
    inside the RDMA VM, make Debian's pyverbs importable and route rxe0 <-> rxe1."""
    if os.environ.get("RDMA_VM") == "1":
        ensure_pyverbs_importable()
        prepare_guest_network()


def prepare_guest_network() -> bool:
    """Route rxe0 <-> rxe1 traffic over the veth pair (inside the RDMA VM only)."""
    if os.environ.get("RDMA_VM") != "1" or os.geteuid() != 0:
        return False
    rules = subprocess.run(["ip", "rule"], capture_output=True, text=True).stdout
    if "lookup 100" in rules:
        return True
    for cmd in _GUEST_NET:
        subprocess.run(cmd.split(), check=True, capture_output=True)
    return True


# --------------------------------------------------------------------------- the workload


def arrays(ring_size: int) -> list[tuple[str, Any]]:
    """The arrays the client sends, deterministic so the server can check them."""
    import numpy as np

    rng = np.random.default_rng(6)
    point = np.dtype([("x", "<f4"), ("y", "<f4"), ("id", "<i8")])
    structured = np.zeros(300, dtype=point)
    structured["x"], structured["id"] = rng.random(300), np.arange(300)
    return [
        ("empty", np.zeros(0, np.float32)),
        ("scalar", np.array(3.5)),
        ("bytes7", np.arange(7, dtype=np.uint8)),
        ("f32x1000", rng.standard_normal(1000).astype(np.float32)),
        ("i64_transposed", np.arange(15, dtype=np.int64).reshape(3, 5).T),
        ("structured", structured),
        ("f16x200k", rng.standard_normal(200_000).astype(np.float16)),  # zero-copy path
        ("ring_plus_one", rng.integers(0, 255, ring_size + 12_345, dtype=np.uint8)),
    ]


def big_array():
    import numpy as np

    return np.arange(16 << 20, dtype=np.float32)  # 64 MiB


def gradients(rank: int, step: int, n: int):
    import numpy as np

    return np.random.default_rng(1000 * step + rank).standard_normal(n).astype(np.float32)


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []
        self.passed: list[str] = []

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        (self.passed if ok else self.failed).append(name + (f": {detail}" if detail and not ok else ""))


def run_transfer(conn: Any, role: str, ring_size: int, checks: Checks, timing: dict) -> None:
    import numpy as np

    items = arrays(ring_size)
    t = time.perf_counter()
    if role == "client":
        for name, arr in items:
            conn.send(arr, meta=name.encode())  # all queued at once: several in flight
        conn.flush(timeout=120)
        for name, arr in items:  # the server echoes each one, negated where it can
            got = conn.recv_array(timeout=120)
            want = arr if arr.dtype.fields else -arr if arr.dtype != np.uint8 else arr[::-1]
            checks.check(f"echo {name}", got.meta == name.encode() and got.array.dtype == want.dtype
                          and got.array.shape == want.shape and np.array_equal(got.array, want),
                          f"got {got.meta!r} {got.array.dtype}{got.array.shape}")
    else:
        for name, arr in items:
            got = conn.recv_array(timeout=120)
            ok = (got.meta == name.encode() and got.array.dtype == arr.dtype
                  and got.array.shape == arr.shape and np.array_equal(got.array, arr))
            checks.check(f"recv {name}", ok, f"got {got.meta!r} {got.array.dtype}{got.array.shape}")
            back = got.array if arr.dtype.fields else -got.array if arr.dtype != np.uint8 else got.array[::-1]
            conn.send_array(back, meta=name.encode(), timeout=120)
    timing["transfer_s"] = round(time.perf_counter() - t, 3)


def run_big(conn: Any, role: str, checks: Checks, timing: dict) -> None:
    import numpy as np

    t = time.perf_counter()
    if role == "client":
        conn.send_array(big_array(), meta=b"big", timeout=300)
        checks.check("sent 64MiB", True)
    else:
        got = conn.recv_array(timeout=300)
        checks.check("recv 64MiB", got.meta == b"big" and got.array.nbytes == 64 << 20
                     and np.array_equal(got.array, big_array()))
    timing["big_64MiB_s"] = round(time.perf_counter() - t, 3)


def run_allreduce(conn: Any, role: str, steps: int, n: int, checks: Checks, timing: dict) -> None:
    """Ring allreduce of two ranks: reduce-scatter, then allgather; one chunk each way."""
    import numpy as np

    rank = 0 if role == "client" else 1
    half = n // 2
    grad = np.empty(n, np.float32)  # reused every step: the registration cache should hit
    t = time.perf_counter()
    for step in range(steps):
        grad[:] = gradients(rank, step, n)
        mine = slice(0, half) if rank == 0 else slice(half, n)
        theirs = slice(half, n) if rank == 0 else slice(0, half)
        conn.send(grad[theirs], meta=f"rs{step}".encode())  # reduce-scatter
        got = conn.recv_array(timeout=120)
        conn.flush(timeout=120)
        grad[mine] += got.array
        conn.send(grad[mine], meta=f"ag{step}".encode())  # allgather
        got = conn.recv_array(timeout=120)
        conn.flush(timeout=120)
        grad[theirs] = got.array
        want = gradients(0, step, n) + gradients(1, step, n)
        checks.check(f"allreduce step {step}", np.array_equal(grad, want),
                     f"max error {float(np.abs(grad - want).max())}")
    timing["allreduce_s"] = round(time.perf_counter() - t, 3)


def bootstrap(role: str, conn: Any, endpoint: str | None, say: Callable[[str], None]) -> Any:
    import msgpack
    import zmq

    ctx = zmq.Context.instance()
    if role == "server":
        sock = ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        say(f"ENDPOINT tcp://127.0.0.1:{port}")
        sock.setsockopt(zmq.RCVTIMEO, 60_000)
        offer = msgpack.unpackb(sock.recv())["offer"]
        conn.connect(offer)  # RTS before answering: the client may write at once
        sock.send(msgpack.packb({"accept": conn.local_info()}))
        conn.wait_ready(timeout=60)
    else:
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 60_000)
        sock.connect(endpoint)
        sock.send(msgpack.packb({"offer": conn.local_info()}))
        conn.connect(msgpack.unpackb(sock.recv())["accept"])
        conn.wait_ready(timeout=10)
    return sock


def barrier(role: str, sock: Any) -> None:
    # Neither side closes its queue pair while the other still needs it.
    if role == "client":
        sock.send(b"bye")
        sock.recv()
    else:
        sock.recv()
        sock.send(b"bye")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--device", required=True)
    parser.add_argument("--bootstrap", help="the server's endpoint (client only)")
    parser.add_argument("--phases", default="transfer,big,allreduce")
    parser.add_argument("--ring-size", type=int, default=1 << 20)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--grad-size", type=int, default=1 << 20, help="float32 elements")
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(line, flush=True)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ensure_pyverbs_importable()
    from transports.rdma import RdmaTransport

    transport = RdmaTransport(rdma_device=args.device)
    checks, timing = Checks(), {}
    result: dict[str, Any] = {"role": args.role, "device": args.device}
    t0 = time.perf_counter()
    try:
        if not transport.available():
            raise SystemExit(f"rdma device {args.device} is not usable here")
        result["brochure"] = transport.brochure()
        with transport.connection(ring_size=args.ring_size, max_write=256 << 10) as conn:
            sock = bootstrap(args.role, conn, args.bootstrap, say)
            timing["bootstrap_s"] = round(time.perf_counter() - t0, 3)
            phases = args.phases.split(",")
            if "transfer" in phases:
                run_transfer(conn, args.role, args.ring_size, checks, timing)
            if "big" in phases:
                run_big(conn, args.role, checks, timing)
            if "allreduce" in phases:
                run_allreduce(conn, args.role, args.steps, args.grad_size, checks, timing)
            barrier(args.role, sock)
            result["stats"] = dict(conn.stats)
            result["cache"] = {"hits": conn.cache.hits, "misses": conn.cache.misses,
                               "evictions": conn.cache.evictions, "entries": len(conn.cache)}
            sock.close()
    except Exception as exc:  # the test reads the reason from the result line
        checks.check("ran to the end", False, f"{type(exc).__name__}: {exc}")
    result.update(passed=checks.passed, failed=checks.failed, timing=timing,
                  total_s=round(time.perf_counter() - t0, 3))
    say("RESULT " + json.dumps(result))
    return 0 if not checks.failed else 1


if __name__ == "__main__":
    sys.exit(main())

"""A 64 MiB float32 array between two processes of one host: shared memory vs ipc.

Both paths run in the same two spawned workers (bench/_runner.py), repetition
by repetition interleaved, and the ratio is the median of per-repetition ratios:

* **shm** (transports/shm.py): the sender copies the array into a slot
  (``ShmSender.write``) and sends the small descriptor over a zmq ipc PAIR; the
  receiver maps the slot (``ShmReceiver.open``), takes a zero-copy numpy view,
  checks it, drops it, and the release goes back over the same PAIR, batched.
  The sender waits for a release only when all its slots are busy.
* **ipc**: the mesh's current path: ``send(array, copy=False)`` on a zmq ipc PAIR,
  ``recv(copy=False)`` + ``np.frombuffer`` view on the receiver.

Two receiver behaviours: ``view`` (the goal case: take the view, check the first
and last element) and ``read`` (also reduce the whole array once, as a collective
does; for information: then both paths pay the receiver's memory reads).

Throughput = arrays x size / (receiver done with the last array - sender's first
timed send), both ``perf_counter`` (CLOCK_MONOTONIC, one clock for all processes),
after an untimed, acknowledged warm-up. Goal: shm >= 2x ipc.

    .venv/bin/python -m bench.shm [--quick] [--sweep] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import msgpack
import numpy as np
import zmq

import mesh  # noqa: F401  (import order: mesh before transports)
from bench._runner import BenchError, Control, log, workers
from transports import shm

HERE = __name__
SIZE = 64 << 20
DTYPE = np.float32
GOAL = 2.0
WAIT = 30.0  # seconds any single wait may take before the run is declared stuck


def _pair(bind: bool, endpoint: str) -> Any:
    sock = zmq.Context.instance().socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 1000)
    # A few arrays in flight at most: 64 MiB each, and the reference gets the
    # same pipelining depth as the shm ring (4 slots).
    sock.setsockopt(zmq.SNDHWM, 4)
    sock.setsockopt(zmq.RCVHWM, 4)
    if bind:
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    return sock


def _recv_ctl(sock: Any) -> list:
    if not sock.poll(int(WAIT * 1000)):
        raise BenchError(f"no control message within {WAIT} s")
    return msgpack.unpackb(sock.recv())


# ====================================================================== worker tasks


def receiver_task(ctl: Control, mode: str, consume: bool, nbytes: int, count: int,
                  warmup: int) -> dict:
    """Right worker: bind, then receive ``warmup`` + ``count`` arrays."""
    endpoint = f"ipc://{tempfile.gettempdir()}/zmesh-bench-shm-{os.getpid()}.sock"
    sock = _pair(True, endpoint)
    receiver = None
    n = nbytes // np.dtype(DTYPE).itemsize
    checksum = 0.0
    try:
        ctl.send("ready", endpoint)
        if mode == "shm":
            sender_id = msgpack.unpackb(sock.recv())[1]  # ["hello", node id]
            receiver = shm.ShmReceiver(sender_id)
        for i in range(warmup + count):
            if not sock.poll(int(WAIT * 1000)):
                raise BenchError(f"receiver: array {i} did not arrive within {WAIT} s")
            if mode == "shm":
                desc = shm.ShmDescriptor.unpack(sock.recv())
                view = receiver.open(desc)
                arr = view.array(DTYPE, (n,))
                del view
                if arr[0] != i or arr[-1] != -i:
                    raise BenchError(f"array {i}: stale or wrong data {arr[0]}, {arr[-1]}")
            else:
                frame = sock.recv(copy=False)
                arr = np.frombuffer(frame.buffer, DTYPE)
                del frame
                if arr.size != n or arr[0] != 1.0 or arr[-1] != -1.0:
                    raise BenchError(f"array {i}: wrong data")
            if consume:
                checksum += float(np.add.reduce(arr))
            del arr  # shm: the slot's release is queued now
            if receiver is not None:
                releases = receiver.take_releases()
                if releases:
                    sock.send(msgpack.packb(["release", shm.pack_releases(releases)]))
            if i == warmup - 1:
                sock.send(msgpack.packb(["warm", None]))
        t_end = time.perf_counter()
        sock.send(msgpack.packb(["done", None]))
        return {"t_end": t_end, "checksum": checksum}
    finally:
        if receiver is not None:
            receiver.close()
        sock.close()
        try:
            os.unlink(endpoint[len("ipc://"):])
        except OSError:
            pass


def sender_task(ctl: Control, endpoint: str, mode: str, consume: bool, nbytes: int,
                count: int, warmup: int) -> dict:
    """Left worker: connect, send the warm-up, wait for its ack, then time ``count``."""
    sock = _pair(False, endpoint)
    arr = np.random.default_rng(0).standard_normal(nbytes // np.dtype(DTYPE).itemsize)
    arr = arr.astype(DTYPE)
    sender = None
    waits = 0
    try:
        if mode == "shm":
            sender = shm.ShmSender(f"bench{os.getpid()}", max_bytes=max(8 * nbytes, 4 << 20),
                                   max_slots=4, min_slot_bytes=min(nbytes, 1 << 20))
            sock.send(msgpack.packb(["hello", sender.node_id]))
        else:
            arr[0], arr[-1] = 1.0, -1.0

        def handle(msg: list) -> str:
            if msg[0] == "release":
                sender.on_release(shm.unpack_releases(msg[1]))
            return msg[0]

        t0 = 0.0
        for i in range(warmup + count):
            if i == warmup:
                while handle(_recv_ctl(sock)) != "warm":
                    pass
                t0 = time.perf_counter()
            if mode == "shm":
                arr[0], arr[-1] = i, -i  # stamps: a reused slot must hold new data
                while sock.poll(0):
                    handle(msgpack.unpackb(sock.recv()))
                desc = sender.write(arr)
                while desc is None:  # every slot busy: wait for a release
                    waits += 1
                    handle(_recv_ctl(sock))
                    desc = sender.write(arr)
                sock.send(desc.pack())
            else:
                sock.send(arr, copy=False)
        while handle(_recv_ctl(sock)) != "done":
            pass
        stats = sender.stats() if sender is not None else {}
        return {"t0": t0, "waits": waits, "slots": stats.get("slots", 0)}
    finally:
        if sender is not None:
            sender.close()
        sock.close()


# ====================================================================== parent


def _once(pair: Any, mode: str, consume: bool, nbytes: int, count: int, warmup: int) -> float:
    """MiB/s of one repetition."""
    kw = {"mode": mode, "consume": consume, "nbytes": nbytes, "count": count, "warmup": warmup}
    server, client = pair.run(f"{HERE}:receiver_task", f"{HERE}:sender_task",
                              server_kw=kw, client_kw=kw, timeout=WAIT * (count + 2))
    elapsed = server["t_end"] - client["t0"]
    if elapsed <= 0:
        raise BenchError(f"{mode}: non-positive elapsed time {elapsed}")
    return count * nbytes / elapsed / (1 << 20)


def run(quick: bool = False) -> dict:
    """Both paths, interleaved; returns medians and the shm/ipc ratio per case."""
    reps, count, warmup = (2, 6, 2) if quick else (5, 20, 3)
    if not shm.shm_usable():
        raise BenchError("/dev/shm is not usable on this host: nothing to measure")
    shm.cleanup_stale()  # debris of an earlier run that was killed
    out: dict[str, Any] = {"bench": "shm", "size_MiB": SIZE >> 20, "dtype": np.dtype(DTYPE).str,
                           "reps": reps, "count": count, "goal_ratio": GOAL}
    with workers() as pair:
        for case, consume in (("view", False), ("read", True)):
            shm_rates: list[float] = []
            ipc_rates: list[float] = []
            for rep in range(reps):
                order = ("shm", "ipc") if rep % 2 == 0 else ("ipc", "shm")
                for mode in order:
                    rate = _once(pair, mode, consume, SIZE, count, warmup)
                    (shm_rates if mode == "shm" else ipc_rates).append(rate)
                log(f"shm bench {case} rep {rep + 1}/{reps}: shm {shm_rates[-1]:,.0f} MiB/s, "
                    f"ipc {ipc_rates[-1]:,.0f} MiB/s")
            ratios = [s / i for s, i in zip(shm_rates, ipc_rates, strict=True)]
            out[case] = {
                "shm_MiB_per_s": statistics.median(shm_rates),
                "ipc_MiB_per_s": statistics.median(ipc_rates),
                "ratio": statistics.median(ratios),
                "ratios": ratios,
                "shm_runs": shm_rates,
                "ipc_runs": ipc_rates,
            }
    out["ratio"] = out["view"]["ratio"]
    out["met"] = out["ratio"] >= GOAL
    return out


def sweep(sizes: tuple[int, ...] = (64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20),
          reps: int = 3) -> dict[int, dict]:
    """The ``view`` case at smaller sizes, to pick the node's shm threshold:
    size -> medians and ratio. About 128 MiB per repetition and path."""
    shm.cleanup_stale()
    out: dict[int, dict] = {}
    with workers() as pair:
        for size in sizes:
            count = max(20, (128 << 20) // size)
            rates: dict[str, list[float]] = {"shm": [], "ipc": []}
            for rep in range(reps):
                for mode in (("shm", "ipc") if rep % 2 == 0 else ("ipc", "shm")):
                    rates[mode].append(_once(pair, mode, False, size, count, 5))
            ratios = [a / b for a, b in zip(rates["shm"], rates["ipc"], strict=True)]
            out[size] = {"shm_MiB_per_s": statistics.median(rates["shm"]),
                         "ipc_MiB_per_s": statistics.median(rates["ipc"]),
                         "ratio": statistics.median(ratios)}
            log(f"shm sweep {size >> 10} KiB: ratio {out[size]['ratio']:.2f}x")
    return out


def summary(result: dict) -> str:
    lines = [
        "",
        f"=== shm vs ipc: {result['size_MiB']} MiB {result['dtype']} arrays, two processes, "
        f"{result['reps']} reps x {result['count']} arrays (ratio = median of per-rep ratios) ===",
    ]
    for case in ("view", "read"):
        row = result[case]
        lines.append(
            f"{case:<5} shm {row['shm_MiB_per_s']:>8,.0f} MiB/s   ipc {row['ipc_MiB_per_s']:>8,.0f} "
            f"MiB/s   ratio {row['ratio']:.2f}x"
            + (f"   (goal >= {GOAL:.0f}x: {'met' if row['ratio'] >= GOAL else 'MISSED'})"
               if case == "view" else "   (receiver reduces the array: information)")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repetitions")
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    parser.add_argument("--sweep", action="store_true",
                        help="also measure 64 KiB-16 MiB arrays (to set the node's threshold)")
    args = parser.parse_args(argv)
    try:
        result = run(quick=args.quick)
        if args.sweep:
            result["sweep"] = sweep()
    except BenchError as exc:
        log(f"shm bench failed: {exc}")
        return 1
    print(summary(result))
    for size, row in result.get("sweep", {}).items():
        print(f"sweep {size >> 10:>6} KiB  shm {row['shm_MiB_per_s']:>8,.0f} MiB/s   "
              f"ipc {row['ipc_MiB_per_s']:>8,.0f} MiB/s   ratio {row['ratio']:.2f}x")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""1 MiB float32 arrays on the tcp socket (``shm=False``) against raw PUSH/PULL
``copy=False``, interleaved: rate, and CPU per array per thread on both sides
(issue #16's "1 MiB arrays over tcp >= 90 % of raw").

    python -m bench.arrays                       # 7 reps of raw / mesh, 2000 arrays each
    python -m bench.arrays --reps 9 --count 3000
    python -m bench.arrays --ab DIR              # also "mesh-ab": the mesh from checkout DIR
                                                 # (its own build), in the same reps
    python -m bench.arrays --perf DIR            # perf record the mesh subscriber (one rep)

Both receivers do what bench/pubsub.py's 1 MiB rows do: a numpy view on the
received frame (no copy), read its last element. Rate = arrays received / (last
receive - first timed send), perf_counter in both processes (one clock). CPU per
thread from /proc/self/task/*/schedstat (nanoseconds, not the 10 ms ticks of
/proc/.../stat). The order of the implementations alternates every repetition;
the ratio is the median of per-repetition ratios.

Who owns what: the parent starts the two children of each run (``sink`` then
``source``), reads their one-line JSON reports on stdout and always kills them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

SUBJECT = "bench.arrays"
ARRAY_BYTES = 1 << 20
WARM = 20


def _say(**kw: Any) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def _threads() -> dict[str, float]:
    """CPU seconds per thread, by Python name (mesh-io, mesh-dispatch) or native name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as fh:
                ns = int(fh.read().split()[0])
            with open(f"/proc/self/task/{tid}/comm") as fh:
                comm = fh.read().strip()
        except OSError:
            continue
        name = names.get(int(tid), comm)
        if name.startswith("mesh-"):
            name = name.split("-")[1]
        out[name] = out.get(name, 0.0) + ns / 1e9
    return out


def _per_msg(after: dict[str, float], before: dict[str, float], count: int) -> dict[str, float]:
    return {k: round((v - before.get(k, 0.0)) * 1e6 / count, 1) for k, v in after.items()
            if v - before.get(k, 0.0) > 1e-4}


def _faults() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


def _node(role: str, seeds: tuple[str, ...] = ()) -> Any:
    import mesh

    return mesh.Node(f"arr-{role}-{os.getpid()}", cluster="arrays",
                     discovery="static" if seeds else "none", seeds=seeds,
                     listen=("tcp://127.0.0.1:0",), transports=("tcp",),
                     shm=bool(os.environ.get("ARRAYS_SHM")))  # ARRAYS_SHM=1: the default node


def sink(impl: str, count: int) -> None:
    total = WARM + count
    state = {"n": 0, "acc": 0.0, "t_last": 0.0}
    done = threading.Event()
    pc = time.perf_counter

    def take(view: Any) -> None:
        state["acc"] += float(view[-1])
        state["n"] += 1
        state["t_last"] = pc()
        if state["n"] >= total:
            done.set()

    if impl == "raw":
        import zmq

        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 1000)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        _say(endpoint=f"tcp://127.0.0.1:{port}")
        recv = sock.recv
        for _ in range(WARM):
            take(np.frombuffer(recv(copy=False).buffer, np.float32))
        cpu0, f0 = _threads(), _faults()
        while state["n"] < total:
            take(np.frombuffer(recv(copy=False).buffer, np.float32))
        _say(received=count, t_last=state["t_last"], threads=_per_msg(_threads(), cpu0, count),
             faults=(_faults() - f0) / count)
        sys.stdin.readline()
        sock.close(0)
        return
    from bench.profiling import profiled

    with profiled(os.environ.get("ARRAYS_CPROFILE")), _node("sink") as node:
        armed = threading.Event()

        def on_array(msg: Any) -> None:
            take(msg.array())
            if state["n"] == WARM:
                armed.set()

        node.subscribe(SUBJECT, on_array)
        _say(endpoint=[e for e in node.endpoints if e.startswith("tcp://")][0])
        if not armed.wait(120):
            raise SystemExit("sink: no warm-up")
        cpu0, f0 = _threads(), _faults()
        if not done.wait(600):
            raise SystemExit(f"sink: {state['n']} of {total} arrays")
        _say(received=count, t_last=state["t_last"], threads=_per_msg(_threads(), cpu0, count),
             faults=(_faults() - f0) / count, compiled=getattr(__import__("mesh"), "compiled", None))
        sys.stdin.readline()


def source(impl: str, endpoint: str, count: int) -> None:
    payload = np.ones(ARRAY_BYTES // 4, dtype=np.float32)
    if impl == "raw":
        import zmq

        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.connect(endpoint)
        for _ in range(WARM):
            sock.send(payload, copy=False)
        time.sleep(0.3)
        cpu0, t0 = _threads(), time.perf_counter()
        for _ in range(count):
            sock.send(payload, copy=False)
        seconds = time.perf_counter() - t0
        time.sleep(0.2)
        _say(t0=t0, seconds=seconds, threads=_per_msg(_threads(), cpu0, count))
        sys.stdin.readline()
        sock.close(0)
        return
    with _node("source", (endpoint,)) as node:
        node.wait_for_peers(1, timeout=60)
        node.wait_for_subscribers(SUBJECT, 1, timeout=60)
        publish = node.publish
        for _ in range(WARM):
            publish(SUBJECT, payload, timeout=5.0)
        time.sleep(0.3)
        cpu0, t0 = _threads(), time.perf_counter()
        for _ in range(count):
            publish(SUBJECT, payload, timeout=5.0)
        seconds = time.perf_counter() - t0
        time.sleep(0.2)
        _say(t0=t0, seconds=seconds, threads=_per_msg(_threads(), cpu0, count))
        sys.stdin.readline()


def _read(proc: subprocess.Popen, key: str) -> dict:
    while True:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"child ended before saying {key!r}")
        if line.startswith("{"):
            msg = json.loads(line)
            if key in msg:
                return msg


def run_one(impl: str, count: int, cwd: str | None, perf: str | None = None) -> dict:
    base = "raw" if impl == "raw" else "mesh"
    python = os.path.join(cwd, ".venv/bin/python") if cwd else sys.executable
    procs: list[subprocess.Popen] = []
    try:
        cmd = [python, "-m", "bench.arrays", "sink", "--impl", base, "--count", str(count)]
        snk = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               cwd=cwd)
        procs.append(snk)
        endpoint = _read(snk, "endpoint")["endpoint"]
        rec = None
        if perf:
            os.makedirs(perf, exist_ok=True)
            rec = subprocess.Popen(["perf", "record", "-g", "-F", "2000", "-p", str(snk.pid),
                                    "-o", os.path.join(perf, f"perf.{impl}.data")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(rec)
            time.sleep(1.0)
        src = subprocess.Popen([python, "-m", "bench.arrays", "source", "--impl", base,
                                "--endpoint", endpoint, "--count", str(count)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cwd)
        procs.append(src)
        got = _read(snk, "received")
        sent = _read(src, "seconds")
        if rec is not None:
            rec.send_signal(2)
            rec.wait(60)
        for proc in (snk, src):
            proc.stdin.write("stop\n")
            proc.stdin.flush()
        for proc in (snk, src):
            proc.wait(60)
        return {"rate": count / (got["t_last"] - sent["t0"]), "sink": got["threads"],
                "source": sent["threads"], "faults": got["faults"]}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("role", nargs="?", default="drive", choices=("drive", "sink", "source"))
    ap.add_argument("--impl", default="mesh", choices=("raw", "mesh"))
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--endpoint")
    ap.add_argument("--ab", metavar="DIR", help="also run the mesh from this checkout")
    ap.add_argument("--perf", metavar="DIR", help="perf record the subscribers (one rep)")
    args = ap.parse_args()
    if args.role == "sink":
        sink(args.impl, args.count)
        return
    if args.role == "source":
        source(args.impl, args.endpoint, args.count)
        return
    impls = {"raw": None, "mesh": None}
    if args.ab:
        impls["mesh-ab"] = os.path.abspath(args.ab)
    reps = []
    for rep in range(args.reps):
        order = list(impls) if rep % 2 == 0 else list(impls)[::-1]
        got = {impl: run_one(impl, args.count, impls[impl], args.perf) for impl in order}
        reps.append(got)
        print(f"rep {rep + 1}: " + ", ".join(
            f"{impl} {got[impl]['rate']:,.0f}/s ({got[impl]['rate'] / got['raw']['rate']:.0%})"
            for impl in impls), flush=True)
        if args.perf:
            break
    print("\nmedian of per-rep ratios to raw, and CPU µs per array per thread (median):")
    for impl in impls:
        ratios = [r[impl]["rate"] / r["raw"]["rate"] for r in reps]
        line = f"{impl:8s} {statistics.median(ratios):6.1%}  rate {statistics.median(r[impl]['rate'] for r in reps):7,.0f}/s"
        for side in ("sink", "source"):
            names = sorted({n for r in reps for n in r[impl][side]})
            cpu = {n: statistics.median(r[impl][side].get(n, 0.0) for r in reps) for n in names}
            line += f"  {side}: " + " ".join(f"{n}={v:.1f}" for n, v in cpu.items() if v >= 0.5)
        line += f"  faults {statistics.median(r[impl]['faults'] for r in reps):.1f}"
        print(line)
        print(f"         ratios: {' '.join(f'{x:.2f}' for x in ratios)}")


if __name__ == "__main__":
    main()

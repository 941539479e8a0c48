"""Where one round trip's CPU goes, per thread, in both processes.

``python -m bench.rtprobe [--mode inline|default|request|floor] [--count N] [--pin]``
runs the latency benchmark's ping-pong (64 B, tcp loopback: an echo process and
a ping process, as bench/pubsub.py's mesh_echo_task / mesh_ping_task and
bench/refs.py's floor) and prints, for every thread of each process, the CPU
time (``/proc/self/task/*/schedstat``) and the voluntary and involuntary
context switches (``/proc/self/task/*/status``) per round trip over the timed
round trips, beside the round trip's p50.

Who owns what: the parent starts both children (subprocesses) and reads their
last stdout line (JSON); each child samples its own threads before and after the
timed loop (the echo when the ping tells it, by SIGUSR1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

SIZE = 64


def _threads() -> dict[int, str]:
    """tid -> the Python thread's name, or "[comm]" for a thread Python did not start
    (libzmq's, Gloo's)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        name = names.get(int(tid))
        if name is None:
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = "[" + f.read().strip() + "]"
            except OSError:
                name = "?"
        out[int(tid)] = name
    return out


def sample() -> dict[int, tuple[str, int, int, int]]:
    """tid -> (name, run ns, voluntary, involuntary switches)."""
    out = {}
    for tid, name in _threads().items():
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                run_ns = int(f.read().split()[0])
            vol = invol = 0
            with open(f"/proc/self/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol = int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        invol = int(line.split()[1])
        except OSError:
            continue
        out[tid] = (name, run_ns, vol, invol)
    return out


def diff(before: dict, after: dict, n: int) -> list[dict]:
    rows = []
    for tid, (name, run, vol, invol) in after.items():
        b = before.get(tid, (name, 0, 0, 0))
        rows.append({"thread": name, "cpu_us": (run - b[1]) / n / 1e3,
                     "vol": (vol - b[2]) / n, "invol": (invol - b[3]) / n})
    return [r for r in rows if r["cpu_us"] > 0.05 or r["vol"] > 0.01]


# ------------------------------------------------------------------ children


def _options() -> dict:
    # Under callgrind a handler runs ~50x slower: inline ones must stay inline.
    return {"inline_budget": 10.0} if os.environ.get("RTPROBE_CALLGRIND") else {}


_CALLS: dict[str, int] = {}
_COUNTING = [False]


def _count(frame: Any, event: str, arg: Any) -> None:
    if not _COUNTING[0]:
        return
    if event == "call":
        key = f"{frame.f_code.co_name} ({os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_firstlineno})"
    elif event == "c_call":
        key = f"C {getattr(arg, '__qualname__', arg)}"
    else:
        return
    key = f"{threading.current_thread().name.split('-bench')[0]}: {key}"
    _CALLS[key] = _CALLS.get(key, 0) + 1


def _mark(marks: list) -> None:
    marks.append(sample())
    if os.environ.get("RTPROBE_CALLS"):
        _COUNTING[0] = not _COUNTING[0]


@contextlib.contextmanager
def _thread_profiled(path: str | None) -> Any:
    """cProfile of the echo's I/O thread with a CPU-time clock (a loaded machine
    preempts threads: wall time would blame whatever ran when it happened)."""
    if not path:
        yield
        return
    import cProfile
    import pstats

    profiles: list = []

    def boot(_frame: Any, _event: str, _arg: Any) -> None:
        sys.setprofile(None)
        if threading.current_thread().name.startswith("mesh-io"):
            prof = cProfile.Profile(time.thread_time)
            profiles.append(prof)
            prof.enable()

    threading.setprofile(boot)
    try:
        yield
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
        with open(path, "w") as out:
            for prof in profiles:
                prof.create_stats()
                pstats.Stats(prof, stream=out).strip_dirs().sort_stats("tottime").print_stats(40)


def echo(mode: str) -> None:
    marks: list[dict] = []
    signal.signal(signal.SIGUSR1, lambda *_: _mark(marks))
    if os.environ.get("RTPROBE_CALLS"):
        threading.setprofile(_count)
    if mode in ("floor", "raw"):
        from bench import pubsub, refs

        class Ctl:
            def send(self, what: str, endpoint: str) -> None:
                print(json.dumps({"endpoint": endpoint}), flush=True)

            def wait_stop(self, timeout: float) -> None:
                sys.stdin.readline()

            def stop_requested(self) -> bool:
                return bool(select.select([sys.stdin], [], [], 0)[0])

        if mode == "raw":
            pubsub.raw_echo_task(Ctl(), "tcp", 600.0)
        else:
            refs.floor_echo_task(Ctl(), 600.0)
    else:
        from bench import pubsub

        with _thread_profiled(os.environ.get("RTPROBE_PROFILE")), \
                pubsub._mesh_node("echo", "tcp", options=_options()) as node:
            opts = {"inline": True} if mode in ("inline", "request-inline") else {}
            if mode.startswith("request"):
                node.subscribe(pubsub.PING, lambda msg: msg.respond(msg.data), **opts)
            else:
                publish = node.publish
                node.subscribe(pubsub.PING, lambda msg: publish(pubsub.PONG, msg.data), **opts)
            print(json.dumps({"endpoint": pubsub._mesh_endpoint(node, "tcp")}), flush=True)
            sys.stdin.readline()
    n = int(os.environ.get("RTPROBE_N", "1"))
    if _CALLS:
        for key, calls in sorted(_CALLS.items(), key=lambda kv: kv[0].split(":")[0]):
            print(f"{calls / n:6.2f}  {key}", file=sys.stderr)
    print(json.dumps(diff(marks[0], marks[1], n) if len(marks) >= 2 else []), flush=True)


def mark(echo_pid: int, what: str) -> None:
    """Tell the echo to sample its threads (or, under callgrind, zero / dump its counts)."""
    if os.environ.get("RTPROBE_CALLGRIND"):
        subprocess.run(["callgrind_control", what, str(echo_pid)], check=True,
                       stdout=subprocess.DEVNULL)
    else:
        os.kill(echo_pid, signal.SIGUSR1)
        time.sleep(0.05)


def ping(mode: str, endpoint: str, echo_pid: int, count: int, warmup: int) -> None:
    from bench import pubsub

    replies: queue.SimpleQueue = queue.SimpleQueue()
    put = replies.put
    payload = os.urandom(SIZE)

    def timed(send: Any, recv: Any) -> dict:
        pubsub._round_trips(send, recv, payload, warmup, 0)
        mark(echo_pid, "-z")
        before = sample()
        samples = pubsub._round_trips(send, recv, payload, count, 0)
        after = sample()
        mark(echo_pid, "-d")
        samples.sort()
        return {"p50_us": samples[count // 2] / 1e3, "threads": diff(before, after, count)}

    if mode == "raw":
        import zmq

        sock = pubsub._raw_context().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.connect(endpoint)
        sock.send(b"hello")
        sock.recv()
        out = timed(sock.send, sock.recv)
        sock.close(0)
    elif mode == "floor":
        import zmq

        from bench import refs

        # refs.floor_ping_task's body, with the sampling around its timed loop.
        ctx = pubsub._raw_context()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        mine = pubsub._raw_bind(router, "tcp")
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(endpoint)
        stop = threading.Event()
        io = threading.Thread(target=refs._floor_io, args=(router, lambda f: put(None), stop),
                              name="floor-io")
        io.start()
        lock = threading.Lock()
        send_multipart = dealer.send_multipart

        def send(data: bytes) -> None:
            with lock:
                send_multipart([b"ping", data])

        while True:
            send_multipart([b"hello", mine.encode()])
            try:
                replies.get(True, 0.2)
                break
            except queue.Empty:
                pass
        time.sleep(0.1)
        while not replies.empty():
            replies.get_nowait()
        out = timed(send, lambda: replies.get(True, 5.0))
        stop.set()
        io.join()
        router.close(0)
        dealer.close(0)
    else:
        with pubsub._mesh_node("ping", "tcp", (endpoint,), _options()) as node:
            node.wait_for_peers(1, timeout=20)
            node.wait_for_subscribers(pubsub.PING, 1, timeout=20)
            if mode.startswith("request"):
                request = node.request

                def send(data: bytes) -> None:
                    put(request(pubsub.PING, data, timeout=5.0))
            else:
                opts = {"inline": True} if mode == "inline" else {}
                node.subscribe(pubsub.PONG, lambda msg: put(None), **opts)
                send = lambda data: node.publish(pubsub.PING, data)  # noqa: E731
            deadline = time.monotonic() + 20
            while True:
                try:
                    send(b"hello")
                    replies.get(True, 0.2)
                    break
                except (queue.Empty, TimeoutError):
                    if time.monotonic() > deadline:
                        raise
            time.sleep(0.1)
            while not replies.empty():
                replies.get_nowait()
            out = timed(send, lambda: replies.get(True, 5.0))
    print(json.dumps(out), flush=True)


# ------------------------------------------------------------------ parent


def run(mode: str, count: int, warmup: int, pin: bool, callgrind: str | None = None) -> dict:
    env = {**os.environ, "RTPROBE_N": str(count)}
    pre = ["taskset", "-c", str(max(os.sched_getaffinity(0)))] if pin else []
    me = [sys.executable, "-m", "bench.rtprobe"]
    grind = []
    if callgrind:
        # The echo under callgrind, its counts zeroed and dumped around the timed loop.
        env["RTPROBE_CALLGRIND"] = "1"
        grind = ["valgrind", "--tool=callgrind", "--separate-threads=yes",
                 f"--callgrind-out-file={callgrind}/callgrind.{mode}.%p"]
    echo_proc = subprocess.Popen([*pre, *grind, *me, "--child", "echo", "--mode", mode], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        endpoint = json.loads(echo_proc.stdout.readline())["endpoint"]
        ping_out = subprocess.run(
            [*pre, *me, "--child", "ping", "--mode", mode, "--endpoint", endpoint,
             "--echo-pid", str(echo_proc.pid), "--count", str(count), "--warmup", str(warmup)],
            env=env, stdout=subprocess.PIPE, text=True, timeout=300, check=True)
        result = json.loads(ping_out.stdout.strip().splitlines()[-1])
        echo_proc.stdin.write("stop\n")
        echo_proc.stdin.flush()
        result["echo_threads"] = json.loads(echo_proc.stdout.readline())
        echo_proc.wait(30)
        return result
    finally:
        if echo_proc.poll() is None:
            echo_proc.kill()
            echo_proc.wait()


def show(mode: str, result: dict) -> None:
    print(f"== {mode}: round trip p50 {result['p50_us'] * 1:.1f} µs")
    for side in ("threads", "echo_threads"):
        total = sum(r["cpu_us"] for r in result[side])
        print(f"  {'ping' if side == 'threads' else 'echo'} process: {total:.1f} µs CPU / round trip")
        for r in sorted(result[side], key=lambda r: -r["cpu_us"]):
            print(f"    {r['thread']:<28} {r['cpu_us']:7.1f} µs  vol {r['vol']:.2f}  "
                  f"invol {r['invol']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="inline",
                    help="inline, default, request, request-inline, floor, raw (comma list)")
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--pin", action="store_true", help="both processes on one core")
    ap.add_argument("--callgrind", metavar="DIR",
                    help="run the echo under callgrind (instructions per thread, in DIR)")
    ap.add_argument("--child")
    ap.add_argument("--endpoint")
    ap.add_argument("--echo-pid", type=int)
    args = ap.parse_args()
    if args.child == "echo":
        echo(args.mode)
    elif args.child == "ping":
        ping(args.mode, args.endpoint, args.echo_pid, args.count, args.warmup)
    else:
        for mode in args.mode.split(","):
            show(mode, run(mode, args.count, args.warmup, args.pin, args.callgrind))


if __name__ == "__main__":
    main()

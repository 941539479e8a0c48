"""The 64 B hot path under a profiler: one publisher process, one subscriber
process (or ``--subs N``: N subscriber processes, the fan-out), tcp loopback, the
default node and subscription, ``publish(timeout=5)``.

    python -m bench.hotpath                      # rate and CPU per message, both sides
    python -m bench.hotpath --size 1024 --subs 4 # 1 KiB fan-out to 4 subscribers
    python -m bench.hotpath --callgrind          # instructions per message, both sides
    python -m bench.hotpath --cprofile DIR       # per-thread cProfile reports into DIR

Instruction counts (valgrind's callgrind, stable on a shared machine): each side
runs under ``valgrind --tool=callgrind --instr-atstart=no``; instrumentation is
switched on (``callgrind_control -i on``) once both nodes are joined and warm,
and off after the subscriber got the last message, so the count covers the
timed messages and the threads' idle polling between them only.

Who owns what: the parent starts both children (``role`` sink/source), reads
their one-line JSON reports on stdout and always kills them at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

SUBJECT = "bench.tp"
WARM = 2000


def _node(role: str, seeds: tuple[str, ...] = (), **options: Any) -> Any:
    import mesh

    if os.environ.get("HOTPATH_BATCH_BYTES"):  # an experiment's batch size, both sides
        options["batch_bytes"] = int(os.environ["HOTPATH_BATCH_BYTES"])
    if os.environ.get("HOTPATH_VALGRIND"):
        # Under valgrind a publish takes ~50x longer: no message would follow the
        # previous one within the burst gap (50 µs) nor fill a batch within
        # batch_delay, and the profile would be of the unbatched path. Stretch both
        # so batches form as they do natively (~400 messages of 64 B).
        from mesh.engine import link

        link._BURST_GAP = 1.0
        options["batch_delay"] = 0.5
    return mesh.Node(f"hot-{role}-{os.getpid()}", cluster="hotpath",
                     discovery="static" if seeds else "none", seeds=seeds,
                     listen=("tcp://127.0.0.1:0",), transports=("tcp",), **options)


def _say(**kw: Any) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _threads() -> dict[str, float]:
    """CPU seconds per thread, by name (libzmq's I/O thread is "ZMQbg/IO/0")."""
    import threading

    names = {t.native_id: t.name.split("-")[1] if t.name.startswith("mesh-") else t.name
             for t in threading.enumerate()}
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        name = names.get(int(tid), comm)
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _per_msg(after: dict[str, float], before: dict[str, float], count: int) -> dict[str, float]:
    return {k: round((v - before.get(k, 0.0)) * 1e6 / count, 2) for k, v in after.items()
            if v - before.get(k, 0.0) > 0}


def sink(count: int, profile: str | None) -> None:
    import threading

    from bench.profiling import profiled

    done = threading.Event()
    got = [0]
    total = WARM + count

    def on_msg(msg: Any) -> None:
        got[0] += 1
        if got[0] >= total:
            done.set()

    with profiled(profile), _node("sink") as node:
        node.subscribe(SUBJECT, on_msg)
        _say(endpoint=[e for e in node.endpoints if e.startswith("tcp://")][0])
        sys.stdin.readline()  # "warm": the publisher's warm-up is in
        cpu0, threads0 = _cpu(), _threads()
        credit0 = sum(node.credit_updates.values())
        _say(armed=True)
        if not done.wait(600):
            raise SystemExit(f"sink: {got[0]} of {total} messages")
        _say(received=got[0], cpu_s=_cpu() - cpu0, threads=_per_msg(_threads(), threads0, count),
             credit_updates=sum(node.credit_updates.values()) - credit0)
        sys.stdin.readline()


def source(endpoints: str, count: int, profile: str | None, size: int = 64) -> None:
    from bench.profiling import profiled

    payload = os.urandom(size)
    seeds = tuple(endpoints.split(","))
    with profiled(profile), _node("source", seeds) as node:
        node.wait_for_peers(len(seeds), timeout=60)
        node.wait_for_subscribers(SUBJECT, len(seeds), timeout=60)
        publish = node.publish
        for _ in range(WARM):
            publish(SUBJECT, payload, timeout=5.0)
        time.sleep(0.5)
        _say(warm=True)
        sys.stdin.readline()  # "go": instrumentation is on
        cpu0, threads0, t0 = _cpu(), _threads(), time.perf_counter()
        batches0 = node.batches_out
        gc0 = sum(g["collections"] for g in gc.get_stats())
        for _ in range(count):
            publish(SUBJECT, payload, timeout=5.0)
        seconds = time.perf_counter() - t0
        time.sleep(0.2)  # what the I/O threads do for these messages after the last publish
        _say(sent=count, seconds=seconds, cpu_s=_cpu() - cpu0,
             threads=_per_msg(_threads(), threads0, count), batches=node.batches_out - batches0,
             gc_collections=sum(g["collections"] for g in gc.get_stats()) - gc0)
        sys.stdin.readline()


def _spawn(args: list[str], callgrind: str | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bench.hotpath", *args]
    if callgrind:
        os.environ["HOTPATH_VALGRIND"] = "1"
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={callgrind}",
               *cmd]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.DEVNULL if callgrind else None)


def _read(proc: subprocess.Popen, key: str) -> dict:
    while True:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"child ended before saying {key!r}")
        if line.startswith("{"):
            msg = json.loads(line)
            if key in msg:
                return msg


def _instr(pid: int, on: bool) -> None:
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(pid)], check=True,
                   stdout=subprocess.DEVNULL, timeout=60)


def _total(path: str) -> int:
    with open(path) as fh:
        for line in fh:
            if line.startswith("totals:"):
                return int(line.split()[1])
    raise SystemExit(f"no totals in {path}")


def drive(count: int, callgrind: str | None, cprofile: str | None, size: int = 64,
          subs: int = 1) -> dict:
    out: dict[str, Any] = {"count": count, "size": size, "subs": subs}
    sinks = [f"sink{i}" if subs > 1 else "sink" for i in range(subs)]
    files = {side: f"{callgrind}/callgrind.{side}" for side in (*sinks, "source")} if callgrind \
        else {}
    if callgrind:
        os.makedirs(callgrind, exist_ok=True)
    prof = {side: f"{cprofile}/{side}" for side in (*sinks, "source")} if cprofile else {}
    procs = []
    try:
        snks = []
        for side in sinks:
            args = ["sink", "--count", str(count)] + (["--profile", prof[side]] if prof else [])
            snks.append(_spawn(args, files.get(side)))
            procs.append(snks[-1])
        endpoints = ",".join(_read(snk, "endpoint")["endpoint"] for snk in snks)
        src_args = ["source", "--endpoint", endpoints, "--count", str(count), "--size", str(size)]
        src = _spawn(src_args + (["--profile", prof["source"]] if prof else []), files.get("source"))
        procs.append(src)
        _read(src, "warm")
        for snk in snks:
            snk.stdin.write("warm\n")
            snk.stdin.flush()
            _read(snk, "armed")
        if callgrind:
            for proc in procs:
                _instr(proc.pid, True)
        src.stdin.write("go\n")
        src.stdin.flush()
        gots = [_read(snk, "received") for snk in snks]
        sent = _read(src, "sent")
        if callgrind:
            for proc in procs:
                _instr(proc.pid, False)
        # Per delivered message: the publisher's CPU is shared by its `subs` deliveries.
        delivered = count * subs
        sub_threads: dict[str, float] = {}
        for got in gots:
            for name, us in got["threads"].items():
                sub_threads[name] = round(sub_threads.get(name, 0.0) + us / subs, 2)
        out.update(rate=count / sent["seconds"], pub_cpu_us=sent["cpu_s"] * 1e6 / count,
                   sub_cpu_us=sum(g["cpu_s"] for g in gots) * 1e6 / delivered,
                   cpu_us_per_delivered=(sent["cpu_s"] + sum(g["cpu_s"] for g in gots)) * 1e6
                   / delivered,
                   pub_threads_us=sent["threads"], sub_threads_us=sub_threads,
                   pub_gc_collections=sent["gc_collections"],
                   msgs_per_batch=round(delivered / max(1, sent["batches"]), 1),
                   msgs_per_credit_update=round(delivered / max(1, sum(
                       g["credit_updates"] for g in gots)), 1))
        for proc in procs:
            proc.stdin.write("stop\n")
            proc.stdin.flush()
        for proc in procs:
            proc.wait(300)
        for side, path in files.items():
            # callgrind writes one file per dump; the part with instrumentation on is the total.
            parts = [p for p in os.listdir(callgrind) if p.startswith(os.path.basename(path) + ".")
                     or p == os.path.basename(path)]
            total = sum(_total(os.path.join(callgrind, p)) for p in parts)
            # The publisher's per publish; each subscriber's per message it received.
            out[f"{side}_instr_per_msg"] = total / count
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("role", nargs="?", default="drive", choices=("drive", "sink", "source"))
    ap.add_argument("--count", type=int, default=None)
    ap.add_argument("--endpoint")
    ap.add_argument("--size", type=int, default=64, help="payload bytes (default 64)")
    ap.add_argument("--subs", type=int, default=1,
                    help="subscriber processes, each getting every message (default 1)")
    ap.add_argument("--profile")
    ap.add_argument("--callgrind", nargs="?", const="bench/results/callgrind", default=None,
                    metavar="DIR")
    ap.add_argument("--cprofile", metavar="DIR")
    args = ap.parse_args()
    if args.role == "sink":
        sink(args.count, args.profile)
    elif args.role == "source":
        source(args.endpoint, args.count, args.profile, args.size)
    else:
        count = args.count or (20_000 if args.callgrind else 200_000)
        if args.callgrind:
            for name in os.listdir(args.callgrind) if os.path.isdir(args.callgrind) else []:
                if re.match(r"callgrind\.(sink\d*|source)", name):
                    os.unlink(os.path.join(args.callgrind, name))
        import mesh

        result = drive(count, args.callgrind, args.cprofile, args.size, args.subs)
        result["compiled"] = getattr(mesh, "compiled", False)
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

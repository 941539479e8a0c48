"""The credit loop under load: 64 B (or ``--size``) 1->1 tcp, the default node,
``publish(timeout=5)``, the default subscription against one whose credits never
bind, interleaved; with ``--trace``, timestamps of every credit update on its way
back (consumed -> sent by the subscriber -> read by the publisher's I/O thread ->
applied -> the blocked publisher woken) and how often and how long the publisher
waited for credit.

    python -m bench.creditloop                 # rates: default window vs no flow control
    python -m bench.creditloop --trace         # the same, and the credit loop's latencies
    python -m bench.creditloop --reps 5 --count 200000
    python -m bench.creditloop --pin --split   # one core per process; batch vs credit part

``--pin`` puts the subscriber on CPU 0 and the publisher on CPU 1 (every thread of
each): far less noise than two processes' six threads roaming two cores. Each run
says how far the publisher ran ahead (``pub_share``: its publishing time over the
run's; ``behind_at_pub_end``: messages not yet handled at its last publish, to
``MARK``), CPU per message per process and ``cores_busy``. ``--split`` adds a run
without flow control whose batches are capped as the default window caps them
(half of it): ``cost_of_batches_median`` is what the smaller batches cost alone,
the rest of the cost is the credit loop's. With ``--trace``, ``both_idle_share`` is
the part of the run in which the publisher waited for credit while the
subscriber's dispatch thread had nothing to run.

Both processes read ``time.monotonic`` (CLOCK_MONOTONIC, one clock for the
machine), so a timestamp taken in one is comparable with the other's. Per-thread
CPU (``/proc/self/task/*/schedstat``) and context switches per 1,000 messages
(``name:sw``) are in each run's JSON. ``CL_DUMP=FILE`` (with ``--trace``) writes
every event to ``FILE.flow`` / ``FILE.noflow`` for a timeline; ``CL_CWD=DIR`` runs
the children from another checkout (``DIR`` holding its ``mesh`` and this module):
A/B against another commit in the same run.

Who owns what: the parent starts a sink and a source per run (``role``), reads
their one-line JSON reports and always kills them at the end. The tracing
wrappers (``_trace_sink``/``_trace_source``) replace Node methods in the child
only and append to lists (``list.append`` is atomic under the GIL).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from bench.hotpath import _cpu, _read, _say


def _threads() -> dict[str, float]:
    """Per thread: CPU seconds (schedstat, ns resolution) and context switches."""
    names = {t.native_id: t.name.split("-")[1] if t.name.startswith("mesh-") else t.name
             for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as fh:
                ns = int(fh.read().split()[0])
            with open(f"/proc/self/task/{tid}/status") as fh:
                status = fh.read()
            with open(f"/proc/self/task/{tid}/comm") as fh:
                comm = fh.read().strip()
        except OSError:
            continue
        sw = sum(int(line.split()[1]) for line in status.splitlines()
                 if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")))
        name = names.get(int(tid), comm)
        out[name] = out.get(name, 0.0) + ns / 1e9
        out[name + ":sw"] = out.get(name + ":sw", 0.0) + sw * 1e-3  # printed per 1000 messages
    return out

SUBJECT = "bench.cl"
WARM = 4000
MARK = 100  # progress marks: the run-ahead to within 100 messages
NO_FLOW = {"credits": 10**9, "overflow": "drop_new"}


def _node(role: str, seeds: tuple[str, ...] = (), noflow: bool = False) -> Any:
    import mesh

    # CL_NODE / CL_NODE_NOFLOW: node options (JSON) for both nodes of every run / of
    # the runs without flow control only (e.g. '{"batch_bytes": 32768}'): experiments.
    options = json.loads(os.environ.get("CL_NODE") or "{}")
    if os.environ.get("CL_SWITCH"):  # the interpreter's GIL switch interval, seconds
        sys.setswitchinterval(float(os.environ["CL_SWITCH"]))
    if noflow:
        options.update(json.loads(os.environ.get("CL_NODE_NOFLOW") or "{}"))
    return mesh.Node(f"cl-{role}-{os.getpid()}", cluster=f"creditloop-{os.getppid()}",
                     discovery="static" if seeds else "none", seeds=seeds,
                     listen=("tcp://127.0.0.1:0",), transports=("tcp",), **options)


def _trace_commands(events: list) -> None:
    from mesh.node import Node

    orig = Node._command

    def command(self: Any, cmd: tuple) -> None:
        t = time.monotonic()
        events.append(("cmd", t, t, 0, str(cmd[0]) + "@" + threading.current_thread().name.split("-")[0]))
        orig(self, cmd)

    Node._command = command


def _trace_sink(events: list) -> None:
    """Credit leaving the subscriber: (kind, t, msgs, thread name)."""
    from mesh import wire
    from mesh.node import Node

    _trace_commands(events)

    mono = time.monotonic
    orig_direct = Node._send_credit_direct
    orig_control = Node._send_control
    orig_owed = Node._owed_credit

    def direct(self: Any, publisher: str, entries: list) -> bool:
        t0 = mono()
        ok = orig_direct(self, publisher, entries)
        events.append(("direct" if ok else "direct-busy", t0, mono(),
                       sum(e[1] for e in entries), threading.current_thread().name))
        return ok

    def control(self: Any, peer_id: str, kind: int, body: Any) -> None:
        if kind == wire.CREDIT:
            t0 = mono()
            orig_control(self, peer_id, kind, body)
            events.append(("control", t0, mono(), sum(e[1] for e in body),
                           threading.current_thread().name))
            return
        orig_control(self, peer_id, kind, body)

    def owed(self: Any, peer_id: str) -> Any:
        out = orig_owed(self, peer_id)
        if out:
            t = mono()
            events.append(("riding", t, t, sum(e[1] for e in out), threading.current_thread().name))
        return out

    Node._send_credit_direct = direct
    Node._send_control = control
    Node._owed_credit = owed

    from mesh.engine import dispatch

    orig_run_list = dispatch.run_list
    orig_batch = Node._on_batch

    def run_list(node: Any, item: list) -> None:
        t0 = mono()
        orig_run_list(node, item)
        events.append(("run", t0, mono(), sum(1 if type(e) is tuple else e.count for e in item), ""))

    def on_batch(self: Any, ident: bytes, header: list, frames: list) -> None:
        t = mono()
        orig_batch(self, ident, header, frames)
        events.append(("batch", t, mono(), header[1] if len(header) > 1 else 0, ""))

    dispatch.run_list = run_list
    Node._on_batch = on_batch


def _trace_source(events: list, waits: list) -> None:
    """Credit arriving at the publisher: read, applied; publisher waits."""
    from mesh.node import Node

    _trace_commands(events)
    mono = time.monotonic
    orig_on = Node._on_credit
    orig_apply = Node._apply_credit
    orig_wait = Node._wait_for_credit

    def on_credit(self: Any, peer: Any, body: Any) -> None:
        t = mono()
        events.append(("read", t, sum(e[1] for e in body)))
        orig_on(self, peer, body)

    def apply(self: Any, link: Any) -> None:
        n = sum(e[1] for entries in list(link.credit_in) for e in entries)
        t = mono()
        orig_apply(self, link)
        events.append(("applied", t, n, threading.current_thread().name))

    def wait(self: Any, *args: Any, **kw: Any) -> bool:
        t0 = mono()
        try:
            return orig_wait(self, *args, **kw)
        finally:
            waits.append((t0, mono()))

    Node._on_credit = on_credit
    Node._apply_credit = apply
    Node._wait_for_credit = wait
    orig_flush = Node._flush_batch

    def flush(self: Any, link: Any, *args: Any, **kw: Any) -> None:
        n = link.batch_count
        t = mono()
        orig_flush(self, link, *args, **kw)
        events.append(("flush", t, n, threading.current_thread().name))

    Node._flush_batch = flush
    orig_take = Node._take_credit

    def take(self: Any, link: Any) -> None:
        busy = link.lock.locked()
        orig_take(self, link)
        events.append(("take-busy" if busy else "take-free", mono(), 0, ""))

    Node._take_credit = take


def _slices() -> None:
    """CL_SLICE_US=N (experiment): ask EEVDF for an N µs slice (sched_setattr's
    sched_runtime) for the I/O threads (libzmq's and the mesh's), so a wake-up on a
    busy core preempts at once instead of waiting for the running thread's slice."""
    us = os.environ.get("CL_SLICE_US")
    if not us:
        return
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    which = os.environ.get("CL_SLICE_THREADS", "ZMQbg,io").split(",")
    names = {t.native_id: t.name for t in threading.enumerate()}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as fh:
            comm = fh.read().strip()
        name = names.get(int(tid), comm)
        if not any(w in name for w in which):
            continue
        attr = struct.pack("IIQiIQQQII", 56, 0, 0, 0, 0, int(us) * 1000, 0, 0, 0, 0)
        buf = ctypes.create_string_buffer(attr, 56)
        if libc.syscall(314, int(tid), buf, 0) != 0:
            raise SystemExit(f"sched_setattr {name}: errno {ctypes.get_errno()}")


def sink(count: int, noflow: bool, trace: bool) -> None:
    events: list = []
    if trace:
        _trace_sink(events)
    done = threading.Event()
    got = [0]
    total = WARM + count
    marks: list[float] = []  # time of every MARK-th message: progress, for the run-ahead
    mono = time.monotonic

    def on_msg(msg: Any) -> None:
        got[0] += 1
        if not got[0] % MARK:
            marks.append(mono())
        if got[0] >= total:
            done.set()

    with _node("sink", noflow=noflow) as node:
        # CL_SUB: subscription options (JSON) of the flow-controlled runs, e.g. a wider window
        sub = json.loads(os.environ.get("CL_SUB") or "{}")
        node.subscribe(SUBJECT, on_msg, **(NO_FLOW if noflow else sub))
        _say(endpoint=[e for e in node.endpoints if e.startswith("tcp://")][0])
        sys.stdin.readline()
        _slices()
        events.clear()
        marks.clear()
        at_arm = got[0]  # the warm-up's messages (WARM, unless some are still coming)
        cpu0, th0 = _cpu(), _threads()
        _say(armed=True)
        if not done.wait(300):
            raise SystemExit(f"sink: {got[0]} of {total}")
        t_end = time.monotonic()
        _say(received=got[0], t_end=t_end, cpu_s=_cpu() - cpu0,
             threads={k: round((v - th0.get(k, 0.0)) * 1e6 / count, 2)
                      for k, v in _threads().items()},
             events=events if trace else [], marks=marks, at_arm=at_arm)
        sys.stdin.readline()


def source(endpoint: str, count: int, size: int, trace: bool, noflow: bool = False) -> None:
    events: list = []
    waits: list = []
    if trace:
        _trace_source(events, waits)
    payload = os.urandom(size)
    with _node("source", (endpoint,), noflow) as node:
        node.wait_for_peers(1, timeout=60)
        node.wait_for_subscribers(SUBJECT, 1, timeout=60)
        publish = node.publish
        for _ in range(WARM):
            publish(SUBJECT, payload, timeout=5.0)
        time.sleep(0.3)
        _slices()
        _say(warm=True)
        sys.stdin.readline()
        events.clear()
        waits.clear()
        batches0 = node.status()["counters"].get("batches_out", 0)
        cpu0, th0 = _cpu(), _threads()
        t0 = time.monotonic()
        for _ in range(count):
            publish(SUBJECT, payload, timeout=5.0)
        t1 = time.monotonic()
        time.sleep(0.1)
        batches = node.status()["counters"].get("batches_out", 0) - batches0
        _say(sent=count, t0=t0, t1=t1, cpu_s=_cpu() - cpu0, batches=batches,
             threads={k: round((v - th0.get(k, 0.0)) * 1e6 / count, 2)
                      for k, v in _threads().items()},
             events=events, waits=waits)
        sys.stdin.readline()


def _pinned(cpu: int | None) -> Any:
    """Popen's preexec_fn: the child and every thread it starts on ``cpu`` only."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def run_once(count: int, size: int, noflow: bool, trace: bool, pin: bool = False) -> dict:
    cmd = [sys.executable, "-m", "bench.creditloop"]
    procs: list[subprocess.Popen] = []
    try:
        snk = subprocess.Popen(cmd + ["sink", "--count", str(count)] + (["--noflow"] if noflow else [])
                               + (["--trace"] if trace else []),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               cwd=os.environ.get("CL_CWD"), preexec_fn=_pinned(0 if pin else None))
        procs.append(snk)
        endpoint = _read(snk, "endpoint")["endpoint"]
        src = subprocess.Popen(cmd + ["source", "--endpoint", endpoint, "--count", str(count),
                                      "--size", str(size)] + (["--trace"] if trace else [])
                               + (["--noflow"] if noflow else []),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               cwd=os.environ.get("CL_CWD"), preexec_fn=_pinned(1 if pin else None))
        procs.append(src)
        _read(src, "warm")
        snk.stdin.write("warm\n")
        snk.stdin.flush()
        _read(snk, "armed")
        src.stdin.write("go\n")
        src.stdin.flush()
        got = _read(snk, "received")
        sent = _read(src, "sent")
        for p in procs:
            p.stdin.write("stop\n")
            p.stdin.flush()
        for p in procs:
            p.wait(60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    seconds = got["t_end"] - sent["t0"]
    # How far the publisher ran ahead: its share of the run, and the messages still on
    # their way (sent, not yet handled) when it made its last publish() call.
    marks = sum(1 for t in got["marks"] if t <= sent["t1"])
    handled = MARK * (got["at_arm"] // MARK + marks) - got["at_arm"]
    # CPU per message from every thread's schedstat (ns; os.times ticks are 10 ms).
    pub_us = sum(v for k, v in sent["threads"].items() if not k.endswith(":sw"))
    sub_us = sum(v for k, v in got["threads"].items() if not k.endswith(":sw"))
    out = {"rate": count / seconds, "cpu_us": round(pub_us + sub_us, 3),
           "cores_busy": round((pub_us + sub_us) * count / 1e6 / seconds, 2),
           "pub_share": round((sent["t1"] - sent["t0"]) / seconds, 3),
           "msgs_per_batch": round(count / max(1, sent["batches"]), 1),
           "behind_at_pub_end": count - handled,
           "pub_cpu_us": round(pub_us, 3), "sub_cpu_us": round(sub_us, 3),
           "pub_threads": sent["threads"], "sub_threads": got["threads"]}
    if trace and os.environ.get("CL_DUMP"):
        with open(os.environ["CL_DUMP"] + (".noflow" if noflow else ".flow"), "w") as fh:
            json.dump({"sub": got["events"], "pub": sent["events"], "waits": sent["waits"],
                       "t0": sent["t0"]}, fh)
    if trace:
        out.update(analyse(got["events"], sent["events"], sent["waits"], sent["t0"], got["t_end"]))
    return out


def _pct(values: list[float]) -> dict:
    if not values:
        return {}
    values = sorted(values)
    q = lambda p: values[min(len(values) - 1, int(p * len(values)))]  # noqa: E731
    return {"n": len(values), "p50_us": round(q(0.5) * 1e6, 1), "p90_us": round(q(0.9) * 1e6, 1),
            "max_us": round(values[-1] * 1e6, 1)}


def analyse(sub_ev: list, pub_ev: list, waits: list, t0: float, t_end: float) -> dict:
    """Match updates by cumulative credit (both sides count the same messages)."""
    sent = [e for e in sub_ev if e[0] in ("direct", "control", "riding")]
    cmds: dict[str, int] = {}
    for e in sub_ev:
        if e[0] == "cmd":
            cmds["sub:" + e[4]] = cmds.get("sub:" + e[4], 0) + 1
    for e in pub_ev:
        if e[0] == "cmd":
            cmds["pub:" + e[4]] = cmds.get("pub:" + e[4], 0) + 1
    how: dict[str, int] = {}
    for e in sub_ev:
        how[e[0]] = how.get(e[0], 0) + 1
    reads = [e for e in pub_ev if e[0] == "read"]
    applied = [e for e in pub_ev if e[0] == "applied" and e[2] > 0]
    by_thread: dict[str, int] = {}
    for e in applied:
        by_thread[e[3]] = by_thread.get(e[3], 0) + 1
    # cumulative credit -> time, on each side
    def cum(evs: list, idx_t: int, idx_n: int) -> list[tuple[int, float]]:
        total, out = 0, []
        for e in evs:
            total += e[idx_n]
            out.append((total, e[idx_t]))
        return out

    c_sent, c_read, c_applied = cum(sent, 2, 3), cum(reads, 1, 2), cum(applied, 1, 2)
    read_at = dict(c_read)
    applied_at = dict(c_applied)
    send_to_read = [read_at[c] - t for c, t in c_sent if c in read_at]
    read_to_apply = [applied_at[c] - t for c, t in c_read if c in applied_at]
    waited = [b - a for a, b in waits]
    # what ended each wait: the last apply before it ended
    span = t_end - t0
    sizes = [e[3] for e in sent]
    runs = sorted((e for e in sub_ev if e[0] == "run"), key=lambda e: e[1])
    busy = sum(e[2] - e[1] for e in runs)
    idle = [b[1] - a[2] for a, b in zip(runs, runs[1:], strict=False) if b[1] > a[2]]
    flushes = [e for e in pub_ev if e[0] == "flush"]
    fl_by: dict[str, int] = {}
    for e in flushes:
        fl_by[e[3]] = fl_by.get(e[3], 0) + 1
    batches = [e for e in sub_ev if e[0] == "batch"]
    # The dispatch thread's idle stretches, and how much of them the publisher spent
    # waiting for credit: time in which neither side did the work.
    gaps, prev = [], t0
    for e in runs:
        if e[1] > prev:
            gaps.append((prev, e[1]))
        prev = max(prev, e[2])
    both = _overlap(sorted(waits), gaps)
    return {
        "updates_sent": how, "commands": cmds,
        "take_credit": {k: sum(1 for e in pub_ev if e[0] == k) for k in ("take-busy", "take-free")}, "update_msgs": {"n": len(sizes), "p50": sorted(sizes)[len(sizes) // 2] if sizes else 0,
                        "max": max(sizes, default=0)},
        "applied_by": by_thread,
        "send_to_read": _pct(send_to_read), "read_to_apply": _pct(read_to_apply),
        "matched": [len(send_to_read), len(c_sent), len(c_read)],
        "waits": {**_pct(waited), "total_ms": round(sum(waited) * 1e3, 1),
                  "share_of_run": round(sum(waited) / span, 3) if span > 0 else None},
        "direct_send_us": _pct([e[2] - e[1] for e in sub_ev if e[0] == "direct"]),
        "both_idle_share": round(both / span, 3) if span > 0 else None,
        "dispatch": {"items": len(runs), "busy_share": round(busy / span, 3),
                     "msgs_per_item": round(statistics.mean([e[3] for e in runs]), 1) if runs else 0,
                     "idle_gaps": _pct(idle), "idle_ms": round(sum(idle) * 1e3, 1)},
        "pub_flushes": {"n": len(flushes), "by": fl_by,
                        "mean_msgs": round(statistics.mean([e[2] for e in flushes]), 1) if flushes else 0},
        "sub_batches": {"n": len(batches), "decode": _pct([e[2] - e[1] for e in batches])},
        "per_wait": _per_wait(waits, sent, c_sent, c_read, applied, sub_ev, flushes),
    }


def _overlap(a: list, b: list) -> float:
    """Seconds two sorted lists of disjoint (start, end) stretches share."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _per_wait(waits: list, sent: list, c_sent: list, c_read: list, applied: list, sub_ev: list,
              flushes: list) -> dict:
    """For each publisher wait: where the time went on the way of the credit that ended it
    (the last credit applied before the wait ended)."""
    import bisect

    ap_t = [e[1] for e in applied]
    cum_ap, total = [], 0
    for e in applied:
        total += e[2]
        cum_ap.append(total)
    sent_by_cum = {c: sent[i] for i, (c, _t) in enumerate(c_sent)}
    read_by_cum = dict(c_read)
    batch_t = sorted(e[1] for e in sub_ev if e[0] == "batch")
    run_t = sorted(e[1] for e in sub_ev if e[0] == "run")
    flush_t = sorted(e[1] for e in flushes)
    parts: dict[str, list] = {k: [] for k in (
        "wait", "last_flush_to_wait", "wait_to_batch_at_sub", "batch_to_run", "run_to_send",
        "send_call", "send_to_read", "read_to_apply", "apply_to_woken")}
    for a, b in waits:
        i = bisect.bisect_right(ap_t, b) - 1
        if i < 0 or ap_t[i] < a:
            continue
        c = cum_ap[i]
        s = sent_by_cum.get(c)
        r = read_by_cum.get(c)
        if s is None or r is None:
            continue
        parts["wait"].append(b - a)
        j = bisect.bisect_right(flush_t, a) - 1
        if j >= 0:
            parts["last_flush_to_wait"].append(a - flush_t[j])
        k = bisect.bisect_right(batch_t, s[1]) - 1  # the last batch read before the credit left
        m = bisect.bisect_right(run_t, s[1]) - 1
        if k >= 0:
            parts["wait_to_batch_at_sub"].append(batch_t[k] - a)
        if k >= 0 and m >= 0:
            parts["batch_to_run"].append(run_t[m] - batch_t[k])
        if m >= 0:
            parts["run_to_send"].append(s[1] - run_t[m])
        parts["send_call"].append(s[2] - s[1])
        parts["send_to_read"].append(r - s[2])
        parts["read_to_apply"].append(ap_t[i] - r)
        parts["apply_to_woken"].append(b - ap_t[i])
    return {k: _pct(v) for k, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("role", nargs="?", default="drive", choices=("drive", "sink", "source"))
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--endpoint")
    ap.add_argument("--noflow", action="store_true")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--pin", action="store_true",
                    help="subscriber on CPU 0, publisher on CPU 1 (each process one core)")
    ap.add_argument("--split", action="store_true",
                    help="a third run per rep: no flow control, batches capped as the default "
                         "window caps them (half of it): the cost of the smaller batches alone")
    args = ap.parse_args()
    if args.role == "sink":
        sink(args.count, args.noflow, args.trace)
        return
    if args.role == "source":
        source(args.endpoint, args.count, args.size, args.trace, args.noflow)
        return
    import mesh
    from mesh.flow import DEFAULT_CREDITS

    variants = ("flow", "noflow", "noflow-halfbatch") if args.split else ("flow", "noflow")
    rows: dict[str, list] = {v: [] for v in variants}
    costs = []
    # The default window caps a batch at half of it (Link.batch_cap); a batch counts
    # size + 4 bytes per message against batch_bytes: the same cap without credits.
    half = json.dumps({"batch_bytes": DEFAULT_CREDITS // 2 * (args.size + 4)})
    for rep in range(args.reps):
        order = variants if rep % 2 == 0 else variants[::-1]
        got = {}
        for variant in order:
            saved = os.environ.get("CL_NODE_NOFLOW")
            if variant == "noflow-halfbatch":
                os.environ["CL_NODE_NOFLOW"] = half
            try:
                got[variant] = run_once(args.count, args.size, variant != "flow", args.trace,
                                        args.pin)
            finally:
                if variant == "noflow-halfbatch":
                    if saved is None:
                        os.environ.pop("CL_NODE_NOFLOW")
                    else:
                        os.environ["CL_NODE_NOFLOW"] = saved
            rows[variant].append(got[variant])
            print(variant, json.dumps(got[variant]), flush=True)
        costs.append(1 - got["flow"]["rate"] / got["noflow"]["rate"])
    split = {}
    if args.split:
        # 1 - halfbatch/noflow: what the smaller batches cost; the rest is the credit loop.
        split = {"cost_of_batches_median": round(statistics.median(
            1 - r["noflow-halfbatch"]["rate"] / r["noflow"]["rate"]
            for r in ({v: rows[v][i] for v in variants} for i in range(args.reps))), 3),
            "rate_noflow_halfbatch": statistics.median(r["rate"] for r in rows["noflow-halfbatch"]),
            "cpu_us_noflow_halfbatch": statistics.median(
                r["cpu_us"] for r in rows["noflow-halfbatch"])}
    print(json.dumps({
        "compiled": getattr(mesh, "compiled", False),
        "rate_flow": statistics.median(r["rate"] for r in rows["flow"]),
        "rate_noflow": statistics.median(r["rate"] for r in rows["noflow"]),
        "cpu_us_flow": statistics.median(r["cpu_us"] for r in rows["flow"]),
        "cpu_us_noflow": statistics.median(r["cpu_us"] for r in rows["noflow"]),
        "pub_share_flow": statistics.median(r["pub_share"] for r in rows["flow"]),
        "pub_share_noflow": statistics.median(r["pub_share"] for r in rows["noflow"]),
        "behind_noflow": statistics.median(r["behind_at_pub_end"] for r in rows["noflow"]),
        "cost_median": round(statistics.median(costs), 3), "costs": [round(c, 3) for c in costs],
        **split,
    }))


if __name__ == "__main__":
    main()

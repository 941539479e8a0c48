"""``mesh bench``: measure pub/sub and request/reply on this machine, like ``nats bench``.

    mesh bench                                  # pub/sub, then request/reply, over ipc
    mesh bench --mode pubsub --msgs 200000 --size 1024 --pub 2 --sub 2 --transport tcp
    mesh bench --mode request --json

Who owns what:

- The parent (the ``mesh bench`` command, :func:`run`) is not a mesh node, so it
  does not perturb what it measures. Per round it starts every worker as a
  separate process (``python -m mesh.benchcmd worker ...``) in its own session,
  so the terminal's Ctrl-C reaches only the parent, which then stops them in
  order. Two reader threads per worker turn its stdout (one JSON event a line)
  and stderr into a queue the parent's main thread pumps; the main thread draws
  the progress line (stderr) and, in ``finally``, ends every worker it started:
  "stop" on stdin, then SIGTERM, then SIGKILL, each with a bounded wait.
- A worker process owns one ``mesh.Node``. Its main thread publishes or sends
  requests; subscriber and responder handlers run on the node's dispatch thread;
  a stdin thread takes the parent's commands ("seed ENDPOINT", "go", "stop"; end
  of input means the parent is gone: stop, and exit hard if stopping hangs); a
  reporter thread prints the progress count a few times a second.

Only the public API is used (Node, publish, subscribe, request), with
``publish(timeout=)``: a publisher waits for a slow subscriber instead of
dropping, so every message published must arrive, and any loss is a failure.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from mesh import _build
from mesh.errors import (
    BackpressureError,
    ClosedError,
    ConfigError,
    MeshError,
    NoRespondersError,
    PeerLostError,
    TimeoutError,
)

SUBJECT = "bench.data"
QUEUE_GROUP = "bench-responders"
MODES = ("pubsub", "request")
TRANSPORTS = ("ipc", "tcp")
MAX_PROCESSES = 32  # --pub + --sub: a bench of one machine, not a fork bomb
MAX_SIZE = 64 << 20
PROGRESS_EVERY = 0.2  # seconds between a worker's progress reports
REDRAW_TTY = 0.2  # seconds between progress redraws on a terminal
REDRAW_LINES = 1.0  # ... and between progress lines when stderr is not one
STOP_GRACE = 3.0  # seconds a worker has to close its node after "stop"
# A default run takes a few seconds: requests are one at a time, so far fewer of them.
DEFAULT_MSGS = {"pubsub": 100_000, "request": 10_000}
MB = 1_000_000  # MB/s as nats bench and network tools count: 10^6 bytes


class BenchFailed(MeshError):
    """A ``mesh bench`` round could not measure, or lost messages."""


# =========================================================================== workers


class _Worker:
    """What one worker process shares between its threads."""

    def __init__(self) -> None:
        self.out_lock = threading.Lock()  # the reporter and the main thread both write
        self.seed: str | None = None
        self.seeded = threading.Event()
        self.go = threading.Event()
        self.stop = threading.Event()
        self.count = 0  # sent, received or answered so far (read by the reporter)

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"ev": event, **fields}) + "\n"
        with self.out_lock:
            try:
                sys.stdout.write(line)
                sys.stdout.flush()
            except (OSError, ValueError):
                # The parent is gone: nobody to report to.
                self.stop.set()

    def read_commands(self) -> None:
        try:
            for line in sys.stdin:
                word, _, arg = line.strip().partition(" ")
                if word == "seed":
                    self.seed = arg
                    self.seeded.set()
                elif word == "go":
                    self.go.set()
                elif word == "stop":
                    break
        except (OSError, ValueError):
            pass
        self.stop.set()
        # Whatever the main thread is doing, this process never outlives its parent long.
        timer = threading.Timer(STOP_GRACE + 2.0, os._exit, args=(3,))
        timer.daemon = True
        timer.start()

    def report_progress(self) -> None:
        last = -1
        while not self.stop.wait(PROGRESS_EVERY):
            if self.count != last:
                last = self.count
                self.emit("progress", n=last)

    def wait(self, event: threading.Event) -> bool:
        """Wait for ``event`` in short slices (signals stay responsive); False on stop."""
        while not event.wait(0.1):
            if self.stop.is_set():
                return False
        return not self.stop.is_set() or event is self.stop


def _node_for(args: argparse.Namespace, seed: str | None) -> Any:
    import mesh

    listen = ("tcp://127.0.0.1:0",) if args.transport == "tcp" else ("ipc://auto",)
    return mesh.Node(
        f"bench-{args.role}-{args.index}-{os.getpid()}",
        cluster=args.cluster,
        # The first subscriber is the seed of every other process; nothing else
        # is looked for (no mDNS): a benchmark has no business on the LAN.
        discovery="static" if seed else "none",
        seeds=(seed,) if seed else (),
        listen=listen,
        transports=(args.transport,),
    )


def _endpoint(node: Any) -> str:
    return node.endpoints[0].replace("0.0.0.0", "127.0.0.1")


def _payload(args: argparse.Namespace) -> Any:
    if args.array:
        import numpy as np

        # float32, as gradients: sent without a copy, through shared memory from 1 MiB.
        return np.random.default_rng(0).standard_normal(args.size // 4).astype(np.float32)
    return os.urandom(args.size)


def _shm_writes(node: Any) -> int:
    """Messages this node sent through shared memory (large arrays, same host)."""
    return sum((p.get("shm") or {}).get("writes", 0) for p in node.status()["peers"])


def _worker_subscriber(w: _Worker, node: Any, args: argparse.Namespace) -> None:
    expected = args.count
    last = 0.0
    done = threading.Event()
    clock = time.monotonic  # one clock for every process of the host

    def on_msg(msg: Any) -> None:
        nonlocal last
        if args.array:
            msg.array()  # the numpy view a trainer would use (no copy)
        last = clock()
        w.count += 1
        if w.count >= expected:
            done.set()

    node.subscribe(SUBJECT, on_msg)
    w.emit("ready", endpoint=_endpoint(node), pid=os.getpid())
    # Everything arrived, or the parent stopped the round (then it reports the loss).
    while not done.wait(0.1) and not w.stop.is_set():
        pass
    # gaps: sequence numbers that never arrived (the node counts them).
    w.emit("done", received=w.count, t_last=last, gaps=node.status()["counters"].get("gaps", 0))
    w.wait(w.stop)


def _worker_responder(w: _Worker, node: Any, args: argparse.Namespace) -> None:
    def on_request(msg: Any) -> None:
        # An echo: the reply is as large as the request (an array stays an array).
        try:
            msg.respond(msg.array() if args.array else msg.data)
        except ClosedError:
            return  # stopping: the requester is told to stop too
        w.count += 1

    # A queue group: with several responders each request is answered once.
    node.subscribe(SUBJECT, on_request, queue=QUEUE_GROUP)
    w.emit("ready", endpoint=_endpoint(node), pid=os.getpid())
    w.wait(w.stop)
    w.emit("done", answered=w.count)


def _wait_for_targets(w: _Worker, node: Any, args: argparse.Namespace) -> bool:
    """Wait until every subscriber / responder process has interest in SUBJECT."""
    deadline = time.monotonic() + args.timeout
    while not w.stop.is_set():
        try:
            node.wait_for_subscribers(SUBJECT, args.targets, timeout=0.2)
            return True
        except TimeoutError as exc:
            if time.monotonic() > deadline:
                w.emit("error", text=f"{exc}; peers seen: {len(node.peers())}", kind="join")
                return False
    return False


def _worker_publisher(w: _Worker, node: Any, args: argparse.Namespace) -> None:
    if not _wait_for_targets(w, node, args):
        return
    w.emit("ready", endpoint=_endpoint(node), pid=os.getpid())
    if not w.wait(w.go):
        return
    payload = _payload(args)
    publish, stopped, timeout = node.publish, w.stop.is_set, args.timeout
    t0 = time.monotonic()
    try:
        for _ in range(args.count):
            if stopped():
                break
            # timeout=: wait for a subscriber's credit instead of dropping.
            publish(SUBJECT, payload, timeout=timeout)
            w.count += 1
    except BackpressureError:
        w.emit("error", text=f"a subscriber took no message for {timeout} s (publish timed out "
               f"after {w.count} messages)", kind="stall")
        return
    t1 = time.monotonic()
    w.emit("done", sent=w.count, t0=t0, t1=t1, shm_writes=_shm_writes(node))
    # Stay up until the subscribers have everything: closing would discard what is queued.
    w.wait(w.stop)


def _worker_requester(w: _Worker, node: Any, args: argparse.Namespace) -> None:
    if not _wait_for_targets(w, node, args):
        return
    payload = _payload(args)
    request = node.request
    # The first reply needs the responder to know us too: retry it within the join timeout.
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            request(SUBJECT, payload, timeout=0.5)
            break
        except (TimeoutError, NoRespondersError) as exc:
            if w.stop.is_set():
                return
            if time.monotonic() > deadline:
                w.emit("error", text=f"no reply from a responder within {args.timeout} s ({exc})",
                       kind="join")
                return
    # Untimed warm-up: connections, buffers and code paths hot before the clock starts.
    for _ in range(min(100, args.count // 10)):
        request(SUBJECT, payload, timeout=args.timeout)
    w.emit("ready", endpoint=_endpoint(node), pid=os.getpid())
    if not w.wait(w.go):
        return
    latencies: list[float] = []
    record, clock, stopped = latencies.append, time.perf_counter, w.stop.is_set
    failed = 0
    t0 = time.monotonic()
    for _ in range(args.count):
        if stopped():
            break
        start = clock()
        try:
            request(SUBJECT, payload, timeout=args.timeout)
        except (TimeoutError, NoRespondersError):
            failed += 1  # lost: a reply that never came
            if failed >= 3:
                break  # the responders are gone; the parent reports what came back
            continue
        record(clock() - start)
        w.count += 1
    t1 = time.monotonic()
    # Microseconds with one decimal: exact enough, and a short line for the parent.
    w.emit("done", sent=w.count + failed, replies=w.count, t0=t0, t1=t1,
           shm_writes=_shm_writes(node),
           lat_us=[round(s * 1e6, 1) for s in latencies])
    w.wait(w.stop)


_ROLES = {
    "sub": _worker_subscriber,
    "rep": _worker_responder,
    "pub": _worker_publisher,
    "req": _worker_requester,
}


def worker(args: argparse.Namespace) -> int:
    """One worker process: join, play ``args.role`` when told, report, stop when told."""
    w = _Worker()
    threading.Thread(target=w.read_commands, name="bench-stdin", daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: w.stop.set())
    seed = None
    if args.wait_seed:
        # Python and the mesh are imported by now: only the node start remains.
        if not w.wait(w.seeded):
            return 0
        seed = w.seed
    try:
        with _node_for(args, seed) as node:
            threading.Thread(target=w.report_progress, name="bench-progress", daemon=True).start()
            _ROLES[args.role](w, node, args)
    except MeshError as exc:
        w.emit("error", text=str(exc), kind="mesh")
        return 1
    return 0


# =========================================================================== parent


@dataclass
class Options:
    """What ``mesh bench`` measures (see ``mesh bench --help``)."""

    mode: str = "all"
    msgs: int | None = None  # None: DEFAULT_MSGS of each mode
    size: int = 128
    array: bool = False  # numpy float32 arrays instead of bytes
    pubs: int = 1
    subs: int = 1
    transport: str = "ipc"
    timeout: float = 20.0
    json: bool = False
    progress: bool | None = None  # None: only when stderr is a terminal

    def check(self) -> None:
        if self.mode not in (*MODES, "all"):
            raise ConfigError(f"--mode {self.mode!r}: choose pubsub, request or all")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"--transport {self.transport!r}: choose ipc or tcp")
        if self.msgs is not None and self.msgs < 1:
            raise ConfigError(f"--msgs must be at least 1, not {self.msgs}")
        if not 0 <= self.size <= MAX_SIZE:
            raise ConfigError(f"--size must be between 0 and {MAX_SIZE} bytes, not {self.size}")
        if self.array and self.size % 4:
            raise ConfigError(f"--size {self.size} with --array: give a multiple of 4 bytes "
                              "(float32 elements)")
        if self.pubs < 1 or self.subs < 1:
            raise ConfigError("--pub and --sub must be at least 1")
        if self.pubs + self.subs > MAX_PROCESSES:
            raise ConfigError(f"--pub + --sub must be at most {MAX_PROCESSES} processes, not "
                              f"{self.pubs + self.subs}")
        if self.msgs is not None and self.msgs < self.pubs:
            raise ConfigError(f"--msgs {self.msgs} is fewer than --pub {self.pubs}: each publisher "
                              "needs at least one message")
        if not self.timeout > 0:
            raise ConfigError(f"--timeout must be positive, not {self.timeout}")

    def msgs_for(self, mode: str) -> int:
        return self.msgs if self.msgs is not None else DEFAULT_MSGS[mode]


@dataclass
class _Proc:
    """One worker process, seen from the parent."""

    name: str
    role: str
    popen: subprocess.Popen
    ready: bool = False
    endpoint: str | None = None
    count: int = 0
    done: dict | None = None
    error: str | None = None
    stderr: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))

    def send(self, line: str) -> None:
        try:
            assert self.popen.stdin is not None
            self.popen.stdin.write(line + "\n")
            self.popen.stdin.flush()
        except (OSError, ValueError):
            pass  # already gone: the exit event says so

    def tail(self) -> str:
        lines = [ln for ln in self.stderr if ln.strip()]
        return ("; its last words: " + " | ".join(lines[-3:])) if lines else ""


class _Progress:
    """The live line on stderr: redrawn in place on a terminal, one line a second otherwise."""

    def __init__(self, enabled: bool | None, stream: TextIO) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.enabled = self.tty if enabled is None else enabled
        self.shown = False
        self.next = 0.0

    def show(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now < self.next and not force:
            return
        self.next = now + (REDRAW_TTY if self.tty else REDRAW_LINES)
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
            self.shown = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class _Round:
    """One measurement (pub/sub or request/reply) with its own fresh processes."""

    def __init__(self, mode: str, opts: Options, progress: _Progress) -> None:
        self.mode = mode
        self.opts = opts
        self.msgs = opts.msgs_for(mode)
        self.progress = progress
        self.events: queue.Queue = queue.Queue()
        self.procs: list[_Proc] = []
        self.cluster = f"bench-{os.getpid()}-{mode}"
        self.t_start = time.monotonic()
        request = mode == "request"
        self.target_role, self.source_role = ("rep", "req") if request else ("sub", "pub")
        self.label = "request/reply" if request else "pub/sub"

    # -- processes -------------------------------------------------------------

    def _start(self, role: str, index: int, count: int, first: bool) -> _Proc:
        o = self.opts
        cmd = [
            sys.executable, "-m", "mesh.benchcmd", "worker", "--role", role, "--index", str(index),
            "--cluster", self.cluster, "--transport", o.transport, "--size", str(o.size),
            "--count", str(count), "--targets", str(o.subs), "--timeout", str(o.timeout),
            *(["--array"] if o.array else []),
        ]
        if not first:
            cmd.append("--wait-seed")
        popen = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1,
            # Own session: the terminal's Ctrl-C goes to the parent only, which stops them.
            start_new_session=True,
        )
        proc = _Proc(f"{role}-{index + 1}", role, popen)
        self.procs.append(proc)
        threading.Thread(target=self._read_stdout, args=(proc,), daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(proc,), daemon=True).start()
        return proc

    def _read_stdout(self, proc: _Proc) -> None:
        assert proc.popen.stdout is not None
        try:
            for line in proc.popen.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    proc.stderr.append(line.rstrip())  # not ours: keep it for the error message
                    continue
                self.events.put((proc, event))
        except (OSError, ValueError):
            pass
        self.events.put((proc, {"ev": "exit"}))

    def _read_stderr(self, proc: _Proc) -> None:
        assert proc.popen.stderr is not None
        try:
            for line in proc.popen.stderr:
                proc.stderr.append(line.rstrip())
        except (OSError, ValueError):
            pass

    def _handle(self, proc: _Proc, event: dict) -> None:
        kind = event.get("ev")
        if kind == "ready":
            proc.ready = True
            proc.endpoint = event.get("endpoint")
        elif kind == "progress":
            proc.count = int(event["n"])
        elif kind == "done":
            proc.done = event
            for key in ("received", "replies", "sent", "answered"):  # as its progress counted
                if key in event:
                    proc.count = int(event[key])
                    break
        elif kind == "error":
            proc.error = str(event.get("text"))
            if event.get("kind") == "join":
                raise TimeoutError(
                    f"the {len(self.procs)} {self.label} processes did not find each other within "
                    f"{self.opts.timeout} s ({proc.name}: {proc.error}); raise --timeout on a busy "
                    "machine"
                )
            raise BenchFailed(f"{proc.name} failed: {proc.error}{proc.tail()}")
        elif kind == "exit":
            try:
                code = proc.popen.wait(2.0)
            except subprocess.TimeoutExpired:
                code = None
            if proc.error is None and not (proc.done and code == 0):
                # Out of the blue (killed, crashed): the round cannot finish.
                raise PeerLostError(
                    f"{proc.name} (pid {proc.popen.pid}) exited with code {code} before the end"
                    f"{proc.tail()}", peer=proc.name,
                )

    def _pump(self, until: float, done: Any, show: Any = None) -> bool:
        """Handle events until ``done()`` (True) or the monotonic time ``until`` (False)."""
        while not done():
            remaining = until - time.monotonic()
            if remaining <= 0:
                return False
            try:
                proc, event = self.events.get(timeout=min(0.05, remaining))
            except queue.Empty:
                pass
            else:
                self._handle(proc, event)
            if show is not None:
                show()
        return True

    def _stop_all(self) -> None:
        for proc in self.procs:
            proc.send("stop")

    def cleanup(self) -> None:
        """Every worker is gone (and reaped) when this returns: stop, terminate, kill.

        Publishers and requesters stop first, while the subscribers and responders
        still run: a request in flight gets its reply and a publisher waiting for
        credit gets it, instead of both waiting out their timeout."""
        sources = [p.popen for p in self.procs if p.role == self.source_role]
        targets = [p.popen for p in self.procs if p.role != self.source_role]
        steps = (("stop", sources, 1.0), ("stop", targets, STOP_GRACE),
                 ("terminate", sources + targets, 1.0), ("kill", sources + targets, 2.0))
        by_popen = {p.popen: p for p in self.procs}
        for action, group, grace in steps:
            alive = [popen for popen in group if popen.poll() is None]
            if not alive:
                continue
            for popen in alive:
                try:
                    if action == "stop":
                        by_popen[popen].send("stop")
                    else:
                        getattr(popen, action)()
                except OSError:
                    pass
            deadline = time.monotonic() + grace
            for popen in alive:
                try:
                    popen.wait(max(0.01, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for proc in self.procs:
            endpoint = proc.endpoint or ""
            if proc.popen.returncode and endpoint.startswith("ipc:///"):
                # It died without closing its node: its socket file is left (stale).
                with contextlib.suppress(OSError):
                    os.unlink(endpoint[len("ipc://"):])
            for stream in (proc.popen.stdin, proc.popen.stdout, proc.popen.stderr):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass

    # -- the round ---------------------------------------------------------------

    def _phase(self, text: str) -> None:
        self.progress.show(f"{self.label}: {text}", force=True)

    def run(self) -> dict:
        o = self.opts
        msgs = self.msgs
        per_source = [msgs // o.pubs + (1 if i < msgs % o.pubs else 0) for i in range(o.pubs)]
        join_deadline = self.t_start + o.timeout
        n = o.pubs + o.subs
        self._phase(f"starting {n} processes")
        # The first target process is the seed: it starts its node at once; the
        # others load Python and the mesh meanwhile, then get its endpoint.
        first = self._start(self.target_role, 0, msgs, first=True)
        targets = [first] + [self._start(self.target_role, i, msgs, False) for i in range(1, o.subs)]
        sources = [self._start(self.source_role, i, per_source[i], False) for i in range(o.pubs)]
        if not self._pump(join_deadline, lambda: first.ready):
            raise TimeoutError(
                f"the first {self.label} process did not start within {o.timeout} s"
                f"{first.tail()}; raise --timeout on a busy machine"
            )
        for proc in self.procs[1:]:
            proc.send(f"seed {first.endpoint}")
        self._phase(f"{n} processes joining the mesh over {o.transport}")
        if not self._pump(join_deadline, lambda: all(p.ready for p in self.procs)):
            late = [p.name for p in self.procs if not p.ready]
            raise TimeoutError(
                f"the {n} {self.label} processes did not find each other within {o.timeout} s "
                f"({', '.join(late)} not ready); raise --timeout on a busy machine"
            )
        for proc in sources:
            proc.send("go")
        t_go = time.monotonic()
        self._measure(targets, sources, t_go)
        self._stop_all()
        # Subscribers stopped early report what they had; everyone says goodbye.
        self._pump(time.monotonic() + STOP_GRACE, lambda: all(p.done for p in self.procs))
        missing = [p.name for p in self.procs if p.done is None]
        if missing:
            raise BenchFailed(f"{', '.join(missing)} did not report its counts")
        return self._result(targets, sources)

    def _measure(self, targets: list[_Proc], sources: list[_Proc], t_go: float) -> None:
        """Pump until every source sent everything and, for pub/sub, every subscriber
        received it; a round with no progress for --timeout seconds ends here."""
        o = self.opts
        total = self.msgs
        last_total, last_change = -1, time.monotonic()
        what, unit = ("received", "msgs/s") if self.mode == "pubsub" else ("replies", "req/s")

        def counted() -> int:
            if self.mode == "pubsub":
                return min(p.count for p in targets)  # the slowest subscriber
            return sum(p.count for p in sources)

        def show(force: bool = False) -> None:
            # The average since "go": steadier than a windowed rate on a busy machine.
            elapsed = time.monotonic() - t_go
            got = counted()
            self.progress.show(
                f"{self.label} over {o.transport}: {got:,}/{total:,} {what} "
                f"({100 * got // total}%)  {got / elapsed if elapsed > 0 else 0:,.0f} {unit}  "
                f"{elapsed:.1f} s", force=force,
            )

        def finished() -> bool:
            if not all(p.done for p in sources):
                return False
            if self.mode == "pubsub":
                return all(p.done for p in targets)
            return True

        while True:
            if self._pump(time.monotonic() + 0.5, finished, show):
                show(force=True)  # the last count, also when the round was short
                return
            now = time.monotonic()
            progress = sum(p.count for p in self.procs)
            if progress != last_total:
                last_total, last_change = progress, now
            elif now - last_change > o.timeout:
                if self.mode == "request" or not all(p.done for p in sources):
                    raise BenchFailed(
                        f"no {self.label} progress for {o.timeout} s "
                        f"({counted():,} of {total:,} done)"
                    )
                return  # every message was published, some never arrived: reported as lost

    # -- the numbers -------------------------------------------------------------

    def _result(self, targets: list[_Proc], sources: list[_Proc]) -> dict:
        o = self.opts
        t0 = min(p.done["t0"] for p in sources)
        t1 = max(p.done["t1"] for p in sources)
        sent = sum(p.done["sent"] for p in sources)
        base = {
            "mode": self.mode, "transport": o.transport, "size": o.size,
            "payload": "float32 array" if o.array else "bytes", "msgs": self.msgs,
            # Sent through shared memory instead of the transport (arrays from 1 MiB).
            "shm_messages": sum(p.done.get("shm_writes", 0) for p in sources),
            "processes": [{"name": p.name, "pid": p.popen.pid} for p in self.procs],
            # The hot path these processes ran (they share this environment).
            "build": _build.describe(),
        }

        def rate(count: int, seconds: float) -> dict:
            per_s = count / seconds if seconds > 0 else 0.0
            return {"msgs": count, "seconds": round(seconds, 6), "msgs_per_s": round(per_s, 1),
                    "mb_per_s": round(per_s * o.size / MB, 3)}

        if self.mode == "pubsub":
            received = [p.done["received"] for p in targets]
            t_last = max((p.done["t_last"] for p in targets if p.done["received"]), default=t0)
            lost = sum(max(0, sent - r) for r in received)
            return {
                **base, "publishers": o.pubs, "subscribers": o.subs,
                "published": sent, "received": sum(received), "expected": sent * o.subs,
                "lost": lost, "duplicates": sum(max(0, r - sent) for r in received),
                "gaps": sum(p.done.get("gaps", 0) for p in targets),
                "publish": rate(sent, t1 - t0),
                # End to end: from the first publish to the last receive, every subscriber.
                "receive": rate(sum(received), t_last - t0),
                "per_publisher": [rate(p.done["sent"], p.done["t1"] - p.done["t0"]) for p in sources],
                "per_subscriber": [rate(p.done["received"], p.done["t_last"] - t0) if p.done["received"]
                                   else rate(0, 0.0) for p in targets],
            }
        replies = sum(p.done["replies"] for p in sources)
        latencies = sorted(x for p in sources for x in p.done["lat_us"])
        return {
            **base, "requesters": o.pubs, "responders": o.subs,
            "requests": sent, "replies": replies, "lost": sent - replies,
            "answered": sum(p.done.get("answered", 0) for p in targets),
            # Bytes of one direction: every request's payload comes back as large.
            "throughput": rate(replies, t1 - t0),
            "per_requester": [rate(p.done["replies"], p.done["t1"] - p.done["t0"]) for p in sources],
            "latency_us": _quantiles(latencies),
        }


def _quantiles(sorted_us: list[float]) -> dict:
    if not sorted_us:
        return {}

    def q(p: float) -> float:
        # Nearest rank: a latency some request really had.
        return sorted_us[max(0, math.ceil(p / 100 * len(sorted_us)) - 1)]

    return {"p50": q(50), "p90": q(90), "p99": q(99), "min": sorted_us[0], "max": sorted_us[-1],
            "mean": round(sum(sorted_us) / len(sorted_us), 1), "n": len(sorted_us)}


# --------------------------------------------------------------------------- text


def _num(x: float) -> str:
    return f"{x:,.0f}"


def _spread(rates: list[dict], unit: str = "msgs/s") -> str:
    values = [r["msgs_per_s"] for r in rates]
    mean = sum(values) / len(values)
    stddev = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return (f"min {_num(min(values))} | avg {_num(mean)} | max {_num(max(values))} | "
            f"stddev {_num(stddev)} {unit}")


def format_result(r: dict) -> str:
    """The human-readable report of one round."""
    size = f"{r['size']:,} B" + (" float32 arrays" if r.get("payload") == "float32 array" else "")
    via = f"over {r['transport']}"
    if r.get("shm_messages"):
        via += f" (shared memory: {r['shm_messages']:,} {'requests' if r['mode'] == 'request' else 'msgs'})"
    if r["mode"] == "pubsub":
        lines = [
            f"pub/sub: {r['msgs']:,} msgs of {size}, {_plural(r['publishers'], 'publisher')} -> "
            f"{_plural(r['subscribers'], 'subscriber')}, separate processes {via}",
            f"  publish   {_num(r['publish']['msgs_per_s']):>12} msgs/s  "
            f"{r['publish']['mb_per_s']:10,.2f} MB/s  ({r['publish']['seconds']:.2f} s)",
            f"  receive   {_num(r['receive']['msgs_per_s']):>12} msgs/s  "
            f"{r['receive']['mb_per_s']:10,.2f} MB/s  (first publish to last receive, "
            f"all subscribers)",
        ]
        lines.append(f"  build     {r.get('build', 'unknown')}")
        if r["publishers"] > 1:
            lines += [f"    publisher {i}  {_num(x['msgs_per_s'])} msgs/s ({x['msgs']:,} msgs)"
                      for i, x in enumerate(r["per_publisher"], 1)]
            lines.append(f"    {_spread(r['per_publisher'])}")
        if r["subscribers"] > 1:
            lines += [f"    subscriber {i} {_num(x['msgs_per_s'])} msgs/s ({x['msgs']:,} msgs)"
                      for i, x in enumerate(r["per_subscriber"], 1)]
            lines.append(f"    {_spread(r['per_subscriber'])}")
        each = " by each subscriber" if r["subscribers"] > 1 else ""
        lines.append(
            f"  received  {r['received'] // r['subscribers']:,} of {r['published']:,} "
            f"published{each}: {r['lost']:,} lost"
        )
        return "\n".join(lines)
    lat = r["latency_us"]
    lines = [
        f"request/reply: {r['msgs']:,} requests of {size}, echoed, "
        f"{_plural(r['requesters'], 'requester')} -> {_plural(r['responders'], 'responder')}, "
        f"separate processes {via}",
        f"  throughput {_num(r['throughput']['msgs_per_s']):>11} req/s   "
        f"{r['throughput']['mb_per_s']:10,.2f} MB/s each way  ({r['throughput']['seconds']:.2f} s)",
    ]
    if lat:
        lines.append(
            f"  latency   p50 {lat['p50']:,.1f} µs  p90 {lat['p90']:,.1f} µs  "
            f"p99 {lat['p99']:,.1f} µs  (round trip; min {lat['min']:,.1f}, max {lat['max']:,.1f})"
        )
    if r["requesters"] > 1:
        lines += [f"    requester {i}  {_num(x['msgs_per_s'])} req/s ({x['msgs']:,} requests)"
                  for i, x in enumerate(r["per_requester"], 1)]
        lines.append(f"    {_spread(r['per_requester'], 'req/s')}")
    lines.append(f"  replies   {r['replies']:,} of {r['requests']:,} requests: {r['lost']:,} lost")
    lines.append(f"  build     {r.get('build', 'unknown')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry points


def run(opts: Options, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the rounds ``opts`` asks for and print them; 0 when nothing was lost.

    Raises a MeshError subclass (with what to do) when a round cannot measure;
    every process it started is gone when it returns or raises."""
    opts.check()
    out = out or sys.stdout
    progress = _Progress(opts.progress, err or sys.stderr)
    modes = list(MODES) if opts.mode == "all" else [opts.mode]
    results: list[dict] = []
    for i, mode in enumerate(modes):
        rnd = _Round(mode, opts, progress)
        try:
            result = rnd.run()
        except KeyboardInterrupt:
            progress.clear()
            print(f"\ninterrupted: stopping the {len(rnd.procs)} bench processes",
                  file=progress.stream, flush=True)
            raise
        finally:
            progress.clear()
            rnd.cleanup()
        results.append(result)
        if not opts.json:
            print(("\n" if i else "") + format_result(result), file=out, flush=True)
    if opts.json:
        doc = {
            "host": platform.node(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "loadavg": _loadavg(), "results": results,
        }
        print(json.dumps(doc, indent=2), file=out, flush=True)
    lossy = [r for r in results if r["lost"] or r.get("duplicates")]
    if lossy:
        what = ", ".join(f"{r['mode']}: {r['lost']:,} lost" for r in lossy)
        raise BenchFailed(f"messages were lost ({what}); every one should arrive "
                          "(publish waits for credit): please report it with the output above")
    return 0


def _loadavg() -> list[float] | None:
    """1, 5 and 15 minutes: the numbers depend on what else the machine runs."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``mesh bench`` (mesh/cli.py builds the subcommand with them)."""
    from mesh.argtypes import non_negative_int as _non_negative_int
    from mesh.argtypes import positive_float as _positive_float
    from mesh.argtypes import positive_int as _positive_int

    p.add_argument("--mode", choices=(*MODES, "all"), default="all",
                   help="what to measure (default: all, one after the other)")
    p.add_argument("--msgs", type=_positive_int, default=None, metavar="N",
                   help="messages (requests) in all, shared among the publishers (requesters); "
                   f"default: {DEFAULT_MSGS['pubsub']} for pub/sub, {DEFAULT_MSGS['request']} "
                   "requests"),
    p.add_argument("--size", type=_non_negative_int, default=128, metavar="BYTES",
                   help="payload size (default: 128)")
    p.add_argument("--array", action="store_true",
                   help="send numpy float32 arrays of --size bytes instead of bytes (no copy; "
                   "through shared memory from 1 MiB)")
    p.add_argument("--pub", dest="pubs", type=_positive_int, default=1, metavar="N",
                   help="publisher (requester) processes (default: 1)")
    p.add_argument("--sub", dest="subs", type=_positive_int, default=1, metavar="N",
                   help="subscriber (responder) processes (default: 1); every subscriber gets "
                   "every message, responders share the requests (a queue group)")
    p.add_argument("--transport", choices=TRANSPORTS, default="ipc",
                   help="how the processes talk (default: ipc)")
    p.add_argument("--timeout", type=_positive_float, default=20.0, metavar="S",
                   help="for the processes to start and find each other, and the longest a round "
                   "may go without progress (default: 20)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="the live progress line on stderr (default: only on a terminal)")


def options_from(args: argparse.Namespace) -> Options:
    return Options(mode=args.mode, msgs=args.msgs, size=args.size, pubs=args.pubs, subs=args.subs,
                   array=args.array, transport=args.transport, timeout=args.timeout, json=args.json,
                   progress=args.progress)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mesh.benchcmd worker ...``: a worker process (started by ``mesh bench``)."""
    parser = argparse.ArgumentParser(prog="python -m mesh.benchcmd",
                                     description="a worker of `mesh bench` (run `mesh bench`)")
    subs = parser.add_subparsers(dest="cmd", required=True)
    w = subs.add_parser("worker")
    w.add_argument("--role", choices=tuple(_ROLES), required=True)
    w.add_argument("--index", type=int, default=0)
    w.add_argument("--cluster", required=True)
    w.add_argument("--transport", choices=TRANSPORTS, required=True)
    w.add_argument("--size", type=int, required=True)
    w.add_argument("--array", action="store_true")
    w.add_argument("--count", type=int, required=True)
    w.add_argument("--targets", type=int, required=True)
    w.add_argument("--timeout", type=float, required=True)
    w.add_argument("--wait-seed", action="store_true")
    args = parser.parse_args(argv)
    return worker(args)


if __name__ == "__main__":
    sys.exit(main())

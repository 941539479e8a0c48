"""``mesh demo``: a small data-parallel training job on one machine, no configuration.

The parent starts worker PROCESSES (``python -m mesh.demo worker --role ...``):

- ``ps``, a parameter server: subscribes ``grad.>``, averages the gradients it
  receives per layer, applies them, and answers ``params.pull`` requests with
  the current parameters (a numpy array, version in a header). It also hands
  out evaluation jobs on ``jobs.eval.<n>`` and collects ``results.eval``.
- ``trainer-<i>``: every step pulls the parameters (request/reply), computes a
  gradient per layer and publishes it on ``grad.<worker>.<layer>`` (numpy,
  zero-copy on the wire); all trainers form the queue group ``evaluators`` on
  ``jobs.>``, so every job is done by exactly one of them.

Workers find each other with zeroconf (mDNS on the loopback interface only:
no address is typed anywhere, and nothing leaves this machine); ``--seeds``
falls back to the server's endpoint as a static seed.

Workers report to the parent with one JSON line per event on stdout; the
parent prints a readable line per worker per second, then the status table of
every node (as ``mesh-status`` shows it), and stops everything by itself.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from mesh.errors import ConfigError, MeshError, NoRespondersError, TimeoutError

HARD_CAP = 60.0  # seconds: the demo never runs longer, whatever --duration says
MIN_DURATION = 4.0  # start, join, a few steps, status, stop
MAX_WORKERS = 16
JOIN_TIMEOUT = 15.0

# The "model": a few layers of float32 parameters, one flat vector on the server.
LAYERS = {"layer0": 64, "layer1": 256, "layer2": 32}
SLICES: dict[str, slice] = {}
_offset = 0
for _layer, _size in LAYERS.items():
    SLICES[_layer] = slice(_offset, _offset + _size)
    _offset += _size
N_PARAMS = _offset

STEP_INTERVAL = 0.1  # a trainer step: pull, compute, publish gradients
APPLY_INTERVAL = 0.1  # the server applies the averaged gradients
JOB_INTERVAL = 0.25  # the server hands out an evaluation job
LR = 0.01
QUEUE_GROUP = "evaluators"
# The demo runs on one machine: mDNS on loopback finds every worker, and
# restricting it there keeps the demo's multicast off the real network.
DEMO_INTERFACES = ["lo"]


# =========================================================================== workers


# Set when the worker must stop: the parent said so, or is gone.
_stop = threading.Event()


def _emit(event: str, **fields: Any) -> None:
    """One JSON line to the parent (stdout is a pipe: flush every line)."""
    try:
        sys.stdout.write(json.dumps({"ev": event, **fields}) + "\n")
        sys.stdout.flush()
    except OSError:
        # The parent is gone: nobody to report to, stop (the node still says goodbye).
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        _stop.set()


def _target() -> np.ndarray:
    # The same "true" parameters in every trainer: a fixed seed.
    return np.random.default_rng(42).standard_normal(N_PARAMS).astype(np.float32)


def _wait(check: Any, stop: threading.Event, timeout: float) -> bool:
    """Retry ``check`` (which raises mesh.TimeoutError) in short slices until it
    succeeds, ``stop`` is set or ``timeout`` passes: the worker stays stoppable."""
    deadline = time.monotonic() + timeout
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            check(0.2)
            return True
        except TimeoutError:
            continue
    return False


class ParameterServer:
    def __init__(self, node: Any, n_trainers: int) -> None:
        self.node = node
        self.n_trainers = n_trainers
        self.lock = threading.Lock()
        self.params = np.zeros(N_PARAMS, dtype=np.float32)
        self.acc = np.zeros(N_PARAMS, dtype=np.float32)
        self.acc_n = dict.fromkeys(LAYERS, 0)
        self.version = 0
        # Per-second counters (reset at each tick) and totals.
        self.grads = 0
        self.grad_bytes = 0
        self.grad_senders: set[str] = set()
        self.pulls = 0
        self.total_grads = 0
        self.total_pulls = 0
        self.jobs_sent = 0
        self.done: dict[int, list[str]] = collections.defaultdict(list)
        node.subscribe("grad.>", self.on_grad)
        node.subscribe("params.pull", self.on_pull)
        node.subscribe("results.eval", self.on_result)

    # Handlers run on the node's dispatch thread; the main loop takes the lock too.
    def on_grad(self, msg: Any) -> None:
        parts = msg.subject.split(".")
        if len(parts) != 3 or parts[2] not in SLICES:
            return
        grad = msg.array()
        with self.lock:
            self.acc[SLICES[parts[2]]] += grad
            self.acc_n[parts[2]] += 1
            self.grads += 1
            self.total_grads += 1
            self.grad_bytes += grad.nbytes
            self.grad_senders.add(parts[1])

    def on_pull(self, msg: Any) -> None:
        with self.lock:
            snapshot = self.params.copy()
            version = self.version
            self.pulls += 1
            self.total_pulls += 1
        msg.respond(snapshot, headers={"version": version})

    def on_result(self, msg: Any) -> None:
        result = json.loads(bytes(msg.data))
        with self.lock:
            self.done[int(result["job"])].append(str(result["by"]))

    def apply(self) -> None:
        with self.lock:
            changed = False
            for layer, sl in SLICES.items():
                if self.acc_n[layer]:
                    self.params[sl] -= LR * self.acc[sl] / self.acc_n[layer]
                    self.acc[sl] = 0.0
                    self.acc_n[layer] = 0
                    changed = True
            if changed:
                self.version += 1

    def by_worker(self) -> dict[str, int]:
        counts: collections.Counter[str] = collections.Counter()
        for workers in self.done.values():
            counts.update(workers)
        return dict(sorted(counts.items()))

    def run(self, stop: threading.Event) -> None:
        # Jobs start once every trainer is in the queue group, so none is lost.
        group_ready = False
        now = time.monotonic()
        next_apply = next_job = now
        next_tick = now + 1.0
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_apply:
                self.apply()
                next_apply = now + APPLY_INTERVAL
            if not group_ready:
                try:
                    self.node.wait_for_subscribers("jobs.eval.0", self.n_trainers, timeout=0.05)
                    group_ready = True
                except TimeoutError:
                    pass
            if group_ready and now >= next_job:
                self.jobs_sent += 1
                job = {"job": self.jobs_sent, "x": self.jobs_sent}
                self.node.publish(f"jobs.eval.{self.jobs_sent}", json.dumps(job))
                next_job = now + JOB_INTERVAL
            if now >= next_tick:
                with self.lock:
                    tick = {
                        "grads": self.grads,
                        "grad_bytes": self.grad_bytes,
                        "senders": len(self.grad_senders),
                        "version": self.version,
                        "pulls": self.pulls,
                        "jobs_sent": self.jobs_sent,
                        "jobs_done": len(self.done),
                        "by": self.by_worker(),
                    }
                    self.grads = self.grad_bytes = self.pulls = 0
                    self.grad_senders.clear()
                _emit("tick", **tick)
                next_tick += 1.0
            stop.wait(0.01)
        # Give the last jobs a moment to come back before counting.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline and len(self.done) < self.jobs_sent:
            time.sleep(0.02)

    def final(self) -> dict:
        with self.lock:
            dupes = sum(len(w) - 1 for w in self.done.values() if len(w) > 1)
            return {
                "grads": self.total_grads,
                "pulls": self.total_pulls,
                "version": self.version,
                "jobs_sent": self.jobs_sent,
                "jobs_done": len(self.done),
                "duplicates": dupes,
                "by": self.by_worker(),
            }


class Trainer:
    def __init__(self, node: Any, name: str) -> None:
        self.node = node
        self.name = name
        self.target = _target()
        self.rng = np.random.default_rng()
        self.lock = threading.Lock()
        self.steps = 0
        self.total_steps = 0
        self.rtts: list[float] = []
        self.failed_pulls = 0
        self.loss: float | None = None
        self.version = -1
        self.jobs = 0
        self.total_jobs = 0
        node.subscribe("jobs.>", self.on_job, queue=QUEUE_GROUP)

    def on_job(self, msg: Any) -> None:
        job = json.loads(bytes(msg.data))
        time.sleep(0.005)  # the "evaluation"
        result = {"job": job["job"], "by": self.name, "y": job["x"] ** 2}
        self.node.publish("results.eval", json.dumps(result))
        with self.lock:
            self.jobs += 1
            self.total_jobs += 1

    def step(self) -> None:
        start = time.perf_counter()
        try:
            reply = self.node.request("params.pull", b"", timeout=1.0)
        except (TimeoutError, NoRespondersError):
            self.failed_pulls += 1
            return
        self.rtts.append(time.perf_counter() - start)
        params = reply.array()
        self.version = int(reply.headers.get("version", -1))
        diff = params - self.target
        self.loss = float(np.mean(diff * diff))
        for layer, sl in SLICES.items():
            noise = self.rng.standard_normal(sl.stop - sl.start).astype(np.float32)
            grad = (2.0 * diff[sl] + 0.1 * noise).astype(np.float32)
            self.node.publish(f"grad.{self.name}.{layer}", grad)
        self.steps += 1
        self.total_steps += 1

    def run(self, stop: threading.Event) -> None:
        # Gradients published before the server's interest arrived would be lost.
        node = self.node
        _wait(lambda t: node.wait_for_subscribers("params.pull", 1, timeout=t), stop, JOIN_TIMEOUT)
        _wait(lambda t: node.wait_for_subscribers(f"grad.{self.name}.layer0", 1, timeout=t), stop, JOIN_TIMEOUT)
        next_step = time.monotonic()
        next_tick = next_step + 1.0
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_step:
                self.step()
                next_step = max(next_step + STEP_INTERVAL, time.monotonic())
            if now >= next_tick:
                rtt = float(np.median(self.rtts)) if self.rtts else None
                with self.lock:
                    jobs, self.jobs = self.jobs, 0
                _emit(
                    "tick", steps=self.steps, loss=self.loss, version=self.version,
                    rtt=rtt, jobs=jobs, failed=self.failed_pulls,
                )
                self.steps = 0
                self.rtts.clear()
                next_tick += 1.0
            stop.wait(max(0.0, min(next_step, next_tick) - time.monotonic()))
        # Stay in the queue group a moment: jobs already handed to us still finish.
        time.sleep(0.3)

    def final(self) -> dict:
        return {"steps": self.total_steps, "loss": self.loss, "jobs": self.total_jobs}


def _watch_stdin(stop: threading.Event) -> None:
    """The parent writes "stop", or its end of the pipe closes (it died): stop."""
    try:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
    except (OSError, ValueError):
        pass
    stop.set()


def worker(
    role: str, name: str, n_workers: int, cluster: str, seed: str | None, max_seconds: float,
    use_seeds: bool = False,
) -> int:
    """One worker process: join the mesh, play ``role`` until told to stop."""
    import mesh
    from mesh.endpoints import seedable_endpoints

    stop = _stop
    threading.Thread(target=_watch_stdin, args=(stop,), daemon=True).start()
    # The parent stops workers through stdin; signals only make them stop sooner.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    failsafe = threading.Timer(max_seconds, stop.set)  # never outlive the demo
    failsafe.daemon = True
    failsafe.start()

    # Zeroconf on loopback by default (see DEMO_INTERFACES); with --seeds the
    # first worker listens and the others join through it ("static").
    if seed:
        opts: dict[str, Any] = {"discovery": "static", "seeds": [seed]}
    elif role == "ps" and use_seeds:
        opts = {"discovery": "none"}
    else:
        opts = {"discovery": "zeroconf", "interfaces": DEMO_INTERFACES}
    with mesh.Node(name=name, cluster=cluster, **opts) as node:
        _emit("ready", endpoint=seedable_endpoints(node.status())[0], pid=os.getpid())
        if not _wait(lambda t: node.wait_for_peers(n_workers - 1, timeout=t), stop, JOIN_TIMEOUT):
            if not stop.is_set():
                _emit("error", text=f"saw {len(node.peers())} of {n_workers - 1} peers after {JOIN_TIMEOUT} s")
                return 2
            return 0
        peers = [[p["name"], p["transport"]] for p in node.status()["peers"] if p["state"] == "alive"]
        _emit("joined", peers=sorted(peers))
        impl: ParameterServer | Trainer
        impl = ParameterServer(node, n_workers - 1) if role == "ps" else Trainer(node, name)
        impl.run(stop)
        _emit("final", **impl.final())
    return 0


# =========================================================================== parent


class _Worker:
    def __init__(self, name: str, proc: subprocess.Popen, events: queue.Queue) -> None:
        self.name = name
        self.proc = proc
        self.endpoint: str | None = None
        self.joined = False
        self.final: dict | None = None
        self.error: str | None = None
        self.stderr: collections.deque[str] = collections.deque(maxlen=30)
        threading.Thread(target=self._read_stdout, args=(events,), daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self, events: queue.Queue) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"ev": "text", "text": line.rstrip()}
            events.put((self.name, event))
        events.put((self.name, {"ev": "exit"}))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip())

    def stop(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass  # already gone


class Demo:
    """Runs the workers and prints what flows. ``run()`` then ``cleanup()`` (always)."""

    def __init__(self, workers: int, duration: float, out: Any = None, seeds: bool = False) -> None:
        self.n = workers
        self.seeds = seeds
        self.duration = duration
        self.out = out or sys.stdout
        self.events: queue.Queue = queue.Queue()
        self.workers: dict[str, _Worker] = {}
        self.cluster = f"demo-{os.getpid()}"
        self.names = ["ps"] + [f"trainer-{i}" for i in range(1, workers)]
        self.width = max(len(n) for n in self.names)
        self.t0 = time.monotonic()
        self.failures: list[str] = []

    def say(self, text: str, name: str | None = None) -> None:
        elapsed = time.monotonic() - self.t0
        prefix = f"[{name:<{self.width}}] " if name else ""
        print(f"{elapsed:5.1f}s {prefix}{text}", file=self.out, flush=True)

    def start(self, name: str, role: str, seed: str | None) -> None:
        cmd = [
            sys.executable, "-m", "mesh.demo", "worker", "--role", role, "--name", name,
            "--workers", str(self.n), "--cluster", self.cluster,
            "--max-seconds", str(self.duration + 10),
        ]
        if seed:
            cmd += ["--seed", seed]
        elif self.seeds:
            cmd += ["--seeds"]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1,
            # Own session: the terminal's Ctrl-C goes to the parent, which stops them in order.
            start_new_session=True,
        )
        self.workers[name] = _Worker(name, proc, self.events)

    # -- what the workers say -------------------------------------------------

    def handle(self, name: str, event: dict) -> None:
        w = self.workers[name]
        kind = event.get("ev")
        if kind == "ready":
            w.endpoint = event["endpoint"]
            if name == "ps":
                how = "the trainers seed to it" if self.seeds else "found through mDNS on loopback"
                self.say(f"listening on {w.endpoint} (pid {event.get('pid')}); {how}", name)
        elif kind == "joined":
            w.joined = True
            peers = ", ".join(f"{p} ({t})" for p, t in event["peers"])
            self.say(f"joined the mesh, sees {len(event['peers'])} peers: {peers}", name)
        elif kind == "tick":
            self.say(self._tick_text(name, event), name)
        elif kind == "final":
            w.final = event
        elif kind == "error":
            w.error = event.get("text")
            self.say(f"ERROR {w.error}", name)
        elif kind == "text":
            self.say(event["text"], name)
        elif kind == "exit":
            try:
                code = w.proc.wait(2.0)  # its stdout closed: it is exiting
            except subprocess.TimeoutExpired:
                return  # cleanup() will end it
            if code != 0:
                self.failures.append(f"{name} exited with code {code}")
                self.say(f"exited with code {code}", name)
                for line in list(w.stderr)[-10:]:
                    self.say(f"  {line}", name)

    @staticmethod
    def _tick_text(name: str, e: dict) -> str:
        if name == "ps":
            by = " ".join(f"{k}:{v}" for k, v in e["by"].items())
            return (
                f"{e['grads']:4d} grads/s from {e['senders']} trainers "
                f"({e['grad_bytes'] / 1024:.0f} KiB/s) -> params v{e['version']}, "
                f"{e['pulls']} pulls served | jobs sent {e['jobs_sent']}, done {e['jobs_done']}"
                + (f" ({by})" if by else "")
            )
        loss = f"{e['loss']:.4f}" if e.get("loss") is not None else "-"
        rtt = f"{e['rtt'] * 1000:.2f} ms" if e.get("rtt") is not None else "-"
        failed = f", {e['failed']} pulls failed" if e.get("failed") else ""
        return (
            f"{e['steps']:3d} steps/s, loss {loss}, params v{e['version']}, "
            f"pull rtt {rtt}, jobs done {e['jobs']}{failed}"
        )

    def pump(self, until: float, stop_when: Any = None) -> None:
        """Handle events until the monotonic time ``until`` (or ``stop_when()``)."""
        while time.monotonic() < until and not (stop_when and stop_when()):
            try:
                name, event = self.events.get(timeout=min(0.1, max(0.0, until - time.monotonic())))
            except queue.Empty:
                continue
            self.handle(name, event)

    # -- the run ----------------------------------------------------------------

    def run(self) -> int:
        n_trainers = self.n - 1
        how = "static seeds" if self.seeds else "zeroconf discovery (mDNS on loopback), no seeds"
        print(
            f"mesh demo: 1 parameter server + {n_trainers} trainers as separate processes, "
            f"{self.duration:.0f} s, cluster {self.cluster!r}, {how}",
            file=self.out, flush=True,
        )
        end = self.t0 + self.duration
        ps = "ps"
        self.start(ps, "ps", None)
        if self.seeds:
            # The trainers need the server's endpoint before they can start.
            self.pump(min(end, time.monotonic() + JOIN_TIMEOUT), lambda: self.workers[ps].endpoint
                      is not None or self.workers[ps].proc.poll() is not None)
            if self.workers[ps].endpoint is None:
                self.failures.append("the parameter server did not start")
                self._stop()
                return self._verdict()
        # With zeroconf every worker starts at once: nobody needs anybody's address.
        for name in self.names[1:]:
            self.start(name, "trainer", self.workers[ps].endpoint if self.seeds else None)

        def all_joined() -> bool:
            return all(w.joined for w in self.workers.values())

        # Leave a moment at the end for the status table and the stop (~0.5 s).
        work_end = end - 1.2
        self.pump(min(work_end, time.monotonic() + JOIN_TIMEOUT), lambda: all_joined() or bool(self.failures))
        seed = self.workers[ps].endpoint
        if not all_joined():
            missing = [n for n, w in self.workers.items() if not w.joined]
            hint = "" if self.seeds else " (mDNS on loopback found nobody? try the --seeds fallback)"
            self.failures.append(f"not every worker joined the mesh: {', '.join(missing)} did not{hint}")
        else:
            self.say(f"all {self.n} workers joined: gradients, parameter pulls and jobs flow")
            self.say(f"(watch from another shell: mesh-status --interfaces lo --cluster {self.cluster} "
                     f"--watch, or mesh sub 'grad.>' --count 5 --seed {seed} --cluster {self.cluster})")
            self.pump(work_end, lambda: bool(self.failures))
        self.show_status()
        self._stop()
        return self._verdict()

    def show_status(self) -> None:
        from mesh import status_cli

        endpoints = [w.endpoint for w in self.workers.values() if w.endpoint]
        if not endpoints:
            return
        statuses = status_cli.collect(endpoints, timeout=1.5)
        print(
            f"\nmesh status ({len(statuses)} of {len(self.workers)} nodes answered; "
            f"the same as `mesh-status --interfaces lo --cluster {self.cluster}`):",
            file=self.out, flush=True,
        )
        if statuses:
            print(status_cli.format_table(statuses) + "\n", file=self.out, flush=True)

    def _stop(self) -> None:
        self.say("stopping the workers")
        for w in self.workers.values():
            w.stop()
        deadline = time.monotonic() + 3.0
        self.pump(deadline, lambda: all(w.proc.poll() is not None for w in self.workers.values())
                  and self.events.empty())

    def _verdict(self) -> int:
        ps = self.workers.get("ps")
        trainers = [w for n, w in self.workers.items() if n != "ps"]
        if ps is not None and ps.final:
            f = ps.final
            by = ", ".join(f"{k}: {v}" for k, v in f["by"].items())
            lost = f["jobs_sent"] - f["jobs_done"]
            print(
                f"parameter server: {f['grads']} gradients averaged into {f['version']} updates, "
                f"{f['pulls']} parameter pulls served\n"
                f"queue group {QUEUE_GROUP!r}: {f['jobs_sent']} jobs sent, {f['jobs_done']} done "
                f"({by}), {f['duplicates']} done twice, {lost} lost",
                file=self.out, flush=True,
            )
            if f["grads"] == 0 or f["pulls"] == 0:
                self.failures.append("no gradient or no parameter pull reached the server")
            if f["jobs_done"] == 0:
                self.failures.append("no job was done")
            if f["duplicates"]:
                self.failures.append(f"{f['duplicates']} jobs were done twice (queue group broken)")
        elif ps is not None and ps.endpoint is not None and not self.failures:
            self.failures.append("the parameter server did not report")
        for w in trainers:
            if w.final:
                loss = f"{w.final['loss']:.4f}" if w.final.get("loss") is not None else "-"
                print(f"{w.name}: {w.final['steps']} steps, final loss {loss}, {w.final['jobs']} jobs",
                      file=self.out, flush=True)
                if not w.final["steps"]:
                    self.failures.append(f"{w.name} did not train (no parameters pulled)")
            elif w.joined and not self.failures:
                self.failures.append(f"{w.name} did not report")
        if self.failures:
            print("demo FAILED: " + "; ".join(dict.fromkeys(self.failures)), file=sys.stderr, flush=True)
            return 1
        print(f"demo OK in {time.monotonic() - self.t0:.1f} s", file=self.out, flush=True)
        return 0

    def cleanup(self) -> None:
        """Every worker is gone when this returns: stop, then terminate, then kill."""
        procs = [w.proc for w in self.workers.values()]
        for w in self.workers.values():
            w.stop()
        for action, grace in (("wait", 2.0), ("terminate", 1.0), ("kill", 1.0)):
            alive = [p for p in procs if p.poll() is None]
            if not alive:
                break
            for p in alive:
                if action != "wait":
                    getattr(p, action)()
            deadline = time.monotonic() + grace
            for p in alive:
                try:
                    p.wait(max(0.01, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for p in procs:
            for stream in (p.stdin, p.stdout, p.stderr):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass


def run(workers: int = 4, duration: float = 20.0, seeds: bool = False) -> int:
    """Run the demo; 0 when every worker joined and messages flowed, 1 otherwise."""
    if not 2 <= workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be between 2 and {MAX_WORKERS} (1 server + trainers), not {workers}")
    if not duration > 0:
        raise ConfigError(f"--duration must be positive, not {duration}")
    duration = min(max(duration, MIN_DURATION), HARD_CAP)
    demo = Demo(workers, duration, seeds=seeds)
    try:
        return demo.run()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the workers", file=sys.stderr, flush=True)
        raise
    finally:
        demo.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh.demo", description=__doc__.split("\n\n")[0])
    subs = parser.add_subparsers(dest="cmd")
    w = subs.add_parser("worker", help="one worker process (started by the demo)")
    w.add_argument("--role", choices=("ps", "trainer"), required=True)
    w.add_argument("--name", required=True)
    w.add_argument("--workers", type=int, required=True)
    w.add_argument("--cluster", required=True)
    w.add_argument("--seed")
    w.add_argument("--seeds", action="store_true", help="static seeds instead of zeroconf")
    w.add_argument("--max-seconds", type=float, default=HARD_CAP + 10)
    r = subs.add_parser("run", help="the demo (default)")
    r.add_argument("--workers", type=int, default=4)
    r.add_argument("--duration", type=float, default=20.0)
    r.add_argument(
        "--seeds", action="store_true",
        help="fallback: the trainers join through the server's endpoint (static seeds) "
        "instead of finding each other with zeroconf",
    )
    args = parser.parse_args(argv)
    if args.cmd == "worker":
        return worker(
            args.role, args.name, args.workers, args.cluster, args.seed, args.max_seconds, args.seeds
        )
    try:
        return run(
            getattr(args, "workers", 4), getattr(args, "duration", 20.0), getattr(args, "seeds", False)
        )
    except KeyboardInterrupt:
        return 130
    except MeshError as exc:
        print(f"mesh demo: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

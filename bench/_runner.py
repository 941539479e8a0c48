"""Worker processes for the benchmarks, and the plumbing that keeps them tidy.

The parent keeps two long-lived workers ("left" and "right"), started with
multiprocessing's spawn method so each is a fresh interpreter. A benchmark runs
one task in each: the right one binds and reports its endpoint, the left one
connects to it. Keeping the workers across tasks means the mesh and the raw
pyzmq reference can be interleaved repetition by repetition (drift on a shared
machine hits both alike) without paying an interpreter start per repetition.

Cleanup: every parent wait has a timeout; a worker that misses one is killed
and replaced. Workers ignore Ctrl-C (the parent handles it and stops them),
turn SIGTERM into SystemExit so ``with`` blocks close their sockets, and get
SIGTERM from the kernel if the parent dies (Linux PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

_SPAWN = mp.get_context("spawn")


class BenchError(Exception):
    """A benchmark could not produce a result (timeout, crash, bad setup)."""


# ------------------------------------------------------------------ worker side


class Control:
    """The task's side of the pipe to the parent."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._stopped = False

    def send(self, kind: str, payload: Any = None) -> None:
        self._conn.send((kind, payload))

    def stop_requested(self) -> bool:
        """Non-blocking: has the parent said "stop"?"""
        if not self._stopped and self._conn.poll(0):
            self._stopped = self._conn.recv()[0] == "stop"
        return self._stopped

    def wait_for(self, kind: str, timeout: float) -> None:
        """Block until the parent says ``kind`` (e.g. "go": start the timed part
        together with other workers); BenchError on "stop" or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"no {kind!r} from the parent within {timeout:.0f} s")
            if self._conn.poll(min(remaining, 1.0)):
                got = self._conn.recv()[0]
                if got == kind:
                    return
                if got == "stop":
                    self._stopped = True
                    raise BenchError(f"stopped while waiting for {kind!r}")

    def wait_stop(self, timeout: float) -> None:
        """Block until the parent says "stop"; BenchError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self._stopped:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"no stop from the parent within {timeout:.0f} s")
            if self._conn.poll(min(remaining, 1.0)):
                self._stopped = self._conn.recv()[0] == "stop"


def _die_with_parent() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the pipe's EOF still ends the worker


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise SystemExit(143)


def _worker_main(conn: Connection, name: str, cpus: frozenset[int] | None = None) -> None:
    """Serve ("run", "module:function", kwargs) requests until ("exit",) or EOF."""
    if cpus:
        # First thing, before any thread exists: every thread started later (libzmq's,
        # the mesh's, Zenoh's runtime) inherits the mask, as under `taskset`.
        os.sched_setaffinity(0, cpus)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _die_with_parent()
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request[0] == "exit":
            return
        if request[0] != "run":
            continue  # a late "stop" (or "go") for a task that already ended
        _, target, kwargs = request
        try:
            module, func = target.split(":")
            task: Callable[..., Any] = getattr(importlib.import_module(module), func)
            result = task(Control(conn), **kwargs)
            conn.send(("done", result))
        except BaseException as exc:  # report everything, then decide whether to live
            try:
                conn.send(("error", f"{name}: {traceback.format_exc()}"))
            except OSError:
                return
            if not isinstance(exc, Exception):
                raise


# ------------------------------------------------------------------ parent side


class Worker:
    """A spawned worker process and the parent's end of its pipe."""

    def __init__(self, name: str, cpus: frozenset[int] | None = None) -> None:
        self.name = name
        self._conn, child = _SPAWN.Pipe()
        self.proc = _SPAWN.Process(
            target=_worker_main, args=(child, name, cpus), name=f"bench-{name}", daemon=True
        )
        self.proc.start()
        child.close()
        self.busy = False

    def run(self, target: str, **kwargs: Any) -> None:
        """Start ``module:function`` in the worker; collect what it says with expect()."""
        self._conn.send(("run", target, kwargs))
        self.busy = True

    def stop(self) -> None:
        self.tell("stop")

    def tell(self, kind: str) -> None:
        """Send the running task a word ("stop", "go"); see Control.wait_for."""
        with contextlib.suppress(OSError):
            self._conn.send((kind, None))

    def expect(self, kind: str, timeout: float) -> Any:
        """The payload of the next message, which must be ``kind``; BenchError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"worker {self.name}: no {kind!r} within {timeout:.0f} s")
            # Short slices so a dead worker is noticed at once, not at the deadline.
            if self._conn.poll(min(remaining, 0.5)):
                break
            if not self.proc.is_alive():
                raise BenchError(f"worker {self.name} died (exit code {self.proc.exitcode})")
        try:
            got, payload = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise BenchError(f"worker {self.name}: pipe closed ({exc})") from None
        if got in ("done", "error"):
            self.busy = False
        if got == "error":
            raise BenchError(payload)
        if got != kind:
            raise BenchError(f"worker {self.name}: expected {kind!r}, got {got!r}")
        return payload

    def close(self, grace: float = 5.0) -> None:
        """Ask the worker to exit; escalate to SIGTERM, then SIGKILL. Never hangs."""
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                if self.busy:
                    self._conn.send(("stop", None))
                self._conn.send(("exit",))
            self.proc.join(grace)
        if self.proc.is_alive():
            self.proc.terminate()  # SIGTERM: SystemExit in the worker, nodes close
            self.proc.join(grace)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2.0)
        self._conn.close()


class Pair:
    """The two workers, replaced as a pair whenever a task goes wrong. With
    ``cpus``, both are pinned to those CPUs for their whole life (as `taskset`)."""

    def __init__(self, cpus: frozenset[int] | None = None) -> None:
        self.left: Worker | None = None
        self.right: Worker | None = None
        self.cpus = cpus

    def ensure(self) -> tuple[Worker, Worker]:
        if self.left is None or not self.left.proc.is_alive():
            self.left = Worker("left", self.cpus)
        if self.right is None or not self.right.proc.is_alive():
            self.right = Worker("right", self.cpus)
        return self.left, self.right

    def reset(self) -> None:
        """Kill both workers (after an error their state is unknown)."""
        for worker in (self.left, self.right):
            if worker is not None:
                worker.close(grace=2.0)
        self.left = self.right = None

    def close(self) -> None:
        for worker in (self.left, self.right):
            if worker is not None:
                worker.close()
        self.left = self.right = None

    def run(
        self,
        server: str,
        client: str,
        *,
        server_kw: dict[str, Any],
        client_kw: dict[str, Any],
        timeout: float,
        primary: str = "client",
    ) -> tuple[Any, Any]:
        """Run ``server`` in the right worker and ``client`` (told the server's
        endpoint) in the left one. The ``primary`` side finishes on its own; the
        other is then told to stop. Returns (server result, client result)."""
        left, right = self.ensure()
        try:
            right.run(server, **server_kw)
            endpoint = right.expect("ready", 30.0)
            left.run(client, endpoint=endpoint, **client_kw)
            first, second = (left, right) if primary == "client" else (right, left)
            first_result = first.expect("done", timeout)
            second.stop()
            second_result = second.expect("done", 30.0)
        except BaseException:
            self.reset()
            raise
        if primary == "client":
            return second_result, first_result
        return first_result, second_result


class Crew:
    """``n`` workers for shapes beyond a pair (fan-in, fan-out), replaced all
    together whenever a task goes wrong."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.members: list[Worker] = []

    def ensure(self) -> list[Worker]:
        self.members = [w if w.proc.is_alive() else Worker(w.name) for w in self.members]
        while len(self.members) < self.n:
            self.members.append(Worker(f"crew{len(self.members)}"))
        return self.members

    def reset(self) -> None:
        for worker in self.members:
            worker.close(grace=2.0)
        self.members = []

    def close(self) -> None:
        for worker in self.members:
            worker.close()
        self.members = []


@contextlib.contextmanager
def crew(n: int) -> Iterator[Crew]:
    """``n`` workers, always cleaned up."""
    group = Crew(n)
    try:
        yield group
    finally:
        group.close()


@contextlib.contextmanager
def workers(cpus: frozenset[int] | None = None) -> Iterator[Pair]:
    """The worker pair, always cleaned up, SIGTERM to the parent included."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    pair = Pair(cpus)
    try:
        yield pair
    finally:
        pair.close()
        signal.signal(signal.SIGTERM, previous)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)

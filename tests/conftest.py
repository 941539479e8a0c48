"""Shared fixtures: mesh nodes in this process and in real separate processes.

- ``cluster``: a cluster name unique to the test (no cross-talk with anything else).
- ``make_node``: start a ``mesh.Node`` in the test process; closed at teardown.
- ``procs``: start nodes in separate processes (multiprocessing "spawn", worker
  ``meshproc.node_host``); at teardown, even after a failure, every process is asked
  to exit, then terminated, then killed, then joined, each with a bounded wait.
- ``ipc_files``: fails the test if a node it started (and did not SIGKILL) left its
  ``zmesh-*.sock`` file behind.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
import uuid
from typing import Any

import pytest
from hypothesis import settings

# No per-example deadline: it is a timing check, and on a loaded 2-core CI machine
# a pure test that takes 200 ms once failed the suite (speed goals live in bench/).
settings.register_profile("mesh", deadline=None)
settings.load_profile("mesh")

sys.path.insert(0, os.path.dirname(__file__))  # spawn children import meshproc from here

import meshproc  # noqa: E402

# A suite started in the background by a script (`make test &`) inherits SIGINT
# ignored, and so would every process it starts: a test that presses Ctrl-C on a
# child would wait for nothing. Children of this process get the default back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import mesh  # noqa: E402

_SPAWN = mp.get_context("spawn")
READY_TIMEOUT = 30.0
CALL_TIMEOUT = 20.0


def ipc_paths(endpoints) -> list[str]:
    return [ep[len("ipc://"):] for ep in endpoints if ep.startswith("ipc://")]


def tcp_endpoint(endpoints) -> str:
    """The node's tcp endpoint, reachable from this host (0.0.0.0 -> 127.0.0.1)."""
    for ep in endpoints:
        if ep.startswith("tcp://"):
            return ep.replace("0.0.0.0", "127.0.0.1")
    raise AssertionError(f"no tcp endpoint in {endpoints}")


class IpcFiles:
    """The ipc socket files of every node a test started."""

    def __init__(self) -> None:
        self.paths: set[str] = set()
        self.killed: set[str] = set()

    def add(self, endpoints) -> None:
        self.paths.update(p for p in ipc_paths(endpoints) if not p.startswith("@"))

    def forget(self, endpoints) -> None:
        """A SIGKILLed node cannot remove its socket file: clean up for it."""
        for p in ipc_paths(endpoints):
            self.killed.add(p)
            try:
                os.unlink(p)
            except OSError:
                pass

    def leftovers(self) -> list[str]:
        return sorted(p for p in self.paths - self.killed if os.path.exists(p))


@pytest.fixture
def ipc_files():
    files = IpcFiles()
    yield files
    left = files.leftovers()
    for p in left:  # do not leak into the next run either
        try:
            os.unlink(p)
        except OSError:
            pass
    assert not left, f"nodes left ipc socket files behind: {left}"


@pytest.fixture
def cluster() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_node(ipc_files, cluster):
    """Factory: make_node(name=None, **kwargs) -> started mesh.Node in this process."""
    nodes: list[mesh.Node] = []
    counter = itertools.count()

    def factory(name: str | None = None, **kwargs: Any) -> mesh.Node:
        kwargs.setdefault("cluster", cluster)
        kwargs.setdefault("discovery", "none")
        node = mesh.Node(name or f"local-{next(counter)}", **kwargs)
        nodes.append(node)
        node.start()
        ipc_files.add(node.endpoints)
        return node

    yield factory
    for node in reversed(nodes):
        node.close()


class RemoteError(Exception):
    """A command failed inside a worker process."""


class Proc:
    """Test-side handle of one worker process running one mesh node."""

    def __init__(self, harness: Procs, name: str, node_kwargs: dict) -> None:
        self.harness = harness
        self.name = name
        self.ctl = _SPAWN.Queue()
        self.out = _SPAWN.Queue()
        self.process = _SPAWN.Process(
            target=meshproc.node_host,
            args=(name, node_kwargs, self.ctl, self.out),
            name=f"meshproc-{name}",
            daemon=True,
        )
        self.info: dict = {}
        self.killed = False
        self._ids = itertools.count(1)
        self.process.start()

    # -- startup ---------------------------------------------------------
    def wait_ready(self, timeout: float = READY_TIMEOUT) -> Proc:
        tag, ok, value = self._get(timeout, what="start")
        assert tag == meshproc.READY, f"unexpected first message from {self.name}: {tag!r}"
        if not ok:
            raise RemoteError(f"{self.name} failed to start: {value}")
        self.info = value
        self.harness.ipc_files.add(value["endpoints"])
        return self

    @property
    def id(self) -> str:
        return self.info["id"]

    @property
    def endpoints(self) -> list[str]:
        return self.info["endpoints"]

    @property
    def tcp(self) -> str:
        return tcp_endpoint(self.endpoints)

    # -- commands --------------------------------------------------------
    def _get(self, timeout: float, what: str) -> tuple:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no answer to {what!r} within {timeout} s")
            try:
                return self.out.get(timeout=min(remaining, 0.25))
            except queue.Empty:
                if not self.process.is_alive():
                    # one last look: the answer may have been queued just before exiting
                    try:
                        return self.out.get(timeout=0.5)
                    except queue.Empty:
                        raise RemoteError(
                            f"{self.name} died (exit code {self.process.exitcode}) "
                            f"while waiting for {what!r}"
                        ) from None

    def call(self, op: str, *, call_timeout: float = CALL_TIMEOUT, **args: Any) -> Any:
        cmd_id = next(self._ids)
        self.ctl.put((cmd_id, op, args))
        while True:
            got_id, ok, value = self._get(call_timeout, what=op)
            if got_id == cmd_id:
                break  # else: a stale answer to a call that timed out earlier
        if not ok:
            raise RemoteError(f"{self.name}.{op}({args}) failed: {value}")
        return value

    def kill(self) -> None:
        """SIGKILL: the node gets no chance to say goodbye or remove its socket file."""
        self.killed = True
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(timeout=5.0)
        assert not self.process.is_alive(), f"{self.name} survived SIGKILL"
        self.harness.ipc_files.forget(self.endpoints)

    @contextlib.contextmanager
    def paused(self):
        """SIGSTOP for the duration of the block (a node frozen in place: nothing it
        receives is read), SIGCONT after, also when the block fails (unless the block
        killed it)."""
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield self
        finally:
            if not self.killed:
                os.kill(self.process.pid, signal.SIGCONT)

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.process.pid}>"


class Procs:
    """Starts worker processes; ``shutdown()`` reaps every one of them."""

    def __init__(self, ipc_files: IpcFiles, cluster: str) -> None:
        self.ipc_files = ipc_files
        self.cluster = cluster
        self.started: list[Proc] = []
        self.forced: list[str] = []

    def spawn(self, name: str, **node_kwargs: Any) -> Proc:
        node_kwargs.setdefault("cluster", self.cluster)
        node_kwargs.setdefault("discovery", "none")
        proc = Proc(self, name, node_kwargs)
        self.started.append(proc)
        return proc

    def start(self, name: str, **node_kwargs: Any) -> Proc:
        return self.spawn(name, **node_kwargs).wait_ready()

    def start_many(self, specs: dict[str, dict]) -> list[Proc]:
        """Spawn several at once (in parallel), then wait until all are ready."""
        spawned = [self.spawn(name, **kwargs) for name, kwargs in specs.items()]
        return [p.wait_ready() for p in spawned]

    def shutdown(self) -> None:
        # 1. polite: ask each node to close (goodbye, socket files removed) and exit
        for p in self.started:
            if p.process.is_alive():
                try:
                    p.ctl.put((0, "exit", {}))
                except Exception:
                    pass
        deadline = time.monotonic() + 10.0
        for p in self.started:
            p.process.join(timeout=max(0.0, deadline - time.monotonic()))
        # 2. terminate, 3. kill, 4. join: every wait bounded
        for p in self.started:
            if p.process.is_alive():
                self.forced.append(p.name)
                p.process.terminate()
                p.process.join(timeout=3.0)
            if p.process.is_alive():
                p.process.kill()
                p.process.join(timeout=3.0)
        for p in self.started:
            for q in (p.ctl, p.out):
                q.cancel_join_thread()
                q.close()
            if p.process.exitcode is None:
                self.forced.append(f"{p.name} (unkillable)")
            elif not p.killed and p.process.exitcode != 0:
                self.forced.append(f"{p.name} (exit code {p.process.exitcode})")
        for p in self.started:
            if p.info and (p.killed or p.process.exitcode != 0):
                self.ipc_files.forget(p.endpoints)  # it could not clean up: do it for it


@pytest.fixture
def procs(ipc_files, cluster, request):
    harness = Procs(ipc_files, cluster)
    yield harness
    harness.shutdown()
    failed = getattr(request.node, "rep_call", None)
    if harness.forced and not (failed is not None and failed.failed):
        pytest.fail(f"worker processes did not exit cleanly: {harness.forced}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep

"""The console scripts, run as real processes: `mesh` (pub/sub/req/reply/demo) and `mesh-status`.

Every process is killed in teardown and every wait is bounded.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
MESH = str(BIN / "mesh")
MESH_STATUS = str(BIN / "mesh-status")

ENDPOINT = re.compile(r"listening on (tcp://\S+)")


@pytest.fixture(scope="module", autouse=True)
def _scripts_installed() -> None:
    for script in (MESH, MESH_STATUS):
        if not os.access(script, os.X_OK):
            pytest.fail(f"{script} is missing: run `.venv/bin/pip install -e .`")


class Proc:
    """A running console script whose output is read line by line in the background."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        threading.Thread(target=self._read, args=(self.popen.stdout, self.out, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.popen.stderr, self.err, False), daemon=True).start()

    def _read(self, stream, sink: list[str], feed: bool) -> None:
        for line in stream:
            sink.append(line)
            if feed:
                self.lines.put(line)

    def expect(self, pattern: re.Pattern | str, timeout: float = 10.0) -> re.Match:
        """The first stdout line (from here on) matching ``pattern``."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.fail(f"no line matching {regex.pattern!r} within {timeout} s")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            match = regex.search(line)
            if match:
                return match

    def wait(self, timeout: float = 10.0) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"still running after {timeout} s")
        time.sleep(0.05)  # let the readers take the last lines
        return code

    def fail(self, why: str) -> None:
        pytest.fail(
            f"{' '.join(self.args)}: {why}\n--- stdout\n{''.join(self.out)}--- stderr\n{''.join(self.err)}"
        )

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def spawn() -> Iterator:
    procs: list[Proc] = []

    def start(*args: str) -> Proc:
        proc = Proc(list(args))
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()


def run(*args: str, timeout: float = 15.0) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def free_tcp_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


# ------------------------------------------------------------------------- pub/sub


def test_pub_reaches_a_seeded_sub_which_exits_after_count(spawn) -> None:
    sub = spawn(MESH, "sub", "cli.test.>", "--count", "2", "--name", "sub-a")
    endpoint = sub.expect(ENDPOINT).group(1)

    pub = run(MESH, "pub", "cli.test.x", "hello {{count}}", "--count", "2",
              "--seed", endpoint, "--name", "pub-a", "--timeout", "10")
    assert pub.returncode == 0, pub.stderr
    assert pub.stdout.count('Published 7 bytes to "cli.test.x"') == 2

    assert sub.wait() == 0, "".join(sub.err)
    out = "".join(sub.out)
    assert '[#1] Received on "cli.test.x" (seq 1 from pub-a) : hello 1' in out
    assert '[#2] Received on "cli.test.x" (seq 2 from pub-a) : hello 2' in out


def test_pub_without_subscribers_says_so_and_sends_nothing() -> None:
    result = run(MESH, "pub", "cli.lonely", "x", "--timeout", "0.3")
    assert result.returncode == 1
    assert "nothing sent" in result.stderr and "--seed" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------- request/reply


def test_reply_answers_req(spawn) -> None:
    reply = spawn(MESH, "reply", "cli.echo.*", "got {{data}} on {{subject}}", "--count", "1")
    endpoint = reply.expect(ENDPOINT).group(1)

    req = run(MESH, "req", "cli.echo.a", "ping", "--seed", endpoint, "--timeout", "5")
    assert req.returncode == 0, req.stderr
    assert "got ping on cli.echo.a" in req.stdout

    assert reply.wait() == 0, "".join(reply.err)
    assert "replied 'got ping on cli.echo.a'" in "".join(reply.out)


def test_req_without_responder_exits_1_with_a_clear_message(spawn) -> None:
    alone = run(MESH, "req", "cli.nobody", "x", "--timeout", "1")
    assert alone.returncode == 1
    assert 'no responders for "cli.nobody"' in alone.stderr
    assert "Traceback" not in alone.stderr

    # In a mesh that has nodes, but none answering this subject.
    sub = spawn(MESH, "sub", "cli.other")
    endpoint = sub.expect(ENDPOINT).group(1)
    seeded = run(MESH, "req", "cli.nobody", "x", "--seed", endpoint, "--timeout", "1")
    assert seeded.returncode == 1
    assert 'no responders for "cli.nobody"' in seeded.stderr
    assert "Traceback" not in seeded.stderr


def test_req_to_an_unreachable_seed_fails_clearly() -> None:
    result = run(MESH, "req", "cli.x", "y", "--seed", free_tcp_endpoint(), "--timeout", "0.5")
    assert result.returncode == 1
    assert "could not join the mesh" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------- errors, signals


def test_mesh_errors_have_no_traceback_unless_verbose() -> None:
    plain = run(MESH, "sub", "cli..bad")
    assert plain.returncode == 1
    assert "mesh sub: error:" in plain.stderr and "Traceback" not in plain.stderr
    verbose = run(MESH, "sub", "cli..bad", "-v")
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr


def test_ctrl_c_exits_130(spawn) -> None:
    sub = spawn(MESH, "sub", "cli.forever")
    sub.expect(ENDPOINT)
    sub.popen.send_signal(signal.SIGINT)
    assert sub.wait(5) == 130
    assert "Traceback" not in "".join(sub.err)


# ------------------------------------------------------------------------- mesh-status


def test_status_of_a_running_node(spawn) -> None:
    sub = spawn(MESH, "sub", "cli.status.>", "--name", "status-target")
    endpoint = sub.expect(ENDPOINT).group(1)

    result = run(MESH_STATUS, "--connect", endpoint, "--json")
    assert result.returncode == 0, result.stderr
    statuses = json.loads(result.stdout)
    assert [s["name"] for s in statuses] == ["status-target"]
    assert statuses[0]["subscriptions"][0]["pattern"] == "cli.status.>"

    table = run(MESH_STATUS, "--connect", endpoint)
    assert table.returncode == 0, table.stderr
    assert "NAME" in table.stdout and "status-target" in table.stdout


def test_status_of_a_dead_endpoint_exits_1() -> None:
    result = run(MESH_STATUS, "--connect", free_tcp_endpoint(), "--timeout", "0.5")
    assert result.returncode == 1
    assert "no node answered" in result.stderr


def test_status_without_connect_asks_for_it() -> None:
    # Without --connect it browses with mDNS: on loopback only (it must never leave this
    # machine), for a cluster nobody runs.
    result = run(MESH_STATUS, "--interfaces", "lo", "--cluster", f"none-{os.getpid()}",
                 "--browse", "0.5")
    assert result.returncode == 1
    assert "--connect" in result.stderr


# ------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    "args",
    [[MESH], *([MESH, cmd] for cmd in ("pub", "sub", "req", "reply", "demo", "bench")), [MESH_STATUS]],
    ids=["mesh", "pub", "sub", "req", "reply", "demo", "bench", "mesh-status"],
)
def test_help(args: list[str]) -> None:
    result = run(*args, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    if len(args) > 1 or args[0] == MESH_STATUS:
        assert "example" in result.stdout


# ------------------------------------------------------------------------- demo


def test_demo_runs_and_prints_status() -> None:
    start = time.monotonic()
    result = run(MESH, "demo", "--duration", "8", timeout=30)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "mesh status (4 of 4 nodes answered" in out
    assert "NAME" in out and "trainer-1" in out and "ps" in out
    assert "grads/s" in out and "demo OK" in out
    assert elapsed < 14

"""`mesh bench`, run as a real process that starts its own worker processes.

Small runs (a few thousand messages): the point is the counts, the shape of the
output, the errors and that no worker outlives the command, not the speed.
Every wait is bounded; a test that leaves workers behind kills them and fails.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

MESH = str(Path(sys.executable).parent / "mesh")
RUN_TIMEOUT = 60.0  # a 2,000-message round takes a few seconds, even on a busy machine


def _workers_of(bench_pid: int) -> list[int]:
    """Live worker processes of the `mesh bench` with this pid, found by their
    command line (it names the cluster bench-<pid>-<mode>): found even after
    the command exited and they were reparented."""
    marker = f"bench-{bench_pid}-".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # gone meanwhile
        if b"mesh.benchcmd" in cmdline and marker in cmdline and state != "Z":
            pids.append(int(entry))
    return pids


def _assert_no_workers_left(bench_pid: int, known: list[int] = ()) -> None:
    left = sorted(set(_workers_of(bench_pid)) | {p for p in known if _alive(p)})
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)  # do not leak them into the next test
        except OSError:
            pass
    assert not left, f"worker processes left behind: {left}"


def _ipc_files_of(pid: int) -> list[str]:
    """The zmesh ipc socket files a process has open (its node listens on them)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    paths = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes and "zmesh-" in fields[7]:
            paths.append(fields[7])
    return paths


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def bench(*args: str, timeout: float = RUN_TIMEOUT) -> tuple[subprocess.CompletedProcess, int]:
    proc = subprocess.Popen([MESH, "bench", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        _assert_no_workers_left(proc.pid)
        pytest.fail(f"mesh bench {' '.join(args)} still running after {timeout} s\n{out}\n{err}")
    _assert_no_workers_left(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def _json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _assert_rate(rate: dict, msgs: int, size: int) -> None:
    assert rate["msgs"] == msgs
    assert rate["seconds"] > 0
    assert rate["msgs_per_s"] == pytest.approx(msgs / rate["seconds"], rel=1e-3)
    assert rate["mb_per_s"] == pytest.approx(rate["msgs_per_s"] * size / 1e6, rel=1e-2)


# --------------------------------------------------------------------------- the numbers


def test_pubsub_every_published_message_is_received() -> None:
    result, _ = bench("--mode", "pubsub", "--msgs", "2000", "--size", "256", "--json")
    doc = _json(result)
    [r] = doc["results"]
    assert r["mode"] == "pubsub" and r["transport"] == "ipc"
    assert r["published"] == 2000
    assert r["received"] == r["expected"] == 2000
    assert r["lost"] == 0 and r["duplicates"] == 0
    _assert_rate(r["publish"], 2000, 256)
    _assert_rate(r["receive"], 2000, 256)
    # Two workers, real processes other than the command itself.
    pids = [p["pid"] for p in r["processes"]]
    assert len(set(pids)) == 2 and all(pid > 0 for pid in pids)
    assert not any(_alive(pid) for pid in pids)
    assert result.stderr == ""  # stderr is not a terminal: no progress line unless asked


def test_request_reply_over_tcp() -> None:
    result, _ = bench("--mode", "request", "--msgs", "1000", "--transport", "tcp", "--json")
    [r] = _json(result)["results"]
    assert r["mode"] == "request" and r["transport"] == "tcp"
    assert r["requests"] == r["replies"] == 1000 and r["lost"] == 0
    assert r["answered"] >= 1000  # the responders also answered the untimed warm-up
    _assert_rate(r["throughput"], 1000, 128)
    lat = r["latency_us"]
    assert lat["n"] == 1000
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert len(r["processes"]) == 2


def test_all_modes_print_numbers_and_a_progress_line_when_asked() -> None:
    # Several publishers and subscribers, numpy arrays (--array): the JSON tests above
    # run one of each, with bytes.
    result, _ = bench("--msgs", "2000", "--pub", "2", "--sub", "2", "--array", "--size", "4096",
                      "--progress")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "pub/sub: 2,000 msgs of 4,096 B float32 arrays, 2 publishers -> 2 subscribers" in out
    assert "received  2,000 of 2,000 published by each subscriber: 0 lost" in out
    assert "replies   2,000 of 2,000 requests: 0 lost" in out
    assert "2,000 requests of 4,096 B float32 arrays, echoed, 2 requesters -> 2 responders" in out
    for who in ("publisher", "subscriber", "requester"):  # one line each, 1,000 or 2,000 msgs
        assert len(re.findall(rf"^    {who} \d +[\d,]+ (?:msgs|req)/s \(", out, re.M)) == 2, out
    for label in ("publish", "receive", "throughput"):
        match = re.search(rf"^  {label} +([\d,]+) (?:msgs|req)/s +([\d,.]+) MB/s", out, re.M)
        assert match, f"no {label} line in:\n{out}"
        assert int(match[1].replace(",", "")) > 0 and float(match[2].replace(",", "")) > 0
    lat = re.search(r"latency +p50 ([\d,.]+) µs +p90 ([\d,.]+) µs +p99 ([\d,.]+) µs", out)
    assert lat, out
    p50, p90, p99 = (float(x.replace(",", "")) for x in lat.groups())
    assert 0 < p50 <= p90 <= p99
    # Not a terminal, but asked: plain lines, the last one of each round complete.
    assert "\r" not in result.stderr
    assert "pub/sub over ipc: 2,000/2,000 received (100%)" in result.stderr
    assert "request/reply over ipc: 2,000/2,000 replies (100%)" in result.stderr


def test_latency_quantiles_are_nearest_rank() -> None:
    from mesh.benchcmd import _quantiles

    q = _quantiles([float(x) for x in range(1, 201)])  # 1..200 µs
    assert (q["p50"], q["p90"], q["p99"], q["min"], q["max"], q["n"]) == (100, 180, 198, 1, 200, 200)
    assert q["mean"] == 100.5
    assert _quantiles([7.0])["p99"] == 7.0
    assert _quantiles([]) == {}


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--size", "-1"], 2, "--size: must be >= 0"),
        (["--mode", "fast"], 2, "--mode: invalid choice: 'fast'"),
        (["--msgs", "2", "--pub", "3"], 1, "--msgs 2 is fewer than --pub 3"),
        (["--array", "--size", "6"], 1, "--size 6 with --array: give a multiple of 4 bytes"),
        (["--pub", "20", "--sub", "20"], 1, "--pub + --sub must be at most 32 processes"),
    ],
)
def test_bad_arguments_are_refused_clearly(args: list[str], code: int, message: str) -> None:
    result, _ = bench(*args, timeout=20.0)
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_peers_not_found_within_the_timeout_fail_clearly() -> None:
    start = time.monotonic()
    result, _ = bench("--mode", "pubsub", "--msgs", "100", "--timeout", "0.05")
    assert result.returncode == 1
    assert re.search(r"mesh bench: error: the (first )?pub/sub process(es)? did not (start|find "
                     r"each other) within 0.05 s", result.stderr), result.stderr
    assert "raise --timeout" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - start < 20.0


# --------------------------------------------------------------------------- processes


class _LongRun:
    """A `mesh bench` that would run for minutes; its stderr read line by line."""

    def __init__(self, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [MESH, "bench", "--mode", "pubsub", "--msgs", "50000000", "--progress", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.err: list[str] = []
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)
            self.lines.put(line)

    def measuring(self, timeout: float = 30.0) -> list[int]:
        """Wait for the progress line of the measurement; the worker pids."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if "received (" in line:
                return _workers_of(self.proc.pid)
        self.kill()
        pytest.fail(f"mesh bench never started measuring: {''.join(self.err)}")

    def wait(self, workers: list[int], timeout: float = 20.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(workers)
            pytest.fail(f"mesh bench did not stop within {timeout} s: {''.join(self.err)}")
        time.sleep(0.1)  # the reader takes the last lines
        return code

    def kill(self, workers: list[int] = ()) -> None:
        self.proc.kill()
        self.proc.wait(10)
        _assert_no_workers_left(self.proc.pid, workers)


def test_ctrl_c_stops_every_worker_and_exits_130() -> None:
    run = _LongRun()
    workers = run.measuring()
    assert len(workers) == 2, workers
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(workers) == 130
    _assert_no_workers_left(run.proc.pid, workers)


def test_a_worker_that_dies_fails_the_run_and_the_others_are_stopped() -> None:
    run = _LongRun("--sub", "2")
    workers = run.measuring()
    assert len(workers) == 3, workers
    victim = workers[0]
    sockets = _ipc_files_of(victim)
    assert sockets and all(os.path.exists(path) for path in sockets), sockets
    os.kill(victim, signal.SIGKILL)
    assert run.wait(workers) == 1
    err = "".join(run.err)
    assert f"(pid {victim}) exited with code -9 before the end" in err, err
    assert "Traceback" not in err
    _assert_no_workers_left(run.proc.pid, workers)
    # The dead worker could not remove its ipc socket file: mesh bench did.
    assert not any(os.path.exists(path) for path in sockets), sockets


def test_workers_exit_by_themselves_when_mesh_bench_is_killed() -> None:
    # SIGKILL: the command cannot clean up; its workers see their stdin close.
    run = _LongRun("--transport", "tcp")
    workers = run.measuring()
    assert len(workers) == 2, workers
    run.proc.kill()
    run.wait(workers)
    deadline = time.monotonic() + 10.0  # they stop at once; a stuck one exits hard within 5 s
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    _assert_no_workers_left(run.proc.pid, workers)

"""Quiet logs (issue #18): a normal start, join, leave or restart logs nothing above INFO.

Frames from nodes that have not said hello yet are normal while nodes join (a
peer list can overtake a hello): mesh/unknown_peers.py counts them (status and
metrics), logs them at DEBUG, and says one WARNING per node only when they keep
coming past peer_timeout. Its core is tested here with an injected clock; the
whole is tested with 16 nodes in separate processes (``python -m tests.lanhost
--discovery static``, tests/lanhost.py) joining through the first, some leaving
and one restarting, with every process's stderr read for WARNING/ERROR lines.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid

import pytest

from mesh.unknown_peers import UnknownPeers
from tests.lanhost import LanHost

# --------------------------------------------------------------------------- the core


def test_early_frames_are_debug_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    u = UnknownPeers("n1", grace=3.0)
    with caplog.at_level(logging.DEBUG, logger="mesh.node"):
        for i in range(50):
            assert u.frame("a" * 32, 100.0 + i * 0.05) is False  # 2.5 s of frames: < grace
        u.hello("a" * 32)
        assert u.frame("b" * 32, 103.0) is False
    assert [r.levelno for r in caplog.records] == [logging.DEBUG] * 51
    assert u.stats(103.0) == {"frames": 51, "replaced": 0, "pending": 1, "warnings": 0}  # a said hello
    assert u.stats(106.5)["pending"] == 0  # nothing from either within the grace


def test_one_warning_per_node_when_it_persists(caplog: pytest.LogCaptureFixture) -> None:
    u = UnknownPeers("n1", grace=3.0)
    with caplog.at_level(logging.DEBUG, logger="mesh.node"):
        said = [u.frame("stranger", t * 0.5) for t in range(20)]  # 0 .. 9.5 s, never a hello
        assert said.count(True) == 1 and said.index(True) == 7  # first frame past 3.0 s
        u.hello("stranger")
        assert not any(u.frame("stranger", 20.0 + t) for t in range(10))  # once per node
        assert [u.frame("other", t) for t in (0.0, 2.0, 3.5)] == [False, False, True]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2 and "stranger" in warnings[0].getMessage()
    assert u.stats(30.0)["warnings"] == 2


def test_a_pause_starts_a_new_run_and_a_hello_ends_one() -> None:
    u = UnknownPeers("n1", grace=3.0)
    # Frames 2 s apart never persist: each pause < grace continues the run.
    assert u.frame("p", 0.0) is False and u.frame("p", 2.0) is False
    # A pause longer than the grace: a new run, not 5 s of persistence.
    assert u.frame("p", 5.5) is False and u.frame("p", 6.0) is False
    # A hello in between: the run restarts too.
    u.frame("q", 0.0)
    u.hello("q")
    assert u.frame("q", 3.5) is False


def test_frames_on_a_replaced_connection_never_warn(caplog: pytest.LogCaptureFixture) -> None:
    # ROUTER_HANDOVER: a node reconnected with its identity; the old connection's
    # leftovers come from a generated identity (a zero byte and a counter).
    u = UnknownPeers("n1", grace=1.0)
    with caplog.at_level(logging.DEBUG, logger="mesh.node"):
        assert not any(u.frame("\x00k\ufffd\ufffd", t * 0.1) for t in range(100))  # 10 s of them
    assert not [r for r in caplog.records if r.levelno > logging.DEBUG]
    assert u.stats(10.0) == {"frames": 100, "replaced": 100, "pending": 0, "warnings": 0}


def test_tracking_is_bounded() -> None:
    u = UnknownPeers("n1", grace=1.0, max_tracked=8)
    for i in range(100):
        u.frame(f"id{i}", 0.0)
    assert u.stats(0.0) == {"frames": 100, "replaced": 0, "pending": 8, "warnings": 0}
    u.frame("late", 5.0)  # the stale ones make room
    assert u.stats(5.0)["pending"] == 1


# --------------------------------------------------------------------------- a node


def test_a_node_counts_a_stranger_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    """Pings from an identity that never says hello, through a real socket: every one
    dropped and counted (status, metrics), DEBUG until peer_timeout, then one WARNING."""
    import zmq

    import mesh
    from mesh import wire
    from mesh.metrics import NodeCollector

    node = mesh.Node("quiet", cluster=f"quiet-{uuid.uuid4().hex[:8]}", discovery="none",
                     listen="tcp://127.0.0.1:0", peer_timeout=0.6, heartbeat_interval=0.1)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"feedfacefeedface")
    sock.setsockopt(zmq.LINGER, 0)
    caplog.set_level(logging.DEBUG, logger="mesh.node")
    try:
        node.start()
        sock.connect(node.status()["endpoints"]["tcp"][0])
        sent, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 1.5:  # 2.5x the grace
            sock.send(wire.pack(wire.PING, [time.monotonic()]))
            sent += 1
            time.sleep(0.03)
        deadline = time.monotonic() + 10
        while node.status()["unknown_peers"]["frames"] < sent and time.monotonic() < deadline:
            time.sleep(0.02)
        st = node.status()
        metrics = {m.name: m.samples[0].value for m in NodeCollector(node).collect()
                   if m.name in ("mesh_unknown_peers", "mesh_unknown_peer_warnings")}
    finally:
        sock.close()
        node.close()
    assert st["unknown_peers"]["frames"] == sent == st["counters"]["drops"]["unknown_peer"]
    assert st["unknown_peers"]["warnings"] == 1 and st["unknown_peers"]["pending"] == 1
    assert metrics == {"mesh_unknown_peers": 1, "mesh_unknown_peer_warnings": 1}
    mine = [r for r in caplog.records if "feedfacefeedface" in r.getMessage()]
    warned = [r for r in mine if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "keeps sending without having said hello" in warned[0].getMessage()
    assert len(mine) == sent and all(r.levelno == logging.DEBUG for r in mine if r not in warned)


# --------------------------------------------------------------------------- 16 processes

NODES = int(os.environ.get("ZMESH_QUIET_NODES", "16"))
NOISE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")


def _tcp(endpoints: dict[str, list[str]]) -> list[str]:
    """The seed's loopback tcp endpoint: all the nodes run on this machine."""
    return [e for e in endpoints.get("tcp", []) if e.startswith("tcp://127.")][:1]


def _saw(host: LanHost, name: str, state: str, after: float, timeout: float) -> bool:
    return host.wait_event(
        lambda e: e.get("ev") == "state" and e["name"] == name and e["state"] == state and e["t"] >= after,
        timeout) is not None


def test_sixteen_processes_join_leave_restart_quietly() -> None:
    cluster = f"quiet-{uuid.uuid4().hex[:8]}"
    hosts: list[LanHost] = []
    gone: list[LanHost] = []  # stopped ones: their stderr is checked too

    def start(name: str, seeds: list[str]) -> LanHost:
        h = LanHost(None, 0, name, cluster, seeds=seeds, discovery="static")
        hosts.append(h)
        return h

    def logs(which: list[LanHost]) -> str:
        return "\n".join(h.log(last=20) for h in which)

    t_start = time.monotonic()
    try:
        seed = start("q01", []).ready(timeout=30)
        seeds = _tcp(seed.info["endpoints"])
        assert seeds, seed.info
        # All the others at once, seeded with the first: the join storm of the issue.
        for i in range(2, NODES + 1):
            start(f"q{i:02d}", seeds)
        for h in hosts:
            h.ready(timeout=40)
        for h in hosts:
            names = h.call("wait_peers", n=NODES - 1, wait=40, timeout=45)
            assert len(names) == NODES - 1, (h.name, names)
        t_joined = time.monotonic()

        # Three leave (close: goodbye); everyone else sees each of them leave.
        leavers = hosts[-3:]
        t_leave = time.monotonic()
        for h in leavers:
            h.quit()
        for h in leavers:
            h.stop()
            hosts.remove(h)
            gone.append(h)
        for h in hosts:
            for left in leavers:
                assert _saw(h, left.name, "left", t_leave, 15), f"{h.name} did not see {left.name} leave\n{logs([h])}"

        # One restarts: closed, then a new process under the same name.
        old = next(h for h in hosts if h.name == "q05")
        old.stop()
        hosts.remove(old)
        gone.append(old)
        t_restart = time.monotonic()
        new = start("q05", seeds).ready(timeout=30)
        new.call("wait_peers", n=len(hosts) - 1, wait=30, timeout=35)
        for h in hosts:
            if h is not new:
                assert _saw(h, "q05", "alive", t_restart, 15), f"{h.name} did not see q05 again\n{logs([h])}"

        # The unknown-peer counter is in every status, and agrees with the drops.
        statuses = {h.name: h.call("status") for h in hosts}
        for name, st in statuses.items():
            u = st["unknown_peers"]
            assert set(u) == {"frames", "replaced", "pending", "warnings"}, (name, u)
            assert u["frames"] == st["counters"]["drops"].get("unknown_peer", 0), (name, u, st["counters"])
            assert u["warnings"] == 0, (name, u)
        early = sum(st["unknown_peers"]["frames"] for st in statuses.values())
        replaced = sum(st["unknown_peers"]["replaced"] for st in statuses.values())
        print(f"\n{NODES} nodes: joined in {t_joined - t_start:.1f} s; frames from nodes that had not "
              f"said hello yet, dropped and counted: {early} ({replaced} on replaced connections)")
    finally:
        for h in hosts:
            h.quit()
        for h in hosts:
            h.stop()
        gone.extend(hosts)

    # After every process exited: their whole stderr (start, join, leave, restart, close).
    noisy = {h.name: [line for line in h.stderr if NOISE.search(line)] for h in gone}
    noisy = {name: lines for name, lines in noisy.items() if lines}
    assert not noisy, "lines above INFO during a normal start/join/leave/restart:\n" + "\n".join(
        f"{name}: {line.rstrip()}" for name, lines in noisy.items() for line in lines[:50])
    assert all(h.proc.returncode == 0 for h in gone), {h.name: h.proc.returncode for h in gone}


def test_looking_for_rdma_devices_leaves_the_root_logger_alone() -> None:
    """Debian's pyverbs calls logging.basicConfig(level=INFO) on import: looking for
    verbs devices must not turn on the application's INFO lines."""
    import subprocess
    import sys

    probe = ("import importlib.util, logging\n"
             "import transports.rdma as r\n"
             "r.list_devices()\n"
             "root = logging.getLogger()\n"
             "print(importlib.util.find_spec('pyverbs') is not None, len(root.handlers), root.level)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    has_pyverbs, handlers, level = out.stdout.split()
    if has_pyverbs != "True":
        pytest.skip("pyverbs is not installed here (python3-pyverbs, `make pyverbs-link`)")
    assert (handlers, level) == ("0", str(logging.WARNING))

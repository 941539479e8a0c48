"""Nodes and RDMA: two nodes that pick it, fall back from it, and do without it.

Inside ``tests/harness/rdma_vm/run`` (``RDMA_VM=1``, soft-RoCE ``rxe0``/``rxe1``) two
processes (tests/rdma_node_peer.py) run a Node each, one per device, with control
on tcp and shared memory off:

- both with RDMA: they bootstrap a queue pair over the control link (on a setup
  thread, not the I/O thread), status shows bulk "rdma", arrays up to 64 MiB and
  an allreduce go through it, and large (RDMA) and small (socket) messages
  interleaved on one subject arrive in the order they were published;
- one without RDMA (transports=("tcp",)): arrays go over tcp, status says so;
- one whose queue pair cannot connect (it advertises an unreachable GID): the
  other logs one warning, both fall back to tcp, arrays arrive intact.

Outside the VM those are skipped with the reason; there, with no verbs device,
two nodes in separate processes must leave RDMA out without a sound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

sys.path.insert(0, HERE)
import rdma_peer  # noqa: E402

rdma_peer.prepare_test_process()  # before anything imports pyverbs

from transports.rdma import list_devices  # noqa: E402

_VM_SKIP = rdma_peer.vm_skip_reason(__file__)
needs_vm = pytest.mark.skipif(_VM_SKIP is not None, reason=_VM_SKIP or "")


def _run_pair(scenario: str, timeout: float) -> dict[str, dict]:
    """Run node a (rxe1) and node b (rxe0) of ``scenario``; their RESULT dicts.
    Both processes are killed on any failure, every wait is bounded."""
    py = sys.executable
    peer = os.path.join(HERE, "rdma_node_peer.py")
    a = subprocess.Popen([py, peer, "a", "--device", "rxe1", "--scenario", scenario], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    b = None
    try:
        line = a.stdout.readline()
        assert line.startswith("ENDPOINT "), f"node a did not start: {line!r}{a.stdout.read()}"
        b = subprocess.Popen([py, peer, "b", "--device", "rxe0", "--seed", line.split()[1],
                              "--scenario", scenario],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        results = {}
        for name, proc in (("b", b), ("a", a)):
            out, _ = proc.communicate(timeout=timeout)
            print(f"--- node {name} (exit {proc.returncode}):\n{out.strip()}")
            lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            assert lines, f"node {name} printed no result:\n{out}"
            results[name] = json.loads(lines[-1][len("RESULT "):])
        return results
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="module")
def rdma_pair() -> dict[str, dict]:
    return _run_pair("rdma", timeout=480)


@needs_vm
@pytest.mark.timeout(540)
def test_two_nodes_move_arrays_and_allreduce_over_rdma(rdma_pair):
    for name, res in rdma_pair.items():
        assert res["peer_before"]["bulk"] == "rdma", res
        assert res["ok"], f"node {name}: {res}"
    checks = rdma_pair["b"]["checks"]
    assert checks["f32_64mib"] and checks["64mib_over_rdma"] and checks["allreduce"]


@needs_vm
@pytest.mark.timeout(540)
def test_large_and_small_messages_on_one_subject_keep_their_order(rdma_pair):
    b = rdma_pair["b"]
    assert b["checks"]["order_kept"], f"received in the order {b['order_received']}"
    assert b["checks"]["order_intact"] and b["checks"]["order_seq"] and b["checks"]["no_gaps"]


# pyverbs holds the GIL in every call: a slow one stops all threads of the process,
# the I/O thread too. Connecting to a peer whose address was not resolved yet took
# ~1 s that way (measured), enough for membership to suspect a live peer.
MAX_STALL = 0.3


@needs_vm
@pytest.mark.timeout(540)
def test_queue_pairs_are_set_up_off_the_io_thread(rdma_pair):
    for name, res in rdma_pair.items():
        threads = res["setup_threads"]
        print(f"node {name}: setup on {threads}, longest stall {res['setup_stall_s']} s, "
              f"membership events {res['setup_membership_events']}")
        assert threads, f"node {name} recorded no queue-pair setup"
        assert all(t.startswith("mesh-rdma-") for _, t in threads), (name, threads)
        assert res["setup_stall_s"] < MAX_STALL, f"node {name} stalled during setup: {res}"


@needs_vm
@pytest.mark.timeout(360)
def test_a_peer_without_rdma_gets_arrays_over_tcp():
    results = _run_pair("no-rdma", timeout=300)
    for name, res in results.items():
        assert res["ok"], f"node {name}: {res}"
        assert res["peer_after"]["bulk"] == res["peer_after"]["transport"] == "tcp", res
        assert not res["setup_threads"], f"node {name} tried rdma: {res['setup_threads']}"


@needs_vm
@pytest.mark.timeout(420)
def test_a_queue_pair_that_cannot_connect_falls_back_to_tcp():
    results = _run_pair("bad-gid", timeout=360)
    for name, res in results.items():
        assert res["ok"], f"node {name}: {res}"
        assert res["peer_after"]["bulk"] == "tcp", res
    (warning,) = [w for w in results["a"]["warnings"] if "rdma" in w]
    assert "WARNING" in warning and "cannot set up rdma with rdma-b" in warning, warning
    assert "arrays stay on tcp" in warning, warning
    # found out on the setup thread, without freezing a (which took seconds in pyverbs)
    assert results["a"]["stall_after_setup_s"] < MAX_STALL, results["a"]


# --------------------------------------------------------------------------- anywhere


@pytest.mark.skipif(bool(list_devices()), reason="this host has verbs devices")
@pytest.mark.timeout(90)
def test_without_a_verbs_device_nodes_leave_rdma_out_quietly(procs, capfd):
    """No verbs device here: the rdma plugin is absent from what nodes use, nothing
    is logged about it, and arrays above the rdma threshold go on the socket."""
    from meshproc import as_array

    import transports

    assert "rdma" in transports.plugins()  # installed: absent only for want of a device
    capfd.readouterr()
    a = procs.start("a", shm=False)
    b = procs.start("b", shm=False, seeds=[a.tcp])
    b.call("wait_for_peers", n=1, timeout=15)
    sids = {w.name: w.call("subscribe", pattern="nv.>") for w in (a, b)}
    for w in (a, b):
        w.call("wait_for_subscribers", subject="nv.x", count=2, timeout=10)
    arrays = {"a": np.arange(1 << 18, dtype=np.float32), "b": np.linspace(0, 1, 100_000)}
    for w in (a, b):
        w.call("publish", subject=f"nv.{w.name}", data=arrays[w.name], timeout=10)
    for w, other in ((a, "b"), (b, "a")):
        got = [r for r in w.call("collected", sid=sids[w.name], n=2, timeout=20)
               if r["subject"] == f"nv.{other}"]
        assert len(got) == 1
        np.testing.assert_array_equal(as_array(got[0]), arrays[other])
    for w, other in ((a, "b"), (b, "a")):
        status = w.call("status")
        assert "rdma" not in status["transports"], status["transports"]
        (row,) = [p for p in status["peers"] if p["name"] == other]
        assert row["transport"] in ("ipc", "tcp") and row["bulk"] == row["transport"], row
        assert row["rdma"] is None
    for w in (a, b):
        w.call("close")
    out, err = capfd.readouterr()
    noise = [ln for ln in (out + err).splitlines()
             if "WARNING" in ln or "ERROR" in ln or "rdma" in ln.lower()]
    assert not noise, noise

"""The RDMA transport on real verbs devices, and its quiet absence elsewhere.

Inside the RDMA VM (``tests/harness/rdma_vm/run -- .venv/bin/python -m pytest
tests/test_rdma_vm.py``: ``RDMA_VM=1``, soft-RoCE ``rxe0`` and ``rxe1``) two
processes (tests/rdma_peer.py) bootstrap an RC queue pair over a zmq socket
and move arrays, a 64 MiB array and allreduce gradient chunks through it;
in-process tests check that a failing queue pair gives RdmaError with the
undelivered messages. Outside the VM those are skipped with the reason, and
``RdmaTransport().available()`` must be False without a sound.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from mesh.errors import TransportError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

sys.path.insert(0, HERE)
import rdma_peer  # noqa: E402

rdma_peer.prepare_test_process()  # before anything imports pyverbs

from transports.rdma import (  # noqa: E402
    RdmaError,
    RdmaTransport,
    ipv4_of_gid,
    list_devices,
    resolve_neighbour,
)

_VM_SKIP = rdma_peer.vm_skip_reason(__file__)
needs_vm = pytest.mark.skipif(_VM_SKIP is not None, reason=_VM_SKIP or "")


# --------------------------------------------------------------------------- anywhere


@pytest.mark.skipif(bool(list_devices()), reason="this host has verbs devices")
def test_unavailable_here_and_quiet(caplog, capfd):
    caplog.set_level(logging.DEBUG, logger="mesh.transports.rdma")
    t = RdmaTransport()
    assert [t.available() for _ in range(5)] == [False] * 5
    assert t.brochure() is None
    assert RdmaTransport(rdma_device="rxe1").available() is False
    out, err = capfd.readouterr()
    assert out == "" and err == "", "no RDMA must not print anything"
    assert not [r for r in caplog.records if r.levelno >= logging.INFO], "no RDMA must not log"
    assert len(caplog.records) <= 2, "probing is cached: no log spam"
    with pytest.raises(TransportError, match="not usable on this host"):
        t.connection()


def test_plugin_shape():
    t = RdmaTransport()
    assert (t.name, t.rank) == ("rdma", 20)
    assert t.bind_endpoints(["tcp://0.0.0.0:0", "ipc://auto"], "n1") == []
    assert t.pick_endpoint(["tcp://10.0.0.1:1"], None, None) is None  # never the control link


def test_bad_gid_index_env_disables_rdma_with_one_warning(monkeypatch, caplog):
    monkeypatch.setenv("RDMA_GID_INDEX", "one")
    t = RdmaTransport()
    if not list_devices():
        assert t.available() is False  # no device: the env is never even read
        return
    assert t.available() is False and t.available() is False
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_ipv4_of_a_roce_v2_gid():
    assert ipv4_of_gid("0000:0000:0000:0000:0000:ffff:0a63:0002") == "10.99.0.2"
    assert ipv4_of_gid("0000:0000:0000:0000:0000:ffff:c0a8:01fe") == "192.168.1.254"
    assert ipv4_of_gid("fe80:0000:0000:0000:5054:00ff:fe12:3456") is None  # IPv6: left to verbs
    assert ipv4_of_gid("0000:0000:0000:0000:0000:ffff:zzzz:0002") is None


def test_resolving_an_address_that_no_arp_entry_shows_is_undecided_and_bounded():
    # Loopback never has ARP entries: "cannot tell" (connect() then lets verbs find
    # out), within the timeout. (Reached and unreachable peers: in the VM tests.)
    t = time.monotonic()
    assert resolve_neighbour("127.0.0.2", None, 0.2) is None
    assert time.monotonic() - t < 2.0


# --------------------------------------------------------------------------- in the VM


def _run_pair(extra: list[str], timeout: float) -> tuple[dict, dict]:
    py = sys.executable
    peer = os.path.join(HERE, "rdma_peer.py")
    server = subprocess.Popen([py, peer, "server", "--device", "rxe1", *extra], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = None
    try:
        line = server.stdout.readline()
        assert line.startswith("ENDPOINT "), f"server did not start: {line!r}"
        client = subprocess.Popen(
            [py, peer, "client", "--device", "rxe0", "--bootstrap", line.split()[1], *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        outs = {}
        for name, proc in (("client", client), ("server", server)):
            out, _ = proc.communicate(timeout=timeout)
            outs[name] = out
        results = {}
        for name, out in outs.items():
            lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            assert lines, f"{name} printed no result:\n{out}"
            results[name] = json.loads(lines[-1][len("RESULT "):])
            print(f"{name}: {out.strip()}")
        return results["client"], results["server"]
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="module")
def pair():
    t = time.perf_counter()
    client, server = _run_pair([], timeout=420)
    print(f"peer pair ran in {time.perf_counter() - t:.1f}s")
    return client, server


@needs_vm
@pytest.mark.timeout(480)
def test_arrays_of_several_sizes_both_ways(pair):
    client, server = pair
    assert not client["failed"] and not server["failed"], (client["failed"], server["failed"])
    names = {"empty", "scalar", "bytes7", "f32x1000", "i64_transposed", "structured",
             "f16x200k", "ring_plus_one"}
    assert {p.split()[1] for p in server["passed"] if p.startswith("recv ")} >= names
    assert {p.split()[1] for p in client["passed"] if p.startswith("echo ")} >= names
    assert server["brochure"]["device"] == "rxe1" and client["brochure"]["device"] == "rxe0"
    assert client["brochure"]["gid"].startswith("0000:0000:0000:0000:0000:ffff:")


@needs_vm
@pytest.mark.timeout(480)
def test_64mib_array(pair):
    client, server = pair
    assert "recv 64MiB" in server["passed"], server["failed"]
    # 64 MiB through a 1 MiB ring: it streamed on returned credits
    assert client["stats"]["writes"] >= 64 and server["stats"]["acks_sent"] >= 64


@needs_vm
@pytest.mark.timeout(480)
def test_allreduce_gradient_chunks(pair):
    client, server = pair
    for side in (client, server):
        assert [p for p in side["passed"] if p.startswith("allreduce step")] == [
            f"allreduce step {i}" for i in range(3)], side["failed"]
        # the gradient buffer is reused: its chunks' registrations are cache hits
        assert side["cache"]["hits"] >= 4, side["cache"]


def _local_pair(**options):
    a = RdmaTransport(rdma_device="rxe0").connection(**options)
    b = RdmaTransport(rdma_device="rxe1").connection(**options)
    b.connect(a.local_info())
    a.connect(b.local_info())
    deadline = time.monotonic() + 30
    while b.state != "ready":
        assert time.monotonic() < deadline, "b never saw a's ready"
        a.progress()
        b.progress()
        time.sleep(0.01)
    return a, b


def _pump(conns, until, timeout=60.0):
    deadline = time.monotonic() + timeout
    got = {id(c): [] for c in conns}
    while not until(got):
        assert time.monotonic() < deadline, "timed out"
        for c in conns:
            got[id(c)].extend(c.progress().received)
        time.sleep(0.002)
    return got


@needs_vm
@pytest.mark.timeout(120)
def test_in_process_pair_and_peer_death_gives_rdma_error():
    a, b = _local_pair(ring_size=64 << 10)
    try:
        x = np.arange(100_000, dtype=np.float64)  # 800 kB through a 64 kB ring
        a.send(x, b"x")
        got = _pump([a, b], lambda g: len(g[id(b)]) == 1)[id(b)][0]
        assert got.meta == b"x" and np.array_equal(got.array, x)
        # every credit back (a dead peer that holds credits is the node's liveness
        # checks' business: with no write in flight nothing can fail here)
        _pump([a, b], lambda g: a.credits == a.peer_ring_size)
        b.close()  # the peer dies: the next write is never acknowledged
        a.send(np.ones(10), b"lost")
        with pytest.raises(RdmaError) as err:
            _pump([a], lambda g: False, timeout=90)
        assert [meta for _, _, meta in err.value.unsent] == [b"lost"]
        with pytest.raises(RdmaError):
            a.send(np.ones(1))
    finally:
        a.close()
        b.close()


@needs_vm
@pytest.mark.timeout(120)
def test_wrong_rkey_gives_rdma_error_not_a_crash():
    a = RdmaTransport(rdma_device="rxe0").connection()
    b = RdmaTransport(rdma_device="rxe1").connection()
    try:
        b.connect(a.local_info())
        info = b.local_info()
        a.connect(dict(info, ring_rkey=info["ring_rkey"] ^ 0x5A5A))
        a.send(np.ones(4), b"refused")
        with pytest.raises(RdmaError, match="failed") as err:
            _pump([a, b], lambda g: False, timeout=60)
        assert err.value.unsent and isinstance(err.value, TransportError)
    finally:
        a.close()
        b.close()


@needs_vm
@pytest.mark.timeout(120)
def test_unreachable_gid_fails_to_connect_cleanly():
    a = RdmaTransport(rdma_device="rxe0").connection()
    b = RdmaTransport(rdma_device="rxe1").connection()
    try:
        nowhere = dict(b.local_info(), gid="0000:0000:0000:0000:0000:ffff:0a63:0063")  # 10.99.0.99
        t = time.perf_counter()
        with pytest.raises(RdmaError, match="cannot connect"):
            a.connect(nowhere)
        print(f"connect to an unreachable GID failed after {time.perf_counter() - t:.1f}s")
        assert a.state == "failed"
    finally:
        a.close()
        b.close()

"""Zero-configuration LAN on a real network: hosts are network namespaces on one bridge.

tests/harness/netns_lab.sh builds the LAN (read its header); every node runs in
its own lab host as ``python -m tests.lanhost`` (tests/lanhost.py) with
``discovery="zeroconf", interfaces=["eth0"]``: no seeds, no address anywhere.
mDNS stays inside the lab's namespaces, except for the last test, which keeps it
on this namespace's loopback.

Needs root and ``ip netns`` (the module is skipped with its reason printed
otherwise), and ``nft`` for ``netns_lab.sh loss`` (that test is skipped without it).
ZMESH_REQUIRE_LAB=1 (set by .ci/run) turns those skips into failures, so CI
cannot skip them silently.
Every wait is bounded; the hosts' processes and the namespaces are removed by
fixture finalizers, also when a test fails. The fixtures' machinery is shared
with tests/test_lan_security.py in tests/lanlab.py.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.lanhost, as the hosts do

from tests.lanhost import LanHost  # noqa: E402
from tests.lanlab import (  # noqa: E402
    MESH_STATUS,
    Lan,
    cannot,
    lan_of,
    logs,
    namespace_lab,
    pubsub,
    require_lab,
)

HOSTS = 4  # h1-h3 run nodes; h4 runs none (the operator's machine)
DEAD_WITHIN = 3.0  # s from SIGKILL to "dead" at every other node (the bound)

require_lab(__file__)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def lab_prefix() -> Iterator[str]:
    with namespace_lab(HOSTS, tag="zl") as prefix:  # kills what still runs, deletes the netns
        yield prefix


@pytest.fixture
def lan(lab_prefix: str) -> Iterator[Lan]:
    with lan_of(lab_prefix) as net:
        yield net


def _peer_ev(name: str, event: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("ev") == "peer" and e["name"] == name and e["event"] == event


def _state_ev(name: str, state: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("ev") == "state" and e["name"] == name and e["state"] == state


def _wait_all_alive(hosts: list[LanHost], timeout: float) -> float | None:
    """Seconds until every node sees every other as alive; None if not within ``timeout``."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if all(h.state_of(o.name) == "alive" for h in hosts for o in hosts if o is not h):
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def _false_deaths(hosts: list[LanHost], since: float) -> list[str]:
    """Every dead/left state or event that a live node reported after ``since``."""
    out = []
    for h in hosts:
        for e in list(h.events):
            if e.get("t", 0) < since:
                continue
            bad_state = e.get("ev") == "state" and e["state"] in ("dead", "left")
            bad_event = e.get("ev") == "peer" and e["event"] in ("dead", "left")
            if bad_state or bad_event:
                out.append(f"{h.name} saw {e['name']} {e.get('state') or e.get('event')}")
    return out


# --------------------------------------------------------------------------- tests


def test_three_hosts_find_each_other_and_pubsub_over_tcp(lan: Lan) -> None:
    hosts = lan.start(1, 2, 3)
    took = lan.full_mesh(hosts)
    print(f"\nfull mesh of 3 hosts {took:.2f} s after every node was up")
    for h in hosts:
        status = h.call("status")
        own_tcp = status["endpoints"]["tcp"]
        assert f"10.77.0.{h.index}" in own_tcp[0], own_tcp  # a real address of eth0 first
        assert not any("0.0.0.0" in ep for ep in own_tcp), own_tcp
        peers = {p["name"]: p for p in status["peers"]}
        assert set(peers) == {o.name for o in hosts if o is not h}, status["peers"]
        for o in hosts:
            if o is not h:
                p = peers[o.name]
                assert p["state"] == "alive" and p["transport"] == "tcp", p
                assert p["endpoint"].startswith(f"tcp://10.77.0.{o.index}:"), p
    h1, h2, h3 = hosts
    pubsub(h1, [h2, h3], "lan.grad.layer1")
    pubsub(h3, [h1], "lan.params.v1")


def test_mesh_status_from_a_host_without_a_node(lan: Lan) -> None:
    nobody = lan.status_cli(4, "--json", "--interfaces", "eth0", "--browse", "0.8")
    assert nobody.returncode == 1, nobody.stdout + nobody.stderr
    assert json.loads(nobody.stdout) == [] and "no mesh node" in nobody.stderr, nobody.stderr

    hosts = lan.start(1, 2, 3)
    lan.full_mesh(hosts)
    t0 = time.monotonic()
    found = lan.status_cli(4, "--json", "--interfaces", "eth0")
    took = time.monotonic() - t0
    assert found.returncode == 0, found.stdout + found.stderr
    statuses = {s["name"]: s for s in json.loads(found.stdout)}
    assert set(statuses) == {"h1", "h2", "h3"}, (statuses.keys(), found.stderr)
    for h in hosts:
        s = statuses[h.name]
        assert s["id"] == h.info["id"] and s["cluster"] == lan.cluster
        assert s["queried"].startswith(f"tcp://10.77.0.{h.index}:"), s["queried"]
        assert sorted((p["name"], p["transport"], p["state"]) for p in s["peers"]) == sorted(
            (o.name, "tcp", "alive") for o in hosts if o is not h
        )
    print(f"\nmesh-status on h4 (no node) listed 3 nodes in {took:.2f} s")

    table = lan.status_cli(4, "--interfaces", "eth0", "--cluster", lan.cluster)
    assert table.returncode == 0, table.stderr
    assert "NAME" in table.stdout and all(f"h{i}" in table.stdout for i in (1, 2, 3))
    other = lan.status_cli(4, "--json", "--interfaces", "eth0", "--cluster", "no-such-cluster")
    assert other.returncode == 1 and json.loads(other.stdout) == [], other.stderr


def test_sigkilled_node_is_declared_dead_within_3s(lan: Lan) -> None:
    hosts = lan.start(1, 2, 3)
    lan.full_mesh(hosts)
    h1, h2, h3 = hosts
    t_kill = h2.signal(signal.SIGKILL)
    times: dict[str, float] = {}
    for h in (h1, h3):
        dead = h.wait_event(_state_ev("h2", "dead"), DEAD_WITHIN + 3.0)
        assert dead is not None, f"{h.name} never declared h2 dead\n{logs(h)}"
        times[h.name] = dead["t"] - t_kill
        # and the application heard it through node.on_peer
        cb = h.wait_event(_peer_ev("h2", "dead"), 2.0)
        assert cb is not None, f"{h.name}: no on_peer('dead') for h2\n{logs(h)}"
        times[f"{h.name} on_peer"] = cb["t"] - t_kill
    timeline = {h.name: [(e["state"], round(e["t"] - t_kill, 3)) for e in h.states("h2")]
                for h in (h1, h3)}
    print(f"\nSIGKILL -> dead (s): { {k: round(v, 3) for k, v in times.items()} }; timeline {timeline}")
    assert all(v < DEAD_WITHIN for v in times.values()), (times, timeline)
    # the survivors still see each other
    assert h1.state_of("h3") == "alive" and h3.state_of("h1") == "alive"


def test_stalled_but_live_node_is_not_declared_dead(lan: Lan) -> None:
    hosts = lan.start(1, 2, 3)
    lan.full_mesh(hosts)
    h2 = hosts[1]
    t_stop = h2.signal(signal.SIGSTOP)
    time.sleep(0.5)
    h2.signal(signal.SIGCONT)
    time.sleep(3.5)  # longer than SIGKILL detection takes: a death would show by now
    deaths = _false_deaths(hosts, t_stop)
    timeline = {h.name: [(e["name"], e["state"], round(e["t"] - t_stop, 3)) for e in h.events
                         if e.get("ev") == "state" and e["t"] >= t_stop] for h in hosts}
    print(f"\nafter SIGSTOP 500 ms / SIGCONT, state changes: {timeline}")
    assert not deaths, f"{deaths}\n{timeline}\n{logs(*hosts)}"
    assert _wait_all_alive(hosts, 3.0) is not None, timeline


def test_20_percent_loss_keeps_membership(lan: Lan) -> None:
    if shutil.which("nft") is None:
        cannot("no `nft` command for netns_lab.sh loss (apt-get install nftables)", who="tests/test_lan.py")
    hosts = lan.start(1, 2, 3)
    lan.full_mesh(hosts)
    t0 = time.monotonic()
    lan.lab("loss", "2", "20")
    # Traffic meanwhile, so that links carry data as well as membership messages.
    h1, h2, h3 = hosts
    sid = "lossy"
    h2.call("subscribe", pattern="lan.lossy.>", sid=sid)
    h1.call("wait_subscribers", subject="lan.lossy.x", count=1, timeout=5)
    sent = 0
    while time.monotonic() - t0 < 10.0:
        h1.call("publish", subject="lan.lossy.x", data=str(sent))
        sent += 1
        time.sleep(0.1)
    deaths = _false_deaths(hosts, t0)
    suspects = [(h.name, e["name"]) for h in hosts for e in h.events
                if e.get("ev") == "state" and e["state"] == "suspect" and e["t"] >= t0]
    got = len([e for e in h2.events if e.get("ev") == "msg" and e["sid"] == sid])
    print(f"\n20% loss on h2 for 10 s: {sent} published to h2, {got} received; "
          f"suspicions {suspects}; false deaths {deaths}")
    assert not deaths, f"{deaths}\n{logs(*hosts)}"
    assert _wait_all_alive(hosts, 3.0) is not None, [h.states(o.name) for h in hosts for o in hosts]
    assert got > 0.5 * sent  # tcp retransmits; at-most-once may lose a few on a dead link only


def test_partition_then_heal_without_restart(lan: Lan) -> None:
    hosts = lan.start(1, 2, 3)
    lan.full_mesh(hosts)
    h1, h2, h3 = hosts
    t_cut = time.monotonic()
    lan.lab("cut", "3")
    cut_seen: dict[str, float] = {}
    for h, gone in ((h1, "h3"), (h2, "h3"), (h3, "h1"), (h3, "h2")):
        ev = h.wait_event(lambda e, g=gone: e.get("ev") == "state" and e["name"] == g
                          and e["state"] == "dead" and e["t"] >= t_cut, 8.0)
        assert ev is not None, f"{h.name} never declared {gone} dead after the cut\n{logs(h)}"
        cut_seen[f"{h.name}->{gone}"] = round(ev["t"] - t_cut, 3)

    t_heal = time.monotonic()
    lan.lab("heal", "3")
    healed = _wait_all_alive(hosts, 15.0)
    timeline = {h.name: [(e["name"], e["state"], round(e["t"] - t_cut, 3)) for e in h.events
                         if e.get("ev") == "state" and e["t"] >= t_cut] for h in hosts}
    print(f"\ncut h3: declared dead after {cut_seen} s; heal: all alive again after "
          f"{healed and round(healed, 3)} s; timeline {timeline}")
    assert healed is not None, f"the mesh did not heal within 15 s: {timeline}\n{logs(*hosts)}"
    assert time.monotonic() - t_heal < 20.0
    # h1 and h2 stayed connected the whole time: neither may ever declare the other dead,
    # not even briefly when h3 comes back with its own (stale) verdicts.
    same_side = [d for d in _false_deaths([h1, h2], t_cut) if "h3" not in d]
    assert not same_side, (
        f"false deaths on the connected side: {same_side}; timeline {timeline}\n{logs(*hosts)}"
    )
    # pub/sub across the former partition, both ways, with the same processes
    pubsub(h1, [h3], "lan.after.heal", timeout=8.0)
    pubsub(h3, [h1, h2], "lan.back.across", timeout=8.0)


def test_mesh_status_finds_loopback_nodes_in_this_namespace() -> None:
    """The root namespace: nodes and mesh-status restricted to lo, so mDNS never leaves."""
    cluster = f"lo-{uuid.uuid4().hex[:8]}"
    nodes = [LanHost(None, 0, f"lo-{i}", cluster, interfaces="lo") for i in (1, 2)]
    watch: subprocess.Popen | None = None
    try:
        for n in nodes:
            n.ready()
            n.call("wait_peers", n=1, timeout=10)
        r = subprocess.run([MESH_STATUS, "--interfaces", "lo", "--cluster", cluster, "--json"],
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stderr
        statuses = json.loads(r.stdout)
        assert [s["name"] for s in statuses] == ["lo-1", "lo-2"], r.stderr
        assert all(s["queried"].startswith("tcp://127.0.0.1:") for s in statuses)

        # --watch refreshes until interrupted (no tty here: one table per refresh)
        watch = subprocess.Popen(
            [MESH_STATUS, "--interfaces", "lo", "--cluster", cluster, "--watch", "0.3",
             "--browse", "0.5"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(watch.stdout or []), daemon=True)
        reader.start()
        deadline = time.monotonic() + 10
        # the third header means that two whole refreshes are out
        while time.monotonic() < deadline and sum(x.startswith("mesh-status ") for x in lines) < 3:
            time.sleep(0.1)
        watch.send_signal(signal.SIGINT)
        assert watch.wait(5) == 0
        reader.join(2)
        refreshes = "".join(lines).split("mesh-status ")[1:]
        assert len(refreshes) >= 3, lines
        for table in refreshes[:2]:
            rows = [line.split()[0] for line in table.splitlines()[3:] if line[:1].strip()]
            assert rows == ["lo-1", "lo-2"], table
    finally:
        if watch is not None and watch.poll() is None:
            watch.kill()
            watch.wait(5)
        for n in nodes:
            n.quit()
        for n in nodes:
            n.stop()

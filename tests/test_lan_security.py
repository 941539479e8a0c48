"""CurveZMQ and permissions across hosts (issue #7), in the network-namespace lab.

The single-host tests are tests/test_security.py and tests/test_policy.py; here every
node runs on its own lab host (a network namespace of tests/harness/netns_lab.sh on
one bridge) as ``python -m tests.lanhost`` with ``discovery="zeroconf",
interfaces=["eth0"]``, secured with ``--secret-file`` and restricted with ``--policy``:

- an intruder on another host (no secret, or another secret) sees the cluster's
  announcements but can neither join, read nor publish, and is refused and counted;
- a raw packet capture (AF_PACKET, tests/lansniff.py) on a cluster host finds no
  plaintext of what secured nodes exchange, while in the same capture an unsecured
  pair's payloads are in plain sight (the control that proves the capture works);
- mesh-status on a host without a node needs the credential to ask secured nodes;
- a policy is enforced at the publisher (PermissionDenied) and, for a misconfigured
  member without the policy, at the receivers (dropped and counted in status()["denied"]).

Same conditions as tests/test_lan.py (shared machinery: tests/lanlab.py): needs root
and ``ip netns``, else the module is skipped with its reason printed;
ZMESH_REQUIRE_LAB=1 (set by .ci/run) turns the skip into a failure. Every wait is
bounded; nodes, the sniffer and the namespaces are removed also when a test fails.
"""

from __future__ import annotations

import json
import secrets
import string
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.lanhost, as the hosts do

from mesh import security  # noqa: E402
from tests.lanhost import HostError, LanHost  # noqa: E402
from tests.lanlab import Lan, lan_of, logs, msgs, namespace_lab, require_lab  # noqa: E402
from tests.lansniff import Sniffer  # noqa: E402

HOSTS = 4  # h1, h2: the cluster; h3, h4: intruders, or the operator's host without a node
MIB = 1 << 20

pytestmark = pytest.mark.timeout(90)

require_lab(__file__)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def lab_prefix() -> Iterator[str]:
    with namespace_lab(HOSTS, tag="zs") as prefix:  # kills what still runs, deletes the netns
        yield prefix


@pytest.fixture
def lan(lab_prefix: str) -> Iterator[Lan]:
    with lan_of(lab_prefix) as net:
        yield net


def _key_file(path: Path, secret: str) -> Path:
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The cluster secret and another one, as key files (mode 600) the lab hosts can read."""
    d = tmp_path_factory.mktemp("keys")
    secret, other = security.generate_secret(), security.generate_secret()
    return {"secret": secret, "file": _key_file(d / "cluster.key", secret),
            "other_file": _key_file(d / "other.key", other)}


# --------------------------------------------------------------------------- helpers


def _ascii(n: int) -> str:
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(n))


def _tcp(host: LanHost) -> str:
    """The node's tcp endpoint on its lab address (eth0)."""
    eps = [ep for ep in host.info["endpoints"]["tcp"] if not ep.startswith("tcp://127.")]
    assert eps, host.info
    return eps[0]


def _port(host: LanHost) -> int:
    return int(_tcp(host).rsplit(":", 1)[1])


def _poll(what: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """``what()`` as soon as it is truthy, else its last (falsy) value after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got or time.monotonic() >= deadline:
            return got
        time.sleep(interval)


def _refused(host: LanHost) -> int:
    return sum(host.call("status")["security"]["refused"].values())


def _peer_names(host: LanHost) -> list[str]:
    return sorted(p["name"] for p in host.call("peers"))


def _denied(host: LanHost) -> dict[tuple[str, str], int]:
    return {(d["peer"], d["action"]): d["count"] for d in host.call("status")["denied"]}


def _wait_msgs(host: LanHost, sid: str, n: int, timeout: float) -> list[dict[str, Any]]:
    _poll(lambda: len(msgs(host, sid)) >= n, timeout, 0.02)
    return msgs(host, sid)


# --------------------------------------------------------------------------- tests


def test_intruder_sees_the_cluster_but_cannot_join_read_or_publish(lan: Lan, keys: dict) -> None:
    h1, h2 = lan.start(1, 2, secret_file=keys["file"])
    assert h1.info["secured"] and h2.info["secured"]
    lan.full_mesh([h1, h2])
    seeds = [_tcp(h1), _tcp(h2)]
    # Two intruders, named like members would be: one without a secret, one with another
    # secret. Besides discovery (which tells them the cluster is secured), they dial the
    # cluster's endpoints directly, as a node ignoring the announced key would.
    bare = lan.spawn(3, seeds=seeds)
    wrong = lan.spawn(4, secret_file=keys["other_file"], seeds=seeds)
    intruders = [bare.ready(), wrong.ready()]
    cluster_key = security.cluster_keys(keys["secret"], lan.cluster).public.decode()

    # They discover the cluster: their hosts' mDNS sees both nodes, announcing the cluster key...
    for intruder in intruders:
        seen = {a["name"]: a for a in intruder.call("browse", seconds=1.0)
                if a["cluster"] == lan.cluster}
        assert {"h1", "h2"} <= set(seen), (intruder.name, seen)
        assert seen["h1"]["key"] == seen["h2"]["key"] == cluster_key, seen
        assert seen["h1"]["id"] == h1.info["id"] and seen["h2"]["id"] == h2.info["id"]
        # ...and their own zeroconf discovery found them too, and declined to dial them.
        foreign = _poll(lambda i=intruder: i.call("status")["counters"]["drops"].get(
            "foreign_credential", 0), 5.0)
        assert foreign >= 1, (intruder.name, intruder.call("status")["counters"])

    # The cluster refuses their handshakes and counts them.
    assert _poll(lambda: _refused(h1) > 0 and _refused(h2) > 0, 10.0), (
        h1.call("status")["security"], h2.call("status")["security"], logs(h1, h2))

    # Reading and publishing: the intruders subscribe to everything and forge a message.
    spy = "spy"
    for intruder in intruders:
        intruder.call("subscribe", pattern=">", sid=spy)
    h1.call("subscribe", pattern="sec.>", sid="real")
    assert h2.call("wait_subscribers", subject="sec.x", count=1, timeout=5) == 1
    for intruder in intruders:
        intruder.call("publish", subject="sec.x", data=f"forged by {intruder.name}")
    real = f"real {uuid.uuid4().hex}"
    h2.call("publish", subject="sec.x", data=real)
    got = _wait_msgs(h1, "real", 1, 5.0)
    assert [m["data"] for m in got] == [real], got
    time.sleep(0.5)  # anything forged that got in would have arrived by now (nothing does)
    assert [m["data"] for m in msgs(h1, "real")] == [real]
    for intruder in intruders:
        # it hears only itself (local delivery), never the cluster
        assert [m["data"] for m in msgs(intruder, spy)] == [f"forged by {intruder.name}"]

    # Never joined, either way; the cluster saw no peer event of theirs.
    for intruder in intruders:
        assert _peer_names(intruder) == [], intruder.call("peers")
    assert _peer_names(h1) == ["h2"] and _peer_names(h2) == ["h1"]
    for member in (h1, h2):
        assert not [e for e in member.events if e.get("name") in ("h3", "h4")], member.events
    refused = {h.name: h.call("status")["security"]["refused"] for h in (h1, h2)}
    print(f"\nrefused by the cluster: {refused}; intruders' foreign_credential drops: "
          f"{[i.call('status')['counters']['drops'].get('foreign_credential') for i in intruders]}")


def test_secured_traffic_is_not_plaintext_on_the_wire(
    lab_prefix: str, keys: dict, tmp_path: Path
) -> None:
    """One capture on h1's eth0: a secured pair and, as the control, an unsecured pair (each
    of its own cluster) send h2 -> h1 the same kind of traffic at the same time."""
    with lan_of(lab_prefix) as sec, lan_of(lab_prefix) as plain:
        s1, s2 = sec.spawn(1, secret_file=keys["file"]), sec.spawn(2, secret_file=keys["file"])
        p1, p2 = plain.spawn(1), plain.spawn(2)
        for h in (s1, s2, p1, p2):
            h.ready()
        assert s1.info["secured"] and not p1.info["secured"]
        sec.full_mesh([s1, s2])
        plain.full_mesh([p1, p2])
        for sub, pub in ((s1, s2), (p1, p2)):
            sub.call("subscribe", pattern="wire.>", sid="wire")
            pub.call("wait_subscribers", subject="wire.x", count=1, timeout=5)

        sent: dict[str, dict[str, Any]] = {}
        with Sniffer(lab_prefix, 1, tmp_path / "capture.bin") as sniffer:
            for kind, pub in (("secured", s2), ("plain", p2)):
                payload, marker = _ascii(64), f"MARK-{_ascii(40)}"
                for _ in range(3):
                    pub.call("publish", subject="wire.x", data=payload)
                digest = pub.call("publish_array", subject="wire.x", nbytes=MIB, marker=marker)
                sent[kind] = {"payload": payload, "marker": marker, "sha256": digest}
            for kind, sub in (("secured", s1), ("plain", p1)):
                got = _wait_msgs(sub, "wire", 4, 10.0)
                assert len(got) == 4, (kind, [(m["nbytes"], m["data"]) for m in got], logs(sub))
                small = [m for m in got if m["nbytes"] == 64]
                big = [m for m in got if m["nbytes"] == MIB]
                assert [m["data"] for m in small] == [sent[kind]["payload"]] * 3, got
                assert [m["sha256"] for m in big] == [sent[kind]["sha256"]], got
            capture = sniffer.stop()

    summary = {k: v for k, v in capture.summary.items() if k != "flows"}
    secured_streams = capture.streams(_port(s1), _port(s2))
    plain_streams = capture.streams(_port(p1), _port(p2))
    print(f"\ncapture on h1: {summary}; secured pair's streams {len(secured_streams)} B, "
          f"unsecured pair's {len(plain_streams)} B")
    # The sniffer really captured the traffic: the 1 MiB arrays of both pairs went through.
    assert capture.summary["drops"] == 0, summary
    assert len(secured_streams) >= MIB and len(plain_streams) >= MIB, summary
    # Control: the unsecured pair's payloads are in plain sight, in its own streams...
    for what in ("payload", "marker"):
        at = plain_streams.find(sent["plain"][what].encode())
        assert at >= 0, f"the control's {what} is not in its captured streams: the capture is broken"
    assert b"wire.x" in plain_streams
    # ...while nothing the secured pair sent appears anywhere in the capture.
    for what in ("payload", "marker"):
        at = capture.data.find(sent["secured"][what].encode())
        assert at < 0, f"the secured pair's {what} is on the wire in plaintext (capture offset {at})"
    assert secured_streams.find(b"wire.x") < 0, "the subject is on the wire in plaintext"


def test_mesh_status_from_a_host_without_a_node_needs_the_credential(
    lan: Lan, keys: dict
) -> None:
    hosts = lan.start(1, 2, secret_file=keys["file"])
    lan.full_mesh(hosts)
    args = ("--interfaces", "eth0", "--cluster", lan.cluster)
    fingerprint = security.cluster_keys(keys["secret"], lan.cluster).fingerprint

    # No credential: the nodes are reported as secured, their status is not shown.
    nothing = lan.status_cli(4, "--json", *args)
    assert nothing.returncode == 1, nothing.stdout + nothing.stderr
    assert json.loads(nothing.stdout) == [], nothing.stdout
    for h in hosts:
        assert (f"{h.name} (cluster {lan.cluster!r}) is secured (CurveZMQ): pass --secret-file "
                "PATH or set ZMESH_SECRET to ask it") in nothing.stderr, nothing.stderr
    assert "no node answered" in nothing.stderr

    # Another credential: not asked either.
    wrong = lan.status_cli(4, "--json", "--secret-file", str(keys["other_file"]), *args)
    assert wrong.returncode == 1 and json.loads(wrong.stdout) == [], wrong.stderr
    assert wrong.stderr.count("is secured with another credential than ours; not asked") == 2

    # With the credential: the table shows both, "curve <fingerprint>" in SECURED.
    table = lan.status_cli(4, "--secret-file", str(keys["file"]), *args)
    assert table.returncode == 0, table.stdout + table.stderr
    assert "SECURED" in table.stdout.splitlines()[0], table.stdout
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[2:] if line[:1].strip()}
    assert set(rows) == {"h1", "h2"}, table.stdout
    assert all(f"curve {fingerprint}" in line for line in rows.values()), table.stdout

    # ZMESH_SECRET works as well; the JSON has the status of both.
    found = lan.status_cli(4, "--json", *args, env={"ZMESH_SECRET": keys["secret"]})
    assert found.returncode == 0, found.stderr
    statuses = {s["name"]: s for s in json.loads(found.stdout)}
    assert set(statuses) == {"h1", "h2"}, found.stderr
    for h in hosts:
        s = statuses[h.name]
        assert s["secured"] is True and s["security"]["key"] == fingerprint, s["security"]
        assert s["queried"] == _tcp(h)
        assert [(p["name"], p["state"]) for p in s["peers"]] == [
            ("h2" if h.name == "h1" else "h1", "alive")]


POLICY = {
    "roles": {
        "worker": {"publish": ["grad.>"], "subscribe": ["params.>"]},
        "ps": {"publish": ["params.>"], "subscribe": ["grad.>"]},
    },
    "nodes": {"worker-*": ["worker"], "ps-*": ["ps"]},
}


def test_policy_is_enforced_across_hosts(lan: Lan, keys: dict, tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    ps = lan.spawn(1, "ps-1", secret_file=keys["file"], policy=policy)
    worker = lan.spawn(2, "worker-1", secret_file=keys["file"], policy=policy)
    # Misconfigured: it has the secret (so it joins) but not the policy.
    rogue = lan.spawn(3, "worker-2", secret_file=keys["file"])
    hosts = [h.ready() for h in (ps, worker, rogue)]
    lan.full_mesh(hosts)

    # The publisher's own policy refuses at the call, saying why.
    with pytest.raises(HostError, match=r"PermissionDenied: node 'worker-1' \(roles: worker\) "
                       r"may not publish to 'params\.x'"):
        worker.call("publish", subject="params.x", data="not mine to send")
    with pytest.raises(HostError, match=r"PermissionDenied: .*'worker-1'.* may not subscribe to 'grad\.>'"):
        worker.call("subscribe", pattern="grad.>", sid="nope")

    # What the policy allows crosses hosts.
    ps.call("subscribe", pattern="grad.>", sid="grad")
    worker.call("subscribe", pattern="params.>", sid="params")
    worker.call("wait_subscribers", subject="grad.x", count=1, timeout=5)
    worker.call("publish", subject="grad.x", data="grad from worker-1")
    assert [m["data"] for m in _wait_msgs(ps, "grad", 1, 5.0)] == ["grad from worker-1"]

    # The rogue worker publishes params.x: worker-1 (which has the policy) drops it and counts it.
    rogue.call("wait_subscribers", subject="params.x", count=1, timeout=5)
    rogue.call("publish", subject="params.x", data="forged params")
    ps.call("wait_subscribers", subject="params.x", count=1, timeout=5)
    ps.call("publish", subject="params.x", data="params from ps-1")
    assert _poll(lambda: _denied(worker).get(("worker-2", "publish"), 0) >= 1, 5.0), (
        worker.call("status")["denied"], logs(worker))
    got = _wait_msgs(worker, "params", 1, 5.0)
    time.sleep(0.3)
    assert [m["data"] for m in msgs(worker, "params")] == ["params from ps-1"], got
    # What a worker may publish still gets through from the rogue one.
    rogue.call("publish", subject="grad.x", data="grad from worker-2")
    assert "grad from worker-2" in [m["data"] for m in _wait_msgs(ps, "grad", 2, 5.0)]

    status = worker.call("status")
    assert status["counters"]["drops"].get("permission_denied", 0) >= 1, status["counters"]
    assert {d["peer"] for d in status["denied"]} == {"worker-2"}, status["denied"]
    assert _denied(ps) == {}, ps.call("status")["denied"]
    assert status["policy"]["nodes"] == {"worker-*": ["worker"], "ps-*": ["ps"]}
    print(f"\nworker-1 denied: {status['denied']}; drops {status['counters']['drops']}")

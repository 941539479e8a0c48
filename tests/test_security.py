"""CurveZMQ on every link (mesh/security.py) with real sockets and real processes.

Nodes of a cluster holding the same secret join, exchange messages and answer
mesh-status; a node without the secret, with another secret, a raw ZeroMQ socket
without CURVE, and a raw CURVE socket that knows the cluster's public key (it is
announced) but not the secret are all refused, counted, and never see or inject a
message. The LAN version (intruder on another host, wire capture) is in
tests/test_lan_security.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import zmq
from meshproc import wait_until

import mesh
from discovery.base import Announcement
from discovery.zeroconf import announcement_from_properties, encode_properties
from mesh import security, wire
from mesh.status_cli import collect

pytestmark = pytest.mark.timeout(60)

SECRET = "0123456789abcdef-cluster-secret"
OTHER = "fedcba9876543210-another-secret"
ROOT = pathlib.Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- keys


def test_cluster_keys_are_deterministic_per_secret_and_cluster():
    a = security.cluster_keys(SECRET, "c1")
    assert a == security.cluster_keys(SECRET.encode(), "c1")
    assert a.public != security.cluster_keys(SECRET, "c2").public
    assert a.public != security.cluster_keys(OTHER, "c1").public
    assert len(a.public) == len(a.secret) == 40
    assert zmq.curve_public(a.secret) == a.public
    assert SECRET not in repr(a) and a.secret.decode() not in repr(a)
    assert len(a.fingerprint) == 16


def test_secret_errors_say_what_to_do(tmp_path):
    with pytest.raises(mesh.ConfigError, match="at least 16"):
        security.cluster_keys("short", "c")
    with pytest.raises(mesh.ConfigError, match="str, bytes or a pathlib.Path"):
        security.cluster_keys(1234, "c")
    path = tmp_path / "cluster.key"
    path.write_text(SECRET + "\n")
    path.chmod(0o644)
    with pytest.raises(mesh.ConfigError, match="chmod 600"):
        security.cluster_keys(path, "c")
    path.chmod(0o600)
    assert security.cluster_keys(path, "c") == security.cluster_keys(SECRET, "c")
    with pytest.raises(mesh.ConfigError, match="cannot read"):
        security.cluster_keys(tmp_path / "missing.key", "c")
    with pytest.raises(mesh.ConfigError, match="at least 16"):
        mesh.Node("x", discovery="none", secret="")


def test_generated_secrets_are_random_and_long_enough():
    one, two = security.generate_secret(), security.generate_secret()
    assert one != two and len(one.encode()) >= security.SECRET_MIN_BYTES
    security.cluster_keys(one, "c")


def test_announcement_carries_the_public_key_and_drops_a_malformed_one():
    key = security.cluster_keys(SECRET, "c").public.decode()
    ann = Announcement("c", "abc123", "n", wire.PROTOCOL_VERSION, ("tcp",),
                       ("tcp://10.0.0.1:4000",), "h", public_key=key)
    props = encode_properties(ann)
    assert props[b"key"] == key.encode()
    assert announcement_from_properties(props).public_key == key
    props[b"key"] = b"not a key"
    assert announcement_from_properties(props) is None
    del props[b"key"]
    assert announcement_from_properties(props).public_key == ""


# ---------------------------------------------------------------------------- processes


def _secured_pair(procs, secret=SECRET):
    a = procs.start("a", secret=secret, discovery="none")
    b = procs.start("b", secret=secret, discovery="none", seeds=[a.tcp])
    assert a.call("wait_for_peers", n=1, timeout=15) == ["b"]
    assert b.call("wait_for_peers", n=1, timeout=15) == ["a"]
    return a, b


def test_secured_nodes_join_and_exchange_messages(procs):
    a, b = _secured_pair(procs)
    sid = a.call("subscribe", pattern="grad.>")
    b.call("wait_for_subscribers", subject="grad.w1", count=1, timeout=10)
    b.call("publish", subject="grad.w1", data=b"payload-1")
    got = a.call("collected", sid=sid, n=1, timeout=10)
    assert [r["data"] for r in got] == [b"payload-1"]
    status = a.call("status")
    assert status["secured"] is True
    sec = status["security"]
    assert sec["mechanism"] == "CURVE"
    assert sec["key"] == security.cluster_keys(SECRET, status["cluster"]).fingerprint
    assert sec["accepted"] >= 1  # b's links passed ZAP
    peer = [p for p in status["peers"] if p["name"] == "b"][0]
    assert peer["transport"] in ("tcp", "ipc")  # never inproc across processes


@pytest.mark.parametrize("intruder_secret", [None, OTHER], ids=["no-secret", "other-secret"])
def test_a_node_without_the_credential_cannot_join_read_or_publish(procs, intruder_secret):
    a, b = _secured_pair(procs)
    sid = a.call("subscribe", pattern="grad.>")
    kwargs = {} if intruder_secret is None else {"secret": intruder_secret}
    intruder = procs.start("intruder", discovery="none", seeds=[a.tcp, b.tcp], **kwargs)
    isid = intruder.call("subscribe", pattern=">")
    # The intruder keeps trying (seeds are retried); the cluster refuses and counts.
    assert wait_until(lambda: sum(a.call("status")["security"]["refused"].values()) >= 1, 10)
    assert intruder.call("peer_names") == []
    assert a.call("peer_names") == ["b"] and b.call("peer_names") == ["a"]
    # Nothing it publishes arrives; nothing the cluster publishes reaches it.
    intruder.call("publish", subject="grad.w1", data=b"forged")
    b.call("wait_for_subscribers", subject="grad.w1", count=1, timeout=10)
    b.call("publish", subject="grad.w1", data=b"real")
    assert [r["data"] for r in a.call("collected", sid=sid, n=1, timeout=10)] == [b"real"]
    time.sleep(0.3)  # let anything forged that got through arrive (nothing does)
    assert [r["data"] for r in a.call("collected", sid=sid, n=0, timeout=0.1)] == [b"real"]
    # It hears only itself (local delivery), never the cluster.
    assert [r["data"] for r in intruder.call("collected", sid=isid, n=0, timeout=0.1)] == [b"forged"]


def test_raw_sockets_without_the_secret_get_no_answer(procs):
    a, _b = _secured_pair(procs)
    status = a.call("status")
    cluster_key = security.cluster_keys(SECRET, status["cluster"]).public
    ctx = zmq.Context()
    try:
        plain = ctx.socket(zmq.DEALER)
        impostor = ctx.socket(zmq.DEALER)
        public, secret = zmq.curve_keypair()  # knows the announced server key, not the secret
        impostor.curve_serverkey = cluster_key
        impostor.curve_publickey, impostor.curve_secretkey = public, secret
        for sock in (plain, impostor):
            sock.linger = 0
            sock.connect(a.tcp)
            sock.send(wire.pack(wire.STATUS_REQ, 7))
        assert plain.poll(1000) == 0 and impostor.poll(100) == 0
        refused = a.call("status")["security"]["refused"]
        assert refused.get("handshake_failed", 0) >= 1, refused  # the plain socket
        assert refused.get("auth_denied", 0) >= 1, refused  # the impostor, refused by ZAP
        # The same request with the credential is answered: the socket was not the problem.
        keys = security.cluster_keys(SECRET, status["cluster"])
        answered = collect([a.tcp], timeout=5.0, keys=keys)
        assert [s["name"] for s in answered] == ["a"]
        assert collect([a.tcp], timeout=0.5) == []
    finally:
        ctx.destroy(linger=0)


def test_secured_and_unsecured_nodes_in_one_process_do_not_mix(make_node):
    # inproc has no handshake: the hello's key fingerprint keeps them apart.
    secured = make_node("s", discovery="none", secret=SECRET)
    plain = make_node("p", discovery="none", seeds=[secured.endpoints[0]])
    other = make_node("o", discovery="none", secret=OTHER, seeds=[secured.endpoints[0]])
    time.sleep(1.0)
    assert secured.peers() == [] and plain.peers() == [] and other.peers() == []
    assert secured.status()["counters"]["drops"].get("foreign_credential", 0) >= 2
    ally = make_node("s2", discovery="none", secret=SECRET, seeds=[secured.endpoints[0]])
    assert [p.name for p in ally.wait_for_peers(1, timeout=10)] == ["s"]


def test_mesh_status_needs_the_credential_and_shows_secured(procs, tmp_path):
    a, _b = _secured_pair(procs)
    cluster = a.call("status")["cluster"]
    key_file = tmp_path / "cluster.key"
    key_file.write_text(SECRET)
    key_file.chmod(0o600)
    cmd = [sys.executable, "-m", "mesh.status_cli", "--connect", a.tcp, "--cluster", cluster,
           "--timeout", "2"]
    env = {k: v for k, v in os.environ.items() if k != "ZMESH_SECRET"}
    run = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=30, env=env, cwd=ROOT)
    assert run.returncode == 1 and "no node answered" in run.stderr
    run = subprocess.run(cmd + ["--json", "--secret-file", str(key_file)], capture_output=True,
                         text=True, timeout=30, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    [status] = json.loads(run.stdout)
    assert status["name"] == "a" and status["secured"] is True
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                         env={**env, "ZMESH_SECRET": SECRET}, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    fingerprint = security.cluster_keys(SECRET, cluster).fingerprint
    assert "SECURED" in run.stdout and f"curve {fingerprint}" in run.stdout


def test_mesh_secret_prints_a_usable_secret():
    run = subprocess.run([sys.executable, "-m", "mesh.cli", "secret"], capture_output=True,
                         text=True, timeout=30, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    secret = run.stdout.strip()
    assert len(secret) >= security.SECRET_MIN_BYTES
    security.cluster_keys(secret, "c")


# ---------------------------------------------------------------------------- permissions

POLICY = {
    "roles": {
        "worker": {"publish": ["grad.>"], "subscribe": ["params.>"]},
        "ps": {"publish": ["params.>"], "subscribe": ["grad.>"]},
    },
    "nodes": {"worker-*": ["worker"], "ps-*": ["ps"]},
}


def test_policy_is_checked_by_the_sender_and_enforced_by_every_receiver(procs):
    ps = procs.start("ps-1", secret=SECRET, discovery="none", policy=POLICY)
    worker = procs.start("worker-1", secret=SECRET, discovery="none", seeds=[ps.tcp], policy=POLICY)
    # Holds the secret but not the policy: a misconfigured (or dishonest) worker.
    rogue = procs.start("worker-2", secret=SECRET, discovery="none", seeds=[ps.tcp])
    for proc in (ps, worker, rogue):
        proc.call("wait_for_peers", n=2, timeout=15)
    grads = ps.call("subscribe", pattern="grad.>")
    params = worker.call("subscribe", pattern="params.>")
    # The sender's own check: a clear error at the call, naming the node and its roles.
    with pytest.raises(Exception, match=r"PermissionDenied.*worker-1.*params\.w"):
        worker.call("publish", subject="params.w", data=b"no")
    with pytest.raises(Exception, match=r"PermissionDenied.*grad\.>"):
        worker.call("subscribe", pattern="grad.>")
    # Allowed traffic flows both ways.
    worker.call("wait_for_subscribers", subject="grad.w1", count=1, timeout=10)
    worker.call("publish", subject="grad.w1", data=b"g1")
    assert [r["data"] for r in ps.call("collected", sid=grads, n=1, timeout=10)] == [b"g1"]
    ps.call("wait_for_subscribers", subject="params.w", count=1, timeout=10)
    ps.call("publish", subject="params.w", data=b"p1")
    assert [r["data"] for r in worker.call("collected", sid=params, n=1, timeout=10)] == [b"p1"]
    # The rogue subscribes to grad.> (its own node lets it): the others never route
    # gradients to it; and what it publishes on params.> is dropped by the receivers.
    rogue_grads = rogue.call("subscribe", pattern="grad.>")
    rogue.call("wait_for_subscribers", subject="params.w", count=1, timeout=10)
    rogue.call("publish", subject="params.w", data=b"forged")
    rogue.call("publish", subject="grad.w2", data=b"g2")  # allowed for a worker: arrives
    assert [r["data"] for r in ps.call("collected", sid=grads, n=2, timeout=10)] == [b"g1", b"g2"]

    def denied(proc, action):
        return sum(d["count"] for d in proc.call("status")["denied"]
                   if d["peer"] == "worker-2" and d["action"] == action)

    assert wait_until(lambda: denied(worker, "publish") >= 1, 10)
    assert wait_until(lambda: denied(ps, "subscribe") >= 1 and denied(worker, "subscribe") >= 1, 10)
    worker.call("publish", subject="grad.w3", data=b"g3")
    assert [r["data"] for r in ps.call("collected", sid=grads, n=3, timeout=10)][-1] == b"g3"
    time.sleep(0.3)  # anything wrongly routed would have arrived by now
    assert [r["data"] for r in worker.call("collected", sid=params, n=0, timeout=0.1)] == [b"p1"]
    assert [r["data"] for r in rogue.call("collected", sid=rogue_grads, n=0, timeout=0.1)] == [b"g2"]
    described = ps.call("status")["policy"]
    assert described["nodes"] == {"worker-*": ["worker"], "ps-*": ["ps"]}


def test_policy_file_errors_are_clear(tmp_path):
    bad = tmp_path / "policy.json"
    bad.write_text(json.dumps({"roles": {"worker": {"publish": ["grad..x"]}}}))
    with pytest.raises(mesh.ConfigError, match=r"roles\.worker\.publish\[0\]"):
        mesh.Node("x", discovery="none", policy=str(bad))

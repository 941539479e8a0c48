"""mesh.Node across real separate processes (multiprocessing "spawn").

Every worker runs one node (tests/meshproc.py) and obeys commands; the ``procs``
fixture reaps all of them at teardown. Some tests also run a node in the test
process itself (``make_node``), which is another process for the workers.
Every wait is bounded: wait_for_peers / wait_for_subscribers / the worker's
``collected`` (waits for a message count) / polling a peer state with a deadline.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from meshproc import as_array, wait_until

import mesh

pytestmark = pytest.mark.timeout(60)


def start_mesh(procs, names, **node_kwargs):
    """Start workers: the first alone, the others seeded only with the first;
    return them once every one sees all the others."""
    first = procs.start(names[0], **node_kwargs)
    rest = procs.start_many({n: dict(seeds=[first.tcp], **node_kwargs) for n in names[1:]})
    workers = [first, *rest]
    for w in workers:
        w.call("wait_for_peers", n=len(names) - 1, timeout=15)
    return workers


def peer_row(status, name):
    rows = [p for p in status["peers"] if p["name"] == name]
    assert len(rows) == 1, f"{status['name']} has {len(rows)} rows for {name}: {status['peers']}"
    return rows[0]


def seqs(records, subject=None):
    return [r["seq"] for r in records if subject is None or r["subject"] == subject]


# ---------------------------------------------------------------------------- membership


def test_three_workers_seeded_with_the_first_become_fully_connected(procs):
    a = procs.start("a")
    b, c = procs.start_many({"b": dict(seeds=[a.tcp]), "c": dict(seeds=[a.tcp])})
    assert a.call("wait_for_peers", n=2, timeout=15) == ["b", "c"]
    assert b.call("wait_for_peers", n=2, timeout=15) == ["a", "c"]  # c only via gossip
    assert c.call("wait_for_peers", n=2, timeout=15) == ["a", "b"]
    for w in (a, b, c):
        status = w.call("status")
        assert sorted(p["name"] for p in status["peers"] if p["state"] == "alive") == sorted(
            {"a", "b", "c"} - {w.name}
        )
        ids = {p["id"] for p in status["peers"]}
        assert w.id not in ids


def test_node_in_test_process_joins_worker_mesh(procs, make_node):
    a, b = start_mesh(procs, ["a", "b"])
    me = make_node("me", seeds=[b.tcp])
    assert sorted(p.name for p in me.wait_for_peers(2, timeout=15)) == ["a", "b"]
    assert a.call("wait_for_peers", n=2, timeout=15) == ["b", "me"]


def test_nodes_of_other_clusters_never_join(procs):
    a = procs.start("a")
    other = procs.start("x", cluster="some-other-cluster", seeds=[a.tcp])
    b = procs.start("b", seeds=[a.tcp])
    assert b.call("wait_for_peers", n=1, timeout=15) == ["a"]
    assert a.call("wait_for_peers", n=1, timeout=15) == ["b"]
    # the foreign hello was refused (counted), and x never saw anyone
    status = a.call("status")
    assert "x" not in [p["name"] for p in status["peers"]]
    assert status["counters"]["drops"].get("wrong_cluster", 0) >= 1
    assert other.call("peer_names") == []


# ---------------------------------------------------------------------------- pub/sub


def test_pubsub_wildcards_across_processes_in_order(procs):
    pub, star, gt, none = start_mesh(procs, ["pub", "star", "gt", "none"])
    s_star = star.call("subscribe", pattern="grad.*.layer1")
    s_gt = gt.call("subscribe", pattern="grad.>")
    none.call("subscribe", pattern="params.>")
    pub.call("wait_for_subscribers", subject="grad.w3.layer1", count=2)
    pub.call("wait_for_subscribers", subject="grad.w3.layer1.bias", count=1)
    pub.call("wait_for_subscribers", subject="params.x", count=1)
    n = 300
    subjects = ["grad.w3.layer1", "grad.w3.layer1.bias", "grad.w3", "grad", "other.x"]
    pub.call("publish_many", subjects=subjects, n=n)

    got_star = star.call("collected", sid=s_star, n=n)
    assert len(got_star) == n
    assert {r["subject"] for r in got_star} == {"grad.w3.layer1"}
    assert seqs(got_star) == list(range(1, n + 1))
    assert [int(r["data"]) for r in got_star] == list(range(1, n + 1))
    assert {r["sender"] for r in got_star} == {pub.id}

    got_gt = gt.call("collected", sid=s_gt, n=3 * n)
    gt_subjects = ("grad.w3.layer1", "grad.w3.layer1.bias", "grad.w3")  # not "grad" itself
    for subject in gt_subjects:
        assert seqs(got_gt, subject) == list(range(1, n + 1)), subject
    assert len(got_gt) == 3 * n
    # nothing else trickles in late, and nobody counted a gap
    assert len(star.call("collected", sid=s_star, n=n + 1, timeout=0.3)) == n
    assert len(gt.call("collected", sid=s_gt, n=3 * n + 1, timeout=0.3)) == 3 * n
    for w in (star, gt, none):
        status = w.call("status")
        assert status["counters"]["gaps"] == 0
    assert none.call("status")["counters"]["msgs_in"] == 0


ARRAYS = {
    "f32 2d": np.arange(12, dtype=np.float32).reshape(3, 4),
    "i64 1d": np.arange(-5, 5, dtype=np.int64),
    "u8 3d": np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    "f64 0d": np.array(3.25),
    "bool": np.array([True, False, True]),
    "c128": (np.arange(4) + 1j * np.arange(4)).reshape(2, 2),
    "f16": np.linspace(0, 1, 5, dtype=np.float16),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "big-endian i4": np.arange(6, dtype=">i4").reshape(3, 2),
    "fortran i16": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
    "strided i8": np.arange(20, dtype=np.int8)[::3],
    "datetime64": np.array(["2024-01-01", "2025-06-30"], dtype="datetime64[D]"),
    "bytes S3": np.array([b"abc", b"de"], dtype="S3"),
    "2 MiB f32": np.random.default_rng(1).standard_normal((512, 1024)).astype(np.float32),
}


def test_numpy_arrays_keep_dtype_and_shape(procs, make_node):
    (sub,) = start_mesh(procs, ["sub"])
    sid = sub.call("subscribe", pattern="arr.>")
    pub = make_node("pub", seeds=[sub.tcp])
    pub.wait_for_subscribers("arr.x", 1, timeout=15)
    for name, arr in ARRAYS.items():
        pub.publish("arr.x", arr, headers={"name": name})
    got = sub.call("collected", sid=sid, n=len(ARRAYS))
    assert [r["headers"]["name"] for r in got] == list(ARRAYS)
    for rec in got:
        sent = ARRAYS[rec["headers"]["name"]]
        out = as_array(rec)
        assert out.dtype == sent.dtype, rec["headers"]
        assert out.shape == sent.shape, rec["headers"]
        np.testing.assert_array_equal(out, sent)


# ---------------------------------------------------------------------------- routing


def test_interest_propagation_sends_only_to_interested_peers(procs):
    pub, keen, bored = start_mesh(procs, ["pub", "keen", "bored"])
    sid = keen.call("subscribe", pattern="data.>")
    bored.call("subscribe", pattern="other.>")
    pub.call("wait_for_subscribers", subject="data.x", count=1)
    pub.call("wait_for_subscribers", subject="other.y", count=1)  # pub knows bored's interest
    n = 200
    pub.call("publish_many", subjects=["data.x"], n=n)
    assert len(keen.call("collected", sid=sid, n=n)) == n
    status = pub.call("status")
    assert peer_row(status, "bored")["msgs_out"] == 0
    assert peer_row(status, "keen")["msgs_out"] == n
    assert status["counters"]["msgs_out"] == n
    bored_status = bored.call("status")
    assert bored_status["counters"]["msgs_in"] == 0
    assert bored_status["counters"]["drops"].get("no_interest", 0) == 0
    assert keen.call("status")["counters"]["drops"].get("no_interest", 0) == 0


def test_unsubscribe_propagates_to_publishers(procs, make_node):
    (sub,) = start_mesh(procs, ["sub"])
    sid = sub.call("subscribe", pattern="u.x")
    pub = make_node("pub", seeds=[sub.tcp])
    pub.wait_for_subscribers("u.x", 1, timeout=15)
    pub.publish("u.x", b"1")
    assert len(sub.call("collected", sid=sid, n=1)) == 1
    sub.call("unsubscribe", sid=sid)
    assert wait_until(lambda: pub.wait_for_subscribers("u.x", 0, timeout=1) == 0, timeout=10), (
        "the publisher never learned of the unsubscribe"
    )
    with pytest.raises(mesh.NoRespondersError):
        pub.request("u.x", b"", timeout=2)
    before = peer_row(pub.status(), "sub")["msgs_out"]
    pub.publish("u.x", b"2")
    assert peer_row(pub.status(), "sub")["msgs_out"] == before


def test_queue_group_delivers_each_message_to_exactly_one_member(procs, make_node):
    names = ["m1", "m2", "m3", "plain"]
    workers = start_mesh(procs, names)
    members, plain = workers[:3], workers[3]
    sids, fences, audit = {}, {}, {}
    for w in members:
        sids[w.name] = w.call("subscribe", pattern="jobs.>", queue="workers")
        if w.name != "m3":
            audit[w.name] = w.call("subscribe", pattern="jobs.*", queue="auditors")
        fences[w.name] = w.call("subscribe", pattern="fence")
        w.call("subscribe", pattern=f"ready.{w.name}")  # interest is applied in order
    plain_sid = plain.call("subscribe", pattern="jobs.>")
    plain.call("subscribe", pattern="ready.plain")
    pub = make_node("pub", seeds=[plain.tcp])
    pub.wait_for_peers(4, timeout=15)
    for name in names:
        pub.wait_for_subscribers(f"ready.{name}", 1, timeout=15)
    n = 300
    for i in range(1, n + 1):
        pub.publish("jobs.x", str(i).encode(), timeout=5)
    pub.publish("fence", b"")  # same link, after the jobs: all jobs arrived before it

    got = {}
    got_audit = {}
    for w in members:
        assert len(w.call("collected", sid=fences[w.name], n=1)) == 1
        got[w.name] = seqs(w.call("collected", sid=sids[w.name]))
        if w.name in audit:
            got_audit[w.name] = seqs(w.call("collected", sid=audit[w.name]))
    everything = sorted(s for got_seqs in got.values() for s in got_seqs)
    assert everything == list(range(1, n + 1)), {k: len(v) for k, v in got.items()}
    for name, got_seqs in got.items():
        assert got_seqs == sorted(got_seqs), f"{name} got jobs out of order"
        assert got_seqs, f"{name} never got a job: the group does not spread load"
    audited = sorted(s for got_seqs in got_audit.values() for s in got_seqs)
    assert audited == list(range(1, n + 1)), {k: len(v) for k, v in got_audit.items()}
    plain_got = plain.call("collected", sid=plain_sid, n=n)
    assert seqs(plain_got) == list(range(1, n + 1))


def test_queue_group_with_a_local_member(procs, make_node):
    (remote,) = start_mesh(procs, ["remote"])
    rsid = remote.call("subscribe", pattern="q.>", queue="g")
    rfence = remote.call("subscribe", pattern="fence")
    me = make_node("me", seeds=[remote.tcp])
    local = me.subscribe("q.>", queue="g")
    me.wait_for_subscribers("q.a", 2, timeout=15)
    me.wait_for_subscribers("fence", 1, timeout=15)
    n = 200
    for i in range(1, n + 1):
        me.publish("q.a", str(i).encode())
    me.publish("fence", b"")
    remote.call("collected", sid=rfence, n=1)
    remote_seqs = seqs(remote.call("collected", sid=rsid))
    local_seqs = []
    while local.pending:
        local_seqs.append(local.next(timeout=1).seq)
    assert sorted(remote_seqs + local_seqs) == list(range(1, n + 1))
    assert remote_seqs and local_seqs


# ---------------------------------------------------------------------------- request/reply


def test_request_reply_across_processes(procs, make_node):
    server, client = start_mesh(procs, ["server", "client"])
    sid = server.call("subscribe", pattern="svc.echo", mode="echo")
    client.call("wait_for_subscribers", subject="svc.echo", count=1)
    for i in range(10):
        out = client.call("request", subject="svc.echo", data=f"q{i}".encode(), timeout=5)
        assert "reply" in out, out
        assert out["reply"]["data"] == f"q{i}".encode()
        assert out["reply"]["headers"] == {"echo": 1}
        assert out["reply"]["sender"] == server.id
    seen = server.call("collected", sid=sid, n=10)
    assert len({r["request_id"] for r in seen}) == 10
    assert all(r["request_id"] is not None for r in seen)
    # and from a third process, with an array
    me = make_node("me", seeds=[server.tcp])
    me.wait_for_subscribers("svc.echo", 1, timeout=15)
    arr = np.arange(30, dtype=np.float64).reshape(5, 6)
    reply = me.request("svc.echo", arr, timeout=5)
    np.testing.assert_array_equal(reply.array(), arr)
    assert reply.array().dtype == arr.dtype


def test_request_with_several_responders_returns_one_reply(procs, make_node):
    r1, r2 = start_mesh(procs, ["r1", "r2"])
    for r in (r1, r2):
        r.call("subscribe", pattern="svc.who", mode="respond_name")
        r.call("subscribe", pattern="svc.one", mode="respond_name", queue="pool")
    me = make_node("me", seeds=[r1.tcp])
    me.wait_for_subscribers("svc.who", 2, timeout=15)
    me.wait_for_subscribers("svc.one", 2, timeout=15)
    reply = me.request("svc.who", b"", timeout=5)
    assert reply.data in (b"r1", b"r2")
    # a queue group answers each request once: no second (late) reply ever comes
    answers = {me.request("svc.one", b"", timeout=5).data for _ in range(20)}
    assert answers <= {b"r1", b"r2"}
    for r in (r1, r2):
        r.call("status")  # each has handled what it received by now
    me.request("svc.one", b"", timeout=5)  # one more round trip after the others
    drops = me.status()["counters"]["drops"]
    assert drops.get("late_reply", 0) <= 1, drops  # only the plain svc.who's second answer


def test_no_responders_across_processes_fails_at_once(procs):
    a, b = start_mesh(procs, ["a", "b"])
    b.call("subscribe", pattern="something.else")
    a.call("wait_for_subscribers", subject="something.else", count=1)
    out = a.call("request", subject="svc.none", timeout=5, retries=2)
    assert out["error"] == "NoRespondersError", out
    assert out["elapsed"] < 0.5


def test_retries_carry_the_same_request_id(procs):
    server, client = start_mesh(procs, ["server", "client"])
    sid = server.call("subscribe", pattern="svc.flaky", mode="respond_second")
    client.call("wait_for_subscribers", subject="svc.flaky", count=1)
    out = client.call("request", subject="svc.flaky", data=b"x", timeout=0.5, retries=2)
    assert "reply" in out, out
    assert out["reply"]["data"] == b"second:x"
    assert out["elapsed"] >= 0.45  # the first attempt really timed out
    seen = server.call("collected", sid=sid, n=2)
    assert len(seen) == 2
    assert seen[0]["request_id"] == seen[1]["request_id"] is not None
    assert out["reply"]["request_id"] == seen[0]["request_id"]
    assert server.call("seen_ids", sid=sid) == {seen[0]["request_id"]: 2}


def test_timeout_after_retries(procs):
    server, client = start_mesh(procs, ["server", "client"])
    sid = server.call("subscribe", pattern="svc.mute", mode="never")
    client.call("wait_for_subscribers", subject="svc.mute", count=1)
    out = client.call("request", subject="svc.mute", timeout=0.3, retries=2)
    assert out.get("error") == "TimeoutError", out
    assert 0.85 <= out["elapsed"] < 5.0  # three attempts of 0.3 s
    seen = server.call("collected", sid=sid, n=3)
    assert len(seen) == 3
    assert len({r["request_id"] for r in seen}) == 1


# ---------------------------------------------------------------------------- transports


def test_processes_on_one_host_use_ipc(procs):
    a, b = start_mesh(procs, ["a", "b"])
    assert peer_row(a.call("status"), "b")["transport"] == "ipc"
    assert peer_row(b.call("status"), "a")["transport"] == "ipc"


def test_tcp_only_nodes_use_tcp(procs):
    a, b = start_mesh(procs, ["a", "b"], transports=("tcp",))
    for w, other in ((a, "b"), (b, "a")):
        row = peer_row(w.call("status"), other)
        assert row["transport"] == "tcp", row
        assert row["endpoint"].startswith("tcp://127."), row  # same host: loopback
    sid = b.call("subscribe", pattern="t.>")
    a.call("wait_for_subscribers", subject="t.x", count=1)
    a.call("publish_many", subjects=["t.x"], n=20)
    assert seqs(b.call("collected", sid=sid, n=20)) == list(range(1, 21))


def test_mixed_transports_fall_back_to_tcp(procs):
    a = procs.start("a", transports=("tcp",))
    b = procs.start("b", seeds=[a.tcp])  # offers everything
    a.call("wait_for_peers", n=1, timeout=15)
    b.call("wait_for_peers", n=1, timeout=15)
    assert peer_row(a.call("status"), "b")["transport"] == "tcp"
    assert peer_row(b.call("status"), "a")["transport"] == "tcp"


# ---------------------------------------------------------------------------- failures


def test_sigkilled_peer_is_declared_dead(procs):
    peer_timeout = 1.5
    a, b, c = start_mesh(procs, ["a", "b", "c"], heartbeat_interval=0.2,
                         peer_timeout=peer_timeout)
    c.call("subscribe", pattern="svc.c", mode="echo")
    a.call("wait_for_subscribers", subject="svc.c", count=1)
    t0 = time.monotonic()
    c.kill()
    for w in (a, b):
        res = w.call("wait_peer_state", name="c", states=["dead"], timeout=peer_timeout + 5)
        assert res["ok"], f"{w.name} did not declare c dead: {res}"
        assert time.monotonic() - t0 < peer_timeout + 2.0
        assert res["alive"] == sorted({"a", "b"} - {w.name})
    out = a.call("request", subject="svc.c", timeout=1)
    assert out.get("error") == "NoRespondersError", out
    # the survivors still talk to each other
    sid = b.call("subscribe", pattern="after.kill")
    a.call("wait_for_subscribers", subject="after.kill", count=1)
    a.call("publish", subject="after.kill", data=b"ok")
    assert b.call("collected", sid=sid, n=1)[0]["data"] == b"ok"


def test_closed_peer_disappears_at_once(procs):
    a, b, c = start_mesh(procs, ["a", "b", "c"])  # default peer_timeout: 3 s
    t0 = time.monotonic()
    close_took = c.call("close")
    assert close_took < 2.0, f"close() took {close_took:.2f} s"
    for w in (a, b):
        res = w.call("wait_peer_state", name="c", states=["left", "absent"], timeout=5)
        assert res["ok"], f"{w.name} still lists c: {res}"
        assert time.monotonic() - t0 < 1.0, "the goodbye was not honoured at once"
        assert res["alive"] == sorted({"a", "b"} - {w.name})


def test_closed_peer_interest_is_gone_at_once(procs, make_node):
    (c,) = start_mesh(procs, ["c"])
    c.call("subscribe", pattern="svc.c", mode="echo")
    me = make_node("me", seeds=[c.tcp])
    me.wait_for_subscribers("svc.c", 1, timeout=15)
    assert me.request("svc.c", b"x", timeout=5).data == b"x"
    c.call("close")
    assert wait_until(lambda: not me.peers(), timeout=1.0), me.status()["peers"]
    with pytest.raises(mesh.NoRespondersError):
        me.request("svc.c", b"x", timeout=5)


def test_restarted_peer_rejoins(procs):
    a, b = start_mesh(procs, ["a", "b"])
    b.call("close")
    a.call("wait_peer_state", name="b", states=["left"], timeout=5)
    b2 = procs.start("b2", seeds=[a.tcp])
    assert b2.call("wait_for_peers", n=1, timeout=15) == ["a"]
    assert a.call("wait_for_peers", n=1, timeout=15) == ["b2"]


# ---------------------------------------------------------------------------- large payloads


@pytest.mark.timeout(60)
def test_16_mib_array_round_trip(procs, make_node):
    (server,) = start_mesh(procs, ["server"])
    server.call("subscribe", pattern="svc.big", mode="echo")
    me = make_node("me", seeds=[server.tcp])
    me.wait_for_subscribers("svc.big", 1, timeout=15)
    arr = np.random.default_rng(7).standard_normal((2048, 2048)).astype(np.float32)
    assert arr.nbytes == 16 * 1024 * 1024
    reply = me.request("svc.big", arr, timeout=20)
    out = reply.array()
    assert out.dtype == np.float32 and out.shape == (2048, 2048)
    np.testing.assert_array_equal(out, arr)
    assert peer_row(me.status(), "server")["transport"] == "ipc"


def test_close_waits_for_goodbyes_to_be_heard_but_not_for_a_frozen_peer(procs, make_node):
    """close() returns once its peers answered the goodbye (a process that exits right
    after close() must not take the goodbye with it: its peers would see it die, not
    leave), and waits at most GOODBYE_WAIT for a peer that cannot answer (frozen)."""
    from mesh.engine.loop import GOODBYE_WAIT

    (alive,) = start_mesh(procs, ["alive"])
    me = make_node("me", seeds=[alive.tcp])
    me.wait_for_peers(1, timeout=10)
    alive.call("wait_for_peers", n=1, timeout=10)
    me.close()
    assert me._goodbyes == (1, 1)
    assert alive.call("wait_peer_state", name="me", states=["left"], timeout=5)["ok"]

    frozen = procs.start("frozen")
    me2 = make_node("me2", seeds=[frozen.tcp])
    me2.wait_for_peers(1, timeout=10)
    frozen.call("wait_for_peers", n=1, timeout=10)
    peers_before = [(p.name, p.state) for p in me2.peers()]
    with frozen.paused():
        # SIGSTOP is asynchronous: closing before every thread stopped, the peer
        # could still answer (seen under load, 3.7 ms into close()).
        assert wait_until(lambda: _all_threads_stopped(frozen.process.pid), timeout=5.0)
        t0 = time.monotonic()
        me2.close()
        took = time.monotonic() - t0
    assert took < GOODBYE_WAIT + 1.0, f"close() took {took:.2f} s with a frozen peer"
    assert me2._goodbyes == (1, 0), (peers_before, took)


def _all_threads_stopped(pid: int) -> bool:
    """Every thread of ``pid`` in state T (stopped), from /proc."""
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            states.append(f.read().rsplit(")", 1)[1].split()[0])
    return bool(states) and all(s == "T" for s in states)

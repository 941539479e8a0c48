"""mesh.Node inside one process: lifecycle, validation, local delivery, pull
subscriptions, request/reply, and two nodes of one process (inproc).

Fast: no separate processes. Nodes come from the ``make_node`` fixture
(discovery="none", a cluster unique to the test, closed at teardown, and the
``ipc_files`` check that no socket file is left behind).
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from meshproc import wait_until

import mesh
from mesh import ClosedError, ConfigError, InvalidSubject, MeshError, wire

pytestmark = pytest.mark.timeout(30)

# ---------------------------------------------------------------------------- helpers


def run_in_thread(fn, *args):
    """Run fn in a daemon thread; returns (thread, result dict with 'value' or 'error')."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args)
        except BaseException as exc:  # handed back to the test
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


class Collect:
    """A handler that records messages and lets the test wait for a count."""

    def __init__(self):
        self.msgs = []
        self.cond = threading.Condition()

    def __call__(self, msg):
        with self.cond:
            self.msgs.append(msg)
            self.cond.notify_all()

    def wait(self, n, timeout=5.0):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.msgs) >= n, timeout), (
                f"got {len(self.msgs)} of {n} messages within {timeout} s"
            )
            return list(self.msgs)


# ---------------------------------------------------------------------------- lifecycle


def test_start_and_close_are_idempotent(make_node):
    node = make_node()
    assert node.start() is node  # second start: no-op, same node
    node.close()
    node.close()  # second close: no-op, no error


def test_context_manager_starts_and_closes(cluster, ipc_files):
    with mesh.Node("cm", cluster, discovery="none") as node:
        ipc_files.add(node.endpoints)
        assert node.endpoints
        assert node.status()["closed"] is False
        sub = node.subscribe("x.y")
    assert node.status()["closed"] is True
    assert sub.closed
    with pytest.raises(ClosedError):
        node.publish("x.y", b"")


def test_context_manager_closes_on_exception(cluster, ipc_files):
    with pytest.raises(RuntimeError, match="boom"):
        with mesh.Node("cm-exc", cluster, discovery="none") as node:
            ipc_files.add(node.endpoints)
            raise RuntimeError("boom")
    with pytest.raises(ClosedError):
        node.peers()


def test_close_of_a_never_started_node(cluster):
    node = mesh.Node("never", cluster, discovery="none")
    node.close()
    node.close()
    with pytest.raises(ClosedError):
        node.start()


def test_every_method_raises_closed_error_after_close(make_node):
    node = make_node()
    responder_msgs = []
    node.subscribe("svc", lambda m: responder_msgs.append(m))
    pull = node.subscribe("pull.>")
    node.publish("svc", b"x")  # a request-less message, kept to test respond() below
    req_seen = threading.Event()

    def keep(msg):
        responder_msgs.append(msg)
        req_seen.set()

    node.subscribe("req", keep)
    _, res = run_in_thread(node.request, "req", b"q", 0.5)
    assert req_seen.wait(5.0)
    request_msg = responder_msgs[-1]
    assert request_msg.is_request
    node.close()

    calls = {
        "start": lambda: node.start(),
        "subscribe": lambda: node.subscribe("a.b"),
        "subscribe handler": lambda: node.subscribe("a.b", print),
        "publish": lambda: node.publish("a.b", b"x"),
        "publish array": lambda: node.publish("a.b", np.zeros(3)),
        "request": lambda: node.request("svc", b"x", timeout=0.5),
        "peers": lambda: node.peers(),
        "wait_for_peers": lambda: node.wait_for_peers(1, timeout=0.5),
        "wait_for_subscribers": lambda: node.wait_for_subscribers("svc", 1, timeout=0.5),
        "respond": lambda: request_msg.respond(b"late"),
        "sub.next": lambda: pull.next(timeout=0.5),
    }
    wrong = {}
    for what, call in calls.items():
        try:
            call()
        except ClosedError:
            continue
        except BaseException as exc:  # noqa: B036 - reported below
            wrong[what] = repr(exc)
        else:
            wrong[what] = "no error"
    assert not wrong, f"after close, these did not raise ClosedError: {wrong}"
    assert list(pull) == []  # iteration of a closed subscription ends at once


def test_close_wakes_a_pending_request(make_node):
    node = make_node()
    node.subscribe("slow", lambda m: None)  # never answers
    thread, res = run_in_thread(node.request, "slow", b"", 30.0)
    assert node.wait_for_subscribers("slow", 1, timeout=2)
    t0 = time.monotonic()
    node.close()
    thread.join(5.0)
    assert not thread.is_alive(), "request() kept waiting after close()"
    assert time.monotonic() - t0 < 5.0
    assert isinstance(res.get("error"), ClosedError), res


def test_endpoints_have_real_ports_and_socket_files(make_node):
    import os

    node = make_node()
    schemes = {ep.split("://")[0] for ep in node.endpoints}
    assert {"inproc", "ipc", "tcp"} <= schemes, node.endpoints
    for ep in node.endpoints:
        if ep.startswith("tcp://"):
            port = int(ep.rsplit(":", 1)[1])
            assert 0 < port < 65536
        if ep.startswith("ipc://"):
            assert os.path.exists(ep[len("ipc://"):])
    paths = [ep[len("ipc://"):] for ep in node.endpoints if ep.startswith("ipc://")]
    node.close()
    assert not any(os.path.exists(p) for p in paths), "close() left the ipc socket file"


def test_tcp_only_node_listens_only_on_tcp(make_node):
    node = make_node(transports=("tcp",))
    assert [ep.split("://")[0] for ep in node.endpoints] == ["tcp"]
    assert node.status()["transports"] == ["tcp"]


# ---------------------------------------------------------------------------- validation

BAD_SUBJECTS = ["a.*", "a.>", "*", ">", "", "a..b", ".a", "a.", "a b", "a\tb", "a*", "a>b",
                "_mesh.x", "_mesh.pressure.n1", "_mesh"]
BAD_PATTERNS = ["a.>.b", ">.a", "", "a..b", ".a", "a.", "a b", "a*", "*a", "a.b>"]


@pytest.mark.parametrize("pattern", ["_mesh.pressure.>", "_mesh.peers.*", "_mesh.x"])
def test_reserved_subjects_can_be_subscribed_but_not_published(make_node, pattern):
    """The mesh publishes notices there (pressure, peers) for applications to read."""
    node = make_node()
    sub = node.subscribe(pattern)
    assert sub.pattern == pattern
    with pytest.raises(InvalidSubject):
        node.publish(pattern.replace(">", "x").replace("*", "x"), b"x")


@pytest.mark.parametrize("subject", BAD_SUBJECTS)
def test_publish_and_request_reject_invalid_subjects(make_node, subject):
    node = make_node()
    node.subscribe(">")  # a route exists for every valid subject
    with pytest.raises(InvalidSubject):
        node.publish(subject, b"x")
    with pytest.raises(InvalidSubject):
        node.request(subject, b"x", timeout=0.2)


@pytest.mark.parametrize("pattern", BAD_PATTERNS)
def test_subscribe_rejects_invalid_patterns(make_node, pattern):
    node = make_node()
    with pytest.raises(InvalidSubject):
        node.subscribe(pattern)
    with pytest.raises(InvalidSubject):
        node.subscribe(pattern, lambda m: None, queue="q")
    assert node.status()["subscriptions"] == []


@pytest.mark.parametrize("bad", [None, 7, b"a.b", ["a"], ("a", "b")], ids=repr)
def test_non_string_subjects_are_invalid(make_node, bad):
    node = make_node()
    with pytest.raises(InvalidSubject):
        node.subscribe(bad)
    with pytest.raises(InvalidSubject):
        node.publish(bad, b"x")
    with pytest.raises(InvalidSubject):
        node.request(bad, b"x", timeout=0.2)


def test_reserved_subject_stays_reserved_once_the_mesh_routed_it(make_node):
    """The mesh itself may route `_mesh.` subjects (wait_for_subscribers, incoming
    control traffic); that must not open them to the application."""
    node = make_node()
    with pytest.raises(InvalidSubject):
        node.publish("_mesh.x", b"x")
    node.wait_for_subscribers("_mesh.x", 0, timeout=1.0)  # the mesh routes it internally
    with pytest.raises(InvalidSubject):
        node.publish("_mesh.x", b"x")
    with pytest.raises(InvalidSubject):
        node.request("_mesh.x", b"x", timeout=0.2)


@pytest.mark.parametrize("payload", [123, 1.5, None, {"a": 1}, [1, 2], object(), (b"a",)])
def test_bad_payload_type_raises_a_mesh_error(make_node, payload):
    node = make_node()
    node.subscribe("p")
    with pytest.raises(MeshError):
        node.publish("p", payload)
    with pytest.raises(MeshError):
        node.request("p", payload, timeout=0.2)


def test_unsupported_array_dtype_raises_a_mesh_error(make_node):
    node = make_node()
    with pytest.raises(MeshError):
        node.publish("p", np.array([{"a": 1}, None], dtype=object))


def test_bad_headers_raise_config_error(make_node):
    node = make_node()
    node.subscribe("p")
    with pytest.raises(ConfigError):
        node.publish("p", b"x", headers=["not", "a", "dict"])


def test_payload_larger_than_max_message_size(make_node):
    node = make_node(max_message_size=1024)
    node.subscribe("p")
    node.publish("p", b"x" * 1024)
    with pytest.raises(mesh.MessageTooLarge):
        node.publish("p", b"x" * 1025)
    with pytest.raises(mesh.MessageTooLarge):
        node.publish("p", np.zeros(129, dtype=np.float64))


BAD_NODE_ARGS = {
    "discovery": dict(discovery="carrier-pigeon"),
    "unknown option": dict(no_such_option=1),
    "empty cluster": dict(cluster=""),
    "cluster not str": dict(cluster=5),
    "empty name": dict(name=""),
    "seed not endpoint": dict(seeds=["10.0.0.5"]),
    "seeds as a string": dict(seeds="tcp://127.0.0.1:7777"),
    "unbindable listen": dict(listen=["tcp://999.1.1.1:0"]),
}


@pytest.mark.parametrize("kwargs", BAD_NODE_ARGS.values(), ids=BAD_NODE_ARGS.keys())
def test_bad_node_options_raise_config_error(kwargs, cluster):
    kwargs = {"name": "bad", "cluster": cluster, "discovery": "none", **kwargs}
    node = None
    try:
        with pytest.raises(ConfigError):
            node = mesh.Node(**kwargs)
            node.start()
    finally:
        if node is not None:
            node.close()


# Option *values* of the wrong type or range. The contract: errors derive from
# MeshError (ConfigError for options), at construction or start(), never a node
# that starts and then dies in its I/O thread, nor a bare TypeError.
BAD_OPTION_VALUES = {
    "heartbeat_interval str": dict(heartbeat_interval="fast"),
    "heartbeat_interval negative": dict(heartbeat_interval=-1.0),
    "peer_timeout zero": dict(peer_timeout=0),
    "rcvhwm str": dict(rcvhwm="lots"),
    "sndhwm str": dict(sndhwm="lots"),
    "max_message_size negative": dict(max_message_size=-1),
    "listen endpoint without scheme": dict(listen=["0.0.0.0:7777"]),
}


def test_listen_accepts_one_bare_endpoint(cluster):
    with mesh.Node("bare", cluster=cluster, discovery="none", listen="tcp://127.0.0.1:0") as node:
        assert len(node.endpoints) == 2  # the tcp endpoint, plus inproc
        assert any(ep.startswith("tcp://127.0.0.1:") for ep in node.endpoints)


@pytest.mark.parametrize("kwargs", BAD_OPTION_VALUES.values(), ids=BAD_OPTION_VALUES.keys())
def test_bad_option_values_raise_config_error(kwargs, cluster):
    node = None
    try:
        with pytest.raises(ConfigError):
            node = mesh.Node("badval", cluster, discovery="none", **kwargs)
            node.start()
    finally:
        if node is not None:
            node.close()


def test_bad_transports_raise_transport_error(cluster):
    with pytest.raises(mesh.TransportError):
        mesh.Node("t", cluster, discovery="none", transports=("carrier-pigeon",))
    with pytest.raises(mesh.TransportError):
        mesh.Node("t", cluster, discovery="none", transports=())


def test_bad_call_arguments_raise_config_error(make_node):
    node = make_node()
    node.subscribe("svc", lambda m: m.respond(b"ok"))
    with pytest.raises(ConfigError):
        node.request("svc", b"", timeout=0)
    with pytest.raises(ConfigError):
        node.request("svc", b"", timeout=-1)
    with pytest.raises(ConfigError):
        node.request("svc", b"", timeout=1.0, retries=-1)
    with pytest.raises(ConfigError):
        node.subscribe("a", lambda m: None, queue="two words")
    with pytest.raises(ConfigError):
        node.subscribe("a", lambda m: None, queue="")
    with pytest.raises(ConfigError):
        node.subscribe("a", handler="not callable")
    assert node.request("svc", b"", timeout=2.0).data == b"ok"  # still fine


def test_methods_before_start_raise_mesh_error(cluster):
    node = mesh.Node("unstarted", cluster, discovery="none")
    try:
        for call in (lambda: node.subscribe("a"), lambda: node.publish("a", b""),
                     lambda: node.request("a", b""), lambda: node.wait_for_peers(1, 0.1)):
            with pytest.raises(MeshError):
                call()
    finally:
        node.close()


# ---------------------------------------------------------------------------- status


def test_status_is_json_serialisable(make_node):
    a = make_node("a")
    b = make_node("b", seeds=[a.endpoints[0]])
    a.wait_for_peers(1, timeout=5)
    b.wait_for_peers(1, timeout=5)  # both sides (see test_hostile.py: handshake races)
    sub = b.subscribe("s.>")
    a.wait_for_subscribers("s.x", 1, timeout=5)
    a.publish("s.x", np.arange(4))
    sub.next(timeout=5)
    b.subscribe("h", lambda m: 1 / 0)
    b.publish("h", b"")
    for node in (a, b):
        status = node.status()
        text = json.dumps(status, allow_nan=False)  # strict JSON
        back = json.loads(text)
        assert back["name"] == node.name and back["id"] == node.id
        assert {"peers", "counters", "subscriptions", "endpoints"} <= set(back)
        assert {"msgs_in", "msgs_out", "drops", "gaps"} <= set(back["counters"])
    a.close()
    json.dumps(a.status(), allow_nan=False)  # after close too


# ---------------------------------------------------------------------------- local delivery


def test_local_delivery_has_no_socket_hop(make_node):
    node = make_node()
    c1, c2 = Collect(), Collect()
    node.subscribe("grad.*.layer1", c1)
    node.subscribe("grad.>", c2)
    pull = node.subscribe("grad.w1.layer1")
    for i in range(1, 11):
        node.publish("grad.w1.layer1", str(i).encode(), headers={"i": i})
    node.publish("grad.w1.layer2", b"only-c2")
    got1, got2 = c1.wait(10), c2.wait(11)
    assert [m.data for m in got1] == [str(i).encode() for i in range(1, 11)]
    assert [m.seq for m in got1] == list(range(1, 11))
    assert [m.headers["i"] for m in got1] == list(range(1, 11))
    assert got2[-1].data == b"only-c2" and got2[-1].subject == "grad.w1.layer2"
    assert all(m.sender == node.id for m in got1 + got2)
    assert [pull.next(timeout=1).data for _ in range(10)] == [m.data for m in got1]
    counters = node.status()["counters"]
    assert counters["msgs_out"] == 0 and counters["msgs_in"] == 0, counters
    assert counters["bytes_out"] == 0


def test_local_array_delivery_is_zero_copy_and_read_only(make_node):
    node = make_node()
    sub = node.subscribe("arr")
    arr = np.arange(100_000, dtype=np.float32).reshape(100, 1000)
    node.publish("arr", arr)
    got = sub.next(timeout=2).array()
    assert got.dtype == arr.dtype and got.shape == arr.shape
    np.testing.assert_array_equal(got, arr)
    assert np.shares_memory(got, arr)
    assert not got.flags.writeable


def test_msg_array_on_bytes_raises_mesh_error(make_node):
    node = make_node()
    sub = node.subscribe("b")
    node.publish("b", b"bytes")
    msg = sub.next(timeout=2)
    with pytest.raises(MeshError):
        msg.array()


def test_all_payload_types_arrive_locally(make_node):
    node = make_node()
    sub = node.subscribe("t")
    big = bytearray(b"z" * 100_000)
    for payload in (b"bytes", bytearray(b"ba"), memoryview(b"mv"), "str", big, b""):
        node.publish("t", payload)
    expected = [b"bytes", b"ba", b"mv", b"str", bytes(big), b""]
    assert [bytes(sub.next(timeout=2).data) for _ in expected] == expected


def test_small_mutable_payload_is_copied_for_local_subscribers(make_node):
    node = make_node()
    sub = node.subscribe("t")
    buf = bytearray(b"before")
    node.publish("t", buf)
    buf[:] = b"after!"
    assert bytes(sub.next(timeout=2).data) == b"before"


def test_wildcards_match_locally(make_node):
    node = make_node()
    star, gt = node.subscribe("a.*"), node.subscribe("a.>")
    for s in ("a", "a.b", "a.b.c", "b.a"):
        node.publish(s, s.encode())
    assert star.next(timeout=1).subject == "a.b"
    assert [gt.next(timeout=1).subject for _ in range(2)] == ["a.b", "a.b.c"]
    with pytest.raises(mesh.TimeoutError):
        star.next(timeout=0.05)
    with pytest.raises(mesh.TimeoutError):
        gt.next(timeout=0.05)


# ---------------------------------------------------------------------------- pull subscriptions


def test_pull_next_returns_messages_in_order(make_node):
    node = make_node()
    sub = node.subscribe("q.>")
    for i in range(1, 201):
        node.publish("q.x", str(i).encode())
    assert sub.pending == 200
    msgs = [sub.next(timeout=1) for _ in range(200)]
    assert [m.seq for m in msgs] == list(range(1, 201))
    assert [int(m.data) for m in msgs] == list(range(1, 201))
    assert sub.delivered == 200 and sub.pending == 0


def test_pull_next_times_out_when_empty(make_node):
    node = make_node()
    sub = node.subscribe("empty")
    t0 = time.monotonic()
    with pytest.raises(mesh.TimeoutError) as info:
        sub.next(timeout=0.2)
    assert 0.15 <= time.monotonic() - t0 < 3.0
    assert isinstance(info.value, TimeoutError)  # also the builtin


def test_next_on_a_handler_subscription_is_an_error(make_node):
    node = make_node()
    sub = node.subscribe("h", lambda m: None)
    with pytest.raises(MeshError):
        sub.next(timeout=0.1)


def test_iteration_ends_on_close(make_node):
    node = make_node()
    sub = node.subscribe("it")
    thread, res = run_in_thread(lambda: [m.data for m in sub])
    for i in range(5):
        node.publish("it", str(i).encode())
    sub.close()
    thread.join(5.0)
    assert not thread.is_alive(), "iteration did not end after close()"
    assert res == {"value": [str(i).encode() for i in range(5)]}


def test_iteration_ends_on_node_close(make_node):
    node = make_node()
    sub = node.subscribe("it")
    thread, res = run_in_thread(lambda: [m.data for m in sub])
    node.publish("it", b"one")
    node.close()
    thread.join(5.0)
    assert not thread.is_alive(), "iteration did not end after node.close()"
    assert res == {"value": [b"one"]}


@pytest.mark.parametrize("closer", ["subscription", "unsubscribe", "node"])
def test_blocked_next_is_woken_by_close(make_node, closer):
    node = make_node()
    sub = node.subscribe("blocked")
    started = threading.Event()

    def blocked():
        started.set()
        return sub.next(timeout=30)

    thread, res = run_in_thread(blocked)
    assert started.wait(2)
    t0 = time.monotonic()
    {"subscription": sub.close, "unsubscribe": lambda: node.unsubscribe(sub),
     "node": node.close}[closer]()
    thread.join(5.0)
    assert not thread.is_alive(), "next() stayed blocked after close"
    assert time.monotonic() - t0 < 5.0
    assert isinstance(res.get("error"), ClosedError), res


def test_pending_messages_can_be_drained_after_close(make_node):
    node = make_node()
    sub = node.subscribe("d")
    node.publish("d", b"1")
    node.publish("d", b"2")
    sub.close()
    assert [m.data for m in sub] == [b"1", b"2"]
    with pytest.raises(ClosedError):
        sub.next(timeout=0.1)


# ---------------------------------------------------------------------------- handlers


def test_handler_exceptions_do_not_kill_the_dispatcher(make_node):
    node = make_node()
    good = Collect()

    def bad(msg):
        if int(msg.data) % 2:
            raise ValueError("handler bug")

    node.subscribe("h", bad)
    node.subscribe("h", good)
    for i in range(1, 11):
        node.publish("h", str(i).encode())
    assert [int(m.data) for m in good.wait(10)] == list(range(1, 11))
    # and it still runs handlers published after the errors
    node.publish("h", b"12")
    assert good.wait(11)[-1].data == b"12"
    assert node.status()["counters"]["drops"].get("handler_error") == 5


def test_handlers_of_a_slow_subscriber_do_not_block_publish(make_node):
    node = make_node()
    release = threading.Event()
    node.subscribe("slow", lambda m: release.wait(10))
    t0 = time.monotonic()
    for _ in range(100):
        node.publish("slow", b"x")
    assert time.monotonic() - t0 < 2.0
    release.set()


def test_unsubscribe_stops_delivery(make_node):
    node = make_node()
    keep, drop = Collect(), Collect()
    node.subscribe("u", keep)
    sub = node.subscribe("u", drop)
    node.publish("u", b"1")
    drop.wait(1)
    node.unsubscribe(sub)
    assert sub.closed
    node.unsubscribe(sub)  # idempotent
    for i in range(2, 6):
        node.publish("u", str(i).encode())
    keep.wait(5)  # the dispatcher got past all of them
    assert [m.data for m in drop.msgs] == [b"1"]
    statuses = node.status()["subscriptions"]
    assert len(statuses) == 1
    # the last subscription gone: no interest left at all
    pull = node.subscribe("u2")
    pull.close()
    node.publish("u2", b"nobody")
    with pytest.raises(ClosedError):
        pull.next(timeout=0.1)
    with pytest.raises(mesh.NoRespondersError):
        node.request("u2", b"", timeout=1)


# ---------------------------------------------------------------------------- request/reply


def test_local_request_reply(make_node):
    node = make_node()
    seen = []

    def responder(msg):
        seen.append(msg.request_id)
        assert msg.is_request
        msg.respond(b"re:" + bytes(msg.data), headers={"h": 1})

    node.subscribe("svc.echo", responder)
    for i in range(20):
        reply = node.request("svc.echo", f"q{i}".encode(), timeout=2.0)
        assert reply.data == f"re:q{i}".encode()
        assert reply.headers == {"h": 1}
        assert reply.sender == node.id
    assert len(set(seen)) == 20  # a fresh request id per request


def test_local_request_reply_with_arrays(make_node):
    node = make_node()
    node.subscribe("svc.double", lambda m: m.respond(m.array() * 2))
    arr = np.arange(12, dtype=np.int32).reshape(3, 4)
    reply = node.request("svc.double", arr, timeout=2.0)
    out = reply.array()
    assert out.dtype == np.int32 and out.shape == (3, 4)
    np.testing.assert_array_equal(out, arr * 2)


def test_respond_to_a_plain_message_is_an_error(make_node):
    node = make_node()
    sub = node.subscribe("plain")
    node.publish("plain", b"x")
    msg = sub.next(timeout=1)
    assert not msg.is_request and msg.request_id is None
    with pytest.raises(MeshError):
        msg.respond(b"nope")


def test_local_request_times_out(make_node):
    node = make_node()
    node.subscribe("mute", lambda m: None)
    t0 = time.monotonic()
    with pytest.raises(mesh.TimeoutError):
        node.request("mute", b"", timeout=0.1, retries=2)
    assert 0.25 <= time.monotonic() - t0 < 3.0


def test_no_responders_fails_at_once(make_node):
    node = make_node()
    node.subscribe("other.subject")
    t0 = time.monotonic()
    with pytest.raises(mesh.NoRespondersError):
        node.request("nobody.home", b"", timeout=5.0, retries=3)
    assert time.monotonic() - t0 < 0.5


def test_request_from_a_handler_to_a_local_responder(make_node):
    """A handler that calls a service of its own node (a common pattern: a service
    using another one) must get the answer, not wait out its timeout."""
    node = make_node()
    node.subscribe("inner", lambda m: m.respond(b"inner-ok"))
    inner_reply = {}

    def outer(msg):
        try:
            inner_reply["value"] = node.request("inner", b"", timeout=2.0).data
        except MeshError as exc:
            inner_reply["value"] = repr(exc)
        msg.respond(b"outer-done")

    node.subscribe("outer", outer)
    reply = node.request("outer", b"", timeout=5.0)
    assert reply.data == b"outer-done"
    assert inner_reply["value"] == b"inner-ok"


def test_close_from_inside_a_handler(make_node):
    node = make_node()
    done = threading.Event()

    def handler(msg):
        node.close()
        done.set()

    node.subscribe("bye", handler)
    node.publish("bye", b"")
    assert done.wait(5.0), "close() from a handler did not return"
    assert node.status()["closed"] is True
    with pytest.raises(ClosedError):
        node.publish("bye", b"")


def test_publish_from_inside_a_handler(make_node):
    node = make_node()
    sink = node.subscribe("out")
    node.subscribe("in", lambda m: node.publish("out", b"fwd:" + bytes(m.data)))
    for i in range(5):
        node.publish("in", str(i).encode())
    assert [sink.next(timeout=2).data for _ in range(5)] == [b"fwd:%d" % i for i in range(5)]


def test_a_handler_publishes_beyond_the_window_of_a_handler_of_its_own_node(make_node):
    """A handler that publishes more than the window of another handler of the same
    node (a fan-out stage, a pipeline within one process) with overflow="block" and
    no timeout: that credit can only come back through the dispatch thread the
    publisher runs on, so publish() runs that handler's queued calls while it waits
    (it used to wait forever; with timeout= it raised BackpressureError). Calls of
    other handlers queued meanwhile (here: more stage1 messages) are not nested:
    they run after, in order."""
    node = make_node()
    got: list[bytes] = []
    node.subscribe("stage2", lambda m: got.append(bytes(m.data)), credits=8)
    finished: list[bytes] = []
    errors: list[str] = []
    depth = [0, 0]  # current, deepest stage1 nesting

    def stage1(msg):
        depth[0] += 1
        depth[1] = max(depth)
        try:
            for i in range(50):
                node.publish("stage2", bytes(msg.data) + b":%d" % i)  # no timeout
        except MeshError as exc:
            errors.append(repr(exc))
        depth[0] -= 1
        finished.append(bytes(msg.data))

    node.subscribe("stage1", stage1)
    for k in range(5):
        node.publish("stage1", b"%d" % k)
    assert wait_until(lambda: len(finished) == 5, 10.0), f"stage2 got {len(got)}"
    assert not errors and depth[1] == 1
    assert finished == [b"%d" % k for k in range(5)]
    assert wait_until(lambda: len(got) == 250, 5.0)
    assert got == [b"%d:%d" % (k, i) for k in range(5) for i in range(50)]  # in order
    assert node.status()["counters"]["drops"] == {}, node.status()["counters"]["drops"]


def test_wait_for_subscribers_counts_this_node(make_node):
    node = make_node()
    with pytest.raises(mesh.TimeoutError):
        node.wait_for_subscribers("w.x", 1, timeout=0.1)
    node.subscribe("w.*")
    assert node.wait_for_subscribers("w.x", 1, timeout=1) == 1
    t0 = time.monotonic()
    with pytest.raises(mesh.TimeoutError):
        node.wait_for_subscribers("w.x", 2, timeout=0.2)
    assert time.monotonic() - t0 < 3.0


def test_wait_for_peers_times_out_alone(make_node):
    node = make_node()
    assert node.peers() == []
    with pytest.raises(mesh.TimeoutError):
        node.wait_for_peers(1, timeout=0.1)


# ---------------------------------------------------------------------------- two nodes, one process


def test_two_nodes_in_one_process_use_inproc(make_node):
    a = make_node("a")
    tcp = next(ep for ep in a.endpoints if ep.startswith("tcp://")).replace("0.0.0.0", "127.0.0.1")
    b = make_node("b", seeds=[tcp])
    assert [p.name for p in a.wait_for_peers(1, timeout=5)] == ["b"]
    assert [p.name for p in b.wait_for_peers(1, timeout=5)] == ["a"]
    for node in (a, b):
        (peer,) = node.status()["peers"]
        assert peer["transport"] == "inproc", peer
        assert peer["state"] == "alive"
    # and traffic flows both ways, in order
    sub = b.subscribe("x.>")
    b.subscribe("svc", lambda m: m.respond(b"pong"))
    a.wait_for_subscribers("x.y", 1, timeout=5)
    a.wait_for_subscribers("svc", 1, timeout=5)
    for i in range(1, 51):
        a.publish("x.y", str(i).encode())
    msgs = [sub.next(timeout=5) for _ in range(50)]
    assert [m.seq for m in msgs] == list(range(1, 51))
    assert all(m.sender == a.id for m in msgs)
    assert a.request("svc", b"ping", timeout=2).data == b"pong"
    assert a.status()["peers"][0]["msgs_out"] >= 51


def test_goodbye_between_in_process_nodes(make_node):
    a = make_node("a")
    b = make_node("b", seeds=[a.endpoints[0]])
    a.wait_for_peers(1, timeout=5)
    b.wait_for_peers(1, timeout=5)  # both sides (see test_hostile.py: handshake races)
    t0 = time.monotonic()
    b.close()
    assert wait_until(lambda: not a.peers(), timeout=2.0), "a still lists b after its goodbye"
    assert time.monotonic() - t0 < 1.0
    assert a.status()["peers"][0]["state"] == "left"


def test_membership_events_reach_on_peer_and_mesh_peers_subjects(make_node):
    import msgpack

    a = make_node("a")
    events: list = []
    seen = threading.Event()

    def on_peer(event, info):
        events.append((event, info.name, info.state))
        if event == "left":
            seen.set()

    a.on_peer(on_peer)
    joined = a.subscribe("_mesh.peers.joined")
    left = a.subscribe("_mesh.peers.left")
    b = make_node("b", seeds=[a.endpoints[0]])
    a.wait_for_peers(1, timeout=10)
    body = msgpack.unpackb(joined.next(timeout=5).data)
    assert body["name"] == "b" and body["state"] == "alive"
    # a sees b as soon as b's hello arrives, before b has a's answer: closed then,
    # b would not know a to say goodbye to, and a would only see it die (SWIM).
    b.wait_for_peers(1, timeout=10)
    b.close()
    assert msgpack.unpackb(left.next(timeout=5).data)["name"] == "b"
    assert seen.wait(5)
    assert ("joined", "b", "alive") in events and ("left", "b", "left") in events
    with pytest.raises(ConfigError):
        a.on_peer("not callable")


def test_static_seeds_combine_with_zeroconf(make_node):
    """A zeroconf node (mDNS on loopback only) still dials its seeds: it reaches a
    node that mDNS cannot find, and both find a third one through mDNS."""
    hidden = make_node("hidden")  # discovery "none": never announced
    zc = make_node("zc", discovery="zeroconf", interfaces=["lo"], seeds=[hidden.endpoints[0]])
    other = make_node("other", discovery="zeroconf", interfaces=["lo"])
    names = {p.name for p in zc.wait_for_peers(2, timeout=15)}
    assert names == {"hidden", "other"}
    # hidden learns of "other" through zc's gossip, not mDNS
    assert {p.name for p in hidden.wait_for_peers(2, timeout=15)} == {"zc", "other"}
    assert {p.name for p in other.wait_for_peers(2, timeout=15)} == {"zc", "hidden"}


def test_a_hello_from_a_suspect_peer_keeps_its_link(make_node):
    """A peer SWIM suspects (it missed probes: frozen, or a loaded machine) that says
    hello is alive: the hello must not rebuild its link, which would drop what is
    queued on it (seen as a test's 1,258 messages dropped for "no_link" after a
    subscriber's 0.6 s SIGSTOP). It is marked alive again, with an "alive" event."""
    import zmq

    from mesh import wire

    a = make_node("a", transports=("ipc",))
    b = make_node("b", transports=("ipc",), seeds=[a.endpoints[0]])
    b.wait_for_peers(1, timeout=10)
    a.wait_for_peers(1, timeout=10)
    link = b._links[a.id]
    b._peers[a.id].state = "suspect"  # as b's membership would after a missed probe
    raw = zmq.Context.instance().socket(zmq.DEALER)
    try:
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(b.endpoints[0])
        raw.send(wire.pack(wire.HELLO, a._hello_body(True)))  # a's hello, as a sends it
        assert wait_until(lambda: b._peers[a.id].state == "alive", timeout=5.0)
    finally:
        raw.close(linger=0)
    assert b._links[a.id] is link and not link.closed
    assert b.membership_events["alive"] >= 1


# ---------------------------------------------------------------------------- inline handlers


def inline_pair(make_node, **options):
    a = make_node("a", **options)
    b = make_node("b", seeds=[a.endpoints[0]], **options)
    b.wait_for_peers(1, timeout=10)
    return a, b


def test_an_inline_handler_runs_on_the_io_thread_and_may_publish_and_respond(make_node):
    a, b = inline_pair(make_node)
    threads: list[str] = []
    echoed = Collect()

    def ping(msg):
        threads.append(threading.current_thread().name)
        b.publish("pong", msg.data)  # publishing from the I/O thread sends directly
        if msg.is_request:
            msg.respond(b"r:" + bytes(msg.data))

    b.subscribe("ping", ping, inline=True)
    a.subscribe("pong", echoed)
    a.wait_for_subscribers("ping", 1, timeout=5)
    b.wait_for_subscribers("pong", 1, timeout=5)
    for i in range(20):
        a.publish("ping", b"%d" % i)
    assert [bytes(m.data) for m in echoed.wait(20)] == [b"%d" % i for i in range(20)]
    assert a.request("ping", b"q", timeout=5).data == b"r:q"
    assert set(threads) == {f"mesh-io-{b.name}"}, threads

    def row():
        return next(s for s in b.status()["subscriptions"] if s["pattern"] == "ping")

    assert wait_until(lambda: row()["delivered"] == 21, 5), row()  # counted once it returned
    assert row()["inline"] is True


def test_an_inline_handler_over_its_budget_is_logged_once_and_moved(make_node, caplog):
    a, b = inline_pair(make_node, inline_budget=0.005)
    threads: list[str] = []
    done = Collect()

    def slow(msg):
        threads.append(threading.current_thread().name)
        time.sleep(0.02)
        done(msg)

    b.subscribe("slow", slow, inline=True)
    a.wait_for_subscribers("slow", 1, timeout=5)
    with caplog.at_level("INFO", logger="mesh"):
        for i in range(5):
            a.publish("slow", b"%d" % i)
        assert [bytes(m.data) for m in done.wait(5)] == [b"%d" % i for i in range(5)]
    # Once over the budget, then on the dispatch thread.
    assert threads[:1] == [f"mesh-io-{b.name}"], threads
    assert set(threads[1:]) == {f"mesh-dispatch-{b.name}"}, threads
    lines = [r.getMessage() for r in caplog.records if "inline_budget" in r.getMessage()]
    assert len(lines) == 1 and "'slow'" in lines[0], lines
    (row,) = [s for s in b.status()["subscriptions"] if s["pattern"] == "slow"]
    assert row["inline"] is False


def test_inline_needs_a_handler_and_refuses_a_request_inside(make_node):
    a, b = inline_pair(make_node)
    with pytest.raises(ConfigError, match="handler"):
        b.subscribe("x", inline=True)
    b.subscribe("svc", lambda m: m.respond(b"ok"))
    errors: list[str] = []

    def asks(msg):
        try:
            b.request("svc", b"", timeout=1)
        except MeshError as exc:
            errors.append(str(exc))

    b.subscribe("asks", asks, inline=True)
    a.wait_for_subscribers("asks", 1, timeout=5)
    a.publish("asks", b"")
    assert wait_until(lambda: errors, 5)
    assert "inline" in errors[0]


def test_an_inline_handler_may_close_its_node(make_node):
    a, b = inline_pair(make_node)
    closed = threading.Event()

    def stop(msg):
        b.close()  # on b's own I/O thread: it must not wait for itself
        closed.set()

    b.subscribe("stop", stop, inline=True)
    a.wait_for_subscribers("stop", 1, timeout=5)
    a.publish("stop", b"")
    assert closed.wait(5)
    assert wait_until(lambda: not b._io_thread.is_alive(), 5)
    assert b.status()["closed"] and b.status()["counters"]["drops"].get("handler_error") is None
    assert wait_until(lambda: not a.peers(), 5)  # its goodbye went out


def _frames_read_from(node, sender, monkeypatch) -> list[int]:
    """Spy on what ``node``'s I/O thread reads from ``sender``: for each data message
    or reply, the frames from its header on (1: it came in one frame; 2: a header
    and its payload frame), past credit riding in front. (The compiled build reads
    one-frame messages through engine/zcore.py, without frame objects: spied there.)"""
    from mesh.engine import zcore
    from mesh.engine.common import _header_kind

    seen: list[int] = []
    handle = node._handle_frames
    prefix = sender.id.encode()
    watching = zcore._watch  # another node's spy (both nodes live in this process)

    def spy_one(owner, ident, head, handled):
        if owner is node and ident.split(b"/")[0] == prefix:
            seen.append(1)  # one frame (on_one took it, or _handle_one after it)
        elif watching is not None:
            watching(owner, ident, head, handled)

    monkeypatch.setattr(zcore, "_watch", spy_one)

    def spy(frames, now, ordered=False):
        if frames[0].bytes.split(b"/")[0] == prefix:
            for index in range(1, len(frames)):
                if _header_kind(frames[index]) in (wire.MSG, wire.REPLY):
                    seen.append(len(frames) - index)
                    break
        handle(frames, now, ordered)

    node._handle_frames = spy
    return seen


def test_small_messages_and_replies_cross_in_one_frame(make_node, monkeypatch):
    """A small lone message or plain reply is one zmq frame (one send, one recv after
    the identity: fewer GIL hand-overs per message); a larger one keeps its payload
    frame. Every size arrives whole and in order, by handler and by next()."""
    a, b = inline_pair(make_node, batch_bytes=0)  # no batching: every message goes lone
    into_b, into_a = _frames_read_from(b, a, monkeypatch), _frames_read_from(a, b, monkeypatch)
    pulled = b.subscribe("x")
    handled = Collect()
    b.subscribe("y", handled, inline=True)
    b.subscribe("svc", lambda m: m.respond(bytes(m.data) * 2))
    for subject in ("x", "y", "svc"):
        a.wait_for_subscribers(subject, 1, timeout=5)
    sizes = [0, 1, 64, wire.ONE_FRAME_MAX, wire.ONE_FRAME_MAX + 1, 200_000]
    payloads = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
    for data in payloads:
        a.publish("x", data)
        a.publish("y", data)
    assert [bytes(pulled.next(timeout=5).data) for _ in sizes] == payloads
    msgs = handled.wait(len(sizes))
    assert [bytes(m.data) for m in msgs] == payloads
    assert [m.seq for m in msgs] == sorted(m.seq for m in msgs)
    one_frame = [n <= wire.ONE_FRAME_MAX for n in sizes]
    assert [n == 1 for n in into_b[:: 2]] == one_frame, into_b  # the "x" messages
    assert [n == 1 for n in into_b[1:: 2]] == one_frame, into_b  # the "y" messages
    for data in (b"", b"ping", b"z" * (wire.ONE_FRAME_MAX // 2 + 1)):
        assert a.request("svc", data, timeout=5).data == data * 2
    # The requests are small lone messages; the replies one frame up to the bound.
    assert into_b[len(payloads) * 2:] == [1, 1, 1], into_b
    assert into_a == [1, 1, 2], into_a

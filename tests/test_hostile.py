"""Hostile traffic against a node running in its own process.

Contract (API.md, "Errors"): malformed or hostile frames from the network are
dropped and counted, and never crash the node or its peers.

Setup: node "h" in one worker process, a normal peer "n" in another. From the
test process, raw ZeroMQ DEALER sockets talk to h's tcp endpoint:

* anonymous sockets (random identities, never said hello) send random frame
  lists, truncated valid headers, wrong protocol versions, unknown kinds, MSG
  and control messages;
* a "fake peer" socket completes a real HELLO (bogus endpoint: h cannot connect
  back, which is fine) and then sends MSG frames with tensor descriptors that
  declare huge shapes, wrong frame counts and bad interest entries.

Oracle, per example: after the hostile frames, the same socket sends a
STATUS_REQ (what mesh-status sends). Frames of one connection are handled in
order, so the STATUS reply proves h survived and has handled the hostile frames,
and its counters tell how many drops they caused.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import uuid
from collections import Counter

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh import flow, tensor, wire

pytestmark = pytest.mark.timeout(60)

# Drops that h counts for its own sends towards the fake peer (whose advertised
# endpoint is unreachable), not for the hostile frames themselves.
SEND_SIDE = {"control_queue_full", "peer_queue_full", "no_link"}
FAKE_ID = "fa" + uuid.uuid4().hex[:14]
FAKE_EP = "tcp://192.0.2.1:9"  # TEST-NET-1: never answers


def hostile_drops(status: dict) -> int:
    return sum(n for reason, n in status["counters"]["drops"].items() if reason not in SEND_SIDE)


class Raw:
    """A raw DEALER towards a node; ``status()`` doubles as a barrier."""

    _tokens = itertools.count(1)

    def __init__(self, ctx: zmq.Context, endpoint: str, ident: bytes) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, ident)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, 5000)
        self.sock.connect(endpoint)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def status(self, timeout: float = 10.0) -> dict:
        token = next(self._tokens)
        self.sock.send(wire.pack(wire.STATUS_REQ, token))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the node did not answer a STATUS_REQ: dead or stuck"
            if not self.sock.poll(int(remaining * 1000) + 1):
                continue
            frames = self.sock.recv_multipart()
            header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
            if header[1] == wire.STATUS and header[2][0] == token:
                return header[2][1]
            # anything else (a hello ack, a ping, an older status) is skipped

    def close(self) -> None:
        self.sock.close(linger=0)


def fake_hello(cluster: str, **changes) -> bytes:
    body = {
        "id": FAKE_ID,
        "name": "fake",
        "cluster": cluster,
        "eps": {"tcp": [FAKE_EP]},
        "host": "hostile-host",
        "proc": "hostile-host/1",
        "iv": 0,
        "int": [],
        "ack": False,
    }
    body.update(changes)
    return wire.pack(wire.HELLO, body)


@pytest.fixture
def target(procs):
    """h (with a responder) and its normal peer n, both in their own process."""
    h = procs.start("h", listen=("tcp://0.0.0.0:0", "ipc://auto"))
    h.call("subscribe", pattern="svc.echo", mode="echo")
    n = procs.start("n", seeds=[h.tcp])
    h.call("wait_for_peers", n=1, timeout=15)
    n.call("wait_for_subscribers", subject="svc.echo", count=1)
    ctx = zmq.Context()
    yield h, n, ctx
    ctx.destroy(linger=0)


def assert_still_serves(h, n) -> dict:
    assert h.process.is_alive(), f"h died: exit code {h.process.exitcode}"
    out = n.call("request", subject="svc.echo", data=b"still there?", timeout=5, retries=1)
    assert "reply" in out, out
    assert out["reply"]["data"] == b"still there?"
    status = h.call("status")
    assert [p["state"] for p in status["peers"] if p["name"] == "n"] == ["alive"]
    assert n.call("peer_names") == ["h"]
    json.dumps(status)
    return status


def connect_fake(ctx, h, cluster) -> Raw:
    fake = Raw(ctx, h.tcp, FAKE_ID.encode())
    fake.send([fake_hello(cluster)])
    status = fake.status()
    assert [p["state"] for p in status["peers"] if p["name"] == "fake"] == ["alive"], status["peers"]
    return fake


# ---------------------------------------------------------------------------- strategies

MSGPACK_INT = st.integers(-(2**63), 2**64 - 1)
LEAF = st.one_of(
    st.none(),
    st.booleans(),
    MSGPACK_INT,
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=12),
)
VALUE = st.recursive(
    LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=6), MSGPACK_INT), inner, max_size=4),
    ),
    max_leaves=12,
)
PAYLOAD = st.lists(st.binary(max_size=32), min_size=0, max_size=3)
IDENT = st.binary(min_size=1, max_size=32).filter(
    lambda b: b[0] != 0 and b != FAKE_ID.encode()
)
UNKNOWN_KIND = st.one_of(
    MSGPACK_INT.filter(lambda k: k not in wire.KIND_NAMES),
    st.text(max_size=8),
    st.none(),
    st.binary(max_size=4),
)
CONTROL_KINDS = [k for k in wire.KIND_NAMES if k not in (wire.HELLO, wire.STATUS_REQ)]


def _valid_headers(cluster: str) -> list[bytes]:
    return [
        wire.pack_msg("a.b", 1, 1.0, 0, {"k": "v"}, 5, [1]),
        wire.pack_msg("grad.w3.layer1", 7, time.time(), wire.TENSOR, None, None, []),
        wire.pack_reply(5, 0, None),
        fake_hello(cluster),
        wire.pack(wire.INTEREST, [1, [["a.b", "", 1, 256, 0, "block"], ["c.>", "q", 2, 256, 0, "block"]], []]),
        wire.pack(wire.INTEREST_FULL, [3, [["a.b", "", 1, 256, 0, "block"]]]),
        wire.pack(wire.PING, [1.0]),
        wire.pack(wire.PEERS, [{"id": "x", "name": "x"}]),
    ]


def anon_cases(cluster: str):
    """(who, frames, expected drops) from sockets that never said hello."""
    valid = _valid_headers(cluster)

    random_frames = st.lists(st.binary(max_size=64), min_size=1, max_size=5)

    @st.composite
    def truncated(draw):
        header = draw(st.sampled_from(valid))
        cut = draw(st.integers(0, len(header) - 1))
        return [header[:cut], *draw(PAYLOAD)]

    @st.composite
    def wrong_version(draw):
        version = draw(VALUE.filter(
            lambda v: not (type(v) in (int, float, bool) and v == wire.PROTOCOL_VERSION)))
        kind = draw(st.sampled_from(list(wire.KIND_NAMES)))
        rest = draw(st.lists(VALUE, min_size=1, max_size=7))
        return [msgpack.packb([version, kind, *rest], use_bin_type=True), *draw(PAYLOAD)]

    @st.composite
    def unknown_kind(draw):
        kind = draw(UNKNOWN_KIND)
        rest = draw(st.lists(VALUE, min_size=1, max_size=7))
        return [msgpack.packb([wire.PROTOCOL_VERSION, kind, *rest], use_bin_type=True),
                *draw(PAYLOAD)]

    @st.composite
    def msg_never_said_hello(draw):
        subject = draw(st.sampled_from(["a.b", "svc.echo", "_mesh.x", "x"]))
        header = wire.pack_msg(subject, draw(st.integers(0, 2**63)), 1.0, 0, None,
                               draw(st.none() | st.integers(0, 2**62)), None)
        return [header, draw(st.binary(max_size=64))]

    @st.composite
    def control_never_said_hello(draw):
        kind = draw(st.sampled_from(CONTROL_KINDS))
        return [wire.pack(kind, draw(VALUE)), *draw(PAYLOAD)]

    @st.composite
    def random_msg_fields(draw):
        kind = draw(st.sampled_from([wire.MSG, wire.REPLY]))
        fields = draw(st.lists(VALUE, min_size=1, max_size=9))
        return [msgpack.packb([wire.PROTOCOL_VERSION, kind, *fields], use_bin_type=True),
                *draw(PAYLOAD)]

    @st.composite
    def fixed_layout(draw):
        # The fixed-layout header of lone messages (wire.pack_msg_lone): random
        # bytes after its marker, or a real one with a field or two made wrong.
        if draw(st.booleans()):
            return [bytes([wire.FIXED]) + draw(st.binary(max_size=48)), *draw(PAYLOAD)]
        head = bytearray(wire.pack_msg_lone(draw(st.sampled_from(["a.b", "svc.echo", "x"])),
                                            1, 1.0, draw(st.none() | st.integers(0, 2**62)), 1))
        how = draw(st.sampled_from(["version", "kind", "flags", "truncated", "utf8", "req_id"]))
        if how == "version":
            head[1] = draw(st.integers(0, 255).filter(lambda v: v != wire.PROTOCOL_VERSION))
        elif how == "kind":
            head[2] = draw(st.integers(0, 255).filter(lambda v: v != wire.MSG))
        elif how == "flags":
            head[3] = draw(st.integers(1, 255))
        elif how == "truncated":
            head = head[: draw(st.integers(1, wire.FIXED_SIZE - 1))]
        elif how == "utf8":
            head += b"\xff\xfe"
        else:
            head[28:36] = draw(st.integers(-(2**63), -2)).to_bytes(8, "little", signed=True)
        return [bytes(head), draw(st.binary(max_size=64))]

    @st.composite
    def one_frame(draw):
        # A small message or reply in one frame (wire.lone_frames, wire.reply_frames):
        # random bytes after the marker, or a real one with something made wrong.
        # From a stranger, each is one drop (malformed, version or unknown_peer).
        if draw(st.booleans()):
            return [bytes([wire.FIXED, wire.PROTOCOL_VERSION, draw(st.sampled_from(
                [wire.MSG, wire.REPLY])), wire.ONE]) + draw(st.binary(max_size=48))]
        payload = [draw(st.binary(max_size=64))]
        if draw(st.booleans()):
            (frame,) = wire.lone_frames(draw(st.sampled_from(["a.b", "svc.echo", "x"])), 1, 1.0,
                                        draw(st.none() | st.integers(0, 2**62)), 1, payload)
        else:
            (frame,) = wire.reply_frames(draw(st.integers(0, 2**62)), 0, None, payload)
        frame = bytearray(frame)
        how = draw(st.sampled_from(["none", "version", "kind", "layout", "truncated",
                                    "subject length", "utf8"]))
        if how == "version":
            frame[1] = draw(st.integers(0, 255).filter(lambda v: v != wire.PROTOCOL_VERSION))
        elif how == "kind":
            frame[2] = draw(st.integers(0, 255).filter(lambda v: v not in (wire.MSG, wire.REPLY)))
        elif how == "layout":
            frame[3] = draw(st.integers(0, 255).filter(lambda v: v != wire.ONE))
        elif how == "truncated":
            frame = frame[: draw(st.integers(1, 12))]
        elif how == "subject length" and frame[2] == wire.MSG:
            frame[wire.ONE_SIZE - 2: wire.ONE_SIZE] = draw(st.integers(len(frame), 65535)).to_bytes(
                2, "little")
        elif how == "utf8" and frame[2] == wire.MSG:
            frame[wire.ONE_SIZE: wire.ONE_SIZE + 1] = b"\xff"
        return [bytes(frame)]

    def exactly_one(frames):
        # A random header may happen to decode as a hello or a status request,
        # which are legitimate from a stranger: no exact count for those.
        try:
            kind = wire.unpack(frames[0])[1]
        except Exception:
            return 1
        return None if kind in (wire.HELLO, wire.STATUS_REQ) else 1

    def tagged(name, strategy):
        return strategy.map(lambda frames: (name, frames, exactly_one(frames)))

    return st.one_of(
        tagged("random frames", random_frames),
        tagged("truncated header", truncated()),
        tagged("wrong version", wrong_version()),
        tagged("unknown kind", unknown_kind()),
        tagged("msg before hello", msg_never_said_hello()),
        tagged("control before hello", control_never_said_hello()),
        tagged("random msg/reply fields", random_msg_fields()),
        tagged("fixed-layout header", fixed_layout()),
        tagged("one-frame message", one_frame()),
    )


HUGE_SHAPES = [(2**40,), (2**20, 2**20), (2**31, 2**31, 4), (1,) * 31 + (2**40,)]
DTYPES = ["<f4", "<f8", "|u1", "<i8", "<c16", "|b1"]
SUBJECTS = st.one_of(
    st.sampled_from(["a.b", "grad.w3.layer1", "_mesh.x", "a.*", "a..b", ">", "", " "]),
    st.text(max_size=20),
).filter(lambda s: not s.startswith("svc"))


def huge_descriptors(dtype: str, shape: tuple) -> list[bytes]:
    """Descriptors declaring ``shape``: with the honest byte count (when it fits the
    u64 field) and one whose nbytes lies (8, matching an 8-byte data frame)."""
    out = [tensor._build(dtype, shape, 8, 0, 0, 0, "")]
    if math.prod(shape) * np.dtype(dtype).itemsize <= 2**64 - 1:
        out.append(tensor.encode_descriptor(dtype, shape))
    return out


def fake_cases(cluster: str):
    """(who, frames, expected drops) from a socket that completed a HELLO."""

    @st.composite
    def huge_tensor(draw):
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.sampled_from(HUGE_SHAPES))
        desc = draw(st.sampled_from(huge_descriptors(dtype, shape)))
        data = draw(st.sampled_from([b"\x00" * 8, b"", b"\x01" * 16]))
        kind = draw(st.sampled_from(["msg", "reply"]))
        if kind == "msg":
            subject = draw(st.sampled_from(["a.b", "grad.w3.layer1", "_mesh.x"]))
            header = wire.pack_msg(subject, 1, 1.0, wire.TENSOR, None, None, [])
        else:
            header = wire.pack_reply(draw(st.integers(0, 2**62)), wire.TENSOR, None)
        return [header, desc, data]

    @st.composite
    def empty_but_huge(draw):
        shape = draw(st.sampled_from([(0, 2**62, 2**62), (2**62, 0, 2**62), (0, 2**63 - 1)]))
        desc = tensor.encode_descriptor("<f8", shape)
        header = wire.pack_msg("a.b", 1, 1.0, wire.TENSOR, None, None, [])
        return [header, desc, b""]

    @st.composite
    def wrong_frame_count(draw):
        is_tensor = draw(st.booleans())
        flags = wire.TENSOR if is_tensor else 0
        kind = draw(st.sampled_from(["msg", "reply"]))
        if kind == "msg":
            header = wire.pack_msg("a.b", 1, 1.0, flags, None, None, [])
        else:
            header = wire.pack_reply(1, flags, None)
        good = 2 if is_tensor else 1
        count = draw(st.integers(0, 5).filter(lambda c: c != good))
        frames = [tensor.encode_descriptor("<f4", (2,)), b"\x00" * 8, b"x", b"y", b"z"][:count]
        return [header, *frames]

    @st.composite
    def garbage_descriptor(draw):
        header = wire.pack_msg("a.b", 1, 1.0, wire.TENSOR, None, None, [])
        desc = bytearray(tensor.encode_descriptor("<f4", (2, 2)))
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(desc) - 1))
            desc[pos] = draw(st.integers(0, 255))
        desc = draw(st.sampled_from([bytes(desc), bytes(desc[: len(desc) // 2]), b"", b"MTEN"]))
        return [header, desc, b"\x00" * 16]

    bad_entry = st.one_of(
        LEAF,
        st.lists(st.text(max_size=5), min_size=0, max_size=1),
        st.lists(st.text(max_size=5), min_size=3, max_size=4),
        st.tuples(VALUE.filter(lambda v: type(v) is not str), st.text(max_size=5)).map(list),
        st.tuples(st.text(max_size=5), VALUE.filter(lambda v: type(v) is not str)).map(list),
    )

    @st.composite
    def bad_interest_entries(draw):
        entries = draw(st.lists(st.sampled_from([["a.b", "", 1, 256, 0, "block"], ["c.>", "q", 2, 256, 0, "block"]]), max_size=2))
        entries.insert(draw(st.integers(0, len(entries))), draw(bad_entry))
        where = draw(st.sampled_from(["delta adds", "delta removes", "full", "hello"]))
        if where == "delta adds":
            return [wire.pack(wire.INTEREST, [draw(st.integers(1, 5)), entries, []])]
        if where == "delta removes":
            return [wire.pack(wire.INTEREST, [draw(st.integers(1, 5)), [], entries])]
        if where == "full":
            return [wire.pack(wire.INTEREST_FULL, [draw(st.integers(0, 5)), entries])]
        return [fake_hello(cluster, int=entries)]

    @st.composite
    def malformed_interest_body(draw):
        kind = draw(st.sampled_from([wire.INTEREST, wire.INTEREST_FULL]))
        body = draw(VALUE.filter(lambda v: not (type(v) is list and len(v) in (2, 3))))
        return [wire.pack(kind, body)]

    @st.composite
    def random_msg(draw):
        # Well-formed or not, a MSG on a subject nobody at h wants is dropped and counted.
        subject = draw(SUBJECTS)
        fields = [
            subject,
            draw(MSGPACK_INT | VALUE),
            draw(st.floats(allow_nan=False, allow_infinity=False) | VALUE),
            draw(st.integers(0, 3) | VALUE),
            draw(st.none() | st.dictionaries(st.text(max_size=4), LEAF, max_size=3) | VALUE),
            draw(st.none() | st.integers(0, 2**62) | VALUE),
            draw(st.none() | st.lists(st.text(max_size=4), max_size=3) | VALUE),
        ]
        header = msgpack.packb([wire.PROTOCOL_VERSION, wire.MSG, *fields], use_bin_type=True)
        return [header, *draw(st.lists(st.binary(max_size=16), min_size=1, max_size=3))]

    @st.composite
    def one_frame_from_peer(draw):
        # A small message or reply in one frame from a peer that said hello: broken
        # ones are malformed; whole ones name a subscription h does not have, or
        # answer a request h never made (one drop each, as no_subscriber, not_subscribed,
        # no_interest or late_reply).
        payload = [draw(st.binary(max_size=64))]
        if draw(st.booleans()):
            (frame,) = wire.lone_frames(draw(st.sampled_from(["a.b", "svc.echo", "x"])), 1, 1.0,
                                        None, 2**40 + draw(st.integers(0, 9)), payload)
        else:
            (frame,) = wire.reply_frames(draw(st.integers(0, 2**62)), 0, None, payload)
        if draw(st.booleans()):
            frame = frame[: draw(st.integers(1, len(frame) - len(payload[0]) - 1))]
        return [frame]

    @st.composite
    def gossip(draw):
        # Peer summaries, some well-formed (h then tries to reach them: bogus
        # endpoints, h's business), some not.
        def summary():
            return st.fixed_dictionaries({
                "id": st.text(min_size=1, max_size=16),
                "name": st.text(max_size=8),
                "cluster": st.sampled_from([cluster, "other-cluster"]),
                "eps": st.dictionaries(
                    st.sampled_from(["tcp", "ipc", "inproc", "rdma"]),
                    st.lists(st.sampled_from(["tcp://192.0.2.7:1", "tcp://[bad", "bogus://x",
                                              "ipc:///nonexistent/zmesh-x.sock", ""]),
                             max_size=2),
                    max_size=2),
                "host": st.text(max_size=8),
                "proc": st.text(max_size=8),
            })
        body = draw(st.lists(st.one_of(summary(), VALUE), max_size=3) | VALUE)
        return [wire.pack(wire.PEERS, body)]

    @st.composite
    def control(draw):
        kind = draw(st.sampled_from(CONTROL_KINDS))
        return [wire.pack(kind, draw(VALUE)), *draw(st.lists(st.binary(max_size=8), max_size=1))]

    def tagged(name, strategy, expected):
        return strategy.map(lambda frames: (name, frames, expected))

    return st.one_of(
        tagged("gossip from peer", gossip(), None),
        tagged("control from peer", control(), None),
        tagged("huge tensor shape", huge_tensor(), 1),
        tagged("empty tensor, huge dims", empty_but_huge(), 1),
        tagged("wrong frame count", wrong_frame_count(), 1),
        tagged("garbage descriptor", garbage_descriptor(), 1),
        tagged("bad interest entries", bad_interest_entries(), 1),
        tagged("malformed interest body", malformed_interest_body(), 1),
        tagged("random msg from peer", random_msg(), "at least 1"),
        tagged("one-frame from peer", one_frame_from_peer(), 1),
    )


FAKE_CASES = {"one-frame from peer", "huge tensor shape", "empty tensor, huge dims", "wrong frame count",
              "garbage descriptor", "bad interest entries", "malformed interest body",
              "random msg from peer", "gossip from peer", "control from peer"}

# ---------------------------------------------------------------------------- the property


@pytest.mark.timeout(90)
def test_hostile_traffic_is_dropped_counted_and_survived(target, cluster):
    h, n, ctx = target
    fake = connect_fake(ctx, h, cluster)
    seen: Counter = Counter()
    total = {"examples": 0, "must_drop": 0}

    @settings(max_examples=600, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(anon_cases(cluster), fake_cases(cluster)), ident=IDENT)
    def attack(case, ident):
        name, frames, expected = case
        seen[name] += 1
        total["examples"] += 1
        total["must_drop"] += expected is not None
        if name in FAKE_CASES:
            fake.send([fake_hello(cluster)])  # keep it alive (revive it if h timed it out)
            before = hostile_drops(fake.status())
            fake.send(frames)
            after = hostile_drops(fake.status())
        else:
            raw = Raw(ctx, h.tcp, ident)
            try:
                before = hostile_drops(raw.status())
                raw.send(frames)
                after = hostile_drops(raw.status())
            finally:
                raw.close()
        if expected == "at least 1":
            assert after - before >= 1, f"{name}: {frames!r} was not counted"
        elif expected is not None:
            assert after - before == expected, (
                f"{name}: {frames!r} counted {after - before} drops, expected {expected}"
            )

    try:
        attack()
    finally:
        fake.close()
    print(f"\nhostile cases: {dict(seen)}")
    assert total["examples"] >= 100
    assert len(seen) >= 16, f"some kinds of hostile traffic were never generated: {dict(seen)}"
    status = assert_still_serves(h, n)
    drops = status["counters"]["drops"]
    assert hostile_drops(status) >= total["must_drop"], drops
    for reason in ("malformed", "unknown_peer", "version", "unknown_kind", "size_mismatch"):
        assert drops.get(reason, 0) > 0, f"no {reason!r} drops: {drops}"
    # n, the normal peer, was never bothered
    n_drops = n.call("status")["counters"]["drops"]
    assert not {k: v for k, v in n_drops.items() if k not in SEND_SIDE}, n_drops


# ---------------------------------------------------------------------------- pinned cases


def test_huge_declared_tensor_shapes_are_dropped(target, cluster):
    h, n, ctx = target
    fake = connect_fake(ctx, h, cluster)
    try:
        for shape in HUGE_SHAPES:
            for desc in huge_descriptors("<f4", shape):
                before = fake.status()["counters"]["drops"].get("size_mismatch", 0)
                header = wire.pack_msg("a.b", 1, 1.0, wire.TENSOR, None, None, [])
                fake.send([header, desc, b"\x00" * 8])
                after = fake.status()["counters"]["drops"].get("size_mismatch", 0)
                assert after == before + 1, shape
    finally:
        fake.close()
    assert_still_serves(h, n)


def test_tensor_to_a_subscriber_with_a_lying_descriptor_is_not_delivered(procs, cluster):
    h = procs.start("h")
    sid = h.call("subscribe", pattern="grad.>")
    (mesh_sid,) = [s["sid"] for s in h.call("status")["subscriptions"] if s["pattern"] == "grad.>"]
    ctx = zmq.Context()
    try:
        fake = connect_fake(ctx, h, cluster)
        header = wire.pack_msg("grad.x", 1, 1.0, wire.TENSOR, None, None, [mesh_sid])
        fake.send([header, tensor.encode_descriptor("<f4", (2**40,)), b"\x00" * 8])
        fake.send([header, tensor.encode_descriptor("<f4", (2,)), b"\x00" * 8])  # honest
        fake.status()
        got = h.call("collected", sid=sid, n=1)
        assert got[0]["array"][:2] == ("<f4", (2,))  # the first delivered is the honest one
        assert len(h.call("collected", sid=sid, n=2, timeout=0.3)) == 1
        fake.close()
    finally:
        ctx.destroy(linger=0)


def test_large_tensors_with_lying_descriptors_are_dropped_not_delivered(procs, cluster):
    """Data frames of 64 KiB and more come whole from zcore.drain without a copy and
    take on_array's way (compiled build): a descriptor that lies about the size, or
    a known descriptor (its shape checked once, then only its size) with a frame of
    another size, is dropped and counted, never delivered; honest ones are."""
    h = procs.start("h")
    sid = h.call("subscribe", pattern="grad.>")
    (mesh_sid,) = [s["sid"] for s in h.call("status")["subscriptions"] if s["pattern"] == "grad.>"]
    ctx = zmq.Context()
    try:
        fake = connect_fake(ctx, h, cluster)
        header = wire.pack_msg("grad.x", 1, time.time(), wire.TENSOR, None, None, [mesh_sid])
        honest = tensor.encode_descriptor("<f4", (1 << 18,))
        big = b"\x00" * (1 << 20)
        before = fake.status()["counters"]["drops"].get("size_mismatch", 0)
        fake.send([header, tensor.encode_descriptor("<f4", (2**40,)), big])
        fake.send([header, tensor.encode_descriptor("<f4", (1 << 17,)), big])
        fake.send([header, honest, big])  # delivered: its shape is now known
        fake.send([header, honest, big[: 1 << 19]])  # the known descriptor, half the data
        fake.send([header, honest, big])
        drops = fake.status()["counters"]["drops"]
        assert drops.get("size_mismatch", 0) == before + 3, drops
        got = h.call("collected", sid=sid, n=2)
        assert [g["array"][:2] for g in got] == [("<f4", (1 << 18,))] * 2
        assert len(h.call("collected", sid=sid, n=3, timeout=0.3)) == 2
        fake.close()
    finally:
        ctx.destroy(linger=0)


def test_oversized_header_is_dropped(target):
    h, n, ctx = target
    raw = Raw(ctx, h.tcp, b"big-header")
    try:
        before = raw.status()["counters"]["drops"].get("oversize", 0)
        raw.send([b"\x00" * (wire.MAX_HEADER_BYTES + 1), b"x"])
        assert raw.status()["counters"]["drops"].get("oversize", 0) == before + 1
    finally:
        raw.close()
    assert_still_serves(h, n)


def test_hello_from_another_cluster_is_refused(target):
    h, n, ctx = target
    raw = Raw(ctx, h.tcp, FAKE_ID.encode())
    try:
        raw.send([fake_hello("not-this-cluster")])
        status = raw.status()
        assert status["counters"]["drops"].get("wrong_cluster", 0) >= 1
        assert "fake" not in [p["name"] for p in status["peers"]]
        # and it cannot send messages either
        before = status["counters"]["drops"].get("unknown_peer", 0)
        raw.send([wire.pack_msg("svc.echo", 1, 1.0, 0, None, 9, []), b"x"])
        assert raw.status()["counters"]["drops"].get("unknown_peer", 0) == before + 1
    finally:
        raw.close()


def test_invalid_patterns_in_an_interest_delta_are_counted(target, cluster):
    """Invalid patterns in a hello or a full snapshot are counted (invalid_interest);
    the same patterns in an incremental INTEREST update must be too."""
    h, n, ctx = target
    fake = connect_fake(ctx, h, cluster)
    try:
        before = fake.status()["counters"]["drops"].get("invalid_interest", 0)
        fake.send([wire.pack(wire.INTEREST_FULL, [1, [["a.>.b", "", 1, 256, 0, "block"], ["ok.x", "", 2, 256, 0, "block"]]])])
        mid = fake.status()["counters"]["drops"].get("invalid_interest", 0)
        assert mid == before + 1  # the snapshot path counts it
        fake.send([wire.pack(wire.INTEREST, [2, [["x..y", "", 3, 256, 0, "block"], ["ok.y", "", 4, 256, 0, "block"]], []])])
        status = fake.status()
        (row,) = [p for p in status["peers"] if p["name"] == "fake"]
        assert row["interest"] == 2  # ok.x and ok.y; the invalid ones skipped
        assert status["counters"]["drops"].get("invalid_interest", 0) == mid + 1, (
            "an invalid pattern in an INTEREST delta was skipped without being counted"
        )
    finally:
        fake.close()


def test_hostile_numbers_keep_status_strict_json(target, cluster):
    """status() must stay JSON (no NaN/Infinity) whatever timestamps a peer sends."""
    h, n, ctx = target
    fake = connect_fake(ctx, h, cluster)
    try:
        for ts in (math.inf, -math.inf, 1e308, -1e308):
            fake.send([wire.pack_msg("nobody.here", 1, ts, 0, None, None, []), b"x"])
        fake.send([wire.pack(wire.PONG, [-math.inf])])
        fake.send([wire.pack(wire.PONG, [-1e308])])
        fake.status()
    finally:
        fake.close()
    status = h.call("status")
    json.dumps(status, allow_nan=False)


@pytest.mark.parametrize("case", ["nan timestamp", "unhashable kind", "bad endpoint in hello",
                                  "bad endpoint in gossip"])
def test_hostile_values_are_validated_not_internal_errors(target, cluster, case):
    """Hostile input must be rejected by validation (a named drop reason), not reach
    the I/O thread's catch-all ("internal": an unexpected exception, logged with a
    traceback for every single frame)."""
    h, n, ctx = target
    fake = connect_fake(ctx, h, cluster)
    summary = {"id": "b" * 16, "name": "ghost", "cluster": cluster,
               "eps": {"tcp": ["tcp://[not-an-endpoint"]}, "host": "x", "proc": "x/1"}
    frames = {
        "nan timestamp": [wire.pack_msg("nobody.here", 1, math.nan, 0, None, None, []), b"x"],
        "unhashable kind": [msgpack.packb([wire.PROTOCOL_VERSION, [6], None])],
        "bad endpoint in hello": [fake_hello(cluster, id="c" * 16,
                                             eps={"tcp": ["tcp://[not-an-endpoint"]})],
        "bad endpoint in gossip": [wire.pack(wire.PEERS, [summary])],
    }[case]
    try:
        before = fake.status()["counters"]["drops"]
        fake.send(frames)
        after = fake.status()["counters"]["drops"]
    finally:
        fake.close()
    new = {k: after.get(k, 0) - before.get(k, 0) for k in after
           if after.get(k, 0) != before.get(k, 0) and k not in SEND_SIDE}
    assert new and "internal" not in new, f"{case}: drops {new}"
    assert_still_serves(h, n)


def test_flood_of_garbage_from_many_identities(target):
    """Many connections at once, no per-message barrier: h keeps serving."""
    h, n, ctx = target
    rng = np.random.default_rng(3)
    socks = [Raw(ctx, h.tcp, f"flood-{i}".encode()) for i in range(20)]
    try:
        for i in range(2000):
            frames = [rng.bytes(int(rng.integers(0, 40))) for _ in range(int(rng.integers(1, 4)))]
            socks[i % len(socks)].send(frames)
        status = socks[0].status()
        for s in socks[1:]:
            status = s.status()  # each connection's frames are all handled
    finally:
        for s in socks:
            s.close()
    assert hostile_drops(status) >= 2000
    assert_still_serves(h, n)


def test_sequence_gaps_from_a_peer_are_counted(procs, cluster):
    h = procs.start("h")
    sid = h.call("subscribe", pattern="g.>")
    # Messages name the receiver's subscription (its id, as advertised in its interest).
    (mesh_sid,) = [s["sid"] for s in h.call("status")["subscriptions"] if s["pattern"] == "g.>"]
    ctx = zmq.Context()
    try:
        fake = connect_fake(ctx, h, cluster)
        for seq in (1, 2, 5, 6, 10):  # 3, 4 and 7, 8, 9 missing
            fake.send([wire.pack_msg("g.a", seq, 1.0, 0, None, None, [mesh_sid]), b"%d" % seq])
        fake.send([wire.pack_msg("g.b", 7, 1.0, 0, None, None, [mesh_sid]), b"first on g.b"])
        fake.status()
        got = h.call("collected", sid=sid, n=6)
        assert [r["seq"] for r in got] == [1, 2, 5, 6, 10, 7]
        assert h.call("status")["counters"]["gaps"] == 5
        fake.close()
    finally:
        ctx.destroy(linger=0)


def test_batches_from_a_peer_are_checked_whole_and_within_credit(procs, cluster):
    """A batch frame holds runs of messages under one header (mesh/flow.py). A run's
    messages take consecutive seqs; a bad run drops its whole batch; messages beyond
    the credit the subscription granted are dropped as violations, not delivered."""
    h = procs.start("h")
    sid = h.call("subscribe", pattern="b.>", credits=4)
    (mesh_sid,) = [s["sid"] for s in h.call("status")["subscriptions"] if s["pattern"] == "b.>"]
    ctx = zmq.Context()

    def batch(runs, count=None):
        count = sum(len(p) for _, p in runs) if count is None else count
        return [wire.pack(wire.BATCH, count), flow.encode_batch(runs)]

    def run(seq, payloads, headers=None):
        return (wire.pack_msg("b.x", seq, 1.0, 0, headers, None, [mesh_sid]), payloads)

    try:
        fake = connect_fake(ctx, h, cluster)
        before = fake.status()["counters"]["drops"]
        fake.send(batch([run(1, [b"1", b"2"])], count=3))  # the count lies
        fake.send(batch([run(1, [b"1"]), run(2, [b"2", b"3"], headers={"k": "v"})]))
        fake.send(batch([run(1, [b"1"]), (wire.pack(wire.PING, [1.0]), [b"x"])]))
        after = fake.status()["counters"]["drops"]
        assert after.get("malformed", 0) - before.get("malformed", 0) == 3
        assert h.call("collected", sid=sid, n=0) == [], "a bad batch was partly delivered"
        # Six messages in two runs against four credits: four arrive, two are refused.
        fake.send(batch([run(10, [b"10", b"11", b"12"]), run(20, [b"20", b"21", b"22"])]))
        status = fake.status()
        assert status["counters"]["drops"].get("credit_violation", 0) == 2
        got = h.call("collected", sid=sid, n=4)
        assert [(r["seq"], r["data"]) for r in got] == [
            (10, b"10"), (11, b"11"), (12, b"12"), (20, b"20")]
        assert status["counters"]["gaps"] == 7  # 13..19
        fake.close()
    finally:
        ctx.destroy(linger=0)


def test_credit_riding_in_front_of_a_frame_is_checked(procs, cluster):
    """Credit may ride in front of a message, reply or batch (one ZeroMQ message);
    in front of anything else, or of more credit, the whole thing is dropped."""
    h = procs.start("h")
    sid = h.call("subscribe", pattern="r.>")
    (mesh_sid,) = [s["sid"] for s in h.call("status")["subscriptions"] if s["pattern"] == "r.>"]
    ctx = zmq.Context()
    credit = wire.pack(wire.CREDIT, [[12345, 1, 64]])  # for no window of h's: ignored
    try:
        fake = connect_fake(ctx, h, cluster)
        before = fake.status()["counters"]["drops"]
        fake.send([credit, wire.pack(wire.PING, [1.0])])
        fake.send([credit, credit, wire.pack_msg("r.x", 1, 1.0, 0, None, None, [mesh_sid]), b"no"])
        fake.send([credit, wire.pack_msg("r.x", 1, 1.0, 0, None, None, [mesh_sid]), b"rode"])
        after = fake.status()["counters"]["drops"]
        assert after.get("malformed", 0) - before.get("malformed", 0) == 2
        got = h.call("collected", sid=sid, n=1)
        assert [(r["seq"], r["data"]) for r in got] == [(1, b"rode")]
        fake.close()
    finally:
        ctx.destroy(linger=0)


# ---------------------------------------------------------------------------- handshake races
# A scripted peer "s" (raw sockets driven by the test) joins through a real node a,
# which gossips it to a real node b. b then sees s as "joining" until s answers b's
# hello, and the test decides exactly when that happens.


class ScriptedPeer:
    def __init__(self, ctx: zmq.Context, cluster: str) -> None:
        from transports.base import Locality

        self.ctx = ctx
        self.cluster = cluster
        self.id = "5c" + uuid.uuid4().hex[:14]
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind("tcp://127.0.0.1:*")
        self.endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.host = Locality.here().host  # same host: loopback endpoints are usable
        self.dealers: list = []

    def hello(self, endpoint: str, ack: bool) -> None:
        body = {"id": self.id, "name": "scripted", "cluster": self.cluster,
                "eps": {"tcp": [self.endpoint]}, "host": self.host, "proc": "scripted/1",
                "iv": 0, "int": [], "ack": ack}
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, self.id.encode())
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(endpoint.replace("0.0.0.0", "127.0.0.1"))
        dealer.send(wire.pack(wire.HELLO, body))
        self.dealers.append(dealer)

    def receive(self, predicate, timeout: float):
        """The first (ident, header) that arrives at s's ROUTER and satisfies predicate."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if self.router.poll(int(remaining * 1000) + 1):
                frames = self.router.recv_multipart()
                header = wire.unpack(frames[1])
                # Nodes send control from "<id>/c" and data from "<id>": report the id.
                who = frames[0].decode(errors="replace").split("/", 1)[0]
                if predicate(who, header):
                    return header
        return None

    def close(self) -> None:
        for sock in [self.router, *self.dealers]:
            sock.close(linger=0)


def _tcp(node) -> str:
    return next(ep for ep in node.endpoints if ep.startswith("tcp://")).replace(
        "0.0.0.0", "127.0.0.1")


def _scripted_joining_b(make_node, ctx, cluster):
    """a and b fully joined; s joined a; b has said hello to s, s has not answered."""
    a = make_node("a")
    b = make_node("b", seeds=[_tcp(a)], heartbeat_interval=2.0, peer_timeout=30.0)
    a.wait_for_peers(1, timeout=5)
    b.wait_for_peers(1, timeout=5)
    s = ScriptedPeer(ctx, cluster)
    s.hello(_tcp(a), ack=False)
    hello_from_b = s.receive(lambda who, h: who == b.id and h[1] == wire.HELLO, timeout=5)
    assert hello_from_b is not None, "b never said hello to the peer a gossiped"
    assert [p["state"] for p in b.status()["peers"] if p["name"] == "scripted"] == ["joining"]
    return a, b, s


def _mentions(header: list, pattern: str) -> bool:
    return pattern in json.dumps(header, default=repr)


def test_interest_added_while_a_peer_is_joining_reaches_it(make_node, cluster):
    """b subscribes while s is still "joining" in b's table (s has b's hello, with
    the old interest; b has not processed s's answer yet). Once s is alive, s must
    learn the new interest, or publishers at s never send b anything."""
    ctx = zmq.Context()
    s = None
    try:
        a, b, s = _scripted_joining_b(make_node, ctx, cluster)
        b.subscribe("late.x")
        assert a.wait_for_subscribers("late.x", 1, timeout=5) == 1  # a, alive, learns it
        s.hello(_tcp(b), ack=True)  # s answers b's hello: now alive for b
        assert wait_until_alive(b, "scripted")
        got = s.receive(lambda who, h: who == b.id and _mentions(h, "late.x"), timeout=1.5)
        # control: once s is alive, b's interest deltas do reach it
        b.subscribe("control.y")
        assert s.receive(lambda who, h: who == b.id and _mentions(h, "control.y"), timeout=5)
        assert got is not None, (
            "b subscribed to late.x while s was joining, and did not tell s (no INTEREST "
            "delta, no newer hello): s routes nothing on late.x to b until b's interest "
            "changes again (the version gap then triggers a SYNC), if ever"
        )
    finally:
        if s is not None:
            s.close()
        ctx.destroy(linger=0)


def test_goodbye_reaches_a_peer_that_is_still_joining(make_node, cluster):
    """s got b's hello (so s, like any node, now counts b as alive); b closes before
    it has processed s's answer. b's goodbye must still reach s."""
    ctx = zmq.Context()
    s = None
    try:
        a, b, s = _scripted_joining_b(make_node, ctx, cluster)
        b.close()
        bye = s.receive(lambda who, h: who == b.id and h[1] == wire.BYE, timeout=1.0)
        assert bye is not None, "b closed without a goodbye to a peer it had said hello to"
    finally:
        if s is not None:
            s.close()
        ctx.destroy(linger=0)


def wait_until_alive(node, name: str, timeout: float = 5.0) -> bool:
    from meshproc import wait_until

    return wait_until(
        lambda: [p["state"] for p in node.status()["peers"] if p["name"] == name] == ["alive"],
        timeout,
    )


def test_fixed_layout_header_round_trips_and_refuses_what_is_wrong():
    """The fixed-layout header of a lone message (wire.pack_msg_lone) decodes to the
    fields check_msg gives for its msgpack twin; a wrong version is a "version"
    drop, anything else malformed (numbers beyond 64 bits fall back to msgpack)."""
    head = wire.pack_msg_lone("grad.w3", 7, 1.5, None, 3)
    assert head[0] == wire.FIXED
    twin = wire.check_msg(wire.unpack(wire.pack_msg("grad.w3", 7, 1.5, 0, None, None, [3])))
    assert wire.unpack_msg_lone(head) == twin
    assert wire.unpack_msg_lone(wire.pack_msg_lone("a", 1, 0.0, 2**62, 0))[5] == 2**62
    assert wire.pack_msg_lone("a", 2**63, 0.0, None, 1)[0] != wire.FIXED  # msgpack then
    wrong = bytearray(head)
    wrong[1] = wire.PROTOCOL_VERSION + 1
    cases = {"version": bytes(wrong), "malformed": head[:10]}
    for reason, frame in cases.items():
        with pytest.raises(wire.ProtocolError) as err:
            wire.unpack_msg_lone(frame)
        assert err.value.reason == reason
    with pytest.raises(wire.ProtocolError):
        wire.unpack_msg_lone(head + b"\xff")


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(subject=st.text(max_size=40).filter(lambda t: len(t.encode()) < 65536),
       seq=st.integers(0, 2**63 - 1), ts=st.floats(allow_nan=False),
       req_id=st.none() | st.integers(0, 2**63 - 1), sid=st.integers(-(2**63), 2**63 - 1),
       data=st.binary(max_size=wire.ONE_FRAME_MAX))
def test_one_frame_messages_round_trip(subject, seq, ts, req_id, sid, data):
    """A small lone message is one frame (wire.lone_frames) that decodes to the fields
    check_msg gives for its msgpack twin, and its payload; a small plain reply too."""
    (frame,) = wire.lone_frames(subject, seq, ts, req_id, sid, [data])
    kind, fields, payload = wire.unpack_one(frame)
    twin = wire.check_msg(wire.unpack(wire.pack_msg(subject, seq, ts, 0, None, req_id, [sid])))
    assert (kind, fields, payload) == (wire.MSG, twin, data)
    (frame,) = wire.lone_frames(subject, seq, ts, req_id, sid, [memoryview(bytearray(data))])
    assert wire.unpack_one(frame) == (wire.MSG, twin, data)  # any bytes-like payload
    if req_id is not None:
        (frame,) = wire.reply_frames(req_id, 0, None, [data])
        assert wire.unpack_one(frame) == (wire.REPLY, req_id, data)


def test_what_is_not_small_and_plain_keeps_its_own_frames():
    """Payloads over ONE_FRAME_MAX, replies with headers or arrays, and numbers
    beyond 64 bits keep the header and the payload in separate frames."""
    big = b"x" * (wire.ONE_FRAME_MAX + 1)
    head, payload = wire.lone_frames("a.b", 1, 0.0, None, 3, [big])
    assert payload is big and wire.unpack_msg_lone(head)[0] == "a.b"
    assert len(wire.lone_frames("a.b", 1, 0.0, None, 3, [big[:-1]])) == 1
    head, _ = wire.lone_frames("a.b", 2**63, 0.0, None, 3, [b"x"])  # msgpack says it
    assert wire.check_msg(wire.unpack(head))[1] == 2**63
    for frames in (wire.reply_frames(7, 0, {"k": "v"}, [b"x"]), wire.reply_frames(7, 0, None, [big]),
                   wire.reply_frames(7, wire.TENSOR, None, [b"d", b"x"])):
        assert wire.check_reply(wire.unpack(frames[0]))[0] == 7 and len(frames) >= 2


def test_broken_one_frame_messages_are_refused():
    """A one-frame message that is cut, lies about its subject length, names another
    version, or lacks its layout byte raises ProtocolError with the drop's reason."""
    (msg,) = wire.lone_frames("grad.w3", 7, 1.5, None, 3, [b"payload"])
    (reply,) = wire.reply_frames(9, 0, None, [b"r"])
    other = bytearray(msg)
    other[1] = wire.PROTOCOL_VERSION + 1
    liar = bytearray(msg)
    liar[wire.ONE_SIZE - 2: wire.ONE_SIZE] = (200).to_bytes(2, "little")
    header_only = wire.pack_msg_lone("grad.w3", 7, 1.5, None, 3)  # its payload frame is missing
    cases = [(bytes(other), "version"), (msg[:10], "malformed"), (msg[: wire.ONE_SIZE - 1], "malformed"),
             (bytes(liar), "malformed"), (header_only, "malformed"), (reply[:-2], "malformed"),
             (msg[:3] + b"\x07" + msg[4:], "malformed")]
    for frame, reason in cases:
        with pytest.raises(wire.ProtocolError) as err:
            wire.unpack_one(frame)
        assert err.value.reason == reason, frame
    with pytest.raises(wire.ProtocolError):  # and a one-frame message is no lone header
        wire.unpack_msg_lone(msg)

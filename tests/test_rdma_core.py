"""The RDMA ring/credit core (transports/rdma_core.py): pure, so tested exhaustively here.

The end-to-end property test simulates the whole data path: a sender cutting
frames into writes, a "wire" that lands them in order (as an RC queue pair
does) into a real bytearray ring, a receiver consuming in random-sized bites
and acknowledging, acks travelling back late. It checks that credits never go
negative, no write lands on unconsumed bytes, and every byte of every message
arrives once, in order.
"""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import MessageTooLarge, ProtocolError
from transports.rdma_core import (
    FRAME_HEADER,
    FrameReader,
    Outbox,
    RdmaTag,
    ReceiveOrder,
    RegistrationCache,
    RingReader,
    RingWriter,
    SendOrder,
    SlotPool,
    Sync,
    encode_header,
)

# --------------------------------------------------------------------------- simulation


class Sim:
    """Sender, wire and receiver of one direction, with the ring's real bytes."""

    def __init__(self, capacity: int, max_write: int, ack_threshold: int | None) -> None:
        self.capacity = capacity
        self.writer = RingWriter(capacity)
        self.outbox = Outbox(self.writer, max_write=max_write)
        self.reader = RingReader(capacity, ack_threshold)
        self.frames = FrameReader()
        self.ring = bytearray(capacity)
        self.unconsumed = [False] * capacity
        self.sources: dict[int, list[bytes]] = {}
        self.wire: deque[tuple[int, bytes]] = deque()
        self.acks: deque[int] = deque()
        self.payload = bytearray()
        self.received: list[tuple[int, bytes, bytes]] = []
        self.next_id = 0

    def send(self, meta: bytes, payload: bytes) -> None:
        head = encode_header(self.next_id, len(meta), len(payload)) + meta
        self.sources[self.next_id] = [head, payload]
        self.outbox.push(self.next_id, [len(head), len(payload)])
        self.next_id += 1

    def check(self) -> None:
        assert 0 <= self.writer.credits <= self.capacity
        assert 0 <= self.reader.readable <= self.capacity

    def post(self, k: int) -> None:
        for w in self.outbox.plan(k):
            assert 0 < w.length and w.ring_offset + w.length <= self.capacity, "crossed the ring end"
            src = self.sources[w.frame][w.part]
            self.wire.append((w.ring_offset, src[w.part_offset : w.part_offset + w.length]))
        self.check()

    def land(self, k: int) -> None:
        for _ in range(min(k, len(self.wire))):
            off, data = self.wire.popleft()
            for i in range(off, off + len(data)):
                assert not self.unconsumed[i], f"write overwrote unconsumed byte {i}"
                self.unconsumed[i] = True
            self.ring[off : off + len(data)] = data
            self.reader.on_write(len(data))
        self.check()

    def consume(self, bite: int) -> None:
        while self.reader.readable:
            part, missing = self.frames.need()
            n = min(missing, self.reader.contiguous(), bite) if missing else 0
            if n == 0:
                break
            off = self.reader.consume(n)
            data = bytes(self.ring[off : off + n])
            for i in range(off, off + n):
                assert self.unconsumed[i]
                self.unconsumed[i] = False
            if part == FrameReader.PAYLOAD:
                self.payload += data
                self.frames.advance_payload(n)
            else:
                self.frames.feed(data)
            done = self.frames.take_done()
            if done:
                header, meta = done
                self.received.append((header.msg_id, meta, bytes(self.payload)))
                self.payload.clear()
        self.check()

    def ack(self, force: bool) -> None:
        n = self.reader.take_ack(force)
        if n:
            self.acks.append(n)

    def deliver_acks(self, k: int) -> None:
        for _ in range(min(k, len(self.acks))):
            self.writer.on_ack(self.acks.popleft())
        self.check()

    def drain(self) -> None:
        for _ in range(100_000):
            unacked = self.reader.consumed - self.reader.acked
            if not (len(self.outbox) or self.wire or self.reader.readable or self.acks or unacked):
                return
            self.post(1 << 30)
            self.land(1 << 30)
            self.consume(1 << 30)
            self.ack(False)
            self.deliver_acks(1 << 30)
        raise AssertionError("the stream did not drain: credits were never returned")


messages = st.lists(
    st.tuples(st.binary(max_size=8), st.binary(max_size=200)), min_size=1, max_size=8
)
ops = st.lists(
    st.tuples(st.sampled_from(["post", "land", "consume", "ack", "force_ack", "acks"]),
              st.integers(1, 50)),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(
    msgs=messages,
    capacity=st.integers(1, 96),
    max_write=st.integers(1, 128),
    ack_threshold=st.one_of(st.none(), st.integers(1, 96)),
    script=ops,
)
def test_stream_delivers_every_byte_once_in_order(msgs, capacity, max_write, ack_threshold, script):
    sim = Sim(capacity, max_write, ack_threshold)
    for meta, payload in msgs:
        sim.send(meta, payload)
    for op, k in script:
        if op == "post":
            sim.post(k)
        elif op == "land":
            sim.land(k)
        elif op == "consume":
            sim.consume(k)
        elif op in ("ack", "force_ack"):
            sim.ack(op == "force_ack")
        else:
            sim.deliver_acks(k)
    sim.drain()
    assert sim.received == [(i, m, p) for i, (m, p) in enumerate(msgs)]
    assert sim.writer.credits == capacity and sim.writer.written == sim.reader.consumed


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=5), capacity=st.integers(16, 1024))
def test_messages_larger_than_the_ring_stream_through_it(sizes, capacity):
    sim = Sim(capacity, max_write=capacity, ack_threshold=None)
    for i, n in enumerate(sizes):
        sim.send(b"", bytes([i % 251]) * n)
    sim.drain()
    assert [len(p) for _, _, p in sim.received] == sizes


# --------------------------------------------------------------------------- ring edges


def test_wrap_around_splits_writes_at_the_ring_end():
    w = RingWriter(10)
    out = Outbox(w, max_write=100)
    out.push(0, [7])
    assert [(x.ring_offset, x.length) for x in out.plan(10)] == [(0, 7)]
    w.on_ack(7)  # consumed: 10 credits, next write at 7
    out.push(1, [9])
    writes = out.plan(10)
    assert [(x.ring_offset, x.length, x.last) for x in writes] == [(7, 3, False), (0, 6, True)]
    assert w.credits == 1


def test_writer_stops_at_zero_credits_and_resumes_on_ack():
    w = RingWriter(8)
    out = Outbox(w, max_write=8)
    out.push(0, [20])
    assert sum(x.length for x in out.plan(100)) == 8
    assert w.credits == 0 and out.plan(100) == []
    w.on_ack(5)
    assert sum(x.length for x in out.plan(100)) == 5


def test_ack_beyond_in_flight_is_a_protocol_error():
    w = RingWriter(8)
    w.advance(3)
    with pytest.raises(ProtocolError):
        w.on_ack(4)
    with pytest.raises(ProtocolError):
        w.on_ack(0)


def test_reader_refuses_overrun_and_writes_across_the_end():
    r = RingReader(8)
    r.on_write(6)
    with pytest.raises(ProtocolError, match="overran"):
        r.on_write(3)
    r.consume(6)
    assert r.take_ack() == 6
    with pytest.raises(ProtocolError, match="wrapping"):
        r.on_write(4)  # offset 6 + 4 > 8: a well-behaved sender wraps at 8


def test_take_ack_waits_for_threshold_unless_drained_or_forced():
    r = RingReader(100, ack_threshold=50)
    r.on_write(60)
    r.consume(10)
    assert r.take_ack() == 0  # 10 pending, 50 still readable
    assert r.take_ack(force=True) == 10
    r.consume(45)
    assert r.take_ack() == 0
    r.consume(5)  # drained: ack whatever is pending
    assert r.take_ack() == 50
    assert r.take_ack() == 0


def test_writer_refuses_a_write_beyond_credits_or_the_end():
    w = RingWriter(8)
    with pytest.raises(ValueError):
        w.advance(9)
    w.advance(5)
    with pytest.raises(ValueError):
        w.advance(4)


def test_message_over_the_limit_is_refused_clearly():
    out = Outbox(RingWriter(64), max_message=100)
    with pytest.raises(MessageTooLarge, match="exceeds"):
        out.push(0, [24, 200])
    out.push(1, [24, 76])
    assert len(out) == 1


def test_empty_parts_keep_their_index():
    out = Outbox(RingWriter(64))
    out.push(0, [0, 5, 0, 3])
    assert [(x.part, x.length, x.last) for x in out.plan(10)] == [(1, 5, False), (3, 3, True)]


def test_frame_reader_rejects_a_corrupt_header():
    fr = FrameReader()
    with pytest.raises(ProtocolError, match="out of sync"):
        fr.feed(b"XXXX" + bytes(FRAME_HEADER.size - 4))
    fr = FrameReader(max_payload=10)
    with pytest.raises(ProtocolError, match="exceeds"):
        fr.feed(encode_header(1, 0, 11))


def test_frame_reader_handles_empty_meta_and_payload():
    fr = FrameReader()
    fr.feed(encode_header(7, 0, 0))
    header, meta = fr.take_done()
    assert (header.msg_id, meta) == (7, b"")
    assert fr.need() == (FrameReader.HEADER, FRAME_HEADER.size)


# --------------------------------------------------------------------------- registration cache


class FakeNic:
    def __init__(self) -> None:
        self.live: dict[int, tuple[int, int]] = {}
        self.next = 0
        self.registrations = 0

    def register(self, addr: int, size: int) -> int:
        self.next += 1
        self.registrations += 1
        self.live[self.next] = (addr, size)
        return self.next

    def deregister(self, handle: int) -> None:
        assert handle in self.live, "deregistered twice"
        del self.live[handle]


@settings(max_examples=300, deadline=None)
@given(
    script=st.lists(st.tuples(st.booleans(), st.integers(0, 7)), max_size=120),
    max_entries=st.integers(1, 5),
    max_bytes=st.integers(1, 40),
)
def test_registration_cache_against_a_model(script, max_entries, max_bytes):
    nic = FakeNic()
    cache = RegistrationCache(nic.register, nic.deregister, max_entries=max_entries,
                              max_bytes=max_bytes)
    size = {k: k + 1 for k in range(8)}  # buffer k: address 1000*k, k+1 bytes
    model: list[int] = []  # cached keys, least recently used first
    pins: dict[int, int] = {}
    handles: dict[int, int] = {}
    for acquire, k in script:
        addr = 1000 * k
        if acquire:
            hit = k in model
            before = nic.registrations
            h = cache.acquire(addr, size[k], owner=object())
            assert (nic.registrations == before) == hit
            if hit:
                assert h == handles[k], "a hit must return the same registration"
                model.remove(k)
            handles[k] = h
            model.append(k)
            pins[k] = pins.get(k, 0) + 1
        elif pins.get(k):
            cache.release(addr, size[k])
            pins[k] -= 1
        else:
            with pytest.raises(ValueError):
                cache.release(addr, size[k])
            continue
        # model eviction: unpinned, least recently used first, while over budget
        for key in list(model):
            total = sum(size[x] for x in model)
            if len(model) <= max_entries and total <= max_bytes:
                break
            if not pins.get(key):
                model.remove(key)
        assert [a // 1000 for a, _ in sorted(nic.live.values())] == sorted(model)
        for key in model:
            assert handles[key] in nic.live
        assert all((1000 * key, size[key]) in cache for key in model)
        pinned = [key for key in model if pins.get(key)]
        assert all(handles[key] in nic.live for key in pinned), "evicted a pinned registration"
    cache.clear()
    assert nic.live == {}


def test_registration_cache_hits_and_lru_eviction():
    nic = FakeNic()
    cache = RegistrationCache(nic.register, nic.deregister, max_entries=2)
    a = cache.acquire(0x1000, 64)
    cache.release(0x1000, 64)
    assert cache.acquire(0x1000, 64) == a and cache.hits == 1
    cache.release(0x1000, 64)
    cache.acquire(0x2000, 64)
    cache.release(0x2000, 64)
    cache.acquire(0x1000, 64)  # touch: 0x2000 is now least recently used
    cache.release(0x1000, 64)
    cache.acquire(0x3000, 64)
    assert (0x2000, 64) not in cache and (0x1000, 64) in cache and cache.evictions == 1
    assert (0x1000, 128) not in cache, "size is part of the key"


def test_registration_cache_keeps_the_owner_alive():
    import gc
    import weakref

    class Buf:
        pass

    buf = Buf()
    ref = weakref.ref(buf)
    nic = FakeNic()
    cache = RegistrationCache(nic.register, nic.deregister, max_entries=1)
    cache.acquire(1, 1, owner=buf)
    cache.release(1, 1)
    del buf
    gc.collect()
    assert ref() is not None, "a cached registration must pin its buffer's memory"
    cache.acquire(2, 1)  # evicts the first entry
    gc.collect()
    assert ref() is None


def test_slot_pool():
    pool = SlotPool(2, 100)
    a, b = pool.acquire(), pool.acquire()
    assert pool.acquire() is None and {pool.offset(a), pool.offset(b)} == {0, 100}
    pool.release(a)
    with pytest.raises(ValueError):
        pool.release(a)
    assert pool.acquire() == a


# --------------------------------------------------------------------------- order across the two paths


def _send(ops, drop_sock=(), drop_sync=(), fail_at=None, confirmed=0, landed=0):
    """Run a SendOrder over ``ops`` ("S": a socket message, "R": an array by RDMA).
    Returns (socket stream, rdma stream, ids delivered by the sender's intent).

    ``drop_sock``: op indices whose socket message is dropped at a full queue (its
    sync stays pending); ``drop_sync``: op indices whose stand-alone sync is. At
    ``fail_at`` the queue pair fails: of the RDMA messages so far the first
    ``confirmed`` were confirmed, the first ``landed`` (>= confirmed) reached the
    peer's ring; the rest are re-sent on the socket, and later "R" go there too."""
    order = SendOrder(epoch=7)
    sock, rdma, sent = [], [], []
    rdma_ok = True
    for i, op in enumerate(ops):
        if fail_at is not None and i == fail_at and rdma_ok:
            rdma_ok = False
            n = len(rdma)
            landed = max(min(landed, n), min(confirmed, n))
            for tag, j in rdma[min(confirmed, n):]:
                sock.append(("resent", tag, j))
            del rdma[landed:]
        if op == "R" and rdma_ok:
            tag = order.next_rdma()
            sync = order.sent_rdma(tag)
            rdma.append((tag, i))
            sent.append(i)
            if sync is not None and i not in drop_sync:
                sock.append(("sync", sync))
                order.synced(sync)
        else:
            sync = order.socket()
            if i in drop_sock:
                continue
            sock.append(("msg", sync, i))
            sent.append(i)
            if sync is not None:
                order.synced(sync)
    if fail_at is not None and fail_at >= len(ops) and rdma_ok:  # failed after the last op
        n = len(rdma)
        landed = max(min(landed, n), min(confirmed, n))
        for tag, j in rdma[min(confirmed, n):]:
            sock.append(("resent", tag, j))
        del rdma[landed:]
    return sock, rdma, sent


def _receive(sock, rdma, schedule, recv=None):
    """Deliver both streams (each in its own order) interleaved as ``schedule`` says
    (True: the socket's next, False: the RDMA path's next), as the node does."""
    recv = recv if recv is not None else ReceiveOrder()
    out = []
    sock, rdma = deque(sock), deque(rdma)
    steps = iter(schedule)
    now = 0.0
    while sock or rdma:
        now += 0.001
        take_sock = next(steps, True) if sock and rdma else bool(sock)
        if take_sock:
            entry = sock.popleft()
            if entry[0] == "sync":
                out += recv.sync(entry[1], now)
            elif entry[0] == "resent":
                out += recv.rdma(entry[1], entry[2], now)
            else:
                _, sync, item = entry
                if sync is not None:
                    out += recv.sync(sync, now)
                if recv.blocked:
                    out += recv.socket(item, now)
                else:
                    out.append(item)
        else:
            tag, item = rdma.popleft()
            out += recv.rdma(tag, item, now)
    return out, recv


OPS = st.lists(st.sampled_from("SR"), max_size=40)
SCHEDULE = st.lists(st.booleans(), max_size=120)


@settings(max_examples=500, deadline=None)
@given(ops=OPS, schedule=SCHEDULE, drops=st.sets(st.integers(0, 39), max_size=6))
def test_two_paths_deliver_in_send_order(ops, schedule, drops):
    """Whatever overtakes what between the socket and the RDMA path, and whichever
    socket messages a full queue drops, the receiver delivers in send order."""
    sock, rdma, sent = _send(ops, drop_sock=drops)
    out, recv = _receive(sock, rdma, schedule)
    assert out == sent
    assert recv.held == 0 and recv.forced == 0 and recv.duplicates == 0


@settings(max_examples=500, deadline=None)
@given(ops=OPS, schedule=SCHEDULE, fail_at=st.integers(0, 41),
       confirmed=st.integers(0, 40), extra=st.integers(0, 40))
def test_failover_resends_keep_order_and_drop_duplicates(ops, schedule, fail_at, confirmed, extra):
    """The queue pair fails: unconfirmed RDMA messages are re-sent on the socket,
    some of them also landed in the ring. Each is delivered once, in send order."""
    sock, rdma, sent = _send(ops, fail_at=fail_at, confirmed=confirmed, landed=confirmed + extra)
    out, recv = _receive(sock, rdma, schedule)
    assert out == sent
    assert recv.held == 0 and recv.forced == 0


def test_no_rdma_means_nothing_travels():
    order = SendOrder(epoch=1)
    assert [order.socket() for _ in range(5)] == [None] * 5


def test_syncs_only_where_the_path_changes():
    order = SendOrder(epoch=3)
    assert order.socket() is None
    tag = order.next_rdma()
    assert tag == RdmaTag(3, 1, 1)
    first = order.sent_rdma(tag)
    assert first == Sync(3, 1, 0)  # a socket message went before it
    order.synced(first)
    assert order.sent_rdma(order.next_rdma()) is None  # RDMA after RDMA: nothing
    s = order.socket()
    assert s == Sync(3, 2, 2)  # the socket message waits for 2 RDMA messages
    assert order.socket() == s  # not queued yet (dropped): the next one carries it
    order.synced(s)
    assert order.socket() is None
    with pytest.raises(ValueError):
        order.sent_rdma(RdmaTag(3, 9, 9))


def test_a_lost_sync_is_carried_by_the_next_socket_message():
    # S0 R1 (its stand-alone sync is lost: socket queue full) R2 S3
    sock, rdma, sent = _send("SRRS", drop_sync={1})
    out, recv = _receive(sock, rdma, [False, False, True, True])
    assert out == sent == [0, 1, 2, 3] and recv.forced == 0


def test_a_lost_sync_with_nothing_after_it_is_released_by_expiry():
    sock, rdma, _ = _send("SR", drop_sync={1})
    recv: ReceiveOrder[int] = ReceiveOrder()
    out = recv.socket(0, 0.0) if recv.blocked else [0]
    out += recv.rdma(rdma[0][0], 1, 1.0)
    assert out == [0] and recv.held == 1
    assert recv.expire(5.0, max_hold=10.0) == []
    assert recv.expire(11.0, max_hold=10.0) == [1] and recv.forced == 1


def test_a_socket_message_waits_while_the_rdma_path_makes_progress():
    recv: ReceiveOrder[str] = ReceiveOrder()
    assert recv.sync(Sync(1, 1, 0), 0.0) == []
    assert recv.rdma(RdmaTag(1, 1, 1), "r1", 0.0) == ["r1"]
    assert recv.sync(Sync(1, 2, 2), 0.1) == []  # then "s" waits for RDMA message 2
    assert recv.blocked and recv.socket("s", 0.1) == []
    for t in range(1, 30):  # a long array: bytes keep landing
        recv.progress(t * 1000, float(t))
        assert recv.expire(float(t), max_hold=10.0) == []
    assert recv.rdma(RdmaTag(1, 2, 1), "r2", 30.0) == ["r2", "s"]
    # The same wait with no progress at all: released after max_hold.
    assert recv.sync(Sync(1, 3, 3), 31.0) == [] and recv.socket("t", 31.0) == []
    assert recv.expire(40.0, 10.0) == [] and recv.expire(41.5, 10.0) == ["t"]
    assert recv.forced == 1
    assert recv.rdma(RdmaTag(1, 3, 1), "late", 42.0) == ["late"]  # late, not lost


def test_a_new_epoch_flushes_the_old_and_stragglers_pass():
    recv: ReceiveOrder[str] = ReceiveOrder()
    recv.sync(Sync(1, 1, 5), 0.0)
    assert recv.socket("old", 0.0) == []  # waits for 5 RDMA messages that never come
    assert recv.sync(Sync(2, 1, 0), 1.0) == ["old"]  # the peer's link was made anew
    assert not recv.blocked and recv.epoch == 2
    assert recv.rdma(RdmaTag(1, 4, 1), "straggler", 2.0) == ["straggler"]
    assert recv.rdma(RdmaTag(2, 1, 1), "new", 2.0) == ["new"]


def test_flush_releases_everything():
    recv: ReceiveOrder[str] = ReceiveOrder()
    recv.sync(Sync(1, 1, 3), 0.0)
    recv.socket("a", 0.0)
    recv.sync(Sync(1, 2, 3), 0.0)
    recv.socket("b", 0.0)
    recv.rdma(RdmaTag(1, 4, 9), "c", 0.0)
    assert sorted(recv.flush()) == ["a", "b", "c"] and recv.held == 0


def test_a_resent_message_waits_for_an_earlier_one_still_in_the_ring():
    # R0 R1; the queue pair fails with R0 confirmed (in the ring, unread) and R1
    # re-sent on the socket, which the receiver reads first.
    sock, rdma, sent = _send("RR", fail_at=2, confirmed=1, landed=1)
    out, recv = _receive(sock, rdma, [True, True, False])
    assert out == sent == [0, 1] and recv.duplicates == 0


def test_a_lost_resend_is_given_up_after_max_hold_and_the_rest_flows():
    recv: ReceiveOrder[str] = ReceiveOrder()
    recv.sync(Sync(1, 1, 0), 0.0)
    assert recv.rdma(RdmaTag(1, 2, 1), "r2", 0.0) == []  # r1 was lost (its resend dropped)
    recv.sync(Sync(1, 2, 2), 0.0)
    assert recv.socket("s", 0.0) == []
    assert recv.expire(9.0, 10.0) == []
    assert recv.expire(10.0, 10.0) == ["r2", "s"] and recv.forced == 1
    assert recv.rdma(RdmaTag(1, 1, 1), "r1", 11.0) == ["r1"]  # turned up after all
    assert recv.rdma(RdmaTag(1, 1, 1), "r1", 12.0) == [] and recv.duplicates == 1


class _CheckedOrder(ReceiveOrder):
    """A ReceiveOrder that checks its bound after every message."""

    def socket(self, item, now):
        out = super().socket(item, now)
        assert self.held <= self.max_held
        return out

    def rdma(self, tag, item, now):
        out = super().rdma(tag, item, now)
        assert self.held <= self.max_held
        return out

    def sync(self, sync, now):
        out = super().sync(sync, now)
        assert self.held <= self.max_held
        return out


@settings(max_examples=500, deadline=None)
@given(ops=OPS, schedule=SCHEDULE, drops=st.sets(st.integers(0, 39), max_size=6),
       max_held=st.integers(1, 6))
def test_held_messages_stay_within_max_held(ops, schedule, drops, max_held):
    """However far one path runs ahead, the receiver never holds more than max_held
    messages; every message is still delivered exactly once, and in send order
    unless a wait was given up."""
    sock, rdma, sent = _send(ops, drop_sock=drops)
    out, recv = _receive(sock, rdma, schedule, _CheckedOrder(max_held=max_held))
    out += recv.flush()
    assert sorted(out) == sorted(sent) and len(out) == len(sent)
    assert recv.duplicates == 0
    if recv.overflowed == 0:
        assert out == sent
    assert recv.forced >= recv.overflowed


def test_a_lost_rdma_message_cannot_pile_up_what_follows():
    recv: ReceiveOrder[str] = ReceiveOrder(max_held=2)
    recv.sync(Sync(1, 1, 1), 0.0)  # what follows waits for RDMA message 1
    assert recv.socket("a", 0.0) == [] and recv.socket("b", 0.0) == []
    assert recv.socket("c", 0.0) == ["a", "b", "c"]  # a third: the wait is given up
    assert recv.overflowed == 1 and recv.forced == 1 and recv.held == 0
    assert recv.take_overflowed() == 1 and recv.take_overflowed() == 0
    assert not recv.blocked  # what follows is delivered at once again
    assert recv.rdma(RdmaTag(1, 1, 1), "late", 1.0) == ["late"]  # late, not lost
    with pytest.raises(ValueError, match="max_held"):
        ReceiveOrder(max_held=0)


# ---------------------------------------------------------------------------- bulk path selection


@pytest.mark.parametrize(
    ("transport", "shm_both", "rdma_both", "rdma_failed", "expected"),
    [
        ("inproc", True, True, False, "inproc"),  # one process: nothing beats a pointer
        ("ipc", True, True, False, "shm"),  # one host: shared memory before rdma
        ("ipc", False, True, False, "rdma"),  # one host, shm off: rdma before ipc
        ("ipc", False, False, False, "ipc"),
        ("tcp", False, True, False, "rdma"),  # two hosts that both have a device
        ("tcp", True, True, False, "shm"),  # one host over tcp: shared memory still
        ("tcp", False, False, False, "tcp"),  # a peer without rdma
        ("tcp", False, True, True, "tcp"),  # the queue pair failed once: stay on tcp
        ("ipc", False, True, True, "ipc"),
    ],
)
def test_bulk_path_is_the_best_both_share(transport, shm_both, rdma_both, rdma_failed, expected):
    from transports.base import choose_bulk

    got = choose_bulk(transport, shm_both=shm_both, rdma_both=rdma_both, rdma_failed=rdma_failed)
    assert got == expected

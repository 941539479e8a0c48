"""transports.shm: the shared-memory bulk channel.

- the pure slot accounting (SlotPool) against a model, with hypothesis;
- descriptors and release batches from the network (hostile input);
- sender and receiver in this process: zero copy, release on the last view,
  back-pressure, retiring, hostile descriptors, cleanup;
- a real sender process (spawn): arrays across processes, zero copy, releases
  flowing back, ring-full back-pressure, and SIGKILL while we hold a view;
- no /dev/shm/zmesh-* left behind, per test and at the end of the session.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

import mesh  # noqa: F401  (import order: mesh before transports, see transports/__init__)
from mesh.errors import ClosedError, ConfigError, ProtocolError
from transports import Locality, shm
from transports.shm import (
    FULL,
    HEADER_SIZE,
    TOO_LARGE,
    Grant,
    Refusal,
    ReleaseResult,
    ShmDescriptor,
    ShmReceiver,
    ShmSender,
    SlotPool,
)

SESSION = uuid.uuid4().hex[:8]
_ids = itertools.count(1)
_SPAWN = mp.get_context("spawn")
MiB = 1 << 20


def node_id() -> str:
    """A node id unique to this test session, so leak checks see only our segments."""
    return f"t{SESSION}x{next(_ids)}"


def ours() -> list[str]:
    return [n for n in shm.segment_names() if n.startswith(f"zmesh-t{SESSION}")]


@pytest.fixture(scope="session", autouse=True)
def _no_leaks_in_session():
    shm.cleanup_stale()  # what a node does on start: debris of killed runs goes
    yield
    left = ours()
    for name in left:  # do not leak into the next run either
        shm._unlink(shm.SHM_DIR, name)
    assert not left, f"test session left shared-memory segments behind: {left}"


@pytest.fixture(autouse=True)
def _no_leaks_per_test():
    before = set(ours())
    yield
    left = sorted(set(ours()) - before)
    for name in left:
        shm._unlink(shm.SHM_DIR, name)
    assert not left, f"test left shared-memory segments behind: {left}"


pytestmark = pytest.mark.skipif(not shm.shm_usable(), reason="/dev/shm is not usable here")


# ============================================================== pure core: SlotPool


class PoolMachine(RuleBasedStateMachine):
    """SlotPool against a model: which grants are in flight, with which generation."""

    busy = Bundle("busy")
    done = Bundle("done")

    def __init__(self) -> None:
        super().__init__()
        self.pool = SlotPool()
        self.inflight: dict[int, tuple[int, int]] = {}  # slot -> (generation, nbytes)
        self.last_gen: dict[int, int] = {}
        self.ever: set[int] = set()

    @initialize(
        max_bytes=st.integers(1, 16).map(lambda k: k * MiB),
        max_slots=st.integers(1, 6),
        min_slot=st.sampled_from([4096, 64 * 1024, MiB]),
    )
    def setup(self, max_bytes: int, max_slots: int, min_slot: int) -> None:
        self.pool = SlotPool(max_bytes, max_slots, min_slot)

    @rule(target=busy, nbytes=st.one_of(
        st.sampled_from([0, 1, 4096, MiB - 1, MiB, 2 * MiB + 1, 3 * MiB, 5 * MiB, 9 * MiB]),
        st.integers(0, 20 * MiB),
    ))
    def acquire(self, nbytes: int) -> Any:
        pool = self.pool
        before = pool.slots()
        got = pool.acquire(nbytes)
        event(f"acquire: {got.reason}" if isinstance(got, Refusal) else
              f"acquire: {'new' if got.create else 'reuse'}{' + retire' if got.retire else ''}")
        if isinstance(got, Refusal):
            size = pool.slot_size(nbytes)
            if got.reason == TOO_LARGE:
                assert size > pool.max_bytes and not pool.fits(nbytes)
            else:
                assert got.reason == FULL and pool.fits(nbytes)
                # Refused only when even retiring every free slot would not make room
                # and no free slot is big enough.
                busy = [(c, g) for c, g, b in before.values() if b]
                assert all(b or c < nbytes for c, _, b in before.values())
                assert (len(busy) >= pool.max_slots
                        or sum(c for c, _ in busy) + size > pool.max_bytes)
            assert pool.slots() == before  # a refusal changes nothing
            return []  # nothing to release later
        assert isinstance(got, Grant)
        assert got.capacity >= nbytes
        size = pool.slot_size(nbytes)
        if any(not b and nbytes <= c <= 4 * size for c, _, b in before.values()):
            assert not got.create, "a free slot of about the right size is reused first"
        assert got.slot not in self.inflight, "a busy slot was granted twice"
        assert got.generation > self.last_gen.get(got.slot, 0)
        if got.create:
            assert got.slot not in self.ever, "slot ids are never reused"
        for gone in got.retire:
            assert gone in before and not before[gone][2], "only free slots are retired"
            assert gone not in pool.slots()
        self.ever.add(got.slot)
        self.last_gen[got.slot] = got.generation
        self.inflight[got.slot] = (got.generation, nbytes)
        return [(got.slot, got.generation)]

    @rule(grants=consumes(busy))
    def release(self, grants: list) -> None:
        for slot, gen in grants:
            result = self.pool.release(slot, gen)
            if self.inflight.get(slot, (None,))[0] == gen:
                assert result is ReleaseResult.OK
                del self.inflight[slot]
            else:  # hostile_release happened to free it first: now a duplicate
                assert result in (ReleaseResult.STALE, ReleaseResult.UNKNOWN)

    @rule(slot=st.integers(0, 12), gen=st.integers(0, 12))
    def hostile_release(self, slot: int, gen: int) -> None:
        """A release the peer should not send: must never free a slot wrongly."""
        slots = self.pool.slots()
        result = self.pool.release(slot, gen)
        if slot not in slots:
            assert result is ReleaseResult.UNKNOWN
        elif self.inflight.get(slot, (None,))[0] == gen:
            assert result is ReleaseResult.OK  # happened to be the right one
            del self.inflight[slot]
        else:
            assert result is ReleaseResult.STALE
            assert self.pool.slots() == slots

    @precondition(lambda self: self.last_gen)
    @rule(data=st.data())
    def duplicate_release(self, data: Any) -> None:
        slot = data.draw(st.sampled_from(sorted(self.last_gen)))
        gen = self.last_gen[slot]
        if slot in self.inflight:
            return
        slots = self.pool.slots()
        assert self.pool.release(slot, gen) in (ReleaseResult.STALE, ReleaseResult.UNKNOWN)
        assert self.pool.slots() == slots

    @rule()
    def trim(self) -> None:
        gone = self.pool.trim()
        assert not set(gone) & set(self.inflight)
        assert all(busy for _, _, busy in self.pool.slots().values())

    @invariant()
    def consistent(self) -> None:
        slots = self.pool.slots()
        assert len(slots) <= self.pool.max_slots
        assert self.pool.total_bytes == sum(c for c, _, _ in slots.values())
        assert self.pool.total_bytes <= self.pool.max_bytes
        assert {s for s, (_, _, b) in slots.items() if b} == set(self.inflight)
        for slot, (gen, nbytes) in self.inflight.items():
            assert slots[slot][1] == gen and slots[slot][0] >= nbytes

    def teardown(self) -> None:
        # With everything released, anything that fits is granted.
        for slot, (gen, _) in list(self.inflight.items()):
            assert self.pool.release(slot, gen) is ReleaseResult.OK
        assert isinstance(self.pool.acquire(self.pool.max_bytes // 2), Grant)


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=200, stateful_step_count=50, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])


@given(st.integers(0, 1 << 40))
def test_slot_size_waste_is_bounded(nbytes: int) -> None:
    pool = SlotPool(1 << 41, 4, 4096)
    size = pool.slot_size(nbytes)
    assert size >= nbytes and size % shm.PAGE == 0
    assert size <= max(4096, nbytes + max(shm.PAGE, nbytes // 8))


def test_pool_reuses_retires_and_refuses() -> None:
    pool = SlotPool(max_bytes=8 * MiB, max_slots=2, min_slot_bytes=MiB)
    a = pool.acquire(3 * MiB)
    assert isinstance(a, Grant) and a.create and a.generation == 1
    b = pool.acquire(MiB)
    assert isinstance(b, Grant) and b.create
    assert pool.acquire(MiB) == Refusal(FULL)  # both slots busy
    assert pool.acquire(9 * MiB) == Refusal(TOO_LARGE)
    assert pool.release(a.slot, a.generation) is ReleaseResult.OK
    assert pool.release(a.slot, a.generation) is ReleaseResult.STALE  # duplicate
    again = pool.acquire(2 * MiB)  # reuses a's slot, next generation
    assert isinstance(again, Grant) and again.slot == a.slot and not again.create
    assert again.generation == 2
    assert pool.release(a.slot, 1) is ReleaseResult.STALE  # the old generation
    assert pool.release(99, 1) is ReleaseResult.UNKNOWN
    assert pool.release(again.slot, 2) is ReleaseResult.OK
    big = pool.acquire(6 * MiB)  # too big for the free 3 MiB slot: retire it
    assert isinstance(big, Grant) and big.create and big.retire == (a.slot,)
    assert pool.total_bytes == 7 * MiB


def test_pool_rejects_bad_config() -> None:
    with pytest.raises(ConfigError):
        SlotPool(max_bytes=1, max_slots=1, min_slot_bytes=2)
    with pytest.raises(ConfigError):
        SlotPool(max_bytes=MiB, max_slots=0)


# ============================================================== wire: hostile input

names = st.from_regex(r"zmesh-[a-z0-9_]{1,10}-[0-9]{1,5}", fullmatch=True)
u63 = st.integers(0, (1 << 63) - 1)


@given(names, u63, u63, u63, u63, st.lists(names, max_size=5))
def test_descriptor_roundtrip(segment, offset, nbytes, slot, gen, retired) -> None:
    desc = ShmDescriptor(segment, offset, nbytes, slot, gen, tuple(retired))
    assert ShmDescriptor.unpack(desc.pack()) == desc
    assert ShmDescriptor.from_wire(desc.to_wire()) == desc


wire_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 64), 1 << 64) | st.floats()
    | st.text(max_size=30) | st.binary(max_size=30),
    lambda children: st.lists(children, max_size=7),
    max_leaves=20,
)


@given(wire_values)
def test_descriptor_from_garbage_is_a_protocol_error(obj: Any) -> None:
    try:
        ShmDescriptor.from_wire(obj)
    except ProtocolError:
        pass


@given(st.binary(max_size=200))
def test_descriptor_unpack_garbage_bytes(buf: bytes) -> None:
    try:
        ShmDescriptor.unpack(buf)
    except ProtocolError:
        pass


@pytest.mark.parametrize("obj", [
    ["../etc/passwd", 4096, 8, 1, 1, []],
    ["zmesh-a-1/../../x", 4096, 8, 1, 1, []],
    ["zmesh-a-1", -1, 8, 1, 1, []],
    ["zmesh-a-1", 4096, (1 << 64) - 1, 1, 1, []],
    ["zmesh-a-1", 4096, True, 1, 1, []],
    ["zmesh-a-1", 4096, 8, 1, 1, ["/dev/null"]],
    ["zmesh-a-1", 4096, 8, 1, 1, None],
    ["zmesh-a-1", 4096, 8, 1],
    {"segment": "zmesh-a-1"},
])
def test_descriptor_rejects(obj: Any) -> None:
    with pytest.raises(ProtocolError):
        ShmDescriptor.from_wire(obj)
    with pytest.raises(ProtocolError):
        ShmDescriptor.unpack(msgpack.packb(obj))


def test_release_batches() -> None:
    assert shm.unpack_releases(shm.pack_releases([(1, 2), (3, 4)])) == [(1, 2), (3, 4)]
    for bad in (None, [[1]], [[1, -2]], [["a", 1]], [[1, 2, 3]], 7):
        with pytest.raises(ProtocolError):
            shm.unpack_releases(bad)


# ============================================================== one process


@pytest.fixture
def pair():
    nid = node_id()
    sender = ShmSender(nid, max_bytes=64 * MiB, max_slots=4)
    receiver = ShmReceiver(nid)
    yield sender, receiver
    receiver.close()
    sender.close()


@pytest.mark.parametrize("arr", [
    np.arange(MiB // 4, dtype=np.float32).reshape(512, 512),
    np.arange(300_000, dtype=np.int64)[::3],  # not contiguous: copied in C order
    np.asfortranarray(np.arange(40_000, dtype=np.float64).reshape(200, 200)),
    np.array(3.5),
    np.zeros((0, 7), dtype=np.uint8),
    np.array([b"ab", b"cde"]),
    np.arange(10, dtype=">i4"),
])
def test_roundtrip_zero_copy_read_only(pair, arr: np.ndarray) -> None:
    from mesh.tensor import array_from_frames, encode_descriptor

    sender, receiver = pair
    desc = sender.write(arr)
    assert desc is not None and desc.offset == HEADER_SIZE and desc.nbytes == arr.nbytes
    view = receiver.open(ShmDescriptor.unpack(desc.pack()))
    got = array_from_frames(encode_descriptor(arr.dtype, arr.shape), view.data)
    np.testing.assert_array_equal(got, arr)
    assert not got.flags.writeable and not got.flags.owndata
    del got, view
    assert sender.on_release(receiver.take_releases()) == 1
    assert sender.in_use == 0


def test_views_are_the_shared_memory(pair) -> None:
    sender, receiver = pair
    desc, buf = sender.reserve(16)
    buf[:] = 1
    view = receiver.open(desc)
    assert view.data.tolist() == [1] * 16
    buf[3] = 42  # the sender writes after the receiver mapped: no copy in between
    assert view.data[3] == 42
    with pytest.raises(ValueError):
        view.data[0] = 0  # mapped read-only


def test_release_follows_the_last_derived_view(pair) -> None:
    sender, receiver = pair
    desc = sender.write(np.arange(1024, dtype=np.float32))
    view = receiver.open(desc)
    arr = view.array(np.float32, (32, 32))
    derived = [arr[3:], arr.T, arr.view(np.int32).reshape(-1), memoryview(arr[1]),
               np.frombuffer(memoryview(arr), np.uint8)]
    del view, arr
    assert receiver.live_views == 1
    while derived:
        assert receiver.take_releases() == []
        derived.pop()
    assert receiver.take_releases() == [(desc.slot, desc.generation)]
    assert receiver.live_views == 0


def test_explicit_release_and_notify() -> None:
    nid = node_id()
    calls = []
    with ShmSender(nid, max_bytes=8 * MiB) as sender, \
            ShmReceiver(nid, notify=lambda: calls.append(1)) as receiver:
        d1, d2 = sender.write(np.ones(10)), sender.write(np.zeros(10))
        v1, v2 = receiver.open(d1), receiver.open(d2)
        v1.release()
        v1.release()  # idempotent
        assert v1.released and not v2.released
        v2.release()
        assert len(calls) == 1  # once per batch, not per release
        assert receiver.take_releases() == [(d1.slot, d1.generation), (d2.slot, d2.generation)]
        assert v1.data.view(np.float64)[0] == 1.0  # still mapped: safe to read, not stable
        assert sender.on_release([(d1.slot, d1.generation), (d2.slot, d2.generation)]) == 2


def test_bad_releases_are_protocol_errors_after_applying_good_ones(pair) -> None:
    sender, receiver = pair
    d1, d2 = sender.write(np.ones(8)), sender.write(np.ones(8))
    with pytest.raises(ProtocolError) as err:
        sender.on_release([(d1.slot, d1.generation), (d2.slot, d2.generation + 1),
                           (999, 1), (d1.slot, d1.generation)])
    assert err.value.reason == "shm_release"
    assert sender.in_use == 1  # d1 freed, d2 still busy
    sender.abort(d2)
    assert sender.in_use == 0


def test_back_pressure_full_wait_and_too_large() -> None:
    nid = node_id()
    with ShmSender(nid, max_bytes=4 * MiB, max_slots=2) as sender:
        a, b = sender.write(np.ones(10)), sender.write(np.ones(10))
        t0 = time.monotonic()
        assert sender.write(np.ones(10)) is None  # full: no waiting by default
        assert time.monotonic() - t0 < 1.0
        assert sender.refused[FULL] == 1
        assert sender.write(np.ones(5 * MiB // 8), timeout=5.0) is None  # never fits: at once
        assert sender.refused[TOO_LARGE] == 1 and not sender.fits(5 * MiB)
        threading.Timer(0.2, sender.on_release, args=([(a.slot, a.generation)],)).start()
        t0 = time.monotonic()
        c = sender.write(np.ones(10), timeout=5.0)  # waits for the release
        assert c is not None and c.slot == a.slot and c.generation == 2
        assert 0.1 < time.monotonic() - t0 < 3.0
        assert sender.write(np.ones(10), timeout=0.1) is None  # times out
        threading.Timer(0.2, sender.close).start()
        with pytest.raises(ClosedError):
            sender.write(np.ones(10), timeout=5.0)
        del b


def test_retired_segments_are_unlinked_and_unmapped() -> None:
    nid = node_id()
    with ShmSender(nid, max_bytes=4 * MiB, max_slots=4, min_slot_bytes=MiB) as sender, \
            ShmReceiver(nid) as receiver:
        small = sender.write(np.ones(MiB // 8))
        del receiver.open(small).data
        sender.on_release(receiver.take_releases())
        big = sender.write(np.ones(3 * MiB // 8))  # 1 + 3 MiB fits: no retiring yet
        del receiver.open(big).data
        sender.on_release(receiver.take_releases())
        bigger = sender.write(np.ones(3 * MiB // 8 + 1000))  # needs the small one's room
        assert bigger is not None and small.segment in bigger.retired
        assert small.segment not in shm.segment_names(nid)
        assert small.segment in receiver.mapped()
        receiver.open(bigger).release()
        assert small.segment not in receiver.mapped()


def test_hostile_descriptors(pair, tmp_path) -> None:
    sender, receiver = pair
    desc = sender.write(np.arange(100, dtype=np.int32))
    other = node_id()

    def rejects(reason: str, **change: Any) -> None:
        fields = {**{f: getattr(desc, f) for f in
                     ("segment", "offset", "nbytes", "slot", "generation")}, **change}
        with pytest.raises(ProtocolError) as err:
            receiver.open(ShmDescriptor(**fields))
        assert err.value.reason == reason, err.value

    rejects("shm_missing", segment=f"zmesh-{sender.node_id}-999999")
    rejects("shm_name", segment=f"zmesh-{other}-1")  # another node's segment
    rejects("shm_bounds", offset=0)  # would expose the header
    rejects("shm_bounds", offset=HEADER_SIZE, nbytes=HEADER_SIZE + 64 * MiB)
    rejects("shm_bounds", offset=1 << 62, nbytes=1 << 62)
    rejects("shm_header", slot=desc.slot + 1)
    rejects("shm_generation", generation=desc.generation + 1)  # not written yet
    rejects("shm_generation", generation=0)
    view = receiver.open(desc)  # the real one still works
    rejects("shm_generation")  # ... but only once: a duplicate is refused
    assert view.data.view(np.int32)[99] == 99
    # Files named like our segments but not ours: too short, garbage header.
    for size, content in ((100, b"x" * 100), (2 * HEADER_SIZE, b"\0" * 2 * HEADER_SIZE)):
        name = f"zmesh-{sender.node_id}-{900000 + size}"
        with open(os.path.join(shm.SHM_DIR, name), "wb") as f:
            f.write(content)
        try:
            rejects("shm_header", segment=name)
        finally:
            os.unlink(os.path.join(shm.SHM_DIR, name))
    # Not regular files: a symlink (not followed), a directory, a FIFO (must not block).
    base = os.path.join(shm.SHM_DIR, f"zmesh-{sender.node_id}-")
    os.symlink(os.path.join(shm.SHM_DIR, desc.segment), base + "800001")
    os.mkdir(base + "800002")
    os.mkfifo(base + "800003")
    try:
        rejects("shm_missing", segment=f"zmesh-{sender.node_id}-800001")
        rejects("shm_header", segment=f"zmesh-{sender.node_id}-800002")
        rejects("shm_header", segment=f"zmesh-{sender.node_id}-800003")
        removed = shm.cleanup_stale(now=time.time() + 3600)  # must not block on the FIFO
        assert not {n for n in removed if n.startswith(base[len(shm.SHM_DIR) + 1:])}
    finally:
        os.unlink(base + "800001")
        os.rmdir(base + "800002")
        os.unlink(base + "800003")
    # A hostile peer names our own (the receiver's node's) segments: refused by name.
    assert ShmReceiver(other).mapped() == []
    with pytest.raises(ProtocolError):
        ShmReceiver(other).open(desc)


@pytest.fixture(scope="module")
def hostile_target():
    nid = node_id()
    sender = ShmSender(nid, max_bytes=8 * MiB, max_slots=1, min_slot_bytes=MiB)
    desc = sender.write(np.arange(MiB // 8, dtype=np.int64))
    yield sender, desc
    sender.close()


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.one_of(st.integers(HEADER_SIZE, HEADER_SIZE + MiB), st.integers(0, 2 * MiB),
                       st.integers(0, (1 << 63) - 1)),
       nbytes=st.one_of(st.integers(0, MiB), st.integers(0, (1 << 63) - 1)),
       slot=st.sampled_from([1, 1, 1, 0, 2]), generation=st.sampled_from([1, 1, 1, 0, 2]))
def test_open_never_reads_outside_the_data(hostile_target, offset, nbytes, slot,
                                           generation) -> None:
    """Whatever a peer claims, open() returns bytes inside the slot's data or raises
    ProtocolError; a generation is accepted at most once."""
    sender, desc = hostile_target
    receiver = ShmReceiver(sender.node_id)  # fresh: no generation seen yet
    claim = ShmDescriptor(desc.segment, offset, nbytes, slot, generation)
    try:
        view = receiver.open(claim)
    except ProtocolError as exc:
        assert exc.reason in ("shm_bounds", "shm_header", "shm_generation")
        event(exc.reason)
    else:
        event("accepted")
        assert HEADER_SIZE <= offset and offset + nbytes <= HEADER_SIZE + MiB
        assert (slot, generation) == (desc.slot, desc.generation)
        want = np.arange(MiB // 8, dtype=np.int64).view(np.uint8)[offset - HEADER_SIZE:]
        np.testing.assert_array_equal(view.data, want[:nbytes])
        with pytest.raises(ProtocolError):
            receiver.open(claim)  # the same generation twice
        del view
    finally:
        receiver.close()


def test_receiver_close_unmaps_and_drops_releases(pair) -> None:
    sender, receiver = pair
    desc = sender.write(np.arange(1000, dtype=np.float64))
    view = receiver.open(desc)
    arr = view.array(np.float64, (1000,))
    receiver.close()  # peer lost: mappings dropped, but our view stays valid
    assert receiver.mapped() == []
    assert arr[999] == 999.0
    del view, arr
    assert receiver.take_releases() == []
    with pytest.raises(ClosedError):
        receiver.open(desc)


def test_sender_close_unlinks_but_receiver_views_survive() -> None:
    nid = node_id()
    sender, receiver = ShmSender(nid, max_bytes=8 * MiB), ShmReceiver(nid)
    desc = sender.write(np.full(1000, 7.0))
    desc2, writable = sender.reserve(64)  # a live writable view on the sender side
    view = receiver.open(desc)
    assert len(shm.segment_names(nid)) == 2
    sender.close()
    sender.close()
    assert shm.segment_names(nid) == []
    assert view.array(np.float64, (1000,))[-1] == 7.0
    writable[:] = 1  # still mapped until the view dies
    with pytest.raises(ClosedError):
        sender.write(np.ones(3))
    receiver.close()
    del desc2


def test_cleanup_node_and_stale(tmp_path) -> None:
    nid = node_id()
    sender = ShmSender(nid, max_bytes=8 * MiB)
    sender.write(np.ones(4))
    name = sender.names()[0]
    assert name not in shm.cleanup_stale()  # we are alive
    assert name in shm.segment_names(nid)
    assert shm.cleanup_node(nid) == [name]
    sender.close()

    # Segments of a dead process (header pid), of a live one, and headerless debris.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    d = str(tmp_path)
    owners = {"dead": dead.pid, "live": os.getpid()}
    for label, pid in owners.items():
        header = shm._HEADER.pack(shm._MAGIC, 1, HEADER_SIZE, pid, 0, shm._MY_PID_NS,
                                  0, 1, 0, b"n")
        with open(os.path.join(d, f"zmesh-{label}-1"), "wb") as f:
            f.write(header.ljust(HEADER_SIZE, b"\0"))
    open(os.path.join(d, "zmesh-debris-1"), "wb").close()
    open(os.path.join(d, "not-ours"), "wb").close()
    assert shm.cleanup_stale(d) == ["zmesh-dead-1"]
    assert shm.cleanup_stale(d, now=time.time() + 3600) == ["zmesh-debris-1"]
    assert sorted(os.listdir(d)) == ["not-ours", "zmesh-live-1"]
    with pytest.raises(ConfigError):
        shm.cleanup_node("../x")


def test_beacon_proves_a_shared_shm_dir(tmp_path) -> None:
    nid = node_id()
    beacon = shm.Beacon(nid)
    try:
        assert beacon.name == f"zmesh-{nid}-0" and shm.check_beacon(nid, beacon.name, beacon.token)
        wrong = ("0" * 32, "zz" * 16, beacon.token[:-2], None, 5)
        assert not any(shm.check_beacon(nid, beacon.name, t) for t in wrong)
        assert not shm.check_beacon(node_id(), beacon.name, beacon.token)  # another peer's
        assert not shm.check_beacon(nid, f"zmesh-{nid}-1", beacon.token)
        assert not shm.check_beacon("a-b", beacon.name, beacon.token)
        assert not shm.check_beacon(nid, beacon.name, beacon.token, shm_dir=str(tmp_path))
        with pytest.raises(FileExistsError):
            shm.Beacon(nid)  # one per node id
        os.mkfifo(tmp_path / f"zmesh-{nid}-0")
        assert not shm.check_beacon(nid, beacon.name, beacon.token, shm_dir=str(tmp_path))
        assert beacon.name not in shm.cleanup_stale()  # alive
    finally:
        beacon.close()
        beacon.close()
    assert shm.segment_names(nid) == []
    assert not shm.check_beacon(nid, beacon.name, beacon.token)


def test_locality_and_usability(tmp_path) -> None:
    here = Locality.here()
    assert shm.shm_usable()
    assert not shm.shm_usable(str(tmp_path / "missing"))
    assert shm.can_use_shm(here, Locality(here.host, "other-process"))
    assert not shm.can_use_shm(here, Locality("other-boot/1", "x"))
    t = shm.ShmTransport()
    assert t.name == "shm" and t.available() and t.bind_endpoints(["ipc://auto"], "n") == []
    assert t.pick_endpoint(["x"], here, here) is None
    assert shm.valid_node_id("0123456789abcdef") and not shm.valid_node_id("a-b")
    assert not shm.valid_node_id("x" * 65) and not shm.valid_node_id(None)
    with pytest.raises(ConfigError):
        ShmSender("bad-id")
    with pytest.raises(ConfigError):
        ShmSender(node_id()).write(np.array([object()]))


# ============================================================== across processes


def _sender_main(conn: Any, nid: str, max_bytes: int, max_slots: int) -> None:
    """A sender process: obeys commands from the test over a Pipe (the control link)."""
    from transports.shm import ShmSender

    sender = ShmSender(nid, max_bytes=max_bytes, max_slots=max_slots)
    kept: list = []
    while True:
        cmd, *args = conn.recv()
        if cmd == "write":
            seed, shape, dtype, timeout = args
            arr = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
            desc = sender.write(arr, timeout=timeout)
            conn.send(None if desc is None else desc.pack())
        elif cmd == "reserve":
            desc, buf = sender.reserve(args[0])
            buf[:] = 1
            kept.append(buf)
            conn.send(desc.pack())
        elif cmd == "poke":
            kept[-1][:] = args[0]
            conn.send(True)
        elif cmd == "release":
            try:
                conn.send(sender.on_release(args[0]))
            except ProtocolError as exc:
                conn.send(exc.reason)
        elif cmd == "stats":
            conn.send(sender.stats())
        elif cmd == "beacon":
            kept.append(shm.Beacon(nid))
            conn.send((kept[-1].name, kept[-1].token))
        elif cmd == "exit":
            for item in kept:
                if isinstance(item, shm.Beacon):
                    item.close()
            kept.clear()
            sender.close()
            conn.send(True)
            return


class SenderProc:
    def __init__(self, max_bytes: int = 256 * MiB, max_slots: int = 4) -> None:
        self.id = node_id()
        self.conn, child = _SPAWN.Pipe()
        self.proc = _SPAWN.Process(target=_sender_main,
                                   args=(child, self.id, max_bytes, max_slots), daemon=True)
        self.proc.start()
        child.close()

    def call(self, *cmd: Any, timeout: float = 20.0) -> Any:
        self.conn.send(cmd)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"sender process: no answer to {cmd[0]!r}")
        return self.conn.recv()

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("exit", timeout=5.0)
            except (TimeoutError, EOFError, OSError):
                pass
            self.proc.join(5.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5.0)
        self.conn.close()


@pytest.fixture
def sender_proc():
    procs: list[SenderProc] = []

    def start(**kw: Any) -> SenderProc:
        procs.append(SenderProc(**kw))
        return procs[-1]

    yield start
    for p in procs:
        p.stop()
        shm.cleanup_node(p.id)  # a killed one could not


def test_cross_process_transfer_release_and_back_pressure(sender_proc) -> None:
    sp = sender_proc(max_bytes=64 * MiB, max_slots=2)
    receiver = ShmReceiver(sp.id)
    try:
        assert shm.check_beacon(sp.id, *sp.call("beacon"))  # we see its /dev/shm
        # Arrays of several sizes and dtypes, checked against the same seeded data.
        for seed, shape, dtype in [(1, (1000,), "float32"), (2, (256, 1024), "float64"),
                                   (3, (3, 5, 7), "int16"), (4, (4 * MiB,), "float32")]:
            desc = ShmDescriptor.unpack(sp.call("write", seed, shape, dtype, 0.0))
            view = receiver.open(desc)
            got = view.array(dtype, shape)
            want = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
            np.testing.assert_array_equal(got, want)
            del view, got
            assert sp.call("release", receiver.take_releases()) == 1
        assert sp.call("stats")["in_use"] == 0

        # Zero copy: the sender pokes the slot after we mapped it; we see the change.
        view = receiver.open(ShmDescriptor.unpack(sp.call("reserve", 4096)))
        assert view.data[100] == 1
        sp.call("poke", 9)
        assert view.data[100] == 9 and view.data[4095] == 9

        # Ring full: we hold two slots; the sender is refused, then waits for a release.
        view2 = receiver.open(ShmDescriptor.unpack(sp.call("write", 5, (1000,), "float32", 0)))
        assert sp.call("write", 6, (1000,), "float32", 0.0) is None
        assert sp.call("stats")["refused"] == {FULL: 1}
        del view2
        releases = receiver.take_releases()
        assert len(releases) == 1
        assert sp.call("release", releases) == 1
        desc = ShmDescriptor.unpack(sp.call("write", 6, (1000,), "float32", 0.0))
        np.testing.assert_array_equal(
            receiver.open(desc).array("float32", (1000,)),
            np.random.default_rng(6).standard_normal(1000).astype("float32"),
        )
        releases = receiver.take_releases()  # the temporary view is gone
        assert releases == [(desc.slot, desc.generation)]
        assert sp.call("release", releases * 2) == "shm_release"  # the duplicate refused
        assert sp.call("stats")["in_use"] == 1  # only the reserve() slot still held
        del view
        assert sp.call("release", receiver.take_releases()) == 1
    finally:
        receiver.close()


def test_sender_sigkilled_while_receiver_holds_a_view(sender_proc) -> None:
    sp = sender_proc(max_bytes=64 * MiB)
    receiver = ShmReceiver(sp.id)
    desc = ShmDescriptor.unpack(sp.call("write", 7, (MiB,), "float32", 0.0))
    arr = receiver.open(desc).array("float32", (MiB,))
    assert shm.segment_names(sp.id) == [desc.segment]
    os.kill(sp.proc.pid, signal.SIGKILL)
    sp.proc.join(5.0)
    assert sp.proc.exitcode == -signal.SIGKILL
    want = np.random.default_rng(7).standard_normal(MiB).astype("float32")
    np.testing.assert_array_equal(arr, want)  # mapped memory outlives its creator
    receiver.close()  # the node does this on peer loss
    np.testing.assert_array_equal(arr[-10:], want[-10:])
    # The next node start on this host removes the dead process's segment.
    assert desc.segment in shm.cleanup_stale()
    assert shm.segment_names(sp.id) == []
    assert arr.sum() == want.sum()  # still valid: unlinked, not unmapped
    del arr
    assert receiver.take_releases() == []


def test_header_layout_is_stable() -> None:
    """The header is read by other processes (maybe another version): pin it."""
    assert shm._HEADER.size == 128 and shm._GEN_OFFSET == 56
    assert struct.calcsize("<8sIIQQQQQ") == shm._GEN_OFFSET


def test_has_room_says_whether_acquire_could_grant():
    pool = SlotPool(4 << 20, 2, 1 << 20)
    assert pool.has_room(1 << 20) and not pool.has_room(8 << 20)  # too large: never
    first = pool.acquire(1 << 20)
    second = pool.acquire(1 << 20)
    assert isinstance(first, Grant) and isinstance(second, Grant)
    assert not pool.has_room(1 << 20)  # both slots busy, no room for a third
    pool.release(first.slot, first.generation)
    assert pool.has_room(1 << 20)
    assert isinstance(pool.acquire(1 << 20), Grant)

"""Tests for mesh.flow: credit windows, credit grants, batching, batch frames.

The core property test simulates one publisher -> subscriber link with
messages and credit updates in flight in both directions, and checks the
accounting after every step against an independent model.
"""

from __future__ import annotations

import math
import struct
import sys
import tracemalloc
from array import array
from collections import deque

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from mesh.errors import ClosedError, ConfigError, MeshError, ProtocolError
from mesh.flow import (
    OVERFLOW_POLICIES,
    Action,
    CreditGrant,
    CreditWindow,
    decode_batch,
    decode_runs,
    encode_batch,
    split_run,
)

# --------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"credits": 0}, "credits must be an integer >= 1"),
        ({"credits": -3}, "credits"),
        ({"credits": True}, "credits"),
        ({"credits": 2.0}, "credits"),
        ({"credit_bytes": 0}, "credit_bytes"),
        ({"overflow": "drop"}, "overflow must be one of 'block', 'drop_oldest', 'drop_new'"),
        ({"max_pending": -1}, "max_pending"),
        ({"overflow": "drop_oldest", "max_pending": 0}, "use overflow='drop_new'"),
    ],
)
def test_window_rejects_bad_config(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        CreditWindow(**kwargs)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"credits": 0}, "credits"),
        ({"credit_bytes": -1}, "credit_bytes"),
        ({"flush_delay": -0.1}, "flush_delay"),
        ({"flush_delay": math.nan}, "flush_delay"),
        ({"credits": 4, "threshold": 5}, "threshold"),
        ({"threshold": 0}, "threshold"),
    ],
)
def test_grant_rejects_bad_config(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        CreditGrant(**kwargs)


def test_defaults_match_the_api() -> None:
    w: CreditWindow[str] = CreditWindow()
    assert (w.credits, w.credit_bytes, w.overflow) == (1024, 64 << 20, "block")
    assert w.available == 1024 and w.available_bytes == 64 << 20
    g = CreditGrant()
    assert (g.credits, g.credit_bytes, g.threshold, g.flush_delay) == (1024, 64 << 20, 512, 0.005)


# --------------------------------------------------------------------------
# Sender side, by example
# --------------------------------------------------------------------------


def test_drop_new_keeps_the_oldest() -> None:
    w: CreditWindow[str] = CreditWindow(2, overflow="drop_new", max_pending=5)
    assert [w.offer(x, 1).action for x in "abcd"] == [
        Action.SEND,
        Action.SEND,
        Action.DROP_NEW,
        Action.DROP_NEW,
    ]
    assert w.drops == {"drop_new": 2, "drop_oldest": 0}
    assert w.pending == 0 and w.available == 0
    assert w.on_credit(1, 1) == []
    assert w.offer("e", 1).action is Action.SEND


def test_drop_oldest_keeps_the_newest() -> None:
    w: CreditWindow[str] = CreditWindow(1, overflow="drop_oldest", max_pending=2)
    assert w.offer("a", 1).action is Action.SEND
    assert w.offer("b", 1).action is Action.QUEUE
    assert w.offer("c", 1).action is Action.QUEUE
    d = w.offer("d", 1)
    assert (d.action, d.victim) == (Action.DROP_OLDEST, "b")
    d = w.offer("e", 1)
    assert (d.action, d.victim) == (Action.DROP_OLDEST, "c")
    assert w.drops == {"drop_new": 0, "drop_oldest": 2}
    assert w.on_credit(1, 1) == ["d"]
    assert w.on_credit(1, 1) == ["e"]
    assert w.pending == 0 and w.pending_bytes == 0


def test_block_holds_up_to_max_pending_then_blocks() -> None:
    w: CreditWindow[str] = CreditWindow(1, overflow="block", max_pending=1)
    assert w.offer("a", 1).action is Action.SEND
    assert w.offer("b", 1).action is Action.QUEUE
    assert w.offer("c", 1).action is Action.BLOCK  # not taken: caller waits and retries
    assert w.pending == 1 and w.drops == {"drop_new": 0, "drop_oldest": 0}
    assert w.on_credit(1, 1) == ["b"]
    assert not w.can_send(1)
    assert w.offer("c", 1).action is Action.QUEUE


def test_block_without_holding() -> None:
    w: CreditWindow[str] = CreditWindow(1, overflow="block", max_pending=0)
    assert w.offer("a", 1).action is Action.SEND
    assert w.offer("b", 1).action is Action.BLOCK
    assert w.on_credit(1, 1) == []
    assert w.can_send(1)
    assert w.offer("b", 1).action is Action.SEND


def test_cancel_withdraws_a_held_message_by_identity() -> None:
    w: CreditWindow[list[int]] = CreditWindow(1, overflow="block", max_pending=4)
    first, twin_a, twin_b = [0], [1], [1]
    w.offer(first, 1)
    w.offer(twin_a, 3)
    w.offer(twin_b, 5)
    assert w.cancel(twin_b) is True  # equal to twin_a, but not the same publish
    assert w.cancel(twin_b) is False
    assert w.cancel([9]) is False
    assert (w.pending, w.pending_bytes, w.cancelled) == (1, 3, 1)
    assert w.on_credit(1, 1) == [twin_a]
    assert w.pending == 0 and w.in_flight == 1


def test_held_messages_are_never_overtaken() -> None:
    w: CreditWindow[str] = CreditWindow(2, credit_bytes=10, overflow="drop_oldest", max_pending=4)
    assert w.offer("a", 6).action is Action.SEND
    assert w.offer("big", 6).action is Action.QUEUE  # 12 > 10 bytes
    # "small" would fit the byte window but must wait behind "big".
    assert w.offer("small", 1).action is Action.QUEUE
    assert w.on_credit(1, 6) == ["big", "small"]


def test_oversized_message_travels_alone() -> None:
    w: CreditWindow[str] = CreditWindow(4, credit_bytes=10, overflow="block", max_pending=4)
    g = CreditGrant(4, 10)
    assert w.offer("a", 3).action is Action.SEND
    assert g.on_received(3)
    assert w.offer("huge", 50).action is Action.QUEUE
    g.on_consumed(3, 0.0)
    assert w.on_credit(*g.take_update(0.0, force=True)) == ["huge"]  # type: ignore[misc]
    assert w.in_flight == 1 and w.available_bytes == 0
    assert g.on_received(50) is True  # alone: not a violation
    assert w.offer("b", 1).action is Action.QUEUE
    g.on_consumed(50, 0.0)
    assert w.on_credit(*g.take_update(0.0, force=True)) == ["b"]  # type: ignore[misc]
    assert g.violations == 0


def test_close_releases_held_messages_and_refuses_more() -> None:
    w: CreditWindow[str] = CreditWindow(1, overflow="block", max_pending=8)
    w.offer("a", 1)
    w.offer("b", 1)
    w.offer("c", 1)
    assert w.close("peer worker-2 died") == ["b", "c"]
    assert w.closed and w.pending == 0 and w.in_flight == 0
    assert w.close("again") == [] and w.closed_reason == "peer worker-2 died"
    assert w.on_credit(1, 1) == []  # late credit is harmless
    with pytest.raises(ClosedError, match="worker-2 died"):
        w.offer("d", 1)
    assert not w.can_send(0)


@pytest.mark.parametrize(
    "msgs, nbytes", [(-1, 0), (0, -5), ("1", 0), (1.0, 0), (True, 0), (None, 0)]
)
def test_hostile_credit_update_is_a_protocol_error(msgs: object, nbytes: object) -> None:
    w: CreditWindow[str] = CreditWindow(2)
    w.offer("a", 1)
    with pytest.raises(ProtocolError):
        w.on_credit(msgs, nbytes)  # type: ignore[arg-type]
    assert w.in_flight == 1


def test_excess_credit_cannot_inflate_the_window() -> None:
    w: CreditWindow[str] = CreditWindow(2, credit_bytes=100, max_pending=0)
    w.offer("a", 10)
    assert w.on_credit(1_000_000, 1 << 40) == []
    assert w.excess_credit == 1
    assert (w.available, w.available_bytes, w.in_flight_bytes) == (2, 100, 0)
    assert [w.offer(x, 1).action for x in "bcd"] == [Action.SEND, Action.SEND, Action.BLOCK]


def test_negative_size_is_refused() -> None:
    with pytest.raises(ConfigError, match="nbytes"):
        CreditWindow(2).offer("a", -1)


def test_window_stats_are_plain_ints() -> None:
    w: CreditWindow[str] = CreditWindow(1, overflow="drop_oldest", max_pending=1)
    for x in "abc":
        w.offer(x, 2)
    s = w.stats()
    assert s["sent"] == 1 and s["pending"] == 1 and s["drop_oldest"] == 1
    assert all(type(v) is int for v in s.values())


# --------------------------------------------------------------------------
# Receiver side, by example
# --------------------------------------------------------------------------


def test_credit_returns_on_consumption_not_receipt() -> None:
    g = CreditGrant(4, flush_delay=0.005)
    for _ in range(4):
        assert g.on_received(10)
    assert g.take_update(100.0, force=True) is None  # received is not consumed
    assert g.next_deadline() is None
    g.on_consumed(10, 1.0)
    assert g.next_deadline() == pytest.approx(1.005)
    assert g.take_update(1.004) is None
    assert g.take_update(1.005) == (1, 10)
    g.on_consumed(10, 2.0)
    g.on_consumed(10, 2.0)  # half the window of 4: due at once
    assert g.next_deadline() == 2.0
    assert g.take_update(2.0) == (2, 20)
    assert (g.returned, g.updates, g.outstanding) == (3, 2, 1)


def test_byte_half_window_makes_an_update_due() -> None:
    g = CreditGrant(100, credit_bytes=1000)
    g.on_received(600)
    g.on_consumed(600, 0.0)
    assert g.take_update(0.0) == (1, 600)


def test_violation_is_counted_never_raised() -> None:
    g = CreditGrant(2, credit_bytes=10)
    assert g.on_received(4) and g.on_received(4)
    assert g.on_received(1) is False  # third message on a window of 2
    assert g.violations == 1
    g.on_dropped(1)
    g.on_consumed(4, 0.0)
    assert g.take_update(0.0) == (1, 4)
    assert g.on_received(7) is False  # 4 + 7 > 10 bytes, and not alone
    assert g.violations == 2 and g.stats()["violations"] == 2


def test_consuming_more_than_received_is_a_bug_report() -> None:
    g = CreditGrant(2)
    with pytest.raises(MeshError, match="on_received"):
        g.on_consumed(1, 0.0)
    with pytest.raises(MeshError, match="on_received"):
        g.on_dropped(1)


def test_credit_updates_are_batched_on_a_fast_stream() -> None:
    """10 000 messages over a window of 64: about one update per 32 messages."""
    n, window = 10_000, 64
    w: CreditWindow[int] = CreditWindow(window, max_pending=0)
    g = CreditGrant(window)
    now, sent = 0.0, 0
    while sent < n or g.buffered or g.pending[0]:
        while sent < n and w.offer(sent, 100).action is Action.SEND:
            g.on_received(100)
            sent += 1
        now += 1e-6
        if g.buffered:
            g.on_consumed(100, now)  # the app consumes one message per microsecond
        update = g.take_update(now)
        if update:
            w.on_credit(*update)
    assert g.returned == n and w.in_flight == 0
    assert g.updates <= n // 32 + 2


@settings(max_examples=150, deadline=None)
@given(
    window=st.integers(1, 32),
    delay=st.sampled_from([0.001, 0.005]),
    gaps=st.lists(st.sampled_from([0.0, 1e-5, 1e-4, 0.002, 0.01]), min_size=1, max_size=300),
)
def test_updates_are_bounded_by_threshold_and_delay(
    window: int, delay: float, gaps: list[float]
) -> None:
    """Unforced updates <= consumed / threshold + elapsed / flush_delay + 1."""
    w: CreditWindow[int] = CreditWindow(window)
    g = CreditGrant(window, flush_delay=delay)
    now = 0.0
    for i, gap in enumerate(gaps):
        now += gap
        if w.offer(i, 1).action is Action.SEND:
            g.on_received(1)
            g.on_consumed(1, now)
        update = g.take_update(now)
        if update:
            w.on_credit(*update)
    now = max(now, g.next_deadline() or now)
    update = g.take_update(now)
    if update:
        w.on_credit(*update)
    assert g.pending == (0, 0) and w.in_flight == 0
    assert g.returned == g.consumed
    assert g.updates <= g.consumed / g.threshold + now / delay + 1


def test_received_run_by_example() -> None:
    g = CreditGrant(4)
    assert g.on_received_run([10] * 6) == 4  # two beyond a window of 4
    assert (g.received, g.buffered, g.outstanding, g.violations, g.dropped) == (6, 4, 4, 2, 2)
    assert g.outstanding_bytes == 40
    assert g.on_received_run([]) == 0 and g.received == 6
    g.on_consumed(40, 0.0, count=4)
    assert g.take_update(0.0) == (4, 40)
    assert g.on_received_run([1, 2]) == 2 and g.violations == 2


def test_received_run_refuses_the_rest_after_a_violation() -> None:
    g = CreditGrant(10, credit_bytes=10)
    # 6 does not fit next to 5; 1 would fit on its own, but comes after a violation.
    assert g.on_received_run([5, 6, 1]) == 1
    assert (g.received, g.buffered, g.outstanding, g.outstanding_bytes) == (3, 1, 1, 5)
    assert (g.violations, g.dropped) == (2, 2)
    # An oversized message may travel alone, never with company.
    g = CreditGrant(10, credit_bytes=10)
    assert g.on_received_run([50, 1]) == 1
    assert (g.outstanding, g.outstanding_bytes, g.violations) == (1, 50, 1)


# One step of the history before the run: ("recv", nbytes, keep a violating one),
# ("consume", how many), ("update", force, seconds later).
_grant_op_st = st.one_of(
    st.tuples(st.just("recv"), st.integers(0, 60), st.booleans()),
    st.tuples(st.just("consume"), st.integers(1, 3)),
    st.tuples(st.just("update"), st.booleans(), st.sampled_from([0.0, 0.001, 0.01])),
)


def _grant_with_history(window: int, credit_bytes: int | None, ops: list[tuple]) -> CreditGrant:
    """A grant in the state a random stream of the per-message API leaves it."""
    g = CreditGrant(window, credit_bytes)
    buffered: deque[int] = deque()  # sizes received within credit (or kept), not consumed
    now = 0.0
    for op in ops:
        if op[0] == "recv":
            _, nbytes, keep = op
            if g.on_received(nbytes) or keep:  # the caller may accept a violating message
                buffered.append(nbytes)
            else:
                g.on_dropped(nbytes)
        elif op[0] == "consume":
            count = min(op[1], len(buffered))
            if count:
                g.on_consumed(sum(buffered.popleft() for _ in range(count)), now, count=count)
        else:
            _, force, dt = op
            now += dt
            g.take_update(now, force=force)
    return g


def _grant_state(g: CreditGrant) -> tuple:
    return g.stats(), g.outstanding_bytes, g.pending


def _reference_run(g: CreditGrant, sizes: list[int]) -> int:
    """on_received_run through the per-message API; returns how many were accepted.

    Built as the docs state it: the same totals as on_received per message and
    on_dropped per refused one, and once one is refused the rest of the run is
    refused too. A later message can pass on_received on its own (with a byte limit,
    a small one after a big refused one), and on_received counts no violation for
    it; the run still refuses it as sent beyond credit, so it counts as a violation
    here too: on_received + on_dropped alone would undercount violations.
    """
    accepted = 0
    refusing = False
    for nbytes in sizes:
        ok = g.on_received(nbytes)
        if ok and not refusing:
            accepted += 1
            continue
        if ok:
            event("a later message of the run would have fitted on its own")
            g.violations += 1
        refusing = True
        g.on_dropped(nbytes)
    return accepted


@pytest.mark.parametrize("byte_limit", [False, True], ids=["messages", "bytes"])
@settings(max_examples=300, deadline=None)
@given(
    window=st.integers(1, 8),
    credit_bytes=st.integers(1, 120),
    ops=st.lists(_grant_op_st, max_size=30),
    sizes=st.lists(st.integers(0, 60), max_size=12),
)
def test_received_run_matches_per_message_accounting(
    byte_limit: bool, window: int, credit_bytes: int, ops: list[tuple], sizes: list[int]
) -> None:
    limit = credit_bytes if byte_limit else None
    g = _grant_with_history(window, limit, ops)
    ref = _grant_with_history(window, limit, ops)
    assert _grant_state(g) == _grant_state(ref)
    before_msgs, before_bytes = g.outstanding, g.outstanding_bytes

    accepted = g.on_received_run(sizes)
    expected = _reference_run(ref, sizes)

    assert type(accepted) is int and accepted == expected
    assert _grant_state(g) == _grant_state(ref)
    event(f"accepted {'all' if accepted == len(sizes) else 'some' if accepted else 'none'}")
    if accepted:
        # What was let in stays within the window (an oversized message only alone).
        assert g.outstanding <= g.credits
        assert limit is None or g.outstanding_bytes <= limit or g.outstanding == 1
    # Only the accepted prefix occupies the window; the refused rest is already dropped.
    assert g.outstanding == before_msgs + accepted
    assert g.outstanding_bytes == before_bytes + sum(sizes[:accepted])
    fits = len(sizes) <= g.credits - before_msgs and (
        limit is None
        or before_bytes + sum(sizes) <= limit
        or (before_msgs == 0 and len(sizes) == 1)
    )
    if fits:
        assert accepted == len(sizes)


@pytest.mark.parametrize("byte_limit", [False, True], ids=["messages", "bytes"])
@settings(max_examples=200, deadline=None)
@given(
    window=st.integers(1, 8),
    credit_bytes=st.integers(1, 120),
    ops=st.lists(_grant_op_st, max_size=30),
    data=st.data(),
)
def test_honest_run_is_accepted_whole(
    byte_limit: bool, window: int, credit_bytes: int, ops: list[tuple], data: st.DataObject
) -> None:
    """A run the publisher had credit for (messages and bytes) is never refused."""
    limit = credit_bytes if byte_limit else None
    g = _grant_with_history(window, limit, ops)
    room = g.credits - g.outstanding
    room_bytes = None if limit is None else limit - g.outstanding_bytes
    assume(room > 0 and (room_bytes is None or room_bytes >= 0))
    if g.outstanding == 0 and limit is not None and data.draw(st.booleans()):
        sizes = [limit + data.draw(st.integers(0, 100))]  # oversized, but alone
    else:
        sizes = data.draw(st.lists(st.integers(0, 60), max_size=room))
        while room_bytes is not None and sum(sizes) > room_bytes:
            sizes[sizes.index(max(sizes))] //= 2  # shrink until it fits, keep the count
    before = _grant_state(g)
    assert g.on_received_run(sizes) == len(sizes)
    assert g.violations == before[0]["violations"] and g.dropped == before[0]["dropped"]
    assert g.buffered == before[0]["buffered"] + len(sizes)
    assert g.outstanding <= g.credits
    assert limit is None or g.outstanding_bytes <= limit or g.outstanding == 1


# --------------------------------------------------------------------------
# The link, simulated: random interleavings with messages and credit in flight
# --------------------------------------------------------------------------


class LinkSim(RuleBasedStateMachine):
    """Publisher A --data--> subscriber B, B --credit--> A, both links FIFO and slow."""

    @initialize(
        credits=st.integers(1, 6),
        credit_bytes=st.none() | st.integers(1, 40),
        policy=st.sampled_from(OVERFLOW_POLICIES),
        max_pending=st.integers(0, 4),
        delay=st.sampled_from([0.0, 0.002, 0.005]),
    )
    def setup(
        self,
        credits: int,  # noqa: A002 - the API's name
        credit_bytes: int | None,
        policy: str,
        max_pending: int,
        delay: float,
    ) -> None:
        if policy == "drop_oldest":
            max_pending = max(1, max_pending)
        self.credits, self.cb, self.policy, self.max_pending = (
            credits,
            credit_bytes,
            policy,
            max_pending,
        )
        self.win: CreditWindow[int] = CreditWindow(credits, credit_bytes, policy, max_pending)
        self.grant = CreditGrant(credits, credit_bytes, flush_delay=delay)
        self.delay = delay
        self.now = 0.0
        self.size: dict[int, int] = {}
        self.next_id = 0
        self.wire: deque[int] = deque()  # A -> B, sent, not yet received
        self.buffer: deque[int] = deque()  # at B, received, not yet consumed
        self.credit_wire: deque[tuple[int, int]] = deque()  # B -> A
        self.waiting: deque[int] = deque()  # BLOCKed publishes, to offer again
        self.delivered: list[int] = []
        self.dropped: set[int] = set()
        self.cancelled: set[int] = set()
        # An independent model of the window, to predict every decision.
        self.m_in_flight = 0
        self.m_in_flight_bytes = 0
        self.m_pending: deque[int] = deque()
        self.m_drops = {"drop_new": 0, "drop_oldest": 0}
        self.first_pending = 0.0  # when the oldest unreturned consumption happened
        self.updates = 0

    # -- helpers ---------------------------------------------------------------

    def _fits(self, n: int) -> bool:
        if self.m_in_flight >= self.credits:
            return False
        return self.cb is None or self.m_in_flight == 0 or self.m_in_flight_bytes + n <= self.cb

    def _put_on_wire(self, i: int) -> None:
        self.m_in_flight += 1
        self.m_in_flight_bytes += self.size[i]
        self.wire.append(i)

    def _offer(self, i: int) -> bool:
        """Offer i and check the decision against the model. False if BLOCKed."""
        n = self.size[i]
        if not self.m_pending and self._fits(n):
            expected = Action.SEND
        elif self.policy == "drop_new":
            expected = Action.DROP_NEW
        elif len(self.m_pending) < self.max_pending:
            expected = Action.QUEUE
        elif self.policy == "block":
            expected = Action.BLOCK
        else:
            expected = Action.DROP_OLDEST
        d = self.win.offer(i, n)
        assert d.action is expected, (d, expected)
        event(f"{self.policy}: {expected.name}")  # --hypothesis-show-statistics
        if expected is Action.SEND:
            self._put_on_wire(i)
        elif expected is Action.DROP_NEW:
            self.dropped.add(i)
            self.m_drops["drop_new"] += 1
        elif expected is Action.QUEUE:
            self.m_pending.append(i)
        elif expected is Action.DROP_OLDEST:
            victim = self.m_pending.popleft()
            assert d.victim == victim  # the oldest held one, never a newer one
            self.dropped.add(victim)
            self.m_pending.append(i)
            self.m_drops["drop_oldest"] += 1
        else:
            return False
        if expected is not Action.DROP_OLDEST:
            assert d.victim is None
        return True

    def _poll(self, force: bool = False) -> None:
        # The batching rule, modelled: due once half the window (messages or
        # bytes) waits to go back, or flush_delay after the first of them.
        msgs, nbytes = self.grant.pending
        half_bytes = None if self.cb is None else (self.cb + 1) // 2
        due = msgs > 0 and (
            msgs >= (self.credits + 1) // 2
            or (half_bytes is not None and nbytes >= half_bytes)
            or self.now >= self.first_pending + self.delay
        )
        deadline = self.grant.next_deadline()
        assert (deadline is not None and deadline <= self.now) == due
        update = self.grant.take_update(self.now, force=force)
        assert update == ((msgs, nbytes) if (due or (force and msgs)) else None)
        if update is not None:
            self.updates += 1
            self.credit_wire.append(update)

    def _deliver_credit(self) -> None:
        msgs, nbytes = self.credit_wire.popleft()
        self.m_in_flight -= msgs
        self.m_in_flight_bytes -= nbytes
        released = self.win.on_credit(msgs, nbytes)
        expected: list[int] = []
        while self.m_pending and self._fits(self.size[self.m_pending[0]]):
            i = self.m_pending.popleft()
            expected.append(i)
            self._put_on_wire(i)
        assert released == expected  # held messages leave oldest first
        assert self.win.excess_credit == 0

    def _receive(self) -> None:
        i = self.wire.popleft()
        assert self.grant.on_received(self.size[i]) is True  # honest sender
        self.buffer.append(i)

    def _consume(self) -> None:
        i = self.buffer.popleft()
        if self.grant.pending[0] == 0:
            self.first_pending = self.now
        self.grant.on_consumed(self.size[i], self.now)
        self.delivered.append(i)

    # -- rules -----------------------------------------------------------------

    @rule(nbytes=st.integers(0, 30))
    def publish(self, nbytes: int) -> None:
        i = self.next_id
        self.next_id += 1
        self.size[i] = nbytes
        if self.waiting:  # a blocked publisher does not jump the queue
            self.waiting.append(i)
        elif not self._offer(i):
            self.waiting.append(i)

    @precondition(lambda self: bool(self.waiting))
    @rule()
    def retry_blocked(self) -> None:
        if self._offer(self.waiting[0]):
            self.waiting.popleft()

    @precondition(lambda self: self.policy == "block" and bool(self.m_pending))
    @rule(data=st.data())
    def cancel_on_timeout(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from(list(self.m_pending)))
        assert self.win.cancel(i) is True
        self.m_pending.remove(i)
        self.cancelled.add(i)

    @precondition(lambda self: bool(self.wire))
    @rule()
    def receive(self) -> None:
        self._receive()

    @precondition(lambda self: bool(self.buffer))
    @rule()
    def consume(self) -> None:
        self._consume()

    @rule(dt=st.sampled_from([0.0, 0.001, 0.003, 0.006]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self._poll()

    @rule()
    def piggyback(self) -> None:
        self._poll(force=True)

    @precondition(lambda self: bool(self.credit_wire))
    @rule()
    def deliver_credit(self) -> None:
        self._deliver_credit()

    # -- invariants ------------------------------------------------------------

    @invariant()
    def window_is_sound(self) -> None:
        w = self.win
        assert 0 <= w.in_flight <= self.credits
        assert w.available >= 0
        if self.cb is not None:
            assert w.in_flight_bytes <= self.cb or w.in_flight == 1
            assert w.available_bytes is not None and w.available_bytes >= 0
        assert w.pending == len(self.m_pending) <= self.max_pending
        assert w.pending_bytes == sum(self.size[i] for i in self.m_pending)
        assert w.drops == self.m_drops

    @invariant()
    def every_credit_is_accounted_for(self) -> None:
        # What A thinks is in flight is exactly what is on the wire, at B, or
        # on its way back as credit: nothing is created or lost.
        pend_msgs, pend_bytes = self.grant.pending
        back_msgs = sum(m for m, _ in self.credit_wire)
        back_bytes = sum(b for _, b in self.credit_wire)
        here = list(self.wire) + list(self.buffer)
        assert self.win.in_flight == len(here) + pend_msgs + back_msgs == self.m_in_flight
        assert self.win.in_flight_bytes == (
            sum(self.size[i] for i in here) + pend_bytes + back_bytes
        )
        assert self.grant.outstanding <= self.credits
        assert self.grant.violations == 0

    @invariant()
    def delivery_is_in_order(self) -> None:
        assert all(a < b for a, b in zip(self.delivered, self.delivered[1:], strict=False))
        assert not (set(self.delivered) & (self.dropped | self.cancelled))

    @rule()
    def drain_and_check(self) -> None:
        """The app consumes everything and credit is flushed (forced, as on
        close) until all is quiet; then the totals must add up exactly."""
        for _ in range(1000):
            if self.waiting:
                self.retry_blocked()
            while self.wire:
                self._receive()
            while self.buffer:
                self._consume()
            self._poll(force=True)
            while self.credit_wire:
                self._deliver_credit()
            if not (self.waiting or self.wire or self.m_pending):
                break
        else:
            raise AssertionError("the link did not drain: credit was lost")
        g = self.grant
        # No message lost or duplicated; drops and timeouts are the only gaps.
        assert self.delivered == sorted(set(range(self.next_id)) - self.dropped - self.cancelled)
        if self.policy == "block":
            assert not self.dropped
        assert self.win.drops == self.m_drops
        assert sum(self.m_drops.values()) == len(self.dropped)
        # Every consumed message returned exactly one credit, in few updates.
        assert g.consumed == g.returned == len(self.delivered)
        assert g.returned_bytes == sum(self.size[i] for i in self.delivered)
        assert g.updates == self.updates <= g.consumed
        assert self.win.in_flight == 0 and self.win.in_flight_bytes == 0
        assert self.win.available == self.credits
        assert g.outstanding == 0 and g.buffered == 0 and g.pending == (0, 0)

    def teardown(self) -> None:
        # Skip the final check when a step already failed (teardown runs in a
        # finally): a second error would only slow down shrinking.
        if hasattr(self, "win") and sys.exc_info()[1] is None:
            self.drain_and_check()


LinkSim.TestCase.settings = settings(
    max_examples=250,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLinkSim = LinkSim.TestCase


# --------------------------------------------------------------------------
# Batch frames
# --------------------------------------------------------------------------

# Runs as plain bytes: (header, payloads), empty headers, runs and batches included.
runs_st = st.lists(
    st.tuples(st.binary(max_size=24), st.lists(st.binary(max_size=40), max_size=5)), max_size=12
)


def _bytes_like(data: st.DataObject, b: bytes) -> bytes | bytearray | memoryview:
    kind = data.draw(st.sampled_from(["bytes", "bytearray", "memoryview", "slice"]))
    if kind == "bytearray":
        return bytearray(b)
    if kind == "memoryview":
        return memoryview(b)
    if kind == "slice":
        return memoryview(b"<<" + b + b">>")[2 : 2 + len(b)]  # a view into a bigger buffer
    return b


def _u32(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


@settings(max_examples=200, deadline=None)
@given(runs_st, st.data())
def test_batch_roundtrip(runs: list[tuple[bytes, list[bytes]]], data: st.DataObject) -> None:
    mixed = [(_bytes_like(data, h), [_bytes_like(data, p) for p in ps]) for h, ps in runs]
    blob = encode_batch(mixed)
    assert type(blob) is bytes
    assert blob == encode_batch(runs)  # the bytes, not the buffer type, make the frame
    for frame in (blob, bytearray(blob), memoryview(blob), memoryview(b"x" + blob)[1:]):
        out = decode_batch(frame)
        assert out == runs
        for header, payloads in out:
            assert type(header) is bytes and type(payloads) is list
            assert all(type(p) is bytes for p in payloads)
    assert len(blob) == 5 + sum(8 + len(h) + sum(4 + len(p) for p in ps) for h, ps in runs)


def test_batch_layout_is_as_documented() -> None:
    blob = (
        b"\x02" + _u32(3)
        + _u32(1) + b"H" + _u32(2) + _u32(1, 0) + b"a"  # two payloads, one empty
        + _u32(0) + _u32(0)  # no header, no messages
        + _u32(2) + b"hh" + _u32(1) + _u32(3) + b"xyz"
    )  # fmt: skip
    runs = [(b"H", [b"a", b""]), (b"", []), (b"hh", [b"xyz"])]
    assert decode_batch(blob) == runs
    assert encode_batch(runs) == blob
    assert encode_batch([]) == b"\x02\x00\x00\x00\x00" and decode_batch(encode_batch([])) == []


def test_runs_of_a_bytes_frame_are_cut_from_it_in_place() -> None:
    """decode_runs hands out a bytes frame itself with each run's offset (the receiver
    cuts a 400 KiB batch's messages from the frame: no copy of it, no fresh pages);
    any other buffer gives a copy of each run's bytes, from 0. Same messages both ways."""
    runs = [(b"H", [b"a" * 1000, b"", b"bc"]), (b"hh", [b"xyz"])]
    frame = encode_batch(runs)
    in_place = decode_runs(frame)
    copied = decode_runs(memoryview(frame))
    assert [blob is frame for _h, blob, _at, _s, _t in in_place] == [True, True]
    assert [at for _h, _b, at, _s, _t in copied] == [0, 0]
    for (h1, b1, at1, s1, t1), (h2, b2, _at2, s2, t2), (header, payloads) in zip(
            in_place, copied, runs, strict=True):
        assert h1 == h2 == header and list(s1) == list(s2) and t1 == t2
        assert b1[at1:at1 + t1] == b2 == b"".join(payloads)
        assert split_run(b1, s1, at1) == split_run(b2, s2) == payloads


def test_batch_accepts_any_bytes_like_frames() -> None:
    words = array("H", [1, 2, 3])
    blob = encode_batch(
        [
            (bytearray(b"h"), [memoryview(b"payload"), bytearray(), words]),
            (memoryview(b"hdr"), (b"p",)),  # any sequence of payloads
            (b"", []),
        ]
    )
    assert decode_batch(blob) == [
        (b"h", [b"payload", b"", words.tobytes()]),  # counted in bytes, not items
        (b"hdr", [b"p"]),
        (b"", []),
    ]


def _check_garbage(blob: bytes) -> None:
    try:
        out = decode_batch(blob)
    except ProtocolError as exc:
        # The version is judged once the fixed header is there, before anything else.
        assert exc.reason == ("version" if len(blob) >= 5 and blob[0] != 2 else "malformed")
        return
    # If it decoded, it is a real batch: it encodes back to the same bytes.
    assert encode_batch(out) == blob


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_raises_protocol_error_only(blob: bytes) -> None:
    _check_garbage(blob)
    _check_garbage(b"\x02" + blob)  # right version byte, to get past it
    _check_garbage(b"\x02\x01\x00\x00\x00" + blob)  # and one run, to get into it


@settings(max_examples=300, deadline=None)
@given(runs_st, st.data())
def test_damaged_batches_raise_protocol_error_only(
    runs: list[tuple[bytes, list[bytes]]], data: st.DataObject
) -> None:
    blob = bytearray(encode_batch(runs))
    kind = data.draw(st.sampled_from(["truncate", "flip", "extend", "big_length"]))
    event(kind)
    if kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "flip":
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "extend":
        blob += data.draw(st.binary(min_size=1, max_size=8))
    else:
        pos = data.draw(st.integers(0, len(blob) - 4))
        big = data.draw(st.sampled_from([2**31, 2**32 - 1, 2**32 - 2]))
        blob[pos : pos + 4] = struct.pack("<I", big)
    _check_garbage(bytes(blob))


@pytest.mark.parametrize(
    "blob, reason",
    [
        pytest.param(b"", "malformed", id="empty"),
        pytest.param(b"\x02\x00\x00\x00", "malformed", id="short-header"),
        pytest.param(b"\x01\x00\x00\x00\x00", "version", id="v1-empty"),
        pytest.param(b"\x01\x01\x00\x00\x00\x01\x00\x00\x00\x01\x00\x00\x00a", "version", id="v1"),
        pytest.param(b"\x00" + _u32(0), "version", id="v0"),
        pytest.param(b"\x03" + _u32(0), "version", id="v3"),
        pytest.param(b"\xff" + _u32(2**32 - 1), "version", id="v255"),
        pytest.param(b"\x02" + _u32(2**32 - 1), "malformed", id="4G-runs-in-0-bytes"),
        pytest.param(b"\x02" + _u32(2**32 - 1) + b"\x00" * 64, "malformed", id="4G-runs"),
        pytest.param(b"\x02" + _u32(2) + _u32(0, 0), "malformed", id="2-runs-in-1"),
        pytest.param(b"\x02" + _u32(1) + _u32(2**32 - 1, 0), "malformed", id="4G-header"),
        pytest.param(b"\x02" + _u32(1) + _u32(5, 0), "malformed", id="header-past-end"),
        pytest.param(b"\x02" + _u32(1) + _u32(4) + b"hhhh", "malformed", id="no-count"),
        pytest.param(b"\x02" + _u32(1) + _u32(0, 2**32 - 1), "malformed", id="4G-messages"),
        pytest.param(
            b"\x02" + _u32(1) + _u32(0, 2**30) + b"\x00" * 64, "malformed", id="1G-messages"
        ),
        pytest.param(b"\x02" + _u32(1) + _u32(0, 3, 0), "malformed", id="sizes-past-end"),
        pytest.param(
            b"\x02" + _u32(1) + _u32(0, 2, 2**31, 2**31) + b"x" * 8, "malformed", id="4G-bytes"
        ),
        pytest.param(
            # Sums to 0 modulo 2**32: a wrapping 32-bit sum would decode three empty payloads.
            b"\x02" + _u32(1) + _u32(0, 3, 2**32 - 1, 2**32 - 1, 2),
            "malformed",
            id="wrapping-sum",
        ),
        pytest.param(
            b"\x02" + _u32(1) + _u32(0, 2, 3, 4) + b"x" * 6, "malformed", id="payload-past-end"
        ),
        pytest.param(
            b"\x02" + _u32(2) + _u32(0, 1, 1) + b"x" + _u32(2**32 - 1, 0),
            "malformed",
            id="second-run-4G-header",
        ),
        pytest.param(encode_batch([(b"h", [b"a"])]) + b"\x00", "malformed", id="trailing"),
        pytest.param(encode_batch([]) + b"\x00", "malformed", id="trailing-after-none"),
    ],
)
def test_hostile_lengths_are_refused_without_allocating(blob: bytes, reason: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError) as exc:
            decode_batch(blob)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert exc.value.reason == reason
    assert peak < 256 * 1024, f"decoding {len(blob)} bytes peaked at {peak} bytes"


@pytest.mark.parametrize(
    "thing",
    [
        "not bytes",
        None,
        5,
        [1, 2, 3],
        memoryview(b"\x02\x00\x00\x00\x00\x00")[::2],  # not contiguous
    ],
    ids=["str", "None", "int", "list", "strided"],
)
def test_non_buffer_input_is_a_protocol_error(thing: object) -> None:
    with pytest.raises(ProtocolError) as exc:
        decode_batch(thing)  # type: ignore[arg-type]
    assert exc.value.reason == "malformed"

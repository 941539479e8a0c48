"""SWIM membership and failure detection, the way HashiCorp memberlist does it.

A sans-IO state machine (DESIGN.md, "Pure cores, thin I/O"): no sockets, no
threads, no clock, no randomness but the injected ``random.Random``. The I/O
thread passes the time in, feeds it arriving messages and timer ticks, and
carries out what it returns: :class:`Send` (a msgpack-able dict for one peer)
and :class:`Event` (a member joined, changed, became suspect, alive, dead or
left). Between calls it sleeps until :meth:`Membership.next_deadline`.

The protocol (memberlist ``state.go``/``suspicion.go``, SWIM and Lifeguard):

* Every ``probe_interval`` the node pings the next member of a shuffled
  round-robin over alive and suspect members. Without an ack after
  ``probe_timeout`` it asks ``indirect_checks`` alive members to ping it for
  us (``ping_req``); they forward the ack, or send a ``nack`` so that we can
  tell "the target is silent" from "we are the ones who are cut off".
  Without any ack by the end of the interval the target becomes *suspect*.
* A suspect becomes *dead* when its suspicion timer runs out. The timer
  starts at ``suspicion_max`` and shrinks toward ``suspicion_min`` as other
  members independently suspect it too (Lifeguard):
  ``max(min, max - (max - min) * log(C + 1) / log(K + 1))``.
* Incarnation numbers order what is said about a member. A member that
  hears itself suspected or declared dead refutes: it raises its own
  incarnation and gossips *alive*, which overrides the accusation.
* Every change is queued as a broadcast, pushed at once to ``gossip_nodes``
  random members and piggybacked, newest first, on every later message
  until sent ``retransmit_mult * ceil(log10(n + 1))`` times.
* A new member and, every ``push_pull_interval``, a random member exchange
  their full state (``sync``), which is how a joiner learns the cluster and
  how a restarted node learns that it must refute its own death.
* Dead and left members are remembered for ``dead_reclaim`` seconds so that
  stale gossip cannot resurrect them, then forgotten.

Three additions to memberlist fit its sub-second timers (MemberConfig says
why those timers): fresh news is pushed to ``gossip_nodes`` members at once
rather than at the next gossip round; a suspect is told so directly, every
probe interval, by each member that suspects it, and at once whenever it
speaks to one of them (dead and left members too: a restarted process
with the same id refutes its death this way), so it refutes within a round
trip; and a node whose
``tick`` comes far later than it asked (SIGSTOP, swap, a long GC) treats
itself as the one that stalled: it drops the probe in flight instead of
blaming the peer whose ack it was not running to read, gives its suspicion
timers another interval, and refutes before anyone accuses it.

Calling contract for the I/O thread: call :meth:`tick` at
:meth:`next_deadline` (late by more than ``probe_timeout`` counts as a
stall), hand over waiting messages before timers, and treat the dicts in
``Send`` as read-only (they may share parts with our state).

Wire format. Messages (``type`` key)::

    ping      {"seq", "to"}              answer with an ack
    ack       {"seq"}                    direct, or forwarded by a ping_req relay
    ping_req  {"seq", "target", "nack"}  ping target for me, forward its ack
    nack      {"seq"}                    the relay got no ack from the target
    gossip    {}                         only piggybacked entries
    sync      {"join", "members"}        full state; join=True asks for the peer's

Any message may carry entries under ``"gossip"``: ``{"kind", "id", "inc"}``
plus ``"meta"`` for alive and ``"from"`` (the accuser) for suspect and dead.
Sync members are entries too (we always include meta; ``from`` is optional).

Events only ever describe other members; the local member's own state is
:attr:`Membership.incarnation` and :attr:`Membership.left`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import ClosedError, ConfigError

__all__ = [
    "ACK",
    "ALIVE",
    "DEAD",
    "GOSSIP",
    "GOSSIP_KEY",
    "JOINED",
    "LEFT",
    "NACK",
    "PING",
    "PING_REQ",
    "SUSPECT",
    "SYNC",
    "UPDATED",
    "Action",
    "Event",
    "MemberConfig",
    "MemberView",
    "Membership",
    "Send",
    "suspicion_timeout",
]

# Member states; also the ``kind`` of the gossip entry that announces them.
ALIVE = "alive"
SUSPECT = "suspect"
DEAD = "dead"
LEFT = "left"
STATES = (ALIVE, SUSPECT, DEAD, LEFT)

# Event kinds besides the states: a new (or revived) member, new metadata.
JOINED = "joined"
UPDATED = "updated"

# Message types, the ``type`` key of every message (see the module docstring).
PING = "ping"
ACK = "ack"
PING_REQ = "ping_req"
NACK = "nack"
GOSSIP = "gossip"
SYNC = "sync"
MESSAGE_TYPES = frozenset({PING, ACK, PING_REQ, NACK, GOSSIP, SYNC})

GOSSIP_KEY = "gossip"  # every message may carry a list of entries under this key

# Bounds on what a peer may send, so a bad frame cannot make us allocate freely.
_MAX_INC = 2**63 - 1  # msgpack carries up to 64-bit integers
_MAX_ID_LEN = 1024
_MAX_GOSSIP = 1024
_MAX_SYNC = 1 << 16
_MAX_RELAYS = 1024

_LIVE = (ALIVE, SUSPECT)
_GONE = (DEAD, LEFT)


@dataclass(frozen=True)
class MemberConfig:
    """Timing and fan-out of the protocol. Times are seconds.

    The defaults target a LAN (RTT well under probe_timeout). The budget:

    A SIGKILLed peer is declared dead by everyone in under 3 s:
      wait until some member next probes it       random, see below
      + that probe runs to the end of its interval  probe_interval  = 0.25
      + suspicion timer, no confirmation at all     suspicion_max   = 1.6
      + the dead broadcast reaching everyone        pushed at once  ~ a few RTTs
      = 1.85 s + the wait, which leaves 1.15 s (four intervals) for the wait.
      Each member probes one member per interval in a shuffled round-robin,
      so with n-1 observers the chance that nobody has probed the victim
      after m intervals is about e^-m (smaller for n < 5, where each
      observer's round is short). Once suspicion_k = 3 other members confirm,
      the timer is suspicion_min = 1.0 instead. (With 0.6 / 1.2 the worst
      simulated detection was 2.1 s; 1.0 / 1.6 trades some of that margin
      for a live but CPU-starved peer: four processes reducing 64 MiB arrays
      on two cores once had one declared dead at 0.6 s.)

    A peer stalled for 0.5 s (SIGSTOP/SIGCONT) is not:
      the earliest suspicion starts when the first unanswered probe ends,
      at least probe_interval after the stall began  >= 0.25
      + the shortest suspicion timer                   suspicion_min = 1.0
      = no death before 1.25 s. On resuming, the peer sees its own timers
      overdue and refutes at once (and any member it talks to that holds it
      suspect tells it so): 0.75 s of margin.

    probe_timeout is half the interval so that the indirect probe (and its
    nack, sent by the relay 0.8 * probe_timeout after the ping_req) fits in
    the rest. Shorter intervals detect faster but leave less room for RTT
    and scheduling jitter in the I/O thread; with 20% loss on one node's
    links the simulations show no false death at these values.
    """

    probe_interval: float = 0.25
    probe_timeout: float = 0.125
    indirect_checks: int = 3
    suspicion_min: float = 1.0
    suspicion_max: float = 1.6
    suspicion_k: int = 3  # confirmations expected to reach suspicion_min
    retransmit_mult: int = 4
    dead_reclaim: float = 30.0
    max_piggyback: int = 8  # gossip entries carried by one message
    gossip_interval: float = 0.2  # retransmit pending broadcasts this often
    gossip_nodes: int = 3  # members each gossip round (and fresh news) goes to
    push_pull_interval: float = 30.0  # full-state exchange; 0 disables
    awareness_max: int = 8  # Lifeguard local health: timeouts scale up to this factor

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"MemberConfig: {what}; fix the value passed to MemberConfig")

        need(self.probe_interval > 0, f"probe_interval must be > 0, got {self.probe_interval}")
        need(
            0 < self.probe_timeout < self.probe_interval,
            f"probe_timeout must be > 0 and < probe_interval ({self.probe_interval}) "
            f"to leave time for indirect probes, got {self.probe_timeout}",
        )
        need(self.indirect_checks >= 0, f"indirect_checks must be >= 0, got {self.indirect_checks}")
        need(
            0 < self.suspicion_min <= self.suspicion_max,
            f"need 0 < suspicion_min <= suspicion_max, got {self.suspicion_min}, "
            f"{self.suspicion_max}",
        )
        need(self.suspicion_k >= 0, f"suspicion_k must be >= 0, got {self.suspicion_k}")
        need(self.retransmit_mult >= 1, f"retransmit_mult must be >= 1, got {self.retransmit_mult}")
        need(self.dead_reclaim >= 0, f"dead_reclaim must be >= 0, got {self.dead_reclaim}")
        need(self.max_piggyback >= 1, f"max_piggyback must be >= 1, got {self.max_piggyback}")
        need(self.gossip_interval > 0, f"gossip_interval must be > 0, got {self.gossip_interval}")
        need(self.gossip_nodes >= 0, f"gossip_nodes must be >= 0, got {self.gossip_nodes}")
        need(
            self.push_pull_interval >= 0,
            f"push_pull_interval must be >= 0 (0 disables), got {self.push_pull_interval}",
        )
        need(self.awareness_max >= 1, f"awareness_max must be >= 1, got {self.awareness_max}")


@dataclass(frozen=True)
class MemberView:
    """A snapshot of one member; ``meta`` is a copy, safe to keep."""

    id: str
    incarnation: int
    state: str
    state_change: float
    meta: dict[str, Any]


@dataclass(frozen=True)
class Send:
    """Send ``message`` (plain msgpack-able dict) to peer ``to``.

    ``to`` may name a peer the I/O layer cannot reach (not yet connected, or
    already gone); such a send is dropped, as a lost datagram would be.
    """

    to: str
    message: dict[str, Any]


@dataclass(frozen=True)
class Event:
    """Tell the application: ``kind`` is joined, updated, suspect, alive, dead or left."""

    kind: str
    member: MemberView


Action = Send | Event


def suspicion_timeout(confirmations: int, k: int, lo: float, hi: float) -> float:
    """Lifeguard: ``hi`` with no confirmation, down to ``lo`` after ``k`` of them."""
    if k < 1:
        return lo
    frac = math.log(confirmations + 1) / math.log(k + 1)
    return max(lo, hi - (hi - lo) * frac)


@dataclass
class _Member:
    id: str
    incarnation: int
    state: str
    state_change: float
    meta: dict[str, Any]

    def view(self) -> MemberView:
        return MemberView(self.id, self.incarnation, self.state, self.state_change, dict(self.meta))


@dataclass
class _Suspicion:
    start: float
    k: int
    deadline: float
    confirmers: set[str] = field(default_factory=set)  # the accuser, then confirmations


@dataclass
class _Broadcast:
    entry: dict[str, Any]
    order: int  # higher is newer
    transmits: int = 0  # piggybacked so far
    pushed: bool = False  # the immediate push of fresh news (not counted in transmits)


@dataclass
class _Probe:
    target: str
    seq: int
    timeout_at: float  # direct ping gets no more time: go indirect
    deadline: float  # no ack by now: suspect
    indirect: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass
class _Relay:
    requester: str
    seq: int  # the requester's sequence number, echoed in ack/nack
    nack_at: float | None  # None: no nack wanted, or already sent
    expire_at: float


class Membership:
    """The membership of one node: its view of every peer, and its own state."""

    def __init__(
        self,
        self_id: str,
        meta: dict[str, Any] | None = None,
        config: MemberConfig | None = None,
        rng: random.Random | None = None,
        now: float = 0.0,
        incarnation: int = 0,
    ) -> None:
        if not _is_id(self_id):
            raise ConfigError(f"self_id must be a non-empty string, got {self_id!r}")
        if not _is_inc(incarnation):
            raise ConfigError(f"incarnation must be an int in [0, 2**63), got {incarnation!r}")
        self.config = config if config is not None else MemberConfig()
        self.self_id = self_id
        self._rng = rng if rng is not None else random.Random()
        self._me = _Member(self_id, incarnation, ALIVE, now, _plain(meta or {}))
        self._members: dict[str, _Member] = {self_id: self._me}
        self._order: list[str] = []  # probe round-robin, reshuffled every round
        self._order_index = 0
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._suspicions: dict[str, _Suspicion] = {}
        self._broadcasts: dict[str, _Broadcast] = {}  # one per member: newer news replaces older
        self._broadcast_count = 0
        self._seq = 0
        self._awareness = 0
        self._left = False
        # Rate limits, member -> last time: we told it its bad standing because it spoke to
        # us; we told it unprompted that we suspect it; we sent it our own alive.
        self._told: dict[str, float] = {}
        self._nagged: dict[str, float] = {}
        self._corrected: dict[str, float] = {}  # peer -> last time we sent it our own alive
        cfg = self.config
        # Staggered starts, as memberlist does, so that nodes started together don't probe
        # and push-pull in lockstep.
        self._next_probe = now + cfg.probe_interval * self._rng.random()
        self._next_push_pull = now + cfg.push_pull_interval * self._rng.random()
        self._gossip_due = now
        self.malformed = 0  # messages dropped because they were not well formed
        self.stalls = 0  # ticks that came far later than next_deadline() asked

    # ------------------------------------------------------------------ queries

    @property
    def incarnation(self) -> int:
        return self._me.incarnation

    @property
    def left(self) -> bool:
        return self._left

    @property
    def health(self) -> int:
        """Lifeguard local health score: 0 is healthy; timeouts are scaled by ``health + 1``."""
        return self._awareness

    def members(self) -> list[MemberView]:
        """Every member we know, this node included, dead and left ones until reclaimed."""
        return [self._members[mid].view() for mid in sorted(self._members)]

    def get(self, member_id: str) -> MemberView | None:
        m = self._members.get(member_id)
        return m.view() if m is not None else None

    def next_deadline(self) -> float | None:
        """The time at which :meth:`tick` must next be called (None: only when a message comes)."""
        cfg = self.config
        times: list[float] = []
        if not self._left:
            times.append(self._next_probe)
            if cfg.push_pull_interval > 0:
                times.append(self._next_push_pull)
        p = self._probe
        if p is not None:
            times.append(p.deadline if p.indirect else p.timeout_at)
        for r in self._relays.values():
            times.append(r.expire_at if r.nack_at is None else r.nack_at)
        times.extend(s.deadline for s in self._suspicions.values())
        times.extend(
            m.state_change + cfg.dead_reclaim
            for m in self._members.values()
            if m.state in _GONE and m is not self._me
        )
        if self._broadcasts:
            times.append(self._gossip_due)
        return min(times) if times else None

    # ------------------------------------------------------------------ commands

    def add_member(
        self, member_id: str, meta: dict[str, Any], incarnation: int = 0, *, now: float
    ) -> list[Action]:
        """Discovery or a handshake introduced ``member_id``; harmless to repeat."""
        if not _is_id(member_id):
            raise ConfigError(f"member_id must be a non-empty string, got {member_id!r}")
        if not isinstance(meta, dict):
            raise ConfigError(f"meta must be a dict, got {type(meta).__name__}")
        if not _is_inc(incarnation):
            raise ConfigError(f"incarnation must be an int in [0, 2**63), got {incarnation!r}")
        out: list[Action] = []
        if member_id == self.self_id:
            return out  # discovery saw our own announcement
        m = self._members.get(member_id)
        meta = _plain(meta)
        if m is None:
            self._on_alive(member_id, incarnation, meta, member_id, now, out)
            self._send_sync(member_id, True, out)  # it learns the cluster, we learn its view
        elif m.state in _GONE:
            if incarnation > m.incarnation:
                self._on_alive(member_id, incarnation, meta, member_id, now, out)
                self._send_sync(member_id, True, out)
            elif self._may_tell(self._told, member_id, now):
                # Maybe a restarted process with a low incarnation: our state tells it that
                # it must refute (see _on_suspect for self); a truly dead peer loses nothing.
                self._send_sync(member_id, True, out)
        elif incarnation > m.incarnation:
            self._on_alive(member_id, incarnation, meta, member_id, now, out)
        self._flush(now, out)
        return out

    def update_meta(self, meta: dict[str, Any], now: float) -> list[Action]:
        """Change our own metadata (endpoints...): a new incarnation carries it to everyone."""
        if self._left:
            raise ClosedError(f"member {self.self_id} has left; create a new Membership")
        if not isinstance(meta, dict):
            raise ConfigError(f"meta must be a dict, got {type(meta).__name__}")
        out: list[Action] = []
        self._me.meta = _plain(meta)
        self._me.incarnation += 1
        self._enqueue(self._entry(self._me), now)
        self._flush(now, out)
        return out

    def leave(self, now: float) -> list[Action]:
        """Graceful goodbye: every live member is told at once; probing stops."""
        out: list[Action] = []
        if self._left:
            return out
        self._left = True
        self._probe = None
        self._me.state = LEFT
        self._me.state_change = now
        entry = self._entry(self._me)
        self._enqueue(entry, now)
        self._broadcasts[self.self_id].pushed = True  # by the loop below
        # Sent directly to all, not left to gossip, so the cluster knows before we are gone.
        for mid in self._live_ids():
            self._send(out, mid, {"type": GOSSIP}, [entry])
        self._gossip_due = now + self.config.gossip_interval  # the loop above was the push
        return out

    def tick(self, now: float) -> list[Action]:
        """Run the timers that are due: probes, relays, suspicions, reclaim, gossip."""
        out: list[Action] = []
        cfg = self.config
        due = self.next_deadline()
        if due is not None and now - due > cfg.probe_timeout:
            # We were not running (SIGSTOP, swap, long GC): a missing ack says nothing
            # about the target, and refutations may be waiting in our socket.
            self.stalls += 1
            self._probe = None
            for s in self._suspicions.values():
                s.deadline = max(s.deadline, now + cfg.probe_interval)
            if not self._left:
                # Others may have suspected us meanwhile: refute before anyone says so,
                # it costs one incarnation and one broadcast.
                self._refute(self._me.incarnation, now)
        self._tick_probe(now, out)
        self._tick_relays(now, out)
        self._tick_suspicions(now, out)
        self._tell_suspects(now, out)
        self._reclaim(now)
        if not self._left:
            if self._probe is None and now >= self._next_probe:
                self._start_probe(now, out)
            if cfg.push_pull_interval > 0 and now >= self._next_push_pull:
                self._next_push_pull = now + cfg.push_pull_interval
                alive = [mid for mid in self._live_ids() if self._members[mid].state == ALIVE]
                if alive:
                    self._send_sync(self._rng.choice(alive), True, out)
        self._flush(now, out)
        return out

    def handle(self, sender: str, message: Any, now: float) -> list[Action]:
        """A message from ``sender`` arrived. Malformed ones are counted and dropped."""
        if not _is_id(sender) or sender == self.self_id or not _valid_message(message):
            self.malformed += 1
            return []
        out: list[Action] = []
        known = self._members.get(sender)
        # A sender we think is dead (e.g. cut off by a partition that just healed)
        # may replay "dead" news it queued meanwhile about members that are fine:
        # from it, "dead" only raises a suspicion, which the member can refute.
        trusted = known is not None and known.state in (ALIVE, SUSPECT)
        for entry in message.get(GOSSIP_KEY, ()):
            if not trusted and entry.get("kind") == DEAD:
                self._merge(entry, sender, now, out)
            else:
                self._apply(entry, sender, now, out)
        kind = message["type"]
        if kind == PING:
            if message.get("to", self.self_id) == self.self_id:
                self._send(out, sender, {"type": ACK, "seq": message["seq"]})
        elif kind == ACK:
            self._on_ack(message["seq"], now, out)
        elif kind == NACK:
            p = self._probe
            if p is not None and p.seq == message["seq"]:
                p.nacks += 1
        elif kind == PING_REQ:
            self._on_ping_req(sender, message, now, out)
        elif kind == SYNC:
            for entry in message["members"]:
                self._merge(entry, sender, now, out)
            if message.get("join", False):
                self._send_sync(sender, False, out)
        self._tell_standing(sender, now, out)
        self._flush(now, out)
        return out

    # ------------------------------------------------------------------ probing

    def _start_probe(self, now: float, out: list[Action]) -> None:
        interval = self._scaled(self.config.probe_interval)
        self._next_probe = now + interval
        target = self._next_target()
        if target is None:
            return
        seq = self._next_seq()
        timeout = self._scaled(self.config.probe_timeout)
        self._probe = _Probe(target, seq, now + timeout, now + interval)
        self._send_ping(target, seq, out)

    def _next_target(self) -> str | None:
        """Next live member of the shuffled round-robin (memberlist's probe order)."""
        for _ in range(len(self._members) + 1):
            if self._order_index >= len(self._order):
                self._order = self._live_ids()
                self._rng.shuffle(self._order)
                self._order_index = 0
                if not self._order:
                    return None
            mid = self._order[self._order_index]
            self._order_index += 1
            m = self._members.get(mid)
            if m is not None and m.state in _LIVE:
                return mid
        return None

    def _send_ping(self, target: str, seq: int, out: list[Action]) -> None:
        extra: list[dict[str, Any]] = []
        m = self._members.get(target)
        if m is not None and m.state == SUSPECT:
            # As memberlist does: a suspect learns it is suspected from the ping itself.
            extra.append(
                {"kind": SUSPECT, "id": target, "inc": m.incarnation, "from": self.self_id}
            )
        self._send(out, target, {"type": PING, "seq": seq, "to": target}, extra)

    def _tick_probe(self, now: float, out: list[Action]) -> None:
        p = self._probe
        if p is None:
            return
        if not p.indirect and now >= p.timeout_at:
            p.indirect = True
            relays = [
                mid
                for mid in self._live_ids()
                if mid != p.target and self._members[mid].state == ALIVE
            ]
            relays = self._rng.sample(relays, min(len(relays), self.config.indirect_checks))
            for mid in relays:
                msg = {"type": PING_REQ, "seq": p.seq, "target": p.target, "nack": True}
                self._send(out, mid, msg)
            p.expected_nacks = len(relays)
        if now >= p.deadline:
            self._probe = None
            # Lifeguard: relays that answered with nacks prove our own links work, so only
            # missing nacks (or no relays at all) count against our health.
            missing = p.expected_nacks - p.nacks if p.expected_nacks else 1
            self._adjust_awareness(missing)
            m = self._members.get(p.target)
            if m is not None and m.state in _LIVE:
                self._on_suspect(p.target, m.incarnation, self.self_id, self.self_id, now, out)

    def _on_ack(self, seq: int, now: float, out: list[Action]) -> None:
        p = self._probe
        if p is not None and p.seq == seq:
            self._probe = None
            self._adjust_awareness(-1)
            return
        r = self._relays.pop(seq, None)
        if r is not None:
            self._send(out, r.requester, {"type": ACK, "seq": r.seq})

    def _on_ping_req(
        self, sender: str, message: dict[str, Any], now: float, out: list[Action]
    ) -> None:
        target, seq, want_nack = message["target"], message["seq"], message.get("nack", False)
        if target == self.self_id:
            self._send(out, sender, {"type": ACK, "seq": seq})
            return
        m = self._members.get(target)
        if m is None or m.state in _GONE or len(self._relays) >= _MAX_RELAYS:
            if want_nack:
                self._send(out, sender, {"type": NACK, "seq": seq})
            return
        pt = self.config.probe_timeout
        # The nack leaves a little before our own timeout so that it reaches the requester
        # before its probe interval ends; a later ack is still forwarded.
        rseq = self._next_seq()
        self._relays[rseq] = _Relay(sender, seq, now + 0.8 * pt if want_nack else None, now + pt)
        self._send_ping(target, rseq, out)

    def _tick_relays(self, now: float, out: list[Action]) -> None:
        for rseq, r in list(self._relays.items()):
            if r.nack_at is not None and now >= r.nack_at:
                r.nack_at = None
                self._send(out, r.requester, {"type": NACK, "seq": r.seq})
            if now >= r.expire_at:
                del self._relays[rseq]

    # ------------------------------------------------------------------ suspicion

    def _tick_suspicions(self, now: float, out: list[Action]) -> None:
        for mid, s in list(self._suspicions.items()):
            if now >= s.deadline:
                del self._suspicions[mid]
                m = self._members.get(mid)
                if m is not None and m.state == SUSPECT:
                    self._on_dead(mid, m.incarnation, self.self_id, self.self_id, now, out)

    def _tell_suspects(self, now: float, out: list[Action]) -> None:
        """Every suspect is told so, once per probe interval, by everyone who suspects it.

        Gossip reaches a given member only with high probability; the suspect is the one
        member that must hear, or it cannot refute before suspicion_min runs out.
        """
        for mid in self._suspicions:
            m = self._members[mid]
            if m.state == SUSPECT and self._may_tell(self._nagged, mid, now):
                e = {"kind": SUSPECT, "id": mid, "inc": m.incarnation, "from": self.self_id}
                self._send(out, mid, {"type": GOSSIP}, [e])

    def _start_suspicion(self, mid: str, accuser: str, now: float) -> None:
        cfg = self.config
        # Confirmations can only come from members other than us and the suspect.
        k = min(cfg.suspicion_k, max(0, self._live_count() - 2))
        timeout = cfg.suspicion_max if k >= 1 else cfg.suspicion_min
        self._suspicions[mid] = _Suspicion(now, k, now + timeout, {accuser})

    def _confirm(self, s: _Suspicion, accuser: str, now: float) -> bool:
        """An independent suspicion shortens the timer; True if it was new (re-gossip it)."""
        if len(s.confirmers) - 1 >= s.k or accuser in s.confirmers:
            return False
        s.confirmers.add(accuser)
        cfg = self.config
        timeout = suspicion_timeout(
            len(s.confirmers) - 1, s.k, cfg.suspicion_min, cfg.suspicion_max
        )
        s.deadline = max(now, s.start + timeout)  # never in the past: that would look like a stall
        return True

    # ------------------------------------------------------------------ state changes

    def _apply(self, e: dict[str, Any], sender: str, now: float, out: list[Action]) -> None:
        kind, mid, inc = e["kind"], e["id"], e["inc"]
        if kind == ALIVE:
            self._on_alive(mid, inc, e["meta"], sender, now, out)
        elif kind == SUSPECT:
            self._on_suspect(mid, inc, e["from"], sender, now, out)
        elif kind == DEAD:
            self._on_dead(mid, inc, e["from"], sender, now, out)
        else:
            self._on_left(mid, inc, sender, now, out)

    def _merge(self, e: dict[str, Any], sender: str, now: float, out: list[Action]) -> None:
        """One member of a peer's full state (memberlist's mergeState)."""
        kind, mid, inc = e["kind"], e["id"], e["inc"]
        if kind == ALIVE:
            self._on_alive(mid, inc, e["meta"], sender, now, out)
        elif kind == LEFT:
            self._on_left(mid, inc, sender, now, out)
        else:
            # A remote "dead" is only a suspicion here: we give it time to refute.
            self._on_suspect(mid, inc, sender, sender, now, out)

    def _on_alive(
        self, mid: str, inc: int, meta: dict[str, Any], sender: str, now: float, out: list[Action]
    ) -> None:
        if mid == self.self_id:
            me = self._me
            if self._left or inc < me.incarnation:
                return
            if inc == me.incarnation and meta == me.meta:
                return
            self._refute(inc, now)  # someone speaks for us with other data: overrule it
            return
        m = self._members.get(mid)
        if m is None:
            m = _Member(mid, inc, ALIVE, now, dict(meta))
            self._members[mid] = m
            self._add_to_order(mid)
            self._enqueue(self._entry(m), now)
            out.append(Event(JOINED, m.view()))
            return
        if inc <= m.incarnation:
            return
        old_state, old_meta = m.state, m.meta
        self._suspicions.pop(mid, None)
        m.incarnation = inc
        m.meta = dict(meta)
        if m.state != ALIVE:
            m.state = ALIVE
            m.state_change = now
        self._enqueue(self._entry(m), now)
        if old_state in _GONE:
            self._add_to_order(mid)
            out.append(Event(JOINED, m.view()))
            return
        if old_state == SUSPECT:
            out.append(Event(ALIVE, m.view()))
        if m.meta != old_meta:
            out.append(Event(UPDATED, m.view()))

    def _on_suspect(
        self, mid: str, inc: int, accuser: str, sender: str, now: float, out: list[Action]
    ) -> None:
        m = self._members.get(mid)
        if m is None:
            return
        if mid == self.self_id:
            self._accused(inc, sender, now, out)
            return
        if inc < m.incarnation:
            return
        s = self._suspicions.get(mid)
        if s is not None:
            if self._confirm(s, accuser, now):
                self._enqueue({"kind": SUSPECT, "id": mid, "inc": inc, "from": accuser}, now)
            return
        if m.state != ALIVE:
            return
        m.incarnation = inc
        m.state = SUSPECT
        m.state_change = now
        self._start_suspicion(mid, accuser, now)
        self._enqueue({"kind": SUSPECT, "id": mid, "inc": inc, "from": accuser}, now)
        out.append(Event(SUSPECT, m.view()))

    def _on_dead(
        self, mid: str, inc: int, accuser: str, sender: str, now: float, out: list[Action]
    ) -> None:
        self._gone(DEAD, mid, inc, accuser, sender, now, out)

    def _on_left(self, mid: str, inc: int, sender: str, now: float, out: list[Action]) -> None:
        self._gone(LEFT, mid, inc, mid, sender, now, out)

    def _gone(
        self,
        state: str,
        mid: str,
        inc: int,
        accuser: str,
        sender: str,
        now: float,
        out: list[Action],
    ) -> None:
        m = self._members.get(mid)
        if m is None:
            return
        if mid == self.self_id:
            self._accused(inc, sender, now, out)
            return
        if inc < m.incarnation:
            return
        self._suspicions.pop(mid, None)
        if m.state in _GONE:
            return
        m.incarnation = inc
        m.state = state
        m.state_change = now
        entry: dict[str, Any] = {"kind": state, "id": mid, "inc": inc}
        if state == DEAD:
            entry["from"] = accuser
        self._enqueue(entry, now)
        out.append(Event(state, m.view()))

    def _accused(self, inc: int, sender: str, now: float, out: list[Action]) -> None:
        """Someone says we are suspect, dead or left."""
        if self._left:
            return  # true enough: we are leaving
        if inc >= self._me.incarnation:
            self._refute(inc, now)  # gossiped to all; the sender also hears it at once:
        # it holds the accusation (maybe old news it still believes), so answer it directly.
        if self._may_tell(self._corrected, sender, now):
            self._send(out, sender, {"type": GOSSIP}, [self._entry(self._me)])

    def _refute(self, inc: int, now: float) -> None:
        self._me.incarnation = max(self._me.incarnation, inc) + 1
        # Lifeguard: being suspected hints that we are the slow one; probe more gently.
        self._adjust_awareness(1)
        self._enqueue(self._entry(self._me), now)

    def _tell_standing(self, sender: str, now: float, out: list[Action]) -> None:
        """A member we hold suspect/dead/left just spoke: tell it, so that it can refute."""
        m = self._members.get(sender)
        if m is None or m.state == ALIVE or not self._may_tell(self._told, sender, now):
            return
        entry = {"kind": m.state, "id": sender, "inc": m.incarnation, "from": self.self_id}
        self._send(out, sender, {"type": GOSSIP}, [entry])

    def _reclaim(self, now: float) -> None:
        reclaim = self.config.dead_reclaim
        for mid, m in list(self._members.items()):
            # The same sum as in next_deadline(), so float rounding cannot make us spin.
            if m.state in _GONE and mid != self.self_id and now >= m.state_change + reclaim:
                del self._members[mid]
                self._broadcasts.pop(mid, None)
                if mid in self._order:
                    i = self._order.index(mid)
                    del self._order[i]
                    if i < self._order_index:
                        self._order_index -= 1
        # Rate-limit entries older than an interval limit nothing any more; senders we do
        # not know (a joiner, a stray peer) must not pile up.
        horizon = now - self.config.probe_interval
        for log in (self._told, self._nagged, self._corrected):
            for mid in [k for k, t in log.items() if t <= horizon]:
                del log[mid]

    # ------------------------------------------------------------------ gossip

    def _enqueue(self, entry: dict[str, Any], now: float) -> None:
        self._broadcast_count += 1
        self._broadcasts[entry["id"]] = _Broadcast(entry, self._broadcast_count)

    def _piggyback(self, limit: int, skip: set[str]) -> list[dict[str, Any]]:
        if limit <= 0 or not self._broadcasts:
            return []
        ranked = sorted(self._broadcasts.values(), key=lambda b: (b.transmits, -b.order))
        chosen = [b for b in ranked if b.entry["id"] not in skip][:limit]
        cap = self.config.retransmit_mult * max(1, math.ceil(math.log10(self._live_count() + 1)))
        for b in chosen:
            b.transmits += 1
            if b.transmits >= cap:
                del self._broadcasts[b.entry["id"]]
        return [b.entry for b in chosen]

    def _send(
        self,
        out: list[Action],
        to: str,
        message: dict[str, Any],
        extra: list[dict[str, Any]] | None = None,
    ) -> None:
        entries = list(extra or ())
        skip = {e["id"] for e in entries}  # the message already says it
        entries += self._piggyback(self.config.max_piggyback - len(entries), skip)
        if entries:
            message[GOSSIP_KEY] = entries
        out.append(Send(to, message))

    def _flush(self, now: float, out: list[Action]) -> None:
        """Push fresh news at once; otherwise a gossip round every gossip_interval.

        The push is on top of the piggybacked retransmissions, not instead of them: with
        sub-second suspicion timers, news cannot wait for the next probe to travel.
        """
        fresh = [b for b in self._broadcasts.values() if not b.pushed]
        if not fresh and (not self._broadcasts or now < self._gossip_due):
            return
        self._gossip_due = now + self.config.gossip_interval
        fresh.sort(key=lambda b: -b.order)
        fresh = fresh[: self.config.max_piggyback]
        for b in fresh:
            b.pushed = True
        peers = self._live_ids()
        for mid in self._rng.sample(peers, min(len(peers), self.config.gossip_nodes)):
            if not fresh and not self._broadcasts:
                break
            self._send(out, mid, {"type": GOSSIP}, [b.entry for b in fresh])

    def _send_sync(self, to: str, join: bool, out: list[Action]) -> None:
        members = []
        for m in self._members.values():
            e: dict[str, Any] = {"kind": m.state, "id": m.id, "inc": m.incarnation, "meta": m.meta}
            if m.state in (SUSPECT, DEAD):
                e["from"] = self.self_id
            members.append(e)
        self._send(out, to, {"type": SYNC, "join": join, "members": members})

    # ------------------------------------------------------------------ helpers

    def _entry(self, m: _Member) -> dict[str, Any]:
        if m.state == ALIVE:
            return {"kind": ALIVE, "id": m.id, "inc": m.incarnation, "meta": m.meta}
        return {"kind": m.state, "id": m.id, "inc": m.incarnation, "from": self.self_id}

    def _live_ids(self) -> list[str]:
        return [mid for mid, m in self._members.items() if m.state in _LIVE and mid != self.self_id]

    def _live_count(self) -> int:
        return sum(1 for m in self._members.values() if m.state in _LIVE)

    def _add_to_order(self, mid: str) -> None:
        # Somewhere in the rest of this round, so a newcomer is probed soon but fairly.
        if mid not in self._order:
            self._order.insert(self._rng.randint(self._order_index, len(self._order)), mid)

    def _may_tell(self, log: dict[str, float], mid: str, now: float) -> bool:
        """At most one unsolicited correction per peer per probe interval."""
        last = log.get(mid)
        if last is not None and now - last < self.config.probe_interval:
            return False
        log[mid] = now
        return True

    def _scaled(self, t: float) -> float:
        return t * (self._awareness + 1)

    def _adjust_awareness(self, delta: int) -> None:
        top = self.config.awareness_max - 1
        self._awareness = min(top, max(0, self._awareness + delta))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq


# ---------------------------------------------------------------------- validation


def _plain(x: Any) -> Any:
    """``x`` as a msgpack round trip returns it (tuples become lists).

    Our own meta must compare equal to its echo from the network, or we would refute
    our own alive every time it came back to us.
    """
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _is_id(x: object) -> bool:
    return isinstance(x, str) and 0 < len(x) <= _MAX_ID_LEN


def _is_inc(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= _MAX_INC


def _valid_entry(e: object, in_sync: bool) -> bool:
    if not isinstance(e, dict):
        return False
    kind = e.get("kind")
    if kind not in STATES or not _is_id(e.get("id")) or not _is_inc(e.get("inc")):
        return False
    meta = e.get("meta")
    if kind == ALIVE and not isinstance(meta, dict):
        return False
    if meta is not None and not isinstance(meta, dict):
        return False
    if "from" in e and not _is_id(e["from"]):
        return False
    # Gossip names the accuser (it counts toward Lifeguard confirmations); a sync is the
    # sender's own view, so the sender is the accuser.
    return in_sync or kind not in (SUSPECT, DEAD) or "from" in e


def _valid_message(msg: object) -> bool:
    if not isinstance(msg, dict):
        return False
    kind = msg.get("type")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        return False
    gossip = msg.get(GOSSIP_KEY, [])
    if not isinstance(gossip, list) or len(gossip) > _MAX_GOSSIP:
        return False
    if not all(_valid_entry(e, False) for e in gossip):
        return False
    if kind in (PING, ACK, NACK, PING_REQ) and not _is_inc(msg.get("seq")):
        return False
    if kind == PING and "to" in msg and not _is_id(msg["to"]):
        return False
    if kind == PING_REQ:
        if not _is_id(msg.get("target")) or not isinstance(msg.get("nack", False), bool):
            return False
    if kind == SYNC:
        members = msg.get("members")
        if not isinstance(members, list) or len(members) > _MAX_SYNC:
            return False
        if not isinstance(msg.get("join", False), bool):
            return False
        return all(_valid_entry(e, True) for e in members)
    return True

"""The routing table: which local subscriptions and which peers want a subject.

Pure: no sockets, no threads. The node serialises changes with a lock; lookups
of a cached route need none (one dict read).

Every subscription is advertised to peers as its own *interest entry*
``(pattern, queue, sid, credits, credit_bytes, overflow)``: ``sid`` names the
subscription on its node, and the rest tell a publisher how to hold itself back
for it (mesh/flow.py). A publisher therefore knows, per peer, exactly which
subscriptions a message is for, and keeps one credit window per subscription.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mesh.subjects import RESERVED_PREFIX, SubjectTrie, validate_pattern

# An interest entry: (pattern, queue, sid, credits, credit_bytes, overflow).
Entry = tuple


@dataclass(frozen=True)
class Route:
    """Where a message on one subject goes."""

    local: tuple  # plain local subscriptions
    local_groups: dict[str, tuple]  # queue group -> local members
    peers: dict[str, tuple[int, ...]]  # peer -> its plain subscriptions (sids)
    peer_groups: dict[str, tuple[tuple[str, int], ...]]  # queue group -> (peer, sid) members

    @property
    def empty(self) -> bool:
        return not (self.local or self.local_groups or self.peers or self.peer_groups)

    def groups(self) -> set[str]:
        return set(self.local_groups) | set(self.peer_groups)

    def nodes(self) -> set[str]:
        """Peers with at least one subscription here (plain or in a group)."""
        out = set(self.peers)
        for members in self.peer_groups.values():
            out.update(peer for peer, _ in members)
        return out


@dataclass
class _PeerInterest:
    version: int = -1
    entries: dict[Entry, None] = field(default_factory=dict)  # ordered set


class RoutingTable:
    """Local subscriptions plus the interest every peer advertised."""

    def __init__(self, cache_size: int = 8192) -> None:
        # The tries do not cache: this table caches whole routes instead.
        self._local: SubjectTrie = SubjectTrie(0)
        self._remote: SubjectTrie = SubjectTrie(0)
        self._peers: dict[str, _PeerInterest] = {}
        self._params: dict[tuple[str, int], tuple[int, int, str]] = {}
        self._cache: dict[str, Route] = {}
        self._cache_size = cache_size
        self._local_interest: dict[Entry, None] = {}
        self.local_version = 0

    # -- lookups ---------------------------------------------------------

    def cached(self, subject: str) -> Route | None:
        """The cached route, or None (then call route() under the caller's lock)."""
        return self._cache.get(subject)

    def route(self, subject: str) -> Route:
        route = self._cache.get(subject)
        if route is None:
            route = self._compute(subject)
        return route

    def _compute(self, subject: str) -> Route:
        local_plain = []
        local_groups: dict[str, list] = {}
        internal = subject.startswith(RESERVED_PREFIX)
        for sub in self._local.match(subject):
            if internal and not sub.pattern.startswith(RESERVED_PREFIX):
                continue  # `>` and `*.x` never see the mesh's own traffic
            if sub.queue:
                local_groups.setdefault(sub.queue, []).append(sub)
            else:
                local_plain.append(sub)
        peers: dict[str, list[int]] = {}
        peer_groups: dict[str, list[tuple[str, int]]] = {}
        for peer_id, queue, reserved, sid in self._remote.match(subject):
            if internal and not reserved:
                continue
            if queue:
                peer_groups.setdefault(queue, []).append((peer_id, sid))
            else:
                peers.setdefault(peer_id, []).append(sid)
        route = Route(
            tuple(local_plain),
            {q: tuple(m) for q, m in local_groups.items()},
            {p: tuple(s) for p, s in peers.items()},
            {q: tuple(m) for q, m in peer_groups.items()},
        )
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[subject] = route
        return route

    def _invalidate(self) -> None:
        # Swap rather than clear: a concurrent reader keeps a consistent old dict.
        self._cache = {}

    def params(self, peer_id: str, sid: int) -> tuple[int, int, str] | None:
        """(credits, credit_bytes or 0, overflow) of a peer's subscription."""
        return self._params.get((peer_id, sid))

    # -- local subscriptions -------------------------------------------------

    def add_local(self, pattern: str, sub: Hashable, entry: Entry) -> Entry:
        """Register a local subscription and the entry that advertises it."""
        self._local.insert(pattern, sub)
        self._invalidate()
        self._local_interest[entry] = None
        self.local_version += 1
        return entry

    def remove_local(self, pattern: str, sub: Hashable, entry: Entry) -> Entry | None:
        """Forget a local subscription; return its entry if it was registered."""
        if not self._local.remove(pattern, sub):
            return None
        self._invalidate()
        self._local_interest.pop(entry, None)
        self.local_version += 1
        return entry

    def local_interest(self) -> list[Entry]:
        return list(self._local_interest)

    def local_subscriptions(self) -> int:
        return len(self._local)

    # -- remote interest -----------------------------------------------------

    def peer_version(self, peer_id: str) -> int:
        state = self._peers.get(peer_id)
        return state.version if state else -1

    def set_peer_interest(self, peer_id: str, version: int, entries: Iterable[Entry]) -> list[str]:
        """Replace a peer's whole interest (hello / full sync). Returns invalid patterns skipped."""
        state = self._peers.setdefault(peer_id, _PeerInterest())
        if version < state.version:
            return []  # stale snapshot (e.g. a retried hello)
        self._clear_peer(peer_id, state)
        bad = self._add_entries(peer_id, state, entries)
        state.version = version
        self._invalidate()
        return bad

    def apply_peer_delta(
        self, peer_id: str, version: int, adds: Iterable[Entry], removes: Iterable[Entry]
    ) -> list[str] | None:
        """Apply an incremental change and return the invalid patterns skipped; None
        when it does not follow the last version seen (the caller then asks the
        peer for a full sync)."""
        state = self._peers.get(peer_id)
        if state is None or version != state.version + 1:
            return None
        for entry in removes:
            if entry in state.entries:
                del state.entries[entry]
                self._forget(peer_id, entry)
        bad = self._add_entries(peer_id, state, adds)
        state.version = version
        self._invalidate()
        return bad

    def remove_peer(self, peer_id: str) -> None:
        state = self._peers.pop(peer_id, None)
        if state is not None:
            self._clear_peer(peer_id, state)
            self._invalidate()

    def peer_interest(self, peer_id: str) -> list[Entry]:
        state = self._peers.get(peer_id)
        return list(state.entries) if state else []

    def _add_entries(self, peer_id: str, state: _PeerInterest, entries: Iterable[Entry]) -> list[str]:
        bad = []
        for entry in entries:
            if entry in state.entries:
                continue
            try:
                validate_pattern(entry[0], allow_reserved=True)
            except Exception:
                bad.append(entry[0])  # a hostile or buggy peer: skip, the caller counts it
                continue
            state.entries[entry] = None
            self._remote.insert(entry[0], _remote_value(peer_id, entry))
            self._params[(peer_id, _sid(entry))] = _entry_params(entry)
        return bad

    def _forget(self, peer_id: str, entry: Entry) -> None:
        self._remote.remove(entry[0], _remote_value(peer_id, entry))
        self._params.pop((peer_id, _sid(entry)), None)

    def _clear_peer(self, peer_id: str, state: _PeerInterest) -> None:
        for entry in state.entries:
            self._forget(peer_id, entry)
        state.entries.clear()


def _sid(entry: Entry) -> int:
    return entry[2] if len(entry) > 2 else 0


def _entry_params(entry: Entry) -> tuple[int, int, str]:
    if len(entry) >= 6:
        return entry[3], entry[4], entry[5]
    return 0, 0, ""  # no flow control advertised


def _remote_value(peer_id: str, entry: Entry) -> tuple[str, str, bool, Any]:
    # The flag lets mesh-internal subjects skip peers that only asked for `>`.
    return (peer_id, entry[1], entry[0].startswith(RESERVED_PREFIX), _sid(entry))

"""The routing table: which local subscriptions and which peers want a subject.

Pure: no sockets, no threads. The node serialises changes with a lock; lookups
of a cached route need none (one dict read).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from mesh.subjects import RESERVED_PREFIX, SubjectTrie, validate_pattern


@dataclass(frozen=True)
class Route:
    """Where a message on one subject goes."""

    local: tuple  # plain local subscriptions
    local_groups: dict[str, tuple]  # queue group -> local members
    peers: tuple[str, ...]  # peers with plain interest
    peer_groups: dict[str, tuple[str, ...]]  # queue group -> peers with a member

    @property
    def empty(self) -> bool:
        return not (self.local or self.local_groups or self.peers or self.peer_groups)

    def groups(self) -> set[str]:
        return set(self.local_groups) | set(self.peer_groups)


@dataclass
class _PeerInterest:
    version: int = -1
    entries: dict[tuple[str, str], None] = field(default_factory=dict)  # ordered set


class RoutingTable:
    """Local subscriptions plus the interest every peer advertised."""

    def __init__(self, cache_size: int = 8192) -> None:
        # The tries do not cache: this table caches whole routes instead.
        self._local: SubjectTrie = SubjectTrie(0)
        self._remote: SubjectTrie = SubjectTrie(0)
        self._peers: dict[str, _PeerInterest] = {}
        self._cache: dict[str, Route] = {}
        self._cache_size = cache_size
        # Local interest as advertised to peers: (pattern, queue) -> refcount.
        self._local_interest: dict[tuple[str, str], int] = {}
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
        peers: dict[str, None] = {}
        peer_groups: dict[str, dict[str, None]] = {}
        for peer_id, queue, reserved in self._remote.match(subject):
            if internal and not reserved:
                continue
            if queue:
                peer_groups.setdefault(queue, {})[peer_id] = None
            else:
                peers[peer_id] = None
        route = Route(
            tuple(local_plain),
            {q: tuple(m) for q, m in local_groups.items()},
            tuple(peers),
            {q: tuple(m) for q, m in peer_groups.items()},
        )
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[subject] = route
        return route

    def _invalidate(self) -> None:
        # Swap rather than clear: a concurrent reader keeps a consistent old dict.
        self._cache = {}

    # -- local subscriptions -------------------------------------------------

    def add_local(self, pattern: str, sub: Hashable, queue: str = "") -> tuple[str, str] | None:
        """Register a local subscription; return the interest entry if it is new."""
        self._local.insert(pattern, sub)
        self._invalidate()
        key = (pattern, queue)
        count = self._local_interest.get(key, 0)
        self._local_interest[key] = count + 1
        if count == 0:
            self.local_version += 1
            return key
        return None

    def remove_local(self, pattern: str, sub: Hashable, queue: str = "") -> tuple[str, str] | None:
        """Forget a local subscription; return the interest entry if none is left."""
        if not self._local.remove(pattern, sub):
            return None
        self._invalidate()
        key = (pattern, queue)
        count = self._local_interest.get(key, 0) - 1
        if count <= 0:
            self._local_interest.pop(key, None)
            self.local_version += 1
            return key
        self._local_interest[key] = count
        return None

    def local_interest(self) -> list[tuple[str, str]]:
        return list(self._local_interest)

    def local_subscriptions(self) -> int:
        return len(self._local)

    # -- remote interest -----------------------------------------------------

    def peer_version(self, peer_id: str) -> int:
        state = self._peers.get(peer_id)
        return state.version if state else -1

    def set_peer_interest(
        self, peer_id: str, version: int, entries: Iterable[tuple[str, str]]
    ) -> list[str]:
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
        self,
        peer_id: str,
        version: int,
        adds: Iterable[tuple[str, str]],
        removes: Iterable[tuple[str, str]],
    ) -> list[str] | None:
        """Apply an incremental change and return the invalid patterns skipped; None
        when it does not follow the last version seen (the caller then asks the
        peer for a full sync)."""
        state = self._peers.get(peer_id)
        if state is None or version != state.version + 1:
            return None
        for key in removes:
            if key in state.entries:
                del state.entries[key]
                self._remote.remove(key[0], _remote_value(peer_id, key))
        bad = self._add_entries(peer_id, state, adds)
        state.version = version
        self._invalidate()
        return bad

    def remove_peer(self, peer_id: str) -> None:
        state = self._peers.pop(peer_id, None)
        if state is not None:
            self._clear_peer(peer_id, state)
            self._invalidate()

    def peer_interest(self, peer_id: str) -> list[tuple[str, str]]:
        state = self._peers.get(peer_id)
        return list(state.entries) if state else []

    def _add_entries(
        self, peer_id: str, state: _PeerInterest, entries: Iterable[tuple[str, str]]
    ) -> list[str]:
        bad = []
        for pattern, queue in entries:
            if (pattern, queue) in state.entries:
                continue
            try:
                validate_pattern(pattern, allow_reserved=True)
            except Exception:
                bad.append(pattern)  # a hostile or buggy peer: skip, the caller counts it
                continue
            state.entries[(pattern, queue)] = None
            self._remote.insert(pattern, _remote_value(peer_id, (pattern, queue)))
        return bad

    def _clear_peer(self, peer_id: str, state: _PeerInterest) -> None:
        for key in state.entries:
            self._remote.remove(key[0], _remote_value(peer_id, key))
        state.entries.clear()


def _remote_value(peer_id: str, key: tuple[str, str]) -> tuple[str, str, bool]:
    # The flag lets mesh-internal subjects skip peers that only asked for `>`.
    return (peer_id, key[1], key[0].startswith(RESERVED_PREFIX))

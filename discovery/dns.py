"""DNS seeds: ``seeds=("dns://trainers.default.svc:7777",)`` joins every address a name has.

A Kubernetes headless service (``clusterIP: None``) answers a name with one A
record per ready pod; mDNS does not cross the pod network. :class:`DnsSeeds`
resolves each ``dns://name:port`` seed now and then and hands the node plain
``tcp://addr:port`` seeds: those that appeared, and those that went away.

Threads: one, ``mesh-dns-<node>``, owned by the :class:`DnsSeeds` object
(started by ``start()``, stopped by ``close()``). It only resolves and calls
``on_change(added, removed)``, which must be quick (the node queues a command
for its I/O thread, which owns the seed sockets). :func:`diff` and
:meth:`DnsSeeds.tick` are pure given the injected resolver and clock, which
is how they are tested.

Resolution uses ``socket.getaddrinfo`` for IPv4 (the node listens on IPv4).
A failed lookup keeps the addresses last seen (a DNS blip or a moment with no
ready pod must not forget seeds) and is retried sooner; until a name has
resolved once it is retried every ``retry`` seconds, then every ``interval``.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from mesh.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["DnsSeeds", "diff", "is_dns_seed", "parse_dns_seed", "resolve_ipv4"]

SCHEME = "dns://"
# Kubernetes' DNS caches headless answers for 5-30 s; asking more often buys nothing.
DEFAULT_INTERVAL = 5.0
DEFAULT_RETRY = 0.5
_SEED = re.compile(r"^dns://(?P<name>[A-Za-z0-9_.-]+):(?P<port>\d{1,5})\Z")

Resolver = Callable[[str], Iterable[str]]


def is_dns_seed(seed: str) -> bool:
    return seed.startswith(SCHEME)


def parse_dns_seed(seed: str) -> tuple[str, int]:
    """``"dns://name:port"`` -> ``(name, port)``; ConfigError saying the form otherwise."""
    m = _SEED.match(seed)
    port = int(m.group("port")) if m else 0
    if m is None or not 0 < port < 65536:
        raise ConfigError(
            f"seed {seed!r}: write a DNS seed as 'dns://NAME:PORT', e.g. "
            "'dns://trainers.default.svc.cluster.local:7777' (every address of NAME, on PORT)"
        )
    return m.group("name"), port


def resolve_ipv4(name: str) -> list[str]:
    """Every IPv4 address ``name`` resolves to, sorted; raises OSError when it does not."""
    infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos}, key=socket.inet_aton)


def diff(old: Iterable[str], new: Iterable[str]) -> tuple[list[str], list[str]]:
    """(added, removed) between two sets of endpoints, each sorted."""
    old_s, new_s = set(old), set(new)
    return sorted(new_s - old_s), sorted(old_s - new_s)


class DnsSeeds:
    """Resolves ``dns://`` seeds and reports the ``tcp://`` seeds they stand for."""

    def __init__(
        self,
        seeds: Sequence[str],
        on_change: Callable[[list[str], list[str]], None],
        *,
        interval: float | None = None,
        retry: float | None = None,
        resolver: Resolver | None = None,
        clock: Callable[[], float] = time.monotonic,
        owner: str = "node",
    ) -> None:
        self.targets = [parse_dns_seed(s) for s in seeds]
        if not self.targets:
            raise ConfigError("DnsSeeds needs at least one dns:// seed")
        # Read at call time (not def time): a test may shorten the module's defaults.
        interval = DEFAULT_INTERVAL if interval is None else interval
        retry = DEFAULT_RETRY if retry is None else retry
        if not interval > 0 or not retry > 0:
            raise ConfigError("interval and retry must be positive numbers of seconds")
        self.interval, self.retry = float(interval), float(retry)
        self._on_change = on_change
        # Looked up at call time, so a test can replace the module's resolve_ipv4.
        self._resolver = resolver
        self._clock = clock
        self._owner = owner
        self.current: dict[tuple[str, int], set[str]] = {t: set() for t in self.targets}
        self._resolved_once: set[tuple[str, int]] = set()
        self._due = {t: float("-inf") for t in self.targets}
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_node(cls, seeds: Iterable[str], on_change: Callable[[list[str], list[str]], None],
                 owner: str = "node") -> DnsSeeds | None:
        """A DnsSeeds over the ``dns://`` ones among ``seeds``, or None when there are none."""
        dns = [s for s in seeds if isinstance(s, str) and is_dns_seed(s)]
        return cls(dns, on_change, owner=owner) if dns else None

    def endpoints(self) -> list[str]:
        """Every tcp seed the names stand for now."""
        return sorted({e for eps in self.current.values() for e in eps})

    def tick(self, now: float) -> float:
        """Resolve the names that are due at ``now``; report changes; return when the
        next one is due."""
        before = set(self.endpoints())
        for target in self.targets:
            if now < self._due[target]:
                continue
            name, port = target
            try:
                resolver = self._resolver or resolve_ipv4
                addrs = list(resolver(name))
            except (OSError, UnicodeError) as exc:
                self.failures += 1
                if self.failures == 1 or self.failures % 100 == 0:
                    log.warning("%s: DNS seed %s:%d does not resolve (%s); retrying, keeping "
                                "%d address(es) known", self._owner, name, port, exc,
                                len(self.current[target]))
                self._due[target] = now + self.retry
                continue
            self.current[target] = {f"tcp://{a}:{port}" for a in addrs if ":" not in a}
            if self.current[target]:
                self._resolved_once.add(target)
            done = target in self._resolved_once
            self._due[target] = now + (self.interval if done else self.retry)
        added, removed = diff(before, self.endpoints())
        if (added or removed) and not self._stop.is_set():  # never into a closed node
            try:
                self._on_change(added, removed)
            except Exception:
                log.exception("%s: DNS seed callback failed", self._owner)
        return min(self._due.values())

    def start(self) -> DnsSeeds:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"mesh-dns-{self._owner}",
                                            daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            next_due = self.tick(self._clock())
            self._stop.wait(max(0.05, next_due - self._clock()))

    def close(self) -> None:
        """Stop resolving; idempotent. A lookup in progress may take the resolver's own
        timeout to return, so the thread (a daemon) is not waited for beyond 1 s."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)

"""``mesh.Node``: the mesh embedded in a worker process — the public face.

This module holds the API, its argument checks and docstrings. The engine behind
it lives in mesh/engine/ (see its __init__ for the threads and who owns which
socket): the I/O thread reads every socket it owns and runs inline handlers, a
dispatch thread runs the other handlers, and application threads publish on a
peer's data socket directly. Publishes from handlers never wait for credit;
application threads do (``overflow="block"``, ``timeout=``).
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import os
import random
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import transports as transport_plugins
from discovery.dns import DnsSeeds
from mesh import security
from mesh.engine.bulk import BulkSet
from mesh.engine.bulk_rdma import RdmaGlue
from mesh.engine.bulk_shm import ShmGlue
from mesh.engine.common import _DROP_OLDEST_BACKLOG, _INTERNAL_FLOW, _LIVE, _STOP
from mesh.engine.dispatch import Dispatcher, _Pending
from mesh.engine.fastpath import HotPublisher
from mesh.engine.handshake import Handshake
from mesh.engine.link import LinkSender
from mesh.engine.loop import IoLoop
from mesh.engine.options import _DEFAULT_OPTIONS, _check_options
from mesh.engine.status import StatusView
from mesh.errors import (
    ClosedError,
    ConfigError,
    MeshError,
    NoRespondersError,
    TimeoutError,
)
from mesh.flow import (
    DEFAULT_CREDIT_BYTES,
    DEFAULT_CREDITS,
    OVERFLOW_POLICIES,
    CreditWindow,
)
from mesh.membership import MemberConfig, Membership
from mesh.message import Handler, Message, Subscription
from mesh.peers import PeerInfo
from mesh.policy import Policy
from mesh.routing import RoutingTable
from mesh.subjects import validate_pattern
from transports.base import Locality

log = logging.getLogger("mesh")

DEFAULT_LISTEN = ("tcp://0.0.0.0:0", "ipc://auto")
DISCOVERY_MODES = ("zeroconf", "static", "none")


_names_in_process: collections.Counter[str] = collections.Counter()
_names_lock = threading.Lock()


def _default_name() -> str:
    base = f"{socket.gethostname()}-{os.getpid()}"
    with _names_lock:
        _names_in_process[base] += 1
        count = _names_in_process[base]
    return base if count == 1 else f"{base}-{count}"


_live_nodes: weakref.WeakSet[Node] = weakref.WeakSet()


@atexit.register
def _close_live_nodes() -> None:
    # Forgotten nodes: say goodbye to peers and remove ipc socket files at exit.
    for node in list(_live_nodes):
        try:
            node.close()
        except Exception:
            pass


class Node(IoLoop, LinkSender, Dispatcher, Handshake, StatusView, BulkSet, ShmGlue, RdmaGlue):
    """A mesh node. See API.md; use as a context manager or call start()/close()."""

    def __init__(
        self,
        name: str | None = None,
        cluster: str = "default",
        *,
        discovery: str = "zeroconf",
        seeds: Iterable[str] = (),
        listen: Sequence[str] = DEFAULT_LISTEN,
        secret: str | bytes | None = None,
        metrics_port: int | None = None,
        transports: Sequence[str] | None = None,
        **options: Any,
    ) -> None:
        if discovery not in DISCOVERY_MODES:
            raise ConfigError(f"discovery={discovery!r}; choose one of {DISCOVERY_MODES}")
        unknown = set(options) - set(_DEFAULT_OPTIONS)
        if unknown:
            raise ConfigError(
                f"unknown option(s) {sorted(unknown)}; known options: {sorted(_DEFAULT_OPTIONS)}"
            )
        if metrics_port is not None and (
            not isinstance(metrics_port, int) or not 0 <= metrics_port < 65536
        ):
            raise ConfigError(f"metrics_port={metrics_port!r}; give a TCP port (0 = any free port)")
        if not isinstance(cluster, str) or not cluster or len(cluster) > 128:
            raise ConfigError("cluster must be a non-empty string of at most 128 characters")
        if name is not None and (not isinstance(name, str) or not name or len(name) > 128):
            raise ConfigError("name must be a non-empty string of at most 128 characters")
        seeds = tuple(seeds)
        for seed in seeds:
            if not isinstance(seed, str) or "://" not in seed:
                raise ConfigError(
                    f"seed {seed!r} is not an endpoint; write it like 'tcp://10.0.0.5:7777'"
                )
        self.id: str = uuid.uuid4().hex[:16]
        self.name: str = name or _default_name()
        self.cluster = cluster
        # CurveZMQ on every link when the cluster has a secret (mesh/security.py).
        self._keys = security.cluster_keys(secret, cluster) if secret is not None else None
        self.secured = self._keys is not None
        self.discovery_mode = discovery
        self.seeds = seeds
        # dns:// seeds: resolved on their own thread, handed over as tcp seeds (_seeds_changed).
        self._dns = DnsSeeds.for_node(seeds, self._seeds_changed, owner=self.name)
        self.options = {**_DEFAULT_OPTIONS, **options}
        _check_options(self.options)
        self._policy = Policy.from_any(self.options["policy"]) if self.options["policy"] is not None else None
        if isinstance(listen, str):
            listen = (listen,)  # one endpoint given bare
        self._listen = tuple(listen)
        for endpoint in self._listen:
            if not isinstance(endpoint, str) or "://" not in endpoint:
                raise ConfigError(
                    f"listen endpoint {endpoint!r}: write it like 'tcp://0.0.0.0:7777' or 'ipc://auto'"
                )
        self._transports = transport_plugins.load(transports)
        self._locality = Locality.here()
        self.endpoints: list[str] = []
        self._advertised: dict[str, list[str]] = {}
        self._bound: list[tuple[transport_plugins.Transport, str]] = []

        self._lock = threading.RLock()  # routing table and subscriptions
        self._changed = threading.Condition(self._lock)  # peers or interest changed
        self._routing = RoutingTable()
        self._subs: set[Subscription] = set()
        self._subs_by_sid: dict[int, Subscription] = {}
        self._sids = itertools.count(1)
        self._metrics_port_wanted = metrics_port
        self._metrics: Any = None
        self.metrics_port: int | None = None  # the real port once started
        self._started = False
        self._closed = False
        self._start_time = 0.0
        # The engine's state, each part in the module that owns it.
        self._init_status()
        self._init_loop()
        self._init_links()
        self._init_dispatch()
        self._init_handshake()
        self._init_shm()
        self._init_rdma()
        self._init_bulk()
        self._hot = HotPublisher(self)  # the common publish in one call (engine/fastpath.py)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Node:
        """Bind, start the I/O and dispatch threads, and join the mesh. Idempotent."""
        self._check_open()
        if self._started:
            return self
        self._start_io()
        for channel in self._bulk:
            channel.start()
        self._start_time = time.monotonic()
        self._members = Membership(
            self.id,
            meta=self._self_summary(),
            config=MemberConfig(**(self.options["membership"] or {})),
            rng=random.Random(),
            now=self._start_time,
        )
        self._started = True
        self._io_thread = threading.Thread(target=self._io_loop, name=f"mesh-io-{self.name}", daemon=True)
        self._dispatch_thread = threading.Thread(
            target=self._dispatch_loop, name=f"mesh-dispatch-{self.name}", daemon=True
        )
        self._io_thread.start()
        self._dispatch_thread.start()
        _live_nodes.add(self)
        if self._metrics_port_wanted is not None:
            from mesh.metrics import MetricsServer

            try:
                self._metrics = MetricsServer(self, self._metrics_port_wanted)
            except OSError as exc:
                self.close()
                raise ConfigError(
                    f"cannot serve metrics on port {self._metrics_port_wanted}: {exc}; "
                    "pick a free port or 0"
                ) from None
            self.metrics_port = self._metrics.port
        if self.discovery_mode == "zeroconf":
            self._start_zeroconf()
        if self._dns is not None:
            self._dns.start()
        return self

    def close(self) -> None:
        """Say goodbye to peers and release everything. Idempotent; never hangs."""
        if self._closed:
            return
        self._closed = True
        if not self._started:
            return
        if self._metrics is not None:
            self._metrics.close()
        if self._dns is not None:
            self._dns.close()
        if self._discovery is not None:
            try:
                self._discovery.close()
            except Exception as exc:
                log.warning("%s: discovery did not close cleanly: %s", self.name, exc)
        self._command(("close",))
        if self._io_thread is not None and self._io_thread is not threading.current_thread():
            self._io_thread.join(timeout=5.0)  # (an inline handler closing: it ends after)
        self._dispatch.put(_STOP)
        if self._dispatch_thread is not None and self._dispatch_thread is not threading.current_thread():
            self._dispatch_thread.join(timeout=5.0)
        for sub in list(self._subs):
            sub.close()
        for pending in list(self._pending.values()):
            pending.set()
        with self._waker_lock:
            self._waker.close(linger=0)
        for channel in self._bulk:
            channel.close()
        if self._zap is not None:
            self._zap.close()
        with self._changed:
            self._changed.notify_all()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten node must not leave its I/O thread and socket files behind.
        try:
            if self._started and not self._closed:
                self.close()
        except Exception:
            pass

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"node {self.name} is closed; create a new mesh.Node")

    def _check_started(self) -> None:
        self._check_open()
        if not self._started:
            raise MeshError(f"node {self.name} is not started; call node.start() or use `with`")

    # ------------------------------------------------------------------ peers

    def peers(self) -> list[PeerInfo]:
        """Peers currently members of the mesh (alive, or suspected but not yet dead)."""
        self._check_open()
        return [p.info() for p in list(self._peers.values()) if p.state in _LIVE]

    def wait_for_peers(self, n: int = 1, timeout: float = 10.0) -> list[PeerInfo]:
        """Block until at least ``n`` peers are alive; TimeoutError otherwise."""
        self._check_started()
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                self._check_open()
                alive = self.peers()
                if len(alive) >= n:
                    return alive
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{self.name} sees {len(alive)} of {n} peers after {timeout} s; "
                        "check seeds/discovery and that every node uses cluster="
                        f"{self.cluster!r}"
                    )
                self._changed.wait(remaining)

    def wait_for_subscribers(self, subject: str, count: int = 1, timeout: float = 10.0) -> int:
        """Block until ``count`` nodes (this one included) have interest in ``subject``.

        Interest travels asynchronously; call this before publishing when the
        first messages must not be missed."""
        self._check_started()
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                self._check_open()
                route = self._route(subject, internal=True)
                nodes = set(route.peers)
                for members in route.peer_groups.values():
                    nodes.update(members)
                have = len(nodes) + (1 if (route.local or route.local_groups) else 0)
                if have >= count:
                    return have
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{have} of {count} nodes subscribe to {subject!r} after {timeout} s"
                    )
                self._changed.wait(min(remaining, 0.1))

    # ------------------------------------------------------------------ pub/sub

    def subscribe(
        self,
        pattern: str,
        handler: Handler | None = None,
        *,
        queue: str | None = None,
        credits: int = DEFAULT_CREDITS,  # noqa: A002 - the API's name
        credit_bytes: int | None = DEFAULT_CREDIT_BYTES,
        overflow: str = "block",
        inline: bool = False,
        _inbox: Any = None,  # internal (mesh.aio): takes messages instead of next()'s queue
    ) -> Subscription:
        """Subscribe to a pattern. With ``handler``, it runs on the dispatch thread;
        without, pull with ``sub.next()``. ``queue`` joins a queue group: each
        message goes to exactly one member of the group across the mesh.

        Flow control: each publisher may have ``credits`` messages (and, if set,
        ``credit_bytes`` bytes) delivered and not yet consumed; a credit returns
        when the handler returns or ``next()`` hands the message out. With none
        left the publisher applies ``overflow``: "block" (publish waits; with
        ``timeout=`` it raises BackpressureError), "drop_new" or "drop_oldest".
        Patterns under ``_mesh.`` (e.g. ``_mesh.pressure.>``) may be subscribed to.

        ``inline=True``: the handler runs on the I/O thread that read the message
        (no thread hand-off: the lowest latency). It must be short and must not
        block; one that takes longer than the node's ``inline_budget`` (10 ms) is
        logged once and moved to the dispatch thread. Messages this node publishes
        to itself reach it on the dispatch thread.
        """
        self._check_started()
        validate_pattern(pattern, allow_reserved=True)
        if queue is not None and (
            not isinstance(queue, str) or not queue or any(c.isspace() for c in queue)
        ):
            raise ConfigError(f"queue group {queue!r} must be a non-empty name without spaces")
        if handler is not None and not callable(handler):
            raise ConfigError("handler must be callable as handler(msg)")
        if inline and handler is None:
            raise ConfigError("inline=True runs a handler where messages are read; give a handler")
        if overflow not in OVERFLOW_POLICIES:
            raise ConfigError(f"overflow={overflow!r}; choose one of {OVERFLOW_POLICIES}")
        if self._policy is not None:
            self._policy.check_subscribe(self.name, pattern)
        sub = self._subscribe(pattern, handler, queue or "", credits, credit_bytes, overflow,
                              _inbox)
        sub.inline = bool(inline)
        return sub

    def _subscribe(
        self,
        pattern: str,
        handler: Handler | None,
        queue: str,
        credits: int,  # noqa: A002 - the API's name
        credit_bytes: int | None,
        overflow: str,
        inbox: Any = None,
    ) -> Subscription:
        # The window checks credits/credit_bytes and says what to do when they are wrong.
        window = CreditWindow(
            credits, credit_bytes, overflow, _DROP_OLDEST_BACKLOG if overflow == "drop_oldest" else 0
        )
        sub = Subscription(self, pattern, handler, queue, inbox)
        sub.sid = next(self._sids)
        sub.credits, sub.credit_bytes, sub.overflow = credits, credit_bytes, overflow
        sub._window = window
        sub._entry = (pattern, queue, sub.sid, credits, credit_bytes or 0, overflow)
        with self._lock:
            self._subs.add(sub)
            self._subs_by_sid[sub.sid] = sub
            self._routing.add_local(pattern, sub, sub._entry)
            self._command(("interest", self._routing.local_version, [sub._entry], []))
            self._changed.notify_all()
        return sub

    def _subscribe_internal(self, pattern: str, handler: Handler | None = None) -> Subscription:
        """Subscribe to the mesh's own ``_mesh.`` subjects (not for applications)."""
        self._check_started()
        validate_pattern(pattern, allow_reserved=True)
        return self._subscribe(pattern, handler, "", **_INTERNAL_FLOW)

    def _publish_internal(self, subject: str, data: Any = b"", headers: dict | None = None) -> None:
        self._check_started()
        self._publish(subject, self._route(subject, internal=True), data, headers, None, None)

    def group(self, name: str, size: int, timeout: float = 30.0, **options: Any) -> Any:
        """Rendezvous by name with ``size`` nodes for collectives (see mesh.collectives)."""
        from mesh.collectives.group import Group

        self._check_started()
        return Group(self, name, size, timeout, **options)

    @classmethod
    def from_env(cls, **overrides: Any) -> Node:
        """A node configured from the launcher's environment (torchrun, SLURM, or
        ZMESH_SEEDS/ZMESH_CLUSTER/ZMESH_SECRET); not started. See mesh.launch."""
        from mesh import launch

        return launch.node_from_env(cls, **overrides)

    def group_from_env(self, name: str = "world", timeout: float = 60.0, **options: Any) -> Any:
        """The group of every rank the launcher started, with ``group.rank == RANK``."""
        from mesh import launch

        return launch.group_from_env(self, name, timeout, **options)

    def unsubscribe(self, sub: Subscription) -> None:
        sub.close()

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub not in self._subs:
                return
            self._subs.discard(sub)
            self._subs_by_sid.pop(sub.sid, None)
            removed = self._routing.remove_local(sub.pattern, sub, sub._entry)
            if removed is not None and not self._closed:
                self._command(("interest", self._routing.local_version, [], [removed]))

    def publish(
        self,
        subject: str,
        data: Any = b"",
        headers: dict | None = None,
        timeout: float | None = None,
    ) -> None:
        """Send ``data`` (bytes, memoryview, str or numpy array) to every subscriber.

        Arrays above 64 KiB are sent without a copy: do not modify them in place
        until publish() has returned and the message left (see README).
        ``timeout``: wait up to that long for a slow peer's queue instead of dropping.

        Called from a handler (on the node's I/O or dispatch thread), it never waits
        for credit: beyond a subscriber's window the message is held, in order, and
        leaves as credit comes back (so handlers publishing to each other cannot
        deadlock). Application threads wait as ``overflow`` says.
        """
        if self._closed or not self._started:
            self._check_started()  # raises, saying what to do
        if self._hot.publish(subject, data, headers, timeout):
            return  # the common case, done (it answers False when it is not that)
        route = self._route(subject)
        self._publish(subject, route, data, headers, None, timeout)

    # ------------------------------------------------------------------ request/reply

    def request(
        self,
        subject: str,
        data: Any = b"",
        timeout: float = 1.0,
        retries: int = 0,
        headers: dict | None = None,
    ) -> Message:
        """Send a request and wait for the first reply.

        ``timeout`` is per attempt; after ``retries`` more attempts (same request
        id, so responders can deduplicate) raises TimeoutError. Raises
        NoRespondersError at once when nobody in the mesh subscribes to ``subject``.
        """
        self._check_started()
        if timeout is None or timeout <= 0:
            raise ConfigError("request() needs a positive timeout in seconds")
        if threading.get_ident() == self._io_ident:
            raise MeshError(
                f"request({subject!r}) inside an inline handler: the I/O thread running it "
                "is the one that reads the reply; subscribe that handler without inline=True"
            )
        if retries < 0:
            raise ConfigError("retries must be >= 0")
        req_id = random.getrandbits(63)
        pending = _Pending()
        self._pending[req_id] = pending
        try:
            for _attempt in range(retries + 1):
                self._check_open()
                route = self._route(subject)
                if route.empty:
                    raise NoRespondersError(
                        f"no subscriber for {subject!r} anywhere in the mesh; start a responder "
                        "(node.subscribe(subject, handler) that calls msg.respond())"
                    )
                # The common case in one call from C (engine/fastpath.py), else the general path.
                if headers is not None or not self._hot.request(subject, data, req_id):
                    self._publish(subject, route, data, headers, req_id, None)
                if self._wait_reply(pending, timeout):
                    self._check_open()
                    assert pending.reply is not None
                    return pending.reply
            raise TimeoutError(
                f"no reply on {subject!r} after {retries + 1} attempt(s) of {timeout} s; "
                "the responder may be slow or gone: raise timeout= or retries="
            )
        finally:
            self._pending.pop(req_id, None)

    # ------------------------------------------------------------------ status, membership

    def status(self) -> dict:
        """A JSON-serialisable snapshot: identity, peers (transport, bulk channel, rtt,
        credits), subscriptions, counters, latency quantiles."""
        return self._status_snapshot()

    def on_peer(self, callback: Any) -> None:
        """Call ``callback(event, peer_info)`` on the dispatch thread for every membership
        change: event is "joined", "suspect", "alive" (refuted), "dead" or "left".
        The same events are delivered on the local subjects ``_mesh.peers.<event>``."""
        if not callable(callback):
            raise ConfigError("on_peer() takes a callable(event, peer_info)")
        self._peer_callbacks.append(callback)

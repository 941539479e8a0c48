"""``mesh.Node``: the mesh embedded in a worker process.

Threads:
- the caller's threads publish and request; they send on a peer's DEALER
  directly under that link's lock (no hop through another thread);
- one I/O thread owns the ROUTER (everything inbound), the timers, the peer
  table and the handshakes, and creates and closes links;
- one dispatch thread runs subscription handlers, so a slow handler never
  stalls the I/O thread (heartbeats, requests, other subscribers).
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import math
import os
import queue
import random
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack
import numpy as np
import zmq

import transports as transport_plugins
from mesh import security, wire
from mesh.channels import EARLY_MAX_AGE, EARLY_MAX_MESSAGES, Channel, ChannelMessage
from mesh.errors import (
    BackpressureError,
    ClosedError,
    ConfigError,
    InvalidSubject,
    MeshError,
    MessageTooLarge,
    NoRespondersError,
    PeerLostError,
    ProtocolError,
    TimeoutError,
)
from mesh.flow import (
    OVERFLOW_POLICIES,
    Action,
    CreditGrant,
    CreditWindow,
    decode_batch,
    encode_batch,
)
from mesh.membership import Event as MemberEvent
from mesh.membership import MemberConfig, Membership
from mesh.membership import Send as MemberSend
from mesh.message import Handler, Message, Subscription
from mesh.peers import Link, Peer, PeerInfo, parse_summary
from mesh.policy import Policy
from mesh.routing import Route, RoutingTable
from mesh.stats import Counters, LatencyHistogram
from mesh.subjects import validate_pattern, validate_subject
from mesh.tensor import array_from_frames, array_to_frames
from transports.base import Locality, choose_bulk
from transports.rdma import RdmaError
from transports.rdma_core import RdmaTag, ReceiveOrder, SendOrder, Sync

log = logging.getLogger("mesh")

DEFAULT_LISTEN = ("tcp://0.0.0.0:0", "ipc://auto")
DEFAULT_CREDITS = 1024
DEFAULT_CREDIT_BYTES = 64 << 20
DISCOVERY_MODES = ("zeroconf", "static", "none")

# Payloads at least this large are handed to the application as a view on the
# received frame instead of a bytes copy (pyzmq's own zero-copy threshold).
ZERO_COPY_BYTES = zmq.COPY_THRESHOLD
# Channel (collective) payloads below this are copied into the zmq message: a
# zero-copy frame costs a tracker and a wake of pyzmq's gc thread, ~0.1 ms of
# CPU per message here, more than copying up to this size.
P2P_COPY_BYTES = 1 << 20

_DEFAULT_OPTIONS: dict[str, Any] = {
    "heartbeat_interval": 0.5,  # seconds between pings to each peer
    "peer_timeout": 3.0,  # silence after which a peer is declared dead
    "seed_interval": 0.5,  # hello retry period towards seeds not yet joined
    "tombstone": 30.0,  # how long gossip cannot resurrect a dead peer id
    "max_message_size": 1 << 30,  # bytes per payload frame
    "sndhwm": 10_000,  # messages queued per peer before publish drops (or waits)
    "rcvhwm": 100_000,
    "interfaces": None,  # zeroconf: restrict to these interfaces
    "membership": None,  # dict of mesh.membership.MemberConfig fields (SWIM timers)
    "rejoin_interval": 1.0,  # hello retry period towards peers declared dead
    # Micro-batching: in a burst (a small message right after the previous one to
    # the same peer) messages wait at most batch_delay to share one ZeroMQ message;
    # otherwise a message leaves at once. batch_bytes=0 turns it off.
    "batch_bytes": 16384,
    "batch_delay": 0.0005,
    # Arrays of at least shm_threshold bytes to a peer on this host travel through
    # shared memory (transports/shm.py); shm=False keeps them on the socket.
    "shm": True,
    "shm_threshold": 1 << 20,
    # Arrays of at least rdma_threshold bytes to a peer that also has RDMA go through
    # an RC queue pair (transports/rdma.py) when both have it; rdma_device picks the
    # verbs device (default: the first with an active port).
    "rdma_device": None,
    "rdma_threshold": 64 << 10,
    # Per-subject permissions (mesh/policy.py): a dict, or a JSON/TOML file. Checked
    # by this node before it publishes or subscribes, and on what peers send it.
    "policy": None,
    # A handler subscribed with inline=True runs on the I/O thread that read its
    # message; one that takes longer than this (seconds) moves to the dispatch thread.
    "inline_budget": 0.01,
}

# (type, minimum) of each numeric option; minimum is exclusive for floats.
_OPTION_RULES: dict[str, tuple[type, float]] = {
    "heartbeat_interval": (float, 0.0),
    "peer_timeout": (float, 0.0),
    "seed_interval": (float, 0.0),
    "tombstone": (float, 0.0),
    "rejoin_interval": (float, 0.0),
    "batch_delay": (float, 0.0),
    "inline_budget": (float, 0.0),
    "max_message_size": (int, 1),
    "shm_threshold": (int, 1),
    "rdma_threshold": (int, 1),
    "sndhwm": (int, 1),
    "rcvhwm": (int, 1),
}


def _check_options(options: dict[str, Any]) -> None:
    for key, (kind, minimum) in _OPTION_RULES.items():
        value = options[key]
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > minimum
            ok = ok and math.isfinite(value)
            want = "a positive number of seconds"
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
            want = f"an integer >= {int(minimum)}"
        if not ok:
            raise ConfigError(f"option {key}={value!r}: give {want}")
    batch = options["batch_bytes"]
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 0:
        raise ConfigError(f"option batch_bytes={batch!r}: give an integer >= 0 (0 = no batching)")
    if options["peer_timeout"] <= options["heartbeat_interval"]:
        raise ConfigError(
            "peer_timeout must be longer than heartbeat_interval, or every peer looks dead"
        )
    membership = options["membership"]
    if membership is not None:
        if not isinstance(membership, dict):
            raise ConfigError("membership= takes a dict of MemberConfig fields, e.g. {'probe_interval': 0.5}")
        try:
            MemberConfig(**membership)
        except TypeError as exc:
            raise ConfigError(f"membership={membership!r}: {exc}") from None
    interfaces = options["interfaces"]
    if interfaces is not None and (
        isinstance(interfaces, str) or not all(isinstance(i, str) for i in interfaces)
    ):
        raise ConfigError('interfaces must be a list of interface names or addresses, e.g. ["eth0"]')


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


class _DoneTracker:
    """What a channel send returns when the data was copied into shared memory:
    the caller's buffer is free at once."""

    done = True

    def wait(self, timeout: float | None = None) -> None:
        return None


class _RdmaTracker:
    """What a channel send returns when the array went through RDMA: done once the
    peer's ring holds all of it (or it was resent on the socket)."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = threading.Event()

    @property
    def done(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float | None = None) -> None:
        if not self.event.wait(timeout):
            raise zmq.NotDone()


class _BatchedFrame:
    """A payload unpacked from a batch, shaped like the zmq.Frame _payload_of reads."""

    __slots__ = ("bytes",)

    def __init__(self, data: bytes) -> None:
        self.bytes = data

    @property
    def buffer(self) -> memoryview:
        return memoryview(self.bytes)

    def __len__(self) -> int:
        return len(self.bytes)


class _CallbackSub:
    """Lets the dispatch thread run an on_peer callback like a handler."""

    __slots__ = ("closed", "handler", "pattern", "delivered")

    def __init__(self, callback: Any, event: str) -> None:
        self.closed = False
        self.pattern = f"on_peer:{event}"
        self.delivered = 0
        self.handler = lambda info: callback(event, info)


class _Pending:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: Message | None = None


_STOP = object()
_WAKE_ID = b"\x00wake"  # never a node id: those are hex
_CTL_SUFFIX = b"/c"  # identity of a peer's control DEALER: "<id>/c"
_LIVE = ("alive", "suspect")  # members we route to
# A message following the previous one to the same peer this closely is part of
# a burst and may wait to be batched. A publishing loop sends every 5-15 µs; a
# request/reply exchange takes hundreds of µs per round trip and is never held.
_BURST_GAP = 50e-6
# Payloads up to this size may be batched (larger ones gain nothing from it).
_BATCH_SMALL = 1024
# Messages a drop_oldest window holds back while waiting for credit.
_DROP_OLDEST_BACKLOG = 1024
# Messages a window holds for publishers on the node's own threads (handlers), which
# never wait for credit (see Node._send_msg); beyond this they are dropped, counted.
_ENGINE_HOLD = 65536
# Subscriptions of the mesh itself (group rendezvous, notices): many credits, never block.
_INTERNAL_FLOW = {"credits": 65536, "credit_bytes": None, "overflow": "drop_new"}
# Data from a peer that left this recently is still delivered: its goodbye (on the
# control pipe, or as gossip) may overtake the last messages it sent before closing.
LEFT_GRACE = 2.0
# A message from a peer that also sends by RDMA waits for the messages sent before it
# on the other path (see _rdma_hold); this long without progress, they count as lost.
_RDMA_HOLD = 10.0


def _peer_id_of(ident: bytes) -> str:
    """Node id behind a ROUTER identity ("<id>", "<id>/c", "<id>/seed/N")."""
    return ident.split(b"/", 1)[0].decode("ascii", "replace")


def _header_kind(frame: Any) -> int | None:
    """The kind of a header frame without decoding it (wire.pack: fixarray, version,
    kind as a positive fixint); None when it does not look like one."""
    b = frame.bytes
    if len(b) >= 3 and b[0] & 0xF0 == 0x90 and b[1] == wire.PROTOCOL_VERSION and b[2] < 0x80:
        return b[2]
    return None


def _rdma_tag(epoch: Any, index: Any, k: Any) -> RdmaTag:
    """An RdmaTag (or the fields of a Sync) from the network: three ints >= 0."""
    if not all(type(v) is int and 0 <= v < 1 << 63 for v in (epoch, index, k)):
        raise ProtocolError("malformed rdma order fields", "malformed")
    return RdmaTag(epoch, index, k)


def _nbytes(frame: Any) -> int:
    return frame.nbytes if type(frame) is memoryview else len(frame)


def _send_frames(sock: Any, frames: list) -> None:
    """Send one multipart message frame by frame (cheaper than send_multipart).

    Only the first frame can hit the high-water mark (zmq.Again): libzmq
    accepts the rest of a message once its first part is in. Large frames go
    without a copy."""
    last = len(frames) - 1
    sock.send(frames[0], _NOBLOCK_MORE if last else zmq.NOBLOCK)
    for index in range(1, last + 1):
        frame = frames[index]
        sock.send(frame, zmq.SNDMORE if index < last else 0, copy=_nbytes(frame) < ZERO_COPY_BYTES)


def _send_multipart(sock: Any, frames: list) -> None:
    sock.send_multipart(frames, zmq.NOBLOCK)


_NOBLOCK_MORE = zmq.NOBLOCK | zmq.SNDMORE
# What owed credit may ride in front of (Node._owed_credit).
_CREDIT_CARRIERS = (wire.MSG, wire.BATCH, wire.REPLY)
# The I/O thread looks again this much later at a batch it could not send (the
# peer's queue was full) or whose link a publisher held (seconds).
_QUEUE_FULL_RETRY = 0.005
# A publisher waiting for room in a full peer queue tries again after this long,
# doubling up to the second (seconds); it lets go of the link lock in between.
_ROOM_RETRY = (0.0005, 0.008)
# Credit that found its link held (I/O thread): looked at again this much later,
# unless the holder applied it first (seconds).
_CREDIT_RETRY = 0.001
# The dispatch thread returns the credit of a batch of messages at its end, or as
# soon as handling it has taken this long (seconds).
_CREDIT_HOLD = 0.002
# publish(timeout=...) of a large array waits at most this long (seconds) for a
# free shared-memory slot before it takes the socket path.
_SHM_WAIT = 0.5


def _credit_threshold(window: int) -> int:
    """Consumed messages that make a subscriber send credit back at once: a quarter
    of the window. Batches are half a window (Link.batch_cap), so credit for the
    first half of a batch is on its way while the publisher sends the next one."""
    return max(1, window // 4)


class Node:
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
        self.denials: collections.Counter[tuple[str, str]] = collections.Counter()  # (peer, action)
        self._zap: Any = None
        self.secured = self._keys is not None
        self.discovery_mode = discovery
        self.seeds = seeds
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

        self._ctx = zmq.Context.instance()
        self._lock = threading.RLock()  # routing table and subscriptions
        self._changed = threading.Condition(self._lock)  # peers or interest changed
        self._routing = RoutingTable()
        self._subs: set[Subscription] = set()
        self._seqs: dict[str, itertools.count] = {}
        self._pending: dict[int, _Pending] = {}
        self._peers: dict[str, Peer] = {}
        self._links: dict[str, Link] = {}  # peer id -> link, read by publishers
        self._tombstones: dict[str, float] = {}
        self._commands: collections.deque = collections.deque()
        self._channels: dict[str, Channel] = {}
        self._early: dict[str, collections.deque] = {}  # channel -> (time, msg) not yet opened
        self._dispatch: Any = None
        self._io_batch: list = []
        # Thread idents of the I/O and dispatch threads (each adds its own): publishes
        # made on them never wait for credit (see _send_msg).
        self._engine_idents: set[int] = set()
        self._io_ident = 0
        self._inline_budget = self.options["inline_budget"]

        self._metrics_port_wanted = metrics_port
        self._metrics: Any = None
        self.metrics_port: int | None = None  # the real port once started
        self.membership_events: collections.Counter[str] = collections.Counter()
        self._last_pressure = 0.0
        self._subject_name = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.name)
        self._sids = itertools.count(1)
        self._batch_max = self.options["batch_bytes"]
        self._shm_threshold = self.options["shm_threshold"]
        self._batch_delay = self.options["batch_delay"]
        self._batching: dict[Link, float] = {}  # links with waiting messages -> flush time
        self._credit_later: set[Link] = set()  # credit left for a busy link (I/O thread)
        self._subs_by_sid: dict[int, Subscription] = {}
        self._dirty_grants: dict[tuple[Subscription, str], CreditGrant] = {}
        self._members: Membership | None = None
        self._peer_callbacks: list = []
        self._rejoin: dict[str, float] = {}  # dead peer id -> next hello
        self._rejoin_socks: dict[str, Any] = {}
        self._beacon: Any = None
        self._shm_dirty = False  # a shared-memory view was released: tell its sender
        self._rdma: Any = None  # transports.rdma.RdmaTransport when usable
        self._rdma_threshold = self.options["rdma_threshold"]
        self._rdma_links: dict[Link, tuple[str, Any]] = {}  # I/O thread: link -> (peer id, conn)
        self._rdma_offers: dict[str, Any] = {}  # peer id -> our offered conn (None: being made)
        self._rdma_poller: Any = None
        # Data-pipe identity -> the order of what that peer sends on both paths.
        self._rdma_order: dict[bytes, ReceiveOrder] = {}
        self._rdma_next_expire = 0.0
        # Queue-pair setup runs on its own thread (see _rdma_submit).
        self._rdma_jobs: Any = None
        self._rdma_setup_lock = threading.Lock()
        self._rdma_setup_open = True
        self.counters = Counters()
        self.gaps = 0
        self.batches_out = 0  # frames that carried several small messages
        # Credit updates sent, by how: "data" (the dispatch thread, on the data pipe),
        # "control" (the I/O thread, on the control pipe), "riding" (in front of a
        # message or batch going to that publisher anyway).
        self.credit_updates = {"data": 0, "control": 0, "riding": 0}
        self.latency = LatencyHistogram()
        self._last_seq: dict[tuple[str, str], int] = {}
        self._logged_once: set[tuple[str, str]] = set()

        self._started = False
        self._closed = False
        self._start_time = 0.0
        self._io_thread: threading.Thread | None = None
        self._dispatch_thread: threading.Thread | None = None
        self._discovery: Any = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Node:
        """Bind, start the I/O and dispatch threads, and join the mesh. Idempotent."""
        self._check_open()
        if self._started:
            return self
        self._dispatch = queue.SimpleQueue()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._router.setsockopt(zmq.RCVHWM, self.options["rcvhwm"])
        self._router.setsockopt(zmq.MAXMSGSIZE, self.options["max_message_size"] + (1 << 20))
        if self._keys is not None:
            # The ZAP handler must be up before the ROUTER binds: without one,
            # libzmq's CURVE server admits any client that knows the server key.
            self._zap = security.zap_register(self._ctx, f"zmesh:{self.id}", self._keys, self.name)
            self._router.setsockopt(zmq.CURVE_SERVER, 1)
            self._router.setsockopt(zmq.CURVE_SECRETKEY, self._keys.secret)
            self._router.setsockopt(zmq.CURVE_PUBLICKEY, self._keys.public)
            self._router.setsockopt(zmq.ZAP_DOMAIN, f"zmesh:{self.id}".encode())
            self._zap.watch(self._router)
        try:
            for plugin in self._transports:
                for endpoint in plugin.bind_endpoints(self._listen, self.id):
                    self._router.bind(endpoint)
                    bound = self._router.getsockopt(zmq.LAST_ENDPOINT).decode()
                    self._bound.append((plugin, bound))
                    self.endpoints.append(bound)
                    self._advertised.setdefault(plugin.name, []).extend(plugin.advertise(bound))
        except zmq.ZMQError as exc:
            self._router.close(linger=0)
            if self._zap is not None:
                self._zap.close()
            self._cleanup_bound()
            raise ConfigError(
                f"cannot listen on {self._listen}: {exc}; pick a free port or another address"
            ) from None
        # Application threads wake the I/O thread through its own ROUTER, so it
        # polls a single socket (cheaper than a poller over two).
        wake_endpoint = f"inproc://zmesh-wake-{self.id}"
        self._router.bind(wake_endpoint)
        self._waker = self._ctx.socket(zmq.DEALER)
        self._waker.setsockopt(zmq.IDENTITY, _WAKE_ID)
        self._waker.setsockopt(zmq.LINGER, 0)
        self._waker.connect(wake_endpoint)
        self._waker_lock = threading.Lock()
        self._seed_socks: dict[str, Any] = {}
        self._seed_peer: dict[str, str] = {}
        self._start_shm()
        self._start_rdma()
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
        return self

    def _start_shm(self) -> None:
        """Offer shared memory to same-host peers when this node talks to any."""
        self._beacon = None
        if not self.options["shm"]:
            return
        from transports import shm

        if not shm.shm_usable():
            return
        shm.cleanup_stale()  # segments of processes that died without cleaning up
        try:
            self._beacon = shm.Beacon(self.id)
        except OSError as exc:
            log.info("%s: no shared memory (%s); arrays stay on the socket", self.name, exc)

    def _start_rdma(self) -> None:
        """Offer RDMA to peers when the rdma transport is among ours and usable."""
        plugin = next((t for t in self._transports if t.name == "rdma"), None)
        if plugin is None:
            return
        if self._keys is not None:
            # RDMA writes cross the wire in clear: a secured cluster keeps arrays on CURVE.
            log.info("%s: secured cluster: rdma not offered (it is not encrypted)", self.name)
            return
        device = self.options["rdma_device"]
        if device is not None and getattr(plugin, "rdma_device", None) != device:
            plugin = type(plugin)(rdma_device=device)
        if plugin.available():
            self._rdma = plugin
        else:
            log.info("%s: rdma device %s not usable; arrays stay on the socket", self.name, device)

    def close(self) -> None:
        """Say goodbye to peers and release everything. Idempotent; never hangs."""
        if self._closed:
            return
        self._closed = True
        if not self._started:
            return
        if self._metrics is not None:
            self._metrics.close()
        if self._discovery is not None:
            try:
                self._discovery.close()
            except Exception as exc:
                log.warning("%s: discovery did not close cleanly: %s", self.name, exc)
        self._command(("close",))
        if self._io_thread is not None:
            self._io_thread.join(timeout=5.0)
        self._dispatch.put(_STOP)
        if self._dispatch_thread is not None and self._dispatch_thread is not threading.current_thread():
            self._dispatch_thread.join(timeout=5.0)
        for sub in list(self._subs):
            sub.close()
        for pending in list(self._pending.values()):
            pending.event.set()
        with self._waker_lock:
            self._waker.close(linger=0)
        if self._beacon is not None:
            self._beacon.close()
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
        sub = self._subscribe(pattern, handler, queue or "", credits, credit_bytes, overflow)
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
    ) -> Subscription:
        # The window checks credits/credit_bytes and says what to do when they are wrong.
        window = CreditWindow(
            credits, credit_bytes, overflow, _DROP_OLDEST_BACKLOG if overflow == "drop_oldest" else 0
        )
        sub = Subscription(self, pattern, handler, queue)
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

    def _route(self, subject: str, internal: bool = False) -> Route:
        if type(subject) is not str:
            validate_subject(subject)  # raises InvalidSubject with a clear message
        if not internal and subject.startswith("_mesh"):
            validate_subject(subject)  # reserved: refused even when a route is cached
        if self._policy is not None and not internal:
            self._policy.check_publish(self.name, subject)  # cached: cheap after the first
        route = self._routing.cached(subject)
        if route is None:
            validate_subject(subject, allow_reserved=internal)
            with self._lock:
                route = self._routing.route(subject)
        return route

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
        """
        self._check_started()
        route = self._route(subject)
        self._publish(subject, route, data, headers, None, timeout)

    def _publish(
        self,
        subject: str,
        route: Route,
        data: Any,
        headers: dict | None,
        req_id: int | None,
        timeout: float | None,
    ) -> None:
        payload, array, flags, nbytes = self._encode_payload(data)
        if headers is not None and not isinstance(headers, dict):
            raise ConfigError("headers must be a dict (of str to str, bytes or numbers)")
        counter = self._seqs.get(subject)
        if counter is None:
            counter = self._seqs.setdefault(subject, itertools.count(1))
        seq = next(counter)

        local_targets: Any = route.local
        peer_sids: Any = route.peers
        if route.local_groups or route.peer_groups:
            # Queue groups: exactly one member subscription per group, mesh-wide.
            local_targets = list(route.local)
            peer_sids = {peer: list(sids) for peer, sids in route.peers.items()}
            for group in route.groups():
                local_members = route.local_groups.get(group, ())
                remote_members = route.peer_groups.get(group, ())
                pick = random.randrange(len(local_members) + len(remote_members))
                if pick < len(local_members):
                    local_targets.append(local_members[pick])
                else:
                    peer, sid = remote_members[pick - len(local_members)]
                    peer_sids.setdefault(peer, []).append(sid)

        if local_targets:
            self._publish_local(
                subject, local_targets, payload, array, nbytes, headers, seq, req_id, timeout
            )
        if not peer_sids:
            return
        ts = time.time()
        for peer_id, sids in peer_sids.items():
            self._send_msg(
                peer_id, sids, (subject, seq, ts, flags, headers, req_id, payload, nbytes), timeout
            )

    def _publish_local(
        self,
        subject: str,
        subs: Any,
        payload: list,
        array: np.ndarray | None,
        nbytes: int,
        headers: dict | None,
        seq: int,
        req_id: int | None,
        timeout: float | None,
    ) -> None:
        """Deliver to this node's own subscribers: no socket hop, same credit rules."""
        view = payload[-1]
        if array is not None:
            local_array = array.view()
            local_array.flags.writeable = False
            local_data: Any = memoryview(local_array.reshape(-1).view(np.uint8)) if array.size else b""
        else:
            local_array = None
            # Small mutable buffers are copied: the publisher may reuse them at once.
            if isinstance(view, bytes):
                local_data = view
            elif nbytes < ZERO_COPY_BYTES:
                local_data = bytes(view)
            else:
                local_data = memoryview(view).toreadonly()
        reply_to = self.id if req_id is not None else None
        for sub in subs:
            msg = Message(
                subject, local_data, headers, self.id, seq,
                array=local_array, request_id=req_id, node=self, reply_to=reply_to,
            )
            msg._credit = nbytes
            with sub._flow:
                decision = sub._window.offer(msg, nbytes)
                action = decision.action
                if action is Action.BLOCK:
                    if sub.closed:
                        continue
                    if threading.get_ident() in self._engine_idents:
                        # A handler publishing: it never waits (the credit may come
                        # back only through this very thread); held, sent on credit.
                        if sub._window.hold(msg, nbytes, _ENGINE_HOLD):
                            continue
                        action = Action.DROP_NEW
                    elif not self._wait_for_credit(
                        sub._flow, sub._window, nbytes, timeout, sub.pattern, lambda: False
                    ):
                        continue
                    else:
                        action = sub._window.offer(msg, nbytes).action
            if action is Action.SEND:
                self._deliver(sub, msg)
            elif action is not Action.QUEUE:
                self._count_drop(action.value, None)
                self._pressure_notice(action.value, sub.sid)

    def _wait_for_credit(
        self, cond: Any, window: Any, nbytes: int, timeout: float | None, what: str, lost: Any,
        link: Link | None = None,
    ) -> bool:
        """Wait (holding ``cond``) until ``window`` can take ``nbytes``. False when the
        subscription went away meanwhile (nothing to send); PeerLostError when its
        node died; BackpressureError after ``timeout``. With ``link``, credit that
        arrived while the lock was taken is applied before each check. Application
        threads only: the node's own threads never wait for credit."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if link is not None and link.credit_in:
                self._apply_credit(link)
            if window.can_send(nbytes):
                break
            if lost():
                raise PeerLostError(
                    f"the node subscribed to {what!r} died while publish() waited for its "
                    "credit; the message was not delivered there",
                )
            if window.closed or self._closed:
                return False
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise BackpressureError(
                    f"subscriber of {what!r} gave no credit within {timeout} s (it consumes "
                    "slower than you publish); slow down, raise timeout=, or subscribe with "
                    "overflow='drop_oldest'"
                )
            cond.wait(remaining if remaining is not None else 1.0)
        return True

    def _send_msg(self, peer_id: str, sids: Any, item: tuple, timeout: float | None) -> None:
        """Send one message to a peer for the subscriptions ``sids``, each within its credit."""
        link = self._links.get(peer_id)
        if link is None:
            self.counters.drops["no_link"] += 1
            return
        nbytes = item[7]
        shm_out = link.shm_out
        if shm_out is not None and timeout and item[3] and nbytes >= self._shm_threshold:
            # A full pool frees up as the peer consumes: a caller that accepts waiting
            # waits for a slot (not holding the link lock) rather than sending through
            # the kernel, which is several times slower (and under CURVE, encrypted).
            shm_out.wait_for_room(nbytes, min(timeout, _SHM_WAIT))
        with link.lock:  # link.cond's lock; entering the lock itself skips a Python call
            if link.closed:
                self.counters.drops["no_link"] += 1
                return
            if link.credit_in:  # it came while another thread held the link
                self._apply_credit(link)
            allowed = []
            dropped = None
            for sid in sids:
                window = link.windows.get(sid)
                if window is None:
                    window = self._open_window(peer_id, link, sid)
                    if window is None:
                        allowed.append(sid)  # the peer asked for no flow control
                        continue
                decision = window.offer(item, nbytes)
                action = decision.action
                if action is Action.BLOCK and threading.get_ident() in self._engine_idents:
                    # The rule that keeps nodes free of deadlocks: a publish on the
                    # node's own threads (a handler) never waits for credit, which
                    # may come back only once such a thread moves on (two nodes
                    # whose handlers publish to each other). Beyond the window the
                    # message is held in order and leaves as credit returns.
                    if window.hold(item, nbytes, _ENGINE_HOLD):
                        continue
                    action = Action.DROP_NEW
                if action is Action.BLOCK:
                    if link.batch:
                        # Out of credit: the batch cannot grow while we wait, and its
                        # messages are what the subscriber needs to return credit.
                        self._flush_batch(link, timeout)
                    if not self._wait_for_credit(
                        link.cond, window, nbytes, timeout, item[0], lambda: link.closed, link
                    ):
                        continue  # it unsubscribed meanwhile
                    # Still a burst (the subscriber is behind): this message starts
                    # the next batch rather than leaving alone after the wait.
                    link.last_send = time.monotonic()
                    action = window.offer(item, nbytes).action
                if action is Action.SEND:
                    allowed.append(sid)
                elif action is not Action.QUEUE:
                    self._count_drop(action.value, link)
                    dropped = (action.value, sid)
            if allowed:
                self._send_locked(link, peer_id, item, allowed, timeout)
        if dropped is not None:
            self._pressure_notice(*dropped)  # outside the link lock: it publishes

    def _send_locked(
        self, link: Link, peer_id: str, item: tuple, sids: list, timeout: float | None
    ) -> bool:
        """Put one message on a link's data socket; the caller holds the link lock."""
        subject, seq, ts, flags, headers, req_id, payload, nbytes = item
        if self._batch_max:
            now = time.monotonic()
            batch = link.batch
            if nbytes <= _BATCH_SMALL and not flags and (
                batch or now - link.last_send < _BURST_GAP
            ):
                # A burst: this message waits (at most batch_delay) to share a frame.
                data = payload[0]
                if type(data) is not bytes:
                    data = bytes(data)  # the caller may reuse its buffer once we return
                run = batch[-1] if batch else None
                if (run is not None and run[2] == seq - 1 and run[1] == subject
                        and headers is None and req_id is None and run[3] == sids):
                    # The run's header stands for this one too (next seq, same subject
                    # and subscriptions): no header of its own to build or parse.
                    run[2] = seq
                    run[4].append(data)
                    link.batch_bytes += nbytes + 4
                else:
                    if not batch:
                        link.batch_since = now
                        if link not in self._batching:  # else the I/O thread will look anyway
                            self._batching[link] = now + self._batch_delay
                            self._command(("batch", link))  # wake it: it flushes in time
                    header = wire.pack_msg(subject, seq, ts, flags, headers, req_id, sids)
                    # Only plain messages extend a run: headers and request ids differ.
                    shared = subject if headers is None and req_id is None else None
                    batch.append([header, shared, seq, sids, [data]])
                    link.batch_bytes += len(header) + nbytes + 12
                link.batch_count += 1
                self._count_out(link, nbytes)
                if link.batch_bytes >= self._batch_max or link.batch_count >= link.batch_cap:
                    self._flush_batch(link, timeout)
                return True
            if batch:
                self._flush_batch(link, timeout)  # keep order: what waited goes first
                if link.closed:  # the peer went away while that batch waited for room
                    self.counters.drops["no_link"] += 1
                    return False
            link.last_send = now
        shm_desc = None
        if flags and link.shm_out is not None and nbytes >= self._shm_threshold:
            payload, shm_desc = self._to_shm(link, payload)
            if shm_desc is not None:
                flags |= wire.SHM
        frames = [wire.pack_msg(subject, seq, ts, flags, headers, req_id, sids), *payload]
        if shm_desc is None:
            if (flags and link.rdma is not None and nbytes >= self._rdma_threshold
                    and self._to_rdma(link, peer_id, frames, None)):
                self._count_out(link, nbytes)
                return True
            return self._put_frames(link, peer_id, frames, nbytes, timeout)
        shm_out = link.shm_out
        try:
            sent = self._put_frames(link, peer_id, frames, nbytes, timeout)
        except BaseException:
            shm_out.abort(shm_desc)  # never announced to the peer: free the slot
            raise
        if not sent:
            shm_out.abort(shm_desc)
        return sent

    def _put_frames(
        self, link: Link, peer_id: str, frames: list, nbytes: int, timeout: float | None
    ) -> bool:
        """Put one message on a link's data socket; the caller holds the link lock.
        A full peer queue drops it (counted), or with ``timeout`` waits that long."""
        sock = link.sock
        sync = None
        owed = self._owed_credit(peer_id) if self._dirty_grants else None
        if owed is not None:  # credit we owe this peer rides in front of the message
            frames = [wire.pack(wire.CREDIT, owed), *frames]
        if link.rdma_order is not None:  # arrays went by RDMA: keep the order with them
            frames, sync = self._rdma_sync(link, frames)
        try:
            _send_frames(sock, frames)
        except zmq.Again:
            if timeout is None or timeout <= 0:
                self._count_drop("peer_queue_full", link)
                self._owed_credit_failed(peer_id, owed)
                return False
            room = self._wait_for_room(link, frames, timeout, _send_frames)
            if room is not True:
                self._owed_credit_failed(peer_id, owed)
                if room == "closed":  # the peer went away meanwhile
                    self.counters.drops["no_link"] += 1
                    return False
                self._count_drop("peer_queue_full", link)
                raise BackpressureError(
                    f"peer {self._peer_name(peer_id)} did not accept the message within "
                    f"{timeout} s (its queue is full); slow down or raise timeout="
                ) from None
        except zmq.ZMQError as exc:
            self._count_drop("send_error", link)
            self._owed_credit_failed(peer_id, owed)
            log.debug("send to %s failed: %s", peer_id, exc)
            return False
        if owed is not None:
            self.credit_updates["riding"] += 1
        if sync is not None:
            link.rdma_order.synced(sync)
        self._count_out(link, nbytes)
        return True

    def _count_out(self, link: Link, nbytes: int) -> None:
        self.counters.msgs_out += 1
        self.counters.bytes_out += nbytes
        link.counters.msgs_out += 1
        link.counters.bytes_out += nbytes

    def _to_shm(self, link: Link, payload: list) -> tuple[list, Any]:
        """Copy an array's bytes into a shared-memory slot for the peer: the frames
        then carry only descriptors. (payload, None) when no slot is free now."""
        desc = link.shm_out.write(np.frombuffer(payload[1], np.uint8))
        if desc is None:
            return payload, None  # pool full or no space: the socket path it is
        return [payload[0], desc.pack()], desc

    def _to_rdma(self, link: Link, peer_id: str, frames: list, tracker: Any) -> bool:
        """Send a tensor message (header, descriptor, data) through the link's RDMA
        connection (caller holds the link lock). False: send it on the socket."""
        conn = link.rdma
        if conn.state != "ready":
            return False  # still connecting
        order = link.rdma_order
        if order is None:  # the first array by RDMA on this link: order matters from now on
            order = link.rdma_order = SendOrder(int.from_bytes(os.urandom(4), "big"))
        tag = order.next_rdma()
        meta = msgpack.packb([bytes(frames[0]), bytes(frames[1]), *tag], use_bin_type=True)
        try:
            msg_id = conn.send(np.frombuffer(frames[2], np.uint8), meta=meta)
        except RdmaError as err:
            self._rdma_fallback(link, peer_id, err)
            return False
        except Exception as exc:  # noqa: BLE001 - e.g. meta too large: this one goes on the socket
            log.debug("rdma send to %s refused: %s", peer_id, exc)
            return False
        sync = order.sent_rdma(tag)
        if sync is not None:  # socket messages went before it: the peer holds it for this
            self._rdma_send_sync(link, sync)
        if tracker is not None:
            link.rdma_trackers[msg_id] = tracker
        return True

    def _rdma_sync(self, link: Link, frames: list) -> tuple[list, Sync | None]:
        """A data message for the socket of a link that sends arrays by RDMA (link lock
        held): where the path changes, a sync goes in front of it (SendOrder), in the
        same ZeroMQ message so neither is lost without the other. Returns the frames
        and the sync, to confirm with ``link.rdma_order.synced()`` once it is queued."""
        sync = link.rdma_order.socket()
        if sync is None:
            return frames, None
        return [wire.pack(wire.RDMA_SYNC, list(sync)), *frames], sync

    def _rdma_send_sync(self, link: Link, sync: Sync) -> None:
        """A sync on its own (link lock held). When the socket queue is full it stays
        pending: the I/O thread retries it, and the next socket message carries it."""
        try:
            link.sock.send(wire.pack(wire.RDMA_SYNC, list(sync)), zmq.NOBLOCK)
        except zmq.ZMQError:
            return
        link.rdma_order.synced(sync)

    def _rdma_fallback(self, link: Link, peer_id: str, err: Any, quiet: bool = False) -> None:
        """The link's RDMA connection failed (caller holds the link lock): resend what
        it had not delivered on the socket and stay there. The I/O thread closes it."""
        if link.rdma is None:
            return
        link.rdma = None
        link.rdma_off = True
        (log.debug if quiet else log.warning)(
            "%s: rdma to %s failed (%s); arrays go over %s from now on",
            self.name, self._peer_name(peer_id), err, link.transport)
        for _msg_id, array, meta in err.unsent:
            try:
                header, descriptor, *tag = msgpack.unpackb(meta, raw=False)
                # Marked as sent by RDMA: the peer delivers it in its place, and drops
                # it if the first copy landed after all.
                frames = [wire.pack(wire.RDMA_RESENT, tag), header, descriptor, array]
                try:
                    link.sock.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    if not link.sock.poll(int(self.options["peer_timeout"] * 1000), zmq.POLLOUT):
                        raise
                    link.sock.send_multipart(frames, zmq.NOBLOCK)
            except Exception as exc:  # noqa: BLE001
                self._count_drop("send_error", link)
                log.debug("resending to %s after rdma failed: %s", peer_id, exc)
        for tracker in link.rdma_trackers.values():
            tracker.event.set()  # resent by copy (or lost): the caller's buffer is free
        link.rdma_trackers.clear()

    def _flush_batch(self, link: Link, wait: float | None = None, keep: bool = False) -> None:
        """Send a link's waiting small messages as one frame (caller holds the lock).
        When the peer's queue is full: a publishing thread given a timeout waits up
        to ``wait`` seconds for room (then drops them, counted, and raises
        BackpressureError); ``keep`` (the I/O thread, which never waits) keeps them
        for a later try; otherwise they are dropped and counted, as publish() without
        a timeout does."""
        wait = wait if wait is not None and wait > 0 else None  # a timeout of 0 never waits
        batch = link.batch
        count = link.batch_count
        batch_bytes = link.batch_bytes
        link.batch = []
        link.batch_bytes = 0
        link.batch_count = 0
        link.last_send = time.monotonic()
        if link.closed or not batch:
            return
        runs = [(run[0], run[4]) for run in batch]
        frames, sync = [wire.pack(wire.BATCH, count), encode_batch(runs)], None
        owed = self._owed_credit(link.peer_id) if self._dirty_grants else None
        if owed is not None:  # credit we owe this peer rides in front of the batch
            frames.insert(0, wire.pack(wire.CREDIT, owed))
        if link.rdma_order is not None:  # arrays went by RDMA: keep the order with them
            frames, sync = self._rdma_sync(link, frames)
        try:
            try:
                link.sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                if keep:
                    self._owed_credit_failed(link.peer_id, owed)
                    # Back in place, first in line; looked at again in a moment.
                    link.batch, link.batch_bytes, link.batch_count = batch, batch_bytes, count
                    link.batch_since = time.monotonic() + _QUEUE_FULL_RETRY
                    return
                room = self._wait_for_room(link, frames, wait, _send_multipart) if wait else "full"
                if room == "closed":  # the peer went away meanwhile
                    self._owed_credit_failed(link.peer_id, owed)
                    self.counters.drops["no_link"] += count
                    return
                if room is not True:
                    raise
            self.batches_out += 1
            if owed is not None:
                self.credit_updates["riding"] += 1
            if sync is not None:
                link.rdma_order.synced(sync)
        except zmq.ZMQError:
            self._owed_credit_failed(link.peer_id, owed)
            self._count_drop("peer_queue_full", link)
            self.counters.drops["peer_queue_full"] += count - 1
            link.counters.drops["peer_queue_full"] += count - 1
            if wait:
                raise BackpressureError(
                    f"peer {self._peer_name(link.peer_id)} did not accept {count} batched "
                    f"messages within {wait} s (its queue is full); they were dropped "
                    "(counted as peer_queue_full); slow down or raise timeout="
                ) from None

    def _wait_for_room(self, link: Link, frames: list, wait: float, send: Any) -> bool | str:
        """Try ``send(link.sock, frames)`` again until the full peer queue takes it,
        for up to ``wait`` seconds (caller holds the link lock, and the first try
        failed). The lock is let go between tries, so that other threads publishing
        to this peer meanwhile keep their own timeouts (publish() without one drops
        at once) instead of queueing behind this wait; the socket itself is only
        used under the lock. True once sent, "full" after ``wait``, "closed" when
        the link closed meanwhile. A link that sends arrays by RDMA keeps the lock
        and polls (its frames carry a sync that no other message may overtake)."""
        deadline = time.monotonic() + wait
        pause, longest = _ROOM_RETRY
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "full"
            if link.rdma_order is not None:
                if not link.sock.poll(int(remaining * 1000) + 1, zmq.POLLOUT):
                    return "full"
            else:
                link.cond.wait(min(pause, remaining))  # lets go of the lock meanwhile
                pause = min(pause * 2, longest)
                if link.closed:
                    return "closed"
            try:
                send(link.sock, frames)
                return True
            except zmq.Again:
                continue

    def _open_window(self, peer_id: str, link: Link, sid: int) -> CreditWindow | None:
        params = self._routing.params(peer_id, sid)
        if params is None or params[0] <= 0:
            return None
        granted, credit_bytes, overflow = params
        try:
            window = CreditWindow(
                granted, credit_bytes or None, overflow,
                _DROP_OLDEST_BACKLOG if overflow == "drop_oldest" else 0,
            )
        except MeshError:
            self.counters.drops["bad_flow_params"] += 1
            return None
        link.windows[sid] = window
        link.batch_cap = min(link.batch_cap, max(8, granted // 2))
        return window

    def _count_drop(self, reason: str, link: Link | None) -> None:
        self.counters.drops[reason] += 1
        if link is not None:
            link.counters.drops[reason] += 1

    def _pressure_notice(self, reason: str, sid: int | None) -> None:
        """Announce drops on _mesh.pressure.<node> (at most once a second) so that
        applications can slow down."""
        now = time.monotonic()
        if now - self._last_pressure < 1.0:
            return
        self._last_pressure = now
        subject = f"_mesh.pressure.{self._subject_name}"
        route = self._route(subject, internal=True)
        if route.empty:
            return
        body = msgpack.packb(
            {"node": self.name, "reason": reason, "sid": sid, "drops": dict(self.counters.drops)}
        )
        try:
            self._publish(subject, route, body, None, None, None)
        except MeshError:
            pass  # a notice must never fail the publish that caused it

    def _encode_payload(self, data: Any) -> tuple[list, np.ndarray | None, int, int]:
        if isinstance(data, np.ndarray):
            desc, buf = array_to_frames(data)
            nbytes = data.nbytes
            self._check_size(nbytes)
            return [desc, buf], data, wire.TENSOR, nbytes
        if isinstance(data, bytes):
            payload = data
        elif isinstance(data, (bytearray, memoryview)):
            payload = data
        elif isinstance(data, str):
            payload = data.encode()
        else:
            raise ConfigError(
                f"cannot publish a {type(data).__name__}: pass bytes, memoryview, str or a "
                "numpy array (serialise other objects first, e.g. with msgpack)"
            )
        nbytes = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
        self._check_size(nbytes)
        return [payload], None, 0, nbytes

    def _check_size(self, nbytes: int) -> None:
        if nbytes > self.options["max_message_size"]:
            raise MessageTooLarge(
                f"payload of {nbytes} bytes exceeds max_message_size="
                f"{self.options['max_message_size']}; split it or raise the option on every node"
            )

    def _send(self, peer_id: str, frames: list, nbytes: int, timeout: float | None) -> bool:
        """Send ready-made frames to a peer (replies)."""
        link = self._links.get(peer_id)
        if link is None:
            self.counters.drops["no_link"] += 1
            return False
        with link.lock:
            if link.closed:
                self.counters.drops["no_link"] += 1
                return False
            return self._put_frames(link, peer_id, frames, nbytes, timeout)

    def _deliver(self, sub: Subscription, msg: Message) -> None:
        """Hand a message to a subscription (from a publishing thread)."""
        if sub.closed:
            return
        if sub.handler is None:
            sub._inbox.put(msg)
        else:
            self._dispatch.put((sub, msg))

    def _io_deliver(self, sub: Subscription, msg: Message) -> None:
        """Hand a message to a subscription from the I/O thread: handler calls are
        collected and passed to the dispatch thread once per drain."""
        if sub.closed:
            return
        if sub.handler is None:
            sub._inbox.put(msg)
        else:
            self._io_batch.append((sub, msg))

    def _dispatch_loop(self) -> None:
        self._engine_idents.add(threading.get_ident())
        get = self._dispatch.get
        while True:
            item = get()
            if item is _STOP:
                return
            try:
                self._run_item(item)
            except Exception:  # nothing may end this thread: every handler depends on it
                self.counters.drops["dispatch_error"] += 1
                log.exception("%s: dispatch error", self.name)

    def _run_item(self, item: Any) -> None:
        if type(item) is not list:
            self._run_handler(*item)
            return
        # A drain's worth of messages: credits of remote publishers go back once
        # per (subscription, publisher) after the batch, not once per message.
        consumed: dict[tuple[Subscription, Any], list] = {}
        monotonic = time.monotonic
        since = monotonic()
        for sub, msg in item:
            if consumed and monotonic() - since > _CREDIT_HOLD:
                # Slow handlers: the credit of what they finished must not wait for
                # the rest of the batch.
                self._return_credits(consumed)
                consumed = {}
                since = monotonic()
            if sub.closed:
                continue
            self._call_handler(sub, msg)
            credit = getattr(msg, "_credit", None)  # on_peer callbacks get a PeerInfo
            if type(credit) is tuple:
                msg._credit = None
                key = (sub, credit[0])
                tally = consumed.get(key)
                if tally is None:
                    consumed[key] = [credit[1], 1, credit[2]]
                else:
                    tally[1] += 1
                    tally[2] += credit[2]
                    if tally[1] >= credit[0].threshold:
                        # Enough for the publisher to act on: send it now, not after
                        # the rest of the batch (the window keeps moving).
                        del consumed[key]
                        self._return_credit(sub, credit[0], tally[0], tally[1], tally[2])
            elif credit is not None:
                self._consumed(sub, msg)
        self._return_credits(consumed)

    def _return_credits(self, consumed: dict) -> None:
        for (sub, grant), (publisher, count, nbytes) in consumed.items():
            self._return_credit(sub, grant, publisher, count, nbytes)

    def _call_handler(self, sub: Subscription, msg: Message) -> None:
        try:
            sub.handler(msg)
        except Exception:
            self.counters.drops["handler_error"] += 1
            log.exception("%s: handler for %r raised on %r", self.name, sub.pattern, msg.subject)
        sub.delivered += 1

    def _run_handler(self, sub: Subscription, msg: Message) -> None:
        if sub.closed:
            return
        self._call_handler(sub, msg)
        if getattr(msg, "_credit", None) is not None:  # on_peer callbacks get a PeerInfo
            self._consumed(sub, msg)  # the handler returned: its credit goes back

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
        route = self._route(subject)
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

    def _wait_reply(self, pending: _Pending, timeout: float) -> bool:
        if threading.current_thread() is not self._dispatch_thread:
            return pending.event.wait(timeout)
        # A handler is requesting: the responder may be a handler of this very node,
        # queued behind us on the dispatch thread. Run queued handlers meanwhile.
        deadline = time.monotonic() + timeout
        while not pending.event.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                item = self._dispatch.get(timeout=min(remaining, 0.05))
            except queue.Empty:
                continue
            if item is _STOP:
                self._dispatch.put(_STOP)
                return pending.event.is_set()
            self._run_item(item)
        return True

    def _respond(self, reply_to: str, req_id: int, data: Any, headers: dict | None) -> None:
        self._check_open()
        payload, array, flags, nbytes = self._encode_payload(data)
        if reply_to == self.id:
            pending = self._pending.get(req_id)
            if pending is not None and pending.reply is None:
                view = payload[-1]
                pending.reply = Message(
                    "",
                    view if isinstance(view, bytes) else memoryview(view),
                    headers,
                    self.id,
                    0,
                    array=array,
                    request_id=req_id,
                )
                pending.event.set()
            return
        self._send(reply_to, [wire.pack_reply(req_id, flags, headers), *payload], nbytes, None)

    # ------------------------------------------------------------------ status

    def status(self) -> dict:
        """A JSON-serialisable snapshot of this node."""
        now = time.monotonic()
        peers = []
        for p in list(self._peers.values()):
            link = p.link
            peers.append(
                {
                    "id": p.id,
                    "name": p.name,
                    "state": p.state,
                    "transport": link.transport if link else None,
                    # Large arrays: through shared memory, or on the transport itself.
                    "bulk": (
                        "shm" if link.shm_out is not None
                        else "rdma" if link.rdma is not None and link.rdma.state == "ready"
                        else link.transport
                    ) if link else None,
                    "shm": link.shm_out.stats() if link and link.shm_out is not None else None,
                    "rdma": dict(link.rdma.stats) if link and link.rdma is not None else None,
                    "endpoint": link.endpoint if link else None,
                    "rtt": p.rtt,
                    "since": round(now - p.joined_at, 3) if p.joined_at else None,
                    "interest": len(self._routing.peer_interest(p.id)),
                    # Our credit towards each of its subscriptions (sid -> window).
                    "credits": {
                        str(sid): {"available": w.available, "in_flight": w.in_flight, "queued": w.pending}
                        for sid, w in list(link.windows.items())
                    } if link else {},
                    **p.counters.as_dict(),
                }
            )
        with self._lock:
            subs = [
                {
                    "pattern": s.pattern,
                    "queue": s.queue or None,
                    "sid": s.sid,
                    "delivered": s.delivered,
                    "pending": s.pending,
                    "credits": s.credits,
                    "overflow": s.overflow,
                    "inline": s.inline,
                    # Per publisher: messages received and not yet consumed.
                    "outstanding": {
                        self._peer_name(pub): g.outstanding for pub, g in list(s._grants.items())
                    },
                }
                for s in self._subs
            ]
        return {
            "id": self.id,
            "name": self.name,
            "cluster": self.cluster,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "protocol": wire.PROTOCOL_VERSION,
            "uptime": round(now - self._start_time, 3) if self._started else 0.0,
            "closed": self._closed,
            "endpoints": self._advertised,
            "transports": [t.name for t in self._transports],
            "discovery": self.discovery_mode,
            "secured": self._keys is not None,
            "security": self._security_status(),
            "policy": self._policy.describe() if self._policy is not None else None,
            "denied": [
                {"peer": name, "action": action, "count": n} for (name, action), n in self.denials.items()
            ],
            "peers": peers,
            "subscriptions": subs,
            "counters": {
                **self.counters.as_dict(), "gaps": self.gaps, "batches_out": self.batches_out,
                "credit_updates": dict(self.credit_updates),
            },
            "latency": self.latency.summary(),
        }

    def _security_status(self) -> dict | None:
        if self._keys is None:
            return None
        zap = self._zap
        return {
            "mechanism": "CURVE",
            "key": self._keys.fingerprint,
            "accepted": zap.accepted if zap is not None else 0,
            "refused": dict(zap.refused) if zap is not None else {},
        }

    # ================================================================== I/O thread

    def _command(self, cmd: tuple) -> None:
        self._commands.append(cmd)
        with self._waker_lock:
            try:
                self._waker.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # queue full (the I/O thread is awake anyway) or closing

    def _io_loop(self) -> None:
        self._io_ident = threading.get_ident()
        self._engine_idents.add(self._io_ident)
        router = self._router
        hb = self.options["heartbeat_interval"]
        next_tick = time.monotonic()
        for seed in self.seeds:
            self._open_seed(seed)
        # Seeds are retried quickly at first (the connection takes a moment), then
        # every seed_interval.
        seed_delay = 0.02
        next_seed = time.monotonic() + seed_delay
        try:
            while True:
                now = time.monotonic()
                if now >= next_tick:
                    self._tick(now)
                    next_tick = now + hb
                if self._seed_socks and now >= next_seed:
                    self._hello_seeds()
                    seed_delay = min(seed_delay * 2, self.options["seed_interval"])
                    next_seed = now + seed_delay
                members = self._members
                deadline = members.next_deadline()
                if deadline is not None and now >= deadline:
                    self._swim(members.tick(now))
                    deadline = members.next_deadline()
                wake_at = min(next_tick, next_seed) if self._seed_socks else next_tick
                if deadline is not None:
                    wake_at = min(wake_at, deadline)
                if self._shm_dirty:
                    self._send_shm_releases()
                if self._batching:
                    batch_deadline = self._flush_batches(now)
                    if batch_deadline is not None:
                        wake_at = min(wake_at, batch_deadline)
                if self._dirty_grants:
                    credit_deadline = self._flush_credits(now)
                    if credit_deadline is not None:
                        wake_at = min(wake_at, credit_deadline)
                if self._credit_later:
                    for link in list(self._credit_later):
                        self._take_credit(link)
                    if self._credit_later:
                        wake_at = min(wake_at, now + _CREDIT_RETRY)
                wait_ms = max(0, int((wake_at - now) * 1000) + 1)
                if self._rdma_links or self._rdma_order:
                    self._rdma_wait(wait_ms)
                elif router.poll(wait_ms):
                    self._drain_router()
                while self._commands:
                    cmd = self._commands.popleft()
                    if cmd[0] == "close":
                        self._io_shutdown()
                        return
                    self._run_command(cmd)
        except Exception:
            log.exception("%s: I/O thread crashed; closing the node", self.name)
            self._closed = True
            self._io_shutdown()

    def _rdma_wait(self, wait_ms: int) -> None:
        """Wait on the ROUTER and the RDMA connections' completion channels, then
        drive the connections (a short timer for one without a channel fd)."""
        poller = self._rdma_poller
        if poller is None:
            poller = self._rdma_poller = zmq.Poller()
            poller.register(self._router, zmq.POLLIN)
            timer = False
            for _peer_id, conn in self._rdma_links.values():
                fd = conn.fileno()
                if fd is None:
                    timer = True
                else:
                    poller.register(fd, zmq.POLLIN)
            poller.timer = timer  # type: ignore[attr-defined]
        events = dict(poller.poll(min(wait_ms, 1 if poller.timer else 50)))  # type: ignore[attr-defined]
        if self._router in events:
            self._drain_router()
        self._rdma_progress()

    def _rdma_progress(self) -> None:
        now = time.monotonic()
        for link, (peer_id, conn) in list(self._rdma_links.items()):
            received: list = []
            ident = peer_id.encode()
            with link.lock:
                # Also once for a link that is gone or failed over meanwhile (on a
                # publishing thread): what landed in its ring is handed out first.
                try:
                    progress = conn.progress()
                except RdmaError as err:
                    received = err.received
                    if link.rdma is conn and not link.closed:
                        self._rdma_fallback(link, peer_id, err)
                    elif link.rdma is conn:
                        link.rdma = None
                    self._rdma_forget(link)
                else:
                    received = progress.received
                    for msg_id in progress.sent:
                        tracker = link.rdma_trackers.pop(msg_id, None)
                        if tracker is not None:
                            tracker.event.set()
                    if link.closed or link.rdma is not conn:
                        self._rdma_forget(link)
                    order = self._rdma_order.get(ident)
                    if order is not None:  # bytes landing: a long array is on its way
                        order.progress(conn.stats["bytes_received"], now)
                if link.closed and link.rdma_trackers:  # the peer is gone: nothing to wait for
                    for tracker in link.rdma_trackers.values():
                        tracker.event.set()
                    link.rdma_trackers.clear()
                if link.rdma_order is not None and link.rdma_order.pending is not None:
                    self._rdma_send_sync(link, link.rdma_order.pending)  # a full queue lost it
            for r in received:
                try:
                    header, descriptor, epoch, index, k = msgpack.unpackb(r.meta, raw=False)
                    tag = _rdma_tag(epoch, index, k)
                    frames = [_BatchedFrame(ident), _BatchedFrame(header),
                              _BatchedFrame(descriptor), _BatchedFrame(memoryview(r.array))]
                except Exception:  # noqa: BLE001
                    self._drop("malformed", ident, "undecodable rdma message meta")
                    continue
                self._rdma_arrived(ident, tag, frames, now)
        if self._rdma_order and now >= self._rdma_next_expire:
            self._rdma_next_expire = now + 0.1
            self._rdma_expire(now)
        if self._io_batch:
            self._dispatch.put(self._io_batch)
            self._io_batch = []

    def _rdma_arrived(self, ident: bytes, tag: RdmaTag, frames: list, now: float) -> None:
        """A message the peer sent by RDMA (through the queue pair, or re-sent on the
        socket): handle it, and what waited for it, in the order the peer sent them."""
        order = self._rdma_order.get(ident)
        if order is None:
            order = self._rdma_order[ident] = ReceiveOrder()
        for item in order.rdma(tag, frames, now):
            self._handle_frames(item, now, ordered=True)

    def _rdma_hold(self, frames: list, now: float) -> bool:
        """A socket message from a peer that also sends us arrays by RDMA: hold it
        while an array sent before it has not arrived yet (see ReceiveOrder). Syncs
        and re-sent arrays go on to _handle, which applies them in their place."""
        order = self._rdma_order.get(frames[0].bytes)  # data pipe only: never control
        if order is None or not order.blocked or len(frames) < 2:
            return False
        if _header_kind(frames[1]) in (wire.RDMA_SYNC, wire.RDMA_RESENT):
            return False
        for item in order.socket(frames, now):
            self._handle_frames(item, now, ordered=True)
        return True

    def _on_rdma_sync(self, ident: bytes, body: Any, frames: list, now: float) -> None:
        """A sync on the data pipe (alone, or in front of a data message)."""
        if self._rdma is None or b"/" in ident:
            raise ProtocolError("rdma sync from a peer we exchange no rdma with", "unexpected")
        sync = Sync(*_rdma_tag(*body)) if type(body) is list and len(body) == 3 else None
        if sync is None:
            raise ProtocolError("malformed rdma sync", "malformed")
        order = self._rdma_order.get(ident)
        if order is None:
            order = self._rdma_order[ident] = ReceiveOrder()
        released = order.sync(sync, now)
        if len(frames) > 2:  # the data message it came in front of
            rest = [frames[0], *frames[2:]]
            if order.blocked:
                released += order.socket(rest, now)
            else:
                released.append(rest)
        for item in released:
            self._handle_frames(item, now, ordered=True)

    def _on_rdma_resent(self, ident: bytes, body: Any, frames: list, now: float) -> None:
        """A message first sent by RDMA, re-sent on the socket after the queue pair failed."""
        if self._rdma is None or b"/" in ident:
            raise ProtocolError("rdma resend from a peer we exchange no rdma with", "unexpected")
        if type(body) is not list or len(body) != 3 or len(frames) < 3:
            raise ProtocolError("malformed rdma resend", "malformed")
        self._rdma_arrived(ident, _rdma_tag(*body), [frames[0], *frames[2:]], now)

    def _rdma_expire(self, now: float) -> None:
        """Release what waited too long for a message that was lost; forget the order
        of peers that are gone (what they sent is handled as it stands)."""
        for ident, order in list(self._rdma_order.items()):
            overflowed = order.take_overflowed()
            if overflowed:
                # Counted here (each tick), not per message: it is rare and wants a log line.
                self.counters.drops["rdma_order_full"] += overflowed
                log.warning("%s: %d waits for messages from %s sent by rdma were given up: "
                            "over %d messages waited behind them (lost?); delivered anyway",
                            self.name, overflowed, self._peer_name(_peer_id_of(ident)),
                            order.max_held)
            peer = self._peers.get(_peer_id_of(ident))
            if peer is None or peer.state == "dead" or (
                    peer.state == "left" and now - peer.gone_at > LEFT_GRACE):
                del self._rdma_order[ident]
                released = order.flush()
            elif order.held:
                forced = order.forced
                released = order.expire(now, _RDMA_HOLD)
                if order.forced > forced:
                    self.counters.drops["rdma_order_timeout"] += order.forced - forced
                    log.warning("%s: messages from %s waited %.0f s for earlier ones sent by "
                                "rdma that did not come (lost?); delivering them",
                                self.name, self._peer_name(_peer_id_of(ident)), _RDMA_HOLD)
            else:
                continue
            for item in released:
                self._handle_frames(item, now, ordered=True)

    def _rdma_forget(self, link: Link) -> None:
        """Close a link's RDMA connection (I/O thread, link lock held)."""
        entry = self._rdma_links.pop(link, None)
        self._rdma_poller = None  # its fds change
        if entry is not None:
            try:
                entry[1].close()
            except Exception as exc:  # noqa: BLE001
                log.debug("closing an rdma connection: %s", exc)

    def _drain_router(self) -> None:
        recv = self._router.recv
        now = time.monotonic()
        try:
            for _ in range(2048):  # bounded: timers and commands get their turn
                try:
                    frame = recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return
                frames = [frame]
                while frame.more:  # the rest of a message is there at once
                    frame = recv(0, copy=False)
                    frames.append(frame)
                self._handle_frames(frames, now)
        finally:
            if self._io_batch:
                # One dispatch item per drain, not per message: fewer thread wake-ups.
                self._dispatch.put(self._io_batch)
                self._io_batch = []

    def _handle_frames(self, frames: list, now: float, ordered: bool = False) -> None:
        if len(frames) == 2 and frames[0].bytes == _WAKE_ID:
            return  # a wake-up: commands run after the drain
        try:
            if self._rdma_order and not ordered and self._rdma_hold(frames, now):
                return  # it waits for an array its sender sent before it by RDMA
            self._handle(frames, now)
        except ProtocolError as exc:
            self._drop(exc.reason, frames[0].bytes, str(exc))
        except InvalidSubject as exc:
            self._drop("invalid_subject", frames[0].bytes, str(exc))
        except Exception:
            self.counters.drops["internal"] += 1
            log.exception("%s: error handling a message; dropped", self.name)

    def _drop(self, reason: str, ident: bytes, detail: str) -> None:
        self.counters.drops[reason] += 1
        key = (ident.hex(), reason)
        if key not in self._logged_once and len(self._logged_once) < 1000:
            self._logged_once.add(key)
            log.warning("%s: dropped a frame from %r (%s): %s", self.name, ident[:32], reason, detail)

    def _handle(self, frames: list, now: float) -> None:
        if len(frames) < 2:
            raise ProtocolError("message without a header frame", "malformed")
        header = wire.unpack(frames[1].bytes)
        kind = header[1]
        ident = frames[0].bytes
        if kind == wire.MSG:
            self._on_msg(ident, header, frames)
            return
        if kind == wire.REPLY:
            self._on_reply(ident, header, frames)
            return
        if kind == wire.P2P:
            self._on_p2p(ident, header[2], frames)
            return
        if kind == wire.BATCH:
            self._on_batch(ident, header, frames)
            return
        body = header[2]
        if kind == wire.HELLO:
            self._on_hello(body, now)
            return
        if kind == wire.SWIM:
            peer = self._peers.get(_peer_id_of(ident))
            if peer is None:
                raise ProtocolError("membership message from an unknown node", "unknown_peer")
            if peer.state in _LIVE or peer.state == "joining":
                peer.last_seen = now
            self._swim(self._members.handle(peer.id, body, now))
            return
        if kind == wire.BYE:
            peer = self._peers.get(_peer_id_of(ident))
            if peer is None:
                raise ProtocolError("goodbye from a node that never said hello", "unknown_peer")
            if peer.state in (*_LIVE, "joining"):
                self._peer_gone(peer, "left")
            return  # a goodbye after the membership gossip said so already is no news
        if kind == wire.STATUS_REQ:
            self._router.send_multipart([ident, wire.pack(wire.STATUS, [body, self.status()])], zmq.NOBLOCK)
            return
        peer = self._known_peer(ident)
        peer.last_seen = now
        if kind == wire.PING:
            self._send_control(peer.id, wire.PONG, body)
        elif kind == wire.PONG:
            if type(body) is list and body and type(body[0]) is float:
                rtt = now - body[0]
                if 0.0 <= rtt < 3600.0:  # our own timestamp echoed; anything else is forged
                    peer.rtt = rtt
        elif kind == wire.INTEREST:
            self._on_interest(peer, body)
        elif kind == wire.INTEREST_FULL:
            if type(body) is not list or len(body) != 2 or type(body[0]) is not int:
                raise ProtocolError("malformed interest snapshot", "malformed")
            self._set_interest(peer, body[0], wire.check_interest_entries(body[1]))
        elif kind == wire.CREDIT:
            if len(frames) == 2:
                self._on_credit(peer, body)
                return
            # It rode in front of a message or batch.
            rest = [frames[0], *frames[2:]]
            if _header_kind(rest[1]) not in _CREDIT_CARRIERS:
                raise ProtocolError("credit in front of something that carries none", "malformed")
            self._on_credit(peer, body)
            self._handle(rest, now)
        elif kind == wire.SHM_OK:
            link = peer.link
            if self._beacon is not None and link is not None and link.shm_out is None:
                from transports import shm

                with link.lock:
                    link.shm_out = shm.ShmSender(self.id)
        elif kind == wire.SHM_RELEASE:
            link = peer.link
            if link is not None and link.shm_out is not None:
                from transports import shm

                link.shm_out.on_release(shm.unpack_releases(body))
        elif kind == wire.RDMA_OFFER:
            self._on_rdma_offer(peer, body)
        elif kind == wire.RDMA_ACCEPT:
            self._on_rdma_accept(peer, body)
        elif kind == wire.RDMA_SYNC:
            self._on_rdma_sync(ident, body, frames, now)
        elif kind == wire.RDMA_RESENT:
            self._on_rdma_resent(ident, body, frames, now)
        elif kind == wire.SYNC:
            self._send_control(peer.id, wire.INTEREST_FULL, self._interest_snapshot())
        elif kind == wire.PEERS:
            if type(body) is not list:
                raise ProtocolError("peer list is not a list", "malformed")
            for summary in body:
                self._introduce(parse_summary(summary), now)
        else:
            raise ProtocolError(f"unexpected {wire.KIND_NAMES[kind]} message", "unknown_kind")

    def _known_peer(self, ident: bytes) -> Peer:
        peer = self._peers.get(_peer_id_of(ident))
        if peer is None or peer.state not in ("alive", "suspect", "joining"):
            if peer is not None and peer.state == "left" and time.monotonic() - peer.gone_at < LEFT_GRACE:
                return peer
            raise ProtocolError("message from a node that has not said hello", "unknown_peer")
        return peer

    def _on_msg(self, ident: bytes, header: list, frames: list) -> None:
        fields = wire.check_msg(header)
        peer = self._known_peer(ident)
        data, array, nbytes = self._payload_of(fields[3], frames, "message", peer)
        self._accept_msg(peer, fields, data, array, nbytes, time.time())

    def _on_batch(self, ident: bytes, header: list, frames: list) -> None:
        if len(frames) != 3:
            raise ProtocolError("batch needs exactly one data frame", "malformed")
        # Resolved once per batch, not per message: the peer and the clock.
        peer = self._known_peer(ident)
        now = time.time()
        unpack, check_msg = wire.unpack, wire.check_msg
        runs = []
        count = 0
        # Every run is checked before any is delivered: a bad batch is dropped whole.
        for run_header, payloads in decode_batch(frames[2].buffer):
            fields = unpack(run_header)
            if fields[1] != wire.MSG:
                raise ProtocolError("only data messages may be batched", "malformed")
            fields = check_msg(fields)
            if fields[3]:
                raise ProtocolError("arrays are never batched", "malformed")
            if len(payloads) > 1 and (fields[4] is not None or fields[5] is not None):
                raise ProtocolError("a run of several messages cannot share headers or a "
                                    "request id", "malformed")
            count += len(payloads)
            runs.append((fields, payloads))
        if header[2] != count or type(header[2]) is not int:
            raise ProtocolError(f"batch says {header[2]!r} messages, holds {count}", "malformed")
        accept = self._accept_run
        for fields, payloads in runs:
            accept(peer, fields, payloads, now)

    def _accept_msg(
        self, peer: Peer, fields: tuple, data: Any, array: Any, nbytes: int, now: float
    ) -> None:
        """Deliver one checked data message from ``peer`` to the subscriptions it names."""
        self._accept_run(peer, fields, (data,), now, array, nbytes)

    def _accept_run(
        self, peer: Peer, fields: tuple, payloads: Any, now: float,
        array: Any = None, nbytes: int | None = None,
    ) -> None:
        """Deliver checked data messages from ``peer`` that share one header (a run of
        a batch: consecutive seqs from the header's) to the subscriptions it names.
        ``nbytes``: the payload size of a one-message run whose data is not bytes."""
        subject, seq, ts, _flags, headers, req_id, sids = fields
        count = len(payloads)
        if self._policy is not None and not self._policy.may_publish(peer.name, subject):
            for _ in range(count):
                self._denied(peer, "publish", subject)
            return
        route = self._route(subject, internal=True)
        sizes = [nbytes] if nbytes is not None else [len(data) for data in payloads]
        total = sum(sizes)
        counters = peer.counters
        counters.msgs_in += count
        counters.bytes_in += total
        self.counters.msgs_in += count
        self.counters.bytes_in += total
        if ts:
            # The run's messages share its first one's send time: the others left
            # after it (within batch_delay), so theirs reads a little high.
            latency = now - ts
            if 0.0 <= latency < 3600.0:  # also rejects nan/inf; clocks may disagree a little
                self.latency.record(latency, count)
        peer_id = peer.id
        reply_to = peer_id if req_id is not None else None
        drops = self.counters.drops
        counted_gap = False
        for sid in sids:
            sub = self._subs_by_sid.get(sid)
            if sub is None or sub.closed:
                drops["no_subscriber"] += count  # unsubscribed meanwhile
                continue
            if sub not in route.local and sub not in route.local_groups.get(sub.queue, ()):
                drops["not_subscribed"] += count  # a publisher that lies
                continue
            if not sub.queue and not counted_gap:
                # Plain subscribers see every message of a subject: gaps are losses.
                counted_gap = True
                key = (peer_id, subject)
                last = self._last_seq.get(key)
                if last is not None and seq > last + 1:
                    self.gaps += seq - last - 1
                self._last_seq[key] = seq + count - 1
            grant = sub._grants.get(peer_id)
            if grant is None:
                grant = sub._grants[peer_id] = CreditGrant(
                    sub.credits, sub.credit_bytes, threshold=_credit_threshold(sub.credits))
            with sub._flow:
                accepted = grant.on_received_run(sizes)
            if accepted < count:
                drops["credit_violation"] += count - accepted  # sent beyond its credit
            msgs = []
            for i in range(accepted):
                msg = Message(subject, payloads[i], headers, peer_id, seq + i, array=array,
                              request_id=req_id, node=self, reply_to=reply_to)
                msg._credit = (grant, peer_id, sizes[i])
                msgs.append(msg)
            if sub.closed:
                continue
            if sub.handler is None:
                put = sub._inbox.put
                for msg in msgs:
                    put(msg)
            elif sub.inline:
                for index, msg in enumerate(msgs):
                    if not sub.inline:  # it went over its budget: the rest go as usual
                        self._io_batch.extend([(sub, m) for m in msgs[index:]])
                        break
                    self._run_inline(sub, msg)
            else:
                # Handler calls are collected and passed to the dispatch thread once
                # per drain.
                self._io_batch.extend([(sub, msg) for msg in msgs])
        if not sids:
            drops["no_interest"] += count

    def _run_inline(self, sub: Subscription, msg: Message) -> None:
        """Run an inline handler here, on the I/O thread that read the message; one
        over its budget is logged once and moved to the dispatch thread."""
        if sub.closed:
            return
        started = time.perf_counter()
        self._call_handler(sub, msg)
        took = time.perf_counter() - started
        if took > self._inline_budget:
            sub.inline = False
            log.warning(
                "%s: inline handler of %r took %.1f ms on %r (inline_budget %.1f ms); it "
                "runs on the dispatch thread from now on", self.name, sub.pattern,
                took * 1e3, msg.subject, self._inline_budget * 1e3)
        if msg._credit is not None:
            self._consumed(sub, msg)

    def _consumed(self, sub: Subscription, msg: Message) -> None:
        """The application is done with ``msg``: give its credit back (any thread)."""
        credit = msg._credit
        msg._credit = None
        if type(credit) is int:  # from this node's own publisher: no network
            with sub._flow:
                released = sub._window.on_credit(1, credit)
                sub._flow.notify_all()
            for held in released:
                self._deliver(sub, held)
            return
        grant, publisher, nbytes = credit
        self._return_credit(sub, grant, publisher, 1, nbytes)

    def _return_credit(self, sub: Subscription, grant: CreditGrant, publisher: str,
                       count: int, nbytes: int) -> None:
        """``count`` messages from ``publisher`` were consumed: send their credit back
        now if the grant's threshold is reached, else have the I/O thread flush it later."""
        now = time.monotonic()
        with sub._flow:
            grant.on_consumed(nbytes, now, count)
            update = grant.take_update(now)
            wake = False
            if update is None:
                wake = not self._dirty_grants
                self._dirty_grants[(sub, publisher)] = grant
        if update is not None:
            entries = [[sub.sid, update[0], update[1]]]
            if not self._send_credit_direct(publisher, entries):
                self._command(("credit", publisher, entries))
        elif wake and threading.get_ident() != self._io_ident:
            self._command(("flush_credit",))  # the I/O thread schedules the delayed flush

    def _send_credit_direct(self, publisher: str, entries: list) -> bool:
        """Send credit on the link's data socket from this (dispatch) thread: no wake-up
        of the I/O thread, no hop. False when the link is busy, its queue is full, or
        arrays go by RDMA (data-pipe messages then keep an order with them): the I/O
        thread sends it on the control socket instead."""
        link = self._links.get(publisher)
        if link is None or not link.lock.acquire(False):
            return False
        try:
            if link.closed or link.rdma_order is not None:
                return False
            owed = self._owed_credit(publisher) if self._dirty_grants else None
            if owed is not None:  # other subscriptions' credit for it goes along
                entries = entries + owed
            try:
                link.sock.send(wire.pack(wire.CREDIT, entries), zmq.NOBLOCK)
            except zmq.ZMQError:
                self._owed_credit_failed(publisher, owed)
                return False
            self.credit_updates["data"] += 1
            return True
        finally:
            link.lock.release()

    def _owed_credit(self, peer_id: str) -> list | None:
        """Credit this node owes ``peer_id`` and holds back (below the threshold, its
        timer not yet due), taken now to ride on a frame going there anyway: no
        message of its own. Called by whoever sends to the peer, link lock held."""
        entries = None
        now = time.monotonic()
        for (sub, publisher), grant in list(self._dirty_grants.items()):
            if publisher != peer_id:
                continue
            with sub._flow:
                update = grant.take_update(now, force=True)
            if update is not None:
                if entries is None:
                    entries = []
                entries.append([sub.sid, update[0], update[1]])
        return entries

    def _owed_credit_failed(self, peer_id: str, entries: list | None) -> None:
        """The frame that carried credit was not sent: it must still arrive (the
        publisher would wait for it forever), so the I/O thread sends it alone."""
        if entries is not None:
            self._command(("credit", peer_id, entries))

    def _flush_batches(self, now: float) -> float | None:
        """Send batches that waited batch_delay (I/O thread); the next deadline."""
        next_deadline = None
        for link, due in list(self._batching.items()):
            if due > now:
                next_deadline = due if next_deadline is None else min(next_deadline, due)
                continue
            if not link.lock.acquire(False):
                # A publisher holds the link (it may hold it for long: copying an array
                # into shared memory, or waiting for room on a link that sends arrays
                # by RDMA): never wait for it here, the node's heartbeats go on; later.
                due = now + _QUEUE_FULL_RETRY
                self._batching[link] = due
                next_deadline = due if next_deadline is None else min(next_deadline, due)
                continue
            try:
                if link.batch and now - link.batch_since >= self._batch_delay:
                    self._flush_batch(link, keep=True)
                if link.batch:  # a new batch began since (or it waits for room): later
                    due = link.batch_since + self._batch_delay
                    self._batching[link] = due
                    next_deadline = due if next_deadline is None else min(next_deadline, due)
                else:
                    del self._batching[link]
            finally:
                link.lock.release()
        return next_deadline

    def _flush_credits(self, now: float) -> float | None:
        """Send credit returns that are due (I/O thread); the next deadline, if any."""
        due: dict[str, list] = {}
        next_deadline = None
        for key, grant in list(self._dirty_grants.items()):
            sub, publisher = key
            with sub._flow:
                update = grant.take_update(now)
                deadline = grant.next_deadline()
            if update is not None:
                due.setdefault(publisher, []).append([sub.sid, update[0], update[1]])
            if deadline is None or sub.closed:
                self._dirty_grants.pop(key, None)
            elif next_deadline is None or deadline < next_deadline:
                next_deadline = deadline
        for publisher, entries in due.items():
            self._send_control(publisher, wire.CREDIT, entries)
            self.credit_updates["control"] += 1
        return next_deadline

    def _on_credit(self, peer: Peer, body: Any) -> None:
        """A subscriber consumed messages: release held ones, wake blocked publishers."""
        entries = wire.check_credit(body)
        link = peer.link
        if link is None:
            return
        link.credit_in.append(entries)
        self._take_credit(link)

    def _take_credit(self, link: Link) -> None:
        """Apply a link's pending credit if its lock is free (I/O thread). If a
        publishing thread holds it, this thread does not wait (see _flush_batches):
        the publisher applies it when it next publishes or waits for credit, and
        this thread looks again shortly."""
        if not link.lock.acquire(False):
            self._credit_later.add(link)
            return
        try:
            self._credit_later.discard(link)
            if link.credit_in:
                self._apply_credit(link)
        finally:
            link.lock.release()

    def _apply_credit(self, link: Link) -> None:
        """Apply pending credit updates (link lock held): send what the windows held
        back, wake publishers blocked on credit."""
        credit_in = link.credit_in
        if link.closed:
            credit_in.clear()
            return
        while credit_in:  # the I/O thread appends meanwhile: popleft, never swap
            for sid, msgs, nbytes in credit_in.popleft():
                window = link.windows.get(sid)
                if window is None:
                    continue
                for item in window.on_credit(msgs, nbytes):
                    self._send_locked(link, link.peer_id, item, [sid], None)
        link.cond.notify_all()

    def _on_reply(self, ident: bytes, header: list, frames: list) -> None:
        req_id, flags, headers = wire.check_reply(header)
        peer = self._known_peer(ident)
        data, array, _nbytes = self._payload_of(flags, frames, "reply", peer)
        pending = self._pending.get(req_id)
        if pending is None or pending.reply is not None:
            self.counters.drops["late_reply"] += 1
            return
        pending.reply = Message("", data, headers, peer.id, 0, array=array, request_id=req_id)
        pending.event.set()

    def _payload_of(self, flags: int, frames: list, what: str, peer: Peer) -> tuple[Any, Any, int]:
        """(data, array or None, nbytes) of a message's payload frames."""
        if flags & wire.TENSOR:
            if len(frames) != 4:
                raise ProtocolError(f"tensor {what} needs descriptor and data frames", "malformed")
            if flags & wire.SHM:
                if peer.shm_in is None:
                    raise ProtocolError("shared memory from a peer that was never offered it", "shm_unexpected")
                from transports.shm import ShmDescriptor

                # A view on the peer's segment; its slot is released when the
                # application drops the last view of it.
                view = peer.shm_in.open(ShmDescriptor.unpack(frames[3].bytes))
                return view.data, array_from_frames(frames[2].buffer, view.data), view.descriptor.nbytes
            data = frames[3].buffer
            return data, array_from_frames(frames[2].buffer, data), len(frames[3])
        if len(frames) != 3:
            raise ProtocolError(f"{what} needs exactly one payload frame", "malformed")
        frame = frames[2]
        data = frame.buffer if len(frame) >= ZERO_COPY_BYTES else frame.bytes
        return data, None, len(frame)

    def _on_p2p(self, ident: bytes, body: Any, frames: list) -> None:
        channel_name, tag, flags, meta = wire.check_p2p(body)
        peer = self._known_peer(ident)
        data, array, nbytes = self._payload_of(flags, frames, "p2p message", peer)
        peer.counters.msgs_in += 1
        peer.counters.bytes_in += nbytes
        self.counters.msgs_in += 1
        self.counters.bytes_in += nbytes
        msg = ChannelMessage(peer.id, tag, meta, data, array)
        with self._lock:  # against _open_channel moving the early buffer meanwhile
            channel = self._channels.get(channel_name)
            if channel is None:
                # The peer got there first: keep it until this node opens the channel.
                if sum(len(q) for q in self._early.values()) >= EARLY_MAX_MESSAGES:
                    self.counters.drops["early_overflow"] += 1
                    return
                self._early.setdefault(channel_name, collections.deque()).append(
                    (time.monotonic(), msg)
                )
                return
        channel._put(msg)

    # -- channels (point-to-point, for collectives) -------------------------------

    def _open_channel(self, name: str) -> Channel:
        self._check_started()
        with self._lock:
            if name in self._channels:
                raise MeshError(f"channel {name!r} is already open on {self.name}")
            channel = Channel(self, name)
            self._channels[name] = channel
            early = self._early.pop(name, None)
        if early:
            for _, msg in early:
                channel._put(msg)
        for peer in list(self._peers.values()):
            if peer.state in ("dead", "left"):
                channel._peer_lost(peer.id, f"peer {peer.name} is {peer.state}")
        return channel

    def _close_channel(self, channel: Channel) -> None:
        with self._lock:
            if self._channels.get(channel.name) is channel:
                del self._channels[channel.name]

    def _peer_name(self, peer_id: str) -> str:
        peer = self._peers.get(peer_id)
        return peer.name if peer else peer_id

    def _channel_send(
        self, channel: str, peer_id: str, tag: Any, data: Any, meta: Any, timeout: float | None
    ) -> Any:
        self._check_open()
        payload, _array, flags, nbytes = self._encode_payload(data)
        link = self._links.get(peer_id)
        peer = self._peers.get(peer_id)
        if link is None or peer is None or peer.state not in _LIVE:
            state = peer.state if peer else "unknown"
            raise PeerLostError(
                f"peer {self._peer_name(peer_id)} is {state}; it left the mesh or never joined",
                peer=peer_id,
            )
        with link.lock:
            if link.closed:
                raise PeerLostError(f"peer {peer.name} is gone", peer=peer_id)
            shm_desc = None
            if flags and link.shm_out is not None and nbytes >= self._shm_threshold:
                payload, shm_desc = self._to_shm(link, payload)
                if shm_desc is not None:
                    flags |= wire.SHM
            header = wire.pack(wire.P2P, [channel, tag, flags, meta])
            tracker = None
            if flags and shm_desc is None and link.rdma is not None and nbytes >= self._rdma_threshold:
                tracker = _RdmaTracker()
                if not self._to_rdma(link, peer_id, [header, *payload], tracker):
                    tracker = None
            frames, sync = [header, *payload], None
            if tracker is None and link.rdma_order is not None:  # keep the order with RDMA
                frames, sync = self._rdma_sync(link, frames)
            if tracker is None:
                try:
                    tracker = self._channel_put(link, peer, channel, frames, nbytes, timeout)
                except BaseException:
                    if shm_desc is not None:  # never announced to the peer: free the slot
                        link.shm_out.abort(shm_desc)
                    raise
            if sync is not None:
                link.rdma_order.synced(sync)
        self._count_out(link, nbytes)
        return _DoneTracker() if shm_desc is not None or tracker is None else tracker

    def _channel_put(
        self, link: Link, peer: Peer, channel: str, frames: list, nbytes: int,
        timeout: float | None,
    ) -> Any:
        """Put a channel message on the link's socket (link lock held); its tracker.
        A full peer queue is waited out, ``timeout`` or else ``peer_timeout`` long."""
        copy = nbytes < P2P_COPY_BYTES
        sent: list = []

        def send(sock: Any, frames: list) -> None:
            sent.append(sock.send_multipart(frames, zmq.NOBLOCK, copy=copy, track=not copy))

        try:
            send(link.sock, frames)
            return sent[0]
        except zmq.Again:
            pass
        if timeout is None:  # bounded even without a timeout
            timeout = self.options["peer_timeout"]
        room = self._wait_for_room(link, frames, timeout, send)
        if room == "closed":
            raise PeerLostError(f"peer {peer.name} is gone", peer=peer.id)
        if room is not True:
            raise TimeoutError(
                f"peer {peer.name} did not accept data on channel {channel!r} within {timeout} s"
            )
        return sent[0]

    # -- handshake and gossip ---------------------------------------------------

    def _hello_body(self, ack: bool, via: str | None = None) -> dict:
        version, entries = self._interest_snapshot()
        body = {
            **self._self_summary(),
            "iv": version,
            "int": entries,
            "peers": [p.summary() for p in self._peers.values() if p.state == "alive"],
            "ack": ack,
        }
        if self._keys is not None:
            body["sec"] = self._keys.fingerprint
        if via is not None:
            body["via"] = via
        if self._beacon is not None:
            body["shm"] = [self._beacon.name, self._beacon.token]
        if self._rdma is not None:
            body["rdma"] = self._rdma.brochure()
        return body

    def _interest_snapshot(self) -> list:
        with self._lock:
            return [self._routing.local_version, [list(k) for k in self._routing.local_interest()]]

    def _on_hello(self, body: Any, now: float) -> None:
        info = parse_summary(body)
        if info["cluster"] != self.cluster:
            self.counters.drops["wrong_cluster"] += 1
            return
        if info["id"] == self.id:
            return  # we are our own seed
        if body.get("sec", "") != (self._keys.fingerprint if self._keys is not None else ""):
            # Over tcp/ipc CURVE already refused such a node; inproc has no handshake,
            # so nodes of one process with different credentials must not mix either.
            self._command(("foreign", info["id"], info["name"], "sec" in body))
            return
        iv, entries = body.get("iv"), body.get("int")
        if type(iv) is not int:
            raise ProtocolError("hello without interest version", "malformed")
        entries = wire.check_interest_entries(entries)
        peer = self._peers.get(info["id"])
        # A suspect peer is a live one (SWIM may still refute): its hello must not
        # rebuild the link, which would drop what is queued on it.
        is_new = peer is None or peer.state not in (*_LIVE, "joining")
        if not is_new and peer is not None and peer.locality != Locality(info["host"], info["proc"]):
            # Discovery guessed the locality; the peer's own hello may allow a better link.
            is_new = True
        if is_new:
            self._tombstones.pop(info["id"], None)
            peer = self._add_peer(info, now)
            if peer is None:
                return
        assert peer is not None
        peer.last_seen = now
        via = body.get("via")
        if type(via) is str and via in self._seed_socks and body.get("ack"):
            self._seed_peer[via] = peer.id
        was_joining = peer.state == "joining"
        was_suspect = peer.state == "suspect"
        # Interest first: whoever sees the peer alive must also see what it wants.
        self._set_interest(peer, iv, entries)
        peer.state = "alive"
        if was_suspect and not is_new:
            self._peer_event("alive", peer)  # it spoke: as good as a refutation
        if was_joining or is_new:
            peer.joined_at = now
            self._rejoin.pop(peer.id, None)
            self._close_probe(peer.id)
            for other in list(self._peers.values()):
                # Names are unique in a cluster: a new id under a known name is that
                # node restarted, and its old self is gone.
                if other.name == peer.name and other.id != peer.id and other.state in (*_LIVE, "joining"):
                    self._peer_gone(other, "left")
            self._peer_event("joined", peer)
            log.info("%s: peer %s joined over %s", self.name, peer.name, peer.link.transport if peer.link else "?")
        gossip = body.get("peers")
        if type(gossip) is list:
            for summary in gossip:
                try:
                    self._introduce(parse_summary(summary), now)
                except ProtocolError:
                    self.counters.drops["malformed"] += 1
        if not body.get("ack"):
            self._send_control(peer.id, wire.HELLO, self._hello_body(True, via if type(via) is str else None))
        elif was_joining or is_new:
            # Our interest may have changed since the hello this peer saw (e.g. one
            # sent through a seed before we knew its id): send it whole once more.
            self._send_control(peer.id, wire.INTEREST_FULL, self._interest_snapshot())
        self._agree_shm(peer, body.get("shm"))  # after our answer: the peer knows us then
        self._agree_rdma(peer, body)
        if was_joining or is_new:
            # Tell everyone else about the newcomer so the mesh becomes full.
            summary = [peer.summary()]
            for other in list(self._peers.values()):
                if other.id != peer.id and other.state == "alive":
                    self._send_control(other.id, wire.PEERS, summary)
            with self._changed:
                self._changed.notify_all()
            # After our hello answer, on the same pipe: the peer knows us by then.
            self._swim(self._members.add_member(peer.id, peer.summary(), now=now))

    def _agree_shm(self, peer: Peer, offer: Any) -> None:
        """If we can map the peer's shared memory, say so: it then sends us large
        arrays through it. Only between processes of one host (inproc needs none)."""
        if (
            self._beacon is None
            or peer.shm_in is not None
            or peer.link is None
            or peer.link.transport == "inproc"
            or type(offer) is not list
            or len(offer) != 2
        ):
            return
        from transports import shm

        if not shm.can_use_shm(self._locality, peer.locality) or not shm.check_beacon(
            peer.id, offer[0], offer[1]
        ):
            return
        peer.shm_in = shm.ShmReceiver(peer.id, notify=self._shm_wake)
        self._send_control(peer.id, wire.SHM_OK, None)

    def _agree_rdma(self, peer: Peer, hello: dict) -> None:
        """Both have RDMA: the lower node id offers a queue pair (after our hello
        answer, so the peer knows us). Shared memory and inproc are better."""
        link = peer.link
        if (
            link is None
            or choose_bulk(
                link.transport,
                shm_both=self._beacon is not None and bool(hello.get("shm"))
                and self._locality.host == peer.locality.host,
                rdma_both=self._rdma is not None and type(hello.get("rdma")) is dict,
                rdma_failed=link.rdma_off,
            ) != "rdma"
            or self.id > peer.id
            or link.rdma is not None
            or peer.id in self._rdma_offers
        ):
            return
        self._rdma_offers[peer.id] = None  # being made on the setup thread; offered when ready
        self._rdma_submit("offer", peer, None, None)

    def _on_rdma_offer(self, peer: Peer, body: Any) -> None:
        link = peer.link
        if link is None:
            return
        if body is None and self._rdma is not None:
            # The offerer could not connect its half (its log says why): drop ours.
            with link.lock:
                if link.rdma is not None:
                    self._rdma_fallback(link, peer.id, RdmaError(
                        "the peer could not connect its queue pair", link.rdma.unsent()), quiet=True)
                    self._rdma_forget(link)
            link.rdma_off = True
            log.info("%s: %s could not connect rdma; arrays stay on %s",
                     self.name, peer.name, link.transport)
            return
        if self._rdma is None or link.rdma_off or type(body) is not dict:
            self._send_control(peer.id, wire.RDMA_ACCEPT, None)
            return
        with link.lock:
            if link.rdma is not None:  # the peer started over: so do we
                self._rdma_fallback(
                    link, peer.id, RdmaError("the peer offered a new queue pair", link.rdma.unsent()))
                link.rdma_off = False
                self._rdma_forget(link)
        self._rdma_submit("accept", peer, None, body)

    def _on_rdma_accept(self, peer: Peer, body: Any) -> None:
        conn = self._rdma_offers.get(peer.id)
        if conn is None:  # nothing offered, or a step still running on the setup thread
            return
        del self._rdma_offers[peer.id]
        link = peer.link
        if link is None or link.closed or type(body) is not dict:
            conn.close()
            if link is not None:
                link.rdma_off = True
            return
        self._rdma_offers[peer.id] = None  # connecting on the setup thread: no new offer
        self._rdma_submit("connect", peer, conn, body)

    def _rdma_submit(self, what: str, peer: Peer, conn: Any, body: dict | None) -> None:
        """Queue-pair setup (creating the queue pair, registering its ring, moving it
        to RTS: up to seconds, far more under emulation) runs on a setup thread, never
        on the I/O thread: membership probes must not wait for it (a live peer was
        once suspected while one was made). pyverbs holds the GIL in its calls, so
        connect() first has the kernel resolve the peer's address without it (see
        transports.rdma.resolve_neighbour). "offer" makes a queue pair, "accept"
        makes one and connects it to ``body``, "connect" connects ``conn``. The result
        comes back as an ("rdma", ...) command; until then arrays go on the socket."""
        if self._rdma_jobs is None:
            self._rdma_jobs = queue.SimpleQueue()
            threading.Thread(target=self._rdma_setup_loop, name=f"mesh-rdma-{self.name}",
                             daemon=True).start()
        self._rdma_jobs.put((what, peer.id, peer.link, conn, body))

    def _rdma_setup_loop(self) -> None:
        jobs = self._rdma_jobs
        while True:
            job = jobs.get()
            if job is _STOP:
                return
            what, peer_id, link, conn, body = job
            error = None
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = self._rdma.connection()
                if body is not None:
                    conn.connect(body)
            except Exception as exc:  # noqa: BLE001 - reported by _rdma_setup_done
                error = exc
            with self._rdma_setup_lock:
                if self._rdma_setup_open:
                    self._command(("rdma", what, peer_id, link, conn, error, time.monotonic() - t0))
                    continue
            if conn is not None:  # the node closed meanwhile
                conn.close()

    def _rdma_setup_done(self, what: str, peer_id: str, link: Link | None, conn: Any,
                         error: Exception | None, seconds: float) -> None:
        """A setup step finished on the setup thread (I/O thread, from _run_command)."""
        peer = self._peers.get(peer_id)
        # The offerer's steps hold a None in _rdma_offers meanwhile (no second offer).
        pending = what != "accept" and self._rdma_offers.get(peer_id, False) is None
        if pending:
            del self._rdma_offers[peer_id]
        if (peer is None or link is None or peer.link is not link or link.closed or link.rdma_off
                or (what != "accept" and not pending)):
            if conn is not None:  # the peer is gone, or one side gave up meanwhile
                conn.close()
            return
        if error is not None:
            log.warning("%s: cannot set up rdma with %s (%s); arrays stay on %s",
                        self.name, peer.name, error, link.transport)
            if conn is not None:
                conn.close()
            link.rdma_off = True
            if what == "accept":
                self._send_control(peer_id, wire.RDMA_ACCEPT, None)
            elif what == "connect":
                self._send_control(peer_id, wire.RDMA_OFFER, None)  # the peer drops its half
            return
        conn.stats["setup_s"] = round(conn.stats.get("setup_s", 0) + seconds, 3)
        if what == "offer":
            self._rdma_offers[peer_id] = conn
            self._send_control(peer_id, wire.RDMA_OFFER, conn.local_info())
            return
        if what == "accept":  # connected: the offerer may write as soon as it connects
            self._send_control(peer_id, wire.RDMA_ACCEPT, conn.local_info())
        self._rdma_use(link, peer, conn)

    def _rdma_use(self, link: Link, peer: Peer, conn: Any) -> None:
        with link.lock:
            old = link.rdma
            if old is not None and old is not conn:  # a newer offer won
                self._rdma_fallback(link, peer.id, RdmaError("replaced by a new queue pair",
                                                             old.unsent()), quiet=True)
                self._rdma_forget(link)
                link.rdma_off = False
            link.rdma = conn
        self._rdma_links[link] = (peer.id, conn)
        self._rdma_poller = None
        log.info("%s: arrays to %s go over rdma (%s, set up in %.2f s)", self.name, peer.name,
                 conn.device.device, conn.stats.get("setup_s", 0.0))

    def _rdma_shutdown(self) -> None:
        """Closing (I/O thread, before the goodbyes): arrays still on their way by RDMA
        are re-sent on the socket (the peer drops the copies that landed anyway), a
        sync keeps the goodbye behind them, and every queue pair is closed."""
        with self._rdma_setup_lock:
            self._rdma_setup_open = False  # the setup thread closes what it finishes
        if self._rdma_jobs is not None:
            self._rdma_jobs.put(_STOP)
        for cmd in list(self._commands):  # finished setups the I/O thread never took
            if cmd[0] == "rdma" and cmd[4] is not None:
                cmd[4].close()
        for link, (peer_id, conn) in list(self._rdma_links.items()):
            with link.lock:
                if link.rdma is conn and not link.closed and conn.unsent():
                    self._rdma_fallback(link, peer_id, RdmaError("closing", conn.unsent()),
                                        quiet=True)
                link.rdma = None
                if link.rdma_order is not None and not link.closed:
                    sync = link.rdma_order.socket()  # the goodbye waits for the arrays
                    if sync is not None:
                        self._rdma_send_sync(link, sync)
                self._rdma_forget(link)
        for conn in self._rdma_offers.values():
            if conn is not None:
                conn.close()
        self._rdma_offers.clear()

    def _shm_wake(self) -> None:
        # Called from whatever thread dropped a view's last reference (even inside
        # the garbage collector): never block here.
        self._shm_dirty = True
        if self._waker_lock.acquire(blocking=False):
            try:
                self._waker.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            finally:
                self._waker_lock.release()

    def _send_shm_releases(self) -> None:
        self._shm_dirty = False
        from transports import shm

        for peer in list(self._peers.values()):
            if peer.shm_in is not None:
                pairs = peer.shm_in.take_releases()
                if pairs:
                    self._send_control(peer.id, wire.SHM_RELEASE, shm.pack_releases(pairs))

    def _add_peer(self, info: dict, now: float) -> Peer | None:
        locality = Locality(info["host"], info["proc"])
        chosen = transport_plugins.choose(self._transports, self._locality, info["eps"], locality)
        if chosen is None:
            self.counters.drops["no_common_transport"] += 1
            log.warning(
                "%s: cannot reach peer %s: no shared transport (ours %s, theirs %s)",
                self.name, info["name"], [t.name for t in self._transports], list(info["eps"]),
            )
            return None
        old = self._peers.get(info["id"])
        if old is not None and old.link is not None:
            self._close_link(old)
        transport, endpoint = chosen
        sock = self._dial(endpoint, self.id.encode(), self.options["sndhwm"])
        try:
            ctl = self._dial(endpoint, self.id.encode() + _CTL_SUFFIX, 10_000)
        except ProtocolError:
            sock.close(linger=0)
            raise
        peer = Peer(
            id=info["id"],
            name=info["name"],
            cluster=info["cluster"],
            endpoints={k: list(v) for k, v in info["eps"].items()},
            locality=locality,
            last_seen=now,
        )
        peer.link = Link(sock, ctl, transport, endpoint, peer.counters, peer.id)
        self._peers[peer.id] = peer
        self._links[peer.id] = peer.link
        return peer

    def _dial(self, endpoint: str, identity: bytes, hwm: int) -> Any:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        if self._keys is not None:
            self._keys.apply_client(sock)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ProtocolError(
                f"peer advertised an unusable endpoint {endpoint!r}: {exc}", "bad_endpoint"
            ) from None
        return sock

    def _introduce(self, info: dict, now: float) -> None:
        """A peer we heard of through gossip or discovery: connect and say hello."""
        if info["id"] == self.id or info["cluster"] != self.cluster:
            return
        peer = self._peers.get(info["id"])
        if peer is not None and peer.state in ("alive", "joining"):
            return
        if info["id"] in self._tombstones:
            return  # recently dead: only a hello from the node itself revives it
        peer = self._add_peer(info, now)
        if peer is not None:
            self._send_control(peer.id, wire.HELLO, self._hello_body(False))

    def _permitted(self, peer: Peer, entries: list) -> list:
        """The interest entries the policy lets ``peer`` have: we never send it the rest."""
        policy = self._policy
        if policy is None:
            return entries
        kept = []
        for entry in entries:
            if policy.may_subscribe(peer.name, entry[0]):
                kept.append(entry)
            else:
                self._denied(peer, "subscribe", entry[0])
        return kept

    def _denied(self, peer: Peer, action: str, subject: str) -> None:
        self.denials[(peer.name, action)] += 1
        self.counters.drops["permission_denied"] += 1
        key = (f"{peer.id}/{action}", subject)
        if key not in self._logged_once and len(self._logged_once) < 1000:
            self._logged_once.add(key)
            log.warning("%s: denied %s %s to %s (roles %s) by the policy; dropped",
                        self.name, action, subject, peer.name,
                        sorted(self._policy.roles_of(peer.name)) if self._policy else [])

    def _set_interest(self, peer: Peer, version: int, entries: list) -> None:
        entries = self._permitted(peer, entries)
        with self._lock:
            bad = self._routing.set_peer_interest(peer.id, version, entries)
        if bad:
            self.counters.drops["invalid_interest"] += len(bad)
        self._prune_windows(peer)
        with self._changed:
            self._changed.notify_all()

    def _on_interest(self, peer: Peer, body: Any) -> None:
        if type(body) is not list or len(body) != 3 or type(body[0]) is not int:
            raise ProtocolError("malformed interest update", "malformed")
        version = body[0]
        adds = self._permitted(peer, wire.check_interest_entries(body[1]))
        removes = wire.check_interest_entries(body[2])
        with self._lock:
            if version <= self._routing.peer_version(peer.id):
                return  # already covered by a snapshot
            bad = self._routing.apply_peer_delta(peer.id, version, adds, removes)
        if bad is None:
            self._send_control(peer.id, wire.SYNC, None)  # we missed one: resync
        elif bad:
            self.counters.drops["invalid_interest"] += len(bad)
        self._prune_windows(peer)
        with self._changed:
            self._changed.notify_all()

    def _prune_windows(self, peer: Peer) -> None:
        """Close credit windows of subscriptions the peer no longer has."""
        link = peer.link
        if link is None or not link.windows:
            return
        with link.cond:
            for sid in [sid for sid in link.windows if self._routing.params(peer.id, sid) is None]:
                link.windows.pop(sid).close("unsubscribed")
            link.cond.notify_all()

    def _send_control(self, peer_id: str, kind: int, body: Any) -> None:
        """Send a control message (I/O thread only: the ctl socket is never shared)."""
        link = self._links.get(peer_id)
        if link is None or link.closed:
            return
        try:
            link.ctl.send(wire.pack(kind, body), zmq.NOBLOCK)
        except zmq.ZMQError:
            self.counters.drops["control_queue_full"] += 1

    # -- membership (SWIM, mesh/membership.py) -------------------------------------

    def _self_summary(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "cluster": self.cluster,
            "eps": self._advertised,
            "host": self._locality.host,
            "proc": self._locality.process,
        }

    def _swim(self, actions: list) -> None:
        for action in actions:
            if type(action) is MemberSend:
                self._send_control(action.to, wire.SWIM, action.message)
            elif type(action) is MemberEvent:
                self._on_member_event(action.kind, action.member)

    def _on_member_event(self, kind: str, member: Any) -> None:
        peer = self._peers.get(member.id)
        if kind in ("dead", "left"):
            if peer is not None and peer.state in (*_LIVE, "joining"):
                self._peer_gone(peer, kind)
        elif kind == "suspect":
            if peer is not None and peer.state == "alive":
                peer.state = "suspect"
                self._peer_event("suspect", peer)
        elif kind in ("joined", "alive", "updated"):
            if peer is not None and peer.state == "suspect":
                peer.state = "alive"
                self._peer_event("alive", peer)
            elif peer is None or peer.state in ("dead", "left"):
                # Gossip says it lives (or it refuted its death): connect again. SWIM's
                # incarnation numbers already ruled out stale news, so no tombstone check.
                try:
                    info = parse_summary(member.meta)
                except ProtocolError:
                    self.counters.drops["malformed_member"] += 1
                    return
                self._tombstones.pop(info["id"], None)
                self._introduce(info, time.monotonic())

    def on_peer(self, callback: Any) -> None:
        """Call ``callback(event, peer_info)`` on the dispatch thread for every membership
        change: event is "joined", "suspect", "alive" (refuted), "dead" or "left".
        The same events are delivered on the local subjects ``_mesh.peers.<event>``."""
        if not callable(callback):
            raise ConfigError("on_peer() takes a callable(event, peer_info)")
        self._peer_callbacks.append(callback)

    def _peer_event(self, event: str, peer: Peer) -> None:
        self.membership_events[event] += 1
        info = peer.info()
        for callback in self._peer_callbacks:
            self._dispatch.put((_CallbackSub(callback, event), info))
        subject = f"_mesh.peers.{event}"
        route = self._route(subject, internal=True)
        if route.local:
            data = msgpack.packb(info._asdict())
            for sub in route.local:
                self._io_deliver(sub, Message(subject, data, None, self.id, 0, node=self))

    def _run_command(self, cmd: tuple) -> None:
        if cmd[0] == "credit":
            self._send_control(cmd[1], wire.CREDIT, cmd[2])
            self.credit_updates["control"] += 1
        elif cmd[0] == "flush_credit":
            pass  # woke us: the loop computes the credit deadline
        elif cmd[0] == "batch":
            link = cmd[1]
            self._batching.setdefault(link, link.batch_since + self._batch_delay)
        elif cmd[0] == "interest":
            _, version, adds, removes = cmd
            body = [version, [list(k) for k in adds], [list(k) for k in removes]]
            for peer in list(self._peers.values()):
                # Joining peers too: they have our older snapshot from the hello.
                if peer.state in ("alive", "joining"):
                    self._send_control(peer.id, wire.INTEREST, body)
        elif cmd[0] == "foreign":
            _, node_id, name, secured = cmd
            self.counters.drops["foreign_credential"] += 1
            if ("foreign", node_id) not in self._logged_once and len(self._logged_once) < 1000:
                self._logged_once.add(("foreign", node_id))
                if self._keys is None:
                    log.warning("%s: not joining %s (%s): it is secured; give this node the "
                                "cluster's secret=", self.name, name, node_id)
                else:
                    log.warning("%s: not joining %s (%s): it %s", self.name, name, node_id,
                                "holds another cluster secret" if secured else "is not secured")
        elif cmd[0] == "rdma":
            self._rdma_setup_done(*cmd[1:])
        elif cmd[0] == "found":
            try:
                self._introduce(parse_summary(cmd[1]), time.monotonic())
            except ProtocolError:
                self.counters.drops["malformed_announcement"] += 1

    # -- seeds, heartbeats, death -------------------------------------------------

    def _open_seed(self, endpoint: str) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        # Another identity than our link's: a ROUTER refuses two pipes with one identity.
        sock.setsockopt(zmq.IDENTITY, f"{self.id}/seed/{len(self._seed_socks)}".encode())
        sock.setsockopt(zmq.LINGER, 0)
        if self._keys is not None:
            self._keys.apply_client(sock)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing towards a seed that is down
        sock.setsockopt(zmq.SNDHWM, 4)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            log.warning("%s: seed %s unusable: %s", self.name, endpoint, exc)
            return
        self._seed_socks[endpoint] = sock

    def _tick(self, now: float) -> None:
        # Liveness of members is SWIM's (mesh/membership.py); pings here measure rtt.
        # A peer that never completes its hello is given up after peer_timeout.
        timeout = self.options["peer_timeout"]
        for peer in list(self._peers.values()):
            if peer.state in _LIVE:
                self._send_control(peer.id, wire.PING, [now])
            elif peer.state == "joining":
                if now - peer.last_seen > timeout:
                    self._peer_gone(peer, "dead")
                else:
                    self._send_control(peer.id, wire.HELLO, self._hello_body(False))
        self._hello_dead_peers(now)
        with self._lock:
            for name, early in list(self._early.items()):
                while early and early[0][0] < now - EARLY_MAX_AGE:
                    early.popleft()
                    self.counters.drops["early_expired"] += 1
                if not early:
                    del self._early[name]
        horizon = now - self.options["tombstone"]
        for peer_id, when in list(self._tombstones.items()):
            if when < horizon:
                del self._tombstones[peer_id]
                peer = self._peers.get(peer_id)
                if peer is not None and peer.state in ("dead", "left"):
                    del self._peers[peer_id]

    def _hello_dead_peers(self, now: float) -> None:
        """After a partition both sides think the other dead and nobody would speak
        first: say hello to dead peers until the tombstone expires."""
        for peer_id, when in list(self._rejoin.items()):
            peer = self._peers.get(peer_id)
            if peer is None or peer.state != "dead" or peer_id not in self._tombstones:
                del self._rejoin[peer_id]
                self._close_probe(peer_id)
                continue
            if now < when:
                continue
            self._rejoin[peer_id] = now + self.options["rejoin_interval"]
            probe = self._rejoin_socks.get(peer_id)
            if probe is None and peer.link is not None:
                try:
                    probe = self._dial(peer.link.endpoint, self.id.encode() + b"/rejoin", 4)
                except ProtocolError:
                    continue
                probe.setsockopt(zmq.IMMEDIATE, 1)
                self._rejoin_socks[peer_id] = probe
            if probe is not None:
                try:
                    probe.send(wire.pack(wire.HELLO, self._hello_body(False)), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # still unreachable

    def _close_probe(self, peer_id: str) -> None:
        probe = self._rejoin_socks.pop(peer_id, None)
        if probe is not None:
            probe.close(linger=0)

    def _hello_seeds(self) -> None:
        for endpoint, sock in self._seed_socks.items():
            joined = self._peers.get(self._seed_peer.get(endpoint, ""))
            if joined is not None and joined.state in _LIVE:
                continue  # a suspect seed is SWIM's business, not a new join
            try:
                sock.send(wire.pack(wire.HELLO, self._hello_body(False, via=endpoint)), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # not connected yet; retried soon

    def _peer_gone(self, peer: Peer, state: str) -> None:
        was = peer.state
        peer.state = state
        peer.gone_at = time.monotonic()
        if peer.shm_in is not None:
            peer.shm_in.close()  # views the application still holds stay valid
            peer.shm_in = None
        self._tombstones[peer.id] = time.monotonic()
        self._close_link(peer)
        with self._lock:
            self._routing.remove_peer(peer.id)
        for key in [k for k in self._last_seq if k[0] == peer.id]:
            del self._last_seq[key]
        why = (
            f"peer {peer.name} ({peer.link.endpoint if peer.link else '?'}) "
            + ("left the mesh" if state == "left" else "stopped answering")
        )
        for channel in list(self._channels.values()):
            channel._peer_lost(peer.id, why)
        if was in _LIVE:
            self._peer_event(state, peer)
            log.info("%s: peer %s is %s", self.name, peer.name, state)
        if state == "dead" and peer.link is not None:
            # Maybe only a partition: keep saying hello for a while (nobody else will).
            self._rejoin[peer.id] = time.monotonic() + self.options["rejoin_interval"]
        with self._changed:
            self._changed.notify_all()

    def _close_link(self, peer: Peer) -> None:
        if peer.link is not None:
            self._links.pop(peer.id, None)
            peer.link.close()

    def _io_shutdown(self) -> None:
        if self._members is not None and not self._members.left:
            self._swim(self._members.leave(time.monotonic()))
        for peer_id in list(self._rejoin_socks):
            self._close_probe(peer_id)
        self._rdma_shutdown()  # before the goodbyes: they go after what was sent by RDMA
        for peer in list(self._peers.values()):
            link = peer.link
            if peer.state in (*_LIVE, "joining") and link is not None:
                # On the data pipe: it arrives after everything we published.
                with link.lock:
                    if link.batch:
                        self._flush_batch(link)  # what waited in a batch goes first
                    if not link.closed:
                        try:
                            link.sock.send(wire.pack(wire.BYE, None), zmq.NOBLOCK)
                        except zmq.ZMQError:
                            pass
        for peer in list(self._peers.values()):
            if peer.link is not None:
                self._links.pop(peer.id, None)
                peer.link.close(linger=200)  # long enough for the goodbye to leave
        for sock in self._seed_socks.values():
            sock.close(linger=0)
        self._router.close(linger=0)
        self._cleanup_bound()

    def _cleanup_bound(self) -> None:
        for plugin, bound in self._bound:
            plugin.cleanup(bound)

    # -- discovery -------------------------------------------------------------

    def _start_zeroconf(self) -> None:
        from discovery.base import Announcement
        from discovery.zeroconf import ZeroconfDiscovery

        me = Announcement(
            cluster=self.cluster,
            node_id=self.id,
            name=self.name,
            version=wire.PROTOCOL_VERSION,
            transports=tuple(self._advertised),
            endpoints=tuple(ep for eps in self._advertised.values() for ep in eps),
            host=self._locality.host,
            public_key=self._keys.public.decode() if self._keys is not None else "",
        )
        self._discovery = ZeroconfDiscovery(
            me, self._on_discovered, lambda _node_id: None, interfaces=self.options["interfaces"]
        )
        self._discovery.start()

    def _on_discovered(self, ann: Any) -> None:
        if ann.version != wire.PROTOCOL_VERSION or ann.node_id == self.id:
            return
        ours = self._keys.public.decode() if self._keys is not None else ""
        if ann.public_key != ours:
            # Another credential (or none): the handshake would fail both ways.
            self._command(("foreign", ann.node_id, ann.name, bool(ann.public_key)))
            return
        eps: dict[str, list[str]] = {}
        for ep in ann.endpoints:
            eps.setdefault(ep.split("://", 1)[0], []).append(ep)
        summary = {
            "id": ann.node_id,
            "name": ann.name,
            "cluster": ann.cluster,
            "eps": eps,
            "host": ann.host,
            # Processes never share a context across discovery: no inproc.
            "proc": f"{ann.host}/remote",
        }
        self._command(("found", summary))


"""Zero-configuration discovery over mDNS / DNS-SD (python-zeroconf, sync API).

Every node registers one service instance of ``_zmesh._tcp.local.`` whose TXT
record carries its :class:`~discovery.base.Announcement`, and browses the same
type. Layout of the TXT record (every ``key=value`` entry stays under 255
bytes, the DNS limit for one TXT string)::

    cluster=<cluster>   id=<node id>   name=<cosmetic, truncated>   ver=<int>
    transports=inproc,ipc,tcp   host=<host token>   ep0=<endpoint>  ep1=...

A value too long for one entry continues in ``<key>.1``, ``<key>.2``, ...
(``cluster``, ``id``, ``host``, ``transports`` and every ``epN``), so identity
fields survive exactly; only the cosmetic ``name`` is truncated. A tcp
endpoint on a wildcard host (``tcp://0.0.0.0:PORT``) is expanded by the
receiver into one endpoint per advertised A record.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import heapq
import ipaddress
import logging
import queue
import re
import secrets
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from zeroconf import (
    BadTypeInNameException,
    DNSAddress,
    DNSIncoming,
    DNSOutgoing,
    DNSPointer,
    DNSQuestion,
    DNSQuestionType,
    DNSService,
    DNSText,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
    service_type_name,
)
from zeroconf.asyncio import AsyncServiceInfo

from discovery.addresses import is_wildcard_host, local_ipv4_addresses, parse_tcp_endpoint
from discovery.base import Announcement, Discovery, same_cluster_peer
from mesh.errors import ClosedError, ConfigError, MeshError

log = logging.getLogger(__name__)

__all__ = [
    "SERVICE_TYPE",
    "LanBrowser",
    "ZeroconfDiscovery",
    "announcement_from_properties",
    "cosmetic_name",
    "encode_properties",
    "instance_name",
]

SERVICE_TYPE = "_zmesh._tcp.local."

TXT_ENTRY_MAX = 250  # bytes per "key=value"; DNS allows 255, keep a margin
NAME_MAX = 96  # bytes of the cosmetic name kept in TXT (the node id is the identity)
FIELD_MAX = 512  # cluster / id / host / transports longer than this are refused
ENDPOINTS_BUDGET = 3000  # TXT bytes spent on endpoints; beyond it the tail is dropped
MAX_ENDPOINTS = 256  # decoder bound, whatever a hostile record claims
MAX_ADDRESSES = 64
INSTANCE_MAX = 56  # DNS labels are <= 63 bytes; zeroconf may append "-N" on rename

_REGISTER_TIMEOUT = 10.0  # s; zeroconf's own startup wait is 9 s
_RESOLVE_ATTEMPTS = 4  # a ServiceInfo request that times out is retried with backoff
_SAFE_LABEL = re.compile(r"[^A-Za-z0-9_-]+")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}\Z")
_TOKEN = re.compile(r"^[A-Za-z0-9_.+-]{1,32}\Z")
_ENDPOINT = re.compile(r"^[a-z][a-z0-9+.-]{0,15}://\S{1,1000}\Z")
_VERSION = re.compile(rb"^[0-9]{1,9}\Z")
_CURVE_KEY = re.compile(r"^[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}\Z")  # Z85, 32 bytes
# Linux: without IP_MULTICAST_ALL=0 a socket bound to 0.0.0.0 receives the
# group's traffic from every interface any process joined, not just ours.
_IP_MULTICAST_ALL = getattr(
    socket, "IP_MULTICAST_ALL", 49 if sys.platform.startswith("linux") else None
)
_STOP = object()


# --------------------------------------------------------------------------- pure encoding


def _has_control(s: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in s)


def _truncate_utf8(s: str, limit: int) -> str:
    # "ignore" drops a multi-byte character cut in half by the byte limit
    return s.encode("utf-8", "replace")[:limit].decode("utf-8", "ignore")


def cosmetic_name(name: str) -> str:
    """The form of a node name that travels in TXT: no control characters, <= NAME_MAX bytes."""
    cleaned = "".join("?" if (ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F) else c for c in name)
    return _truncate_utf8(cleaned, NAME_MAX)


def instance_name(name: str, node_id: str) -> str:
    """A DNS-SD instance label for a node: ASCII, unique by node id, <= INSTANCE_MAX bytes."""
    if _SAFE_ID.match(node_id):
        id_part = node_id
    else:  # odd or long ids: a digest keeps the label unique and short
        id_part = hashlib.sha256(node_id.encode("utf-8", "surrogatepass")).hexdigest()[:20]
    name_part = _SAFE_LABEL.sub("-", name).strip("-")[: INSTANCE_MAX - len(id_part) - 1].strip("-")
    return f"{name_part or 'node'}-{id_part}"


def _put(out: dict[bytes, bytes], key: str, value: bytes) -> None:
    """Store ``value`` under ``key``, continuing in ``key.1``, ``key.2``... when too long."""
    k = key.encode()
    cap = TXT_ENTRY_MAX - len(k) - 1
    out[k] = value[:cap]
    rest = value[cap:]
    i = 1
    while rest:
        k = f"{key}.{i}".encode()
        cap = TXT_ENTRY_MAX - len(k) - 1
        out[k] = rest[:cap]
        rest = rest[cap:]
        i += 1


def _get(props: Mapping[bytes, bytes | None], key: str) -> bytes | None:
    """Inverse of :func:`_put`; None when the key is absent or has no value."""
    first = props.get(key.encode())
    if not isinstance(first, bytes):
        return None
    parts = [first]
    for i in range(1, len(props) + 1):  # bounded by the record itself
        nxt = props.get(f"{key}.{i}".encode())
        if not isinstance(nxt, bytes):
            break
        parts.append(nxt)
    return b"".join(parts)


def _identity(label: str, value: str, *, required: bool = True) -> bytes:
    if required and not value:
        raise ConfigError(f"{label} must not be empty")
    if _has_control(value):
        raise ConfigError(f"{label} {value!r} contains control characters")
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"{label} {value!r} is not valid Unicode text") from e
    if len(data) > FIELD_MAX:
        raise ConfigError(f"{label} is {len(data)} bytes; at most {FIELD_MAX} can be announced")
    return data


def _entries_size(entries: Mapping[bytes, bytes]) -> int:
    return sum(1 + len(k) + 1 + len(v) for k, v in entries.items())


def encode_properties(ann: Announcement) -> dict[bytes, bytes]:
    """TXT properties for ``ann``; every entry < 255 bytes. Raises ConfigError for unannounceable identities."""
    if (
        isinstance(ann.version, bool)
        or not isinstance(ann.version, int)
        or not 0 <= ann.version < 10**9
    ):
        raise ConfigError(f"version must be an int in [0, 1e9), got {ann.version!r}")
    for t in ann.transports:
        if not _TOKEN.match(t):
            raise ConfigError(f"transport name {t!r} must match {_TOKEN.pattern}")
    out: dict[bytes, bytes] = {}
    _put(out, "cluster", _identity("cluster", ann.cluster))
    _put(out, "id", _identity("node id", ann.node_id))
    out[b"name"] = cosmetic_name(ann.name).encode("utf-8")
    out[b"ver"] = str(ann.version).encode()
    _put(out, "transports", _identity("transports", ",".join(ann.transports), required=False))
    _put(out, "host", _identity("host token", ann.host, required=False))
    if ann.public_key:
        if not _CURVE_KEY.match(ann.public_key):
            raise ConfigError("public_key must be a 40-character Z85 CURVE key")
        out[b"key"] = ann.public_key.encode()
    used = 0
    index = 0
    for ep in ann.endpoints:
        if not _ENDPOINT.match(ep) or len(ep.encode("utf-8", "replace")) > FIELD_MAX:
            log.warning("not announcing malformed endpoint %r", ep)
            continue
        chunk: dict[bytes, bytes] = {}
        _put(chunk, f"ep{index}", ep.encode("utf-8"))
        size = _entries_size(chunk)
        if index > 0 and used + size > ENDPOINTS_BUDGET:
            # one mDNS packet must hold the whole record; the first endpoints are the preferred ones
            log.warning(
                "announcing only the first %d of %d endpoints (TXT budget %d bytes)",
                index,
                len(ann.endpoints),
                ENDPOINTS_BUDGET,
            )
            break
        out.update(chunk)
        used += size
        index += 1
    return out


def _text(raw: bytes | None, *, limit: int = FIELD_MAX) -> str | None:
    if raw is None or len(raw) > limit:
        return None
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if _has_control(s) else s


def _clean_addresses(addresses: Iterable[Any]) -> list[str]:
    out: list[str] = []
    for a in addresses:
        if len(out) >= MAX_ADDRESSES:
            break
        try:
            ip = ipaddress.IPv4Address(a)
        except (ValueError, TypeError):
            continue
        if not ip.is_unspecified and not ip.is_multicast and str(ip) not in out:
            out.append(str(ip))
    return out


def _decode(props: Mapping[bytes, bytes | None], addresses: Iterable[Any]) -> Announcement | None:
    if not isinstance(props, Mapping):
        return None
    cluster = _text(_get(props, "cluster"))
    node_id = _text(_get(props, "id"))
    ver_raw = props.get(b"ver")
    if not cluster or not node_id or not isinstance(ver_raw, bytes) or not _VERSION.match(ver_raw):
        return None
    name_raw = props.get(b"name")
    name = cosmetic_name(name_raw.decode("utf-8", "replace")) if isinstance(name_raw, bytes) else ""
    transports_s = _text(_get(props, "transports")) or ""
    transports = tuple(dict.fromkeys(t for t in transports_s.split(",") if _TOKEN.match(t)))[:32]
    host = _text(_get(props, "host")) or ""
    key = _text(_get(props, "key")) or ""
    if key and not _CURVE_KEY.match(key):
        return None  # a malformed key is not an announcement we could ever use
    addrs = _clean_addresses(addresses)
    endpoints: list[str] = []
    for i in range(min(len(props), MAX_ENDPOINTS)):
        if f"ep{i}".encode() not in props:
            break
        ep = _text(_get(props, f"ep{i}"))
        if ep is None or not _ENDPOINT.match(ep):
            continue
        tcp = parse_tcp_endpoint(ep) if ep.startswith("tcp://") else None
        if ep.startswith("tcp://") and tcp is None:
            continue
        if tcp is not None and is_wildcard_host(tcp[0]):
            if tcp[1] == 0:
                continue
            endpoints.extend(f"tcp://{a}:{tcp[1]}" for a in addrs)  # the sender's A records
        else:
            endpoints.append(ep)
    endpoints = list(dict.fromkeys(endpoints))
    if not endpoints:
        return None  # nothing to connect to: not a usable peer
    return Announcement(
        cluster=cluster,
        node_id=node_id,
        name=name,
        version=int(ver_raw),
        transports=transports,
        endpoints=tuple(endpoints),
        host=host,
        public_key=key,
    )


def announcement_from_properties(
    props: Mapping[bytes, bytes | None], addresses: Iterable[Any] = ()
) -> Announcement | None:
    """Decode TXT properties (and the service's IPv4 addresses) into an Announcement.

    Pure. Returns None for anything that is not a well-formed announcement;
    never raises, whatever a hostile responder put in its record.
    """
    try:
        return _decode(props, addresses)
    except Exception:  # hostile input must not reach the discovery thread
        log.debug("undecodable TXT record %r", props, exc_info=True)
        return None


# --------------------------------------------------------------------------- network


def _checked_service_type(service_type: str) -> str:
    try:
        if service_type_name(service_type) != service_type:
            raise BadTypeInNameException("not a service type (it names an instance)")
    except BadTypeInNameException as e:
        raise ConfigError(f"bad DNS-SD service type {service_type!r}: {e}") from e
    return service_type


def mdns_addresses(interfaces: Sequence[str] | None) -> list[str]:
    """IPv4 addresses to run mDNS on: those of ``interfaces``, by default every
    non-loopback one (loopback only on a host with no network)."""
    pairs = local_ipv4_addresses(interfaces)
    if not pairs and interfaces is None:
        pairs = local_ipv4_addresses(None, include_loopback=True)  # a host with no network
    if not pairs:
        raise ConfigError("no IPv4 address to run mDNS on; pass interfaces=[...]")
    return list(dict.fromkeys(a for _, a in pairs))


class ZeroconfDiscovery(Discovery):
    """Finds the nodes of one cluster on the LAN with mDNS / DNS-SD.

    ``interfaces`` (names or addresses) restricts both where mDNS runs and
    which addresses are advertised; by default every non-loopback IPv4
    address (loopback only when there is nothing else).
    """

    def __init__(
        self,
        me: Announcement,
        on_found: Callable[[Announcement], None],
        on_lost: Callable[[str], None],
        *,
        interfaces: Sequence[str] | None = None,
        service_type: str = SERVICE_TYPE,
        resolve_timeout: float = 1.5,
        close_timeout: float = 3.0,
    ) -> None:
        super().__init__(me, on_found, on_lost)
        self.service_type = _checked_service_type(service_type)
        self._props = encode_properties(me)  # refuse an unannounceable node now, not in start()
        self.addresses: list[str] = mdns_addresses(interfaces)
        self.instance = instance_name(me.name, me.node_id)
        tcp = [parse_tcp_endpoint(e) for e in me.endpoints if e.startswith("tcp://")]
        self.port = next((p[1] for p in tcp if p is not None), 0)
        self._resolve_ms = max(100, int(resolve_timeout * 1000))
        self._close_timeout = close_timeout
        self._zc: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None
        self._info: ServiceInfo | None = None
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._pending_lock = threading.Lock()
        # owned by the worker thread only
        self._present: set[str] = set()  # service names the browser currently lists
        self._inflight: set[str] = set()
        self._name_to_id: dict[str, str] = {}
        self._id_to_names: dict[str, set[str]] = {}
        self._reported: dict[str, Announcement] = {}

    # -- lifecycle

    def start(self) -> None:
        with self._state_lock:
            if self._closed:
                raise ClosedError("discovery was closed; create a new one")
            if self._started:
                return
            self._started = True
        try:
            self._start()
        except BaseException:
            self._teardown()
            raise

    def _start(self) -> None:
        try:
            zc = Zeroconf(interfaces=list(self.addresses), ip_version=IPVersion.V4Only)
        except OSError as e:
            raise ConfigError(f"cannot open mDNS sockets on {self.addresses}: {e}") from e
        self._zc = zc
        self._restrict_listen_socket(zc)
        self._worker = threading.Thread(
            target=self._run, name=f"zmesh-discovery-{self.instance}", daemon=True
        )
        self._worker.start()
        # QM (multicast) questions: several nodes on one host share port 5353 with
        # SO_REUSEPORT, so a unicast (QU) answer reaches only one of them at random.
        self._browser = ServiceBrowser(
            zc, self.service_type, handlers=[self._on_browse], question_type=DNSQuestionType.QM
        )
        info = ServiceInfo(
            self.service_type,
            f"{self.instance}.{self.service_type}",
            port=self.port,
            properties=dict(self._props),
            server=f"{self.instance}.local.",
            parsed_addresses=list(self.addresses),
        )
        if zc.loop is None:
            raise MeshError("zeroconf did not start its event loop")
        try:
            # The instance name embeds the node id, so it is unique by construction:
            # skipping the uniqueness probe saves ~1.5 s before others can see us.
            # The async call returns once the first announcement is sent; the
            # sync register_service would also sit through the two repeats (~0.45 s).
            fut = asyncio.run_coroutine_threadsafe(
                zc.async_register_service(info, cooperating_responders=True), zc.loop
            )
            fut.result(_REGISTER_TIMEOUT)
        except Exception as e:
            raise MeshError(f"mDNS registration of {info.name!r} failed: {e!r}") from e
        self._info = info
        if not zc.engine.senders:
            raise ConfigError(f"mDNS could not join the multicast group on any of {self.addresses}")
        log.debug("zeroconf discovery up: %s on %s", info.name, self.addresses)

    @staticmethod
    def _restrict_listen_socket(zc: Zeroconf) -> None:
        sock = getattr(zc.engine, "_listen_socket", None)  # private; best effort only
        if sock is None or _IP_MULTICAST_ALL is None:
            return
        try:
            sock.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)
        except OSError:
            log.debug("IP_MULTICAST_ALL not supported", exc_info=True)

    def close(self) -> None:
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            started = self._started
        if not started:
            return
        # zeroconf joins threads without timeouts; never let that hang the node
        t = threading.Thread(
            target=self._teardown, name=f"zmesh-discovery-close-{self.instance}", daemon=True
        )
        t.start()
        t.join(self._close_timeout)
        if t.is_alive():
            log.warning(
                "zeroconf discovery did not close within %.1f s; abandoning it", self._close_timeout
            )

    def _teardown(self) -> None:
        self._closed = True
        zc, info, browser = self._zc, self._info, self._browser
        self._info = None
        with self._pending_lock:
            pending = list(self._pending)
        for fut in pending:
            fut.cancel()
        if zc is not None and info is not None:
            try:
                zc.unregister_service(info)  # goodbye (TTL 0), so peers drop us at once
            except Exception:
                log.debug("zeroconf unregister failed", exc_info=True)
        if browser is not None:
            try:
                browser.cancel()
            except Exception:
                log.debug("zeroconf browser cancel failed", exc_info=True)
        if zc is not None:
            try:
                zc.close()  # waits for the goodbye broadcasts still pending on its loop
            except Exception:
                log.debug("zeroconf close failed", exc_info=True)
        self._events.put(_STOP)
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(1.0)

    # -- browser thread: only enqueue

    def _on_browse(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        self._events.put(
            ("removed" if state_change is ServiceStateChange.Removed else "changed", name)
        )

    # -- worker thread: owns the membership maps and calls the callbacks

    def _run(self) -> None:
        retries: list[tuple[float, int, str, int]] = []
        seq = 0
        while True:
            timeout = max(0.0, retries[0][0] - time.monotonic()) if retries else None
            try:
                ev = self._events.get(timeout=timeout)
            except queue.Empty:
                ev = None
            if ev is _STOP:
                return
            try:
                if ev is not None:
                    retry = self._handle(ev)
                    if retry is not None:
                        name, attempt = retry
                        seq += 1
                        delay = 0.25 * 2**attempt
                        heapq.heappush(retries, (time.monotonic() + delay, seq, name, attempt + 1))
                while retries and retries[0][0] <= time.monotonic():
                    _, _, name, attempt = heapq.heappop(retries)
                    if name in self._present:
                        self._resolve(name, attempt)
            except Exception:
                log.exception("zeroconf discovery event %r failed", ev)

    def _handle(self, ev: tuple[Any, ...]) -> tuple[str, int] | None:
        kind, name = ev[0], ev[1]
        if kind == "changed":
            self._present.add(name)
            self._resolve(name, 0)
        elif kind == "removed":
            self._present.discard(name)
            self._forget(name)
        elif kind == "resolved":
            info, attempt = ev[2], ev[3]
            self._inflight.discard(name)
            if name not in self._present:
                return None  # withdrawn while we were asking
            if info is None:
                if attempt + 1 < _RESOLVE_ATTEMPTS:
                    return name, attempt
                log.debug("giving up resolving %s after %d attempts", name, attempt + 1)
                return None
            self._accept(name, info)
        return None

    def _resolve(self, name: str, attempt: int) -> None:
        zc = self._zc
        if zc is None or self._closed or name in self._inflight or zc.loop is None:
            return
        self._inflight.add(name)

        async def request() -> AsyncServiceInfo | None:
            info = AsyncServiceInfo(self.service_type, name)
            # answered from the cache at once when the announcement carried everything
            ok = await info.async_request(zc, self._resolve_ms, DNSQuestionType.QM)
            return info if ok else None

        try:
            fut = asyncio.run_coroutine_threadsafe(request(), zc.loop)
        except RuntimeError:  # loop closed under us
            self._inflight.discard(name)
            return
        with self._pending_lock:
            self._pending.add(fut)

        def done(f: concurrent.futures.Future[Any]) -> None:
            with self._pending_lock:
                self._pending.discard(f)
            result = None
            if not f.cancelled() and f.exception() is None:
                result = f.result()
            self._events.put(("resolved", name, result, attempt))

        fut.add_done_callback(done)

    def _accept(self, name: str, info: ServiceInfo) -> None:
        ann = announcement_from_properties(info.properties, info.parsed_addresses(IPVersion.V4Only))
        if ann is None:
            log.debug("ignoring %s: not a mesh announcement", name)
            return
        if not same_cluster_peer(self.me, ann):
            return  # ourselves, or another cluster
        old = self._name_to_id.get(name)
        if old is not None and old != ann.node_id:
            self._forget(name)
        self._name_to_id[name] = ann.node_id
        self._id_to_names.setdefault(ann.node_id, set()).add(name)
        if self._reported.get(ann.node_id) != ann:
            self._reported[ann.node_id] = ann
            self._emit_found(ann)

    def _forget(self, name: str) -> None:
        node_id = self._name_to_id.pop(name, None)
        if node_id is None:
            return
        names = self._id_to_names.get(node_id, set())
        names.discard(name)
        if names:
            return  # still announced under another instance name
        self._id_to_names.pop(node_id, None)
        self._reported.pop(node_id, None)
        self._emit_lost(node_id)


# --------------------------------------------------------------------------- browse only

_MDNS_GROUP = ("224.0.0.251", 5353)
_QTYPE_A, _QTYPE_PTR, _QTYPE_TXT, _QTYPE_SRV, _QCLASS_IN = 1, 12, 16, 33, 1
_FLAGS_QUERY = 0x0000
MAX_SCAN_PACKETS = 10_000  # per scan: a flood must not keep us busy forever
MAX_SCAN_NODES = 4096


def _txt_properties(raw: bytes) -> dict[bytes, bytes | None]:
    """DNS TXT wire data (length-prefixed strings) -> {key: value}; the first key wins (RFC 6763)."""
    props: dict[bytes, bytes | None] = {}
    i = 0
    while i < len(raw):
        n = raw[i]
        item = raw[i + 1 : i + 1 + n]
        i += 1 + n
        key, sep, value = item.partition(b"=")
        if key and key not in props:
            props[key] = value if sep else None
    return props


class LanBrowser:
    """Lists the mesh nodes announced on the LAN, of every cluster, announcing nothing.

    For observers (``mesh-status``) on hosts that may run no node. It asks with
    one-shot mDNS queries (RFC 6762 section 5.1) from an ephemeral port rather
    than as a full mDNS participant on port 5353: responders then answer each
    query at once by unicast to that port, whereas a multicast answer is held
    back when the same record went out less than a second ago (so a second
    ``mesh-status`` run right after the first would see nothing), and a
    unicast answer to port 5353 reaches a random one of the sockets that
    share it on a host running nodes. Only the responders of live processes
    answer, so a SIGKILLed node is simply not listed (no stale cache).
    ``interfaces`` restricts where the queries go, as for :class:`ZeroconfDiscovery`.

        with LanBrowser(["eth0"]) as browser:
            nodes = browser.scan(1.0)
    """

    def __init__(
        self, interfaces: Sequence[str] | None = None, *, service_type: str = SERVICE_TYPE
    ) -> None:
        self.service_type = _checked_service_type(service_type)
        self.addresses: list[str] = mdns_addresses(interfaces)
        self._socks: list[socket.socket] = []
        self._closed = False

    def __enter__(self) -> LanBrowser:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self._closed:
            raise ClosedError("browser was closed; create a new one")
        if self._socks:
            return
        errors = []
        for addr in self.addresses:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind((addr, 0))  # answers come back here, on this interface's address
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(addr))
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)  # nodes on this host
                sock.setblocking(False)
            except OSError as e:
                sock.close()
                errors.append(f"{addr}: {e}")
                continue
            self._socks.append(sock)
        if not self._socks:
            raise ConfigError(f"cannot send mDNS queries on {self.addresses}: {'; '.join(errors)}")

    def close(self) -> None:
        self._closed = True
        for sock in self._socks:
            sock.close()
        self._socks = []

    def _query(self, questions: list[tuple[str, int]], ids: set[int]) -> None:
        # A fresh id per query: responders drop a byte-identical packet seen < 0.8 s ago.
        qid = secrets.randbelow(0xFFFF) + 1
        ids.add(qid)
        out = DNSOutgoing(_FLAGS_QUERY, False, qid)  # multicast=False keeps the id on the wire
        for name, qtype in questions:
            out.add_question(DNSQuestion(name, qtype, _QCLASS_IN))
        for packet in out.packets():
            for sock in self._socks:
                try:
                    sock.sendto(packet, _MDNS_GROUP)
                except OSError as e:  # e.g. no route for multicast on this interface
                    log.debug("mDNS query via %s failed: %s", sock.getsockname(), e)

    def scan(self, duration: float = 1.0, queries: int = 3) -> list[Announcement]:
        """Ask ``queries`` times over ``duration`` seconds (a lost packet is asked again);
        every well-formed announcement answered, one per node, sorted by cluster and name."""
        if not self._socks:
            self.start()
        ptrs: set[str] = set()
        txt: dict[str, dict[bytes, bytes | None]] = {}
        srv: dict[str, str] = {}
        addrs: dict[str, list[str]] = {}
        ids: set[int] = set()
        t0 = time.monotonic()
        deadline = t0 + max(0.05, duration)
        sends = [t0 + duration * k / max(1, queries) for k in range(max(1, queries))]
        packets = 0
        while True:
            now = time.monotonic()
            if sends and now >= sends[0]:
                sends.pop(0)
                questions = [(self.service_type, _QTYPE_PTR)]
                # Answers normally carry TXT, SRV and A as additionals; ask for what is missing.
                questions += [(n, _QTYPE_TXT) for n in sorted(ptrs - txt.keys())][:16]
                questions += [(n, _QTYPE_SRV) for n in sorted(ptrs - srv.keys())][:16]
                questions += [(h, _QTYPE_A) for h in sorted(set(srv.values()) - addrs.keys())][:16]
                self._query(questions, ids)
            if now >= deadline or packets >= MAX_SCAN_PACKETS:
                break
            wake = min([deadline, *sends[:1]])
            ready, _, _ = select.select(self._socks, [], [], max(0.0, wake - now))
            for sock in ready:
                while packets < MAX_SCAN_PACKETS:
                    try:
                        data = sock.recv(9000)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break  # e.g. ICMP unreachable reported on the socket
                    packets += 1
                    self._absorb(data, ids, ptrs, txt, srv, addrs)
        out: dict[str, Announcement] = {}
        for name in sorted(ptrs):
            props = txt.get(name)
            if props is None:
                continue
            ann = announcement_from_properties(props, addrs.get(srv.get(name, ""), []))
            if ann is not None:
                out.setdefault(ann.node_id, ann)  # one node may answer under two names
        return sorted(out.values(), key=lambda a: (a.cluster, a.name, a.node_id))

    def _absorb(
        self,
        data: bytes,
        ids: set[int],
        ptrs: set[str],
        txt: dict[str, dict[bytes, bytes | None]],
        srv: dict[str, str],
        addrs: dict[str, list[str]],
    ) -> None:
        """Take the records of one answer to one of our queries; anything else is ignored."""
        try:
            msg = DNSIncoming(data)
            if not msg.valid or msg.id not in ids or not msg.is_response():
                return
            records = msg.answers()
        except Exception:  # hostile or garbled packets never stop the scan
            log.debug("undecodable mDNS answer", exc_info=True)
            return
        # DNS names compare case-insensitively: every key is lower case.
        stype = self.service_type.lower()
        suffix = "." + stype
        for r in records:
            name = r.name.lower()
            if isinstance(r, DNSPointer) and name == stype:
                if r.alias.lower().endswith(suffix) and len(ptrs) < MAX_SCAN_NODES:
                    ptrs.add(r.alias.lower())
            elif isinstance(r, DNSText) and name.endswith(suffix):
                txt[name] = _txt_properties(r.text)
            elif isinstance(r, DNSService) and name.endswith(suffix):
                srv[name] = r.server.lower()
            elif isinstance(r, DNSAddress) and r.type == _QTYPE_A and len(r.address) == 4:
                got = addrs.setdefault(name, [])
                a = socket.inet_ntoa(r.address)
                if a not in got and len(got) < MAX_ADDRESSES:
                    got.append(a)

"""CurveZMQ for a cluster: the key pair derived from a shared secret, and ZAP.

The choice (README, "Security"): a cluster credential is one shared secret.
Every node derives the same CURVE key pair from it (HKDF-SHA256 over the secret,
salted with the cluster name), uses it as server key on its ROUTER and as client
key on every DEALER it dials, and its ZAP handler admits a connecting client only
when the client's long-term public key is that cluster key. A process without
the secret cannot complete the handshake (it cannot prove the key), so it can
neither join, read nor publish. CURVE's per-connection ephemeral keys still
encrypt every link separately (forward secrecy).

Why not one key per node "certified" by the secret: ZAP sees only the client's
public key and address (not the connecting socket's identity), and with a shared
secret any holder could derive any node's key anyway, so per-node keys would add
configuration without adding trust. Names and roles used by the permission policy
(mesh/policy.py) are therefore what authenticated members claim: the policy stops
mistakes and misconfigured workers, not a malicious holder of the secret.

The ZAP handler is one thread per zmq context (libzmq looks for it at the fixed
endpoint ``inproc://zeromq.zap.01`` of the context), shared by every secured node
of the process and keyed by ZAP domain, one domain per node. It also watches each
secured ROUTER's socket monitor so refused handshakes are counted per reason.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import hmac
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils import z85

from mesh.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "ClusterKeys",
    "SECRET_MIN_BYTES",
    "cluster_keys",
    "generate_secret",
    "read_secret",
    "ZapDomain",
    "zap_register",
]

SECRET_MIN_BYTES = 16
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
LOG_EVERY = 10.0  # seconds between two log lines about refused connections
_KDF_SALT = b"zmesh curve v1"

# Socket-monitor events that mean "a peer tried to connect and was refused".
_REFUSAL_EVENTS = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth_denied",
}


@dataclass(frozen=True)
class ClusterKeys:
    """The CURVE key pair of a cluster (Z85 text, 40 characters each)."""

    public: bytes
    secret: bytes

    @functools.cached_property  # read for every hello: hash the key once
    def fingerprint(self) -> str:
        """A short, non-secret name for the key, for logs and status."""
        return hashlib.sha256(z85.decode(self.public)).hexdigest()[:16]

    def client_options(self) -> dict[int, Any]:
        """Socket options of a DEALER that dials a node of this cluster."""
        return {
            zmq.CURVE_SERVERKEY: self.public,
            zmq.CURVE_PUBLICKEY: self.public,
            zmq.CURVE_SECRETKEY: self.secret,
        }

    def apply_client(self, sock: Any) -> None:
        for option, value in self.client_options().items():
            sock.setsockopt(option, value)

    def __repr__(self) -> str:  # never print the secret key
        return f"ClusterKeys(fingerprint={self.fingerprint})"


def generate_secret() -> str:
    """A fresh random cluster secret (printable, 256 bits)."""
    return z85.encode(os.urandom(32)).decode()


def read_secret(secret: str | bytes | os.PathLike) -> bytes:
    """The secret as bytes: given directly (str/bytes), or read from a key file.

    A key file (any os.PathLike) must not be readable by group or others, as ssh
    insists for private keys; trailing newlines are ignored.
    """
    if isinstance(secret, os.PathLike):
        path = os.fspath(secret)
        try:
            st = os.stat(path)
            if stat.S_IMODE(st.st_mode) & 0o077:
                raise ConfigError(
                    f"secret file {path} is readable by group or others; run: chmod 600 {path}"
                )
            with open(path, "rb") as f:
                data = f.read(4096).rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigError(f"cannot read the secret file {path}: {exc.strerror}") from None
        where = f"secret file {path}"
    elif isinstance(secret, str):
        data, where = secret.encode("utf-8"), "secret"
    elif isinstance(secret, (bytes, bytearray, memoryview)):
        data, where = bytes(secret), "secret"
    else:
        raise ConfigError(
            f"secret={type(secret).__name__}; give a str, bytes or a pathlib.Path to a key file"
        )
    if len(data) < SECRET_MIN_BYTES:
        raise ConfigError(
            f"{where} has {len(data)} bytes; use at least {SECRET_MIN_BYTES} "
            "(`mesh secret` prints a fresh random one)"
        )
    return data


def _hkdf(secret: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869)."""
    prk = hmac.new(salt, secret, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def cluster_keys(secret: str | bytes | os.PathLike, cluster: str) -> ClusterKeys:
    """The cluster's CURVE key pair: the same on every node holding ``secret``."""
    if not zmq.has("curve"):
        raise ConfigError("this libzmq has no CURVE support; install pyzmq's wheel (it bundles libsodium)")
    raw = _hkdf(read_secret(secret), _KDF_SALT, b"cluster:" + cluster.encode("utf-8"))
    secret_z85 = z85.encode(raw)  # libsodium clamps any 32 bytes into a valid scalar
    return ClusterKeys(public=zmq.curve_public(secret_z85), secret=secret_z85)


# --------------------------------------------------------------------------- ZAP


class ZapDomain:
    """One secured node's registration with its context's ZAP handler."""

    def __init__(self, handler: _ZapHandler, name: str, owner: str, allowed: set[bytes]) -> None:
        self._handler = handler
        self.name = name
        self.owner = owner  # the node's name, for log lines
        self.allowed = allowed  # raw 32-byte client public keys
        self.refused: collections.Counter[str] = collections.Counter()
        self.accepted = 0
        self._last_log = -LOG_EVERY
        self._unlogged = 0

    def watch(self, router: Any) -> None:
        """Count refused handshakes on ``router`` (call before it binds)."""
        events = 0
        for event in (*_REFUSAL_EVENTS, zmq.EVENT_HANDSHAKE_SUCCEEDED):
            events |= event
        monitor = router.get_monitor_socket(events)
        self._handler.add_monitor(self, monitor)

    def close(self) -> None:
        self._handler.remove(self)

    def log_refusal(self, what: str) -> None:
        # An intruder retrying every 100 ms must not flood the log: one line per
        # LOG_EVERY seconds, saying how many were not logged.
        now = time.monotonic()
        if now - self._last_log < LOG_EVERY:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more refused since the last report)" if self._unlogged else ""
        self._last_log, self._unlogged = now, 0
        log.warning("%s: %s%s", self.owner, what, more)


class _ZapHandler:
    """The ZAP handler of one zmq context, on its own daemon thread."""

    def __init__(self, ctx: zmq.Context) -> None:
        self._ctx = ctx
        self._lock = threading.Lock()
        self._domains: dict[bytes, ZapDomain] = {}
        self._monitors: dict[Any, ZapDomain] = {}
        self._closing: list[Any] = []
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)  # raises EADDRINUSE if someone else handles ZAP here
        self._thread = threading.Thread(target=self._run, name="mesh-zap", daemon=True)
        self._thread.start()

    def register(self, name: str, owner: str, allowed: set[bytes]) -> ZapDomain:
        domain = ZapDomain(self, name, owner, allowed)
        with self._lock:
            self._domains[name.encode()] = domain
        return domain

    def add_monitor(self, domain: ZapDomain, monitor: Any) -> None:
        with self._lock:
            self._monitors[monitor] = domain

    def remove(self, domain: ZapDomain) -> None:
        with self._lock:
            self._domains.pop(domain.name.encode(), None)
            for monitor, owner in list(self._monitors.items()):
                if owner is domain:
                    del self._monitors[monitor]
                    self._closing.append(monitor)  # closed by the ZAP thread, its owner now

    def _run(self) -> None:
        while True:
            with self._lock:
                monitors = list(self._monitors)
                closing, self._closing = self._closing, []
            for monitor in closing:
                monitor.close(linger=0)
            poller = zmq.Poller()
            poller.register(self._sock, zmq.POLLIN)
            for monitor in monitors:
                poller.register(monitor, zmq.POLLIN)
            try:
                ready = dict(poller.poll(100))  # 100 ms: new registrations are picked up
                if self._sock in ready:
                    self._answer(self._sock.recv_multipart())
                for monitor in monitors:
                    if monitor in ready:
                        self._monitor_event(monitor)
            except zmq.ContextTerminated:
                return
            except Exception:
                log.exception("ZAP handler: error; continuing")

    def _answer(self, frames: list[bytes]) -> None:
        # [routing id, b"", version, request id, domain, address, identity, mechanism, *credentials]
        if len(frames) < 8:
            return
        route, delim, version, request_id, domain_name, address, _identity, mechanism = frames[:8]
        with self._lock:
            domain = self._domains.get(domain_name)
        ok = (
            domain is not None
            and version == b"1.0"
            and mechanism == b"CURVE"
            and len(frames) == 9
            and frames[8] in domain.allowed
        )
        if ok:
            domain.accepted += 1
            reply = [b"200", b"OK", b"cluster", b""]
        else:
            if domain is not None:
                key = frames[8] if len(frames) == 9 and len(frames[8]) == 32 else b""
                who = hashlib.sha256(key).hexdigest()[:16] if key else mechanism.decode("ascii", "replace")
                domain.log_refusal(
                    f"refused a connection from {address.decode('ascii', 'replace')} "
                    f"(key {who}: not the cluster's credential)"
                )
            reply = [b"400", b"not a member of this cluster", b"", b""]
        self._sock.send_multipart([route, delim, b"1.0", request_id, *reply])

    def _monitor_event(self, monitor: Any) -> None:
        from zmq.utils.monitor import recv_monitor_message

        event = recv_monitor_message(monitor, zmq.NOBLOCK)
        with self._lock:
            domain = self._monitors.get(monitor)
        if domain is None:
            return
        reason = _REFUSAL_EVENTS.get(event["event"])
        if reason is not None:
            domain.refused[reason] += 1
            if reason == "handshake_failed":
                domain.log_refusal(
                    f"refused a connection on {event['endpoint'].decode(errors='replace')}: "
                    "the peer does not speak this cluster's CurveZMQ (no or another secret)"
                )


_handlers: dict[int, _ZapHandler] = {}
_handlers_lock = threading.Lock()


def zap_register(ctx: zmq.Context, name: str, keys: ClusterKeys, owner: str = "") -> ZapDomain:
    """Admit clients holding ``keys`` on sockets whose ZAP domain is ``name``;
    ``owner`` names the node in log lines."""
    with _handlers_lock:
        handler = _handlers.get(id(ctx))
        if handler is None:
            try:
                handler = _handlers[id(ctx)] = _ZapHandler(ctx)
            except zmq.ZMQError as exc:
                raise ConfigError(
                    f"cannot start the ZAP authenticator ({exc}); another ZAP handler "
                    "(e.g. zmq.auth) runs on this zmq context: give the mesh its own"
                ) from None
    return handler.register(name, owner or name, {z85.decode(keys.public)})

"""The ZeroMQ transports: inproc (same process), ipc (same host), tcp (anywhere)."""

from __future__ import annotations

import glob
import ipaddress
import os
import socket
import tempfile
import time
from collections.abc import Sequence

from transports.base import Locality, Transport


class InprocTransport(Transport):
    """Peers in one process share the process-wide ZeroMQ context: no syscalls."""

    name = "inproc"
    rank = 0

    def bind_endpoints(self, listen: Sequence[str], node_id: str) -> list[str]:
        return [f"inproc://zmesh-{node_id}"]

    def can_reach(self, local: Locality, peer: Locality) -> bool:
        return local.process == peer.process


class IpcTransport(Transport):
    """Unix domain sockets between processes of one host and network namespace."""

    name = "ipc"
    rank = 30

    def available(self) -> bool:
        return os.name == "posix"

    def bind_endpoints(self, listen: Sequence[str], node_id: str) -> list[str]:
        out = []
        for endpoint in listen:
            if endpoint == "ipc://auto":
                remove_stale_sockets(_socket_dir())
                out.append(f"ipc://{_socket_dir()}/zmesh-{node_id}.sock")
            elif endpoint.startswith("ipc://"):
                out.append(endpoint)
        return out

    def can_reach(self, local: Locality, peer: Locality) -> bool:
        return local.host == peer.host

    def cleanup(self, bound: str) -> None:
        path = bound[len("ipc://") :]
        if path and not path.startswith("@"):
            try:
                os.unlink(path)
            except OSError:
                pass


# A socket file younger than this is never removed: its node may be between
# bind() and listen() this very moment.
STALE_AFTER = 60.0


def remove_stale_sockets(directory: str, now: float | None = None) -> list[str]:
    """Remove zmesh-*.sock files nobody listens on (left by killed nodes, which
    cannot unlink their own)."""
    now = time.time() if now is None else now
    removed = []
    for path in glob.glob(os.path.join(directory, "zmesh-*.sock")):
        try:
            if now - os.lstat(path).st_mtime < STALE_AFTER:
                continue
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(0.1)
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)
                removed.append(path)
            finally:
                probe.close()
        except OSError:
            continue  # not a socket, gone meanwhile, or not ours to touch
    return removed


def _socket_dir() -> str:
    # Short paths: unix socket paths are limited to about 107 bytes.
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and len(runtime) < 60:
        return runtime
    return tempfile.gettempdir() if len(tempfile.gettempdir()) < 60 else "/tmp"


class TcpTransport(Transport):
    """TCP: the transport that reaches across hosts."""

    name = "tcp"
    rank = 40

    def bind_endpoints(self, listen: Sequence[str], node_id: str) -> list[str]:
        out = []
        for endpoint in listen:
            if endpoint.startswith("tcp://"):
                host, _, port = endpoint[len("tcp://") :].rpartition(":")
                out.append(f"tcp://{host}:{'*' if port in ('0', '*', '') else port}")
        return out

    def advertise(self, bound: str) -> list[str]:
        from discovery.addresses import expand_tcp_endpoint

        return expand_tcp_endpoint(bound, include_loopback=True)

    def can_reach(self, local: Locality, peer: Locality) -> bool:
        return True

    def pick_endpoint(self, endpoints: Sequence[str], local: Locality, peer: Locality) -> str | None:
        same_host = local.host == peer.host
        routable = [ep for ep in endpoints if _is_loopback(ep) == same_host]
        if routable:
            return routable[0]
        # Same host but no loopback advertised: any own address works locally.
        # Another host: a loopback address would reach ourselves, never use it.
        others = [ep for ep in endpoints if not _is_loopback(ep)]
        return others[0] if others else None


def _is_loopback(endpoint: str) -> bool:
    host = endpoint[len("tcp://") :].rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"

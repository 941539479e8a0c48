"""Which of a node's endpoints another process can reach (used by the CLI and the demo)."""

from __future__ import annotations

import ipaddress


def seedable_endpoints(status: dict) -> list[str]:
    """Endpoints another process can ``--seed``: tcp on 127.0.0.1 first, then the
    host's other addresses, then ipc (same host only). inproc is never reachable."""
    eps = status.get("endpoints", {})
    tcp = [ep for ep in eps.get("tcp", []) if "://0.0.0.0:" not in ep]
    tcp.sort(key=lambda ep: not _is_loopback(ep))
    return tcp + list(eps.get("ipc", []))


def _is_loopback(endpoint: str) -> bool:
    host = endpoint.split("://", 1)[-1].rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"

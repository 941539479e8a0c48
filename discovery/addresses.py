"""Local IPv4 addresses, and turning a wildcard-bound endpoint into routable ones.

A node binds ``tcp://0.0.0.0:0``; peers cannot connect to that, so before it
is advertised it is expanded into one ``tcp://<addr>:<port>`` per address of
the chosen interfaces.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

import ifaddr

from mesh.errors import ConfigError

__all__ = ["expand_tcp_endpoint", "is_wildcard_host", "local_ipv4_addresses", "parse_tcp_endpoint"]

_WILDCARD_HOSTS = frozenset({"*", "0.0.0.0"})
_TCP_RE = re.compile(r"^tcp://(?P<host>\[[^\]]*\]|[^:/\[\]]+):(?P<port>[^:/]+)\Z")


def _is_loopback(addr: str) -> bool:
    return ipaddress.IPv4Address(addr).is_loopback


def _scan() -> list[tuple[str, int, str]]:
    """(interface, index, address) for every IPv4 address of the host, in a stable order."""
    rows: list[tuple[str, int, str]] = []
    for adapter in ifaddr.get_adapters():
        name = str(adapter.nice_name or adapter.name)
        index = adapter.index if adapter.index is not None else 1 << 30
        for ip in adapter.ips:
            if not ip.is_IPv4 or not isinstance(ip.ip, str):
                continue
            try:
                addr = ipaddress.IPv4Address(ip.ip)
            except ValueError:
                continue
            if addr.is_unspecified:  # 0.0.0.0 is never a place to reach anyone
                continue
            rows.append((name, index, str(addr)))
    # ifaddr follows getifaddrs order, which may change between calls; sort so
    # that the same host always advertises the same list (stable TXT records).
    rows.sort(key=lambda r: (r[1], r[0], int(ipaddress.IPv4Address(r[2]))))
    seen: set[tuple[str, str]] = set()
    out: list[tuple[str, int, str]] = []
    for row in rows:
        if (row[0], row[2]) not in seen:
            seen.add((row[0], row[2]))
            out.append(row)
    return out


def _describe(rows: list[tuple[str, int, str]]) -> str:
    if not rows:
        return "none (no interface has an IPv4 address)"
    return ", ".join(f"{name} ({addr})" for name, _, addr in rows)


def local_ipv4_addresses(
    interfaces: Sequence[str] | None = None, *, include_loopback: bool = False
) -> list[tuple[str, str]]:
    """Return ``(interface name, IPv4 address)`` pairs of this host, in a stable order.

    ``interfaces`` selects by interface name (``"eth0"``) or by address
    (``"10.77.0.1"``); an interface or address named explicitly is returned
    even when it is a loopback one. Without ``interfaces`` every non-loopback
    address is returned, and loopback ones too when ``include_loopback``.
    Unknown names raise :class:`mesh.errors.ConfigError`.
    """
    rows = _scan()
    if interfaces is None:
        return [(n, a) for n, _, a in rows if include_loopback or not _is_loopback(a)]
    if isinstance(interfaces, str | bytes):
        # A bare "eth0" would otherwise be read as the names "e", "t", "h", "0".
        raise ConfigError(
            f"interfaces must be a list of interface names or addresses, not {interfaces!r}; "
            f"did you mean [{interfaces!r}]?"
        )
    known_names = {str(a.nice_name or a.name) for a in ifaddr.get_adapters()}
    wanted: list[tuple[str, str]] = []
    for item in interfaces:
        if not isinstance(item, str) or not item:
            raise ConfigError(
                f"interface {item!r} is not a name or an IPv4 address; available: {_describe(rows)}"
            )
        by_name = [(n, a) for n, _, a in rows if n == item]
        by_addr = [(n, a) for n, _, a in rows if a == item]
        if by_name:
            wanted.extend(by_name)
        elif by_addr:
            wanted.extend(by_addr)
        elif item in known_names:
            raise ConfigError(f"interface {item!r} has no IPv4 address; usable: {_describe(rows)}")
        else:
            raise ConfigError(f"unknown network interface {item!r}; available: {_describe(rows)}")
    # keep the caller's order, drop duplicates ("eth0" and its own address)
    return list(dict.fromkeys(wanted))


def is_wildcard_host(host: str) -> bool:
    return host in _WILDCARD_HOSTS


def parse_tcp_endpoint(endpoint: str) -> tuple[str, int] | None:
    """``"tcp://host:port"`` -> ``(host, port)``; None when it is not a tcp endpoint with a numeric port."""
    m = _TCP_RE.match(endpoint)
    if m is None or not m.group("port").isdigit():
        return None
    port = int(m.group("port"))
    if port > 65535:
        return None
    return m.group("host"), port


def expand_tcp_endpoint(
    bound: str, interfaces: Sequence[str] | None = None, *, include_loopback: bool = False
) -> list[str]:
    """Turn a bound endpoint into the endpoints peers can connect to.

    ``tcp://0.0.0.0:5555`` (or ``tcp://*:5555``) becomes one
    ``tcp://<addr>:5555`` per address of ``interfaces`` (default: all),
    non-loopback ones first. Loopback addresses are included only when they
    are the only ones, when ``include_loopback``, or when ``interfaces``
    names them. Endpoints bound to a specific address, and non-tcp ones, are
    returned unchanged.
    """
    if not bound.startswith("tcp://"):
        return [bound]
    parsed = parse_tcp_endpoint(bound)
    if parsed is None:
        raise ConfigError(f"malformed tcp endpoint {bound!r}; expected tcp://HOST:PORT")
    host, port = parsed
    if not is_wildcard_host(host):
        return [bound]
    if port == 0:
        raise ConfigError(
            f"{bound!r} has port 0; expand the endpoint the socket actually bound (zmq LAST_ENDPOINT)"
        )
    pairs = local_ipv4_addresses(interfaces, include_loopback=True)
    addrs = list(dict.fromkeys(a for _, a in pairs))
    routable = [a for a in addrs if not _is_loopback(a)]
    loop = [a for a in addrs if _is_loopback(a)]
    explicit_loop = interfaces is not None and bool(loop)
    chosen = routable + loop if (include_loopback or explicit_loop or not routable) else routable
    if not chosen:
        raise ConfigError(
            f"no IPv4 address to advertise for {bound!r}; available: {_describe(_scan())}"
        )
    return [f"tcp://{a}:{port}" for a in chosen]

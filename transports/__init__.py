# ruff: noqa: I001 - import order matters here (see the comment at the imports)
"""Transport plugins, found through the entry-point group ``mesh.transports``.

A transport says where a node listens, what it advertises, and whether it can
reach a given peer. The node picks, per peer, the first transport in its own
preference order that both sides offer and that can reach the peer.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import entry_points

# Before anything from mesh: importing mesh.errors runs mesh/__init__, which needs
# transports.base (a user may import this package before mesh).
from transports.base import Locality, Transport

from mesh.errors import TransportError

__all__ = [
    "Locality",
    "Transport",
    "available",
    "choose",
    "load",
    "plugins",
]

ENTRY_POINT_GROUP = "mesh.transports"
log = logging.getLogger("mesh.transports")


@functools.lru_cache(maxsize=1)
def plugins() -> dict[str, Transport]:
    """Every installed transport plugin by name, best first (lowest ``rank``)."""
    found: dict[str, Transport] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
            plugin = cls()
        except Exception as exc:  # a broken plugin must not break the mesh
            log.warning("transport plugin %s failed to load: %s", ep.name, exc)
            continue
        found[plugin.name] = plugin
    if not found:
        # Running from a source tree that was never `pip install`ed: no metadata.
        from transports.zmq_transports import InprocTransport, IpcTransport, TcpTransport

        for cls in (InprocTransport, IpcTransport, TcpTransport):
            plugin = cls()
            found[plugin.name] = plugin
    return dict(sorted(found.items(), key=lambda item: item[1].rank))


def available() -> list[str]:
    """Names of the transports this host can use, best first."""
    return [name for name, plugin in plugins().items() if plugin.available()]


def load(names: Iterable[str] | None = None) -> list[Transport]:
    """Plugins for ``names`` in the given order (default: all available, best first)."""
    installed = plugins()
    if names is None:
        return [p for p in installed.values() if p.available()]
    chosen: list[Transport] = []
    for name in names:
        plugin = installed.get(name)
        if plugin is None:
            raise TransportError(
                f"unknown transport {name!r}; installed transports are {sorted(installed)}"
            )
        if not plugin.available():
            raise TransportError(
                f"transport {name!r} is installed but not usable on this host; "
                f"usable here: {available()}"
            )
        chosen.append(plugin)
    if not chosen:
        raise TransportError("transports=() offers nothing; name at least one, e.g. ('tcp',)")
    return chosen


def choose(
    mine: Sequence[Transport],
    local: Locality,
    peer_endpoints: Mapping[str, Sequence[str]],
    peer: Locality,
) -> tuple[str, str] | None:
    """(transport name, endpoint) to reach a peer: our preference order, first usable."""
    for plugin in mine:
        endpoints = peer_endpoints.get(plugin.name)
        if not endpoints or not plugin.can_reach(local, peer):
            continue
        endpoint = plugin.pick_endpoint(endpoints, local, peer)
        if endpoint is not None:
            return plugin.name, endpoint
    return None

"""``mesh.transports``: what this host can use (the plugins live in the ``transports`` package)."""

from transports import available, choose, load, plugins

__all__ = ["available", "choose", "load", "plugins"]

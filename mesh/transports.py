"""``mesh.transports``: what this host can use (the plugins live in the ``transports`` package).

The functions import the ``transports`` package when called, so importing it
before ``mesh`` (whose errors it uses) does not make an import cycle.
"""

from __future__ import annotations

from typing import Any


def available() -> list[str]:
    """Names of the transports this host can use, best first."""
    from transports import available as _available

    return _available()


def plugins() -> dict[str, Any]:
    """Every installed transport plugin by name, best first."""
    from transports import plugins as _plugins

    return _plugins()


def load(names: Any = None) -> list[Any]:
    from transports import load as _load

    return _load(names)


def choose(*args: Any) -> Any:
    from transports import choose as _choose

    return _choose(*args)


__all__ = ["available", "choose", "load", "plugins"]

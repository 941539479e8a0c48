"""What a node announces about itself, and the interface every discovery method offers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from mesh.errors import ClosedError

log = logging.getLogger(__name__)

__all__ = ["Announcement", "Discovery", "same_cluster_peer"]


@dataclass(frozen=True)
class Announcement:
    """What a node publishes about itself, and what discovery reports about others."""

    cluster: str
    node_id: str
    name: str
    version: int
    transports: tuple[str, ...]  # e.g. ("inproc", "ipc", "tcp")
    endpoints: tuple[str, ...]  # e.g. ("tcp://10.77.0.1:40111", "ipc:///tmp/mesh-ab12.sock")
    host: str = ""  # host token (boot id + netns), lets peers choose ipc/shm
    # Z85 CURVE public key of a secured cluster ("" = unsecured). A hint: a node
    # dials only announcements carrying its own cluster key, and the handshake
    # proves it; an intruder can copy the key but not the secret behind it.
    public_key: str = ""


def same_cluster_peer(me: Announcement, other: Announcement) -> bool:
    """True when ``other`` is another node of ``me``'s cluster (any version: the node decides)."""
    return other.cluster == me.cluster and other.node_id != me.node_id


class Discovery:
    """Base class: finds the other nodes of ``me.cluster`` and reports them.

    ``on_found(announcement)`` may be called again for a node already found
    (its announcement changed); ``on_lost(node_id)`` when a node withdraws.
    Both run on a discovery thread, must be quick, and an exception they
    raise is logged, never propagated. The base class finds nobody, which
    is what ``discovery="none"`` needs.
    """

    def __init__(
        self,
        me: Announcement,
        on_found: Callable[[Announcement], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self.me = me
        self._on_found = on_found
        self._on_lost = on_lost
        self._state_lock = threading.Lock()
        self._started = False
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        with self._state_lock:
            if self._closed:
                raise ClosedError("discovery was closed; create a new one")
            self._started = True

    def close(self) -> None:
        """Stop discovering and withdraw; idempotent and bounded in time."""
        with self._state_lock:
            self._closed = True

    def __enter__(self) -> Discovery:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Subclasses report through these so a faulty callback never kills their thread.
    def _emit_found(self, ann: Announcement) -> None:
        if self._closed:
            return
        try:
            self._on_found(ann)
        except Exception:
            log.exception("discovery on_found callback failed for node %s", ann.node_id)

    def _emit_lost(self, node_id: str) -> None:
        if self._closed:
            return
        try:
            self._on_lost(node_id)
        except Exception:
            log.exception("discovery on_lost callback failed for node %s", node_id)

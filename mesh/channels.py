"""Point-to-point channels: tagged messages between two nodes, for collectives.

A channel is a named mailbox on every node that opened it. ``send`` goes
straight to one peer (no subject routing, no interest); ``recv`` waits for the
message with a given (peer, tag). Messages that arrive before the local side
opened the channel are kept (bounded) and handed over when it does.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from mesh.errors import ClosedError, PeerLostError, TimeoutError

if TYPE_CHECKING:
    from mesh.node import Node

# Bounds on messages held for channels not yet opened on this node.
EARLY_MAX_MESSAGES = 4096
EARLY_MAX_AGE = 60.0


class ChannelMessage:
    __slots__ = ("sender", "tag", "meta", "data", "array")

    def __init__(self, sender: str, tag: Hashable, meta: Any, data: Any, array: Any) -> None:
        self.sender = sender
        self.tag = tag
        self.meta = meta
        self.data = data
        self.array = array  # numpy view on the received frame, or None for bytes


class Channel:
    """One node's end of a named point-to-point channel. Thread-safe."""

    def __init__(self, node: Node, name: str) -> None:
        self.node = node
        self.name = name
        self._cond = threading.Condition()
        self._box: dict[tuple[str, Hashable], collections.deque] = {}
        self._lost: dict[str, str] = {}  # peer id -> why
        self._closed = False

    # -- called by the node's I/O thread --------------------------------------

    def _put(self, msg: ChannelMessage) -> None:
        with self._cond:
            self._box.setdefault((msg.sender, msg.tag), collections.deque()).append(msg)
            self._cond.notify_all()

    def _peer_lost(self, peer_id: str, why: str) -> None:
        with self._cond:
            self._lost[peer_id] = why
            self._cond.notify_all()

    # -- API for collectives ----------------------------------------------------

    def send(
        self,
        peer_id: str,
        tag: Hashable,
        data: Any,
        meta: Any = None,
        timeout: float | None = None,
    ) -> Any:
        """Send bytes or a numpy array to ``peer_id`` without copying it.

        Returns a zmq MessageTracker: the buffer may be modified only once it is
        done (``tracker.wait()``). Raises PeerLostError if the peer is gone.
        """
        if self._closed:
            raise ClosedError(f"channel {self.name!r} is closed")
        return self.node._channel_send(self.name, peer_id, tag, data, meta, timeout)

    def recv(self, peer_id: str, tag: Hashable, timeout: float) -> ChannelMessage:
        """The message from ``peer_id`` with ``tag``; PeerLostError if the peer dies
        first, TimeoutError after ``timeout`` seconds."""
        key = (peer_id, tag)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                queue = self._box.get(key)
                if queue:
                    msg = queue.popleft()
                    if not queue:
                        del self._box[key]
                    return msg
                if self._closed:
                    raise ClosedError(f"channel {self.name!r} is closed")
                if peer_id in self._lost:
                    raise PeerLostError(self._lost[peer_id], peer=peer_id)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"no message {tag!r} from peer {self.node._peer_name(peer_id)} on "
                        f"channel {self.name!r} within {timeout} s"
                    )
                self._cond.wait(remaining)

    def lost(self) -> dict[str, str]:
        with self._cond:
            return dict(self._lost)

    def discard(self, predicate: Any) -> int:
        """Drop buffered messages whose tag satisfies ``predicate`` (stale incarnations)."""
        with self._cond:
            dropped = 0
            for key in [k for k in self._box if predicate(k[1])]:
                dropped += len(self._box.pop(key))
            return dropped

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._box.clear()
            self._cond.notify_all()
        self.node._close_channel(self)

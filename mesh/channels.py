"""Point-to-point channels: tagged messages between two nodes, for collectives.

A channel is a named mailbox on every node that opened it. ``send`` goes
straight to one peer (no subject routing, no interest); ``recv`` waits for the
message with a given (peer, tag). Messages that arrive before the local side
opened the channel are kept (bounded) and handed over when it does.

A peer that *left* (closed its node) may still have messages on the way: the
node delivers them for ``LEFT_GRACE`` seconds after the goodbye, which can
overtake them (it may come as membership gossip). So a receive from such a
peer keeps waiting that long before it raises PeerLostError; a peer declared
dead fails receives at once.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Hashable
from typing import Any

from mesh.errors import ClosedError, PeerLostError, TimeoutError

# Data from a peer that left this recently is still delivered: its goodbye (on the
# control pipe, or as gossip) may overtake the last messages it sent before closing.
LEFT_GRACE = 2.0

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

    def __init__(self, node: Any, name: str) -> None:
        self.node = node
        self.name = name
        self._cond = threading.Condition()
        self._box: dict[tuple[str, Hashable], collections.deque] = {}
        self._lost: dict[str, str] = {}  # peer id -> why
        self._grace: dict[str, float] = {}  # left peers: deliver until this monotonic time
        self._closed = False

    # -- called by the node's I/O thread --------------------------------------

    def _put(self, msg: ChannelMessage) -> None:
        with self._cond:
            self._box.setdefault((msg.sender, msg.tag), collections.deque()).append(msg)
            self._cond.notify_all()

    def _peer_lost(self, peer_id: str, why: str) -> None:

        peer = self.node._peers.get(peer_id)
        with self._cond:
            self._lost[peer_id] = why
            if peer is not None and peer.state == "left":
                self._grace[peer_id] = peer.gone_at + LEFT_GRACE
            self._cond.notify_all()

    def _failed(self, peer_id: str, now: float) -> bool:
        """The peer is gone and nothing more can come from it (lock held)."""
        return peer_id in self._lost and now >= self._grace.get(peer_id, 0.0)

    # -- API for collectives ----------------------------------------------------

    def send(
        self,
        peer_id: str,
        tag: Hashable,
        data: Any,
        meta: Any = None,
        timeout: float | None = None,
    ) -> Any:
        """Send bytes or a numpy array to ``peer_id``.

        Returns a tracker: the buffer may be modified only once it is ``done``
        (``tracker.wait()``). Payloads below ``mesh.engine.link.P2P_COPY_BYTES`` are
        copied (done at once), larger ones go zero-copy or through shared
        memory. Raises PeerLostError if the peer is gone.
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
                now = time.monotonic()
                if self._failed(peer_id, now):
                    raise PeerLostError(self._lost[peer_id], peer=peer_id)
                remaining = deadline - now
                if remaining <= 0:
                    raise TimeoutError(
                        f"no message {tag!r} from peer {self.node._peer_name(peer_id)} on "
                        f"channel {self.name!r} within {timeout} s"
                    )
                if peer_id in self._lost:  # left: its last messages may still come
                    remaining = min(remaining, self._grace[peer_id] - now)
                self._cond.wait(remaining)

    def lost(self) -> dict[str, str]:
        """Peers gone for good (left ones only once their grace is over): id -> why."""
        with self._cond:
            now = time.monotonic()
            return {p: why for p, why in self._lost.items() if self._failed(p, now)}

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

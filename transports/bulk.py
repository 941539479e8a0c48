"""The bulk-channel interface: how large arrays travel beside a peer's ZeroMQ link.

Every peer pair has a ZeroMQ control link (inproc, ipc or tcp). A bulk channel
is another path for large arrays between the two: shared memory on one host,
RDMA between hosts with verbs devices. A node holds one channel object per kind
(``mesh.engine.bulk_shm.ShmChannel`` over transports/shm.py,
``mesh.engine.bulk_rdma.RdmaChannel`` over transports/rdma.py), best first;
the engine's generic send and receive paths call only the methods below, never
a kind by name, so a new kind is a new class rather than edits across the engine.

Threads: ``start``, ``accept``, ``on_control``, ``on_command``, ``tick``,
``wait``, ``hold``, ``open_array``, ``peer_gone``, ``before_goodbye`` and
``close`` run on the node's I/O thread (``start``/``close`` with the node's);
``before_send`` on the sending thread before it takes the link lock;
``send_array``, ``frames_for_socket``, ``keeps_order`` and ``fall_back`` on
the sending thread under the link lock. Nothing may block for long: a channel
that cannot take an array now returns None and the array goes on the socket.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class BulkChannel:
    """One kind of bulk channel on one node. Subclasses override what they use."""

    name: str = ""
    #: the hello field that carries our offer (``offer()``); ``accept`` reads the peer's
    hello_key: str = ""
    #: control-message kinds (mesh.wire) this channel handles (``on_control``)
    kinds: tuple[int, ...] = ()
    #: the header flag (mesh.wire) of messages whose array waits in the channel
    flag: int = 0

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Find out whether this node can offer the channel at all."""

    def offer(self) -> Any:
        """What our hello tells peers under ``hello_key`` (None: nothing offered)."""
        return None

    def accept(self, peer: Any, hello: dict) -> None:
        """A peer's hello arrived (after our answer): agree on the channel if both can."""

    def peer_gone(self, peer: Any) -> None:
        """The peer left or died: release what was set up to receive from it."""

    def before_goodbye(self) -> None:
        """The node is closing (I/O thread, before its goodbyes): flush and close."""

    def close(self) -> None:
        """The node closed: release node-wide resources."""

    # -- sending --------------------------------------------------------------------

    def in_use(self, link: Any) -> bool:
        """Do large arrays to this link go through the channel now?"""
        return False

    def before_send(self, link: Any, nbytes: int, timeout: float) -> None:
        """A sender that accepts waiting (``timeout``), before it takes the link lock."""

    def send_array(self, link: Any, peer_id: str, frames_for: Callable[[int, list], list],
                   payload: list, nbytes: int, track: bool) -> Any:
        """Send one array message (``payload``: descriptor, data) through the channel.
        ``frames_for(extra_flags, payload)`` builds its socket frames. Returns
        ``("sent", tracker)`` (it went entirely through the channel; with ``track``,
        ``tracker.wait()`` says when the caller's buffer is free), ``("carried",
        frames, undo)`` (the socket carries ``frames``, which point into the channel;
        call ``undo()`` if they are not sent), or None (not now: the socket as is)."""
        return None

    def frames_for_socket(self, link: Any, frames: list) -> tuple[list, Callable[[], None] | None]:
        """Frames about to go on the link's data socket, where the channel keeps an
        order with the socket (``keeps_order``): it may put a marker in front.
        Returns the frames and what to call once they are queued (or None)."""
        return frames, None

    def keeps_order(self, link: Any) -> bool:
        """Must data-socket messages to this link pass ``frames_for_socket``, none
        overtaking another while it waits for room?"""
        return False

    def fall_back(self, link: Any, peer_id: str, err: Any) -> None:
        """The channel failed for this link: resend what it held on the socket, stay off."""

    # -- receiving ------------------------------------------------------------------

    def open_array(self, peer: Any, descriptor: bytes) -> tuple[Any, int]:
        """A message flagged ``flag``: its array's bytes (a view) and size, from the
        descriptor the socket carried; ProtocolError when that cannot be."""
        raise NotImplementedError

    def on_control(self, kind: int, peer: Any, ident: bytes, body: Any, frames: list,
                   now: float) -> None:
        """A control message of one of ``kinds`` from ``peer``."""

    def on_command(self, cmd: tuple) -> None:
        """A command the channel queued for the I/O thread (``cmd[0] == name``)."""

    def hold(self, frames: list, now: float) -> bool:
        """A socket message just read: True when the channel holds it back, to hand
        it on after arrays the peer sent before it through the channel."""
        return False

    def tick(self) -> None:
        """Every turn of the I/O loop (cheap when there is nothing to do)."""

    def wants_wait(self) -> bool:
        """Must the I/O thread wait on the channel too (``wait``), not the ROUTER alone?"""
        return False

    def wait(self, wait_ms: int) -> None:
        """Wait up to ``wait_ms`` on the ROUTER and the channel, then drive both."""

    def stats(self, link: Any) -> dict | None:
        """status()["peers"][i][name] (None: not in use with this peer)."""
        return None

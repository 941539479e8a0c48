"""Shared memory as a bulk channel (transports/shm.py does the work).

Between processes of one host (same boot and network namespace, a readable
beacon), whatever the link's transport (ipc or tcp): large arrays are copied
into a slot of the sender's segments and only a descriptor crosses the socket.
The receiver releases slots as the application drops its views (``_shm_wake``
from any thread, releases sent by the I/O thread).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import zmq

from mesh import wire
from mesh.engine.link import Link
from mesh.errors import ProtocolError
from mesh.peers import Peer
from transports.bulk import BulkChannel

log = logging.getLogger("mesh")


class ShmGlue:
    """Offer, agreement and sending through shared memory (mixin of ``mesh.Node``)."""

    def _init_shm(self) -> None:
        self._beacon: Any = None
        self._shm_threshold = self.options["shm_threshold"]
        self._shm_dirty = False  # a shared-memory view was released: tell its sender

    def _start_shm(self) -> None:
        """Offer shared memory to same-host peers when this node talks to any."""
        self._beacon = None
        if not self.options["shm"]:
            return
        from transports import shm

        if not shm.shm_usable():
            return
        shm.cleanup_stale()  # segments of processes that died without cleaning up
        try:
            self._beacon = shm.Beacon(self.id)
        except OSError as exc:
            log.info("%s: no shared memory (%s); arrays stay on the socket", self.name, exc)

    def _to_shm(self, link: Link, payload: list) -> tuple[list, Any]:
        """Copy an array's bytes into a shared-memory slot for the peer: the frames
        then carry only descriptors. (payload, None) when no slot is free now."""
        desc = link.shm_out.write(np.frombuffer(payload[1], np.uint8))
        if desc is None:
            return payload, None  # pool full or no space: the socket path it is
        return [payload[0], desc.pack()], desc

    def _agree_shm(self, peer: Peer, offer: Any) -> None:
        """If we can map the peer's shared memory, say so: it then sends us large
        arrays through it. Only between processes of one host (inproc needs none)."""
        if (
            self._beacon is None
            or peer.shm_in is not None
            or peer.link is None
            or peer.link.transport == "inproc"
            or type(offer) is not list
            or len(offer) != 2
        ):
            return
        from transports import shm

        if not shm.can_use_shm(self._locality, peer.locality) or not shm.check_beacon(
            peer.id, offer[0], offer[1]
        ):
            return
        peer.shm_in = shm.ShmReceiver(peer.id, notify=self._shm_wake)
        self._send_control(peer.id, wire.SHM_OK, None)

    def _shm_wake(self) -> None:
        # Called from whatever thread dropped a view's last reference (even inside
        # the garbage collector): never block here.
        self._shm_dirty = True
        if self._waker_lock.acquire(blocking=False):
            try:
                self._waker.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            finally:
                self._waker_lock.release()

    def _send_shm_releases(self) -> None:
        self._shm_dirty = False
        from transports import shm

        for peer in list(self._peers.values()):
            if peer.shm_in is not None:
                pairs = peer.shm_in.take_releases()
                if pairs:
                    self._send_control(peer.id, wire.SHM_RELEASE, shm.pack_releases(pairs))


# publish(timeout=...) of a large array waits at most this long (seconds) for a
# free shared-memory slot before it takes the socket path.
_SHM_WAIT = 0.5


class ShmChannel(BulkChannel):
    """Shared memory behind the bulk-channel interface (transports/bulk.py)."""

    name = "shm"
    hello_key = "shm"
    kinds = (wire.SHM_OK, wire.SHM_RELEASE)
    flag = wire.SHM

    def __init__(self, node: Any) -> None:
        self.node = node

    def start(self) -> None:
        self.node._start_shm()

    def offer(self) -> Any:
        beacon = self.node._beacon
        return [beacon.name, beacon.token] if beacon is not None else None

    def accept(self, peer: Peer, hello: dict) -> None:
        self.node._agree_shm(peer, hello.get("shm"))

    def peer_gone(self, peer: Peer) -> None:
        if peer.shm_in is not None:
            peer.shm_in.close()  # views the application still holds stay valid
            peer.shm_in = None

    def close(self) -> None:
        if self.node._beacon is not None:
            self.node._beacon.close()

    def in_use(self, link: Link) -> bool:
        return link.shm_out is not None

    def before_send(self, link: Link, nbytes: int, timeout: float) -> None:
        # A full pool frees up as the peer consumes: a caller that accepts waiting
        # waits for a slot (not holding the link lock) rather than sending through
        # the kernel, which is several times slower (and under CURVE, encrypted).
        shm_out = link.shm_out
        if shm_out is not None and nbytes >= self.node._shm_threshold:
            shm_out.wait_for_room(nbytes, min(timeout, _SHM_WAIT))

    def send_array(self, link: Link, peer_id: str, frames_for: Any, payload: list,
                   nbytes: int, track: bool) -> Any:
        shm_out = link.shm_out
        if shm_out is None or nbytes < self.node._shm_threshold:
            return None
        payload, desc = self.node._to_shm(link, payload)
        if desc is None:
            return None  # pool full or no space: the socket path it is
        # The undo frees a slot never announced to the peer (it would never release it).
        return ("carried", frames_for(wire.SHM, payload), lambda: shm_out.abort(desc))

    def open_array(self, peer: Peer, descriptor: bytes) -> tuple[Any, int]:
        if peer.shm_in is None:
            raise ProtocolError("shared memory from a peer that was never offered it", "shm_unexpected")
        from transports.shm import ShmDescriptor

        # A view on the peer's segment; its slot is released when the application
        # drops the last view of it.
        view = peer.shm_in.open(ShmDescriptor.unpack(descriptor))
        return view.data, view.descriptor.nbytes

    def on_control(self, kind: int, peer: Peer, ident: bytes, body: Any, frames: list,
                   now: float) -> None:
        from transports import shm

        link = peer.link
        if kind == wire.SHM_OK:
            if self.node._beacon is not None and link is not None and link.shm_out is None:
                with link.lock:
                    link.shm_out = shm.ShmSender(self.node.id)
        elif link is not None and link.shm_out is not None:  # SHM_RELEASE
            link.shm_out.on_release(shm.unpack_releases(body))

    def tick(self) -> None:
        if self.node._shm_dirty:
            self.node._send_shm_releases()

    def stats(self, link: Link) -> dict | None:
        return link.shm_out.stats() if link.shm_out is not None else None

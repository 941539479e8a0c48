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
from mesh.peers import Peer

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

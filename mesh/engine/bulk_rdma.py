"""RDMA as a bulk channel (transports/rdma.py does the verbs work).

Owns the RDMA state: the setup thread (``mesh-rdma-<node>``: queue pairs are
made off the I/O thread), the connections per link (driven by the I/O thread,
used by senders under the link lock), and the ordering between the two paths:
messages sent on the socket after an array sent by RDMA carry a sync
(SendOrder), and the receiver holds socket messages back until the arrays sent
before them have landed (ReceiveOrder, ``_rdma_hold``).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any

import msgpack
import numpy as np
import zmq

from mesh import wire
from mesh.channels import LEFT_GRACE
from mesh.engine.common import _STOP, _BatchedFrame, _header_kind, _peer_id_of
from mesh.engine.link import Link
from mesh.errors import (
    ProtocolError,
)
from mesh.peers import Peer
from transports.base import choose_bulk
from transports.bulk import BulkChannel
from transports.rdma import RdmaError
from transports.rdma_core import RdmaTag, ReceiveOrder, SendOrder, Sync

log = logging.getLogger("mesh")

class _RdmaTracker:
    """What a channel send returns when the array went through RDMA: done once the
    peer's ring holds all of it (or it was resent on the socket)."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = threading.Event()

    @property
    def done(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float | None = None) -> None:
        if not self.event.wait(timeout):
            raise zmq.NotDone()

# A message from a peer that also sends by RDMA waits for the messages sent before it
# on the other path (see _rdma_hold); this long without progress, they count as lost.
_RDMA_HOLD = 10.0

def _rdma_tag(epoch: Any, index: Any, k: Any) -> RdmaTag:
    """An RdmaTag (or the fields of a Sync) from the network: three ints >= 0."""
    if not all(type(v) is int and 0 <= v < 1 << 63 for v in (epoch, index, k)):
        raise ProtocolError("malformed rdma order fields", "malformed")
    return RdmaTag(epoch, index, k)


class RdmaGlue:
    """Offer, agreement, sending, progress and ordering of RDMA (mixin of ``mesh.Node``)."""

    def _init_rdma(self) -> None:
        self._rdma: Any = None  # transports.rdma.RdmaTransport when usable
        self._rdma_threshold = self.options["rdma_threshold"]
        self._rdma_links: dict[Link, tuple[str, Any]] = {}  # I/O thread: link -> (peer id, conn)
        self._rdma_offers: dict[str, Any] = {}  # peer id -> our offered conn (None: being made)
        self._rdma_poller: Any = None
        # Data-pipe identity -> the order of what that peer sends on both paths.
        self._rdma_order: dict[bytes, ReceiveOrder] = {}
        self._rdma_next_expire = 0.0
        # Queue-pair setup runs on its own thread (see _rdma_submit).
        self._rdma_jobs: Any = None
        self._rdma_setup_lock = threading.Lock()
        self._rdma_setup_open = True

    def _start_rdma(self) -> None:
        """Offer RDMA to peers when the rdma transport is among ours and usable."""
        plugin = next((t for t in self._transports if t.name == "rdma"), None)
        if plugin is None:
            return
        if self._keys is not None:
            # RDMA writes cross the wire in clear: a secured cluster keeps arrays on CURVE.
            log.info("%s: secured cluster: rdma not offered (it is not encrypted)", self.name)
            return
        device = self.options["rdma_device"]
        if device is not None and getattr(plugin, "rdma_device", None) != device:
            plugin = type(plugin)(rdma_device=device)
        if plugin.available():
            self._rdma = plugin
        else:
            log.info("%s: rdma device %s not usable; arrays stay on the socket", self.name, device)

    def _to_rdma(self, link: Link, peer_id: str, frames: list, tracker: Any) -> bool:
        """Send a tensor message (header, descriptor, data) through the link's RDMA
        connection (caller holds the link lock). False: send it on the socket."""
        conn = link.rdma
        if conn.state != "ready":
            return False  # still connecting
        order = link.rdma_order
        if order is None:  # the first array by RDMA on this link: order matters from now on
            order = link.rdma_order = SendOrder(int.from_bytes(os.urandom(4), "big"))
        tag = order.next_rdma()
        meta = msgpack.packb([bytes(frames[0]), bytes(frames[1]), *tag], use_bin_type=True)
        try:
            msg_id = conn.send(np.frombuffer(frames[2], np.uint8), meta=meta)
        except RdmaError as err:
            self._rdma_fallback(link, peer_id, err)
            return False
        except Exception as exc:  # noqa: BLE001 - e.g. meta too large: this one goes on the socket
            log.debug("rdma send to %s refused: %s", peer_id, exc)
            return False
        sync = order.sent_rdma(tag)
        if sync is not None:  # socket messages went before it: the peer holds it for this
            self._rdma_send_sync(link, sync)
        if tracker is not None:
            link.rdma_trackers[msg_id] = tracker
        return True

    def _rdma_sync(self, link: Link, frames: list) -> tuple[list, Sync | None]:
        """A data message for the socket of a link that sends arrays by RDMA (link lock
        held): where the path changes, a sync goes in front of it (SendOrder), in the
        same ZeroMQ message so neither is lost without the other. Returns the frames
        and the sync, to confirm with ``link.rdma_order.synced()`` once it is queued."""
        sync = link.rdma_order.socket()
        if sync is None:
            return frames, None
        return [wire.pack(wire.RDMA_SYNC, list(sync)), *frames], sync

    def _rdma_send_sync(self, link: Link, sync: Sync) -> None:
        """A sync on its own (link lock held). When the socket queue is full it stays
        pending: the I/O thread retries it, and the next socket message carries it."""
        try:
            link.sock.send(wire.pack(wire.RDMA_SYNC, list(sync)), zmq.NOBLOCK)
        except zmq.ZMQError:
            return
        link.rdma_order.synced(sync)

    def _rdma_fallback(self, link: Link, peer_id: str, err: Any, quiet: bool = False) -> None:
        """The link's RDMA connection failed (caller holds the link lock): resend what
        it had not delivered on the socket and stay there. The I/O thread closes it."""
        if link.rdma is None:
            return
        link.rdma = None
        link.rdma_off = True
        (log.debug if quiet else log.warning)(
            "%s: rdma to %s failed (%s); arrays go over %s from now on",
            self.name, self._peer_name(peer_id), err, link.transport)
        for _msg_id, array, meta in err.unsent:
            try:
                header, descriptor, *tag = msgpack.unpackb(meta, raw=False)
                # Marked as sent by RDMA: the peer delivers it in its place, and drops
                # it if the first copy landed after all.
                frames = [wire.pack(wire.RDMA_RESENT, tag), header, descriptor, array]
                try:
                    link.sock.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    if not link.sock.poll(int(self.options["peer_timeout"] * 1000), zmq.POLLOUT):
                        raise
                    link.sock.send_multipart(frames, zmq.NOBLOCK)
            except Exception as exc:  # noqa: BLE001
                self._count_drop("send_error", link)
                log.debug("resending to %s after rdma failed: %s", peer_id, exc)
        for tracker in link.rdma_trackers.values():
            tracker.event.set()  # resent by copy (or lost): the caller's buffer is free
        link.rdma_trackers.clear()

    def _rdma_wait(self, wait_ms: int) -> None:
        """Wait on the ROUTER and the RDMA connections' completion channels, then
        drive the connections (a short timer for one without a channel fd)."""
        poller = self._rdma_poller
        if poller is None:
            poller = self._rdma_poller = zmq.Poller()
            poller.register(self._router, zmq.POLLIN)
            timer = False
            for _peer_id, conn in self._rdma_links.values():
                fd = conn.fileno()
                if fd is None:
                    timer = True
                else:
                    poller.register(fd, zmq.POLLIN)
            poller.timer = timer  # type: ignore[attr-defined]
        events = dict(poller.poll(min(wait_ms, 1 if poller.timer else 50)))  # type: ignore[attr-defined]
        if self._router in events:
            self._drain_router()
        self._rdma_progress()

    def _rdma_progress(self) -> None:
        now = time.monotonic()
        for link, (peer_id, conn) in list(self._rdma_links.items()):
            received: list = []
            ident = peer_id.encode()
            with link.lock:
                # Also once for a link that is gone or failed over meanwhile (on a
                # publishing thread): what landed in its ring is handed out first.
                try:
                    progress = conn.progress()
                except RdmaError as err:
                    received = err.received
                    if link.rdma is conn and not link.closed:
                        self._rdma_fallback(link, peer_id, err)
                    elif link.rdma is conn:
                        link.rdma = None
                    self._rdma_forget(link)
                else:
                    received = progress.received
                    for msg_id in progress.sent:
                        tracker = link.rdma_trackers.pop(msg_id, None)
                        if tracker is not None:
                            tracker.event.set()
                    if link.closed or link.rdma is not conn:
                        self._rdma_forget(link)
                    order = self._rdma_order.get(ident)
                    if order is not None:  # bytes landing: a long array is on its way
                        order.progress(conn.stats["bytes_received"], now)
                if link.closed and link.rdma_trackers:  # the peer is gone: nothing to wait for
                    for tracker in link.rdma_trackers.values():
                        tracker.event.set()
                    link.rdma_trackers.clear()
                if link.rdma_order is not None and link.rdma_order.pending is not None:
                    self._rdma_send_sync(link, link.rdma_order.pending)  # a full queue lost it
            for r in received:
                try:
                    header, descriptor, epoch, index, k = msgpack.unpackb(r.meta, raw=False)
                    tag = _rdma_tag(epoch, index, k)
                    frames = [_BatchedFrame(ident), _BatchedFrame(header),
                              _BatchedFrame(descriptor), _BatchedFrame(memoryview(r.array))]
                except Exception:  # noqa: BLE001
                    self._drop("malformed", ident, "undecodable rdma message meta")
                    continue
                self._rdma_arrived(ident, tag, frames, now)
        if self._rdma_order and now >= self._rdma_next_expire:
            self._rdma_next_expire = now + 0.1
            self._rdma_expire(now)
        if self._io_batch:
            self._dispatch.put(self._io_batch)
            self._io_batch = []

    def _rdma_arrived(self, ident: bytes, tag: RdmaTag, frames: list, now: float) -> None:
        """A message the peer sent by RDMA (through the queue pair, or re-sent on the
        socket): handle it, and what waited for it, in the order the peer sent them."""
        order = self._rdma_order.get(ident)
        if order is None:
            order = self._rdma_order[ident] = ReceiveOrder()
        for item in order.rdma(tag, frames, now):
            self._handle_frames(item, now, ordered=True)

    def _rdma_hold(self, frames: list, now: float) -> bool:
        """A socket message from a peer that also sends us arrays by RDMA: hold it
        while an array sent before it has not arrived yet (see ReceiveOrder). Syncs
        and re-sent arrays go on to _handle, which applies them in their place."""
        order = self._rdma_order.get(frames[0].bytes)  # data pipe only: never control
        if order is None or not order.blocked or len(frames) < 2:
            return False
        if _header_kind(frames[1]) in (wire.RDMA_SYNC, wire.RDMA_RESENT):
            return False
        for item in order.socket(frames, now):
            self._handle_frames(item, now, ordered=True)
        return True

    def _on_rdma_sync(self, ident: bytes, body: Any, frames: list, now: float) -> None:
        """A sync on the data pipe (alone, or in front of a data message)."""
        if self._rdma is None or b"/" in ident:
            raise ProtocolError("rdma sync from a peer we exchange no rdma with", "unexpected")
        sync = Sync(*_rdma_tag(*body)) if type(body) is list and len(body) == 3 else None
        if sync is None:
            raise ProtocolError("malformed rdma sync", "malformed")
        order = self._rdma_order.get(ident)
        if order is None:
            order = self._rdma_order[ident] = ReceiveOrder()
        released = order.sync(sync, now)
        if len(frames) > 2:  # the data message it came in front of
            rest = [frames[0], *frames[2:]]
            if order.blocked:
                released += order.socket(rest, now)
            else:
                released.append(rest)
        for item in released:
            self._handle_frames(item, now, ordered=True)

    def _on_rdma_resent(self, ident: bytes, body: Any, frames: list, now: float) -> None:
        """A message first sent by RDMA, re-sent on the socket after the queue pair failed."""
        if self._rdma is None or b"/" in ident:
            raise ProtocolError("rdma resend from a peer we exchange no rdma with", "unexpected")
        if type(body) is not list or len(body) != 3 or len(frames) < 3:
            raise ProtocolError("malformed rdma resend", "malformed")
        self._rdma_arrived(ident, _rdma_tag(*body), [frames[0], *frames[2:]], now)

    def _rdma_expire(self, now: float) -> None:
        """Release what waited too long for a message that was lost; forget the order
        of peers that are gone (what they sent is handled as it stands)."""
        for ident, order in list(self._rdma_order.items()):
            overflowed = order.take_overflowed()
            if overflowed:
                # Counted here (each tick), not per message: it is rare and wants a log line.
                self.counters.drops["rdma_order_full"] += overflowed
                log.warning("%s: %d waits for messages from %s sent by rdma were given up: "
                            "over %d messages waited behind them (lost?); delivered anyway",
                            self.name, overflowed, self._peer_name(_peer_id_of(ident)),
                            order.max_held)
            peer = self._peers.get(_peer_id_of(ident))
            if peer is None or peer.state == "dead" or (
                    peer.state == "left" and now - peer.gone_at > LEFT_GRACE):
                del self._rdma_order[ident]
                released = order.flush()
            elif order.held:
                forced = order.forced
                released = order.expire(now, _RDMA_HOLD)
                if order.forced > forced:
                    self.counters.drops["rdma_order_timeout"] += order.forced - forced
                    log.warning("%s: messages from %s waited %.0f s for earlier ones sent by "
                                "rdma that did not come (lost?); delivering them",
                                self.name, self._peer_name(_peer_id_of(ident)), _RDMA_HOLD)
            else:
                continue
            for item in released:
                self._handle_frames(item, now, ordered=True)

    def _rdma_forget(self, link: Link) -> None:
        """Close a link's RDMA connection (I/O thread, link lock held)."""
        entry = self._rdma_links.pop(link, None)
        self._rdma_poller = None  # its fds change
        if entry is not None:
            try:
                entry[1].close()
            except Exception as exc:  # noqa: BLE001
                log.debug("closing an rdma connection: %s", exc)

    def _agree_rdma(self, peer: Peer, hello: dict) -> None:
        """Both have RDMA: the lower node id offers a queue pair (after our hello
        answer, so the peer knows us). Shared memory and inproc are better."""
        link = peer.link
        if (
            link is None
            or choose_bulk(
                link.transport,
                shm_both=self._beacon is not None and bool(hello.get("shm"))
                and self._locality.host == peer.locality.host,
                rdma_both=self._rdma is not None and type(hello.get("rdma")) is dict,
                rdma_failed=link.rdma_off,
            ) != "rdma"
            or self.id > peer.id
            or link.rdma is not None
            or peer.id in self._rdma_offers
        ):
            return
        self._rdma_offers[peer.id] = None  # being made on the setup thread; offered when ready
        self._rdma_submit("offer", peer, None, None)

    def _on_rdma_offer(self, peer: Peer, body: Any) -> None:
        link = peer.link
        if link is None:
            return
        if body is None and self._rdma is not None:
            # The offerer could not connect its half (its log says why): drop ours.
            with link.lock:
                if link.rdma is not None:
                    self._rdma_fallback(link, peer.id, RdmaError(
                        "the peer could not connect its queue pair", link.rdma.unsent()), quiet=True)
                    self._rdma_forget(link)
            link.rdma_off = True
            log.info("%s: %s could not connect rdma; arrays stay on %s",
                     self.name, peer.name, link.transport)
            return
        if self._rdma is None or link.rdma_off or type(body) is not dict:
            self._send_control(peer.id, wire.RDMA_ACCEPT, None)
            return
        with link.lock:
            if link.rdma is not None:  # the peer started over: so do we
                self._rdma_fallback(
                    link, peer.id, RdmaError("the peer offered a new queue pair", link.rdma.unsent()))
                link.rdma_off = False
                self._rdma_forget(link)
        self._rdma_submit("accept", peer, None, body)

    def _on_rdma_accept(self, peer: Peer, body: Any) -> None:
        conn = self._rdma_offers.get(peer.id)
        if conn is None:  # nothing offered, or a step still running on the setup thread
            return
        del self._rdma_offers[peer.id]
        link = peer.link
        if link is None or link.closed or type(body) is not dict:
            conn.close()
            if link is not None:
                link.rdma_off = True
            return
        self._rdma_offers[peer.id] = None  # connecting on the setup thread: no new offer
        self._rdma_submit("connect", peer, conn, body)

    def _rdma_submit(self, what: str, peer: Peer, conn: Any, body: dict | None) -> None:
        """Queue-pair setup (creating the queue pair, registering its ring, moving it
        to RTS: up to seconds, far more under emulation) runs on a setup thread, never
        on the I/O thread: membership probes must not wait for it (a live peer was
        once suspected while one was made). pyverbs holds the GIL in its calls, so
        connect() first has the kernel resolve the peer's address without it (see
        transports.rdma.resolve_neighbour). "offer" makes a queue pair, "accept"
        makes one and connects it to ``body``, "connect" connects ``conn``. The result
        comes back as an ("rdma", ...) command; until then arrays go on the socket."""
        if self._rdma_jobs is None:
            self._rdma_jobs = queue.SimpleQueue()
            threading.Thread(target=self._rdma_setup_loop, name=f"mesh-rdma-{self.name}",
                             daemon=True).start()
        self._rdma_jobs.put((what, peer.id, peer.link, conn, body))

    def _rdma_setup_loop(self) -> None:
        jobs = self._rdma_jobs
        while True:
            job = jobs.get()
            if job is _STOP:
                return
            what, peer_id, link, conn, body = job
            error = None
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = self._rdma.connection()
                if body is not None:
                    conn.connect(body)
            except Exception as exc:  # noqa: BLE001 - reported by _rdma_setup_done
                error = exc
            with self._rdma_setup_lock:
                if self._rdma_setup_open:
                    self._command(("rdma", what, peer_id, link, conn, error, time.monotonic() - t0))
                    continue
            if conn is not None:  # the node closed meanwhile
                conn.close()

    def _rdma_setup_done(self, what: str, peer_id: str, link: Link | None, conn: Any,
                         error: Exception | None, seconds: float) -> None:
        """A setup step finished on the setup thread (I/O thread, from _run_command)."""
        peer = self._peers.get(peer_id)
        # The offerer's steps hold a None in _rdma_offers meanwhile (no second offer).
        pending = what != "accept" and self._rdma_offers.get(peer_id, False) is None
        if pending:
            del self._rdma_offers[peer_id]
        if (peer is None or link is None or peer.link is not link or link.closed or link.rdma_off
                or (what != "accept" and not pending)):
            if conn is not None:  # the peer is gone, or one side gave up meanwhile
                conn.close()
            return
        if error is not None:
            log.warning("%s: cannot set up rdma with %s (%s); arrays stay on %s",
                        self.name, peer.name, error, link.transport)
            if conn is not None:
                conn.close()
            link.rdma_off = True
            if what == "accept":
                self._send_control(peer_id, wire.RDMA_ACCEPT, None)
            elif what == "connect":
                self._send_control(peer_id, wire.RDMA_OFFER, None)  # the peer drops its half
            return
        conn.stats["setup_s"] = round(conn.stats.get("setup_s", 0) + seconds, 3)
        if what == "offer":
            self._rdma_offers[peer_id] = conn
            self._send_control(peer_id, wire.RDMA_OFFER, conn.local_info())
            return
        if what == "accept":  # connected: the offerer may write as soon as it connects
            self._send_control(peer_id, wire.RDMA_ACCEPT, conn.local_info())
        self._rdma_use(link, peer, conn)

    def _rdma_use(self, link: Link, peer: Peer, conn: Any) -> None:
        with link.lock:
            old = link.rdma
            if old is not None and old is not conn:  # a newer offer won
                self._rdma_fallback(link, peer.id, RdmaError("replaced by a new queue pair",
                                                             old.unsent()), quiet=True)
                self._rdma_forget(link)
                link.rdma_off = False
            link.rdma = conn
        self._rdma_links[link] = (peer.id, conn)
        self._rdma_poller = None
        log.info("%s: arrays to %s go over rdma (%s, set up in %.2f s)", self.name, peer.name,
                 conn.device.device, conn.stats.get("setup_s", 0.0))

    def _rdma_shutdown(self) -> None:
        """Closing (I/O thread, before the goodbyes): arrays still on their way by RDMA
        are re-sent on the socket (the peer drops the copies that landed anyway), a
        sync keeps the goodbye behind them, and every queue pair is closed."""
        with self._rdma_setup_lock:
            self._rdma_setup_open = False  # the setup thread closes what it finishes
        if self._rdma_jobs is not None:
            self._rdma_jobs.put(_STOP)
        for cmd in list(self._commands):  # finished setups the I/O thread never took
            if cmd[0] == "rdma" and cmd[4] is not None:
                cmd[4].close()
        for link, (peer_id, conn) in list(self._rdma_links.items()):
            with link.lock:
                if link.rdma is conn and not link.closed and conn.unsent():
                    self._rdma_fallback(link, peer_id, RdmaError("closing", conn.unsent()),
                                        quiet=True)
                link.rdma = None
                if link.rdma_order is not None and not link.closed:
                    sync = link.rdma_order.socket()  # the goodbye waits for the arrays
                    if sync is not None:
                        self._rdma_send_sync(link, sync)
                self._rdma_forget(link)
        for conn in self._rdma_offers.values():
            if conn is not None:
                conn.close()
        self._rdma_offers.clear()


class RdmaChannel(BulkChannel):
    """RDMA behind the bulk-channel interface (transports/bulk.py): each method hands
    on to the RdmaGlue code above, kept whole (it is exercised in the RDMA VM)."""

    name = "rdma"
    hello_key = "rdma"
    kinds = (wire.RDMA_OFFER, wire.RDMA_ACCEPT, wire.RDMA_SYNC, wire.RDMA_RESENT)

    def __init__(self, node: Any) -> None:
        self.node = node

    def start(self) -> None:
        self.node._start_rdma()

    def offer(self) -> Any:
        rdma = self.node._rdma
        return rdma.brochure() if rdma is not None else None

    def accept(self, peer: Peer, hello: dict) -> None:
        self.node._agree_rdma(peer, hello)

    def before_goodbye(self) -> None:
        self.node._rdma_shutdown()  # before the goodbyes: they go after what went by RDMA

    def in_use(self, link: Link) -> bool:
        return link.rdma is not None and link.rdma.state == "ready"

    def send_array(self, link: Link, peer_id: str, frames_for: Any, payload: list,
                   nbytes: int, track: bool) -> Any:
        if link.rdma is None or nbytes < self.node._rdma_threshold:
            return None
        tracker = _RdmaTracker() if track else None
        if self.node._to_rdma(link, peer_id, frames_for(0, payload), tracker):
            return ("sent", tracker)
        return None

    def frames_for_socket(self, link: Link, frames: list) -> tuple[list, Any]:
        order = link.rdma_order
        if order is None:
            return frames, None
        frames, sync = self.node._rdma_sync(link, frames)
        return frames, (None if sync is None else lambda: order.synced(sync))

    def keeps_order(self, link: Link) -> bool:
        return link.rdma_order is not None

    def fall_back(self, link: Link, peer_id: str, err: Any) -> None:
        self.node._rdma_fallback(link, peer_id, err)

    def on_control(self, kind: int, peer: Peer, ident: bytes, body: Any, frames: list,
                   now: float) -> None:
        node = self.node
        if kind == wire.RDMA_OFFER:
            node._on_rdma_offer(peer, body)
        elif kind == wire.RDMA_ACCEPT:
            node._on_rdma_accept(peer, body)
        elif kind == wire.RDMA_SYNC:
            node._on_rdma_sync(ident, body, frames, now)
        else:
            node._on_rdma_resent(ident, body, frames, now)

    def on_command(self, cmd: tuple) -> None:
        self.node._rdma_setup_done(*cmd[1:])

    def hold(self, frames: list, now: float) -> bool:
        return bool(self.node._rdma_order) and self.node._rdma_hold(frames, now)

    def wants_wait(self) -> bool:
        return bool(self.node._rdma_links or self.node._rdma_order)

    def wait(self, wait_ms: int) -> None:
        self.node._rdma_wait(wait_ms)

    def stats(self, link: Link) -> dict | None:
        return dict(link.rdma.stats) if link.rdma is not None else None

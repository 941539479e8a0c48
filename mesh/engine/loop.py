"""The I/O thread (``mesh-io-<node>``): poller, commands, timers.

Owns, and is the only code that touches:
- the ROUTER: everything inbound (every peer's data and control DEALERs, status
  requests, and the inproc wake-up pipe other threads poke);
- each link's control DEALER (``link.ctl``: hellos, interest, SWIM, credit that
  found no frame to ride on), seed and rejoin-probe DEALERs;
- the timers: heartbeats, SWIM ticks, batch flushes, held-back credit;
- the command queue (``_commands``): other threads append and wake it
  (``_command``), it runs them after each drain.
It reads a message, decodes it and hands it on (dispatch.py): an inline handler
runs right here, a pull subscription's inbox or the dispatch queue gets it. In the
compiled build it waits and reads through engine/zcore.py (libzmq from C: no GIL
while it waits and reads, one GIL hand-over per wake-up); pyzmq otherwise.
It never waits for a link lock it cannot have at once (``acquire(False)``, try
again later) nor for credit, so heartbeats and membership go on whatever the
publishers do.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

import zmq
from zmq.backend import zmq_poll

from mesh import security, wire
from mesh.channels import EARLY_MAX_AGE, LEFT_GRACE
from mesh.engine import zcore
from mesh.engine.common import (
    _LIVE,
    _QUEUE_FULL_RETRY,
    _WAKE_ID,
    _header_kind,
    _peer_id_of,
)
from mesh.engine.link import Link
from mesh.errors import (
    ConfigError,
    InvalidSubject,
    ProtocolError,
)
from mesh.peers import Peer, parse_summary
from mesh.unknown_peers import UnknownPeers

log = logging.getLogger("mesh")


# What owed credit may ride in front of (Node._owed_credit).
_CREDIT_CARRIERS = (wire.MSG, wire.BATCH, wire.REPLY)

_FIXED = bytes([wire.FIXED])
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

# How long close() waits for its peers to answer its goodbye (seconds): bounded, so
# a frozen or vanished peer costs a closing node at most this.
GOODBYE_WAIT = 0.3


class IoLoop:
    """The I/O loop and what it owns (mixin of ``mesh.Node``; I/O thread only)."""

    def _init_loop(self) -> None:
        self._ctx = zmq.Context.instance()
        # Frames from nodes that have not said hello: normal while they join (I/O thread).
        self._unknown = UnknownPeers(self.name, self.options["peer_timeout"])
        # Commands from other threads, run by the I/O thread after a wake-up.
        self._commands: collections.deque = collections.deque()
        self._batching: dict[Link, float] = {}  # links with waiting messages -> flush time
        self._credit_later: set[Link] = set()  # credit left for a busy link (I/O thread)
        self._logged_once: set[tuple[str, str]] = set()
        # Thread idents of the I/O and dispatch threads (each adds its own): publishes
        # made on them never wait for credit (see LinkSender._send_msg).
        self._engine_idents: set[int] = set()
        self._io_ident = 0
        # When the I/O thread will wake next at the latest (monotonic seconds): other
        # threads wake it sooner only when they need it sooner.
        self._io_wake_at = 0.0
        self._timers_stale = True  # the I/O loop recomputes its timers (not data came)
        self._credit_due = 0.0  # when _flush_credits has something to do next
        self._io_thread: threading.Thread | None = None
        self._discovery: Any = None
        self._zap: Any = None
        self._seed_socks: dict[str, Any] = {}
        self._seed_peer: dict[str, str] = {}
        self._goodbyes = (0, 0)  # at close: peers told goodbye, and those that answered

    def _start_io(self) -> None:
        """Make the sockets the I/O thread owns: the ROUTER (bound to every listen
        endpoint, and to the inproc wake-up endpoint) and the waker other threads
        use under ``_waker_lock``."""
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._router.setsockopt(zmq.RCVHWM, self.options["rcvhwm"])
        self._router.setsockopt(zmq.MAXMSGSIZE, self.options["max_message_size"] + (1 << 20))
        if self._keys is not None:
            # The ZAP handler must be up before the ROUTER binds: without one,
            # libzmq's CURVE server admits any client that knows the server key.
            self._zap = security.zap_register(self._ctx, f"zmesh:{self.id}", self._keys, self.name)
            self._router.setsockopt(zmq.CURVE_SERVER, 1)
            self._router.setsockopt(zmq.CURVE_SECRETKEY, self._keys.secret)
            self._router.setsockopt(zmq.CURVE_PUBLICKEY, self._keys.public)
            self._router.setsockopt(zmq.ZAP_DOMAIN, f"zmesh:{self.id}".encode())
            self._zap.watch(self._router)
        try:
            for plugin in self._transports:
                for endpoint in plugin.bind_endpoints(self._listen, self.id):
                    self._router.bind(endpoint)
                    bound = self._router.getsockopt(zmq.LAST_ENDPOINT).decode()
                    self._bound.append((plugin, bound))
                    self.endpoints.append(bound)
                    self._advertised.setdefault(plugin.name, []).extend(plugin.advertise(bound))
        except zmq.ZMQError as exc:
            self._router.close(linger=0)
            if self._zap is not None:
                self._zap.close()
            self._cleanup_bound()
            raise ConfigError(
                f"cannot listen on {self._listen}: {exc}; pick a free port or another address"
            ) from None
        # Application threads wake the I/O thread through its own ROUTER, so it
        # polls a single socket (cheaper than a poller over two).
        wake_endpoint = f"inproc://zmesh-wake-{self.id}"
        self._router.bind(wake_endpoint)
        self._waker = self._ctx.socket(zmq.DEALER)
        self._waker.setsockopt(zmq.IDENTITY, _WAKE_ID)
        self._waker.setsockopt(zmq.LINGER, 0)
        self._waker.connect(wake_endpoint)
        self._waker_lock = threading.Lock()

    def _command(self, cmd: tuple) -> None:
        self._commands.append(cmd)
        with self._waker_lock:
            try:
                self._waker.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # queue full (the I/O thread is awake anyway) or closing

    def _io_loop(self) -> None:
        self._io_ident = threading.get_ident()
        self._engine_idents.add(self._io_ident)
        router = self._router
        # zmq_poll on a list made once: Socket.poll builds a Poller on every call.
        self._poll_router = [(router, zmq.POLLIN)]
        # libzmq from C when this build and process can (engine/zcore.py).
        core = zcore.available()
        self._router_handle = router.underlying
        next_tick = time.monotonic()
        for seed in self.seeds:
            if not seed.startswith("dns://"):  # their addresses come as "seeds" commands
                self._open_seed(seed)
        # Seeds are retried quickly at first (the connection takes a moment), then
        # every seed_interval.
        seed_delay = 0.02
        next_seed = time.monotonic() + seed_delay
        try:
            # The loop itself (timers, credit flushes, the wait and the read): compiled
            # in engine/zcore.py, so a wake-up with nothing due costs no Python frames.
            zcore.io_loop(self, core, next_tick, next_seed, seed_delay)
        except Exception:
            log.exception("%s: I/O thread crashed; closing the node", self.name)
            self._closed = True
            self._io_shutdown()

    def _drain_router(self) -> None:
        router = self._router
        recv = router.recv
        events = router.get
        now = time.monotonic()
        try:
            for turn in range(2048):  # bounded: timers and commands get their turn
                # Asking first is cheaper than the zmq.Again a nonblocking recv raises
                # at the end of every drain. getsockopt(EVENTS) keeps the GIL where a
                # zmq_poll would let go of it: a thread the last message woke (an
                # inline handler's queue put, a request's event) would take it there
                # and this thread wait to get it back, a switch each way. (Plain ints:
                # pyzmq's flag enums make `&` a Python call.) The loop's own poll just
                # said "readable".
                if turn and not events(_EVENTS) & _POLLIN:
                    return
                try:
                    frame = recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return
                frames = [frame]
                while frame.more:  # the rest of a message is there at once
                    frame = recv(0, copy=False)
                    frames.append(frame)
                self._handle_frames(frames, now)
        finally:
            if self._io_batch:
                # One dispatch item per drain, not per message: fewer thread wake-ups.
                self._dispatch.put(self._io_batch)
                self._io_batch = []

    def _handle_one(self, ident: bytes, head: bytes) -> None:
        """A lone plain message or reply in one frame (wire.unpack_one): _handle's
        first case, for zcore's messages, with _handle_frames's error handling."""
        try:
            kind, fields, data = wire.unpack_one(head)
            if kind == wire.MSG:
                self._on_msg_one(ident, fields, data)
            else:
                self._on_reply_one(ident, fields, data)
        except ProtocolError as exc:
            self._drop(exc.reason, ident, str(exc))
        except InvalidSubject as exc:
            self._drop("invalid_subject", ident, str(exc))
        except Exception:
            self.counters.drops["internal"] += 1
            log.exception("%s: error handling a message; dropped", self.name)

    def _handle_frames(self, frames: list, now: float, ordered: bool = False) -> None:
        if len(frames) == 2 and frames[0].bytes == _WAKE_ID:
            return  # a wake-up: commands run after the drain
        try:
            if not ordered:
                for channel in self._bulk_ordering:
                    if channel.hold(frames, now):
                        return  # it waits for an array its sender sent before it another way
            self._handle(frames, now)
        except ProtocolError as exc:
            self._drop(exc.reason, frames[0].bytes, str(exc))
        except InvalidSubject as exc:
            self._drop("invalid_subject", frames[0].bytes, str(exc))
        except Exception:
            self.counters.drops["internal"] += 1
            log.exception("%s: error handling a message; dropped", self.name)

    def _drop(self, reason: str, ident: bytes, detail: str) -> None:
        self.counters.drops[reason] += 1
        if reason == "unknown_peer":  # DEBUG, or one WARNING if it persists
            self._unknown.frame(_peer_id_of(ident), time.monotonic(), detail)
            return
        key = (ident.hex(), reason)
        if key not in self._logged_once and len(self._logged_once) < 1000:
            self._logged_once.add(key)
            log.warning("%s: dropped a frame from %r (%s): %s", self.name, ident[:32], reason, detail)

    def _handle(self, frames: list, now: float) -> None:
        if len(frames) < 2:
            raise ProtocolError("message without a header frame", "malformed")
        head = frames[1].bytes
        if head[:1] == _FIXED:  # a lone plain message or reply: fixed layout, no msgpack
            if len(frames) == 2:  # small: header and payload in one frame
                kind, fields, data = wire.unpack_one(head)
                if kind == wire.MSG:
                    self._on_msg_one(frames[0].bytes, fields, data)
                else:
                    self._on_reply_one(frames[0].bytes, fields, data)
                return
            self._on_msg_fields(frames[0].bytes, wire.unpack_msg_lone(head), frames)
            return
        header = wire.unpack(head)
        kind = header[1]
        ident = frames[0].bytes
        if kind == wire.MSG:
            self._on_msg(ident, header, frames)
            return
        if kind == wire.REPLY:
            self._on_reply(ident, header, frames)
            return
        if kind == wire.P2P:
            self._on_p2p(ident, header[2], frames)
            return
        if kind == wire.BATCH:
            self._on_batch(ident, header, frames)
            return
        body = header[2]
        self._timers_stale = True  # not data: membership and its timers may change
        if kind == wire.HELLO:
            self._on_hello(body, now)
            return
        if kind == wire.SWIM:
            peer = self._peers.get(_peer_id_of(ident))
            if peer is None:
                raise ProtocolError("membership message from an unknown node", "unknown_peer")
            if peer.state in _LIVE or peer.state == "joining":
                peer.last_seen = now
            self._swim(self._members.handle(peer.id, body, now))
            return
        if kind == wire.BYE:
            peer = self._peers.get(_peer_id_of(ident))
            if peer is None:
                raise ProtocolError("goodbye from a node that never said hello", "unknown_peer")
            # Answered even when gossip said so first: the closing node waits for it.
            self._send_control(peer.id, wire.BYE_ACK, None)
            if peer.state in (*_LIVE, "joining"):
                self._peer_gone(peer, "left")
            return  # a goodbye after the membership gossip said so already is no news
        if kind == wire.BYE_ACK:
            if self._peers.get(_peer_id_of(ident)) is None:
                raise ProtocolError("goodbye answer from a node that never said hello", "unknown_peer")
            return  # late: the node that closes waits for these in _await_goodbye_acks
        if kind == wire.STATUS_REQ:
            self._router.send_multipart([ident, wire.pack(wire.STATUS, [body, self.status()])], zmq.NOBLOCK)
            return
        peer = self._known_peer(ident)
        peer.last_seen = now
        if kind == wire.PING:
            self._send_control(peer.id, wire.PONG, body)
        elif kind == wire.PONG:
            if type(body) is list and body and type(body[0]) is float:
                rtt = now - body[0]
                if 0.0 <= rtt < 3600.0:  # our own timestamp echoed; anything else is forged
                    peer.rtt = rtt
        elif kind == wire.INTEREST:
            self._on_interest(peer, body)
        elif kind == wire.INTEREST_FULL:
            if type(body) is not list or len(body) != 2 or type(body[0]) is not int:
                raise ProtocolError("malformed interest snapshot", "malformed")
            self._set_interest(peer, body[0], wire.check_interest_entries(body[1]))
        elif kind == wire.CREDIT:
            if len(frames) == 2:
                self._on_credit(peer, body)
                return
            # It rode in front of a message or batch.
            rest = [frames[0], *frames[2:]]
            if _header_kind(rest[1]) not in _CREDIT_CARRIERS:
                raise ProtocolError("credit in front of something that carries none", "malformed")
            self._on_credit(peer, body)
            self._handle(rest, now)
        elif kind in self._bulk_kinds:  # a bulk channel's own messages
            self._bulk_kinds[kind].on_control(kind, peer, ident, body, frames, now)
        elif kind == wire.SYNC:
            self._send_control(peer.id, wire.INTEREST_FULL, self._interest_snapshot())
        elif kind == wire.PEERS:
            if type(body) is not list:
                raise ProtocolError("peer list is not a list", "malformed")
            for summary in body:
                self._introduce(parse_summary(summary), now)
        else:
            raise ProtocolError(f"unexpected {wire.KIND_NAMES[kind]} message", "unknown_kind")

    def _known_peer(self, ident: bytes) -> Peer:
        peer = self._peers.get(_peer_id_of(ident))
        if peer is None or peer.state not in ("alive", "suspect", "joining"):
            if peer is not None and peer.state == "left" and time.monotonic() - peer.gone_at < LEFT_GRACE:
                return peer
            raise ProtocolError("message from a node that has not said hello", "unknown_peer")
        return peer

    def _flush_batches(self, now: float) -> float | None:
        """Send batches that waited batch_delay (I/O thread); the next deadline."""
        next_deadline = None
        for link, due in list(self._batching.items()):
            if due > now:
                next_deadline = due if next_deadline is None else min(next_deadline, due)
                continue
            if not link.lock.acquire(False):
                # A publisher holds the link (it may hold it for long: copying an array
                # into shared memory, or waiting for room on a link that sends arrays
                # by RDMA): never wait for it here, the node's heartbeats go on; later.
                due = now + _QUEUE_FULL_RETRY
                self._batching[link] = due
                next_deadline = due if next_deadline is None else min(next_deadline, due)
                continue
            try:
                if link.batch and now - link.batch_since >= self._batch_delay:
                    self._flush_batch(link, keep=True)
                if link.batch:  # a new batch began since (or it waits for room): later
                    due = link.batch_since + self._batch_delay
                    self._batching[link] = due
                    next_deadline = due if next_deadline is None else min(next_deadline, due)
                else:
                    del self._batching[link]
            finally:
                link.lock.release()
        return next_deadline

    def _flush_credits(self, now: float) -> float | None:
        """Send credit returns that are due (I/O thread); the next deadline, if any."""
        due: dict[str, list] = {}
        next_deadline = None
        for key, grant in list(self._dirty_grants.items()):
            sub, publisher = key
            with sub._flow:
                update = grant.take_update(now)
                deadline = grant.next_deadline()
            if update is not None:
                due.setdefault(publisher, []).append([sub.sid, update[0], update[1]])
            if deadline is None or sub.closed:
                self._dirty_grants.pop(key, None)
            elif next_deadline is None or deadline < next_deadline:
                next_deadline = deadline
        for publisher, entries in due.items():
            self._send_control(publisher, wire.CREDIT, entries)
            self.credit_updates["control"] += 1
        return next_deadline

    def _on_credit(self, peer: Peer, body: Any) -> None:
        """A subscriber consumed messages: release held ones, wake blocked publishers."""
        entries = wire.check_credit(body)
        link = peer.link
        if link is None:
            return
        link.credit_in.append(entries)
        self._take_credit(link)

    def _take_credit(self, link: Link) -> None:
        """Apply a link's pending credit if its lock is free (I/O thread). If a
        publishing thread holds it, this thread does not wait (see _flush_batches):
        the publisher applies it when it next publishes or waits for credit, and
        this thread looks again shortly."""
        if not link.lock.acquire(False):
            self._credit_later.add(link)
            return
        try:
            self._credit_later.discard(link)
            if link.credit_in:
                self._apply_credit(link)
        finally:
            link.lock.release()

    def _send_control(self, peer_id: str, kind: int, body: Any) -> None:
        """Send a control message (I/O thread only: the ctl socket is never shared)."""
        link = self._links.get(peer_id)
        if link is None or link.closed:
            return
        try:
            link.ctl.send(wire.pack(kind, body), zmq.NOBLOCK)
        except zmq.ZMQError:
            self.counters.drops["control_queue_full"] += 1

    def _run_command(self, cmd: tuple) -> None:
        if cmd[0] == "credit":
            self._send_control(cmd[1], wire.CREDIT, cmd[2])
            self.credit_updates["control"] += 1
        elif cmd[0] == "flush_credit":
            pass  # woke us: the loop computes the credit deadline
        elif cmd[0] == "batch":
            link = cmd[1]
            self._batching.setdefault(link, link.batch_since + self._batch_delay)
        elif cmd[0] == "interest":
            _, version, adds, removes = cmd
            body = [version, [list(k) for k in adds], [list(k) for k in removes]]
            for peer in list(self._peers.values()):
                # Joining peers too: they have our older snapshot from the hello.
                if peer.state in ("alive", "joining"):
                    self._send_control(peer.id, wire.INTEREST, body)
        elif cmd[0] == "foreign":
            _, node_id, name, secured = cmd
            self.counters.drops["foreign_credential"] += 1
            if ("foreign", node_id) not in self._logged_once and len(self._logged_once) < 1000:
                self._logged_once.add(("foreign", node_id))
                if self._keys is None:
                    log.warning("%s: not joining %s (%s): it is secured; give this node the "
                                "cluster's secret=", self.name, name, node_id)
                else:
                    log.warning("%s: not joining %s (%s): it %s", self.name, name, node_id,
                                "holds another cluster secret" if secured else "is not secured")
        elif cmd[0] in self._bulk_named:  # a bulk channel's own command
            self._bulk_named[cmd[0]].on_command(cmd)
        elif cmd[0] == "found":
            try:
                self._introduce(parse_summary(cmd[1]), time.monotonic())
            except ProtocolError:
                self.counters.drops["malformed_announcement"] += 1
        elif cmd[0] == "seeds":
            _, added, removed = cmd
            for endpoint in removed:
                if endpoint in self.seeds:
                    continue  # also a seed given at construction: it stays
                self._seed_peer.pop(endpoint, None)
                sock = self._seed_socks.pop(endpoint, None)
                if sock is not None:
                    sock.close(linger=0)
            for endpoint in added:
                if endpoint not in self._seed_socks:
                    self._open_seed(endpoint)

    def _seeds_changed(self, added: list[str], removed: list[str]) -> None:
        """Seeds found at run time (discovery/dns.py's thread): the I/O thread opens
        (and closes) their seed sockets, as for the seeds given at construction."""
        if self._started and not self._closed:
            self._command(("seeds", added, removed))

    def _open_seed(self, endpoint: str) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        # Another identity than our link's: a ROUTER refuses two pipes with one identity.
        sock.setsockopt(zmq.IDENTITY, f"{self.id}/seed/{endpoint}".encode()[:255])
        sock.setsockopt(zmq.LINGER, 0)
        if self._keys is not None:
            self._keys.apply_client(sock)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing towards a seed that is down
        sock.setsockopt(zmq.SNDHWM, 4)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            log.warning("%s: seed %s unusable: %s", self.name, endpoint, exc)
            return
        self._seed_socks[endpoint] = sock

    def _tick(self, now: float) -> None:
        # Liveness of members is SWIM's (mesh/membership.py); pings here measure rtt.
        # A peer that never completes its hello is given up after peer_timeout.
        timeout = self.options["peer_timeout"]
        for peer in list(self._peers.values()):
            if peer.state in _LIVE:
                self._send_control(peer.id, wire.PING, [now])
            elif peer.state == "joining":
                if now - peer.last_seen > timeout:
                    self._peer_gone(peer, "dead")
                else:
                    self._send_control(peer.id, wire.HELLO, self._hello_body(False))
        self._hello_dead_peers(now)
        with self._lock:
            for name, early in list(self._early.items()):
                while early and early[0][0] < now - EARLY_MAX_AGE:
                    early.popleft()
                    self.counters.drops["early_expired"] += 1
                if not early:
                    del self._early[name]
        horizon = now - self.options["tombstone"]
        for peer_id, when in list(self._tombstones.items()):
            if when < horizon:
                del self._tombstones[peer_id]
                peer = self._peers.get(peer_id)
                if peer is not None and peer.state in ("dead", "left"):
                    del self._peers[peer_id]

    def _hello_dead_peers(self, now: float) -> None:
        """After a partition both sides think the other dead and nobody would speak
        first: say hello to dead peers until the tombstone expires."""
        for peer_id, when in list(self._rejoin.items()):
            peer = self._peers.get(peer_id)
            if peer is None or peer.state != "dead" or peer_id not in self._tombstones:
                del self._rejoin[peer_id]
                self._close_probe(peer_id)
                continue
            if now < when:
                continue
            self._rejoin[peer_id] = now + self.options["rejoin_interval"]
            probe = self._rejoin_socks.get(peer_id)
            if probe is None and peer.link is not None:
                try:
                    probe = self._dial(peer.link.endpoint, self.id.encode() + b"/rejoin", 4)
                except ProtocolError:
                    continue
                probe.setsockopt(zmq.IMMEDIATE, 1)
                self._rejoin_socks[peer_id] = probe
            if probe is not None:
                try:
                    probe.send(wire.pack(wire.HELLO, self._hello_body(False)), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # still unreachable

    def _close_probe(self, peer_id: str) -> None:
        probe = self._rejoin_socks.pop(peer_id, None)
        if probe is not None:
            probe.close(linger=0)

    def _hello_seeds(self) -> None:
        for endpoint, sock in self._seed_socks.items():
            joined = self._peers.get(self._seed_peer.get(endpoint, ""))
            if joined is not None and joined.state in _LIVE:
                continue  # a suspect seed is SWIM's business, not a new join
            try:
                sock.send(wire.pack(wire.HELLO, self._hello_body(False, via=endpoint)), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # not connected yet; retried soon

    def _io_shutdown(self) -> None:
        for peer_id in list(self._rejoin_socks):
            self._close_probe(peer_id)
        for channel in self._bulk:
            channel.before_goodbye()  # the goodbyes go after what went another way
        told: set[str] = set()
        for peer in list(self._peers.values()):
            link = peer.link
            if peer.state in (*_LIVE, "joining") and link is not None:
                # On the data pipe: it arrives after everything we published.
                with link.lock:
                    if link.batch:
                        self._flush_batch(link)  # what waited in a batch goes first
                    if not link.closed:
                        try:
                            link.sock.send(wire.pack(wire.BYE, None), zmq.NOBLOCK)
                            told.add(peer.id)
                        except zmq.ZMQError:
                            pass
        self._await_goodbye_acks(told)
        # Membership's leave after the goodbyes were answered: a peer that heard the
        # leave first would close its link to us and could not answer the goodbye.
        if self._members is not None and not self._members.left:
            self._swim(self._members.leave(time.monotonic()))
        for peer in list(self._peers.values()):
            if peer.link is not None:
                self._links.pop(peer.id, None)
                peer.link.close(linger=200)  # long enough for the goodbye to leave
        for sock in self._seed_socks.values():
            sock.close(linger=0)
        self._router.close(linger=0)
        self._cleanup_bound()

    def _await_goodbye_acks(self, told: set[str]) -> None:
        """Wait (at most GOODBYE_WAIT) until the peers told goodbye answer it. A process
        that exits right after close() (os._exit, a short script) would otherwise take
        the goodbyes still queued in libzmq with it, and its peers would see it die
        (after peer_timeout) instead of leave. Everything else that arrives now is
        dropped: the node is closing."""
        self._goodbyes = (len(told), 0)  # (told, answered): for tests and debugging
        asked = len(told)
        deadline = time.monotonic() + GOODBYE_WAIT
        router = self._router
        poll = [(router, zmq.POLLIN)]
        while told:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not zmq_poll(poll, max(1, int(remaining * 1000))):
                return
            while told:
                try:
                    frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if len(frames) >= 2 and _header_kind(frames[1]) == wire.BYE_ACK:
                    told.discard(_peer_id_of(frames[0].bytes))
                    self._goodbyes = (asked, asked - len(told))

    def _cleanup_bound(self) -> None:
        for plugin, bound in self._bound:
            plugin.cleanup(bound)

    def _start_zeroconf(self) -> None:
        from discovery.base import Announcement
        from discovery.zeroconf import ZeroconfDiscovery

        me = Announcement(
            cluster=self.cluster,
            node_id=self.id,
            name=self.name,
            version=wire.PROTOCOL_VERSION,
            transports=tuple(self._advertised),
            endpoints=tuple(ep for eps in self._advertised.values() for ep in eps),
            host=self._locality.host,
            public_key=self._keys.public.decode() if self._keys is not None else "",
        )
        self._discovery = ZeroconfDiscovery(
            me, self._on_discovered, lambda _node_id: None, interfaces=self.options["interfaces"]
        )
        self._discovery.start()

    def _on_discovered(self, ann: Any) -> None:
        if ann.version != wire.PROTOCOL_VERSION or ann.node_id == self.id:
            return
        ours = self._keys.public.decode() if self._keys is not None else ""
        if ann.public_key != ours:
            # Another credential (or none): the handshake would fail both ways.
            self._command(("foreign", ann.node_id, ann.name, bool(ann.public_key)))
            return
        eps: dict[str, list[str]] = {}
        for ep in ann.endpoints:
            eps.setdefault(ep.split("://", 1)[0], []).append(ep)
        summary = {
            "id": ann.node_id,
            "name": ann.name,
            "cluster": ann.cluster,
            "eps": eps,
            "host": ann.host,
            # Processes never share a context across discovery: no inproc.
            "proc": f"{ann.host}/remote",
        }
        self._command(("found", summary))

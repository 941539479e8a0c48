"""The send path: one ``Link`` per peer (mesh/peers.py), batching, credit, room.

Who owns what:
- ``link.sock``, the data DEALER to a peer, is shared: whatever thread publishes
  sends on it directly under ``link.lock`` (no hop through another thread); the
  lock also keeps multipart sends whole. ``link.windows`` (our credit towards
  each of the peer's subscriptions) and ``link.batch`` live under the same lock.
- Credit that arrives (I/O thread) is queued on ``link.credit_in`` and applied by
  whoever holds the lock next (``_apply_credit``), which also sends the messages
  the windows held back.

The rule that keeps nodes free of deadlocks: a publish made on one of the node's
own threads (the I/O thread running an inline handler, the dispatch thread
running a handler) never waits for credit. Beyond the window its message is held
in the window, in order (at most ``_ENGINE_HOLD`` per window, then dropped and
counted), and leaves as credit comes back. Only application threads wait:
``overflow="block"`` waits for credit (``timeout=`` -> BackpressureError), and
``timeout=`` waits for room in a full peer queue, letting go of the link lock
meanwhile.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import deque
from typing import Any

import msgpack
import numpy as np
import zmq

from mesh import wire
from mesh.engine import heap
from mesh.engine.common import (
    _DROP_OLDEST_BACKLOG,
    _LIVE,
    _QUEUE_FULL_RETRY,
    ZERO_COPY_BYTES,
    _nbytes,
)
from mesh.errors import (
    BackpressureError,
    ConfigError,
    MeshError,
    MessageTooLarge,
    PeerLostError,
    TimeoutError,
)
from mesh.flow import (
    Action,
    CreditWindow,
    encode_batch,
)
from mesh.message import Message
from mesh.peers import Peer
from mesh.routing import Route
from mesh.stats import Counters
from mesh.subjects import validate_subject
from mesh.tensor import array_to_frames

log = logging.getLogger("mesh")

# Channel (collective) payloads below this are copied into the zmq message: a
# zero-copy frame costs a tracker and a wake of pyzmq's gc thread, ~0.1 ms of
# CPU per message here, more than copying up to this size.
P2P_COPY_BYTES = 1 << 20

class _DoneTracker:
    """What a channel send returns when the data was copied into shared memory:
    the caller's buffer is free at once."""

    done = True

    def wait(self, timeout: float | None = None) -> None:
        return None

# A message following the previous one to the same peer this closely is part of
# a burst and may wait to be batched. A publishing loop sends every 5-15 µs; a
# request/reply exchange takes hundreds of µs per round trip and is never held.
_BURST_GAP = 50e-6

# Payloads up to this size may be batched (larger ones gain nothing from it).
_BATCH_SMALL = 1024

# Messages a window holds for publishers on the node's own threads (handlers), which
# never wait for credit (see Node._send_msg); beyond this they are dropped, counted.
_ENGINE_HOLD = 65536

def _send_frames(sock: Any, frames: list) -> None:
    """Send one multipart message frame by frame (cheaper than send_multipart).

    Only the first frame can hit the high-water mark (zmq.Again): libzmq
    accepts the rest of a message once its first part is in. Large frames go
    without a copy."""
    last = len(frames) - 1
    if not last:  # a small message or reply in one frame (wire.lone_frames): the common case
        sock.send(frames[0], zmq.NOBLOCK)
        return
    if last == 1 and type(frames[1]) is bytes and len(frames[1]) < ZERO_COPY_BYTES:
        sock.send(frames[0], _NOBLOCK_MORE)  # header and one small payload: the common case
        sock.send(frames[1], 0)
        return
    if _send_parts is not None:  # from C: an array's data without pyzmq's gc thread
        _send_parts(sock, frames)
        return
    sock.send(frames[0], _NOBLOCK_MORE if last else zmq.NOBLOCK)
    for index in range(1, last + 1):
        frame = frames[index]
        sock.send(frame, zmq.SNDMORE if index < last else 0, copy=_nbytes(frame) < ZERO_COPY_BYTES)


# zcore.send_parts when this build and process can call libzmq from C (set by the
# first node; zcore cannot be imported here at module level: it cimports Link).
_send_parts: Any = None
# A batch frame at least this large is sent without a copy (see _send_copied).
_BATCH_ZERO_COPY = 1 << 18


def _send_copied(sock: Any, frames: list) -> None:
    """Send a batch's frames frame by frame (no send_multipart: its Python wrapper
    checks every part first). As in _send_frames, only the first frame can hit the
    high-water mark. A batch is copied (64 KiB ones are cheaper copied than handed
    over), but one of at least _BATCH_ZERO_COPY bytes (the batch's own bytes, made
    by encode_batch and never changed) goes without a copy: a 400 KiB copy per link
    per batch cost a fan-out's publisher ~0.8 µs per publish (bench/hotpath.py)."""
    last = len(frames) - 1
    sock.send(frames[0], _NOBLOCK_MORE if last else zmq.NOBLOCK)
    for index in range(1, last + 1):
        frame = frames[index]
        sock.send(frame, zmq.SNDMORE if index < last else 0,
                  copy=_nbytes(frame) < _BATCH_ZERO_COPY)


_NOBLOCK_MORE = zmq.NOBLOCK | zmq.SNDMORE


# A publisher waiting for room in a full peer queue tries again after this long,
# doubling up to the second (seconds); it lets go of the link lock in between.
_ROOM_RETRY = (0.0005, 0.008)



class Link:
    """Our outbound DEALERs to one peer.

    ``sock`` carries data: application threads send on it directly (no hop
    through the I/O thread); the lock is the memory barrier ZeroMQ needs to move
    a socket between threads, and keeps multipart sends whole. ``ctl`` carries
    control (hellos, interest, membership probes) and only the I/O thread uses
    it: a second pipe, so the peer's ROUTER fair-queues control past a backlog
    of data and a busy peer is not mistaken for a dead one."""

    __slots__ = (
        "peer_id", "sock", "ctl", "lock", "cond", "windows", "transport", "endpoint", "closed", "counters",
        "batch", "batch_bytes", "batch_count", "batch_cap", "batch_since", "last_send", "shm_out", "rdma", "rdma_off",
        "rdma_trackers", "rdma_order", "credit_in",
    )

    def __init__(
        self, sock: Any, ctl: Any, transport: str, endpoint: str, counters: Counters,
        peer_id: str = "",
    ) -> None:
        self.peer_id = peer_id
        self.sock = sock
        self.ctl = ctl
        self.counters = counters  # the peer's, so publishers count without a lookup
        self.lock = threading.Lock()
        # Publishers blocked on credit wait here; the I/O thread notifies on credit.
        self.cond = threading.Condition(self.lock)
        # Credit updates from the peer not applied yet: the I/O thread never waits for
        # the lock (a publisher may hold it for long: a shared-memory copy, or room
        # awaited on an RDMA link); whoever holds it next applies them (LinkSender._apply_credit).
        self.credit_in: deque[list] = deque()
        self.windows: dict[int, Any] = {}  # subscription id at the peer -> CreditWindow
        # Micro-batching of small messages (see LinkSender._send_locked): runs of messages
        # that share a header, [header, subject or None, last seq, sids, payloads].
        self.batch: list[list] = []
        self.batch_bytes = 0
        self.batch_count = 0  # messages in all runs
        # Messages per batch: half the tightest credit window towards this peer, so
        # a second batch is in flight while the credit for the first comes back
        # (subscribers return credit every quarter window, see dispatch._credit_threshold).
        self.batch_cap = 1 << 30
        self.batch_since = 0.0
        self.last_send = 0.0
        self.shm_out: Any = None  # transports.shm.ShmSender once the peer can map ours
        # transports.rdma.RdmaConnection once connected (the I/O thread drives and
        # closes it; senders use it under the lock); rdma_off: it failed, stay off.
        self.rdma: Any = None
        self.rdma_off = False
        self.rdma_trackers: dict[int, Any] = {}  # rdma msg id -> channel-send tracker
        # transports.rdma_core.SendOrder from the first array sent by RDMA on: keeps the
        # order with socket messages (None: nothing to keep, nothing extra is sent).
        self.rdma_order: Any = None
        self.transport = transport
        self.endpoint = endpoint
        self.closed = False

    def close(self, linger: int = 100) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.sock.close(linger=linger)
                self.ctl.close(linger=linger)
                for window in self.windows.values():
                    window.close("peer gone")
                if self.shm_out is not None:
                    self.shm_out.close()
                self.cond.notify_all()  # blocked publishers see the peer is gone


class LinkSender:
    """Publishing: routes, credit windows, batches and the data socket (mixin of ``mesh.Node``)."""

    def _init_links(self) -> None:
        global _send_parts
        from mesh.engine import zcore

        if zcore.available():
            _send_parts = zcore.send_parts
        self._links: dict[str, Link] = {}  # peer id -> link, read by publishers
        self._seqs: dict[str, itertools.count] = {}  # subject -> next seq
        self._batch_max = self.options["batch_bytes"]
        self._batch_delay = self.options["batch_delay"]
        self._max_size = self.options["max_message_size"]
        # The highest-addressed large batch frame of each heap, kept alive (see
        # _flush_batch); any thread flushing a batch uses it, under its lock.
        self._ballast_out = heap.Ballast()
        self._ballast_out_lock = threading.Lock()
        self._last_pressure = 0.0
        self._subject_name = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.name)

    def _route(self, subject: str, internal: bool = False) -> Route:
        if type(subject) is not str:
            validate_subject(subject)  # raises InvalidSubject with a clear message
        if not internal and subject.startswith("_mesh"):
            validate_subject(subject)  # reserved: refused even when a route is cached
        if self._policy is not None and not internal:
            self._policy.check_publish(self.name, subject)  # cached: cheap after the first
        route = self._routing.cached(subject)
        if route is None:
            validate_subject(subject, allow_reserved=internal)
            with self._lock:
                route = self._routing.route(subject)
        return route

    def _publish(
        self,
        subject: str,
        route: Route,
        data: Any,
        headers: dict | None,
        req_id: int | None,
        timeout: float | None,
    ) -> None:
        if type(data) is bytes and len(data) <= self._max_size:  # the common case
            payload, array, flags, nbytes = [data], None, 0, len(data)
        else:
            payload, array, flags, nbytes = self._encode_payload(data)
        if headers is not None and not isinstance(headers, dict):
            raise ConfigError("headers must be a dict (of str to str, bytes or numbers)")
        counter = self._seqs.get(subject)
        if counter is None:
            counter = self._seqs.setdefault(subject, itertools.count(1))
        seq = next(counter)

        local_targets: Any = route.local
        peer_sids: Any = route.peers
        if route.local_groups or route.peer_groups:
            # Queue groups: exactly one member subscription per group, mesh-wide.
            local_targets = list(route.local)
            peer_sids = {peer: list(sids) for peer, sids in route.peers.items()}
            for group in route.groups():
                local_members = route.local_groups.get(group, ())
                remote_members = route.peer_groups.get(group, ())
                pick = random.randrange(len(local_members) + len(remote_members))
                if pick < len(local_members):
                    local_targets.append(local_members[pick])
                else:
                    peer, sid = remote_members[pick - len(local_members)]
                    peer_sids.setdefault(peer, []).append(sid)

        if local_targets:
            self._publish_local(
                subject, local_targets, payload, array, nbytes, headers, seq, req_id, timeout
            )
        if not peer_sids:
            return
        ts = time.time()
        for peer_id, sids in peer_sids.items():
            self._send_msg(
                peer_id, sids, (subject, seq, ts, flags, headers, req_id, payload, nbytes), timeout
            )

    def _publish_local(
        self,
        subject: str,
        subs: Any,
        payload: list,
        array: np.ndarray | None,
        nbytes: int,
        headers: dict | None,
        seq: int,
        req_id: int | None,
        timeout: float | None,
    ) -> None:
        """Deliver to this node's own subscribers: no socket hop, same credit rules."""
        view = payload[-1]
        if array is not None:
            local_array = array.view()
            local_array.flags.writeable = False
            local_data: Any = memoryview(local_array.reshape(-1).view(np.uint8)) if array.size else b""
        else:
            local_array = None
            # Small mutable buffers are copied: the publisher may reuse them at once.
            if isinstance(view, bytes):
                local_data = view
            elif nbytes < ZERO_COPY_BYTES:
                local_data = bytes(view)
            else:
                local_data = memoryview(view).toreadonly()
        reply_to = self.id if req_id is not None else None
        for sub in subs:
            msg = Message(
                subject, local_data, headers, self.id, seq,
                array=local_array, request_id=req_id, node=self, reply_to=reply_to,
            )
            msg._credit = nbytes
            with sub._flow:
                decision = sub._window.offer(msg, nbytes)
                action = decision.action
                if action is Action.BLOCK:
                    if sub.closed:
                        continue
                    if threading.get_ident() in self._engine_idents:
                        # A handler publishing: it never waits (the credit may come
                        # back only through this very thread); held, sent on credit.
                        if sub._window.hold(msg, nbytes, _ENGINE_HOLD):
                            continue
                        action = Action.DROP_NEW
                    elif not self._wait_for_credit(
                        sub._flow, sub._window, nbytes, timeout, sub.pattern, lambda: False
                    ):
                        continue
                    else:
                        action = sub._window.offer(msg, nbytes).action
            if action is Action.SEND:
                self._deliver(sub, msg)
            elif action is not Action.QUEUE:
                self._count_drop(action.value, None)
                self._pressure_notice(action.value, sub.sid)

    def _wait_for_credit(
        self, cond: Any, window: Any, nbytes: int, timeout: float | None, what: str, lost: Any,
        link: Link | None = None,
    ) -> bool:
        """Wait (holding ``cond``) until ``window`` can take ``nbytes``. False when the
        subscription went away meanwhile (nothing to send); PeerLostError when its
        node died; BackpressureError after ``timeout``. With ``link``, credit that
        arrived while the lock was taken is applied before each check. Application
        threads only: the node's own threads never wait for credit."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if link is not None and link.credit_in:
                self._apply_credit(link)
            if window.can_send(nbytes):
                break
            if lost():
                raise PeerLostError(
                    f"the node subscribed to {what!r} died while publish() waited for its "
                    "credit; the message was not delivered there",
                )
            if window.closed or self._closed:
                return False
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise BackpressureError(
                    f"subscriber of {what!r} gave no credit within {timeout} s (it consumes "
                    "slower than you publish); slow down, raise timeout=, or subscribe with "
                    "overflow='drop_oldest'"
                )
            cond.wait(remaining if remaining is not None else 1.0)
        return True

    def _send_msg(self, peer_id: str, sids: Any, item: tuple, timeout: float | None) -> None:
        """Send one message to a peer for the subscriptions ``sids``, each within its credit."""
        link = self._links.get(peer_id)
        if link is None:
            self.counters.drops["no_link"] += 1
            return
        nbytes = item[7]
        if timeout and item[3]:  # an array, and the caller accepts waiting
            for channel in self._bulk:
                channel.before_send(link, nbytes, timeout)
        with link.lock:  # link.cond's lock; entering the lock itself skips a Python call
            if link.closed:
                self.counters.drops["no_link"] += 1
                return
            if link.credit_in:  # it came while another thread held the link
                self._apply_credit(link)
            allowed = []
            dropped = None
            for sid in sids:
                window = link.windows.get(sid)
                if window is None:
                    window = self._open_window(peer_id, link, sid)
                    if window is None:
                        allowed.append(sid)  # the peer asked for no flow control
                        continue
                decision = window.offer(item, nbytes)
                action = decision.action
                if action is Action.BLOCK and threading.get_ident() in self._engine_idents:
                    # The rule that keeps nodes free of deadlocks: a publish on the
                    # node's own threads (a handler) never waits for credit, which
                    # may come back only once such a thread moves on (two nodes
                    # whose handlers publish to each other). Beyond the window the
                    # message is held in order and leaves as credit returns.
                    if window.hold(item, nbytes, _ENGINE_HOLD):
                        continue
                    action = Action.DROP_NEW
                if action is Action.BLOCK:
                    if link.batch:
                        # Out of credit: the batch cannot grow while we wait, and its
                        # messages are what the subscriber needs to return credit.
                        self._flush_batch(link, timeout)
                    if not self._wait_for_credit(
                        link.cond, window, nbytes, timeout, item[0], lambda: link.closed, link
                    ):
                        continue  # it unsubscribed meanwhile
                    # Still a burst (the subscriber is behind): this message starts
                    # the next batch rather than leaving alone after the wait.
                    link.last_send = time.monotonic()
                    action = window.offer(item, nbytes).action
                if action is Action.SEND:
                    allowed.append(sid)
                elif action is not Action.QUEUE:
                    self._count_drop(action.value, link)
                    dropped = (action.value, sid)
            if allowed:
                self._send_locked(link, peer_id, item, allowed, timeout)
        if dropped is not None:
            self._pressure_notice(*dropped)  # outside the link lock: it publishes

    def _send_locked(
        self, link: Link, peer_id: str, item: tuple, sids: list, timeout: float | None
    ) -> bool:
        """Put one message on a link's data socket; the caller holds the link lock."""
        subject, seq, ts, flags, headers, req_id, payload, nbytes = item
        if self._batch_max:
            now = time.monotonic()
            batch = link.batch
            if nbytes <= _BATCH_SMALL and not flags and (
                batch or now - link.last_send < _BURST_GAP
            ):
                # A burst: this message waits (at most batch_delay) to share a frame.
                data = payload[0]
                if type(data) is not bytes:
                    data = bytes(data)  # the caller may reuse its buffer once we return
                run = batch[-1] if batch else None
                if (run is not None and run[2] == seq - 1 and run[1] == subject
                        and headers is None and req_id is None and run[3] == sids):
                    # The run's header stands for this one too (next seq, same subject
                    # and subscriptions): no header of its own to build or parse.
                    run[2] = seq
                    run[4].append(data)
                    link.batch_bytes += nbytes + 4
                else:
                    if not batch:
                        link.batch_since = now
                        if link not in self._batching:  # else the I/O thread will look anyway
                            self._batching[link] = now + self._batch_delay
                            self._command(("batch", link))  # wake it: it flushes in time
                    header = wire.pack_msg(subject, seq, ts, flags, headers, req_id, sids)
                    # Only plain messages extend a run: headers and request ids differ.
                    shared = subject if headers is None and req_id is None else None
                    batch.append([header, shared, seq, sids, [data]])
                    link.batch_bytes += len(header) + nbytes + 12
                link.batch_count += 1
                self._count_out(link, nbytes)
                if link.batch_bytes >= self._batch_max or link.batch_count >= link.batch_cap:
                    self._flush_batch(link, timeout)
                return True
            if batch:
                self._flush_batch(link, timeout)  # keep order: what waited goes first
                if link.closed:  # the peer went away while that batch waited for room
                    self.counters.drops["no_link"] += 1
                    return False
            link.last_send = now
        if flags:  # an array: a bulk channel may take it
            def frames_for(extra: int, payload: list) -> list:
                return [wire.pack_msg(subject, seq, ts, flags | extra, headers, req_id, sids),
                        *payload]

            for channel in self._bulk:
                went = channel.send_array(link, peer_id, frames_for, payload, nbytes, False)
                if went is None:
                    continue
                if went[0] == "sent":
                    self._count_out(link, nbytes)
                    return True
                _carried, frames, undo = went
                try:
                    sent = self._put_frames(link, peer_id, frames, nbytes, timeout)
                except BaseException:
                    undo()
                    raise
                if not sent:
                    undo()
                return sent
        if flags or headers is not None or len(sids) != 1:
            frames = [wire.pack_msg(subject, seq, ts, flags, headers, req_id, sids), *payload]
        else:  # a lone plain message: fixed layout, one frame when small
            frames = wire.lone_frames(subject, seq, ts, req_id, sids[0], payload)
        return self._put_frames(link, peer_id, frames, nbytes, timeout)

    def _put_frames(
        self, link: Link, peer_id: str, frames: list, nbytes: int, timeout: float | None
    ) -> bool:
        """Put one message on a link's data socket; the caller holds the link lock.
        A full peer queue drops it (counted), or with ``timeout`` waits that long."""
        sock = link.sock
        ordered = None
        owed = self._owed_credit(peer_id) if self._dirty_grants else None
        if owed is not None:  # credit we owe this peer rides in front of the message
            frames = [wire.pack(wire.CREDIT, owed), *frames]
        if self._bulk_ordering:
            for channel in self._bulk_ordering:  # arrays went another way: keep the order
                if channel.keeps_order(link):
                    frames, ordered = channel.frames_for_socket(link, frames)
        try:
            _send_frames(sock, frames)
        except zmq.Again:
            if timeout is None or timeout <= 0:
                self._count_drop("peer_queue_full", link)
                self._owed_credit_failed(peer_id, owed)
                return False
            room = self._wait_for_room(link, frames, timeout, _send_frames)
            if room is not True:
                self._owed_credit_failed(peer_id, owed)
                if room == "closed":  # the peer went away meanwhile
                    self.counters.drops["no_link"] += 1
                    return False
                self._count_drop("peer_queue_full", link)
                raise BackpressureError(
                    f"peer {self._peer_name(peer_id)} did not accept the message within "
                    f"{timeout} s (its queue is full); slow down or raise timeout="
                ) from None
        except zmq.ZMQError as exc:
            self._count_drop("send_error", link)
            self._owed_credit_failed(peer_id, owed)
            log.debug("send to %s failed: %s", peer_id, exc)
            return False
        if owed is not None:
            self.credit_updates["riding"] += 1
        if ordered is not None:
            ordered()
        counters = self.counters
        counters.msgs_out += 1
        counters.bytes_out += nbytes
        counters = link.counters
        counters.msgs_out += 1
        counters.bytes_out += nbytes
        return True

    def _keeps_order(self, link: Link) -> bool:
        """Does a bulk channel keep an order with this link's data socket (link lock held)?"""
        return any(channel.keeps_order(link) for channel in self._bulk_ordering)

    def _count_out(self, link: Link, nbytes: int) -> None:
        self.counters.msgs_out += 1
        self.counters.bytes_out += nbytes
        link.counters.msgs_out += 1
        link.counters.bytes_out += nbytes

    def _flush_batch(self, link: Link, wait: float | None = None, keep: bool = False) -> None:
        """Send a link's waiting small messages as one frame (caller holds the lock).
        When the peer's queue is full: a publishing thread given a timeout waits up
        to ``wait`` seconds for room (then drops them, counted, and raises
        BackpressureError); ``keep`` (the I/O thread, which never waits) keeps them
        for a later try; otherwise they are dropped and counted, as publish() without
        a timeout does."""
        wait = wait if wait is not None and wait > 0 else None  # a timeout of 0 never waits
        batch = link.batch
        count = link.batch_count
        batch_bytes = link.batch_bytes
        link.batch = []
        link.batch_bytes = 0
        link.batch_count = 0
        link.last_send = time.monotonic()
        if link.closed or not batch:
            return
        runs = [(run[0], run[4]) for run in batch]
        data = encode_batch(runs)
        if len(data) >= _BATCH_ZERO_COPY:
            # Each large batch is a fresh buffer; freed (by pyzmq once sent) at the top
            # of its heap, glibc gave those pages back and the next batch faulted them
            # in again (engine/heap.py): the highest one kept alive keeps the top. At
            # most 2 frames per node; 1 KiB 1->4: publisher 5.3-6.4 -> 4.7-4.9 µs per
            # publish (bench/hotpath.py --subs 4, interleaved).
            with self._ballast_out_lock:
                self._ballast_out.keep(data, memoryview(data))
        frames, ordered = [wire.pack(wire.BATCH, count), data], None
        owed = self._owed_credit(link.peer_id) if self._dirty_grants else None
        if owed is not None:  # credit we owe this peer rides in front of the batch
            frames.insert(0, wire.pack(wire.CREDIT, owed))
        for channel in self._bulk_ordering:  # arrays went another way: keep the order
            if channel.keeps_order(link):
                frames, ordered = channel.frames_for_socket(link, frames)
        try:
            try:
                _send_copied(link.sock, frames)
            except zmq.Again:
                if keep:
                    self._owed_credit_failed(link.peer_id, owed)
                    # Back in place, first in line; looked at again in a moment.
                    link.batch, link.batch_bytes, link.batch_count = batch, batch_bytes, count
                    link.batch_since = time.monotonic() + _QUEUE_FULL_RETRY
                    return
                room = self._wait_for_room(link, frames, wait, _send_copied) if wait else "full"
                if room == "closed":  # the peer went away meanwhile
                    self._owed_credit_failed(link.peer_id, owed)
                    self.counters.drops["no_link"] += count
                    return
                if room is not True:
                    raise
            self.batches_out += 1
            if owed is not None:
                self.credit_updates["riding"] += 1
            if ordered is not None:
                ordered()
        except zmq.ZMQError:
            self._owed_credit_failed(link.peer_id, owed)
            self._count_drop("peer_queue_full", link)
            self.counters.drops["peer_queue_full"] += count - 1
            link.counters.drops["peer_queue_full"] += count - 1
            if wait:
                raise BackpressureError(
                    f"peer {self._peer_name(link.peer_id)} did not accept {count} batched "
                    f"messages within {wait} s (its queue is full); they were dropped "
                    "(counted as peer_queue_full); slow down or raise timeout="
                ) from None

    def _wait_for_room(self, link: Link, frames: list, wait: float, send: Any) -> bool | str:
        """Try ``send(link.sock, frames)`` again until the full peer queue takes it,
        for up to ``wait`` seconds (caller holds the link lock, and the first try
        failed). The lock is let go between tries, so that other threads publishing
        to this peer meanwhile keep their own timeouts (publish() without one drops
        at once) instead of queueing behind this wait; the socket itself is only
        used under the lock. True once sent, "full" after ``wait``, "closed" when
        the link closed meanwhile. A link whose bulk channel keeps an order with the
        socket keeps the lock and polls (its frames may carry a marker that no other
        message may overtake)."""
        deadline = time.monotonic() + wait
        pause, longest = _ROOM_RETRY
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "full"
            if self._keeps_order(link):
                if not link.sock.poll(int(remaining * 1000) + 1, zmq.POLLOUT):
                    return "full"
            else:
                link.cond.wait(min(pause, remaining))  # lets go of the lock meanwhile
                pause = min(pause * 2, longest)
                if link.closed:
                    return "closed"
            try:
                send(link.sock, frames)
                return True
            except zmq.Again:
                continue

    def _open_window(self, peer_id: str, link: Link, sid: int) -> CreditWindow | None:
        params = self._routing.params(peer_id, sid)
        if params is None or params[0] <= 0:
            return None
        granted, credit_bytes, overflow = params
        try:
            window = CreditWindow(
                granted, credit_bytes or None, overflow,
                _DROP_OLDEST_BACKLOG if overflow == "drop_oldest" else 0,
            )
        except MeshError:
            self.counters.drops["bad_flow_params"] += 1
            return None
        link.windows[sid] = window
        link.batch_cap = min(link.batch_cap, max(8, granted // 2))
        return window

    def _count_drop(self, reason: str, link: Link | None) -> None:
        self.counters.drops[reason] += 1
        if link is not None:
            link.counters.drops[reason] += 1

    def _pressure_notice(self, reason: str, sid: int | None) -> None:
        """Announce drops on _mesh.pressure.<node> (at most once a second) so that
        applications can slow down."""
        now = time.monotonic()
        if now - self._last_pressure < 1.0:
            return
        self._last_pressure = now
        subject = f"_mesh.pressure.{self._subject_name}"
        route = self._route(subject, internal=True)
        if route.empty:
            return
        body = msgpack.packb(
            {"node": self.name, "reason": reason, "sid": sid, "drops": dict(self.counters.drops)}
        )
        try:
            self._publish(subject, route, body, None, None, None)
        except MeshError:
            pass  # a notice must never fail the publish that caused it

    def _encode_payload(self, data: Any) -> tuple[list, np.ndarray | None, int, int]:
        if isinstance(data, np.ndarray):
            desc, buf = array_to_frames(data)
            nbytes = data.nbytes
            self._check_size(nbytes)
            return [desc, buf], data, wire.TENSOR, nbytes
        if isinstance(data, bytes):
            payload = data
        elif isinstance(data, (bytearray, memoryview)):
            payload = data
        elif isinstance(data, str):
            payload = data.encode()
        else:
            raise ConfigError(
                f"cannot publish a {type(data).__name__}: pass bytes, memoryview, str or a "
                "numpy array (serialise other objects first, e.g. with msgpack)"
            )
        nbytes = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
        self._check_size(nbytes)
        return [payload], None, 0, nbytes

    def _check_size(self, nbytes: int) -> None:
        if nbytes > self.options["max_message_size"]:
            raise MessageTooLarge(
                f"payload of {nbytes} bytes exceeds max_message_size="
                f"{self.options['max_message_size']}; split it or raise the option on every node"
            )

    def _send(self, peer_id: str, frames: list, nbytes: int, timeout: float | None) -> bool:
        """Send ready-made frames to a peer (replies)."""
        link = self._links.get(peer_id)
        if link is None:
            self.counters.drops["no_link"] += 1
            return False
        with link.lock:
            if link.closed:
                self.counters.drops["no_link"] += 1
                return False
            return self._put_frames(link, peer_id, frames, nbytes, timeout)

    def _apply_credit(self, link: Link) -> None:
        """Apply pending credit updates (link lock held): send what the windows held
        back, wake publishers blocked on credit."""
        credit_in = link.credit_in
        if link.closed:
            credit_in.clear()
            return
        while credit_in:  # the I/O thread appends meanwhile: popleft, never swap
            for sid, msgs, nbytes in credit_in.popleft():
                window = link.windows.get(sid)
                if window is None:
                    continue
                for item in window.on_credit(msgs, nbytes):
                    self._send_locked(link, link.peer_id, item, [sid], None)
        link.cond.notify_all()

    def _channel_send(
        self, channel: str, peer_id: str, tag: Any, data: Any, meta: Any, timeout: float | None
    ) -> Any:
        self._check_open()
        payload, _array, flags, nbytes = self._encode_payload(data)
        link = self._links.get(peer_id)
        peer = self._peers.get(peer_id)
        if link is None or peer is None or peer.state not in _LIVE:
            state = peer.state if peer else "unknown"
            raise PeerLostError(
                f"peer {self._peer_name(peer_id)} is {state}; it left the mesh or never joined",
                peer=peer_id,
            )
        with link.lock:
            if link.closed:
                raise PeerLostError(f"peer {peer.name} is gone", peer=peer_id)

            def frames_for(extra: int, payload: list) -> list:
                return [wire.pack(wire.P2P, [channel, tag, flags | extra, meta]), *payload]

            went = None
            if flags:  # an array: a bulk channel may take it
                for bulk in self._bulk:
                    went = bulk.send_array(link, peer_id, frames_for, payload, nbytes, True)
                    if went is not None:
                        break
            if went is not None and went[0] == "sent":
                tracker = went[1]  # done once the channel delivered it
            else:
                frames, undo = (went[1], went[2]) if went is not None else (
                    frames_for(0, payload), None)
                ordered = None
                for bulk in self._bulk_ordering:  # arrays went another way: keep the order
                    if bulk.keeps_order(link):
                        frames, ordered = bulk.frames_for_socket(link, frames)
                try:
                    tracker = self._channel_put(link, peer, channel, frames, nbytes, timeout)
                except BaseException:
                    if undo is not None:  # never announced to the peer: free what it holds
                        undo()
                    raise
                if ordered is not None:
                    ordered()
                if undo is not None:
                    tracker = None  # copied into the channel: the caller's buffer is free
        self._count_out(link, nbytes)
        return _DoneTracker() if tracker is None else tracker

    def _channel_put(
        self, link: Link, peer: Peer, channel: str, frames: list, nbytes: int,
        timeout: float | None,
    ) -> Any:
        """Put a channel message on the link's socket (link lock held); its tracker.
        A full peer queue is waited out, ``timeout`` or else ``peer_timeout`` long."""
        copy = nbytes < P2P_COPY_BYTES
        sent: list = []

        def send(sock: Any, frames: list) -> None:
            sent.append(sock.send_multipart(frames, zmq.NOBLOCK, copy=copy, track=not copy))

        try:
            send(link.sock, frames)
            return sent[0]
        except zmq.Again:
            pass
        if timeout is None:  # bounded even without a timeout
            timeout = self.options["peer_timeout"]
        room = self._wait_for_room(link, frames, timeout, send)
        if room == "closed":
            raise PeerLostError(f"peer {peer.name} is gone", peer=peer.id)
        if room is not True:
            raise TimeoutError(
                f"peer {peer.name} did not accept data on channel {channel!r} within {timeout} s"
            )
        return sent[0]

"""Delivery: from the I/O thread that read a message to whoever consumes it.

- Inline handlers (``subscribe(inline=True)``) run on the I/O thread itself (no
  hand-off); one that overruns ``inline_budget`` is logged once and moved here.
- Ordinary handlers run on the dispatch thread (``mesh-dispatch-<node>``), which
  owns the dispatch queue: the I/O thread passes one item per drain (a list of
  calls: ``(sub, msg)`` for a lone message, a ``Run`` for a batch's run, see
  engine/receive.py, compiled), other threads one call each.
- Pull subscriptions (``next()``) and request replies go straight to the waiting
  thread (its inbox or its ``_Pending`` lock): one hand-off.
- Credit goes back once the application consumed a message: on the data socket
  from the consuming thread when the link is free (``_send_credit_direct``), in
  front of the next frame to that publisher, or by the I/O thread on a timer.
Channels (point-to-point, for collectives) are filled here too.
In the compiled build the I/O thread delivers a lone message in one frame (and a
small reply) through engine/zcore.py's ``on_one``, the common case of
``_on_msg_one`` -> ``_run_inline`` -> ``_return_credit`` written out in C types;
the methods here stay the reference, the pure build's path, and every other case.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Any

import zmq

from mesh import wire
from mesh.channels import EARLY_MAX_MESSAGES, Channel, ChannelMessage
from mesh.engine import heap, zcore
from mesh.engine.common import _STOP, ZERO_COPY_BYTES, _BatchedFrame
from mesh.engine.receive import queue_run, run_list
from mesh.engine.zcore import (
    _credit_threshold,
    dispatch_loop,
    owed_credit,
    return_credit,
    run_one,
)
from mesh.errors import (
    MeshError,
    ProtocolError,
)
from mesh.flow import (
    CreditGrant,
    decode_runs,
    split_run,
)
from mesh.message import Message, Subscription, incoming
from mesh.peers import Peer
from mesh.tensor import array_from_frames

log = logging.getLogger("mesh")

get_ident = threading.get_ident

# Peer states whose data messages are accepted without a closer look (_known_peer
# has the rest: a peer that left a moment ago, strangers).
_KNOWN = frozenset(("alive", "suspect", "joining"))

class _CallbackSub:
    """Lets the dispatch thread run an on_peer callback like a handler."""

    __slots__ = ("closed", "handler", "pattern", "delivered")

    def __init__(self, callback: Any, event: str) -> None:
        self.closed = False
        self.pattern = f"on_peer:{event}"
        self.delivered = 0
        self.handler = lambda info: callback(event, info)

class _Pending:
    """A request waiting for its reply. The thread that gets the reply hands it over
    by releasing a lock the requester waits in: one C call on each side (an Event
    costs a Condition, its waiter lock and several Python calls on both)."""

    __slots__ = ("done", "reply", "on_reply", "_lock")

    def __init__(self, on_reply: Any = None) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()  # released by set(): the requester's wait returns
        self.done = False
        self.reply: Message | None = None
        # Called after the reply is set, on the setting thread (mesh.aio completes an
        # asyncio future from it: the reply reaches the event loop in one hand-off).
        self.on_reply = on_reply

    def set(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            self._lock.release()
        except RuntimeError:  # set at once by two threads (a reply and close()): once is enough
            return
        if self.on_reply is not None:
            self.on_reply()

    def is_set(self) -> bool:
        return self.done

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for set(); True once it was."""
        if self.done:
            return True
        return self._lock.acquire(True, timeout) or self.done


class Dispatcher:
    """Handing messages to handlers, inboxes and requests; credit return (mixin of ``mesh.Node``)."""

    def _init_dispatch(self) -> None:
        self._dispatch: Any = queue.SimpleQueue()  # items for the dispatch thread
        self._dispatch_thread: threading.Thread | None = None
        self._io_batch: list = []  # handler calls the I/O thread collects in one drain
        self._inline_budget = self.options["inline_budget"]
        self._core = zcore.available()  # libzmq from C (engine/zcore.py)
        self._pending: dict[int, _Pending] = {}  # request id -> the waiting request
        self._channels: dict[str, Channel] = {}
        self._early: dict[str, collections.deque] = {}  # channel -> (time, msg) not yet opened
        # Credit owed to publishers and held back (below the threshold): flushed by
        # the I/O thread on time, or riding on a frame going to that publisher.
        self._dirty_grants: dict[tuple[Subscription, str], CreditGrant] = {}
        self._last_seq: dict[tuple[str, str], int] = {}  # (publisher, subject) -> seq
        # ROUTER identity -> peer id of peers that sent data (I/O thread): no split and
        # decode of the identity per message.
        self._ident_ids: dict[bytes, str] = {}
        # Keeps libzmq's heap from being shrunk under large receives (engine/heap.py).
        self._ballast = heap.Ballast()

    def _deliver(self, sub: Subscription, msg: Message) -> None:
        """Hand a message to a subscription (from a publishing thread)."""
        if sub.closed:
            return
        if sub.handler is None:
            sub._inbox.put(msg)
        else:
            self._dispatch.put((sub, msg))

    def _hand_over(self, sub: Subscription, msg: Message) -> None:
        """Hand a message the I/O thread read to its open subscription: the inbox, the
        inline handler right here, or the dispatch thread's next item."""
        if sub.handler is None:
            sub._inbox.put(msg)
        elif sub.inline:
            self._run_inline(sub, msg)
        else:
            self._io_batch.append((sub, msg))

    def _io_deliver(self, sub: Subscription, msg: Message) -> None:
        """Hand a message to a subscription from the I/O thread: handler calls are
        collected and passed to the dispatch thread once per drain."""
        if sub.closed:
            return
        if sub.handler is None:
            sub._inbox.put(msg)
        else:
            self._io_batch.append((sub, msg))

    def _dispatch_loop(self) -> None:
        self._engine_idents.add(threading.get_ident())
        dispatch_loop(self)  # engine/zcore.py: compiled, a lone message in C

    def _run_item(self, item: Any) -> None:
        if type(item) is not list:
            self._run_handler(*item)
            return
        if len(item) == 1 and type(item[0]) is tuple:  # one message (a ping-pong): no tally
            run_one(self, *item[0])
            return
        # A drain's worth of messages (runs of a batch and single ones): compiled,
        # credit back once per (subscription, publisher), not per message.
        run_list(self, item)

    def _call_handler(self, sub: Subscription, msg: Message) -> None:
        try:
            sub.handler(msg)
        except Exception:
            self.counters.drops["handler_error"] += 1
            log.exception("%s: handler for %r raised on %r", self.name, sub.pattern, msg.subject)
        sub.delivered += 1

    def _run_handler(self, sub: Subscription, msg: Message) -> None:
        if sub.closed:
            return
        self._call_handler(sub, msg)
        if getattr(msg, "_credit", None) is not None:  # on_peer callbacks get a PeerInfo
            self._consumed(sub, msg)  # the handler returned: its credit goes back

    def _wait_reply(self, pending: _Pending, timeout: float) -> bool:
        dispatch = self._dispatch_thread
        if dispatch is None or get_ident() != dispatch.ident:
            return pending.wait(timeout)
        # A handler is requesting: the responder may be a handler of this very node,
        # queued behind us on the dispatch thread. Run queued handlers meanwhile.
        deadline = time.monotonic() + timeout
        while not pending.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                item = self._dispatch.get(timeout=min(remaining, 0.05))
            except queue.Empty:
                continue
            if item is _STOP:
                self._dispatch.put(_STOP)
                return pending.done
            self._run_item(item)
        return True

    def _respond(self, reply_to: str, req_id: int, data: Any, headers: dict | None) -> None:
        self._check_open()
        if type(data) is bytes and len(data) <= self._max_size:  # the common case
            payload, array, flags, nbytes = [data], None, 0, len(data)
        else:
            payload, array, flags, nbytes = self._encode_payload(data)
        if reply_to == self.id:
            pending = self._pending.get(req_id)
            if pending is not None and pending.reply is None:
                view = payload[-1]
                pending.reply = Message(
                    "",
                    view if isinstance(view, bytes) else memoryview(view),
                    headers,
                    self.id,
                    0,
                    array=array,
                    request_id=req_id,
                )
                pending.set()
            return
        frames = wire.reply_frames(req_id, flags, headers, payload)
        if self._core and len(frames) == 1:  # one frame (small, plain): sent from C
            link = self._links.get(reply_to)
            if link is not None and link.lock.acquire(False):
                try:
                    if not link.closed and zcore.send_frame(self, link, reply_to, frames[0], nbytes):
                        return
                finally:
                    link.lock.release()
        self._send(reply_to, frames, nbytes, None)

    def _on_msg(self, ident: bytes, header: list, frames: list) -> None:
        self._on_msg_fields(ident, wire.check_msg(header), frames)

    def _data_peer(self, ident: bytes) -> Peer:
        """The peer behind a data message's ROUTER identity when the identity cache
        (which callers look at first) has no live one; remembered (raises for a stranger)."""
        peer = self._known_peer(ident)  # raises for a stranger
        if len(self._ident_ids) >= 4096:  # identities are the network's to choose
            self._ident_ids.clear()
        self._ident_ids[ident] = peer.id
        return peer

    def _on_msg_one(self, ident: bytes, fields: tuple, data: bytes) -> None:
        """A small lone message that came in one frame (wire.unpack_one): the latency
        case. _accept_run's steps for one plain message to one plain subscription,
        written out (no run, no loop over subscriptions); anything else goes there."""
        peer = self._peers.get(self._ident_ids.get(ident, ""))
        if peer is None or peer.state not in _KNOWN:
            peer = self._data_peer(ident)
        subject, seq, ts, _flags, _headers, req_id, sids = fields
        sub = self._subs_by_sid.get(sids[0])
        route = self._routing.cached(subject)
        now = time.time()
        nbytes = len(data)
        if (sub is None or sub.closed or sub.queue or route is None or self._policy is not None
                or sub not in route.local):
            self._accept_run(peer, fields, (data,), now, None, nbytes)
            return
        peer_id = peer.id
        counters = peer.counters
        counters.msgs_in += 1
        counters.bytes_in += nbytes
        counters = self.counters
        counters.msgs_in += 1
        counters.bytes_in += nbytes
        if ts:
            latency = now - ts
            if 0.0 <= latency < 3600.0:  # also rejects nan/inf; clocks may disagree a little
                self.latency.record(latency, 1)
        key = (peer_id, subject)  # plain subscribers see every message: gaps are losses
        last = self._last_seq.get(key)
        if last is not None and seq > last + 1:
            self.gaps += seq - last - 1
        self._last_seq[key] = seq
        grant = sub._grants.get(peer_id)
        if grant is None:
            grant = sub._grants[peer_id] = CreditGrant(
                sub.credits, sub.credit_bytes, threshold=_credit_threshold(sub.credits))
        with sub._flow:
            accepted = grant.on_received_run((nbytes,))
        if grant.buffered >= grant.credits:  # a full window nobody took from (engine/heap.py)
            heap.window_full(grant)
        if not accepted:
            counters.drops["credit_violation"] += 1
            return
        self._hand_over(sub, incoming(subject, data, None, peer_id, seq, None, req_id, self,
                                      None if req_id is None else peer_id,
                                      (grant, peer_id, nbytes)))

    def _on_msg_fields(self, ident: bytes, fields: tuple, frames: list) -> None:
        peer = self._peers.get(self._ident_ids.get(ident, ""))
        if peer is None or peer.state not in _KNOWN:
            peer = self._data_peer(ident)
        if not fields[3] and len(frames) == 3:  # bytes, not an array: the common case
            frame = frames[2]
            nbytes = len(frame)
            if nbytes < ZERO_COPY_BYTES:
                data = frame.bytes
            else:
                data = frame.buffer
                self._ballast.keep(frame, data)
            self._accept_run(peer, fields, (data,), time.time(), None, nbytes)
            return
        data, array, nbytes = self._payload_of(fields[3], frames, "message", peer)
        self._accept_run(peer, fields, (data,), time.time(), array, nbytes)

    def _on_batch(self, ident: bytes, header: list, frames: list) -> None:
        if len(frames) != 3:
            raise ProtocolError("batch needs exactly one data frame", "malformed")
        # Resolved once per batch, not per message: the peer and the clock.
        peer = self._known_peer(ident)
        now = time.time()
        unpack, check_msg = wire.unpack, wire.check_msg
        runs = []
        count = 0
        # Every run is checked before any is delivered: a bad batch is dropped whole.
        frame = frames[2]
        # The frame's own bytes when it has them: the runs are cut from them in place.
        for run_header, blob, at, sizes, total in decode_runs(
                frame.bytes if type(frame) is _BatchedFrame else frame.buffer):
            fields = unpack(run_header)
            if fields[1] != wire.MSG:
                raise ProtocolError("only data messages may be batched", "malformed")
            fields = check_msg(fields)
            if fields[3]:
                raise ProtocolError("arrays are never batched", "malformed")
            if len(sizes) > 1 and (fields[4] is not None or fields[5] is not None):
                raise ProtocolError("a run of several messages cannot share headers or a "
                                    "request id", "malformed")
            count += len(sizes)
            runs.append((fields, blob, at, sizes, total))
        if header[2] != count or type(header[2]) is not int:
            raise ProtocolError(f"batch says {header[2]!r} messages, holds {count}", "malformed")
        accept = self._accept_run
        for fields, blob, at, sizes, total in runs:
            accept(peer, fields, None, now, None, None, sizes, total, blob, at)

    def _accept_msg(
        self, peer: Peer, fields: tuple, data: Any, array: Any, nbytes: int, now: float
    ) -> None:
        """Deliver one checked data message from ``peer`` to the subscriptions it names."""
        self._accept_run(peer, fields, (data,), now, array, nbytes)

    def _accept_run(
        self, peer: Peer, fields: tuple, payloads: Any, now: float,
        array: Any = None, nbytes: int | None = None, sizes: Any = None, total: int = 0,
        blob: bytes | None = None, at: int = 0,
    ) -> None:
        """Deliver checked data messages from ``peer`` that share one header (a run of
        a batch: consecutive seqs from the header's) to the subscriptions it names.
        ``nbytes``: the payload size of a one-message run whose data is not bytes;
        a batch's run: ``payloads`` None, ``blob`` their bytes one after the other (from ``at``),
        ``sizes`` the payload lengths and ``total`` their sum."""
        subject, seq, ts, _flags, headers, req_id, sids = fields
        count = len(payloads) if payloads is not None else len(sizes)
        if self._policy is not None and not self._policy.may_publish(peer.name, subject):
            for _ in range(count):
                self._denied(peer, "publish", subject)
            return
        route = self._routing.cached(subject)
        if route is None:
            route = self._route(subject, internal=True)
        if nbytes is not None:
            sizes = [nbytes]
            total = nbytes
        elif sizes is None:
            sizes = [len(data) for data in payloads]
            total = sum(sizes)
        counters = peer.counters
        counters.msgs_in += count
        counters.bytes_in += total
        self.counters.msgs_in += count
        self.counters.bytes_in += total
        if ts:
            # The run's messages share its first one's send time: the others left
            # after it (within batch_delay), so theirs reads a little high.
            latency = now - ts
            if 0.0 <= latency < 3600.0:  # also rejects nan/inf; clocks may disagree a little
                self.latency.record(latency, count)
        peer_id = peer.id
        reply_to = peer_id if req_id is not None else None
        drops = self.counters.drops
        counted_gap = False
        for sid in sids:
            sub = self._subs_by_sid.get(sid)
            if sub is None or sub.closed:
                drops["no_subscriber"] += count  # unsubscribed meanwhile
                continue
            if sub not in route.local and (
                    not route.local_groups or sub not in route.local_groups.get(sub.queue, ())):
                drops["not_subscribed"] += count  # a publisher that lies
                continue
            if not sub.queue and not counted_gap:
                # Plain subscribers see every message of a subject: gaps are losses.
                counted_gap = True
                key = (peer_id, subject)
                last = self._last_seq.get(key)
                if last is not None and seq > last + 1:
                    self.gaps += seq - last - 1
                self._last_seq[key] = seq + count - 1
            grant = sub._grants.get(peer_id)
            if grant is None:
                grant = sub._grants[peer_id] = CreditGrant(
                    sub.credits, sub.credit_bytes, threshold=_credit_threshold(sub.credits))
            with sub._flow:
                accepted = grant.on_received_run(sizes, total)
            if grant.buffered >= grant.credits:  # a full window nobody took from (engine/heap.py)
                heap.window_full(grant)
            if accepted < count:
                drops["credit_violation"] += count - accepted  # sent beyond its credit
            if payloads is None and (count == 1 or sub.handler is None or sub.inline):
                payloads = split_run(blob, sizes, at)  # messages made here (not by a Run)
            if accepted == 1 and count == 1:  # the common case: one message, within credit
                msg = incoming(subject, payloads[0], headers, peer_id, seq, array, req_id, self,
                               reply_to, (grant, peer_id, sizes[0]))
                if not sub.closed:
                    self._hand_over(sub, msg)
                continue
            if sub.closed:
                continue
            if sub.handler is not None and not sub.inline:
                # The common case of a batch: one Run for the dispatch thread, collected
                # once per drain; it makes the messages (engine/receive.py, compiled).
                queue_run(self._io_batch, sub, subject, payloads, blob, headers, peer_id, seq,
                          array, req_id, self, reply_to, grant, sizes, accepted, at)
                continue
            msgs = [incoming(subject, payloads[i], headers, peer_id, seq + i, array, req_id, self,
                             reply_to, (grant, peer_id, sizes[i])) for i in range(accepted)]
            if sub.handler is None:
                put = sub._inbox.put
                for msg in msgs:
                    put(msg)
            else:  # inline
                for index, msg in enumerate(msgs):
                    if not sub.inline:  # it went over its budget: the rest go as usual
                        self._io_batch.extend([(sub, m) for m in msgs[index:]])
                        break
                    self._run_inline(sub, msg)
        if not sids:
            drops["no_interest"] += count

    def _run_inline(self, sub: Subscription, msg: Message) -> None:
        """Run an inline handler here, on the I/O thread that read the message; one
        over its budget is logged once and moved to the dispatch thread (API.md).
        A preemption can make a short handler overrun once on a loaded machine: it
        then only loses the inline shortcut, never a message or the order."""
        if sub.closed:
            return
        started = time.perf_counter()
        self._call_handler(sub, msg)
        took = time.perf_counter() - started
        if took > self._inline_budget:
            self._inline_overran(sub, msg, took)
        credit = msg._credit
        if type(credit) is tuple:  # from a remote publisher (the I/O thread read it)
            msg._credit = None
            self._return_credit(sub, credit[0], credit[1], 1, credit[2])
        elif credit is not None:
            self._consumed(sub, msg)

    def _inline_overran(self, sub: Subscription, msg: Message, took: float) -> None:
        """An inline handler took ``took`` s, over the budget: log once, move it."""
        sub.inline = False
        log.warning(
            "%s: inline handler of %r took %.1f ms on %r (inline_budget %.1f ms); it "
            "runs on the dispatch thread from now on", self.name, sub.pattern,
            took * 1e3, msg.subject, self._inline_budget * 1e3)

    def _consumed(self, sub: Subscription, msg: Message) -> None:
        """The application is done with ``msg``: give its credit back (any thread)."""
        credit = msg._credit
        msg._credit = None
        if type(credit) is int:  # from this node's own publisher: no network
            with sub._flow:
                released = sub._window.on_credit(1, credit)
                sub._flow.notify_all()
            for held in released:
                self._deliver(sub, held)
            return
        grant, publisher, nbytes = credit
        self._return_credit(sub, grant, publisher, 1, nbytes)

    def _return_credit(self, sub: Subscription, grant: CreditGrant, publisher: str,
                       count: int, nbytes: int) -> None:
        """``count`` messages from ``publisher`` were consumed: send their credit back
        now if the grant's threshold is reached, else have the I/O thread flush it
        later (engine/zcore.py's return_credit: compiled)."""
        return_credit(self, sub, grant, publisher, count, nbytes)

    def _send_credit_direct(self, publisher: str, entries: list) -> bool:
        """Send credit on the link's data socket from this (dispatch) thread: no wake-up
        of the I/O thread, no hop. False when the link is busy, its queue is full, or
        arrays go by RDMA (data-pipe messages then keep an order with them): the I/O
        thread sends it on the control socket instead."""
        link = self._links.get(publisher)
        if link is None or not link.lock.acquire(False):
            return False
        try:
            if link.closed or self._keeps_order(link):
                return False
            owed = self._owed_credit(publisher) if self._dirty_grants else None
            if owed is not None:  # other subscriptions' credit for it goes along
                entries = entries + owed
            try:
                link.sock.send(wire.pack(wire.CREDIT, entries), zmq.NOBLOCK)
            except zmq.ZMQError:
                self._owed_credit_failed(publisher, owed)
                return False
            self.credit_updates["data"] += 1
            return True
        finally:
            link.lock.release()

    def _owed_credit(self, peer_id: str) -> list | None:
        """Credit this node owes ``peer_id`` and holds back (below the threshold, its
        timer not yet due), taken now to ride on a frame going there anyway: no
        message of its own. Called by whoever sends to the peer, link lock held
        (engine/zcore.py: compiled with the send path that calls it most)."""
        return owed_credit(self, peer_id)

    def _owed_credit_failed(self, peer_id: str, entries: list | None) -> None:
        """The frame that carried credit was not sent: it must still arrive (the
        publisher would wait for it forever), so the I/O thread sends it alone."""
        if entries is not None:
            self._command(("credit", peer_id, entries))

    def _on_reply(self, ident: bytes, header: list, frames: list) -> None:
        req_id, flags, headers = wire.check_reply(header)
        peer = self._peers.get(self._ident_ids.get(ident, ""))
        if peer is None or peer.state not in _KNOWN:
            peer = self._known_peer(ident)  # raises for a stranger
        if not flags and len(frames) == 3:  # bytes, not an array: the common case
            frame = frames[2]
            data = frame.bytes if len(frame) < ZERO_COPY_BYTES else frame.buffer
            array = None
        else:
            data, array, _nbytes = self._payload_of(flags, frames, "reply", peer)
        self._settle_reply(req_id, data, headers, peer.id, array)

    def _on_reply_one(self, ident: bytes, req_id: int, data: bytes) -> None:
        """A small plain reply that came in one frame (wire.unpack_one)."""
        peer = self._peers.get(self._ident_ids.get(ident, ""))
        if peer is None or peer.state not in _KNOWN:
            peer = self._data_peer(ident)
        self._settle_reply(req_id, data, None, peer.id, None)

    def _settle_reply(self, req_id: int, data: Any, headers: dict | None, sender: str,
                      array: Any) -> None:
        """Hand a reply to the request waiting for it; a late or second one is counted."""
        pending = self._pending.get(req_id)
        if pending is None or pending.reply is not None:
            self.counters.drops["late_reply"] += 1
            return
        pending.reply = Message("", data, headers, sender, 0, array=array, request_id=req_id)
        pending.set()

    def _payload_of(self, flags: int, frames: list, what: str, peer: Peer) -> tuple[Any, Any, int]:
        """(data, array or None, nbytes) of a message's payload frames."""
        if flags & wire.TENSOR:
            if len(frames) != 4:
                raise ProtocolError(f"tensor {what} needs descriptor and data frames", "malformed")
            if flags & self._bulk_flags:  # the array waits in a bulk channel
                channel = next(c for c in self._bulk if flags & c.flag)
                data, nbytes = channel.open_array(peer, frames[3].bytes)
                return data, array_from_frames(frames[2].buffer, data), nbytes
            data = frames[3].buffer
            self._ballast.keep(frames[3], data)
            return data, array_from_frames(frames[2].buffer, data), len(frames[3])
        if len(frames) != 3:
            raise ProtocolError(f"{what} needs exactly one payload frame", "malformed")
        frame = frames[2]
        data = frame.buffer if len(frame) >= ZERO_COPY_BYTES else frame.bytes
        return data, None, len(frame)

    def _on_p2p(self, ident: bytes, body: Any, frames: list) -> None:
        channel_name, tag, flags, meta = wire.check_p2p(body)
        peer = self._known_peer(ident)
        data, array, nbytes = self._payload_of(flags, frames, "p2p message", peer)
        peer.counters.msgs_in += 1
        peer.counters.bytes_in += nbytes
        self.counters.msgs_in += 1
        self.counters.bytes_in += nbytes
        msg = ChannelMessage(peer.id, tag, meta, data, array)
        with self._lock:  # against _open_channel moving the early buffer meanwhile
            channel = self._channels.get(channel_name)
            if channel is None:
                # The peer got there first: keep it until this node opens the channel.
                if sum(len(q) for q in self._early.values()) >= EARLY_MAX_MESSAGES:
                    self.counters.drops["early_overflow"] += 1
                    return
                self._early.setdefault(channel_name, collections.deque()).append(
                    (time.monotonic(), msg)
                )
                return
        channel._put(msg)

    def _open_channel(self, name: str) -> Channel:
        self._check_started()
        with self._lock:
            if name in self._channels:
                raise MeshError(f"channel {name!r} is already open on {self.name}")
            channel = Channel(self, name)
            self._channels[name] = channel
            early = self._early.pop(name, None)
        if early:
            for _, msg in early:
                channel._put(msg)
        for peer in list(self._peers.values()):
            if peer.state in ("dead", "left"):
                channel._peer_lost(peer.id, f"peer {peer.name} is {peer.state}")
        return channel

    def _close_channel(self, channel: Channel) -> None:
        with self._lock:
            if self._channels.get(channel.name) is channel:
                del self._channels[channel.name]

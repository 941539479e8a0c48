"""The common publish written out in one function: a small bytes payload, no
headers, a cached route to remote plain subscriptions, the window within
credit, and a burst under way whose batch run this message extends.

That is nearly every message of a publishing loop (all but the first of each
batch); ``Node.publish`` asks :meth:`HotPublisher.publish` first and takes the
general path (mesh/engine/link.py) whenever it answers False, with nothing
changed. Per link of a fan-out: a link whose run cannot take the message (its
batch just left, credit ran out) gets it through ``_send_msg`` with the same seq,
while the other links stay on this path. The same steps as ``_route`` -> ``_publish`` -> ``_send_msg`` ->
``CreditWindow.offer`` -> ``_send_locked`` (which stay the reference), without
five calls, the item tuple and the attribute lookups between them. Compiled by
Cython with fastpath.pxd (typed attributes, C calls); the pure build runs the
same code. A lone message (``_lone``, also ``Node.request``'s through
:meth:`HotPublisher.request`) is made and sent from C in the compiled build
(engine/zcore.py: ``pack_one``, ``send_frame``); with batching off
(``batch_bytes=0``) every message that fits the lone case takes it.

Who owns what: a ``HotPublisher`` belongs to one node and holds references to
its dicts, which the node never replaces (the routing cache is read from the
table on each call: the table swaps it on changes). It runs on whatever thread
publishes, and touches a link's batch, window and counters only under
``link.lock``, as the general path does.
"""

from __future__ import annotations

import time
from typing import Any

from mesh import wire
from mesh.engine import zcore

# Mirrors of mesh/engine/link.py's (the general path's) constants.
_BATCH_SMALL = 1024  # payloads up to this size may be batched
_BURST_GAP = 50e-6  # a message this close after the previous one is part of a burst
_RESERVED = "_mesh"


class HotPublisher:
    """The common case of ``Node.publish`` for one node (see the module doc)."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.links = node._links
        self.seqs = node._seqs
        self.routing = node._routing
        self.counters = node.counters
        self.batch_max = node._batch_max
        self.max_size = node._max_size
        self.wall = time.time
        # A lone message's frame is made and sent from C (engine/zcore.py).
        self.core = zcore.available()
        # (route, its peers, its subject's counter) of the last fast publish.
        self.last: tuple = (None, None, None)

    def publish(self, subject: Any, data: Any, headers: Any, timeout: Any) -> bool:
        """Publish ``data`` on ``subject`` if this is the common case; False (nothing
        done) sends the caller down the general path."""
        if type(data) is not bytes or headers is not None or type(subject) is not str:
            return False
        nbytes = len(data)
        if nbytes > _BATCH_SMALL or nbytes > self.max_size:
            return False
        route = self.routing._cache.get(subject)
        if route is None:
            return False  # not routed yet: the general path computes it
        last = self.last  # read once: publishers on other threads may replace it
        if route is not last[0]:
            # Checked once per route: a Route is immutable and made for one subject (the
            # table makes a new one on every change), so the same object means the same
            # subject, subscriptions and counter as the last publish that passed here.
            if route.local or route.local_groups or route.peer_groups:
                return False
            if self.node._policy is not None or subject.startswith(_RESERVED):
                return False  # policy checks and reserved subjects: the general path
            counter = self.seqs.get(subject)
            if counter is None:
                return False  # the first message on a subject
            last = (route, route.peers, counter)
            self.last = last  # one assignment: never a mix of two publishes' routes
        node = self.node
        links = self.links
        peers = last[1]
        if len(peers) == 1:
            for peer_id, sids in peers.items():
                link = links.get(peer_id)
                if link is not None and len(sids) == 1 and not link.batch:
                    # Not in a burst: it may go alone, in one frame (the latency case).
                    return self._lone(link, peer_id, sids[0], subject, last[2], data, nbytes,
                                      timeout, None)
        if not self.batch_max:
            return False  # batching off (batch_bytes=0): the general path sends each alone
        seq = next(last[2])  # (no clock: the run's header carries its first message's time)
        counters = self.counters
        batch_max = self.batch_max
        ts = 0.0
        # Each peer's link extends its open batch run here, or takes the general path
        # for this message (same seq), as _publish would: a fan-out whose links flush
        # their batches at different times keeps the fast path on the others.
        for peer_id, sids in peers.items():
            link = links.get(peer_id)
            if link is not None and len(sids) == 1:
                lock = link.lock
                lock.acquire()
                try:
                    if self._append(link, sids[0], subject, seq, data, nbytes):
                        counters.msgs_out += 1
                        counters.bytes_out += nbytes
                        if link.batch_bytes >= batch_max or link.batch_count >= link.batch_cap:
                            node._flush_batch(link, timeout)
                        continue
                finally:
                    lock.release()
            # No open run to extend (it left, credit ran out, the link changed or is
            # gone, several subscriptions): the general path, with this seq.
            if not ts:
                ts = self.wall()  # one timestamp for every peer, as _publish
            node._send_msg(peer_id, sids, (subject, seq, ts, 0, None, None, [data], nbytes),
                           timeout)
        return True

    def request(self, subject: Any, data: Any, req_id: int) -> bool:
        """``Node.request``'s send when it is the latency case: a small bytes payload to
        the one subscription of one peer, no burst under way, sent from C (compiled
        build). False, with nothing done, sends it down the general path."""
        if not self.core or type(data) is not bytes or type(subject) is not str:
            return False
        nbytes = len(data)
        if nbytes > _BATCH_SMALL or nbytes > self.max_size:
            return False
        route = self.routing._cache.get(subject)
        if route is None or route.local or route.local_groups or route.peer_groups:
            return False
        if self.node._policy is not None or subject.startswith(_RESERVED):
            return False
        counter = self.seqs.get(subject)
        peers = route.peers
        if counter is None or len(peers) != 1:
            return False
        for peer_id, sids in peers.items():
            link = self.links.get(peer_id)
            if link is None or len(sids) != 1 or link.batch:
                return False
            return self._lone(link, peer_id, sids[0], subject, counter, data, nbytes, None, req_id)
        return False

    def _lone(self, link: Any, peer_id: str, sid: int, subject: str, counter: Any, data: bytes,
              nbytes: int, timeout: Any, req_id: Any) -> bool:
        """Send one message to the one subscription of one peer, alone, when no burst
        is under way and its window has room: ``_send_msg`` -> ``_send_locked``'s
        unbatched case written out (the same ``_put_frames`` then). False, with nothing
        changed, when that is not the case."""
        lock = link.lock
        lock.acquire()
        try:
            if link.closed or link.credit_in or link.batch:
                return False
            now = time.monotonic()
            if self.batch_max and now - link.last_send < _BURST_GAP:
                return False  # a burst: the general path starts a batch
            if not _take_credit(link.windows.get(sid), nbytes):
                return False
            link.last_send = now
            seq = next(counter)
            frames = None
            if self.core:  # the frame made and sent from C (engine/zcore.py)
                try:
                    frame = zcore.pack_one(subject.encode(), seq, self.wall(), sid,
                                           -1 if req_id is None else req_id, data)
                except OverflowError:  # beyond 64 bits: wire's layouts decide
                    frame = None
                if frame is not None:
                    if zcore.send_frame(self.node, link, peer_id, frame, nbytes):
                        return True
                    frames = [frame]
            if frames is None:
                frames = wire.lone_frames(subject, seq, self.wall(), req_id, sid, [data])
            self.node._put_frames(link, peer_id, frames, nbytes, timeout)
            return True
        finally:
            lock.release()

    def _append(self, link: Any, sid: int, subject: str, seq: int, data: bytes,
                nbytes: int) -> bool:
        """Take the window's credit and extend the batch's last run (link lock held);
        False, with nothing changed, when that is not the case any more."""
        if link.closed or link.credit_in:
            return False
        batch = link.batch
        if not batch:
            return False
        run = batch[-1]
        last = run[2]  # C integers in the compiled build: no int object made to compare
        this = seq
        if last + 1 != this or run[1] != subject or len(run[3]) != 1 or run[3][0] != sid:
            return False
        if not _take_credit(link.windows.get(sid), nbytes):
            return False
        run[2] = seq
        run[4].append(data)
        link.batch_bytes += nbytes + 4
        link.batch_count += 1
        counters = link.counters
        counters.msgs_out += 1
        counters.bytes_out += nbytes
        return True


def _take_credit(window: Any, nbytes: int) -> bool:
    """CreditWindow.offer's SEND case, written out (link lock held): take one
    message's credit, or False, with nothing changed, when the window has none."""
    if window is None or window._pending or window.closed_reason is not None:
        return False
    in_flight = window.in_flight
    if in_flight >= window.credits:
        return False
    credit_bytes = window.credit_bytes
    if credit_bytes is not None and in_flight:
        limit = credit_bytes  # a C integer in the compiled build: no int object made
        if window.in_flight_bytes + nbytes > limit:
            return False
    window.in_flight = in_flight + 1
    window.in_flight_bytes += nbytes
    window.sent += 1
    return True

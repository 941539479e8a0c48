"""The common publish written out in one function: a small bytes payload, no
headers, a cached route to remote plain subscriptions, the window within
credit, and a burst under way whose batch run this message extends.

That is nearly every message of a publishing loop (all but the first of each
batch); ``Node.publish`` asks :meth:`HotPublisher.publish` first and takes the
general path (mesh/engine/link.py) whenever it answers False, with nothing
changed. The same steps as ``_route`` -> ``_publish`` -> ``_send_msg`` ->
``CreditWindow.offer`` -> ``_send_locked`` (which stay the reference), without
five calls, the item tuple and the attribute lookups between them. Compiled by
Cython with fastpath.pxd (typed attributes, C calls); the pure build runs the
same code.

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

    def publish(self, subject: Any, data: Any, headers: Any, timeout: Any) -> bool:
        """Publish ``data`` on ``subject`` if this is the common case; False (nothing
        done) sends the caller down the general path."""
        if type(data) is not bytes or headers is not None or not self.batch_max or \
                type(subject) is not str:
            return False
        nbytes = len(data)
        if nbytes > _BATCH_SMALL or nbytes > self.max_size:
            return False
        route = self.routing._cache.get(subject)
        if route is None or route.local or route.local_groups or route.peer_groups:
            return False
        node = self.node
        if node._policy is not None or subject.startswith(_RESERVED):
            return False  # policy checks and reserved subjects: the general path
        counter = self.seqs.get(subject)
        if counter is None:
            return False  # the first message on a subject
        links = self.links
        peers = route.peers
        if len(peers) == 1:
            for peer_id, sids in peers.items():
                link = links.get(peer_id)
                if link is not None and len(sids) == 1 and not link.batch:
                    # Not in a burst: it may go alone, in one frame (the latency case).
                    return self._lone(link, peer_id, sids[0], subject, counter, data, nbytes,
                                      timeout)
        # Every peer's link must take it here, checked before anything changes:
        # then the message is one seq, sent to all, as the general path does.
        for peer_id, sids in peers.items():
            link = links.get(peer_id)
            if link is None or len(sids) != 1 or not self._fits(link, sids[0], subject, nbytes):
                return False
        seq = next(counter)  # (no clock: the run's header carries its first message's time)
        counters = self.counters
        for peer_id, sids in peers.items():
            link = links[peer_id]
            sid = sids[0]
            lock = link.lock
            lock.acquire()
            try:
                if not self._append(link, sid, subject, seq, data, nbytes):
                    # The link changed between the check and here (credit ran out, the
                    # batch left): this peer takes the general path with this seq.
                    lock.release()
                    lock = None
                    node._send_msg(peer_id, sids, (subject, seq, self.wall(), 0, None, None,
                                                   [data], nbytes), timeout)
                    continue
                counters.msgs_out += 1
                counters.bytes_out += nbytes
                if link.batch_bytes >= self.batch_max or link.batch_count >= link.batch_cap:
                    node._flush_batch(link, timeout)
            finally:
                if lock is not None:
                    lock.release()
        return True

    def _lone(self, link: Any, peer_id: str, sid: int, subject: str, counter: Any, data: bytes,
              nbytes: int, timeout: Any) -> bool:
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
            if now - link.last_send < _BURST_GAP:
                return False  # a burst: the general path starts a batch
            window = link.windows.get(sid)
            if window is None or window._pending or window.closed_reason is not None:
                return False
            # CreditWindow.offer's SEND case, written out.
            in_flight = window.in_flight
            if in_flight >= window.credits:
                return False
            credit_bytes = window.credit_bytes
            if credit_bytes is not None and in_flight and \
                    window.in_flight_bytes + nbytes > credit_bytes:
                return False
            window.in_flight = in_flight + 1
            window.in_flight_bytes += nbytes
            window.sent += 1
            link.last_send = now
            frames = wire.lone_frames(subject, next(counter), self.wall(), None, sid, [data])
            self.node._put_frames(link, peer_id, frames, nbytes, timeout)
            return True
        finally:
            lock.release()

    def _fits(self, link: Any, sid: int, subject: str, nbytes: int) -> bool:
        """Would this message extend the link's open batch run within credit? (No lock:
        a hint only, ``_append`` decides under the lock.)"""
        batch = link.batch
        if not batch or link.closed or link.credit_in:
            return False
        run = batch[-1]
        return run[1] == subject and len(run[3]) == 1 and run[3][0] == sid and \
            link.windows.get(sid) is not None

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
        if run[2] != seq - 1 or run[1] != subject or len(run[3]) != 1 or run[3][0] != sid:
            return False
        window = link.windows.get(sid)
        if window is None or window._pending or window.closed_reason is not None:
            return False
        # CreditWindow.offer's SEND case, written out.
        in_flight = window.in_flight
        if in_flight >= window.credits:
            return False
        credit_bytes = window.credit_bytes
        if credit_bytes is not None and in_flight and \
                window.in_flight_bytes + nbytes > credit_bytes:
            return False
        window.in_flight = in_flight + 1
        window.in_flight_bytes += nbytes
        window.sent += 1
        run[2] = seq
        run[4].append(data)
        link.batch_bytes += nbytes + 4
        link.batch_count += 1
        counters = link.counters
        counters.msgs_out += 1
        counters.bytes_out += nbytes
        return True

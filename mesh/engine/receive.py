"""The subscriber's per-message work for batches, written out in two functions:
:func:`queue_run` (the I/O thread hands a received run to a handler's
subscription as one item) and :func:`run_list` (the dispatch thread makes each
message, calls the handler and gives the credit back). Compiled by Cython with
receive.pxd (typed, C calls, Message made without a lookup); the pure build runs
the same code.

A run of a batch (consecutive messages of one publisher on one subject) goes to
the dispatch thread as one :class:`Run`: the run's bytes and payload sizes, not a
``Message``, a ``(sub, msg)`` tuple and a ``(grant, publisher, nbytes)`` credit
per message. The dispatch thread cuts each payload and makes its ``Message`` right
before the handler sees it, so a message's memory is made and freed by one thread
and reused while still in that core's cache (made on the I/O thread and freed on
the dispatch thread, each message cost the I/O thread several cache misses). It
counts what it consumed and returns the credit once per (subscription,
publisher) when the grant's threshold is reached, the drain is done, or handling
took longer than ``_CREDIT_HOLD``. The reference for both is
mesh/engine/dispatch.py (``_accept_run``, ``_run_handler``), which handles
everything else (single messages, inboxes, inline handlers).

Who owns what: a ``Run`` is built by the I/O thread and handed over in the
drain's dispatch item; from then on only the dispatch thread (or a handler of it
waiting for a reply, ``Dispatcher._wait_reply``) touches it. Credit goes back
through ``node._return_credit`` (it takes the subscription's flow lock).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mesh.message import Message

log = logging.getLogger("mesh")

# The dispatch thread returns the credit of a drain's messages at its end, or as
# soon as handling them has taken this long (seconds): slow handlers must not hold
# the credit of what they finished until the rest is done.
_CREDIT_HOLD = 0.002
_SEQ_TYPED = 1 << 62  # sequence numbers below this are counted in C


class Run:
    """Messages of one received run for one handler subscription (dispatch item):
    made into ``Message`` objects by the dispatch thread, one at a time, right before
    its handler sees them."""

    __slots__ = ("sub", "grant", "publisher", "count", "payloads", "blob", "at", "sizes",
                 "subject", "headers", "seq", "array", "request_id", "node", "reply_to")

    def __init__(self, sub: Any, grant: Any, publisher: Any, count: int, payloads: Any,
                 blob: Any, sizes: Any, subject: Any, headers: Any, seq: Any, array: Any,
                 request_id: Any, node: Any, reply_to: Any, at: int = 0) -> None:
        self.sub = sub
        self.grant = grant  # the subscription's CreditGrant for this publisher
        self.publisher = publisher
        self.count = count  # messages to hand out (those within credit)
        # Their data: a list of payloads, or (a batch's run) None and ``blob``, their
        # bytes one after the other from ``at`` (often the whole batch frame's bytes: no
        # copy of the run), cut at ``sizes`` (payload lengths, what credit counts).
        self.payloads = payloads
        self.blob = blob
        self.at = at  # where in ``blob`` the first payload starts
        self.sizes = sizes
        self.subject = subject  # what the run's messages share
        self.headers = headers
        self.seq = seq  # the first one's
        self.array = array
        self.request_id = request_id
        self.node = node
        self.reply_to = reply_to


def queue_run(
    out: list, sub: Any, subject: Any, payloads: Any, blob: Any, headers: Any, sender: Any,
    seq: Any, array: Any, request_id: Any, node: Any, reply_to: Any, grant: Any, sizes: Any,
    count: int, at: int = 0,
) -> None:
    """Append the first ``count`` messages of a received run (consecutive seqs from
    ``seq``; ``payloads``, or None and ``blob``: see Run) to ``out`` as one
    :class:`Run` for ``sub``'s handler. Nothing per message here, on the I/O thread:
    the dispatch thread makes each message when it hands it out, so the memory of a
    message is made and freed by the same thread (and reused while in its cache)."""
    if count > 0:
        out.append(Run(sub, grant, sender, count, payloads, blob, sizes, subject, headers, seq,
                       array, request_id, node, reply_to, at))


def _handler_failed(node: Any, sub: Any, msg: Any) -> None:
    node.counters.drops["handler_error"] += 1
    log.exception("%s: handler for %r raised on %r", node.name, sub.pattern, msg.subject)


def _flush(node: Any, consumed: dict) -> None:
    """Return the credit counted in ``consumed`` (grant -> [sub, publisher, count,
    nbytes]) and clear it."""
    for grant, tally in consumed.items():
        if tally[2]:
            node._return_credit(tally[0], grant, tally[1], tally[2], tally[3])
    consumed.clear()


def run_list(node: Any, item: list) -> None:
    """Run a drain's worth of handler calls (``Run`` and ``(sub, msg)`` entries, in
    order) on the dispatch thread; the credit of remote publishers goes back once per
    (subscription, publisher) after the item, at the grant's threshold, or after
    ``_CREDIT_HOLD``: not once per message."""
    consumed: dict = {}  # grant -> [sub, publisher, count, nbytes]: consumed, not returned
    monotonic = time.monotonic
    since = monotonic()
    for entry in item:
        if type(entry) is Run:
            run = entry
            sub = run.sub
            grant = run.grant
            sizes = run.sizes
            payloads = run.payloads
            if payloads is None:
                blob = run.blob
                start = blob  # a C pointer in the compiled build (receive.pxd)
            subject = run.subject
            headers = run.headers
            sender = run.publisher
            seq = run.seq
            typed = 0 <= seq < _SEQ_TYPED  # always, but for a peer that sends absurd seqs
            first = seq if typed else 0  # a C integer in the compiled build
            array = run.array
            request_id = run.request_id
            reply_to = run.reply_to
            handler = sub.handler
            threshold = grant.threshold
            tally = consumed.get(grant)
            if tally is None:
                tally = consumed[grant] = [sub, run.publisher, 0, 0]
            count = tally[2]
            nbytes = tally[3]
            done = 0
            pos = run.at  # the first payload's place in the blob
            for i in range(run.count):
                if sub._closed:
                    break  # closed meanwhile (maybe by this handler): the rest is dropped
                size = sizes[i]
                # The message, made here (see queue_run): incoming()'s body, inline.
                msg = Message.__new__(Message)
                msg.subject = subject
                if payloads is None:
                    msg.data = start[pos : pos + size]
                else:
                    msg.data = payloads[i]
                pos += size
                msg._headers = headers
                msg.sender = sender
                msg.seq = first + i if typed else seq + i
                msg.request_id = request_id
                msg._desc = None
                msg._array = array
                msg._node = node
                msg._reply_to = reply_to
                msg._credit = None  # the Run carries the credit
                try:
                    handler(msg)
                except Exception:
                    _handler_failed(node, sub, msg)
                msg = None  # freed now if the handler kept no reference (memory reused hot)
                done += 1
                count += 1
                nbytes += size
                now = monotonic()
                if count >= threshold:
                    # Enough for the publisher to act on: now, not after the rest.
                    node._return_credit(sub, grant, run.publisher, count, nbytes)
                    count = nbytes = 0
                elif now - since > _CREDIT_HOLD:
                    tally[2] = count
                    tally[3] = nbytes
                    _flush(node, consumed)
                    tally = consumed[grant] = [sub, run.publisher, 0, 0]
                    count = nbytes = 0
                    since = now
            tally[2] = count
            tally[3] = nbytes
            # Counted once they returned (per run: a status row may lag by one run).
            sub.delivered += done
            continue
        # One message: from the I/O thread's single-message path or another thread.
        sub, msg = entry
        now = monotonic()
        if consumed and now - since > _CREDIT_HOLD:
            _flush(node, consumed)
            since = now
        if sub.closed:
            continue
        node._call_handler(sub, msg)
        credit = getattr(msg, "_credit", None)  # on_peer callbacks get a PeerInfo
        if type(credit) is tuple:
            msg._credit = None
            grant = credit[0]
            tally = consumed.get(grant)
            if tally is None:
                tally = consumed[grant] = [sub, credit[1], 0, 0]
            count = tally[2] + 1
            nbytes = tally[3] + credit[2]
            if count >= grant.threshold:
                node._return_credit(sub, grant, credit[1], count, nbytes)
                count = nbytes = 0
            tally[2] = count
            tally[3] = nbytes
        elif credit is not None:
            node._consumed(sub, msg)
    _flush(node, consumed)


__all__ = ["Run", "queue_run", "run_list"]

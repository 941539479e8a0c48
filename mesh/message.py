"""Messages as the application sees them, and subscriptions."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from mesh.errors import ClosedError, MeshError, TimeoutError
from mesh.tensor import array_from_frames


class Message:
    """A message received on a subscription (or the reply to a request).

    ``data`` is ``bytes`` for small payloads and a read-only ``memoryview`` on
    the received frame for large ones (no copy). ``array()`` rebuilds the numpy
    array the publisher sent, as a view on that frame.
    """

    __slots__ = (
        "subject",
        "data",
        "_headers",
        "sender",
        "seq",
        "request_id",
        "_desc",
        "_array",
        "_node",
        "_reply_to",
        "_credit",
    )

    def __init__(
        self,
        subject: str,
        data: Any,
        headers: dict | None,
        sender: str,
        seq: int,
        *,
        desc: Any = None,
        array: np.ndarray | None = None,
        request_id: int | None = None,
        node: Any = None,
        reply_to: str | None = None,
    ) -> None:
        self.subject = subject
        self.data = data
        self._headers = headers
        self.sender = sender
        self.seq = seq
        self.request_id = request_id
        self._desc = desc
        self._array = array
        self._node = node
        self._reply_to = reply_to
        # What consuming it gives back: nbytes (local publisher) or
        # (grant, publisher id, nbytes) for a remote one; None: no flow control.
        self._credit: Any = None

    @property
    def headers(self) -> dict:
        """The publisher's headers (an empty dict when it sent none: made on first use,
        most messages carry none)."""
        headers = self._headers
        if headers is None:
            headers = self._headers = {}
        return headers

    @headers.setter
    def headers(self, value: dict) -> None:
        self._headers = value

    def array(self) -> np.ndarray:
        """The numpy array the publisher sent (dtype and shape kept, no copy)."""
        if self._array is None:
            if self._desc is None:
                raise MeshError(
                    f"message on {self.subject!r} carries bytes, not an array; "
                    "use msg.data, or publish a numpy array to get msg.array()"
                )
            self._array = array_from_frames(self._desc, self.data)
        return self._array

    @property
    def is_request(self) -> bool:
        return self.request_id is not None and self._reply_to is not None

    def respond(self, data: Any, headers: dict | None = None) -> None:
        """Answer a request. Raises MeshError if this message is not a request."""
        if not self.is_request or self._node is None:
            raise MeshError(
                f"message on {self.subject!r} is not a request: respond() only answers "
                "messages sent with node.request()"
            )
        self._node._respond(self._reply_to, self.request_id, data, headers)

    def __repr__(self) -> str:
        size = self.data.nbytes if isinstance(self.data, memoryview) else len(self.data)
        return f"<Message {self.subject!r} seq={self.seq} from={self.sender} {size} B>"


def incoming(
    subject: str, data: Any, headers: dict | None, sender: str, seq: int, array: Any,
    request_id: int | None, node: Any, reply_to: str | None, credit: Any,
) -> Message:
    """A received message, made by the I/O thread: ``Message(...)`` without the
    keyword arguments and ``__init__`` call (one per message on the hot path)."""
    msg = Message.__new__(Message)
    msg.subject = subject
    msg.data = data
    msg._headers = headers
    msg.sender = sender
    msg.seq = seq
    msg.request_id = request_id
    msg._desc = None
    msg._array = array
    msg._node = node
    msg._reply_to = reply_to
    msg._credit = credit
    return msg


_CLOSED = object()

Handler = Callable[[Message], Any]


class Subscription:
    """Interest in a subject pattern: with a handler, messages are pushed to it on
    the node's dispatch thread; without one, pull them with ``next()`` or iterate."""

    def __init__(
        self, node: Any, pattern: str, handler: Handler | None, queue_group: str,
        inbox: Any = None,
    ) -> None:
        self.pattern = pattern
        self.handler = handler
        self.queue = queue_group
        self.delivered = 0
        self.sid = 0  # this subscription's id on its node, advertised to peers
        self.credits = 0
        self.credit_bytes: int | None = None
        self.overflow = "block"
        # Run the handler on the I/O thread that read the message (subscribe(inline=True));
        # cleared when it overran the node's inline_budget.
        self.inline = False
        self._entry: tuple = ()
        self._window: Any = None  # credit for this node's own publishers
        self._grants: dict[str, Any] = {}  # publisher id -> CreditGrant
        self._flow = threading.Condition()
        self._node = node
        # Where the node puts messages for next() (any thread; put() and qsize() are all
        # the node uses): mesh.aio passes its own, which hands them to the event loop.
        self._inbox: Any = queue.SimpleQueue() if inbox is None else inbox
        self._closed = False
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Messages received and not yet handed to the application."""
        return self._inbox.qsize()

    def next(self, timeout: float | None = None) -> Message:
        """The next message; raises TimeoutError after ``timeout`` seconds, ClosedError once closed."""
        if self.handler is not None:
            raise MeshError(
                f"subscription {self.pattern!r} has a handler: messages go to it; "
                "subscribe without a handler to pull with next()"
            )
        if self._closed and self._inbox.empty():
            raise ClosedError(f"subscription {self.pattern!r} is closed")
        try:
            msg = self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"no message on {self.pattern!r} within {timeout} s; "
                "check that a publisher exists (node.peers(), mesh-status)"
            ) from None
        if msg is _CLOSED:
            self._inbox.put(_CLOSED)  # wake any other waiter too
            raise ClosedError(f"subscription {self.pattern!r} is closed")
        self.delivered += 1
        if msg._credit is not None:
            self._node._consumed(self, msg)  # handed out: its credit goes back
        return msg

    def __iter__(self) -> Iterator[Message]:
        while True:
            try:
                yield self.next()
            except ClosedError:
                return

    def close(self) -> None:
        """Stop receiving; idempotent. A blocked ``next()`` raises ClosedError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._inbox.put(_CLOSED)
        self._node._unsubscribe(self)
        with self._flow:
            self._flow.notify_all()  # local publishers blocked on this subscription

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        extra = f" queue={self.queue!r}" if self.queue else ""
        return f"<Subscription {self.pattern!r}{extra} delivered={self.delivered}>"

"""``mesh.aio``: the mesh from asyncio, with the names and errors of the sync API.

    import mesh.aio
    async with mesh.aio.Node(name="api", cluster="exp-42") as node:
        reply = await node.request("ps.pull", b"", timeout=1.0)
        await node.publish("grad.w1", array, timeout=1.0)
        async for msg in node.subscribe("params.>"): ...
        out = await node.group("trainers", size=4).allreduce(array)

It wraps a ``mesh.Node`` (``node.sync``) instead of reimplementing it.

Threads and ownership:
- the event loop that calls a method owns what that call creates (futures, a
  subscription's message deque and waiters, a handler subscription's task);
- the wrapped node keeps its own threads and sockets (I/O, dispatch); they reach
  the loop only through ``loop.call_soon_threadsafe``: a reply completes the
  request's future (one hand-off), a subscription's messages land in its deque
  (one hand-off per burst, not per message);
- one thread pool per node (``mesh-aio-<name>``) runs only what has to wait:
  start/close, a publish that has no credit now or carries more than
  ``INLINE_BYTES``, group rendezvous and collectives.

A publish or a request runs on the loop (no hand-off) when it cannot wait: every
flow-controlled subscription it goes to has credit for it, and it is small.
Otherwise it runs on the pool and the loop awaits it. Cancelling such an await
returns at once; the call itself finishes on its thread (within its timeout, or
when the node closes), because a message half sent or a collective half run
cannot be taken back. Known limit: a publish the credit check let through on
the loop can still wait there up to ``timeout=`` if another thread of this
process takes the last credit first, or the peer's socket queue is full
(``sndhwm`` messages: only possible with flow control off or windows adding up
past it); both are the sync API's waits, bounded by the timeout given.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import inspect
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import numpy as np

from mesh.errors import ClosedError, ConfigError, MeshError, NoRespondersError, TimeoutError
from mesh.message import _CLOSED, Message
from mesh.message import Subscription as SyncSubscription
from mesh.node import DEFAULT_CREDITS, DEFAULT_LISTEN, _Pending
from mesh.node import Node as SyncNode
from mesh.peers import PeerInfo
from mesh.routing import Route

__all__ = ["Group", "Node", "Subscription"]

log = logging.getLogger("mesh")

# Payloads above this are published from the pool: a large array may wait for a
# shared-memory slot, and next to copying it a thread hand-off costs nothing.
INLINE_BYTES = 64 << 10
# How often wait_for_peers()/wait_for_subscribers() look again (seconds).
_POLL = 0.005
_POOL_THREADS = 32

AsyncHandler = Callable[[Message], Any]  # returns None or an awaitable


def _running_loop() -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise MeshError(
            "mesh.aio is for coroutines: call it from code running in an asyncio event "
            "loop (asyncio.run(main())), or use mesh.Node from plain threads"
        ) from None


def _nbytes(data: Any) -> int:
    """The payload size publish() will see (types it refuses: 0, it raises itself)."""
    if isinstance(data, (bytes, bytearray)):
        return len(data)
    if isinstance(data, (memoryview, np.ndarray)):
        return data.nbytes
    if isinstance(data, str):
        return len(data) if data.isascii() else len(data.encode())
    return 0


def _would_wait(window: Any, nbytes: int) -> bool:
    return window.overflow == "block" and not window.can_send(nbytes)


# ---------------------------------------------------------------------- subscriptions


class _Inbox:
    """Stands in for a sync subscription's queue: the node's threads put messages,
    the loop takes them. A burst costs one wake-up of the loop, not one per message."""

    __slots__ = ("_loop", "items", "_scheduled", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.items: collections.deque = collections.deque()  # append/popleft: thread-safe
        self._scheduled = False
        self.waiters: list[asyncio.Future] = []  # loop only

    def put(self, msg: Any) -> None:  # any thread (I/O, publishers, the loop itself)
        self.items.append(msg)
        if not self._scheduled:
            # Set before the append is seen by _wake (which clears it first): a put
            # that finds it set is covered by the wake already on its way.
            self._scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop is closed: nobody is left to read it
                pass

    def qsize(self) -> int:
        return len(self.items)

    def empty(self) -> bool:
        return not self.items

    def _wake(self) -> None:  # loop
        self._scheduled = False
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(True)

    async def wait(self, timeout: float | None) -> bool:
        """Until something is put (True) or ``timeout`` passes (False). Loop only."""
        waiter = self._loop.create_future()
        self.waiters.append(waiter)
        if timeout is None:
            await waiter
            return True
        handle = self._loop.call_later(timeout, _expire, waiter)
        try:
            return await waiter
        finally:
            handle.cancel()


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Subscription:
    """A subscription seen from asyncio: ``await sub.next(timeout=)``, ``async for``.

    With a handler (a function or a coroutine function) the handler runs on the
    event loop, one message at a time, and the message's flow-control credit goes
    back when it has returned (or its coroutine finished). Without one, credit goes
    back when ``next()`` (or ``async for``) hands the message out."""

    def __init__(self, node: Node, sub: SyncSubscription, inbox: _Inbox,
                 handler: AsyncHandler | None) -> None:
        self._node = node
        self._sub = sub
        self._inbox = inbox
        self.handler = handler
        self._task: asyncio.Task | None = None

    pattern = property(lambda self: self._sub.pattern)
    queue = property(lambda self: self._sub.queue)
    credits = property(lambda self: self._sub.credits)
    credit_bytes = property(lambda self: self._sub.credit_bytes)
    overflow = property(lambda self: self._sub.overflow)

    @property
    def delivered(self) -> int:
        return self._sub.delivered

    @property
    def closed(self) -> bool:
        return self._sub.closed

    @property
    def pending(self) -> int:
        """Messages received and not yet handed to the application."""
        return sum(1 for m in self._inbox.items if m is not _CLOSED)

    def _take(self) -> Message:
        """The first message in the deque (not empty), its credit returned. Loop only."""
        items = self._inbox.items
        msg = items.popleft()
        if msg is _CLOSED:
            items.appendleft(msg)  # every later next() raises too
            raise ClosedError(f"subscription {self.pattern!r} is closed")
        sub = self._sub
        sub.delivered += 1
        if msg._credit is not None:
            self._node.sync._consumed(sub, msg)  # handed out: its credit goes back
        return msg

    async def next(self, timeout: float | None = None) -> Message:
        """The next message; TimeoutError after ``timeout`` seconds, ClosedError once closed."""
        if self.handler is not None:
            raise MeshError(
                f"subscription {self.pattern!r} has a handler: messages go to it; "
                "subscribe without a handler to pull with next()"
            )
        items = self._inbox.items
        if items:
            return self._take()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not items:
            remaining = None if deadline is None else deadline - time.monotonic()
            if (remaining is not None and remaining <= 0) or not await self._inbox.wait(remaining):
                raise TimeoutError(
                    f"no message on {self.pattern!r} within {timeout} s; "
                    "check that a publisher exists (node.peers(), mesh-status)"
                )
        return self._take()

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.next()
        except ClosedError:
            raise StopAsyncIteration from None

    async def _run(self, handler: AsyncHandler) -> None:
        """The handler's task: each message in turn, until the subscription closes."""
        items = self._inbox.items
        sub = self._sub
        node = self._node.sync
        while True:
            while not items:
                await self._inbox.wait(None)
            msg = items.popleft()
            if msg is _CLOSED:
                items.appendleft(msg)
                return
            try:
                result = handler(msg)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # as the dispatch thread: a handler's error ends nothing
                node.counters.drops["handler_error"] += 1
                log.exception("%s: handler for %r raised on %r", node.name, sub.pattern,
                              msg.subject)
            sub.delivered += 1
            if msg._credit is not None:
                node._consumed(sub, msg)  # the handler is done: its credit goes back

    def close(self) -> None:
        """Stop receiving; idempotent. A waiting ``next()`` raises ClosedError (an
        ``async for`` ends); a handler finishes the message it is on, then stops."""
        self._sub.close()
        self._node._subs.discard(self)

    def unsubscribe(self) -> None:
        self.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        extra = f" queue={self.queue!r}" if self.queue else ""
        return f"<aio.Subscription {self.pattern!r}{extra} delivered={self.delivered}>"


# ---------------------------------------------------------------------- requests


class _ReplyWaiter:
    """Completes the request's future from the thread that got the reply."""

    __slots__ = ("loop", "future")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future | None = None

    def on_reply(self) -> None:  # any thread: _Pending.set()
        try:
            self.loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # loop closed: the request is gone with it
            pass

    def _wake(self) -> None:  # loop
        future = self.future
        if future is not None and not future.done():
            future.set_result(True)

    async def wait(self, pending: _Pending, timeout: float) -> bool:
        if pending.is_set():
            return True
        loop = self.loop
        future = self.future = loop.create_future()
        handle = loop.call_later(timeout, _expire, future)
        try:
            return await future
        finally:
            handle.cancel()
            self.future = None


# ---------------------------------------------------------------------- the node


class Node:
    """A mesh node for asyncio. Same arguments as ``mesh.Node`` (see API.md); use
    ``async with``, or ``await node.start()`` / ``await node.close()``."""

    def __init__(
        self,
        name: str | None = None,
        cluster: str = "default",
        *,
        discovery: str = "zeroconf",
        seeds: Iterable[str] = (),
        listen: Sequence[str] = DEFAULT_LISTEN,
        secret: str | bytes | None = None,
        metrics_port: int | None = None,
        transports: Sequence[str] | None = None,
        **options: Any,
    ) -> None:
        self._init(SyncNode(
            name, cluster, discovery=discovery, seeds=seeds, listen=listen, secret=secret,
            metrics_port=metrics_port, transports=transports, **options,
        ))

    def _init(self, node: SyncNode) -> None:
        self.sync: SyncNode = node  # the wrapped node: usable from plain threads too
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._subs: set[Subscription] = set()

    @classmethod
    def wrap(cls, node: SyncNode) -> Node:
        """An asyncio face for an existing ``mesh.Node`` (started or not)."""
        self = cls.__new__(cls)
        self._init(node)
        return self

    # -- identity and lifecycle ------------------------------------------------

    id = property(lambda self: self.sync.id)
    name = property(lambda self: self.sync.name)
    cluster = property(lambda self: self.sync.cluster)
    endpoints = property(lambda self: self.sync.endpoints)
    options = property(lambda self: self.sync.options)

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                _POOL_THREADS, thread_name_prefix=f"mesh-aio-{self.sync.name}")
        return self._pool

    async def _in_thread(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a call that may wait on the node's pool; the loop goes on meanwhile."""
        loop = _running_loop()
        if kwargs:
            return await loop.run_in_executor(self._executor(), lambda: func(*args, **kwargs))
        return await loop.run_in_executor(self._executor(), func, *args)

    async def start(self) -> Node:
        """Start the node (binds, joins; on the pool, the loop goes on)."""
        if not self.sync._started:
            await self._in_thread(self.sync.start)
        return self

    async def close(self) -> None:
        """Say goodbye and release everything. Idempotent; never hangs."""
        subs = list(self._subs)
        for sub in subs:
            sub.close()
        if not self.sync._closed:
            await self._in_thread(self.sync.close)
        tasks = [s._task for s in subs if s._task is not None and not s._task.done()]
        for task in tasks:  # a handler still in an await after the node closed
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._pool is not None:
            # Calls still on it end soon: the closed node fails or ends their waits.
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<aio.Node {self.name!r} id={self.id}>"

    # -- peers and status (they never wait) --------------------------------------

    def peers(self) -> list[PeerInfo]:
        """Peers currently members of the mesh (alive, or suspected but not yet dead)."""
        return self.sync.peers()

    def status(self) -> dict:
        """A JSON-serialisable snapshot of this node."""
        return self.sync.status()

    async def wait_for_peers(self, n: int = 1, timeout: float = 10.0) -> list[PeerInfo]:
        """Until at least ``n`` peers are alive; TimeoutError otherwise."""
        node = self.sync
        node._check_started()
        deadline = time.monotonic() + timeout
        while True:
            alive = node.peers()
            if len(alive) >= n:
                return alive
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{node.name} sees {len(alive)} of {n} peers after {timeout} s; "
                    "check seeds/discovery and that every node uses cluster="
                    f"{node.cluster!r}"
                )
            await asyncio.sleep(_POLL)

    async def wait_for_subscribers(self, subject: str, count: int = 1,
                                   timeout: float = 10.0) -> int:
        """Until ``count`` nodes (this one included) have interest in ``subject``."""
        node = self.sync
        # The sync call with no time to wait answers at once: "have" or TimeoutError.
        deadline = time.monotonic() + timeout
        while True:
            try:
                return node.wait_for_subscribers(subject, count, timeout=0.0)
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"fewer than {count} nodes subscribe to {subject!r} after {timeout} s"
                    ) from None
            await asyncio.sleep(_POLL)

    # -- pub/sub ------------------------------------------------------------------

    def subscribe(
        self,
        pattern: str,
        handler: AsyncHandler | None = None,
        *,
        queue: str | None = None,
        credits: int = DEFAULT_CREDITS,  # noqa: A002 - the API's name
        credit_bytes: int | None = None,
        overflow: str = "block",
    ) -> Subscription:
        """Subscribe to a pattern (as ``mesh.Node.subscribe``). ``handler``, a function
        or a coroutine function, runs on the event loop, one message at a time; it
        must not block (await instead). Without one: ``await sub.next()`` or
        ``async for msg in sub``."""
        loop = _running_loop()
        if handler is not None and not callable(handler):
            raise ConfigError("handler must be callable as handler(msg) (def or async def)")
        inbox = _Inbox(loop)
        sub = self.sync.subscribe(pattern, None, queue=queue, credits=credits,
                                  credit_bytes=credit_bytes, overflow=overflow, _inbox=inbox)
        asub = Subscription(self, sub, inbox, handler)
        if handler is not None:
            asub._task = loop.create_task(asub._run(handler), name=f"mesh-aio-handler-{pattern}")
        self._subs.add(asub)
        return asub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.close()
        self._subs.discard(sub)

    def _may_inline(self, route: Route, data: Any) -> bool:
        """Whether a publish of ``data`` along ``route`` cannot wait: small, and every
        flow-controlled subscription on the way has credit for it right now."""
        nbytes = _nbytes(data)
        if nbytes > INLINE_BYTES:
            return False
        for sub in route.local:
            if _would_wait(sub._window, nbytes):
                return False
        for members in route.local_groups.values():
            for sub in members:
                if _would_wait(sub._window, nbytes):
                    return False
        links = self.sync._links
        for peer_id, sids in route.peers.items():
            link = links.get(peer_id)
            if link is None:
                continue  # no link: dropped (counted), never waited for
            windows = link.windows
            for sid in sids:
                window = windows.get(sid)  # none yet: a full window opens
                if window is not None and _would_wait(window, nbytes):
                    return False
        for members in route.peer_groups.values():
            for peer_id, sid in members:
                link = links.get(peer_id)
                window = None if link is None else link.windows.get(sid)
                if window is not None and _would_wait(window, nbytes):
                    return False
        return True

    async def publish(
        self,
        subject: str,
        data: Any = b"",
        headers: dict | None = None,
        timeout: float | None = None,
    ) -> None:
        """Send ``data`` (bytes, memoryview, str or numpy array) to every subscriber,
        as ``mesh.Node.publish``. ``timeout``: how long it may wait for credit or a
        slow peer's queue, then BackpressureError; the loop goes on meanwhile."""
        node = self.sync
        node._check_started()
        route = node._route(subject)
        if self._may_inline(route, data):
            node._publish(subject, route, data, headers, None, timeout)
        else:
            await self._in_thread(node._publish, subject, route, data, headers, None, timeout)

    async def request(
        self,
        subject: str,
        data: Any = b"",
        timeout: float = 1.0,
        retries: int = 0,
        headers: dict | None = None,
    ) -> Message:
        """Send a request and return the first reply, as ``mesh.Node.request``:
        NoRespondersError at once when nobody subscribes to ``subject``,
        TimeoutError after ``retries`` + 1 attempts of ``timeout`` seconds."""
        node = self.sync
        node._check_started()
        if timeout is None or timeout <= 0:
            raise ConfigError("request() needs a positive timeout in seconds")
        if retries < 0:
            raise ConfigError("retries must be >= 0")
        route = node._route(subject)
        waiter = _ReplyWaiter(_running_loop())
        req_id = random.getrandbits(63)
        pending = _Pending(waiter.on_reply)
        node._pending[req_id] = pending
        try:
            for _attempt in range(retries + 1):
                node._check_open()
                route = node._route(subject)
                if route.empty:
                    raise NoRespondersError(
                        f"no subscriber for {subject!r} anywhere in the mesh; start a responder "
                        "(node.subscribe(subject, handler) that calls msg.respond())"
                    )
                if self._may_inline(route, data):
                    node._publish(subject, route, data, headers, req_id, None)
                else:
                    await self._in_thread(node._publish, subject, route, data, headers, req_id,
                                          None)
                if await waiter.wait(pending, timeout):
                    node._check_open()  # close() wakes waiting requests too
                    assert pending.reply is not None
                    return pending.reply
            raise TimeoutError(
                f"no reply on {subject!r} after {retries + 1} attempt(s) of {timeout} s; "
                "the responder may be slow or gone: raise timeout= or retries="
            )
        finally:
            node._pending.pop(req_id, None)

    # -- collectives ----------------------------------------------------------------

    def group(self, name: str, size: int, timeout: float = 30.0, **options: Any) -> Group:
        """The group ``name`` of ``size`` nodes (as ``mesh.Node.group``). It forms on
        the first await: ``g = await node.group(...)``, or directly
        ``await node.group(...).allreduce(array)``."""
        self.sync._check_started()
        return Group(self, name, size, timeout, options)


class Group:
    """A collective group seen from asyncio: every collective is awaited and runs on
    the node's pool (the loop goes on). Cancelling an await returns at once; the
    collective finishes on its thread, as the other members need it to."""

    def __init__(self, node: Node, name: str, size: int, timeout: float,
                 options: dict[str, Any]) -> None:
        self._node = node
        self.name = name
        self._args = (name, size, timeout)
        self._options = options
        self._group: Any = None
        self._forming: asyncio.Future | None = None

    async def _formed(self) -> Any:
        if self._group is None:
            if self._forming is None:
                node = self._node
                self._forming = asyncio.ensure_future(
                    node._in_thread(node.sync.group, *self._args, **self._options))
            forming = self._forming
            try:
                # Shielded: a cancelled caller leaves the rendezvous running for the next.
                self._group = await asyncio.shield(forming)
            except asyncio.CancelledError:
                raise
            except BaseException:
                if self._forming is forming:
                    self._forming = None  # it failed: the next await tries again
                raise
        return self._group

    async def _ready(self) -> Group:
        await self._formed()
        return self

    def __await__(self) -> Any:
        return self._ready().__await__()

    async def __aenter__(self) -> Group:
        return await self._ready()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _sync(self) -> Any:
        if self._group is None:
            raise MeshError(f"group {self.name!r} has not formed yet: await it first "
                            "(g = await node.group(...))")
        return self._group

    @property
    def rank(self) -> int:
        return self._sync().rank

    @property
    def size(self) -> int:
        return self._sync().size

    @property
    def members(self) -> list:
        return self._sync().members

    @property
    def incarnation(self) -> str:
        return self._sync().incarnation

    def stats(self) -> dict:
        return self._sync().stats()

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        group = await self._formed()
        return await self._node._in_thread(getattr(group, method), *args, **kwargs)

    async def allreduce(self, array: Any, op: str = "sum", algorithm: str = "auto", *,
                        out: np.ndarray | None = None, timeout: float | None = None
                        ) -> np.ndarray:
        return await self._call("allreduce", array, op, algorithm, out=out, timeout=timeout)

    async def reduce_scatter(self, array: Any, op: str = "sum", *,
                             timeout: float | None = None) -> np.ndarray:
        return await self._call("reduce_scatter", array, op, timeout=timeout)

    async def allgather(self, array: Any, *, timeout: float | None = None) -> list[np.ndarray]:
        return await self._call("allgather", array, timeout=timeout)

    async def broadcast(self, array: Any, root: int = 0, *,
                        timeout: float | None = None) -> np.ndarray:
        return await self._call("broadcast", array, root, timeout=timeout)

    async def barrier(self, *, timeout: float | None = None) -> None:
        await self._call("barrier", timeout=timeout)

    async def gossip_average(self, array: Any, rounds: int | None = None,
                             **kwargs: Any) -> np.ndarray:
        return await self._call("gossip_average", array, rounds, **kwargs)

    async def reform(self, timeout: float | None = None) -> Group:
        await self._call("reform", timeout)
        return self

    async def close(self) -> None:
        """Leave the group (waits briefly for the others, on the pool). Idempotent."""
        if self._group is not None:
            await self._node._in_thread(self._group.close)

    def __repr__(self) -> str:
        return f"<aio.Group {self._group or self.name!r}>"


"""Plain TCP streams for large arrays between two nodes (the ``tcpbulk`` bulk channel).

ZeroMQ receives every message into an allocation of its own, so a received
array that is not reduced in place costs one more copy, and every segment a
fresh allocation (page faults). Here each peer pair has one ordinary TCP
connection beside its ZeroMQ link: the sender writes the array's bytes from
the caller's buffer (``sendall`` of a memoryview: no copy in user space), and
the receiver reads them with ``recv_into`` straight into a buffer the caller
posted in advance (a slice of the collective's result, or a reusable scratch
segment it reduces from), or reduces them into place as they arrive (``fold``,
under the numpy error state of the thread that posted).

Framing, on each direction of the stream: ``!IQ`` (header length, data length),
a msgpack header ``[tag, meta]``, then the data bytes. Messages are matched to
posted receives by ``tag``; one that arrives before its receive is posted is
read into a fresh buffer and kept until asked for (correct, one copy more): at
once up to PARK_MIN bytes, a larger one after POST_WAIT unless posted meanwhile.

A receive may be posted with a *relay* (``post(..., relay=[(conn, tag, meta)])``):
as its bytes land in place the receiver thread reports each piece to progressive
sends queued on those other streams, whose sender threads write them on at once
(cut-through forwarding for a broadcast's tree or chain; a source that breaks
mid-message breaks the relayed streams too, their frames cannot be finished).

Connecting: each node listens on its tcp host, port chosen by the OS, and
offers ``[port, token]`` in its hello (mesh.engine.bulk_tcp). When a group
with both forms (``ensure``/``settle``), of two peers the one with the
smaller node id connects to the other, to the host its ZeroMQ link
already reaches, and sends a preamble (magic, the listener's token, its own
node id); the listener answers one byte. Anything else and the pair stays on
ZeroMQ (``fallback``, with the reason in ``status()``).

Who owns what:
* ``TcpBulkEndpoint``: the listening socket and its accept thread
  (``mesh-tcpbulk-accept``), which reads preambles (bounded by a timeout) and
  hands finished connections over; connector threads (``mesh-tcpbulk-connect``,
  one per dial, short-lived); the table of connections and per-peer states
  (under ``_lock``; any thread reads it).
* ``_Receiver``: the endpoint's one receiver thread (``mesh-tcpbulk-recv``,
  started with the first connection), the only reader of every stream's socket
  (epoll; non-blocking reads; each stream's receive state is touched by it alone).
* ``TcpBulkConn``: one connected socket. Its sender thread
  (``mesh-tcpbulk-send``) writes queued sends; a caller writes a small one
  itself while the stream is idle (``_send_inline``; ``_wlock`` keeps frames
  whole). Callers post receives (under ``_cond``); a post that a parked stream
  waits for wakes the receiver (``_Receiver.resume``). ``close()`` (any thread)
  shuts the socket down, which wakes the sender and the receiver, fails whatever is
  still queued or posted, and closes the socket once the receiver let go of it.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import select
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import msgpack
import numpy as np

from mesh.errors import BulkLinkError

log = logging.getLogger("mesh")

_FRAME = struct.Struct("!IQ")  # header length, data length
_MAGIC = b"ZMTB1"
_PREAMBLE = struct.Struct("!5s16sH")  # magic, listener token, length of the node id
_MAX_HEADER = 1 << 16
# Connecting and the preamble exchange: past this the pair stays on ZeroMQ.
CONNECT_TIMEOUT = 3.0
# A message whose receive is not posted yet waits this long (seconds) in the kernel
# for its post before it is read into a buffer of its own.
POST_WAIT = 0.05
# A message of up to this size that comes before its receive is posted is read
# aside at once (a copy of a few microseconds), not waited for: the post then finds
# it and completes on the caller's thread, where waking the receiver thread for it
# (a socket write, then the GIL passed to and fro) cost ~50 us per small collective.
PARK_MIN = 128 << 10
# The receiver's staging buffer (see _pump): holds a small message whole.
_STAGE = 64 << 10
# A folded receive (RecvRequest.fold) reads and reduces this much at a time, while
# the kernel's copy is still in cache (L2/L3). Not smaller: every piece is one more
# pass through the Python read loop and one more ufunc call on the receiver thread
# (its interpreter time about equalled the reduction itself at 128 KiB); 512 KiB:
# 4-rank 64 MiB ring allreduce on a 10gbit namespace LAN, 10 runs, mesh CPU per op
# 209 -> 201 ms (Gloo ~200), mesh/Gloo 1.06 -> 1.03x; unlimited LAN and loopback
# unchanged within noise (2026-12-06, issue #17).
_FOLD_PIECE = 512 << 10
# Messages up to this size are written by the caller itself when the stream is idle
# (one thread hand-off less per message: what a small collective waits on); larger
# ones go through the sender thread, so that the caller reduces meanwhile.
INLINE_SEND_MAX = 256 << 10
# A relayed send waits at most this long (seconds) at a time for its next piece
# (checking that its own stream is still up); the source's _fail wakes it at once.
RELAY_WAIT = 0.5
# A receive that is relayed on wakes the receiver every this many bytes (at most;
# SO_RCVLOWAT), so the next stream gets its pieces while the rest is on the wire.
RELAY_PIECE = 64 << 10
# An inline send that the kernel took only in part finishes within this long (the
# peer reads all the time: only a stuck or dead peer fills its buffer), else the
# stream is declared broken.
INLINE_SEND_WAIT = 10.0


def _tuple(x: Any) -> Any:
    """msgpack turns tuples into lists: tags are hashable tuples again."""
    return tuple(_tuple(v) for v in x) if type(x) is list else x


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock`` (blocking); ConnectionError at end of stream."""
    got, n = 0, len(view)
    while got < n:
        # MSG_WAITALL: one wakeup per message instead of one per arriving burst
        # (a signal or shutdown may still end it early: then the loop goes on).
        k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        if k == 0:
            raise ConnectionError("the peer closed the connection")
        got += k


def _advance(views: list, sent: int) -> None:
    """Drop the first ``sent`` bytes of a list of buffers about to be written."""
    while sent and views:
        if sent >= len(views[0]):
            sent -= len(views.pop(0))
        else:
            views[0] = views[0][sent:]
            sent = 0


def _tune(sock: socket.socket) -> None:
    # No SO_SNDBUF/SO_RCVBUF: setting them turns off the kernel's autotuning, which
    # grows the buffers further (tcp_rmem/tcp_wmem) than rmem_max/wmem_max allow.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Waker:
    """A thread's eventfd (and its poll object) that a stream's thread writes to when
    a request this thread waits for is done (see _Request). Closed with the thread."""

    __slots__ = ("fd", "poll")

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.poll = select.poll()
        self.poll.register(self.fd, select.POLLIN)

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


_tls = threading.local()


def _waker() -> _Waker:
    w = getattr(_tls, "waker", None)
    if w is None:
        w = _tls.waker = _Waker()
    return w


class _Request:
    """What a send and a receive have in common: done once the stream's thread
    called ``_set``, with ``error`` set first when the connection broke.

    The waiting thread sleeps in poll() on an eventfd of its own, which ``_set``
    writes to (``fd_wait``): a write releases the GIL for its system call, so the
    woken caller takes the GIL and runs at once. A lock released by the stream's
    thread (``fd_wait`` False, as before 2026-12-06) woke the caller into a GIL that
    thread still held: the caller went back to sleep until the stream's thread
    reached its next wait (two more switches on the small collective's path; on 2
    loaded cores ~25 us per release). Not a ``threading.Event``, which builds a
    Condition: two per message add up for small collectives."""

    __slots__ = ("_latch", "_done", "error", "waiter")

    fd_wait = hasattr(os, "eventfd")  # (class-wide; False: the latch, for A/B)

    def __init__(self) -> None:
        self._latch: threading.Lock | None = None
        if not self.fd_wait:
            self._latch = threading.Lock()
            self._latch.acquire()
        self._done = False
        self.error: BulkLinkError | None = None
        self.waiter = -1  # the eventfd of the thread waiting for it, if any

    def _set(self) -> None:
        if self._done:
            return
        self._done = True  # (before reading waiter: see _wait_fd)
        if self._latch is not None:
            try:
                self._latch.release()
            except RuntimeError:  # set twice at once (a stream breaking as it completes)
                pass
        w = self.waiter
        if w >= 0:
            try:
                os.eventfd_write(w, 1)
            except OSError:  # (its thread ended meanwhile)
                pass

    @property
    def done(self) -> bool:
        return self._done

    def wait(self, timeout: float | None = None) -> bool:
        """True once done; False on timeout; BulkLinkError if the connection broke."""
        if not self._done:
            if self._latch is None:
                if not self._wait_fd(timeout):
                    return False
            else:
                if not self._latch.acquire(True, -1 if timeout is None else max(0.0, timeout)):
                    return False
                try:
                    self._latch.release()  # open for good: later waits return at once
                except RuntimeError:
                    pass
        if self.error is not None:
            raise self.error
        return True

    def _wait_fd(self, timeout: float | None) -> bool:
        w = _waker()
        # Announce, then look: _set marks done before it reads waiter, so either it
        # sees this fd or this thread sees done. A count left by an earlier request
        # (done before its waiter looked) only makes one poll return early.
        self.waiter = w.fd
        try:
            deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
            while not self._done:
                ms = -1 if deadline is None else max(
                    0, math.ceil((deadline - time.monotonic()) * 1000))
                if w.poll.poll(ms):
                    try:
                        os.eventfd_read(w.fd)
                    except BlockingIOError:
                        pass
                elif deadline is not None and time.monotonic() >= deadline:
                    return self._done
        finally:
            self.waiter = -1
        return True


class SendRequest(_Request):
    """A queued send: ``done`` once the kernel has every byte (the buffer is free).

    A relayed one (``RecvRequest`` with ``relay``) is *progressive*: ``ready`` bytes
    of ``data`` have arrived from another stream so far; its sender thread writes
    them as they come (``_advance_relay``, under ``cv``)."""

    __slots__ = ("header", "data", "nbytes", "ready", "cv", "abort")

    def __init__(self, header: bytes, data: memoryview, ready: int | None = None) -> None:
        super().__init__()
        self.header = header
        self.data = data
        self.nbytes = len(data)
        self.ready = ready  # None: all of data is there (an ordinary send)
        self.cv: threading.Condition | None = None if ready is None else threading.Condition()
        self.abort: str | None = None  # the stream it is relayed from broke

    def _advance_relay(self, ready: int, abort: str | None = None) -> None:
        """(receiver thread) ``ready`` bytes of data are in place; or the source broke."""
        with self.cv:  # type: ignore[union-attr]
            self.ready = ready
            if abort is not None:
                self.abort = abort
            self.cv.notify()  # type: ignore[union-attr]


class RecvRequest(_Request):
    """A posted receive. Once ``done``: ``meta`` (the sender's), and ``data``: the
    posted buffer, or a buffer of its own when the message came before the post or
    its size differs from the posted buffer's (``into_dest`` False). With ``fold``
    (``(ufunc, first, dest array)``) the message is not stored but reduced into
    the destination as it arrives, ``dest = ufunc(first, message)``; ``folded``
    says it was (False: the caller reduces ``data`` itself)."""

    __slots__ = ("conn", "tag", "dest", "meta", "data", "into_dest", "fold", "folded",
                 "fold_error", "relay", "relayed")

    def __init__(self, conn: TcpBulkConn, tag: Hashable, dest: memoryview,
                 fold: tuple | None = None, relay: list | None = None) -> None:
        super().__init__()
        self.conn = conn
        self.tag = tag
        self.dest = dest
        self.meta: Any = None
        self.data: Any = None
        self.into_dest = False
        self.fold = fold
        self.folded = False
        # an error of the folded reduction (e.g. FloatingPointError under the poster's
        # np.seterr(all="raise")): the caller raises it; the stream read on
        self.fold_error: Exception | None = None
        # relay: [(conn, tag, meta)] to forward the message on to as its bytes arrive
        # (cut-through: the receiver thread hands each piece to those streams' sender
        # threads); relayed: their SendRequests, complete once this one is done.
        self.relay = relay
        self.relayed: list[SendRequest] = []

    def cancel(self) -> None:
        """Withdraw the receive (a message of its tag that comes later is kept as early)."""
        self.conn.cancel(self)


class TcpBulkConn:
    """One connected stream to one peer (see the module docstring for its threads)."""

    def __init__(self, sock: socket.socket, peer_id: str, peer_name: str,
                 on_broken: Callable[[TcpBulkConn, str], None] | None = None,
                 receiver: _Receiver | None = None) -> None:
        self.sock = sock
        self.peer_id = peer_id
        self.peer_name = peer_name
        self._on_broken = on_broken
        self._cond = threading.Condition()
        self._posted: dict[Hashable, RecvRequest] = {}
        self._reading: RecvRequest | None = None  # popped from _posted, being filled
        self._early: dict[Hashable, tuple[Any, np.ndarray]] = {}  # tag -> (meta, bytes)
        self._sendq: queue.SimpleQueue[SendRequest | None] = queue.SimpleQueue()
        # Held while a message's bytes go into the socket, by the sender thread or by
        # a caller writing a small one itself (_send_inline): frames never interleave.
        self._wlock = threading.Lock()
        self.broken: str | None = None
        self.bytes_out = self.bytes_in = self.msgs_out = self.msgs_in = 0
        self.early_msgs = 0  # messages that came before their receive was posted (one copy more)
        self.folded_msgs = 0  # messages reduced into place as they arrived (RecvRequest.fold)
        self.relayed_msgs = 0  # messages forwarded on to other streams (RecvRequest.relay)
        # The receiving side's state (only the receiver thread touches it, see _pump):
        # the staging buffer and what of it is unread, the frame header read and not
        # yet matched, the message being read, SO_RCVLOWAT as last set.
        self._stage = bytearray(_STAGE)
        self._sv = memoryview(self._stage)
        self._lo = self._hi = 0
        self._head: tuple | None = None
        self._cur: _Incoming | None = None
        self._lowat = 1
        self._drained = False  # the last staging read took all the socket had
        self._parked = False  # its next message waits for a post (under _cond)
        self._park_until = 0.0
        self._own_rx = receiver is None  # (a conn on its own: tests)
        self._rx = receiver if receiver is not None else _Receiver()
        self._sender = threading.Thread(target=self._send_loop, daemon=True,
                                        name=f"mesh-tcpbulk-send-{peer_name}")
        self._sender.start()
        self._rx.add(self)

    # -- caller side ------------------------------------------------------------

    def send(self, tag: Hashable, meta: Any, data: Any, inline: bool = False) -> SendRequest:
        """Queue ``data`` (an array or bytes-like) for the peer under ``tag``. A
        C-contiguous one is not copied: keep it unchanged until the request is
        ``done``; any other array is copied once (into C order).

        Up to ``INLINE_SEND_MAX`` bytes, or any size with ``inline`` (a caller
        with nothing else to do until it is sent), the calling thread writes it
        itself when the stream is idle, instead of the sender thread."""
        head = msgpack.packb([tag, meta], use_bin_type=True)
        if isinstance(data, np.ndarray) and not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        view = memoryview(data).cast("B")
        req = SendRequest(_FRAME.pack(len(head), len(view)) + head, view)
        broken = self.broken  # (one read: _fail sets it once, under _cond)
        if broken is not None:
            req.error = self._error(broken)
            req._set()
            return req
        if ((inline or req.nbytes <= INLINE_SEND_MAX) and self._sendq.empty()
                and self._wlock.acquire(False)):
            try:
                if self._send_inline(req):
                    return req
            finally:
                self._wlock.release()
        self._sendq.put(req)
        return req

    def _relay_head(self, tag: Hashable, meta: Any, nbytes: int) -> bytes:
        head = msgpack.packb([tag, meta], use_bin_type=True)
        return _FRAME.pack(len(head), nbytes) + head

    def _queue(self, req: SendRequest) -> None:
        """Queue a send for the sender thread (a broken stream fails it at once)."""
        with self._cond:
            broken = self.broken
        if broken is not None:
            req.error = self._error(broken)
            req._set()
            return
        self._sendq.put(req)

    def _send_inline(self, req: SendRequest) -> bool:
        """Write ``req`` from the caller's thread (``_wlock`` held), without blocking
        while nothing went out; False when the kernel took nothing (the sender
        thread sends it). Order with queued sends does not matter: receives
        match by tag."""
        views = [memoryview(req.header), req.data] if req.nbytes else [memoryview(req.header)]
        total = len(req.header) + req.nbytes
        deadline = 0.0
        written = 0
        try:
            while views:
                try:
                    sent = self.sock.sendmsg(views, (), socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                written += sent
                if sent == total:
                    break  # (all of it at once: the usual case)
                if sent == 0:
                    if not written:
                        return False  # nothing went out: the sender thread takes it
                    if not deadline:  # (reset by any progress)
                        deadline = time.monotonic() + INLINE_SEND_WAIT
                    elif time.monotonic() > deadline:
                        raise OSError("the peer took no data for "
                                      f"{INLINE_SEND_WAIT:.0f} s")
                    select.select([], [self.sock], [], 0.05)
                    continue
                deadline = 0.0
                _advance(views, sent)
        except OSError as exc:
            req.error = self._error(f"send: {exc}")
            req._set()
            self._fail(f"send: {exc}")
            return True
        self.bytes_out += req.nbytes
        self.msgs_out += 1
        req.data = None  # type: ignore[assignment]
        req._set()
        return True

    def post(self, tag: Hashable, dest: Any, fold: tuple | None = None,
             relay: list | None = None) -> RecvRequest:
        """Receive the message ``tag`` into ``dest`` (a writable C-contiguous array).

        ``fold=(ufunc, first)``: reduce it into ``dest`` instead, ``ufunc(first,
        message, out=dest)`` (``first`` the same shape and dtype as ``dest``, may be
        ``dest`` itself), piece by piece as it arrives, each piece while the
        receiver's core still has it in cache: no scratch buffer goes through
        memory and back, and the caller's thread does not reduce.

        ``relay=[(conn, tag, meta), ...]`` (not with ``fold``): also forward the
        message to those streams, piece by piece as it arrives (cut-through, the
        forwarding caller wakes for none of it); ``relayed`` holds those sends
        once this receive is done: keep ``dest`` unchanged until they are."""
        if fold is not None and relay:
            raise ValueError("a folded receive cannot be relayed")
        fold_spec = None if fold is None else (
            fold[0], fold[1], dest, (tuple(sorted(np.geterr().items())), np.geterrcall()))
        req = RecvRequest(self, tag, memoryview(dest).cast("B"), fold_spec, relay or None)
        with self._cond:
            early = self._early.pop(tag, None)
            if early is not None:
                req.meta, req.data = early
                if not req.relay:
                    req._set()
            elif self.broken is not None:
                req.error = self._error(self.broken)
                req._set()
            else:
                if tag in self._posted:
                    raise ValueError(f"a receive of tag {tag!r} is already posted")
                self._posted[tag] = req
                if self._parked:  # its next message waits for a post: this may be it
                    self._parked = False
                    self._rx.resume(self)
        if early is not None and req.relay:  # it came whole before the post: on it goes
            req.relayed = [c.send(t, m, req.data) for c, t, m in req.relay]  # (not under _cond)
            self.relayed_msgs += 1
            req._set()
        return req

    def cancel(self, req: RecvRequest) -> None:
        """Forget a posted receive (its message may still come: then it is kept as early)."""
        with self._cond:
            if self._posted.get(req.tag) is req:
                del self._posted[req.tag]

    def take_early(self, tag: Hashable) -> tuple[Any, np.ndarray] | None:
        """A message ``tag`` that came without a posted receive, if any."""
        with self._cond:
            return self._early.pop(tag, None)

    def discard(self, predicate: Callable[[Hashable], bool]) -> int:
        """Drop early messages whose tag matches (stale ones of a failed collective)."""
        with self._cond:
            gone = [t for t in self._early if predicate(t)]
            for t in gone:
                del self._early[t]
        return len(gone)

    def close(self, why: str = "closed") -> None:
        with self._cond:
            self._cond.notify_all()
        self._fail(why)
        self._sendq.put(None)
        if self._sender is not threading.current_thread():
            self._sender.join(timeout=2.0)
        self._rx.remove(self)  # (then no thread reads the socket any more)
        if self._own_rx:
            self._rx.close()
        try:
            self.sock.close()
        except OSError:
            pass

    def stats(self) -> dict:
        return {"bytes_out": self.bytes_out, "bytes_in": self.bytes_in,
                "msgs_out": self.msgs_out, "msgs_in": self.msgs_in,
                "early_msgs": self.early_msgs, "folded_msgs": self.folded_msgs,
                "relayed_msgs": self.relayed_msgs}

    # -- threads ----------------------------------------------------------------

    def _error(self, why: str) -> BulkLinkError:
        return BulkLinkError(
            f"the bulk tcp connection to peer {self.peer_name} broke ({why}): the peer died "
            "or the network failed; later transfers to it go over ZeroMQ",
            peer=self.peer_id,
        )

    def _fail(self, why: str) -> None:
        with self._cond:
            if self.broken is not None:
                return
            self.broken = why
            posted = list(self._posted.values())
            if self._reading is not None:  # the one being read when the stream broke
                posted.append(self._reading)
                for out in self._reading.relayed:  # half relayed: their streams break too
                    if out.ready is not None:
                        out._advance_relay(out.ready, why)
                self._reading = None
            self._posted.clear()
            self._cond.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes both threads
        except OSError:
            pass
        err = self._error(why)
        for req in posted:
            req.error = err
            req._set()
        while True:  # queued sends fail too (the sender thread may be gone)
            try:
                item = self._sendq.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item.error = err
                item._set()
        if why != "closed" and self._on_broken is not None:
            self._on_broken(self, why)

    def _send_loop(self) -> None:
        sock = self.sock
        while True:
            req = self._sendq.get()
            if req is None:
                return
            if self.broken is not None:
                req.error = self._error(self.broken)
                req._set()
                continue
            try:
                if req.ready is not None:
                    with self._wlock:
                        self._send_relay(req)
                else:
                    # Header and data in one call (one packet less with TCP_NODELAY), the
                    # data from the caller's buffer; the GIL is released meanwhile.
                    views = [memoryview(req.header), req.data] if req.nbytes else [req.header]
                    with self._wlock:
                        while views:
                            _advance(views, sock.sendmsg(views))
            except OSError as exc:
                req.error = self._error(f"send: {exc}")
                req._set()
                self._fail(f"send: {exc}")
                continue
            self.bytes_out += req.nbytes
            self.msgs_out += 1
            req.data = None  # type: ignore[assignment]
            req._set()

    def _send_relay(self, req: SendRequest) -> None:
        """Write a progressive send (sender thread, ``_wlock`` held): the header, then
        the data as the receiver thread reports it in place. Its source stream
        breaking mid-message breaks this stream too (its frame cannot be finished)."""
        sock, cv = self.sock, req.cv
        views = [memoryview(req.header)]
        while views:
            _advance(views, sock.sendmsg(views))
        sent = 0
        while sent < req.nbytes:
            with cv:  # type: ignore[union-attr]
                while req.ready <= sent and req.abort is None and self.broken is None:  # type: ignore[operator]
                    cv.wait(RELAY_WAIT)  # type: ignore[union-attr]
                avail, abort = req.ready, req.abort
            if avail <= sent:  # type: ignore[operator]
                raise OSError(f"relay source broke: {abort or self.broken}")
            view = req.data[sent:avail]
            while len(view):
                k = sock.send(view)
                sent += k
                view = view[k:]

    # -- the receiving side: driven by the endpoint's one receiver thread ---------------
    #
    # Reads go through a small staging buffer: a small message (frame, header and
    # data, written with one sendmsg) usually comes in one recv instead of three, and
    # every recv drops and retakes the GIL. A large payload is read straight into its
    # destination (or, folded, a piece at a time into a cache-sized buffer) after the
    # few bytes the staging read took of it. Every read is MSG_DONTWAIT: when the
    # socket has nothing more, ``_pump`` returns and the receiver thread serves the
    # node's other streams; in the middle of a large payload SO_RCVLOWAT makes the
    # next wake-up wait for a good piece of it (one wake-up per _LOWAT bytes, not per
    # arriving packet).

    def _pump(self) -> int:
        """Read and hand over whatever the socket holds (receiver thread only).
        Returns _MORE (wait for the socket), _PARKED (a message waits for its post:
        do not read this stream until ``post`` or the deadline) or _DEAD."""
        try:
            while True:
                cur = self._cur
                if cur is None:
                    if self._head is None and not self._parse_head():
                        if self._drained and self._lo == self._hi and self._rx.fast:
                            self._drained = False
                            self._set_lowat(1)
                            return _MORE
                        if not self._fill():
                            self._set_lowat(1)
                            return _MORE
                        continue
                    if self._rx.done:  # more to read: what is complete goes first
                        self._rx.release()
                    if not self._start():
                        return _PARKED
                    continue
                if not self._payload(cur):
                    rest = cur.nbytes - cur.got
                    piece = RELAY_PIECE if cur.relays else _LOWAT
                    self._set_lowat(min(rest, piece) if rest > _LOWAT_FROM else 1)
                    return _MORE
        except (OSError, ValueError) as exc:
            why = str(exc) if isinstance(exc, ConnectionError) else f"recv: {exc}"
            self._fail(why)
        except Exception as exc:  # pragma: no cover - never a silent death
            self._fail(f"receiving: {type(exc).__name__}: {exc}")
        return _DEAD

    def _set_lowat(self, k: int) -> None:
        if k != self._lowat:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, k)
            self._lowat = k

    def _fill(self) -> bool:
        """Read what the socket has into the staging buffer; False when it had nothing."""
        lo, hi = self._lo, self._hi
        if lo == hi:
            lo = hi = self._lo = self._hi = 0
        elif _STAGE - lo < _FRAME.size + _MAX_HEADER // 4 and lo:
            self._sv[: hi - lo] = self._sv[lo:hi]  # no room behind: the rest to the front
            lo, hi = 0, hi - lo
            self._lo, self._hi = lo, hi
        if hi == _STAGE:
            raise ConnectionError("malformed frame (header larger than the staging buffer)")
        try:
            got = self.sock.recv_into(self._sv[hi:], _STAGE - hi, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        if got == 0:
            raise ConnectionError("the peer closed the connection")
        self._hi = hi + got
        # A short read took all the socket had: after what it holds the stream waits
        # for epoll (level-triggered: anything that came since wakes it at once),
        # not for one more read that would fail (a GIL hand-over for nothing).
        self._drained = hi + got < _STAGE
        return True

    def _parse_head(self) -> bool:
        """A whole frame header in the staging buffer: consume it into ``_head``."""
        lo, avail = self._lo, self._hi - self._lo
        if avail < _FRAME.size:
            return False
        hlen, nbytes = _FRAME.unpack_from(self._stage, lo)
        if hlen > _MAX_HEADER:
            raise ConnectionError(f"malformed frame (header of {hlen} bytes)")
        if avail < _FRAME.size + hlen:
            return False
        lo += _FRAME.size
        try:
            tag, meta = msgpack.unpackb(self._sv[lo:lo + hlen], raw=False, use_list=True)
        except (ValueError, TypeError, msgpack.exceptions.ExtraData) as exc:
            raise ConnectionError(f"malformed frame header ({exc})") from None
        self._lo = lo + hlen
        if type(tag) is list:  # (a collective's tag is flat: one tuple() call)
            tag = tuple(tag) if list not in map(type, tag) else _tuple(tag)
        self._head = (tag, meta, nbytes)
        self._park_until = 0.0
        return True

    def _start(self) -> bool:
        """Match the message in ``_head`` to its posted receive; False: park (see below)."""
        tag, meta, nbytes = self._head  # type: ignore[misc]
        with self._cond:
            req = self._posted.pop(tag, None)
            if req is None and not self._posted and self.broken is None and nbytes > PARK_MIN:
                # Nothing posted yet: the caller is most likely still busy with earlier
                # segments and posts this one soon. Waiting (bounded) leaves the bytes in
                # the kernel, which also holds the sender back, instead of an extra
                # allocation and copy. If it posts another tag, this message was
                # skipped: read it aside then.
                if not self._park_until:
                    self._park_until = time.monotonic() + POST_WAIT
                    self._parked = True
                    return False
                if self._parked and time.monotonic() < self._park_until:
                    return False
            self._parked = False
            # A posted plain receive whose bytes are all in the staging buffer (a small
            # message, read with its header): completed right here, in one step.
            quick = (req is not None and self._rx.fast and req.fold is None and not req.relay
                     and len(req.dest) == nbytes and nbytes <= self._hi - self._lo)
            if not quick:
                self._reading = req
        self._head = None
        if quick:
            lo = self._lo
            req.dest[:] = self._sv[lo:lo + nbytes]  # type: ignore[union-attr]
            self._lo = lo + nbytes
            self.bytes_in += nbytes
            self.msgs_in += 1
            req.data, req.into_dest, req.meta = req.dest, True, meta  # type: ignore[union-attr]
            self._complete(req)  # type: ignore[arg-type]
            return True
        if req is not None and len(req.dest) == nbytes:
            if req.fold is not None:
                cur = _Incoming(req, tag, meta, nbytes, _FOLD, self._rx.piece_view)
                self._rx.use_errstate(req.fold[3])
            else:
                cur = _Incoming(req, tag, meta, nbytes, _DEST, req.dest)
                if req.relay:  # cut-through: the next streams send as the bytes come
                    head = [c._relay_head(t, m, nbytes) for c, t, m in req.relay]
                    req.relayed = [SendRequest(h, req.dest, 0) for h in head]
                    cur.relays = req.relayed
                    self.relayed_msgs += 1
                    for (c, _t, _m), out in zip(req.relay, req.relayed, strict=True):
                        c._queue(out)
        else:
            data = np.empty(nbytes, dtype=np.uint8)
            cur = _Incoming(req, tag, meta, nbytes, _ASIDE, memoryview(data))
            cur.data = data
        self._cur = cur
        return True

    def _payload(self, cur: _Incoming) -> bool:
        """Read more of the current message; True when it is complete (handed over)."""
        sock = self.sock
        while cur.got < cur.nbytes:
            if cur.mode == _FOLD:
                # into the piece buffer, reduced into place each time it is full
                step = self._rx.fold_step(cur.req.fold[2].itemsize)  # type: ignore[union-attr]
                want = min(step - cur.fill, cur.nbytes - cur.got)
                view = cur.view[cur.fill:cur.fill + want]
            else:
                want = cur.nbytes - cur.got
                view = cur.view[cur.got:]
            k = self._hi - self._lo
            if k:  # what the staging read took of it first
                k = min(k, want)
                view[:k] = self._sv[self._lo:self._lo + k]
                self._lo += k
            else:
                try:
                    k = sock.recv_into(view, want, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    return False
                if k == 0:
                    raise ConnectionError("the peer closed the connection")
            cur.got += k
            if cur.relays:
                for out in cur.relays:
                    out._advance_relay(cur.got)
            if cur.mode == _FOLD:
                cur.fill += k
                if cur.fill == step or cur.got == cur.nbytes:
                    self._fold_piece(cur)
        self._finish(cur)
        return True

    def _fold_piece(self, cur: _Incoming) -> None:
        """Reduce the piece buffer into its place: ``dest = ufunc(first, piece)``."""
        req = cur.req
        ufunc, first, dest, _err = req.fold  # type: ignore[union-attr, misc]
        isz = dest.itemsize
        start = cur.got - cur.fill
        e0, e1 = start // isz, cur.got // isz
        cur.fill = 0
        if cur.error is not None:
            return  # the message is drained, not reduced any further
        typed = self._rx.piece[: (e1 - e0) * isz].view(dest.dtype)
        try:
            ufunc(first[e0:e1], typed, out=dest[e0:e1])
        except Exception as exc:  # e.g. FloatingPointError under np.seterr(all="raise")
            cur.error = exc  # the caller raises it; the stream stays in step

    def _finish(self, cur: _Incoming) -> None:
        req = cur.req
        self.bytes_in += cur.nbytes
        self.msgs_in += 1
        self._cur = None
        if cur.mode == _ASIDE and req is None:
            with self._cond:
                # Posted meanwhile? Then it is its data (one copy more).
                req = self._posted.pop(cur.tag, None)
                if req is None:
                    self._early[cur.tag] = (cur.meta, cur.data)
                    self.early_msgs += 1
        with self._cond:
            self._reading = None
        if req is None:
            return
        if cur.mode == _ASIDE:
            req.data = cur.data
            if req.relay:  # (not read into place: forwarded whole from where it is, by
                # the sender threads: this thread never blocks in a write)
                n = cur.nbytes
                req.relayed = [SendRequest(c._relay_head(t, m, n), memoryview(cur.data))
                               for c, t, m in req.relay]
                for (c, _t, _m), out in zip(req.relay, req.relayed, strict=True):
                    c._queue(out)
                self.relayed_msgs += 1
        else:
            req.data, req.into_dest = req.dest, True
            if cur.mode == _FOLD:
                req.folded = True
                req.fold_error = cur.error
                self.folded_msgs += 1
        req.meta = cur.meta
        self._complete(req)

    def _complete(self, req: RecvRequest) -> None:
        # Completed when this thread is about to wait (_Receiver.release), or before
        # it reads the next message: the caller's wake-up does not come in the middle
        # of this thread's work on the GIL.
        if self._rx.fast:
            self._rx.done.append(req)
        else:
            req._set()


_MORE, _PARKED, _DEAD = 0, 1, 2
_DEST, _FOLD, _ASIDE = 0, 1, 2
# Mid-payload with more than _LOWAT_FROM bytes to come, the receiver is woken only
# once this much (or the rest) has arrived (SO_RCVLOWAT).
_LOWAT, _LOWAT_FROM = 256 << 10, 64 << 10


class _Incoming:
    """The message a stream is reading: its receive (None: read aside), where its bytes
    go (``mode``: the posted buffer, folded through the piece buffer, or aside)."""

    __slots__ = ("req", "tag", "meta", "nbytes", "mode", "view", "got", "fill", "data",
                 "error", "relays")

    def __init__(self, req: RecvRequest | None, tag: Hashable, meta: Any, nbytes: int,
                 mode: int, view: memoryview) -> None:
        self.req = req
        self.tag = tag
        self.meta = meta
        self.nbytes = nbytes
        self.mode = mode
        self.view = view
        self.got = 0
        self.fill = 0
        self.data: Any = None
        self.error: Exception | None = None
        self.relays: list[SendRequest] = []  # progressive sends fed from this message


class _Receiver:
    """The one thread (``mesh-tcpbulk-recv``) that reads every stream of an endpoint.

    One thread for all of a node's streams, not one per stream: where a rank hears
    from several members at once (a direct allreduce or allgather of 4), the
    messages that arrived together are handed over in one pass, one wake-up of the
    caller instead of one per sender thread. The streams' sockets are watched with
    a selector (epoll); other threads talk to it through ``_wake`` (a socketpair)."""

    # Completions wait for the end of the pass (release), a short staging read ends
    # it (TcpBulkConn._fill), a small posted message completes in one step (_start);
    # False: as before 2026-12-06 (A/B: bench/bcastprobe.py, bench.collectives
    # --bcast-algos old).
    fast = True

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._add: list[TcpBulkConn] = []
        self._remove: list[tuple[TcpBulkConn, threading.Event]] = []
        self._resume: set[TcpBulkConn] = set()
        self._closed = False
        self._watched: set[TcpBulkConn] = set()
        self._parked: dict[TcpBulkConn, float] = {}  # conn -> when it reads aside
        # Receives completed during this pass, released before the next wait (release)
        self.done: list[_Request] = []
        self.piece = np.empty(_FOLD_PIECE, dtype=np.uint8)
        self.piece_view = memoryview(self.piece)
        self._err: tuple | None = None  # the np.errstate this thread runs under now
        self._thread = threading.Thread(target=self._run, daemon=True, name="mesh-tcpbulk-recv")
        self._thread.start()

    @staticmethod
    def fold_step(itemsize: int) -> int:
        return _FOLD_PIECE // itemsize * itemsize

    def use_errstate(self, err: tuple) -> None:
        """Run the next reductions under the poster's floating-point error state
        (``np.seterr`` is per thread: this one's would ignore the caller's)."""
        if err != self._err:
            np.seterr(**dict(err[0]))
            np.seterrcall(err[1])
            self._err = err

    # -- any thread ------------------------------------------------------------

    def _poke(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already poked (buffer full) or closing

    def add(self, conn: TcpBulkConn) -> None:
        with self._lock:
            self._add.append(conn)
        self._poke()

    def remove(self, conn: TcpBulkConn, timeout: float = 2.0) -> None:
        """Stop watching ``conn``; returns once the thread no longer touches its socket."""
        if threading.current_thread() is self._thread:
            self._drop(conn)
            return
        done = threading.Event()
        with self._lock:
            if self._closed:
                return
            self._remove.append((conn, done))
        self._poke()
        done.wait(timeout)

    def resume(self, conn: TcpBulkConn) -> None:
        """A receive was posted on a parked stream: read it again."""
        with self._lock:
            self._resume.add(conn)
        self._poke()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._poke()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=2.0)

    # -- the receiver thread ---------------------------------------------------

    def _drop(self, conn: TcpBulkConn) -> None:
        self._parked.pop(conn, None)
        if conn in self._watched:
            self._watched.discard(conn)
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass

    def _serve(self, conn: TcpBulkConn) -> None:
        """Pump ``conn``; park it (unwatched) or drop it as its state says."""
        state = conn._pump()
        if state == _MORE:
            if conn not in self._watched:
                self._watched.add(conn)
                self._sel.register(conn.sock, selectors.EVENT_READ, conn)
            return
        if state == _PARKED:
            self._parked[conn] = conn._park_until
        else:
            self._parked.pop(conn, None)
        if conn in self._watched:
            self._watched.discard(conn)
            self._sel.unregister(conn.sock)

    def release(self) -> None:
        """Complete the receives finished in this pass (receiver thread)."""
        done, self.done = self.done, []
        for req in done:
            req._set()

    def _run(self) -> None:
        try:
            while True:
                timeout = None
                if self._parked:
                    timeout = max(0.0, min(self._parked.values()) - time.monotonic())
                if self.done:
                    self.release()
                events = self._sel.select(timeout)
                for key, _ in events:
                    conn = key.data
                    if conn is None:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except (BlockingIOError, OSError):
                            pass
                        continue
                    if conn in self._watched:
                        self._serve(conn)
                if not (self._add or self._remove or self._resume or self._closed):
                    if not self._parked:
                        continue  # (nothing asked: a request appended now pokes again)
                    add, remove, resume, closed = [], [], set(), False
                else:
                    with self._lock:
                        add, self._add = self._add, []
                        remove, self._remove = self._remove, []
                        resume, self._resume = self._resume, set()
                        closed = self._closed
                for conn, done in remove:
                    self._drop(conn)
                    resume.discard(conn)
                    done.set()
                if closed:
                    return
                for conn in add:
                    if conn.broken is None:
                        self._serve(conn)  # (it may hold data already)
                now = time.monotonic()
                for conn in [c for c, t in self._parked.items() if c in resume or t <= now]:
                    del self._parked[conn]
                    conn._parked = False  # posted, or waited long enough: read on
                    self._serve(conn)
        except Exception:  # pragma: no cover - a bug here must not pass silently
            log.exception("tcpbulk: the receiver thread failed")
            for conn in list(self._watched) + list(self._parked):
                conn._fail("the receiver thread failed")
        finally:
            self.release()  # (complete: their data is in place)
            for s in (self._wake_r, self._wake_w):
                s.close()
            self._sel.close()


class TcpBulkEndpoint:
    """A node's listening socket and its connections (see the module docstring)."""

    def __init__(self, node_id: str, host: str, *,
                 on_change: Callable[[], None] | None = None) -> None:
        self.node_id = node_id
        self.token = os.urandom(16)
        self._on_change = on_change
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._conns: dict[str, TcpBulkConn] = {}
        # peer id -> (state, why): connecting | expecting | ready | fallback
        self._state: dict[str, tuple[str, str]] = {}
        self._names: dict[str, str] = {}
        self._offers: dict[str, tuple] = {}  # peer id -> (name, we dial?, host, port, token)
        self._rx: _Receiver | None = None  # started with the first connection
        self._closed = False
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._lsock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._lsock.bind((host, 0))
            self._lsock.listen(64)
        except OSError:
            self._lsock.close()
            raise
        self.host = host
        self.port = self._lsock.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name="mesh-tcpbulk-accept")
        self._acceptor.start()

    # -- agreement --------------------------------------------------------------

    def offer(self) -> list:
        return [self.port, self.token]

    def learn(self, peer_id: str, peer_name: str, dialer: bool, host: str, port: int,
              token: bytes) -> None:
        """A peer's offer: connect only when a collective needs it (``ensure``), so that
        a node keeps no streams (and threads) for peers it never reduces with."""
        with self._lock:
            self._offers[peer_id] = (peer_name, dialer, host, port, token)

    def ensure(self, peer_ids: list[str]) -> None:
        """Start connecting to each of these peers that offered and has no stream yet."""
        for pid in peer_ids:
            with self._lock:
                offer = self._offers.get(pid)
                if offer is None or pid in self._state:
                    continue
            name, dialer, host, port, token = offer
            if dialer:
                self.dial(pid, name, host, port, token)
            else:
                self.expect(pid, name)

    def dial(self, peer_id: str, peer_name: str, host: str, port: int, token: bytes) -> None:
        """Connect to a peer's listener (in a thread of its own: never blocks)."""
        with self._lock:
            if self._closed or peer_id in self._state:
                return
            self._state[peer_id] = ("connecting", f"to {host}:{port}")
            self._names[peer_id] = peer_name
        threading.Thread(target=self._dial, args=(peer_id, peer_name, host, port, token),
                         daemon=True, name=f"mesh-tcpbulk-connect-{peer_name}").start()

    def expect(self, peer_id: str, peer_name: str) -> None:
        """The peer dials us; if it has not within CONNECT_TIMEOUT * 2, fall back."""
        with self._lock:
            if self._closed or peer_id in self._state:
                return
            self._state[peer_id] = ("expecting", "waiting for the peer to connect")
            self._names[peer_id] = peer_name

        def give_up() -> None:
            with self._lock:
                if self._state.get(peer_id, ("",))[0] != "expecting":
                    return
                self._state[peer_id] = ("fallback", "the peer did not connect in time")
                self._changed.notify_all()
            self._notify()

        timer = threading.Timer(2 * CONNECT_TIMEOUT, give_up)
        timer.daemon = True
        timer.start()

    def refuse(self, peer_id: str, why: str) -> None:
        """Record why this peer's arrays stay on ZeroMQ."""
        with self._lock:
            if peer_id not in self._state:
                self._state[peer_id] = ("fallback", why)

    def conn(self, peer_id: str) -> TcpBulkConn | None:
        """The ready connection to this peer, if any (any thread)."""
        c = self._conns.get(peer_id)
        return c if c is not None and c.broken is None else None

    def any_conn(self, peer_id: str) -> TcpBulkConn | None:
        return self._conns.get(peer_id)

    def settle(self, peer_ids: list[str], timeout: float) -> None:
        """Connect (``ensure``) and wait, bounded, until the pair with every one of
        ``peer_ids`` is connected or on ZeroMQ for good, so that both sides pick the
        same path. A peer with no state yet (its offer is on the way) is waited for."""
        deadline = time.monotonic() + timeout
        while True:
            self.ensure(peer_ids)
            with self._lock:
                pending = [p for p in peer_ids
                           if self._state.get(p, ("expecting",))[0] in ("connecting", "expecting")]
                left = deadline - time.monotonic()
                if not pending or left <= 0 or self._closed:
                    return
                self._changed.wait(min(left, 0.05))

    def state(self, peer_id: str) -> dict | None:
        with self._lock:
            st = self._state.get(peer_id)
            c = self._conns.get(peer_id)
        if st is None:
            return {"state": "idle", "why": "connects when a collective needs it",
                    "listen": f"{self.host}:{self.port}"} if peer_id in self._offers else None
        out: dict[str, Any] = {"state": st[0], "why": st[1] or None,
                               "listen": f"{self.host}:{self.port}"}
        if c is not None:
            out.update(c.stats())
        return out

    def drop(self, peer_id: str) -> None:
        """The peer left or died: close its connection, forget its state."""
        with self._lock:
            c = self._conns.pop(peer_id, None)
            self._state.pop(peer_id, None)
            self._names.pop(peer_id, None)
            self._offers.pop(peer_id, None)
        if c is not None:  # (off the caller's thread: the node's I/O thread must not wait)
            threading.Thread(target=c.close, args=("closed",), daemon=True,
                             name="mesh-tcpbulk-close").start()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns.values())
            self._conns.clear()
            self._changed.notify_all()
        try:
            self._lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._lsock.close()
        for c in conns:
            c.close("closed")
        if self._rx is not None:
            self._rx.close()
        self._acceptor.join(timeout=2.0)

    # -- threads ----------------------------------------------------------------

    def _notify(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:  # pragma: no cover - a callback's bug must not kill us
                log.exception("tcpbulk: change callback failed")

    def _install(self, peer_id: str, sock: socket.socket) -> bool:
        with self._lock:
            if self._closed or peer_id in self._conns:
                return False
            name = self._names.get(peer_id, peer_id[:8])
            if self._rx is None:
                self._rx = _Receiver()
            self._conns[peer_id] = TcpBulkConn(sock, peer_id, name, self._broken, self._rx)
            self._state[peer_id] = ("ready", "")
            self._changed.notify_all()
        self._notify()
        return True

    def _set_fallback(self, peer_id: str, why: str) -> None:
        with self._lock:
            if self._state.get(peer_id, ("",))[0] == "ready":
                return
            self._state[peer_id] = ("fallback", why)
            self._changed.notify_all()
        log.info("tcpbulk: arrays to peer %s stay on ZeroMQ: %s",
                 self._names.get(peer_id, peer_id), why)
        self._notify()

    def _broken(self, conn: TcpBulkConn, why: str) -> None:
        with self._lock:
            if self._conns.get(conn.peer_id) is conn:
                del self._conns[conn.peer_id]
                self._state[conn.peer_id] = ("fallback", f"connection broke: {why}")
                self._changed.notify_all()
        self._notify()

    def _dial(self, peer_id: str, peer_name: str, host: str, port: int, token: bytes) -> None:
        sock = None
        try:
            sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
            _tune(sock)
            me = self.node_id.encode()
            sock.sendall(_PREAMBLE.pack(_MAGIC, token, len(me)) + me)
            ack = sock.recv(1)
            if ack != b"\x01":
                raise ConnectionError("the peer refused the connection")
            sock.settimeout(None)
        except (OSError, ValueError) as exc:
            if sock is not None:
                sock.close()
            self._set_fallback(peer_id, f"cannot connect to {host}:{port}: {exc}")
            return
        if not self._install(peer_id, sock):
            sock.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _addr = self._lsock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._greet, args=(sock,), daemon=True,
                             name="mesh-tcpbulk-greet").start()

    def _greet(self, sock: socket.socket) -> None:
        """Read a dialer's preamble (bounded); answer and install, or drop it."""
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            head = bytearray(_PREAMBLE.size)
            _recv_exact(sock, memoryview(head))
            magic, token, idlen = _PREAMBLE.unpack(head)
            if magic != _MAGIC or token != self.token or idlen > 256:
                raise ConnectionError("not a mesh bulk connection")
            raw = bytearray(idlen)
            _recv_exact(sock, memoryview(raw))
            peer_id = raw.decode()
            with self._lock:
                # (Its hello may reach us after it dialled: no state yet is fine too;
                # the token proves it saw our offer.)
                wanted = (self._state.get(peer_id, ("expecting",))[0] == "expecting"
                          and not self._closed)
            if not wanted:
                raise ConnectionError("not expected")
            _tune(sock)
            sock.settimeout(None)
            sock.sendall(b"\x01")
        except (OSError, ValueError, UnicodeDecodeError):
            sock.close()
            return
        if not self._install(peer_id, sock):
            sock.close()

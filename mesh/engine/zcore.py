"""The I/O thread's socket calls without pyzmq's Python layers: libzmq called from C.

In the compiled build (Cython, pure-Python mode, zcore.pxd holds the C) this module
calls libzmq through function pointers resolved at run time from the very libzmq
pyzmq loaded (found in /proc/self/maps, opened with RTLD_NOLOAD: the same library,
never a second copy). Two calls:

- :func:`drain` waits for the ROUTER without the GIL (``zmq_poll``), reads every
  message there (``zmq_msg_recv``, still without the GIL), then takes the GIL once
  and returns their frames: one GIL hand-over per wake-up instead of one per pyzmq
  call (poll, each frame's recv, the events check). Frames below ZERO_COPY_BYTES
  are copied to bytes; larger ones (an array's data) become a ``Frame`` that owns
  libzmq's message, no copy (:func:`frame_class`). A message of more than six
  frames stops the read: the caller reads its other frames with pyzmq, in order.
- :func:`send_bytes` sends one frame of bytes holding the GIL (a 64 B copy is far
  cheaper than letting go of the GIL and taking it back, which pyzmq does);
  :func:`send_parts` a message of several, a large frame without a copy (libzmq
  sends from the caller's buffer and calls back when done; the buffer is let go
  by the next send or the I/O thread's next turn, never on libzmq's thread).

Compiled with them (both builds run these; the pure build as plain Python, with
pyzmq's poll when ``available()`` is False): :func:`io_loop`, the I/O thread's
loop (timers, bulk ticks, credit and batch flushes, the wait, commands);
:func:`drain_core`, its read, handing a lone frame to :func:`on_one` and an
array's message to :func:`on_array` without a Python frame between;
:func:`dispatch_loop` / :func:`run_one` / :func:`return_credit`, the dispatch
thread's loop and a lone message's handler call and credit return
(engine/dispatch.py keeps the general cases).

``available()`` is False in the pure build (``MESH_PURE_PYTHON=1``), when pyzmq's
libzmq is not a shared library this process can find (a static build), or its ABI
is not libzmq 4's: the callers then keep pyzmq's calls (mesh/engine/loop.py).

Who owns what: nothing here owns a socket. io_loop runs on the I/O thread (it owns
the ROUTER), dispatch_loop on the dispatch thread (it owns the dispatch queue). A
socket handle passed in belongs to the thread calling (the I/O thread its ROUTER,
a publisher holding the link lock a link's DEALER), exactly as with pyzmq; the
caller must not pass a closed socket. A ``Frame`` belongs to whoever holds it (any
thread; it closes its libzmq message when the last reference goes); the list of
sent buffers to let go is process-wide, under its own mutex (never the GIL's).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import sys
import threading
import time
from typing import Any

import numpy as np
import zmq
from zmq.backend import zmq_poll

from mesh import wire
from mesh.engine import heap
from mesh.engine.common import _STOP, _WAKE_ID, ZERO_COPY_BYTES, _BatchedFrame
from mesh.flow import DEFAULT_FLUSH_DELAY, CreditGrant
from mesh.message import incoming
from mesh.tensor import array_from_frames, decode_descriptor

log = logging.getLogger("mesh")

get_ident = threading.get_ident

# drain()'s status: the socket had no more; the batch filled up (call again); the
# last message has more frames (read them first); a negative errno is an error.
DRAINED = 0
FULL = 1
MORE = 2

# The one-frame layout (wire.lone_frames / unpack_one), read and written here in C:
# its integers are little-endian, as this host's must be for that.
LITTLE = sys.byteorder == "little"
_VERSION = wire.PROTOCOL_VERSION
_MSG = wire.MSG
_REPLY = wire.REPLY
_ONE = wire.ONE
_ONE_SIZE = wire.ONE_SIZE
_REPLY_SIZE = wire.REPLY_ONE_SIZE
# Peer states whose data messages are accepted here (dispatch._KNOWN).
_KNOWN = frozenset(("alive", "suspect", "joining"))
_FIXED = bytes([wire.FIXED])
_ZERO_COPY = ZERO_COPY_BYTES
_TENSOR = wire.TENSOR  # an array's flags on the socket (no bulk channel's flag)
# Received arrays' descriptor bytes -> (dtype, shape, nbytes, 1-d), checked once by
# array_from_frames (I/O thread only); cleared when it holds this many.
_array_specs: dict = {}
_ARRAY_SPECS_MAX = 256
_frombuffer = np.frombuffer
# drain() rounds per wake-up (ZC_BATCH messages each) before timers and commands get
# their turn, as loop._drain_router's 2048 messages.
_CORE_TURNS = 32
# Credit that found its link held (I/O thread): looked at again this much later,
# unless the holder applied it first (seconds).
_CREDIT_RETRY = 0.001
# Tests only: called as (node, ident, frame, handled) for every lone frame drain_core
# hands to on_one (a module global, not C: monkeypatch sets it; looked up once a drain).
_watch = None

_NAMES = ("zmq_msg_init", "zmq_msg_recv", "zmq_msg_close", "zmq_msg_move", "zmq_msg_data",
          "zmq_msg_size", "zmq_msg_more", "zmq_poll", "zmq_send", "zmq_errno",
          "zmq_msg_init_data", "zmq_msg_send")
_state: list = []  # [True/False] once resolved (any thread; the result is the same)


def _libzmq_path() -> str | None:
    """The libzmq shared library this process mapped (pyzmq's), if any."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(None, 5)[-1] if line.count(" ") >= 5 else ""
                if "libzmq" in os.path.basename(path) and ".so" in path:
                    return path
    except OSError:
        return None
    return None


def _resolve() -> bool:
    if not _is_compiled() or zmq.zmq_version_info()[0] != 4:
        return False
    path = _libzmq_path()
    if path is None:
        return False
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | ctypes.RTLD_LOCAL)
        addresses = tuple(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
                          for name in _NAMES)
    except (OSError, AttributeError):
        return False
    if not all(addresses):
        return False
    return bool(zc_bind(addresses))  # noqa: F821 (zcore.pxd: compiled build only)


def _is_compiled() -> bool:
    from mesh import _build

    return _build.is_compiled(__name__)


def available() -> bool:
    """Can this process use the C calls (see the module doc)?"""
    if not _state:
        _state.append(_resolve())
    return _state[0]


def drain(handle: int, timeout_ms: int) -> Any:
    """(messages, status) of the socket whose handle (``sock.underlying``) is given:
    see the module doc and zcore.pxd. Only after :func:`available` said True."""
    return zc_drain(handle, timeout_ms)  # noqa: F821


def io_loop(node: Any, core: bool, next_tick: float, next_seed: float,
            seed_delay: float) -> None:
    """IoLoop._io_loop's loop (the I/O thread's life until a "close" command): the
    timers when due, bulk channels' ticks, batches and credit to flush, then the wait
    and the read (:func:`drain_core` when ``core``, else pyzmq's poll and
    ``_drain_router``), then the commands. Both builds run this; compiled, a wake-up
    with nothing due runs no Python frame of its own."""
    hb = node.options["heartbeat_interval"]
    seed_interval = node.options["seed_interval"]
    tickers = node._bulk_tickers  # (bulk channels are added before the node starts)
    ordering = node._bulk_ordering
    commands = node._commands
    poll_router = node._poll_router
    # When the heartbeat, seed and membership timers are next due: recomputed when
    # that time comes or something but data arrived (_timers_stale), not after
    # every message (membership's next deadline looks at every member).
    timers_at = 0.0
    while True:
        now = time.monotonic()
        if now >= timers_at or node._timers_stale:
            node._timers_stale = False
            if now >= next_tick:
                node._tick(now)
                next_tick = now + hb
            if node._seed_socks and now >= next_seed:
                node._hello_seeds()
                seed_delay = min(seed_delay * 2, seed_interval)
                next_seed = now + seed_delay
            members = node._members
            deadline = members.next_deadline()
            if deadline is not None and now >= deadline:
                node._swim(members.tick(now))
                members = node._members
            deadline = members.next_deadline()
            timers_at = next_tick
            if node._seed_socks and next_seed < timers_at:
                timers_at = next_seed
            if deadline is not None and deadline < timers_at:
                timers_at = deadline
        wake_at = timers_at
        if core:
            zc_release_sent()  # noqa: F821 (zero-copy sends libzmq is done with)
        for channel in tickers:
            channel.tick()
        if node._batching:
            batch_deadline = node._flush_batches(now)
            if batch_deadline is not None and batch_deadline < wake_at:
                wake_at = batch_deadline
        dirty = bool(node._dirty_grants)
        if dirty:
            # Only when some is due: credit owed since the last look is due a flush
            # delay after it was consumed, never sooner.
            if now >= node._credit_due:
                # Credit flowed: look again within a flush delay even when none is
                # owed now, so consumers need not wake this thread for more.
                due = node._flush_credits(now)  # the next deadline, or None
                node._credit_due = due if due else now + DEFAULT_FLUSH_DELAY
            credit_due = node._credit_due
            if credit_due < wake_at:
                wake_at = credit_due
        if node._credit_later:
            for link in list(node._credit_later):
                node._take_credit(link)
            if node._credit_later and now + _CREDIT_RETRY < wake_at:
                wake_at = now + _CREDIT_RETRY
        # Published before looking at _dirty_grants (see Dispatcher._return_credit).
        node._io_wake_at = wake_at
        if (dirty or node._dirty_grants) and now + DEFAULT_FLUSH_DELAY < wake_at:
            wake_at = now + DEFAULT_FLUSH_DELAY
        wait_ms = int((wake_at - now) * 1000) + 1
        if wait_ms < 0:
            wait_ms = 0
        waiter = None
        for channel in ordering:
            if channel.wants_wait():
                waiter = channel
                break
        if waiter is not None:
            waiter.wait(wait_ms)  # the ROUTER and the channel's completions
        elif core:
            drain_core(node, wait_ms)
        elif zmq_poll(poll_router, wait_ms):
            node._drain_router()
        if commands:
            node._timers_stale = True  # a command may add a peer, a seed...
            while commands:
                cmd = commands.popleft()
                if cmd[0] == "close":
                    node._io_shutdown()
                    return
                node._run_command(cmd)


def drain_core(node: Any, wait_ms: int) -> None:
    """IoLoop._drain_router for this module (the I/O thread's wait and read): wait up
    to ``wait_ms`` for the ROUTER without the GIL, then handle everything that was
    there (read, GIL released, in rounds of ZC_BATCH messages); a lone message goes to
    :func:`on_one` with no Python frame between. The handler calls collected go to
    the dispatch thread as one item. Only after :func:`available` said True."""
    handle = node._router_handle
    msgs, status = zc_drain(handle, wait_ms)  # noqa: F821
    if not msgs:
        if status < 0:
            raise zmq.ZMQError(-status)  # the context ended under us: as zmq_poll would
        return
    now = time.monotonic()
    # A bulk channel that does not want the loop's wait (no array under way another
    # way) holds nothing back: messages skip its hold() (and the frame objects).
    # None does now (the loop waits here only then); a message may change that.
    ordering = node._bulk_ordering
    holds = False
    watch = _watch
    try:
        for turn in range(_CORE_TURNS):
            if turn:  # what came meanwhile, if anything (never fetched and left unread)
                msgs, status = zc_drain(handle, 0)  # noqa: F821
                if not msgs:
                    if status < 0:
                        raise zmq.ZMQError(-status)
                    return
            last = len(msgs) - 1 if status == MORE else -1
            index = -1
            for msg in msgs:
                index += 1
                if index == last:  # its other frames are still in the socket: read them
                    frames = [_as_frame(frame) for frame in msg]
                    recv = node._router.recv
                    while True:
                        frame = recv(0, copy=False)
                        frames.append(frame)
                        if not frame.more:
                            break
                    node._handle_frames(frames, now)
                elif len(msg) == 2 and not holds and msg[1][:1] == _FIXED:
                    # The latency case: no frame objects; in C when it is the common one.
                    try:
                        handled = on_one(node, msg[0], msg[1])
                        if watch is not None:
                            watch(node, msg[0], msg[1], handled)
                        if handled:
                            continue
                    except Exception:  # as _handle_frames: nothing may end this thread
                        node.counters.drops["internal"] += 1
                        log.exception("%s: error handling a message; dropped", node.name)
                        continue
                    node._handle_one(msg[0], msg[1])
                    continue
                elif len(msg) == 2 and msg[0] == _WAKE_ID:
                    continue  # a wake-up: commands run after the drain
                else:
                    if len(msg) == 4 and not holds:  # an array: in C when the common one
                        try:
                            if on_array(node, msg):
                                continue
                        except Exception:  # as _handle_frames: nothing may end this thread
                            node.counters.drops["internal"] += 1
                            log.exception("%s: error handling a message; dropped", node.name)
                            continue
                    node._handle_frames([_as_frame(frame) for frame in msg], now)
                if ordering:  # what it was may have started an array's way
                    holds = False
                    for channel in ordering:
                        if channel.wants_wait():
                            holds = True
                            break
            if status < 0:
                raise zmq.ZMQError(-status)
            if status == DRAINED:
                return
    finally:
        if node._io_batch:
            # One dispatch item per drain, not per message: fewer thread wake-ups.
            node._dispatch.put(node._io_batch)
            node._io_batch = []


def _as_frame(frame: Any) -> Any:
    """A frame zc_drain read, as the handling code reads it (a Frame already is)."""
    return _BatchedFrame(frame) if type(frame) is bytes else frame


def frame_class() -> Any:
    """The type of the frames zc_drain keeps without a copy (a 1 MiB array's data):
    len(), ``.bytes``, ``.buffer``, the buffer protocol. Only after :func:`available`
    said True."""
    return zc_frame_class()  # noqa: F821


def _admit(node: Any, peer: Any, sub: Any, subject: str, seq: int, ts: float,
           nbytes: int) -> Any:
    """What on_one and on_array do for every message they take: counters, latency,
    gaps, and the subscription's credit for ``peer``. The CreditGrant when the
    message fits its window; None when it broke the window (counted, dropped)."""
    now = zc_wall()  # noqa: F821
    peer_id = peer.id
    counters = peer.counters
    counters.msgs_in += 1
    counters.bytes_in += nbytes
    counters = node.counters
    counters.msgs_in += 1
    counters.bytes_in += nbytes
    if ts:
        latency = now - ts
        if 0.0 <= latency < 3600.0:  # also rejects nan/inf; clocks may disagree a little
            histogram = node.latency
            histogram.record(latency, 1)
    key = (peer_id, subject)  # plain subscribers see every message: gaps are losses
    last = node._last_seq.get(key)
    if last is not None and seq > last + 1:
        node.gaps += seq - last - 1
    node._last_seq[key] = seq
    grant = sub._grants.get(peer_id)
    if grant is None:
        grant = sub._grants[peer_id] = CreditGrant(
            sub.credits, sub.credit_bytes, threshold=_credit_threshold(sub.credits))
    flow = sub._flow  # a Condition: its acquire/release are its lock's (no Python frames)
    flow.acquire()
    try:
        accepted = grant.on_received_run((nbytes,))
    finally:
        flow.release()
    if grant.buffered >= grant.credits:  # a full window nobody took from (engine/heap.py)
        heap.window_full(grant)
    if not accepted:
        counters.drops["credit_violation"] += 1
        return None
    return grant


def on_array(node: Any, msg: tuple) -> bool:
    """An array's message the I/O thread read whole, ``(identity, header, descriptor,
    data)``, its data kept without a copy (a Frame): dispatch's _on_msg ->
    _on_msg_fields -> _payload_of -> _accept_run -> _hand_over for the common case,
    written out: a known peer, one plain subscription (handler not inline, or an
    inbox), no headers, no request, no policy, on the socket (no bulk channel).
    False, with nothing done, sends it there (which also drops what is malformed).
    I/O thread only; compiled build only."""
    head = msg[1]
    desc = msg[2]
    frame = msg[3]
    if type(head) is not bytes or type(desc) is not bytes:
        return False
    address = zc_frame_address(frame)  # noqa: F821 (0: not a Frame)
    if not address:
        return False
    p = head
    h = zc_unpack_head(p, len(head), _VERSION, _MSG)  # noqa: F821 (wire.pack_msg's, in C)
    if not h.ok or h.flags != _TENSOR:
        return False
    seq = h.seq
    ts = h.ts
    sid = h.sid
    peer = node._peers.get(node._ident_ids.get(msg[0], ""))
    if peer is None or peer.state not in _KNOWN:
        return False  # the general path resolves it (or drops a stranger's)
    sub = node._subs_by_sid.get(sid)
    if (sub is None or sub.closed or sub.queue or sub.inline or node._policy is not None):
        return False
    try:
        subject = head[h.soff:h.soff + h.slen].decode()
    except UnicodeDecodeError:
        return False
    route = node._routing._cache.get(subject)
    if route is None or sub not in route.local:
        return False
    nbytes = len(frame)
    # The array: its dtype and shape by descriptor, checked once (array_from_frames,
    # the reference) and then only its size; a view on the frame, no copy.
    spec = _array_specs.get(desc)
    if spec is None:
        try:
            described = decode_descriptor(desc)
            array = array_from_frames(described, frame)
        except Exception:
            return False  # malformed: the general path drops it, counted
        if not (described.step or described.offset or described.total):
            if len(_array_specs) >= _ARRAY_SPECS_MAX:
                _array_specs.clear()
            _array_specs[desc] = (described.dtype, described.shape, described.nbytes,
                                  len(described.shape) == 1)
    else:
        if spec[2] != nbytes:
            return False
        array = _frombuffer(frame, spec[0])
        if not spec[3]:
            array = array.reshape(spec[1])
    node._ballast.keep_at(frame, address, nbytes)  # the top of its heap stays (heap.py)
    grant = _admit(node, peer, sub, subject, seq, ts, nbytes)
    if grant is None:
        return True
    peer_id = peer.id
    received = incoming(subject, memoryview(frame), None, peer_id, seq, array, None, node, None,
                        (grant, peer_id, nbytes))
    if sub.handler is None:
        sub._inbox.put(received)
    else:
        node._io_batch.append((sub, received))
    return True


def send_bytes(handle: int, data: bytes, more: bool = False) -> int:
    """Send one frame (``more``: another follows) without waiting: 0, or the errno
    (``errno.EAGAIN``: the peer's queue is full, nothing was sent); -1 when ``data``
    is not bytes (nothing sent: use pyzmq)."""
    return zc_send_bytes(handle, data, ZC_SNDMORE if more else 0)  # noqa: F821


def send_parts(sock: Any, frames: list) -> None:
    """link._send_frames from C for a message of several frames (link lock held):
    bytes below ZERO_COPY_BYTES copied, larger frames (an array's data) sent without
    a copy and without pyzmq's garbage-collector thread (zc_send_zerocopy). As
    there, only the first frame can find the peer's queue full: zmq.Again, nothing
    sent. Only after :func:`available` said True."""
    if sock.closed:
        raise zmq.ZMQError(zmq.ENOTSOCK)
    handle = sock.underlying
    last = len(frames) - 1
    for index in range(last + 1):
        frame = frames[index]
        flags = ZC_SNDMORE if index < last else 0  # noqa: F821
        if type(frame) is bytes:
            nbytes = len(frame)
        else:
            nbytes = frame.nbytes if type(frame) is memoryview else len(frame)
        if nbytes < _ZERO_COPY:
            rc = zc_send_bytes(handle, frame if type(frame) is bytes else bytes(frame), flags)  # noqa: F821
        else:
            rc = zc_send_zerocopy(handle, frame, flags)  # noqa: F821
        if rc:
            if rc == errno.EAGAIN and index == 0:
                raise zmq.Again()
            raise zmq.ZMQError(rc)


def pack_one(subject: Any, seq: Any, ts: float, sid: Any, req_id: Any, data: bytes) -> bytes:
    """wire.lone_frames' one frame of a small message, written in C (``subject``: its
    UTF-8 bytes; ``req_id`` -1 when it is no request). Only after :func:`available`
    said True."""
    return zc_pack_one(_VERSION, _MSG, _ONE, seq, ts, sid, req_id, subject, data)  # noqa: F821


def send_frame(node: Any, link: Any, peer_id: str, frame: bytes, nbytes: int) -> bool:
    """LinkSender._put_frames for one frame of bytes (link lock held): sent from C,
    holding the GIL, counted. False, with nothing sent, when the frame must take
    ``_put_frames`` (an array went another way before it, the peer's queue is full,
    an error); owed credit taken for it then goes to the I/O thread. Compiled build
    only (after :func:`available` said True)."""
    for channel in node._bulk_ordering:
        if channel.keeps_order(link):
            return False
    owed = owed_credit(node, peer_id) if node._dirty_grants else None
    handle = link.sock.underlying
    if owed is None:
        if zc_send_bytes(handle, frame, 0):  # noqa: F821
            return False
    else:  # credit this node owes the peer rides in front of the message
        if zc_send_bytes(handle, wire.pack(wire.CREDIT, owed), ZC_SNDMORE):  # noqa: F821
            node._owed_credit_failed(peer_id, owed)
            return False
        zc_send_bytes(handle, frame, 0)  # noqa: F821 (the rest of a message never waits)
        node.credit_updates["riding"] += 1
    counters = node.counters
    counters.msgs_out += 1
    counters.bytes_out += nbytes
    counters = link.counters
    counters.msgs_out += 1
    counters.bytes_out += nbytes
    return True


def on_one(node: Any, ident: bytes, head: bytes) -> bool:
    """A one-frame message or reply (its first byte is wire.FIXED) the I/O thread read:
    dispatch's _on_msg_one -> _hand_over -> _run_inline -> _return_credit (and
    _on_reply_one -> _settle_reply) for the common case, written out in C types: a
    known peer, one plain subscription, no policy. Those stay the reference: False,
    with nothing done, sends the message there (wire.unpack_one first), which also
    raises for what is malformed. I/O thread only; compiled build only."""
    size = len(head)
    if not LITTLE or size < _REPLY_SIZE:
        return False
    p = head
    if p[1] != _VERSION or p[3] != _ONE:
        return False
    kind = p[2]
    if kind == _REPLY:
        return _on_reply(node, ident, head)
    if kind != _MSG or size < _ONE_SIZE:
        return False
    one = zc_unpack_one(p)  # noqa: F821
    seq = one.seq
    ts = one.ts
    sid = one.sid
    req_id = one.req_id
    slen = one.slen
    if _ONE_SIZE + slen > size or req_id < -1:
        return False
    peer = node._peers.get(node._ident_ids.get(ident, ""))
    if peer is None or peer.state not in _KNOWN:
        return False  # the general path resolves it (or drops a stranger's)
    sub = node._subs_by_sid.get(sid)
    if sub is None or sub.closed or sub.queue or node._policy is not None:
        return False
    try:
        subject = head[_ONE_SIZE:_ONE_SIZE + slen].decode()
    except UnicodeDecodeError:
        return False
    route = node._routing._cache.get(subject)
    if route is None or sub not in route.local:
        return False
    data = head[_ONE_SIZE + slen:]
    nbytes = len(data)
    grant = _admit(node, peer, sub, subject, seq, ts, nbytes)
    if grant is None:
        return True
    peer_id = peer.id
    request_id = None if req_id == -1 else req_id
    msg = incoming(subject, data, None, peer_id, seq, None, request_id, node,
                   None if request_id is None else peer_id, (grant, peer_id, nbytes))
    if sub.handler is None:
        sub._inbox.put(msg)
        return True
    if not sub.inline:
        node._io_batch.append((sub, msg))
        return True
    # An inline handler, here (dispatch._run_inline).
    if sub.closed:
        return True
    start = zc_mono()  # noqa: F821
    try:
        sub.handler(msg)
    except Exception:
        node.counters.drops["handler_error"] += 1
        log.exception("%s: handler for %r raised on %r", node.name, sub.pattern, subject)
    sub.delivered += 1
    took = zc_mono() - start  # noqa: F821
    if took > node._inline_budget:
        node._inline_overran(sub, msg, took)
    credit = msg._credit
    if type(credit) is tuple:
        msg._credit = None
        return_credit(node, sub, grant, peer_id, 1, nbytes)  # on this (I/O) thread
    elif credit is not None:
        node._consumed(sub, msg)
    return True


def _on_reply(node: Any, ident: bytes, head: bytes) -> bool:
    """dispatch._on_reply_one -> _settle_reply for a known peer's awaited reply."""
    req_id = int.from_bytes(head[4:_REPLY_SIZE], "little", signed=True)
    if req_id < 0:
        return False
    peer = node._peers.get(node._ident_ids.get(ident, ""))
    if peer is None or peer.state not in _KNOWN:
        return False
    pending = node._pending.get(req_id)
    if pending is None or pending.reply is not None:
        return False  # late or twice: counted there
    pending.reply = incoming("", head[_REPLY_SIZE:], None, peer.id, 0, None, req_id, None, None,
                             None)
    pending.set()
    return True


def dispatch_loop(node: Any) -> None:
    """Dispatcher._dispatch_loop (the dispatch thread's whole life): one item after
    another from the dispatch queue until _STOP. The I/O thread's item for a lone
    message (a ping-pong: ``[(sub, msg)]``) runs here in :func:`run_one`, no Python
    frame between the queue's get and the handler; every other item goes to
    ``node._run_item``. Both builds run this; compiled it is C."""
    get = node._dispatch.get
    run_item = node._run_item
    item = one = None
    while True:
        # Let go of the last item before waiting: its messages may hold views whose
        # release frees a shared-memory slot the publisher is waiting for.
        item = one = None
        item = get()
        if item is _STOP:
            return
        try:
            if type(item) is list and len(item) == 1:
                one = item[0]
                if type(one) is tuple and len(one) == 2:
                    run_one(node, one[0], one[1])
                    continue
            run_item(item)
        except Exception:  # nothing may end this thread: every handler depends on it
            node.counters.drops["dispatch_error"] += 1
            log.exception("%s: dispatch error", node.name)


def run_one(node: Any, sub: Any, msg: Any) -> None:
    """Dispatcher._run_item for one message (no tally): its handler, then its
    credit back (:func:`return_credit`). Dispatch thread."""
    if sub.closed:
        return
    try:
        sub.handler(msg)
    except Exception:
        node.counters.drops["handler_error"] += 1
        log.exception("%s: handler for %r raised on %r", node.name, sub.pattern, msg.subject)
    sub.delivered += 1
    credit = getattr(msg, "_credit", None)  # on_peer callbacks get a PeerInfo
    if type(credit) is tuple:
        msg._credit = None
        return_credit(node, sub, credit[0], credit[1], 1, credit[2])
    elif credit is not None:
        node._consumed(sub, msg)


def return_credit(node: Any, sub: Any, grant: Any, publisher: Any, count: int,
                  nbytes: int) -> None:
    """Dispatcher._return_credit (both builds run this; here it is compiled): ``count``
    messages from ``publisher`` were consumed: send their credit back now if the
    grant's threshold is reached, else have the I/O thread flush it later. Any thread."""
    now = time.monotonic()  # (the pure build runs this too: no zc_mono)
    flow = sub._flow  # a Condition: its acquire/release are its lock's
    flow.acquire()
    try:
        grant.on_consumed(nbytes, now, count)
        update = grant.take_update(now)
        if update is None:
            node._dirty_grants[(sub, publisher)] = grant
    finally:
        flow.release()
    if update is not None:
        entries = [[sub.sid, update[0], update[1]]]
        if not node._send_credit_direct(publisher, entries):
            node._command(("credit", publisher, entries))
    elif node._io_wake_at > now + grant.flush_delay and get_ident() != node._io_ident:
        # The I/O thread sleeps past this credit's flush time: wake it to schedule
        # the flush. (Added to _dirty_grants first, read _io_wake_at after: the
        # I/O thread publishes _io_wake_at before it looks at _dirty_grants.)
        # While credit flows it keeps waking at least that often, so a steady
        # stream costs no wake-up per message (most credit rides on replies).
        node._command(("flush_credit",))


def _credit_threshold(window: int) -> int:
    """Consumed messages that make a subscriber send credit back at once: a quarter
    of the window. Batches are half a window (Link.batch_cap), so credit for the
    first half of a batch is on its way while the publisher sends the next one."""
    return max(1, window // 4)


def _ride_least(threshold: int) -> int:
    """Owed credit that rides in front of a frame going to its publisher anyway: an
    eighth of the threshold at least (one message's for windows up to 31)."""
    return max(1, threshold // 8)


def owed_credit(node: Any, peer_id: str) -> list | None:
    """Dispatcher._owed_credit (both builds run this; here it is compiled): credit
    ``node`` owes ``peer_id`` and holds back, taken now to ride on a frame going
    there anyway. Link lock held."""
    entries = None
    now = 0.0
    for (sub, publisher), grant in list(node._dirty_grants.items()):
        # Only credit worth a frame rides (an eighth of the threshold): a ping-pong
        # would otherwise carry one message's credit on every message, decoded and
        # applied each time. What stays owed is flushed by the I/O thread's timer.
        if publisher != peer_id or grant._pending < _ride_least(grant.threshold):
            continue
        if not now:
            now = time.monotonic()
        flow = sub._flow
        flow.acquire()
        try:
            update = grant.take_update(now, force=True)
        finally:
            flow.release()
        if update is not None:
            if entries is None:
                entries = []
            entries.append([sub.sid, update[0], update[1]])
    return entries

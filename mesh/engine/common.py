"""Small definitions the engine modules share (no state)."""

from __future__ import annotations

import logging
from typing import Any

import zmq

from mesh import wire

log = logging.getLogger("mesh")

# Payloads at least this large are handed to the application as a view on the
# received frame instead of a bytes copy (pyzmq's own zero-copy threshold).
ZERO_COPY_BYTES = zmq.COPY_THRESHOLD

class _BatchedFrame:
    """Bytes shaped like the zmq.Frame the handling code reads: a payload unpacked
    from a batch or an RDMA arrival, or a frame zcore.drain read (loop.py)."""

    __slots__ = ("bytes",)
    more = False

    def __init__(self, data: bytes) -> None:
        self.bytes = data

    @property
    def buffer(self) -> memoryview:
        return memoryview(self.bytes)

    def __len__(self) -> int:
        return len(self.bytes)

    def __bytes__(self) -> bytes:
        return self.bytes


_STOP = object()

_WAKE_ID = b"\x00wake"  # never a node id: those are hex

_CTL_SUFFIX = b"/c"  # identity of a peer's control DEALER: "<id>/c"

_LIVE = ("alive", "suspect")  # members we route to

# Messages a drop_oldest window holds back while waiting for credit.
_DROP_OLDEST_BACKLOG = 1024

# Subscriptions of the mesh itself (group rendezvous, notices): many credits, never block.
_INTERNAL_FLOW = {"credits": 65536, "credit_bytes": None, "overflow": "drop_new"}


def _peer_id_of(ident: bytes) -> str:
    """Node id behind a ROUTER identity ("<id>", "<id>/c", "<id>/seed/N")."""
    return ident.split(b"/", 1)[0].decode("ascii", "replace")

def _nbytes(frame: Any) -> int:
    return frame.nbytes if type(frame) is memoryview else len(frame)


def _header_kind(frame: Any) -> int | None:
    """The kind of a header frame without decoding it (wire.pack: fixarray, version,
    kind as a positive fixint; or wire.pack_msg_lone's fixed layout); None when it
    does not look like one."""
    b = frame.bytes
    if len(b) >= 3 and (b[0] & 0xF0 == 0x90 or b[0] == wire.FIXED) and (
            b[1] == wire.PROTOCOL_VERSION and b[2] < 0x80):
        return b[2]
    return None


# The I/O thread looks again this much later at a batch it could not send (the
# peer's queue was full) or whose link a publisher held (seconds).
_QUEUE_FULL_RETRY = 0.005

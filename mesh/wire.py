"""The wire format: one msgpack header frame, then payload frames.

Every header is a msgpack array whose first two items are the protocol version
and the message kind. Data messages (MSG, REPLY) use fixed positions so that
the hot path packs and unpacks a short list; control messages carry a dict.

    MSG    [V, MSG, subject, seq, ts, flags, headers|nil, req_id|nil, sids]
           sids: the receiver's subscriptions this message is for (each chosen
           by the publisher's routing table, each within its credit)
           frames: header, payload            (flags & TENSOR == 0)
                   header, descriptor, data   (flags & TENSOR: schemas/tensor.fbs)
           A lone plain message (no headers, one subscription, no array, not in
           a batch) has a fixed-layout header instead, decoded with struct:
           0xC1 (a byte msgpack never uses), V, MSG, flags=0 (uint8 each),
           seq (int64), ts (float64), sid (int64), req_id (int64; -1: none),
           then the subject in UTF-8 (little-endian throughout)
           A small lone message (payload up to ONE_FRAME_MAX bytes) is one frame:
           0xC1, V, MSG, layout=ONE (uint8 each), seq, ts, sid, req_id as above,
           subject length (uint16), the subject, then the payload
    REPLY  [V, REPLY, req_id, flags, headers|nil]   + payload frames as MSG
           A small plain reply (no headers, no array) is one frame:
           0xC1, V, REPLY, layout=ONE (uint8 each), req_id (int64), the payload
    other  [V, KIND, body]                          body is a kind-specific value

A peer with another major version is refused, never misread.
"""

from __future__ import annotations

import struct
import threading
from typing import Any

import msgpack

from mesh.errors import ProtocolError

# 2: the fixed-layout header of lone messages; 3: small messages and replies in one frame
PROTOCOL_VERSION = 3

# Message kinds
HELLO = 1  # body: node info dict (+ "ack": bool)
PEERS = 2  # body: list of peer summaries (gossip of who is in the mesh)
INTEREST = 3  # body: [version, adds, removes]  each a list of [pattern, queue]
INTEREST_FULL = 4  # body: [version, entries]
SYNC = 5  # body: None: "send me your full interest"
MSG = 6
REPLY = 7
PING = 8  # body: [t_sent]
PONG = 9  # body: [t_sent echoed]
BYE = 10  # body: None
STATUS_REQ = 11  # body: token (any); sent by mesh-status from an unknown identity
STATUS = 12  # body: [token, status dict]
P2P = 13  # body: [channel, tag, flags, meta]  + payload frames as MSG (mesh/channels.py)
SWIM = 14  # body: a membership message (mesh/membership.py)
CREDIT = 15  # body: [[sid, msgs, bytes], ...] credit returned for consumed messages;
#   alone, or + the frames of a MSG, BATCH or REPLY it rides in front of
BATCH = 16  # body: message count; one frame of small messages (mesh/flow.py encode_batch)
SHM_OK = 17  # body: None; "I can map your shared memory: send me arrays through it"
SHM_RELEASE = 18  # body: released (slot, generation) pairs (transports/shm.py)
RDMA_OFFER = 19  # body: the offerer's RdmaConnection.local_info() (the lower node id offers)
RDMA_ACCEPT = 20  # body: the accepter's local_info(), or None: "no rdma between us"
# (RDMA_OFFER with body None, from the offerer: "my half failed to connect: drop yours")
# On the data pipe of a link that sends arrays by RDMA (order across the two paths,
# transports/rdma_core.py SendOrder/ReceiveOrder):
RDMA_SYNC = 21  # body: [epoch, ordinal, rdma_count]; alone, or + the frames of a data message
RDMA_RESENT = 22  # body: [epoch, index, k] + the frames of a message first sent by RDMA
BYE_ACK = 23  # body: None; "I heard your goodbye" (a closing node waits briefly for it)

KIND_NAMES = {
    HELLO: "hello",
    PEERS: "peers",
    INTEREST: "interest",
    INTEREST_FULL: "interest_full",
    SYNC: "sync",
    MSG: "msg",
    REPLY: "reply",
    PING: "ping",
    PONG: "pong",
    BYE: "bye",
    STATUS_REQ: "status_req",
    STATUS: "status",
    P2P: "p2p",
    SWIM: "swim",
    CREDIT: "credit",
    BATCH: "batch",
    SHM_OK: "shm_ok",
    SHM_RELEASE: "shm_release",
    RDMA_OFFER: "rdma_offer",
    RDMA_ACCEPT: "rdma_accept",
    RDMA_SYNC: "rdma_sync",
    RDMA_RESENT: "rdma_resent",
    BYE_ACK: "bye_ack",
}

# MSG / REPLY / P2P flags
TENSOR = 1
SHM = 2  # with TENSOR: the data frame is a transports.shm descriptor, the bytes are in shared memory

# Headers are small; anything larger is hostile or a bug.
MAX_HEADER_BYTES = 1 << 20

_packer = msgpack.Packer(use_bin_type=True)
_pack = msgpack.packb


def pack(kind: int, body: Any) -> bytes:
    return _pack([PROTOCOL_VERSION, kind, body], use_bin_type=True)


_packers = threading.local()


def pack_msg(
    subject: str,
    seq: int,
    ts: float,
    flags: int,
    headers: dict | None,
    req_id: int | None,
    sids: list[int],
) -> bytes:
    try:
        packer = _packers.packer
    except AttributeError:
        # One Packer per thread: packb() builds a new one per call, twice the cost.
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack([PROTOCOL_VERSION, MSG, subject, seq, ts, flags, headers, req_id, sids])


# The fixed-layout header of a lone plain message (see the module docstring).
FIXED = 0xC1
_FIXED = struct.Struct("<BBBBqdqq")
FIXED_SIZE = _FIXED.size
_fixed_pack = _FIXED.pack
_fixed_unpack = _FIXED.unpack_from


def pack_msg_lone(subject: str, seq: int, ts: float, req_id: int | None, sid: int) -> bytes:
    """The header of a lone plain message (flags 0, no headers, one subscription):
    fixed layout, cheaper to build and to read than msgpack."""
    try:
        return _fixed_pack(
            FIXED, PROTOCOL_VERSION, MSG, 0, seq, ts, sid, -1 if req_id is None else req_id
        ) + subject.encode()
    except struct.error:  # a number beyond 64 bits: msgpack says it as it is
        return pack_msg(subject, seq, ts, 0, None, req_id, [sid])


def unpack_msg_lone(frame: bytes) -> tuple[str, int, float, int, None, int | None, list]:
    """Decode a fixed-layout header (its first byte is FIXED) into the fields
    check_msg returns; ProtocolError for anything malformed."""
    if len(frame) < FIXED_SIZE:
        raise ProtocolError("fixed-layout header is too short", "malformed")
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}", "oversize")
    _, version, kind, flags, seq, ts, sid, req_id = _fixed_unpack(frame)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version!r}, this node speaks {PROTOCOL_VERSION}; "
            "upgrade the older side",
            "version",
        )
    if kind != MSG or flags != 0 or req_id < -1:
        raise ProtocolError("fixed-layout header of something but a lone plain message", "malformed")
    try:
        subject = frame[FIXED_SIZE:].decode()
    except UnicodeDecodeError:
        raise ProtocolError("subject is not UTF-8", "malformed") from None
    return subject, seq, ts, 0, None, None if req_id == -1 else req_id, [sid]


# One frame for a small lone message or plain reply (see the module docstring): the
# sender makes one zmq send and the receiver one recv after the identity, not two.
# Each zmq call lets go of the GIL, and a thread waiting for it (the one a message
# was handed to) takes it there: fewer calls, fewer thread switches per message.
# Larger payloads keep their own frame (no copy into the header's).
ONE_FRAME_MAX = 4096
ONE = 1  # the layout byte of a one-frame message (the 4th of the fixed layout)
_ONE = struct.Struct("<BBBBqdqqH")
ONE_SIZE = _ONE.size
_one_pack = _ONE.pack
_one_unpack = _ONE.unpack_from
_REPLY_ONE = struct.Struct("<BBBBq")
REPLY_ONE_SIZE = _REPLY_ONE.size
_reply_one_pack = _REPLY_ONE.pack
_reply_one_unpack = _REPLY_ONE.unpack_from


def lone_frames(subject: str, seq: int, ts: float, req_id: int | None, sid: int,
                payload: list) -> list:
    """The frames of a lone plain message (flags 0, no headers, one subscription,
    ``payload`` one bytes-like frame): one frame when the payload is small, else the
    fixed-layout header and the payload."""
    data = payload[0]
    if len(payload) == 1 and _size(data) <= ONE_FRAME_MAX:
        encoded = subject.encode()
        try:
            return [_one_pack(FIXED, PROTOCOL_VERSION, MSG, ONE, seq, ts, sid,
                              -1 if req_id is None else req_id, len(encoded))
                    + encoded + data]
        except struct.error:  # beyond 64 bits, or a subject over 64 KiB: as below
            pass
    return [pack_msg_lone(subject, seq, ts, req_id, sid), *payload]


def reply_frames(req_id: int, flags: int, headers: dict | None, payload: list) -> list:
    """The frames of a reply: one frame for a small plain one."""
    if not flags and headers is None and len(payload) == 1 and \
            _size(payload[0]) <= ONE_FRAME_MAX and 0 <= req_id < 1 << 63:
        return [_reply_one_pack(FIXED, PROTOCOL_VERSION, REPLY, ONE, req_id) + payload[0]]
    return [pack_reply(req_id, flags, headers), *payload]


def _size(data: Any) -> int:
    return data.nbytes if type(data) is memoryview else len(data)


def unpack_one(frame: bytes) -> tuple[int, Any, bytes]:
    """Decode a one-frame message (its first byte is FIXED, it came alone): (MSG,
    the fields check_msg returns, payload) or (REPLY, req_id, payload);
    ProtocolError for anything malformed."""
    size = len(frame)
    if size < REPLY_ONE_SIZE:
        raise ProtocolError("one-frame message is too short", "malformed")
    version = frame[1]
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version!r}, this node speaks {PROTOCOL_VERSION}; "
            "upgrade the older side",
            "version",
        )
    kind = frame[2]
    if frame[3] != ONE:
        raise ProtocolError("a fixed-layout header without its payload frame", "malformed")
    if kind == MSG:
        if size < ONE_SIZE:
            raise ProtocolError("one-frame message is too short", "malformed")
        _, _, _, _, seq, ts, sid, req_id, length = _one_unpack(frame)
        end = ONE_SIZE + length
        if size < end or req_id < -1:
            raise ProtocolError("one-frame message with a wrong subject length or request id",
                                "malformed")
        try:
            subject = frame[ONE_SIZE:end].decode()
        except UnicodeDecodeError:
            raise ProtocolError("subject is not UTF-8", "malformed") from None
        return MSG, (subject, seq, ts, 0, None, None if req_id == -1 else req_id, [sid]), \
            frame[end:]
    if kind == REPLY:
        req_id = _reply_one_unpack(frame)[4]
        if req_id < 0:
            raise ProtocolError("one-frame reply with a negative request id", "malformed")
        return REPLY, req_id, frame[REPLY_ONE_SIZE:]
    raise ProtocolError("one-frame message of something but a message or a reply", "malformed")


def pack_reply(req_id: int, flags: int, headers: dict | None) -> bytes:
    return _pack([PROTOCOL_VERSION, REPLY, req_id, flags, headers], use_bin_type=True)


def unpack(frame: bytes | memoryview) -> list:
    """Decode a header frame; raise ProtocolError for anything but a well-formed header."""
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}", "oversize")
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable header: {exc}", "malformed") from None
    if type(header) is not list or len(header) < 3:
        raise ProtocolError("header is not a [version, kind, ...] array", "malformed")
    version, kind = header[0], header[1]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version!r}, this node speaks {PROTOCOL_VERSION}; "
            "upgrade the older side",
            "version",
        )
    if type(kind) is not int or kind not in KIND_NAMES:
        raise ProtocolError(f"unknown message kind {kind!r}", "unknown_kind")
    return header


def check_msg(header: list) -> tuple[str, int, float, int, dict | None, int | None, list]:
    """Validate the fields of a MSG header (types only: subjects are checked by routing)."""
    if len(header) != 9:
        raise ProtocolError("MSG header has the wrong length", "malformed")
    _, _, subject, seq, ts, flags, headers, req_id, sids = header
    if (
        type(subject) is not str
        or type(seq) is not int
        or type(ts) not in (float, int)
        or type(flags) is not int
        or (headers is not None and type(headers) is not dict)
        or (req_id is not None and type(req_id) is not int)
        or type(sids) is not list
        or not all(type(sid) is int for sid in sids)
    ):
        raise ProtocolError("MSG header has fields of the wrong type", "malformed")
    return subject, seq, ts, flags, headers, req_id, sids


def check_reply(header: list) -> tuple[int, int, dict | None]:
    if len(header) != 5:
        raise ProtocolError("REPLY header has the wrong length", "malformed")
    _, _, req_id, flags, headers = header
    if type(req_id) is not int or type(flags) is not int or (
        headers is not None and type(headers) is not dict
    ):
        raise ProtocolError("REPLY header has fields of the wrong type", "malformed")
    return req_id, flags, headers


_OVERFLOWS = ("block", "drop_new", "drop_oldest")


def check_interest_entries(entries: Any) -> list[tuple]:
    """Interest entries: [pattern, queue, sid, credits, credit_bytes, overflow] each."""
    if type(entries) is not list:
        raise ProtocolError("interest entries are not a list", "malformed")
    out = []
    for entry in entries:
        if (
            type(entry) is not list
            or len(entry) != 6
            or type(entry[0]) is not str
            or type(entry[1]) is not str
            or type(entry[2]) is not int
            or type(entry[3]) is not int
            or type(entry[4]) is not int
            or entry[3] < 1
            or entry[4] < 0
            or entry[5] not in _OVERFLOWS
        ):
            raise ProtocolError(
                "interest entry is not [pattern, queue, sid, credits, credit_bytes, overflow]",
                "malformed",
            )
        out.append(tuple(entry))
    return out


def check_credit(body: Any) -> list[tuple[int, int, int]]:
    if type(body) is not list:
        raise ProtocolError("credit body is not a list", "malformed")
    out = []
    for item in body:
        if (
            type(item) is not list
            or len(item) != 3
            or not all(type(v) is int and v >= 0 for v in item)
        ):
            raise ProtocolError("credit entry is not [sid, msgs, bytes]", "malformed")
        out.append((item[0], item[1], item[2]))
    return out


_TAG_ATOMS = (int, str, float, bytes)


def check_p2p(body: Any) -> tuple[str, Any, int, Any]:
    """Validate a P2P body; tags arrive as msgpack arrays and become tuples."""
    if type(body) is not list or len(body) != 4:
        raise ProtocolError("P2P body is not [channel, tag, flags, meta]", "malformed")
    channel, tag, flags, meta = body
    if type(channel) is not str or type(flags) is not int:
        raise ProtocolError("P2P body has fields of the wrong type", "malformed")
    if type(tag) is list:
        if not all(type(t) in _TAG_ATOMS for t in tag):
            raise ProtocolError("P2P tag must be a flat tuple of scalars", "malformed")
        tag = tuple(tag)
    elif type(tag) not in _TAG_ATOMS:
        raise ProtocolError("P2P tag must be a scalar or a flat tuple", "malformed")
    return channel, tag, flags, meta

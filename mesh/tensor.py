"""Zero-copy numpy arrays on the wire.

A message carrying an array travels as the frames ``[header, descriptor, data]``:

* ``descriptor`` is a FlatBuffers ``mesh.fb.Tensor`` table (``schemas/tensor.fbs``,
  file identifier ``MTEN``) saying how to read the data: dtype, shape, byte count
  and optional step / chunk offset / total / sender. FlatBuffers, so a peer in
  another language can read gradient traffic.
* ``data`` is the array's raw C-order bytes, sent with ``copy=False`` and viewed
  on arrival with :func:`numpy.frombuffer`, so neither side copies the payload.

Everything here is pure (no sockets). Descriptors from the network are untrusted:
:func:`decode_descriptor` checks every offset before reading it (the FlatBuffers
Python runtime does no verification) and :func:`array_from_frames` never
allocates from a declared shape, only views the bytes that actually arrived.
"""

from __future__ import annotations

import math
import operator
import re
import struct
from dataclasses import dataclass
from typing import Any

import flatbuffers
import numpy as np

from mesh.errors import ConfigError, ProtocolError
from mesh.fb import Tensor as _fb

__all__ = [
    "FILE_IDENTIFIER",
    "MAX_NDIM",
    "TensorDesc",
    "array_from_frames",
    "array_to_frames",
    "decode_descriptor",
    "encode_descriptor",
]

FILE_IDENTIFIER = b"MTEN"
# numpy itself allows 64 dims; nothing real needs more than 32 and a cap keeps a
# hostile descriptor from making us build huge shape tuples.
MAX_NDIM = 32
# Descriptors are ~100 bytes; anything this big is garbage or an attack.
MAX_DESCRIPTOR_BYTES = 64 * 1024

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_UINT64_MAX = 2**64 - 1
_INTP_MAX = int(np.iinfo(np.intp).max)

# dtype kinds whose bytes mean the same thing on any host: bool, ints, floats,
# complex, timedelta/datetime, bytes, unicode, plain void. Object ("O") and
# numpy 2 StringDType ("T") hold pointers, so their bytes are meaningless (and
# dangerous) elsewhere; structured/subarray voids are refused separately.
_WIRE_KINDS = frozenset("biufcmMSUV")
# Shape of numpy's canonical dtype.str ("<f4", "|b1", "<M8[ns]", "|V16"). Checked
# before np.dtype() sees the string, so odd aliases never reach numpy's parser.
_DTYPE_RE = re.compile(r"[<>|][biufcmMSUV][0-9]{1,10}(?:\[[0-9]{0,10}[A-Za-z]{1,3}\])?")

# vtable slots of mesh.fb.Tensor, in schema declaration order (slot i -> 4 + 2*i,
# the same numbers as the Offset(...) calls in the generated Tensor.py).
_VT_DTYPE, _VT_SHAPE, _VT_NBYTES, _VT_STEP, _VT_OFFSET, _VT_TOTAL, _VT_SENDER = range(4, 18, 2)

_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from
_I32 = struct.Struct("<i").unpack_from
_I64 = struct.Struct("<q").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_PACK_I64 = struct.Struct("<q").pack_into
_PACK_U64 = struct.Struct("<Q").pack_into


@dataclass(frozen=True, slots=True)
class TensorDesc:
    """A decoded ``mesh.fb.Tensor`` descriptor. Immutable, so decodes can be shared."""

    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int
    step: int = 0
    offset: int = 0
    total: int = 0
    sender: str = ""


# --------------------------------------------------------------------------- caches
# Bounded FIFO caches. Plain dicts: get/set are atomic under the GIL, and eviction
# tolerates a concurrent writer instead of taking a lock on the hot path.
_CACHE_MAX = 1024
# Only small descriptors are cached so a flood of unique, padded descriptors
# cannot pin much memory (1024 * 512 bytes at most).
_DECODE_KEY_MAX = 512

# (dtype.str, shape) -> descriptor bytes, for step/offset/total/sender all default.
_encode_cache: dict[tuple[str, tuple[int, ...]], bytes] = {}
# (dtype.str, shape, sender) -> (template bytes, step pos, offset pos, total pos).
# Gradient traffic sets step on every message, so the descriptor is built once
# with those scalars forced present and then patched in place.
_template_cache: dict[tuple[str, tuple[int, ...], str], tuple[bytes, int, int, int]] = {}
# descriptor bytes -> TensorDesc, only for descriptors with step/offset/total 0
# (a per-step descriptor never repeats and would just evict useful entries).
_decode_cache: dict[bytes, TensorDesc] = {}


def _cache_put(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= _CACHE_MAX:
        try:
            del cache[next(iter(cache))]
        except (KeyError, RuntimeError, StopIteration):
            pass  # another thread evicted first; the bound is approximate
    cache[key] = value


def _clear_caches() -> None:
    """Empty every cache (tests and benchmarks)."""
    _encode_cache.clear()
    _template_cache.clear()
    _decode_cache.clear()


# --------------------------------------------------------------------------- encode
def _check_dtype(dt: np.dtype) -> None:
    if (
        dt.kind not in _WIRE_KINDS
        or dt.hasobject
        or dt.fields is not None
        or dt.subdtype is not None
        or dt.itemsize == 0
    ):
        raise ConfigError(
            f"dtype {dt!r} cannot travel as a tensor: only plain bool/int/uint/float/"
            "complex/datetime/timedelta/bytes/str/void dtypes with a fixed, non-zero "
            "itemsize are zero-copy safe; convert the array (e.g. .astype) or pickle it"
        )


def _check_shape(dt: np.dtype, shape: tuple[int, ...], sender: str) -> tuple[tuple[int, ...], int]:
    """Validate what a cached descriptor/template is keyed on; return (shape, nbytes)."""
    _check_dtype(dt)
    try:
        shape = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise ConfigError(f"shape {shape!r} must hold integers") from None
    if len(shape) > MAX_NDIM:
        raise ConfigError(f"tensor has {len(shape)} dimensions; at most {MAX_NDIM} are allowed")
    if any(d < 0 for d in shape):
        raise ConfigError(f"shape {shape} has a negative dimension")
    nbytes = math.prod(shape) * dt.itemsize
    if nbytes > _UINT64_MAX:
        raise ConfigError(f"shape {shape} of {dt.str} is larger than 2**64 bytes")
    if not isinstance(sender, str):
        raise ConfigError(f"sender must be a str, not {type(sender).__name__}")
    return shape, nbytes


def _check_scalars(
    shape: tuple[int, ...], step: int, offset: int, total: int
) -> tuple[int, int, int]:
    """Validate the per-message scalars (checked on every call, cached or not)."""
    try:
        step, offset, total = operator.index(step), operator.index(offset), operator.index(total)
    except TypeError:
        raise ConfigError("step, offset and total must be integers") from None
    if not _INT64_MIN <= step <= _INT64_MAX:
        raise ConfigError(f"step {step} does not fit in a signed 64-bit integer")
    if not (0 <= offset <= _UINT64_MAX and 0 <= total <= _UINT64_MAX):
        raise ConfigError("offset and total must be in [0, 2**64)")
    if total == 0:
        if offset:
            raise ConfigError("offset is set but total is 0 (meaning 'this chunk is everything')")
    elif offset + math.prod(shape) > total:
        raise ConfigError(f"chunk at offset {offset} of shape {shape} lies outside total {total}")
    return step, offset, total


def _build(
    dtype_str: str,
    shape: tuple[int, ...],
    nbytes: int,
    step: int,
    offset: int,
    total: int,
    sender: str,
    force_scalars: bool = False,
) -> bytes:
    """Build a descriptor with the flatc-generated builder functions."""
    b = flatbuffers.Builder(128)
    dtype_off = b.CreateString(dtype_str)
    sender_off = b.CreateString(sender) if sender else 0
    _fb.TensorStartShapeVector(b, len(shape))
    for d in reversed(shape):  # FlatBuffers builds back to front
        b.PrependInt64(d)
    shape_off = b.EndVector()
    _fb.TensorStart(b)
    _fb.TensorAddDtype(b, dtype_off)
    _fb.TensorAddShape(b, shape_off)
    _fb.TensorAddNbytes(b, nbytes)
    if force_scalars:
        # Templates need the slots present even when 0 so they can be patched.
        b.ForceDefaults(True)
    _fb.TensorAddStep(b, step)
    _fb.TensorAddOffset(b, offset)
    _fb.TensorAddTotal(b, total)
    b.ForceDefaults(False)
    if sender_off:
        _fb.TensorAddSender(b, sender_off)
    b.Finish(_fb.TensorEnd(b), file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def encode_descriptor(
    dtype: np.dtype | str | type,
    shape: tuple[int, ...],
    *,
    step: int = 0,
    offset: int = 0,
    total: int = 0,
    sender: str = "",
) -> bytes:
    """Return the ``mesh.fb.Tensor`` descriptor for an array of ``dtype`` and ``shape``.

    ``nbytes`` is computed (``prod(shape) * itemsize``). ``offset``/``total`` are in
    elements and describe a chunk of a larger tensor; ``total=0`` means this is the
    whole tensor. Raises :class:`~mesh.errors.ConfigError` for dtypes that cannot
    travel zero-copy (object, structured, StringDType, zero itemsize) or bad values.
    """
    if isinstance(dtype, np.dtype):
        dt = dtype
    else:
        try:
            dt = np.dtype(dtype)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"not a numpy dtype: {dtype!r} ({e})") from None
    if type(shape) is not tuple:
        shape = tuple(shape)
    try:
        hash(shape)
    except TypeError:
        raise ConfigError(f"shape {shape!r} must hold integers") from None
    # Void dtypes are never cached: a structured dtype has the same .str ("|V8")
    # as a plain void one and must not hit the plain one's entry.
    cacheable = dt.kind != "V"
    if not (step or offset or total or sender):
        key = (dt.str, shape)
        if cacheable:
            cached = _encode_cache.get(key)
            if cached is not None:
                return cached
        shape_ok, nbytes = _check_shape(dt, shape, "")
        out = _build(dt.str, shape_ok, nbytes, 0, 0, 0, "")
        if cacheable:
            _cache_put(_encode_cache, key, out)
        return out

    if not isinstance(sender, str):
        raise ConfigError(f"sender must be a str, not {type(sender).__name__}")
    tkey = (dt.str, shape, sender)
    tmpl = _template_cache.get(tkey) if cacheable else None
    if tmpl is None:
        shape_ok, nbytes = _check_shape(dt, shape, sender)
        raw = _build(dt.str, shape_ok, nbytes, 0, 0, 0, sender, force_scalars=True)
        root = _U32(raw, 0)[0]
        vt = root - _I32(raw, root)[0]
        tmpl = (
            raw,
            root + _U16(raw, vt + _VT_STEP)[0],
            root + _U16(raw, vt + _VT_OFFSET)[0],
            root + _U16(raw, vt + _VT_TOTAL)[0],
        )
        if cacheable:
            _cache_put(_template_cache, tkey, tmpl)
    step, offset, total = _check_scalars(shape, step, offset, total)
    raw, p_step, p_offset, p_total = tmpl
    buf = bytearray(raw)
    _PACK_I64(buf, p_step, step)
    _PACK_U64(buf, p_offset, offset)
    _PACK_U64(buf, p_total, total)
    return bytes(buf)


# --------------------------------------------------------------------------- decode
def _malformed(what: str) -> ProtocolError:
    return ProtocolError(
        f"malformed tensor descriptor: {what}; the sender is buggy or not speaking "
        "mesh.fb.Tensor (schemas/tensor.fbs) - the message was dropped",
        reason="malformed",
    )


def _parse(buf: bytes) -> TensorDesc:
    """Verify and read a descriptor. Every offset is bounds-checked before use:
    the FlatBuffers Python runtime trusts its input, and struct happily reads
    from the end of the buffer on a negative offset."""
    n = len(buf)
    if n < 8 or n > MAX_DESCRIPTOR_BYTES:
        raise _malformed(f"{n} bytes")
    if buf[4:8] != FILE_IDENTIFIER:
        raise _malformed(f"file identifier {bytes(buf[4:8])!r}, expected {FILE_IDENTIFIER!r}")
    root = _U32(buf, 0)[0]
    if root + 4 > n:
        raise _malformed("root offset out of bounds")
    vt = root - _I32(buf, root)[0]
    if vt < 0 or vt + 4 > n:
        raise _malformed("vtable out of bounds")
    vt_len, tbl_len = _U16(buf, vt)[0], _U16(buf, vt + 2)[0]
    if vt_len < 4 or vt_len & 1 or vt + vt_len > n or tbl_len < 4 or root + tbl_len > n:
        raise _malformed("bad vtable")

    def field(slot: int, size: int) -> int:
        """Absolute position of a field, or 0 when absent (default)."""
        if slot + 2 > vt_len:
            return 0
        fo = _U16(buf, vt + slot)[0]
        if fo == 0:
            return 0
        if fo < 4 or fo + size > tbl_len:
            raise _malformed("field out of its table")
        return root + fo

    def vector(slot: int, elem: int) -> tuple[int, int] | None:
        """(start, length) of a string/vector field, or None when absent."""
        pos = field(slot, 4)
        if not pos:
            return None
        start = pos + _U32(buf, pos)[0]
        if start + 4 > n:
            raise _malformed("vector out of bounds")
        length = _U32(buf, start)[0]
        start += 4
        if start + length * elem > n:
            raise _malformed("vector runs past the end")
        return start, length

    def string(slot: int) -> str | None:
        v = vector(slot, 1)
        if v is None:
            return None
        start, length = v
        if start + length >= n or buf[start + length] != 0:
            raise _malformed("string not NUL-terminated")
        try:
            return buf[start : start + length].decode("utf-8")
        except UnicodeDecodeError:
            raise _malformed("string is not UTF-8") from None

    def scalar(slot: int, unpack: Any) -> int:
        pos = field(slot, 8)
        return unpack(buf, pos)[0] if pos else 0

    dtype_str = string(_VT_DTYPE)
    if dtype_str is None:
        raise _malformed("dtype missing")
    if not _DTYPE_RE.fullmatch(dtype_str):
        raise _malformed(f"dtype {dtype_str[:40]!r} is not a canonical numpy dtype.str")
    try:
        dt = np.dtype(dtype_str)
    except (TypeError, ValueError, OverflowError, MemoryError):
        raise _malformed(f"numpy rejects dtype {dtype_str!r}") from None
    # Canonical form only: byte order must be explicit and unambiguous.
    if dt.str != dtype_str:
        raise _malformed(f"dtype {dtype_str!r} is not canonical (numpy writes {dt.str!r})")
    try:
        _check_dtype(dt)
    except ConfigError:
        raise _malformed(f"dtype {dtype_str!r} cannot travel zero-copy") from None

    sv = vector(_VT_SHAPE, 8)
    if sv is None:
        shape: tuple[int, ...] = ()  # absent vector reads as empty: a 0-d array
    else:
        start, ndim = sv
        if ndim > MAX_NDIM:
            raise _malformed(f"{ndim} dimensions (max {MAX_NDIM})")
        shape = struct.unpack_from(f"<{ndim}q", buf, start)
        if any(d < 0 for d in shape):
            raise _malformed(f"negative dimension in {shape}")

    nbytes = scalar(_VT_NBYTES, _U64)
    step = scalar(_VT_STEP, _I64)
    offset = scalar(_VT_OFFSET, _U64)
    total = scalar(_VT_TOTAL, _U64)
    if total == 0:
        if offset:
            raise _malformed("offset set but total is 0")
    elif offset + math.prod(shape) > total:
        raise _malformed(f"chunk at offset {offset} of shape {shape} exceeds total {total}")
    sender = string(_VT_SENDER) or ""
    return TensorDesc(dt, shape, nbytes, step, offset, total, sender)


def decode_descriptor(buf: bytes | bytearray | memoryview) -> TensorDesc:
    """Decode and verify a descriptor frame.

    Raises :class:`~mesh.errors.ProtocolError` (``reason="malformed"``) on any bad
    input: truncation, garbage, wrong file identifier, non-canonical or refused
    dtype (object, structured, StringDType), negative dims, more than 32 dims.
    Does not check sizes against a data frame; :func:`array_from_frames` does.
    """
    if type(buf) is not bytes:
        try:
            mv = memoryview(buf)
        except TypeError:
            raise _malformed(f"{type(buf).__name__} is not a buffer") from None
        if mv.nbytes > MAX_DESCRIPTOR_BYTES:  # check before copying it
            raise _malformed(f"{mv.nbytes} bytes")
        buf = mv.tobytes()  # small; bytes keys the cache
    desc = _decode_cache.get(buf)
    if desc is not None:
        return desc
    try:
        desc = _parse(buf)
    except ProtocolError:
        raise
    except (struct.error, ValueError, TypeError, IndexError, OverflowError) as e:
        # Belt and braces: _parse checks bounds itself, this only catches a gap.
        raise _malformed(f"{type(e).__name__}: {e}") from None
    if not (desc.step or desc.offset or desc.total) and len(buf) <= _DECODE_KEY_MAX:
        _cache_put(_decode_cache, buf, desc)
    return desc


# --------------------------------------------------------------------------- arrays
def array_to_frames(
    arr: np.ndarray,
    *,
    step: int = 0,
    offset: int = 0,
    total: int = 0,
    sender: str = "",
) -> tuple[bytes, memoryview]:
    """Return ``(descriptor, data)`` for ``arr``; send ``data`` with ``copy=False``.

    A numpy scalar is sent as a 0-d array. ``data`` is a flat byte memoryview over the array's own memory, so the array
    must not be modified until zmq has sent it. A non-C-contiguous array (slice,
    transpose, Fortran order) is first copied once with ``np.ascontiguousarray``
    since the wire format is C-order bytes. 0-d and empty arrays work.
    """
    if isinstance(arr, np.generic):
        arr = np.asarray(arr)  # numpy scalar -> 0-d array
    if not isinstance(arr, np.ndarray):
        raise ConfigError(f"expected a numpy.ndarray, got {type(arr).__name__}")
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    desc = encode_descriptor(
        arr.dtype, arr.shape, step=step, offset=offset, total=total, sender=sender
    )
    # reshape(-1) of a C-contiguous array is a view; viewing as uint8 gives a
    # 1-d 'B' buffer for every dtype (memoryview(arr) itself fails for
    # datetime, and 0-d arrays cannot change itemsize without the reshape).
    data = memoryview(arr.reshape(-1).view(np.uint8))
    return desc, data


def array_from_frames(
    desc_buf: bytes | bytearray | memoryview | TensorDesc, data_buf: Any
) -> np.ndarray:
    """View ``data_buf`` as the array described by ``desc_buf`` without copying.

    ``data_buf`` is anything exposing a contiguous buffer (bytes, memoryview,
    zmq.Frame). The result shares its memory and is read-only if it is. Raises
    :class:`~mesh.errors.ProtocolError`: ``"malformed"`` for a bad descriptor,
    ``"size_mismatch"`` when the declared ``nbytes`` differs from the frame length
    or from ``prod(shape) * itemsize``. Sizes are checked against the bytes that
    arrived, so a huge declared shape can never cause an allocation.
    """
    desc = desc_buf if isinstance(desc_buf, TensorDesc) else decode_descriptor(desc_buf)
    try:
        mv = memoryview(data_buf)
    except TypeError:
        raise _malformed(f"data frame {type(data_buf).__name__} is not a buffer") from None
    if mv.nbytes != desc.nbytes:
        raise ProtocolError(
            f"tensor data frame is {mv.nbytes} bytes but the descriptor says {desc.nbytes}; "
            "message dropped",
            reason="size_mismatch",
        )
    count = math.prod(desc.shape)  # Python int: no overflow on hostile shapes
    if count * desc.dtype.itemsize != desc.nbytes:
        raise ProtocolError(
            f"tensor shape {desc.shape} of {desc.dtype.str} needs "
            f"{count * desc.dtype.itemsize} bytes but the descriptor says {desc.nbytes}; "
            "message dropped",
            reason="size_mismatch",
        )
    if count == 0 and math.prod(d for d in desc.shape if d) * desc.dtype.itemsize > _INTP_MAX:
        # An empty array whose other dims multiply past what numpy can index:
        # sizes "match" (0 == 0) but reshape would fail, so it is still a lie.
        raise ProtocolError(
            f"tensor shape {desc.shape} is too large for numpy; message dropped",
            reason="size_mismatch",
        )
    if not mv.c_contiguous:
        raise _malformed("data frame buffer is not contiguous")
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    return np.frombuffer(mv, dtype=desc.dtype, count=count).reshape(desc.shape)


# --------------------------------------------------------------------------- bench
if __name__ == "__main__":
    import timeit

    def _bench(label: str, fn: Any, number: int = 20000) -> None:
        best = min(timeit.repeat(fn, number=number, repeat=5))
        print(f"{label:<48} {best / number * 1e6:8.2f} us")

    f32 = np.dtype("<f4")
    shp = (1024, 1024)
    d_plain = encode_descriptor(f32, shp)
    d_step = encode_descriptor(f32, shp, step=12345, sender="node-a")
    arr = np.zeros(shp, f32)
    d0, data = array_to_frames(arr)

    _bench("encode_descriptor cached (defaults)", lambda: encode_descriptor(f32, shp))
    _bench(
        "encode_descriptor step+sender (template)",
        lambda: encode_descriptor(f32, shp, step=7, sender="node-a"),
    )
    _bench(
        "encode_descriptor uncached (flatbuffers build)",
        lambda: (_clear_caches(), encode_descriptor(f32, shp)),
        number=5000,
    )
    _bench("decode_descriptor cached (bytes)", lambda: decode_descriptor(d_plain))
    mv_plain = memoryview(d_plain)
    _bench("decode_descriptor cached (memoryview)", lambda: decode_descriptor(mv_plain))
    _bench("decode_descriptor uncached (defaults)", lambda: _parse(d_plain), number=5000)
    _bench(
        "decode_descriptor step+sender (never cached)",
        lambda: decode_descriptor(d_step),
        number=5000,
    )
    _bench("array_to_frames 4 MiB (cached descriptor)", lambda: array_to_frames(arr))
    _bench("array_from_frames 4 MiB (cached descriptor)", lambda: array_from_frames(d0, data))

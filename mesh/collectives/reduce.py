"""Reduction operators for the collectives: numpy ufuncs, in place, no Python loops.

The contract (API.md, "Collectives") is that a collective's result equals
numpy's reduction of the stacked inputs: :func:`reference_allreduce`. Numpy
widens some dtypes when it reduces, and the collectives follow it so the
result is exact for integers:

=========  ===========================  ===========================
op         result dtype                 accumulator (wire) dtype
=========  ===========================  ===========================
sum, prod  ints < 64 bit -> int64,      same as the result
           uints < 64 bit -> uint64,
           floats/complex unchanged
min, max   unchanged                    unchanged
mean       ints -> float64,             ints: float64 (as np.mean:
           floats/complex unchanged     a mean never wraps);
                                        float16: float32 (numpy also
                                        averages half in single);
                                        others unchanged
=========  ===========================  ===========================

So the I/O layer starts from :func:`accumulator` (a flat copy of the input in
the accumulator dtype), sends and reduces slices of that buffer with
:func:`reduce_into`, and calls ``finalize(op, buf, size, input.dtype)`` once
at the end. Integer sums and products wrap on overflow exactly as numpy's
do. ``mean`` of integers sums in float64 like ``np.mean``: exact while
partial sums stay below 2**53, beyond that within float rounding of numpy
(the summation order differs). So integer means travel as float64.

Refused (:class:`mesh.errors.ConfigError`): unknown ops; object, string,
bytes, structured/void, datetime and timedelta dtypes (view them as int64 if
that is what you mean); and bool with sum, mean or prod. Numpy would count
``True`` values into an int64 there, which is rarely what a boolean
allreduce means: cast to an integer dtype to count, or use ``op="max"``
(logical or) / ``op="min"`` (logical and), which bool supports.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import numpy as np
from numpy.typing import DTypeLike

from mesh.errors import ConfigError

Op = Literal["sum", "mean", "min", "max", "prod"]
OPS: tuple[Op, ...] = ("sum", "mean", "min", "max", "prod")

_UFUNCS: dict[str, np.ufunc] = {
    "sum": np.add,
    "mean": np.add,  # summed on the wire, divided by the group size in finalize()
    "min": np.minimum,
    "max": np.maximum,
    "prod": np.multiply,
}

# The numpy reduction each op must reproduce.
_NUMPY_REDUCTIONS = {"sum": np.sum, "mean": np.mean, "min": np.min, "max": np.max, "prod": np.prod}


def _check_op(op: object) -> str:
    if not isinstance(op, str) or op not in _UFUNCS:
        raise ConfigError(f"unknown reduction op {op!r}: use one of {', '.join(OPS)}")
    return str(op)


def ufunc_for(op: str) -> np.ufunc:
    """The binary ufunc that combines two partial results of ``op``."""
    return _UFUNCS[_check_op(op)]


def check_op_dtype(op: str, dtype: DTypeLike) -> np.dtype:
    """Validate ``op`` for arrays of ``dtype``; return the dtype as ``np.dtype``."""
    if isinstance(dtype, np.dtype) and type(op) is str:
        return _checked(op, dtype)  # every collective call asks: answer from a cache
    op = _check_op(op)
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise ConfigError(f"not a numpy dtype: {dtype!r} ({exc})") from None
    return _checked(op, dt)


@lru_cache(maxsize=512)
def _checked(op: str, dt: np.dtype) -> np.dtype:
    # Refusals raise, and lru_cache keeps only answers: a bad pair is checked each time.
    _check_op(op)
    kind = dt.kind
    if kind == "b":
        if op in ("sum", "mean", "prod"):
            raise ConfigError(
                f"op={op!r} on a bool array is ambiguous (numpy would count into int64): "
                "cast to an integer dtype to count, or use op='max' for logical or, "
                "op='min' for logical and"
            )
    elif kind in "Mm":
        raise ConfigError(
            f"collectives do not reduce {dt} arrays: view them as int64 "
            "(array.view('int64')) and convert back"
        )
    elif kind not in "iufc" or dt.fields is not None or dt.subdtype is not None:
        raise ConfigError(
            f"cannot reduce arrays of dtype {dt} (kind {kind!r}): collectives take "
            "numeric arrays (integer, unsigned, float, complex; bool for min/max)"
        )
    return dt


@lru_cache(maxsize=256)
def _result_dtype(op: str, dt: np.dtype) -> np.dtype:
    # Ask numpy itself, so we follow its promotion rules on every version.
    probe = np.ones((2, 1), dtype=dt)
    return np.dtype(_NUMPY_REDUCTIONS[op](probe, axis=0).dtype)


def result_dtype(op: str, dtype: DTypeLike) -> np.dtype:
    """The dtype :func:`reference_allreduce` (numpy) returns for ``op`` on ``dtype``."""
    dt = check_op_dtype(op, dtype)
    return _result_dtype(op, dt)


def accumulator_dtype(op: str, dtype: DTypeLike) -> np.dtype:
    """The dtype partial results are kept and sent in (see the module table)."""
    return _accumulator_dtype(op, check_op_dtype(op, dtype))


@lru_cache(maxsize=256)
def _accumulator_dtype(op: str, dt: np.dtype) -> np.dtype:
    if op != "mean":
        return _result_dtype(op, dt)
    if dt.kind in "iu":
        return np.dtype(np.float64)  # an integer sum could wrap; np.mean's never does
    if dt == np.float16:
        return np.dtype(np.float32)
    return dt


def accumulator(op: str, array: np.ndarray) -> np.ndarray:
    """A fresh, flat, C-contiguous copy of ``array`` in the accumulator dtype.

    Always a copy: the collective reduces into it, never into the caller's array.
    """
    acc = accumulator_dtype(op, np.asarray(array).dtype)
    return np.array(array, dtype=acc, order="C", copy=True).reshape(-1)


def reduce_into(op: str, out: np.ndarray, incoming: np.ndarray) -> None:
    """``out = out (op) incoming``, elementwise and in place (one ufunc call).

    ``incoming`` may be a read-only view of a received frame and may have a
    narrower dtype than ``out`` (numpy casts it safely); shapes must match.
    """
    ufunc = ufunc_for(op)
    if out.shape != incoming.shape:
        raise ConfigError(
            f"cannot reduce a slice of shape {incoming.shape} into one of shape {out.shape}: "
            "every rank must pass arrays of the same shape"
        )
    ufunc(out, incoming, out=out)


def finalize(
    op: str, out: np.ndarray, size: int, input_dtype: DTypeLike | None = None
) -> np.ndarray:
    """Turn the reduced accumulator into the result (only ``mean`` does work).

    ``mean`` divides by ``size`` in place (the accumulator is already float
    or complex; an integer buffer, if given, yields a new float64 array, as
    ``np.mean`` of integers does). Other ops return ``out`` itself. With ``input_dtype`` the
    result is cast to :func:`result_dtype` when the accumulator was wider
    (mean of float16 is accumulated in float32 and returned as float16).
    """
    op = _check_op(op)
    res = out
    if op == "mean":
        if size < 1:
            raise ConfigError(f"group size must be >= 1, got {size}")
        if out.dtype.kind in "fc":
            np.divide(out, size, out=out)
        else:
            res = np.true_divide(out, size)  # ints -> float64, as np.mean
    if input_dtype is not None:
        want = result_dtype(op, input_dtype)
        if res.dtype != want:
            res = res.astype(want)
    return res


def reference_allreduce(inputs: Sequence[np.ndarray], op: str) -> np.ndarray:
    """What every allreduce must return: numpy's ``op`` over the stacked inputs."""
    op = _check_op(op)
    if len(inputs) == 0:
        raise ConfigError("reference_allreduce needs at least one input")
    arrays = [np.asarray(a) for a in inputs]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ConfigError(f"all inputs must have the same shape, got {sorted(shapes)}")
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) != 1:
        raise ConfigError(f"all inputs must have the same dtype, got {sorted(map(str, dtypes))}")
    check_op_dtype(op, arrays[0].dtype)
    return np.asarray(_NUMPY_REDUCTIONS[op](np.stack(arrays), axis=0))

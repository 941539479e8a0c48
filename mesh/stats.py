"""Counters and a fixed-bucket latency histogram (pure, cheap to record)."""

from __future__ import annotations

import math
from collections import Counter

# Buckets grow by 2**(1/4) (~19%) from 1 µs: quantiles within ~10%, 100 buckets reach ~30 s.
_BASE = 1e-6
_STEP = 2 ** 0.25
_LOG_STEP = math.log(_STEP)
NBUCKETS = 100
_LAST = NBUCKETS - 1


class LatencyHistogram:
    """Records durations in seconds; answers quantiles. Not thread-safe: one writer."""

    __slots__ = ("counts", "total", "sum")

    def __init__(self) -> None:
        self.counts = [0] * NBUCKETS
        self.total = 0
        self.sum = 0.0

    def record(self, seconds: float, count: int = 1) -> None:
        """``count`` observations of ``seconds`` (messages of one batch run share one)."""
        if seconds <= _BASE:
            index = 0
        else:
            index = int(math.log(seconds / _BASE) / _LOG_STEP) + 1
            if index > _LAST:  # (a comparison: min() is a call)
                index = _LAST
        self.counts[index] += count
        self.total += count
        self.sum += seconds * count

    @staticmethod
    def upper_bound(index: int) -> float:
        return _BASE * 2 ** (index / 4)  # exact powers of two every 4th bucket

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-quantile; None when empty."""
        if self.total == 0:
            return None
        rank = q * self.total
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank and count:
                return self.upper_bound(index)
        return self.upper_bound(NBUCKETS - 1)

    def summary(self) -> dict[str, float | int | None]:
        return {
            "count": self.total,
            "p50": self.quantile(0.5),
            "p99": self.quantile(0.99),
            "mean": self.sum / self.total if self.total else None,
        }


class Counters:
    """Message and byte counters for a node or one peer."""

    __slots__ = ("msgs_in", "msgs_out", "bytes_in", "bytes_out", "drops")

    def __init__(self) -> None:
        self.msgs_in = 0
        self.msgs_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.drops: Counter[str] = Counter()

    def as_dict(self) -> dict:
        return {
            "msgs_in": self.msgs_in,
            "msgs_out": self.msgs_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "drops": dict(self.drops),
        }

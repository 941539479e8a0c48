"""bench/creditloop.py: one real run of the credit loop (two processes over tcp)
reports what the README quotes (rate, run-ahead, batches, the trace's both-idle
share), pinned or not, and the overlap arithmetic behind ``both_idle_share``.
Bounded by pytest-timeout (pyproject); run_once kills both children on any exit."""

from __future__ import annotations

import os

import pytest

from bench import creditloop


def test_overlap_counts_only_the_time_both_lists_share() -> None:
    waits = [(0.0, 1.0), (2.0, 3.0), (5.0, 6.0)]
    idle = [(0.5, 2.5), (5.5, 7.0)]
    assert creditloop._overlap(waits, idle) == pytest.approx(0.5 + 0.5 + 0.5)
    assert creditloop._overlap(waits, []) == 0.0
    assert creditloop._overlap([(0.0, 1.0)], [(1.0, 2.0)]) == 0.0  # touching is not sharing


@pytest.mark.parametrize("pin", [False, True])
def test_one_traced_run_reports_rate_run_ahead_batches_and_idle_share(pin: bool) -> None:
    if pin and not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("needs CPUs 0 and 1")
    count = 6000
    out = creditloop.run_once(count, 64, noflow=False, trace=True, pin=pin)
    assert out["rate"] > 0
    assert 0 < out["pub_share"] <= 1.0
    # Messages not yet handled at the publisher's last send: within the run.
    assert 0 <= out["behind_at_pub_end"] <= count
    assert out["msgs_per_batch"] > 1  # 6,000 messages in a burst are batched
    assert out["cpu_us"] > 0 and out["pub_cpu_us"] > 0 and out["sub_cpu_us"] > 0
    assert 0.0 <= out["both_idle_share"] <= 1.0
    # The default window (1,024) binds over 6,000 messages: credit came back.
    assert out["update_msgs"]["n"] > 0

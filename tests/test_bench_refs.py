"""bench/refs.py: the Zenoh and NATS references run in real separate processes,
count every message, and leave nothing running behind them.

Needs the `bench` extra (eclipse-zenoh, nats-py: `make venv` installs it) and,
for NATS, Debian's nats-server (`bash bench/setup.sh`); skipped without them.
"""

from __future__ import annotations

import shutil
import socket

import pytest

pytest.importorskip("zenoh")
pytest.importorskip("nats")

from bench import pubsub, refs  # noqa: E402
from bench._runner import crew, workers  # noqa: E402

needs_nats = pytest.mark.skipif(shutil.which("nats-server") is None,
                                reason="nats-server not installed (bash bench/setup.sh)")


def _listening(url: str) -> bool:
    host, port = url.removeprefix("nats://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
        return True
    except OSError:
        return False


@needs_nats
def test_nats_server_is_stopped_even_when_the_benchmark_fails() -> None:
    with pytest.raises(RuntimeError), refs.nats_server() as url:
        assert url.startswith("nats://127.0.0.1:")
        assert _listening(url)
        seen = url
        raise RuntimeError("a failing benchmark")
    assert not _listening(seen)


@needs_nats
def test_latency_references_side_by_side_pinned_and_unpinned() -> None:
    cfg = pubsub.Config(transports=("tcp",), lat_count=30, lat_warmup=5, ref_reps=1)
    with workers() as pair:
        rows = refs.latency(pair, cfg)
    table = [r for r in rows if r["bench"] == "references"]
    assert {(r["impl"], r["pinned"]) for r in table} == {
        (impl, pin) for impl in refs.LATENCY_ORDER for pin in ("pinned", "unpinned")}
    for row in table:
        if row["impl"] in refs.NEEDS_INLINE and not refs.inline_supported():
            assert row["supported"] is False
            continue
        assert row["supported"] is True
        assert 0 < row["rtt_us"]["p50"] <= row["rtt_us"]["p90"] <= row["rtt_us"]["p99"]
    goals = {(r["impl"], r["ref_impl"], r["transport"]) for r in rows if r["bench"] == "latency"}
    assert ("mesh-request", "zenoh-get", "tcp, pinned") in goals
    assert ("mesh", "raw", "tcp, unpinned") in goals
    text = refs.table(rows)
    assert "Zenoh get/queryable" in text and "NATS request/reply" in text
    if not refs.inline_supported():
        assert "not supported yet" in text


def test_throughput_shapes_count_every_message() -> None:
    # One crew for every shape: workers are spawned once, as in the benchmark.
    with crew(5) as group:
        for impl, shape in (("zenoh", "4->1"), ("zenoh", "1->4"), ("raw", "1->4"),
                            ("mesh", "4->1")):
            result = refs._shape_run(group, impl, shape, size=64, count=2000)
            assert result["received"] == result["expected"] == 2000 * 4, (impl, shape)
            assert result["rate"] > 0

"""Prometheus metrics over HTTP, parsed with prometheus-client's own parser."""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import mesh
from mesh.stats import LatencyHistogram


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families: dict, family: str, **labels: str) -> float:
    for s in families[family].samples:
        if s.name.endswith(("_total", "_seconds", "_depth", "_peers")) or s.name == family:
            if all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"no sample of {family} with {labels}")


@pytest.mark.timeout(30)
def test_metrics_endpoint_serves_documented_families() -> None:
    with mesh.Node("m-a", discovery="none", metrics_port=0) as a, mesh.Node(
        "m-b", discovery="static", seeds=[a.endpoints[0]]
    ) as b:
        b.wait_for_peers(1, timeout=10)
        sub = a.subscribe("grad.>")
        b.wait_for_subscribers("grad.w1", 1, timeout=10)
        for _ in range(5):
            b.publish("grad.w1", b"x" * 100)
        for _ in range(5):
            sub.next(timeout=5)
        for _ in range(3):
            b.publish("grad.w1", b"y")  # left pending: queue depth 3
        deadline = time.monotonic() + 5
        while sub.pending < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        # The credit of the five consumed goes back on a's 5 ms timer (control pipe).
        while a.status()["counters"]["credit_updates"]["control"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        families = scrape(a.metrics_port)

    assert {
        "mesh_messages_in",
        "mesh_messages_out",
        "mesh_bytes_in",
        "mesh_bytes_out",
        "mesh_drops",
        "mesh_credit_updates",
        "mesh_gaps",
        "mesh_publish_latency_seconds",
        "mesh_queue_depth",
        "mesh_peers",
        "mesh_membership_events",
        "mesh_peer_rtt_seconds",
        "mesh_uptime_seconds",
        "mesh_unknown_peers",
        "mesh_unknown_peer_warnings",
    } <= set(families)
    assert sample(families, "mesh_messages_in", peer="m-b") == 8
    assert sample(families, "mesh_bytes_in", peer="m-b") == 503
    assert sample(families, "mesh_queue_depth", subscription="grad.>") == 3
    assert sample(families, "mesh_peers", state="alive") == 1
    assert sample(families, "mesh_credit_updates", way="control") >= 1
    assert sample(families, "mesh_membership_events", event="joined") == 1
    latency = {s.labels.get("le"): s.value for s in families["mesh_publish_latency_seconds"].samples if s.name.endswith("_bucket")}
    assert latency["+Inf"] == 8
    assert list(latency.values()) == sorted(latency.values())  # cumulative buckets


def test_metrics_port_validation() -> None:
    with pytest.raises(mesh.ConfigError):
        mesh.Node(discovery="none", metrics_port=-1)


def test_histogram_quantiles() -> None:
    h = LatencyHistogram()
    assert h.quantile(0.5) is None
    for _ in range(99):
        h.record(100e-6)
    h.record(0.5)
    assert 100e-6 <= h.quantile(0.5) <= 120e-6
    assert h.quantile(1.0) >= 0.5
    assert LatencyHistogram.upper_bound(4) == 2e-6


def test_histogram_counts_a_run_of_messages_as_that_many_observations() -> None:
    one_by_one, at_once = LatencyHistogram(), LatencyHistogram()
    for _ in range(64):
        one_by_one.record(300e-6)
    at_once.record(300e-6, 64)
    assert (at_once.counts, at_once.total) == (one_by_one.counts, one_by_one.total)
    assert at_once.sum == pytest.approx(one_by_one.sum)

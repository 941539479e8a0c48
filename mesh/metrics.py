"""Prometheus metrics for a node, read at scrape time (nothing on the hot path).

Served over HTTP by ``mesh.Node(..., metrics_port=PORT)`` (0 picks a free port,
see ``node.metrics_port``). Metric names are listed in the README.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from mesh.stats import NBUCKETS, LatencyHistogram

PEER_STATES = ("joining", "alive", "suspect", "dead", "left")


class NodeCollector:
    """A prometheus-client collector that snapshots one node when scraped."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        status = node.status()
        labels = {"node": status["name"], "cluster": status["cluster"]}
        names, values = list(labels), list(labels.values())

        def family(cls: Any, name: str, doc: str, extra: tuple[str, ...] = ()) -> Any:
            return cls(name, doc, labels=[*names, *extra])

        uptime = family(GaugeMetricFamily, "mesh_uptime_seconds", "Seconds since the node started")
        uptime.add_metric(values, status["uptime"])
        yield uptime

        per_peer = {
            "msgs_in": ("mesh_messages_in_total", "Messages received from each peer"),
            "msgs_out": ("mesh_messages_out_total", "Messages sent to each peer"),
            "bytes_in": ("mesh_bytes_in_total", "Payload bytes received from each peer"),
            "bytes_out": ("mesh_bytes_out_total", "Payload bytes sent to each peer"),
        }
        families = {
            key: family(CounterMetricFamily, name.removesuffix("_total"), doc, ("peer",))
            for key, (name, doc) in per_peer.items()
        }
        rtt = family(GaugeMetricFamily, "mesh_peer_rtt_seconds", "Heartbeat round trip per peer", ("peer",))
        for peer in status["peers"]:
            for key, fam in families.items():
                fam.add_metric([*values, peer["name"]], peer[key])
            if peer["rtt"] is not None:
                rtt.add_metric([*values, peer["name"]], peer["rtt"])
        yield from families.values()
        yield rtt

        states = family(GaugeMetricFamily, "mesh_peers", "Known peers by membership state", ("state",))
        counts = dict.fromkeys(PEER_STATES, 0)
        for peer in status["peers"]:
            counts[peer["state"]] = counts.get(peer["state"], 0) + 1
        for state, count in counts.items():
            states.add_metric([*values, state], count)
        yield states

        events = family(
            CounterMetricFamily, "mesh_membership_events", "Membership changes seen", ("event",)
        )
        for event, count in sorted(node.membership_events.items()):
            events.add_metric([*values, event], count)
        yield events

        drops = family(CounterMetricFamily, "mesh_drops", "Messages dropped, by reason", ("reason",))
        for reason, count in sorted(status["counters"]["drops"].items()):
            drops.add_metric([*values, reason], count)
        yield drops

        # Frames from nodes that have not said hello yet (normal while nodes join;
        # also in mesh_drops{reason="unknown_peer"}): how many now, and warnings said.
        unknown = status.get("unknown_peers") or {}
        pending = family(
            GaugeMetricFamily, "mesh_unknown_peers",
            "Nodes that sent frames without having said hello, within the last peer_timeout",
        )
        pending.add_metric(values, unknown.get("pending", 0))
        yield pending
        persisted = family(
            CounterMetricFamily, "mesh_unknown_peer_warnings",
            "Nodes whose frames kept coming without a hello past peer_timeout (warned once each)",
        )
        persisted.add_metric(values, unknown.get("warnings", 0))
        yield persisted

        credit = family(
            CounterMetricFamily, "mesh_credit_updates",
            "Credit updates sent back to publishers, by way (riding, data, control)", ("way",),
        )
        for way, count in sorted(status["counters"]["credit_updates"].items()):
            credit.add_metric([*values, way], count)
        yield credit

        gaps = family(
            CounterMetricFamily, "mesh_gaps", "Sequence numbers missed per (publisher, subject)"
        )
        gaps.add_metric(values, status["counters"]["gaps"])
        yield gaps

        depth = family(
            GaugeMetricFamily,
            "mesh_queue_depth",
            "Messages received and not yet consumed, per subscription",
            ("subscription",),
        )
        for sub in status["subscriptions"]:
            depth.add_metric([*values, sub["pattern"]], sub["pending"])
        yield depth

        secured = family(GaugeMetricFamily, "mesh_secured", "1 when every link runs CurveZMQ")
        secured.add_metric(values, 1 if status["secured"] else 0)
        yield secured

        refused = family(
            CounterMetricFamily, "mesh_auth_refused", "Connections refused by CurveZMQ/ZAP", ("reason",)
        )
        for reason, count in sorted(((status["security"] or {}).get("refused") or {}).items()):
            refused.add_metric([*values, reason], count)
        yield refused

        denied = family(
            CounterMetricFamily, "mesh_permission_denied",
            "Messages and subscriptions of peers refused by the policy", ("peer", "action"),
        )
        for item in status["denied"]:
            denied.add_metric([*values, item["peer"], item["action"]], item["count"])
        yield denied

        yield _latency_family(node.latency, names, values)


def _latency_family(hist: LatencyHistogram, names: list[str], values: list[str]) -> Metric:
    fam = HistogramMetricFamily(
        "mesh_publish_latency_seconds",
        "Time from publish to arrival at this node (wall clocks of both hosts)",
        labels=names,
    )
    counts = list(hist.counts)  # snapshot: the I/O thread keeps recording
    buckets = []
    cumulative = 0
    # Every 4th bucket boundary (powers of two from 1 µs) keeps the series count sane.
    for index in range(NBUCKETS):
        cumulative += counts[index]
        if index % 4 == 0 or index == NBUCKETS - 1:
            buckets.append((f"{LatencyHistogram.upper_bound(index):.6g}", cumulative))
    buckets.append(("+Inf", cumulative))
    fam.add_metric(values, buckets, sum_value=hist.sum)
    return fam


class MetricsServer:
    """An HTTP server for one node's metrics on its own registry."""

    def __init__(self, node: Any, port: int, addr: str = "0.0.0.0") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(node))
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2.0)

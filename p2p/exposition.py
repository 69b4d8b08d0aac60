"""A node's metrics in Prometheus' text format, for the shim's ``GET /metrics``.

Built on the metrics snapshot (``p2p/telemetry.py``), written with
prometheus_client's own families and encoder (docs/architecture.md#metrics).
Every counter of every part the node runs becomes
``p2pnode_<part>_<counter>_total``; the gauges and the two labelled families
have labels from fixed small sets (connection kind, offer verdict), never a
peer, so a stranger cannot grow the scrape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from p2pnode.p2p.telemetry import Metrics

# Metrics' counter parts, by the name their metrics carry.
PARTS: Final = {
    "consumer": "consumer",
    "provider": "provider",
    "stakes": "consumer_market",
    "billing": "provider_market",
    "upgrades": "relay_upgrades",
    "relay_service": "relay_service",
    "dialback": "dialback",
}


class _Snapshot(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        yield GaugeMetricFamily(
            "p2pnode_uptime_seconds", "Seconds since the node started.", value=m.uptime_s
        )
        yield GaugeMetricFamily(
            "p2pnode_connected_peers", "Peers connected now.", value=m.connected_peers
        )
        connections = GaugeMetricFamily(
            "p2pnode_connections", "Connections open now, direct or relayed.", labels=["kind"]
        )
        connections.add_metric(["direct"], m.direct_connections)
        connections.add_metric(["relayed"], m.relayed_connections)
        yield connections
        yield CounterMetricFamily(
            "p2pnode_streams_refused",
            "Inbound streams turned away (budgets, bans).",
            value=m.streams_refused,
        )
        yield GaugeMetricFamily("p2pnode_offers_known", "Offers held now.", value=m.offers_known)
        verdicts = CounterMetricFamily(
            "p2pnode_offer_verdicts", "Offers received, by verdict.", labels=["verdict"]
        )
        for verdict, n in sorted(m.offer_verdicts.items()):
            verdicts.add_metric([verdict], n)
        yield verdicts
        ttft = m.time_to_first_token
        cumulative, buckets = 0, []
        for bound, n in zip((*ttft.bounds, float("inf")), ttft.counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", cumulative))
        yield HistogramMetricFamily(
            "p2pnode_consumer_time_to_first_token_seconds",
            "Consumer: seconds from a request's start to its first text.",
            buckets=buckets,
            sum_value=ttft.total,
        )
        for attr, part in PARTS.items():
            counters = getattr(m, attr)
            if counters is None:  # a part this node does not run
                continue
            for field in dataclasses.fields(counters):
                words = field.name.replace("_", " ")
                yield CounterMetricFamily(
                    f"p2pnode_{part}_{field.name}",
                    f"{part.replace('_', ' ').capitalize()}: {words}.",
                    value=getattr(counters, field.name),
                )


def prometheus_text(metrics: Metrics) -> bytes:
    """``metrics`` in Prometheus' text exposition format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(metrics))
    return bytes(generate_latest(registry))

"""A node's metrics in Prometheus' text format, for the shim's ``GET /metrics``.

Built on the metrics snapshot (``p2p/telemetry.py``), written with
prometheus_client's own families and encoder (docs/architecture.md#metrics).
Every counter of every part the node runs becomes
``p2pnode_<part>_<counter>_total``; the gauges, histograms and labelled
families have labels from fixed small sets (connection kind, offer verdict,
our protocols, error codes, offence kinds), never a peer, so a stranger
cannot grow the scrape.
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

from p2pnode.p2p import nat
from p2pnode.p2p.histograms import Distribution
from p2pnode.p2p.telemetry import Metrics

REACHABILITY: Final = tuple(r.value for r in nat.Reachability)

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
        yield from _node_health(m)
        yield _histogram(
            "p2pnode_consumer_time_to_first_token_seconds",
            "Consumer: seconds from a request's start to its first text.",
            m.time_to_first_token,
        )
        yield _histogram(
            "p2pnode_dht_lookup_seconds",
            "Discovery: seconds per DHT lookup of a model's providers.",
            m.lookup_seconds,
        )
        if m.provider is not None:
            yield from _provider(m)
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


def _node_health(m: Metrics) -> Iterator[Metric]:
    reachability = GaugeMetricFamily(
        "p2pnode_reachability", "1 for what the node finds itself now.", labels=["state"]
    )
    for state in REACHABILITY:
        reachability.add_metric([state], int(m.reachability == state))
    yield reachability
    yield GaugeMetricFamily(
        "p2pnode_upgraded_connections",
        "Relayed connections upgraded to direct ones, open now.",
        value=m.upgraded_connections,
    )
    yield GaugeMetricFamily(
        "p2pnode_relays_held", "Relays this node holds a reservation on.", value=m.relays_held
    )
    yield GaugeMetricFamily(
        "p2pnode_relay_reservations",
        "Peers holding a reservation on this node's relay now.",
        value=m.reservations_served,
    )
    yield _labelled(
        CounterMetricFamily,
        "p2pnode_protocol_errors",
        "Peers' violations of our protocols, by protocol and error code.",
        ["protocol", "code"],
        {(protocol, code): n for (protocol, code), n in m.protocol_errors.items()},
    )
    yield _labelled(
        CounterMetricFamily,
        "p2pnode_peer_offences",
        "Peers' offences, by kind.",
        ["kind"],
        {(kind,): n for kind, n in m.offences.items()},
    )
    yield _labelled(
        GaugeMetricFamily,
        "p2pnode_misbehaving_peers",
        "Peers with a misbehaviour score now.",
        ["state"],
        {("scored",): m.misbehaving_peers, ("banned",): m.banned_peers},
    )


def _provider(m: Metrics) -> Iterator[Metric]:
    yield _labelled(
        CounterMetricFamily,
        "p2pnode_provider_refusals",
        "Provider: requests refused, by error code.",
        ["code"],
        {(code,): n for code, n in m.provider_refusals.items()},
    )
    yield _labelled(
        GaugeMetricFamily,
        "p2pnode_provider_slots",
        "Provider: its engines' slots.",
        ["state"],
        {("free",): m.slots_free, ("busy",): m.slots_total - m.slots_free},
    )
    yield GaugeMetricFamily(
        "p2pnode_provider_queue_length",
        "Provider: requests waiting for a slot.",
        value=m.queue_length,
    )
    if m.provider_time_to_first_token is not None:
        yield _histogram(
            "p2pnode_provider_time_to_first_token_seconds",
            "Provider: seconds from a request's admission to its first token.",
            m.provider_time_to_first_token,
        )
    if m.provider_tokens_per_s is not None:
        yield _histogram(
            "p2pnode_provider_tokens_per_second",
            "Provider: decoding speed of each answer, tokens a second.",
            m.provider_tokens_per_s,
        )


def _labelled(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    documentation: str,
    labels: list[str],
    values: dict[tuple[str, ...], int],
) -> Metric:
    family = kind(name, documentation, labels=labels)
    for key, n in sorted(values.items()):
        family.add_metric(list(key), n)
    return family


def _histogram(name: str, documentation: str, seen: Distribution) -> HistogramMetricFamily:
    cumulative, buckets = 0, []
    for bound, n in zip((*seen.bounds, float("inf")), seen.counts, strict=True):
        cumulative += n
        buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", cumulative))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=seen.total)


def prometheus_text(metrics: Metrics) -> bytes:
    """``metrics`` in Prometheus' text exposition format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(metrics))
    return bytes(generate_latest(registry))

"""Team keys' usage as Prometheus counters, labelled by key name (at most
``inference/keys.py:MAX_KEYS`` of them, each made by the operator)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from p2pnode.inference.keys import Key, Usage

FIELDS = ("requests", "prompt_tokens", "completion_tokens", "spent_wei")


class _Usage(Collector):
    def __init__(self, keys: list[Key], usage: dict[str, Usage]) -> None:
        self._keys = keys
        self._usage = usage

    def collect(self) -> Iterator[Metric]:
        families = {
            f: CounterMetricFamily(
                f"p2pnode_key_{f}", f"Per team key: {f.replace('_', ' ')}.", labels=["key"]
            )
            for f in FIELDS
        }
        revoked = GaugeMetricFamily(
            "p2pnode_key_revoked", "1 if the team key was revoked.", labels=["key"]
        )
        for k in self._keys:
            used = self._usage.get(k.name, Usage())
            for name, family in families.items():
                family.add_metric([k.name], getattr(used, name))
            revoked.add_metric([k.name], int(k.revoked))
        yield from families.values()
        yield revoked


def prometheus_text(keys: list[Key], usage: dict[str, Usage]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Usage(keys, usage))
    return bytes(generate_latest(registry))

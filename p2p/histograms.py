"""Fixed-bucket histograms: what a node measures as distributions (docs/architecture.md#metrics).

Counted where the measurement is made, copied into the metrics snapshot,
and shown by ``GET /metrics`` as Prometheus histograms.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Final

# Seconds from a request's start to its first text (consumer) or from a
# request's admission to its first token (provider).
TTFT_BUCKETS_S: Final = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A provider's decoding speed per answer, tokens a second.
SPEED_BUCKETS: Final = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)
# Seconds one DHT lookup of a model's providers took.
LOOKUP_BUCKETS_S: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class Distribution:
    """Observations counted into fixed buckets (upper bounds, ascending): what a
    Prometheus histogram shows. ``counts`` are per bucket, not cumulative."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]  # one per bound, then one for what is above the last
    total: float  # the sum of the observations

    @property
    def observed(self) -> int:
        return sum(self.counts)


class Histogram:
    """Counts observations into fixed buckets; :meth:`snapshot` copies it."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._total = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self._total += value

    def snapshot(self) -> Distribution:
        return Distribution(self.bounds, tuple(self._counts), self._total)

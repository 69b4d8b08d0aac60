"""Fixed-bucket histograms: what a node measures as distributions (docs/architecture.md#metrics).

Counted where the measurement is made, copied into the metrics snapshot,
and shown by ``GET /metrics`` as Prometheus histograms.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


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

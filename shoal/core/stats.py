"""Request statistics as plain numbers: cumulative counters and fixed-bucket
latency histograms kept by each scheduler's router, and the head's time series
of rate, error rate and latency quantiles derived from them.

Cumulative counts travel in health updates; the head differences consecutive
reports, so a lost report loses resolution, never counts.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

#: Upper bounds (seconds) of the latency buckets; the last bucket is +Inf.
BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
    60.0,
)


@dataclass
class Histogram:
    """Counts per bucket (``len(BUCKETS) + 1``, the last for +Inf) and the sum of observations."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)


OUTCOMES = ("ok", "invalid", "not_found", "overloaded", "timeout", "unavailable", "error")


@dataclass
class DeploymentStats:
    """What one router saw of one deployment, since it started."""

    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    latency: Histogram = field(default_factory=Histogram)
    queue: Histogram = field(default_factory=Histogram)
    # Requests that failed on every replica they were tried on, each of which died or
    # dropped them: a request that may be what kills replicas (a query of death).
    given_up: int = 0

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    @property
    def errors(self) -> int:
        return self.requests - self.outcomes["ok"]


def quantile(counts: Sequence[int], q: float) -> float:
    """The ``q`` quantile (0..1) from bucket counts, interpolated inside the bucket (as Prometheus does)."""
    total = sum(counts)
    if total == 0:
        return 0.0
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            lower = BUCKETS[i - 1] if i > 0 else 0.0
            upper = BUCKETS[i] if i < len(BUCKETS) else BUCKETS[-1]
            return lower + (upper - lower) * ((rank - seen) / c)
        seen += c
    return BUCKETS[-1]


@dataclass(frozen=True)
class Snapshot:
    """Cumulative counts of one deployment at one scheduler."""

    requests: int
    errors: int
    latency: tuple[int, ...]


@dataclass(frozen=True)
class Point:
    at: float  # wall-clock seconds
    rate: float  # requests per second
    error_rate: float  # fraction of requests that failed
    p50_ms: float
    p99_ms: float


class SeriesRecorder:
    """The head's per-deployment time series for the dashboard.

    ``record(now, wall, reports)`` takes every scheduler's cumulative snapshot
    per deployment; a point is added per deployment at most every ``period_s``.
    """

    def __init__(self, period_s: float = 2.0, keep: int = 300) -> None:
        self.period_s = period_s
        self.keep = keep
        self.series: dict[str, deque[Point]] = {}
        self._last: dict[tuple[str, str], Snapshot] = {}
        self._pending: dict[str, tuple[int, int, list[int]]] = {}
        self._since: float | None = None

    def record(self, now: float, wall: float, scheduler_id: str, reports: Mapping[str, Snapshot]) -> None:
        for name, snap in reports.items():
            prev = self._last.get((scheduler_id, name))
            self._last[(scheduler_id, name)] = snap
            if prev is None or snap.requests < prev.requests:
                continue  # first sight, or the scheduler restarted: no delta yet
            req, err, lat = self._pending.get(name, (0, 0, [0] * (len(BUCKETS) + 1)))
            lat = [a + (b - c) for a, b, c in zip(lat, snap.latency, prev.latency, strict=True)]
            self._pending[name] = (req + snap.requests - prev.requests, err + snap.errors - prev.errors, lat)
        if self._since is None:
            self._since = now
            return
        elapsed = now - self._since
        if elapsed < self.period_s:
            return
        for name, (req, err, lat) in self._pending.items():
            point = Point(
                at=wall,
                rate=req / elapsed,
                error_rate=err / req if req else 0.0,
                p50_ms=quantile(lat, 0.5) * 1000,
                p99_ms=quantile(lat, 0.99) * 1000,
            )
            self.series.setdefault(name, deque(maxlen=self.keep)).append(point)
        self._pending = {}
        self._since = now

    def forget(self, names: Iterable[str]) -> None:
        for name in names:
            self.series.pop(name, None)

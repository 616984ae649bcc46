"""Request statistics as plain numbers: cumulative counters and fixed-bucket
latency histograms kept by each scheduler's router, and the head's time series
of rate, error rate and latency quantiles derived from them.

Cumulative counts travel in health updates; the head differences consecutive
reports, so a lost report loses resolution, never counts.
"""

from __future__ import annotations

import bisect
import math
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


OUTCOMES = (
    "ok",
    "invalid",
    "not_found",
    "unauthenticated",
    "denied",
    "overloaded",
    "timeout",
    "unavailable",
    "error",
    "cancelled",
)


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
        """Requests not answered ``ok``, but for those their clients cancelled (a client that
        gave up is no failure of the model's: a canary's or the dashboard's error rate must
        not rise with it)."""
        return self.requests - self.outcomes["ok"] - self.outcomes["cancelled"]


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


#: The error rate is over this many seconds of requests ...
ERROR_WINDOW_S = 60.0
#: ... and only once that window holds at least this many: one failure in two requests is
#: not "50% errors".
ERROR_MIN_REQUESTS = 20
#: A chart has at most this many rows; a longer range merges periods into steps.
CHART_ROWS = 300


@dataclass(frozen=True)
class Point:
    """What one deployment's routers counted in one period, ending at ``at``."""

    at: float  # wall-clock seconds, the end of the period
    seconds: float  # the period's length
    requests: int
    errors: int
    latency: tuple[int, ...] = ()  # bucket counts; empty when there were no requests

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def merge(points: Sequence[Point]) -> Point:
    """One point counting what ``points`` (consecutive, oldest first, not empty) counted."""
    if len(points) == 1:  # a step of one period (each row of a 5 min chart): a copy cost a third
        return points[0]
    lat = [0] * (len(BUCKETS) + 1)
    for p in points:
        for i, c in enumerate(p.latency):
            lat[i] += c
    requests = sum(p.requests for p in points)
    return Point(
        at=points[-1].at,
        seconds=sum(p.seconds for p in points),
        requests=requests,
        errors=sum(p.errors for p in points),
        latency=tuple(lat) if requests else (),
    )


@dataclass(frozen=True)
class Window:
    """Requests and errors over the ``seconds`` before a moment."""

    seconds: float
    requests: int
    errors: int
    min_requests: int

    @property
    def error_rate(self) -> float | None:
        """errors / requests, or None below ``min_requests`` (too few to say)."""
        return self.errors / self.requests if self.requests >= self.min_requests and self.requests else None


def window(
    points: Sequence[Point],
    end: float,
    seconds: float = ERROR_WINDOW_S,
    min_requests: int = ERROR_MIN_REQUESTS,
) -> Window:
    """What ``points`` (oldest first) counted in ``(end - seconds, end]``."""
    inside = [p for p in points if end - seconds < p.at <= end]
    return Window(seconds, sum(p.requests for p in inside), sum(p.errors for p in inside), min_requests)


def latest(
    points: Sequence[Point], end: float, seconds: float = ERROR_WINDOW_S
) -> tuple[float | None, Window]:
    """The rate of the newest of ``points`` (oldest first), None when it is not in the
    ``seconds`` before ``end``; and what ``points`` counted in ``(end - seconds, end]``.
    Read from the newest back: costs that window's points, not all those kept."""
    inside = []
    for p in reversed(points):
        if p.at <= end - seconds:
            break
        if p.at <= end:
            inside.append(p)
    rate = inside[0].rate if inside else None
    return rate, Window(
        seconds, sum(p.requests for p in inside), sum(p.errors for p in inside), ERROR_MIN_REQUESTS
    )


@dataclass(frozen=True)
class Chart:
    """One deployment's series over a range, as columns for a chart: one row per step, and a
    row of Nones wherever the head got no report for longer than two steps (a gap, not a line
    drawn across it). Latency and error rate are None where there were no requests, or (error
    rate) fewer than ``ERROR_MIN_REQUESTS`` in the ``ERROR_WINDOW_S`` before the row."""

    at: list[float]
    requests: list[int | None]
    rate: list[float | None]
    error_rate: list[float | None]
    p50_ms: list[float | None]
    p99_ms: list[float | None]


def chart(points: Sequence[Point], start: float, end: float, step_s: float, period_s: float) -> Chart:
    """``points`` (oldest first) in ``(start, end]``, merged into steps of ``step_s`` seconds
    aligned on multiples of it (so a row does not move between two calls)."""
    out = Chart([], [], [], [], [], [])
    rows: list[Point] = []
    bucket: list[Point] = []
    for p in points:
        if not start < p.at <= end:
            continue
        if bucket and int(p.at // step_s) != int(bucket[-1].at // step_s):
            rows.append(merge(bucket))
            bucket = []
        bucket.append(p)
    if bucket:
        rows.append(merge(bucket))
    # The rolling error window over the raw points: two indexes walking forward.
    lo = hi = 0
    requests = errors = 0
    for row in rows:
        if out.at and row.at - out.at[-1] > 2 * step_s + period_s:
            for column in (out.requests, out.rate, out.error_rate, out.p50_ms, out.p99_ms):
                column.append(None)
            out.at.append(out.at[-1] + step_s)
        while hi < len(points) and points[hi].at <= row.at:
            requests += points[hi].requests
            errors += points[hi].errors
            hi += 1
        while lo < hi and points[lo].at <= row.at - ERROR_WINDOW_S:
            requests -= points[lo].requests
            errors -= points[lo].errors
            lo += 1
        out.at.append(row.at)
        out.requests.append(row.requests)
        out.rate.append(row.rate)
        out.error_rate.append(Window(ERROR_WINDOW_S, requests, errors, ERROR_MIN_REQUESTS).error_rate)
        out.p50_ms.append(quantile(row.latency, 0.5) * 1000 if row.requests else None)
        out.p99_ms.append(quantile(row.latency, 0.99) * 1000 if row.requests else None)
    return out


class SeriesRecorder:
    """The head's per-deployment time series for the dashboard, in memory.

    ``record(now, wall, reports)`` takes every scheduler's cumulative snapshot
    per deployment; a point is added per deployment at most every ``period_s``,
    and the last ``keep_s`` seconds of points are kept (a ring per deployment).
    What a deleted deployment or a forgotten scheduler left goes with :meth:`forget`
    and :meth:`forget_scheduler`; until then it is kept.
    """

    def __init__(self, period_s: float = 2.0, keep_s: float = 3600.0) -> None:
        self.period_s = period_s
        self.keep_s = keep_s
        self.series: dict[str, deque[Point]] = {}
        self._last: dict[str, dict[str, Snapshot]] = {}  # scheduler -> deployment -> last snapshot
        self._pending: dict[str, tuple[int, int, list[int]]] = {}
        self._since: float | None = None

    def record(self, now: float, wall: float, scheduler_id: str, reports: Mapping[str, Snapshot]) -> None:
        last = self._last.setdefault(scheduler_id, {})
        for name, snap in reports.items():
            prev = last.get(name)
            last[name] = snap
            if prev is None or snap.requests < prev.requests:
                continue  # first sight, or the scheduler restarted: no delta yet
            if snap.requests == prev.requests and snap.errors == prev.errors:
                # No request since (latencies come with requests): nothing to add up, but the
                # deployment still gets its point (an idle one: a gap in the chart).
                if name not in self._pending:
                    self._pending[name] = (0, 0, [0] * (len(BUCKETS) + 1))
                continue
            if not len(snap.latency) == len(prev.latency) == len(BUCKETS) + 1:
                continue  # not shoal's buckets (a broken report): nothing to add up
            req, err, lat = self._pending.get(name, (0, 0, [0] * (len(BUCKETS) + 1)))
            lat = [a + (b - c) for a, b, c in zip(lat, snap.latency, prev.latency, strict=True)]
            self._pending[name] = (req + snap.requests - prev.requests, err + snap.errors - prev.errors, lat)
        if self._since is None:
            self._since = now
            return
        elapsed = now - self._since
        if elapsed < self.period_s:
            return
        keep = max(1, int(self.keep_s / self.period_s))
        for name, (req, err, lat) in self._pending.items():
            point = Point(
                at=wall, seconds=elapsed, requests=req, errors=err, latency=tuple(lat) if req else ()
            )
            self.series.setdefault(name, deque(maxlen=keep)).append(point)
        self._pending = {}
        self._since = now

    def step_for(self, window_s: float) -> float:
        """The step of a chart over ``window_s`` seconds: a multiple of the period, at most
        ``CHART_ROWS`` rows."""
        return self.period_s * max(1, math.ceil(window_s / (CHART_ROWS * self.period_s)))

    def forget(self, names: Iterable[str]) -> None:
        """Drop the series of deployments (deleted ones) and what was kept to count them: a
        deployment created again under the same name starts with no points and no counts."""
        for name in names:
            self.series.pop(name, None)
            self._pending.pop(name, None)
            for last in self._last.values():
                last.pop(name, None)

    def forget_scheduler(self, scheduler_id: str) -> None:
        """Drop the last counts of a scheduler the head forgot (its points stay)."""
        self._last.pop(scheduler_id, None)

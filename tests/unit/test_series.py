"""The head's time series for the dashboard: gaps where there is no traffic or no report,
an error rate only over enough requests, a bounded history, steps for long ranges; and
``GET /api/series`` over them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import httpx
import pytest

from shoal.config import Settings
from shoal.core import stats
from shoal.core.clock import FakeClock
from shoal.core.placement import Capacity
from shoal.core.spec import parse_spec
from shoal.core.stats import (
    BUCKETS,
    ERROR_MIN_REQUESTS,
    Chart,
    Point,
    SeriesRecorder,
    Snapshot,
    chart,
    window,
)
from shoal.head.node import HeadNode
from shoal.http.head import head_app
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers
from shoal.types import LoadReport, SchedulerRegistration

pytestmark = pytest.mark.timeout(10)


def latency(n: int) -> tuple[int, ...]:
    """``n`` requests, all in the 10 ms bucket."""
    counts = [0] * (len(BUCKETS) + 1)
    counts[BUCKETS.index(0.01)] = n
    return tuple(counts)


class Feed:
    """One scheduler reporting cumulative counts of deployment 'm' every second."""

    def __init__(self, recorder: SeriesRecorder) -> None:
        self.recorder = recorder
        self.t = 1000.0
        self.requests = 0
        self.errors = 0

    def tick(self, requests: int = 0, errors: int = 0, seconds: float = 1.0) -> None:
        self.t += seconds
        self.requests += requests
        self.errors += errors
        snap = Snapshot(self.requests, self.errors, latency(self.requests))
        self.recorder.record(self.t, self.t, "s1", {"m": snap})


def test_no_traffic_is_a_gap_in_latency_not_zero_ms() -> None:
    feed = Feed(SeriesRecorder(period_s=1.0))
    for requests in (0, 10, 10, 0, 0, 10):
        feed.tick(requests)
    c = chart(feed.recorder.series["m"], 0, feed.t, 1.0, 1.0)
    assert c.rate == [10.0, 10.0, 0.0, 0.0, 10.0]
    assert c.p50_ms[0] is not None and c.p50_ms[0] > 0
    assert c.p50_ms[2:4] == [None, None]
    assert c.p99_ms[2:4] == [None, None]


def test_no_report_is_a_row_of_nones_between_two_segments() -> None:
    feed = Feed(SeriesRecorder(period_s=1.0))
    for _ in range(3):
        feed.tick(10)
    feed.tick(10, seconds=30)  # the head heard nothing for 30 s
    feed.tick(10)
    c = chart(feed.recorder.series["m"], 0, feed.t, 1.0, 1.0)
    gap = c.at.index(1003.0) + 1
    assert c.rate[gap] is None and c.p50_ms[gap] is None and c.requests[gap] is None
    assert c.at == sorted(c.at)
    assert [r is None for r in c.rate].count(True) == 1


def test_error_rate_needs_the_minimum_count_in_its_window() -> None:
    feed = Feed(SeriesRecorder(period_s=1.0))
    feed.tick()
    feed.tick(2, errors=1)
    points = feed.recorder.series["m"]
    assert window(points, feed.t).requests == 2
    assert window(points, feed.t).error_rate is None  # not "50% errors"
    assert chart(points, 0, feed.t, 1.0, 1.0).error_rate == [None]
    feed.tick(ERROR_MIN_REQUESTS, errors=1)
    points = feed.recorder.series["m"]
    assert window(points, feed.t).error_rate == pytest.approx(2 / (ERROR_MIN_REQUESTS + 2))
    assert chart(points, 0, feed.t, 1.0, 1.0).error_rate[-1] == pytest.approx(2 / (ERROR_MIN_REQUESTS + 2))
    # A minute later the window holds none of them: no rate again.
    for _ in range(61):
        feed.tick()
    points = feed.recorder.series["m"]
    assert window(points, feed.t).requests == 0
    assert window(points, feed.t).error_rate is None


def test_history_is_bounded_and_long_ranges_merge_periods() -> None:
    recorder = SeriesRecorder(period_s=1.0, keep_s=100.0)
    feed = Feed(recorder)
    for _ in range(301):
        feed.tick(3)
    points = recorder.series["m"]
    assert len(points) == 100
    assert recorder.step_for(60) == 1.0
    assert recorder.step_for(3600) == 12.0
    c = chart(points, feed.t - 100, feed.t, 10.0, 1.0)
    assert len(c.at) in (10, 11)
    assert sum(r for r in c.requests if r is not None) == 300
    assert all(r == pytest.approx(3.0) for r in c.rate)


@pytest.mark.parametrize("window_s", ["0", "-1", "3601", "nan", "inf", "soon"])
async def test_a_window_out_of_range_is_400(store: MemoryStore, fleet: FakeSchedulers, window_s: str) -> None:
    node = HeadNode(Settings(), store, fleet)
    try:
        async with client(node) as http:
            r = await http.get(f"/api/series?window_s={window_s}")
        assert r.status_code == 400
        assert "window_s must be a number of seconds above 0, at most 3600" in r.json()["error"]
    finally:
        await node.aclose()


async def test_the_series_route_answers_columns_with_nulls(store: MemoryStore, fleet: FakeSchedulers) -> None:
    node = HeadNode(Settings(), store, fleet)
    try:
        await node.apply(parse_spec({"name": "m", "backend": "python", "model": "m:M"}))
        node.series = SeriesRecorder(period_s=1.0)
        feed = Feed(node.series)
        feed.t = time.time() - 10
        for requests in (0, 5, 0):
            feed.tick(requests)
        async with client(node) as http:
            doc = (await http.get("/api/series?window_s=300")).json()
        assert doc["window_s"] == 300 and doc["keep_s"] == 3600 and doc["step_s"] == 1.0
        m = doc["deployments"]["m"]
        assert m["requests"] == [5, 0]
        assert m["p50_ms"][0] > 0 and m["p50_ms"][1] is None
        assert m["error_rate"] == [None, None]
        assert m["window"] == {
            "seconds": 60.0,
            "requests": 5,
            "errors": 0,
            "min_requests": 20,
            "error_rate": None,
        }
    finally:
        await node.aclose()


def client(node: HeadNode) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=head_app(node)), base_url="http://head")


async def test_a_deleted_deployments_series_go_and_a_new_one_of_its_name_starts_empty(
    store: MemoryStore, fleet: FakeSchedulers
) -> None:
    """Before: the head kept every deleted deployment's series (up to an hour of points, about
    0.6 MB each) for as long as it ran, and one created again under the same name showed the
    deleted one's requests and errors."""
    clock = FakeClock()
    node = HeadNode(Settings(), store, fleet, clock)
    spec = parse_spec({"name": "m", "backend": "python", "model": "m:M", "replicas": 0})
    try:
        await node.register_scheduler(
            SchedulerRegistration("s1", "s1:1", "s1:2", Capacity(8, 8192, 0), pid=1, hostname="h")
        )

        async def report(requests: int, errors: int) -> None:
            load = {"m": LoadReport(0, 0, requests, errors, latency(requests))}
            assert await node.scheduler_health("s1", 0, [], load)
            clock.advance(2.0)

        async def window() -> dict[str, object] | None:
            async with client(node) as http:
                doc = (await http.get("/api/series?window_s=300")).json()
            found = doc["deployments"].get("m")
            return None if found is None else found["window"]

        await node.apply(spec)
        for n in range(0, 100, 10):
            await report(n, n)  # every request fails
        assert (w := await window()) is not None and w["requests"] == 90 and w["error_rate"] == 1.0
        await node.delete("m")
        await report(100, 100)  # its replicas drain
        assert node.series.series == {}
        await node.apply(spec)  # the same name again; the scheduler's counts go on from 100
        for _ in range(3):
            await report(100, 100)
        assert await window() == {
            "seconds": 60.0,
            "requests": 0,
            "errors": 0,
            "min_requests": ERROR_MIN_REQUESTS,
            "error_rate": None,
        }
        # A scheduler the head forgot leaves no counts behind.
        node.state.schedulers.pop("s1")
        await node.reconcile_once()
        assert "s1" not in node.series._last
    finally:
        await node.aclose()


async def test_a_short_window_reads_its_own_points_not_the_hour_kept(
    store: MemoryStore, fleet: FakeSchedulers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/api/series read every point kept (an hour: 1,800 per deployment) to chart 5 minutes,
    and copied each chart with dataclasses.asdict: 1.7 s of the head's event loop for 200
    deployments with traffic (0.4 s now). The answer is the same as from all the points;
    the points the chart is given are counted."""
    node = HeadNode(Settings(), store, fleet)
    try:
        await node.apply(parse_spec({"name": "m", "backend": "python", "model": "m:M"}))
        feed = Feed(node.series)
        feed.t = time.time() - 3700
        for i in range(1850):
            feed.tick(requests=i % 40, errors=i % 7 == 0, seconds=2.0)
        kept = list(node.series.series["m"])
        assert len(kept) == 1800
        given: list[int] = []
        real = stats.chart

        def counted(points: Sequence[Point], *args: Any) -> Chart:
            given.append(len(points))
            return real(points, *args)

        monkeypatch.setattr(stats, "chart", counted)
        async with client(node) as http:
            doc = (await http.get("/api/series?window_s=300")).json()
        monkeypatch.undo()

        now = doc["now"]
        whole = chart(kept, now - 300, now, 2.0, 2.0)
        m = doc["deployments"]["m"]
        assert {k: m[k] for k in ("at", "requests", "rate", "error_rate", "p50_ms", "p99_ms")} == asdict(
            whole
        )
        recent = window(kept, now)
        assert m["window"] == {**asdict(recent), "error_rate": recent.error_rate}
        assert len(whole.at) >= 149 and m["error_rate"][-1] is not None
        # 5 minutes and the error rate's minute before them, of 2 s points (and one more,
        # for the time between the read and the answer's "now").
        assert given == [pytest.approx(180, abs=2)]
    finally:
        await node.aclose()

"""The head's reads at scale cost what they show, not the cluster: the dashboard's bounded
``/api/status`` and ``/api/series``, the brief status a model repository's index reads, and
the schedulers' allocations kept between reads. Counted, not timed: the replica entries
built, the charts built and the points they were given, the replica records summed."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest

from shoal.config import Settings
from shoal.core import stats
from shoal.core.clock import FakeClock
from shoal.core.cluster import READY, STARTING, ReplicaReport
from shoal.core.placement import Capacity
from shoal.core.spec import parse_spec
from shoal.core.stats import BUCKETS, Point
from shoal.core.status import ReplicaStatus
from shoal.head import node as node_module
from shoal.head.node import HeadNode
from shoal.http.head import MAX_SERIES, head_app
from shoal.proto import shoal_pb2 as pb
from shoal.rpc.head_service import HeadService
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers
from shoal.types import SchedulerRegistration

pytestmark = pytest.mark.timeout(60)

NAMES = [f"d{d:02d}" for d in range(60)] + ["zz-late"]  # zz-late: one replica STARTING


@pytest.fixture
async def node(store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock) -> AsyncIterator[HeadNode]:
    """61 deployments of 5 replicas on 5 schedulers, each with 10 minutes of traffic (d05
    and d50 with errors, d59 the busiest)."""
    head = HeadNode(Settings(), store, fleet, clock)
    reports: dict[str, list[ReplicaReport]] = {f"s{i}": [] for i in range(5)}
    now = time.time()
    lat = tuple([1] * (len(BUCKETS) + 1))
    for d, name in enumerate(NAMES):
        spec = parse_spec({"name": name, "backend": "python", "model": "m:M", "replicas": 5})
        head.desired[name] = spec
        for r in range(5):
            state = STARTING if name == "zz-late" and r == 0 else READY
            reports[f"s{(d + r) % 5}"].append(
                ReplicaReport(
                    f"{name}-{r}", name, state, address=f"{name}-{r}:1", spec_hash=spec.process_hash()
                )
            )
        requests = 100 if name == "d59" else 10
        errors = 1 if name in ("d05", "d50") else 0
        head.series.series[name] = deque(
            Point(at=now - 2 * (300 - k), seconds=2.0, requests=requests, errors=errors, latency=lat)
            for k in range(300)
        )
    for sid, reps in reports.items():
        reg = SchedulerRegistration(sid, f"{sid}:1", f"{sid}:2", Capacity(64, 10**6, 0), 1, "h", tuple(reps))
        await head.register_scheduler(reg)
    yield head
    await head.aclose()


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of the replica entries the status builds."""
    out: list[str] = []
    real = ReplicaStatus

    def counted(*args: Any, **fields: Any) -> ReplicaStatus:
        made = real(*args, **fields)  # the head names its fields by position
        out.append(made.id)
        return made

    monkeypatch.setattr(node_module, "ReplicaStatus", counted)
    return out


@pytest.fixture
def charted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of points each chart /api/series builds is given."""
    out: list[int] = []
    real = stats.chart

    def counted(points: Sequence[Point], *args: Any) -> stats.Chart:
        out.append(len(points))
        return real(points, *args)

    monkeypatch.setattr(stats, "chart", counted)  # the route calls stats.chart
    return out


async def get(node: HeadNode, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=head_app(node)), base_url="http://h") as c:
        return await c.get(path)


async def test_series_charts_the_deployments_named_alone(node: HeadNode, charted: list[int]) -> None:
    doc = (await get(node, "/api/series?window_s=300&deployment=d01&deployment=d02&deployment=nope")).json()
    assert sorted(doc["deployments"]) == ["d01", "d02"] and doc["more"] == 0
    assert sorted(doc["latest"]) == ["d01", "d02"]
    # Two charts, each given the window's points and the error rate's minute before it.
    assert len(charted) == 2 and all(n <= (300 + 60) / 2 + 1 for n in charted)
    assert doc["latest"]["d01"]["rate"] == 5.0 and doc["latest"]["d01"]["window"]["requests"] in (290, 300)


async def test_series_refuses_too_many_names_and_names_with_a_choice(node: HeadNode) -> None:
    many = "&".join(f"deployment=d{i}" for i in range(MAX_SERIES + 1))
    over = await get(node, f"/api/series?{many}")
    assert over.status_code == 400
    assert over.json() == {"error": f"at most {MAX_SERIES} deployment names, got {MAX_SERIES + 1}"}
    both = await get(node, "/api/series?deployment=d01&limit=3")
    assert both.status_code == 400 and "not both" in both.json()["error"]
    assert (await get(node, f"/api/series?limit={MAX_SERIES + 1}")).status_code == 400
    assert (await get(node, "/api/series?contains=" + "x" * 300)).status_code == 400


async def test_unnamed_series_chart_a_bounded_few_errors_first_then_the_busiest(
    node: HeadNode, charted: list[int]
) -> None:
    """Every deployment's chart was built at each poll (2.8 s, 16 MB at 2,000 deployments)."""
    doc = (await get(node, "/api/series?window_s=300")).json()
    assert len(charted) == MAX_SERIES == len(doc["deployments"]) and doc["more"] == len(NAMES) - MAX_SERIES
    assert len(doc["latest"]) == len(NAMES)  # every deployment's latest rate: cheap, one minute
    charted.clear()
    doc = (await get(node, "/api/series?window_s=300&limit=3")).json()
    assert list(doc["deployments"]) == ["d05", "d50", "d59"] and len(charted) == 3
    doc = (await get(node, "/api/series?window_s=300&limit=3&contains=d0")).json()
    assert list(doc["deployments"]) == ["d00", "d01", "d05"] and doc["more"] == 7


async def test_the_bounded_status_builds_the_rows_shown(node: HeadNode, built: list[str]) -> None:
    """The dashboard read every replica (2.8 MB, 170 ms at 10,000 replicas) to draw 200 rows."""
    doc = (await get(node, "/api/status?limit=10&replicas=2")).json()
    names = [d["name"] for d in doc["deployments"]]
    assert len(built) == 10 * 5 and len(names) == 10
    assert names == sorted(names) and "zz-late" in names  # it needs a look: first in
    assert doc["more"] == {"deployments": 51, "deployments_with_replicas": 51, "replicas": 255}
    late = next(d for d in doc["deployments"] if d["name"] == "zz-late")
    assert [r["id"] for r in late["replicas"]] == ["zz-late-0", "zz-late-1"]  # not READY first
    assert late["more_replicas"] == {"READY": 3} and late["ready_replicas"] == 4
    assert len(doc["schedulers"]) == 5
    some = (await get(node, "/api/status?contains=d4")).json()
    assert [d["name"] for d in some["deployments"]] == [f"d4{i}" for i in range(10)]
    assert some["more"]["deployments"] == 0 and len(some["deployments"][0]["replicas"]) == 5
    built.clear()
    whole = (await get(node, "/api/status")).json()
    assert len(built) == 5 * len(NAMES) and "more" not in whole  # as before, for its clients
    for query in ("limit=0", "limit=1001", "replicas=-1", "limit=x"):
        refused = await get(node, f"/api/status?{query}")
        assert refused.status_code == 400 and refused.json()["error"].startswith(query.split("=")[0])


async def test_a_brief_status_reads_no_replica(node: HeadNode, built: list[str]) -> None:
    """What a model repository's index reads: names and pending reasons."""
    node.state.pending_reasons["d03"] = "FAILED: it crashed"
    service = HeadService(node)
    brief = await service.GetStatus(pb.StatusRequest(brief=True), context=None)  # type: ignore[arg-type]
    assert built == [] and not brief.schedulers and not brief.events
    assert [d.name for d in brief.deployments] == sorted(NAMES)
    assert {d.name: d.pending_reason for d in brief.deployments if d.pending_reason} == {
        "d03": "FAILED: it crashed"
    }
    assert all(not d.replicas and not d.spec_json for d in brief.deployments)


async def test_the_schedulers_allocations_are_summed_again_only_where_replicas_changed(
    node: HeadNode,
) -> None:
    """Every status read, even of one deployment, and every /metrics scrape summed every
    replica's resources (8 ms at 10,000 replicas)."""
    table = node.state.replicas
    first = node.state.allocations()
    assert first == {
        sid: Capacity.total(r.resources for r in table.values() if r.scheduler_id == sid) for sid in first
    }
    before = table.summed
    assert (await get(node, "/api/deployments/d01")).status_code == 200
    assert (await get(node, "/metrics")).status_code == 200
    assert table.summed == before  # nothing changed: nothing summed
    rec = table["d01-0"]
    del table["d01-0"]
    after = node.state.allocations()
    assert table.summed == before + len(table.on(rec.scheduler_id))
    assert after[rec.scheduler_id] == Capacity.total(r.resources for r in table.on(rec.scheduler_id))

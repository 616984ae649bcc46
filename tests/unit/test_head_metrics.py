"""The head's ``/metrics``. It was a prometheus_client collector over the cluster's whole
typed status (``status_of``): 210 ms of the head's event loop per scrape at 10,000 replicas.
Now ``HeadMetrics`` writes the text itself; these tests hold it to the text the collector
wrote (built here the old way, from the status), and count the work a scrape does."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shoal import metrics
from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.cluster import READY, STARTING, ReplicaReport
from shoal.core.placement import Capacity
from shoal.core.spec import DeploymentSpec
from shoal.core.states import ReplicaState, SchedulerState
from shoal.head import node as node_module
from shoal.head.node import HeadNode, status_of
from shoal.http.head import head_app
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers
from shoal.types import SchedulerRegistration
from tests.unit.conftest import make_spec

pytestmark = pytest.mark.timeout(10)

BROKEN_ROW = '{"name":"poison","backend":"python","model":"echo:Echo","replicas":0,"timeout_s":null}'


class StatusCollector(Collector):
    """The head's collector before HeadMetrics: its families from the typed status."""

    def __init__(self, node: HeadNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        status = status_of(self.node)
        schedulers = GaugeMetricFamily("shoal_schedulers", "Schedulers by state.", labels=["state"])
        counts = Counter(s.state for s in status.schedulers)
        for sched_state in SchedulerState:
            schedulers.add_metric([sched_state], counts[sched_state])
        yield schedulers
        replicas = GaugeMetricFamily(
            "shoal_replicas", "Replicas in the cluster by state.", labels=["deployment", "state"]
        )
        target = GaugeMetricFamily(
            "shoal_deployment_target_replicas", "Replicas each deployment should have.", labels=["deployment"]
        )
        for dep in status.deployments:
            if not dep.spec:
                continue
            by_state = Counter(r.state for r in dep.replicas)
            for s in (ReplicaState.PENDING, *metrics.STATES):
                replicas.add_metric([dep.name, s], by_state[s])
            target.add_metric([dep.name], dep.target_replicas)
        yield replicas
        yield target
        decisions = CounterMetricFamily(
            "shoal_autoscaler_decisions",
            "Replica count changes by the autoscaler.",
            labels=["deployment", "direction"],
        )
        for (name, direction), n in self.node.scale_decisions.items():
            decisions.add_metric([name, direction], n)
        yield decisions
        res = GaugeMetricFamily(
            "shoal_scheduler_resources",
            "Each live scheduler's resources for replicas.",
            labels=["scheduler", "resource", "kind"],
        )
        for sched in status.schedulers:
            if sched.state != SchedulerState.ALIVE:
                continue
            for resource in ("cpus", "memory_mb", "gpus"):
                c, u = getattr(sched.capacity, resource), getattr(sched.allocated, resource)
                res.add_metric([sched.id, resource, "capacity"], c)
                res.add_metric([sched.id, resource, "allocated"], u)
                res.add_metric([sched.id, resource, "free"], c - u)
        yield res


def expected(node: HeadNode) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(node))
    return generate_latest(registry)


def report(rid: str, spec: DeploymentSpec, state: ReplicaState = READY) -> ReplicaReport:
    return ReplicaReport(rid, spec.name, state, address=f"{rid}:9000", spec_hash=spec.process_hash())


async def join(node: HeadNode, sid: str, *replicas: ReplicaReport) -> None:
    await node.register_scheduler(
        SchedulerRegistration(
            sid, f"{sid}:7000", f"{sid}:7001", Capacity(8, 8192, 1), pid=1, hostname="h", replicas=replicas
        )
    )


@pytest.fixture
async def head(store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock) -> AsyncIterator[HeadNode]:
    await store.put("deployments/poison", BROKEN_ROW)  # broken: no target, no lines
    node = HeadNode(Settings(), store, fleet, clock)
    await node.start()
    yield node
    await node.aclose()


async def test_the_text_is_what_the_status_collector_wrote(head: HeadNode, clock: FakeClock) -> None:
    echo = make_spec("echo", replicas=3)
    auto = make_spec("auto", replicas=1, autoscaling={"min_replicas": 1, "max_replicas": 4})
    await head.apply(echo)
    await head.apply(auto)
    ghost = make_spec("ghost")  # known only to a scheduler: not in the store, no target
    # A scheduler id the text format must escape (a quote, a backslash, a newline). The head
    # refuses such an id at its door (shoal.core.reports), so it goes into its state directly.
    odd = 'rack "a"\\1\n'
    await join(head, "s1", report("echo-1", echo), report("echo-2", echo, STARTING), report("ghost-1", ghost))
    head.state.register(
        odd, "odd:7000", "odd:7001", Capacity(8, 8192, 1), pid=1, replicas=[report("auto-1", auto)]
    )
    await join(head, "s3")
    clock.advance(head.settings.dead_after_s + 60)
    await head.scheduler_health("s1", 0, [report("echo-1", echo), report("echo-2", echo, STARTING)])
    head.state.health(odd, 0, [report("auto-1", auto)])
    # s3 is dead; echo's third replica is placed (PENDING: its creation is not confirmed yet).
    await head.reconcile_once(wait_acts=False)
    head.targets["auto"] = 4  # as the autoscaler sets it
    head.scale_decisions[("auto", "up")] += 3

    text = metrics.HeadMetrics(head).text()

    assert text == expected(head)
    lines = text.decode().splitlines()
    assert 'shoal_replicas{deployment="echo",state="PENDING"} 1.0' in lines
    assert 'shoal_replicas{deployment="echo",state="STARTING"} 1.0' in lines
    assert 'shoal_schedulers{state="DEAD"} 1.0' in lines
    assert 'shoal_deployment_target_replicas{deployment="auto"} 4.0' in lines
    assert 'shoal_autoscaler_decisions_total{deployment="auto",direction="up"} 3.0' in lines
    assert (
        'shoal_scheduler_resources{kind="capacity",resource="gpus",scheduler="rack \\"a\\"\\\\1\\n"} 1.0'
        in lines
    )
    assert not [line for line in lines if "poison" in line or "ghost" in line]


async def test_a_scrape_writes_again_only_the_deployments_that_changed(
    head: HeadNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted, not timed: the typed status is never built, and a deployment's lines are
    written again only when its replicas' states or its target changed."""
    specs = [make_spec(f"d{i}", replicas=2) for i in range(20)]
    for spec in specs:
        await head.apply(spec)
    await join(head, "s1", *(report(f"{s.name}-{r}", s) for s in specs for r in range(2)))
    written: list[str] = []
    real = metrics._samples

    def counted(name: str, labels: tuple[str, ...], samples: Iterable[Any]) -> list[str]:
        rows = list(samples)
        written.extend(f"{name} {values[0]}" for values, _ in rows if name == "shoal_replicas")
        return real(name, labels, rows)

    def no_status(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("/metrics built the cluster's status")

    transport = httpx.ASGITransport(app=head_app(head))
    async with httpx.AsyncClient(transport=transport, base_url="http://head") as client:
        monkeypatch.setattr(metrics, "_samples", counted)
        monkeypatch.setattr(node_module, "status_of", no_status)
        first = await client.get("/metrics")
        assert len(written) == 20 * 6  # six states of each deployment
        written.clear()
        again = await client.get("/metrics")
        assert written == [] and again.text == first.text
        await head.scale("d3", 3)
        await head.scheduler_health(
            "s1", 0, [report(f"{s.name}-{r}", s) for s in specs for r in range(2)][2:]
        )
        changed = await client.get("/metrics")
        monkeypatch.undo()

    assert sorted(set(written)) == ["shoal_replicas d0", "shoal_replicas d3"]
    assert changed.text.encode() == expected(head)
    assert 'shoal_deployment_target_replicas{deployment="d3"} 3.0' in changed.text
    assert 'shoal_replicas{deployment="d0",state="READY"} 0.0' in changed.text


async def test_a_deleted_deployment_leaves_the_text(head: HeadNode) -> None:
    """Its autoscaler decisions stayed, a series for every deployment ever deleted (a preview
    deployment per pull request, say) for as long as the head ran."""
    await head.apply(make_spec("pr-1", replicas=1))
    head.scale_decisions[("pr-1", "up")] += 2
    assert "pr-1" in metrics.HeadMetrics(head).text().decode()
    await head.delete("pr-1")
    assert "pr-1" not in metrics.HeadMetrics(head).text().decode()
    # One created again under its name starts from nothing.
    await head.apply(make_spec("pr-1", replicas=1))
    assert "shoal_autoscaler_decisions_total{" not in metrics.HeadMetrics(head).text().decode()

"""Ingress workers without processes: the main process's hub and a worker over in-memory links."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping

import pytest

from shoal.config import Settings
from shoal.core import payload
from shoal.core.alive import process_runs
from shoal.core.stats import DeploymentStats
from shoal.errors import ResourceExhausted, Unavailable
from shoal.scheduler.ingress import Counts, IngressHub, IngressWorker, ingress_processes, snapshot
from shoal.scheduler.models import ModelCatalog
from shoal.scheduler.router import Router
from shoal.testing.fakes import FakeReplicas
from shoal.testing.wait import until
from shoal.types import RoutingTable
from tests.unit.conftest import make_spec

pytestmark = pytest.mark.timeout(10)


def counts(ok: int, in_flight: int = 0) -> Counts:
    stats = DeploymentStats()
    stats.outcomes["ok"] = ok
    return Counts(stats=stats, in_flight=in_flight, success=ok)


def test_a_restarted_workers_counts_add_to_what_it_counted_before() -> None:
    hub = IngressHub(Router("s1", Settings(), FakeReplicas()))
    own = {"echo": counts(1)}
    hub.report("w1", pid=100, counts={"echo": counts(5, in_flight=2)})
    assert hub.totals(own)["echo"].stats.outcomes["ok"] == 6
    assert hub.totals(own)["echo"].in_flight == 2
    # The worker died and came back (a new pid): its old counts stay, its in-flight goes.
    hub.report("w1", pid=101, counts={"echo": counts(3)})
    total = hub.totals(own)["echo"]
    assert (total.stats.outcomes["ok"], total.success, total.in_flight) == (9, 9, 0)
    # Exited for good: still counted.
    hub.forget("w1")
    assert hub.totals(own)["echo"].stats.outcomes["ok"] == 9


def test_a_report_that_arrives_after_its_worker_exited_is_not_counted_twice() -> None:
    """A worker killed right after it sent a report: the main process can read that report
    after it saw the process exit (``forget``). It was then taken for the worker's running
    incarnation, and counted again when the new one reported: shoal_requests_total jumped
    by everything that worker had counted (5 requests read as 10 here)."""
    hub = IngressHub(Router("s1", Settings(), FakeReplicas()))
    own = {"echo": counts(0)}
    hub.report("w1", pid=100, counts={"echo": counts(5)})
    hub.forget("w1")
    hub.report("w1", pid=100, counts={"echo": counts(5)})  # sent before it died, read after
    assert hub.totals(own)["echo"].stats.outcomes["ok"] == 5
    hub.report("w1", pid=101, counts={"echo": counts(1)})  # the new worker
    assert hub.totals(own)["echo"].stats.outcomes["ok"] == 6


def test_totals_cover_the_main_processs_deployments_only() -> None:
    hub = IngressHub(Router("s1", Settings(), FakeReplicas()))
    hub.report("w1", pid=1, counts={"gone": counts(4), "echo": counts(1)})
    assert set(hub.totals({"echo": counts(0)})) == {"echo"}


async def test_the_main_process_knows_when_every_running_worker_routes_by_a_table() -> None:
    # What a scheduler waits for before it tells the head it routes by a table (a control
    # call waits on that): a worker's report says the table version it routes by.
    hub = IngressHub(Router("s1", Settings(), FakeReplicas()))
    hub.report("w1", pid=1, counts={}, table_version=5)
    hub.report("w2", pid=2, counts={}, table_version=4)
    assert not await hub.routed_by_workers(5, timeout_s=0.05)

    waiting = asyncio.create_task(hub.routed_by_workers(5, timeout_s=5.0))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    hub.report("w2", pid=2, counts={}, table_version=5)
    assert await asyncio.wait_for(waiting, 1.0)

    hub.report("w2", pid=2, counts={}, table_version=5)
    hub.forget("w1")  # exited: not waited for
    hub.report("w2", pid=2, counts={}, table_version=6)
    assert await hub.routed_by_workers(6, timeout_s=0.05)


def test_the_default_is_one_process_per_cpu_and_at_most_eight() -> None:
    assert 1 <= ingress_processes(Settings()) <= 8
    assert ingress_processes(Settings(ingress_workers=3)) == 3


class Link:
    """The main process, in memory: a queue of tables, and the hub they report to."""

    def __init__(self, hub: IngressHub) -> None:
        self.hub = hub
        self.tables: asyncio.Queue[RoutingTable | None] = asyncio.Queue()
        self.gone = False

    async def watch(self) -> AsyncIterator[RoutingTable]:
        while not self.gone and (table := await self.tables.get()) is not None:
            yield table
        self.gone = True  # and it stays unreachable
        raise Unavailable("the main process went away")

    async def report(self, counts: Mapping[str, Counts], table_version: int = 0) -> dict[str, Counts]:
        self.hub.report("w1", 1, dict(counts))
        return self.hub.totals({})

    async def metrics(self) -> tuple[bytes, str]:
        return b"", "text/plain"

    async def close(self) -> None:
        pass


async def test_a_worker_routes_by_the_table_with_its_share_of_the_limits() -> None:
    settings = Settings(ingress_workers=2, orphan_after_s=0.3)
    fakes = FakeReplicas()
    main = Router("s1", settings, fakes)
    main.add("a", make_spec(max_ongoing_requests=2, max_queued_requests=2), "a:1", "s1")
    hub = IngressHub(main)
    link = Link(hub)
    worker = IngressWorker(settings, "s1", link, fakes)
    run = asyncio.create_task(worker.run())
    await link.tables.put(hub.table(version=1))
    await asyncio.wait_for(worker.registered.wait(), 2)

    replica = fakes.clients["a:1"]
    replica.gate = asyncio.Event()
    x = payload.from_arrays({"x": [[1.0]]})
    # Its share: one of the replica's 2 slots, one of the deployment's 2 queue places.
    running = asyncio.create_task(worker.router.send("echo", x))
    queued = asyncio.create_task(worker.router.send("echo", x))
    await replica.wait_for_requests(1)
    await until(lambda: worker.router.load()["echo"].queued == 1, "the second request queued")
    with pytest.raises(ResourceExhausted, match="this process's share of 1"):
        await worker.router.send("echo", x)
    replica.gate.set()
    await asyncio.gather(running, queued)

    # Its counts reach the hub.
    await worker.refresh()
    assert hub.totals(snapshot(main, ModelCatalog(main)))["echo"].stats.outcomes["ok"] == 2

    # A deployment that leaves the table goes from the worker's router too.
    await link.tables.put(dataclasses.replace(hub.table(version=2), deployments={}))
    for _ in range(100):
        if not worker.router.deployments():
            break
        await asyncio.sleep(0.01)
    assert worker.router.deployments() == {}

    # The main process is gone: the worker stops after orphan_after_s.
    await link.tables.put(None)
    await asyncio.wait_for(run, 3)
    await worker.aclose()
    await main.aclose()


async def test_a_worker_whose_main_process_is_gone_stops_though_its_table_stream_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A stream may outlive the main process (one to another scheduler that took over its
    # address streams that one's tables): the worker looks at the process itself too.
    monkeypatch.setattr(IngressWorker, "MAIN_CHECK_S", 0.05)
    settings = Settings(ingress_workers=2, orphan_after_s=60)
    fakes = FakeReplicas()
    main = Router("s1", settings, fakes)
    hub = IngressHub(main)
    link = Link(hub)
    alive = [True]
    worker = IngressWorker(settings, "s1", link, fakes, lambda: alive[0])
    run = asyncio.create_task(worker.run())
    await link.tables.put(hub.table(version=1))
    await asyncio.wait_for(worker.registered.wait(), 2)
    for version in range(2, 5):  # the stream goes on, its tables come
        await link.tables.put(hub.table(version=version))
    await asyncio.sleep(0.2)
    assert not run.done()

    alive[0] = False
    await asyncio.wait_for(run, 2)
    await worker.aclose()
    await main.aclose()


async def test_a_worker_whose_main_process_died_before_the_worker_looked_stops_at_once() -> None:
    """Killed while its worker was still starting (seen under CPU load), the main process was
    gone when the worker first looked: "not known", so the worker ran on until orphan_after_s,
    holding the shared ports against a scheduler started again on them."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # gone, and reaped: its number names no process now
    settings = Settings(ingress_workers=2, orphan_after_s=60)
    fakes = FakeReplicas()
    main = Router("s1", settings, fakes)
    link = Link(IngressHub(main))
    link.gone = True  # its control port answers no more
    worker = IngressWorker(settings, "s1", link, fakes, process_runs(child.pid))
    await asyncio.wait_for(worker.run(), 2)
    await worker.aclose()
    await main.aclose()


async def test_a_request_waiting_in_a_worker_at_zero_replicas_is_reported_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scale from zero: a request that starts waiting in an ingress worker for a deployment
    with no replica is reported to the main process at once, and the main process tells the
    head at once (``on_starved``), as for a request waiting in the main process itself.
    Before, it waited for the worker's next report (every 0.5 s) and then the main process's
    next heartbeat (1 s): cold starts through a worker took 0.76 s and 1.15 s where those
    through the main process took 0.05 s."""
    monkeypatch.setattr(IngressWorker, "REPORT_EVERY_S", 60.0)  # only the waiting one reports
    settings = Settings(ingress_workers=2)
    fakes = FakeReplicas()
    main = Router("s1", settings, fakes)
    main.know(make_spec())  # the deployment, scaled to zero: no replica
    starved: list[int] = []
    hub = IngressHub(main, on_starved=lambda: starved.append(1))
    link = Link(hub)
    worker = IngressWorker(settings, "s1", link, fakes)
    run = asyncio.create_task(worker.run())
    await link.tables.put(hub.table(version=1))
    await asyncio.wait_for(worker.registered.wait(), 2)
    x = payload.from_arrays({"x": [[1.0]]})
    waiting = asyncio.create_task(worker.router.send("echo", x, timeout_s=30))
    await until(lambda: bool(starved), "the main process told that a request waits with no replica")
    assert hub.totals(snapshot(main, ModelCatalog(main)))["echo"].queued == 1
    # Reports of requests waiting while a replica serves are no news: no report at once.
    main.add("a", make_spec(), "a:1", "s1")
    await link.tables.put(hub.table(version=2))
    await waiting
    hub.report("w1", 1, {"echo": dataclasses.replace(counts(0), queued=3)})
    assert len(starved) == 1
    waiting.cancel()
    run.cancel()
    await worker.aclose()
    await main.aclose()

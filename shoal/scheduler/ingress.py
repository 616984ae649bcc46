"""Ingress on every core: what a scheduler's ingress workers share with its main process.

A scheduler may serve its inference ports (OIP gRPC + native, OIP REST + OpenAI) from
several processes that share them (SO_REUSEPORT: the kernel spreads connections over
the processes). The main process keeps everything else (the replica supervisor, the head
link, the control port). Each worker routes on its own, over its own streams to the
replicas, from the table the main process pushes it (:meth:`IngressHub.table`: every
READY replica, this machine's and other schedulers').

Limits hold in total because each of the ``N`` processes takes its share:
``max_ongoing_requests`` per replica and ``max_queued_requests`` per deployment are
divided by ``N``, rounded up (so the total is at most ``N - 1`` over the setting).
Counts are summed: every worker reports what it counted (cumulative, :class:`Counts`)
twice a second and on every statistics or metrics request, and gets the sum back
(:meth:`IngressHub.totals`); a restarted worker's old counts are kept, so counters only
grow. Metrics pages and Triton statistics show the sum whichever process answers.

Plain data and logic; the gRPC service and client are in ``shoal.rpc.ingress``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from shoal.auth import InferenceAuth
from shoal.config import Settings
from shoal.core.clock import Signal, SystemClock, wait_for
from shoal.core.spec import DeploymentSpec
from shoal.core.stats import OUTCOMES, DeploymentStats, Histogram
from shoal.errors import ShoalError
from shoal.scheduler.dataplane import DataPlane
from shoal.scheduler.models import ModelCatalog
from shoal.scheduler.router import Router
from shoal.types import DeploymentRoutes, LoadReport, ReplicaClient, Route, RoutingTable

log = logging.getLogger("shoal.ingress")

REAL_TIME = SystemClock()


@dataclass
class Counts:
    """What one process counted for one deployment (cumulative, except ``in_flight`` and
    ``queued``, which are now)."""

    stats: DeploymentStats = field(default_factory=DeploymentStats)
    in_flight: int = 0
    queued: int = 0
    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    inferences: int = 0
    last_ms: int = 0
    # Traffic routes: requests each route sent to this deployment (route -> count), and copies
    # it got as a route's shadow ("route/outcome" -> count).
    routed: dict[str, int] = field(default_factory=dict)
    shadowed: dict[str, int] = field(default_factory=dict)

    def load(self) -> LoadReport:
        return LoadReport(
            in_flight=self.in_flight,
            queued=self.queued,
            requests=self.stats.requests,
            errors=self.stats.errors,
            latency=tuple(self.stats.latency.counts),
        )


# The most a summed count may be: what an int64 field carries (IngressTotals; Triton's
# statistics are uint64). A sum past it stays at it instead of failing every later total.
MAX_SUM = 2**63 - 1


def _sum(a: int, b: int) -> int:
    return min(a + b, MAX_SUM)


def _add_histogram(a: Histogram, b: Histogram) -> Histogram:
    counts = [_sum(x, y) for x, y in zip(a.counts, b.counts, strict=True)]
    return Histogram(counts=counts, total=a.total + b.total)


def add(a: Counts, b: Counts) -> Counts:
    outcomes = {k: _sum(a.stats.outcomes.get(k, 0), b.stats.outcomes.get(k, 0)) for k in OUTCOMES}
    stats = DeploymentStats(
        outcomes=outcomes,
        latency=_add_histogram(a.stats.latency, b.stats.latency),
        queue=_add_histogram(a.stats.queue, b.stats.queue),
        given_up=_sum(a.stats.given_up, b.stats.given_up),
    )
    return Counts(
        stats=stats,
        in_flight=_sum(a.in_flight, b.in_flight),
        queued=_sum(a.queued, b.queued),
        success=_sum(a.success, b.success),
        success_ns=_sum(a.success_ns, b.success_ns),
        fail=_sum(a.fail, b.fail),
        fail_ns=_sum(a.fail_ns, b.fail_ns),
        inferences=_sum(a.inferences, b.inferences),
        last_ms=max(a.last_ms, b.last_ms),
        routed=_add_counts(a.routed, b.routed),
        shadowed=_add_counts(a.shadowed, b.shadowed),
    )


def _add_counts(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    return {k: _sum(a.get(k, 0), b.get(k, 0)) for k in {*a, *b}}


def total(parts: Iterable[Mapping[str, Counts]]) -> dict[str, Counts]:
    out: dict[str, Counts] = {}
    for part in parts:
        for name, counts in part.items():
            out[name] = add(out[name], counts) if name in out else counts
    return out


def snapshot(router: Router, catalog: ModelCatalog) -> dict[str, Counts]:
    """This process's counts, per deployment its router knows."""
    load = router.load()
    stats = router.stats()
    routed: dict[str, dict[str, int]] = {}
    for (route, target), n in router.routed.items():
        routed.setdefault(target, {})[route] = n
    shadowed: dict[str, dict[str, int]] = {}
    for (route, target, outcome), n in router.shadowed.items():
        shadowed.setdefault(target, {})[f"{route}/{outcome}"] = n
    out: dict[str, Counts] = {}
    for name, s in stats.items():
        c = catalog.counters(name)
        now = load.get(name)
        out[name] = Counts(
            stats=dataclasses.replace(
                s,
                outcomes=dict(s.outcomes),
                latency=Histogram(list(s.latency.counts), s.latency.total),
                queue=Histogram(list(s.queue.counts), s.queue.total),
            ),
            in_flight=now.in_flight if now else 0,
            queued=now.queued if now else 0,
            success=c.success,
            success_ns=c.success_ns,
            fail=c.fail,
            fail_ns=c.fail_ns,
            inferences=c.inferences,
            last_ms=c.last_ms,
            routed=routed.get(name, {}),
            shadowed=shadowed.get(name, {}),
        )
    return out


def ingress_processes(settings: Settings) -> int:
    """How many processes serve a scheduler's ingress ports: ``ingress_workers``, or with 0
    one per CPU, at most 4. Measured on 2 CPUs (perf_analyzer gRPC c=32, batching, A B A B
    with one process then two): two served 3-27% more requests a second (noop 1,440 and
    2,053 against 1,346 and 1,622; sklearn 1,166 and 1,442 against 1,130 and 1,286), and each
    costs about 55 MB PSS at idle, hence the cap."""
    n = settings.ingress_workers
    if n <= 0:
        n = min(4, os.cpu_count() or 1)
    return max(1, n)


class IngressHub:
    """The main process's side: the workers' latest reports and the table they route by.

    Safe on one event loop. ``report`` keeps, per worker id, the counts of its running
    incarnation (by pid), those of the incarnation that exited last, and the sum of those
    before, so a restarted worker's counts add to, never replace, what it counted before.
    A report read after its process exited (sent just before a kill) refreshes that
    incarnation's counts; it used to be taken for a running one and counted twice.
    """

    def __init__(self, router: Router, on_starved: Callable[[], None] | None = None) -> None:
        """``on_starved``: called when a worker reports requests waiting for a deployment of
        which no replica takes requests (scaled to zero), so that the head hears of it now."""
        self._router = router
        self._on_starved = on_starved
        self._head_table = RoutingTable(version=0)
        self._latest: dict[str, tuple[int, dict[str, Counts]]] = {}
        self._exited: dict[str, tuple[int, dict[str, Counts]]] = {}
        self._before: dict[str, Counts] = {}
        self._heard: dict[str, tuple[int, float]] = {}
        self._tables: dict[str, int] = {}  # per worker: the replica table version it routes by
        self._tables_changed = Signal()
        self.ack = False  # the tables pushed to workers ask them to report at once

    def set_head_table(self, table: RoutingTable) -> None:
        """The head's last table: where the tokens the workers check come from."""
        self._head_table = table

    def table(self, version: int) -> RoutingTable:
        """Every deployment this scheduler routes to, with its accepting replicas (this
        machine's and others'), and the head's tokens."""
        deployments: dict[str, DeploymentRoutes] = {}
        for name, spec in self._router.deployments().items():
            head = self._head_table.deployments.get(name)
            routes = tuple(
                Route(h.replica_id, h.address, h.scheduler_id, h.in_flight, h.revision)
                for h in self._router.handles(name)
            )
            allowed = head.allowed_tokens if head is not None else ()
            revision = head.revision if head is not None else 0
            deployments[name] = DeploymentRoutes(
                spec=spec,
                routes=routes,
                allowed_tokens=allowed,
                revision=revision,
                failed=head.failed if head is not None else "",
            )
        return RoutingTable(
            version=version,
            deployments=deployments,
            token_hashes=self._head_table.token_hashes,
            traffic=self._router.traffic(),
            ack=self.ack,
        )

    def report(self, worker_id: str, pid: int, counts: dict[str, Counts], table_version: int = 0) -> None:
        exited = self._exited.get(worker_id)
        if exited is not None and exited[0] == pid:
            self._exited[worker_id] = (pid, _past(counts))  # read late: the same incarnation
            return
        self._tables[worker_id] = table_version
        self._tables_changed.fire()
        previous = self._latest.get(worker_id)
        if previous is not None and previous[0] != pid:
            # A new incarnation of this worker: what the old one counted stays counted.
            self._retire(worker_id, previous)
        self._latest[worker_id] = (pid, counts)
        self._heard[worker_id] = (pid, time.monotonic())
        if self._on_starved is not None and any(
            c.queued and not self._router.ready_count(name) for name, c in counts.items()
        ):
            self._on_starved()

    def heard(self, worker_id: str, pid: int) -> float | None:
        """When (``time.monotonic``) the worker's process ``pid`` last reported; None if never."""
        heard = self._heard.get(worker_id)
        return heard[1] if heard is not None and heard[0] == pid else None

    def forget(self, worker_id: str) -> None:
        """A worker exited: keep its counts (cumulative), drop its in-flight figures."""
        previous = self._latest.pop(worker_id, None)
        self._heard.pop(worker_id, None)
        self._tables.pop(worker_id, None)
        if previous is not None:
            self._retire(worker_id, previous)
        self._tables_changed.fire()

    async def routed_by_workers(self, version: int, timeout_s: float) -> bool:
        """Wait until every running worker said it routes by replica table ``version`` or a
        newer one (a worker not heard from yet gets the newest when it connects); False after
        ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while any(self._tables.get(w, 0) < version for w in self._latest):
            left = deadline - loop.time()
            if left <= 0:
                return False
            await self._tables_changed.wait(left, REAL_TIME)
        return True

    def _retire(self, worker_id: str, incarnation: tuple[int, dict[str, Counts]]) -> None:
        """``incarnation`` (pid, counts) exited: the one that exited before it is added up."""
        older = self._exited.get(worker_id)
        if older is not None:
            self._before = total([self._before, older[1]])
        pid, counts = incarnation
        self._exited[worker_id] = (pid, _past(counts))

    def totals(self, own: Mapping[str, Counts]) -> dict[str, Counts]:
        """``own`` (the main process's counts) plus every worker's, living and gone,
        for the deployments the main process knows."""
        parts = [
            own,
            self._before,
            *(counts for _, counts in self._exited.values()),
            *(counts for _, counts in self._latest.values()),
        ]
        summed = total(parts)
        return {name: summed[name] for name in own}


def _past(counts: Mapping[str, Counts]) -> dict[str, Counts]:
    """The counts of a process that exited: its in-flight and queued figures are not "now"."""
    return {n: dataclasses.replace(c, in_flight=0, queued=0) for n, c in counts.items()}


class IngressNode(Protocol):
    """What the ingress adapters (gRPC and HTTP) need of a scheduler process: the main
    process (``SchedulerNode``) and an :class:`IngressWorker` both have it."""

    settings: Settings
    id: str
    router: Router
    catalog: ModelCatalog
    dataplane: DataPlane
    inference_auth: InferenceAuth


class IngressLinkLike(Protocol):
    """A worker's connection to its main process (``shoal.rpc.ingress.IngressLink``)."""

    def watch(self) -> AsyncIterator[RoutingTable]: ...

    async def report(self, counts: Mapping[str, Counts], table_version: int = 0) -> dict[str, Counts]: ...

    async def metrics(self) -> tuple[bytes, str]: ...

    async def close(self) -> None: ...


class IngressWorker:
    """One ingress worker: routes the requests of the connections the kernel gives it, by
    the table its main process pushes, with its share of the limits.

    It has what the ingress adapters need of a scheduler (``settings``, ``id``, ``router``,
    ``catalog``, ``dataplane``, ``inference_auth``, ``registered``) and no supervisor.
    :meth:`run` follows the main process's table and reports counts; it returns (and the
    worker should exit) when the main process has been unreachable ``orphan_after_s``.
    """

    REPORT_EVERY_S = 0.5
    MAIN_CHECK_S = 0.5  # how often a worker looks whether its main process still runs
    REPORT_GAP_S = 0.02
    """Least time between two reports: requests starting to wait at zero replicas, each of
    which asks for a report at once, make one every 20 ms at most."""

    def __init__(
        self,
        settings: Settings,
        scheduler_id: str,
        link: IngressLinkLike,
        replica_client: Callable[[str], ReplicaClient],
        main_runs: Callable[[], bool] | None = None,
    ) -> None:
        """``main_runs``: whether the main process still runs (None: not known)."""
        self.settings = settings
        self.id = scheduler_id
        self.link = link
        self._main_runs = main_runs
        self.registered = asyncio.Event()  # the first table arrived: ready to route
        # A request that starts waiting for a deployment with no replica is reported at once:
        # the head scales it up from zero when it hears of it (the main process's router
        # tells it the same way).
        self._report_now = asyncio.Event()
        self.router = Router(
            scheduler_id,
            settings,
            replica_client,
            on_starved=self._report_now.set,
            share=ingress_processes(settings),
            table_only=True,
        )
        self.catalog = ModelCatalog(self.router, ready=self._ready, totals=self.refresh)
        self.dataplane = DataPlane(self.router, self.catalog, settings)
        self.inference_auth = InferenceAuth(self._spec_of)
        self._last_contact = 0.0
        self.table_version = 0  # of the replica table it routes by, told with each report

    def _spec_of(self, deployment: str) -> DeploymentSpec | None:
        try:
            return self.router.spec(deployment)
        except ShoalError:
            return None

    def _ready(self) -> bool:
        return self.registered.is_set() and not self.router.draining

    async def refresh(self) -> dict[str, Counts]:
        """Report this worker's counts now; every process's, summed."""
        return await self.link.report(snapshot(self.router, self.catalog), self.table_version)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_contact = loop.time()
        self.router.awaits_table = True  # the main process's tables say which deployments exist
        async with asyncio.TaskGroup() as tasks:
            reporter = tasks.create_task(self._report_loop())
            watching = tasks.create_task(self._watch_loop())
            gone = tasks.create_task(self._until_main_gone())
            await asyncio.wait({watching, gone}, return_when=asyncio.FIRST_COMPLETED)
            for task in (reporter, watching, gone):
                task.cancel()

    async def _until_main_gone(self) -> None:
        """Return once the main process has exited, looked at every MAIN_CHECK_S. The table
        stream ending says so too, but a stream may stay open when the process is gone: one
        to another scheduler that took over its control address (ports are reused under
        load) streams that scheduler's tables, for good. Seen: a worker outlived its main
        process killed with SIGKILL by over 30 s, once in a loaded test run."""
        runs = self._main_runs
        if runs is None:
            await asyncio.Event().wait()  # not known: the stream alone tells
            return
        while runs():
            await asyncio.sleep(self.MAIN_CHECK_S)
        log.error("ingress worker: the scheduler's main process has exited; exiting")

    async def _watch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() - self._last_contact < self.settings.orphan_after_s:
            try:
                async for table in self.link.watch():
                    self._last_contact = loop.time()
                    self.inference_auth.apply_table(table)
                    await self.router.apply_table(table)
                    self.table_version = table.version
                    self.registered.set()
                    if table.ack:
                        self._report_now.set()  # the main process waits to tell the head
            except ShoalError as err:
                log.warning("ingress worker: lost the scheduler's main process (%s)", err)
            if self._main_runs is not None and not self._main_runs():
                # It is gone, not slow: leave the shared ports at once, so that a scheduler
                # started again on them is not refused (port in use) by its own old workers.
                # Before, they held them for orphan_after_s (5 s), and a restart right after a
                # kill -9 failed: 'port N is in use (grpc_port)'.
                log.error("ingress worker: the scheduler's main process has exited; exiting")
                return
            await asyncio.sleep(0.1)
        log.error(
            "ingress worker: the scheduler's main process has been unreachable for %.1fs; exiting",
            self.settings.orphan_after_s,
        )

    async def _report_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await wait_for(self._report_now.wait(), self.REPORT_EVERY_S)
            self._report_now.clear()
            try:
                await self.refresh()
            except ShoalError:
                pass  # the watch loop decides when the main process is gone
            await asyncio.sleep(self.REPORT_GAP_S)

    async def aclose(self) -> None:
        await self.router.aclose()
        await self.link.close()

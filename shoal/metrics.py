"""Prometheus metrics, per component instance (no module-level registry, so
tests can run several components in one process).

Collectors read snapshots, copies the components make at scrape time: on a scheduler
the routers' counters and histograms summed over its ingress processes
(``SchedulerNode.totals()``) and ``ReplicaSupervisor.snapshot()``; on the head its typed
status (``shoal.head.node.status_of``, what ``/api/status`` shows). Nothing on the
request path touches prometheus_client.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from shoal.core.states import ReplicaState, SchedulerState
from shoal.core.stats import BUCKETS, Histogram

if TYPE_CHECKING:
    from shoal.head.node import HeadNode
    from shoal.scheduler.ingress import Counts
    from shoal.scheduler.node import SchedulerNode
    from shoal.scheduler.supervisor import ReplicaView

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STATES = (ReplicaState.DOWNLOADING, ReplicaState.STARTING, ReplicaState.READY, ReplicaState.DRAINING)


def _histogram_buckets(counts: Sequence[int], bounds: Sequence[float]) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs from per-bucket counts (the last count is +Inf)."""
    out = []
    running = 0
    for bound, count in zip(bounds, counts, strict=False):
        running += count
        out.append((repr(float(bound)), float(running)))
    out.append(("+Inf", float(sum(counts))))
    return out


def _latency(name: str, doc: str, items: Iterable[tuple[str, Histogram]]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=["deployment"])
    for deployment, hist in items:
        fam.add_metric([deployment], _histogram_buckets(hist.counts, BUCKETS), sum_value=hist.total)
    return fam


MAX_MODEL_ID_LABELS = 100
"""Most ``model_id`` label values per deployment in the multiplexing metrics: the ids with the
most requests (loads plus hits) on this scheduler; the others add up under ``_other``."""
_MULTIPLEXED = (
    ("model_loads", "shoal_multiplexed_model_loads", "Model ids loaded by replicas on this scheduler."),
    ("model_evictions", "shoal_multiplexed_model_evictions", "Model ids evicted (least recently used)."),
    ("model_hits", "shoal_multiplexed_model_hits", "Requests that found their model id loaded."),
)


def _multiplexed(registry: Sequence[ReplicaView]) -> Iterator[Metric]:
    """Loads, evictions and hits per deployment and model id, summed over this scheduler's
    replicas (each replica counts at most 256 ids by name, the rest as ``_other``)."""
    sums: dict[str, dict[str, Counter[str]]] = {}
    for r in registry:
        for attr, _, _ in _MULTIPLEXED:
            sums.setdefault(r.deployment, {}).setdefault(attr, Counter()).update(getattr(r, attr))
    named: dict[str, set[str]] = {}
    for deployment, counts in sums.items():
        busy = counts.get("model_loads", Counter()) + counts.get("model_hits", Counter())
        named[deployment] = {m for m, _ in busy.most_common(MAX_MODEL_ID_LABELS)}
    for attr, name, doc in _MULTIPLEXED:
        fam = CounterMetricFamily(name, doc, labels=["deployment", "model_id"])
        for deployment, counts in sums.items():
            bounded: Counter[str] = Counter()
            for model_id, n in counts.get(attr, Counter()).items():
                bounded[model_id if model_id in named[deployment] else "_other"] += n
            for model_id, n in sorted(bounded.items()):
                fam.add_metric([deployment, model_id], n)
        yield fam


def _traffic(totals: Mapping[str, Counts]) -> Iterator[Metric]:
    """Traffic routes (``shoal route``), summed over the scheduler's ingress processes."""
    routed = CounterMetricFamily(
        "shoal_route_requests", "Requests a traffic route sent to each target.", labels=["route", "target"]
    )
    shadowed = CounterMetricFamily(
        "shoal_shadow_requests",
        "Copies of a traffic route's requests sent to its shadow, by outcome (answers discarded).",
        labels=["route", "target", "outcome"],
    )
    for target, c in sorted(totals.items()):
        for route, n in sorted(c.routed.items()):
            routed.add_metric([route, target], n)
        for key, n in sorted(c.shadowed.items()):
            route, _, outcome = key.partition("/")
            shadowed.add_metric([route, target, outcome], n)
    yield routed
    yield shadowed


class SchedulerCollector(Collector):
    def __init__(self, node: SchedulerNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        totals = node.totals()  # summed over the scheduler's ingress processes
        stats = {name: c.stats for name, c in totals.items()}
        requests = CounterMetricFamily(
            "shoal_requests",
            "Requests routed by this scheduler, by outcome.",
            labels=["deployment", "outcome"],
        )
        for name, s in stats.items():
            for outcome, n in s.outcomes.items():
                requests.add_metric([name, outcome], n)
        yield requests
        given_up = CounterMetricFamily(
            "shoal_requests_given_up",
            "Requests that failed on every replica they were tried on, each of which died or dropped "
            "them (request_attempts): possibly a request that kills replicas.",
            labels=["deployment"],
        )
        for name, s in stats.items():
            given_up.add_metric([name], s.given_up)
        yield given_up
        yield _latency(
            "shoal_request_latency_seconds",
            "Time from ingress to answer, through this scheduler.",
            ((n, s.latency) for n, s in stats.items()),
        )
        yield _latency(
            "shoal_queue_time_seconds",
            "Time a request waited for a replica with room.",
            ((n, s.queue) for n, s in stats.items()),
        )
        in_flight = GaugeMetricFamily(
            "shoal_in_flight_requests", "Requests sent to replicas, not yet answered.", labels=["deployment"]
        )
        queued = GaugeMetricFamily(
            "shoal_queued_requests", "Requests waiting for a replica with room.", labels=["deployment"]
        )
        for name, c in totals.items():
            in_flight.add_metric([name], c.in_flight)
            queued.add_metric([name], c.queued)
        yield in_flight
        yield queued
        yield from _traffic(totals)

        local = node.supervisor.snapshot()
        registry = local.replicas
        replicas = GaugeMetricFamily(
            "shoal_replicas", "Replicas on this scheduler by state.", labels=["deployment", "state"]
        )
        by_state = Counter((r.deployment, r.state) for r in registry)
        for deployment in sorted({r.deployment for r in registry}):
            for state in STATES:
                replicas.add_metric([deployment, state], by_state[(deployment, state)])
        yield replicas
        replica_in_flight = GaugeMetricFamily(
            "shoal_replica_in_flight_requests",
            "Requests in a replica, as its last ping said.",
            labels=["deployment", "replica"],
        )
        for r in registry:
            replica_in_flight.add_metric([r.deployment, r.id], r.in_flight)
        yield replica_in_flight

        batch = HistogramMetricFamily(
            "shoal_batch_size", "Rows per model call in replicas on this scheduler.", labels=["deployment"]
        )
        sizes: dict[str, Counter[int]] = {}
        for r in registry:
            sizes.setdefault(r.deployment, Counter()).update(r.batch_sizes)
        for deployment, counter in sizes.items():
            per_bucket = [0] * len(BATCH_BUCKETS)
            overflow = 0
            total = 0.0
            for size, n in counter.items():
                total += size * n
                idx = next((i for i, b in enumerate(BATCH_BUCKETS) if size <= b), None)
                if idx is None:
                    overflow += n
                else:
                    per_bucket[idx] += n
            batch.add_metric(
                [deployment], _histogram_buckets([*per_bucket, overflow], BATCH_BUCKETS), sum_value=total
            )
        yield batch
        yield from _multiplexed(registry)

        starts = CounterMetricFamily(
            "shoal_replica_starts", "Replica processes started.", labels=["deployment"]
        )
        deaths = CounterMetricFamily(
            "shoal_replica_deaths", "Replicas that died (not stopped on purpose).", labels=["deployment"]
        )
        for name, n in local.starts.items():
            starts.add_metric([name], n)
        for name, n in local.deaths.items():
            deaths.add_metric([name], n)
        yield starts
        yield deaths

        res = GaugeMetricFamily(
            "shoal_scheduler_resources",
            "This scheduler's resources for replicas.",
            labels=["resource", "kind"],
        )
        cap, used = node.capacity, local.allocated
        for resource in ("cpus", "memory_mb", "gpus"):
            c, u = getattr(cap, resource), getattr(used, resource)
            res.add_metric([resource, "capacity"], c)
            res.add_metric([resource, "allocated"], u)
            res.add_metric([resource, "free"], c - u)
        yield res


class HeadCollector(Collector):
    def __init__(self, node: HeadNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        # The typed status (what /api/status shows), built once per scrape in one pass over
        # the replicas: no loop here over schedulers times replicas. Imported here: an
        # ingress worker renders metrics too and should not load the head's code.
        from shoal.head.node import status_of

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
            if not dep.spec:  # broken, or known only to schedulers: no target to show
                continue
            by_state = Counter(r.state for r in dep.replicas)
            for s in (ReplicaState.PENDING, *STATES):
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


def registry(collector: Collector) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg


def render(reg: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(reg), CONTENT_TYPE_LATEST

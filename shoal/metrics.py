"""Prometheus metrics, per component instance (no module-level registry, so
tests can run several components in one process).

Collectors read snapshots, copies the components make at scrape time: on a scheduler
the routers' counters and histograms summed over its ingress processes
(``SchedulerNode.totals()``) and ``ReplicaSupervisor.snapshot()``. The head writes its text
itself (``HeadMetrics``), from its replica table, in the format prometheus_client writes.
Nothing on the request path touches prometheus_client.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from shoal import certwatch
from shoal.core.placement import Capacity
from shoal.core.states import ReplicaState, SchedulerState
from shoal.core.stats import BUCKETS, Histogram
from shoal.errors import InvalidArgument

if TYPE_CHECKING:
    from shoal.head.node import HeadNode
    from shoal.scheduler.ingress import Counts
    from shoal.scheduler.node import SchedulerNode
    from shoal.scheduler.supervisor import ReplicaView

TEXT_TYPE: str = CONTENT_TYPE_LATEST
"""The content type of the text format ``/metrics`` answers in."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STATES = (
    ReplicaState.DOWNLOADING,
    ReplicaState.QUEUED,
    ReplicaState.STARTING,
    ReplicaState.READY,
    ReplicaState.DRAINING,
)


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


def _traffic(totals: Mapping[str, Counts], routes: Container[str]) -> Iterator[Metric]:
    """Traffic routes (``shoal route``), summed over the scheduler's ingress processes: those
    of ``routes`` alone (the routes set now), since a deleted route's series stayed for as
    long as the scheduler ran, a series for each route ever set."""
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
            if route in routes:
                routed.add_metric([route, target], n)
        for key, n in sorted(c.shadowed.items()):
            route, _, outcome = key.partition("/")
            if route in routes:
                shadowed.add_metric([route, target, outcome], n)
    yield routed
    yield shadowed


TLS_EXPIRY = "shoal_tls_cert_expiry_timestamp_seconds"
_TLS_EXPIRY_DOC = (
    "When the TLS certificate this component serves with runs out (or the cluster CA, if "
    "sooner), in seconds since the epoch; follows certificates renewed on disk."
)


def tls_expiry(tls_dir: str, role: str) -> float | None:
    """When ``role``'s certificate in ``tls_dir`` that this process serves runs out (the
    one :mod:`shoal.certwatch` took last; the files looked at again first, at most once a
    second), in seconds since the epoch; None without TLS."""
    if not tls_dir:
        return None
    try:
        return certwatch.watch(tls_dir, role).poll().end.timestamp()
    except InvalidArgument:  # no usable files: this process does not serve with them
        return None


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
        yield from _traffic(totals, node.router.traffic())

        local = node.supervisor.snapshot()
        registry = local.replicas
        # The deployments routed here or with a replica here: a deleted one's starts and
        # deaths were written for as long as the scheduler ran, a series for each ever deleted.
        known = set(totals) | {r.deployment for r in registry}
        # Cumulative counts: of the replicas here and of those that exited.
        counted = [*registry, *(r for r in local.exited if r.deployment in known)]
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
            "shoal_batch_size",
            "Rows per successful model call in replicas on this scheduler.",
            labels=["deployment"],
        )
        sizes: dict[str, Counter[int]] = {}
        for r in counted:
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
        yield from _multiplexed(counted)

        starts = CounterMetricFamily(
            "shoal_replica_starts", "Replica processes started.", labels=["deployment"]
        )
        deaths = CounterMetricFamily(
            "shoal_replica_deaths", "Replicas that died (not stopped on purpose).", labels=["deployment"]
        )
        for name, n in local.starts.items():
            if name in known:
                starts.add_metric([name], n)
        for name, n in local.deaths.items():
            if name in known:
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
        end = tls_expiry(node.settings.tls_dir, "scheduler")
        if end is not None:
            expiry = GaugeMetricFamily(TLS_EXPIRY, _TLS_EXPIRY_DOC, labels=["role"])
            expiry.add_metric(["scheduler"], end)
            yield expiry


_HEAD_REPLICA_STATES = (ReplicaState.PENDING, *STATES)


class HeadMetrics:
    """The head's ``/metrics``: the Prometheus text format, as ``generate_latest`` writes it
    (families in the same order, labels sorted by name, values as Go writes floats).

    Written here, not by a collector: at 10,000 replicas (2,000 deployments) the collector
    built the whole cluster's typed status (``status_of``: a spec dump and a record per
    replica, 65 ms) to count replicas by state, then passed 12,900 samples through
    prometheus_client's families and its exposition (140 ms more): 210 ms of the head's
    event loop per scrape. Now the counts come from one pass over the replica table, and
    each deployment's lines are kept from the scrape before and written again only when its
    counts or its target changed (the deployments of the last scrape alone are kept).

    :meth:`text` runs on the head's event loop and awaits nothing, so the state does not
    change under it; it is not safe to call from another thread."""

    def __init__(self, node: HeadNode) -> None:
        self.node = node
        # deployment -> (its counts by state and its target; its shoal_replicas lines; its
        # shoal_deployment_target_replicas line)
        self._lines: dict[str, tuple[tuple[int, ...], str, str]] = {}

    def text(self) -> bytes:
        node, state = self.node, self.node.state
        out: list[str] = []
        counts = Counter(s.state for s in state.schedulers.values())
        _family(
            out,
            "shoal_schedulers",
            "gauge",
            "Schedulers by state.",
            ("state",),
            (((s,), counts[s]) for s in SchedulerState),
        )

        by_state = Counter((r.deployment, r.state) for r in state.replicas.values())
        kept: dict[str, tuple[tuple[int, ...], str, str]] = {}
        # The store's deployments: a broken one, or one only schedulers know, has no target.
        for name in sorted(node.desired):
            target = node.target_of(node.desired[name])
            key = (*(by_state[(name, s)] for s in _HEAD_REPLICA_STATES), target)
            lines = self._lines.get(name)
            if lines is None or lines[0] != key:
                replicas = _samples(
                    "shoal_replicas",
                    ("deployment", "state"),
                    # key: the counts in the order of the states, then the target
                    (((name, s), n) for s, n in zip(_HEAD_REPLICA_STATES, key, strict=False)),
                )
                targets = _samples("shoal_deployment_target_replicas", ("deployment",), [((name,), target)])
                lines = (key, "".join(replicas), "".join(targets))
            kept[name] = lines
        self._lines = kept
        _head(out, "shoal_replicas", "gauge", "Replicas in the cluster by state.")
        out.extend(lines[1] for lines in kept.values())
        _head(out, "shoal_deployment_target_replicas", "gauge", "Replicas each deployment should have.")
        out.extend(lines[2] for lines in kept.values())
        _family(
            out,
            "shoal_autoscaler_decisions",
            "counter",
            "Replica count changes by the autoscaler.",
            ("deployment", "direction"),
            node.scale_decisions.items(),
        )

        allocated = state.allocations()
        rows: list[tuple[tuple[str, str, str], float]] = []
        for sched in sorted(state.schedulers.values(), key=lambda s: s.id):
            if sched.state != SchedulerState.ALIVE:
                continue
            used = allocated.get(sched.id, Capacity())
            for resource in ("cpus", "memory_mb", "gpus"):
                c, u = getattr(sched.capacity, resource), getattr(used, resource)
                for kind, value in (("capacity", c), ("allocated", u), ("free", c - u)):
                    rows.append(((sched.id, resource, kind), value))
        _family(
            out,
            "shoal_scheduler_resources",
            "gauge",
            "Each live scheduler's resources for replicas.",
            ("scheduler", "resource", "kind"),
            rows,
        )
        end = tls_expiry(node.settings.tls_dir, "head")
        if end is not None:
            _family(out, TLS_EXPIRY, "gauge", _TLS_EXPIRY_DOC, ("role",), [(("head",), end)])
        return "".join(out).encode()


def _family(
    out: list[str],
    name: str,
    kind: str,
    doc: str,
    labels: tuple[str, ...],
    samples: Iterable[tuple[tuple[str, ...], float]],
) -> None:
    """One counter or gauge family in the text format, as ``generate_latest`` writes it."""
    out.extend(_samples(_head(out, name, kind, doc), labels, samples))


def _head(out: list[str], name: str, kind: str, doc: str) -> str:
    """A family's HELP and TYPE lines (``name`` a valid metric name, ``doc`` one line without
    a backslash); the name of its samples: a counter's ends with ``_total``."""
    if kind == "counter":
        name += "_total"
    out.append(f"# HELP {name} {doc}\n")
    out.append(f"# TYPE {name} {kind}\n")
    return name


def _samples(
    name: str, labels: tuple[str, ...], samples: Iterable[tuple[tuple[str, ...], float]]
) -> list[str]:
    """A line per sample: its label values (in the order of ``labels``) escaped and written
    sorted by label name, as ``generate_latest`` does."""
    line = _line(name, labels)
    shown: dict[float, str] = {}  # the values repeat (counts): each formatted once
    out = []
    for values, value in samples:
        text = shown.get(value)
        if text is None:
            text = shown[value] = floatToGoString(value)  # type: ignore[no-untyped-call]
        out.append(line.format(*map(_escape, values), text))
    return out


@functools.cache  # the head's few families
def _line(name: str, labels: tuple[str, ...]) -> str:
    """A sample line to fill in: name{a="{0}",b="{1}"} {2}, each label value by its index."""
    pairs = ",".join(f'{labels[i]}="{{{i}}}"' for i in sorted(range(len(labels)), key=labels.__getitem__))
    return f"{name}{{{{{pairs}}}}} {{{len(labels)}}}\n"


def _escape(value: str) -> str:
    """A label value as the text format quotes it."""
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def registry(collector: Collector) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg


def render(reg: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(reg), TEXT_TYPE

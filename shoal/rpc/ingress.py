"""gRPC between a scheduler's main process and its ingress workers (``shoal.scheduler.ingress``).

The main process serves :class:`IngressService` on its control port: the replica table
(``WatchIngress``, pushed on every change), the sum of every process's counts
(``ReportIngress``), and its Prometheus page (``RenderMetrics``, summed). A worker keeps
one :class:`IngressLink` to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping

import grpc
import grpc.aio

from shoal.config import Settings
from shoal.core.clock import wait_for
from shoal.core.stats import OUTCOMES, DeploymentStats, Histogram
from shoal.errors import InvalidArgument, ShoalError, Unavailable
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.channels import PeerChannel
from shoal.rpc.clients import RoutingTableDecoder
from shoal.rpc.convert import routes_to_pb, table_frame_to_pb
from shoal.rpc.status import Context, abort, to_error
from shoal.scheduler.ingress import Counts, IngressHub
from shoal.types import RoutingTable

log = logging.getLogger("shoal.ingress")

# Without a change, the table is sent again this often: a worker that hears nothing for
# several of these knows its main process is gone.
RESEND_S = 1.0


def _histogram_to_pb(h: Histogram) -> pb.Histogram:
    return pb.Histogram(counts=h.counts, total=h.total)


def _histogram_from_pb(h: pb.Histogram) -> Histogram:
    fresh = Histogram()
    counts = list(h.counts)
    if len(counts) != len(fresh.counts):
        return fresh
    return Histogram(counts=counts, total=h.total)


def counts_to_pb(c: Counts) -> pb.IngressCounts:
    return pb.IngressCounts(
        outcomes=c.stats.outcomes,
        latency=_histogram_to_pb(c.stats.latency),
        queue=_histogram_to_pb(c.stats.queue),
        given_up=c.stats.given_up,
        in_flight=c.in_flight,
        queued=c.queued,
        success=c.success,
        success_ns=c.success_ns,
        fail=c.fail,
        fail_ns=c.fail_ns,
        inferences=c.inferences,
        last_ms=c.last_ms,
        routed=c.routed,
        shadowed=c.shadowed,
    )


def counts_from_pb(m: pb.IngressCounts) -> Counts:
    outcomes = {k: int(m.outcomes.get(k, 0)) for k in OUTCOMES}
    stats = DeploymentStats(
        outcomes=outcomes,
        latency=_histogram_from_pb(m.latency),
        queue=_histogram_from_pb(m.queue),
        given_up=m.given_up,
    )
    return Counts(
        stats=stats,
        in_flight=m.in_flight,
        queued=m.queued,
        success=m.success,
        success_ns=m.success_ns,
        fail=m.fail,
        fail_ns=m.fail_ns,
        inferences=m.inferences,
        last_ms=m.last_ms,
        routed=dict(m.routed),
        shadowed=dict(m.shadowed),
    )


def check_counts(deployment: str, m: pb.IngressCounts) -> None:
    """Raises InvalidArgument naming the field unless every count of ``m`` is >= 0 and its
    histogram totals are finite and >= 0: a negative count, kept and added into every later
    total, broke the statistics built from them (uint64) for good. Sums past int64 stay at
    its maximum (``shoal.scheduler.ingress.MAX_SUM``)."""
    counts: list[tuple[str, int]] = [
        (f, getattr(m, f))
        for f in ("given_up", "in_flight", "queued", "success", "success_ns", "fail", "fail_ns", "inferences")
    ]
    counts += [("last_ms", m.last_ms)]
    for kind in ("outcomes", "routed", "shadowed"):
        counts += [(f"{kind}[{k!r}]", v) for k, v in getattr(m, kind).items()]
    for kind in ("latency", "queue"):
        h: pb.Histogram = getattr(m, kind)
        counts += [(f"{kind}.counts[{i}]", v) for i, v in enumerate(h.counts)]
        if not (math.isfinite(h.total) and h.total >= 0):
            raise InvalidArgument(
                f"deployments[{deployment!r}].{kind}.total must be finite and >= 0, got {h.total}"
            )
    for field, value in counts:
        if value < 0:
            raise InvalidArgument(f"deployments[{deployment!r}].{field} must be >= 0, got {value}")


def table_to_pb(table: RoutingTable) -> pb.RoutingTable:
    """The whole table, as the main process sends it to its ingress workers."""
    msg = table_frame_to_pb(table)
    for name, dep in table.deployments.items():
        msg.deployments[name].CopyFrom(routes_to_pb(dep))
    return msg


class IngressService(pbg.IngressServicer):
    """The main process's side. ``render_metrics`` renders its Prometheus page (which sums
    the workers' counts through ``node.totals()``)."""

    def __init__(
        self,
        hub: IngressHub,
        own: Callable[[], Mapping[str, Counts]],
        table_version: Callable[[], int],
        changed: asyncio.Event,
        render_metrics: Callable[[], tuple[bytes, str]],
    ) -> None:
        self.hub = hub
        self.own = own
        self.table_version = table_version
        self.changed = changed
        self.render_metrics = render_metrics

    async def WatchIngress(
        self, request: pb.IngressHello, context: Context
    ) -> AsyncIterator[pb.RoutingTable]:
        log.info("ingress worker %s (pid %d) is watching the replica table", request.worker_id, request.pid)
        try:
            while True:
                sent = self.table_version()
                yield table_to_pb(self.hub.table(sent))
                # At most one push per 5 ms (a burst of changes makes two: its first at once,
                # the rest together), but a change after a quiet spell goes out at once: a
                # deployment the head just announced is routable in the workers as in this
                # process (it waited 5 ms after every change before). The event is shared by
                # every worker's stream, each of which clears it: whether this stream has a
                # change to send is its own version against the newest.
                await asyncio.sleep(0.005)
                resend_at = asyncio.get_running_loop().time() + RESEND_S
                while self.table_version() == sent:
                    self.changed.clear()
                    left = resend_at - asyncio.get_running_loop().time()
                    if left <= 0:
                        break
                    with contextlib.suppress(TimeoutError):
                        await wait_for(self.changed.wait(), left)
        finally:
            log.info("ingress worker %s stopped watching", request.worker_id)

    async def ReportIngress(self, request: pb.IngressReport, context: Context) -> pb.IngressTotals:
        try:
            for name, c in request.deployments.items():
                check_counts(name, c)
        except ShoalError as err:
            await abort(context, err)
        counts = {name: counts_from_pb(c) for name, c in request.deployments.items()}
        self.hub.report(request.worker_id, request.pid, counts, request.table_version)
        totals = self.hub.totals(self.own())
        return pb.IngressTotals(deployments={n: counts_to_pb(c) for n, c in totals.items()})

    async def RenderMetrics(self, request: pb.Empty, context: Context) -> pb.MetricsText:
        body, content_type = self.render_metrics()
        return pb.MetricsText(body=body, content_type=content_type)


class IngressLink:
    """A worker's connection to its scheduler's main process."""

    def __init__(self, address: str, settings: Settings, worker_id: str, pid: int) -> None:
        self._peer = PeerChannel(address, settings, "scheduler", server="scheduler")
        self._hello = pb.IngressHello(worker_id=worker_id, pid=pid)
        self._timeout = settings.rpc_timeout_s
        self._decoder = RoutingTableDecoder()

    async def watch(self) -> AsyncIterator[RoutingTable]:
        """Tables as the main process pushes them. Raises Unavailable when the stream ends."""
        call = self._stub.WatchIngress(self._hello)
        try:
            async for table in call:
                yield self._decoder.decode(table)
        except grpc.aio.AioRpcError as err:
            raise Unavailable(f"the scheduler's main process: {to_error(err)}") from None
        finally:
            call.cancel()
        raise Unavailable("the scheduler's main process ended the table stream")

    async def report(self, counts: Mapping[str, Counts], table_version: int = 0) -> dict[str, Counts]:
        """Send this worker's counts, and the replica table version it routes by; returns
        every process's counts, summed."""
        request = pb.IngressReport(
            worker_id=self._hello.worker_id,
            pid=self._hello.pid,
            deployments={n: counts_to_pb(c) for n, c in counts.items()},
            table_version=table_version,
        )
        try:
            reply = await self._stub.ReportIngress(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            raise to_error(err) from None
        return {n: counts_from_pb(c) for n, c in reply.deployments.items()}

    async def metrics(self) -> tuple[bytes, str]:
        try:
            reply = await self._stub.RenderMetrics(pb.Empty(), timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            raise to_error(err) from None
        return reply.body, reply.content_type

    @property
    def _stub(self) -> pbg.IngressAsyncStub:
        return self._peer.stub(pbg.IngressStub)

    async def close(self) -> None:
        await self._peer.close()


__all__ = ["IngressLink", "IngressService", "ShoalError", "counts_from_pb", "counts_to_pb", "table_to_pb"]

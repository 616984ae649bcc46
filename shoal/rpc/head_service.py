"""The head's gRPC servicer: decode, call ``HeadNode``, encode."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import AsyncIterator

from shoal.auth import Role, bearer, client_of
from shoal.core.clock import wait_for
from shoal.core.spec import parse_spec_json
from shoal.core.tasks import until
from shoal.errors import InvalidArgument, ResourceExhausted, ShoalError, Unauthenticated
from shoal.head.node import HeadNode
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.auth import authorization, peer_host
from shoal.rpc.convert import (
    capacity_from_pb,
    lifecycle_to_pb,
    report_from_pb,
    revision_to_pb,
    routes_to_pb,
    status_to_pb,
    table_frame_to_pb,
    traffic_from_pb,
    traffic_to_pb,
)
from shoal.rpc.status import Context, abort
from shoal.types import DeploymentRoutes, LoadReport, RoutingTable, SchedulerRegistration

REVOKED_CHECK_S = 1.0
"""How often a log follow checks that its token has not been revoked meanwhile."""


_ACK = pb.HealthReply(ack=True)
_NACK = pb.HealthReply(ack=False)


class HeadService(pbg.HeadServicer):
    def __init__(self, node: HeadNode) -> None:
        self.node = node
        self._table_cache: tuple[RoutingTable, pb.RoutingTable] | None = None
        self._deltas: dict[tuple[int, int, bool], pb.RoutingTable] = {}
        self._entries: dict[str, tuple[DeploymentRoutes, pb.DeploymentRoutes]] = {}

    async def RegisterScheduler(
        self, request: pb.RegisterSchedulerRequest, context: Context
    ) -> pb.RegisterSchedulerReply:
        reg = SchedulerRegistration(
            scheduler_id=request.scheduler_id,
            address=request.address,
            http_address=request.http_address,
            capacity=capacity_from_pb(request.capacity),
            pid=request.pid,
            hostname=request.hostname,
            replicas=tuple(report_from_pb(r) for r in request.replicas),
            max_replicas=max(0, request.max_replicas),
            peer=peer_host(context),
            says_routes=request.says_routes,
        )
        try:
            interval = await self.node.register_scheduler(reg)
        except ShoalError as err:  # AlreadyExists: another live scheduler holds the id; InvalidArgument
            await abort(context, err)
        return pb.RegisterSchedulerReply(heartbeat_interval_s=interval)

    async def SendHealthUpdate(self, request: pb.SchedulerHealth, context: Context) -> pb.HealthReply:
        try:
            ack = await self._health(request, deadline_left_s=context.time_remaining())
        except ShoalError as err:  # InvalidArgument: an id or name past its bound
            await abort(context, err)
        return _ACK if ack else _NACK

    async def StreamHealth(
        self, requests: AsyncIterator[pb.SchedulerHealth], context: Context
    ) -> AsyncIterator[pb.HealthReply]:
        """One scheduler's health updates on one stream, a reply to each, in order.

        How long an update waited in this head (``Backlog``): its lag (read here, less its
        ``sent_s`` on the scheduler's clock) over the shortest lag seen on this stream, so
        that the clocks' offset cancels. The first update of a stream counts as not waiting.

        When the stream ends (the scheduler's process exited and its connection closed, or it
        gave the stream up), the head hears of it (``HeadNode.health_stream_ended``): a
        scheduler that sends no update on a new stream soon is dead before ``dead_after_s``.
        An update the head refuses (InvalidArgument: an id or name past its bound,
        ``shoal.core.reports``) ends the stream with that status, nothing of it applied."""
        shortest = math.inf
        scheduler_id, last_update = "", 0.0
        try:
            async for request in requests:
                lag = time.monotonic() - request.sent_s
                shortest = min(shortest, lag)
                try:
                    ack = await self._health(request, waited_s=lag - shortest)
                except ShoalError as err:  # InvalidArgument: the stream ends with it
                    await abort(context, err)
                if ack:
                    scheduler_id, last_update = request.scheduler_id, self.node.clock.now()
                yield _ACK if ack else _NACK
        finally:
            if scheduler_id:
                self.node.health_stream_ended(scheduler_id, last_update)

    async def _health(
        self,
        request: pb.SchedulerHealth,
        *,
        deadline_left_s: float | None = None,
        waited_s: float | None = None,
    ) -> bool:
        return await self.node.scheduler_health(
            request.scheduler_id,
            request.registry_version,
            [report_from_pb(r) for r in request.replicas],
            {
                name: LoadReport(d.in_flight, d.queued, d.requests, d.errors, tuple(d.latency_buckets))
                for name, d in request.load.items()
            },
            deadline_left_s=deadline_left_s,
            waited_s=waited_s,
            routes_version=request.routes_version,
        )

    async def WatchRoutes(
        self, request: pb.WatchRoutesRequest, context: Context
    ) -> AsyncIterator[pb.RoutingTable]:
        last: RoutingTable | None = None
        try:
            async for table in self.node.watch_routes(request.scheduler_id):
                yield self._encoded(table) if last is None else self._delta(last, table, request.route_deltas)
                last = table
        except ShoalError as err:  # InvalidArgument: an id that is no scheduler id
            await abort(context, err)

    def _encoded(self, table: RoutingTable) -> pb.RoutingTable:
        """The whole table (a stream's first message): one message per version, shared by
        every stream. Built per stream, it was most of the head's CPU at 300 schedulers."""
        cached = self._table_cache
        if cached is not None and cached[0] is table:
            return cached[1]
        msg = table_frame_to_pb(table)
        for name, dep in table.deployments.items():
            msg.deployments[name].CopyFrom(self._entry(name, dep))
        self._table_cache = (table, msg)
        return msg

    def _delta(self, last: RoutingTable, table: RoutingTable, route_deltas: bool = False) -> pb.RoutingTable:
        """What changed from ``last`` (the table this stream sent before) to ``table``: the
        entries that are new objects (the head keeps unchanged ones), and the names gone; to
        a stream that asked for ``route_deltas``, an entry whose spec, tokens and revision
        stayed as the routes that changed (:func:`_route_delta`), when that is smaller.
        Streams at the same versions share one message."""
        key = (last.version, table.version, route_deltas)
        msg = self._deltas.get(key)
        if msg is not None:
            return msg
        msg = table_frame_to_pb(table)
        msg.delta = True
        for name, dep in table.deployments.items():
            before = last.deployments.get(name)
            if before is dep:
                continue
            entry = _route_delta(before, dep) if route_deltas and before is not None else None
            msg.deployments[name].CopyFrom(entry if entry is not None else self._entry(name, dep))
        msg.removed.extend(name for name in last.deployments if name not in table.deployments)
        if len(self._deltas) >= 16:
            self._deltas.pop(next(iter(self._deltas)))
        self._deltas[key] = msg
        for gone in [n for n in self._entries if n not in table.deployments]:
            del self._entries[gone]
        return msg

    def _entry(self, name: str, dep: DeploymentRoutes) -> pb.DeploymentRoutes:
        """One deployment's entry, encoded once per entry object."""
        cached = self._entries.get(name)
        if cached is not None and cached[0] is dep:
            return cached[1]
        entry = routes_to_pb(dep)
        self._entries[name] = (dep, entry)
        return entry

    async def ApplyDeployment(
        self, request: pb.ApplyDeploymentRequest, context: Context
    ) -> pb.ApplyDeploymentReply:
        try:
            spec = parse_spec_json(request.spec_json)
            if_revision = request.if_revision if request.HasField("if_revision") else None
            result = await self.node.apply(spec, if_revision)
        except ShoalError as err:
            await abort(context, err)
        return pb.ApplyDeploymentReply(
            name=spec.name,
            created=result.created,
            changed=result.changed,
            revision=result.revision,
            change=result.change,
        )

    async def GetHistory(self, request: pb.DeploymentRequest, context: Context) -> pb.HistoryReply:
        try:
            revisions = await self.node.revisions(request.name)
        except ShoalError as err:
            await abort(context, err)
        return pb.HistoryReply(revisions=[revision_to_pb(r) for r in revisions])

    async def RollbackDeployment(self, request: pb.RollbackRequest, context: Context) -> pb.RevisionReply:
        try:
            rev, _ = await self.node.rollback(request.name, request.revision)
        except ShoalError as err:
            await abort(context, err)
        return pb.RevisionReply(revision=revision_to_pb(rev))

    async def RestartDeployment(self, request: pb.DeploymentRequest, context: Context) -> pb.RevisionReply:
        try:
            rev, _ = await self.node.restart(request.name)
        except ShoalError as err:
            await abort(context, err)
        return pb.RevisionReply(revision=revision_to_pb(rev))

    async def ListEvents(self, request: pb.EventsRequest, context: Context) -> pb.EventsReply:
        if request.limit < 0:
            await abort(context, InvalidArgument(f"limit must be >= 0, got {request.limit}"))
        events = await self.node.lifecycle_events(request.deployment, request.limit)
        return pb.EventsReply(events=[lifecycle_to_pb(e) for e in events])

    async def ScaleDeployment(self, request: pb.ScaleDeploymentRequest, context: Context) -> pb.Empty:
        if request.replicas < 0:
            await abort(context, InvalidArgument(f"replicas must be >= 0, got {request.replicas}"))
        try:
            if_revision = request.if_revision if request.HasField("if_revision") else None
            if_replicas = request.if_replicas if request.HasField("if_replicas") else None
            await self.node.scale(request.name, request.replicas, if_revision, if_replicas)
        except ShoalError as err:
            await abort(context, err)
        return pb.Empty()

    async def DeleteDeployment(self, request: pb.DeleteDeploymentRequest, context: Context) -> pb.Empty:
        try:
            await self.node.delete(request.name)
        except ShoalError as err:
            await abort(context, err)
        return pb.Empty()

    async def SetRoute(self, request: pb.TrafficRoute, context: Context) -> pb.Empty:
        try:
            await self.node.set_route(traffic_from_pb(request))
        except ShoalError as err:
            await abort(context, err)
        return pb.Empty()

    async def DeleteRoute(self, request: pb.DeploymentRequest, context: Context) -> pb.Empty:
        try:
            await self.node.delete_route(request.name)
        except ShoalError as err:
            await abort(context, err)
        return pb.Empty()

    async def ListRoutes(self, request: pb.Empty, context: Context) -> pb.RoutesReply:
        routes = await self.node.traffic_routes()
        return pb.RoutesReply(routes=[traffic_to_pb(r) for r in routes])

    # Writes with context.write (a deadline on each), which grpc.aio takes from a coroutine
    # as from a generator; the generated stub types know only the generator.
    async def ReadLog(self, request: pb.ReadLogRequest, context: Context) -> None:  # type: ignore[override]
        if request.tail_bytes < 0:
            # As GET /api/replicas/ID/logs refuses it: before, it was taken as "the whole log".
            await abort(
                context,
                InvalidArgument(f"tail_bytes must be >= 0 (0: the whole log), got {request.tail_bytes}"),
            )
        # The token the call was let in with (the interceptor checked it) must stay valid:
        # a follow has no end of its own, and one went on printing the replica's lines for
        # as long as it ran after its token was revoked.
        secret = bearer(authorization(context))
        tokens = self.node.tokens
        client = client_of(tokens, authorization(context), peer_host(context))

        def revoked() -> ShoalError | None:
            if secret is not None and tokens.authenticate(secret) is None:
                return Unauthenticated("ReadLog: the token was revoked")
            return None

        # A client that takes no chunk: once gRPC's windows are full (about 8 MB) a write
        # waits for it, holding that much log in the head and a place of max_log_streams,
        # until the client went away. Before, 128 such follows held 1.2 GB for good.
        stall_s = self.node.settings.log_stream_stall_s
        try:
            stream = self.node.read_log(request.replica_id, request.tail_bytes, request.follow, client)
            async for data in until(stream, revoked, REVOKED_CHECK_S):
                try:
                    await wait_for(context.write(pb.LogChunk(data=data)), stall_s)
                except TimeoutError:
                    raise ResourceExhausted(
                        f"ReadLog: the client took none of the log of {request.replica_id!r} for "
                        f"{stall_s:g}s (setting log_stream_stall_s): the read is ended, read the "
                        "stream as it comes"
                    ) from None
        except ShoalError as err:
            await abort(context, err)

    async def CreateToken(self, request: pb.CreateTokenRequest, context: Context) -> pb.CreateTokenReply:
        try:
            rec, secret = await self.node.create_token(Role.parse(request.role or "read"), request.name)
        except ShoalError as err:
            await abort(context, err)
        return pb.CreateTokenReply(name=rec.name, role=str(rec.role), token=secret)

    async def ListTokens(self, request: pb.Empty, context: Context) -> pb.ListTokensReply:
        tokens = self.node.tokens.list()
        infos = [pb.TokenInfo(name=r.name, role=str(r.role), created=r.created) for r in tokens]
        return pb.ListTokensReply(tokens=infos)

    async def RevokeToken(self, request: pb.RevokeTokenRequest, context: Context) -> pb.Empty:
        try:
            await self.node.revoke_token(request.name)
        except ShoalError as err:
            await abort(context, err)
        return pb.Empty()

    async def GetStatus(self, request: pb.StatusRequest, context: Context) -> pb.ClusterStatus:
        only = tuple(request.deployments) if request.only_named else None
        return status_to_pb(await self.node.status(only, brief=request.brief))


def _route_delta(before: DeploymentRoutes, dep: DeploymentRoutes) -> pb.DeploymentRoutes | None:
    """``dep`` as a change to ``before``: the routes new or changed and the replica ids gone;
    None when anything else in the entry changed or the change is not smaller than ``dep``."""
    kept = (before.spec, before.allowed_tokens, before.revision, before.failed)
    if kept != (dep.spec, dep.allowed_tokens, dep.revision, dep.failed):
        return None
    had = {r.replica_id: r for r in before.routes}
    changed = [r for r in dep.routes if had.get(r.replica_id) != r]
    now = {r.replica_id for r in dep.routes}
    gone = [rid for rid in had if rid not in now]
    if len(changed) + len(gone) >= len(dep.routes):
        return None
    entry = routes_to_pb(dataclasses.replace(dep, routes=tuple(changed)))
    entry.routes_delta = True
    entry.removed_routes.extend(gone)
    return entry

"""The scheduler's gRPC servicer (control from the head, registration from
replicas, native SendRequest from clients): decode, call the domain, encode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import NoReturn

import grpc

from shoal.core import limits
from shoal.core.spec import parse_spec_json
from shoal.errors import InvalidArgument, ShoalError
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc import codec
from shoal.rpc.auth import authorization
from shoal.rpc.convert import state_name
from shoal.rpc.status import Context, abort
from shoal.scheduler.dataplane import InferCall
from shoal.scheduler.ingress import IngressNode
from shoal.scheduler.node import SchedulerNode


async def _control_only(context: Context) -> NoReturn:
    await context.abort(
        grpc.StatusCode.FAILED_PRECONDITION,
        "this is an ingress worker: control calls go to the scheduler's control port "
        "(the address it registered with the head)",
    )
    raise AssertionError("unreachable")


class NativeService(pbg.SchedulerServicer):
    """The native API alone (``SendRequest``): what an ingress worker serves of the
    Scheduler service. Control calls go to the main process's control port."""

    def __init__(self, node: IngressNode) -> None:
        self.native = node

    # Control calls: only the main process serves them, on its control port.

    async def CreateReplica(
        self, request: pb.CreateReplicaRequest, context: Context
    ) -> pb.CreateReplicaReply:
        await _control_only(context)

    async def RemoveReplica(self, request: pb.RemoveReplicaRequest, context: Context) -> pb.Empty:
        await _control_only(context)

    async def RegisterReplica(
        self, request: pb.RegisterReplicaRequest, context: Context
    ) -> pb.RegisterReplicaReply:
        await _control_only(context)

    async def SendHealthUpdate(self, request: pb.ReplicaHealth, context: Context) -> pb.HealthReply:
        await _control_only(context)

    async def ReadLog(self, request: pb.ReadLogRequest, context: Context) -> AsyncIterator[pb.LogChunk]:
        # An async generator itself: grpc.aio runs a plain method that returns one as a
        # synchronous iterator, and fails with UNKNOWN.
        await _control_only(context)
        yield pb.LogChunk()

    async def SendRequest(self, request: pb.InferRequest, context: Context) -> pb.InferReply:
        """The native API: one request through the data plane's door, tensors as they came."""
        try:
            if not request.deployment:
                raise InvalidArgument("deployment is required")
            limits.check_timeout(request.timeout_s)
            self.native.inference_auth.check(request.deployment, authorization(context))
            self.native.dataplane.bounds.check_counts(len(request.inputs))  # before any is looked at
        except ShoalError as err:
            self.native.dataplane.refused(request.deployment, request.request_id, "native", err)
            await abort(context, err)
        call = InferCall(
            model=request.deployment,
            inputs=codec.from_pb(request.inputs),
            id=request.request_id,
            timeout_s=request.timeout_s,
            door="native",
            model_id=request.model_id,
        )
        try:
            result = await self.native.dataplane.infer(call)
        except ShoalError as err:
            await abort(context, err)
        reply = pb.InferReply(request_id=request.request_id, replica_id=result.replica_id)
        codec.fill(reply.outputs, result.outputs)
        return reply


class SchedulerService(NativeService):
    def __init__(self, node: SchedulerNode) -> None:
        super().__init__(node)
        self.node = node

    async def CreateReplica(
        self, request: pb.CreateReplicaRequest, context: Context
    ) -> pb.CreateReplicaReply:
        try:
            spec = parse_spec_json(request.spec_json)
            if not request.replica_id:
                raise InvalidArgument("replica_id is required")
            version = await self.node.supervisor.create(request.replica_id, spec)
        except ShoalError as err:
            await abort(context, err)
        return pb.CreateReplicaReply(registry_version=version)

    async def RemoveReplica(self, request: pb.RemoveReplicaRequest, context: Context) -> pb.Empty:
        # Unknown replicas are already gone: removing is idempotent.
        await self.node.supervisor.remove(request.replica_id, graceful=request.graceful)
        return pb.Empty()

    async def RegisterReplica(
        self, request: pb.RegisterReplicaRequest, context: Context
    ) -> pb.RegisterReplicaReply:
        ack = await self.node.supervisor.register(request.replica_id, request.address, request.pid)
        return pb.RegisterReplicaReply(
            ack=ack, health_interval_s=self.node.settings.replica_health_interval_s
        )

    async def SendHealthUpdate(self, request: pb.ReplicaHealth, context: Context) -> pb.HealthReply:
        ack = await self.node.supervisor.health(
            request.replica_id, state_name(request.state), request.in_flight, request.queued
        )
        return pb.HealthReply(ack=ack)

    async def ReadLog(self, request: pb.ReadLogRequest, context: Context) -> AsyncIterator[pb.LogChunk]:
        try:
            async for data in self.node.supervisor.read_log(
                request.replica_id, request.tail_bytes, request.follow
            ):
                yield pb.LogChunk(data=data, scheduler_id=self.node.id)
        except ShoalError as err:
            await abort(context, err)

"""The replica's gRPC servicer: Ping, PushTask, Drain."""

from __future__ import annotations

from shoal.errors import ShoalError
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.replica.process import ReplicaProcess
from shoal.rpc import codec
from shoal.rpc.clients import meta_to_pb, state_value
from shoal.rpc.status import Context, abort


class ReplicaService(pbg.ReplicaServicer):
    def __init__(self, replica: ReplicaProcess) -> None:
        self.replica = replica

    async def Ping(self, request: pb.PingRequest, context: Context) -> pb.PingReply:
        r = self.replica
        batch_sizes = r.batcher.batch_sizes if r.batcher is not None else {}
        return pb.PingReply(
            state=state_value(r.state), in_flight=r.in_flight, queued=r.queued, batch_sizes=batch_sizes
        )

    async def PushTask(self, request: pb.Task, context: Context) -> pb.TaskResult:
        try:
            inputs = codec.decode(request.inputs)
            outputs = await self.replica.infer(request.request_id, inputs, request.timeout_s)
        except ShoalError as err:
            await abort(context, err)
        return pb.TaskResult(request_id=request.request_id, outputs=codec.encode(outputs))

    async def Describe(self, request: pb.Empty, context: Context) -> pb.ReplicaDescription:
        d = self.replica.describe()
        return pb.ReplicaDescription(
            inputs=[meta_to_pb(t) for t in d.inputs],
            outputs=[meta_to_pb(t) for t in d.outputs],
            batch_sizes=d.batch_sizes,
            requests=d.requests,
            batches=d.batches,
            compute_ns=d.compute_ns,
        )

    async def Drain(self, request: pb.DrainRequest, context: Context) -> pb.Empty:
        self.replica.request_stop(grace_s=request.grace_s)
        return pb.Empty()

"""A request whose caller went away is cancelled on the replica too, on the gRPC
``PushTasks`` stream (remote replicas, ``data_plane: stream``) as on the local hop
(``tests/unit/test_hop.py``): the client sends a ``cancel`` task with the request's tag, and
the replica drops that request, unanswered, while the others on the stream go on. Before,
the replica computed every request its callers had given up, one after the other."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc.aio
import numpy as np
import pytest

from shoal.config import Settings
from shoal.core import payload
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.replica.process import ReplicaProcess
from shoal.rpc.clients import GrpcReplicaClient
from shoal.rpc.replica_service import ReplicaService
from shoal.types import Arrays

pytestmark = pytest.mark.timeout(20)

X = (payload.from_array("x", np.ones((1, 4), np.float32)),)


class Recording(pbg.ReplicaServicer):
    """A replica's stream that records the tasks it is sent and answers none."""

    def __init__(self) -> None:
        self.tasks: list[pb.Task] = []

    async def PushTasks(self, requests: Any, context: Any) -> AsyncIterator[pb.OutcomeBatch]:
        async for batch in requests:
            self.tasks.extend(batch.tasks)
        if False:  # pragma: no cover - a generator that yields nothing
            yield pb.OutcomeBatch()


async def test_a_cancelled_push_sends_a_cancel_for_its_tag_on_the_stream() -> None:
    server = grpc.aio.server()
    servicer = Recording()  # type: ignore[abstract]  # the calls it does not serve answer UNIMPLEMENTED
    pbg.add_ReplicaServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = GrpcReplicaClient(f"127.0.0.1:{port}", Settings(data_plane="stream"))
    try:
        kept = asyncio.create_task(client.push("r0", X, 5.0))
        gone = asyncio.create_task(client.push("r1", X, 5.0))
        async with asyncio.timeout(5):
            while len(servicer.tasks) < 2:
                await asyncio.sleep(0.01)
        gone.cancel()
        async with asyncio.timeout(5):
            while len(servicer.tasks) < 3:
                await asyncio.sleep(0.01)
        sent = {t.request_id: t.tag for t in servicer.tasks if not t.cancel}
        [cancel] = [t for t in servicer.tasks if t.cancel]
        assert cancel.tag == sent["r1"] and not cancel.inputs
        assert not kept.done()
        kept.cancel()
    finally:
        await client.close()
        await server.stop(0)


class HeldReplica:
    """What ``ReplicaService`` asks of a replica: requests wait for ``release``."""

    def __init__(self) -> None:
        self.settings = Settings()
        self.stopped = asyncio.Event()  # never: it does not drain here
        self.release = asyncio.Event()
        self.started: list[str] = []
        self.dropped: list[str] = []

    async def infer(self, request_id: str, inputs: Arrays, timeout_s: float, model_id: str = "") -> Arrays:
        self.started.append(request_id)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.dropped.append(request_id)
            raise
        return inputs


async def test_the_replica_drops_a_task_cancelled_on_its_stream() -> None:
    replica = HeldReplica()
    service = ReplicaService(cast(ReplicaProcess, replica))
    batches: asyncio.Queue[pb.TaskBatch | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[pb.TaskBatch]:
        while (batch := await batches.get()) is not None:
            yield batch

    def task(request_id: str, tag: int) -> pb.Task:
        t = pb.Task(request_id=request_id, tag=tag, timeout_s=5.0)
        t.inputs.add(name="x", datatype="FP32", shape=[1, 4], data=X[0].data)
        return t

    outcomes = service.PushTasks(requests(), cast(Any, None))
    batches.put_nowait(pb.TaskBatch(tasks=[task("r1", 1), task("r2", 2)]))
    first = asyncio.ensure_future(anext(outcomes))
    async with asyncio.timeout(5):
        while len(replica.started) < 2:
            await asyncio.sleep(0.01)
    batches.put_nowait(pb.TaskBatch(tasks=[pb.Task(tag=1, cancel=True), pb.Task(tag=99, cancel=True)]))
    async with asyncio.timeout(5):
        while not replica.dropped:
            await asyncio.sleep(0.01)
    assert replica.dropped == ["r1"]
    replica.release.set()
    answered = await first
    assert [o.tag for o in answered.outcomes] == [2] and not answered.outcomes[0].error_code
    batches.put_nowait(None)
    assert [b async for b in outcomes] == []

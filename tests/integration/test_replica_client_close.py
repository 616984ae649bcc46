"""Closing a replica's client fails every request still waiting on it with Unavailable, at
once, on either data plane: the one way the requests of a dead replica fail (the router
closes the client, then retries them elsewhere). Real gRPC on 127.0.0.1, port 0, against a
replica that never answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
import numpy as np
import pytest

from shoal.config import Settings
from shoal.core import payload
from shoal.errors import Unavailable
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.clients import GrpcReplicaClient

pytestmark = pytest.mark.timeout(20)


class Silent(pbg.ReplicaServicer):
    """A replica that takes requests and never answers them."""

    def __init__(self) -> None:
        self.received = 0
        self.arrived = asyncio.Event()

    async def PushTask(self, request: pb.Task, context: Any) -> pb.TaskResult:
        self._got()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def PushTasks(self, requests: Any, context: Any) -> AsyncIterator[pb.OutcomeBatch]:
        async for batch in requests:
            for _ in batch.tasks:
                self._got()
        if False:  # pragma: no cover - a generator that yields nothing
            yield pb.OutcomeBatch()

    def _got(self) -> None:
        self.received += 1
        self.arrived.set()


@pytest.fixture
async def silent() -> AsyncIterator[tuple[Silent, str]]:
    server = grpc.aio.server()
    servicer = Silent()  # type: ignore[abstract]  # the calls it does not serve answer UNIMPLEMENTED
    pbg.add_ReplicaServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.mark.parametrize("data_plane", ["stream", "unary"])
async def test_closing_the_client_fails_pending_requests_with_unavailable(
    silent: tuple[Silent, str], data_plane: str
) -> None:
    servicer, address = silent
    client = GrpcReplicaClient(address, Settings(data_plane=data_plane))
    x = payload.from_arrays({"x": np.ones((1,), np.float32)})
    pending = [asyncio.create_task(client.push(f"r{i}", x, 10.0)) for i in range(3)]
    async with asyncio.timeout(5):
        while servicer.received < 3:
            servicer.arrived.clear()
            await servicer.arrived.wait()

    await client.close()

    results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 2.0)
    assert [type(r) for r in results] == [Unavailable] * 3

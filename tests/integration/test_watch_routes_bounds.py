"""``Head/WatchRoutes`` checks the scheduler id it is sent, as a registration's is checked
(``shoal.core.reports``): a real ``HeadService`` over a ``HeadNode`` on a ``MemoryStore``,
behind a real gRPC server on 127.0.0.1 port 0. Before, any id was taken: a 1 MB one, or
one with spaces and slashes, opened a routes stream like a scheduler's."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from shoal.config import Settings
from shoal.head.node import HeadNode
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.head_service import HeadService
from shoal.rpc.server import bind, new_server
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers

pytestmark = pytest.mark.timeout(30)

BIG = "x" * 1_000_000


@pytest.fixture
async def head() -> AsyncIterator[tuple[HeadNode, pbg.HeadStub]]:
    node = HeadNode(Settings(), MemoryStore(), FakeSchedulers())
    server = new_server(Settings(), [])
    pbg.add_HeadServicer_to_server(HeadService(node), server)
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 4 << 20)]
        ) as channel:
            yield node, pbg.HeadStub(channel)
    finally:
        await server.stop(None)
        await node.aclose()


@pytest.mark.parametrize(
    ("scheduler_id", "expected"),
    [
        (BIG, f"scheduler_id: a scheduler id of {len(BIG)} characters, over the limit of 253: 'xxx"),
        ("s 1/../x", "scheduler_id: 's 1/../x' is no scheduler id: letters, digits, "),
        ("", "scheduler_id: '' is no scheduler id"),
    ],
    ids=["1MB", "malformed", "empty"],
)
async def test_a_routes_watch_with_no_scheduler_id_is_refused_naming_the_field(
    head: tuple[HeadNode, pbg.HeadStub], scheduler_id: str, expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    node, stub = head
    stream: Any = stub.WatchRoutes(pb.WatchRoutesRequest(scheduler_id=scheduler_id), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stream.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details() or ""
    assert details.startswith(expected), details[:300]
    assert len(details) < 500  # the id quoted, not repeated
    assert [e.kind for e in node.state.events] == []
    assert max((len(r.getMessage()) for r in caplog.records), default=0) < 500


async def test_a_scheduler_id_watches_its_routes(head: tuple[HeadNode, pbg.HeadStub]) -> None:
    _, stub = head
    stream: Any = stub.WatchRoutes(pb.WatchRoutesRequest(scheduler_id="gpu-box_1.example"), timeout=10)
    table = await stream.read()
    assert isinstance(table, pb.RoutingTable) and not table.delta
    stream.cancel()

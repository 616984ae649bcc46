"""Routing tables travel as changes (issue 16, item 4): a scheduler's stream starts with the
whole table, then gets only the entries that changed and the names that left, and the
scheduler's decoder rebuilds the same table the head holds."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.cluster import READY, ReplicaReport
from shoal.core.placement import Capacity
from shoal.head.node import HeadNode
from shoal.proto import shoal_pb2 as pb
from shoal.rpc.clients import RoutingTableDecoder
from shoal.rpc.head_service import HeadService
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers
from shoal.types import SchedulerRegistration
from tests.unit.conftest import make_spec

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
async def head(store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock) -> AsyncIterator[HeadNode]:
    node = HeadNode(Settings(), store, fleet, clock)
    await node.start()
    specs = [make_spec(f"d{i}", replicas=1) for i in range(3)]
    for spec in specs:
        await node.apply(spec)
    reports = tuple(
        ReplicaReport(f"{s.name}-1", s.name, READY, address=f"s1:{9000 + i}", spec_hash=s.process_hash())
        for i, s in enumerate(specs)
    )
    await node.register_scheduler(
        SchedulerRegistration(
            "s1", "s1:7000", "s1:7001", Capacity(8, 8192, 0), pid=1, hostname="h", replicas=reports
        )
    )
    yield node
    await node.aclose()


def _routes(table: pb.RoutingTable) -> dict[str, list[str]]:
    return {name: [r.replica_id for r in dep.routes] for name, dep in table.deployments.items()}


async def test_a_stream_sends_the_whole_table_then_only_what_changed(head: HeadNode) -> None:
    service = HeadService(head)
    stream = service.WatchRoutes(pb.WatchRoutesRequest(scheduler_id="s1"), None)  # type: ignore[arg-type]
    assert isinstance(stream, AsyncGenerator)  # closed below, as gRPC closes it
    decoder = RoutingTableDecoder()

    first = await anext(stream)
    assert not first.delta and set(first.deployments) == {"d0", "d1", "d2"}
    assert decoder.decode(first).deployments == dict(head.routes.deployments)

    await head.delete("d2")
    await head.apply(make_spec("d3", replicas=0))
    second = await anext(stream)

    assert second.delta
    assert set(second.deployments) == {"d3"}  # d0 and d1 did not change: not sent again
    assert list(second.removed) == ["d2"]
    decoded = decoder.decode(second)
    assert decoded.deployments == dict(head.routes.deployments)
    assert set(decoded.deployments) == {"d0", "d1", "d3"} and "d2" in decoded.deleted
    await stream.aclose()


async def test_a_new_stream_starts_whole_and_streams_at_one_version_share_a_message(head: HeadNode) -> None:
    service = HeadService(head)
    a = service.WatchRoutes(pb.WatchRoutesRequest(scheduler_id="s1"), None)  # type: ignore[arg-type]
    assert isinstance(a, AsyncGenerator)  # closed below, as gRPC closes it
    b = service.WatchRoutes(pb.WatchRoutesRequest(scheduler_id="s2"), None)  # type: ignore[arg-type]
    assert isinstance(b, AsyncGenerator)
    assert (await anext(a)) is (await anext(b))  # the whole table, encoded once

    await head.apply(make_spec("d9", replicas=0))
    change_a, change_b = await anext(a), await anext(b)
    assert change_a is change_b and change_a.delta and _routes(change_a) == {"d9": []}

    late = service.WatchRoutes(pb.WatchRoutesRequest(scheduler_id="s3"), None)  # type: ignore[arg-type]
    assert isinstance(late, AsyncGenerator)
    whole = await anext(late)
    assert not whole.delta and set(whole.deployments) == {"d0", "d1", "d2", "d9"}
    for s in (a, b, late):
        await s.aclose()


def test_a_delta_entry_that_does_not_parse_leaves_the_table() -> None:
    decoder = RoutingTableDecoder()
    good = make_spec("ok", replicas=0).to_json()
    whole = pb.RoutingTable(version=1)
    whole.deployments["ok"].spec_json = good
    whole.deployments["other"].spec_json = good.replace('"ok"', '"other"')
    assert set(decoder.decode(whole).deployments) == {"ok", "other"}

    change = pb.RoutingTable(version=2, delta=True)
    change.deployments["other"].spec_json = '{"name": "other", "backend": "nope"}'
    assert set(decoder.decode(change).deployments) == {"ok"}

"""Routes travel as changes within an entry too (issue 16, item 4): to a stream that asked for
``route_deltas``, an entry whose spec, tokens and revision stayed is sent as the routes
new or changed and the replica ids gone, and the scheduler's decoder rebuilds the entry the
head holds. A stream that did not ask (a scheduler of an earlier version) gets whole entries."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.cluster import READY, ReplicaReport
from shoal.core.placement import Capacity
from shoal.core.spec import DeploymentSpec
from shoal.head.node import HeadNode
from shoal.proto import shoal_pb2 as pb
from shoal.rpc.clients import RoutingTableDecoder
from shoal.rpc.head_service import HeadService
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers
from shoal.types import RoutingTable, SchedulerRegistration
from tests.unit.conftest import make_spec

pytestmark = pytest.mark.timeout(10)

SPEC = make_spec("d0", replicas=10)


def report(i: int, spec: DeploymentSpec = SPEC) -> ReplicaReport:
    return ReplicaReport(
        f"d0-{i}", spec.name, READY, address=f"s1:{9000 + i}", spec_hash=spec.process_hash(), ready_at=1.0
    )


@pytest.fixture
async def head(store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock) -> AsyncIterator[HeadNode]:
    node = HeadNode(Settings(), store, fleet, clock)
    await node.apply(SPEC)
    await node.register_scheduler(
        SchedulerRegistration(
            "s1",
            "s1:7000",
            "s1:7001",
            Capacity(8, 8192, 0),
            pid=1,
            hostname="h",
            replicas=tuple(report(i) for i in range(10)),
        )
    )
    yield node
    await node.aclose()


def routes(table: RoutingTable) -> set[tuple[str, str]]:
    return {(r.replica_id, r.address) for r in table.deployments["d0"].routes}


async def test_an_entry_whose_routes_changed_travels_as_those_routes(head: HeadNode) -> None:
    service = HeadService(head)
    request = pb.WatchRoutesRequest(scheduler_id="s1", route_deltas=True)
    stream = service.WatchRoutes(request, None)  # type: ignore[arg-type]
    assert isinstance(stream, AsyncGenerator)  # closed below, as gRPC closes it
    decoder = RoutingTableDecoder()
    assert routes(decoder.decode(await anext(stream))) == routes(head.routes)

    # d0-3 is gone (no longer reported), d0-10 is new.
    await head.scheduler_health("s1", 2, [report(i) for i in (*range(10), 10) if i != 3])
    change = await anext(stream)

    entry = change.deployments["d0"]
    assert change.delta and entry.routes_delta
    assert list(entry.removed_routes) == ["d0-3"]
    assert [r.replica_id for r in entry.routes] == ["d0-10"]
    decoded = decoder.decode(change)
    assert routes(decoded) == routes(head.routes)
    assert len(routes(decoded)) == 10 and ("d0-3", "s1:9003") not in routes(decoded)
    assert decoded.deployments["d0"].spec == SPEC
    await stream.aclose()


async def test_a_stream_that_did_not_ask_gets_whole_entries(head: HeadNode) -> None:
    service = HeadService(head)
    stream = service.WatchRoutes(pb.WatchRoutesRequest(scheduler_id="s1"), None)  # type: ignore[arg-type]
    assert isinstance(stream, AsyncGenerator)  # closed below, as gRPC closes it
    decoder = RoutingTableDecoder()
    decoder.decode(await anext(stream))

    await head.scheduler_health("s1", 2, [report(i) for i in range(10) if i != 3])
    change = await anext(stream)

    entry = change.deployments["d0"]
    assert change.delta and not entry.routes_delta
    assert len(entry.routes) == 9
    assert routes(decoder.decode(change)) == routes(head.routes)
    await stream.aclose()


async def test_an_entry_whose_spec_changed_travels_whole(head: HeadNode) -> None:
    service = HeadService(head)
    stream = service.WatchRoutes(
        pb.WatchRoutesRequest(scheduler_id="s1", route_deltas=True),
        None,  # type: ignore[arg-type]
    )
    assert isinstance(stream, AsyncGenerator)  # closed below, as gRPC closes it
    decoder = RoutingTableDecoder()
    decoder.decode(await anext(stream))

    await head.scale("d0", 12)
    await head.reconcile_once()  # publishes the table (and places two replicas, not READY yet)
    change = await anext(stream)

    entry = change.deployments["d0"]
    assert not entry.routes_delta and len(entry.routes) == 10
    decoded = decoder.decode(change)
    assert decoded.deployments["d0"].spec.replicas == 12
    assert routes(decoded) == routes(head.routes)
    await stream.aclose()

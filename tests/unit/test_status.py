"""The cluster status has one shape: what the head builds is what ``shoal status`` reads over
gRPC and what ``/api/status`` serves (issue 15, item 2). Before, the gRPC status dropped
``broken``, ``ready_replicas`` and the events, so ``shoal status`` could not say that a
stored spec was unreadable."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.cluster import READY, ReplicaReport
from shoal.core.placement import Capacity
from shoal.core.spec import parse_spec
from shoal.core.states import ReplicaState, SchedulerState
from shoal.core.status import ReplicaStatus
from shoal.head import node as node_module
from shoal.head.node import HeadNode
from shoal.http.head import head_app
from shoal.proto import shoal_pb2 as pb
from shoal.rpc import convert
from shoal.rpc.head_service import HeadService
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers
from shoal.types import SchedulerRegistration

pytestmark = pytest.mark.timeout(10)

# A row the head cannot read (a non-finite timeout stored by an old head as null).
BROKEN_ROW = '{"name":"poison","backend":"python","model":"echo:Echo","replicas":0,"timeout_s":null}'


@pytest.fixture
async def head(store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock) -> AsyncIterator[HeadNode]:
    await store.put("deployments/poison", BROKEN_ROW)
    node = HeadNode(Settings(), store, fleet, clock)
    await node.start()
    spec = parse_spec({"name": "echo", "backend": "python", "model": "m:M", "replicas": 1})
    await node.apply(spec)
    ready = ReplicaReport(
        "echo-1", "echo", READY, address="s1:9000", pid=42, in_flight=3, spec_hash=spec.process_hash()
    )
    await node.register_scheduler(
        SchedulerRegistration(
            "s1", "s1:7000", "s1:7001", Capacity(4, 4096, 0), pid=7, hostname="h", replicas=(ready,)
        )
    )
    yield node
    await node.aclose()


async def test_the_status_read_over_grpc_is_the_status_the_head_built(head: HeadNode) -> None:
    built = await head.status()

    reply = await HeadService(head).GetStatus(pb.StatusRequest(), context=None)  # type: ignore[arg-type]
    read = convert.status_from_pb(pb.ClusterStatus.FromString(reply.SerializeToString()))

    assert read == built
    poison = read.deployment("poison")
    assert poison is not None and "deployments/poison" in poison.broken
    echo = read.deployment("echo")
    assert echo is not None and echo.ready_replicas == 1
    [replica] = echo.replicas
    assert (replica.state, replica.pid, replica.in_flight) == (ReplicaState.READY, 42, 3)
    assert [s.state for s in read.schedulers] == [SchedulerState.ALIVE]
    assert read.events, "the head's recent events travel over gRPC too"


async def test_rest_and_grpc_serve_the_same_json(head: HeadNode) -> None:
    reply = await HeadService(head).GetStatus(pb.StatusRequest(), context=None)  # type: ignore[arg-type]
    over_grpc: dict[str, Any] = convert.status_from_pb(reply).to_json()

    transport = httpx.ASGITransport(app=head_app(head))
    async with httpx.AsyncClient(transport=transport, base_url="http://head") as client:
        over_rest = (await client.get("/api/status")).json()

    for doc in (over_grpc, over_rest):
        doc["schedulers"][0].pop("last_seen_s")  # the clock does not move, but be exact about why
    assert over_rest == over_grpc
    [echo] = [d for d in over_rest["deployments"] if d["name"] == "echo"]
    assert echo["ready_replicas"] == 1 and echo["replicas"][0]["state"] == "READY"


async def test_the_status_json_holds_plain_strings_and_mappings_field_by_field(head: HeadNode) -> None:
    """What ``shoal status --json`` writes and a YAML or msgpack writer takes: states as plain
    ``str`` (not the enum), capacities as mappings, every field in its declared order."""
    doc = (await head.status()).to_json()
    [scheduler] = doc["schedulers"]
    assert type(scheduler["state"]) is str and scheduler["state"] == "ALIVE"
    assert scheduler["capacity"] == {"cpus": 4, "memory_mb": 4096, "gpus": 0}
    assert type(scheduler["allocated"]) is dict
    [echo] = [d for d in doc["deployments"] if d["name"] == "echo"]
    [replica] = echo["replicas"]
    assert type(replica["state"]) is str and replica["state"] == "READY"
    assert list(replica) == [f.name for f in dataclasses.fields(ReplicaStatus)]
    assert list(echo)[:7] == [
        "name",
        "target_replicas",
        "pending_reason",
        "broken",
        "spec",
        "replicas",
        "revision",
    ]


def test_an_unknown_replica_state_from_a_newer_peer_is_starting_not_an_error() -> None:
    assert convert.state_name(99) == ReplicaState.STARTING
    assert convert.state_name(pb.DEAD) == ReplicaState.DEAD


async def test_one_deployment_and_the_schedulers_are_what_the_whole_status_shows(head: HeadNode) -> None:
    transport = httpx.ASGITransport(app=head_app(head))
    async with httpx.AsyncClient(transport=transport, base_url="http://head") as client:
        whole = (await client.get("/api/status")).json()
        echo = await client.get("/api/deployments/echo")
        poison = await client.get("/api/deployments/poison")
        schedulers = (await client.get("/api/schedulers")).json()
        missing = await client.get("/api/deployments/nope")

    shown = {d["name"]: d for d in whole["deployments"]}
    assert echo.json() == shown["echo"] and poison.json() == shown["poison"]
    assert set(echo.json()["replicas"][0]) == {
        "id",
        "scheduler",
        "state",
        "pid",
        "address",
        "in_flight",
        "queued",
        "message",
        "spec_hash",
        "revision",
    }
    assert schedulers == whole["schedulers"]
    assert schedulers[0]["capacity"] == {"cpus": 4, "memory_mb": 4096, "gpus": 0}
    assert missing.status_code == 404 and missing.json() == {"error": "no deployment named 'nope'"}


@pytest.mark.timeout(60)
async def test_one_deployment_costs_its_replicas_not_the_clusters(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /api/deployments/NAME and /api/schedulers built the whole cluster's status, every
    replica's entry, to show one deployment or the schedulers: 0.8 s and 1.1 s of the head's
    event loop each at 10,000 replicas (18 ms now). Counted here, not timed: the replica
    entries each route builds."""
    node = HeadNode(Settings(), store, fleet, clock)
    built: list[str] = []
    real = ReplicaStatus

    def counted(*args: Any, **fields: Any) -> ReplicaStatus:
        made = real(*args, **fields)  # the head names its fields by position
        built.append(made.id)
        return made

    monkeypatch.setattr(node_module, "ReplicaStatus", counted)
    try:
        reports: dict[str, list[ReplicaReport]] = {f"s{i}": [] for i in range(5)}
        for d in range(40):
            spec = parse_spec({"name": f"d{d}", "backend": "python", "model": "m:M", "replicas": 5})
            node.desired[spec.name] = spec
            for r in range(5):
                rid = f"d{d}-{r}"
                reports[f"s{(d * 5 + r) % 5}"].append(
                    ReplicaReport(rid, spec.name, READY, address=f"{rid}:1", spec_hash=spec.process_hash())
                )
        for sid, reps in reports.items():
            await node.register_scheduler(
                SchedulerRegistration(
                    sid,
                    f"{sid}:1",
                    f"{sid}:2",
                    Capacity(64, 10**6, 0),
                    pid=1,
                    hostname="h",
                    replicas=tuple(reps),
                )
            )
        transport = httpx.ASGITransport(app=head_app(node))
        async with httpx.AsyncClient(transport=transport, base_url="http://head") as client:

            async def entries(path: str) -> list[str]:
                built.clear()
                assert (await client.get(path)).status_code == 200
                return sorted(built)

            assert len(await entries("/api/status")) == 200
            assert await entries("/api/deployments/d7") == [f"d7-{r}" for r in range(5)]
            assert await entries("/api/schedulers") == []
        # Over gRPC (what shoal deploy, rollback and restart read while they wait, and
        # shoal logs DEPLOYMENT --follow every 2 s): the deployments named.
        service = HeadService(node)
        built.clear()
        request = pb.StatusRequest(deployments=["d7", "d9", "nope"], only_named=True)
        some = await service.GetStatus(request, context=None)  # type: ignore[arg-type]
        assert sorted(built) == [f"d{d}-{r}" for d in (7, 9) for r in range(5)]
        assert [d.name for d in some.deployments] == ["d7", "d9"] and len(some.schedulers) == 5
        built.clear()
        whole = await service.GetStatus(pb.StatusRequest(), context=None)  # type: ignore[arg-type]
        assert len(built) == 200 and len(whole.deployments) == 40
        assert [d for d in whole.deployments if d.name in ("d7", "d9")] == list(some.deployments)
    finally:
        await node.aclose()

"""The head's bounds on what clients create (settings ``max_deployments``, ``max_routes``,
``max_tokens``), at its API layer: the gRPC servicer and the REST app over a HeadNode on a
MemoryStore. Before, none had a bound: 10,000 deployments of ``replicas: 0`` made each
further apply take 149 ms of the head's event loop and each reconcile pass 111 ms
(``docs/operations.md``, "Limits of the head")."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import httpx
import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.spec import DeploymentSpec
from shoal.core.traffic import parse_route
from shoal.errors import InvalidArgument
from shoal.head.node import HeadNode
from shoal.proto import shoal_pb2 as pb
from shoal.rpc.convert import traffic_to_pb
from shoal.rpc.head_service import HeadService
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers
from tests.unit.conftest import Aborted, FakeContext, make_spec

pytestmark = pytest.mark.timeout(10)

LIMITS = Settings(max_deployments=2, max_routes=1, max_tokens=2)


@pytest.fixture
async def head(store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock) -> AsyncIterator[HeadNode]:
    node = HeadNode(LIMITS, store, fleet, clock)
    yield node
    await node.aclose()


async def refused(call: Any) -> FakeContext:
    """The context of a servicer call that must abort."""
    context = FakeContext()
    with pytest.raises(Aborted):
        await call(cast(Any, context))
    return context


def apply_request(name: str, replicas: int = 0) -> pb.ApplyDeploymentRequest:
    return pb.ApplyDeploymentRequest(spec_json=make_spec(name, replicas).to_json())


async def stored(store: MemoryStore) -> list[str]:
    return sorted(e.key for e in await store.list(""))


async def test_a_deployment_past_max_deployments_is_refused_and_nothing_is_written(
    head: HeadNode, store: MemoryStore
) -> None:
    service = HeadService(head)
    for name in ("a", "b"):
        await service.ApplyDeployment(apply_request(name), cast(Any, FakeContext()))
    keys = await stored(store)

    context = await refused(lambda ctx: service.ApplyDeployment(apply_request("c"), ctx))
    assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert context.details == (
        "the head holds 2 deployments, its limit (setting max_deployments): deployment 'c' was not "
        "created; delete deployments no longer used ('shoal delete NAME'), or raise max_deployments"
    )
    assert await stored(store) == keys  # no spec, revision nor event of 'c'
    assert sorted(head.desired) == ["a", "b"]
    assert [e.deployment for e in head.history.events()] == ["a", "b"]

    # At the bound, a deployment that exists is still updated; a delete makes room.
    reply = await service.ApplyDeployment(apply_request("a", replicas=1), cast(Any, FakeContext()))
    assert (reply.created, reply.changed) == (False, True)
    await service.DeleteDeployment(pb.DeleteDeploymentRequest(name="b"), cast(Any, FakeContext()))
    assert (await service.ApplyDeployment(apply_request("c"), cast(Any, FakeContext()))).created
    assert sorted(head.desired) == ["a", "c"]


async def test_the_rest_api_answers_409_past_max_deployments_without_retry_after(
    head: HeadNode, rest: httpx.AsyncClient
) -> None:
    for name in ("a", "b"):
        assert (
            await rest.post("/api/deployments", json=make_spec(name, 0).model_dump(mode="json"))
        ).status_code == 201
    answer = await rest.post("/api/deployments", json=make_spec("c", 0).model_dump(mode="json"))
    assert answer.status_code == 409
    assert "Retry-After" not in answer.headers  # not a condition that passes by itself
    assert answer.json()["error"].startswith(
        "the head holds 2 deployments, its limit (setting max_deployments)"
    )
    updated = await rest.post("/api/deployments", json=make_spec("a", 1).model_dump(mode="json"))
    assert (updated.status_code, updated.json()["changed"]) == (200, True)


async def test_a_route_past_max_routes_is_refused_and_a_route_is_still_replaced(
    head: HeadNode, store: MemoryStore, rest: httpx.AsyncClient
) -> None:
    service = HeadService(head)
    for name in ("a", "b"):
        await head.apply(make_spec(name, 0))
    await service.SetRoute(
        traffic_to_pb(parse_route({"name": "r1", "targets": {"a": 100}})), cast(Any, FakeContext())
    )
    keys = await stored(store)

    second = traffic_to_pb(parse_route({"name": "r2", "targets": {"a": 100}}))
    context = await refused(lambda ctx: service.SetRoute(second, ctx))
    assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert context.details == (
        "the head holds 1 routes, its limit (setting max_routes): route 'r2' was not created; delete "
        "routes no longer used ('shoal route --delete NAME'), or raise max_routes"
    )
    answer = await rest.put("/api/routes/r2", json={"targets": {"a": 100}})
    assert answer.status_code == 409 and "setting max_routes" in answer.json()["error"]
    assert await stored(store) == keys

    replaced = await rest.put("/api/routes/r1", json={"targets": {"a": 50, "b": 50}})
    assert replaced.status_code == 200
    assert (
        head.traffic.routes["r1"].describe()
        == parse_route({"name": "r1", "targets": {"a": 50, "b": 50}}).describe()
    )
    assert (await rest.delete("/api/routes/r1")).status_code == 200
    assert (await rest.put("/api/routes/r2", json={"targets": {"b": 100}})).status_code == 200
    assert sorted(head.traffic.routes) == ["r2"]


async def test_a_token_past_max_tokens_is_refused_until_one_is_revoked(
    head: HeadNode, store: MemoryStore
) -> None:
    service = HeadService(head)
    await service.CreateToken(pb.CreateTokenRequest(name="root", role="admin"), cast(Any, FakeContext()))
    await service.CreateToken(pb.CreateTokenRequest(name="ci", role="deploy"), cast(Any, FakeContext()))
    keys = await stored(store)

    extra = pb.CreateTokenRequest(name="extra", role="read")
    context = await refused(lambda ctx: service.CreateToken(extra, ctx))
    assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert context.details == (
        "the head holds 2 tokens, its limit (setting max_tokens): token 'extra' was not created; "
        "revoke tokens no longer used ('shoal token revoke NAME'), or raise max_tokens"
    )
    assert await stored(store) == keys and head.tokens.get("extra") is None

    await service.RevokeToken(pb.RevokeTokenRequest(name="ci"), cast(Any, FakeContext()))
    assert (await service.CreateToken(extra, cast(Any, FakeContext()))).name == "extra"


async def test_a_store_holding_more_than_a_lowered_limit_keeps_all_and_creates_none(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    first = HeadNode(Settings(), store, fleet, clock)
    for name in ("a", "b", "c"):
        await first.apply(make_spec(name, 0))
    await first.aclose()

    head = HeadNode(LIMITS, store, fleet, clock)
    await head.start()
    try:
        assert sorted(head.desired) == ["a", "b", "c"]
        assert "the store holds 3 of what setting max_deployments bounds to 2: all are kept" in caplog.text
        context = await refused(lambda ctx: HeadService(head).ApplyDeployment(apply_request("d"), ctx))
        assert "the head holds 3 deployments" in context.details
        await head.apply(make_spec("c", 1))  # an update is not refused
        await head.delete("c")
        await head.delete("b")
        assert (await head.apply(make_spec("d", 0))).created
    finally:
        await head.aclose()


@pytest.mark.parametrize(
    "setting", ["max_deployments", "max_routes", "max_tokens", "max_specs_mb", "max_schedulers"]
)
def test_a_limit_of_0_is_refused_at_start_naming_the_setting(setting: str) -> None:
    with pytest.raises(InvalidArgument, match=f"{setting} must be >= 1, got '0'"):
        Settings.load(env={f"SHOAL_{setting.upper()}": "0"})


def big_spec(name: str, version: int = 0) -> DeploymentSpec:
    """A spec of about 300 kB: an output's labels, which a spec may hold up to 2 MiB of."""
    labels = [f"class-{i}-" + "x" * 240 for i in range(1200)]
    output = {"name": "y", "datatype": "FP32", "shape": [-1], "labels": labels}
    return make_spec(name, 0, outputs=[output], options={"version": version})


async def test_specs_past_max_specs_mb_are_refused_and_a_delete_makes_room(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    head = HeadNode(Settings(max_specs_mb=1), store, fleet, clock)
    try:
        service = HeadService(head)
        first = pb.ApplyDeploymentRequest(spec_json=big_spec("a").to_json())
        await service.ApplyDeployment(first, cast(Any, FakeContext()))  # its row and its revision: 0.6 MB
        keys = await stored(store)

        second = pb.ApplyDeploymentRequest(spec_json=big_spec("b").to_json())
        context = await refused(lambda ctx: service.ApplyDeployment(second, ctx))
        assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert context.details == (
            f"the head keeps 0.6 MB of deployment specs (each deployment's and its revisions'), and "
            f"deployment 'b''s spec of {len(big_spec('b').to_json())} bytes would pass its limit (setting "
            "max_specs_mb, 1 MB): nothing was applied; delete deployments no longer used ('shoal delete "
            "NAME': their revisions go with them), or raise max_specs_mb"
        )
        update = pb.ApplyDeploymentRequest(spec_json=big_spec("a", version=2).to_json())
        assert (
            "setting max_specs_mb"
            in (await refused(lambda ctx: service.ApplyDeployment(update, ctx))).details
        )
        assert await stored(store) == keys

        assert not (await service.ApplyDeployment(first, cast(Any, FakeContext()))).changed  # the same spec
        # A restart is never refused, and its revision counts.
        await service.RestartDeployment(pb.DeploymentRequest(name="a"), cast(Any, FakeContext()))
        context = await refused(lambda ctx: service.ApplyDeployment(second, ctx))
        assert context.details.startswith("the head keeps 0.9 MB of deployment specs")
        await service.DeleteDeployment(pb.DeleteDeploymentRequest(name="a"), cast(Any, FakeContext()))
        assert (await service.ApplyDeployment(second, cast(Any, FakeContext()))).created
    finally:
        await head.aclose()


async def test_past_ten_tombstones_a_deployment_a_delete_drops_the_oldest(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    an_hour_ago = time.time() - 3600
    for i in range(12):  # deleted an hour ago, t00 first: a week would pass before any went
        await store.put(f"tombstones/t{i:02d}", json.dumps({"deleted_at": an_hour_ago + i}))
    head = HeadNode(Settings(max_deployments=1), store, fleet, clock)
    await head.start()
    try:
        await head.apply(make_spec("x", 0))
        await head.delete("x")
        kept = ["x", *(f"t{i:02d}" for i in range(3, 12))]
        assert sorted(head.deleted) == sorted(kept)
        assert sorted(e.key for e in await store.list("tombstones/")) == sorted(
            f"tombstones/{n}" for n in kept
        )
    finally:
        await head.aclose()


def registration(sid: str, port: int = 7000) -> pb.RegisterSchedulerRequest:
    return pb.RegisterSchedulerRequest(
        scheduler_id=sid, address=f"{sid}:{port}", pid=42, capacity=pb.Resources(cpus=4, memory_mb=1024)
    )


async def test_a_new_scheduler_past_max_schedulers_is_refused_and_a_known_one_is_not(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    head = HeadNode(Settings(max_schedulers=2), store, fleet, clock)
    try:
        service = HeadService(head)
        for sid in ("a", "b"):
            await service.RegisterScheduler(registration(sid), cast(Any, FakeContext()))

        for _ in range(3):  # a launcher in a loop: the head says so once
            context = await refused(lambda ctx: service.RegisterScheduler(registration("c"), ctx))
        assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert context.details == (
            "the head holds 2 live schedulers, its limit (setting max_schedulers): scheduler 'c' at c:7000 "
            "was not registered; stop schedulers no longer used (a stopped one's place is free once the "
            "head declares it dead), or raise max_schedulers"
        )
        assert sorted(head.state.schedulers) == ["a", "b"]
        assert caplog.text.count("setting max_schedulers") == 1
        assert [e.kind for e in head.state.events][-1] == "scheduler_refused"

        # A known id registering again (a restart, its stream ended) is never refused.
        head.health_stream_ended("a", clock.now())
        await service.RegisterScheduler(registration("a", port=7100), cast(Any, FakeContext()))
        assert head.state.schedulers["a"].address == "a:7100"
        assert sorted(head.state.schedulers) == ["a", "b"]
    finally:
        await head.aclose()


async def test_past_max_schedulers_a_new_one_takes_the_place_of_the_dead_one_silent_longest(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    settings = Settings(max_schedulers=3, dead_after_s=5, forget_dead_after_s=60)
    head = HeadNode(settings, store, fleet, clock)
    try:
        service = HeadService(head)
        for sid in ("a", "b", "c"):
            await service.RegisterScheduler(registration(sid), cast(Any, FakeContext()))
            clock.advance(1)
        clock.advance(5)  # all three silent past dead_after_s but "c": it sends an update
        assert await head.scheduler_health("c", 0, [])
        head.state.expire()
        assert {s: r.state.value for s, r in head.state.schedulers.items()} == {
            "a": "DEAD",
            "b": "DEAD",
            "c": "ALIVE",
        }

        await service.RegisterScheduler(registration("d"), cast(Any, FakeContext()))
        assert sorted(head.state.schedulers) == ["b", "c", "d"]  # "a", silent longest, made room
        event = [e for e in head.state.events if e.kind == "scheduler_forgotten"][-1]
        assert event.message == (
            "scheduler a (dead) forgotten to make room for scheduler d (setting max_schedulers, 3)"
        )
        # A dead one that is still known comes back without taking another's place.
        await service.RegisterScheduler(registration("b"), cast(Any, FakeContext()))
        assert sorted(head.state.schedulers) == ["b", "c", "d"]
        assert {r.state.value for r in head.state.schedulers.values()} == {"ALIVE"}
        context = await refused(lambda ctx: service.RegisterScheduler(registration("e"), ctx))
        assert context.details.startswith("the head holds 3 live schedulers")

        # One declared dead and then forgotten (forget_dead_after_s) frees its place as well.
        for _ in range(17):  # "d" silent: dead after 5 s, forgotten 60 s after its last update
            clock.advance(4)
            for sid in ("b", "c"):
                assert await head.scheduler_health(sid, 0, [])
            head.state.expire()
        assert sorted(head.state.schedulers) == ["b", "c"]
        await service.RegisterScheduler(registration("e"), cast(Any, FakeContext()))
        assert sorted(head.state.schedulers) == ["b", "c", "e"]
    finally:
        await head.aclose()

"""Versions (issue 17): OIP version N is revision N of a deployment.

The head tells schedulers which revision each replica runs (the routing table); every door
routes ``/versions/N`` and ``model_version: "N"`` to replicas of revision N only; a spec's
``serve_revisions`` keeps the latest revisions' replicas serving after an update. Over fakes:
a HeadNode with fake schedulers, a Router and SchedulerNode with fake replicas.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import httpx
import numpy as np
import pytest

from shoal.cli.commands import render_status
from shoal.config import Settings
from shoal.core import payload
from shoal.core.clock import FakeClock
from shoal.core.cluster import DRAINING, READY, CreateReplica, RemoveReplica, ReplicaReport
from shoal.core.placement import Capacity
from shoal.core.routing import default_revisions
from shoal.core.spec import DeploymentSpec, TensorSpec, parse_spec
from shoal.errors import InvalidArgument, NotFound
from shoal.head.node import HeadNode
from shoal.http.scheduler import scheduler_app
from shoal.proto import grpc_service_pb2 as oip
from shoal.rpc.convert import status_from_pb, status_to_pb
from shoal.rpc.inference_service import InferenceService
from shoal.scheduler.dataplane import InferCall
from shoal.scheduler.node import SchedulerNode
from shoal.scheduler.router import Router
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeReplicaClient, FakeReplicas, FakeSchedulers
from shoal.types import (
    DeploymentRoutes,
    GenerateRequest,
    HeadLink,
    ReplicaDescription,
    Route,
    RoutingTable,
    SchedulerRegistration,
)
from tests.unit.test_dataplane import Aborted, Context

pytestmark = pytest.mark.timeout(10)

TYPED = [{"name": "x", "datatype": "FP32", "shape": [-1]}]
X = np.array([1.0, 2.0], dtype=np.float32)


def spec(version: str = "a", **fields: Any) -> DeploymentSpec:
    doc = {"name": "echo", "backend": "python", "model": "m:M", "inputs": TYPED, "outputs": TYPED}
    return parse_spec({**doc, "options": {"v": version}, **fields})


def table(current: int, *routes: tuple[str, int], spec_: DeploymentSpec | None = None) -> RoutingTable:
    """Replicas ``(id, revision)`` on scheduler s2, the deployment at revision ``current``."""
    entry = DeploymentRoutes(
        spec=spec_ or spec(),
        routes=tuple(Route(rid, f"{rid}:9000", "s2", 0, rev) for rid, rev in routes),
        revision=current,
    )
    return RoutingTable(version=1, deployments={"echo": entry})


# ------------------------------------------------------------------ the routing choice


def test_requests_without_a_version_go_to_the_newest_revision_once_it_has_all_its_replicas() -> None:
    assert default_revisions([1, 1, 2, 2], replicas=2) == {2}
    # Rolling out: the newest has one of its two, so the one before it keeps serving too.
    assert default_revisions([1, 1, 2], replicas=2) == {1, 2}
    assert default_revisions([1, 2, 3, 3], replicas=2) == {3}
    assert default_revisions([1, 2, 3], replicas=2) == {2, 3}
    # Replicas whose revision the head has not told yet are never chosen.
    assert default_revisions([0, 0], replicas=1) == frozenset()


@pytest.fixture
def fakes() -> FakeReplicas:
    return FakeReplicas()


@pytest.fixture
async def router(fakes: FakeReplicas) -> AsyncIterator[Router]:
    r = Router("s1", Settings(), fakes, policy="round_robin")
    try:
        yield r
    finally:
        await r.aclose()


async def served_by(router: Router, n: int, version: int = 0) -> set[str]:
    x = payload.from_arrays({"x": X})
    return {(await router.send("echo", x, version=version))[1] for _ in range(n)}


async def test_a_version_reaches_only_replicas_of_that_revision(router: Router) -> None:
    await router.apply_table(table(2, ("r1a", 1), ("r1b", 1), ("r2a", 2)))

    assert await served_by(router, 6, version=1) == {"r1a", "r1b"}
    assert await served_by(router, 6, version=2) == {"r2a"}
    # serve_revisions 1 (today's rolling update): a request naming no version goes to any.
    assert await served_by(router, 6) == {"r1a", "r1b", "r2a"}
    assert router.versions("echo") == (2, {1: 2, 2: 1})


async def test_with_serve_revisions_a_request_without_a_version_goes_to_the_newest(router: Router) -> None:
    kept = spec(serve_revisions=2, replicas=1)
    await router.apply_table(table(2, ("r1", 1), ("r2", 2), spec_=kept))

    assert await served_by(router, 4) == {"r2"}
    assert await served_by(router, 4, version=1) == {"r1"}


async def test_a_text_generation_naming_a_version_runs_on_that_revision(
    router: Router, fakes: FakeReplicas
) -> None:
    lm = parse_spec({"name": "echo", "backend": "vllm", "model": "m"})
    await router.apply_table(table(2, ("r1", 1), ("r2", 2), spec_=lm))

    for _ in range(3):
        stream = router.stream("echo", GenerateRequest(prompt="a b", max_tokens=4), version=1)
        async with contextlib.aclosing(stream) as chunks:
            assert [c.text async for c in chunks][-1] == ""

    assert (len(fakes.clients["r1:9000"].generations), len(fakes.clients["r2:9000"].generations)) == (3, 0)


async def test_with_serve_revisions_but_no_revision_known_any_replica_serves(
    router: Router, fakes: FakeReplicas
) -> None:
    # A deployment from before revisions were kept: its replicas' revisions are not known.
    router.add("old", spec(serve_revisions=2), "old:9000", "s1")
    assert await served_by(router, 2) == {"old"}


async def test_a_version_that_no_replica_serves_is_not_found_at_once(router: Router) -> None:
    await router.apply_table(table(2, ("r2", 2)))
    with pytest.raises(NotFound, match="version 1 no longer serves"):
        await served_by(router, 1, version=1)


async def test_this_machines_replicas_learn_their_revision_from_the_table(
    router: Router, fakes: FakeReplicas
) -> None:
    router.add("mine", spec(), "mine:9000", "s1")
    assert router.versions("echo") == (0, {})  # joined before the head listed it

    await router.apply_table(
        RoutingTable(
            version=1,
            deployments={
                "echo": DeploymentRoutes(
                    spec=spec(), routes=(Route("mine", "mine:9000", "s1", 0, 3),), revision=3
                )
            },
        )
    )

    assert router.versions("echo") == (3, {3: 1})
    assert await served_by(router, 2, version=3) == {"mine"}


# ------------------------------------------------------------------ every door


@pytest.fixture
async def node(router: Router, fakes: FakeReplicas) -> AsyncIterator[SchedulerNode]:
    n = SchedulerNode(router.settings, "s1", cast(HeadLink, None), fakes, router=router)
    n.registered.set()
    await router.apply_table(table(2, ("r1", 1), ("r2", 2), spec_=spec(serve_revisions=2)))
    yield n


@pytest.fixture
async def http(node: SchedulerNode) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=scheduler_app(node))
    async with httpx.AsyncClient(transport=transport, base_url="http://shoal") as client:
        yield client


def body() -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": X.tolist()}]}


async def test_rest_versions_route_answer_and_refuse(http: httpx.AsyncClient, fakes: FakeReplicas) -> None:
    r = await http.post("/v2/models/echo/versions/1/infer", json=body())
    assert r.status_code == 200 and r.json()["model_version"] == "1"
    assert len(fakes.clients["r1:9000"].requests) == 1
    r = await http.post("/v2/models/echo/infer", json=body())
    assert r.json()["model_version"] == "2"
    assert len(fakes.clients["r2:9000"].requests) == 1

    r = await http.post("/v2/models/echo/versions/7/infer", json=body())
    assert r.status_code == 404
    assert r.json()["error"] == ("model 'echo' has no version '7' serving; versions that serve: 1, 2")
    r = await http.post("/v2/models/echo/versions/latest/infer", json=body())
    assert r.status_code == 400 and "version 'latest' is not a version number" in r.json()["error"]


async def test_rest_metadata_ready_and_index_list_the_versions_that_serve(
    http: httpx.AsyncClient,
) -> None:
    assert (await http.get("/v2/models/echo")).json()["versions"] == ["1", "2"]
    assert (await http.get("/v2/models/echo/versions/1")).json()["versions"] == ["1", "2"]
    assert (await http.get("/v2/models/echo/versions/1/ready")).status_code == 200
    assert (await http.get("/v2/models/echo/versions/3")).status_code == 404
    assert (await http.get("/v2/models/echo/versions/3/ready")).status_code == 404
    index = (await http.post("/v2/repository/index", json={})).json()
    assert [(e["name"], e["version"], e["state"]) for e in index] == [
        ("echo", "1", "READY"),
        ("echo", "2", "READY"),
    ]


async def test_grpc_model_version_routes_and_metadata_lists_versions(
    node: SchedulerNode, fakes: FakeReplicas
) -> None:
    service = InferenceService(node.dataplane, node.inference_auth, node.settings)
    t = payload.from_array("x", X)

    async def infer(version: str) -> oip.ModelInferResponse:
        request = oip.ModelInferRequest(model_name="echo", model_version=version)
        request.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        request.raw_input_contents.append(t.data)
        return await service.ModelInfer(request, cast(Any, Context()))

    assert (await infer("1")).model_version == "1"
    assert len(fakes.clients["r1:9000"].requests) == 1
    with pytest.raises(Aborted) as missing:
        await infer("9")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert "no version '9' serving; versions that serve: 1, 2" in missing.value.message
    with pytest.raises(Aborted) as bad:
        await infer("-1")
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
    meta = await service.ModelMetadata(oip.ModelMetadataRequest(name="echo"), cast(Any, Context()))
    assert list(meta.versions) == ["1", "2"]


async def test_the_catalog_refuses_a_version_that_is_no_number(node: SchedulerNode) -> None:
    for bad in ("0", "1.5", "x", "\uff11", "99999999999"):
        with pytest.raises(InvalidArgument, match="not a version number"):
            node.catalog.spec("echo", bad)


# ------------------------------------------------------------------ an earlier version's own tensors

OLD = TensorSpec(name="x", datatype="FP32", shape=(-1, 16))
NEW = TensorSpec(name="y", datatype="FP32", shape=(-1, 4))
TOTAL = TensorSpec(name="total", datatype="FP32", shape=(-1,))


def wide(name: str, width: int) -> payload.Tensor:
    return payload.from_array(name, np.ones((1, width), dtype=np.float32))


def counted(client: FakeReplicaClient, description: ReplicaDescription) -> list[float]:
    """Make ``client`` describe ``description``; record each describe() call."""
    client.description = description
    calls: list[float] = []
    original = client.describe

    async def describe(timeout_s: float) -> ReplicaDescription:
        calls.append(timeout_s)
        return await original(timeout_s)

    client.describe = describe  # type: ignore[method-assign]
    return calls


async def test_an_earlier_version_is_checked_against_and_described_by_its_own_tensors(
    router: Router, fakes: FakeReplicas
) -> None:
    # Revision 2 changed the inputs from x [-1,16] to y [-1,4]; the router knows only its spec.
    current = parse_spec(
        {
            "name": "echo",
            "backend": "python",
            "model": "m:M",
            "serve_revisions": 2,
            "inputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "total", "datatype": "FP32", "shape": [-1]}],
        }
    )
    await router.apply_table(table(2, ("r1", 1), ("r2", 2), spec_=current))
    old = counted(fakes.clients["r1:9000"], ReplicaDescription(inputs=(OLD,), outputs=(TOTAL,)))
    new = counted(fakes.clients["r2:9000"], ReplicaDescription(inputs=(NEW,), outputs=(TOTAL,)))
    node = SchedulerNode(router.settings, "s1", cast(HeadLink, None), fakes, router=router)
    door = node.dataplane

    for _ in range(3):
        answer = await door.infer(InferCall("echo", (wide("x", 16),), version="1"))
        assert (answer.model_version, answer.replica_id) == ("1", "r1")
    assert len(old) == 1  # described once, then kept
    for version in ("", "2"):
        answer = await door.infer(InferCall("echo", (wide("y", 4),), version=version))
        assert (answer.model_version, answer.replica_id) == ("2", "r2")
    assert new == []  # the current version's tensors are its spec's: no replica asked

    with pytest.raises(InvalidArgument, match=r"^unknown input 'y'; model 'echo' takes 'x'$"):
        await door.infer(InferCall("echo", (wide("y", 4),), version="1"))
    with pytest.raises(InvalidArgument, match="'x'"):
        await door.infer(InferCall("echo", (wide("x", 4),), version="1"))
    for version in ("", "2"):
        with pytest.raises(InvalidArgument, match=r"^unknown input 'x'; model 'echo' takes 'y'$"):
            await door.infer(InferCall("echo", (wide("x", 16),), version=version))
    with pytest.raises(InvalidArgument, match="unknown output 'y'"):
        await door.infer(InferCall("echo", (wide("x", 16),), version="1", outputs=("y",)))

    meta = await node.catalog.metadata("echo", "1")
    assert (meta.inputs, meta.outputs, meta.versions) == ((OLD,), (TOTAL,), ("1", "2"))
    assert (await node.catalog.metadata("echo", "2")).inputs == (NEW,)
    assert (await node.catalog.metadata("echo")).inputs == (NEW,)
    config = await node.catalog.config("echo", "1")
    assert [(t["name"], t["dims"]) for t in config["input"]] == [("x", [-1, 16])]
    assert len(old) == 1

    # Another replica of revision 1 replaces the one that described it: asked again.
    await router.apply_table(table(2, ("r1b", 1), ("r2", 2), spec_=current))
    again = counted(fakes.clients["r1b:9000"], ReplicaDescription(inputs=(OLD,), outputs=(TOTAL,)))
    answer = await door.infer(InferCall("echo", (wide("x", 16),), version="1"))
    assert answer.replica_id == "r1b" and len(again) == 1


async def test_the_current_version_is_described_by_a_replica_of_the_current_revision(
    router: Router, fakes: FakeReplicas
) -> None:
    undeclared = parse_spec({"name": "echo", "backend": "python", "model": "m:M", "serve_revisions": 2})
    await router.apply_table(table(2, ("r1", 1), ("r2", 2), spec_=undeclared))
    fakes.clients["r1:9000"].description = ReplicaDescription(inputs=(OLD,), outputs=(TOTAL,))
    fakes.clients["r2:9000"].description = ReplicaDescription(inputs=(NEW,), outputs=(TOTAL,))
    node = SchedulerNode(router.settings, "s1", cast(HeadLink, None), fakes, router=router)

    assert (await node.catalog.metadata("echo")).inputs == (NEW,)
    assert (await node.catalog.metadata("echo", "1")).inputs == (OLD,)
    assert (await node.catalog.metadata("echo", "2")).inputs == (NEW,)


# ------------------------------------------------------------------ the head keeps revisions serving


@pytest.fixture
async def head(clock: FakeClock) -> AsyncIterator[tuple[HeadNode, FakeSchedulers]]:
    store, fleet = MemoryStore(), FakeSchedulers()
    node = HeadNode(Settings(dead_after_s=3600.0), store, fleet, clock)
    await node.register_scheduler(
        SchedulerRegistration("s1", "s1:7000", "s1:7001", Capacity(16, 8192, 0), pid=1, hostname="h")
    )
    yield node, fleet
    await node.aclose()
    await store.close()


async def make_ready(node: HeadNode, fleet: FakeSchedulers, gone: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Every replica the head placed and is not removing reports READY, but those ``gone``
    (they died) and those it removes (they stopped)."""
    client = fleet.clients["s1"]
    reports = [
        ReplicaReport(r.id, r.deployment, READY, address=f"{r.id}:9000", spec_hash=r.spec_hash, ready_at=1.0)
        for r in node.state.replicas.values()
        if r.state != DRAINING and r.id not in gone
    ]
    assert await node.scheduler_health("s1", client.registry_version, reports)


async def settle(node: HeadNode, fleet: FakeSchedulers) -> None:
    """Reconcile, every new replica READY, until nothing changes (a rolling update's steps)."""
    for _ in range(10):
        actions = await node.reconcile_once()
        await make_ready(node, fleet)
        if not actions:
            return
    raise AssertionError("reconcile did not settle")


async def two_revisions(node: HeadNode, fleet: FakeSchedulers) -> None:
    """Revision 1 (option v "a"), then 2 ("b") keeping 1 serving, each with its replica READY."""
    await node.apply(spec("a", serve_revisions=2))
    await settle(node, fleet)
    await node.apply(spec("b", serve_revisions=2))
    await settle(node, fleet)


def revisions_in_table(node: HeadNode) -> list[int]:
    return sorted(r.revision for r in node.routes.deployments["echo"].routes)


def created_with(fleet: FakeSchedulers, version: str) -> set[str]:
    return {rid for rid, s in fleet.clients["s1"].created if s.options == {"v": version}}


async def test_serve_revisions_keeps_the_previous_revision_serving_after_an_update(
    head: tuple[HeadNode, FakeSchedulers],
) -> None:
    node, fleet = head
    await node.apply(spec("a", replicas=2))
    await settle(node, fleet)
    assert revisions_in_table(node) == [1, 1]

    result = await node.apply(spec("b", replicas=2, serve_revisions=2))
    assert result.revision == 2
    actions = await node.reconcile_once()
    assert [type(a) for a in actions] == [CreateReplica, CreateReplica]
    await make_ready(node, fleet)
    assert not any(isinstance(a, RemoveReplica) for a in await node.reconcile_once())
    assert revisions_in_table(node) == [1, 1, 2, 2]
    assert node.routes.deployments["echo"].revision == 2

    # Each replica's revision is in the status too, and in the table of `shoal status`.
    status = await node.status()
    assert sorted(r.revision for r in status.deployments[0].replicas) == [1, 1, 2, 2]
    assert status_from_pb(status_to_pb(status)) == status
    lines = render_status(status.to_json()).splitlines()
    header = next(line for line in lines if line.startswith("REPLICA"))
    assert header.split()[:3] == ["REPLICA", "DEPLOYMENT", "REVISION"]
    assert sorted(line.split()[2] for line in lines if line.startswith("echo-")) == ["1", "1", "2", "2"]

    # A third revision rolls out: the first one drains, the second keeps serving.
    await node.apply(spec("c", replicas=2, serve_revisions=2))
    await settle(node, fleet)
    assert revisions_in_table(node) == [2, 2, 3, 3]
    assert not created_with(fleet, "a") & set(node.state.replicas)


async def test_a_kept_revision_gets_its_replicas_back_and_one_serving_revision_drains_it(
    head: tuple[HeadNode, FakeSchedulers],
) -> None:
    node, fleet = head
    await two_revisions(node, fleet)

    # The old revision's replica dies: it is placed again, with the old spec.
    await make_ready(node, fleet, gone=created_with(fleet, "a"))
    [again] = [a for a in await node.reconcile_once() if isinstance(a, CreateReplica)]
    assert again.spec.options == {"v": "a"} and again.spec.serve_revisions == 2

    # Back to one serving revision: the old one drains, the current one stays.
    await node.apply(spec("b", serve_revisions=1))
    removed = [a for a in await node.reconcile_once() if isinstance(a, RemoveReplica)]
    assert [a.replica_id for a in removed] == [again.replica_id]


async def test_a_kept_revision_that_keeps_dying_backs_off_and_does_not_fail_the_deployment(
    head: tuple[HeadNode, FakeSchedulers], clock: FakeClock
) -> None:
    node, fleet = head
    await two_revisions(node, fleet)

    steps = []
    for _ in range(5):
        # The old revision's replica dies (the first after READY, its replacements before).
        await make_ready(node, fleet, gone=created_with(fleet, "a") & set(node.state.replicas))
        now = [a for a in await node.reconcile_once() if isinstance(a, CreateReplica)]
        clock.advance(60)
        later = [a for a in await node.reconcile_once() if isinstance(a, CreateReplica)]
        steps.append((len(now), len(later)))

    # Replaced at once after dying READY; after a backoff when it died starting; not after
    # four deaths in a row before READY.
    assert steps == [(1, 0), (0, 1), (0, 1), (0, 1), (0, 0)]
    status = (await node.status()).deployments[0]
    assert not status.pending_reason.startswith("FAILED")
    assert [r.kind for r in node.history.revisions("echo")] == ["created", "updated"]


async def test_a_restart_replaces_its_revision_rather_than_keeping_it(
    head: tuple[HeadNode, FakeSchedulers],
) -> None:
    node, fleet = head
    await node.apply(spec("a", serve_revisions=2))
    await node.reconcile_once()
    await make_ready(node, fleet)
    [first] = fleet.clients["s1"].created_ids

    await node.restart("echo")
    await node.reconcile_once()
    await make_ready(node, fleet)

    removed = [a.replica_id for a in await node.reconcile_once() if isinstance(a, RemoveReplica)]
    assert removed == [first]


def test_serve_revisions_is_bounded_and_named_when_refused() -> None:
    for value, message in (
        (0, "serve_revisions: Input should be greater than or equal to 1"),
        (6, "serve_revisions: Input should be less than or equal to 5"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            spec(serve_revisions=value)
    with pytest.raises(InvalidArgument, match="serve_revisions above 1 needs a fixed replica count"):
        spec(serve_revisions=2, autoscaling={"min_replicas": 1, "max_replicas": 2})
    # Changing it keeps the replicas (it says which revisions serve, not how each runs).
    assert spec(serve_revisions=3).process_hash() == spec().process_hash()


async def test_a_kept_revision_without_room_says_so(head: tuple[HeadNode, FakeSchedulers]) -> None:
    node, fleet = head
    await two_revisions(node, fleet)  # 2 of the scheduler's 16 cpus
    # Another deployment takes the rest and wants one more; the old revision's replica dies:
    # the other deployment (first by name) takes its cpu.
    await node.apply(parse_spec({"name": "aaa", "backend": "python", "model": "m:M", "replicas": 15}))
    await settle(node, fleet)
    await make_ready(node, fleet, gone=created_with(fleet, "a"))

    created = [a for a in await node.reconcile_once() if isinstance(a, CreateReplica)]
    assert [a.deployment for a in created] == ["aaa"]
    reason = (await node.status()).deployments[1].pending_reason
    assert reason.startswith("an earlier revision kept serving waits for room: "), reason

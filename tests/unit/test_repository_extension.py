"""The OIP repository extension (index, load, unload) over a Triton repository: the REST
routes and the gRPC servicer over shoal.scheduler.repository, the head faked by a deployer
that changes the router as the head's routing table would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import pytest

from shoal.config import Settings
from shoal.core.spec import DeploymentSpec, parse_spec
from shoal.errors import NotFound, PermissionDenied
from shoal.http.scheduler import scheduler_app
from shoal.proto import grpc_service_pb2 as oip
from shoal.rpc.inference_service import InferenceService
from shoal.scheduler import repository as repository_module
from shoal.scheduler.node import SchedulerNode
from shoal.scheduler.repository import ModelRepository
from shoal.scheduler.router import Router
from shoal.testing.fakes import FakeReplicas
from shoal.testing.wait import until
from shoal.types import DeploymentRoutes, HeadLink, Route, RoutingTable
from tests.unit.conftest import Aborted, FakeContext

CONFIG = 'platform: "onnxruntime_onnx"\nmax_batch_size: 4\n'


class FakeDeployer:
    """The head: an apply makes a READY replica appear in the router, a delete removes it."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.calls: list[tuple[str, str, str | None]] = []
        self.refuse: Exception | None = None
        self.failed = ""  # set: applies start no replica, and the head says why
        self.applied: set[str] = set()
        self.version = 0
        self.head: set[str] = set()  # the deployments the head has
        self.late_tables = False  # set: a delete's routing table never reaches the router

    async def apply(self, spec: DeploymentSpec, authorization: str | None) -> None:
        self.calls.append(("apply", spec.name, authorization))
        if self.refuse is not None:
            raise self.refuse
        self.head.add(spec.name)
        if self.failed:  # the routing table names it, with no replica
            self.applied.add(spec.name)
            await self.router.apply_table(self._table(with_=(spec.name, DeploymentRoutes(spec, ()))))
            return
        self.router.add(f"{spec.name}-1", spec, "10.0.0.2:7000", "s2")

    async def delete(self, name: str, authorization: str | None) -> None:
        self.calls.append(("delete", name, authorization))
        if name not in self.router.deployments():
            raise NotFound(f"no deployment {name!r}")
        self.head.discard(name)
        if not self.late_tables:
            await self.router.apply_table(self._table(without=name))

    def _table(self, with_: tuple[str, DeploymentRoutes] | None = None, without: str = "") -> RoutingTable:
        self.version += 1
        routes = {
            n: DeploymentRoutes(
                spec, tuple(Route(h.replica_id, h.address, "s2") for h in self.router.handles(n))
            )
            for n, spec in self.router.deployments().items()
            if n != without
        }
        if with_ is not None:
            routes[with_[0]] = with_[1]
        return RoutingTable(version=self.version, deployments=routes, deleted=(without,) if without else ())

    async def failures(self, authorization: str | None) -> dict[str, str]:
        self.calls.append(("failures", "", authorization))
        return {name: self.failed for name in self.applied} if self.failed else {}

    async def names(self, authorization: str | None) -> set[str]:
        return set(self.head)


class Scheduler:
    def __init__(self, node: SchedulerNode, repository: ModelRepository, deployer: FakeDeployer) -> None:
        self.node = node
        self.repository = repository
        self.deployer = deployer
        self.tokens = False

    def http(self, host: str = "127.0.0.1", repository: bool = True) -> httpx.AsyncClient:
        app = scheduler_app(self.node, repository=self.repository if repository else None)
        transport = httpx.ASGITransport(app=app, client=(host, 5000))
        return httpx.AsyncClient(transport=transport, base_url="http://localhost")


@pytest.fixture
async def scheduler(tmp_path: Path) -> AsyncIterator[Scheduler]:
    for name, config in (("iris", CONFIG), ("pipeline", 'platform: "ensemble"\n')):
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "config.pbtxt").write_text(config)
        (tmp_path / name / "1" / "model.onnx").write_bytes(b"onnx")
    settings = Settings()
    router = Router("s1", settings, FakeReplicas(), policy="round_robin")
    node = SchedulerNode(settings, "s1", cast(HeadLink, None), FakeReplicas(), router=router)
    node.registered.set()
    deployer = FakeDeployer(router)
    holder: dict[str, Scheduler] = {}
    repository = ModelRepository(tmp_path, node.catalog, deployer, tokens_exist=lambda: holder["s"].tokens)
    holder["s"] = Scheduler(node, repository, deployer)
    yield holder["s"]
    await router.aclose()


async def index(client: httpx.AsyncClient) -> dict[str, Any]:
    reply = await client.post("/v2/repository/index")
    assert reply.status_code == 200, reply.text
    return {e["name"]: (e["version"], e["state"], e["reason"]) for e in reply.json()}


async def test_index_load_and_unload_over_http(scheduler: Scheduler) -> None:
    other = parse_spec({"name": "echo", "backend": "python", "model": "m:M"})
    scheduler.node.router.add("echo-1", other, "10.0.0.3:7000", "s2")
    async with scheduler.http() as client:
        before = await index(client)
        assert before["iris"] == ("1", "UNAVAILABLE", "unloaded")
        assert before["pipeline"][1] == "UNAVAILABLE"
        assert "pipeline/config.pbtxt: platform: 'ensemble'" in before["pipeline"][2]
        assert before["echo"][1] == "READY"  # a deployment from a spec is listed too

        reply = await client.post("/v2/repository/models/iris/load")
        assert reply.status_code == 200, reply.text
        assert (await index(client))["iris"] == ("1", "READY", "")
        assert (await client.get("/v2/models/iris/ready")).status_code == 200

        reply = await client.post("/v2/repository/models/pipeline/load")
        assert reply.status_code == 400 and "platform" in reply.json()["error"]
        reply = await client.post("/v2/repository/models/nope/load")
        assert reply.status_code == 404 and "has no model 'nope'" in reply.json()["error"]

        reply = await client.post(
            "/v2/repository/models/iris/unload", json={"parameters": {"unload_dependents": True}}
        )
        assert reply.status_code == 200, reply.text
        assert (await index(client))["iris"] == ("1", "UNAVAILABLE", "unloaded")
        # Unloading what is not loaded is no error; a name outside the repository is.
        assert (await client.post("/v2/repository/models/iris/unload")).status_code == 200
        reply = await client.post("/v2/repository/models/echo/unload")
        assert reply.status_code == 404 and "shoal delete" in reply.json()["error"]


async def test_load_overrides_are_refused_naming_the_parameter(scheduler: Scheduler) -> None:
    async with scheduler.http() as client:
        reply = await client.post("/v2/repository/models/iris/load", json={"parameters": {"config": "{}"}})
    assert reply.status_code == 400
    assert "parameter 'config'" in reply.json()["error"]
    assert scheduler.deployer.calls == []


async def test_changes_need_a_token_from_other_machines(scheduler: Scheduler) -> None:
    async with scheduler.http(host="10.1.2.3") as client:
        reply = await client.post("/v2/repository/models/iris/load")
        assert reply.status_code == 403 and "role deploy" in reply.json()["error"]
        # A token while none exists is no credential either: nothing could check it.
        headers = {"authorization": "Bearer shoal_x"}
        assert (await client.post("/v2/repository/models/iris/load", headers=headers)).status_code == 403
        assert scheduler.deployer.calls == []
        # Once tokens exist the head checks the caller's token's role.
        scheduler.tokens = True
        scheduler.deployer.refuse = PermissionDenied(
            "ApplyDeployment needs role deploy; this token has infer"
        )
        reply = await client.post("/v2/repository/models/iris/load", headers=headers)
        assert reply.status_code == 403 and "role deploy" in reply.json()["error"]
        assert scheduler.deployer.calls == [("apply", "iris", "Bearer shoal_x")]
        scheduler.deployer.refuse = None
        assert (await client.post("/v2/repository/models/iris/load", headers=headers)).status_code == 200


async def test_a_load_whose_replicas_fail_answers_the_heads_reason(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repository_module, "FAILURE_CHECK_S", 0.05)
    scheduler.deployer.failed = "FAILED: 4 replicas in a row died before READY: cannot load model.onnx"
    async with scheduler.http() as client:
        reply = await client.post("/v2/repository/models/iris/load")
    assert reply.status_code == 400
    assert reply.json()["error"] == (
        "model 'iris' (version 1) did not load: FAILED: 4 replicas in a row died before READY: "
        "cannot load model.onnx"
    )


async def test_the_index_gives_the_heads_reason_for_a_model_it_gave_up_on(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the model stayed "loading: no READY replica yet" for ever."""
    monkeypatch.setattr(repository_module, "FAILURE_CHECK_S", 0.05)
    scheduler.deployer.failed = "FAILED: 4 replicas in a row died before READY: cannot load model.onnx"
    headers = {"authorization": "Bearer shoal_x"}
    async with scheduler.http() as client:
        assert (await client.post("/v2/repository/models/iris/load")).status_code == 400
        assert (await index(client))["iris"] == ("1", "UNAVAILABLE", scheduler.deployer.failed)
        assert (await client.post("/v2/repository/index", headers=headers)).status_code == 200
        assert scheduler.deployer.calls[-1] == ("failures", "", "Bearer shoal_x")  # the caller's token
        scheduler.deployer.failed = ""  # the head is away or has not given up: loading
        assert (await index(client))["iris"] == ("1", "UNAVAILABLE", "loading: no READY replica yet")
        assert (await client.post("/v2/repository/index", json={"ready": True})).json() == []
    service = InferenceService(scheduler.node.dataplane, None, Settings(), scheduler.repository)
    scheduler.deployer.failed = "FAILED: gave up"
    reply = await service.RepositoryIndex(oip.RepositoryIndexRequest(), cast(Any, FakeContext()))
    assert [(m.name, m.state, m.reason) for m in reply.models if m.name == "iris"] == [
        ("iris", "UNAVAILABLE", "FAILED: gave up")
    ]


async def test_an_unload_overtaken_by_a_load_answers_when_the_head_has_the_model_again(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load right after an unload deploys the model again at the head before this
    scheduler's routing table lacks it (the head sends the newest table): the unload waited
    for a table without the model, its whole UNLOAD_TIMEOUT_S, and answered 503. It is done
    once the head has the model again: the later load won, as in Triton's order."""
    monkeypatch.setattr(repository_module, "UNLOAD_TIMEOUT_S", 5.0)
    async with scheduler.http() as client:
        assert (await client.post("/v2/repository/models/iris/load")).status_code == 200
        scheduler.deployer.late_tables = True
        unload = asyncio.create_task(client.post("/v2/repository/models/iris/unload"))
        await until(lambda: ("delete", "iris", None) in scheduler.deployer.calls, "the delete")
        assert (await client.post("/v2/repository/models/iris/load")).status_code == 200
        reply = await unload
        assert reply.status_code == 200, reply.text
        assert (await index(client))["iris"] == ("1", "READY", "")


async def test_without_a_repository_load_and_unload_are_not_implemented(scheduler: Scheduler) -> None:
    async with scheduler.http(repository=False) as client:
        for action in ("load", "unload"):
            reply = await client.post(f"/v2/repository/models/iris/{action}")
            assert reply.status_code == 501 and "--model-repository" in reply.json()["error"]


async def test_load_unload_and_index_over_grpc(scheduler: Scheduler) -> None:
    service = InferenceService(scheduler.node.dataplane, None, Settings(), scheduler.repository)
    await service.RepositoryModelLoad(
        oip.RepositoryModelLoadRequest(model_name="iris"), cast(Any, FakeContext())
    )
    reply = await service.RepositoryIndex(oip.RepositoryIndexRequest(ready=True), cast(Any, FakeContext()))
    assert [(m.name, m.version, m.state) for m in reply.models] == [("iris", "1", "READY")]
    await service.RepositoryModelUnload(
        oip.RepositoryModelUnloadRequest(model_name="iris"), cast(Any, FakeContext())
    )
    assert scheduler.deployer.calls == [("apply", "iris", None), ("delete", "iris", None)]
    context = FakeContext()
    with pytest.raises(Aborted):
        await service.RepositoryModelLoad(
            oip.RepositoryModelLoadRequest(model_name="pipeline"), cast(Any, context)
        )
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT and "platform" in context.details
    bare = InferenceService(scheduler.node.dataplane, None, Settings())
    context = FakeContext()
    with pytest.raises(Aborted):
        await bare.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="iris"), cast(Any, context))
    assert context.code == grpc.StatusCode.UNIMPLEMENTED


async def test_server_metadata_names_the_repository_extension_only_when_one_is_served(
    scheduler: Scheduler,
) -> None:
    for served in (True, False):
        async with scheduler.http(repository=served) as client:
            extensions = (await client.get("/v2")).json()["extensions"]
        service = InferenceService(
            scheduler.node.dataplane, None, Settings(), scheduler.repository if served else None
        )
        meta = await service.ServerMetadata(oip.ServerMetadataRequest(), cast(Any, FakeContext()))
        assert list(meta.extensions) == extensions
        assert ("model_repository" in extensions) is served
        assert {"model_configuration", "statistics", "binary_tensor_data"} <= set(extensions)


@pytest.mark.parametrize(
    ("method", "path", "why"),
    [
        ("GET", "/v2/trace/setting", "tracing is not supported"),
        ("POST", "/v2/models/iris/trace/setting", "tracing is not supported"),
        ("POST", "/v2/logging", "--log-level"),
        ("GET", "/v2/systemsharedmemory/status", "shared memory is not supported"),
        ("POST", "/v2/systemsharedmemory/region/r0/register", "shared memory is not supported"),
        ("POST", "/v2/cudasharedmemory/unregister", "shared memory is not supported"),
    ],
)
async def test_triton_extensions_shoal_lacks_answer_501_saying_so_not_404(
    scheduler: Scheduler, method: str, path: str, why: str
) -> None:
    """As their gRPC methods answer UNIMPLEMENTED: a 404 would read as a wrong address."""
    async with scheduler.http() as client:
        reply = await client.request(method, path, json={})
    assert reply.status_code == 501
    error = reply.json()["error"]
    assert error.startswith(f"{method} {path} is not implemented: ") and why in error

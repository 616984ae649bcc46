"""The Open Inference Protocol's model catalog and its REST adapter, over in-memory replicas.

No sockets: the router talks to ``FakeReplicas``, the Starlette app is called through
httpx's ASGI transport.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import struct
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import httpx
import numpy as np
import pytest

from shoal.config import Settings
from shoal.core import payload
from shoal.core.spec import DeploymentSpec, TensorSpec
from shoal.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from shoal.http.scheduler import scheduler_app
from shoal.scheduler.dataplane import DataPlane, InferCall
from shoal.scheduler.models import (
    ModelCatalog,
    ModelMetadata,
    check_inputs,
    check_outputs,
    model_config,
)
from shoal.scheduler.node import SchedulerNode
from shoal.scheduler.router import Router
from shoal.testing.fakes import FakeReplicaClient, FakeReplicas
from shoal.types import Arrays, HeadLink, ReplicaDescription
from tests.unit.conftest import make_spec

pytestmark = pytest.mark.timeout(10)

X = TensorSpec(name="x", datatype="FP32", shape=(-1, 4))
S = TensorSpec(name="s", datatype="BYTES", shape=(-1,))


def typed_spec(**changes: Any) -> DeploymentSpec:
    tensors = [
        {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "s", "datatype": "BYTES", "shape": [-1]},
    ]
    return make_spec(inputs=tensors, outputs=tensors, **changes)


def x(rows: int = 2) -> np.ndarray:
    return np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)


def s(rows: int = 2) -> np.ndarray:
    out = np.empty(rows, dtype=object)
    out[:] = [f"r{i}".encode() for i in range(rows)]
    return out


@pytest.fixture
def fakes() -> FakeReplicas:
    return FakeReplicas()


@pytest.fixture
async def router(fakes: FakeReplicas) -> AsyncIterator[Router]:
    r = Router("s1", Settings(), fakes, policy="round_robin")
    yield r
    await r.aclose()


def add(router: Router, fakes: FakeReplicas, spec: DeploymentSpec, *rids: str) -> list[FakeReplicaClient]:
    for rid in rids:
        router.add(rid, spec, f"{rid}:9000", "s1")
    return [fakes.clients[f"{rid}:9000"] for rid in rids]


def count_describes(client: FakeReplicaClient) -> list[float]:
    """Record each describe() call on ``client``."""
    calls: list[float] = []
    original = client.describe

    async def describe(timeout_s: float) -> ReplicaDescription:
        calls.append(timeout_s)
        return await original(timeout_s)

    client.describe = describe  # type: ignore[method-assign]
    return calls


@dataclasses.dataclass(frozen=True)
class ArrayResult:
    """An ``InferResult`` with its outputs decoded to numpy, by name, in the model's order."""

    model_name: str
    model_version: str
    id: str
    outputs: Arrays
    replica_id: str = ""


class Door:
    """The data plane over ``catalog``, taking and giving numpy as an adapter would."""

    def __init__(self, catalog: ModelCatalog) -> None:
        self.door = DataPlane(catalog.router, catalog, Settings())

    async def infer(
        self,
        name: str,
        arrays: Arrays,
        *,
        version: str = "",
        request_id: str = "",
        timeout_s: float = 0.0,
        outputs: Sequence[str] = (),
    ) -> ArrayResult:
        call = InferCall(name, payload.from_arrays(arrays), request_id, version, timeout_s, tuple(outputs))
        r = await self.door.infer(call)
        return ArrayResult(r.model_name, r.model_version, r.id, payload.to_arrays(r.outputs), r.replica_id)


# ---------------------------------------------------------------- rules


META = ModelMetadata(name="m", platform="python", inputs=(X, S), outputs=(X, S))


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"x": x(), "s": s(), "y": x()}, "unknown input 'y'"),
        ({"x": x()}, "missing input 's'"),
        ({"x": x().astype(np.float64), "s": s()}, "input 'x': expected datatype FP32, got FP64"),
        (
            {"x": np.zeros((2, 4, 1), np.float32), "s": s()},
            r"input 'x': expected shape \[-1,4\], got \[2,4,1\]",
        ),
        ({"x": np.zeros((2, 5), np.float32), "s": s()}, r"input 'x': expected shape \[-1,4\], got \[2,5\]"),
        ({"x": x(), "s": np.zeros(2, np.int64)}, "input 's': expected datatype BYTES, got INT64"),
    ],
)
def test_check_inputs_names_the_input(inputs: Arrays, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_inputs(META, payload.from_arrays(inputs))


def test_check_inputs_accepts_any_size_for_minus_one_and_skips_unknown_models() -> None:
    check_inputs(META, payload.from_arrays({"x": x(7), "s": s(3)}))
    check_inputs(ModelMetadata("m", "python", (), ()), payload.from_arrays({"anything": np.zeros(3)}))


def test_check_inputs_takes_the_inputs_in_any_order() -> None:
    check_inputs(META, payload.from_arrays({"x": x(), "s": s()}))
    check_inputs(META, payload.from_arrays({"s": s(), "x": x()}))
    with pytest.raises(InvalidArgument, match=r"input 'x': expected shape \[-1,4\], got \[2,5\]"):
        check_inputs(META, payload.from_arrays({"s": s(), "x": np.zeros((2, 5), np.float32)}))


def test_check_outputs() -> None:
    check_outputs(META, ["s", "x"])
    with pytest.raises(InvalidArgument, match="unknown output 'y'"):
        check_outputs(META, ["y"])
    with pytest.raises(InvalidArgument, match="output 'x' is requested twice"):
        check_outputs(META, ["x", "x"])


def test_config_without_batching_keeps_the_whole_shape() -> None:
    spec = typed_spec()
    config = model_config(spec, META, instances=2)
    assert config["max_batch_size"] == 0
    assert "dynamic_batching" not in config
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("x", "TYPE_FP32", [-1, 4]),
        ("s", "TYPE_STRING", [-1]),
    ]
    assert config["backend"] == "python"
    assert config["instance_group"] == [{"name": "echo", "kind": "KIND_CPU", "count": 2}]
    assert config["model_transaction_policy"] == {"decoupled": False}


def test_config_with_batching_leaves_out_the_batch_axis_as_triton_does() -> None:
    spec = typed_spec(batching={"max_batch_size": 16, "max_delay_ms": 5})
    config = model_config(spec, META, instances=1)
    assert config["max_batch_size"] == 16
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 5000
    x_in, s_in = config["input"]
    assert x_in["dims"] == [4] and "reshape" not in x_in
    # A tensor that is only the batch axis: dims [1] reshaped to a scalar.
    assert s_in["dims"] == [1] and s_in["reshape"] == {"shape": []}
    assert [t["dims"] for t in config["output"]] == [[4], [1]]


# ---------------------------------------------------------------- catalog


async def test_metadata_from_the_spec_needs_no_replica(router: Router) -> None:
    router.set_spec(typed_spec())
    catalog = ModelCatalog(router)
    meta = await catalog.metadata("echo")
    assert meta.to_json() == {
        "name": "echo",
        "versions": ["1"],
        "platform": "python",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "s", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "s", "datatype": "BYTES", "shape": [-1]},
        ],
    }
    assert await catalog.metadata("echo", "1") == meta
    with pytest.raises(NotFound, match="version '2'"):
        await catalog.metadata("echo", "2")
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        await catalog.metadata("nope")


async def test_metadata_is_described_by_a_replica_once_per_spec(router: Router, fakes: FakeReplicas) -> None:
    spec = make_spec(backend="sklearn", model="digits.joblib")
    catalog = ModelCatalog(router)
    router.set_spec(spec)
    with pytest.raises(Unavailable, match="no READY replica"):
        await catalog.metadata("echo")
    [a] = add(router, fakes, spec, "a")
    a.description = ReplicaDescription(inputs=(X,), outputs=(S,))
    calls = count_describes(a)
    for _ in range(3):
        meta = await catalog.metadata("echo")
        assert (meta.platform, meta.inputs, meta.outputs) == ("sklearn", (X,), (S,))
    assert len(calls) == 1
    # A new spec (another model) is described again.
    changed = make_spec(backend="sklearn", model="other.joblib")
    router.set_spec(changed)
    a.description = ReplicaDescription(inputs=(S,), outputs=(X,))
    assert (await catalog.metadata("echo")).inputs == (S,)
    assert len(calls) == 2


async def test_requests_check_against_a_description_asked_once_per_spec(
    router: Router, fakes: FakeReplicas
) -> None:
    spec = make_spec(backend="sklearn", model="digits.joblib")
    [a] = add(router, fakes, spec, "a")
    a.description = ReplicaDescription(inputs=(X,), outputs=(X,))
    calls = count_describes(a)
    catalog = ModelCatalog(router)
    for _ in range(3):
        assert list((await Door(catalog).infer("echo", {"x": x()})).outputs) == ["x"]
    with pytest.raises(InvalidArgument, match="unknown input 's'"):
        await Door(catalog).infer("echo", {"x": x(), "s": s()})
    assert len(calls) == 1, "kept after the first request"
    # Another model under the same name: its description is asked for, and it decides.
    router.set_spec(make_spec(backend="sklearn", model="other.joblib"))
    a.description = ReplicaDescription(inputs=(S,), outputs=(S,))
    with pytest.raises(InvalidArgument, match="unknown input 'x'"):
        await Door(catalog).infer("echo", {"x": x()})
    assert len(calls) == 2


async def test_describe_tries_the_next_replica(router: Router, fakes: FakeReplicas) -> None:
    spec = make_spec()
    a, b = add(router, fakes, spec, "a", "b")
    a.fail()
    b.description = ReplicaDescription(inputs=(X,), outputs=(X,))
    assert (await ModelCatalog(router).metadata("echo")).inputs == (X,)


async def test_readiness_index_and_server_metadata(router: Router, fakes: FakeReplicas) -> None:
    ready = False
    catalog = ModelCatalog(router, ready=lambda: ready)
    router.set_spec(make_spec("a"))
    router.set_spec(make_spec("b"))
    add(router, fakes, make_spec("b"), "b1")
    assert not catalog.server_ready()
    ready = True
    assert catalog.server_ready() and catalog.server_live()
    assert not catalog.model_ready("a")
    assert catalog.model_ready("b") and catalog.model_ready("b", "1")
    with pytest.raises(NotFound):
        catalog.model_ready("c")
    assert [(e.name, e.state) for e in catalog.index()] == [("a", "UNAVAILABLE"), ("b", "READY")]
    assert [e.name for e in catalog.index(ready_only=True)] == ["b"]
    meta = catalog.server_metadata()
    assert (
        meta.name == "shoal" and "model_configuration" in meta.extensions and "statistics" in meta.extensions
    )


async def test_infer_checks_selects_and_echoes_the_id(router: Router, fakes: FakeReplicas) -> None:
    spec = typed_spec()
    [a] = add(router, fakes, spec, "a")
    catalog = ModelCatalog(router)
    result = await Door(catalog).infer("echo", {"s": s(), "x": x()}, request_id="7")
    assert (result.model_name, result.model_version, result.id) == ("echo", "1", "7")
    assert list(result.outputs) == ["x", "s"], "all outputs, in the model's order"
    np.testing.assert_array_equal(result.outputs["x"], x())
    only = await Door(catalog).infer("echo", {"x": x(), "s": s()}, outputs=["s"], request_id="7")
    assert list(only.outputs) == ["s"]
    # Clients reuse ids; the router gets a unique one per request.
    ids = [c.request_id for c in a.requests]
    assert len(set(ids)) == 2 and all(i.startswith("7~") for i in ids)
    with pytest.raises(InvalidArgument, match="missing input 's'"):
        await Door(catalog).infer("echo", {"x": x()})
    with pytest.raises(InvalidArgument, match="unknown output 'y'"):
        await Door(catalog).infer("echo", {"x": x(), "s": s()}, outputs=["y"])
    with pytest.raises(NotFound):
        await Door(catalog).infer("echo", {"x": x(), "s": s()}, version="3")
    assert len(a.requests) == 2, "refused requests never reach a replica"


async def test_infer_without_metadata_checks_outputs_after_the_fact(
    router: Router, fakes: FakeReplicas
) -> None:
    add(router, fakes, make_spec(), "a")
    catalog = ModelCatalog(router)
    result = await Door(catalog).infer("echo", {"a": x(), "b": x()}, outputs=["b"])
    assert list(result.outputs) == ["b"]
    with pytest.raises(InvalidArgument, match="unknown output 'c'"):
        await Door(catalog).infer("echo", {"a": x()}, outputs=["c"])


async def test_infer_honours_the_timeout(router: Router, fakes: FakeReplicas) -> None:
    [a] = add(router, fakes, make_spec(), "a")
    a.delay_s = 1.0
    with pytest.raises(DeadlineExceeded):
        await Door(ModelCatalog(router)).infer("echo", {"x": x()}, timeout_s=0.05)


async def test_statistics_count_requests_and_sum_replica_batches(router: Router, fakes: FakeReplicas) -> None:
    spec = typed_spec(batching={"max_batch_size": 8, "max_delay_ms": 1})
    a, b = add(router, fakes, spec, "a", "b")
    a.description = ReplicaDescription(batch_sizes={1: 2, 4: 1}, requests=6, batches=3, compute_ns=300)
    b.description = ReplicaDescription(batch_sizes={4: 2}, requests=8, batches=2, compute_ns=200)
    catalog = ModelCatalog(router)
    for rows in (1, 3, 4):
        await Door(catalog).infer("echo", {"x": x(rows), "s": s(rows)})
    a.fail()
    b.fail()
    with pytest.raises(Unavailable):
        await Door(catalog).infer("echo", {"x": x(), "s": s()})
    a.recover()
    b.recover()

    [stats] = await catalog.statistics("echo")
    assert stats.inference_count == 8, "rows, since the model batches"
    assert stats.success.count == 3 and stats.success.ns > 0
    assert stats.fail.count == 1
    assert stats.queue.count == 4
    assert stats.last_inference > 0
    assert stats.execution_count == 5
    assert stats.compute_infer.count == 14 and stats.compute_infer.ns == 500
    assert [(bs.batch_size, bs.compute_infer.count) for bs in stats.batch_stats] == [(1, 2), (4, 3)]
    doc = stats.to_json()
    assert doc["inference_stats"]["success"]["count"] == 3
    assert doc["batch_stats"][1]["batch_size"] == 4
    assert set(doc["inference_stats"]) >= {"success", "fail", "queue", "compute_input", "compute_infer"}
    # A replica that cannot answer does not fail the statistics.
    b.fail()
    [partial] = await catalog.statistics()
    assert partial.execution_count == 3


async def test_statistics_without_batching_count_requests(router: Router, fakes: FakeReplicas) -> None:
    [a] = add(router, fakes, typed_spec(), "a")
    a.description = ReplicaDescription(batch_sizes={3: 2}, requests=2, batches=2)
    catalog = ModelCatalog(router)
    await Door(catalog).infer("echo", {"x": x(3), "s": s(3)})
    await Door(catalog).infer("echo", {"x": x(3), "s": s(3)})
    [stats] = await catalog.statistics("echo", "1")
    assert stats.inference_count == 2
    assert [(bs.batch_size, bs.compute_infer.count) for bs in stats.batch_stats] == [(1, 2)]
    with pytest.raises(NotFound):
        await catalog.statistics("nope")


# ---------------------------------------------------------------- REST adapter


@pytest.fixture
async def http(router: Router, fakes: FakeReplicas) -> AsyncIterator[httpx.AsyncClient]:
    node = SchedulerNode(Settings(max_message_mb=1), "s1", cast(HeadLink, None), fakes, router=router)
    node.registered.set()
    add(router, fakes, typed_spec(), "a")
    app = scheduler_app(node)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shoal") as client:
        yield client


def infer_doc(**extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]},
            {"name": "s", "datatype": "BYTES", "shape": [1], "data": ["hi"]},
        ],
        **extra,
    }


async def test_rest_json_infer(http: httpx.AsyncClient) -> None:
    r = await http.post("/v2/models/echo/infer", json=infer_doc(id="q1"))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["id"] == "q1" and doc["model_version"] == "1"
    assert doc["outputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 4.0]},
        {"name": "s", "datatype": "BYTES", "shape": [1], "data": ["hi"]},
    ]
    r = await http.post("/v2/models/echo/versions/1/infer", json=infer_doc(outputs=[{"name": "s"}]))
    assert [o["name"] for o in r.json()["outputs"]] == ["s"]


async def test_rest_binary_infer_and_gzip(http: httpx.AsyncClient) -> None:
    raw_x = np.arange(4, dtype=np.float32).tobytes()
    raw_s = struct.pack("<I", 2) + b"hi"
    header = {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [1, 4],
                "parameters": {"binary_data_size": len(raw_x)},
            },
            {"name": "s", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(raw_s)}},
        ],
        "outputs": [
            {"name": "x", "parameters": {"binary_data": True}},
            {"name": "s", "parameters": {"binary_data": False}},
        ],
    }
    text = json.dumps(header).encode()
    body = gzip.compress(text + raw_x + raw_s)
    r = await http.post(
        "/v2/models/echo/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(len(text)), "Content-Encoding": "gzip"},
    )
    assert r.status_code == 200, r.text
    length = int(r.headers["inference-header-content-length"])
    out = json.loads(r.content[:length])
    assert out["outputs"][0]["parameters"] == {"binary_data_size": 16}
    assert out["outputs"][1]["data"] == ["hi"]
    np.testing.assert_array_equal(
        np.frombuffer(r.content[length:], np.float32), np.arange(4, dtype=np.float32)
    )


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b"{not json", {}, "not valid JSON"),
        (json.dumps(infer_doc()).replace("FP32", "FP33").encode(), {}, "unknown datatype 'FP33'"),
        (
            json.dumps(infer_doc()).replace("[1, 4]", "[2, 4]").encode(),
            {},
            "input 'x': shape \\[2,4\\] needs 8",
        ),
        (json.dumps({"inputs": infer_doc()["inputs"][:1]}).encode(), {}, "missing input 's'"),
        (
            json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4]}]}).encode(),
            {},
            "input 'x': no data",
        ),
        (b"{}", {"Content-Encoding": "br"}, "unsupported Content-Encoding"),
        (b"{}", {"Inference-Header-Content-Length": "9"}, "Inference-Header-Content-Length"),
        (json.dumps(infer_doc(parameters={"timeout": "soon"})).encode(), {}, "timeout"),
        (json.dumps(infer_doc(parameters={"sequence_id": 3})).encode(), {}, "sequence"),
    ],
)
async def test_rest_malformed_requests_are_400_naming_the_problem(
    http: httpx.AsyncClient, body: bytes, headers: dict[str, str], message: str
) -> None:
    r = await http.post("/v2/models/echo/infer", content=body, headers=headers)
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert re.search(message, r.json()["error"]), r.json()
    ok = await http.post("/v2/models/echo/infer", json=infer_doc())
    assert ok.status_code == 200


async def test_a_body_over_max_message_mb_is_413_naming_the_limit(http: httpx.AsyncClient) -> None:
    """HTTP has a status for it (Payload Too Large); the message names the setting. Sent
    chunked too, so the limit holds without a Content-Length to trust."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * (512 * 1024)

    for body in (b"x" * (1024 * 1024 + 1), chunks()):
        r = await http.post("/v2/models/echo/infer", content=body)
        assert r.status_code == 413, r.text
        assert "over the limit of 1048576 bytes (setting max_message_mb)" in r.json()["error"]
    bomb = gzip.compress(b" " * (2 * 1024 * 1024))  # 2 KiB that decode to 2 MiB
    r = await http.post("/v2/models/echo/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413, r.text
    assert "decompresses to over the limit of 1048576 bytes" in r.json()["error"]
    ok = await http.post("/v2/models/echo/infer", json=infer_doc())
    assert ok.status_code == 200


async def test_rest_wrong_raw_length(http: httpx.AsyncClient) -> None:
    header = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 12}}]
    }
    text = json.dumps(header).encode()
    r = await http.post(
        "/v2/models/echo/infer",
        content=text + b"\0" * 12,
        headers={"Inference-Header-Content-Length": str(len(text))},
    )
    assert r.status_code == 400
    assert "input 'x': expected 16 bytes for FP32 [1,4], got 12" in r.json()["error"]


async def test_rest_models_health_and_errors(http: httpx.AsyncClient) -> None:
    assert (await http.get("/v2/health/live")).status_code == 200
    assert (await http.get("/v2/health/ready")).status_code == 200
    assert (await http.get("/v2")).json()["name"] == "shoal"
    assert (await http.get("/v2/models/echo/ready")).status_code == 200
    r = await http.get("/v2/models/nope/ready")
    assert r.status_code == 404 and "nope" in r.json()["error"]
    r = await http.get("/v2/models/echo/versions/2")
    assert r.status_code == 404 and "version '2'" in r.json()["error"]
    assert (await http.get("/v2/models/echo/config")).json()["max_batch_size"] == 0
    assert (await http.get("/v2/models/echo")).json()["inputs"][0]["name"] == "x"
    r = await http.post("/v2/models/nope/infer", json=infer_doc())
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    r = await http.get("/v2/nothing/here")
    assert r.status_code == 404 and "error" in r.json()
    stats = (await http.get("/v2/models/stats")).json()["model_stats"]
    assert [m["name"] for m in stats] == ["echo"]
    index = (await http.post("/v2/repository/index", json={"ready": True})).json()
    assert index == [{"name": "echo", "version": "1", "state": "READY", "reason": ""}]


async def test_classification_goes_to_the_replica_with_the_outputs_it_names(
    http: httpx.AsyncClient, fakes: FakeReplicas
) -> None:
    """docs/triton.md: an output's ``classification`` (Triton's classification extension)
    travels to the replica, which answers the top k; a request without one carries none."""
    outputs = [{"name": "x", "parameters": {"classification": 2}}, {"name": "s"}]
    r = await http.post("/v2/models/echo/infer", json=infer_doc(outputs=outputs))
    assert r.status_code == 200, r.text
    r = await http.post("/v2/models/echo/infer", json=infer_doc(outputs=[{"name": "x"}]))
    assert r.status_code == 200, r.text
    assert [call.classify for call in fakes.clients["a:9000"].requests] == [{"x": 2}, {}]


@pytest.mark.parametrize(
    ("output", "k", "error"),
    [
        ("x", 0, "output 'x': parameter 'classification' must be a positive integer"),
        ("x", -1, "output 'x': parameter 'classification' must be a positive integer"),
        ("x", True, "output 'x': parameter 'classification' must be a positive integer"),
        ("x", 2.0, "output 'x': parameter 'classification' must be a positive integer"),
        ("x", "2", "output 'x': parameter 'classification' must be a positive integer"),
        ("x", 2**32, "output 'x': parameter 'classification' must be a positive integer"),
        ("s", 2, "output 's': classification needs a numeric output, and 's' is BYTES"),
        ("nope", 2, "unknown output 'nope'"),
    ],
)
async def test_classification_refuses_a_bad_count_or_output_naming_it(
    http: httpx.AsyncClient, fakes: FakeReplicas, output: str, k: object, error: str
) -> None:
    outputs = [{"name": output, "parameters": {"classification": k}}]
    r = await http.post("/v2/models/echo/infer", json=infer_doc(outputs=outputs))
    assert r.status_code == 400
    assert r.json()["error"].startswith(error)
    assert fakes.clients["a:9000"].requests == []

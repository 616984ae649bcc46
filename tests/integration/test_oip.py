"""The Open Inference Protocol on a real cluster, spoken by the real clients: tritonclient
(gRPC and HTTP, binary and JSON), plain httpx with KServe V2 JSON, and raw gRPC messages
built with tritonclient's own protos for what its client refuses to send.

One cluster for the module (max_message_mb=1, so the body limit is cheap to hit):
``echo`` (no batching; FP32, INT64, BYTES and FP16 tensors), ``batched`` (an echo that
batches up to 16 rows within 5 ms and takes 20 ms per call) and ``digits`` (sklearn, no
declared tensors: its metadata comes from the replica); ``free`` is an echo that declares
no tensors, so takes any.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import httpx
import joblib
import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpbg
from tritonclient.utils import InferenceServerException

from shoal.testing.cluster import ProcessCluster

T = TypeVar("T")

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio(loop_scope="module")]

ECHO_TENSORS = [
    {"name": "x", "datatype": "FP32", "shape": [-1, 16]},
    {"name": "i", "datatype": "INT64", "shape": [-1, 4]},
    {"name": "s", "datatype": "BYTES", "shape": [-1]},
    {"name": "h", "datatype": "FP16", "shape": [-1, 3]},
]
BATCHED_TENSORS = [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]


def specs(examples: Path) -> list[dict[str, Any]]:
    common = {
        "backend": "python",
        "model": "echo:Echo",
        "base_dir": str(examples),
        "resources": {"cpus": 0.1},
    }
    return [
        {"name": "echo", **common, "inputs": ECHO_TENSORS, "outputs": ECHO_TENSORS},
        {
            "name": "batched",
            **common,
            "options": {"delay_ms": 20},
            "batching": {"max_batch_size": 16, "max_delay_ms": 5},
            "inputs": BATCHED_TENSORS,
            "outputs": BATCHED_TENSORS,
        },
        {"name": "free", **common},  # declares no tensors: takes anything
        {
            "name": "digits",
            "backend": "sklearn",
            "model": "digits.joblib",
            "base_dir": str(examples),
            "resources": {"cpus": 0.1},
        },
    ]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(
    tmp_path_factory: pytest.TempPathFactory, examples_dir: Path
) -> AsyncIterator[ProcessCluster]:
    async with ProcessCluster(tmp_path_factory.mktemp("oip"), env={"SHOAL_MAX_MESSAGE_MB": "1"}) as c:
        for spec in specs(examples_dir):
            await c.deploy(spec)
        for name in ("echo", "batched", "free", "digits"):
            await c.wait_ready(name, 1)
        yield c


@pytest_asyncio.fixture(loop_scope="module")
async def grpc_client(cluster: ProcessCluster) -> AsyncIterator[tgrpc_aio.InferenceServerClient]:
    client = tgrpc_aio.InferenceServerClient(cluster.scheduler_address())
    try:
        yield client
    finally:
        await client.close()


@pytest_asyncio.fixture(loop_scope="module")
async def stub(cluster: ProcessCluster) -> AsyncIterator[tpbg.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(cluster.scheduler_address()) as channel:
        yield tpbg.GRPCInferenceServiceStub(channel)


async def over_http(cluster: ProcessCluster, call: Callable[[thttp.InferenceServerClient], T]) -> T:
    """``call(client)`` with tritonclient's (blocking) HTTP client, in a thread."""

    def run() -> T:
        client = thttp.InferenceServerClient(cluster.http_address())
        try:
            return call(client)
        finally:
            client.close()

    return await asyncio.to_thread(run)


def echo_arrays(rows: int = 2) -> dict[str, np.ndarray]:
    s = np.empty(rows, dtype=object)
    s[:] = [f"row {r} ✓".encode() for r in range(rows)]
    return {
        "x": np.arange(rows * 16, dtype=np.float32).reshape(rows, 16) / 7,
        "i": (np.arange(rows * 4, dtype=np.int64).reshape(rows, 4) - 3) * 2**40,
        "s": s,
        "h": np.linspace(-2, 2, rows * 3, dtype=np.float16).reshape(rows, 3),
    }


DATATYPE = {"x": "FP32", "i": "INT64", "s": "BYTES", "h": "FP16"}


def http_tensors(
    arrays: dict[str, np.ndarray], binary: bool
) -> tuple[list[thttp.InferInput], list[thttp.InferRequestedOutput]]:
    """tritonclient's HTTP inputs of ``arrays`` and the outputs of the same names."""
    inputs = []
    for name, arr in arrays.items():
        inp = thttp.InferInput(name, list(arr.shape), DATATYPE[name])
        inp.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(inp)
    return inputs, [thttp.InferRequestedOutput(n, binary_data=binary) for n in arrays]


def assert_same(got: np.ndarray | None, want: np.ndarray) -> None:
    assert got is not None
    assert got.shape == want.shape
    if want.dtype == object:
        # tritonclient gives BYTES from JSON as str, from binary data as bytes.
        assert [v.encode() if isinstance(v, str) else bytes(v) for v in got.flat] == list(want.flat)
    else:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- health and metadata


async def test_health_and_server_metadata(
    cluster: ProcessCluster, grpc_client: tgrpc_aio.InferenceServerClient
) -> None:
    assert await grpc_client.is_server_live()
    assert await grpc_client.is_server_ready()
    assert await grpc_client.is_model_ready("echo")
    assert await grpc_client.is_model_ready("echo", "1")
    assert not await grpc_client.is_model_ready("nope")
    meta = await grpc_client.get_server_metadata(as_json=True)
    assert meta["name"] == "shoal"
    assert {"model_configuration", "statistics", "binary_tensor_data"} <= set(meta["extensions"])

    def check(client: thttp.InferenceServerClient) -> None:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
        assert not client.is_model_ready("nope")
        assert not client.is_model_ready("echo", "2")
        assert client.get_server_metadata()["name"] == "shoal"

    await over_http(cluster, check)


async def test_model_metadata_declared_and_derived(
    cluster: ProcessCluster, grpc_client: tgrpc_aio.InferenceServerClient
) -> None:
    meta = await over_http(cluster, lambda c: c.get_model_metadata("echo"))
    assert meta == {
        "name": "echo",
        "versions": ["1"],
        "platform": "python",
        "inputs": ECHO_TENSORS,
        "outputs": ECHO_TENSORS,
    }
    digits = await grpc_client.get_model_metadata("digits")
    assert (digits.name, list(digits.versions), digits.platform) == ("digits", ["1"], "sklearn")
    assert [(t.name, t.datatype, list(t.shape)) for t in digits.inputs] == [("input", "FP32", [-1, 64])]
    assert [(t.name, t.datatype, list(t.shape)) for t in digits.outputs] == [
        ("label", "INT64", [-1]),
        ("probabilities", "FP32", [-1, 10]),
    ]


async def test_model_config_follows_triton(
    cluster: ProcessCluster, grpc_client: tgrpc_aio.InferenceServerClient
) -> None:
    echo = await over_http(cluster, lambda c: c.get_model_config("echo"))
    assert echo["max_batch_size"] == 0
    assert "dynamic_batching" not in echo
    assert [(t["name"], t["data_type"], t["dims"]) for t in echo["input"]] == [
        ("x", "TYPE_FP32", [-1, 16]),
        ("i", "TYPE_INT64", [-1, 4]),
        ("s", "TYPE_STRING", [-1]),
        ("h", "TYPE_FP16", [-1, 3]),
    ]
    batched = (await grpc_client.get_model_config("batched")).config
    assert batched.max_batch_size == 16
    assert batched.dynamic_batching.max_queue_delay_microseconds == 5000
    assert [(t.name, list(t.dims)) for t in batched.input] == [("x", [16])]
    digits = (await grpc_client.get_model_config("digits", as_json=True))["config"]
    assert digits["backend"] == "sklearn"
    assert [int(d) for d in digits["output"][1]["dims"]] == [-1, 10]


# ---------------------------------------------------------------- inference


# 2,000 rows: 236 KB of tensors each way, over the 64 KiB from which the local hop writes
# a message's tensors in parts (shoal.rpc.wire); 3 rows: the whole-message path.
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("rows", [3, 2000])
async def test_http_infer_every_datatype(cluster: ProcessCluster, binary: bool, rows: int) -> None:
    arrays = echo_arrays(rows)

    def call(client: thttp.InferenceServerClient) -> thttp.InferResult:
        inputs, outputs = http_tensors(arrays, binary)
        return client.infer("echo", inputs, outputs=outputs, request_id="req-42")

    result = await over_http(cluster, call)
    assert result.get_response()["id"] == "req-42"
    for name, want in arrays.items():
        assert_same(result.as_numpy(name), want)


# 2,000 rows: an answer over max_json_on_loop_kb, compressed off the event loop (as JSON,
# written and compressed in the parsing process).
@pytest.mark.parametrize("coding", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("rows", [3, 2000])
async def test_http_infer_compressed_both_ways(
    cluster: ProcessCluster, coding: str, binary: bool, rows: int
) -> None:
    """tritonclient's request_compression_algorithm and response_compression_algorithm.
    Before, the answer came uncompressed whatever the client asked (which tritonclient
    reads too)."""
    arrays = echo_arrays(rows)
    encodings: list[str | None] = []

    def call(client: thttp.InferenceServerClient) -> thttp.InferResult:
        post = client._post

        def spy(*args: Any, **kwargs: Any) -> Any:  # what the server answered with
            response = post(*args, **kwargs)
            encodings.append(response.get("Content-Encoding"))
            return response

        client._post = spy
        inputs, outputs = http_tensors(arrays, binary)
        return client.infer(
            "echo",
            inputs,
            outputs=outputs,
            request_compression_algorithm=coding,
            response_compression_algorithm=coding,
        )

    result = await over_http(cluster, call)
    # 3 rows as binary data: an answer under coding.MIN_BYTES, which goes as it is.
    assert encodings == [None if (rows, binary) == (3, True) else coding]
    for name, want in arrays.items():
        assert_same(result.as_numpy(name), want)


@pytest.mark.parametrize("rows", [2, 2000])
async def test_grpc_infer_every_datatype(grpc_client: tgrpc_aio.InferenceServerClient, rows: int) -> None:
    arrays = echo_arrays(rows)
    inputs = []
    for name, arr in arrays.items():
        inp = tgrpc.InferInput(name, list(arr.shape), DATATYPE[name])
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    result = await grpc_client.infer("echo", inputs, request_id="g-1")
    assert result.get_response().id == "g-1"
    for name, want in arrays.items():
        assert_same(result.as_numpy(name), want)
    # Requested outputs select (and order) what comes back.
    only = await grpc_client.infer("echo", inputs, outputs=[tgrpc.InferRequestedOutput("s")])
    assert [o.name for o in only.get_response().outputs] == ["s"]
    assert_same(only.as_numpy("s"), arrays["s"])


async def test_grpc_typed_contents(stub: tpbg.GRPCInferenceServiceStub) -> None:
    request = tpb.ModelInferRequest(model_name="free", id="typed")
    request.inputs.add(name="f", datatype="FP32", shape=[2, 2]).contents.fp32_contents.extend([0.5, 1, 2, 3])
    request.inputs.add(name="i", datatype="INT64", shape=[1, 2]).contents.int64_contents.extend([-1, 2**50])
    request.inputs.add(name="u", datatype="UINT8", shape=[3]).contents.uint_contents.extend([0, 7, 255])
    request.inputs.add(name="b", datatype="BOOL", shape=[2]).contents.bool_contents.extend([True, False])
    request.inputs.add(name="s", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"typed")
    reply = await stub.ModelInfer(request)
    assert reply.id == "typed" and reply.model_name == "free" and reply.model_version == "1"
    got = {
        o.name: (o.datatype, list(o.shape), raw)
        for o, raw in zip(reply.outputs, reply.raw_output_contents, strict=True)
    }
    assert got["f"] == ("FP32", [2, 2], np.array([0.5, 1, 2, 3], np.float32).tobytes())
    assert got["i"] == ("INT64", [1, 2], np.array([-1, 2**50], np.int64).tobytes())
    assert got["u"] == ("UINT8", [3], bytes([0, 7, 255]))
    assert got["b"] == ("BOOL", [2], b"\x01\x00")
    assert got["s"] == ("BYTES", [1], struct.pack("<I", 5) + b"typed")

    # FP16 has no typed field: it travels only as raw contents.
    half = tpb.ModelInferRequest(model_name="free")
    half.inputs.add(name="h", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ModelInfer(half)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'h': FP16 data must be sent in raw_input_contents" in (err.value.details() or "")


async def test_grpc_stream_infer(grpc_client: tgrpc_aio.InferenceServerClient) -> None:
    x = np.ones((1, 16), np.float32)

    async def requests() -> AsyncIterator[dict[str, Any]]:
        for k in range(4):
            inp = tgrpc.InferInput("x", [1, 16], "FP32")
            inp.set_data_from_numpy(x * k)
            yield {"model_name": "batched", "inputs": [inp], "request_id": str(k)}
        yield {"model_name": "nope", "inputs": [inp], "request_id": "bad"}

    answers: dict[str, np.ndarray] = {}
    finals: list[bool] = []
    errors: list[str] = []
    async for result, error in grpc_client.stream_infer(requests()):
        if error is not None:
            errors.append(error.message())
            continue
        answers[result.get_response().id] = result.as_numpy("x")
        finals.append(result.get_response().parameters["triton_final_response"].bool_param)
    assert sorted(answers) == ["0", "1", "2", "3"]
    assert finals == [True] * 4  # as Triton marks them: stream consumers wait for the final one
    for k, got in answers.items():
        np.testing.assert_array_equal(got, x * int(k))
    assert len(errors) == 1 and "unknown model 'nope'" in errors[0]


async def test_kserve_rest_with_plain_httpx(cluster: ProcessCluster) -> None:
    base = f"http://{cluster.http_address()}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        assert (await http.get("/v2/health/live")).status_code == 200
        assert (await http.get("/v2/health/ready")).status_code == 200
        assert (await http.get("/v2/models/batched/ready")).status_code == 200
        meta = (await http.get("/v2/models/batched")).json()
        assert meta["inputs"] == BATCHED_TENSORS
        body = {
            "id": "kserve-1",
            "inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32", "data": list(range(32))}],
        }
        r = await http.post("/v2/models/batched/infer", json=body)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert (doc["model_name"], doc["model_version"], doc["id"]) == ("batched", "1", "kserve-1")
        [out] = doc["outputs"]
        assert (out["name"], out["datatype"], out["shape"]) == ("x", "FP32", [2, 16])
        assert out["data"] == [float(v) for v in range(32)]
        r = await http.post("/v2/models/batched/versions/1/infer", json=body)
        assert r.status_code == 200


def digits_test_set() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    _, x_test, _, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    return x_test[:40], y_test[:40]


async def test_digits_over_both_protocols(
    cluster: ProcessCluster, grpc_client: tgrpc_aio.InferenceServerClient, examples_dir: Path
) -> None:
    x, y = digits_test_set()
    expected = joblib.load(examples_dir / "digits.joblib").predict(x)
    assert np.mean(expected == y) >= 0.9

    inp = tgrpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = await grpc_client.infer("digits", [inp])
    labels = result.as_numpy("label")
    assert labels is not None and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, expected)
    proba = result.as_numpy("probabilities")
    assert proba is not None and proba.shape == (40, 10)
    np.testing.assert_array_equal(proba.argmax(axis=1), expected)

    def labels_over_http(client: thttp.InferenceServerClient) -> Any:
        h = thttp.InferInput("input", list(x.shape), "FP32")
        h.set_data_from_numpy(x)
        return client.infer("digits", [h], outputs=[thttp.InferRequestedOutput("label")]).as_numpy("label")

    np.testing.assert_array_equal(await over_http(cluster, labels_over_http), expected)


async def test_digits_with_nan_is_the_clients_error(
    cluster: ProcessCluster, grpc_client: tgrpc_aio.InferenceServerClient
) -> None:
    x = digits_test_set()[0][:2].copy()
    x[0, 3] = np.nan
    inp = tgrpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as err:
        await grpc_client.infer("digits", [inp])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "the model refused the input: Input X contains NaN" in err.value.message()
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [float("nan")] * 64}]}
    async with httpx.AsyncClient(base_url=f"http://{cluster.http_address()}", timeout=10) as http:
        r = await http.post("/v2/models/digits/infer", content=json.dumps(body))
    assert r.status_code == 400 and "contains NaN" in r.json()["error"]


# ---------------------------------------------------------------- errors


async def test_unknown_model_is_not_found_with_a_message(
    cluster: ProcessCluster, grpc_client: tgrpc_aio.InferenceServerClient
) -> None:
    inp = tgrpc.InferInput("x", [1, 16], "FP32")
    inp.set_data_from_numpy(np.ones((1, 16), np.float32))
    with pytest.raises(InferenceServerException) as err:
        await grpc_client.infer("nope", [inp])
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert "unknown model 'nope'" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        await grpc_client.get_model_metadata("nope")
    assert err.value.status() == "StatusCode.NOT_FOUND"

    def infer_nope(client: thttp.InferenceServerClient) -> InferenceServerException:
        h = thttp.InferInput("x", [1, 16], "FP32")
        h.set_data_from_numpy(np.ones((1, 16), np.float32))
        with pytest.raises(InferenceServerException) as err:
            client.infer("nope", [h])
        return err.value

    http_err = await over_http(cluster, infer_nope)
    assert http_err.status() == "404" and "unknown model 'nope'" in http_err.message()
    async with httpx.AsyncClient(base_url=f"http://{cluster.http_address()}") as http:
        r = await http.get("/v2/models/nope")
        assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
        r = await http.get("/v2/models/echo/versions/7/config")
        assert r.status_code == 404 and "version '7'" in r.json()["error"]


GOOD = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}


def binary_body(header: dict[str, Any], tail: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + tail, {"Inference-Header-Content-Length": str(len(text))}


def malformed_http() -> list[tuple[str, bytes, dict[str, str], str]]:
    x = GOOD["inputs"][0]
    cases: list[tuple[str, bytes, dict[str, str], str]] = [
        ("bad json", b'{"inputs": [', {}, "not valid JSON"),
        (
            "unknown datatype",
            json.dumps({"inputs": [{**x, "datatype": "FP8"}]}).encode(),
            {},
            "unknown datatype 'FP8'",
        ),
        (
            "shape vs data",
            json.dumps({"inputs": [{**x, "shape": [2, 16]}]}).encode(),
            {},
            "input 'x': shape [2,16] needs 32",
        ),
        ("missing input", json.dumps({"inputs": []}).encode(), {}, "missing input 'x'"),
        ("unknown input", json.dumps({"inputs": [x, {**x, "name": "y"}]}).encode(), {}, "unknown input 'y'"),
        (
            "wrong shape",
            json.dumps({"inputs": [{**x, "shape": [2, 8]}]}).encode(),
            {},
            "input 'x': expected shape [-1,16]",
        ),
        (
            "wrong datatype",
            json.dumps({"inputs": [{**x, "datatype": "FP64"}]}).encode(),
            {},
            "expected datatype FP32",
        ),
        ("oversized", b"{" + b" " * (1024 * 1024) + b"}", {}, "over the limit of 1048576 bytes"),
    ]
    header = {
        "inputs": [
            {"name": "x", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 60}}
        ]
    }
    body, headers = binary_body(header, b"\0" * 60)
    cases.append(("wrong raw length", body, headers, "input 'x': expected 64 bytes for FP32 [1,16], got 60"))
    body, headers = binary_body(header, b"\0" * 64)
    cases.append(("raw beyond declared", body, headers, "4 bytes of binary data beyond"))
    many = {"inputs": [{**x, "name": f"x{i}"} for i in range(1025)]}
    over = "the request has 1025 inputs, over the limit of 1024"
    cases.append(("1025 inputs", json.dumps(many).encode(), {}, over))
    return cases


@pytest.mark.parametrize(
    ("case", "body", "headers", "message"), malformed_http(), ids=lambda v: v if isinstance(v, str) else ""
)
async def test_malformed_http_requests_are_400_naming_the_problem(
    cluster: ProcessCluster, case: str, body: bytes, headers: dict[str, str], message: str
) -> None:
    async with httpx.AsyncClient(base_url=f"http://{cluster.http_address()}", timeout=10) as http:
        r = await http.post("/v2/models/batched/infer", content=body, headers=headers)
        assert r.status_code == (413 if case == "oversized" else 400), (case, r.text)
        assert message in r.json()["error"], (case, r.json())
        ok = await http.post("/v2/models/batched/infer", json=GOOD)
        assert ok.status_code == 200, ok.text


def raw_request(
    datatype: str = "FP32", shape: tuple[int, ...] = (1, 16), raw: bytes = b"\0" * 64
) -> tpb.ModelInferRequest:
    request = tpb.ModelInferRequest(model_name="batched")
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def malformed_grpc() -> list[tuple[str, tpb.ModelInferRequest, str]]:
    missing = tpb.ModelInferRequest(model_name="batched")
    extra = raw_request()
    extra.raw_input_contents.append(b"")
    many = raw_request()
    for i in range(1024):
        many.inputs.add(name=f"x{i}", datatype="FP32", shape=(1, 16))
        many.raw_input_contents.append(b"\0" * 64)
    return [
        ("unknown datatype", raw_request(datatype="FP8"), "unknown datatype 'FP8'"),
        (
            "wrong raw length",
            raw_request(raw=b"\0" * 63),
            "input 'x': expected 64 bytes for FP32 [1,16], got 63",
        ),
        ("wrong shape", raw_request(shape=(1, 15), raw=b"\0" * 60), "input 'x': expected shape [-1,16]"),
        ("missing input", missing, "missing input 'x'"),
        ("raw count", extra, "raw_input_contents has 2 entries for 1 inputs"),
        ("bad version", tpb.ModelInferRequest(model_name="batched", model_version="3"), "no version '3'"),
        # The message quotes the name, cut so that its trailer stays under the client's
        # metadata limit: else the client sees RESOURCE_EXHAUSTED, not NOT_FOUND.
        ("long model name", tpb.ModelInferRequest(model_name="m" * 10_000), "more characters)"),
        ("1025 inputs", many, "the request has 1025 inputs, over the limit of 1024"),
    ]


@pytest.mark.parametrize(
    ("case", "request_", "message"), malformed_grpc(), ids=lambda v: v if isinstance(v, str) else ""
)
async def test_malformed_grpc_requests_are_invalid_argument(
    stub: tpbg.GRPCInferenceServiceStub, case: str, request_: tpb.ModelInferRequest, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ModelInfer(request_, timeout=10)
    not_found = case in ("bad version", "long model name")
    want = grpc.StatusCode.NOT_FOUND if not_found else grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.code() == want, err.value
    assert message in (err.value.details() or ""), err.value.details()
    reply = await stub.ModelInfer(raw_request(), timeout=10)
    assert reply.outputs[0].name == "x"


# ---------------------------------------------------------------- statistics and batching


async def test_statistics_show_counts_and_dynamic_batches(
    cluster: ProcessCluster, grpc_client: tgrpc_aio.InferenceServerClient
) -> None:
    x = np.ones((1, 16), np.float32)

    async def one(k: int) -> None:
        inp = tgrpc.InferInput("x", [1, 16], "FP32")
        inp.set_data_from_numpy(x * k)
        result = await grpc_client.infer("batched", [inp])
        np.testing.assert_array_equal(result.as_numpy("x"), x * k)

    before = (await grpc_client.get_inference_statistics("batched")).model_stats[0]
    await asyncio.gather(*(one(k) for k in range(64)))
    after = (await grpc_client.get_inference_statistics("batched", "1")).model_stats[0]
    assert (after.name, after.version) == ("batched", "1")
    assert after.inference_count - before.inference_count == 64
    assert after.inference_stats.success.count - before.inference_stats.success.count == 64
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.inference_stats.queue.count >= 64
    assert after.last_inference > 0
    executions = after.execution_count - before.execution_count
    assert 0 < executions < 64, "concurrent requests must share model calls"
    sizes = {b.batch_size: b.compute_infer.count for b in after.batch_stats}
    assert max(sizes) > 1, sizes
    assert sum(size * n for size, n in sizes.items()) >= 64

    # The same numbers over REST, in Triton's JSON form.
    doc = await over_http(cluster, lambda c: c.get_inference_statistics("batched"))
    [stats] = doc["model_stats"]
    assert stats["inference_count"] >= 64 and stats["execution_count"] >= executions
    assert max(b["batch_size"] for b in stats["batch_stats"]) > 1
    every = await over_http(cluster, lambda c: c.get_inference_statistics())
    assert [m["name"] for m in every["model_stats"]] == ["batched", "digits", "echo", "free"]


PICKY = """
import time

import numpy as np


class Picky:
    \"\"\"Echo, 0.3 s a call; refuses a call with a row of 5s.\"\"\"

    def predict(self, inputs):
        time.sleep(0.3)
        if (inputs["x"] == 5).any():
            raise ValueError("a row of 5s")
        return dict(inputs)
"""


async def test_statistics_count_successful_executions_only(
    cluster: ProcessCluster, grpc_client: tgrpc_aio.InferenceServerClient, tmp_path: Path
) -> None:
    """A batch that fails because of one request runs again one request at a time; Triton's
    ``execution_count`` and ``batch_stats`` count successful model executions, so the failed
    batch and the offender's own call are not counted. Before, the seven good requests
    showed as 9 executions over 16 rows (the first alone, the failed batch of 7, then 7
    alone)."""
    (tmp_path / "picky.py").write_text(PICKY)
    await cluster.deploy(
        {
            "name": "picky",
            "backend": "python",
            "model": "picky:Picky",
            "base_dir": str(tmp_path),
            "resources": {"cpus": 0.1},
            "batching": {"max_batch_size": 8, "max_delay_ms": 100},
            "inputs": BATCHED_TENSORS,
            "outputs": BATCHED_TENSORS,
        }
    )
    try:
        await cluster.wait_ready("picky", 1)

        async def one(k: int) -> bool:
            inp = tgrpc.InferInput("x", [1, 16], "FP32")
            inp.set_data_from_numpy(np.full((1, 16), k, np.float32))
            try:
                await grpc_client.infer("picky", [inp])
            except InferenceServerException:
                return False
            return True

        first = asyncio.create_task(one(0))  # runs alone and holds the model 0.3 s
        await asyncio.sleep(0.1)
        rest = asyncio.gather(*(one(k) for k in range(1, 8)))  # queued behind it, then batched
        ok = [await first, *await rest]
        assert ok == [k != 5 for k in range(8)]
        stats = (await grpc_client.get_inference_statistics("picky")).model_stats[0]
        assert (
            stats.inference_count,
            stats.inference_stats.success.count,
            stats.inference_stats.fail.count,
        ) == (7, 7, 1)
        assert 2 <= stats.execution_count <= 7
        sizes = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
        assert sum(size * n for size, n in sizes.items()) == 7, sizes  # each good row ran once
        assert sum(sizes.values()) == stats.execution_count
    finally:
        await cluster.client.delete("picky")

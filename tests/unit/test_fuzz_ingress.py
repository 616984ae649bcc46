"""Fuzzing request validation: the scheduler's REST ingress (Open Inference Protocol, the
generate extension, the OpenAI API) over in-memory replicas, the gRPC request decoders, and
``check_inputs``. Whatever a client sends, the answer is a clear 4xx (or a success), never a
5xx, nothing raises but InvalidArgument, and the next request on the same keep-alive
connection is served. The app runs in shoal's own HTTP server (uvicorn, ``HttpServer``) on
a loopback port of this process, since a broken connection is only seen over a socket.

``SHOAL_FUZZ_EXAMPLES`` sets the examples per test (see docs/security.md).
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Iterator
from typing import Any, cast

import httpx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from shoal.config import Settings
from shoal.core import payload
from shoal.core.limits import RequestLimits
from shoal.core.spec import DATATYPES, TensorSpec, parse_spec
from shoal.errors import InvalidArgument
from shoal.http.scheduler import scheduler_app
from shoal.http.server import HttpServer
from shoal.proto import grpc_service_pb2 as oip
from shoal.proto import shoal_pb2 as pb
from shoal.rpc import codec
from shoal.rpc.inference_service import decode_inputs
from shoal.scheduler.models import ModelMetadata, check_inputs
from shoal.scheduler.node import SchedulerNode
from shoal.scheduler.router import Router
from shoal.testing.fakes import FakeReplicas
from shoal.types import HeadLink
from tests.unit.fuzzing import fuzz_settings, still_served

pytestmark = pytest.mark.timeout(300)

FUZZ = fuzz_settings(40)

# Any code point, lone surrogates included (JSON's "\ud800"; hypothesis leaves them out by default).
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=6)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | any_text
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=16,
)
names = st.sampled_from(["x", "s", "y", ""]) | any_text
datatypes = st.sampled_from([*DATATYPES, "FP8", "", "fp32"]) | json_values
shapes = (
    st.lists(st.integers(-2, 6), max_size=3)
    | st.lists(st.integers(-(2**70), 2**70), max_size=3)
    | json_values
)
elements = st.floats() | st.integers(-(2**70), 2**70) | any_text | st.booleans() | st.none()
data = st.lists(elements, max_size=12) | st.lists(st.lists(elements, max_size=4), max_size=4) | json_values
PARAMETER_KEYS = [
    "binary_data_size",
    "binary_data",
    "binary_data_output",
    "timeout",
    "shared_memory_region",
    "classification",
    "sequence_id",
    "priority",
]
params = st.dictionaries(
    st.sampled_from(PARAMETER_KEYS) | st.text(max_size=4),
    st.integers(-5, 50) | st.booleans() | json_values,
    max_size=3,
)
tensor_entries = st.fixed_dictionaries(
    {}, optional={"name": names, "datatype": datatypes, "shape": shapes, "data": data, "parameters": params}
)
infer_docs = st.fixed_dictionaries(
    {},
    optional={
        "inputs": st.lists(tensor_entries, max_size=3) | json_values,
        "outputs": st.lists(
            st.fixed_dictionaries({}, optional={"name": names, "parameters": params}), max_size=3
        )
        | json_values,
        "id": json_values,
        "parameters": params | json_values,
    },
)
models = st.sampled_from(["echo", "free", "gen", "nope", "stats", "echo%2Fx"])


@pytest.fixture(scope="module")
def ingress() -> Iterator[tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]]:
    """The scheduler's app over fake replicas, on a loop of its own (hypothesis drives it
    from plain test functions, one example at a time)."""
    loop = asyncio.new_event_loop()

    async def setup() -> tuple[Router, HttpServer, httpx.AsyncClient]:
        fakes = FakeReplicas()
        router = Router("s1", Settings(), fakes, policy="round_robin")
        typed = [
            {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "s", "datatype": "BYTES", "shape": [-1]},
        ]
        base = {"backend": "python", "model": "m:M", "timeout_s": 5}
        router.add("a", parse_spec({"name": "echo", **base, "inputs": typed, "outputs": typed}), "a:1", "s1")
        router.add("b", parse_spec({"name": "free", **base}), "b:1", "s1")
        router.add("c", parse_spec({"name": "gen", "backend": "vllm", "model": "lm"}), "c:1", "s1")
        node = SchedulerNode(
            Settings(max_message_mb=1, max_tensor_elements=10_000),
            "s1",
            cast(HeadLink, None),
            fakes,
            router=router,
        )
        node.registered.set()
        server = HttpServer(scheduler_app(node), "127.0.0.1", 0)
        await server.start()
        # One connection, kept alive: every request of the test goes over it in turn.
        client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{server.port}", limits=httpx.Limits(max_connections=1), timeout=30
        )
        return router, server, client

    router, server, client = loop.run_until_complete(setup())
    yield loop, client
    loop.run_until_complete(client.aclose())
    loop.run_until_complete(server.stop())
    loop.run_until_complete(router.aclose())
    loop.close()


def send(
    ingress: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient],
    method: str,
    path: str,
    content: bytes = b"",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    loop, client = ingress
    response = loop.run_until_complete(client.request(method, path, content=content, headers=headers))
    assert response.status_code < 500, (path, content[:500], headers, response.status_code, response.text)
    if response.status_code >= 400 and response.content:
        assert "error" in response.json(), response.text
    still_served(loop, client, response, "/v2/health/live")
    return response


@FUZZ
@given(model=models, doc=infer_docs, version=st.sampled_from(["", "/versions/1", "/versions/2"]))
def test_rest_infer_json(ingress: Any, model: str, doc: dict[str, Any], version: str) -> None:
    send(ingress, "POST", f"/v2/models/{model}{version}/infer", json.dumps(doc).encode())


@FUZZ
@given(
    model=models,
    doc=infer_docs,
    tail=st.binary(max_size=64),
    length=st.none() | st.integers(-3, 400) | st.text(alphabet="0123456789 -+.xe", max_size=4).map(str.strip),
    encoding=st.sampled_from(["", "gzip", "deflate", "br", "identity"]),
)
def test_rest_infer_binary(
    ingress: Any, model: str, doc: dict[str, Any], tail: bytes, length: Any, encoding: str
) -> None:
    header = json.dumps(doc).encode()
    body = header + tail
    headers = {"Inference-Header-Content-Length": str(len(header) if length is None else length)}
    if encoding == "gzip":
        body = gzip.compress(body)
    if encoding:
        headers["Content-Encoding"] = encoding
    send(ingress, "POST", f"/v2/models/{model}/infer", body, headers)


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=st.sampled_from(
        [
            "/v2",
            "/v2/health/live",
            "/v2/health/ready",
            "/healthz",
            "/metrics",
            "/v2/models/{m}",
            "/v2/models/{m}/ready",
            "/v2/models/{m}/config",
            "/v2/models/{m}/stats",
            "/v2/models/{m}/infer",
            "/v2/models/{m}/versions/1",
            "/v2/models/{m}/versions/1/ready",
            "/v2/models/{m}/versions/1/config",
            "/v2/models/{m}/versions/1/stats",
            "/v2/models/{m}/versions/1/infer",
            "/v2/models/stats",
            "/v2/repository/index",
            "/v2/models/{m}/generate",
            "/v2/models/{m}/generate_stream",
            "/v1/models",
            "/v1/models/{m}",
            "/v1/embeddings",
            "/v1/completions",
            "/v1/chat/completions",
        ]
    ),
    model=models,
    body=st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()),
)
def test_any_route_any_body(ingress: Any, method: str, path: str, model: str, body: bytes) -> None:
    send(ingress, method, path.format(m=model), body)


openai_docs = st.fixed_dictionaries(
    {"model": st.sampled_from(["gen", "free", "echo", "nope"]) | json_values},
    optional={
        "input": st.text(max_size=8) | st.lists(st.text(max_size=4), max_size=3) | json_values,
        "prompt": st.text(max_size=8) | json_values,
        "messages": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "role": st.sampled_from(["user", "system", "x"]) | json_values,
                    "content": json_values,
                },
            ),
            max_size=3,
        )
        | json_values,
        "max_tokens": st.integers(-3, 10**12) | json_values,
        "temperature": st.floats() | json_values,
        "top_p": st.floats() | json_values,
        "n": st.integers(-1, 3),
        "stop": st.text(max_size=3) | json_values,
        "stream": st.booleans() | json_values,
        "seed": st.integers() | json_values,
        "encoding_format": st.sampled_from(["float", "base64", "x"]) | json_values,
        "dimensions": st.integers(-1, 10) | json_values,
        "stream_options": json_values,
    },
)


@FUZZ
@given(route=st.sampled_from(["/v1/embeddings", "/v1/completions", "/v1/chat/completions"]), doc=openai_docs)
def test_openai_bodies(ingress: Any, route: str, doc: dict[str, Any]) -> None:
    send(ingress, "POST", route, json.dumps(doc).encode())


@FUZZ
@given(
    doc=st.dictionaries(
        st.sampled_from(["text_input", "text", "parameters", "id", "max_tokens"]), json_values
    )
)
def test_generate_bodies(ingress: Any, doc: dict[str, Any]) -> None:
    send(ingress, "POST", "/v2/models/gen/generate", json.dumps(doc).encode())
    send(ingress, "POST", "/v2/models/gen/generate_stream", json.dumps(doc).encode())


def test_regressions_deep_json_and_limits(ingress: Any) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    deep_object = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    for path in ("/v2/models/echo/infer", "/v2/repository/index", "/v2/models/gen/generate"):
        for body in (deep, deep_object):
            assert send(ingress, "POST", path, body).status_code == 400, path
    for path in ("/v1/embeddings", "/v1/completions", "/v1/chat/completions"):
        assert send(ingress, "POST", path, deep).status_code == 400, path
    too_many = {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [10**9], "data": []}]}
    response = send(ingress, "POST", "/v2/models/free/infer", json.dumps(too_many).encode())
    assert response.status_code == 400 and "max_tensor_elements" in response.json()["error"]


def test_regressions_lone_surrogates(ingress: Any) -> None:
    """Issue 13: a lone surrogate answered 500 and broke the connection under the next request."""
    x = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
    s = {"name": "s", "datatype": "BYTES", "shape": [1], "data": ["\ud800"]}
    cases = [
        ("/v2/models/echo/infer", {"id": "\ud800", "inputs": [x]}, "'id'"),
        ("/v2/models/free/infer", {"inputs": [s]}, "BYTES data"),
        ("/v2/models/free/infer", {"inputs": [{**x, "name": "\udfff"}]}, "not valid Unicode"),
        ("/v1/embeddings", {"model": "free", "input": ["\ud800"]}, "not valid Unicode"),
        (
            "/v1/chat/completions",
            {"model": "gen", "messages": [{"role": "user", "content": "\ud800"}]},
            "messages.0",
        ),
        ("/v1/completions", {"model": "gen", "prompt": "a\udc00"}, "prompt"),
        ("/v1/completions", {"model": "gen", "prompt": "a", "stop": ["\ud800"]}, "stop"),
        ("/v2/models/gen/generate", {"text_input": "\ud800"}, "prompt"),
        ("/v2/models/gen/generate_stream", {"text_input": "\ud800"}, "prompt"),
    ]
    for path, doc, named in cases:
        response = send(ingress, "POST", path, json.dumps(doc).encode())
        assert response.status_code == 400 and named in response.text, (path, response.text)


# ---------------------------------------------------------------- gRPC decoders


# A protobuf string is UTF-8: a client cannot send a lone surrogate in one.
proto_names = st.sampled_from(["x", "s", "y", ""]) | st.text(st.characters(codec="utf-8"), max_size=6)
raw_tensors = st.fixed_dictionaries(
    {
        "name": proto_names,
        "datatype": st.sampled_from([*DATATYPES, "X"]),
        "shape": st.lists(st.integers(-(2**40), 2**40) | st.integers(-2, 6), max_size=4),
    }
)


@FUZZ
@given(tensors=st.lists(raw_tensors, max_size=3), raw=st.lists(st.binary(max_size=48), max_size=4))
def test_grpc_decoders(tensors: list[dict[str, Any]], raw: list[bytes]) -> None:
    request = oip.ModelInferRequest(model_name="m")
    for t in tensors:
        request.inputs.add(**t)
    request.raw_input_contents.extend(raw)
    try:
        decode_inputs(request, RequestLimits(elements=10_000, tensors=2))
    except InvalidArgument:
        pass
    native = [pb.Tensor(data=raw[i] if i < len(raw) else b"", **t) for i, t in enumerate(tensors)]
    try:
        codec.decode(native)
    except InvalidArgument:
        pass


@FUZZ
@given(
    declared=st.lists(
        st.builds(
            TensorSpec,
            name=st.sampled_from(["x", "y", "s"]),
            datatype=st.sampled_from(DATATYPES),
            shape=st.lists(st.integers(-1, 3), max_size=3).map(tuple),
        ),
        max_size=3,
    ),
    given_inputs=st.dictionaries(
        st.sampled_from(["x", "y", "s", "z"]),
        st.sampled_from(["float32", "int64", "bool", "uint8", "float16"]).flatmap(
            lambda dt: arrays(np.dtype(dt), st.lists(st.integers(0, 3), max_size=3).map(tuple))
        ),
        max_size=3,
    ),
)
def test_check_inputs(declared: list[TensorSpec], given_inputs: dict[str, np.ndarray]) -> None:
    try:
        check_inputs(ModelMetadata("m", "python", tuple(declared), ()), payload.from_arrays(given_inputs))
    except InvalidArgument:
        pass

"""The data plane's one door: the same requests through every ingress get the same
answers, errors, statistics, metrics and log lines; ids are unique; bounds hold.

The gRPC servicers are called directly with an in-memory context (no sockets: this is
the unit tier); the REST and OpenAI routes run over ASGI.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any, cast

import grpc
import httpx
import numpy as np
import pytest

from shoal.config import Settings
from shoal.core import payload
from shoal.core.spec import DeploymentSpec, parse_spec
from shoal.http import jsonbody, offload
from shoal.http.scheduler import scheduler_app, shutdown_parser
from shoal.proto import grpc_service_pb2 as oip
from shoal.proto import shoal_pb2 as pb
from shoal.rpc import codec
from shoal.rpc.inference_service import STREAM_SHARE, InferenceService
from shoal.rpc.scheduler_service import SchedulerService
from shoal.scheduler.node import SchedulerNode
from shoal.scheduler.router import Router
from shoal.testing.fakes import FakeReplicas
from shoal.types import DeploymentRoutes, HeadLink, Route, RoutingTable

pytestmark = pytest.mark.timeout(20)

TYPED = [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


class Context:
    """What the servicers use of ``grpc.aio.ServicerContext``."""

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise Aborted(code, message)

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


def spec(name: str = "echo", **changes: Any) -> DeploymentSpec:
    doc = {"name": name, "backend": "python", "model": "m:M", "inputs": TYPED, "outputs": TYPED}
    return parse_spec({**doc, **changes})


class Doors:
    """One scheduler's ingresses over in-memory replicas."""

    def __init__(self, node: SchedulerNode, http: httpx.AsyncClient) -> None:
        self.node = node
        self.http = http
        self.grpc = InferenceService(node.dataplane, node.inference_auth, node.settings)
        self.native = SchedulerService(node)

    async def rest(self, model: str, x: np.ndarray, request_id: str = "") -> tuple[int, dict[str, Any]]:
        doc: dict[str, Any] = {
            "inputs": [{"name": "x", "datatype": payload.from_array("x", x).datatype, "shape": list(x.shape)}]
        }
        doc["inputs"][0]["data"] = x.tolist()
        if request_id:
            doc["id"] = request_id
        r = await self.http.post(f"/v2/models/{model}/infer", json=doc)
        return r.status_code, r.json()

    async def oip(self, model: str, x: np.ndarray, request_id: str = "") -> oip.ModelInferResponse:
        t = payload.from_array("x", x)
        request = oip.ModelInferRequest(model_name=model, id=request_id)
        request.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        request.raw_input_contents.append(t.data)
        return await self.grpc.ModelInfer(request, cast(Any, Context()))

    async def send(self, model: str, x: np.ndarray, request_id: str = "") -> pb.InferReply:
        request = pb.InferRequest(deployment=model, request_id=request_id, inputs=codec.encode({"x": x}))
        return await self.native.SendRequest(request, cast(Any, Context()))


@pytest.fixture
def fakes() -> FakeReplicas:
    return FakeReplicas()


@pytest.fixture
async def doors(fakes: FakeReplicas) -> AsyncIterator[Doors]:
    settings = Settings(
        max_message_mb=1, max_tensor_elements=1_000, max_strings_per_request=100, max_tensors_per_request=8
    )
    router = Router("s1", settings, fakes, policy="round_robin")
    node = SchedulerNode(settings, "s1", cast(HeadLink, None), fakes, router=router)
    node.registered.set()
    router.add("a", spec(), "a:9000", "s1")
    router.add(
        "e",
        spec("emb", backend="transformers", options={"task": "embedding"}, inputs=[], outputs=[]),
        "e:1",
        "s1",
    )
    router.add("g", spec("gen", backend="vllm", inputs=[], outputs=[]), "g:1", "s1")
    app = scheduler_app(node)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shoal") as client:
        yield Doors(node, client)
    await router.aclose()


@pytest.fixture
def refusals(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="shoal.dataplane")
    yield caplog


async def test_refusals_past_the_log_limit_are_counted_once_the_second_is_over(
    doors: Doors, refusals: pytest.LogCaptureFixture
) -> None:
    """At most ten refusals a second are logged; how many more there were was said only by
    the next refusal after the second, so the last second of a flood was never told."""
    for i in range(15):
        status, _ = await doors.rest("echo", np.zeros((2, 3), np.float32), f"r{i}")
        assert status == 400
    lines = [r.getMessage() for r in refusals.records]
    assert sum("refused:" in line for line in lines) == 10
    for _ in range(40):  # nothing more is sent: the count is told when the second is over
        if any("5 more request(s) refused" in r.getMessage() for r in refusals.records):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"no count of the refusals not logged: {[r.getMessage() for r in refusals.records]}")


GOOD = np.arange(8, dtype=np.float32).reshape(2, 4)
# name, input, the message every door answers
BAD = [
    ("wrong shape", np.zeros((2, 3), np.float32), "input 'x': expected shape [-1,4], got [2,3]"),
    ("wrong datatype", np.zeros((2, 4), np.float64), "input 'x': expected datatype FP32, got FP64"),
    ("too many elements", np.zeros((300, 4), np.float32), "over 1000 elements"),
]


@pytest.mark.parametrize(("case", "x", "message"), BAD, ids=[b[0] for b in BAD])
async def test_an_invalid_request_is_refused_alike_and_counted_by_every_door(
    doors: Doors, refusals: pytest.LogCaptureFixture, case: str, x: np.ndarray, message: str
) -> None:
    status, body = await doors.rest("echo", x, "r1")
    assert status == 400 and message in body["error"]
    with pytest.raises(Aborted) as grpc_err:
        await doors.oip("echo", x, "r2")
    assert grpc_err.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in grpc_err.value.message
    with pytest.raises(Aborted) as native_err:
        await doors.send("echo", x, "r3")
    assert native_err.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in native_err.value.message

    # Counted where the metrics, the dashboard and the autoscaler read (shoal_requests_total) ...
    assert doors.node.router.stats()["echo"].outcomes["invalid"] == 3
    # ... in Triton's statistics ...
    [stats] = await doors.node.catalog.statistics("echo")
    assert (stats.fail.count, stats.success.count) == (3, 0)
    # ... and logged, once per request, naming the door.
    lines = [r.getMessage() for r in refusals.records if "refused" in r.getMessage()]
    assert len(lines) == 3
    assert all(message in line for line in lines)
    assert {line.split("(")[1].split(")")[0] for line in lines} == {"http", "grpc", "native"}
    metrics = (await doors.http.get("/metrics")).text
    assert 'shoal_requests_total{deployment="echo",outcome="invalid"} 3.0' in metrics


async def test_a_valid_request_gets_the_same_answer_through_every_door(
    doors: Doors, fakes: FakeReplicas
) -> None:
    status, body = await doors.rest("echo", GOOD, "same")
    assert status == 200 and body["outputs"][0]["data"] == GOOD.flatten().tolist() and body["id"] == "same"
    reply = await doors.oip("echo", GOOD, "same")
    assert reply.id == "same"
    np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, 4), GOOD)
    native = await doors.send("echo", GOOD, "same")
    np.testing.assert_array_equal(codec.decode(native.outputs)["x"], GOOD)
    assert native.replica_id == "a"
    # The three reused the client's id; each got its own id on the way to the replica.
    ids = [c.request_id for c in fakes.clients["a:9000"].requests]
    assert len(ids) == 3 and len(set(ids)) == 3 and all(i.startswith("same~") for i in ids)
    assert doors.node.router.stats()["echo"].outcomes["ok"] == 3


async def test_a_request_above_max_batch_size_is_refused_when_the_spec_says_so(
    doors: Doors, fakes: FakeReplicas
) -> None:
    """``batching.oversize: refuse`` (a deployment from a Triton config.pbtxt): more rows
    than ``max_batch_size`` is a 400 in Triton's words on every door, before any replica
    sees it. Before, a request of 10,000 rows ran as one model call of 10,000 rows."""
    capped = {"max_batch_size": 4, "max_delay_ms": 1}
    doors.node.router.add("c", spec("capped", batching={**capped, "oversize": "refuse"}), "c:1", "s1")
    doors.node.router.add("l", spec("alone", batching=capped), "l:1", "s1")
    big, message = np.zeros((5, 4), np.float32), "inference request batch-size must be <= 4 for 'capped'"

    status, body = await doors.rest("capped", big)
    assert status == 400 and message in body["error"], body
    for door in (doors.oip, doors.send):
        with pytest.raises(Aborted) as err:
            await door("capped", big)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.message
    assert fakes.clients["c:1"].requests == []
    assert doors.node.router.stats()["capped"].outcomes["invalid"] == 3
    assert (await doors.rest("capped", big[:4]))[0] == 200

    # The default, run_alone: the request is one model call of its own rows.
    assert (await doors.rest("alone", big))[0] == 200
    assert len(fakes.clients["l:1"].requests) == 1


async def test_a_reused_native_id_never_answers_another_request(doors: Doors, fakes: FakeReplicas) -> None:
    replica = fakes.clients["a:9000"]
    replica.gate = asyncio.Event()
    values = [np.full((1, 4), i, np.float32) for i in range(5)]
    calls = [asyncio.create_task(doors.send("echo", v, "dup")) for v in values]
    await replica.wait_for_requests(5)
    replica.gate.set()
    replies = await asyncio.gather(*calls)
    for v, reply in zip(values, replies, strict=True):
        np.testing.assert_array_equal(codec.decode(reply.outputs)["x"], v)


# A request's ``priority`` parameter, as tritonclient sends it (gRPC ``uint64_param``,
# REST a JSON integer), and values no client should send.
PRIORITY_OK: list[tuple[str, Any]] = [("uint64_param", 2**64 - 1), ("int64_param", 3), ("uint64_param", 0)]
PRIORITY_BAD: list[tuple[str, Any]] = [("int64_param", -1), ("string_param", "high"), ("bool_param", True)]


async def test_the_priority_parameter_is_accepted_when_an_integer_and_refused_otherwise(
    doors: Doors,
) -> None:
    """docs/triton.md: ``priority`` is taken and not used (requests run in arrival order, as
    Triton runs them for a model without priority levels); anything but an integer in
    [0, 2^64) is INVALID_ARGUMENT / 400 naming it, through both OIP doors."""

    def grpc_request(kind: str, value: Any) -> oip.ModelInferRequest:
        t = payload.from_array("x", GOOD)
        request = oip.ModelInferRequest(model_name="echo")
        request.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        request.raw_input_contents.append(t.data)
        setattr(request.parameters["priority"], kind, value)
        return request

    def rest_doc(value: Any) -> dict[str, Any]:
        x = {"name": "x", "datatype": "FP32", "shape": [2, 4], "data": GOOD.flatten().tolist()}
        return {"inputs": [x], "parameters": {"priority": value}}

    for kind, value in PRIORITY_OK:
        reply = await doors.grpc.ModelInfer(grpc_request(kind, value), cast(Any, Context()))
        answer = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, 4)
        np.testing.assert_array_equal(answer, GOOD)
        r = await doors.http.post("/v2/models/echo/infer", json=rest_doc(value))
        assert r.status_code == 200, r.text
    for kind, value in PRIORITY_BAD:
        with pytest.raises(Aborted) as err:
            await doors.grpc.ModelInfer(grpc_request(kind, value), cast(Any, Context()))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.message == f"parameter 'priority' must be an integer in [0, 2^64), got {value!r}"
        r = await doors.http.post("/v2/models/echo/infer", json=rest_doc(value))
        assert r.status_code == 400 and "parameter 'priority' must be an integer" in r.json()["error"]
    for value in (2**64, 1.5):  # JSON only: past uint64, or not an integer
        r = await doors.http.post("/v2/models/echo/infer", json=rest_doc(value))
        assert r.status_code == 400 and f"got {value!r}" in r.json()["error"]


SEQUENCE_OK: list[tuple[str, Any]] = [("bool_param", True), ("bool_param", False)]
SEQUENCE_BAD: list[tuple[str, Any]] = [("string_param", "yes"), ("int64_param", 1)]


@pytest.mark.parametrize("key", ["sequence_start", "sequence_end"])
async def test_sequence_flags_are_accepted_when_booleans_and_refused_otherwise(
    doors: Doors, key: str
) -> None:
    """docs/triton.md: without a sequence_id the flags say nothing and are accepted, as
    Triton accepts them for a model without sequence batching; a flag that is no boolean
    is INVALID_ARGUMENT / 400 naming it, through both OIP doors (before, it was taken)."""

    def grpc_request(kind: str, value: Any) -> oip.ModelInferRequest:
        t = payload.from_array("x", GOOD)
        request = oip.ModelInferRequest(model_name="echo")
        request.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        request.raw_input_contents.append(t.data)
        setattr(request.parameters[key], kind, value)
        return request

    def rest_doc(value: Any) -> dict[str, Any]:
        x = {"name": "x", "datatype": "FP32", "shape": [2, 4], "data": GOOD.flatten().tolist()}
        return {"inputs": [x], "parameters": {key: value}}

    for kind, value in SEQUENCE_OK:
        reply = await doors.grpc.ModelInfer(grpc_request(kind, value), cast(Any, Context()))
        assert len(reply.raw_output_contents) == 1
        r = await doors.http.post("/v2/models/echo/infer", json=rest_doc(value))
        assert r.status_code == 200, r.text
    for kind, value in SEQUENCE_BAD:
        with pytest.raises(Aborted) as err:
            await doors.grpc.ModelInfer(grpc_request(kind, value), cast(Any, Context()))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.message == f"parameter {key!r} must be true or false, got {value!r}"
        r = await doors.http.post("/v2/models/echo/infer", json=rest_doc(value))
        assert (
            r.status_code == 400
            and r.json()["error"] == f"parameter {key!r} must be true or false, got {value!r}"
        )
    r = await doors.http.post("/v2/models/echo/infer", json=rest_doc(None))  # JSON null
    assert r.status_code == 200, r.text


async def test_native_requests_with_a_repeated_input_name_are_refused(doors: Doors) -> None:
    request = pb.InferRequest(deployment="echo", inputs=codec.encode({"x": GOOD}) * 2)
    with pytest.raises(Aborted) as err:
        await doors.native.SendRequest(request, cast(Any, Context()))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "given twice" in err.value.message


# Requests past the limits on tensor counts and id length, through each door as raw as its
# clients send them: (the message every door answers, rest, oip, native).
def _many_inputs(n: int) -> tuple[dict[str, Any], oip.ModelInferRequest, pb.InferRequest]:
    names = [f"x{i}" for i in range(n)]
    rest = {"inputs": [{"name": m, "datatype": "FP32", "shape": [1], "data": [1.0]} for m in names]}
    request = oip.ModelInferRequest(model_name="echo")
    for m in names:
        request.inputs.add(name=m, datatype="FP32", shape=[1])
        request.raw_input_contents.append(b"\0" * 4)
    arrays = {m: np.ones(1, np.float32) for m in names}
    native = pb.InferRequest(deployment="echo", inputs=codec.encode(arrays))
    return rest, request, native


def _many_outputs(n: int) -> tuple[dict[str, Any], oip.ModelInferRequest, None]:
    rest = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0] * 4}]}
    rest["outputs"] = [{"name": f"y{i}"} for i in range(n)]
    request = oip.ModelInferRequest(model_name="echo")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\0" * 16)
    for i in range(n):
        request.outputs.add(name=f"y{i}")
    return rest, request, None


def _long_id(n: int) -> tuple[dict[str, Any], oip.ModelInferRequest, pb.InferRequest]:
    rest, request, native = _many_inputs(1)
    rest["id"] = request.id = native.request_id = "i" * n
    return rest, request, native


OVER = [
    ("9 inputs", _many_inputs(9), "the request has 9 inputs, over the limit of 8 (setting max_tensors_per_"),
    ("9 outputs", _many_outputs(9), "the request asks for 9 outputs, over the limit of 8"),
    ("a 1025-character id", _long_id(1025), "the request id is 1025 characters, over the limit of 1024"),
]


@pytest.mark.parametrize(("case", "requests", "message"), OVER, ids=[o[0] for o in OVER])
async def test_a_request_past_the_tensor_count_or_id_limit_is_refused_alike_by_every_door(
    doors: Doors,
    fakes: FakeReplicas,
    refusals: pytest.LogCaptureFixture,
    case: str,
    requests: tuple[dict[str, Any], oip.ModelInferRequest, pb.InferRequest | None],
    message: str,
) -> None:
    rest, request, native = requests
    r = await doors.http.post("/v2/models/echo/infer", json=rest)
    assert r.status_code == 400 and message in r.json()["error"], r.text
    with pytest.raises(Aborted) as grpc_err:
        await doors.grpc.ModelInfer(request, cast(Any, Context()))
    assert grpc_err.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in grpc_err.value.message
    doors_used = 2
    if native is not None:  # the native API names no outputs
        with pytest.raises(Aborted) as native_err:
            await doors.native.SendRequest(native, cast(Any, Context()))
        assert native_err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert message in native_err.value.message
        doors_used = 3
    assert fakes.clients["a:9000"].requests == []  # no replica saw any of them
    assert doors.node.router.stats()["echo"].outcomes["invalid"] == doors_used
    lines = [r.getMessage() for r in refusals.records if "refused" in r.getMessage()]
    assert len(lines) == doors_used and all(message in line for line in lines)
    # The log quotes a client's id, never all of it.
    assert all(len(line) < 600 for line in lines), [len(line) for line in lines]


async def test_a_long_model_name_in_an_error_is_cut_to_fit_a_grpc_trailer(doors: Doors) -> None:
    request = oip.ModelInferRequest(model_name="m" * 10_000)
    with pytest.raises(Aborted) as err:
        await doors.grpc.ModelInfer(request, cast(Any, Context()))
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert err.value.message.startswith("unknown model 'mmm")
    assert "more characters)" in err.value.message
    assert len(err.value.message) <= 6000


async def test_an_unknown_model_name_is_quoted_cut_over_http(doors: Doors) -> None:
    """Before: a 5,000-character name came back whole in the 404 (a 5,056-byte body)."""
    name = "m" * 5_000
    for r in (
        await doors.http.post(f"/v2/models/{name}/infer", json={"inputs": []}),
        await doors.http.get(f"/v2/models/{name}"),
        await doors.http.get(f"/v2/models/{name}/ready"),
    ):
        assert r.status_code == 404, r.text[:200]
        message = r.json()["error"]
        assert message.startswith("unknown model 'mmm") and "(4802 more characters)" in message
        assert len(message) < 300


async def test_embeddings_with_too_many_strings_are_refused_before_any_work(
    doors: Doors, fakes: FakeReplicas
) -> None:
    refusals = [
        (1_000, "'input' holds 1000 strings, over the limit of 100"),
        # Past MAX_JSON_VALUES (100,000) a body is refused once parsed, before its lists are read.
        (200_000, "more than 100000 JSON values ('input' holds 200000 items)"),
    ]
    for count, message in refusals:
        body = json.dumps({"model": "emb", "input": ["a"] * count})
        r = await doors.http.post(
            "/v1/embeddings", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 400
        assert message in r.json()["error"]["message"]
    assert fakes.clients["e:1"].requests == []
    assert doors.node.router.stats()["emb"].outcomes["invalid"] == 2


async def test_a_large_openai_body_is_parsed_once_off_the_loop(
    doors: Doors, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token check read a /v1 body's model with json.loads on the event loop, and the
    route parsed it again: a 34 MB chat held every other request on the port up for about
    two seconds. Now it is parsed once, in the parsing process past max_json_on_loop_kb."""
    parses: list[int] = []

    async def counted(fn: Any, body: bytes) -> Any:
        parses.append(len(body))
        return await offload.in_parser(fn, body)

    monkeypatch.setattr(jsonbody, "in_parser", counted)
    chat = {"model": "gen", "messages": [CHAT], "max_tokens": 2, "user": "x" * 300_000}
    body = json.dumps(chat)  # over max_json_on_loop_kb (256)
    try:
        r = await doors.http.post("/v1/chat/completions", content=body)
        assert r.status_code == 200, r.text
        assert parses == [len(body)]
    finally:
        shutdown_parser()


CHAT = {"role": "user", "content": "a"}
PARTS = {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
LONG_LISTS = [
    ("/v1/chat/completions", {"messages": [CHAT] * 20_000}, "'messages' holds 20000 strings, over"),
    (
        "/v1/chat/completions",
        {"messages": [PARTS] * 40},
        "'messages' holds 120 strings (messages and their text",
    ),
    ("/v1/completions", {"prompt": ["a"] * 20_000}, "'prompt' holds 20000 strings, over"),
    ("/v1/completions", {"prompt": "a", "stop": ["a"] * 20_000}, "'stop' holds 20000 strings, over"),
]


@pytest.mark.parametrize(("path", "doc", "message"), LONG_LISTS, ids=["messages", "parts", "prompt", "stop"])
async def test_generations_with_too_many_strings_are_refused_before_any_work(
    doors: Doors, fakes: FakeReplicas, path: str, doc: dict[str, Any], message: str
) -> None:
    """As embeddings' input: before, a chat of 1,000,000 one-word messages (34 MB) was
    validated and made into a request on the scheduler's event loop, 9 s, and sent on."""
    r = await doors.http.post(path, json={"model": "gen", **doc})
    assert r.status_code == 400
    assert message in r.json()["error"]["message"]
    assert fakes.clients["g:1"].generations == []
    assert doors.node.router.stats()["gen"].outcomes["invalid"] == 1


def _text(name: str, value: bytes) -> tuple[oip.ModelInferRequest.InferInputTensor, bytes]:
    t = payload.from_array(name, np.array([value], dtype=object))
    return oip.ModelInferRequest.InferInputTensor(name=name, datatype=t.datatype, shape=t.shape), t.data


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([("text", b"hi"), ("text_input", b"again")], "give the prompt once"),
        ([("nope", b"x")], "unknown input 'nope'"),
        ([], "missing input 'text'"),
    ],
    ids=["two-prompts", "unknown-input", "no-prompt"],
)
async def test_a_streamed_generation_refused_before_routing_is_counted(
    doors: Doors, fakes: FakeReplicas, inputs: list[tuple[str, bytes]], message: str
) -> None:
    """ModelStreamInfer's generations refused before they were routed (a bad input, no
    prompt) were neither counted in the deployment's statistics nor logged, as the other
    doors' refusals are."""

    async def requests() -> AsyncIterator[oip.ModelInferRequest]:
        r = oip.ModelInferRequest(model_name="gen", id="r1")
        for name, value in inputs:
            tensor, data = _text(name, value)
            r.inputs.append(tensor)
            r.raw_input_contents.append(data)
        yield r

    answers = [a async for a in doors.grpc.ModelStreamInfer(requests(), cast(Any, Context()))]
    assert len(answers) == 1 and message in answers[0].error_message, answers
    assert fakes.clients["g:1"].generations == []
    assert doors.node.router.stats()["gen"].outcomes["invalid"] == 1


async def test_model_stream_infer_stops_reading_when_the_client_does_not_read(doors: Doors) -> None:
    doors.grpc.max_stream_pending = 4
    read = 0

    async def requests() -> AsyncIterator[oip.ModelInferRequest]:
        nonlocal read
        for i in range(50):
            read += 1
            t = payload.from_array("x", GOOD)
            r = oip.ModelInferRequest(model_name="echo", id=str(i))
            r.inputs.add(name="x", datatype=t.datatype, shape=t.shape)
            r.raw_input_contents.append(t.data)
            yield r

    answers = doors.grpc.ModelStreamInfer(requests(), cast(Any, Context()))
    first = await anext(answers)
    assert first.infer_response.id == "0"
    for _ in range(20):
        await asyncio.sleep(0)
    # One answer taken by the client: the stream has read at most that plus the bound.
    assert read <= 1 + 4 + 1
    rest = [a async for a in answers]
    assert sorted(int(a.infer_response.id) for a in [first, *rest]) == list(range(50))
    assert all(not a.error_message for a in rest)


async def test_a_json_body_over_the_on_loop_limit_is_parsed_and_answered_the_same(
    fakes: FakeReplicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bodies and answers over max_json_on_loop_kb go through a separate process (json.loads
    # holds the GIL); the answer must be the one the event loop would have written.
    settings = Settings(max_message_mb=8, max_json_on_loop_kb=1)
    router = Router("s1", settings, fakes, policy="round_robin")
    node = SchedulerNode(settings, "s1", cast(HeadLink, None), fakes, router=router)
    node.registered.set()
    router.add("a", spec(), "a:9000", "s1")
    x = np.arange(4 * 500, dtype=np.float32).reshape(500, 4) / 7
    doc: dict[str, Any] = {
        "id": "big",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [500, 4], "data": x.tolist()}],
    }
    try:
        transport = httpx.ASGITransport(app=scheduler_app(node))
        async with httpx.AsyncClient(transport=transport, base_url="http://shoal") as http:
            r = await http.post("/v2/models/echo/infer", json=doc)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["id"] == "big"
            np.testing.assert_array_equal(np.array(body["outputs"][0]["data"], np.float32).reshape(500, 4), x)
            # Bounded: past MAX_LARGE_JSON at once, a large JSON body is turned away.
            monkeypatch.setattr(offload, "_large_json", offload.MAX_LARGE_JSON)
            r = await http.post("/v2/models/echo/infer", json=doc)
            assert r.status_code == 503 and "large JSON bodies" in r.json()["error"]
            monkeypatch.setattr(offload, "_large_json", 0)
            bad = {**doc, "inputs": [{**doc["inputs"][0], "shape": [500, 5]}]}
            r = await http.post("/v2/models/echo/infer", json=bad)
            assert (
                r.status_code == 400
                and "shape [500,5] needs 2500 elements, data has 2000" in r.json()["error"]
            ), r.text
    finally:
        shutdown_parser()
        await router.aclose()


async def test_a_503_from_the_data_plane_says_when_to_retry(doors: Doors, fakes: FakeReplicas) -> None:
    """The early refusal of a full queue sent Retry-After: 1; a 503 from the data plane
    itself (no replica could take the request) came without it."""
    fakes.client("a:9000").fail()
    x = GOOD.tolist()
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": x}]}
    r = await doors.http.post("/v2/models/echo/infer", json=doc)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    fakes.client("a:9000").recover()
    r = await doors.http.post("/v2/models/echo/infer", json=doc)
    assert r.status_code == 200 and "retry-after" not in r.headers


async def test_an_output_the_model_does_not_answer_is_counted_invalid_everywhere(
    doors: Doors, refusals: pytest.LogCaptureFixture
) -> None:
    """A model that declares no outputs (python) shows only in its answer that it lacks the
    one asked for. Before, the request was refused INVALID_ARGUMENT but counted ``ok`` in
    ``shoal_requests_total`` (and ``fail`` in Triton's statistics)."""
    doors.node.router.add("n", spec("noinp", inputs=[], outputs=[]), "n:1", "s1")
    t = payload.from_array("x", GOOD)
    request = oip.ModelInferRequest(model_name="noinp", id="r1")
    request.inputs.add(name="x", datatype=t.datatype, shape=t.shape)
    request.raw_input_contents.append(t.data)
    request.outputs.add(name="nope")
    with pytest.raises(Aborted) as err:
        await doors.grpc.ModelInfer(request, cast(Any, Context()))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "unknown output 'nope'" in err.value.message
    outcomes = doors.node.router.stats()["noinp"].outcomes
    assert (outcomes["ok"], outcomes["invalid"]) == (0, 1)
    [stats] = await doors.node.catalog.statistics("noinp")
    assert (stats.fail.count, stats.success.count) == (1, 0)
    assert any("unknown output 'nope'" in r.getMessage() for r in refusals.records)


async def test_generations_are_counted_in_triton_statistics_as_in_the_metrics(doors: Doors) -> None:
    """Before, a generation that succeeded was counted in ``shoal_requests_total`` only."""
    gen = spec("gen", backend="transformers", options={"task": "generation"}, inputs=[], outputs=[])
    doors.node.router.add("g", gen, "g:1", "s1")
    r = await doors.http.post("/v2/models/gen/generate", json={"text_input": "hello", "max_tokens": 4})
    assert r.status_code == 200, r.text
    r = await doors.http.post("/v2/models/gen/generate_stream", json={"text_input": "hello", "max_tokens": 4})
    assert r.status_code == 200 and "text_output" in r.text, r.text
    r = await doors.http.post("/v1/completions", json={"model": "gen", "prompt": "hello", "max_tokens": 4})
    assert r.status_code == 200, r.text
    outcomes = doors.node.router.stats()["gen"].outcomes
    [stats] = await doors.node.catalog.statistics("gen")
    assert outcomes["ok"] == stats.success.count == 3
    assert stats.fail.count == 0


async def test_a_request_its_client_cancels_is_counted_cancelled_not_an_error(
    doors: Doors, fakes: FakeReplicas
) -> None:
    replica = fakes.clients["a:9000"]
    replica.gate = asyncio.Event()
    running = asyncio.create_task(doors.oip("echo", GOOD))
    await replica.wait_for_requests(1)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    stats = doors.node.router.stats()["echo"]
    assert (stats.outcomes["cancelled"], stats.outcomes["error"], stats.errors) == (1, 0, 0)
    metrics = (await doors.http.get("/metrics")).text
    assert 'shoal_requests_total{deployment="echo",outcome="cancelled"} 1.0' in metrics


async def test_one_unread_stream_leaves_room_for_other_clients(fakes: FakeReplicas) -> None:
    """A stream whose client never reads stops at 1/STREAM_SHARE of the process's
    ``max_inflight_mb``. Before, it held the whole share, and another client's large
    request waited behind it, then was refused RESOURCE_EXHAUSTED."""
    settings = Settings(max_inflight_mb=4)
    router = Router("s1", settings, fakes, policy="round_robin")
    node = SchedulerNode(settings, "s1", cast(HeadLink, None), fakes, router=router)
    node.registered.set()
    router.add("a", spec(), "a:9000", "s1")
    service = InferenceService(node.dataplane, node.inference_auth, settings)
    budget = node.dataplane.inflight
    size = 256 << 10
    x = np.zeros((size // 16, 4), np.float32)

    async def requests() -> AsyncIterator[oip.ModelInferRequest]:
        for i in range(40):
            t = payload.from_array("x", x)
            r = oip.ModelInferRequest(model_name="echo", id=f"s-{i}")
            r.inputs.add(name="x", datatype=t.datatype, shape=t.shape)
            r.raw_input_contents.append(t.data)
            yield r

    stream = cast(
        AsyncGenerator[oip.ModelStreamInferResponse],
        service.ModelStreamInfer(requests(), cast(Any, Context())),
    )
    try:
        await anext(stream)  # it runs; then its client reads no more
        for _ in range(200):
            await asyncio.sleep(0)
        assert budget.held <= budget.limit // STREAM_SHARE + 2 * size, budget.held
        # Another client's 2 MiB request goes on at once: no wait for room, no refusal.
        big = np.ones(((2 << 20) // 16, 4), np.float32)
        assert budget.room(big.nbytes)
        t = payload.from_array("x", big)
        request = oip.ModelInferRequest(model_name="echo", id="other")
        request.inputs.add(name="x", datatype=t.datatype, shape=t.shape)
        request.raw_input_contents.append(t.data)
        answer = await asyncio.wait_for(service.ModelInfer(request, cast(Any, Context())), 5)
        assert answer.raw_output_contents[0] == big.tobytes()
        rest = [a async for a in stream]  # read at last: every answer comes
        assert len(rest) == 39 and not any(a.error_message for a in rest)
    finally:
        await stream.aclose()
        await router.aclose()
    assert budget.held == 0


async def test_unwritten_stream_answers_hold_the_process_bytes_across_streams(fakes: FakeReplicas) -> None:
    """A stream bounds its own unwritten answers by count (``max_stream_pending``); across
    streams their bytes count in ``max_inflight_mb``, and past it no stream reads more.
    Before, 32 streams whose client never read grew one ingress process past 4 GB."""
    settings = Settings(max_inflight_mb=1)
    router = Router("s1", settings, fakes, policy="round_robin")
    node = SchedulerNode(settings, "s1", cast(HeadLink, None), fakes, router=router)
    node.registered.set()
    router.add("a", spec(), "a:9000", "s1")
    service = InferenceService(node.dataplane, node.inference_auth, settings)
    budget = node.dataplane.inflight
    size = 256 << 10  # each tensor: over budget.SMALL, so a request waits for room
    x = np.zeros((size // 16, 4), np.float32)
    read = [0, 0, 0]

    async def requests(stream: int) -> AsyncIterator[oip.ModelInferRequest]:
        for i in range(40):
            read[stream] += 1
            t = payload.from_array("x", x)
            r = oip.ModelInferRequest(model_name="echo", id=f"{stream}-{i}")
            r.inputs.add(name="x", datatype=t.datatype, shape=t.shape)
            r.raw_input_contents.append(t.data)
            yield r

    try:
        streams = [service.ModelStreamInfer(requests(s), cast(Any, Context())) for s in range(3)]
        firsts = [await anext(s) for s in streams]  # each stream runs; then nobody reads
        for _ in range(200):
            await asyncio.sleep(0)
        # Before, all 120 ran and their answers waited, 30 MB; now what the replica ran, and
        # what is held, stop about the limit: past it requests wait for room, and past as
        # much again waiting they are refused (RESOURCE_EXHAUSTED, in the stream).
        ran = len(fakes.clients["a:9000"].requests)
        assert ran <= (budget.limit // size) + 3, ran
        assert budget.held <= budget.limit + 3 * size, budget.held
        assert budget.waiting <= budget.limit
        # Read, every request has its answer, right, or its refusal, and the bytes come back.
        rest = [[a async for a in s] for s in streams]
        answered = refused = 0
        for s, (first, others) in enumerate(zip(firsts, rest, strict=True)):
            got = [first, *others]
            ids = sorted(int(a.infer_response.id.split("-")[1]) for a in got)
            assert ids == list(range(40)), (s, ids)
            for a in got:
                if a.error_message:
                    assert "max_inflight_mb" in a.error_message, a.error_message
                    refused += 1
                else:
                    assert a.infer_response.raw_output_contents[0] == x.tobytes()
                    answered += 1
        assert answered >= 3 and answered + refused == 120
        assert budget.held == 0
    finally:
        await router.aclose()


@pytest.fixture
async def fresh(fakes: FakeReplicas) -> AsyncIterator[Doors]:
    """A scheduler registered with the head that has not had its first routing table yet,
    as it is for a moment after it starts (or restarts); no replica of its own."""
    settings = Settings()
    router = Router("s1", settings, fakes, policy="round_robin")
    router.awaits_table = True  # what SchedulerNode.start sets
    node = SchedulerNode(settings, "s1", cast(HeadLink, None), fakes, router=router)
    node.registered.set()
    app = scheduler_app(node)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shoal") as client:
        yield Doors(node, client)
    await router.aclose()


def first_table(*models: str) -> RoutingTable:
    return RoutingTable(
        1, {m: DeploymentRoutes(spec(m), (Route(f"{m}-r", f"{m}:9000", "s2"),)) for m in models}
    )


async def test_before_its_first_routing_table_a_scheduler_says_not_yet_not_unknown(fresh: Doors) -> None:
    """Seen once in a loaded run (test_autoscale.py): a request sent right after a deploy
    reached a scheduler that had registered but not yet had its first table, and was refused
    NOT_FOUND for a model that existed, an answer clients take as final. Now every door says
    UNAVAILABLE / 503 (retried), and the scheduler is not ready until the table comes."""
    assert (await fresh.http.get("/v2/health/ready")).status_code == 503
    status, body = await fresh.rest("echo", GOOD)
    assert status == 503, body
    assert "is not known here yet: this scheduler has had no routing table since it started" in body["error"]
    with pytest.raises(Aborted) as caught:
        await fresh.oip("echo", GOOD)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(Aborted) as caught:
        await fresh.send("echo", GOOD)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE

    await fresh.node.router.apply_table(first_table("echo"))
    assert (await fresh.http.get("/v2/health/ready")).status_code == 200
    status, body = await fresh.rest("echo", GOOD, "rest")
    assert status == 200, body
    reply = await fresh.send("echo", GOOD, "native")
    assert reply.replica_id == "echo-r"
    status, body = await fresh.rest("nope", GOOD)  # unknown now means unknown
    assert status == 404
    assert body["error"] == "unknown model 'nope': no deployment of that name"

"""The OpenAI-compatible API and Triton's generate extension over in-memory replicas.

The official ``openai`` client talks to the Starlette routes through httpx's ASGI transport
(no sockets); the replicas are :class:`~shoal.testing.fakes.FakeReplicaClient` objects, whose
generations stream the prompt's words back and whose embeddings are made up per text.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import httpx2
import numpy as np
import openai
import pytest
from starlette.applications import Starlette

from shoal.config import Settings
from shoal.core.spec import DeploymentSpec, parse_spec
from shoal.core.traffic import TrafficRoute
from shoal.errors import InvalidArgument, ResourceExhausted
from shoal.http import offload
from shoal.http.generate import generate_routes
from shoal.http.jsonbody import MAX_JSON_VALUES, TooManyValues, json_object, parse_json
from shoal.http.offload import shutdown_parser
from shoal.http.openai import openai_routes
from shoal.proto import grpc_service_pb2 as oip
from shoal.rpc import generate_stream
from shoal.rpc.inference_service import InferenceService
from shoal.scheduler.dataplane import DataPlane
from shoal.scheduler.models import ModelCatalog, ModelMetadata, model_config
from shoal.scheduler.router import Router
from shoal.testing.fakes import FakeReplicaClient, FakeReplicas
from shoal.types import Arrays, ChatMessage, GenerateRequest, RoutingTable

pytestmark = pytest.mark.timeout(10)

DIM = 4


def fake_embeddings(inputs: Arrays) -> Arrays:
    """A made-up embedding per text: its length, vowels, spaces, 1; L2-normalised."""
    rows = []
    for raw in inputs["text"].tolist():
        text = raw.decode()
        rows.append([len(text), sum(c in "aeiou" for c in text), text.count(" "), 1.0])
    vectors = np.array(rows, dtype=np.float32)
    return {"embedding": vectors / np.linalg.norm(vectors, axis=1, keepdims=True)}


SPECS: dict[str, dict[str, Any]] = {
    "lm": {"backend": "vllm", "model": "m"},
    "minilm": {"backend": "transformers", "model": "m", "options": {"task": "embedding"}},
    "digits": {"backend": "sklearn", "model": "digits.joblib"},
}


def spec(name: str, **changes: Any) -> DeploymentSpec:
    return parse_spec({"name": name, **SPECS[name], **changes})


@pytest.fixture
def fakes() -> FakeReplicas:
    return FakeReplicas(handler=fake_embeddings)


@pytest.fixture
async def router(fakes: FakeReplicas) -> AsyncIterator[Router]:
    r = Router("s1", Settings(), fakes, policy="round_robin")
    r.add("lm-1", spec("lm"), "lm-1:1", "s1")
    r.add("minilm-1", spec("minilm", batching={"max_batch_size": 2}), "minilm-1:1", "s1")
    r.add("digits-1", spec("digits"), "digits-1:1", "s1")
    yield r
    await r.aclose()


@pytest.fixture
def lm(router: Router, fakes: FakeReplicas) -> FakeReplicaClient:
    return fakes.clients["lm-1:1"]


@pytest.fixture
def app(router: Router) -> Starlette:
    catalog = ModelCatalog(router)
    door = DataPlane(router, catalog, Settings())
    return Starlette(routes=[*openai_routes(router, 1 << 20, door), *generate_routes(catalog, 1 << 20)])


@pytest.fixture
async def http(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shoal") as client:
        yield client


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[openai.AsyncOpenAI]:
    # The openai client speaks httpx2 (httpx's successor), which has the same ASGI transport.
    transport = httpx2.ASGITransport(app=app)
    async with (
        httpx2.AsyncClient(transport=transport, base_url="http://shoal") as http_client,
        openai.AsyncOpenAI(
            base_url="http://shoal/v1", api_key="unused", http_client=http_client, max_retries=0
        ) as c,
    ):
        yield c


def sse(body: str) -> list[str]:
    """The data of each server-sent event in ``body``."""
    assert body.endswith("\n\n")
    events = body.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: ") :] for e in events]


# ---------------------------------------------------------------- models


async def test_models_lists_every_deployment(client: openai.AsyncOpenAI) -> None:
    models = [m async for m in client.models.list()]

    assert [m.id for m in models] == ["digits", "lm", "minilm"]
    assert {m.owned_by for m in models} == {"shoal"}
    assert (await client.models.retrieve("lm")).id == "lm"


async def test_models_lists_traffic_routes_as_requests_may_name_them(
    client: openai.AsyncOpenAI, router: Router
) -> None:
    # Before, GET /v1/models/canary answered 200 and the list left it out.
    await router.apply_table(
        RoutingTable(version=1, traffic={"canary": TrafficRoute("canary", (("lm", 100),))})
    )
    assert [m.id async for m in client.models.list()] == ["canary", "digits", "lm", "minilm"]
    assert (await client.models.retrieve("canary")).id == "canary"


# ---------------------------------------------------------------- embeddings


async def test_embeddings_come_back_in_order_as_floats_and_base64(
    client: openai.AsyncOpenAI, fakes: FakeReplicas
) -> None:
    texts = ["one", "two words", "three more words", "four", "five and six"]
    want = fake_embeddings({"text": np.array([t.encode() for t in texts], dtype=object)})["embedding"]

    floats = await client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    packed = await client.embeddings.create(model="minilm", input=texts)  # the client asks for base64

    for result in (floats, packed):
        assert [d.index for d in result.data] == [0, 1, 2, 3, 4]
        np.testing.assert_allclose(np.array([d.embedding for d in result.data]), want, rtol=1e-6)
        assert result.model == "minilm" and result.usage.prompt_tokens == 0
    # max_batch_size 2: five texts went as three requests.
    assert [len(r.inputs["text"]) for r in fakes.clients["minilm-1:1"].requests] == [2, 2, 1] * 2


@pytest.mark.parametrize(
    ("tokens", "usage"),
    [
        (lambda counts: np.array(counts, dtype=np.int64), 10),  # summed over the three parts
        (lambda counts: np.array(counts, dtype=np.int32), 10),
        (lambda counts: np.array(counts, dtype=np.float32), 0),  # not counts
        (lambda counts: np.array([-1] * len(counts), dtype=np.int64), 0),
        (lambda counts: np.array([*counts, 1], dtype=np.int64), 0),  # not one per text
        (lambda counts: np.array([b"x"] * len(counts), dtype=object), 0),
    ],
)
async def test_usage_sums_the_models_token_counts(
    client: openai.AsyncOpenAI, fakes: FakeReplicas, tokens: Any, usage: int
) -> None:
    """A model's ``tokens`` output, one non-negative integer per text, is the usage; one that
    is not that leaves it 0 and the embeddings as they are."""

    def handler(inputs: Arrays) -> Arrays:
        counts = [len(raw.decode().split()) for raw in inputs["text"].tolist()]
        return {**fake_embeddings(inputs), "tokens": tokens(counts)}

    fakes.handler = handler
    for fake in fakes.clients.values():
        fake.handler = handler
    texts = ["one", "two words", "three more words", "four", "five and six"]  # 1+2+3+1+3 words
    result = await client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (usage, usage)
    want = fake_embeddings({"text": np.array([t.encode() for t in texts], dtype=object)})["embedding"]
    np.testing.assert_allclose(np.array([d.embedding for d in result.data]), want, rtol=1e-6)


async def test_base64_embeddings_are_little_endian_float32(http: httpx.AsyncClient) -> None:
    reply = await http.post(
        "/v1/embeddings", json={"model": "minilm", "input": "hello", "encoding_format": "base64"}
    )

    vector = np.frombuffer(base64.b64decode(reply.json()["data"][0]["embedding"]), dtype="<f4")
    want = fake_embeddings({"text": np.array([b"hello"], dtype=object)})["embedding"][0]
    np.testing.assert_array_equal(vector, want)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "lm", "input": "hi"}, "model"),  # generates text, no embeddings
        ({"model": "digits", "input": "hi"}, "model"),
        ({"model": "minilm", "input": [1, 2, 3]}, "input"),  # token ids
        ({"model": "minilm", "input": []}, "input"),
        ({"model": "minilm", "input": ""}, "input"),  # before: embedded, where OpenAI refuses it
        ({"model": "minilm", "input": ["a", ""]}, "input"),
        ({"model": "minilm", "input": "hi", "dimensions": 2}, "dimensions"),
        ({"model": "minilm"}, "input"),
        ({"model": "minilm", "input": "hi", "user": 42}, "user"),  # before: accepted, as chat's was
    ],
)
async def test_bad_embedding_requests_are_400_naming_the_param(
    client: openai.AsyncOpenAI, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await client.post("/embeddings", body=body, cast_to=object)

    assert err.value.status_code == 400
    assert err.value.body == {
        "message": err.value.body["message"],  # type: ignore[index]
        "type": "invalid_request_error",
        "param": param,
        "code": None,
    }


@pytest.mark.parametrize("texts", ["\ud800", ["ok", "\udc00"]], ids=["string", "list"])
async def test_embedding_input_that_is_not_unicode_is_400_naming_input(
    http: httpx.AsyncClient, texts: str | list[str]
) -> None:
    """JSON's ``"\\ud800"``, a lone surrogate. Before, the 400 named no ``param``."""
    body = json.dumps({"model": "minilm", "input": texts})  # ASCII: "\ud800" escaped
    reply = await http.post("/v1/embeddings", content=body)

    assert reply.status_code == 400
    error = reply.json()["error"]
    assert (error["param"], error["type"]) == ("input", "invalid_request_error")
    assert "not valid Unicode text" in error["message"]


async def test_a_failing_embedding_replica_answers_its_status(
    client: openai.AsyncOpenAI, fakes: FakeReplicas
) -> None:
    fakes.clients["minilm-1:1"].fail(InvalidArgument("input 'text': element 2 is not valid UTF-8"))

    with pytest.raises(openai.BadRequestError, match="not valid UTF-8"):
        await client.embeddings.create(model="minilm", input=["a", "b", "c"])


def embedding_answer(array: Any) -> Any:
    """A model handler answering ``array`` (the same for every request) as its embedding."""
    return lambda inputs: {"embedding": np.asarray(array)}


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
@pytest.mark.parametrize(
    ("embedding", "problem"),
    [
        ([[1.0, np.nan, 0.0, 0.0]], "non-finite values in output 'embedding'"),
        ([[1.0, np.inf, 0.0, 0.0]], "non-finite values in output 'embedding'"),
        (np.array([[b"a", b"b"]], dtype=object), "a non-numeric 'embedding' output (BYTES)"),
        ([1.0, 2.0, 3.0, 4.0], "did not answer an 'embedding' output of one row per input"),  # shape (n,)
        ([[[1.0, 2.0], [3.0, 4.0]]], "did not answer an 'embedding' output of one row per input"),
    ],
)
async def test_a_models_bad_embedding_is_a_500_server_error(
    http: httpx.AsyncClient,
    fakes: FakeReplicas,
    router: Router,
    caplog: pytest.LogCaptureFixture,
    embedding: Any,
    problem: str,
    encoding_format: str,
) -> None:
    # Before: NaN was a plain-string 500 as floats and a 200 holding NaN as base64; BYTES a
    # ValueError's 500; a wrong shape a 400 invalid_request_error, as if the client erred.
    fakes.clients["minilm-1:1"].handler = embedding_answer(embedding)

    reply = await http.post(
        "/v1/embeddings", json={"model": "minilm", "input": "hi", "encoding_format": encoding_format}
    )

    assert reply.status_code == 500
    error = reply.json()["error"]
    assert error == {"message": error["message"], "type": "server_error", "param": None, "code": "internal"}
    assert error["message"].startswith("model 'minilm' ") and problem in error["message"], error
    # Counted as the failure the client saw (it was a success: the replica had answered),
    # and logged for the operator.
    assert {k: v for k, v in router.stats()["minilm"].outcomes.items() if v} == {"error": 1}
    assert f"failed on its answer: {error['message']}" in caplog.text


async def test_a_model_that_answers_no_embedding_is_a_400(
    http: httpx.AsyncClient, fakes: FakeReplicas, router: Router
) -> None:
    """A python model declares no outputs: only its answer shows that it does not embed.
    Asked for embeddings, as a model of another backend would be refused at once (400),
    the client erred; found by the ingress fuzzer (it was a 500 server_error)."""
    fakes.clients["minilm-1:1"].handler = lambda inputs: {"text": inputs["text"]}

    reply = await http.post("/v1/embeddings", json={"model": "minilm", "input": "hi"})

    assert reply.status_code == 400
    assert reply.json()["error"] == {
        "message": "model 'minilm' does not compute embeddings: it answered no 'embedding' output "
        "(its outputs: 'text')",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert {k: v for k, v in router.stats()["minilm"].outcomes.items() if v} == {"invalid": 1}


async def test_embeddings_of_different_widths_are_a_500_server_error(
    http: httpx.AsyncClient, fakes: FakeReplicas, router: Router
) -> None:
    # max_batch_size 2: three texts are two requests, answered 4 and 3 wide.
    def widths(inputs: Arrays) -> Arrays:
        rows = len(inputs["text"])
        return {"embedding": np.ones((rows, 4 if rows == 2 else 3), dtype=np.float32)}

    fakes.clients["minilm-1:1"].handler = widths

    reply = await http.post("/v1/embeddings", json={"model": "minilm", "input": ["a", "b", "c"]})

    assert reply.status_code == 500
    assert reply.json()["error"]["type"] == "server_error"
    assert (
        "model 'minilm' answered embeddings of different widths (4 and 3)" in reply.json()["error"]["message"]
    )
    # Two requests to the model: the first answer sets the width, the second is the failure.
    assert {k: v for k, v in router.stats()["minilm"].outcomes.items() if v} == {"ok": 1, "error": 1}


async def test_a_bug_on_an_openai_route_answers_openais_error_shape(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: object, **kwargs: object) -> list[np.ndarray]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(DataPlane, "embed", broken)

    reply = await http.post("/v1/embeddings", json={"model": "minilm", "input": "hi"})

    # Before: the exception left the route ({"error": "internal error: ..."}, a string).
    assert reply.status_code == 500
    assert reply.json() == {
        "error": {
            "message": "internal error: RuntimeError: a bug",
            "type": "server_error",
            "param": None,
            "code": "internal",
        }
    }
    assert "RuntimeError: a bug" in caplog.text  # the traceback is the server's


# ---------------------------------------------------------------- completions


async def test_completion_with_parameters(client: openai.AsyncOpenAI, lm: FakeReplicaClient) -> None:
    result = await client.completions.create(
        model="lm", prompt="the quick brown fox", max_tokens=2, temperature=0, top_p=0.5, stop=["x"], seed=7
    )

    assert result.object == "text_completion" and result.id.startswith("cmpl-")
    [choice] = result.choices
    assert (choice.text, choice.finish_reason, choice.index) == (" the quick", "length", 0)
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (
        4,
        2,
        6,
    )
    [call] = lm.generations
    assert call.request == GenerateRequest(
        prompt="the quick brown fox",
        max_tokens=2,
        temperature=0.0,
        top_p=0.5,
        stop=("x",),
        seed=7,
        stream=False,
    )
    assert call.request_id == result.id


async def test_parameters_left_out_are_the_deployments_defaults(
    client: openai.AsyncOpenAI, lm: FakeReplicaClient
) -> None:
    await client.completions.create(model="lm", prompt="a b")

    assert lm.generations[0].request == GenerateRequest(prompt="a b", stream=False)


async def test_streamed_completion_concatenates_to_the_whole(client: openai.AsyncOpenAI) -> None:
    whole = await client.completions.create(model="lm", prompt="one two three")
    stream = await client.completions.create(model="lm", prompt="one two three", stream=True)
    chunks = [c async for c in stream]

    assert len(chunks) == 4
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text == " one two three"
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, None, "stop"]
    assert {c.object for c in chunks} == {"text_completion"}
    assert len({c.id for c in chunks}) == 1


# ---------------------------------------------------------------- chat


async def test_chat_completion(client: openai.AsyncOpenAI, lm: FakeReplicaClient) -> None:
    result = await client.chat.completions.create(
        model="lm",
        messages=[
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}],
            },
        ],
        max_completion_tokens=5,
        modalities=["text"],  # what shoal answers: taken
    )

    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    [choice] = result.choices
    assert choice.message.role == "assistant"
    assert (choice.message.content, choice.finish_reason) == (" hello there", "stop")
    request = lm.generations[0].request
    assert request.messages == (ChatMessage("system", "be brief"), ChatMessage("user", "hello there"))
    assert (request.prompt, request.max_tokens) == ("", 5)


async def test_streamed_chat_has_a_role_chunk_content_chunks_and_a_finish_chunk(
    client: openai.AsyncOpenAI,
) -> None:
    messages: Any = [{"role": "user", "content": "one two three four"}]
    whole = await client.chat.completions.create(model="lm", messages=messages, max_tokens=3)
    stream = await client.chat.completions.create(
        model="lm", messages=messages, max_tokens=3, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]

    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == whole.choices[0].message.content == " one two three"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "length"
    # include_usage: a last chunk without choices carries the usage.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])


async def test_the_event_stream_ends_with_done(http: httpx.AsyncClient) -> None:
    reply = await http.post(
        "/v1/chat/completions",
        json={"model": "lm", "messages": [{"role": "user", "content": "a b"}], "stream": True},
    )

    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = sse(reply.text)
    assert events[-1] == "[DONE]"
    docs = [json.loads(e) for e in events[:-1]]
    assert [d["choices"][0]["delta"] for d in docs] == [
        {"role": "assistant", "content": ""},
        {"content": " a"},
        {"content": " b"},
        {},
    ]


async def test_a_failure_mid_stream_is_an_error_event(
    client: openai.AsyncOpenAI, lm: FakeReplicaClient, router: Router
) -> None:
    lm.fail_after_chunks = 2
    stream = await client.chat.completions.create(
        model="lm", messages=[{"role": "user", "content": "a b c d"}], stream=True
    )

    got = []
    with pytest.raises(openai.APIError, match="went away"):
        async for chunk in stream:
            got.append(chunk.choices[0].delta.content)

    assert got == ["", " a", " b"]
    assert router.load()["lm"].in_flight == 0


def piece_text(doc: dict[str, Any]) -> str:
    """The text of an event: Triton's ``text_output``, or an OpenAI chunk's (usage's: "")."""
    if "text_output" in doc:
        return str(doc["text_output"])
    if not doc["choices"]:
        return ""
    choice = doc["choices"][0]
    return str(choice["delta"].get("content") or "" if "delta" in choice else choice["text"])


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v2/models/lm/generate_stream"])
async def test_a_piece_with_a_unicode_line_separator_stays_on_its_line(
    http: httpx.AsyncClient, lm: FakeReplicaClient, path: str
) -> None:
    """Events are JSON with their text unescaped; U+2028, U+2029 and U+0085 are line
    breaks to Python's ``str.splitlines`` and to httpx's ``aiter_lines``, which SSE clients
    read lines with. Before, such a piece cut its event in two: the client read JSON it
    could not parse."""
    lm.generator = lambda request: ["a\u2028b", "\u2029c\x85"]
    prompt = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    doc = {"model": "lm", "stream": True, **prompt} if "/v1/" in path else {"text_input": "hi"}

    async with http.stream("POST", path, json=doc) as reply:
        lines = [line async for line in reply.aiter_lines() if line]

    events = [json.loads(line.removeprefix("data: ")) for line in lines if line != "data: [DONE]"]
    texts = [piece_text(e) for e in events]
    assert "".join(texts) == "a\u2028b\u2029c\x85"


def break_after(lm: FakeReplicaClient, monkeypatch: pytest.MonkeyPatch, chunks: int) -> None:
    """``lm``'s generations raise a RuntimeError (a bug, not a ShoalError) after ``chunks``."""
    generate = lm.generate

    async def broken(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        sent = 0
        async for chunk in generate(*args, **kwargs):
            if sent == chunks:
                raise RuntimeError("a bug mid-stream")
            yield chunk
            sent += 1

    monkeypatch.setattr(lm, "generate", broken)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_a_bug_mid_stream_ends_it_with_an_error_event(
    http: httpx.AsyncClient,
    lm: FakeReplicaClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    """Before: the stream ended after its last chunk with neither an error event nor
    ``[DONE]``: the client could not tell a failure from a cut connection."""
    break_after(lm, monkeypatch, 2)
    prompt = (
        {"messages": [{"role": "user", "content": "a b c d"}]} if "chat" in path else {"prompt": "a b c d"}
    )

    reply = await http.post(path, json={"model": "lm", "stream": True, **prompt})

    events = sse(reply.text)
    assert "[DONE]" not in events
    assert json.loads(events[-1]) == {
        "error": {
            "message": "internal error: RuntimeError: a bug mid-stream",
            "type": "server_error",
            "param": None,
            "code": "internal",
        }
    }
    assert "RuntimeError: a bug mid-stream" in caplog.text  # the traceback is the server's


async def test_a_bug_mid_generate_stream_ends_it_with_an_error_event(
    http: httpx.AsyncClient, lm: FakeReplicaClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    break_after(lm, monkeypatch, 1)

    reply = await http.post("/v2/models/lm/generate_stream", json={"text_input": "a b c"})

    events = [json.loads(e) for e in sse(reply.text)]
    assert events[0]["text_output"] == " a"
    assert events[-1] == {"error": "internal error: RuntimeError: a bug mid-stream"}


@pytest.mark.parametrize(
    ("path", "doc", "last"),
    [
        (
            "/v1/completions",
            {"model": "lm", "prompt": "a", "stream": True},
            # The model's refusal of the prompt names it, as an error response does.
            {
                "error": {
                    "message": "too long",
                    "type": "invalid_request_error",
                    "param": "prompt",
                    "code": None,
                }
            },
        ),
        ("/v2/models/lm/generate_stream", {"text_input": "a"}, {"error": "too long"}),
    ],
    ids=["openai", "generate_stream"],
)
async def test_a_failure_after_keepalives_began_is_the_streams_error_event(
    router: Router, lm: FakeReplicaClient, path: str, doc: dict[str, Any], last: dict[str, Any]
) -> None:
    """A stream whose first piece takes ``sse_keepalive_s`` has answered 200 by then (with
    a keep-alive): a failure after that is its last event, as one after a piece is."""
    catalog = ModelCatalog(router)
    door = DataPlane(router, catalog, Settings(sse_keepalive_s=0.05))
    app = Starlette(routes=[*openai_routes(router, 1 << 20, door), *generate_routes(catalog, 1 << 20, 0.05)])
    lm.gate = asyncio.Event()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shoal") as http:
        reply = asyncio.ensure_future(http.post(path, json=doc))
        async with asyncio.timeout(5):
            while not lm.generations:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # keep-alives meanwhile: the stream has begun
        lm.fail(InvalidArgument("too long"))
        lm.gate.set()
        answer = await reply

    assert answer.status_code == 200
    assert answer.text.startswith(": keep-alive\n\n")
    events = answer.text.split("\n\n")[:-1]
    assert set(events[:-1]) == {": keep-alive"}
    error = json.loads(events[-1].removeprefix("data: "))
    assert error == last
    assert router.load()["lm"].in_flight == 0


# ---------------------------------------------------------------- errors


async def test_unknown_model_is_404_model_not_found(client: openai.AsyncOpenAI) -> None:
    for call in (
        client.completions.create(model="nope", prompt="hi"),
        client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}], stream=True
        ),
        client.embeddings.create(model="nope", input="hi"),
        client.models.retrieve("nope"),
    ):
        with pytest.raises(openai.NotFoundError) as err:
            await call
        assert err.value.code == "model_not_found"
        assert err.value.type == "invalid_request_error"
        assert "nope" in err.value.message


OPENAI_BODIES: dict[str, dict[str, Any]] = {
    "/v1/embeddings": {"input": "hi"},
    "/v1/completions": {"prompt": "hi"},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
}


@pytest.mark.parametrize("path", OPENAI_BODIES)
async def test_a_model_name_that_is_not_unicode_is_400(http: httpx.AsyncClient, path: str) -> None:
    # Was a 500 UnicodeEncodeError: the 404's message quoted the name, which JSON cannot write.
    body = json.dumps({"model": "\ud800", **OPENAI_BODIES[path]})  # ASCII: "\ud800" escaped

    reply = await http.post(path, content=body, headers={"content-type": "application/json"})

    assert reply.status_code == 400
    assert reply.json()["error"] == {
        "message": "'model' is not valid Unicode text (a lone surrogate)",
        "type": "invalid_request_error",
        "param": "model",
        "code": None,
    }


@pytest.mark.parametrize("path", OPENAI_BODIES)
async def test_a_long_unknown_model_name_is_cut_in_the_404(http: httpx.AsyncClient, path: str) -> None:
    reply = await http.post(path, json={"model": "m" * 10_000, **OPENAI_BODIES[path]})

    assert reply.status_code == 404
    message = reply.json()["error"]["message"]
    assert (
        message
        == f"The model '{'m' * 200}... (9800 more characters)' does not exist: no deployment of that name"
    )


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["x"] * 10_000}, "stop"),  # each searched for at every token: bounded
        ({"stop": "x" * 100_000}, "stop"),
        ({"seed": 1.5}, "seed"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        # Before: the deprecated pair was ignored, the model answering without them.
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": {"name": "f"}}, "function_call"),
        ({"function_call": "auto"}, "function_call"),
        # Before: accepted as an empty message (OpenAI answers 400).
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        (
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": None}]},
            "messages.1.content",
        ),
        ({"messages": [{"role": "assistant"}]}, "messages.0.content"),
        ({"messages": [{"role": "tool"}]}, "messages.0.content"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 1}, "presence_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content.0"),
        ({"messages": [{"content": "no role"}]}, "messages.0.role"),
        ({"model": "digits"}, "model"),
        # Types as OpenAI's API takes them, not coerced (before: true, 5, a wizard's message).
        ({"stream": "yes"}, "stream"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        # Before: accepted (OpenAI's API refuses both).
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"user": 42}, "user"),
        # Before: accepted, a text answer coming back to a request for audio.
        ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        # Before: named 'logprobs', and a text part without text "only text content is
        # supported, got 'text'".
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text"),
        ({"messages": [{"role": "user", "content": []}]}, "messages.0.content"),  # before: taken as ""
    ],
)
async def test_bad_chat_requests_are_400_naming_the_param(
    client: openai.AsyncOpenAI, lm: FakeReplicaClient, changes: dict[str, Any], param: str
) -> None:
    body = {"model": "lm", "messages": [{"role": "user", "content": "hi"}], **changes}

    with pytest.raises(openai.BadRequestError) as err:
        await client.post("/chat/completions", body=body, cast_to=object)

    assert err.value.param == param, err.value.message
    assert err.value.type == "invalid_request_error"
    assert lm.generations == []


@pytest.mark.parametrize(
    ("changes", "param"),
    [({"prompt": ["a", "b"]}, "prompt"), ({"echo": True}, "echo"), ({"best_of": 2}, "best_of")],
)
async def test_bad_completion_requests_are_400(
    client: openai.AsyncOpenAI, changes: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await client.post("/completions", body={"model": "lm", "prompt": "hi", **changes}, cast_to=object)

    assert err.value.param == param


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/v1/foo", 404, None),
        ("POST", "/v1/", 404, None),
        ("POST", "/v1/models", 405, "GET, HEAD"),
        ("DELETE", "/v1/models/minilm", 405, "GET, HEAD"),
        ("GET", "/v1/embeddings", 405, "POST"),
        ("GET", "/v1/chat/completions", 405, "POST"),
    ],
)
async def test_unknown_paths_and_methods_under_v1_answer_openais_error_shape(
    http: httpx.AsyncClient, method: str, path: str, status: int, allow: str | None
) -> None:
    # Before: Starlette's own answer, not the object OpenAI's clients read.
    reply = await http.request(method, path)

    assert reply.status_code == status
    error = reply.json()["error"]
    assert error == {
        "message": error["message"],
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert f"({method} {path})" in error["message"]
    assert reply.headers.get("allow") == allow


async def test_other_unknown_paths_keep_the_apps_answer(http: httpx.AsyncClient) -> None:
    reply = await http.get("/v2/foo")

    assert reply.status_code == 404 and reply.text == "Not Found"


async def test_a_body_that_is_not_json_is_400(http: httpx.AsyncClient) -> None:
    reply = await http.post("/v1/completions", content=b"{nope")

    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in reply.json()["error"]["message"]


async def test_overload_is_503_server_error(client: openai.AsyncOpenAI, lm: FakeReplicaClient) -> None:
    lm.fail(ResourceExhausted("deployment 'lm' is at capacity"))

    with pytest.raises(openai.InternalServerError) as err:
        await client.completions.create(model="lm", prompt="hi", stream=True)

    assert err.value.status_code == 503
    assert err.value.body == {
        "message": "deployment 'lm' is at capacity",
        "type": "server_error",
        "param": None,
        "code": "resource_exhausted",
    }


# ---------------------------------------------------------------- Triton's generate extension


async def test_generate_and_generate_stream(http: httpx.AsyncClient, lm: FakeReplicaClient) -> None:
    body = {"text_input": "one two three", "parameters": {"max_tokens": 2, "temperature": 0}, "id": "r1"}

    whole = await http.post("/v2/models/lm/generate", json=body)
    streamed = await http.post("/v2/models/lm/versions/1/generate_stream", json=body)

    assert whole.json() == {
        "model_name": "lm",
        "model_version": "1",
        "id": "r1",
        "text_output": " one two",
        "finish_reason": "length",
        "prompt_tokens": 3,
        "completion_tokens": 2,
    }
    events = [json.loads(e) for e in sse(streamed.text)]
    assert [e["text_output"] for e in events] == [" one", " two", ""]
    assert events[-1]["finish_reason"] == "length" and "finish_reason" not in events[0]
    assert lm.generations[0].request.temperature == 0.0


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v2/models/nope/generate", {"text_input": "hi"}, 404, "unknown model"),
        ("/v2/models/digits/generate_stream", {"text_input": "hi"}, 400, "does not generate text"),
        ("/v2/models/lm/generate", {"prompt": "hi"}, 400, "text_input"),
        ("/v2/models/lm/generate", {"text_input": "hi", "max_tokens": -1}, 400, "max_tokens"),
        # An integer too large for a float (JSON has no bound) was a 500 OverflowError.
        (
            "/v2/models/lm/generate",
            {"text_input": "hi", "parameters": {"temperature": 10**400}},
            400,
            "temperature must be in [0, 2], got an integer too large",
        ),
        (
            "/v2/models/lm/generate_stream",
            {"text_input": "hi", "top_p": 10**400},
            400,
            "top_p must be in (0, 1], got an integer too large",
        ),
        ("/v2/models/lm/generate", {"text_input": "hi", "seed": 10**400}, 400, "seed must be in ["),
        ("/v2/models/lm/versions/2/generate", {"text_input": "hi"}, 404, "no version"),
    ],
)
async def test_generate_errors_are_json_with_a_status(
    http: httpx.AsyncClient, path: str, body: dict[str, Any], status: int, message: str
) -> None:
    reply = await http.post(path, json=body)

    assert reply.status_code == status
    assert message in reply.json()["error"]


@pytest.mark.parametrize("path", ["/v2/models/lm/generate", "/v2/models/lm/generate_stream"])
@pytest.mark.parametrize(
    ("request_id", "message"),
    [
        # A lone surrogate was a 500 UnicodeEncodeError when the request went to the replica.
        ("\ud800", "'id' must be a string of valid Unicode"),
        (7, "'id' must be a string of valid Unicode, got 7"),
        # Was taken and echoed whole at 100,000 characters; /infer refuses past 1024.
        ("r" * 1025, "the request id is 1025 characters, over the limit of 1024"),
    ],
    ids=["lone-surrogate", "not-a-string", "too-long"],
)
async def test_generate_refuses_the_ids_infer_refuses(
    http: httpx.AsyncClient, lm: FakeReplicaClient, path: str, request_id: object, message: str
) -> None:
    body = json.dumps({"text_input": "hi", "id": request_id})  # ASCII: "\ud800" escaped

    reply = await http.post(path, content=body, headers={"content-type": "application/json"})

    assert reply.status_code == 400
    assert message in reply.json()["error"]
    assert lm.generations == []


# ---------------------------------------------------------------- decoupled ModelStreamInfer


def infer_request(**changes: Any) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="lm", id="s1", **changes)
    text = request.inputs.add(name="text", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"one two three")
    return request


async def responses(router: Router, request: oip.ModelInferRequest) -> list[oip.ModelInferResponse]:
    catalog = ModelCatalog(router)
    inputs = {"text": np.array([b"one two three"], dtype=object)}
    assert generate_stream.wants_generation(catalog, request)
    return [r.infer_response async for r in generate_stream.stream_responses(catalog, request, inputs, 5.0)]


def piece(response: oip.ModelInferResponse) -> str:
    raw = response.raw_output_contents[0]
    return raw[4:].decode()  # one BYTES element: 4-byte length, then the text


async def test_a_generation_streams_a_response_per_piece_the_last_marked_final(router: Router) -> None:
    got = await responses(router, infer_request())

    assert [piece(r) for r in got] == [" one", " two", " three"]
    assert [r.parameters["triton_final_response"].bool_param for r in got] == [False, False, True]
    assert got[-1].parameters["finish_reason"].string_param == "stop"
    assert got[-1].parameters["completion_tokens"].int64_param == 3
    assert {(r.model_name, r.model_version, r.id, r.outputs[0].name) for r in got} == {
        ("lm", "1", "s1", "text")
    }


async def test_an_empty_final_response_on_request(router: Router) -> None:
    request = infer_request()
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    request.parameters["max_tokens"].int64_param = 2
    request.outputs.add(name="text_output")

    got = await responses(router, request)

    assert [piece(r) for r in got[:-1]] == [" one", " two"]
    assert got[-1].outputs == [] and got[-1].parameters["triton_final_response"].bool_param
    assert got[-1].parameters["finish_reason"].string_param == "length"
    assert got[0].outputs[0].name == "text_output"


class StreamContext:
    """What ModelStreamInfer uses of a grpc.aio context."""

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


async def test_a_generation_over_model_stream_infer_refuses_the_ids_infer_refuses(router: Router) -> None:
    """Before: any length of id went on to the replica, where /infer and /generate refuse
    ids over 1024 characters."""
    service = InferenceService(DataPlane(router, ModelCatalog(router), Settings()), None, Settings())
    request = infer_request()
    request.id = "i" * 1025

    async def requests() -> AsyncIterator[oip.ModelInferRequest]:
        yield request

    got = [r async for r in service.ModelStreamInfer(requests(), cast(Any, StreamContext()))]
    assert [r.error_message for r in got] == ["the request id is 1025 characters, over the limit of 1024"]


def test_generation_deployments_are_decoupled_in_their_model_config(router: Router) -> None:
    for name, decoupled in (("lm", True), ("minilm", False), ("digits", False)):
        spec = router.spec(name)
        config = model_config(spec, ModelMetadata(name, spec.backend, (), ()), 1)
        assert config["model_transaction_policy"] == {"decoupled": decoupled}


# ---------------------------------------------------------------- large bodies


async def test_a_body_over_the_on_loop_limit_is_parsed_off_the_loop_and_answered_the_same(
    router: Router, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chat of 1,000,000 one-word messages (34 MB) was parsed on the event loop: every
    other request on the port waited over a second. Past ``max_json_on_loop_kb`` a body is
    parsed in the parsing process, as a large infer body is; at most MAX_LARGE_JSON at once."""
    settings = Settings(max_json_on_loop_kb=1)
    catalog = ModelCatalog(router)
    door = DataPlane(router, catalog, settings)
    app = Starlette(
        routes=[*openai_routes(router, 1 << 20, door), *generate_routes(catalog, 1 << 20, on_loop=1024)]
    )
    messages = [{"role": "user", "content": f"word {i}"} for i in range(100)]
    chat = {"model": "lm", "messages": messages, "max_tokens": 4}
    generate = {"text_input": "x" * 2000, "parameters": {"max_tokens": 4}}
    assert len(json.dumps(chat)) > 1024 and len(json.dumps(generate)) > 1024
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shoal") as http:
            r = await http.post("/v1/chat/completions", json=chat)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"]
            r = await http.post("/v2/models/lm/generate", json=generate)
            assert r.status_code == 200, r.text
            # Through the parsing process: past MAX_LARGE_JSON at once it turns bodies away.
            monkeypatch.setattr(offload, "_large_json", offload.MAX_LARGE_JSON)
            r = await http.post("/v1/chat/completions", json=chat)
            assert r.status_code == 503 and "large JSON bodies" in r.json()["error"]["message"], r.text
            monkeypatch.setattr(offload, "_large_json", 0)
            # What the parsing process refuses comes back as the same 400.
            r = await http.post("/v1/chat/completions", content=b"{" + b"x" * 2000)
            assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"], r.text
    finally:
        shutdown_parser()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/v2/models/lm/generate"])
async def test_a_body_of_too_many_json_values_is_a_400(http: httpx.AsyncClient, path: str) -> None:
    doc = {"model": "lm", "padding": [0] * (MAX_JSON_VALUES + 1)}
    r = await http.post(path, json=doc)
    assert r.status_code == 400, r.text
    assert f"more than {MAX_JSON_VALUES} JSON values" in r.text


async def test_too_many_json_values_name_the_longest_list_wherever_it_is(http: httpx.AsyncClient) -> None:
    """A chat of one message of 100,001 text parts (3 MB) was refused as "'messages' holds 1
    items", the longest of the body's own lists, with no param. Parsed on the loop and in
    the parsing process alike."""
    doc = {"model": "lm", "messages": [{"role": "user", "content": [0] * (MAX_JSON_VALUES + 1)}]}
    r = await http.post("/v1/chat/completions", json=doc)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages.0.content"
    assert f"('messages.0.content' holds {MAX_JSON_VALUES + 1} items)" in error["message"]
    try:
        with pytest.raises(TooManyValues) as refused:
            await parse_json(json.dumps(doc).encode(), on_loop=0)
    finally:
        shutdown_parser()
    assert (refused.value.param, refused.value.model) == ("messages.0.content", "lm")
    with pytest.raises(TooManyValues) as refused:
        json_object(json.dumps({"model": "lm", "padding": [0] * MAX_JSON_VALUES}).encode())
    assert refused.value.param == "padding"

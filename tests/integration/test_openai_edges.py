"""The OpenAI API's edges on a real cluster (real replicas, real HTTP), with models that
need no weights: the ``vllm`` backend over :mod:`shoal.testing.fake_vllm`, and ``python``
models written into the test's folder.

- ``slow``: a generator whose first piece takes a second (a long prompt, say) and each
  next one 0.4 s; the cluster sends a keep-alive after 0.2 s without a byte;
- ``aborting``: a generator that vLLM itself ends with finish reason ``abort``;
- ``emb``: an embedding model that declares its 4-wide output;
- ``long-name``: a model that answers an output with a 100,000-character name;
- ``echo``: ``examples/echo.yaml``, whose one input is FP32 ``x``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from shoal.core.spec import load_spec_file
from shoal.testing.cluster import ProcessCluster

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio(loop_scope="module")]

KEEPALIVE_S = 0.2
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

MODELS = """
import numpy as np


class Embed:
    def predict(self, inputs):
        return {"embedding": np.full((len(inputs["text"]), 4), 0.5, np.float32)}


class LongName:
    def predict(self, inputs):
        return {"y" * 100_000: inputs["x"]}
"""


def fake_vllm(name: str, **engine: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "vllm",
        "model": "lm",
        "options": {"vllm_module": "shoal.testing.fake_vllm", **engine},
        "resources": {"cpus": 0.1},
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ProcessCluster]:
    root = tmp_path_factory.mktemp("openai-edges")
    models = root / "models"
    (models / "lm").mkdir(parents=True)
    (models / "edge_models.py").write_text(MODELS)
    python = {"backend": "python", "base_dir": str(models), "resources": {"cpus": 0.1}}
    specs = [
        {
            **fake_vllm("slow", first_token_delay_s=1.0, token_delay_s=0.4, max_model_len=8),
            "base_dir": str(models),
        },
        {**fake_vllm("aborting", finish_reason="abort"), "base_dir": str(models)},
        {
            "name": "emb",
            **python,
            "model": "edge_models:Embed",
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, 4]}],
        },
        {"name": "long-name", **python, "model": "edge_models:LongName"},
    ]
    (echo,) = load_spec_file(EXAMPLES / "echo.yaml")
    env = {"SHOAL_SSE_KEEPALIVE_S": str(KEEPALIVE_S)}
    async with ProcessCluster(root / "cluster", env=env) as c:
        await c.deploy(echo.model_copy(update={"resources": echo.resources.model_copy(update={"cpus": 0.1})}))
        for spec in specs:
            await c.deploy(spec)
        await c.wait_ready("echo", 1, timeout_s=60)
        for spec in specs:
            await c.wait_ready(spec["name"], 1, timeout_s=60)
        yield c


@pytest_asyncio.fixture(loop_scope="module")
async def http(cluster: ProcessCluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://{cluster.http_address()}", timeout=30) as c:
        yield c


# ---------------------------------------------------------------- keep-alive


async def raw_stream(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[str]:
    """The stream's SSE lines, blank lines left out, as they came."""
    async with http.stream("POST", path, json=body) as reply:
        assert reply.status_code == 200, await reply.aread()
        return [line async for line in reply.aiter_lines() if line]


def text_of(line: str) -> str:
    """The text of an SSE line's event: OpenAI's chunk (a chat's or a completion's) or Triton's."""
    doc = json.loads(line[len("data: ") :])
    if "text_output" in doc:
        return str(doc["text_output"])
    choice = doc["choices"][0]
    return str(choice["delta"].get("content") or "" if "delta" in choice else choice["text"])


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "slow", "messages": [{"role": "user", "content": "a b c"}]}),
        ("/v1/completions", {"model": "slow", "prompt": "a b c"}),
        ("/v2/models/slow/generate_stream", {"text_input": "a b c"}),
    ],
    ids=["chat", "completions", "generate_stream"],
)
async def test_a_quiet_stream_sends_keepalives_before_and_between_pieces(
    http: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    """A proxy cuts a connection that carries no byte for its idle timeout (60 s for
    nginx and AWS load balancers): before, a stream whose first piece took that long (a
    long prompt, a queue) was cut. Now a comment line comes whenever the stream has been
    quiet ``sse_keepalive_s``, before the first piece (for a chat: before its role chunk,
    which comes with it) and between pieces."""
    stream = path.startswith("/v1/")
    lines = await raw_stream(http, path, {**body, "stream": True} if stream else body)

    kinds = ["keepalive" if line == ": keep-alive" else "data" for line in lines]
    assert all(line.startswith("data: ") for line in lines if line != ": keep-alive"), lines
    assert kinds[0] == "keepalive", lines  # the first piece took a second
    with_text = [i for i, line in enumerate(lines) if line.startswith("data: {") and text_of(line)]
    assert len(with_text) >= 3, lines
    # Between the first and the last piece, keep-alives came too.
    assert "keepalive" in kinds[with_text[0] : with_text[-1]], lines
    assert " a b c" in "".join(
        text_of(line) for line in lines if line.startswith("data: {")
    )  # a chat's: its transcript's words
    if stream:
        assert lines[-1] == "data: [DONE]"


async def test_the_openai_client_reads_a_stream_with_keepalives(cluster: ProcessCluster) -> None:
    base_url = f"http://{cluster.http_address()}/v1"
    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=30) as client:
        stream = await client.chat.completions.create(
            model="slow", messages=[{"role": "user", "content": "a b"}], stream=True
        )
        chunks = [c async for c in stream]
    assert " a b" in "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_an_error_before_the_first_piece_is_still_an_error_response(http: httpx.AsyncClient) -> None:
    """The stream waits ``sse_keepalive_s`` for its first piece before it answers 200: a
    request its replica refuses at once (a prompt over ``max_model_len``) keeps its status."""
    long_prompt = " ".join("abcdefghi")
    reply = await http.post("/v1/completions", json={"model": "slow", "prompt": long_prompt, "stream": True})
    assert reply.status_code == 400, reply.text
    assert "maximum model length" in reply.json()["error"]["message"]
    reply = await http.post("/v1/completions", json={"model": "nope", "prompt": "a", "stream": True})
    assert reply.status_code == 404, reply.text


# ---------------------------------------------------------------- embeddings


async def model_runs(http: httpx.AsyncClient, model: str) -> int:
    reply = await http.get(f"/v2/models/{model}/stats")
    assert reply.status_code == 200, reply.text
    return int(reply.json()["model_stats"][0]["execution_count"])


async def test_dimensions_the_model_cannot_make_are_refused_before_it_runs(http: httpx.AsyncClient) -> None:
    """Before, the model embedded every text, and then the request was refused."""
    before = await model_runs(http, "emb")
    for dimensions, why in [(8, "makes 4-dimensional embeddings only"), (0, "must be at least 1")]:
        body = {"model": "emb", "input": ["a", "b"], "dimensions": dimensions}
        reply = await http.post("/v1/embeddings", json=body)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == "dimensions"
        assert why in reply.json()["error"]["message"]
        assert await model_runs(http, "emb") == before

    reply = await http.post("/v1/embeddings", json={"model": "emb", "input": "a", "dimensions": 4})
    assert reply.status_code == 200, reply.text
    assert [len(d["embedding"]) for d in reply.json()["data"]] == [4]
    assert await model_runs(http, "emb") == before + 1


async def test_embeddings_of_a_model_that_takes_no_text_name_the_inputs_it_takes(
    http: httpx.AsyncClient,
) -> None:
    """The echo example takes an FP32 ``x``. Before, embeddings asked of it answered
    "unknown input 'text'; model 'echo' takes 'x'", as if the client had named an input."""
    before = await model_runs(http, "echo")
    reply = await http.post("/v1/embeddings", json={"model": "echo", "input": ["a", "b"]})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["param"], error["type"]) == ("model", "invalid_request_error")
    assert error["message"] == (
        "model 'echo' does not take text for embeddings: its inputs are 'x' (FP32); "
        "an embedding model takes a BYTES input 'text'"
    )
    assert await model_runs(http, "echo") == before


# ---------------------------------------------------------------- output names


async def test_an_output_name_longer_than_a_spec_allows_is_the_models_error(http: httpx.AsyncClient) -> None:
    """A spec names a tensor in at most 256 characters. Before, a model's output of a
    100,000-character name went whole into the answer (and any error naming it)."""
    x = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}
    reply = await http.post("/v2/models/long-name/infer", json={"inputs": [x]})

    assert reply.status_code == 500, reply.text[:300]
    message = reply.json()["error"]
    assert "output name of 100000 characters" in message and "at most 256" in message
    assert len(message) < 1000


# ---------------------------------------------------------------- finish reasons


async def test_a_generation_vllm_aborted_is_no_stop(http: httpx.AsyncClient) -> None:
    """vLLM ended the request ``abort`` of its own (shoal did not ask it to). Before, the
    OpenAI API said ``stop``: a cut answer read as a whole one. Now it is 503 (the
    ``openai`` client retries it), or a stream's last error event after its pieces;
    Triton's generate extension says ``abort`` as it did."""
    body = {"model": "aborting", "prompt": "a b"}
    whole = await http.post("/v1/completions", json=body)
    assert whole.status_code == 503, whole.text
    assert whole.json()["error"]["message"] == (
        "the model stopped this generation before its end (finish reason 'abort'): retry"
    )

    lines = await raw_stream(http, "/v1/completions", {**body, "stream": True})
    events = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == " a b"
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    assert events[-1]["error"]["code"] == "unavailable"

    triton = await http.post("/v2/models/aborting/generate", json={"text_input": "a b"})
    assert triton.status_code == 200, triton.text
    assert (triton.json()["text_output"], triton.json()["finish_reason"]) == (" a b", "abort")

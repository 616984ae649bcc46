"""The vllm backend against shoal.testing.fake_vllm, and the generation helpers every text generator shares.

No torch, no vLLM: the fake engine has vLLM's async-engine interface and answers each
prompt with its own words, one token each.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.backends import load_backend
from shoal.backends.generate import GenerationParams, StopMatcher, TextGenerator
from shoal.backends.vllm import VllmBackend
from shoal.core.spec import DeploymentSpec, TensorSpec, parse_spec
from shoal.errors import DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument, Unavailable
from shoal.replica.compose import CallContext, GivenUp, current_call
from shoal.testing import fake_vllm

PROMPT = "one two three four five six"


def texts(*values: str) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = [v.encode() for v in values]
    return out


def vllm_spec(folder: Path, **options: Any) -> DeploymentSpec:
    options = {"vllm_module": "shoal.testing.fake_vllm", **options}
    return parse_spec({"name": "llm", "backend": "vllm", "model": str(folder), "options": options})


@pytest.fixture
def llm(tmp_path: Path) -> Iterator[VllmBackend]:
    backend = load_backend(vllm_spec(tmp_path, gpu_memory_utilization=0.5))
    assert isinstance(backend, VllmBackend)
    backend.load()
    yield backend
    backend.unload()


def engine(backend: VllmBackend) -> fake_vllm.AsyncLLMEngine:
    assert isinstance(backend.engine, fake_vllm.AsyncLLMEngine)
    return backend.engine


# -- GenerationParams ------------------------------------------------------------------------


def test_generation_params_validate() -> None:
    assert GenerationParams() == GenerationParams(
        max_tokens=16, temperature=1.0, top_p=1.0, stop=(), seed=None
    )
    params = GenerationParams(max_tokens=np.int32(4), temperature=np.float32(0), stop=["a", "b"], seed=3.0)  # type: ignore[arg-type]
    assert (params.max_tokens, params.temperature, params.stop, params.seed) == (4, 0.0, ("a", "b"), 3)
    assert type(params.max_tokens) is int and params.greedy
    assert GenerationParams(stop="end").stop == ("end",)  # type: ignore[arg-type]
    bad: dict[str, dict[str, Any]] = {
        "max_tokens must be at least 1": {"max_tokens": 0},
        "max_tokens must be an integer": {"max_tokens": 2.5},
        "temperature must be 0": {"temperature": -0.1},
        "temperature must be a number": {"temperature": "hot"},
        r"top_p must be in \(0, 1\]": {"top_p": 0},
        "stop must be a string or a list of strings": {"stop": [1]},
        "stop strings must not be empty": {"stop": [""]},
        "stop holds 17 strings, over the limit of 16": {"stop": ["x"] * 17},
        "a stop string of 513 characters, over the limit of 512": {"stop": ["x" * 513]},
        "seed must be an integer": {"seed": "x"},
    }
    for message, kwargs in bad.items():
        with pytest.raises(InvalidArgument, match=message):
            GenerationParams(**kwargs)
    with pytest.raises(InvalidArgument, match=r"top_p must be in \(0, 1\]"):
        GenerationParams(top_p=1.01)


def test_generation_params_from_options_and_with_() -> None:
    params = GenerationParams.from_options({"max_tokens": 5, "stop": "x", "other": 1})
    assert params == GenerationParams(max_tokens=5, stop=("x",))
    assert params.with_(temperature=0, top_p=None) == GenerationParams(
        max_tokens=5, stop=("x",), temperature=0
    )
    with pytest.raises(InvalidArgument, match="temperature"):
        params.with_(temperature=-1)


# -- StopMatcher -----------------------------------------------------------------------------


def feed_all(matcher: StopMatcher, pieces: list[str]) -> list[str]:
    out, text = [], ""
    for piece in pieces:
        text += piece
        out.append(matcher.feed(text))
        if matcher.stopped:
            break
    out.append(matcher.finish())
    return out


def test_stop_matcher_holds_back_what_may_begin_a_stop_string() -> None:
    matcher = StopMatcher(("STOP",))
    assert feed_all(matcher, ["hello ", "ST", "OP", " never"]) == ["hello ", "", "", ""]
    assert matcher.stopped and matcher.text == "hello "
    # A false start is released once it cannot be a stop string any more.
    matcher = StopMatcher(("STOP",))
    assert feed_all(matcher, ["a S", "T", "x"]) == ["a ", "", "STx", ""]
    matcher = StopMatcher(("STOP",))
    assert feed_all(matcher, ["a ST"]) == ["a ", "ST"]  # finish() hands out the tail
    assert matcher.text == "a ST"


def test_stop_matcher_takes_the_earliest_of_several_stop_strings() -> None:
    matcher = StopMatcher(("three", "two"))
    assert "".join(feed_all(matcher, ["one t", "wo three"])) == "one "
    assert StopMatcher(()).feed("anything") == "anything"


# -- the vllm backend on the fake engine ----------------------------------------------------


async def test_predict_answers_each_row(llm: VllmBackend) -> None:
    assert isinstance(llm, TextGenerator) and llm.generates_text
    assert llm.outputs() == (TensorSpec(name="text", datatype="BYTES", shape=(-1,)),)
    assert engine(llm).engine_args.extra == {"gpu_memory_utilization": 0.5}
    out = await llm.predict({"text": texts(PROMPT, "a b"), "max_tokens": np.array([3, 10], np.int32)})
    assert out["text"].tolist() == [b" one two three", b" a b"]
    first, second = engine(llm).requests
    assert (first.params.max_tokens, second.params.max_tokens) == (3, 10)
    assert first.params.temperature == 1.0 and first.params.n == 1
    assert engine(llm).running == set() and engine(llm).aborted == []


async def test_complete_reports_tokens_and_why_it_ended(llm: VllmBackend) -> None:
    done = await llm.complete(PROMPT, GenerationParams(max_tokens=20))
    assert (done.text, done.finish_reason, done.prompt_tokens, done.completion_tokens) == (
        " " + PROMPT,
        "stop",
        6,
        6,
    )
    cut = await llm.complete(PROMPT, GenerationParams(max_tokens=2))
    assert (cut.text, cut.finish_reason, cut.completion_tokens) == (" one two", "length", 2)


async def test_stop_strings_reach_the_engine_and_cut_the_text(llm: VllmBackend) -> None:
    params = GenerationParams(max_tokens=20, stop=("four", "never"), temperature=0, seed=5)
    done = await llm.complete(PROMPT, params)
    assert (done.text, done.finish_reason) == (" one two three ", "stop")
    sent = engine(llm).requests[-1].params
    assert (sent.stop, sent.temperature, sent.seed) == (["four", "never"], 0.0, 5)
    pieces = [p async for p in llm.stream(PROMPT, params)]
    assert "".join(pieces) == done.text


async def test_stream_yields_piece_by_piece(llm: VllmBackend) -> None:
    params = GenerationParams(max_tokens=4)
    pieces = [p async for p in llm.stream(PROMPT, params)]
    assert pieces == [" one", " two", " three", " four"]
    assert "".join(pieces) == (await llm.complete(PROMPT, params)).text
    assert engine(llm).aborted == []


async def test_closing_a_stream_early_aborts_the_request(llm: VllmBackend) -> None:
    async with contextlib.aclosing(llm.stream(PROMPT, GenerationParams(max_tokens=20))) as stream:
        async for piece in stream:
            assert piece == " one"
            break
    (request,) = engine(llm).requests
    assert engine(llm).aborted == [request.request_id]
    assert engine(llm).running == set()


async def test_cancelling_a_stream_consumer_aborts_the_request(llm: VllmBackend) -> None:
    engine(llm).token_delay_s = 0.05
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in llm.stream(PROMPT, GenerationParams(max_tokens=20)):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (request,) = engine(llm).requests
    assert engine(llm).aborted == [request.request_id]
    assert engine(llm).running == set()


async def test_a_completion_whose_requests_are_given_up_is_aborted(llm: VllmBackend) -> None:
    """A generation through ModelInfer (``complete``, awaited by the replica's batcher, which
    cancels nothing) ran on to max_tokens whatever became of its request. Once every request
    of its call is given up, it is aborted in the engine at the next piece."""
    engine(llm).token_delay_s = 0.02
    given_up = GivenUp()
    token = current_call.set(CallContext(("r1",), time.monotonic() + 60, (given_up,)))
    try:
        running = asyncio.ensure_future(llm.complete(PROMPT, GenerationParams(max_tokens=20)))
    finally:
        current_call.reset(token)
    await asyncio.sleep(0.05)
    given_up.set()
    with pytest.raises(DeadlineExceeded, match="request r1 was given up"):
        await running
    (request,) = engine(llm).requests
    assert engine(llm).aborted == [request.request_id]
    assert engine(llm).running == set()


async def test_generation_defaults_come_from_options(tmp_path: Path) -> None:
    backend = load_backend(vllm_spec(tmp_path, max_tokens=2, temperature=0.5, stop=["x"]))
    assert isinstance(backend, VllmBackend)
    backend.load()
    try:
        assert backend.default_params == GenerationParams(max_tokens=2, temperature=0.5, stop=("x",))
        out = await backend.predict({"text": texts(PROMPT)})
        assert out["text"].tolist() == [b" one two"]
        assert engine(backend).engine_args.extra == {}  # generation options are not engine arguments
        with pytest.raises(InvalidArgument, match="row 0: max_tokens must be at least 1"):
            await backend.predict({"text": texts(PROMPT), "max_tokens": np.array([0], np.int32)})
    finally:
        backend.unload()
    assert backend.engine is None
    with pytest.raises(FailedPrecondition, match="not loaded"):
        await backend.complete(PROMPT, GenerationParams())


def test_unload_shuts_the_engine_down(tmp_path: Path) -> None:
    backend = load_backend(vllm_spec(tmp_path))
    assert isinstance(backend, VllmBackend)
    backend.load()
    fake = engine(backend)
    backend.unload()
    assert fake.shut_down


def test_load_errors_are_invalid_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidArgument, match=r"vllm model folder '.*nowhere' does not exist"):
        load_backend(vllm_spec(tmp_path / "nowhere")).load()
    with pytest.raises(InvalidArgument, match="cannot import vllm_module 'no_such_vllm'"):
        load_backend(vllm_spec(tmp_path, vllm_module="no_such_vllm")).load()
    with pytest.raises(InvalidArgument, match="vllm_module 'json' has no AsyncEngineArgs"):
        load_backend(vllm_spec(tmp_path, vllm_module="json")).load()
    # Without the extra installed, the error says how to get it.
    monkeypatch.setitem(sys.modules, "vllm", None)
    spec = parse_spec({"name": "llm", "backend": "vllm", "model": str(tmp_path)})
    with pytest.raises(
        InvalidArgument, match=r"backend 'vllm' needs the vllm extra: pip install 'shoal\[vllm\]'"
    ):
        load_backend(spec).load()


@pytest.mark.parametrize(
    ("reason", "finish"),
    [("stop", "stop"), ("length", "length"), ("abort", "abort"), ("repetition", "stop")],
)
async def test_vllms_finish_reasons_are_told_as_they_are(tmp_path: Path, reason: str, finish: str) -> None:
    """vLLM's ``abort`` (of its own: the engine paused, say) stays ``abort``, which the
    OpenAI API tells as a failure; ``repetition`` is a ``stop``."""
    backend = load_backend(vllm_spec(tmp_path, finish_reason=reason))
    assert isinstance(backend, VllmBackend)
    backend.load()
    try:
        done = await backend.complete("one two", GenerationParams())
    finally:
        backend.unload()
    assert (done.text, done.finish_reason) == (" one two", finish)


@pytest.mark.parametrize(
    ("reason", "error", "message"),
    [
        # Before: each was "stop", a whole answer.
        ("error", Unavailable, "vLLM failed the request \\(finish reason 'error'"),
        ("tool_calls", Internal, "vLLM ended the request with finish reason 'tool_calls', unknown to shoal"),
    ],
)
async def test_a_request_vllm_failed_is_an_error_not_a_stop(
    tmp_path: Path, reason: str, error: type[Exception], message: str
) -> None:
    backend = load_backend(vllm_spec(tmp_path, finish_reason=reason))
    assert isinstance(backend, VllmBackend)
    backend.load()
    try:
        with pytest.raises(error, match=message):
            await backend.complete("one two", GenerationParams())
    finally:
        backend.unload()

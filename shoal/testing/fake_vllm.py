"""A stand-in for the parts of vLLM the ``vllm`` backend uses, for tests without a GPU.

The module has vLLM's names: :class:`AsyncEngineArgs`, :class:`AsyncLLMEngine` (with
``from_engine_args``, ``generate``, ``abort``, ``shutdown``), :class:`SamplingParams`,
:class:`RequestOutput` and :class:`CompletionOutput`. Point a deployment at it with
``options: {vllm_module: shoal.testing.fake_vllm}``; this works in a replica process too.

The engine is deterministic: its answer to a prompt is the prompt's words, one token each
(``" word"``), then the end of the sequence. It streams one token every
:data:`TOKEN_DELAY_S` (change it per engine through ``token_delay_s``, an engine argument
too), after ``first_token_delay_s`` more for the first (an engine argument: a slow prompt),
and ends the sequence with the engine argument ``finish_reason`` (default ``"stop"``; vLLM
also ends requests ``"abort"`` and ``"error"`` on its own). Its outputs' text is
cumulative as vLLM's is by default, it honours ``max_tokens`` and ``stop`` (the stop string
and what follows are cut off, ``finish_reason`` ``"stop"``), and ``abort(request_id)`` ends
a request. As vLLM does, it refuses a prompt of more tokens than the engine argument
``max_model_len`` (when given) with ValueError, once its stream is read. It records what it
was asked (:attr:`AsyncLLMEngine.requests`), what is running (:attr:`AsyncLLMEngine.running`)
and what was aborted (:attr:`AsyncLLMEngine.aborted`).

For one event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

TOKEN_DELAY_S = 0.001


class AsyncEngineArgs:
    """vLLM's engine arguments: ``model`` and any others, kept in :attr:`extra`."""

    def __init__(self, model: str, **extra: Any) -> None:
        self.model = model
        self.extra = extra


@dataclass
class SamplingParams:
    """The subset of vLLM's ``SamplingParams`` the backend sets."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    seed: int | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool


@dataclass(frozen=True)
class Request:
    """One call to :meth:`AsyncLLMEngine.generate`."""

    request_id: str
    prompt: str
    params: SamplingParams


def reply_tokens(prompt: str) -> list[str]:
    """What the fake engine answers ``prompt``, token by token (before max_tokens and stop)."""
    return [f" {word}" for word in prompt.split()]


class AsyncLLMEngine:
    """vLLM's async engine interface over :func:`reply_tokens`."""

    def __init__(self, engine_args: AsyncEngineArgs, *, token_delay_s: float | None = None) -> None:
        self.engine_args = engine_args
        extra = engine_args.extra
        self.token_delay_s = float(
            token_delay_s if token_delay_s is not None else extra.get("token_delay_s", TOKEN_DELAY_S)
        )
        self.first_token_delay_s = float(extra.get("first_token_delay_s", 0.0))
        self.finish_reason = str(extra.get("finish_reason", "stop"))
        self.requests: list[Request] = []
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.shut_down = False

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs, **_: Any) -> AsyncLLMEngine:
        return cls(engine_args)

    async def generate(
        self, prompt: str, sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Stream the reply to ``prompt``: one cumulative :class:`RequestOutput` per token."""
        if self.shut_down:
            raise RuntimeError("the engine is shut down")
        if request_id in self.running:
            raise ValueError(f"request {request_id} is already running")
        model_len = self.engine_args.extra.get("max_model_len")
        if model_len is not None and len(prompt.split()) > model_len:
            raise ValueError(  # vLLM's words (its VLLMValidationError is a ValueError)
                f"The decoder prompt (length {len(prompt.split())}) is longer than the maximum "
                f"model length of {model_len}. Make sure that `max_model_len` is no smaller than "
                "the number of text tokens."
            )
        self.requests.append(Request(request_id, prompt, sampling_params))
        self.running.add(request_id)
        prompt_ids = list(range(len(prompt.split())))
        stops = sampling_params.stop_strings()
        limit = sampling_params.max_tokens if sampling_params.max_tokens is not None else 1 << 30
        tokens = reply_tokens(prompt)
        text = ""
        ids: list[int] = []
        try:
            for i in range(len(tokens) + 1):
                await asyncio.sleep(self.token_delay_s + (self.first_token_delay_s if i == 0 else 0.0))
                if request_id in self.aborted:
                    return
                output = CompletionOutput(index=0, text=text, token_ids=list(ids))
                if i == len(tokens):  # end of sequence
                    output.finish_reason = self.finish_reason
                    yield RequestOutput(request_id, prompt, prompt_ids, [output], finished=True)
                    return
                text += tokens[i]
                ids.append(i)
                output.text, output.token_ids = text, list(ids)
                found = [(text.find(s), s) for s in stops if s in text]
                if found:
                    at, stop = min(found)
                    output.text = text[:at]
                    output.finish_reason, output.stop_reason = "stop", stop
                elif len(ids) >= limit:
                    output.finish_reason = "length"
                finished = output.finish_reason is not None
                yield RequestOutput(request_id, prompt, prompt_ids, [output], finished=finished)
                if finished:
                    return
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id: str) -> None:
        """End ``request_id``: its stream yields nothing more."""
        self.aborted.append(request_id)
        self.running.discard(request_id)

    def shutdown(self) -> None:
        self.shut_down = True

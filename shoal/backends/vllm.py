"""The ``vllm`` backend: text generation with vLLM's async engine, for GPU machines.

``spec.model_path()`` is a local model folder (nothing is downloaded at run time). vLLM
is an optional extra (``pip install 'shoal[vllm]'``), imported when the model loads.

Tensors and the streaming API are those of every text generator
(:mod:`shoal.backends.generate`): ``predict`` takes ``text`` and optional per-row
``max_tokens``, ``temperature``, ``top_p``, and answers ``text``; :meth:`VllmBackend.stream`
yields pieces as vLLM produces them; :meth:`VllmBackend.complete` answers one prompt with
token counts. The rows of a batch go to the engine together, which batches them
continuously with whatever else it is running.

Options:

- ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``: defaults for requests.
- ``vllm_module`` (default ``vllm``): the module providing ``AsyncEngineArgs``,
  ``AsyncLLMEngine`` and ``SamplingParams``. Tests use ``shoal.testing.fake_vllm``.
- every other option is an engine argument: ``AsyncEngineArgs(model=<folder>, **rest)``
  (e.g. ``gpu_memory_utilization``, ``max_model_len``, ``dtype``). ``tensor_parallel_size``
  defaults to ``resources.gpus`` when that is 2 or more.

Closing a stream early, or cancelling the task waiting on it, aborts the request in the
engine, so its GPU time goes to other requests.

A request vLLM refuses as it takes it (ValueError: a prompt longer than ``max_model_len``,
an empty one) is InvalidArgument (400), as vLLM's own API answers it; any other error of
the engine is Internal.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from shoal.backends.base import Backend, Tensors
from shoal.backends.generate import (
    GENERATION_INPUTS,
    GENERATION_OUTPUTS,
    PARAM_OPTIONS,
    TEXT_INPUT,
    Completion,
    FinishReason,
    GenerationParams,
    StopMatcher,
    bytes_tensor,
    check_generation_inputs,
    params_per_row,
    render_chat_template,
    text_rows,
)
from shoal.core import limits
from shoal.core.spec import DeploymentSpec
from shoal.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ShoalError,
    Unavailable,
)
from shoal.replica.compose import current_call
from shoal.types import ChatMessage

log = logging.getLogger(__name__)

DEFAULT_MODULE = "vllm"
MISSING_EXTRA = "backend 'vllm' needs the vllm extra: pip install 'shoal[vllm]'"


def _import_vllm(name: str) -> ModuleType:
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        if name == DEFAULT_MODULE:
            raise InvalidArgument(MISSING_EXTRA) from err
        raise InvalidArgument(f"cannot import vllm_module {name!r}: {err}") from err
    missing = [n for n in ("AsyncEngineArgs", "AsyncLLMEngine", "SamplingParams") if not hasattr(module, n)]
    if missing:
        raise InvalidArgument(f"vllm_module {name!r} has no {missing[0]}")
    return module


def _chat_tokenizer(folder: Path) -> Any:
    """The model folder's Hugging Face tokenizer when it has a chat template, else None."""
    config = folder / "tokenizer_config.json"
    try:
        has_template = (folder / "chat_template.jinja").is_file() or (
            config.is_file() and "chat_template" in json.loads(config.read_text())
        )
    except (OSError, ValueError):
        has_template = False
    if not has_template:
        return None
    try:
        import transformers  # vLLM depends on it

        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:
        log.warning(
            "%s: cannot load the tokenizer for its chat template (%s); chats become transcripts", folder, err
        )
        return None


def _finish_reason(reason: object) -> FinishReason:
    """shoal's name for the finish reason vLLM gave a request (its ``FINISH_REASON_STRINGS``:
    ``stop``, ``length``, ``abort``, ``error``, ``repetition``). Before, every reason but
    ``length`` and ``abort`` was ``stop``: a request vLLM failed was a whole answer.

    ``abort`` here is vLLM's own (the engine paused or shutting down): shoal's abort of a
    request (its client gone) ends the stream before any finish is read. ``repetition``,
    vLLM stopping a generation caught in a loop, is a ``stop``: the model's output ended on
    a condition, not a limit. ``error`` (vLLM: a retryable error of the request) is
    Unavailable, which a client retries; a reason shoal does not know is Internal."""
    if reason in ("stop", "length", "abort"):
        return reason
    if reason == "repetition":
        return "stop"
    if reason == "error":
        raise Unavailable("vLLM failed the request (finish reason 'error', which vLLM deems retryable)")
    raise Internal(
        f"vLLM ended the request with finish reason {limits.shown(repr(reason))}, unknown to shoal"
    )


class VllmBackend(Backend):
    """Serves a local model folder with vLLM's ``AsyncLLMEngine``. See the module docstring."""

    def __init__(self, spec: DeploymentSpec) -> None:
        super().__init__(spec)
        self._module: ModuleType | None = None
        self._engine: Any = None
        self._chat_tokenizer: Any = None
        self._default_params = GenerationParams()

    @property
    def engine(self) -> Any:
        """The engine (vLLM's ``AsyncLLMEngine`` or a stand-in); None before load and after unload."""
        return self._engine

    @property
    def generates_text(self) -> bool:
        return True

    @property
    def default_params(self) -> GenerationParams:
        return self._default_params

    def _load(self) -> None:
        options = dict(self.spec.options)
        self._default_params = GenerationParams.from_options(options)
        module_name = options.pop("vllm_module", DEFAULT_MODULE)
        if not isinstance(module_name, str):
            raise InvalidArgument(f"option vllm_module must be a module name, got {module_name!r}")
        engine_options = {k: v for k, v in options.items() if k not in PARAM_OPTIONS}
        if self.spec.resources.gpus >= 2:
            engine_options.setdefault("tensor_parallel_size", int(self.spec.resources.gpus))
        folder = self.spec.model_path()
        if not folder.is_dir():
            raise InvalidArgument(
                f"vllm model folder {str(folder)!r} does not exist (nothing is downloaded at run time)"
            )
        # vLLM reads model configs through huggingface_hub: keep it off the network.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        module = _import_vllm(module_name)
        try:
            args = module.AsyncEngineArgs(model=str(folder), **engine_options)
        except TypeError as err:
            raise InvalidArgument(f"vLLM refused the engine options {sorted(engine_options)}: {err}") from err
        try:
            engine = module.AsyncLLMEngine.from_engine_args(args)
        except Exception as err:
            why = limits.error_text(err)
            raise InvalidArgument(f"cannot start vLLM for {str(folder)!r}: {why}") from err
        self._module, self._engine = module, engine
        self._chat_tokenizer = _chat_tokenizer(folder)
        self._derived_inputs = GENERATION_INPUTS
        self._derived_outputs = GENERATION_OUTPUTS
        log.info("%s: vLLM engine (%s) for %s", self.spec.name, module_name, folder)

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        check_generation_inputs(inputs, self._default_params)

    async def _predict(self, inputs: Tensors) -> Tensors:
        prompts = text_rows(TEXT_INPUT, inputs[TEXT_INPUT])
        params = params_per_row(inputs, self._default_params)
        async with asyncio.TaskGroup() as tasks:
            running = [tasks.create_task(self.complete(p, q)) for p, q in zip(prompts, params, strict=True)]
        return {"text": bytes_tensor([task.result().text for task in running])}

    async def complete(self, prompt: str, params: GenerationParams) -> Completion:
        """One completion of ``prompt``. DeadlineExceeded, the request aborted in the engine,
        once every request its call serves was given up (its deadline passed, its client went
        away: ``CallContext.abandoned``), looked at on each piece. Before, a generation through
        ``ModelInfer`` ran on to its ``max_tokens`` for nobody: a batched call is awaited by
        the replica's batcher, which cancels nothing."""
        call = current_call.get()
        async with contextlib.aclosing(self.stream_completion(prompt, params)) as steps:
            async for step in steps:
                if isinstance(step, Completion):
                    return step
                if call is not None and call.abandoned:
                    raise DeadlineExceeded(
                        f"request {call.request_ids[0]} was given up (its deadline passed or its caller "
                        "went away): its generation is aborted"
                    )
        raise Internal("vLLM answered nothing")

    async def stream_completion(
        self, prompt: str, params: GenerationParams
    ) -> AsyncGenerator[str | Completion, None]:
        """As :meth:`stream`, then the :class:`Completion` (token counts, finish reason) last."""
        pieces: list[str] = []  # joined at the end: text + piece copied the whole text a piece
        last = None
        async with contextlib.aclosing(self._generate(prompt, params)) as steps:
            async for piece, output in steps:
                last = output
                if piece:
                    pieces.append(piece)
                    yield piece
        if last is None:
            raise Internal("vLLM answered nothing")
        completion = last.outputs[0]
        yield Completion(
            text="".join(pieces),
            finish_reason=_finish_reason(completion.finish_reason),
            prompt_tokens=len(last.prompt_token_ids or ()),
            completion_tokens=len(completion.token_ids),
        )

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt for a chat: the chat template of the model folder's tokenizer when it has
        one, else :func:`~shoal.backends.generate.transcript`."""
        return render_chat_template(self._chat_tokenizer, messages)

    async def stream(self, prompt: str, params: GenerationParams) -> AsyncGenerator[str, None]:
        """Generate a completion of ``prompt``, yielding text pieces as vLLM makes them.

        Closing the iterator early aborts the request in the engine.
        """
        async with contextlib.aclosing(self._generate(prompt, params)) as steps:
            async for piece, _ in steps:
                if piece:
                    yield piece

    async def _generate(self, prompt: str, params: GenerationParams) -> AsyncGenerator[tuple[str, Any], None]:
        """(new text, vLLM's RequestOutput) per output; aborts the request unless it finished."""
        engine, module = self._engine, self._module
        if engine is None or module is None or not self.loaded:
            raise FailedPrecondition(f"model {self.spec.name!r} is not loaded")
        sampling = module.SamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            seed=params.seed,
        )
        request_id = f"{self.spec.name}-{uuid.uuid4().hex}"
        # vLLM cuts stop strings itself; the matcher also holds back a piece that might
        # begin one, so a stream never shows text the final completion does not have.
        matcher = StopMatcher(params.stop)
        finished = answered = False
        outputs = engine.generate(prompt, sampling, request_id)
        try:
            async for output in outputs:
                answered = True
                piece = matcher.feed(output.outputs[0].text)
                finished = bool(output.finished)
                if finished:
                    piece += matcher.finish()
                yield piece, output
                if finished or matcher.stopped:
                    break
        except ShoalError:
            raise
        except Exception as err:
            if isinstance(err, ValueError) and not answered:
                # vLLM checks a request as it takes it and refuses one with ValueError (its
                # VLLMValidationError is one), its own API answering 400: a prompt longer than
                # max_model_len, or empty. The client's to fix, as the transformers backend says.
                raise InvalidArgument(f"vLLM refused the request: {err}") from err
            raise Internal(f"vLLM raised {limits.error_text(err)}") from err
        finally:
            await outputs.aclose()
            if not finished:
                await engine.abort(request_id)

    def _unload(self) -> None:
        engine, self._engine = self._engine, None
        shutdown = getattr(engine, "shutdown", None) or getattr(engine, "shutdown_background_loop", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception:
                log.exception("%s: shutting the vLLM engine down raised", self.spec.name)

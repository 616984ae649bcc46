"""What text-generating backends share: parameters, stop strings, text tensors, the streaming API.

Two backends generate text: ``transformers`` with ``options.task: generation`` and
``vllm``. Both offer the same three ways in:

- :meth:`~shoal.backends.Backend.predict` (batched tensors): input ``text`` BYTES ``[-1]``
  and, optionally (declared ``optional``: a request may leave any of them out), per-row
  ``max_tokens`` INT32 ``[-1]``, ``temperature`` FP32 ``[-1]`` and ``top_p`` FP32 ``[-1]``;
  output ``text`` BYTES ``[-1]``, the completion of each prompt (without the prompt). The
  backend itself also takes ``[-1, 1]`` for each, but a request through a scheduler (OIP
  ``ModelInfer``, ``/v2/models/NAME/infer``) is checked first against the declared ``[-1]``:
  a declared tensor has one shape, the one model metadata reports, and allowing a second
  would need Triton's ``reshape`` in every tensor declaration for a form no client needs;
- :meth:`TextGenerator.complete`: one prompt, the completion with token counts and why
  it ended, for APIs that report usage (OpenAI);
- :meth:`TextGenerator.stream`: one prompt, an async generator of text pieces as tokens are
  produced. The pieces joined are exactly what ``complete`` would have answered for the
  same parameters and seed. Closing the iterator early (``aclose()``, ``break`` in
  ``async for``, or cancelling the consuming task) stops the generation.
  :meth:`TextGenerator.stream_completion` is the same, then the :class:`Completion` last.

A chat (OpenAI's ``messages``) becomes a prompt through :meth:`TextGenerator.render_chat`:
the tokenizer's chat template when the model has one, else :func:`transcript`.

Parameters the request does not give come from the deployment's ``options`` (keys
``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``), then from
:class:`GenerationParams`' defaults.

Stop strings follow OpenAI and vLLM: the completion ends before the first stop string,
which is not part of it. While streaming, text that might be the start of a stop string is
held back until it is known not to be one.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from shoal.core.limits import stop_problem
from shoal.core.spec import TensorSpec
from shoal.errors import InvalidArgument
from shoal.types import ChatMessage

FinishReason = Literal["stop", "length", "abort"]

PARAM_OPTIONS = frozenset({"max_tokens", "temperature", "top_p", "stop", "seed"})
"""The deployment options that set default generation parameters."""

TEXT_INPUT = "text"
# Optional per-row inputs -> (OIP datatype, numpy kind accepted).
PARAM_INPUTS: dict[str, str] = {"max_tokens": "INT32", "temperature": "FP32", "top_p": "FP32"}

GENERATION_INPUTS = (
    TensorSpec(name=TEXT_INPUT, datatype="BYTES", shape=(-1,)),
    *(
        TensorSpec(name=name, datatype=datatype, shape=(-1,), optional=True)
        for name, datatype in PARAM_INPUTS.items()
    ),
)
GENERATION_OUTPUTS = (TensorSpec(name="text", datatype="BYTES", shape=(-1,)),)


#: Temperatures below it decode greedily (vLLM's ``_SAMPLING_EPS``). The softmax of the
#: logits divided by a tinier one is infinite: a temperature of 1e-45 (valid JSON, in
#: OpenAI's [0, 2]) made transformers' sampling raise, a 500, before.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class GenerationParams:
    """How to generate one completion. Construction validates: bad values raise InvalidArgument."""

    max_tokens: int = 16
    """The most tokens to generate (the prompt not counted). At least 1."""
    temperature: float = 1.0
    """0 is greedy decoding (deterministic); above 0 samples from the softmax at that
    temperature. Below :data:`GREEDY_BELOW` is greedy too, as in vLLM."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens whose probabilities add up to top_p.
    In (0, 1]; 1 considers every token. Ignored when greedy."""
    stop: tuple[str, ...] = ()
    """Strings that end the completion; the first one found is cut off with what follows."""
    seed: int | None = None
    """Seeds sampling so that the same request gives the same completion; None: not reproducible."""

    def __post_init__(self) -> None:
        # Values arrive from JSON and numpy: accept integral floats and numpy scalars, store plain types.
        if isinstance(self.max_tokens, bool) or not _is_integral(self.max_tokens):
            raise InvalidArgument(f"max_tokens must be an integer, got {self.max_tokens!r}")
        object.__setattr__(self, "max_tokens", int(self.max_tokens))
        if self.max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be at least 1, got {self.max_tokens}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise InvalidArgument(f"{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) for s in stop):
            raise InvalidArgument(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in stop):
            raise InvalidArgument("stop strings must not be empty")
        problem = stop_problem(stop)
        if problem is not None:
            raise InvalidArgument(problem)
        object.__setattr__(self, "stop", tuple(stop))
        if self.seed is not None:
            if isinstance(self.seed, bool) or not _is_integral(self.seed):
                raise InvalidArgument(f"seed must be an integer, got {self.seed!r}")
            object.__setattr__(self, "seed", int(self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def with_(self, **changes: Any) -> GenerationParams:
        """A copy with ``changes`` (validated); keys whose value is None are left as they are."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> GenerationParams:
        """The defaults a deployment's ``options`` set (keys in :data:`PARAM_OPTIONS`; others ignored)."""
        return cls().with_(**{k: options[k] for k in PARAM_OPTIONS if k in options})


def _is_integral(value: object) -> bool:
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, (float, np.floating)) and float(value).is_integer()


@dataclass(frozen=True)
class Completion:
    """One finished generation."""

    text: str
    """The completion, without the prompt and without the stop string that ended it."""
    finish_reason: FinishReason
    """``stop``: a stop string or the model's end-of-sequence token; ``length``: max_tokens
    reached; ``abort``: the generation was stopped from outside."""
    prompt_tokens: int
    completion_tokens: int


@runtime_checkable
class TextGenerator(Protocol):
    """A backend that generates text: the streaming seam for gRPC, SSE and OpenAI endpoints.

    Call only after the backend is loaded; before load or after unload the methods raise
    FailedPrecondition. Safe to call concurrently from one event loop.
    """

    @property
    def generates_text(self) -> bool:
        """Whether this backend, as configured, generates text (a transformers embedding model does not)."""
        ...

    @property
    def default_params(self) -> GenerationParams:
        """The parameters a request starts from: :class:`GenerationParams` with the deployment's options."""
        ...

    async def complete(self, prompt: str, params: GenerationParams) -> Completion:
        """Generate one completion of ``prompt``."""
        ...

    def stream(self, prompt: str, params: GenerationParams) -> AsyncGenerator[str, None]:
        """Generate a completion of ``prompt``, yielding its text piece by piece (no empty pieces).

        An async generator: ``aclose()`` it (or use ``contextlib.aclosing``) when the client
        goes away, so the generation stops at once rather than when it is garbage collected.
        """
        ...

    def stream_completion(
        self, prompt: str, params: GenerationParams
    ) -> AsyncGenerator[str | Completion, None]:
        """As :meth:`stream`, then one last item: the :class:`Completion` (its text is the
        pieces joined), for streaming APIs that report token counts and why it ended."""
        ...

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt for a chat: the model's chat template (with the assistant's turn opened)
        when it has one, else :func:`transcript`. Raises InvalidArgument when the template
        refuses the messages."""
        ...


def transcript(messages: Sequence[ChatMessage]) -> str:
    """A chat as plain text, for models without a chat template: a ``role: content`` line per
    message, then ``assistant:`` for the model to go on from."""
    return "\n".join([*(f"{m.role}: {m.content}" for m in messages), "assistant:"])


def render_chat_template(tokenizer: Any, messages: Sequence[ChatMessage]) -> str:
    """``messages`` through ``tokenizer``'s chat template (a Hugging Face tokenizer), the
    assistant's turn opened; :func:`transcript` when the tokenizer has no template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return transcript(messages)
    chat = [{"role": m.role, "content": m.content} for m in messages]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # the template's own checks (say, roles out of order) raise jinja2 errors
        raise InvalidArgument(f"the model's chat template refused the messages: {err}") from err
    return str(text)


class StopMatcher:
    """Turns the growing text of a generation into pieces that are safe to hand out.

    Feed it the whole text so far (:meth:`feed`); it returns what may be emitted now: text
    that cannot be, or begin, a stop string. Once a stop string appears, :attr:`stopped` is
    true and nothing after it is ever returned. :meth:`finish` returns what was held back.
    Not thread-safe: one matcher per generation.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = stop
        self._longest = max((len(s) for s in stop), default=0)
        self._emitted = 0
        self._text = ""
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._text[: self._emitted]

    def feed(self, text: str) -> str:
        """The new piece of ``text`` (the whole text so far) that may be emitted; may be empty."""
        if self.stopped:
            return ""
        self._text = text
        if not self._stop:
            return self._emit(len(text))
        # A stop string can only start where it could not have been seen before.
        search_from = max(0, self._emitted - self._longest + 1)
        found = [i for i in (text.find(s, search_from) for s in self._stop) if i >= 0]
        if found:
            self.stopped = True
            return self._emit(min(found))
        return self._emit(len(text) - self._held_back(text))

    def finish(self) -> str:
        """The text held back because it might have started a stop string: it did not."""
        if self.stopped:
            return ""
        return self._emit(len(self._text))

    def _held_back(self, text: str) -> int:
        # The longest tail of the text that is the beginning of some stop string.
        for n in range(min(self._longest - 1, len(text) - self._emitted), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _emit(self, end: int) -> str:
        end = max(end, self._emitted)
        piece = self._text[self._emitted : end]
        self._emitted = end
        return piece


# -- tensors ---------------------------------------------------------------------------------


def text_rows(name: str, array: np.ndarray) -> list[str]:
    """The strings of a BYTES tensor shaped ``[n]`` or ``[n, 1]``, UTF-8 decoded.

    Raises InvalidArgument for another shape or an element that is not valid UTF-8.
    """
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        shape = "[" + ", ".join(str(d) for d in array.shape) + "]"
        raise InvalidArgument(
            f"input {name!r}: expected shape [-1] or [-1, 1] (one string a row), got {shape}"
        )
    rows: list[str] = []
    for i, value in enumerate(array.tolist()):
        if isinstance(value, str):
            rows.append(value)
        elif isinstance(value, bytes):
            try:
                rows.append(value.decode())
            except UnicodeDecodeError:
                raise InvalidArgument(f"input {name!r}: element {i} is not valid UTF-8") from None
        else:
            raise InvalidArgument(f"input {name!r}: element {i} is {type(value).__name__}, not a string")
    return rows


def check_text_input(name: str, inputs: Mapping[str, np.ndarray]) -> None:
    """Check that ``inputs[name]`` is a BYTES tensor of one string a row. Raises InvalidArgument."""
    array = inputs.get(name)
    if array is None:
        raise InvalidArgument(f"missing input {name!r}")
    if array.dtype.kind not in "OSU":
        raise InvalidArgument(f"input {name!r}: expected BYTES, got {array.dtype}")
    text_rows(name, array)


def bytes_tensor(texts: list[str]) -> np.ndarray:
    """``texts`` as a BYTES tensor ``[n]`` (an object array of UTF-8 ``bytes``)."""
    out = np.empty(len(texts), dtype=object)
    out[:] = [t.encode() for t in texts]
    return out


def check_generation_inputs(inputs: Mapping[str, np.ndarray], defaults: GenerationParams) -> None:
    """Check a generation request: ``text`` plus optional per-row parameters, each ``[n]``.

    Raises InvalidArgument naming the input: a missing ``text``, an unknown input, a wrong
    datatype or shape, or a parameter value :class:`GenerationParams` refuses.
    """
    check_text_input(TEXT_INPUT, inputs)
    unknown = sorted(set(inputs) - {TEXT_INPUT, *PARAM_INPUTS})
    if unknown:
        expected = ", ".join(repr(n) for n in (TEXT_INPUT, *PARAM_INPUTS))
        raise InvalidArgument(f"unknown input {unknown[0]!r}; the model takes {expected}")
    rows = inputs[TEXT_INPUT].shape[0]
    for name, datatype in PARAM_INPUTS.items():
        array = inputs.get(name)
        if array is None:
            continue
        kind_ok = array.dtype.kind in "iu" if datatype == "INT32" else array.dtype.kind == "f"
        if not kind_ok:
            raise InvalidArgument(f"input {name!r}: expected {datatype}, got {array.dtype}")
        if array.shape not in ((rows,), (rows, 1)):
            raise InvalidArgument(f"input {name!r}: expected one value per row of 'text' ([{rows}])")
    params_per_row(inputs, defaults)


def params_per_row(inputs: Mapping[str, np.ndarray], defaults: GenerationParams) -> list[GenerationParams]:
    """The parameters of each row of a checked request: ``defaults`` with the row's own values."""
    rows = inputs[TEXT_INPUT].shape[0]
    columns = {name: inputs[name].reshape(-1).tolist() for name in PARAM_INPUTS if name in inputs}
    out: list[GenerationParams] = []
    for i in range(rows):
        changes = {name: values[i] for name, values in columns.items()}
        try:
            out.append(defaults.with_(**changes))
        except InvalidArgument as err:
            raise InvalidArgument(f"row {i}: {err.message}") from None
    return out

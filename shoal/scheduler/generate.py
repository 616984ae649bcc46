"""Text generation at the scheduler, shared by every protocol that offers it.

Triton's generate extension (``shoal.http.generate``), decoupled
``ModelStreamInfer`` (``shoal.rpc.generate_stream``) and the OpenAI API
(``shoal.http.openai``) all turn their request into a
:class:`~shoal.types.GenerateRequest`, run it with :meth:`Router.stream
<shoal.scheduler.router.Router.stream>`, and encode the :class:`~shoal.types.GenerateChunk`
objects that come back. What they share lives here, free of any wire format:

- :func:`generates_text` and :func:`embeds_text`: what a deployment's spec says it does;
- :func:`generate_request`: parameters from a JSON-like mapping, each checked on its own so
  that an error names the parameter (:class:`InvalidParameter`);
- :func:`start_stream`: waits for the first chunk, so that a request that fails before any
  output (unknown model, full queue, no replica in time) is answered with a status code
  instead of a broken stream; :func:`complete`: the whole answer at once. Both count the
  generation in Triton's statistics (``ModelCatalog.record``) as the router counts it in
  ``shoal_requests_total``: a success when it ended whole, or when its client went away
  after part of it; a failure otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Self

from shoal.core.ids import request_key
from shoal.core.limits import is_unicode, stop_problem
from shoal.core.spec import DeploymentSpec
from shoal.errors import Internal, InvalidArgument, ShoalError
from shoal.types import ChatMessage, GenerateChunk, GenerateRequest

if TYPE_CHECKING:
    from shoal.scheduler.models import ModelCatalog

#: The generation parameters every protocol takes (OpenAI's names).
PARAMETERS = ("max_tokens", "temperature", "top_p", "stop", "seed")


def generates_text(spec: DeploymentSpec) -> bool:
    """Whether the deployment generates text: ``vllm``, or ``transformers`` with task ``generation``."""
    if spec.backend == "vllm":
        return True
    return spec.backend == "transformers" and bool(spec.options.get("task") == "generation")


def embeds_text(spec: DeploymentSpec) -> bool:
    """Whether the deployment may answer embeddings: a ``transformers`` one with task
    ``embedding``, or one of a backend shoal cannot see into (``python``: the model decides,
    and a model that answers no ``embedding`` output is refused then: 400, as here)."""
    if spec.backend == "transformers":
        return bool(spec.options.get("task") == "embedding")
    return bool(spec.backend == "python")


def internal_id(client_id: str) -> str:
    """The id a generation goes by inside shoal (logs): the client's id, made unique, since
    clients reuse ids or send none ("": the router makes one)."""
    return f"{client_id}~{request_key()}" if client_id else ""


class InvalidParameter(InvalidArgument):
    """A request parameter is out of range or of the wrong type; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _integer(name: str, value: object, minimum: int, maximum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not (
        isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    ):
        raise InvalidParameter(name, f"{name} must be an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise InvalidParameter(name, f"{name} must be in [{minimum}, {maximum}], got {int(value)}")
    return int(value)


def _number(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(name, f"{name} must be a number, got {value!r}")
    span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    try:
        number = float(value)
    except OverflowError:  # an int past float's range: JSON's 1 followed by 400 zeros is one
        raise InvalidParameter(
            name, f"{name} must be in {span}, got an integer too large for a float"
        ) from None
    if not math.isfinite(number):
        raise InvalidParameter(name, f"{name} must be a number, got {value!r}")
    if number < low or number > high or (low_open and number == low):
        raise InvalidParameter(name, f"{name} must be in {span}, got {number:g}")
    return number


def _unicode(name: str, text: str) -> None:
    if not is_unicode(text):
        raise InvalidParameter(name, f"{name} is not valid Unicode text (a lone surrogate)")


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise InvalidParameter("stop", f"stop must be a string or a list of strings, got {value!r}")
    if any(s == "" for s in value):
        raise InvalidParameter("stop", "stop strings must not be empty")
    problem = stop_problem(value)
    if problem is not None:
        raise InvalidParameter("stop", problem)
    return tuple(value)


def generate_request(
    params: Mapping[str, Any],
    *,
    prompt: str = "",
    messages: Sequence[ChatMessage] = (),
    stream: bool,
) -> GenerateRequest:
    """A generation of ``prompt`` (or of the chat ``messages``) with ``params``.

    ``params`` may hold :data:`PARAMETERS` (other keys are ignored); a missing or None
    parameter is left to the deployment's defaults. Raises :class:`InvalidParameter` naming
    the first bad one: ``max_tokens`` below 1, ``temperature`` outside [0, 2] (OpenAI's
    range), ``top_p`` outside (0, 1], a ``stop`` that is not a string or a list of non-empty
    strings, a ``seed`` that is not an integer.
    """
    # Text goes to the replica as protobuf strings, which must be valid UTF-8: a lone
    # surrogate (JSON's "\ud800") is the client's error, not a 500.
    _unicode("prompt", prompt)
    for i, m in enumerate(messages):
        _unicode(f"messages.{i}.role", m.role)
        _unicode(f"messages.{i}.content", m.content)
    stop = _stop(params.get("stop"))
    for text in stop:
        _unicode("stop", text)
    return GenerateRequest(
        prompt=prompt,
        messages=tuple(messages),
        max_tokens=_integer("max_tokens", params.get("max_tokens"), 1, 2**31 - 1) or 0,
        temperature=_number("temperature", params.get("temperature"), 0.0, 2.0),
        top_p=_number("top_p", params.get("top_p"), 0.0, 1.0, low_open=True),
        stop=stop,
        seed=_integer("seed", params.get("seed"), -(2**63), 2**63 - 1),
        stream=stream,
    )


class ChunkStream:
    """The chunks of one generation whose first chunk has arrived (see :func:`start_stream`).

    An async iterator; :meth:`aclose` ends the generation, also when iteration never began,
    and releases the replica's slot.
    """

    def __init__(self, first: GenerateChunk, rest: AsyncGenerator[GenerateChunk, None]) -> None:
        self._first: GenerateChunk | None = first
        self._rest = rest

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> GenerateChunk:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._rest.__anext__()

    async def aclose(self) -> None:
        self._first = None
        await self._rest.aclose()


async def _counted(
    catalog: ModelCatalog, deployment: str, chunks: AsyncGenerator[GenerateChunk, None]
) -> AsyncGenerator[GenerateChunk, None]:
    """``chunks``, counted in Triton's statistics once they end (see the module docstring)."""
    started = time.perf_counter_ns()
    ok = streamed = False
    try:
        async for chunk in chunks:
            streamed = True
            yield chunk
        ok = True
    except (GeneratorExit, asyncio.CancelledError):
        ok = streamed  # the client went away: after part of the answer, its choice
        raise
    finally:
        await chunks.aclose()
        try:
            spec = catalog.spec(deployment)
        except ShoalError:  # deleted meanwhile: nothing to count it in
            pass
        else:
            catalog.record(spec, ok=ok, elapsed_ns=time.perf_counter_ns() - started, rows=1)


def _generation(
    catalog: ModelCatalog,
    deployment: str,
    request: GenerateRequest,
    request_id: str,
    timeout_s: float,
    version: int,
) -> AsyncGenerator[GenerateChunk, None]:
    chunks = catalog.router.stream(
        deployment, request, request_id=request_id, timeout_s=timeout_s, version=version
    )
    return _counted(catalog, deployment, chunks)


async def start_stream(
    catalog: ModelCatalog,
    deployment: str,
    request: GenerateRequest,
    *,
    request_id: str = "",
    timeout_s: float = 0.0,
    version: int = 0,
) -> ChunkStream:
    """Start ``request`` on ``deployment`` (through ``catalog``'s router) and wait for its
    first chunk.

    Raises what :meth:`Router.stream` raises before any output; errors after it come out of
    the returned stream. Close it (``aclose``) when done or when the client goes away.
    """
    chunks = _generation(catalog, deployment, request, request_id, timeout_s, version)
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        raise Internal(f"model {deployment!r} ended a generation without a word") from None
    except BaseException:
        await chunks.aclose()
        raise
    return ChunkStream(first, chunks)


async def complete(
    catalog: ModelCatalog,
    deployment: str,
    request: GenerateRequest,
    *,
    request_id: str = "",
    timeout_s: float = 0.0,
    version: int = 0,
) -> GenerateChunk:
    """The whole generation as one chunk: all its text, finish reason and token counts."""
    text: list[str] = []
    last: GenerateChunk | None = None
    chunks = _generation(catalog, deployment, request, request_id, timeout_s, version)
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            text.append(chunk.text)
            last = chunk
    if last is None or not last.last:
        raise Internal(f"model {deployment!r} ended a generation without its last chunk")
    return GenerateChunk(
        text="".join(text),
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
    )

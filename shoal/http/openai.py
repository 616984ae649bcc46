"""An OpenAI-compatible HTTP API on every scheduler's HTTP port, under ``/v1``::

    GET  /v1/models                 GET  /v1/models/MODEL
    POST /v1/embeddings             POST /v1/completions            POST /v1/chat/completions

``model`` names a deployment. The official clients work unchanged:
``OpenAI(base_url=f"http://{scheduler_http}/v1", api_key="unused")``.

- **Embeddings** go to a deployment that answers an ``embedding`` output for a BYTES
  ``text`` input (``transformers`` with task ``embedding``, or a ``python`` model that does
  the same). ``input`` is a string or a list of strings (token arrays are refused); a long
  list is cut into requests of the deployment's ``max_batch_size`` that run concurrently.
  ``encoding_format`` ``float`` or ``base64`` (little-endian float32, what the Python
  client asks for by default); ``dimensions`` only as the model's own size, checked before
  the model runs when the deployment declares the width of its ``embedding`` output (its
  spec, or its backend: ``transformers`` does), else on its answer. ``usage``
  reports the tokens the model read (``prompt_tokens`` = ``total_tokens``: after truncation
  to its ``max_length``, special tokens included), the sum of the model's ``tokens``
  output, which the ``transformers`` backend answers; 0 for a model that answers none.
  An ``embedding`` output that is not finite numbers, one row per text, of one width is
  the model's fault: 500 (:meth:`DataPlane.embed <shoal.scheduler.dataplane.DataPlane.embed>`).
- **Completions** and **chat completions** go to a deployment that generates text
  (``transformers`` task ``generation``, ``vllm``) through :meth:`Router.stream
  <shoal.scheduler.router.Router.stream>`. A chat is rendered into a prompt by the replica
  (the model's chat template, else a ``role: content`` transcript). ``max_tokens`` (or
  ``max_completion_tokens``), ``temperature`` (0 is greedy), ``top_p``, ``stop`` and
  ``seed`` are honoured; left out, they are the deployment's defaults. ``n`` and
  ``best_of`` must be 1. Parameters shoal cannot honour are refused with 400 rather than
  ignored: ``echo``, ``suffix``, ``logprobs`` (and ``top_logprobs``), tools (and the
  deprecated ``functions`` / ``function_call``), a ``response_format`` other than text,
  audio (``modalities`` other than ``["text"]``, ``audio``), non-zero penalties,
  ``logit_bias``. Other fields are accepted and ignored, as clients send many (``user``,
  ``metadata``, ...). Every chat message needs its ``content``, a string or text parts.
  A list of the body (``messages`` with their text parts, ``prompt``, ``stop``,
  embeddings' ``input``) holds at most ``max_strings_per_request`` strings (2048, OpenAI's
  limit on messages), checked before the body is validated.
  ``finish_reason`` is ``stop`` or ``length``; a generation the model stopped before its
  end of its own (vLLM's ``abort``: the engine paused or shutting down) is a 503, or a
  stream's last error event, which the clients retry (before, it read as ``stop``).
- **Streaming** (``stream: true``) answers server-sent events, ``data: {chunk}`` each, in
  OpenAI's chunk shapes (``text_completion`` / ``chat.completion.chunk``; for a chat a
  first chunk with ``delta.role``, then ``delta.content`` pieces, and a last chunk with
  ``finish_reason``), then ``data: [DONE]``. ``stream_options.include_usage`` adds a chunk
  with ``usage`` and no choices before ``[DONE]``. A stream quiet for setting
  ``sse_keepalive_s`` sends a comment line, ``: keep-alive``, which clients skip
  (:mod:`shoal.http.sse`). A failure before the first piece is an ordinary error response
  while the stream has sent nothing (``sse_keepalive_s``); one after it, or after a
  keep-alive, is a last ``data: {"error": ...}`` event.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the
HTTP status from :data:`shoal.errors.HTTP_STATUS`: an unknown model is 404 with code
``model_not_found`` (its name cut as :func:`shoal.core.limits.shown` cuts it); a bad body
is 400 ``invalid_request_error`` naming the ``param``, a ``model`` that is not valid
Unicode among them, and a prompt the model refuses (longer than it takes) ``messages`` or
``prompt``; a bug is 500 ``server_error`` (the traceback logged). So are an unknown
path under ``/v1/`` (404) and a method its path does not take (405, with ``Allow``).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from shoal.core import limits
from shoal.core.spec import DeploymentSpec
from shoal.errors import Code, Internal, InvalidArgument, NotFound, ShoalError, Unavailable
from shoal.http.jsonbody import TooManyValues, read_json
from shoal.http.server import unless_gone
from shoal.http.sse import event, open_stream
from shoal.scheduler.dataplane import DataPlane
from shoal.scheduler.generate import (
    ChunkStream,
    InvalidParameter,
    complete,
    embeds_text,
    generate_request,
    generates_text,
    start_stream,
)
from shoal.scheduler.router import Router
from shoal.types import ChatMessage, GenerateChunk, GenerateRequest

log = logging.getLogger("shoal.http")

B = TypeVar("B", bound=BaseModel)
Endpoint = Callable[[Request], Awaitable[Response]]

_DONE = b"data: [DONE]\n\n"
#: The body's lists (and objects) :meth:`OpenAIApi._check_lists` bounds before validation.
_LISTS = ("input", "prompt", "stop", "messages", "logit_bias", "tools", "functions")
_FINISH_REASONS = {"stop": "stop", "length": "length"}  # "abort" has no OpenAI name: see _finish


# ---------------------------------------------------------------- request bodies


class _Body(BaseModel):
    # OpenAI's clients send many fields shoal has no use for; they are accepted and ignored.
    # Strict, as OpenAI's API is: "stream": "yes" or "max_tokens": "5" are refused (400,
    # naming the field), not read as true and 5 (an int is still taken for a float).
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Body):
    include_usage: bool | None = None


class EmbeddingsBody(_Body):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: str | None = None  # as in _GenerationBody: accepted (a string), not used


class _GenerationBody(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end user's id: accepted (a string, as OpenAI's API), not used
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionBody(_GenerationBody):
    prompt: str | list[str]
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class MessageBody(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class ChatCompletionBody(_GenerationBody):
    messages: list[MessageBody]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None  # tools' deprecated forerunners, refused as tools are
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None


class OpenAIError(InvalidArgument):
    """A request shoal refuses, naming the offending ``param`` (OpenAI's error field)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


def parse_body(model: type[B], doc: dict[str, Any]) -> B:
    """``doc`` validated as ``model``; OpenAIError naming the first bad field otherwise."""
    try:
        return model.model_validate(doc)
    except ValidationError as err:
        first = err.errors()[0]
        # Unions name the member that failed ("input.list[str].0"): keep the field's path only.
        loc = [str(p) for p in first["loc"] if isinstance(p, int) or not _is_type_tag(p)]
        param = ".".join(loc) or None
        problem = "is required" if first["type"] == "missing" else f"is invalid: {first['msg']}"
        raise OpenAIError(param, f"'{param}' {problem}") from None


def _is_type_tag(part: str) -> bool:
    return part in ("str", "int", "float", "bool") or part.startswith(("list[", "dict[", "literal["))


# ---------------------------------------------------------------- errors


def error_body(err: ShoalError) -> dict[str, Any]:
    """OpenAI's error object for ``err``."""
    status = err.http_status
    param = getattr(err, "param", None)
    code: str | None = None
    if err.code is Code.NOT_FOUND:
        code = "model_not_found"
    elif status >= 500:
        code = err.code.value.lower()
    if status == 401:
        kind = "authentication_error"
    elif status == 403:
        kind = "permission_error"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    return {"error": {"message": err.message, "type": kind, "param": param, "code": code}}


def error_response(err: ShoalError) -> Response:
    return JSONResponse(error_body(err), status_code=err.http_status, headers=err.http_headers)


def _openai(endpoint: Endpoint) -> Endpoint:
    """Turn what an endpoint raises into OpenAI's error responses: a ShoalError its status,
    anything else (a bug) 500 ``server_error``, its traceback logged."""

    async def handle(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ShoalError as err:
            return error_response(err)
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(Internal(f"internal error: {type(exc).__name__}: {exc}"))

    return handle


class _Unmatched:
    """The ``/v1/`` requests none of ``routes`` takes: 404, or 405 with ``Allow`` for a
    known path, in OpenAI's error shape (OpenAI's clients read ``error`` as an object; the
    app's own 404 and 405 are ``{"error": "Not Found: ..."}``). An ASGI app, not a
    function, so that its route takes every method."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        what = limits.shown(f"{scope['method']} {scope['path']}")
        allowed = sorted(
            {m for r in self.routes if r.matches(scope)[0] is Match.PARTIAL for m in r.methods or ()}
        )
        if allowed:
            message = f"Method not allowed ({what}): use {', '.join(allowed)}"
            response = _request_error(405, message, {"Allow": ", ".join(allowed)})
        else:
            response = _request_error(404, f"Invalid URL ({what}): no such OpenAI route")
        await response(scope, receive, send)


def _request_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def _refuse(param: str, why: str) -> OpenAIError:
    return OpenAIError(param, f"'{param}' is not supported: {why}")


def _check_common(body: _GenerationBody) -> None:
    if body.stream_options is not None and not body.stream:
        # OpenAI's API refuses it so; before, it was accepted and ignored.
        raise OpenAIError("stream_options", "'stream_options' is only allowed when 'stream' is true")
    if body.n not in (None, 1):
        raise _refuse("n", "shoal answers one choice per request (n=1)")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            raise _refuse(name, "the backends have no repetition penalties")
    if body.logit_bias:
        raise _refuse("logit_bias", "the backends cannot bias tokens")


# ---------------------------------------------------------------- mapping requests


def completion_request(body: CompletionBody) -> GenerateRequest:
    """The generation a completions body asks for. Raises OpenAIError."""
    _check_common(body)
    if body.best_of not in (None, 1):
        raise _refuse("best_of", "shoal answers one choice per request")
    if body.echo:
        raise _refuse("echo", "the prompt is not echoed")
    if body.suffix:
        raise _refuse("suffix", "the backends do not insert text")
    if body.logprobs is not None:
        raise _refuse("logprobs", "the backends do not report log probabilities")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise OpenAIError("prompt", f"give one prompt per request, got {len(prompt)}")
        prompt = prompt[0]
    return _request(body, body.max_tokens, prompt=prompt)


def chat_messages(body: ChatCompletionBody) -> list[ChatMessage]:
    """The chat's messages, each with its text (text parts joined). Raises OpenAIError,
    for a message without ``content`` among others (OpenAI's API requires it: what a
    message would carry instead, tool calls, shoal refuses)."""
    if not body.messages:
        raise OpenAIError("messages", "'messages' must hold at least one message")
    out = []
    for i, message in enumerate(body.messages):
        content = message.content
        if content is None:
            param = f"messages.{i}.content"
            raise OpenAIError(param, f"'{param}' is required: a string or a list of text parts")
        if isinstance(content, list):
            if not content:  # as OpenAI's API refuses it (an empty array); before: taken as ""
                param = f"messages.{i}.content"
                raise OpenAIError(param, f"'{param}' is an empty list: give at least one text part")
            texts = []
            for j, part in enumerate(content):
                if part.type != "text":
                    raise OpenAIError(
                        f"messages.{i}.content.{j}", f"only text content is supported, got {part.type!r}"
                    )
                if part.text is None:
                    param = f"messages.{i}.content.{j}.text"
                    raise OpenAIError(param, f"'{param}' is required: a text part's text")
                texts.append(part.text)
            content = "".join(texts)
        out.append(ChatMessage(role=message.role, content=content))
    return out


def chat_request(body: ChatCompletionBody) -> GenerateRequest:
    """The generation a chat completions body asks for. Raises OpenAIError."""
    _check_common(body)
    if body.logprobs:
        raise _refuse("logprobs", "the backends do not report log probabilities")
    if body.top_logprobs:
        raise _refuse("top_logprobs", "the backends do not report log probabilities")
    if body.tools:
        raise _refuse("tools", "the backends do not call tools")
    if body.tool_choice not in (None, "none"):
        raise _refuse("tool_choice", "the backends do not call tools")
    if body.functions:
        raise _refuse("functions", "the backends do not call functions")
    if body.function_call not in (None, "none"):
        raise _refuse("function_call", "the backends do not call functions")
    if body.response_format is not None and body.response_format.get("type", "text") != "text":
        raise _refuse("response_format", "only text answers")
    if any(m != "text" for m in body.modalities or ()):
        raise _refuse("modalities", "the backends answer text only")
    if body.audio is not None:
        raise _refuse("audio", "the backends answer text only")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    return _request(body, max_tokens, messages=chat_messages(body), max_tokens_param=param)


def _request(
    body: _GenerationBody,
    max_tokens: int | None,
    *,
    prompt: str = "",
    messages: list[ChatMessage] | None = None,
    max_tokens_param: str = "max_tokens",
) -> GenerateRequest:
    params = {
        "max_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stop": body.stop,
        "seed": body.seed,
    }
    try:
        return generate_request(params, prompt=prompt, messages=messages or (), stream=bool(body.stream))
    except InvalidParameter as err:
        param = max_tokens_param if err.param == "max_tokens" else err.param
        raise OpenAIError(param, err.message.replace("max_tokens", param)) from None


def _usage(chunk: GenerateChunk) -> dict[str, int]:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
    }


def _finish(chunk: GenerateChunk) -> str:
    """OpenAI's finish reason for a generation's last chunk. An ``abort`` that reaches a
    client was not its own (vLLM's engine paused or shutting down, a replica that stopped
    it): Unavailable, which OpenAI's clients retry. Before, it was ``stop``, and a cut
    answer read as a whole one."""
    reason = _FINISH_REASONS.get(chunk.finish_reason)
    if reason is not None:
        return reason
    if chunk.finish_reason == "abort":
        raise Unavailable("the model stopped this generation before its end (finish reason 'abort'): retry")
    raise Internal(
        f"the model ended a generation with finish reason {limits.shown(repr(chunk.finish_reason))}"
    )


# ---------------------------------------------------------------- the routes


class OpenAIApi:
    """The ``/v1`` endpoints over ``router``; bodies up to ``limit`` bytes."""

    def __init__(self, router: Router, limit: int, dataplane: DataPlane) -> None:
        self.router = router
        self.dataplane = dataplane
        self.limit = limit
        self.created = int(time.time())  # models have no creation time; this scheduler's start
        self.keepalive_s = dataplane.settings.sse_keepalive_s
        self.on_loop = dataplane.settings.max_json_on_loop_kb * 1024  # bodies parsed off the loop past it

    def routes(self) -> list[Route]:
        """The routes; the last takes every other ``/v1/`` path and method (mount these
        after any other ``/v1/`` route)."""
        known = [
            Route("/v1/models", _openai(self.list_models), methods=["GET"]),
            Route("/v1/models/{model:path}", _openai(self.get_model), methods=["GET"]),
            Route("/v1/embeddings", _openai(self.embeddings), methods=["POST"]),
            Route("/v1/completions", _openai(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", _openai(self.chat_completions), methods=["POST"]),
        ]
        return [*known, Route("/v1/{rest:path}", _Unmatched(known))]

    def _model(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "shoal"}

    def _spec(self, name: str) -> DeploymentSpec:
        """The deployment ``name`` calls. OpenAIError for a name that is not valid Unicode
        (JSON's ``"\\ud800"``: no answer could quote it); NotFound quoting at most
        :data:`~shoal.core.limits.SHOWN_CHARS` characters of an unknown one."""
        if not limits.is_unicode(name):
            raise OpenAIError("model", "'model' is not valid Unicode text (a lone surrogate)")
        name, _ = self.router.resolve(name)  # a traffic route's name: the target drawn (no shadow here)
        try:
            return self.router.spec(name)
        except NotFound:
            raise NotFound(
                f"The model '{limits.shown(name)}' does not exist: no deployment of that name"
            ) from None

    async def list_models(self, request: Request) -> Response:
        # Traffic routes too: a request may name one, and GET /v1/models/ROUTE answers it.
        names = sorted({*self.router.deployments(), *self.router.traffic()})
        return JSONResponse({"object": "list", "data": [self._model(n) for n in names]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        self._spec(name)
        return JSONResponse(self._model(name))

    # -- bodies

    def _check_lists(self, doc: dict[str, Any]) -> None:
        """Refuse a list (or object) of the body longer than ``max_strings_per_request``
        (InvalidArgument naming it) from its length, before the body is validated item by
        item: 200,000 one-character strings are a 1 MB body, and a chat of 1,000,000
        one-word messages (34 MB, under ``max_message_mb``) held the scheduler's event
        loop 9 s (validated, then made into a request) before it was sent on. A chat's
        messages count with their text parts."""
        model = str(doc.get("model", ""))
        for param in _LISTS:
            value = doc.get(param)
            if isinstance(value, list | dict):
                self._check_count(model, param, len(value), "strings")
        messages = doc.get("messages")
        if isinstance(messages, list):  # no longer than the limit, checked above
            parts = sum(
                len(m["content"])
                for m in messages
                if isinstance(m, dict) and isinstance(m.get("content"), list)
            )
            if parts:
                self._check_count(
                    model, "messages", len(messages) + parts, "strings (messages and their text parts)"
                )

    async def _read(self, request: Request) -> dict[str, Any]:
        """The body (:func:`read_json`); one of too many values is counted and logged as its
        model's refusal, as one of too many strings is (:meth:`_check_count`)."""
        try:
            return await read_json(request, self.limit, self.on_loop)
        except TooManyValues as err:
            if err.model:
                self.dataplane.refused(err.model, "", "openai", err)
            raise

    def _check_count(self, model: str, param: str, count: int, what: str) -> None:
        try:
            self.dataplane.check_strings(model, count, param=param, what=what)
        except InvalidArgument as err:
            raise OpenAIError(param, err.message) from None

    # -- embeddings

    async def embeddings(self, request: Request) -> Response:
        doc = await self._read(request)
        self._check_lists(doc)
        with self._refusals(doc):
            body = parse_body(EmbeddingsBody, doc)
            spec = self._spec(body.model)
            if not embeds_text(spec):
                raise OpenAIError("model", f"model {body.model!r} does not compute embeddings")
            await self._check_takes_text(spec, body.model)
            texts = [body.input] if isinstance(body.input, str) else body.input
            if not texts:
                raise OpenAIError("input", "'input' must hold at least one string")
            empty = next((i for i, text in enumerate(texts) if not text), None)
            if empty is not None:  # as OpenAI's API refuses it
                where = "'input'" if isinstance(body.input, str) else f"'input[{empty}]'"
                raise OpenAIError("input", f"{where} is an empty string: there is nothing to embed")
            if body.dimensions is not None:
                await self._check_dimensions(spec, body.model, body.dimensions)
        vectors, tokens = await unless_gone(request.scope, self._embed(spec, texts))
        if body.dimensions is not None and body.dimensions != vectors.shape[1]:
            raise _other_dimensions(body.model, vectors.shape[1])
        encode = _base64 if body.encoding_format == "base64" else _floats
        data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": body.model, "usage": usage})

    async def _check_takes_text(self, spec: DeploymentSpec, model: str) -> None:
        """OpenAIError naming ``model`` for a model whose inputs are known (declared, or
        described by its replica) and hold no BYTES ``text``: it does not take text to
        embed. Before, the echo example answered "unknown input 'text'; model 'echo' takes
        'x'", as if the client had named an input. A model whose inputs are not known is
        asked, and answers for itself."""
        catalog = self.dataplane.catalog
        metadata = catalog.known_metadata(spec) or await catalog.request_metadata(spec)
        inputs = metadata.inputs
        if not inputs or any(t.name == "text" and t.datatype == "BYTES" for t in inputs):
            return
        names = limits.shown(", ".join(f"{t.name!r} ({t.datatype})" for t in inputs))
        raise OpenAIError(
            "model",
            f"model {model!r} does not take text for embeddings: its inputs are {names}; "
            "an embedding model takes a BYTES input 'text'",
        )

    async def _check_dimensions(self, spec: DeploymentSpec, model: str, dimensions: int) -> None:
        """OpenAIError for ``dimensions`` below 1, or other than the width of the
        ``embedding`` output the deployment declares (in its spec, or as its backend
        describes it: ``transformers`` does), before the model runs. Before, the model
        embedded every text first. A model that declares no width is checked on its answer."""
        if dimensions < 1:
            raise OpenAIError("dimensions", f"'dimensions' must be at least 1, got {dimensions}")
        catalog = self.dataplane.catalog
        metadata = catalog.known_metadata(spec) or await catalog.request_metadata(spec)
        for tensor in metadata.outputs:
            if tensor.name == "embedding" and len(tensor.shape) == 2 and tensor.shape[1] > 0:
                if dimensions != tensor.shape[1]:
                    raise _other_dimensions(model, tensor.shape[1])
                return

    async def _embed(self, spec: DeploymentSpec, texts: list[str]) -> tuple[np.ndarray, int]:
        """The embeddings of ``texts``, one row each, and the tokens the model read for them."""
        answer = await self.dataplane.embed(spec.name, texts)
        return np.concatenate([p.astype(np.float32, copy=False) for p in answer.parts]), answer.tokens

    # -- completions

    async def completions(self, request: Request) -> Response:
        doc = await self._read(request)
        self._check_lists(doc)
        with self._refusals(doc):
            body = parse_body(CompletionBody, doc)
            req = completion_request(body)
            spec = self._generator(body.model)
        return await self._generate(request, body, req, spec, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        doc = await self._read(request)
        self._check_lists(doc)
        with self._refusals(doc):
            body = parse_body(ChatCompletionBody, doc)
            req = chat_request(body)
            spec = self._generator(body.model)
        return await self._generate(request, body, req, spec, chat=True)

    @contextlib.contextmanager
    def _refusals(self, doc: dict[str, Any]) -> Iterator[None]:
        """Count and log (``DataPlane.refused``) a refusal raised inside as one of the body's
        model, as the other doors count theirs. Before, this API's own refusals of a known
        model (a parameter shoal does not take, a model of another kind) were in neither
        ``shoal_requests_total``, the dashboard's error rate nor the log. Not around what
        the data plane runs, which counts its own."""
        try:
            yield
        except ShoalError as err:
            model = doc.get("model")
            self.dataplane.refused(model if isinstance(model, str) else "", "", "openai", err)
            raise

    def _generator(self, model: str) -> DeploymentSpec:
        """The deployment ``model`` calls, which must generate text (OpenAIError otherwise)."""
        spec = self._spec(model)
        if not generates_text(spec):
            raise OpenAIError("model", f"model {model!r} does not generate text")
        return spec

    async def _generate(
        self,
        request: Request,
        body: _GenerationBody,
        req: GenerateRequest,
        spec: DeploymentSpec,
        *,
        chat: bool,
    ) -> Response:
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {
            "id": request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.model,
            "system_fingerprint": None,
        }
        if not req.stream:
            # A client that hangs up stops its generation (unless_gone), as a stream's does.
            with _named_prompt(chat):
                result = await unless_gone(
                    request.scope, complete(self.dataplane.catalog, spec.name, req, request_id=request_id)
                )
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": _finish(result)}
            if chat:
                choice["message"] = {"role": "assistant", "content": result.text, "refusal": None}
            else:
                choice["text"] = result.text
            return JSONResponse({**head, "choices": [choice], "usage": _usage(result)})
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        catalog = self.dataplane.catalog

        async def events() -> AsyncGenerator[bytes, None]:
            # A failure before the first piece raises (an error response, see open_stream).
            with _named_prompt(chat):
                chunks = await start_stream(catalog, spec.name, req, request_id=request_id)
            async with (
                contextlib.aclosing(chunks),
                contextlib.aclosing(
                    stream_events(chunks, head, chat=chat, include_usage=include_usage)
                ) as out,
            ):
                async for item in out:
                    yield item

        body_events = events()
        # A client that hangs up while its stream waits for a first piece (queued, or the
        # prompt being read) drops it too; after that, EventStream sees the client go.
        return await unless_gone(
            request.scope, open_stream(body_events, body_events.aclose, self.keepalive_s, error_event)
        )


@contextlib.contextmanager
def _named_prompt(chat: bool) -> Iterator[None]:
    """A generation the model refuses as invalid (InvalidArgument, no other kind) named for
    its prompt: ``param`` ``messages`` for a chat, ``prompt`` for a completion. Every other
    parameter is checked here before the request is sent (InvalidParameter naming it), so
    what the model refuses is the prompt: longer than it takes, empty, messages its chat
    template refuses. Before, its ``param`` was null."""
    try:
        yield
    except InvalidArgument as err:
        if type(err) is not InvalidArgument:
            raise
        raise OpenAIError("messages" if chat else "prompt", err.message) from err


def _other_dimensions(model: str, width: int) -> OpenAIError:
    return OpenAIError("dimensions", f"model {model!r} makes {width}-dimensional embeddings only")


def _floats(vector: np.ndarray) -> list[float]:
    return [float(x) for x in vector]


def _base64(vector: np.ndarray) -> str:
    return base64.b64encode(vector.astype("<f4").tobytes()).decode()


async def stream_events(
    chunks: ChunkStream, head: dict[str, Any], *, chat: bool, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    """The server-sent events of one streamed (chat) completion, ``[DONE]`` last; an error
    ends it with an event of OpenAI's error object (``[DONE]`` is sent only after the last
    chunk), a bug's as a 500 ``server_error``, its traceback logged."""
    extra = {"usage": None} if include_usage else {}

    def choice(text: str | None, finish: str | None, role: bool = False) -> bytes:
        entry: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            entry["delta"] = delta
        else:
            entry["text"] = text or ""
        return event({**head, "choices": [entry], **extra})

    try:
        if chat:
            yield choice("", None, role=True)
        async for chunk in chunks:
            if chunk.last:
                try:
                    finish = _finish(chunk)
                except ShoalError:
                    if chunk.text:
                        yield choice(chunk.text, None)
                    raise
                yield choice(chunk.text or None, finish)
                if include_usage:
                    yield event({**head, "choices": [], "usage": _usage(chunk)})
                yield _DONE
                return
            if chunk.text:
                yield choice(chunk.text, None)
    except Exception as exc:
        yield error_event(exc)


def error_event(exc: Exception) -> bytes:
    """The last event of a stream that failed with ``exc``: OpenAI's error object, a bug's
    as a 500 ``server_error``, its traceback logged."""
    if isinstance(exc, ShoalError):
        return event(error_body(exc))
    log.error("a streamed completion failed", exc_info=exc)
    return event(error_body(Internal(f"internal error: {type(exc).__name__}: {exc}")))


def openai_routes(router: Router, limit: int, dataplane: DataPlane) -> list[Route]:
    """The OpenAI-compatible routes over ``router`` (see the module docstring); embeddings
    go through ``dataplane``, the one door."""
    return OpenAIApi(router, limit, dataplane).routes()

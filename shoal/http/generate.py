"""Triton's generate extension over HTTP, for deployments that generate text::

    POST /v2/models/NAME[/versions/V]/generate
    POST /v2/models/NAME[/versions/V]/generate_stream

The body is a JSON object: ``text_input`` (or ``text``), the prompt; ``parameters``, an
object with ``max_tokens``, ``temperature``, ``top_p``, ``stop`` (a string or a list) and
``seed`` (each may also be given at the top level, as Triton maps top-level keys to model
inputs); ``id``, echoed: as on ``/infer``, a string of valid Unicode of at most
:data:`~shoal.core.limits.MAX_REQUEST_ID_CHARS` characters. Parameters left out are the
deployment's defaults.

``generate`` answers ``{"model_name", "model_version", "id"?, "text_output",
"finish_reason", "prompt_tokens", "completion_tokens"}``. ``generate_stream`` answers
server-sent events: one ``data: {"model_name", "model_version", "id"?, "text_output"}``
event per piece of text as the model makes it, then a last event with ``text_output`` ""
and ``finish_reason`` and the token counts; a stream quiet for setting
``sse_keepalive_s`` sends a comment line, ``: keep-alive`` (:mod:`shoal.http.sse`). Errors
before the first piece are ``{"error": "..."}`` with the status from
:data:`shoal.errors.HTTP_STATUS`, as on every ``/v2`` route, while the stream has sent
nothing; an error after it, or after a keep-alive, is a last event ``data: {"error": "..."}``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shoal.config import Settings
from shoal.core import limits
from shoal.errors import InvalidArgument, ShoalError
from shoal.http.jsonbody import read_json
from shoal.http.server import unless_gone
from shoal.http.sse import event, open_stream
from shoal.scheduler.generate import (
    PARAMETERS,
    complete,
    generate_request,
    generates_text,
    internal_id,
    start_stream,
)
from shoal.scheduler.models import ModelCatalog
from shoal.types import GenerateRequest

if TYPE_CHECKING:
    from shoal.http.auth import Refused

log = logging.getLogger("shoal.http")


def parse_generate(doc: dict[str, Any], *, stream: bool) -> tuple[str, GenerateRequest]:
    """(request id, request) from a generate extension body. Raises InvalidArgument."""
    text = doc.get("text_input", doc.get("text"))
    if not isinstance(text, str):
        raise InvalidArgument("the body needs 'text_input', the prompt as a string")
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidArgument(f"'parameters' must be an object, got {type(params).__name__}")
    params = {**{k: doc[k] for k in PARAMETERS if k in doc}, **params}
    request_id = doc.get("id", "")
    # The rules of /infer: the id goes on to the replica as a protobuf string (UTF-8), into
    # log lines, and back in the answer.
    if not isinstance(request_id, str) or not limits.is_unicode(request_id):
        raise InvalidArgument(f"'id' must be a string of valid Unicode, got {limits.shown(repr(request_id))}")
    limits.check_request_id(request_id)
    return request_id, generate_request(params, prompt=text, stream=stream)


def error_event(name: str, exc: Exception) -> bytes:
    """The last event of a stream of model ``name`` that failed with ``exc``; a bug's says
    so, its traceback logged (the client still reads why its stream ended)."""
    if isinstance(exc, ShoalError):
        return event({"error": exc.message})
    log.error("a streamed generation of %s failed", name, exc_info=exc)
    return event({"error": f"internal error: {type(exc).__name__}: {exc}"})


def _error(err: ShoalError) -> Response:
    return JSONResponse({"error": err.message}, status_code=err.http_status, headers=err.http_headers)


def generate_routes(
    catalog: ModelCatalog,
    limit: int,
    keepalive_s: float = Settings.sse_keepalive_s,
    on_loop: int = Settings.max_json_on_loop_kb * 1024,
    refused: Refused | None = None,
) -> list[Route]:
    """The generate extension's routes over ``catalog`` (and its router); bodies up to
    ``limit`` bytes, parsed off the event loop past ``on_loop`` (:func:`read_json`); a
    stream quiet ``keepalive_s`` sends a keep-alive (:mod:`shoal.http.sse`); a request
    refused before it is routed is told to ``refused`` (``DataPlane.refused``)."""

    async def prepare(request: Request, *, stream: bool) -> tuple[str, str, GenerateRequest, int]:
        """The model, the client's id, the generation and the revision it must run on (0: any).
        A refusal is told to ``refused`` (counted and logged, as the other doors' are)."""
        name = request.path_params["name"]
        try:
            spec = catalog.spec(name)
            revision = catalog.revision(spec, request.path_params.get("version", ""))
            if not generates_text(spec):
                raise InvalidArgument(f"model {name!r} does not generate text; use /v2/models/{name}/infer")
            request_id, req = parse_generate(await read_json(request, limit, on_loop), stream=stream)
        except ShoalError as err:
            if refused is not None:
                refused(name, "", "generate", err)
            raise
        return name, request_id, req, revision

    def head(name: str, request_id: str, revision: int) -> dict[str, Any]:
        version = str(revision) if revision else catalog.versions(catalog.spec(name))[-1]
        doc: dict[str, Any] = {"model_name": name, "model_version": version}
        if request_id:
            doc["id"] = request_id
        return doc

    async def generate(request: Request) -> Response:
        try:
            name, request_id, req, revision = await prepare(request, stream=False)
            # A client that hangs up stops its generation (unless_gone), as a stream's does.
            result = await unless_gone(
                request.scope,
                complete(catalog, name, req, request_id=internal_id(request_id), version=revision),
            )
            answer = head(name, request_id, revision)
        except ShoalError as err:
            return _error(err)
        return JSONResponse(
            {
                **answer,
                "text_output": result.text,
                "finish_reason": result.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
            }
        )

    async def generate_stream(request: Request) -> Response:
        try:
            name, request_id, req, revision = await prepare(request, stream=True)
            base = head(name, request_id, revision)
            body = events(name, base, req, request_id, revision)
            # As a whole answer's: a client that hangs up before the first piece drops it.
            stream = open_stream(body, body.aclose, keepalive_s, functools.partial(error_event, name))
            return await unless_gone(request.scope, stream)
        except ShoalError as err:
            return _error(err)

    async def events(
        name: str, base: dict[str, Any], req: GenerateRequest, request_id: str, revision: int
    ) -> AsyncGenerator[bytes, None]:
        # A failure before the first piece raises (an error response, see open_stream).
        chunks = await start_stream(catalog, name, req, request_id=internal_id(request_id), version=revision)
        async with contextlib.aclosing(chunks):
            try:
                async for chunk in chunks:
                    if chunk.last:
                        yield event(
                            {
                                **base,
                                "text_output": chunk.text,
                                "finish_reason": chunk.finish_reason,
                                "prompt_tokens": chunk.prompt_tokens,
                                "completion_tokens": chunk.completion_tokens,
                            }
                        )
                    elif chunk.text:
                        yield event({**base, "text_output": chunk.text})
            except Exception as exc:
                yield error_event(name, exc)

    routes = []
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [
            Route(f"{prefix}/generate", generate, methods=["POST"]),
            Route(f"{prefix}/generate_stream", generate_stream, methods=["POST"]),
        ]
    return routes

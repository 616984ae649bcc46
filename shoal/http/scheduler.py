"""The scheduler's HTTP ingress: the Open Inference Protocol's REST API (KServe V2 / Triton).

Thin routes over :class:`shoal.scheduler.models.ModelCatalog`::

    GET  /v2/health/live            GET  /v2/health/ready           GET  /v2
    GET  /v2/models/NAME[/versions/V]                                (metadata)
    GET  /v2/models/NAME[/versions/V]/ready | /config | /stats
    POST /v2/models/NAME[/versions/V]/infer
    GET  /v2/models/stats           POST /v2/repository/index
    POST /v2/repository/models/NAME/load | /unload   (``shoal.scheduler.repository``)
    GET  /healthz                   GET  /metrics (Prometheus, ``shoal.metrics.SchedulerCollector``)
    POST /v2/models/NAME[/versions/V]/generate[_stream]   (``shoal.http.generate``)
    /v1/...                         the OpenAI-compatible API (``shoal.http.openai``)

Inference bodies are JSON (``inputs: [{name, datatype, shape, data}]``) or Triton's
binary tensor data extension (an ``Inference-Header-Content-Length`` header, then the
tensors' raw bytes after the JSON). Outputs come back as raw bytes when the request asks
(``parameters.binary_data_output``, or ``parameters.binary_data`` per requested output),
as JSON otherwise. Request parameter ``timeout`` is in microseconds, as in Triton. A
multiplexed deployment's model id is the parameter ``multiplexed_model_id`` or the header
``shoal-multiplexed-model-id`` (the parameter wins).
Bodies may be gzip or deflate encoded; a body over ``settings.max_message_mb`` (after
decoding) is refused.

Every error is ``{"error": "..."}`` with the status from :data:`shoal.errors.HTTP_STATUS`.
A model that is known but not ready answers its ``ready`` route with 400, as Triton does.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import json
import multiprocessing
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from shoal import metrics
from shoal.auth import is_loopback
from shoal.core import limits, payload, tensors
from shoal.core.payload import Tensor, Tensors
from shoal.errors import Code, InvalidArgument, ResourceExhausted, ShoalError, from_code
from shoal.http.auth import InferenceGuard, model_in_path
from shoal.http.generate import generate_routes
from shoal.http.openai import openai_routes
from shoal.scheduler.dataplane import MODEL_ID_HEADER, MODEL_ID_PARAMETER, InferCall
from shoal.scheduler.ingress import IngressNode
from shoal.scheduler.models import InferResult
from shoal.scheduler.node import SchedulerNode
from shoal.scheduler.repository import ModelRepository, check_parameters

Endpoint = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")

_JSON = "application/json"
_UNSUPPORTED_PARAMETERS = {
    "shared_memory_region": "shared memory is not supported; send the data in the request",
    "classification": "the classification extension is not supported",
}


def _error(err: ShoalError) -> Response:
    return JSONResponse({"error": err.message}, status_code=err.http_status)


def _json(doc: Any, status_code: int = 200) -> Response:
    # json.dumps writes NaN and Infinity as Triton does; Starlette's JSONResponse refuses them.
    return Response(json.dumps(doc, separators=(",", ":")), status_code=status_code, media_type=_JSON)


def _oip(endpoint: Endpoint) -> Endpoint:
    """Turn the ShoalErrors an endpoint raises into ``{"error": ...}`` responses."""

    async def handle(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ShoalError as err:
            return _error(err)

    return handle


def _model(request: Request) -> tuple[str, str]:
    return request.path_params["name"], request.path_params.get("version", "")


# ---------------------------------------------------------------- bodies


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decoded (gzip, deflate), at most ``limit`` bytes; InvalidArgument otherwise.

    An oversized body is still read to its end (and dropped), so that the client, which
    sends it all before reading the answer, gets the 400 and not a broken connection.
    """
    declared = request.headers.get("content-length")
    too_big = False
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise InvalidArgument(f"Content-Length must be an integer, got {declared!r}") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if too_big or size > limit:
            too_big = True
            continue
        chunks.append(chunk)
    if too_big:
        raise InvalidArgument(
            f"request body of {size} bytes is over the limit of {limit} bytes (setting max_message_mb)"
        )
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidArgument(f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    # deflate in HTTP is the zlib format (tritonclient sends zlib.compress output).
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidArgument(f"request body is not valid {encoding} data: {e}") from None
    if len(out) > limit:
        raise InvalidArgument(
            f"request body decompresses to over the limit of {limit} bytes (setting max_message_mb)"
        )
    if not inflater.eof:
        raise InvalidArgument(f"request body is truncated {encoding} data")
    return out


def _refuse_unsupported(params: dict[str, Any], where: str) -> None:
    for key, why in _UNSUPPORTED_PARAMETERS.items():
        if key in params:
            raise InvalidArgument(f"{where}{why}")


def _params(doc: dict[str, Any], where: str) -> dict[str, Any]:
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidArgument(f"{where}'parameters' must be an object, got {type(params).__name__}")
    return params


def _bool_param(params: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where}parameter {key!r} must be true or false, got {value!r}")
    return value


_MODEL_PREFIXES = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")


class InferRequest:
    """A decoded REST inference request."""

    def __init__(self, header: dict[str, Any], tail: memoryview, max_elements: int = 0) -> None:
        request_id = header.get("id", "")
        if not isinstance(request_id, str) or not limits.is_unicode(request_id):
            raise InvalidArgument(f"'id' must be a string of valid Unicode, got {request_id!r}")
        self.id = request_id
        params = _params(header, "")
        timeout = params.get("timeout", 0)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
            raise InvalidArgument(f"parameter 'timeout' must be a non-negative integer (µs), got {timeout!r}")
        self.timeout_s = timeout / 1e6
        if params.get("sequence_id") not in (None, 0, ""):
            raise InvalidArgument("sequence batching (parameter 'sequence_id') is not supported")
        self.binary_default = _bool_param(params, "binary_data_output", False, "")
        model_id = params.get(MODEL_ID_PARAMETER, "")
        if not isinstance(model_id, str):
            raise InvalidArgument(f"parameter {MODEL_ID_PARAMETER!r} must be a string, got {model_id!r}")
        self.model_id = model_id
        if "inputs" not in header:
            raise InvalidArgument("the request has no 'inputs'")
        if isinstance(header["inputs"], list):
            shapes = (e.get("shape") for e in header["inputs"] if isinstance(e, dict))
            limits.check_elements(shapes, max_elements)  # before any tensor is decoded
        self.inputs = self._decode_inputs(header["inputs"], tail)
        self.outputs: list[str] = []
        self.binary: dict[str, bool] = {}
        requested = header.get("outputs", [])
        if not isinstance(requested, list):
            raise InvalidArgument(f"'outputs' must be a list, got {type(requested).__name__}")
        for i, entry in enumerate(requested):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
                raise InvalidArgument(f"outputs[{i}] must be an object with a 'name'")
            name = entry["name"]
            where = f"output {name!r}: "
            out_params = _params(entry, where)
            _refuse_unsupported(out_params, where)
            self.outputs.append(name)
            self.binary[name] = _bool_param(out_params, "binary_data", self.binary_default, where)

    @staticmethod
    def _decode_inputs(entries: object, tail: memoryview) -> Tensors:
        """Wire tensors: binary data as it came (not decoded), JSON data through numpy."""
        slices = tensors.binary_input_slices(entries, tail)  # checks that entries is a list of objects
        assert isinstance(entries, list)
        out: dict[str, Tensor] = {}
        for i, (entry, raw) in enumerate(zip(entries, slices, strict=True)):
            name = entry.get("name")
            if not isinstance(name, str) or not name:
                raise InvalidArgument(f"inputs[{i}] has no 'name'")
            if not limits.is_unicode(name):
                raise InvalidArgument(f"inputs[{i}]: the name {name!r} is not valid Unicode")
            if name in out:
                raise InvalidArgument(f"input {name!r} is given twice")
            where = f"input {name!r}: "
            _refuse_unsupported(_params(entry, where), where)
            for key in ("datatype", "shape"):
                if key not in entry:
                    raise InvalidArgument(f"{where}'{key}' is missing")
            if raw is not None:
                if "data" in entry:
                    raise InvalidArgument(f"{where}give either 'data' or binary_data_size, not both")
                datatype = entry["datatype"]
                if not isinstance(datatype, str):
                    raise InvalidArgument(f"{where}datatype must be a string, got {type(datatype).__name__}")
                shape = tensors.check_shape(entry["shape"], where)
                out[name] = Tensor(name, datatype, shape, bytes(raw))
            elif "data" in entry:
                array = tensors.from_json(entry["datatype"], entry["shape"], entry["data"], name=name)
                out[name] = payload.from_array(name, array)
            else:
                raise InvalidArgument(f"{where}no data: give 'data' or parameters.binary_data_size")
        return tuple(out.values())

    def call(self, model: str, version: str, model_id: str = "") -> InferCall:
        """The data plane's call; ``model_id`` from the HTTP header, unless the body's
        parameter names one."""
        return InferCall(
            model=model,
            inputs=self.inputs,
            id=self.id,
            version=version,
            timeout_s=self.timeout_s,
            outputs=tuple(self.outputs),
            door="http",
            model_id=self.model_id or model_id,
        )

    def response(self, result: InferResult) -> Response:
        body, media_type, headers = self.render(result)
        return Response(body, media_type=media_type, headers=headers)

    def json_elements(self, result: InferResult) -> int:
        """How many output elements go back as JSON (what makes a response slow to write)."""
        return sum(t.elements for t in result.outputs if not self.binary.get(t.name, self.binary_default))

    def render(self, result: InferResult) -> tuple[bytes, str, dict[str, str]]:
        """The response body, its media type and headers."""
        header: dict[str, Any] = {"model_name": result.model_name, "model_version": result.model_version}
        if result.id:
            header["id"] = result.id
        blobs: list[bytes] = []
        outputs = []
        for t in result.outputs:
            entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
            if self.binary.get(t.name, self.binary_default):
                entry["parameters"] = {"binary_data_size": len(t.data)}
                blobs.append(t.data)
            else:
                entry["data"] = tensors.to_json(payload.to_array(t), name=t.name)
            outputs.append(entry)
        header["outputs"] = outputs
        if not blobs:
            # json.dumps writes NaN and Infinity as Triton does.
            return json.dumps(header, separators=(",", ":")).encode(), _JSON, {}
        body, length = tensors.build_binary_response(header, blobs)
        return body, "application/octet-stream", {"Inference-Header-Content-Length": str(length)}


def _parse_infer(body: bytes, header_length: str | None, max_elements: int) -> InferRequest:
    header, tail = tensors.split_binary_body(body, header_length)
    return InferRequest(header, tail, max_elements)


def _parse_in_child(
    body: bytes, header_length: str | None, max_elements: int
) -> InferRequest | tuple[str, str]:
    """:func:`_parse_infer` in the parsing process; an error comes back as (code, message)."""
    try:
        return _parse_infer(body, header_length, max_elements)
    except ShoalError as err:
        return (err.code.value, err.message)


_parser: concurrent.futures.ProcessPoolExecutor | None = None


async def parse_infer(
    body: bytes, header_length: str | None, max_elements: int, on_loop: int
) -> InferRequest:
    """The request in ``body``. A JSON body over ``on_loop`` bytes is parsed in a separate
    process: json.loads holds the GIL for its whole run (a thread would not help), and a
    49 MB body parsed on the event loop held every other request up for seconds. The
    parsed tensors come back as raw bytes (a memory copy, not a parse)."""
    if len(body) <= on_loop or (header_length is not None and int_or(header_length, 0) <= on_loop):
        return _parse_infer(body, header_length, max_elements)
    result = await _in_parser(_parse_in_child, body, header_length, max_elements)
    if isinstance(result, tuple):
        raise from_code(Code(result[0]), result[1])
    return result


def _new_parser() -> concurrent.futures.ProcessPoolExecutor:
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    atexit.register(shutdown_parser)  # stopped before the interpreter tears its modules down
    return pool


def _render_in_child(req: InferRequest, result: InferResult) -> tuple[bytes, str, dict[str, str]]:
    return req.render(result)


async def respond(req: InferRequest, result: InferResult, on_loop: int) -> Response:
    """``req``'s answer. One with many output elements as JSON is written in the parsing
    process: turning millions of numbers into JSON text on the event loop held every other
    request up for seconds."""
    if req.json_elements(result) * 8 <= on_loop:  # about 8 bytes of JSON per number
        return req.response(result)
    req.inputs = ()  # sent, and not needed to write the answer
    body, media_type, headers = await _in_parser(_render_in_child, req, result)
    return Response(body, media_type=media_type, headers=headers)


#: Large bodies being parsed or answers written in the parsing process at once, each up to
#: max_message_mb in memory; past it a large JSON request is RESOURCE_EXHAUSTED / 503.
MAX_LARGE_JSON = 4
_large_json = 0


async def _in_parser(fn: Callable[..., T], *args: Any) -> T:
    global _parser, _large_json
    if _large_json >= MAX_LARGE_JSON:
        raise ResourceExhausted(
            f"{_large_json} large JSON bodies are being handled already; retry, or send tensors as "
            "binary data (Triton's binary tensor data extension) or over gRPC"
        )
    if _parser is None:
        _parser = _new_parser()
    _large_json += 1
    try:
        return await asyncio.get_running_loop().run_in_executor(_parser, fn, *args)
    finally:
        _large_json -= 1


def shutdown_parser() -> None:
    """Stop the process that parses big bodies, if one was started (at scheduler exit)."""
    global _parser
    if _parser is not None:
        _parser.shutdown(wait=True, cancel_futures=True)
        _parser = None


def int_or(text: str, default: int) -> int:
    try:
        return int(text)
    except ValueError:
        return default


# ---------------------------------------------------------------- the app


class ShedWhenFull:
    """Refuses an inference request (``POST /v2/models/NAME[/versions/V]/infer``) to a
    deployment whose queue is full at once, before its body is read or parsed: 503 with the
    router's message and ``Retry-After: 1``, counted as the data plane counts refusals.

    Why: under a flood from many clients, reading and parsing each body only to refuse it
    kept the event loop busy, and each loop pass grew so long that the admitted requests,
    which need several passes each, were slowed with the refusals (``bench/overload.py``).
    Runs after :class:`InferenceGuard`, so a deployment with tokens still answers 401 first.
    The body left unread is dropped by the server, and the connection stays open.
    """

    def __init__(self, app: ASGIApp, node: IngressNode) -> None:
        self.app = app
        self.node = node

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/infer"):
            model = model_in_path(scope["path"])
            err = self.node.router.at_capacity(model) if model is not None else None
            if err is not None and model is not None:
                self.node.dataplane.refused(model, "", "http", err)
                body = json.dumps({"error": err.message}).encode()
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", b"1"),
                ]
                await send({"type": "http.response.start", "status": err.http_status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def refuse_when_full(node: IngressNode) -> Callable[[str, str], tuple[int, str] | None]:
    """For :class:`shoal.http.server.HttpServer`: an inference request (``POST
    /v2/models/NAME[/versions/V]/infer``) to a deployment whose queue is full is answered
    from its head, 503 with the router's message, before its body is read and without the
    app (what :class:`ShedWhenFull` does inside the app, at a fraction of the cost: under a
    flood, uvicorn's and Starlette's work per request was most of a refusal's). A deployment
    with tokens is left to the app, so that a client without one is told 401 first."""
    router, dataplane = node.router, node.dataplane

    def refuse(method: str, path: str) -> tuple[int, str] | None:
        if method != "POST" or not path.endswith("/infer"):
            return None
        model = model_in_path(path)
        err = router.at_capacity(model) if model is not None else None
        if err is None or model is None or router.spec(model).auth is not None:
            return None
        dataplane.refused(model, "", "http", err)
        return err.http_status, err.message

    return refuse


def scheduler_app(
    node: IngressNode,
    metrics_page: Callable[[], Awaitable[tuple[bytes, str]]] | None = None,
    repository: ModelRepository | None = None,
) -> Starlette:
    """The scheduler's Starlette app, over the node's catalog and data plane (shared with
    the gRPC servicer, so statistics count both). ``metrics_page``: where ``/metrics`` comes
    from in an ingress worker (its main process renders the sum); a ``SchedulerNode``
    renders its own. ``repository``: the Triton repository ``/v2/repository/...`` serves
    (None: index lists the deployments, load/unload answer 501)."""
    models = node.catalog
    dataplane = node.dataplane
    limit = node.settings.max_message_bytes
    if metrics_page is None:
        assert isinstance(node, SchedulerNode), "an ingress worker's /metrics comes from its main process"
        registry = metrics.registry(metrics.SchedulerCollector(node))

        async def own_page() -> tuple[bytes, str]:
            return metrics.render(registry)

        metrics_page = own_page
    page = metrics_page

    async def live(request: Request) -> Response:
        return Response(status_code=200 if models.server_live() else 400)

    async def ready(request: Request) -> Response:
        return Response(status_code=200 if models.server_ready() else 503)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "scheduler": node.id})

    async def prometheus(request: Request) -> Response:
        try:
            body, content_type = await page()
        except ShoalError as err:
            return _error(err)
        return Response(body, media_type=content_type)

    @_oip
    async def server_metadata(request: Request) -> Response:
        return _json(models.server_metadata().to_json())

    @_oip
    async def model_metadata(request: Request) -> Response:
        return _json((await models.metadata(*_model(request))).to_json())

    @_oip
    async def model_ready(request: Request) -> Response:
        name, version = _model(request)
        if models.model_ready(name, version):
            return Response(status_code=200)
        return _json({"error": f"model {name!r} is not ready: it has no READY replica"}, 400)

    @_oip
    async def model_config(request: Request) -> Response:
        return _json(await models.config(*_model(request)))

    @_oip
    async def model_stats(request: Request) -> Response:
        name, version = request.path_params.get("name", ""), request.path_params.get("version", "")
        stats = await models.statistics(name, version)
        return _json({"model_stats": [s.to_json() for s in stats]})

    async def json_body(request: Request) -> dict[str, Any]:
        body = await read_body(request, limit)
        if not body.strip():
            return {}
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise InvalidArgument(f"request body is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise InvalidArgument("request JSON must be an object")
        return doc

    @_oip
    async def repository_index(request: Request) -> Response:
        ready_only = _bool_param(await json_body(request), "ready", False, "")
        if repository is not None:
            return _json([e.to_json() for e in await repository.index(ready_only=ready_only)])
        return _json([e.to_json() for e in models.index(ready_only=ready_only)])

    @_oip
    async def repository_change(request: Request) -> Response:
        action = request.path_params["action"]
        if action not in ("load", "unload"):
            return _json({"error": f"unknown repository action {action!r}: load or unload"}, 404)
        if repository is None:
            why = "this scheduler serves no model repository (start it with --model-repository DIR)"
            return _json({"error": f"{action} is not implemented: {why}"}, 501)
        params = (await json_body(request)).get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidArgument("parameters must be an object")
        check_parameters(action, params)
        name, client = request.path_params["name"], request.client
        # While no token exists only this machine's plaintext callers change what runs, as at the head.
        vouched = client is not None and is_loopback(client.host) and not node.settings.tls_dir
        change = repository.load if action == "load" else repository.unload
        await change(name, request.headers.get("authorization"), vouched=vouched)
        return Response(status_code=200)

    @_oip
    async def infer(request: Request) -> Response:
        name, version = _model(request)
        try:
            if not node.router.is_route(name):  # a traffic route's target is drawn in the data plane
                models.spec(name, version)  # 404 before reading the body
            body = await read_body(request, limit)
            req = await parse_infer(
                body,
                request.headers.get("inference-header-content-length"),
                node.settings.max_tensor_elements,
                node.settings.max_json_on_loop_kb * 1024,
            )
        except ShoalError as err:
            dataplane.refused(name, "", "http", err)
            raise
        result = await dataplane.infer(req.call(name, version, request.headers.get(MODEL_ID_HEADER, "")))
        return await respond(req, result, node.settings.max_json_on_loop_kb * 1024)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _json({"error": f"{exc.detail}: {request.method} {request.url.path}"}, exc.status_code)

    async def internal_error(request: Request, exc: Exception) -> Response:
        # A bug: clients still get the protocol's JSON error; the server logs the traceback.
        return _json({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)

    # Inference first: Starlette tries routes in order, and matching the dozen before it was
    # 6% of a REST inference's CPU in the app (cProfile, in-process).
    routes = [Route(f"{p}/infer", infer, methods=["POST"]) for p in _MODEL_PREFIXES]
    routes += [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/models/stats", model_stats, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{name}/{action}", repository_change, methods=["POST"]),
    ]
    for prefix in _MODEL_PREFIXES:
        routes += [
            Route(prefix, model_metadata, methods=["GET"]),
            Route(f"{prefix}/ready", model_ready, methods=["GET"]),
            Route(f"{prefix}/config", model_config, methods=["GET"]),
            Route(f"{prefix}/stats", model_stats, methods=["GET"]),
        ]
    routes += [*generate_routes(models, limit), *openai_routes(node.router, limit, node.dataplane)]
    # Tokens for deployments that ask for them, on every route that names a model: these and
    # those mounted above (the OpenAI API's model is in its body).
    guard = Middleware(InferenceGuard, checker=node.inference_auth, limit=limit)
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        middleware=[guard, Middleware(ShedWhenFull, node=node)],
    )

"""The scheduler's HTTP ingress: the Open Inference Protocol's REST API (KServe V2 / Triton).

Thin routes over :class:`shoal.scheduler.models.ModelCatalog` (inference: ``shoal.http.infer``)::

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
Bodies may be gzip or x-gzip (every member of a multi-member body is read) or deflate
encoded; bytes after the compressed data are refused, and so is a body over
``settings.max_message_mb`` (after decoding). An inference answer is compressed, gzip or
deflate, when the request's ``Accept-Encoding`` prefers it (``shoal.http.coding``), as
Triton's are, if it is 1 KiB or more (``coding.MIN_BYTES``); its
``Inference-Header-Content-Length`` stays the JSON header's length in the uncompressed body.

Every error is ``{"error": "..."}`` with the status from :data:`shoal.errors.HTTP_STATUS`.
A model that is known but not ready answers its ``ready`` route with 400, as Triton does.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from shoal import metrics
from shoal.auth import is_loopback
from shoal.core import limits
from shoal.errors import InvalidArgument, ShoalError
from shoal.http.auth import InferenceGuard, browser_refusal, model_in_path
from shoal.http.browser import names_loopback
from shoal.http.generate import generate_routes
from shoal.http.infer import Dispatch, Infer, bool_param, read_body
from shoal.http.offload import shutdown_parser as shutdown_parser
from shoal.http.openai import openai_routes
from shoal.scheduler.ingress import IngressNode
from shoal.scheduler.models import NO_LOG_SETTINGS, NO_SHARED_MEMORY, NO_TRACE
from shoal.scheduler.node import SchedulerNode
from shoal.scheduler.repository import ModelRepository, check_parameters

Endpoint = Callable[[Request], Awaitable[Response]]

_JSON = "application/json"


def _error(err: ShoalError) -> Response:
    return JSONResponse({"error": err.message}, status_code=err.http_status, headers=err.http_headers)


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


_MODEL_PREFIXES = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")


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
) -> ASGIApp:
    """The scheduler's Starlette app, over the node's catalog and data plane (shared with
    the gRPC servicer, so statistics count both). ``metrics_page``: where ``/metrics`` comes
    from in an ingress worker (its main process renders the sum); a ``SchedulerNode``
    renders its own. ``repository``: the Triton repository ``/v2/repository/...`` serves
    (None: index lists the deployments, load/unload answer 501)."""
    models = node.catalog
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
        return _json(models.server_metadata(repository=repository is not None).to_json())

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
        ready_only = bool_param(await json_body(request), "ready", False, "")
        if repository is not None:
            index = await repository.index(
                ready_only=ready_only, authorization=request.headers.get("authorization")
            )
            return _json([e.to_json() for e in index])
        return _json([e.to_json() for e in models.index(ready_only=ready_only)])

    @_oip
    async def repository_change(request: Request) -> Response:
        action = request.path_params["action"]
        if action not in ("load", "unload"):
            return _json({"error": f"unknown repository action {action!r}: load or unload"}, 404)
        if repository is None:
            why = "this scheduler serves no model repository (start it with --model-repository DIR)"
            return _json({"error": f"{action} is not implemented: {why}"}, 501)
        # A page of another site, in this machine's browser (403), or a body it may send
        # there without a preflight (text/plain, a form's: 400): no bootstrap, as at the head.
        refused = browser_refusal(request.scope)
        if refused is not None:
            raise refused
        params = (await json_body(request)).get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidArgument("parameters must be an object")
        check_parameters(action, params)
        name, client = request.path_params["name"], request.client
        # While no token exists only this machine's plaintext callers change what runs, as at the head.
        vouched = (
            client is not None
            and is_loopback(client.host)
            and not node.settings.tls_dir
            and names_loopback(request.scope)
        )
        change = repository.load if action == "load" else repository.unload
        await change(name, request.headers.get("authorization"), vouched=vouched)
        return Response(status_code=200)

    def unimplemented(why: str) -> Endpoint:
        async def answer(request: Request) -> Response:
            what = f"{request.method} {request.url.path}"
            return _json({"error": f"{limits.shown(what)} is not implemented: {why}"}, 501)

        return answer

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _json({"error": f"{exc.detail}: {request.method} {request.url.path}"}, exc.status_code)

    async def internal_error(request: Request, exc: Exception) -> Response:
        # A bug: clients still get the protocol's JSON error; the server logs the traceback.
        return _json({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)

    # The inference routes are answered by ``infer`` ahead of Starlette (:class:`shoal.http.infer.Dispatch`);
    # these give other methods on them their 405.
    infer = Infer(node)
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
    # Triton's other extensions: what a client of them gets over gRPC (UNIMPLEMENTED), not a 404
    # that reads as a wrong address.
    shm, both = unimplemented(NO_SHARED_MEMORY), ["GET", "POST"]
    routes += [
        Route("/v2/trace/setting", unimplemented(NO_TRACE), methods=both),
        Route("/v2/logging", unimplemented(NO_LOG_SETTINGS), methods=both),
        *(Route(f"/v2/{kind}sharedmemory/{{rest:path}}", shm, methods=both) for kind in ("system", "cuda")),
    ]
    for prefix in _MODEL_PREFIXES:
        routes += [
            Route(f"{prefix}/trace/setting", unimplemented(NO_TRACE), methods=both),
            Route(prefix, model_metadata, methods=["GET"]),
            Route(f"{prefix}/ready", model_ready, methods=["GET"]),
            Route(f"{prefix}/config", model_config, methods=["GET"]),
            Route(f"{prefix}/stats", model_stats, methods=["GET"]),
        ]
    on_loop = node.settings.max_json_on_loop_kb * 1024  # JSON bodies past it: parsed off the loop
    routes += [
        *generate_routes(models, limit, node.settings.sse_keepalive_s, on_loop, node.dataplane.refused),
        *openai_routes(node.router, limit, node.dataplane),
    ]
    # Tokens for deployments that ask for them, on every route that names a model: these and
    # those mounted above (the OpenAI API's model is in its body).
    refused = node.dataplane.refused
    guard = Middleware(
        InferenceGuard, checker=node.inference_auth, limit=limit, refused=refused, on_loop=on_loop
    )
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        middleware=[guard, Middleware(ShedWhenFull, node=node)],
    )
    return Dispatch(InferenceGuard(ShedWhenFull(infer, node), node.inference_auth, limit, refused), app)

"""The head's HTTP surface: the REST API (``/api/...``, described at
``/openapi.json``), Prometheus ``/metrics``, and the dashboard at ``/``.

Routes are thin: they decode, call ``HeadNode``, encode. Errors are
``{"error": "..."}`` with the status from ``shoal.errors.HTTP_STATUS``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal import __version__, metrics
from shoal.auth import RateLimiter, client_of
from shoal.core import limits, stats
from shoal.core.spec import MAX_REPLICAS, DeploymentSpec, parse_spec_json
from shoal.core.traffic import TrafficRoute, parse_route
from shoal.errors import BodyTooLarge, InvalidArgument, NotFound, ShoalError
from shoal.head.node import HeadNode
from shoal.http.auth import ControlGuard
from shoal.store.history import MAX_EVENTS, MAX_REVISION, Revision

STATIC = Path(__file__).parent / "static"
MAX_TAIL_BYTES = 2**62
"""Largest ``tail_bytes`` of a log request (it travels as a protobuf int64)."""

Handler = Callable[[Request], Awaitable[Response]]

MAX_SERIES = 50
"""Most deployments charted by one ``/api/series``: each costs its window's points (2 ms of
the head's event loop for 5 minutes, 7 ms for the hour); every deployment's chart, at 2,000
deployments with traffic, held it 2.8 s and answered 16 MB."""
MAX_STATUS_DEPLOYMENTS = 1000
"""Most deployments of the bounded ``/api/status`` (``?limit=``)."""
MAX_STATUS_REPLICAS = 1000
"""Most replicas listed per deployment by the bounded ``/api/status`` (``?replicas=``)."""
MAX_CONTAINS_CHARS = 256
"""Longest ``contains`` text (a deployment's name is at most 63 characters)."""

BROWSER_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
)
"""On every answer of the head's HTTP port. The API docs page sends requests with the token
the dashboard keeps (an admin's, say), so no other site may frame it and lead a click onto
its "send"; the pages run only the head's own scripts (no inline one: what a client or a
spec author wrote, shown by the dashboard, can never run); and an answer quoting client
text (a replica's log) is never sniffed as HTML."""


class BrowserHeaders:
    """Adds :data:`BROWSER_HEADERS` to every HTTP answer of ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *BROWSER_HEADERS]}
            await send(message)

        await self.app(scope, receive, sending)


def _errors(fn: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        try:
            return await fn(request)
        except ShoalError as err:
            return JSONResponse({"error": err.message}, status_code=err.http_status, headers=err.http_headers)

    return wrapped


MAX_CONTROL_BODY = 64 * 1024
"""Most bytes of the JSON body of a control call that carries no spec (scale, rollback, a
traffic route): each holds a few small fields. Its ``json.loads`` runs on the head's event
loop, which a body of ``max_message_mb`` (64 MiB, the bound before) held 1.8 s."""


async def _body(request: Request, limit: int, why: str = "setting max_message_mb") -> bytes:
    """The body; BodyTooLarge (413) saying ``why`` when it is over ``limit`` bytes (read to
    its end all the same, so the client, sending it all first, gets the answer)."""
    size = 0
    chunks: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise BodyTooLarge(limit, size, why=why)
    return b"".join(chunks)


async def _json_body(request: Request, *, empty: Any = None) -> Any:
    """The body of a control call (no spec) as JSON; InvalidArgument when it is over
    :data:`MAX_CONTROL_BODY` bytes or not JSON. ``empty``: what a body of no bytes is, when
    not None (read whatever its framing: a chunked one has no Content-Length)."""
    body = await _body(request, MAX_CONTROL_BODY, "a control call's body; a spec may take more")
    if empty is not None and not body.strip():
        return empty
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise InvalidArgument(f"request body is not valid JSON: {err}") from None


def _only(doc: Any, fields: tuple[str, ...], shape: str) -> dict[str, Any]:
    """``doc`` when it is an object of no other keys than ``fields``; InvalidArgument naming
    ``shape`` (and a key it does not take) otherwise: a misspelt key, ignored, made a
    rollback to {"revison": 3} go to the previous revision."""
    if not isinstance(doc, dict):
        raise InvalidArgument(f"body must be {shape}")
    unknown = sorted(k for k in doc if k not in fields)
    if unknown:
        shown = ", ".join(limits.shown(repr(k)) for k in unknown[:3])
        raise InvalidArgument(f"body must be {shape}: unknown field(s) {shown}")
    return doc


def head_app(node: HeadNode, limiter: RateLimiter | None = None) -> Starlette:
    """The head's app. Every route but the dashboard's files, ``/healthz`` and ``/openapi.json``
    needs a token once any exists (``shoal.http.auth.ControlGuard``), and takes from the
    client's share of ``limiter`` (the control API's rate limit, shared with gRPC)."""
    head_metrics = metrics.HeadMetrics(node)
    limit = node.settings.max_message_bytes

    async def status(request: Request) -> Response:
        params = request.query_params
        if not {"limit", "contains", "replicas"} & params.keys():
            return JSONResponse((await node.status()).to_json())
        # The dashboard's bounded form: it read every replica of the cluster to draw 200 rows.
        limit = _int_param(request, "limit", MAX_STATUS_DEPLOYMENTS, 1, MAX_STATUS_DEPLOYMENTS)
        replicas = _int_param(request, "replicas", MAX_STATUS_REPLICAS, 0, MAX_STATUS_REPLICAS)
        page = await node.status_page(limit, _contains(request))
        doc = page.status.to_json(max_replicas=replicas)
        doc["more"] = {
            "deployments": page.more_deployments,
            "deployments_with_replicas": page.more_with_replicas,
            "replicas": page.more_replicas,
        }
        return JSONResponse(doc)

    async def schedulers(request: Request) -> Response:
        return JSONResponse((await node.status(only=())).to_json()["schedulers"])

    async def deployments(request: Request) -> Response:
        return JSONResponse((await node.status()).to_json()["deployments"])

    async def deployment(request: Request) -> Response:
        name = request.path_params["name"]
        found = (await node.status(only=(name,))).deployment(name)
        if found is None:
            raise NotFound(f"no deployment named {limits.shown(repr(name))}")
        return JSONResponse(found.to_json())

    async def apply(request: Request) -> Response:
        if_revision = _if_revision(request)
        # Its size is checked before it is parsed (MAX_SPEC_JSON): json.loads of a 64 MiB
        # body would hold the event loop 1.7 s.
        spec = parse_spec_json(await _body(request, limit))
        result = await node.apply(spec, if_revision)
        return JSONResponse(
            {
                "name": spec.name,
                "created": result.created,
                "changed": result.changed,
                "revision": result.revision,
                "change": result.change,
            },
            status_code=201 if result.created else 200,
        )

    async def scale(request: Request) -> Response:
        shape = '{"replicas": N} with N an integer'
        replicas = _only(await _json_body(request), ("replicas",), shape).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool):
            raise InvalidArgument(f"body must be {shape}")
        if_revision = _if_revision(request, ("if_revision", "if_replicas"))
        if_replicas = None
        if "if_replicas" in request.query_params:
            if_replicas = _int_param(request, "if_replicas", 0, 0, MAX_REPLICAS)
        await node.scale(request.path_params["name"], replicas, if_revision, if_replicas)
        return JSONResponse({"name": request.path_params["name"], "replicas": replicas})

    async def delete(request: Request) -> Response:
        await node.delete(request.path_params["name"])
        return JSONResponse({"name": request.path_params["name"], "deleted": True})

    async def events(request: Request) -> Response:
        deployment = request.query_params.get("deployment", "")
        limit = _int_param(request, "limit", MAX_EVENTS, 1, MAX_EVENTS)
        found = await node.lifecycle_events(deployment, limit)
        return JSONResponse({"events": [e.to_dict() for e in found]})

    async def history(request: Request) -> Response:
        name = request.path_params["name"]
        revisions = await node.revisions(name)
        return JSONResponse({"name": name, "revisions": [_revision_doc(r) for r in revisions]})

    async def rollback(request: Request) -> Response:
        # {} (or no body): the previous revision. A "revision" given must be one (>= 1), as
        # /openapi.json says: 0 was taken as "the previous one", so a client's zero rolled
        # back to a revision it had not named. The body is read whatever its length says: a
        # chunked {"revision": 1} (no Content-Length) was taken as no body, the previous one.
        shape = '{} or {"revision": N} with N an integer >= 1'
        doc = _only(await _json_body(request, empty={}), ("revision",), shape)
        number = doc.get("revision", 0)
        if (
            not isinstance(number, int)
            or isinstance(number, bool)
            or number < (1 if "revision" in doc else 0)
        ):
            raise InvalidArgument(f"body must be {shape}")
        rev, _ = await node.rollback(request.path_params["name"], number)
        return JSONResponse(
            {"name": request.path_params["name"], "revision": rev.number, "to": rev.rollback_to}
        )

    async def restart(request: Request) -> Response:
        rev, _ = await node.restart(request.path_params["name"])
        return JSONResponse({"name": request.path_params["name"], "revision": rev.number})

    async def list_routes(request: Request) -> Response:
        found = await node.traffic_routes()
        return JSONResponse({"routes": [_route_doc(r) for r in found]})

    async def set_route(request: Request) -> Response:
        name = request.path_params["name"]
        doc = await _json_body(request)
        if not isinstance(doc, dict):
            raise InvalidArgument('body must be {"targets": {"a": 90, "b": 10}} (and optionally "shadow")')
        if doc.get("name", name) != name:
            raise InvalidArgument(f"the body names route {doc.get('name')!r}, the path {name!r}")
        route = parse_route({**doc, "name": name})
        await node.set_route(route)
        return JSONResponse(_route_doc(route))

    async def delete_route(request: Request) -> Response:
        await node.delete_route(request.path_params["name"])
        return JSONResponse({"name": request.path_params["name"], "deleted": True})

    async def series(request: Request) -> Response:
        recorder = node.series
        raw = request.query_params.get("window_s", "900")
        try:
            window_s = float(raw)
        except ValueError:
            window_s = math.nan
        if not 0 < window_s <= recorder.keep_s:
            raise InvalidArgument(
                f"window_s must be a number of seconds above 0, at most {recorder.keep_s:g}"
            )
        names = request.query_params.getlist("deployment")
        if len(names) > MAX_SERIES:
            raise InvalidArgument(f"at most {MAX_SERIES} deployment names, got {len(names)}")
        if names and {"limit", "contains"} & request.query_params.keys():
            raise InvalidArgument("deployment names the charts: limit and contains choose them, not both")
        # The points a chart of the window reads: those in it, and the error rate's window
        # before its first row; of the deployments named, or at most ``limit`` of them.
        now = time.time()
        view = await node.read_series(
            since=now - window_s - stats.ERROR_WINDOW_S,
            now=now,
            only=names or None,
            limit=_int_param(request, "limit", MAX_SERIES, 1, MAX_SERIES),
            contains=_contains(request),
            shown_after=now - window_s,
        )
        step = recorder.step_for(window_s)
        out = {}
        for name, pts in view.points.items():
            recent = view.latest[name][1]
            chart = stats.chart(pts, now - window_s, now, step, recorder.period_s)
            out[name] = {
                **{f.name: getattr(chart, f.name) for f in fields(chart)},  # fresh lists: no copy
                "window": _window_doc(recent),
            }
        return JSONResponse(
            {
                "now": now,
                "window_s": window_s,
                "step_s": step,
                "keep_s": recorder.keep_s,
                "deployments": out,
                "more": view.more,
                "latest": {
                    name: {"rate": rate, "window": _window_doc(recent)}
                    for name, (rate, recent) in view.latest.items()
                },
            }
        )

    async def logs(request: Request) -> Response:
        try:
            tail = int(request.query_params.get("tail_bytes", "65536"))
        except ValueError:
            tail = -1
        if not 0 <= tail <= MAX_TAIL_BYTES:
            raise InvalidArgument(f"tail_bytes must be an integer from 0 to {MAX_TAIL_BYTES}")
        address = request.client.host if request.client else ""
        client = client_of(node.tokens, request.headers.get("authorization"), address)
        stream = node.read_log(request.path_params["replica_id"], tail, False, client)
        # Ask for the first chunk before answering, so an unknown replica is a 404, not an empty 200.
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            first = b""

        async def rest() -> Any:
            # Closed however the response ends (a client gone too): the read counts toward
            # max_log_streams until then.
            try:
                yield first
                async for chunk in stream:
                    yield chunk
            finally:
                await stream.aclose()

        return StreamingResponse(rest(), media_type="text/plain; charset=utf-8")

    async def prometheus(request: Request) -> Response:
        return Response(head_metrics.text(), media_type=metrics.TEXT_TYPE)

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_schema())

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def dashboard(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def docs(request: Request) -> Response:
        # Interactive docs over /openapi.json; self-contained, so they work offline.
        return FileResponse(STATIC / "docs.html")

    async def api_root(request: Request) -> Response:
        return RedirectResponse("/docs")

    routes = [
        Route("/", dashboard),
        Route("/docs", docs),
        Route("/api", api_root),
        Route("/api/status", _errors(status)),
        Route("/api/schedulers", _errors(schedulers)),
        Route("/api/deployments", _errors(deployments), methods=["GET"]),
        Route("/api/deployments", _errors(apply), methods=["POST"]),
        Route("/api/deployments/{name}", _errors(deployment), methods=["GET"]),
        Route("/api/deployments/{name}", _errors(delete), methods=["DELETE"]),
        Route("/api/deployments/{name}/scale", _errors(scale), methods=["POST"]),
        Route("/api/deployments/{name}/history", _errors(history), methods=["GET"]),
        Route("/api/deployments/{name}/rollback", _errors(rollback), methods=["POST"]),
        Route("/api/deployments/{name}/restart", _errors(restart), methods=["POST"]),
        Route("/api/events", _errors(events)),
        Route("/api/routes", _errors(list_routes), methods=["GET"]),
        Route("/api/routes/{name}", _errors(set_route), methods=["PUT"]),
        Route("/api/routes/{name}", _errors(delete_route), methods=["DELETE"]),
        Route("/api/series", _errors(series)),
        Route("/api/replicas/{replica_id}/logs", _errors(logs)),
        Route("/openapi.json", openapi),
        Route("/metrics", prometheus),
        Route("/healthz", healthz),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    limiter = limiter or RateLimiter(node.settings.control_rate_limit)
    guard = Middleware(
        ControlGuard, tokens=node.tokens, limiter=limiter, max_body=limit, tls=bool(node.settings.tls_dir)
    )
    return Starlette(routes=routes, middleware=[Middleware(BrowserHeaders), guard])


def _contains(request: Request) -> str:
    """The ``contains`` query parameter: text a deployment's name must contain."""
    text = request.query_params.get("contains", "")
    if len(text) > MAX_CONTAINS_CHARS:
        raise InvalidArgument(f"contains must be at most {MAX_CONTAINS_CHARS} characters, got {len(text)}")
    return text


def _window_doc(recent: stats.Window) -> dict[str, Any]:
    return {**asdict(recent), "error_rate": recent.error_rate}


def _if_revision(request: Request, known: tuple[str, ...] = ("if_revision",)) -> int | None:
    """The ``if_revision`` query parameter of an apply or a scale (None: absent). A query
    parameter not in ``known`` is refused: a misspelt ``?if_revison=3`` would change it
    unchecked."""
    unknown = sorted(set(request.query_params) - set(known))
    if unknown:
        are = "is" if len(known) == 1 else "are"
        raise InvalidArgument(
            f"unknown query parameter {unknown[0]!r}: only {' and '.join(known)} {are} known"
        )
    if "if_revision" not in request.query_params:
        return None
    return _int_param(request, "if_revision", 0, 0, MAX_REVISION)


def _int_param(request: Request, key: str, default: int, low: int, high: int) -> int:
    """A query parameter as an integer in [low, high]; InvalidArgument naming it otherwise."""
    raw = request.query_params.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise InvalidArgument(f"{key} must be an integer from {low} to {high}, got {raw!r}")
    return value


def _route_doc(route: TrafficRoute) -> dict[str, Any]:
    """A traffic route as the REST API shows it: name, targets (name -> weight), shadow."""
    doc = route.to_doc()
    del doc["kind"]
    doc.setdefault("shadow", "")
    return doc


def _revision_doc(rev: Revision) -> dict[str, Any]:
    """A revision as the history routes show it (its spec as a document, not JSON text)."""
    doc = rev.to_dict()
    doc["spec"] = json.loads(doc.pop("spec_json"))
    return doc


def openapi_schema() -> dict[str, Any]:
    """The REST API, as OpenAPI 3.1. Specs use the same JSON schema as the YAML files."""
    spec_schema = DeploymentSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    components = {
        "schemas": {
            **spec_schema.pop("$defs", {}),
            "DeploymentSpec": spec_schema,
            "Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
        }
    }

    def ok(description: str, schema: dict[str, Any] | None = None, media: str = "application/json") -> Any:
        content = {media: {"schema": schema or {"type": "object"}}}
        return {"description": description, "content": content}

    def err(description: str) -> Any:
        return {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }

    name = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    array = {"type": "array", "items": {"type": "object"}}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "shoal head API", "version": __version__},
        "paths": {
            "/api/status": {
                "get": {
                    "summary": "Schedulers, deployments with replicas, recent events. With limit, "
                    "contains or replicas: the deployments whose names contain `contains`, at most "
                    "`limit` of them (those with a pending reason or fewer READY replicas than their "
                    "target first, then by name), each listing at most `replicas` of its replicas (not "
                    "READY or with a message first) and counting the others by state in "
                    "`more_replicas`; `more` counts the deployments left out and their replicas",
                    "parameters": [
                        _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_STATUS_DEPLOYMENTS}),
                        _query("contains", {"type": "string", "maxLength": MAX_CONTAINS_CHARS}),
                        _query("replicas", {"type": "integer", "minimum": 0, "maximum": MAX_STATUS_REPLICAS}),
                    ],
                    "responses": {
                        "200": ok("cluster status"),
                        "400": err("invalid limit, contains or replicas"),
                    },
                }
            },
            "/api/schedulers": {
                "get": {"summary": "Schedulers", "responses": {"200": ok("schedulers", array)}}
            },
            "/api/deployments": {
                "get": {"summary": "Deployments", "responses": {"200": ok("deployments", array)}},
                "post": {
                    "summary": "Create or update a deployment. With if_revision: only if the deployment "
                    "is at that revision now (0: only if it does not exist), else 409 and nothing "
                    "changes; without it, the last writer wins",
                    "parameters": [
                        _query("if_revision", {"type": "integer", "minimum": 0, "maximum": MAX_REVISION})
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/DeploymentSpec"}}
                        },
                    },
                    "responses": {
                        "200": ok("updated or unchanged: name, created, changed, revision, change"),
                        "201": ok("created"),
                        "400": err("invalid spec, or invalid if_revision"),
                        "409": err(
                            "if_revision is not the deployment's revision: the message names it; or a new "
                            "deployment past max_deployments (setting max_deployments in the message)"
                        ),
                    },
                },
            },
            "/api/deployments/{name}": {
                "parameters": name,
                "get": {
                    "summary": "One deployment",
                    "responses": {"200": ok("deployment"), "404": err("unknown")},
                },
                "delete": {
                    "summary": "Delete a deployment and stop its replicas",
                    "responses": {"200": ok("deleted"), "404": err("unknown")},
                },
            },
            "/api/deployments/{name}/scale": {
                "parameters": name,
                "post": {
                    "summary": "Set the replica count. With if_revision: only if the deployment is at "
                    "that revision now (its spec did not change since it was read); with "
                    "if_replicas: only if its replica count (its spec's replicas) is that now (it "
                    "was not scaled since it was read); else 409 and nothing changes",
                    "parameters": [
                        _query("if_revision", {"type": "integer", "minimum": 0, "maximum": MAX_REVISION}),
                        _query("if_replicas", {"type": "integer", "minimum": 0, "maximum": MAX_REPLICAS}),
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"replicas": {"type": "integer", "minimum": 0}},
                                    "required": ["replicas"],
                                    "additionalProperties": False,
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": ok("scaled"),
                        "400": err("invalid count, if_revision or if_replicas, or an autoscaled deployment"),
                        "404": err("unknown"),
                        "409": err(
                            "if_revision is not the deployment's revision, or if_replicas not its "
                            "count: the message names it"
                        ),
                    },
                },
            },
            "/api/deployments/{name}/history": {
                "parameters": name,
                "get": {
                    "summary": "The deployment's revisions kept (the last 20), oldest first",
                    "responses": {"200": ok("revisions", _HISTORY), "404": err("unknown")},
                },
            },
            "/api/deployments/{name}/rollback": {
                "parameters": name,
                "post": {
                    "summary": "Apply an earlier revision again, rolling (default: the previous one)",
                    "requestBody": {
                        "required": False,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"revision": {"type": "integer", "minimum": 1}},
                                    "additionalProperties": False,
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": ok("rolled back: the new revision and the one it applies again"),
                        "400": err("invalid revision; no earlier revision; already at that spec"),
                        "404": err("unknown deployment or revision"),
                    },
                },
            },
            "/api/deployments/{name}/restart": {
                "parameters": name,
                "post": {
                    "summary": "Replace the replicas one at a time (they load the model's files again)",
                    "responses": {"200": ok("restarting: the new revision"), "404": err("unknown")},
                },
            },
            "/api/events": {
                "get": {
                    "summary": "Deployment lifecycle events (the last 1000, kept in the store), oldest first",
                    "parameters": [
                        {
                            "name": "deployment",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_EVENTS},
                        },
                    ],
                    "responses": {"200": ok("events", _EVENTS), "400": err("invalid limit")},
                }
            },
            "/api/routes": {
                "get": {
                    "summary": "Traffic routes: names whose requests go to deployments by weight",
                    "responses": {"200": ok("routes", _ROUTES)},
                }
            },
            "/api/routes/{name}": {
                "parameters": name,
                "put": {
                    "summary": "Create or replace a traffic route (weights are integers summing to 100)",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ROUTE_BODY}},
                    },
                    "responses": {
                        "200": ok("the route", _ROUTE),
                        "400": err("invalid route, or a deployment has its name"),
                        "404": err("a target is no deployment"),
                        "409": err("a new route past max_routes (setting max_routes in the message)"),
                    },
                },
                "delete": {
                    "summary": "Delete a traffic route",
                    "responses": {"200": ok("deleted"), "404": err("unknown")},
                },
            },
            "/api/series": {
                "get": {
                    "summary": "Charts over the last window_s seconds (`deployments`): columns of time, "
                    "requests, rate, error rate (over the 60 s before each row; null under 20 requests), "
                    "p50/p99 latency (null without requests); null rows where no report came. Of the "
                    f"deployments named (`deployment`, repeated, at most {MAX_SERIES}); else of at most "
                    f"`limit` (default {MAX_SERIES}) of those whose names contain `contains` and that have "
                    "points in the window: those with errors over the last minute first, then the most "
                    "requests, then by name (`more` counts the others). `latest`: each deployment's "
                    "(every one with a series, or those named) last rate and last minute's requests, "
                    "errors and error rate",
                    "parameters": [
                        _query(
                            "window_s",
                            {"type": "number", "exclusiveMinimum": 0, "maximum": 3600, "default": 900},
                        ),
                        {
                            **_query(
                                "deployment",
                                {"type": "array", "items": {"type": "string"}, "maxItems": MAX_SERIES},
                            ),
                            "explode": True,
                        },
                        _query(
                            "limit",
                            {"type": "integer", "minimum": 1, "maximum": MAX_SERIES, "default": MAX_SERIES},
                        ),
                        _query("contains", {"type": "string", "maxLength": MAX_CONTAINS_CHARS}),
                    ],
                    "responses": {
                        "200": ok("series"),
                        "400": err(
                            "invalid window_s, limit or contains; too many names, or names with limit"
                        ),
                    },
                }
            },
            "/api/replicas/{replica_id}/logs": {
                "parameters": [
                    {"name": "replica_id", "in": "path", "required": True, "schema": {"type": "string"}},
                    {
                        "name": "tail_bytes",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_TAIL_BYTES},
                    },
                ],
                "get": {
                    "summary": "A replica's log, wherever it runs",
                    "responses": {
                        "200": ok("log text", {"type": "string"}, "text/plain"),
                        "400": err("invalid tail_bytes, or an id that cannot be a replica's"),
                        "404": err("unknown replica"),
                    },
                },
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": ok("metrics", {"type": "string"}, "text/plain")},
                }
            },
        },
        "components": components,
    }
    _secure(doc)
    return doc


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """An optional query parameter of the OpenAPI document."""
    return {"name": name, "in": "query", "required": False, "schema": schema}


_ROUTE_BODY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "targets": {
            "type": "object",
            "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 100},
            "description": "deployment name -> weight; the weights sum to 100",
        },
        "shadow": {
            "type": ["string", "null"],
            "description": 'a deployment that gets a copy of each request; "", null or left out: none',
        },
    },
    "required": ["targets"],
}
_ROUTE: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, **_ROUTE_BODY["properties"]},
}
_ROUTES = {"type": "object", "properties": {"routes": {"type": "array", "items": _ROUTE}}}

_EVENTS = {
    "type": "object",
    "properties": {
        "events": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "time": {"type": "number", "description": "unix seconds"},
                    "deployment": {"type": "string"},
                    "kind": {
                        "type": "string",
                        "enum": [
                            "created",
                            "updated",
                            "failed",
                            "rolled_back",
                            "restarted",
                            "scaled",
                            "deleted",
                        ],
                    },
                    "revision": {"type": ["integer", "null"]},
                    "message": {"type": "string"},
                },
                "required": ["time", "deployment", "kind", "revision", "message"],
            },
        }
    },
    "required": ["events"],
}
_HISTORY = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "revisions": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "number": {"type": "integer"},
                    "time": {"type": "number", "description": "unix seconds"},
                    "kind": {"type": "string", "enum": ["created", "updated", "restarted", "rolled_back"]},
                    "spec_hash": {"type": "string", "description": "the hash of what makes replicas differ"},
                    "change": {"type": "string"},
                    "outcome": {"type": "string", "description": "'' or 'failed: <reason>'"},
                    "rollback_to": {
                        "type": "integer",
                        "description": "for a rollback: the revision applied again",
                    },
                    "spec": {"$ref": "#/components/schemas/DeploymentSpec"},
                },
            },
        },
    },
}


def _secure(doc: dict[str, Any]) -> None:
    """Every operation needs a bearer token once tokens exist, and may be rate limited."""
    doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    refusals = {
        "400": {"description": "invalid request (also: a body over the max_message_mb setting)", **error},
        "401": {"description": "no token, or an unknown one (once any token exists)", **error},
        "403": {
            "description": "the token's role is too low; or no token exists yet and a change "
            "comes from another machine than the head's",
            **error,
        },
        "429": {"description": "over the control API's rate limit (setting control_rate_limit)", **error},
    }
    for item in doc["paths"].values():
        for method, op in item.items():
            if method == "parameters":
                continue
            # A token, or none while no token exists (the bootstrap: changes from loopback only).
            op["security"] = [{"bearer": []}, {}]
            op["responses"] = {**refusals, **op["responses"]}

"""Tokens and rate limits on the HTTP servers: two ASGI middlewares over ``shoal.auth``.

* :class:`ControlGuard` guards the head's REST API (everything but the dashboard's static
  files, ``/healthz``, ``/openapi.json`` and ``/docs``, the page listing it): a bearer
  token of role ``read`` for GET, ``deploy`` for changes, once any token exists; while
  none exists, changes only from a caller the transport vouches for: with TLS, one that
  presented a cluster client certificate (role client or head; the HTTPS server asks for
  one, and browsers without one can still read), without TLS, the head's own machine
  (loopback); and the per-client rate limit (429).
* :class:`InferenceGuard` guards a scheduler's ingress: a request for a deployment whose spec
  names tokens (``auth.tokens``) needs one of them. The deployment is the model in the path
  (``/v2/models/NAME/...``, ``/v1/models/NAME``) or, for the OpenAI API's POST routes, the
  ``model`` field of the JSON body (``Authorization: Bearer <api_key>`` is what the OpenAI
  clients send), read only when some deployment names tokens, and not at all when every
  deployment does and the call carries no token the cluster knows (401 at once).
  Routes mounted later on the same app are covered without knowing of it.

Refusals are 401 (no token, unknown token; with ``WWW-Authenticate: Bearer``), 403 (role too
low, token not allowed for the deployment) and 429 (rate limit), with the JSON error shape of
the API refused (``{"error": "..."}``, or OpenAI's ``{"error": {"message", ...}}`` under ``/v1``).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal import auth
from shoal.config import Settings
from shoal.core import limits
from shoal.errors import BodyTooLarge, Code, InvalidArgument, PermissionDenied, ResourceExhausted, ShoalError
from shoal.http.browser import SAFE_METHODS, cross_site, names_loopback
from shoal.http.jsonbody import TooManyValues, parse_json

OPEN_PATHS = ("/", "/healthz", "/openapi.json", "/docs")
OPEN_PREFIXES = ("/static/",)
_OPENAI_CODES = {Code.UNAUTHENTICATED: "invalid_api_key", Code.PERMISSION_DENIED: "permission_denied"}


def _refusal(
    err: ShoalError, *, status: int | None = None, openai: bool = False, close: bool = False
) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.code == Code.UNAUTHENTICATED else {}
    if close:
        headers["Connection"] = "close"
    doc: dict[str, Any] = {"error": err.message}
    if openai:
        kind = "invalid_request_error" if err.code == Code.INVALID_ARGUMENT else err.code.value.lower()
        doc = {
            "error": {
                "message": err.message,
                "type": kind,
                "param": None,
                "code": _OPENAI_CODES.get(err.code),
            }
        }
    return JSONResponse(doc, status_code=status or err.http_status, headers=headers)


def control_role(method: str, path: str) -> auth.Role | None:
    """The role a head REST call needs; None for the open paths."""
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return None
    if method in ("GET", "HEAD", "OPTIONS"):
        return auth.Role.READ
    if path.startswith(("/api/deployments", "/api/routes")):
        return auth.Role.DEPLOY
    return auth.Role.READ  # anything else is answered 404 or 405 once authenticated


# Certificates whose holder may change the cluster before any token exists (TLS only): the
# CLI's and the head's own. A scheduler machine holds replica.key; that vouches for nothing.
BOOTSTRAP_ROLES = ("client", "head")


def client_cert_role(scope: Scope) -> str | None:
    """The shoal role named by the verified client certificate of this connection, if any
    (``shoal.http.server`` puts the ASGI TLS extension's ``client_cert_name`` in the scope)."""
    name = scope.get("extensions", {}).get("tls", {}).get("client_cert_name") or ""
    for part in name.split(","):
        key, _, value = part.strip().partition("=")
        if key == "CN" and value.startswith("shoal-"):
            return value.removeprefix("shoal-")
    return None


class ControlGuard:
    """The head's REST API: tokens by role, and the control API's rate limit.

    ``tls``: the server is HTTPS and asks for (does not require) a cluster client
    certificate; then a certificate of a :data:`BOOTSTRAP_ROLES` role, not the caller's
    address, vouches for changes made while no token exists."""

    def __init__(
        self,
        app: ASGIApp,
        tokens: auth.TokenRegistry,
        limiter: auth.RateLimiter,
        max_body: int,
        tls: bool = False,
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.limiter = limiter
        self.max_body = max_body
        self.tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        role = control_role(method, path)
        if role is None:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        host = client[0] if client else ""
        token = None
        error: ShoalError | None = browser_refusal(scope)
        try:
            token = auth.check_control(
                self.tokens,
                Headers(scope=scope).get("authorization"),
                role,
                what=f"{method} {path}",
                # A caller on this machine, and naming it: a page whose name was pointed at
                # 127.0.0.1 (DNS rebinding) connects from loopback too, but its browser sends
                # the page's own name as Host. A server on loopback refuses such a Host
                # anyway (LoopbackHosts); one on another address in plaintext does not.
                loopback=auth.is_loopback(host) and not self.tls and names_loopback(scope),
                vouched=self.tls and client_cert_role(scope) in BOOTSTRAP_ROLES,
            )
        except ShoalError as err:
            error = error or err
        if not self.limiter.allow(auth.client_key(token, host)):
            error = ResourceExhausted(self.limiter.message)
        if error is not None:
            whole = await skip_body(scope, receive)
            status = 429 if error.code == Code.RESOURCE_EXHAUSTED else None
            await _refusal(error, status=status, close=not whole)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def browser_refusal(scope: Scope) -> ShoalError | None:
    """A change a web page of another site may have sent (``shoal.http.browser``): 403 when
    the browser says it comes from another site; 400 when its body is declared as another
    type than JSON (``text/plain`` or a form's: what a page may send to any site without
    a preflight). A body of no declared type is taken as JSON, as before (a chunked ``{}``);
    a browser sends one so, from a page of another site, only with its ``Origin``."""
    if scope["method"] in SAFE_METHODS:
        return None
    why = cross_site(scope)
    if why is not None:
        return PermissionDenied(why)
    kind = Headers(scope=scope).get("content-type")
    if kind is None or kind.partition(";")[0].strip().lower() == "application/json":
        return None
    got = limits.shown(kind)
    return InvalidArgument(
        f"{scope['method']} {limits.shown(scope['path'])}: the body must be sent as Content-Type: "
        f"application/json, got Content-Type {got} (curl: -H 'Content-Type: application/json')"
    )


def model_in_path(path: str) -> str | None:
    """The model a scheduler ingress path names, if any (not ``/v2/models/stats``)."""
    for prefix in ("/v2/models/", "/v1/models/"):
        if path.startswith(prefix):
            rest = path[len(prefix) :]
            if prefix == "/v1/models/":
                return rest or None
            name = rest.split("/", 1)[0]
            if not name or (name == "stats" and rest == "stats"):
                return None
            return name
    return None


async def model_in_body(
    body: bytes, on_loop: int, scope: MutableMapping[str, Any] | None = None
) -> str | None:
    """The ``model`` field of a JSON object body, if it has a string one. Parsed once: with
    ``scope``, the route takes what was parsed from there (:func:`shoal.http.jsonbody.parse_json`,
    off the event loop past ``on_loop`` bytes), a refusal of the body included."""
    try:
        doc = await parse_json(body, on_loop, scope)
    except TooManyValues as err:
        return err.model or None  # its token is checked before the route refuses it
    except ShoalError:
        return None  # the route answers the refusal
    model = doc.get("model")
    return model if isinstance(model, str) else None


Refused = Callable[[str, str, str, ShoalError], None]
"""``refused(model, request id, door, error)``: counts and logs a refused inference request
(``shoal.scheduler.dataplane.DataPlane.refused``)."""


class InferenceGuard:
    """A scheduler's ingress: the deployment's tokens (``shoal.auth.InferenceAuth``). An
    inference request (a POST) refused for its token is told to ``refused``, so that it is
    counted (outcomes ``unauthenticated`` and ``denied``) and logged as every refusal is."""

    def __init__(
        self,
        app: ASGIApp,
        checker: auth.InferenceAuth,
        limit: int,
        refused: Refused | None = None,
        on_loop: int = Settings.max_json_on_loop_kb * 1024,
    ) -> None:
        self.app = app
        self.checker = checker
        self.limit = limit
        self.refused = refused
        self.on_loop = on_loop  # an OpenAI body past it is parsed off the event loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        openai = path.startswith("/v1/")
        model = model_in_path(path)
        if model is None and openai and scope["method"] == "POST" and self.checker.any_locked():
            # The model is in the body: read it only for a caller some deployment could take.
            try:
                self.checker.check_any(Headers(scope=scope).get("authorization"))
            except ShoalError as err:
                whole = await skip_body(scope, receive)
                await _refusal(err, openai=True, close=not whole)(scope, receive, send)
                return
            try:
                body = await _read(receive, self.limit)
            except ShoalError as err:
                await _refusal(err, openai=True)(scope, receive, send)
                return
            model = await model_in_body(body, self.on_loop, scope)
            receive = _replay(body, receive)
        if model is not None:
            try:
                self.checker.check(model, Headers(scope=scope).get("authorization"))
            except ShoalError as err:
                if self.refused is not None and scope["method"] == "POST":
                    self.refused(model, "", "openai" if openai else "http", err)
                whole = await skip_body(scope, receive)
                await _refusal(err, openai=openai, close=not whole)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _read(receive: Receive, limit: int) -> bytes:
    """The whole request body, at most ``limit`` bytes (the rest is read and dropped)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    if size > limit:
        raise BodyTooLarge(limit, size)
    return b"".join(chunks)


async def drain(receive: Receive, limit: int) -> None:
    """Read what is left of the body (up to ``limit`` bytes) before refusing the request, so
    that a client that sends all of it before reading the answer gets the answer."""
    size = 0
    while size <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


REFUSED_BODY_BYTES = 64 * 1024
"""Most of a refused request's body (no token, an unknown or a low one, the rate limit) that
is read before the refusal: a body this small, as most control calls and small inference
requests are, is read and dropped so that a client that sends all of it before it reads gets
its answer and keeps its connection; of a larger one nothing is read, and the connection is
closed after the answer. Before, a refusal read up to ``max_message_mb`` (64 MiB) of the
body, and the server then read and dropped the rest: a caller without a token made the head
or a scheduler read every byte it sent (300 MB for a 300 MB POST)."""


async def skip_body(scope: Scope, receive: Receive, limit: int = REFUSED_BODY_BYTES) -> bool:
    """Read and drop a refused request's body if it is at most ``limit`` bytes. Returns
    whether the body is all read; False: the connection must be closed after the answer
    (its body is not read: a declared ``Content-Length`` over ``limit`` is not waited for,
    and a client that asked ``Expect: 100-continue`` is not told to send it)."""
    length = Headers(scope=scope).get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        return False
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return True
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
        if size > limit:
            return False


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then whatever the client sends next (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay

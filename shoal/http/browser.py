"""What shoal's HTTP servers refuse from web browsers: requests that a page of another site
makes the operator's own browser send.

* **Cross-site changes.** A page on any site may make the browser POST to
  ``http://127.0.0.1:8471`` without asking first (no CORS preflight), as long as the
  request looks like a form's: ``Content-Type: text/plain`` (a JSON spec as text), no
  custom header. The head answered such an apply 201 from a loopback peer, with no token,
  during the bootstrap window: any page the operator opened could deploy code. A request
  that changes something (a method other than GET, HEAD or OPTIONS) is refused 403 when
  the browser says it comes from another page (``Sec-Fetch-Site`` other than
  ``same-origin`` or ``none``) or, from a browser that does not send that header, when
  its ``Origin`` is not the server's own (:func:`cross_site`). The head's REST API
  further takes a change's body only as ``Content-Type: application/json``
  (``shoal.http.auth.ControlGuard``), which a page can send elsewhere only after a
  preflight that shoal never grants. Clients that are not browsers (the CLI, curl,
  Python) send neither header and are not affected.
* **DNS rebinding.** A page whose name its owner points at 127.0.0.1 after it loaded
  reaches a loopback port as "its own" site, reading the answers, but its requests carry
  its own name: ``Host: evil.example:8471``. A server listening on loopback in plaintext
  answers only requests for a loopback name (:func:`loopback_host`, :class:`LoopbackHosts`,
  installed by ``shoal.http.server.HttpServer``). Under TLS a browser does not talk to a
  server whose certificate does not name the page's host, and with ``--insecure`` on
  another address the names are whatever the network calls the machine: there tokens
  decide (docs/security.md).
"""

from __future__ import annotations

import functools
import ipaddress
import json
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from shoal.core import limits

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods that change nothing: a page of another site may send them (it cannot read the
answer, which carries no CORS header)."""

_SAME = frozenset({"same-origin", "none"})  # none: typed in, a bookmark: no page asked
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _host_port(netloc: str, scheme: str) -> tuple[str, int] | None:
    """``host[:port]`` as (lower-case host without brackets, port or the scheme's default);
    None when it does not parse."""
    try:
        parts = urlsplit(f"//{netloc}")
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    return host, port if port is not None else _DEFAULT_PORTS.get(scheme, 0)


def cross_site(scope: Scope) -> str | None:
    """Why a request that changes something comes from a page of another site (the text of
    a 403), or None when it does not, or changes nothing."""
    if scope["method"] in SAFE_METHODS:
        return None
    headers = Headers(scope=scope)
    origin = headers.get("origin")
    site = headers.get("sec-fetch-site")
    if site is not None:
        if site.strip().lower() in _SAME:
            return None
        where = f"a {limits.shown(site)} page"
    elif origin is None:
        return None  # not a browser, or one that says nothing of where the request comes from
    else:
        scheme = scope.get("scheme", "http")
        parts = urlsplit(origin) if origin != "null" else None
        ours = _host_port(headers.get("host", ""), scheme)
        theirs = _host_port(parts.netloc, parts.scheme) if parts is not None else None
        if theirs is not None and theirs == ours:
            return None
        where = "a page of another origin"
    shown = limits.shown(origin) if origin is not None else "another site"
    what = limits.shown(f"{scope['method']} {scope['path']}")
    return (
        f"refusing {what} from {where} ({shown}): a browser may change this server only from its "
        "own pages; clients that are not browsers (the CLI, curl, shoal.api) send no Origin"
    )


@functools.lru_cache(maxsize=256)
def loopback_host(host: str) -> bool:
    """Whether a Host header names this machine's loopback: ``localhost`` (or a name under
    ``.localhost``, which browsers resolve to loopback themselves), an address in
    127.0.0.0/8 or ``[::1]``, with any port. Remembered for the last 256 Hosts seen: a
    loopback server's every request asks it (:class:`LoopbackHosts`), and parsing took
    5.6 us of an HTTP inference's CPU; its clients send a handful of Hosts."""
    parsed = _host_port(host, "http")
    if parsed is None:
        return False
    name = parsed[0].rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def names_loopback(scope: Scope) -> bool:
    """Whether a request's ``Host`` names this machine's loopback (:func:`loopback_host`;
    none, HTTP/1.0: as :class:`LoopbackHosts` lets it pass). The loopback bootstrap asks it
    besides the caller's address: a page whose name was pointed at 127.0.0.1 connects from
    loopback too, but its browser sends the page's name, and a server on another address
    in plaintext (``--insecure``) checks no Host."""
    host = Headers(scope=scope).get("host")
    return host is None or loopback_host(host)


class LoopbackHosts:
    """Refuses (403) every HTTP request whose ``Host`` is not a loopback name
    (:func:`loopback_host`): a server on loopback in plaintext is reached so only by a
    page of another site whose name was pointed at 127.0.0.1. A request without Host
    (HTTP/1.0) passes: browsers always send one."""

    def __init__(self, app: ASGIApp, address: str) -> None:
        self.app = app
        self.address = address

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host")
            if host is not None and not loopback_host(host):
                message = (
                    f"Host {limits.shown(host)} is not a name of this machine's loopback: this server "
                    f"listens on {self.address} in plaintext and answers requests for localhost, "
                    "127.0.0.1 or [::1] only (a web page whose name was pointed at 127.0.0.1 "
                    "sends its own name)"
                )
                await _refuse(scope, receive, send, 403, message)
                return
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    """Answer ``{"error": message}``; the body is read (up to 64 KiB) or the connection closed."""
    from shoal.http.auth import skip_body  # auth imports this module

    whole = await skip_body(scope, receive)
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if not whole:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

"""The HTTP server every component runs: uvicorn on a socket shoal binds itself.

Every connection is bounded (:class:`HttpLimits`), because uvicorn alone holds a
connection that never finishes its request head for ever (its keep-alive timer runs only
between requests, and any byte stops it): a connection must send a whole request head
within ``header_timeout_s`` of opening or of its first byte after an answer (else 408 and
close), may sit idle between requests ``idle_timeout_s`` (then it is closed), and past
``max_connections`` open connections in this process a new one gets 503 and is closed at
once, while those already open are served as before.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from shoal import certs
from shoal.config import Settings

log = logging.getLogger("shoal.http")

_REASONS = {429: b"Too Many Requests", 503: b"Service Unavailable"}


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP server process allows a connection (see the module's docstring)."""

    header_timeout_s: float = 10.0
    idle_timeout_s: float = 15.0
    max_connections: int = 4096

    @classmethod
    def of(cls, settings: Settings) -> HttpLimits:
        return cls(
            settings.http_header_timeout_s, settings.http_idle_timeout_s, settings.http_max_connections
        )


#: Reads (request heads, body parts) one server handles per event-loop pass; more wait, in
#: arrival order, for later passes. See :class:`_Intake`.
READS_PER_PASS = 16


class _Intake:
    """Bounds the HTTP reads handled in one event-loop pass, first come first served.

    Why: an admitted request needs several loop passes (to a replica and back, then the
    next queued one's turn), and a pass runs everything ready. Under a flood of many
    clients every pass parsed and answered hundreds of requests, so each pass took over
    100 ms and the replica sat idle between requests (``bench/overload.py``: goodput of a
    20 ms model fell from about 50 to 3 requests a second). With at most ``per_pass``
    reads a pass, a pass stays short, the admitted requests move on, and the waiting
    connections are taken in turn (the total rate of reads is unchanged).
    """

    def __init__(self, per_pass: int) -> None:
        self.per_pass = per_pass
        self.left = per_pass
        self.waiting: deque[_BoundedH11] = deque()
        self._next_pass: asyncio.Handle | None = None

    def take(self, loop: asyncio.AbstractEventLoop) -> bool:
        """True: handle this read now. False: the caller waits in :attr:`waiting`."""
        if self._next_pass is None:
            self._next_pass = loop.call_soon(self._refill, loop)
        if self.left > 0 and not self.waiting:
            self.left -= 1
            return True
        return False

    def _refill(self, loop: asyncio.AbstractEventLoop) -> None:
        self._next_pass = None
        self.left = self.per_pass
        while self.waiting and self.left > 0:
            self.left -= 1
            self.waiting.popleft().resume_intake()
        if self.waiting:
            self._next_pass = loop.call_soon(self._refill, loop)


#: A request head's method and (decoded) path -> the (status, message) to refuse it with at
#: once, before its body is read and without running the app; None: the app answers it.
Refuse = Callable[[str, str], "tuple[int, str] | None"]


class _Config(uvicorn.Config):
    """uvicorn's Config, carrying the limits to every connection's protocol."""

    def __init__(self, app: Any, limits: HttpLimits, refuse: Refuse | None, **kwargs: Any) -> None:
        super().__init__(app, http=_BoundedH11, **kwargs)
        self.limits = limits
        self.refuse = refuse
        self.intake = _Intake(READS_PER_PASS)


class _Refusing:
    """The h11 connection as uvicorn's protocol sees it, except that a request ``refuse``
    names is answered here, from its head, and never reaches uvicorn (nor the app). The rest
    of that request (its body) comes to uvicorn after an answer was sent, which it drops,
    as it does for any request answered early."""

    def __init__(self, conn: h11.Connection, refuse: Refuse, answer: Callable[[int, str], None]) -> None:
        self._conn = conn
        self._refuse = refuse
        self._answer = answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def next_event(self) -> Any:
        while True:
            event = self._conn.next_event()
            if type(event) is not h11.Request:
                return event
            path = unquote(event.target.partition(b"?")[0].decode("ascii", "replace"))
            refusal = self._refuse(event.method.decode("ascii", "replace"), path)
            if refusal is None:
                return event
            self._answer(*refusal)


def _raw_answer(status: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"error": message}).encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"{extra}connection: close\r\n\r\n"
    ).encode() + body


#: The longest request head the fast path reads (h11's own limit).
_MAX_HEAD = 16 * 1024
#: Headers that change how a connection continues: a request carrying one goes through h11.
_TO_H11 = frozenset({b"transfer-encoding", b"connection", b"expect", b"upgrade"})


def _plain_request(data: bytes) -> tuple[str, str, int] | None:
    """The method, decoded path and length in bytes of the request at the start of ``data``
    when it is a plain one, all there: HTTP/1.1 with a Host, framed by at most one
    Content-Length, and none of :data:`_TO_H11`. None otherwise (h11 reads it)."""
    end = data.find(b"\r\n\r\n", 0, _MAX_HEAD)
    if end < 0:
        return None
    lines = data[:end].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1":
        return None
    length = -1
    host = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name[-1] in b" \t" or name[0] in b" \t":
            return None  # malformed, or an obsolete folded line: h11 answers 400
        name = name.lower()
        if name == b"content-length":
            value = value.strip()
            if length >= 0 or not value.isdigit() or len(value) > 15:
                return None
            length = int(value)
        elif name == b"host":
            host = True
        elif name in _TO_H11:
            return None
    total = end + 4 + max(length, 0)
    if not host or len(data) < total:
        return None
    path = unquote(parts[1].partition(b"?")[0].decode("ascii", "replace"))
    return parts[0].decode("ascii", "replace"), path, total


@functools.lru_cache(maxsize=256)
def _refusal(status: int, message: str) -> bytes:
    """A refusal's whole answer (kept: under a flood the same few messages come again and again)."""
    body = json.dumps({"error": message}).encode()
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"retry-after: 1\r\n\r\n" % (status, _REASONS.get(status, b""), len(body))
    )
    return head + body


class _BoundedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a request-head timeout and a connection cap.

    The head timer runs while the connection waits for a request head: from the
    connection's start, and from the first byte of each later head (between requests
    uvicorn's own keep-alive timer, set to ``idle_timeout_s``, closes an idle connection).
    Bytes that trickle in do not restart it, so a head sent a byte at a time is cut off.
    """

    _last_cap_log = 0.0

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        assert isinstance(config, _Config)
        self._limits = config.limits
        # uvicorn types it int; call_later takes any number of seconds.
        self.timeout_keep_alive = config.limits.idle_timeout_s  # type: ignore[assignment]
        self._intake = config.intake
        self._h11 = self.conn
        self._refuse = config.refuse
        self._pending = bytearray()  # read while waiting for a turn in the intake
        if config.refuse is not None:
            self.conn = cast(h11.Connection, _Refusing(self.conn, config.refuse, self._answer_at_once))
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._cert_name: str | None = None  # the client certificate's subject, if verified
        self._deferred = False  # reads are buffered, waiting for a turn in the intake

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        cap = self._limits.max_connections
        if cap > 0 and len(self.connections) >= cap:
            # Refused before it joins ``connections``: those already open keep being served.
            self._refused = True
            self._log_cap(cap)
            transport.write(
                _raw_answer(
                    "503 Service Unavailable",
                    f"this server has {cap} connections open, its limit (setting http_max_connections)",
                    "retry-after: 1\r\n",
                )
            )
            transport.close()
            return
        super().connection_made(transport)
        self._cert_name = _client_cert_name(transport.get_extra_info("peercert"))
        self._start_head_timer()

    @classmethod
    def _log_cap(cls, cap: int) -> None:
        now = time.monotonic()
        if now - cls._last_cap_log >= 10.0:  # a flood of connections is not a flood of log lines
            cls._last_cap_log = now
            log.warning("refusing new HTTP connections: %d open (setting http_max_connections)", cap)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        if not self._refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._head_timer is None and self._h11.their_state is h11.IDLE:
            self._start_head_timer()  # the first byte of a new head after an answer
        if self._deferred or not self._intake.take(self.loop):
            # Kept until this connection's turn (and not read meanwhile).
            self._unset_keepalive_if_required()
            self._pending += data
            if not self._deferred:
                self._deferred = True
                self.transport.pause_reading()
                self._intake.waiting.append(self)
            return
        self._receive(data)

    def resume_intake(self) -> None:
        """This connection's turn: handle what it sent meanwhile, and read again."""
        self._deferred = False
        if self.transport.is_closing():
            return
        if not self.flow.read_paused:  # uvicorn's own flow control may want it paused still
            self.transport.resume_reading()
        data = bytes(self._pending)
        self._pending.clear()
        self._receive(data)

    def _receive(self, data: bytes) -> None:
        if self._refuse is not None:
            data = self._refuse_plain(self._refuse, data)
        if data:
            super().data_received(data)

    def _refuse_plain(self, refuse: Refuse, data: bytes) -> bytes:
        """Answer the plain requests (:func:`_plain_request`) at the start of ``data`` that
        ``refuse`` names, without h11 or uvicorn; returns the rest, for them.

        Why: under a flood of requests to a full deployment, h11 parsing each head and
        writing each answer was most of the scheduler's loop (``bench/overload.py``), which
        made refusals slow and starved the admitted requests. Here a refusal is a scan of
        its head and one write. Only between requests (h11 idle, nothing buffered), so h11
        never sees the requests answered here and stays in step."""
        conn = self._h11
        answered = False
        while (
            data and conn.their_state is h11.IDLE and conn.our_state is h11.IDLE and not conn.trailing_data[0]
        ):
            request = _plain_request(data)
            if request is None:
                break
            method, path, length = request
            refusal = refuse(method, path)
            if refusal is None:
                break
            self._unset_keepalive_if_required()
            self.transport.write(_refusal(*refusal))
            self.server_state.total_requests += 1
            answered = True
            data = data[length:]
        if answered:
            self._stop_head_timer()
            if data:
                self._start_head_timer()  # the start of the next head is here
            else:
                self._arm_idle_timer()
        return data

    def handle_events(self) -> None:
        super().handle_events()
        scope = getattr(self, "scope", None)
        if scope is not None and "tls" not in scope.setdefault("extensions", {}):
            # The ASGI TLS extension's client_cert_name, for the request just started (its
            # task runs after this returns): what certificate, if any, this connection showed.
            scope["extensions"]["tls"] = {"client_cert_name": self._cert_name}
        conn = self._h11
        if conn.their_state is not h11.IDLE:
            self._stop_head_timer()  # the head is in; the app's own deadlines take over
        elif conn.our_state is h11.IDLE:
            self._arm_idle_timer()

    def _arm_idle_timer(self) -> None:
        """Between requests after one refused at once (uvicorn arms this timer only when the
        app answers)."""
        if (
            self.timeout_keep_alive_task is None
            and self._head_timer is None
            and not self.transport.is_closing()
        ):
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def _answer_at_once(self, status: int, message: str) -> None:
        """Answer the request whose head just came, in one write, without the app."""
        self._stop_head_timer()  # its head is in
        conn = self._h11
        body = json.dumps({"error": message}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"),
        ]
        out = conn.send(h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b"")))
        out = (out or b"") + (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
        self.transport.write(out)
        self.server_state.total_requests += 1
        if conn.our_state is h11.MUST_CLOSE:
            conn.send(h11.ConnectionClosed())
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._start_head_timer()  # part of a pipelined head is already here

    def _start_head_timer(self) -> None:
        if self._head_timer is None and self._limits.header_timeout_s > 0:
            self._head_timer = self.loop.call_later(self._limits.header_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self._unset_keepalive_if_required()
        self.transport.write(
            _raw_answer(
                "408 Request Timeout",
                f"no complete request head within {self._limits.header_timeout_s:g}s "
                "(setting http_header_timeout_s)",
            )
        )
        self.transport.close()


def _client_cert_name(peercert: Any) -> str | None:
    """The subject of a verified client certificate as ``CN=...`` (RFC 4514's order is not
    needed: shoal reads the common name); None when the client sent none."""
    if not peercert:
        return None
    parts = [f"{key}={value}" for rdn in peercert.get("subject", ()) for key, value in rdn]
    return ",".join(p.replace("commonName=", "CN=") for p in parts) or None


class _KeepConnection:
    """An error raised after the answer was sent (Starlette's error middleware re-raises
    once its 500 is out) is logged here, not passed to uvicorn, which would close the
    connection under the client's next request on it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        answered = False

        async def sending(message: Any) -> None:
            nonlocal answered
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True

        try:
            await self.app(scope, receive, sending)
        except Exception:
            if not answered:
                raise
            log.exception("error after answering %s %s", scope.get("method"), scope.get("path"))


class HttpServer:
    """uvicorn on a socket we bind ourselves, so port 0 works and the port is known."""

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        tls: certs.Files | None = None,
        *,
        reuse_port: bool = False,
        limits: HttpLimits | None = None,
        refuse: Refuse | None = None,
    ) -> None:
        """``refuse``: requests to answer from their head alone (see :data:`Refuse`)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # several ingress processes share the port; the kernel spreads connections
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self.sock.bind((host, port))
        except OSError as err:
            self.sock.close()
            from shoal.errors import Unavailable

            raise Unavailable(f"cannot listen on {_addr(host, port)}: {err.strerror}") from None
        self.port = self.sock.getsockname()[1]
        # HTTPS with the component's certificate when TLS is on. A client certificate signed by
        # the cluster CA is asked for, not required: browsers and HTTP clients authenticate
        # with tokens, and the head takes a client certificate as the bootstrap credential
        # before any token exists (shoal.http.auth.ControlGuard).
        self.scheme = "https" if tls is not None else "http"
        config = _Config(
            _KeepConnection(app),
            limits or HttpLimits(),
            refuse,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
            ssl_certfile=str(tls.cert) if tls is not None else None,
            ssl_keyfile=str(tls.key) if tls is not None else None,
            ssl_ca_certs=str(tls.ca) if tls is not None else None,
            ssl_cert_reqs=ssl.CERT_OPTIONAL if tls is not None else ssl.CERT_NONE,
        )
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="http")
        while not self.server.started and not self._task.done():
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task
        self.sock.close()

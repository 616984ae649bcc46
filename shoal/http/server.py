"""The HTTP server every component runs: uvicorn on a socket shoal binds itself, parsing
HTTP/1.1 with httptools (llhttp) by default, or h11 (``HttpServer(parser="h11")``).

Every connection is bounded (:class:`HttpLimits`), because uvicorn alone holds a
connection that never finishes its request head for ever (its keep-alive timer runs only
between requests, and any byte stops it): a connection must send a whole request head
within ``header_timeout_s`` of opening or of its first byte after an answer (else 408 and
close; time its bytes wait for their turn in the server's intake does not count), may sit
idle between requests ``idle_timeout_s`` (then it is closed), must take some of its answer's
bytes every ``idle_timeout_s`` once the server's buffer for it is full (else it is dropped,
and the request behind it sees its client gone), and past ``max_connections``
open connections in this process a new one gets 503 and is closed at once, while those
already open are served as before.

Under TLS shoal accepts connections itself (:meth:`HttpServer._accept_tls`) rather than
leaving it to the event loop's server: a connection whose first byte does not open a TLS
handshake gets an unencrypted 400 saying the port speaks HTTPS (the handshake alone failed
on it, and the client read an empty reply), a handshake must end within
``header_timeout_s``, and connections in their handshake count toward ``max_connections``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import inspect
import json
import logging
import socket
import ssl
import sys
import termios
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast
from urllib.parse import unquote

import h11
import httptools
import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from shoal import certs, certwatch
from shoal.auth import is_loopback
from shoal.config import Settings
from shoal.core.tasks import cancel_and_wait
from shoal.http.browser import LoopbackHosts

log = logging.getLogger("shoal.http")

T = TypeVar("T")

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


class LogWindow:
    """At most one log line per ``period_s`` for one kind of event that clients can repeat
    at will: :meth:`take` says whether to write one now, and how many went unwritten."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._last = -period_s
        self._skipped = 0

    def take(self) -> int | None:
        """None: not now (counted); else the events not written since the last line."""
        now = time.monotonic()
        if now - self._last < self.period_s:
            self._skipped += 1
            return None
        skipped, self._last, self._skipped = self._skipped, now, 0
        return skipped


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
        self.waiting: deque[_Bounds] = deque()
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

    def __init__(
        self, app: Any, limits: HttpLimits, refuse: Refuse | None, parser: str, **kwargs: Any
    ) -> None:
        super().__init__(app, http=_BoundedHttpTools if parser == "httptools" else _BoundedH11, **kwargs)
        self.limits = limits
        self.refuse = refuse
        self.intake = _Intake(READS_PER_PASS)


class _Refusing:
    """The h11 connection as uvicorn's protocol sees it, except that a request whose head is
    over :data:`_MAX_HEAD` bytes is refused (``bad_head``: 400 and close), and a request
    ``refuse`` names is answered here, from its head; neither reaches uvicorn (nor the app).
    The rest of a request answered (its body) comes to uvicorn after the answer was sent,
    which it drops, as it does for any request answered early."""

    def __init__(
        self,
        conn: h11.Connection,
        refuse: Refuse | None,
        answer: Callable[[int, str], None],
        bad_head: Callable[[str], None],
    ) -> None:
        self._conn = conn
        self._refuse = refuse
        self._answer = answer
        self._bad_head = bad_head

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def next_event(self) -> Any:
        while True:
            event = self._conn.next_event()
            if type(event) is not h11.Request:
                return event
            # h11 bounds only a head still incomplete: one that came whole in a read is parsed
            # whatever its size.
            if _head_size(event.method, event.target, event.headers) > _MAX_HEAD:
                self._bad_head(f"the request head is over {_MAX_HEAD} bytes")
                return h11.NEED_DATA  # the connection is closing: nothing more is read
            if self._refuse is None:
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


def _head_size(method: bytes, target: bytes, headers: Any) -> int:
    """The bytes of a parsed request head, as sent without optional white space: its request
    line, each ``name: value`` line and the blank line after them."""
    return len(method) + len(target) + 13 + sum(len(name) + len(value) + 4 for name, value in headers)


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


#: The ASGI scope's extension by which an app learns that its request's client went away
#: (:class:`Disconnect`, :func:`unless_gone`).
DISCONNECT = "shoal.disconnect"


class ClientGone(BaseException):
    """The request's client disconnected before its answer: nothing is sent, nothing logged.

    A BaseException, as a cancellation is: Starlette's error middleware (which catches
    Exception) lets it pass, and the outermost app (:class:`_KeepConnection`) ends the
    request quietly."""


class Disconnect:
    """One connection's :data:`DISCONNECT` extension: while an app awaits work for the
    request (:func:`unless_gone`), the connection's loss cancels that work.

    Why: uvicorn only tells an app of a lost client when it calls ``receive()``, which a
    request whose body is read has no reason to do. REST inference requests whose clients
    hung up kept their places in the deployment's queue and ran anyway, while other
    clients were refused (six clients of a 2 s model that left after 0.5 s: 503s for
    1.5 s, and the next request answered 11.5-13.5 s later); over gRPC a client's cancel
    already cancels the call. A connection serves one request at a time (uvicorn holds
    pipelined ones back until the answer is out), so one task is watched at most."""

    __slots__ = ("_task", "gone")

    def __init__(self) -> None:
        self._task: asyncio.Task[Any] | None = None
        self.gone = False

    def lose(self) -> None:
        """The connection is lost: cancel the task waiting on the work, if any."""
        self.gone = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel(DISCONNECT)

    async def run(self, work: Awaitable[T]) -> T:
        task = asyncio.current_task()
        if self.gone or task is None:
            if inspect.iscoroutine(work):
                work.close()  # never awaited: no warning about it
            if self.gone:
                raise ClientGone
            return await work
        self._task = task
        try:
            return await work
        except asyncio.CancelledError:
            if self.gone and self._task is None and task.uncancel() == 0:
                raise ClientGone from None  # this cancel was lose()'s alone
            raise
        finally:
            if self._task is task:
                self._task = None


def client_gone(scope: Any) -> bool:
    """Whether the request's client has disconnected (False without the extension)."""
    disconnect = scope.get("extensions", {}).get(DISCONNECT)
    return disconnect is not None and bool(disconnect.gone)


async def unless_gone(scope: Any, work: Awaitable[T]) -> T:
    """``await work``; if the request's client disconnects first, ``work`` is cancelled and
    :class:`ClientGone` raised (the request is dropped, as a cancelled gRPC call is). On a
    server without the extension (a test's ASGI client), just ``await work``."""
    disconnect = scope.get("extensions", {}).get(DISCONNECT)
    if disconnect is None:
        return await work
    return await cast(Disconnect, disconnect).run(work)


class _Bounds:
    """What shoal adds to uvicorn's HTTP/1.1 protocols (:class:`_BoundedH11`,
    :class:`_BoundedHttpTools`): a request-head timeout, a connection cap, the intake's turns
    (:class:`_Intake`) and refusals from a plain request's bytes (:meth:`_refuse_plain`).

    The head timer runs while the connection waits for a request head: from the
    connection's start, and from the first byte of each later head (between requests
    uvicorn's own keep-alive timer, set to ``idle_timeout_s``, closes an idle connection).
    Bytes that trickle in do not restart it, so a head sent a byte at a time is cut off.

    A protocol says when it waits for a head (:meth:`_awaiting_head`), when it is between
    requests with nothing buffered and no answer being written (:meth:`_idle`), and how it
    parses bytes (:meth:`_feed`).
    """

    if TYPE_CHECKING:  # uvicorn's, on the protocol this is mixed into
        transport: asyncio.Transport
        loop: asyncio.AbstractEventLoop
        connections: set[Any]
        flow: FlowControl
        server_state: ServerState
        timeout_keep_alive_task: asyncio.TimerHandle | None
        timeout_keep_alive: int

        def _unset_keepalive_if_required(self) -> None: ...
        def timeout_keep_alive_handler(self) -> None: ...

    _last_cap_log = 0.0
    # Connections dropped for a client that took no bytes: one line per 10 s, not one each
    # (a client holding 4,096 such connections wrote 270 lines a second).
    _stalls: ClassVar[LogWindow] = LogWindow(10.0)

    #: The uvicorn protocol this is mixed into.
    _protocol: ClassVar[Any]

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._protocol.__init__(self, config, server_state, app_state, _loop)
        assert isinstance(config, _Config)
        self._limits = config.limits
        # uvicorn types it int; call_later takes any number of seconds.
        self.timeout_keep_alive = config.limits.idle_timeout_s  # type: ignore[assignment]
        self._intake = config.intake
        self._refuse = config.refuse
        self._pending = bytearray()  # read while waiting for a turn in the intake
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._cert_name: str | None = None  # the client certificate's subject, if verified
        self._deferred = False  # reads are buffered, waiting for a turn in the intake
        self._asked = False  # refuse() passed the plain request the parser is given next
        self._disconnect = Disconnect()
        self._write_timer: asyncio.TimerHandle | None = None
        self._unsent = 0  # bytes waiting for the client when the write timer was set
        self._bound_protocol()

    def _bound_protocol(self) -> None:
        """The protocol's own state, set up after uvicorn's."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        if self._admit(transport):
            self._protocol.connection_made(self, transport)
            self._cert_name = _client_cert_name(transport.get_extra_info("peercert"))
            self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._stop_write_timer()
        if not self._refused:
            self._protocol.connection_lost(self, exc)
            self._disconnect.lose()

    def pause_writing(self) -> None:
        # The client is not taking the answer as fast as it comes: timed from here.
        self._protocol.pause_writing(self)
        if self._write_timer is None and self._limits.idle_timeout_s > 0:
            self._unsent = self._unsent_bytes()
            self._write_timer = self.loop.call_later(self._limits.idle_timeout_s, self._write_stalled)

    def resume_writing(self) -> None:
        self._stop_write_timer()
        self._protocol.resume_writing(self)

    def _stop_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _unsent_bytes(self) -> int:
        """The answer's bytes the client has not taken: the transport's buffer and the
        socket's send queue. The buffer alone is no measure of a slow reader: it moves
        only when much of the socket's buffer (megabytes) is free again, so a client
        reading 20 KB/s looked stalled for seconds."""
        unsent = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4))
                unsent += int.from_bytes(queued, sys.byteorder)
        return unsent

    def _write_stalled(self) -> None:
        """The answer's bytes waited ``idle_timeout_s`` for the client: if it took none of
        them meanwhile, the connection is dropped (aborted: closing would wait for the
        bytes to go), so the request behind it sees its client gone (a stream stops its
        generation) instead of waiting on a client that never reads."""
        self._write_timer = None
        unsent = self._unsent_bytes()
        if unsent < self._unsent:  # it reads, slowly: time it again from here
            self._unsent = unsent
            self._write_timer = self.loop.call_later(self._limits.idle_timeout_s, self._write_stalled)
            return
        skipped = self._stalls.take()
        if skipped is not None:
            log.info(
                "dropping an HTTP connection whose client took no bytes of its answer in %gs "
                "(setting http_idle_timeout_s)%s",
                self._limits.idle_timeout_s,
                f"; {skipped} more dropped so since the last such line" if skipped else "",
            )
        self.transport.abort()

    def _awaiting_head(self) -> bool:
        raise NotImplementedError

    def _idle(self) -> bool:
        raise NotImplementedError

    def _feed(self, data: bytes) -> None:
        raise NotImplementedError

    def _read_for_hangup(self) -> None:
        """A request's body is all in: read the connection again, so that its client hanging
        up is seen (:class:`Disconnect`). uvicorn stops reading once 64 KiB of body wait for
        the app, and reads again only when the app asks for more, which one that holds the
        whole body never does: a 5 MB request's client that left went unseen until its
        answer was written, and its model calls all ran (13 s of them on a cluster). What a
        client sends after its body is a pipelined request, which uvicorn holds back and
        stops reading at, as it did before."""
        if self.flow.read_paused and not self._deferred and not self.transport.is_closing():
            self.flow.resume_reading()

    def _admit(self, transport: asyncio.Transport) -> bool:
        """False: past the connection cap, refused (503) and closed."""
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
            return False
        return True

    @classmethod
    def _log_cap(cls, cap: int) -> None:
        now = time.monotonic()
        if now - cls._last_cap_log >= 10.0:  # a flood of connections is not a flood of log lines
            cls._last_cap_log = now
            log.warning("refusing new HTTP connections: %d open (setting http_max_connections)", cap)

    def _take(self, data: bytes) -> None:
        """Handle ``data`` now, or keep it until this connection's turn in the intake."""
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
            self._feed(data)
        self._asked = False

    def _refuse_plain(self, refuse: Refuse, data: bytes) -> bytes:
        """Answer the plain requests (:func:`_plain_request`) at the start of ``data`` that
        ``refuse`` names, without the parser or uvicorn; returns the rest, for them.

        Why: under a flood of requests to a full deployment, h11 parsing each head and
        writing each answer was most of the scheduler's loop (``bench/overload.py``), which
        made refusals slow and starved the admitted requests. Here a refusal is a scan of
        its head and one write. Only between requests (parser idle, nothing buffered, no
        answer being written), so the parser never sees the requests answered here and
        stays in step."""
        answered = False
        while data and self._idle():
            request = _plain_request(data)
            if request is None:
                break
            method, path, length = request
            refusal = refuse(method, path)
            if refusal is None:
                self._asked = True
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

    def _start_head_timer(self) -> None:
        if self._head_timer is None and self._limits.header_timeout_s > 0:
            self._head_timer = self.loop.call_later(self._limits.header_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _bad_request(self, message: str) -> None:
        """400 ``{"error": message}``, and the connection is closed (it is out of step)."""
        self._stop_head_timer()
        if not self.transport.is_closing():
            self.transport.write(_raw_answer("400 Bad Request", message))
            self.transport.close()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._awaiting_head():
            return
        if self._deferred:
            # What it sent waits for its turn in the intake (_take): the wait is this
            # server's, not the client's. Under uvloop, which runs due timers before the
            # intake's next pass, heads that came in time were answered 408 while a busy
            # pass held the loop.
            self._start_head_timer()
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


class _BoundedH11(_Bounds, H11Protocol):
    """uvicorn's h11 protocol with shoal's bounds (:class:`_Bounds`); a request that
    ``refuse`` names and that is not plain is answered from its head by :class:`_Refusing`."""

    _protocol = H11Protocol

    def _bound_protocol(self) -> None:
        self._h11 = self.conn
        self.conn = cast(
            h11.Connection, _Refusing(self.conn, self._refuse, self._answer_at_once, self._bad_request)
        )

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._head_timer is None and self._h11.their_state is h11.IDLE:
            self._start_head_timer()  # the first byte of a new head after an answer
        self._take(data)

    def _feed(self, data: bytes) -> None:
        H11Protocol.data_received(self, data)

    def _awaiting_head(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def _idle(self) -> bool:
        conn = self._h11
        return conn.their_state is h11.IDLE and conn.our_state is h11.IDLE and not conn.trailing_data[0]

    def handle_events(self) -> None:
        conn = self._h11
        reading = conn.their_state is not h11.DONE
        super().handle_events()
        if reading and conn.their_state is h11.DONE and conn.our_state is not h11.DONE:
            if not conn.trailing_data[0]:  # (a pipelined request already here: held back)
                self._read_for_hangup()
        scope = getattr(self, "scope", None)
        if scope is not None and "tls" not in scope.setdefault("extensions", {}):
            # The ASGI TLS extension's client_cert_name, for the request just started (its
            # task runs after this returns): what certificate, if any, this connection showed.
            scope["extensions"]["tls"] = {"client_cert_name": self._cert_name}
            scope["extensions"][DISCONNECT] = self._disconnect
        if conn.their_state is not h11.IDLE:
            self._stop_head_timer()  # the head is in; the app's own deadlines take over
        elif conn.our_state is h11.IDLE:
            self._arm_idle_timer()

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


class _BoundedHttpTools(_Bounds, HttpToolsProtocol):
    """uvicorn's httptools (llhttp) protocol with shoal's bounds (:class:`_Bounds`), and
    what h11 checks that llhttp does not: an HTTP/1.1 request names its Host, and a request
    head is at most :data:`_MAX_HEAD` bytes (400 otherwise, as h11 answers). A request that
    ``refuse`` names is answered, in its turn on the connection, by a small ASGI app
    instead of shoal's.

    Why httptools: under wrk c=32 with V2 JSON bodies, h11 reading heads and writing answers
    was about a third of an ingress process's CPU; uvicorn's httptools protocol did the same
    work for a bare Starlette app at 0.4 of the CPU per request (bench/floors, A B A B).
    """

    _protocol = HttpToolsProtocol

    def _bound_protocol(self) -> None:
        self._in_head = False  # a head has begun and is not complete
        self._in_message = False  # a request has begun and its body is not all read
        self._head_bytes = 0  # of the head being read, in the reads counted (see _feed)
        self._begun = 0  # requests begun on this connection
        self._asked_for = -1  # the request _refuse_plain asked refuse() about (see _feed)

    def data_received(self, data: bytes) -> None:
        if self._refused or self.transport.is_closing():
            return
        self._take(data)

    def _feed(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        went_on, fresh, begun = self._in_head, not self._in_message, self._begun
        # refuse() was asked about the request at the start of ``data`` (_refuse_plain):
        # on_headers_complete does not ask again.
        self._asked_for = begun + 1 if self._asked and fresh else -1
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as err:
            cause = err.__context__
            self._bad_request(str(cause) if isinstance(cause, _BadHead) else "Invalid HTTP request received.")
            return
        if not self._in_head:
            return
        # A head still coming: its timer runs from this read, the one its first byte came in
        # (not started per request: most heads come whole, in one read).
        self._start_head_timer()
        # llhttp keeps a header's bytes until the header ends and sets no limit on a head:
        # shoal's is h11's, counted over the reads that are all head. A read that went on
        # with the head, or that began it between requests and left it unfinished, is all
        # head; one where the head began after another request is not counted (it is one
        # read, as long as the transport reads at once).
        if went_on and self._begun == begun:
            self._head_bytes += len(data)
        elif fresh and self._begun == begun + 1:
            self._head_bytes = len(data)
        else:
            return
        if self._head_bytes > _MAX_HEAD:
            self._bad_request(f"the request head is over {_MAX_HEAD} bytes")

    def _awaiting_head(self) -> bool:
        return not self._in_message or self._in_head

    def _idle(self) -> bool:
        cycle = self.cycle
        return not self._in_message and (cycle is None or cycle.response_complete) and not self.pipeline

    # llhttp's callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = self._in_head = True
        self._begun += 1
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > _MAX_HEAD:
            raise _BadHead(f"the request target is over {_MAX_HEAD} bytes")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_head_timer()  # the head is in; the app's own deadlines take over
        # _feed counts the reads of a head still coming; a head that came whole in a read
        # (up to the transport's read size, 256 KiB) is measured here.
        if _head_size(self.parser.get_method(), self.url, self.headers) > _MAX_HEAD:
            raise _BadHead(f"the request head is over {_MAX_HEAD} bytes")
        if self.parser.get_http_version() == "1.1" and not any(n == b"host" for n, _ in self.headers):
            raise _BadHead("an HTTP/1.1 request must have a Host header")
        refusal = None
        if self._refuse is not None and self._begun != self._asked_for:
            path = unquote(self.url.partition(b"?")[0].decode("ascii", "replace"))
            refusal = self._refuse(self.parser.get_method().decode("ascii", "replace"), path)
        if refusal is None:
            super().on_headers_complete()
        else:
            app, self.app = self.app, _refusal_app(*refusal)
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        if self.scope is not None:
            # The ASGI TLS extension's client_cert_name: what certificate, if any, this
            # connection showed.
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
            extensions["tls"] = {"client_cert_name": self._cert_name}
            extensions[DISCONNECT] = self._disconnect

    def on_message_complete(self) -> None:
        self._in_message = self._in_head = False
        super().on_message_complete()
        cycle = self.cycle
        if not self.pipeline and cycle is not None and not cycle.response_complete:
            self._read_for_hangup()


class _BadHead(Exception):
    """A request head h11 would refuse that llhttp takes: answered 400 with this message."""


def _refusal_app(status: int, message: str) -> Any:
    """An ASGI app answering any request with a refusal (:func:`_refusal`'s answer)."""
    body = json.dumps({"error": message}).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"),
        ],
    }

    async def refuse(scope: Any, receive: Any, send: Any) -> None:
        await send(start)
        await send({"type": "http.response.body", "body": body})

    return refuse


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
    connection under the client's next request on it.

    The log says which: an answer begun while that very error was being handled (the error
    middleware's 500) was the error's answer; any other (a background task failing after a
    whole 200) was sent before the error."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        answered = False
        status = 0
        begun_by: BaseException | None = None

        async def sending(message: Any) -> None:
            nonlocal answered, status, begun_by
            if message["type"] == "http.response.start":
                status = message["status"]
                begun_by = sys.exc_info()[1]  # inside an ``except`` block: the error answered
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True

        try:
            await self.app(scope, receive, sending)
        except ClientGone:
            return  # nobody to answer (unless_gone)
        except Exception as exc:
            if not answered:
                raise
            method, path = scope.get("method"), scope.get("path")
            if begun_by is exc:
                log.exception("%s %s failed, answered %d", method, path, status)
            else:
                log.exception("error after answering %s %s (%d)", method, path, status)


class _Server(uvicorn.Server):
    """uvicorn's server without its own SIGINT/SIGTERM handlers: the process decides when
    its HTTP server stops (:meth:`HttpServer.stop`), after its replicas have drained.

    ``uvicorn.Server.serve`` replaces the process's handlers with its own while it runs.
    On SIGTERM the HTTP server then began its own shutdown at once, gave the requests in
    flight 2 s and cancelled them (500) while the replicas that served them still drained;
    the process's handler ran only once uvicorn had stopped. 4 of 6 HTTP requests in flight
    when `shoal up` got SIGINT were answered 500 after about 3 s; gRPC's all finished."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


#: The first byte of a TLS connection: a handshake record.
_TLS_HANDSHAKE = b"\x16"
#: A TLS handshake's limit when ``header_timeout_s`` is 0 (the event loop's default).
_HANDSHAKE_S = 60.0


def _answer_plain(conn: socket.socket, port: int) -> None:
    """Answer a plain-HTTP request on an HTTPS port: 400, unencrypted, and close. What it
    sent is read first (up to 64 KiB): closing with it unread would reset the connection,
    and the client might lose the answer."""
    with contextlib.suppress(OSError):
        conn.recv(65536)
        conn.send(
            _raw_answer(
                "400 Bad Request",
                f"port {port} speaks HTTPS and the request came as plain HTTP: use https://",
            )
        )
        conn.shutdown(socket.SHUT_WR)
    conn.close()


def _ssl_context(m: certwatch.Material, config: uvicorn.Config) -> ssl.SSLContext:
    """A server TLS context as uvicorn makes one from ``config``, with the files of ``m``
    (the bytes checked, written to a private folder for OpenSSL to read, then removed)."""
    import tempfile
    from pathlib import Path

    ctx = ssl.SSLContext(config.ssl_version)
    with tempfile.TemporaryDirectory(prefix="shoal-tls-") as folder:  # mode 0700
        cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert.write_bytes(m.cert)
        key.touch(0o600)
        key.write_bytes(m.key)
        ctx.load_cert_chain(cert, key)
    ctx.verify_mode = ssl.VerifyMode(config.ssl_cert_reqs)
    ctx.load_verify_locations(cadata=m.ca.decode("ascii"))
    if config.ssl_ciphers:
        ctx.set_ciphers(config.ssl_ciphers)
    return ctx


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
        parser: str = "httptools",
    ) -> None:
        """``refuse``: requests to answer from their head alone (see :data:`Refuse`).
        ``parser``: ``httptools`` (:class:`_BoundedHttpTools`) or ``h11``
        (:class:`_BoundedH11`); both give the same answers to what the tests send."""
        if parser not in ("httptools", "h11"):
            raise ValueError(f"unknown HTTP parser {parser!r}: httptools or h11")
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
        if tls is None and is_loopback(host):
            app = LoopbackHosts(app, _addr(host, self.port))  # DNS rebinding: shoal.http.browser
        config = _Config(
            _KeepConnection(app),
            limits or HttpLimits(),
            refuse,
            parser,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
            ssl_certfile=str(tls.cert) if tls is not None else None,
            ssl_keyfile=str(tls.key) if tls is not None else None,
            ssl_ca_certs=str(tls.ca) if tls is not None else None,
            ssl_cert_reqs=ssl.CERT_OPTIONAL if tls is not None else ssl.CERT_NONE,
        )
        self.server = _Server(config)
        self._limits = limits or HttpLimits()
        self._task: asyncio.Task[None] | None = None
        self._accepting: asyncio.Task[None] | None = None
        # Under TLS: connections waiting for their first byte (with their timers), and those
        # in their handshake.
        self._sniffing: dict[socket.socket, asyncio.TimerHandle] = {}
        self._handshakes: set[asyncio.Task[None]] = set()
        # The certificate files, taken again when renewed on disk (each new connection asks).
        self._tls = tls
        self._watch: certwatch.CertWatch | None = None
        self._context: tuple[int, ssl.SSLContext] | None = None  # (generation, context)

    async def start(self) -> None:
        tls = self.scheme == "https"
        # Under TLS uvicorn gets no socket: _accept_tls accepts, and hands it each connection.
        self._task = asyncio.create_task(self.server.serve(sockets=[] if tls else [self.sock]), name="http")
        while not self.server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if tls and self.server.started:
            assert self._tls is not None
            self._watch = certwatch.watch(self._tls.ca.parent, self._tls.cert.stem)
            self.sock.setblocking(False)
            self.sock.listen(self.server.config.backlog)  # connecting works once start returns
            self._accepting = asyncio.create_task(self._accept_tls(), name="https-accept")

    async def stop(self) -> None:
        # Every step that needs no wait first (the accept loop cannot run in between), so
        # that a stop cancelled while it waits has still told everything to stop.
        if self._accepting is not None:
            self._accepting.cancel()
        for conn, timer in list(self._sniffing.items()):
            timer.cancel()
            self._forget_sniffing(conn)
            conn.close()
        for handshake in list(self._handshakes):
            handshake.cancel()
        self.server.should_exit = True
        try:
            if self._accepting is not None:
                await cancel_and_wait(self._accepting)
            if self._task is not None:
                await self._task
        finally:
            self.sock.close()

    # -- HTTPS: shoal's own accept loop ------------------------------------------------

    def _ssl(self) -> ssl.SSLContext:
        """The TLS context for a new connection: uvicorn's, made from the files at start,
        until :mod:`shoal.certwatch` takes renewed ones; then one made from those."""
        config_ssl = self.server.config.ssl
        assert config_ssl is not None
        if self._watch is None:
            return config_ssl
        m = self._watch.poll()
        if m.generation == 0:
            return config_ssl
        if self._context is None or self._context[0] != m.generation:
            try:
                self._context = (m.generation, _ssl_context(m, self.server.config))
            except (ssl.SSLError, OSError, ValueError) as err:  # checked already: not expected
                log.warning("HTTPS port %d keeps its certificate: the renewed one fails: %s", self.port, err)
                self._context = (m.generation, self._context[1] if self._context else config_ssl)
        return self._context[1]

    async def _accept_tls(self) -> None:
        """Accept HTTPS connections and look at each one's first byte before its handshake
        (:meth:`_sniff`). Why not the event loop's TLS server: a plain-HTTP request to it
        failed the handshake and the client read an empty reply, with no word of why."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as err:  # out of file descriptors, say: the loop's server waits too
                log.warning("HTTPS port %d cannot accept a connection: %s", self.port, err)
                await asyncio.sleep(0.1)
                continue
            cap = self._limits.max_connections
            if cap > 0 and len(self._sniffing) + len(self._handshakes) >= cap:
                conn.close()  # as many as the cap still in their handshake: nothing to answer in
                continue
            self._sniff(conn)

    def _sniff(self, conn: socket.socket) -> None:
        """Wait for ``conn``'s first byte, unread: a TLS record (a handshake starts with byte
        22) goes on to the handshake; anything else is answered 400 in plain text. A
        connection that sends nothing within ``header_timeout_s`` is closed."""
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        fd = conn.fileno()

        def readable() -> None:
            self._forget_sniffing(conn)
            try:
                first = conn.recv(1, socket.MSG_PEEK)
            except OSError:
                first = b""
            if not first:  # closed or broken before a byte came
                conn.close()
            elif first == _TLS_HANDSHAKE:
                handshake = loop.create_task(self._handshake(conn))
                self._handshakes.add(handshake)
                handshake.add_done_callback(self._handshakes.discard)
            else:
                _answer_plain(conn, self.port)

        def expire() -> None:
            self._forget_sniffing(conn)
            conn.close()

        timeout = self._limits.header_timeout_s
        self._sniffing[conn] = loop.call_later(timeout if timeout > 0 else _HANDSHAKE_S, expire)
        loop.add_reader(fd, readable)

    def _forget_sniffing(self, conn: socket.socket) -> None:
        timer = self._sniffing.pop(conn, None)
        if timer is not None:
            timer.cancel()
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(conn.fileno())

    async def _handshake(self, conn: socket.socket) -> None:
        """The TLS handshake, then the connection is uvicorn's (its protocol, as its own
        server would have made it)."""
        loop = asyncio.get_running_loop()
        server = self.server

        def protocol() -> asyncio.Protocol:
            return server.config.http_protocol_class(  # type: ignore[call-arg]
                config=server.config,
                server_state=server.server_state,
                app_state=server.lifespan.state,
                _loop=loop,
            )

        timeout = self._limits.header_timeout_s
        try:
            await loop.connect_accepted_socket(
                protocol, conn, ssl=self._ssl(), ssl_handshake_timeout=timeout if timeout > 0 else None
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as err:
            log.debug("HTTPS port %d: a TLS handshake failed: %s", self.port, err)
            conn.close()

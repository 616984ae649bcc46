"""Refusals from a request's head in shoal's HTTP server (``HttpServer(refuse=...)``): a
plain request that ``refuse`` names is answered without the parser or the app, in order with
the others on its connection, which goes on serving; anything else still goes through the
parser (llhttp through httptools, or h11: each test runs with both).

Raw HTTP/1.1 over a loopback connection, so the test controls every byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import h11
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shoal.http import server as http_server
from shoal.http.server import HttpLimits, HttpServer

pytestmark = pytest.mark.timeout(20)

WAIT_S = 5.0
IDLE_S = 0.3


def refuse(method: str, path: str) -> tuple[int, str] | None:
    return (503, f"{path} is full") if method == "POST" and path.startswith("/full") else None


class Served:
    """The app: what it was asked, in order."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def echo(self, request: Request) -> Response:
        self.paths.append(request.url.path)
        return JSONResponse({"path": request.url.path, "body": (await request.body()).decode()})


@pytest.fixture(params=["httptools", "h11"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[tuple[HttpServer, Served]]:
    served = Served()
    routes = [Route("/{path:path}", served.echo, methods=["GET", "POST"])]
    limits = HttpLimits(header_timeout_s=IDLE_S, idle_timeout_s=IDLE_S)
    http = HttpServer(
        Starlette(routes=routes), "127.0.0.1", 0, limits=limits, refuse=refuse, parser=request.param
    )
    await http.start()
    yield http, served
    await http.stop()


def request(method: str, path: str, body: bytes = b"", headers: str = "Host: localhost\r\n") -> bytes:
    return f"{method} {path} HTTP/1.1\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, http: HttpServer) -> AsyncIterator[Conn]:
        conn = cls(*await asyncio.open_connection("127.0.0.1", http.port))
        try:
            yield conn
        finally:
            conn.writer.close()
            with contextlib.suppress(ConnectionError):
                await conn.writer.wait_closed()

    async def answer(self) -> tuple[int, dict[str, str], Any]:
        line = await asyncio.wait_for(self.reader.readline(), WAIT_S)
        assert line, "the server closed the connection"
        headers: dict[str, str] = {}
        while (h := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = h.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(line.split()[1]), headers, json.loads(body) if body else None

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), WAIT_S) == b""


async def test_refusals_and_served_requests_keep_their_order_on_a_connection(
    server: tuple[HttpServer, Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    http, served = server
    parsed: list[bytes] = []  # the targets of the heads a parser (h11 or llhttp) read
    next_event = h11.Connection.next_event
    headers_complete = http_server._BoundedHttpTools.on_headers_complete

    def spy(conn: h11.Connection) -> Any:
        event = next_event(conn)
        if isinstance(event, h11.Request):
            parsed.append(event.target)
        return event

    def llhttp_spy(protocol: http_server._BoundedHttpTools) -> None:
        parsed.append(protocol.url)
        headers_complete(protocol)

    monkeypatch.setattr(h11.Connection, "next_event", spy)
    monkeypatch.setattr(http_server._BoundedHttpTools, "on_headers_complete", llhttp_spy)
    async with Conn.open(http) as conn:
        # Pipelined in one write, the last head split over two.
        tail = request("POST", "/full/c", b"{}")
        conn.writer.write(
            request("POST", "/full/a", b'{"x": 1}')
            + request("POST", "/full/b?q=1", b"[]")
            + request("GET", "/ok/1")
            + tail[:10]
        )
        await asyncio.sleep(0)
        conn.writer.write(tail[10:] + request("POST", "/ok/2", b"body"))
        answers = [await conn.answer() for _ in range(5)]

        assert [(status, body.get("error") or body.get("path")) for status, _, body in answers] == [
            (503, "/full/a is full"),
            (503, "/full/b is full"),
            (200, "/ok/1"),
            (503, "/full/c is full"),
            (200, "/ok/2"),
        ]
        assert answers[0][1]["retry-after"] == "1"
        assert answers[0][1]["content-type"] == "application/json"
        assert served.paths == ["/ok/1", "/ok/2"]
        assert answers[4][2]["body"] == "body"
        # The first two were answered from their bytes alone; the parser read the rest (the app's
        # requests, and /full/c, which came in while /ok/1 was being served).
        assert b"/full/a" not in parsed and b"/full/b?q=1" not in parsed
        # Refused last, then idle: closed after the idle timeout like any other connection.
        conn.writer.write(request("POST", "/full/d"))
        assert (await conn.answer())[0] == 503
        assert await conn.closed()


@pytest.mark.parametrize(
    "head",
    [
        "Host: localhost\r\nTransfer-Encoding: chunked\r\n",
        "Host: localhost\r\nConnection: keep-alive\r\n",
        "Host: localhost\r\nExpect: 100-continue\r\n",
    ],
    ids=["chunked", "connection", "expect"],
)
async def test_what_is_not_plain_is_refused_through_the_parser(
    server: tuple[HttpServer, Served], head: str
) -> None:
    http, served = server
    async with Conn.open(http) as conn:
        if "chunked" in head:
            conn.writer.write(f"POST /full/a HTTP/1.1\r\n{head}\r\n2\r\n{{}}\r\n0\r\n\r\n".encode())
        else:
            conn.writer.write(request("POST", "/full/a", b"{}", head))
        status, _, body = await conn.answer()
        assert (status, body["error"]) == (503, "/full/a is full")
        conn.writer.write(request("GET", "/ok"))
        assert (await conn.answer())[0] == 200
        assert served.paths == ["/ok"]


async def test_a_request_without_host_is_still_a_bad_request(server: tuple[HttpServer, Served]) -> None:
    http, _ = server
    async with Conn.open(http) as conn:
        conn.writer.write(b"POST /full/a HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert (await conn.answer())[0] == 400


async def test_a_half_sent_head_after_a_refusal_is_cut_off(server: tuple[HttpServer, Served]) -> None:
    http, _ = server
    async with Conn.open(http) as conn:
        conn.writer.write(request("POST", "/full/a") + b"GET /ok HTTP/1.1\r\nHo")
        assert (await conn.answer())[0] == 503
        status, _, body = await conn.answer()
        assert status == 408, body
        assert await conn.closed()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"POST /a%20b?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", ("POST", "/a b", 58)),
        (b"GET / HTTP/1.1\r\nhost: x\r\n\r\nGET", ("GET", "/", 27)),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n{}", None),  # body not all here
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2", None),  # head not all here
        (b"POST / HTTP/1.0\r\nHost: x\r\n\r\n", None),
        (b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", None),  # no Host
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length : 0\r\n\r\n", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n", None),
        (b"POST  / HTTP/1.1\r\nHost: x\r\n\r\n", None),
        (b"POST / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n", None),
    ],
)
def test_plain_requests(data: bytes, expected: tuple[str, str, int] | None) -> None:
    assert http_server._plain_request(data) == expected


async def test_a_request_head_over_16_kib_is_a_bad_request(server: tuple[HttpServer, Served]) -> None:
    http, served = server
    async with Conn.open(http) as conn:
        conn.writer.write(b"GET /ok HTTP/1.1\r\nHost: localhost\r\n")
        for _ in range(20):  # 20 KiB of headers, a KiB a write, never ending
            conn.writer.write(b"X-Long: " + b"a" * 1024 + b"\r\n")
            await conn.writer.drain()
        status, _, _ = await conn.answer()
        assert status == 400
        assert served.paths == []


async def test_a_complete_request_is_served_on_a_connection_after_a_refused_one(
    server: tuple[HttpServer, Served],
) -> None:
    http, served = server
    async with Conn.open(http) as conn:
        # A chunked request: not plain, so the parser reads it and the refusal is its answer.
        conn.writer.write(b"POST /full/a HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
        status, headers, body = await conn.answer()
        assert (status, body["error"], headers["retry-after"]) == (503, "/full/a is full", "1")
        conn.writer.write(b"2\r\n{}\r\n0\r\n\r\n" + request("POST", "/ok", b"after"))  # its body comes late
        status, _, body = await conn.answer()
        assert (status, body) == (200, {"path": "/ok", "body": "after"})
        assert served.paths == ["/ok"]


@pytest.mark.parametrize(
    "headers",
    [
        "X-Big: " + "a" * 17_000 + "\r\n",
        "X-Big: " + "a" * 100_000 + "\r\n",
        "".join(f"X-{i}: v\r\n" for i in range(10_000)),
    ],
    ids=["17k-header", "100k-header", "10k-headers"],
)
async def test_a_head_over_16_kib_is_refused_when_it_comes_in_one_write(
    server: tuple[HttpServer, Served], headers: str
) -> None:
    """Before: the limit held only while the head was incomplete after a read, so a head
    that came whole in one read (17 KB, 100 KB, 10,000 headers) was served 200."""
    http, served = server
    async with Conn.open(http) as conn:
        conn.writer.write(request("POST", "/x", b"{}", headers="Host: localhost\r\n" + headers))
        status, _, body = await conn.answer()
        assert status == 400 and body == {"error": "the request head is over 16384 bytes"}
        assert await conn.closed()
    async with Conn.open(http) as conn:  # heads just under the limit are served
        conn.writer.write(
            request("POST", "/x", b"{}", headers="Host: localhost\r\nX-Big: " + "a" * 16_000 + "\r\n")
        )
        assert (await conn.answer())[0] == 200
    assert served.paths == ["/x"]

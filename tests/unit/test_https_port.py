"""shoal's HTTP server under TLS (``HttpServer(tls=...)``): it accepts connections itself
and looks at each one's first byte, so a plain-HTTP request gets a 400 saying the port
speaks HTTPS (the event loop's TLS server failed the handshake and the client read an
empty reply), a connection that sends nothing or stalls in its handshake is closed after
``header_timeout_s``, and HTTPS is served as before.

Real sockets on loopback, real certificates (``shoal.certs.init``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shoal import certs
from shoal.http.server import HttpLimits, HttpServer
from tests.unit.conftest import Run

pytestmark = pytest.mark.timeout(30)

HEAD_S = 0.5


async def hello(request: Request) -> Response:
    return JSONResponse({"path": request.url.path, "scheme": request.url.scheme})


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tls")
    certs.init(folder, ("127.0.0.1",))
    return folder


@contextlib.asynccontextmanager
async def serving(
    tls_dir: Path, header_timeout_s: float = HEAD_S, max_connections: int = 4096
) -> AsyncIterator[HttpServer]:
    limits = HttpLimits(
        header_timeout_s=header_timeout_s, idle_timeout_s=5.0, max_connections=max_connections
    )
    server = HttpServer(
        Starlette(routes=[Route("/{path:path}", hello)]),
        "127.0.0.1",
        0,
        certs.files(tls_dir, "scheduler"),
        limits=limits,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def https_get(tls_dir: Path, port: int, path: str) -> httpx.Response:
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))
    async with httpx.AsyncClient(verify=context, timeout=5.0) as client:
        return await client.get(f"https://127.0.0.1:{port}{path}")


async def read_all(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(5.0):
        return await reader.read()


def test_plain_http_to_the_https_port_is_told_to_use_https(on_each_loop: Run, tls_dir: Path) -> None:
    async def body() -> None:
        async with serving(tls_dir) as https:
            reader, writer = await asyncio.open_connection("127.0.0.1", https.port)
            writer.write(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await read_all(reader)
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 "), answer
            message = json.loads(body)["error"]
            assert f"port {https.port} speaks HTTPS" in message and "https://" in message
            # The port goes on serving HTTPS.
            served = await https_get(tls_dir, https.port, "/after")
            assert served.status_code == 200
            assert served.json() == {"path": "/after", "scheme": "https"}

    on_each_loop(body())


def test_httpx_over_plain_http_reads_the_400(on_each_loop: Run, tls_dir: Path) -> None:
    async def body() -> None:
        async with serving(tls_dir) as https:
            async with httpx.AsyncClient(timeout=5.0) as client:
                answer = await client.get(f"http://127.0.0.1:{https.port}/v2")
            assert answer.status_code == 400
            assert "speaks HTTPS" in answer.json()["error"]

    on_each_loop(body())


def test_many_https_requests_on_one_connection(on_each_loop: Run, tls_dir: Path) -> None:
    async def body() -> None:
        # The clients share the server's loop, so under a loaded test run their twenty
        # handshakes can hold a client's head past HEAD_S: one answer of twenty once had no
        # path (an error body). The head timeout is not what this test is about.
        async with serving(tls_dir, header_timeout_s=5.0) as https:
            context = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))
            async with httpx.AsyncClient(verify=context, timeout=5.0) as client:
                answers = await asyncio.gather(
                    *(client.get(f"https://127.0.0.1:{https.port}/n/{i}") for i in range(20))
                )
            seen = [(a.status_code, a.text) for a in answers]
            assert [a.json().get("path") for a in answers] == [f"/n/{i}" for i in range(20)], seen

    on_each_loop(body())


def test_a_connection_that_sends_nothing_is_closed(on_each_loop: Run, tls_dir: Path) -> None:
    async def body() -> None:
        async with serving(tls_dir) as https:
            reader, writer = await asyncio.open_connection("127.0.0.1", https.port)
            loop = asyncio.get_running_loop()
            began = loop.time()
            assert await read_all(reader) == b""  # closed, nothing said: it never spoke
            assert loop.time() - began < HEAD_S + 2.0
            writer.close()

    on_each_loop(body())


def test_a_stalled_handshake_is_closed(on_each_loop: Run, tls_dir: Path) -> None:
    """The first byte of a TLS record, then nothing: the handshake's limit is
    header_timeout_s (it was the event loop's 60 s)."""

    async def body() -> None:
        async with serving(tls_dir) as https:
            reader, writer = await asyncio.open_connection("127.0.0.1", https.port)
            writer.write(b"\x16\x03\x01")
            loop = asyncio.get_running_loop()
            began = loop.time()
            with contextlib.suppress(ConnectionError):
                await read_all(reader)
            assert loop.time() - began < HEAD_S + 2.0
            writer.close()

    on_each_loop(body())


def test_connections_in_their_handshake_count_toward_max_connections(
    on_each_loop: Run, tls_dir: Path
) -> None:
    """http_max_connections holds for connections that never finish a handshake: past the
    cap a new connection is closed at once (not held until header_timeout_s), and once the
    stalled ones go, HTTPS is served again."""

    async def body() -> None:
        async with serving(tls_dir, header_timeout_s=20.0, max_connections=2) as https:
            stalled = []
            for _ in range(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", https.port)
                writer.write(b"\x16\x03\x01")  # a handshake begun, never finished
                stalled.append((reader, writer))
            await asyncio.sleep(0.2)
            reader, writer = await asyncio.open_connection("127.0.0.1", https.port)
            loop = asyncio.get_running_loop()
            began = loop.time()
            with contextlib.suppress(ConnectionError):
                assert await read_all(reader) == b""
            assert loop.time() - began < 2.0  # closed at once, not after header_timeout_s
            writer.close()
            for _, w in stalled:
                w.close()
            await asyncio.sleep(0.3)
            assert (await https_get(tls_dir, https.port, "/after")).status_code == 200

    on_each_loop(body())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_failed_handshakes_and_plain_requests_leave_no_descriptor(on_each_loop: Run, tls_dir: Path) -> None:
    async def body() -> None:
        async with serving(tls_dir) as https:
            await https_get(tls_dir, https.port, "/warm")  # the client's own lazily opened files
            before = open_fds()
            for i in range(30):
                reader, writer = await asyncio.open_connection("127.0.0.1", https.port)
                # A broken TLS record, a plain request, a client that closes at once.
                sent = [b"\x16\x03\x01\x00\x05garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b""][i % 3]
                if sent:
                    writer.write(sent)
                    with contextlib.suppress(ConnectionError):
                        await read_all(reader)
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            await asyncio.sleep(0.2)
            assert open_fds() <= before
            assert (await https_get(tls_dir, https.port, "/still")).status_code == 200

    on_each_loop(body())


def test_stop_with_connections_waiting(on_each_loop: Run, tls_dir: Path) -> None:
    async def body() -> None:
        server = HttpServer(
            Starlette(routes=[Route("/{path:path}", hello)]),
            "127.0.0.1",
            0,
            certs.files(tls_dir, "scheduler"),
            limits=HttpLimits(header_timeout_s=30.0),
        )
        await server.start()
        silent = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        stalled = await asyncio.open_connection("127.0.0.1", server.port)
        stalled[1].write(b"\x16\x03\x01")
        await asyncio.sleep(0.2)
        async with asyncio.timeout(5.0):
            await server.stop()
        for reader, writer in [*silent, stalled]:
            with contextlib.suppress(ConnectionError):
                assert await read_all(reader) == b""
            writer.close()

    on_each_loop(body())

"""The request-head timeout (``http_header_timeout_s``) blames the client only for its own
slowness: a head that came in time and waits for its turn in the server's intake
(``shoal.http.server._Intake``, at most 16 reads handled a loop pass) is not answered 408
because the server's loop was busy meanwhile. Before the fix, under uvloop (which runs due
timers before the callbacks the last pass queued; asyncio runs them after), it was.

Real sockets on loopback, a real ``HttpServer``.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shoal.http.server import READS_PER_PASS, HttpLimits, HttpServer
from tests.unit.conftest import Run

pytestmark = pytest.mark.timeout(30)

# Long enough that opening the connections and writing their heads, on a loaded test
# machine, stays well inside it: only the intake's wait may cross it.
HEAD_S = 1.0


async def answer(request: Request) -> Response:
    if request.url.path == "/n/0":
        time.sleep(2 * HEAD_S)  # noqa: ASYNC251 - an app that holds the loop: the server is slow
    return JSONResponse({"path": request.url.path})


def test_a_head_that_came_in_time_is_served_however_long_it_waits_for_its_turn(on_each_loop: Run) -> None:
    # Three passes' worth of heads, sent at once: the first pass takes 16, the next 16 more
    # while the first's requests run (one of them holding the loop past the timeout), and
    # the rest wait for the pass after that.
    count = 3 * READS_PER_PASS

    async def body() -> None:
        server = HttpServer(
            Starlette(routes=[Route("/{path:path}", answer)]),
            "127.0.0.1",
            0,
            limits=HttpLimits(header_timeout_s=HEAD_S, idle_timeout_s=10.0, max_connections=1000),
        )
        await server.start()
        try:
            conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(count)]
            await asyncio.sleep(0.05)  # every connection accepted, its head timer running
            for i, (_, writer) in enumerate(conns):
                writer.write(f"GET /n/{i} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            async with asyncio.timeout(20):
                answers = [await reader.read() for reader, _ in conns]
            for _, writer in conns:
                writer.close()
        finally:
            await server.stop()
        heads = [a.partition(b"\r\n")[0].decode() for a in answers]
        late = [(i, a[-120:]) for i, a in enumerate(answers) if not heads[i].startswith("HTTP/1.1 200")]
        assert not late, late

    on_each_loop(body())

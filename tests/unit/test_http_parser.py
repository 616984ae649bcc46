"""shoal's httptools protocol (``shoal.http.server._BoundedHttpTools``) fed bytes read by
read, as a transport hands them over, so that where one read ends is certain: a request
head is bounded at 16 KiB however it is split, and only bytes that are head count."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from uvicorn.server import ServerState

from shoal.http import server as http_server
from shoal.http.server import HttpLimits

pytestmark = pytest.mark.timeout(10)

KIB = 1024


class Transport(asyncio.Transport):
    """What the protocol wrote, and whether it closed."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.wrote = asyncio.Event()

    def write(self, data: Any) -> None:
        self.out += data
        self.wrote.set()

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def app(scope: Any, receive: Any, send: Any) -> None:
    """Answers with the length of the body it read."""
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = str(size).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]}
    )
    await send({"type": "http.response.body", "body": body})


def connect(refuse: http_server.Refuse | None = None) -> tuple[http_server._BoundedHttpTools, Transport]:
    config = http_server._Config(app, HttpLimits(), refuse, "httptools", log_level="warning", lifespan="off")
    protocol = http_server._BoundedHttpTools(config, ServerState(), {}, asyncio.get_running_loop())
    transport = Transport()
    protocol.connection_made(transport)
    return protocol, transport


async def feed(protocol: http_server._BoundedHttpTools, *reads: bytes) -> None:
    for data in reads:
        protocol.data_received(data)
        await asyncio.sleep(0)  # the intake's next pass: every read is handled in its turn


async def answer(transport: Transport) -> bytes:
    while b"\r\n\r\n" not in transport.out and not transport.closed:
        transport.wrote.clear()
        await transport.wrote.wait()
    return bytes(transport.out)


async def test_a_head_whose_end_is_split_over_two_reads_does_not_count_the_body() -> None:
    protocol, transport = connect()
    head = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (20 * KIB)
    await feed(protocol, head[:-1], head[-1:] + b"a" * (20 * KIB))
    out = await answer(transport)
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"\r\n\r\n20480"), out
    assert not transport.closed


async def test_pipelined_requests_over_16_kib_in_one_read_are_not_one_head() -> None:
    protocol, transport = connect()
    one = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"
    await feed(protocol, one * (20 * KIB // len(one)) + b"GET /y HTTP/1.1\r\nHo", b"st: x\r\n")
    out = await answer(transport)
    assert out.startswith(b"HTTP/1.1 200 ")
    assert not transport.closed


@pytest.mark.parametrize("reads", [20, 2, 1], ids=["a-kib-a-read", "most-in-the-first-read", "one-read"])
async def test_a_head_over_16_kib_is_refused_however_it_is_read(reads: int) -> None:
    protocol, transport = connect()
    head = b"GET /x HTTP/1.1\r\nHost: x\r\n" + b"X-Long: " + b"a" * (20 * KIB) + b"\r\n\r\n"
    size = -(-len(head) // reads)
    await feed(protocol, *(head[i : i + size] for i in range(0, len(head), size)))
    out = await answer(transport)
    assert out.startswith(b"HTTP/1.1 400 ") and b"the request head is over 16384 bytes" in out
    assert transport.closed


async def test_each_request_is_asked_about_once() -> None:
    asked: list[str] = []

    def refuse(method: str, path: str) -> tuple[int, str] | None:
        asked.append(path)
        return None

    protocol, transport = connect(refuse)
    plain = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    chunked = b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    await feed(protocol, plain)
    await answer(transport)
    transport.out.clear()
    await feed(protocol, chunked)  # not plain: asked by the parser's side
    await answer(transport)
    assert asked == ["/a", "/b"]

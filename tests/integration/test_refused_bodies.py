"""A request refused for its token is answered without its body being read: a caller with
no token, or a wrong one, cannot make the head or a scheduler read what it sends.

Before, the refusal read up to ``max_message_mb`` (64 MiB) of the body first, and the server
then read and dropped the rest, however long: a 300 MB POST without a token was read whole.
Now a body over ``REFUSED_BODY_BYTES`` is not read (the answer comes from the request's head)
and the connection is closed after the answer; a small one is read, and the connection
serves the next request.

Raw HTTP/1.1 over asyncio streams, against a head and a scheduler in the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from shoal.auth import Role
from shoal.core.spec import parse_spec
from shoal.http.auth import REFUSED_BODY_BYTES
from shoal.run import start_head, start_scheduler
from tests.integration.test_security import local_settings

pytestmark = pytest.mark.timeout(60)

WAIT_S = 10.0  # how long the test waits for an answer before it fails
DECLARED = 100 * 2**20  # the body the client says it sends (it sends 1 KiB of it)


async def ask(address: str, head: bytes, body: bytes) -> tuple[int, dict[str, str], bool]:
    """Send ``head`` and ``body`` on a new connection; (status, headers, whether the server
    then closed the connection)."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + body)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), WAIT_S)
        status = int(line.split()[1])
        headers: dict[str, str] = {}
        while (line := await asyncio.wait_for(reader.readline(), WAIT_S)) not in (b"\r\n", b""):
            key, _, value = line.decode().partition(":")
            headers[key.strip().lower()] = value.strip()
        await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), WAIT_S)
        if headers.get("connection") != "close":
            # Still open: the next request on it is served.
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            line = await asyncio.wait_for(reader.readline(), WAIT_S)
            assert line.startswith(b"HTTP/1.1 200"), line
            return status, headers, False
        return status, headers, await asyncio.wait_for(reader.read(), WAIT_S) == b""
    finally:
        writer.close()


def request(path: str, length: int, token: str = "") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{auth}\r\n"
    ).encode()


async def test_a_refused_request_is_answered_without_reading_its_body(tmp_path: Path) -> None:
    settings = local_settings(tmp_path)
    async with AsyncExitStack() as stack:
        head, head_address, head_http = await start_head(settings, stack)
        scheduler, _, http_address = await start_scheduler(settings, stack, head_address)
        await head.create_token(Role.ADMIN, "root")
        _, reader = await head.create_token(Role.READ, "reader")
        spec = {"name": "locked", "backend": "python", "model": "m:M", "replicas": 0}
        await head.apply(parse_spec({**spec, "auth": {"tokens": ["reader"]}}))
        deadline = time.monotonic() + 10
        while "locked" not in scheduler.router.deployments():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)

        part = b"x" * 1024
        cases = [
            (head_http, "/api/deployments", "", 401),
            (head_http, "/api/deployments", "shoal_wrong", 401),
            (head_http, "/api/deployments", reader, 403),
            (http_address, "/v2/models/locked/infer", "", 401),
            (http_address, "/v2/models/locked/infer", "shoal_wrong", 401),
            # The OpenAI API names the deployment in the body: with every deployment locked,
            # a caller without a known token is refused before it is read.
            (http_address, "/v1/chat/completions", "", 401),
            (http_address, "/v1/chat/completions", "shoal_wrong", 401),
        ]
        for address, path, token, expected in cases:
            # 100 MB declared, 1 KiB sent: answered at once, and the connection closed.
            status, headers, closed = await ask(address, request(path, DECLARED, token), part)
            assert (status, headers.get("connection"), closed) == (expected, "close", True), (path, token)
            # A small body is read: the connection serves the next request.
            small = json.dumps({"pad": "x" * (REFUSED_BODY_BYTES // 2)}).encode()
            status, headers, closed = await ask(address, request(path, len(small), token), small)
            assert (status, headers.get("connection"), closed) == (expected, None, False), (path, token)

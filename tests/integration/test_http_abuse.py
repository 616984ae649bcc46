"""HTTP under abuse, on a real cluster: slow and idle connections are closed, the
connection cap refuses newcomers while serving those in, and a flood of clients against
a small queue gets its refusals at once while the admitted requests go through.

Raw HTTP/1.1 over asyncio streams, so the test controls every byte and sees every close.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from shoal.testing.cluster import ProcessCluster

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="module")]

TENSORS = [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
BODY = json.dumps(
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
).encode()
TIMEOUT_S = 1.0  # header and idle timeouts of the cluster under test
WAIT_S = 20.0  # how long a test waits for anything before it fails


def slow_spec(name: str, base_dir: Path, delay_ms: float, queue: int) -> dict[str, object]:
    return {
        "name": name,
        "backend": "python",
        "model": "echo:Echo",
        "base_dir": str(base_dir),
        "options": {"delay_ms": delay_ms},
        "resources": {"cpus": 0.1},
        "max_ongoing_requests": 1,
        "max_queued_requests": queue,
        "inputs": TENSORS,
        "outputs": TENSORS,
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(
    tmp_path_factory: pytest.TempPathFactory, examples_dir: Path
) -> AsyncIterator[ProcessCluster]:
    env = {"SHOAL_HTTP_HEADER_TIMEOUT_S": str(TIMEOUT_S), "SHOAL_HTTP_IDLE_TIMEOUT_S": str(TIMEOUT_S)}
    async with ProcessCluster(tmp_path_factory.mktemp("abuse"), env=env) as c:
        await c.deploy(slow_spec("quick", examples_dir, 30, 2))
        await c.deploy(slow_spec("stuck", examples_dir, 5000, 1))
        await c.wait_ready("quick", 1)
        await c.wait_ready("stuck", 1)
        yield c


class Conn:
    """One raw HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, address: str) -> Conn:
        host, _, port = address.rpartition(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        """The next response: (status, headers, body); status 0 if the server closed first."""
        line = await asyncio.wait_for(self.reader.readline(), WAIT_S)
        if not line:
            return 0, {}, b""
        status = int(line.split()[1])
        headers: dict[str, str] = {}
        while (h := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = h.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        self.send(head(method, path, len(body)) + body)
        return await self.answer()

    async def closed_by_server(self) -> bool:
        """Waits until the server closes (True) or sends more (False)."""
        try:
            return await asyncio.wait_for(self.reader.read(1), WAIT_S) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.writer.close()


def head(method: str, path: str, length: int) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


async def trickle(conn: Conn, data: bytes) -> None:
    for byte in data:
        conn.send(bytes([byte]))
        await asyncio.sleep(TIMEOUT_S / 4)


def servers(cluster: ProcessCluster) -> list[str]:
    """Every HTTP server of the cluster: the head's REST API and the scheduler's ingress."""
    assert cluster.head is not None
    return [cluster.head.endpoints["head_http"], cluster.http_address()]


async def test_a_half_sent_request_head_is_closed_after_the_header_timeout(cluster: ProcessCluster) -> None:
    for address in servers(cluster):
        # A slowloris client: a byte of the head now and then, never the end of it.
        conn = await Conn.open(address)
        partial = head("GET", "/healthz", 0)[:-2]

        sending = asyncio.create_task(trickle(conn, partial))
        try:
            status, _, body = await conn.answer()
        finally:
            sending.cancel()
        assert status == 408, (address, status, body)
        assert b"http_header_timeout_s" in body
        assert await conn.closed_by_server()
        conn.close()

        # The same after an answer on a keep-alive connection (its first byte stopped
        # uvicorn's own keep-alive timer).
        conn = await Conn.open(address)
        assert (await conn.request("GET", "/healthz"))[0] == 200
        sending = asyncio.create_task(trickle(conn, partial))
        try:
            status, _, _ = await conn.answer()
        finally:
            sending.cancel()
        assert status == 408 and await conn.closed_by_server()
        conn.close()

        # A client that connects and sends nothing is closed the same way.
        silent = await Conn.open(address)
        status, _, _ = await silent.answer()
        assert status == 408 and await silent.closed_by_server()
        silent.close()


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    cluster: ProcessCluster,
) -> None:
    for address in servers(cluster):
        conn = await Conn.open(address)
        status, _, _ = await conn.request("GET", "/healthz")
        assert status == 200
        started = time.monotonic()
        assert await conn.closed_by_server()
        # The setting, not uvicorn's own 5 s (a generous bound for a busy machine).
        assert TIMEOUT_S * 0.9 <= time.monotonic() - started < 4.0
        conn.close()


async def test_a_refusal_at_capacity_does_not_wait_for_the_body(cluster: ProcessCluster) -> None:
    address = cluster.http_address()
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=WAIT_S) as http:
        # Three at once: one runs and one waits (5 s each), and the third is refused.
        sent = [asyncio.create_task(http.post("/v2/models/stuck/infer", content=BODY)) for _ in range(3)]
        first, held = await asyncio.wait(sent, return_when=asyncio.FIRST_COMPLETED)
        assert [t.result().status_code for t in first] == [503]
        conn = await Conn.open(address)
        # The head of a request whose body has not come yet: refused on the head alone.
        conn.send(head("POST", "/v2/models/stuck/infer", len(BODY)))
        status, headers, body = await conn.answer()
        assert status == 503, body
        assert "max_queued_requests=1" in json.loads(body)["error"]
        assert headers["retry-after"] == "1"
        # The body that follows is dropped, and the connection serves the next request.
        conn.send(BODY)
        status, _, _ = await conn.request("GET", "/v2/health/live")
        assert status == 200
        conn.close()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]


async def test_a_flood_beyond_a_small_queue_is_refused_at_once_and_the_admitted_go_through(
    cluster: ProcessCluster,
) -> None:
    address = cluster.http_address()
    clients, duration = 64, 3.0
    refused: list[float] = []
    admitted: list[float] = []

    async def client() -> None:
        conn = await Conn.open(address)
        stop = time.monotonic() + duration
        while time.monotonic() < stop:
            started = time.monotonic()
            status, headers, body = await conn.request("POST", "/v2/models/quick/infer", BODY)
            took = time.monotonic() - started
            if status == 503:
                assert "max_queued_requests=2" in json.loads(body)["error"]
                assert headers["retry-after"] == "1"
                refused.append(took)
            else:
                assert status == 200, body
                assert json.loads(body)["outputs"][0]["data"] == [1, 2, 3, 4]
                admitted.append(took)
        conn.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    assert refused and admitted
    # Generous bounds for a shared machine: a refusal within a second or two, not the
    # seconds it took when every refused body was parsed first, and no admitted request
    # left waiting while newcomers took the slots it queued for (bench/overload.py has
    # the figures).
    assert max(refused) < 2.0, sorted(refused)[-5:]
    assert max(admitted) < 2.5, sorted(admitted)[-5:]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def capped(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ProcessCluster]:
    async with ProcessCluster(
        tmp_path_factory.mktemp("capped"), env={"SHOAL_HTTP_MAX_CONNECTIONS": "8"}
    ) as c:
        yield c


async def test_past_the_connection_cap_new_connections_are_refused_and_those_open_are_served(
    capped: ProcessCluster,
) -> None:
    address = capped.http_address()
    held = [await Conn.open(address) for _ in range(8)]
    for conn in held:
        assert (await conn.request("GET", "/v2/health/live"))[0] == 200
    extra = await Conn.open(address)
    status, _, body = await extra.answer()  # answered without asking
    assert status == 503 and b"http_max_connections" in body
    assert await extra.closed_by_server()
    extra.close()
    for conn in held:
        assert (await conn.request("GET", "/v2/health/live"))[0] == 200
    # A connection that closes makes room for a new one.
    held.pop().close()
    deadline = time.monotonic() + WAIT_S
    while True:
        late = await Conn.open(address)
        try:
            status, _, _ = await late.request("GET", "/v2/health/live")
        except ConnectionResetError:  # refused, before the close was seen
            status = 0
        late.close()
        if status == 200 or time.monotonic() > deadline:
            break
    assert status == 200
    for conn in held:
        conn.close()


async def test_every_ingress_process_closes_a_silent_connection(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """With several ingress processes sharing the HTTP port, each applies the header timeout."""
    env = {"SHOAL_INGRESS_WORKERS": "2", "SHOAL_HTTP_HEADER_TIMEOUT_S": str(TIMEOUT_S)}
    async with ProcessCluster(tmp_path_factory.mktemp("workers"), env=env) as c:
        # The kernel spreads connections over the processes; eight reach both but for 1 in 128.
        conns = [await Conn.open(c.http_address()) for _ in range(8)]
        answers = await asyncio.gather(*(conn.answer() for conn in conns))
        assert [status for status, _, _ in answers] == [408] * 8
        for conn in conns:
            assert await conn.closed_by_server()
            conn.close()

"""A REST inference request whose client hangs up is dropped, as a cancelled gRPC call is:
it leaves the deployment's queue (or its replica's slot) at once and is counted
``cancelled``. Before, uvicorn told the app only when it called ``receive()`` again, which
an inference request whose body is read never does: six clients of a 2 s model that left
after 0.5 s held the queue (others got 503 for 1.5 s) and all ran, one after the other.

A client that takes none of its answer's bytes for ``idle_timeout_s`` is gone too: its
connection is dropped, and a stream it opened stops its generation. Before, two clients
that opened long streams and never read held both slots of a deployment for as long as
they kept their connections (30 s and counting), and the next client waited in the
queue; one that reads, however slowly, keeps its stream.

A real ``HttpServer`` on loopback (both parsers), the scheduler's app, in-memory replicas.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import cast

import httpx
import pytest

from shoal.config import Settings
from shoal.core.spec import parse_spec
from shoal.http.scheduler import scheduler_app
from shoal.http.server import HttpLimits, HttpServer, LogWindow, _Bounds
from shoal.scheduler.node import SchedulerNode
from shoal.scheduler.router import Router
from shoal.testing.fakes import FakeReplicas, fake_generation
from shoal.types import GenerateRequest, HeadLink

pytestmark = pytest.mark.timeout(30)

IDLE_S = 1.0

TYPED = [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
REQUEST = (
    f"POST /v2/models/echo/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    f"Content-Length: {len(BODY)}\r\n\r\n{BODY}"
).encode()


class Served:
    def __init__(self, node: SchedulerNode, fakes: FakeReplicas, port: int) -> None:
        self.node = node
        self.fakes = fakes
        self.port = port


@pytest.fixture(params=["httptools", "h11"])
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    # Keep-alives every 50 ms: a stream's comment lines are bytes the server writes, not
    # bytes its client reads; a client that reads none of them is dropped all the same.
    settings = Settings(sse_keepalive_s=0.05)
    fakes = FakeReplicas(gate=asyncio.Event())
    router = Router("s1", settings, fakes, policy="round_robin")
    node = SchedulerNode(settings, "s1", cast(HeadLink, None), fakes, router=router)
    node.registered.set()
    doc = {
        "name": "echo",
        "backend": "python",
        "model": "m:M",
        "inputs": TYPED,
        "outputs": TYPED,
        "max_ongoing_requests": 1,
        "max_queued_requests": 2,
    }
    router.add("a", parse_spec(doc), "a:9000", "s1")
    generation = {"backend": "transformers", "model": "m", "inputs": [], "outputs": []}
    router.add("g", parse_spec({**generation, "name": "gen", "options": {"task": "generation"}}), "g:1", "s1")
    router.add("e", parse_spec({**generation, "name": "emb", "options": {"task": "embedding"}}), "e:1", "s1")
    limits = HttpLimits(idle_timeout_s=IDLE_S)
    server = HttpServer(scheduler_app(node), "127.0.0.1", 0, limits=limits, parser=request.param)
    await server.start()
    try:
        yield Served(node, fakes, server.port)
    finally:
        await server.stop()
        await router.aclose()


async def test_requests_whose_clients_hang_up_leave_the_queue_and_the_replica(served: Served) -> None:
    router = served.node.router
    replica = served.fakes.client("a:9000")
    conns = [await asyncio.open_connection("127.0.0.1", served.port) for _ in range(3)]
    for _, writer in conns:
        writer.write(REQUEST)
        await writer.drain()
    # One on the replica (held there by its gate), two queued behind it: the queue is full.
    await replica.wait_for_requests(1)
    async with asyncio.timeout(5):
        while router.load()["echo"].queued < 2:
            await asyncio.sleep(0.01)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.port}") as http:
        full = await http.post("/v2/models/echo/infer", content=BODY)
        assert full.status_code == 503, full.text

        for _, writer in conns:
            writer.close()
        async with asyncio.timeout(5):
            while router.stats()["echo"].outcomes["cancelled"] < 3:
                await asyncio.sleep(0.01)
        load = router.load()["echo"]
        assert (load.in_flight, load.queued) == (0, 0)
        stats = router.stats()["echo"]
        assert stats.errors == 1  # the 503 above; the three that left are no errors

        # The next client is served at once, and the two that were queued never ran.
        assert served.fakes.gate is not None
        served.fakes.gate.set()
        reply = await http.post("/v2/models/echo/infer", content=BODY)
        assert reply.status_code == 200, reply.text
        assert reply.json()["outputs"][0]["data"] == [1, 2, 3, 4]
    assert len(replica.requests) == 2


# The other HTTP doors: each holds a replica while it runs. The streamed ones are held
# before their first piece, while a stream has not answered yet (before, those were
# dropped only once their first piece came).
CHAT = [{"role": "user", "content": "hi"}]
WHOLE_ANSWERS: list[tuple[str, str, dict[str, object]]] = [
    ("gen", "/v2/models/gen/generate", {"text_input": "hello", "max_tokens": 4}),
    ("gen", "/v1/completions", {"model": "gen", "prompt": "hello", "max_tokens": 4}),
    ("gen", "/v1/chat/completions", {"model": "gen", "messages": CHAT}),
    ("emb", "/v1/embeddings", {"model": "emb", "input": ["hello"]}),
    ("gen", "/v2/models/gen/generate_stream", {"text_input": "hello", "max_tokens": 4}),
    ("gen", "/v1/completions", {"model": "gen", "prompt": "hello", "stream": True}),
    ("gen", "/v1/chat/completions", {"model": "gen", "messages": CHAT, "stream": True}),
]


@pytest.mark.parametrize(
    ("deployment", "path", "doc"),
    WHOLE_ANSWERS,
    ids=[w[1] + (" stream" if "stream" in w[2] else "") for w in WHOLE_ANSWERS],
)
async def test_a_generation_or_embedding_whose_client_hangs_up_is_dropped(
    served: Served, deployment: str, path: str, doc: dict[str, object]
) -> None:
    await hang_up_once_held(served, deployment, path, json.dumps(doc))


async def hang_up_once_held(served: Served, deployment: str, path: str, body: str) -> None:
    """POST ``body`` to ``path``, close the connection once the request is held on its
    replica (by the fakes' gate), and see it counted cancelled, its slot freed."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    replica = served.fakes.client({"gen": "g:1", "emb": "e:1"}.get(deployment, "a:9000"))
    _, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(head)
    await writer.drain()
    async with asyncio.timeout(5):  # held on the replica by its gate
        while not (replica.generations or replica.requests):
            await asyncio.sleep(0.01)
    writer.close()
    router = served.node.router
    async with asyncio.timeout(5):
        while router.stats()[deployment].outcomes["cancelled"] < 1:
            await asyncio.sleep(0.01)
    assert router.load()[deployment].in_flight == 0


LARGE_BODIES: list[tuple[str, str, dict[str, object]]] = [
    (
        "echo",
        "/v2/models/echo/infer",
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [20_000, 4], "data": [1.5] * 80_000}]},
    ),
    ("emb", "/v1/embeddings", {"model": "emb", "input": ["hello " * 70] * 200}),
]


@pytest.mark.parametrize(("deployment", "path", "doc"), LARGE_BODIES, ids=[b[1] for b in LARGE_BODIES])
async def test_a_request_of_a_large_body_whose_client_hangs_up_is_dropped(
    served: Served, deployment: str, path: str, doc: dict[str, object]
) -> None:
    """uvicorn stops reading a connection once 64 KiB of body wait for the app, and reads
    again only when the app asks for more, which one that has the whole body never does:
    the connection's loss went unseen until the answer was written. Seen on a cluster: a
    5 MB /v1/embeddings request (512 texts) whose client left after 2 s ran all 13 s of
    its model calls, and a one-text request behind it waited for them."""
    body = json.dumps(doc)
    assert len(body) > 65_536
    await hang_up_once_held(served, deployment, path, body)


# Clients that stop reading: a stream of megabytes, on a connection with a small buffer.
STREAM_BODY = json.dumps({"model": "gen", "prompt": "hi", "stream": True}).encode()
STREAM = (
    b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(STREAM_BODY), STREAM_BODY)
)


def megabytes(request: GenerateRequest) -> list[str]:
    """20 MB a stream; a whole answer is the fakes' usual one."""
    return ["x" * 1000] * 20_000 if request.stream else fake_generation(request)


def open_stream(served: Served) -> socket.socket:
    """A stream's request on a connection with a small receive buffer (not read here)."""
    assert served.fakes.gate is not None
    served.fakes.gate.set()
    served.fakes.client("g:1").generator = megabytes
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", served.port))
    sock.sendall(STREAM)
    sock.setblocking(False)
    return sock


async def test_streams_whose_clients_never_read_are_dropped(
    served: Served, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="shoal.http")
    monkeypatch.setattr(_Bounds, "_stalls", LogWindow(10.0))  # this test's own window
    router, replica = served.node.router, served.fakes.client("g:1")
    socks = [open_stream(served) for _ in range(3)]
    try:
        async with asyncio.timeout(5):
            while router.load()["gen"].in_flight < 3:
                await asyncio.sleep(0.01)
        async with asyncio.timeout(10):
            while replica.streams_closed < 3:
                await asyncio.sleep(0.05)
        assert router.load()["gen"].in_flight == 0
        # Logged once in ten seconds, however many clients never read (each was a line: a
        # client holding 4,096 such connections wrote 270 lines a second).
        dropped = [r for r in caplog.records if "took no bytes of its answer" in r.getMessage()]
        assert len(dropped) == 1
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.port}", timeout=5) as http:
            body = {"model": "gen", "prompt": "a b c", "max_tokens": 3}
            reply = await http.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == " a b c"
    finally:
        for sock in socks:
            sock.close()


async def test_a_client_that_reads_slowly_keeps_its_stream(served: Served) -> None:
    sock = open_stream(served)
    loop = asyncio.get_running_loop()
    read = 0
    try:
        # 4 KB every 0.2 s, for over twice the timeout: far slower than the answer comes.
        for _ in range(int(2.5 * IDLE_S / 0.2)):
            await asyncio.sleep(0.2)
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
            assert data, f"the connection was closed after {read} bytes"
            read += len(data)
        assert served.node.router.load()["gen"].in_flight == 1
        assert served.fakes.client("g:1").streams_closed == 0
    finally:
        sock.close()

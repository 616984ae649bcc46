"""Every gRPC server shoal runs (``shoal.rpc.server.new_server``: head, scheduler, ingress
processes, replicas) bounds its connections, as its HTTP servers do: a connection that
never sends the HTTP/2 preface is closed (``grpc_handshake_timeout_s``), past
``grpc_max_connections`` a new one is closed at once while those open are served, and a
connection with no call is closed after ``grpc_idle_timeout_s`` (off by default), which a
client that waits longer between calls does not notice: it connects again for its next
call."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import grpc.aio
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2

from shoal.config import Settings
from shoal.rpc.channels import open_channel
from shoal.rpc.server import bind, new_server

pytestmark = pytest.mark.timeout(30)

LIVE = "/inference.GRPCInferenceService/ServerLive"


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[int, list[str]]]:
    """A server answering ``ServerLive``, its port, and the peer of each call it answered
    (a client's address and port: a new port is a new connection)."""
    peers: list[str] = []

    async def live(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        peers.append(context.peer())
        return service_pb2.ServerLiveResponse(live=True)

    handler = grpc.unary_unary_rpc_method_handler(
        live,
        request_deserializer=service_pb2.ServerLiveRequest.FromString,
        response_serializer=service_pb2.ServerLiveResponse.SerializeToString,
    )
    server = new_server(settings)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ServerLive": handler}),)
    )
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    try:
        yield port, peers
    finally:
        await server.stop(0)


def closed(sock: socket.socket) -> bool:
    """The server closed ``sock`` (what it sent before, its HTTP/2 settings, is read and
    dropped: a read of one byte would take those for a live connection)."""
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


async def until_closed(socks: list[socket.socket], within_s: float) -> float:
    """Seconds until every one of ``socks`` is closed; fails past ``within_s``."""
    start = time.monotonic()
    while not all(closed(s) for s in socks):
        assert time.monotonic() - start < within_s, f"{sum(not closed(s) for s in socks)} still open"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def raw(port: int, n: int) -> list[socket.socket]:
    """``n`` TCP connections that send nothing (no HTTP/2 preface)."""
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]


async def live(channel: grpc.aio.Channel) -> bool:
    call = channel.unary_unary(
        LIVE,
        request_serializer=service_pb2.ServerLiveRequest.SerializeToString,
        response_deserializer=service_pb2.ServerLiveResponse.FromString,
    )
    answer = await call(service_pb2.ServerLiveRequest(), timeout=5)
    return bool(answer.live)


async def test_a_connection_that_sends_no_preface_is_closed_after_the_handshake_timeout() -> None:
    """Before: they stayed open for gRPC's own 120 s, and a flood of them took every file
    descriptor of the process."""
    async with serving(Settings(grpc_handshake_timeout_s=0.5)) as (port, _):
        socks = raw(port, 20)
        try:
            took = await until_closed(socks, within_s=5.0)
            assert took >= 0.3, took
            async with open_channel(f"127.0.0.1:{port}", Settings()) as channel:
                assert await live(channel)  # a client that speaks gRPC is served as before
        finally:
            for s in socks:
                s.close()


async def test_past_the_connection_cap_a_new_connection_is_closed_and_those_open_are_served() -> None:
    settings = Settings(grpc_max_connections=3, grpc_handshake_timeout_s=60)
    async with serving(settings) as (port, _):
        async with open_channel(f"127.0.0.1:{port}", Settings()) as first:
            assert await live(first)  # connection 1
            held = raw(port, 2)  # 2 and 3
            over = raw(port, 5)
            try:
                await until_closed(over, within_s=2.0)
                assert not any(closed(s) for s in held)
                # A new client past the cap: its connection is closed, UNAVAILABLE.
                options = [("grpc.use_local_subchannel_pool", 1)]
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as second:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await live(second)
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert await live(first)  # the connection already open is served
                    for s in held:
                        s.close()
                    await asyncio.sleep(0.2)
                    for _ in range(50):  # its channel's reconnect backoff
                        try:
                            assert await live(second)
                            break
                        except grpc.aio.AioRpcError:
                            await asyncio.sleep(0.2)
                    else:
                        pytest.fail("a client was not served once connections were closed")
            finally:
                for s in held + over:
                    s.close()


async def test_a_tritonclient_that_waits_past_the_idle_limit_is_served() -> None:
    """The server closes an idle connection with a GOAWAY; tritonclient (and any gRPC
    channel) connects again for its next call, and that call succeeds."""
    async with serving(Settings(grpc_idle_timeout_s=0.5)) as (port, peers):
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            for _ in range(3):
                assert await asyncio.to_thread(client.is_server_live)
                await asyncio.sleep(1.2)
            assert await asyncio.to_thread(client.is_server_live)
        finally:
            client.close()
        assert len(set(peers)) >= 2, peers  # the idle connection was closed, and opened anew

"""Clients check the role of the server they reach (issue 13, item 4): a server holding
another role's key (every scheduler machine has ``replica.key``) cannot pose as the head,
so the CLI never sends it a token and a scheduler never takes a routing table from it.

Real gRPC servers with TLS on 127.0.0.1 port 0, with no servicer: a call that passes the
handshake answers UNIMPLEMENTED, one that does not never reaches the server.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from shoal import certs
from shoal.config import Settings
from shoal.core.placement import Capacity
from shoal.errors import InvalidArgument, ShoalError, Unavailable
from shoal.rpc.clients import ControlClient, GrpcHeadLink, GrpcSchedulerClient
from shoal.rpc.server import bind, new_server
from shoal.rpc.tls import server_credentials
from shoal.types import SchedulerRegistration

pytestmark = pytest.mark.timeout(60)


class Seen(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # generic in grpc-stubs only
    """Records the metadata of every call that reached the server."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str | bytes]] = []  # bytes for a "-bin" key

    async def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        self.calls.append({k: v for k, v in details.invocation_metadata or ()})
        return await continuation(details)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tls")
    certs.init(folder)
    return folder


@asynccontextmanager
async def server_as(settings: Settings, role: str) -> AsyncIterator[tuple[str, Seen]]:
    seen = Seen()
    server = new_server(settings, [seen])
    port = bind(server, "127.0.0.1", 0, server_credentials(settings, role))
    await server.start()
    try:
        yield f"127.0.0.1:{port}", seen
    finally:
        await server.stop(None)


def settings_for(tls: Path) -> Settings:
    return Settings(tls_dir=str(tls), token="shoal_secret", rpc_timeout_s=3, rpc_attempts=1)


async def reaches(call: Callable[[], Any]) -> bool:
    """True when the call passed the handshake (the bare server answers UNIMPLEMENTED)."""
    try:
        await call()
    except Unavailable:
        return False
    except ShoalError:
        return True
    return True


@pytest.mark.parametrize("impostor", ["replica", "scheduler", "client"])
async def test_the_cli_sends_no_token_to_a_server_that_is_not_the_head(tls: Path, impostor: str) -> None:
    settings = settings_for(tls)
    async with server_as(settings, impostor) as (address, seen):
        client = ControlClient(address, settings)
        try:
            assert not await reaches(client.status)
        finally:
            await client.close()
    assert seen.calls == []  # the token never left the client


async def test_the_cli_reaches_the_head(tls: Path) -> None:
    settings = settings_for(tls)
    async with server_as(settings, "head") as (address, seen):
        client = ControlClient(address, settings)
        try:
            assert await reaches(client.status)
        finally:
            await client.close()
    assert seen.calls and seen.calls[0].get("authorization") == "Bearer shoal_secret"


@pytest.mark.parametrize(("role", "expected"), [("replica", False), ("scheduler", False), ("head", True)])
async def test_a_scheduler_takes_routes_only_from_the_head(tls: Path, role: str, expected: bool) -> None:
    settings = settings_for(tls)
    reg = SchedulerRegistration("s1", "s1:1", "s1:2", Capacity(1, 1, 0), pid=1, hostname="h", replicas=())
    async with server_as(settings, role) as (address, _):
        link = GrpcHeadLink(address, settings)
        try:
            assert await reaches(lambda: link.register(reg)) is expected
        finally:
            await link.close()


@pytest.mark.parametrize(("role", "expected"), [("replica", False), ("head", False), ("scheduler", True)])
async def test_the_head_talks_only_to_schedulers(tls: Path, role: str, expected: bool) -> None:
    settings = settings_for(tls)
    async with server_as(settings, role) as (address, _):
        client = GrpcSchedulerClient("s1", address, settings)
        try:
            assert await reaches(lambda: client.remove_replica("r1", True)) is expected
        finally:
            await client.close()


async def unreachable(server: Settings, tls_dir: Path) -> tuple[str, str]:
    """The address of a head serving with ``server``'s TLS settings, and the message of the
    HeadUnreachable that a Python API client with the certificates in ``tls_dir`` gets."""
    from shoal.api import AsyncClient
    from shoal.errors import HeadUnreachable

    async with server_as(server, "head") as (address, _):
        client = AsyncClient(
            address, settings=Settings(head_address=address, tls_dir=str(tls_dir), rpc_attempts=1)
        )
        try:
            with pytest.raises(HeadUnreachable) as err:
                await client.status()
        finally:
            await client.close()
    return address, str(err.value)


async def test_a_client_with_another_ca_is_told_about_certificates_not_to_start_a_head(
    tls: Path, tmp_path: Path
) -> None:
    """Before: ``shoal --head ADDR status --tls-dir OTHER`` said ``... CERTIFICATE_VERIFY_FAILED
    ...); is it running? Start one with 'shoal up' ...`` of a head that runs."""
    other = tmp_path / "other"
    certs.init(other)
    address, message = await unreachable(settings_for(tls), other)
    assert message.startswith(f"cannot reach the head at {address}: ")
    assert "TLS handshake failed" in message and "same cluster CA" in message
    assert f"this client used those in {other}" in message
    assert "Start one" not in message and "is it running" not in message


async def test_a_tls_client_at_a_plaintext_head_is_told_it_speaks_no_tls(tls: Path) -> None:
    """Before: ``shoal --head ADDR status --tls-dir DIR`` at a head without TLS said "both
    sides need certificates from the same cluster CA ... A server answers there: give
    --tls-dir", to a user who had given it."""
    address, message = await unreachable(Settings(), tls)  # a head without TLS
    assert message.startswith(f"cannot reach the head at {address}: it does not speak TLS")
    assert "out to reach it" in message
    assert "same cluster CA" not in message and "give --tls-dir" not in message


async def test_a_client_with_an_expired_certificate_is_told_so(tls: Path, tmp_path: Path) -> None:
    """Before: the CLI with an expired ``client.crt`` was told "... Socket closed); is it
    running? Start one with 'shoal up'" of a head that ran (only the head's gRPC debug log
    said "certificate has expired")."""
    from shoal.api import AsyncClient

    expired = tmp_path / "expired"
    shutil.copytree(tls, expired)
    certs.renew(expired, ("client",), days=-1)  # ran out a day ago
    async with server_as(settings_for(tls), "head") as (address, seen):
        client = AsyncClient(address, settings=Settings(head_address=address, tls_dir=str(expired)))
        try:
            with pytest.raises(InvalidArgument, match=r"client\.crt expired on .*shoal certs init --force"):
                await client.status()
        finally:
            await client.close()
    assert seen.calls == []

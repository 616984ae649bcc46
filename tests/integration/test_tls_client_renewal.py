"""Client certificates renewed on disk reach the channels already open (docs/security.md,
"Certificate rotation"): a scheduler's link to the head and the head's client of a
scheduler live as long as their peer, and must present the certificate on disk now when
they connect again, not the one they were made with, which may have run out since.

Real gRPC servers with mutual TLS on 127.0.0.1 port 0 and real certificate files made by
``shoal.certs``: the client's certificate is made to run out seconds after the test starts,
renewed on disk, and the server restarted on the same port so that the client connects
again once the first certificate has run out.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from shoal import certs
from shoal.config import Settings
from shoal.core.placement import Capacity
from shoal.errors import ShoalError
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.channels import PeerChannel, call
from shoal.rpc.clients import GrpcHeadLink, GrpcSchedulerClient
from shoal.rpc.server import bind, new_server
from shoal.rpc.tls import server_credentials
from shoal.types import SchedulerRegistration

pytestmark = pytest.mark.timeout(60)

SHORT_S = 4.0
"""How long the client's first certificate is valid."""


class Head(pbg.HeadServicer):
    def __init__(self) -> None:
        self.more = asyncio.Event()

    async def RegisterScheduler(self, request: pb.RegisterSchedulerRequest, context: Any) -> Any:
        return pb.RegisterSchedulerReply(heartbeat_interval_s=1.0)

    async def WatchRoutes(
        self, request: pb.WatchRoutesRequest, context: Any
    ) -> AsyncIterator[pb.RoutingTable]:
        yield pb.RoutingTable(version=1)
        await self.more.wait()
        yield pb.RoutingTable(version=2)


class Scheduler(pbg.SchedulerServicer):
    def __init__(self) -> None:
        self.removed: list[str] = []

    async def RemoveReplica(self, request: pb.RemoveReplicaRequest, context: Any) -> Any:
        self.removed.append(request.replica_id)
        return pb.Empty()


class Restartable:
    """A gRPC server with ``role``'s certificate that can be stopped and started again on the
    port it got first (what a peer that restarts does)."""

    def __init__(self, settings: Settings, role: str, add: Callable[[grpc.aio.Server], None]) -> None:
        self.settings, self.role, self.add = settings, role, add
        self.port = 0
        self.server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = new_server(self.settings)
        self.add(server)
        self.port = bind(server, "127.0.0.1", self.port, server_credentials(self.settings, self.role))
        await server.start()
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
            self.server = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@asynccontextmanager
async def serving(
    settings: Settings, role: str, add: Callable[[grpc.aio.Server], None]
) -> AsyncIterator[Restartable]:
    server = Restartable(settings, role, add)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def short_lived(tls: Path, role: str) -> datetime.datetime:
    """Make ``role``'s certificate one that runs out in :data:`SHORT_S`; returns its end."""
    certs.init(tls)
    certs.renew(tls, (role,), days=SHORT_S / 86400)
    return certs.check(tls, role)


async def until_ok(call: Callable[[], Awaitable[object]], timeout_s: float = 8.0) -> object:
    """The call's result once it succeeds (a peer restarting refuses for a moment); the
    last error when it never does within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await call()
        except ShoalError as err:
            if time.monotonic() > deadline:
                raise AssertionError(f"still failing after {timeout_s:g}s: {err}") from None
        await asyncio.sleep(0.2)


async def renew_and_reconnect(tls: Path, role: str, end: datetime.datetime, server: Restartable) -> None:
    """Renew ``role``'s certificate on disk, wait until the first one has run out, and
    restart ``server`` so that clients connect again."""
    certs.renew(tls, (role,), days=30)
    left = (end - datetime.datetime.now(datetime.UTC)).total_seconds()
    await asyncio.sleep(max(0.0, left) + 1.5)
    assert certs.check(tls, role) > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=29)
    await server.stop()
    await server.start()


def settings_for(tls: Path) -> Settings:
    return Settings(tls_dir=str(tls), rpc_timeout_s=3, rpc_attempts=1)


async def test_a_scheduler_registers_again_with_its_renewed_certificate(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    end = short_lived(tls, "scheduler")
    settings = settings_for(tls)
    reg = SchedulerRegistration("s1", "s1:1", "s1:2", Capacity(1, 1, 0), pid=1, hostname="h", replicas=())
    servicer = Head()  # type: ignore[abstract]  # the calls it does not serve answer UNIMPLEMENTED
    async with serving(settings, "head", lambda s: pbg.add_HeadServicer_to_server(servicer, s)) as head:
        link = GrpcHeadLink(head.address, settings)
        try:
            assert await link.register(reg) == 1.0
            await renew_and_reconnect(tls, "scheduler", end, head)
            # The head restarted after the first certificate ran out: the link connects again,
            # with the renewed one (before: the one it was made with, which the head refused).
            assert await until_ok(lambda: link.register(reg)) == 1.0
        finally:
            await link.close()


async def test_the_head_reaches_a_scheduler_again_with_its_renewed_certificate(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    end = short_lived(tls, "head")
    settings = settings_for(tls)
    servicer = Scheduler()  # type: ignore[abstract]  # the calls it does not serve answer UNIMPLEMENTED
    async with serving(
        settings, "scheduler", lambda s: pbg.add_SchedulerServicer_to_server(servicer, s)
    ) as sched:
        client = GrpcSchedulerClient("s1", sched.address, settings)
        try:
            await client.remove_replica("r1", True)
            await renew_and_reconnect(tls, "head", end, sched)
            await until_ok(lambda: client.remove_replica("r2", True))
            assert servicer.removed == ["r1", "r2"]
        finally:
            await client.close()


async def register(peer: PeerChannel) -> float:
    """One RegisterScheduler on ``peer``'s channel now (ShoalError when it fails)."""
    reply = await call(
        lambda: peer.stub(pbg.HeadStub).RegisterScheduler(pb.RegisterSchedulerRequest(), timeout=3),
        attempts=1,
    )
    return reply.heartbeat_interval_s


@asynccontextmanager
async def head_and_peer(tls: Path) -> AsyncIterator[tuple[Head, Restartable, PeerChannel]]:
    """A head (``Head``) serving with certificates made in ``tls``, and a scheduler's
    channel to it, closed at the end."""
    certs.init(tls)
    settings = settings_for(tls)
    servicer = Head()  # type: ignore[abstract]  # the calls it does not serve answer UNIMPLEMENTED
    async with serving(settings, "head", lambda s: pbg.add_HeadServicer_to_server(servicer, s)) as head:
        peer = PeerChannel(head.address, settings, "scheduler", server="head")
        try:
            yield servicer, head, peer
        finally:
            await peer.close()


async def test_a_channel_is_not_made_again_while_the_files_stay(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    async with head_and_peer(tls) as (_, _, peer):
        first, stub = peer.channel(), peer.stub(pbg.HeadStub)
        for i in range(8):  # over two seconds: the files are looked at again
            if i == 4:  # touched, and copied again as they were
                for name in ("ca.crt", "scheduler.crt", "scheduler.key"):
                    (tls / name).write_bytes((tls / name).read_bytes())
            assert await register(peer) == 1.0
            await asyncio.sleep(0.3)
        assert peer.renewals == 0
        assert peer.channel() is first
        assert peer.stub(pbg.HeadStub) is stub


async def test_bad_renewed_files_keep_the_channel_and_good_ones_replace_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tls = tmp_path / "tls"
    async with head_and_peer(tls) as (servicer, head, peer):
        first = peer.channel()
        assert await register(peer) == 1.0
        # A key that is not the certificate's: not taken, the channel stays and serves,
        # after the head restarts too (it connects again with the certificate it has).
        good_key = (tls / "scheduler.key").read_bytes()
        shutil.copy(tls / "client.key", tls / "scheduler.key")
        with caplog.at_level(logging.WARNING, logger="shoal"):
            for _ in range(5):
                assert await register(peer) == 1.0
                await asyncio.sleep(0.3)
            await head.stop()
            await head.start()
            assert await until_ok(lambda: register(peer)) == 1.0
        assert f"{tls / 'scheduler.key'} is not the key of {tls / 'scheduler.crt'}" in caplog.text
        assert peer.renewals == 0 and peer.channel() is first

        # A stream open on the channel before good files come goes on after the swap.
        routes = peer.stub(pbg.HeadStub).WatchRoutes(pb.WatchRoutesRequest())
        first_table = await routes.read()
        assert isinstance(first_table, pb.RoutingTable) and first_table.version == 1
        (tls / "scheduler.key").write_bytes(good_key)
        certs.renew(tls, ("scheduler",), days=30)

        async def renewed() -> float:
            interval = await register(peer)
            assert peer.renewals == 1, "not yet"
            return interval

        assert await until_ok_or_assert(renewed) == 1.0
        assert peer.channel() is not first
        servicer.more.set()
        second = await routes.read()
        assert isinstance(second, pb.RoutingTable) and second.version == 2
        # The channel replaced is closed once its connection is gone (the head restarts).
        await head.stop()
        await head.start()
        deadline = time.monotonic() + 5
        while first.get_state() != grpc.ChannelConnectivity.SHUTDOWN:
            assert time.monotonic() < deadline, first.get_state()
            await asyncio.sleep(0.1)
        assert await until_ok(lambda: register(peer)) == 1.0


async def until_ok_or_assert(check: Callable[[], Awaitable[object]], timeout_s: float = 5.0) -> object:
    """``check``'s result once it neither fails nor asserts, within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await check()
        except (AssertionError, ShoalError):
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)

"""A control call given several heads (``--head a,b``) is sent again to the next head only
when sending it again cannot report a wrong outcome; an upload goes on past a head that
does not answer.

Real gRPC servers on 127.0.0.1 port 0 that stand for heads: each records the calls it
served. A head that takes a delete and then does not answer in time (slow, or killed after
its commit) may have done it; before, the client sent the delete on to the next head, which
answered NOT_FOUND "no deployment named 'x'", and a token creation came back ALREADY_EXISTS
"a token named 'ci' exists" with the secret of the one created lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from shoal.config import Settings
from shoal.core.blobs import pack
from shoal.errors import DeadlineExceeded
from shoal.head.leader import LeaderInfo, Leadership
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.blobs import upload
from shoal.rpc.clients import ControlClient
from shoal.rpc.repository import GrpcDeployer
from shoal.rpc.server import bind, new_server
from shoal.rpc.standby import StandbyInterceptor
from shoal.rpc.status import STANDBY_METADATA, abort
from shoal.store.etcd import Fenced

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

SETTINGS = Settings(rpc_timeout_s=1.0, dead_after_s=2.0)


class Head(pbg.HeadServicer):
    """Deletes deployments of a shared set, and creates tokens of a shared name set, as the
    heads of one store do; ``hang``: then answers nothing (a slow head, or one killed after
    its commit)."""

    def __init__(self, name: str, served: list[str], store: set[str], hang: asyncio.Event | None) -> None:
        self.name, self.served, self.store, self.hang = name, served, store, hang

    async def _wait(self) -> None:
        if self.hang is not None:
            await self.hang.wait()

    async def DeleteDeployment(self, request: pb.DeleteDeploymentRequest, context: Any) -> pb.Empty:
        if self.name == "deposed":  # lost its lease: the store refuses its write
            await abort(context, Fenced("this head no longer holds 'leader' (now another)"))
        self.served.append(f"{self.name} DeleteDeployment")
        if request.name not in self.store:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no deployment named {request.name!r}")
        self.store.discard(request.name)
        await self._wait()
        return pb.Empty()

    async def ReadLog(self, request: pb.ReadLogRequest, context: Any) -> AsyncIterator[pb.LogChunk]:
        self.served.append(f"{self.name} ReadLog")
        yield pb.LogChunk(data=b"started\n")

    async def CreateToken(self, request: pb.CreateTokenRequest, context: Any) -> pb.CreateTokenReply:
        self.served.append(f"{self.name} CreateToken")
        if request.name in self.store:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"a token named {request.name!r} exists")
        self.store.add(request.name)
        await self._wait()
        return pb.CreateTokenReply(token="shoal_secret", name=request.name, role=request.role)


def new_head(name: str, served: list[str], store: set[str], hang: asyncio.Event | None = None) -> Head:
    return Head(name, served, store, hang)  # type: ignore[abstract]  # the calls it does not serve answer UNIMPLEMENTED


class Blobs(pbg.BlobServicer):
    """Has every blob already."""

    async def Stat(self, request: pb.BlobRef, context: Any) -> pb.BlobStat:
        return pb.BlobStat(sha256=request.sha256, complete=True)


@asynccontextmanager
async def frozen_head() -> AsyncIterator[tuple[str, list[asyncio.StreamWriter]]]:
    """A head that is frozen (SIGSTOP, a hung machine): its kernel takes TCP connections,
    nothing answers. Its address, and the connections it took."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # kept open, never answered

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", accepted
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def head(servicer: Head, standby: bool = False) -> AsyncIterator[str]:
    """A server for ``servicer`` (the calls it does not serve answer UNIMPLEMENTED); with
    ``standby``, one that refuses every call as a standby head does."""
    interceptors = []
    if standby:
        leadership = Leadership(None, "leader", LeaderInfo("elsewhere:1", "elsewhere:2"), ttl_s=1)  # type: ignore[arg-type]
        interceptors.append(StandbyInterceptor(leadership))  # serving is False: refuses all
    server = new_server(SETTINGS, interceptors)
    pbg.add_HeadServicer_to_server(servicer, server)
    pbg.add_BlobServicer_to_server(Blobs(), server)  # type: ignore[abstract]  # the calls it does not serve answer UNIMPLEMENTED
    port = bind(server, "127.0.0.1", 0, None)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_a_delete_or_token_a_head_may_have_done_is_not_sent_to_the_next_head() -> None:
    served: list[str] = []
    store = {"x"}
    hang = asyncio.Event()
    async with head(new_head("a", served, store, hang)) as a, head(new_head("b", served, store)) as b:
        client = ControlClient(f"{a},{b}", SETTINGS)
        try:
            with pytest.raises(DeadlineExceeded, match=rf"the head at {a} .*may have deleted deployment 'x'"):
                await client.delete("x")
            with pytest.raises(DeadlineExceeded, match=r"token 'ci' .*shoal token list"):
                await client.create_token("admin", "ci")
        finally:
            hang.set()
            await client.close()
    assert served == ["a DeleteDeployment", "a CreateToken"]  # b got neither


async def test_a_delete_refused_by_a_standby_a_deposed_head_or_no_connection_goes_on() -> None:
    """Each refusal shows the head did nothing: the delete goes on to the leader. A deposed
    head (its lease ran out) had its write fenced: UNAVAILABLE, nothing changed."""
    served: list[str] = []
    store = {"x"}
    async with (
        head(new_head("standby", served, store), standby=True) as standby,
        head(new_head("deposed", served, store)) as deposed,
        head(new_head("leader", served, store)) as leader,
    ):
        async with head(new_head("gone", served, store)) as gone:
            pass  # its port is closed again: nothing answers there
        client = ControlClient(f"{gone},{standby},{deposed},{leader}", SETTINGS)
        try:
            await client.delete("x")
        finally:
            await client.close()
    assert served == ["leader DeleteDeployment"]


async def test_one_address_sends_a_delete_again_after_a_standbys_refusals() -> None:
    """Several heads behind one name (a load balancer, a DNS name): the client sees one
    address, and the head behind it stood by at first, then leads. Before, the delete failed
    at the first refusal ('this head stands by'), though the head had done nothing."""
    served: list[str] = []
    refusals = [3]

    class Electing(Head):
        async def DeleteDeployment(self, request: pb.DeleteDeploymentRequest, context: Any) -> pb.Empty:
            if refusals[0]:
                refusals[0] -= 1
                context.set_trailing_metadata(((STANDBY_METADATA, "1"),))
                await context.abort(grpc.StatusCode.UNAVAILABLE, "this head stands by")
            return await super().DeleteDeployment(request, context)

    async with head(Electing("one", served, {"x"}, None)) as one:  # type: ignore[abstract]
        client = ControlClient(one, SETTINGS)
        try:
            await client.delete("x")
        finally:
            await client.close()
    assert refusals == [0] and served == ["one DeleteDeployment"]


async def test_one_address_does_not_send_again_a_delete_it_may_have_done() -> None:
    served: list[str] = []
    hang = asyncio.Event()
    async with head(new_head("one", served, {"x"}, hang)) as one:
        client = ControlClient(one, SETTINGS)
        try:
            with pytest.raises(
                DeadlineExceeded, match=rf"the head at {one} .*may have deleted deployment 'x'"
            ):
                await client.delete("x")
        finally:
            hang.set()
            await client.close()
    assert served == ["one DeleteDeployment"]


async def test_a_delete_goes_on_past_a_head_that_never_took_the_connection() -> None:
    """No call ever reached a frozen head: the delete goes on to the next head."""
    served: list[str] = []
    async with frozen_head() as (frozen, accepted), head(new_head("leader", served, {"x"})) as leader:
        client = ControlClient(f"{frozen},{leader}", SETTINGS)
        try:
            await client.delete("x")
        finally:
            await client.close()
    assert accepted and served == ["leader DeleteDeployment"]


async def test_an_upload_goes_on_past_a_frozen_head(tmp_path: Path) -> None:
    """Before, the frozen head's DEADLINE_EXCEEDED ended the upload (and so every
    ``shoal deploy`` of a local model) without trying the next head."""
    model = tmp_path / "model.pkl"
    model.write_bytes(b"weights")
    packed = pack(model)
    async with frozen_head() as (frozen, accepted), head(new_head("leader", [], set())) as leader:
        settings = SETTINGS.replace(head_address=f"{frozen},{leader}")
        assert await upload(settings, packed, lambda _sent, _size: None) is False  # it had it
    assert accepted


async def test_logs_are_read_through_the_leader_whichever_head_is_named_first() -> None:
    """Before, ``shoal --head standby,leader logs REPLICA`` failed with the standby's
    "this head stands by; the leader is at ...", where every other command went on."""
    served: list[str] = []
    async with (
        head(new_head("standby", served, set()), standby=True) as standby,
        head(new_head("leader", served, set())) as leader,
    ):
        client = ControlClient(f"{standby},{leader}", SETTINGS)
        try:
            assert [chunk async for chunk in client.read_log("r1")] == [b"started\n"]
        finally:
            await client.close()
    assert served == ["leader ReadLog"]


async def test_the_triton_repository_extension_reaches_the_leader_of_several_heads() -> None:
    """A scheduler started with ``--head a,b --model-repository DIR`` unloads a model (a
    delete at the head) through whichever head leads. Before, its channel dialled the
    whole list "a,b" as one address, and every load and unload failed."""
    served: list[str] = []
    async with (
        head(new_head("standby", served, {"x"}), standby=True) as standby,
        head(new_head("leader", served, {"x"})) as leader,
    ):
        deployer = GrpcDeployer(f"{standby},{leader}", SETTINGS)
        try:
            await deployer.delete("x", "Bearer shoal_caller")
        finally:
            await deployer.close()
    assert served == ["leader DeleteDeployment"]

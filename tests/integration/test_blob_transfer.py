"""The Blob service over real gRPC with mutual TLS, in one process: an upload dropped
mid-way continues from the bytes the head kept; a scheduler fetches from the head, a second
one from the first (a peer), not from the head again; only schedulers may download, and
only deploy tokens upload."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from shoal import certs
from shoal.auth import Role
from shoal.config import Settings
from shoal.core.blobs import CHUNK, pack
from shoal.core.clock import FakeClock
from shoal.core.placement import Capacity
from shoal.errors import PermissionDenied
from shoal.head.blobs import BlobStore
from shoal.head.node import HeadNode
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.auth import HEAD_RULES, SCHEDULER_RULES, AuthInterceptor
from shoal.rpc.blobs import GrpcBlobSource, HeadBlobService, SchedulerBlobService, upload
from shoal.rpc.channels import open_channel
from shoal.rpc.server import bind, new_server
from shoal.rpc.status import to_error
from shoal.rpc.tls import server_credentials
from shoal.scheduler.artifacts import ArtifactCache
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers
from shoal.testing.wait import until
from shoal.types import SchedulerRegistration

pytestmark = pytest.mark.timeout(60)


async def test_uploads_resume_and_schedulers_fetch_from_each_other(tmp_path: Path) -> None:
    certs.init(tmp_path / "tls")
    settings = Settings(tls_dir=str(tmp_path / "tls"), rpc_timeout_s=3)
    node = HeadNode(settings, MemoryStore(), FakeSchedulers(), FakeClock())
    store = BlobStore(tmp_path / "head" / "blobs", max_bytes=2**30, grace_s=3600)
    reads: list[int] = []
    real_read = store.read

    def counted(sha256: str, offset: int) -> AsyncIterator[bytes]:
        reads.append(offset)
        return real_read(sha256, offset)

    store.read = counted  # type: ignore[method-assign]
    servers: list[grpc.aio.Server] = []

    async def serve(role: str, service: pbg.BlobServicer) -> str:
        rules = HEAD_RULES if role == "head" else SCHEDULER_RULES
        server = new_server(settings, [AuthInterceptor(rules, tls=True, tokens=node.tokens)])
        pbg.add_BlobServicer_to_server(service, server)
        port = bind(server, "127.0.0.1", 0, server_credentials(settings, role))
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    head = await serve("head", HeadBlobService(store, node))
    client = settings.replace(head_address=head)
    caches: list[ArtifactCache] = []
    sources: list[GrpcBlobSource] = []
    try:
        model = tmp_path / "model.bin"
        model.write_bytes(os.urandom(3 * CHUNK + 100))
        packed = pack(model)

        # An upload whose connection drops after two chunks: the head keeps them.
        channel = open_channel(head, client, server="head")
        hang = asyncio.Event()
        call = pbg.BlobStub(channel).Upload(_two_chunks(packed.path, packed.ref.sha256, packed.size, hang))
        await until(lambda: store.stat(packed.ref.sha256).have == 2 * CHUNK, "two chunks at the head")
        call.cancel()
        assert await call.code() == grpc.StatusCode.CANCELLED
        kept = store.stat(packed.ref.sha256).have
        assert kept == 2 * CHUNK and not store.stat(packed.ref.sha256).complete
        progress: list[int] = []
        assert await upload(client, packed, lambda done, total: progress.append(done))
        assert progress[0] == kept + CHUNK  # it went on from there
        assert (tmp_path / "head" / "blobs" / packed.ref.sha256).read_bytes() == model.read_bytes()
        assert not await upload(client, packed, lambda done, total: None)  # the head has it

        # Only a scheduler's certificate may download (the CLI holds a client one).
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in pbg.BlobStub(channel).Download(pb.BlobDownloadRequest(sha256=packed.ref.sha256)):
                pass
        assert isinstance(to_error(refused.value), PermissionDenied)
        await channel.close(None)

        # Scheduler a fetches from the head; b, from a.
        for sid in ("a", "b"):
            cache = ArtifactCache(tmp_path / sid / "artifacts", limit_bytes=2**30)
            source = GrpcBlobSource(head, settings, sid)
            cache.blob_source = source
            source.own_address = await serve("scheduler", SchedulerBlobService(cache))
            caches.append(cache)
            sources.append(source)
            await node.register_scheduler(
                SchedulerRegistration(sid, source.own_address, "", Capacity(1, 1, 0), pid=1, hostname=sid)
            )
            lease = await cache.acquire(packed.ref.uri)
            assert lease.path.read_bytes() == model.read_bytes()
        assert reads == [0]  # one download from the head: b's came from a

        # Once tokens exist, uploading takes one of role deploy.
        await node.create_token(Role.ADMIN, "admin")
        _, reader = await node.create_token(Role.READ, "reader")
        _, deployer = await node.create_token(Role.DEPLOY, "deployer")
        other = tmp_path / "other.bin"
        other.write_bytes(b"another model")
        with pytest.raises(PermissionDenied, match="needs role deploy"):
            await upload(client.replace(token=reader), pack(other), lambda done, total: None)
        assert await upload(client.replace(token=deployer), pack(other), lambda done, total: None)
    finally:
        for cache in caches:
            await cache.aclose()
        for source in sources:
            await source.aclose()
        for server in servers:
            await server.stop(None)
        await node.aclose()


async def _two_chunks(path: Path, sha256: str, size: int, hang: asyncio.Event) -> AsyncIterator[pb.BlobChunk]:
    """The first two chunks of an upload, then nothing until the call is cancelled."""
    with path.open("rb") as f:
        yield pb.BlobChunk(sha256=sha256, size=size, offset=0, data=f.read(CHUNK))
        yield pb.BlobChunk(data=f.read(CHUNK))
    await hang.wait()

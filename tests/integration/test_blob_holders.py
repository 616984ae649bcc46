"""The head's record of which schedulers hold a blob follows their caches, over real gRPC in
one process: a blob a scheduler's cache evicts is told to the head, which stops pointing
peers (and its own fetch back) at it; a scheduler that registers again is forgotten as a
holder until it tells again what its cache holds."""

from __future__ import annotations

import os
from pathlib import Path

import grpc.aio
import pytest

from shoal.config import Settings
from shoal.core.blobs import Packed, pack
from shoal.core.clock import FakeClock
from shoal.core.placement import Capacity
from shoal.errors import FailedPrecondition
from shoal.head.blobs import BlobStore, holder_addresses
from shoal.head.node import HeadNode
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.auth import HEAD_RULES, SCHEDULER_RULES, AuthInterceptor
from shoal.rpc.blobs import GrpcBlobSource, HeadBlobService, SchedulerBlobService, upload
from shoal.rpc.server import bind, new_server
from shoal.scheduler.artifacts import ArtifactCache
from shoal.scheduler.blob_fetch import Announcer
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers
from shoal.testing.wait import until
from shoal.types import SchedulerRegistration

pytestmark = pytest.mark.timeout(60)

SIZE = 300_000


async def test_a_blob_a_scheduler_evicts_is_no_longer_offered_from_it(tmp_path: Path) -> None:
    """Scheduler a's cache holds one model at a time. It used to stay listed for a blob it
    had evicted: once the head lost its own copy, a scheduler fetching it waited 120 s for a
    fetch back that could not come (``the head is fetching ... back``); now the head hears of
    the eviction, and the fetch fails at once saying to upload it again."""
    settings = Settings(rpc_timeout_s=3)
    node = HeadNode(settings, MemoryStore(), FakeSchedulers(), FakeClock())
    store = BlobStore(tmp_path / "head" / "blobs", max_bytes=2**30, grace_s=3600)
    node.blobs = store
    servers: list[grpc.aio.Server] = []

    async def serve(role: str, service: pbg.BlobServicer) -> str:
        rules = HEAD_RULES if role == "head" else SCHEDULER_RULES
        server = new_server(settings, [AuthInterceptor(rules, tls=False, tokens=node.tokens)])
        pbg.add_BlobServicer_to_server(service, server)
        port = bind(server, "127.0.0.1", 0, None)
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    head = await serve("head", HeadBlobService(store, node))
    caches: list[ArtifactCache] = []
    sources: list[GrpcBlobSource] = []
    announcers: list[Announcer] = []
    models: list[Packed] = []
    try:
        for name in ("one.bin", "two.bin"):
            (tmp_path / name).write_bytes(os.urandom(SIZE))
            models.append(pack(tmp_path / name))
            assert await upload(settings.replace(head_address=head), models[-1], lambda done, total: None)
        one, two = (m.ref for m in models)

        for sid, limit in (("a", SIZE + 1000), ("b", 4 * SIZE)):
            cache = ArtifactCache(tmp_path / sid, limit_bytes=limit)
            source = GrpcBlobSource(head, settings, sid)
            announcer = Announcer(source, cache.blobs)
            cache.blob_source, cache.on_evicted = source, announcer.released
            source.own_address = await serve("scheduler", SchedulerBlobService(cache))
            caches.append(cache)
            sources.append(source)
            announcers.append(announcer)
            await node.register_scheduler(
                SchedulerRegistration(sid, source.own_address, "", Capacity(1, 1, 0), pid=1, hostname=sid)
            )
            announcer.registered()
        a, b = caches
        (await a.acquire(one.uri)).release()
        assert store.holders(one.sha256) == {"a"}

        (await a.acquire(two.uri)).release()  # one is evicted to make room
        assert a.blobs() == [two.sha256]
        await until(lambda: not store.holders(one.sha256), "the head hears a evicted one")
        assert store.holders(two.sha256) == {"a"}

        (store.root / one.sha256).unlink()  # the head loses its copy; nobody holds one now
        b.blob_give_up_s = 5
        with pytest.raises(FailedPrecondition, match="no scheduler holds a copy: upload it again"):
            await b.acquire(one.uri)

        # Registering again, a scheduler is forgotten as a holder, then tells what it holds.
        address = sources[0].own_address
        await node.register_scheduler(
            SchedulerRegistration("a", address, "", Capacity(1, 1, 0), pid=2, hostname="a")
        )
        assert store.holders(two.sha256) == set()
        announcers[0].registered()
        await until(lambda: store.holders(two.sha256) == {"a"}, "a tells the head it holds two again")
        assert holder_addresses(node, store, two.sha256) == [address]
    finally:
        for cache in caches:
            await cache.aclose()
        for announcer in announcers:
            await announcer.aclose()
        for source in sources:
            await source.aclose()
        for server in servers:
            await server.stop(None)
        for m in models:
            m.discard()
        await node.aclose()

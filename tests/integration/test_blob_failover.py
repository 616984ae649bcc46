"""An uploaded model survives the death of the head that received it (issue 17 item 2 on
issue 16 item 2).

Real processes: a 3-member etcd on loopback, two ``shoal head`` on it, schedulers; the
model uploaded and deployed as ``shoal deploy --upload`` does (its upload function, given
both heads). The upload answers once the standby holds a copy; the leader is killed -9;
the standby leads, learns again which scheduler holds the blob (the scheduler tells it on
registering), and a new scheduler with an empty cache serves the model, fetched from the
new leader.

And over real gRPC with mutual TLS, in one process: a standby's calls with the head's
certificate (it is there, it fetches, it holds), the upload waiting for them, and a client
certificate that may not speak for a standby.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import joblib
import numpy as np
import pytest
import pytest_asyncio

from shoal import certs
from shoal.config import Settings
from shoal.core.blobs import pack
from shoal.core.clock import FakeClock
from shoal.core.placement import Capacity
from shoal.core.spec import parse_spec
from shoal.errors import NotFound, PermissionDenied, Unavailable
from shoal.head.blob_mirror import INDEX, BlobMirror
from shoal.head.blobs import BlobStore, holder_addresses, standby_holder
from shoal.head.node import HeadNode
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.auth import HEAD_RULES, SCHEDULER_RULES, AuthInterceptor
from shoal.rpc.blobs import GrpcBlobSource, GrpcHeadPeers, HeadBlobService, SchedulerBlobService, upload
from shoal.rpc.channels import open_channel
from shoal.rpc.clients import ControlClient, send_request
from shoal.rpc.server import bind, new_server
from shoal.rpc.status import to_error
from shoal.rpc.tls import server_credentials
from shoal.scheduler.artifacts import ArtifactCache
from shoal.store import MemoryStore
from shoal.testing.cluster import Component
from shoal.testing.etcd import EtcdCluster, EtcdHeads, require_etcd
from shoal.testing.fakes import FakeSchedulers
from shoal.testing.wait import until
from shoal.types import SchedulerRegistration

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    require_etcd()
    with EtcdCluster(tmp_path / "etcd", size=3) as cluster:
        yield cluster


@pytest_asyncio.fixture
async def heads(tmp_path: Path, etcd: EtcdCluster) -> AsyncIterator[EtcdHeads]:
    cluster = EtcdHeads(tmp_path / "cluster", etcd)
    try:
        yield cluster
    finally:
        await asyncio.to_thread(cluster.close)


async def leads(client: ControlClient) -> None:
    """Return once a head of ``client``'s answers as leader."""
    async with asyncio.timeout(30):
        while True:
            try:
                await client.status()
                return
            except Unavailable:
                await asyncio.sleep(0.1)


async def ready_on(client: ControlClient, name: str, scheduler: str) -> None:
    """Wait until deployment ``name``'s only replica is READY on the scheduler at ``scheduler``."""
    async with asyncio.timeout(30):
        while True:
            status = (await client.status()).to_json()
            ids = [s["id"] for s in status["schedulers"] if s["address"] == scheduler]
            for dep in status["deployments"]:
                placed = [(r["scheduler"], r["state"]) for r in dep["replicas"]]
                if dep["name"] == name and ids and placed == [(ids[0], "READY")]:
                    return
            await asyncio.sleep(0.1)


async def blob_holders(head: str, sha: str) -> list[str] | None:
    """The schedulers the head at ``head`` lists as holding ``sha``; None while it cannot
    answer (a standby)."""
    async with grpc.aio.insecure_channel(head) as channel:
        try:
            stat = await pbg.BlobStub(channel).Stat(pb.BlobRef(sha256=sha), timeout=5)
        except grpc.aio.AioRpcError:
            return None
    assert stat.complete
    return list(stat.holders)


async def test_an_uploaded_model_serves_from_a_new_scheduler_after_the_leader_is_killed(
    heads: EtcdHeads, examples_dir: Path, tmp_path: Path
) -> None:
    a = await asyncio.to_thread(heads.start_head)
    first = heads.client()
    try:
        await leads(first)  # alone on the store, it leads
    finally:
        await first.close()
    b = await asyncio.to_thread(heads.start_head)
    client = heads.client()  # of both heads, as the CLI and the schedulers are
    s2: Component | None = None
    try:
        s1 = await asyncio.to_thread(heads.start_scheduler)

        model = tmp_path / "digits.joblib"
        shutil.copy(examples_dir / "digits.joblib", model)
        packed = pack(model)
        sha = packed.ref.sha256
        async with asyncio.timeout(20):  # until the standby has told the leader it is there
            while f"{b.endpoints['head']} keeps copies of the blobs" not in a.log.read_text():
                await asyncio.sleep(0.05)
        # What shoal deploy --upload does: upload through both heads, then apply the spec.
        assert await upload(heads.settings.replace(head_address=heads.addresses), packed, lambda d, t: None)
        # The upload answered once the standby held a copy, verified.
        assert (b.state / "blobs" / sha).read_bytes() == model.read_bytes()
        spec = {"name": "digits", "backend": "sklearn", "model": packed.ref.uri, "resources": {"cpus": 0.1}}
        await client.apply(parse_spec(spec))
        # A standby answers Download of its copies, though nothing else (a head taking over
        # may lack a blob another standby holds).
        async with grpc.aio.insecure_channel(b.endpoints["head"]) as channel:
            chunks = pbg.BlobStub(channel).Download(pb.BlobDownloadRequest(sha256=sha), timeout=5)
            assert b"".join([c.data async for c in chunks]) == model.read_bytes()

        s1_control = s1.endpoints["scheduler_control"]
        async with asyncio.timeout(30):  # s1 fetched it for the replica, and told the leader
            while await blob_holders(a.endpoints["head"], sha) != [s1_control]:
                await asyncio.sleep(0.1)

        await asyncio.to_thread(a.kill_all)  # kill -9 the leader
        # Meanwhile a second scheduler starts, its cache empty.
        args = ["--head", heads.addresses, "scheduler", "--grpc-port", "0", "--http-port", "0"]
        s2 = Component("scheduler2", args, heads.root / "scheduler2", heads.env)
        await asyncio.gather(asyncio.to_thread(s2.start, ("scheduler", "scheduler_http")), leads(client))
        # The new leader learns again that s1 holds the blob (s1 registers with it again).
        async with asyncio.timeout(20):
            while await blob_holders(b.endpoints["head"], sha) != [s1_control]:
                await asyncio.sleep(0.1)

        # s1 dies too: the replica moves to s2, which fetches the blob from the new leader
        # (the only holder left), and serves.
        await asyncio.to_thread(s1.kill_all)
        await ready_on(client, "digits", s2.endpoints["scheduler_control"])
        rows = np.arange(128, dtype=np.float32).reshape(2, 64) % 17
        expected = joblib.load(model).predict(rows).tolist()
        outputs, _ = await send_request(
            s2.endpoints["scheduler"], "digits", {"input": rows}, heads.settings, timeout_s=10
        )
        assert outputs["label"].tolist() == expected
    finally:
        await client.close()
        if s2 is not None:
            await asyncio.to_thread(s2.kill_all)


async def test_with_tls_a_standby_speaks_with_the_heads_certificate_and_the_upload_waits_for_it(
    tmp_path: Path,
) -> None:
    certs.init(tmp_path / "tls")
    settings = Settings(tls_dir=str(tmp_path / "tls"), rpc_timeout_s=3)
    node = HeadNode(settings, MemoryStore(), FakeSchedulers(), FakeClock())
    store = BlobStore(tmp_path / "leader" / "blobs", max_bytes=2**20, grace_s=3600)
    cache = ArtifactCache(tmp_path / "scheduler" / "artifacts", limit_bytes=2**20)
    # The leader's Blob service and a scheduler's, each with its rules and certificate.
    servers = {
        "head": (
            new_server(settings, [AuthInterceptor(HEAD_RULES, tls=True, tokens=node.tokens)]),
            HeadBlobService(store, node),
        ),
        "scheduler": (
            new_server(settings, [AuthInterceptor(SCHEDULER_RULES, tls=True)]),
            SchedulerBlobService(cache),
        ),
    }
    at = {}
    for role, (server, service) in servers.items():
        pbg.add_BlobServicer_to_server(service, server)
        at[role] = f"127.0.0.1:{bind(server, '127.0.0.1', 0, server_credentials(settings, role))}"
        await server.start()
    leader, scheduler = at["head"], at["scheduler"]
    standby = GrpcHeadPeers(settings, standby_holder("127.0.0.1:1"))
    channel = open_channel(leader, settings, server="head")  # the CLI's certificate
    try:
        model = tmp_path / "model.bin"
        model.write_bytes(os.urandom(100_000))
        packed = pack(model)
        await standby.hello(leader)
        uploading = asyncio.ensure_future(
            upload(settings.replace(head_address=leader), packed, lambda d, t: None)
        )
        await until(lambda: store.stat(packed.ref.sha256).complete, "the blob whole at the leader")
        assert not uploading.done()  # not acknowledged before the standby has a copy
        copy = b"".join([c async for c in standby.download(leader, packed.ref.sha256, 0, head=True)])
        assert copy == model.read_bytes()
        await standby.hold(leader, packed.ref.sha256)
        assert await asyncio.wait_for(uploading, 10)

        # A head may fetch from a scheduler too (one that lacks the blob says so).
        with pytest.raises(NotFound, match="cache has no blob"):
            async for _ in standby.download(scheduler, packed.ref.sha256, 0, head=False):
                pass
        # The CLI's certificate may not speak for a standby (uploads would wait for it).
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pbg.BlobStub(channel).Stat(
                pb.BlobRef(sha256=packed.ref.sha256, holder=standby_holder("x")), timeout=5
            )
        assert isinstance(to_error(refused.value), PermissionDenied)
    finally:
        await channel.close(None)
        await standby.aclose()
        await cache.aclose()
        for server, _ in servers.values():
            await server.stop(None)
        await node.aclose()
        await store.aclose()


async def test_with_tls_a_head_that_took_over_fetches_a_blob_it_lacks_from_a_scheduler(
    tmp_path: Path,
) -> None:
    """The standby was away during the upload; the leader died. The head that leads now
    lacks the blob; the scheduler that holds it tells it so on registering, and the head
    fetches it from that scheduler, with the head's certificate."""
    certs.init(tmp_path / "tls")
    settings = Settings(tls_dir=str(tmp_path / "tls"), rpc_timeout_s=3)
    old_node = HeadNode(settings, MemoryStore(), FakeSchedulers(), FakeClock())
    new_node = HeadNode(settings, MemoryStore(), FakeSchedulers(), FakeClock())
    old, new = (BlobStore(tmp_path / n / "blobs", max_bytes=2**20, grace_s=3600) for n in ("old", "new"))
    cache = ArtifactCache(tmp_path / "scheduler" / "artifacts", limit_bytes=2**20)
    servers = {
        "old": (
            new_server(settings, [AuthInterceptor(HEAD_RULES, tls=True, tokens=old_node.tokens)]),
            "head",
        ),
        "new": (
            new_server(settings, [AuthInterceptor(HEAD_RULES, tls=True, tokens=new_node.tokens)]),
            "head",
        ),
        "scheduler": (new_server(settings, [AuthInterceptor(SCHEDULER_RULES, tls=True)]), "scheduler"),
    }
    pbg.add_BlobServicer_to_server(HeadBlobService(old, old_node), servers["old"][0])
    pbg.add_BlobServicer_to_server(HeadBlobService(new, new_node), servers["new"][0])
    pbg.add_BlobServicer_to_server(SchedulerBlobService(cache), servers["scheduler"][0])
    at = {}
    for name, (server, role) in servers.items():
        at[name] = f"127.0.0.1:{bind(server, '127.0.0.1', 0, server_credentials(settings, role))}"
        await server.start()
    to_old, to_new = GrpcBlobSource(at["old"], settings, "s1"), GrpcBlobSource(at["new"], settings, "s1")
    peers = GrpcHeadPeers(settings, standby_holder(at["new"]))
    try:
        model = tmp_path / "model.bin"
        model.write_bytes(os.urandom(100_000))
        packed = pack(model)
        sha = packed.ref.sha256
        assert await upload(settings.replace(head_address=at["old"]), packed, lambda d, t: None)
        cache.blob_source = to_old
        (await cache.acquire(packed.ref.uri)).release()  # the scheduler fetched it for a replica

        index = MemoryStore()  # the shared store: the old leader listed the blob
        await index.put(INDEX + sha, json.dumps({"size": packed.size}))
        reg = SchedulerRegistration("s1", at["scheduler"], "", Capacity(1, 1, 0), pid=1, hostname="s1")
        await new_node.register_scheduler(reg)
        await to_new.hold(sha)  # what the scheduler's Announcer sends after registering
        assert new.holders(sha) == {"s1"} and not new.stat(sha).complete

        mirror = BlobMirror(
            new,
            index,
            peers,
            leading=lambda: True,
            leader=lambda: None,
            named=lambda: {sha},
            holders=lambda sha256: holder_addresses(new_node, new, sha256),
        )
        await mirror.run_pass()
        await mirror.settle()
        assert (tmp_path / "new" / "blobs" / sha).read_bytes() == model.read_bytes()
    finally:
        for source in (to_old, to_new, peers):
            await source.aclose()
        await cache.aclose()
        for server, _ in servers.values():
            await server.stop(None)
        for node in (old_node, new_node):
            await node.aclose()

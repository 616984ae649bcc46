"""An uploaded model survives the death of the head that received it (issue 17 item 2 on
issue 16 item 2).

Real processes: a 3-member etcd on loopback, two ``shoal head`` on it, schedulers, and
``shoal deploy --upload`` as a user runs it. The upload answers once the standby holds a
copy; the leader is killed -9; the standby leads, learns again which scheduler holds the
blob (the scheduler tells it on registering), and a new scheduler with an empty cache
serves the model, fetched from the new leader.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc.aio
import joblib
import numpy as np
import pytest
import pytest_asyncio

from shoal.errors import Unavailable
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.clients import ControlClient, send_request
from shoal.testing.cluster import Component
from shoal.testing.etcd import EtcdCluster, EtcdHeads, require_etcd, wait_ready

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]

CLI = [sys.executable, "-m", "shoal.cli"]


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
    try:
        s1 = await asyncio.to_thread(heads.start_scheduler)

        model = tmp_path / "model"
        model.mkdir()
        shutil.copy(examples_dir / "digits.joblib", model / "digits.joblib")
        (model / "digits.yaml").write_text(
            "name: digits\nbackend: sklearn\nmodel: digits.joblib\nresources: {cpus: 0.1}\n"
        )
        sha = hashlib.sha256((model / "digits.joblib").read_bytes()).hexdigest()
        async with asyncio.timeout(20):  # until the standby has told the leader it is there
            while f"{b.endpoints['head']} keeps copies of the blobs" not in a.log.read_text():
                await asyncio.sleep(0.05)
        proc = await asyncio.to_thread(
            subprocess.run,
            [*CLI, "--head", heads.addresses, "deploy", "--upload", "--no-wait", str(model / "digits.yaml")],
            capture_output=True,
            text=True,
            timeout=60,
            env=heads.env,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # The upload answered once the standby held a copy, verified.
        assert (b.state / "blobs" / sha).read_bytes() == (model / "digits.joblib").read_bytes()

        await wait_ready(client, "digits", 1)
        rows = np.arange(128, dtype=np.float32).reshape(2, 64) % 17
        expected = joblib.load(model / "digits.joblib").predict(rows).tolist()
        s1_control = s1.endpoints["scheduler_control"]
        assert await blob_holders(a.endpoints["head"], sha) == [s1_control]

        await asyncio.to_thread(a.kill_all)  # kill -9 the leader
        await leads(client)
        # The new leader learns again that the scheduler holds the blob (it re-registers).
        async with asyncio.timeout(20):
            while await blob_holders(b.endpoints["head"], sha) != [s1_control]:
                await asyncio.sleep(0.1)

        # The scheduler dies too; a new one, its cache empty, gets the replica and the blob
        # from the new leader (the only holder left).
        await asyncio.to_thread(s1.kill_all)
        args = ["--head", heads.addresses, "scheduler", "--grpc-port", "0", "--http-port", "0"]
        s2 = Component("scheduler2", args, heads.root / "scheduler2", heads.env)
        heads.scheduler = s2  # stopped with the cluster
        await asyncio.to_thread(s2.start, ("scheduler", "scheduler_http"))
        await ready_on(client, "digits", s2.endpoints["scheduler_control"])
        outputs, _ = await send_request(
            s2.endpoints["scheduler"], "digits", {"input": rows}, heads.settings, timeout_s=10
        )
        assert outputs["label"].tolist() == expected
    finally:
        await client.close()

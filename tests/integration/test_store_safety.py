"""A head and its store, with real processes (issue 13, items 1 and 6): a spec with a
non-finite number is refused over HTTP and gRPC; a head restarted on a damaged store (a row it
cannot read, a row gone) starts, says which deployment is broken, and removes nothing it
finds running until the operator says so."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import numpy as np
import pytest

from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.channels import open_channel
from shoal.store.sqlite import SqliteStore
from shoal.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(120)

X = np.ones((1, 4), np.float32)
# What a head before the fix stored for "timeout_s": Infinity.
POISON_ROW = '{"name":"poison","backend":"python","model":"echo:Echo","replicas":0,"timeout_s":null}'


def echo(examples: Path, name: str = "echo") -> dict[str, Any]:
    return {
        "name": name,
        "backend": "python",
        "model": "echo:Echo",
        "base_dir": str(examples),
        "replicas": 1,
        "resources": {"cpus": 0.1},
    }


def deployment(status: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((d for d in status["deployments"] if d["name"] == name), None)


async def test_a_head_restarted_on_a_damaged_store_starts_and_removes_nothing(
    tmp_path: Path, examples_dir: Path
) -> None:
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(echo(examples_dir))
        [before] = await cluster.wait_ready("echo", 1)
        assert cluster.head is not None

        body = POISON_ROW.replace("null", "Infinity")
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(
                f"http://{cluster.head.endpoints['head_http']}/api/deployments",
                content=body,
                headers={"content-type": "application/json"},
            )
        assert r.status_code == 400 and "timeout_s: must be a finite number" in r.json()["error"]
        # The same over gRPC: INVALID_ARGUMENT naming the field.
        channel = open_channel(cluster.head_address, cluster.settings, server="head")
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pbg.HeadStub(channel).ApplyDeployment(
                    pb.ApplyDeploymentRequest(spec_json=body), timeout=10
                )
        finally:
            await channel.close(None)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "timeout_s: must be a finite number" in (info.value.details() or "")

        # Damage the store while the head is down: echo's row lost, a row it cannot read.
        cluster.head.kill_all()
        async with SqliteStore(cluster.head.state / "state.db") as store:
            assert await store.delete("deployments/echo")
            await store.put("deployments/poison", POISON_ROW)
        await asyncio.to_thread(cluster.restart_head)
        await cluster.reconnect()

        # A deployment placed after the restart proves the adoption wait is over and passes ran.
        await cluster.deploy(echo(examples_dir, "other"))
        await cluster.wait_ready("other", 1)
        status = await cluster.status()
        poison = deployment(status, "poison")
        assert poison is not None
        assert poison["pending_reason"].startswith("broken: the stored spec at 'deployments/poison'")
        kept = deployment(status, "echo")
        assert kept is not None and "not in the head's store" in kept["pending_reason"]
        assert [(r["id"], r["pid"]) for r in kept["replicas"]] == [(before["id"], before["pid"])]
        _, replica = await cluster.send("echo", {"x": X})
        assert replica == before["id"]

        # The operator's delete removes it; deleting the broken row repairs the store.
        await cluster.client.delete("echo")
        await cluster.client.delete("poison")
        await cluster.wait_for(
            lambda s: deployment(s, "echo") is None and deployment(s, "poison") is None,
            timeout_s=20,
            what="echo's replica removed and poison gone",
        )

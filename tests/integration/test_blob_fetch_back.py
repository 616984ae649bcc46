"""A blob the head (SQLite) lost from its disk while a deployment names it: the head
fetches it back from a scheduler that holds a verified copy, and a scheduler with an empty
cache starts the deployment's replica. With no scheduler holding a copy, the replica fails
with a message that names the blob and says to upload it again.

Real processes (``shoal head``, ``shoal scheduler``, ``shoal deploy --upload``), real gRPC.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.testing.cluster import ProcessCluster
from tests.integration.test_blob_upload import shoal_deploy

pytestmark = pytest.mark.timeout(120)

ENV = {"SHOAL_ALLOWED_MODEL_URIS": "blob://"}


async def upload_echo(cluster: ProcessCluster, examples_dir: Path, tmp_path: Path, replicas: int) -> Path:
    """Deploy ``examples/echo.py`` as "echo" with ``shoal deploy --upload`` (a folder of its
    own, so a blob no scheduler holds yet; a CPU each); returns the head's file of the blob."""
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(examples_dir / "echo.py", app / "echo.py")
    (app / "salt.txt").write_text(str(tmp_path))
    spec = tmp_path / "echo.yaml"
    spec.write_text(
        f"name: echo\nbackend: python\nmodel: echo:Echo\nbase_dir: {app}\nreplicas: {replicas}\n"
        "resources: {cpus: 1}\n"
    )
    proc = await shoal_deploy(cluster, "--upload", "--no-wait", str(spec))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (dep,) = [d for d in (await cluster.status())["deployments"] if d["name"] == "echo"]
    sha256: str = dep["spec"]["base_dir"].split(":")[2].split("/")[0]
    return cluster.root / "head" / "blobs" / sha256


def echo_deployment(status: dict[str, Any]) -> dict[str, Any]:
    (dep,) = [d for d in status["deployments"] if d["name"] == "echo"]
    return dict(dep)


async def test_a_blob_lost_from_the_heads_disk_is_fetched_back_from_a_scheduler_holding_it(
    examples_dir: Path, tmp_path: Path
) -> None:
    """Scheduler A runs a replica (its cache holds the blob, verified); the head's file is
    deleted; a scale-up lands on B, whose cache is empty. B's replica used to end FAILED
    ("the head has no blob"): now the head fetches the blob back from A and serves it."""
    async with ProcessCluster(tmp_path / "cluster", env=ENV, scheduler_args=[["--cpus", "1"]]) as cluster:
        blob = await upload_echo(cluster, examples_dir, tmp_path, replicas=1)
        await cluster.wait_ready("echo", 1)
        good = blob.read_bytes()
        blob.unlink()

        b = await asyncio.to_thread(cluster.add_scheduler, ["--cpus", "1"])
        status = await cluster.wait_for(lambda s: len(s["schedulers"]) == 2, what="scheduler B registered")
        (b_id,) = [s["id"] for s in status["schedulers"] if s["pid"] == b.pid]
        await cluster.client.scale("echo", 2)  # A is full: the new replica lands on B
        replicas = await cluster.wait_ready("echo", 2, timeout_s=40)

        assert blob.read_bytes() == good and hashlib.sha256(good).hexdigest() == blob.name
        (on_b,) = [r["id"] for r in replicas if r["scheduler"] == b_id]
        served = set()
        for _ in range(20):  # B routes to its own replica, or to A's
            outputs, replica = await cluster.send("echo", {"x": np.arange(3.0)}, scheduler=1)
            assert outputs["x"].tolist() == [0.0, 1.0, 2.0]
            served.add(replica)
        assert on_b in served
        assert (
            f"fetched back blob sha256:{blob.name[:12]}" in (cluster.root / "head" / "head.log").read_text()
        )


async def test_with_no_scheduler_holding_a_lost_blob_the_replica_fails_saying_to_upload_it_again(
    examples_dir: Path, tmp_path: Path
) -> None:
    async with ProcessCluster(tmp_path / "cluster", env=ENV) as cluster:
        blob = await upload_echo(cluster, examples_dir, tmp_path, replicas=0)
        blob.unlink()
        await cluster.client.scale("echo", 1)
        status = await cluster.wait_for(
            lambda s: echo_deployment(s)["pending_reason"].startswith("FAILED"), what="the deployment FAILED"
        )
        reason = echo_deployment(status)["pending_reason"]
        assert f"fetching the model failed: blob://sha256:{blob.name}/app/: the head has no blob" in reason
        assert "and no scheduler holds a copy: upload it again (shoal deploy --upload)" in reason, reason

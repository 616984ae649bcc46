"""A scheduler hands each replica its own GPUs in CUDA_VISIBLE_DEVICES (real processes, no
GPU needed: the devices are numbers here). ``--gpus 2``: two ``gpus: 1`` replicas get
devices 0 and 1, a ``gpus: 0.5`` one waits for room and gets the device a deleted
deployment gave back, and a ``gpus: 0`` one sees no device. A scheduler started again
keeps the devices of its previous process's replicas until they have exited."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(120)

MODEL = '''
import os
import time

import numpy as np


class Env:
    """Answers the CUDA_VISIBLE_DEVICES its process was given ("unset" when none); takes
    ``linger_s`` to close, as a model freeing a GPU's memory may."""

    def __init__(self, linger_s=0.0):
        self.linger_s = linger_s

    def close(self):
        time.sleep(self.linger_s)

    def predict(self, inputs):
        value = os.environ.get("CUDA_VISIBLE_DEVICES")
        return {"visible": np.array([b"unset" if value is None else value.encode()], dtype=object)}
'''


def spec(models: Path, name: str, gpus: float, **options: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "python",
        "model": "gpu_env:Env",
        "base_dir": str(models),
        "resources": {"cpus": 0.1, "gpus": gpus},
        "options": options,
    }


def cluster_with_gpus(root: Path, gpus: int) -> ProcessCluster:
    cluster = ProcessCluster(root, scheduler_args=[["--gpus", str(gpus)]])
    # The scheduler numbers its devices itself, whatever the machine running the test has.
    for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        cluster.env.pop(name, None)
    return cluster


def write_model(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    (models / "gpu_env.py").write_text(MODEL)
    return models


async def visible(cluster: ProcessCluster, deployment: str) -> str:
    outputs, _ = await cluster.send(deployment, {"x": np.zeros((1, 1), dtype=np.float32)}, timeout_s=10)
    [value] = outputs["visible"].reshape(-1).tolist()
    return value.decode() if isinstance(value, bytes) else str(value)


def pending(status: dict[str, Any], name: str) -> str:
    dep = next((d for d in status["deployments"] if d["name"] == name), None)
    return "" if dep is None else str(dep.get("pending_reason", ""))


async def test_replicas_get_distinct_devices_and_a_freed_one_is_reused(tmp_path: Path) -> None:
    models = write_model(tmp_path)
    async with cluster_with_gpus(tmp_path / "cluster", 2) as cluster:
        for name, gpus in (("a", 1), ("b", 1), ("cpu", 0)):
            await cluster.deploy(spec(models, name, gpus))
        for name in ("a", "b", "cpu"):
            await cluster.wait_ready(name, 1)
        devices = {name: await visible(cluster, name) for name in ("a", "b")}
        assert sorted(devices.values()) == ["0", "1"]
        assert await visible(cluster, "cpu") == ""  # asked for none: sees none

        # Both devices are held whole: half a GPU has no room until one is given back.
        await cluster.deploy(spec(models, "half", 0.5))
        await cluster.wait_for(lambda s: "gpus" in pending(s, "half"), what="half pending for a GPU")
        freed = devices["a"]
        await cluster.client.delete("a")
        await cluster.wait_ready("half", 1)
        assert await visible(cluster, "half") == freed
        assert await visible(cluster, "b") == devices["b"]

        # Each replica's log says its devices, and so does the scheduler's.
        [half] = await cluster.replicas("half")
        logs = cluster.schedulers[0].state / "logs"
        assert f"GPUs {freed}" in (logs / f"replica_{half['id']}.log").read_text()
        assert f"on 0.5 of GPU {freed}" in cluster.schedulers[0].log.read_text()


async def test_a_restarted_scheduler_waits_for_its_previous_replicas_devices(tmp_path: Path) -> None:
    models = write_model(tmp_path)
    async with cluster_with_gpus(tmp_path / "cluster", 1) as cluster:
        # Its replica takes 5 s to close once orphaned: longer than the scheduler is away.
        await cluster.deploy(spec(models, "a", 1, linger_s=5))
        [old] = await cluster.wait_ready("a", 1)
        scheduler = cluster.schedulers[0]
        scheduler.children()  # remember the replica before its parent dies
        os.kill(scheduler.pid, signal.SIGKILL)
        await asyncio.to_thread(scheduler.wait, 10)
        await asyncio.to_thread(scheduler.start, ("scheduler", "scheduler_http"))

        def new_ready(status: dict[str, Any]) -> bool:
            dep = next((d for d in status["deployments"] if d["name"] == "a"), None)
            return dep is not None and [(r["state"], r["id"] != old["id"]) for r in dep["replicas"]] == [
                ("READY", True)
            ]

        await cluster.wait_for(new_ready, timeout_s=40, what="a new replica of a, READY")
        assert await visible(cluster, "a") == "0"
        text = scheduler.log.read_text()
        held = text.index(f"replica {old['id']} (pid {old['pid']}) of this scheduler's previous process")
        freed = text.index(f"replica {old['id']} of the previous process exited: GPU 0 free again")
        [new] = await cluster.replicas("a")
        started = text.index(f"started replica {new['id']}")
        assert held < freed < started
        assert not (scheduler.state / "logs" / f"replica_{old['id']}.gpus.json").exists()

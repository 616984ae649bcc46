"""The supervisor and GPUs: each replica started with its own devices in
CUDA_VISIBLE_DEVICES, devices freed when a replica ends, refused when none has room, and
those of the previous scheduler process's replicas kept until they exit."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.spec import DeploymentSpec
from shoal.errors import ResourceExhausted
from shoal.scheduler.gpus import GpuPool, machine_devices
from shoal.scheduler.router import Router
from shoal.scheduler.supervisor import ReplicaSupervisor
from shoal.testing.fakes import FakeLauncher, FakeReplicas
from tests.unit.conftest import make_spec

pytestmark = pytest.mark.timeout(10)


def pool(n: int) -> GpuPool:
    return GpuPool(machine_devices(n, {}, lambda: 0))


@pytest.fixture
async def supervisor(tmp_path: Path) -> AsyncIterator[tuple[ReplicaSupervisor, FakeLauncher, FakeClock]]:
    sup, launcher, clock = make_supervisor(tmp_path, pool(2))
    sup.start()
    yield sup, launcher, clock
    await sup.aclose(0)
    await sup.router.aclose()


def make_supervisor(tmp_path: Path, gpus: GpuPool) -> tuple[ReplicaSupervisor, FakeLauncher, FakeClock]:
    settings = Settings(ping_interval_s=1.0, shutdown_grace_s=1.0)
    replicas = FakeReplicas()
    clock = FakeClock()
    launcher = FakeLauncher()
    sup = ReplicaSupervisor(
        settings,
        Router("s1", settings, replicas, clock=clock),
        replicas,
        log_dir=tmp_path / "logs",
        scheduler_address=lambda: "s1:7000",
        on_change=lambda: None,
        launcher=launcher,
        clock=clock,
        gpus=gpus,
    )
    return sup, launcher, clock


def gpu_spec(name: str, gpus: float) -> DeploymentSpec:
    return make_spec(name, cpus=0.1, resources={"cpus": 0.1, "gpus": gpus})


async def ended(sup: ReplicaSupervisor, rid: str) -> None:
    async with asyncio.timeout(2):
        while rid in sup.registry:
            await asyncio.sleep(0.01)


async def test_each_replica_is_started_with_its_own_devices(
    supervisor: tuple[ReplicaSupervisor, FakeLauncher, FakeClock],
) -> None:
    sup, launcher, _ = supervisor
    await sup.create("a-1", gpu_spec("a", 1))
    await sup.create("b-1", gpu_spec("b", 0.5))
    await sup.create("c-1", gpu_spec("c", 0))
    env = {rid: launcher.process(rid).env for rid in ("a-1", "b-1", "c-1")}
    assert env["a-1"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert env["b-1"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["c-1"]["CUDA_VISIBLE_DEVICES"] == ""  # asked for none: sees none
    assert env["a-1"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    record = json.loads((sup.log_dir / "replica_b-1.gpus.json").read_text())
    assert (record["pid"], record["devices"], record["share"]) == (launcher.process("b-1").pid, ["1"], 0.5)
    assert not (sup.log_dir / "replica_c-1.gpus.json").exists()

    # No room: refused before anything starts, so the head tries again later.
    with pytest.raises(ResourceExhausted, match="gpus 1"):
        await sup.create("d-1", gpu_spec("d", 1))
    assert "d-1" not in sup.registry and "d-1" not in launcher.processes

    # A replica that dies gives its device back.
    launcher.process("a-1").exit(1)
    await ended(sup, "a-1")
    assert not (sup.log_dir / "replica_a-1.gpus.json").exists()
    await sup.create("d-1", gpu_spec("d", 1))
    assert launcher.process("d-1").env["CUDA_VISIBLE_DEVICES"] == "0"

    # And one removed on purpose too.
    await sup.remove("b-1", graceful=False)
    await ended(sup, "b-1")
    await sup.create("e-1", gpu_spec("e", 1))
    assert launcher.process("e-1").env["CUDA_VISIBLE_DEVICES"] == "1"


async def test_a_scheduler_without_gpus_leaves_replicas_environment_as_its_own(tmp_path: Path) -> None:
    sup, launcher, _ = make_supervisor(tmp_path, GpuPool())
    sup.start()
    try:
        await sup.create("c-1", gpu_spec("c", 0))
        env = launcher.process("c-1").env
        assert env.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
        assert not list(sup.log_dir.glob("*.gpus.json"))
    finally:
        await sup.aclose(0)
        await sup.router.aclose()


async def test_devices_of_the_previous_process_replicas_stay_taken_until_they_exit(tmp_path: Path) -> None:
    """A scheduler started again in the same state folder does not adopt the replicas of its
    previous process (they are NACKed and exit), but keeps their devices until they have."""
    old = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        logs = tmp_path / "logs"
        logs.mkdir()
        started = psutil.Process(old.pid).create_time()
        record = {"pid": old.pid, "started": started, "devices": ["1"], "share": 1.0}
        (logs / "replica_old-1.gpus.json").write_text(json.dumps(record))
        # One whose process is gone, and one whose pid now belongs to another process.
        gone = {"pid": 2**22 + 7, "started": 1.0, "devices": ["0"], "share": 1.0}
        (logs / "replica_gone-1.gpus.json").write_text(json.dumps(gone))
        reused = {"pid": old.pid, "started": started - 100, "devices": ["0"], "share": 1.0}
        (logs / "replica_reused-1.gpus.json").write_text(json.dumps(reused))

        sup, launcher, clock = make_supervisor(tmp_path, pool(2))
        sup.start()
        try:
            assert not (logs / "replica_gone-1.gpus.json").exists()
            assert not (logs / "replica_reused-1.gpus.json").exists()
            await sup.create("a-1", gpu_spec("a", 1))
            assert launcher.process("a-1").env["CUDA_VISIBLE_DEVICES"] == "0"
            with pytest.raises(ResourceExhausted, match=r"GPU 1: 0 free, held by old-1 \(previous process\)"):
                await sup.create("b-1", gpu_spec("b", 0.5))

            old.kill()
            old.wait()
            await clock.wait_for_sleepers(1)
            clock.advance(1.0)
            await clock.wait_for_sleepers(1)
            await sup.create("b-1", gpu_spec("b", 0.5))
            assert launcher.process("b-1").env["CUDA_VISIBLE_DEVICES"] == "1"
            assert not (logs / "replica_old-1.gpus.json").exists()
        finally:
            await sup.aclose(0)
            await sup.router.aclose()
    finally:
        old.kill()
        old.wait()

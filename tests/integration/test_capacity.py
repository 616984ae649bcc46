"""A scheduler started without ``--cpus`` offers the CPUs its process may use, not the
machine's. Real processes on port 0.

Before, a scheduler under ``taskset`` (or in a container limited to fewer CPUs than its
host: ``tests/unit/test_machine.py``) offered every CPU of the machine, and placement put
replicas there for CPUs it could not use."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from shoal.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(60)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to leave one out")
async def test_a_scheduler_on_one_cpu_offers_one(tmp_path: Path) -> None:
    everywhere = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(everywhere)})  # what the cluster's processes inherit
    try:
        async with ProcessCluster(tmp_path) as cluster:
            os.sched_setaffinity(0, everywhere)
            (scheduler,) = (await cluster.status())["schedulers"]
            assert scheduler["capacity"]["cpus"] == 1.0
            log = cluster.schedulers[0].log.read_text()
            assert "offering cpus 1, less than the machine's: its CPU affinity" in log
    finally:
        os.sched_setaffinity(0, everywhere)


ECHO = """
class Echo:
    def predict(self, inputs):
        return inputs
"""


async def test_a_scheduler_runs_no_more_replicas_than_its_max_replicas(tmp_path: Path) -> None:
    # resources.memory_mb 0 (the default) is not counted: before, one 2-CPU scheduler took
    # 200 replicas of cpus 0.01, each a Python process of 50 MB and more.
    (tmp_path / "echo.py").write_text(ECHO)
    async with ProcessCluster(tmp_path, scheduler_args=[["--max-replicas", "2"]]) as cluster:
        spec = {"name": "echo", "backend": "python", "model": "echo:Echo", "base_dir": str(tmp_path)}
        await cluster.deploy({**spec, "replicas": 3, "resources": {"cpus": 0.01}})

        def placed_two(status: dict[str, Any]) -> bool:
            (dep,) = status["deployments"]
            return sum(r["state"] == "READY" for r in dep["replicas"]) == 2 and bool(dep["pending_reason"])

        status = await cluster.wait_for(placed_two, what="two replicas READY")
        (scheduler,) = status["schedulers"]
        assert (scheduler["replicas"], scheduler["max_replicas"]) == (2, 2)
        (dep,) = status["deployments"]
        assert len(dep["replicas"]) == 2
        assert dep["pending_reason"] == f"no scheduler has room (max_replicas 2 reached on {scheduler['id']})"

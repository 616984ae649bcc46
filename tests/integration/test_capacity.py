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
            status = await cluster.wait_for(
                lambda s: len(s["schedulers"]) == 1, what="the scheduler registered"
            )
            (scheduler,) = status["schedulers"]
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


def python_model(folder: Path, name: str, source: str, cls: str, **fields: Any) -> dict[str, Any]:
    """A spec of deployment ``name`` serving ``cls`` of ``source``, written to ``folder``."""
    (folder / f"{name}.py").write_text(source)
    model = {"name": name, "backend": "python", "model": f"{name}:{cls}", "base_dir": str(folder)}
    return {**model, "resources": {"cpus": 0.01}, **fields}


async def test_a_scheduler_runs_no_more_replicas_than_its_max_replicas(tmp_path: Path) -> None:
    # resources.memory_mb 0 (the default) is not counted: before, one 2-CPU scheduler took
    # 200 replicas of cpus 0.01, each a Python process of 50 MB and more.
    async with ProcessCluster(tmp_path, scheduler_args=[["--max-replicas", "2"]]) as cluster:
        await cluster.deploy(python_model(tmp_path, "echo", ECHO, "Echo", replicas=3))

        def placed_two(status: dict[str, Any]) -> bool:
            (dep,) = status["deployments"]
            return sum(r["state"] == "READY" for r in dep["replicas"]) == 2 and bool(dep["pending_reason"])

        status = await cluster.wait_for(placed_two, what="two replicas READY")
        (scheduler,) = status["schedulers"]
        assert (scheduler["replicas"], scheduler["max_replicas"]) == (2, 2)
        (dep,) = status["deployments"]
        assert len(dep["replicas"]) == 2
        assert dep["pending_reason"] == f"no scheduler has room (max_replicas 2 reached on {scheduler['id']})"


SLOW = """
import time


class Slow:
    def __init__(self):
        # A model's load, long enough that the status shows the second replica waiting:
        # with 1 s, a loaded CI run polled the head's status past the whole window.
        time.sleep(3.0)

    def predict(self, inputs):
        return inputs
"""


async def test_starts_past_max_concurrent_starts_wait_queued(tmp_path: Path) -> None:
    # Before, a deploy of 50 replicas started 50 processes loading models at once.
    async with ProcessCluster(tmp_path, scheduler_args=[["--max-concurrent-starts", "1"]]) as cluster:
        await cluster.deploy(python_model(tmp_path, "slow", SLOW, "Slow", replicas=2))

        def one_queued(status: dict[str, Any]) -> bool:
            (dep,) = status["deployments"]
            return sorted(r["state"] for r in dep["replicas"]) == ["QUEUED", "STARTING"]

        status = await cluster.wait_for(one_queued, what="one replica STARTING, one QUEUED")
        (queued,) = [r for r in status["deployments"][0]["replicas"] if r["state"] == "QUEUED"]
        assert queued["message"] == (
            "waiting to start: this scheduler starts 1 at a time (max_concurrent_starts), "
            "0 more waiting ahead of it"
        )
        await cluster.wait_ready("slow", 2)
        log = cluster.schedulers[0].log.read_text()
        # The second process started after the first was READY.
        assert log.index(f"started replica {queued['id']}") > log.index("is READY")

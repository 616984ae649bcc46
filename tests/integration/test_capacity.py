"""A scheduler started without ``--cpus`` offers the CPUs its process may use, not the
machine's. Real processes on port 0.

Before, a scheduler under ``taskset`` (or in a container limited to fewer CPUs than its
host: ``tests/unit/test_machine.py``) offered every CPU of the machine, and placement put
replicas there for CPUs it could not use."""

from __future__ import annotations

import os
from pathlib import Path

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

"""A scheduler that runs but does not answer for longer than ``orphan_after_s`` keeps its
replicas, as real processes on port 0.

A probe flooded a scheduler's gRPC port with streams that never read: its event loop (or,
with ingress workers, its CPU) was starved for about 6 s, its replicas' health calls timed
out, and every replica left as an orphan, those of deployments nobody called too. A replica
now gives a scheduler whose process still runs ``BUSY_SCHEDULER_FACTOR`` times longer. The
stall is made here with SIGSTOP, which stops the scheduler's every thread as a starved loop
stops answering; a scheduler that is gone still orphans its replicas after
``orphan_after_s`` (``test_control_plane``)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import numpy as np
import psutil
import pytest

from shoal.testing.cluster import ProcessCluster
from tests.integration.test_cluster import echo_spec

pytestmark = pytest.mark.timeout(90)


async def test_a_replica_waits_out_a_scheduler_that_runs_but_does_not_answer(
    tmp_path: Path, examples_dir: Path
) -> None:
    async with ProcessCluster(tmp_path) as cluster:  # orphan_after_s 2 s (shoal.testing.cluster)
        await cluster.deploy(echo_spec(examples_dir, replicas=1))
        [before] = await cluster.wait_ready("echo", 1)
        scheduler = cluster.schedulers[0]

        os.kill(scheduler.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(5)  # 2.5 times orphan_after_s
        finally:
            os.kill(scheduler.pid, signal.SIGCONT)

        assert psutil.pid_exists(before["pid"]), "the replica left while its scheduler was stopped"
        [after] = await cluster.wait_ready("echo", 1)
        assert (after["id"], after["pid"]) == (before["id"], before["pid"])
        x = np.arange(16, dtype=np.float32).reshape(1, 16)
        outputs, _ = await cluster.send("echo", {"x": x})
        np.testing.assert_array_equal(outputs["x"], x)
        log = (scheduler.state / "logs" / f"replica_{before['id']}.log").read_text()
        assert "but its process runs: serving on" in log

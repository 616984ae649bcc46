"""Two processes under one scheduler id, as real processes on port 0.

A scheduler started with a live scheduler's id (a cloned machine image carrying
``<state>/scheduler_id``, a copied ``--scheduler-id``) is refused by the head and exits
non-zero with one line naming the id and the live scheduler; the head keeps the first
scheduler as it was and the cluster goes on serving. Before, the head took the newcomer
in its place: status showed the newcomer's address and pid, the head started replicas on
it that status never listed, removed and recreated others every second, and stayed wrong
after the newcomer was killed.

A scheduler killed with SIGKILL and started again under its id (on another port) is still
taken, before the head would have declared the old one dead: its health stream ended.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.testing.cluster import ProcessCluster
from tests.integration.test_cluster import echo_spec

pytestmark = pytest.mark.timeout(120)


def schedulers(status: dict[str, Any]) -> dict[str, tuple[str, int, str]]:
    """id -> (address, pid, state) as ``shoal status`` shows them."""
    return {s["id"]: (s["address"], s["pid"], s["state"]) for s in status["schedulers"]}


def replicas(status: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(replica id, scheduler id, state) of every replica."""
    return {(r["id"], r["scheduler"], r["state"]) for d in status["deployments"] for r in d["replicas"]}


async def test_a_second_scheduler_under_a_live_id_is_refused_and_exits(
    tmp_path: Path, examples_dir: Path
) -> None:
    async with ProcessCluster(tmp_path, schedulers=2) as cluster:
        await cluster.deploy(echo_spec(examples_dir, replicas=2))
        await cluster.wait_ready("echo", 2)
        before = await cluster.status()
        first = cluster.schedulers[0]
        sid = (first.state / "scheduler_id").read_text().strip()
        address, pid, state = schedulers(before)[sid]
        assert (pid, state) == (first.pid, "ALIVE")

        # Its own state folder, the first one's id: a cloned machine, say.
        impostor = await asyncio.to_thread(cluster.add_scheduler, ["--scheduler-id", sid])
        try:
            code = await asyncio.to_thread(impostor.wait, 20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"a second scheduler under the live id {sid!r} kept running; the head took it")
        assert code != 0
        output = impostor.log.read_text()
        assert "Traceback" not in output
        [line] = [x for x in output.splitlines() if x.startswith("shoal: error:")]
        assert f"scheduler id {sid!r} is in use by a live scheduler at {address} (pid {pid}" in line
        assert "--scheduler-id" in line and "scheduler_id" in line

        # The head still has the first scheduler as it was, its replicas stay put (nothing
        # created and removed over and over), and both schedulers serve.
        deadline = time.monotonic() + 3  # longer than dead_after_s (2 s) and many heartbeats
        while time.monotonic() < deadline:
            now = await cluster.status()
            assert schedulers(now) == schedulers(before)
            assert replicas(now) == replicas(before)
            await asyncio.sleep(0.2)
        refused = [e for e in now["events"] if e["kind"] == "scheduler_refused"]
        assert refused and sid in refused[-1]["message"]
        x = np.arange(16, dtype=np.float32).reshape(1, 16)
        for i in (0, 1):
            outputs, _ = await cluster.send("echo", {"x": x}, scheduler=i)
            np.testing.assert_array_equal(outputs["x"], x)


async def test_a_scheduler_killed_and_started_again_under_its_id_is_taken(
    tmp_path: Path, examples_dir: Path
) -> None:
    # The head would declare a silent scheduler dead only after 20 s: the restarted one is
    # taken because the old one's health stream ended when it was killed, not because it died.
    slow_death = {"SHOAL_DEAD_AFTER_S": "20", "SHOAL_DEAD_AFTER_STREAM_END_S": "20"}
    async with ProcessCluster(tmp_path, env=slow_death) as cluster:
        await cluster.deploy(echo_spec(examples_dir, replicas=1))
        await cluster.wait_ready("echo", 1)
        scheduler = cluster.schedulers[0]
        sid = (scheduler.state / "scheduler_id").read_text().strip()
        old_address, old_pid, _ = schedulers(await cluster.status())[sid]

        scheduler.kill_all()  # SIGKILL, its replica too
        killed = time.monotonic()
        await asyncio.to_thread(scheduler.start, ("scheduler", "scheduler_http"))
        assert scheduler.endpoints["scheduler_control"] != old_address  # another port

        def back(status: dict[str, Any]) -> bool:
            return schedulers(status).get(sid) == (
                scheduler.endpoints["scheduler_control"],
                scheduler.pid,
                "ALIVE",
            )

        await cluster.wait_for(back, timeout_s=15, what="the restarted scheduler under its id")
        assert time.monotonic() - killed < 20
        assert scheduler.pid != old_pid and scheduler.alive()
        status = await cluster.status()
        assert not [e for e in status["events"] if e["kind"] in ("scheduler_refused", "scheduler_dead")]

        await cluster.wait_ready("echo", 1)
        x = np.arange(16, dtype=np.float32).reshape(1, 16)
        outputs, _ = await cluster.send("echo", {"x": x})
        np.testing.assert_array_equal(outputs["x"], x)

"""A restarted scheduler takes its old place (issue 13, item 10): its id is kept in its
state folder, so the head sees one scheduler again, not a new one beside a DEAD one."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from shoal.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(90)


async def test_a_restarted_scheduler_keeps_its_id(tmp_path: Path) -> None:
    async with ProcessCluster(tmp_path) as cluster:
        first = await cluster.wait_for(lambda s: len(s["schedulers"]) == 1, what="the scheduler")
        [before] = first["schedulers"]
        kept = (cluster.schedulers[0].state / "scheduler_id").read_text().strip()
        assert before["id"] == kept

        scheduler = cluster.schedulers[0]
        scheduler.kill_all()
        await asyncio.to_thread(scheduler.start, ("scheduler", "scheduler_http"))

        def back(status: dict[str, Any]) -> bool:
            return [(s["id"], s["state"], s["pid"]) for s in status["schedulers"]] == [
                (kept, "ALIVE", scheduler.pid)
            ]

        await cluster.wait_for(back, timeout_s=30, what="the same scheduler id, alive, with the new pid")

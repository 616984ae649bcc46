"""A restarted scheduler takes its old place (issue 13, item 10): its id is kept in its
state folder, so the head sees one scheduler again, not a new one beside a DEAD one."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
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


def _ingress_workers(pid: int) -> list[psutil.Process]:
    children = psutil.Process(pid).children(recursive=True)
    return [p for p in children if "shoal.ingress_worker" in " ".join(p.cmdline())]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_a_scheduler_killed_hard_starts_again_on_its_ports_at_once(tmp_path: Path) -> None:
    """Its ingress workers leave the shared ports as soon as its main process is gone, not
    ``orphan_after_s`` later (60 s here). Before, a scheduler started again on the same ports
    right after a kill -9 was refused by its own old workers: 'port N is in use (grpc_port)'."""
    env = {"SHOAL_INGRESS_WORKERS": "2", "SHOAL_ORPHAN_AFTER_S": "60"}
    async with ProcessCluster(tmp_path, env=env, schedulers=0) as cluster:
        scheduler = cluster.add_scheduler()
        # The ports it bound (asked for port 0) are those it is started on again. Ports found
        # free by binding and closing them first could be taken by another process meanwhile.
        grpc_port = scheduler.endpoints["scheduler"].rpartition(":")[2]
        http_port = scheduler.endpoints["scheduler_http"].rpartition(":")[2]
        scheduler.args += ["--grpc-port", grpc_port, "--http-port", http_port]
        await cluster.wait_for(lambda s: len(s["schedulers"]) == 1, what="the scheduler")
        deadline = time.monotonic() + 30
        while len(old := _ingress_workers(scheduler.pid)) != 1:
            assert time.monotonic() < deadline, "no ingress worker"
            await asyncio.sleep(0.1)
        os.kill(scheduler.pid, signal.SIGKILL)
        assert scheduler.proc is not None
        scheduler.proc.wait(10)
        deadline = time.monotonic() + 30
        while any(_running(p) for p in old):
            assert time.monotonic() < deadline, "the ingress worker outlived its main process"
            await asyncio.sleep(0.1)
        # Started again on the same state folder, naming the ports: it must bind them.
        await asyncio.to_thread(scheduler.start, ("scheduler", "scheduler_http"))
        assert scheduler.endpoints["scheduler"].endswith(f":{grpc_port}")
        assert scheduler.endpoints["scheduler_http"].endswith(f":{http_port}")
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(f"http://127.0.0.1:{http_port}/v2/health/live")
        assert r.status_code == 200

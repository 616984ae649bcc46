"""The head's SQLite file under an operator's hands, with real processes: a second head on
the same file is refused; a file deleted while the head runs takes no more changes that
the head would acknowledge and lose; a full disk fails changes clearly, and what the head
acknowledged is what a restarted head finds."""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from shoal.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(60)


def spec(name: str) -> dict[str, Any]:
    return {"name": name, "backend": "python", "model": "echo:Echo", "replicas": 0}


async def test_a_second_head_on_the_same_state_file_is_refused(tmp_path: Path) -> None:
    async with ProcessCluster(tmp_path, schedulers=0) as cluster:
        assert cluster.head is not None
        await cluster.deploy(spec("a"))
        # A head on another machine sharing the folder, or in another pid namespace (a
        # container), does not see this one's pid file.
        (cluster.head.state / "head.pid").unlink()
        command = ["head", "--port", "0", "--http-port", "0", "--state", str(cluster.head.state)]
        second = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "shoal.cli", *command],
            capture_output=True,
            text=True,
            env=cluster.env,
            timeout=30,
        )
        assert second.returncode == 1
        assert f"state store {cluster.head.state / 'state.db'} is open in another process" in second.stderr
        # The first goes on, its state whole.
        await cluster.deploy(spec("b"))
        status = await cluster.status()
        assert sorted(d["name"] for d in status["deployments"]) == ["a", "b"]


async def test_a_state_file_deleted_under_the_head_takes_no_more_changes(tmp_path: Path) -> None:
    async with ProcessCluster(tmp_path, schedulers=0) as cluster:
        assert cluster.head is not None
        await cluster.deploy(spec("a"))
        for name in ("state.db", "state.db-wal", "state.db-shm"):  # a cleanup, a volume gone
            (cluster.head.state / name).unlink()
        url = f"http://{cluster.head.endpoints['head_http']}/api/deployments"
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(url, json=spec("b"))
        # Before: 201, and a restart had neither a nor b.
        assert r.status_code == 500
        assert "state.db was deleted or replaced while it was open: changes are refused" in r.json()["error"]
        status = await cluster.status()  # reads still answer, from the head's memory
        assert [d["name"] for d in status["deployments"]] == ["a"]


async def test_a_full_disk_fails_changes_clearly_and_loses_none_it_acknowledged(tmp_path: Path) -> None:
    async with ProcessCluster(tmp_path, schedulers=0) as cluster:
        assert cluster.head is not None
        await cluster.deploy(spec("a"))
        url = f"http://{cluster.head.endpoints['head_http']}/api/deployments"
        # The disk fills: no file of the head may grow past a few writes more (EFBIG, as ENOSPC).
        files = [p for p in cluster.head.state.iterdir() if p.is_file()]
        limit = max(p.stat().st_size for p in files) + 20_000
        resource.prlimit(cluster.head.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        acknowledged = {"a"}
        async with httpx.AsyncClient(timeout=10) as client:
            refused = 0
            for i in range(8):
                r = await client.post(url, json={**spec(f"b{i}"), "options": {"pad": "x" * 8000}})
                if r.status_code == 201:
                    acknowledged.add(f"b{i}")
                else:
                    assert r.status_code == 500
                    assert r.json()["error"].startswith(f"state store {cluster.head.state / 'state.db'}: ")
                    refused += 1
            assert refused
            status = await cluster.status()  # reads still answer
            assert {d["name"] for d in status["deployments"]} == acknowledged
            # Space is back: changes go through again.
            resource.prlimit(cluster.head.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            r = await client.post(url, json=spec("c"))
            assert r.status_code == 201, r.text
            acknowledged.add("c")
        cluster.head.kill_all()
        await asyncio.to_thread(cluster.restart_head)
        await cluster.reconnect()
        status = await cluster.status()
        assert {d["name"] for d in status["deployments"]} == acknowledged

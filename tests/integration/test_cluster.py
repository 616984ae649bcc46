"""The core cluster as real processes: head, schedulers and replicas on port 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from shoal.rpc.clients import NativeClient
from shoal.testing.cluster import ProcessCluster
from shoal.testing.wait import until

pytestmark = pytest.mark.timeout(90)


def echo_spec(examples: Path, replicas: int = 2, **extra: Any) -> dict[str, Any]:
    return {
        "name": "echo",
        "backend": "python",
        "model": "echo:Echo",
        "base_dir": str(examples),
        "replicas": replicas,
        "resources": {"cpus": 0.1},
        **extra,
    }


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def wait_gone(pids: list[int], timeout_s: float) -> None:
    await until(lambda: not any(alive(p) for p in pids), f"processes {pids} exiting", timeout_s)


async def test_deploy_predict_and_status(tmp_path: Path, examples_dir: Path) -> None:
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(echo_spec(examples_dir, replicas=2))
        replicas = await cluster.wait_ready("echo", 2)
        assert {r["state"] for r in replicas} == {"READY"}
        assert all(alive(r["pid"]) for r in replicas)
        x = np.arange(32, dtype=np.float32).reshape(2, 16)
        outputs, replica = await cluster.send("echo", {"x": x})
        np.testing.assert_array_equal(outputs["x"], x)
        assert replica in {r["id"] for r in replicas}
        # Each replica logs to its own replica_<id>.log in the scheduler's state folder.
        logs = cluster.schedulers[0].state / "logs"
        for r in replicas:
            assert "loaded" in (logs / f"replica_{r['id']}.log").read_text()
        status = await cluster.status()
        assert [s["state"] for s in status["schedulers"]] == ["ALIVE"]
        assert status["schedulers"][0]["pid"] == cluster.schedulers[0].pid


async def test_kill_9_replica_is_replaced_and_no_request_is_lost(tmp_path: Path, examples_dir: Path) -> None:
    async with ProcessCluster(tmp_path) as cluster:
        # 30 ms per call, so requests are in flight on the replica we kill.
        await cluster.deploy(echo_spec(examples_dir, replicas=2, options={"delay_ms": 30}))
        before = await cluster.wait_ready("echo", 2)
        x = np.ones((1, 16), dtype=np.float32)
        failures: list[str] = []
        answered: list[str] = []
        stop = asyncio.Event()

        async def worker(client: NativeClient) -> None:
            while not stop.is_set():
                try:
                    out, rid = await client.infer("echo", {"x": x}, timeout_s=20)
                    assert out["x"].shape == (1, 16)
                    answered.append(rid)
                except Exception as err:
                    failures.append(repr(err))

        async with NativeClient(cluster.scheduler_address(), cluster.settings) as client:
            workers = [asyncio.create_task(worker(client)) for _ in range(16)]
            await until(lambda: len(answered) > 0, "a first answer")
            victim = before[0]
            os.kill(victim["pid"], signal.SIGKILL)
            after = await cluster.wait_for(
                lambda s: len(ids := _ready_ids(s, "echo")) == 2 and victim["id"] not in ids,
                timeout_s=10,
                what="a replacement replica",
            )
            (replacement,) = _ready_ids(after, "echo") - {r["id"] for r in before}
            await until(lambda: answered.count(replacement) >= 10, "answers from the replacement")
            stop.set()
            await asyncio.gather(*workers)
        assert failures == []
        # Requests went on through the kill: to the survivor, then to the replacement too.
        assert {before[1]["id"], replacement} <= set(answered)
        assert victim["id"] not in _ready_ids(after, "echo")
        events = [e["kind"] for e in (await _rest_status(cluster))["events"]]
        assert "replica_died" in events


def _ready_ids(status: dict[str, Any], deployment: str) -> set[str]:
    for dep in status["deployments"]:
        if dep["name"] == deployment:
            return {r["id"] for r in dep["replicas"] if r["state"] == "READY"}
    return set()


async def _rest_status(cluster: ProcessCluster) -> dict[str, Any]:
    import httpx

    assert cluster.head is not None
    async with httpx.AsyncClient() as http:
        resp = await http.get(f"http://{cluster.head.endpoints['head_http']}/api/status")
        resp.raise_for_status()
        doc: dict[str, Any] = resp.json()
        return doc


async def test_replica_nacked_by_its_scheduler_exits(tmp_path: Path, examples_dir: Path) -> None:
    async with ProcessCluster(tmp_path) as cluster:
        spec_file = tmp_path / "ghost.json"
        from shoal.core.spec import parse_spec

        spec_file.write_text(parse_spec(echo_spec(examples_dir, replicas=1)).to_json())
        log = tmp_path / "ghost.log"
        with open(log, "wb") as out:
            # A replica the scheduler never started: it registers, is NACKed, and exits.
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "shoal.replica_main",
                    "--replica-id",
                    "ghost-000001",
                    "--scheduler",
                    cluster.scheduler_address(),
                    "--spec-file",
                    str(spec_file),
                ],
                stdout=out,
                stderr=out,
            )
        try:
            code = await asyncio.to_thread(proc.wait, 30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert code == 0
        assert "NACK" in log.read_text()


async def test_replicas_exit_when_their_scheduler_is_killed(tmp_path: Path, examples_dir: Path) -> None:
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(echo_spec(examples_dir, replicas=2))
        replicas = await cluster.wait_ready("echo", 2)
        pids = [r["pid"] for r in replicas]
        cluster.schedulers[0].children()  # remember the replicas before their parent dies
        os.kill(cluster.schedulers[0].pid, signal.SIGKILL)
        # orphan_after is 2 s in the test cluster; allow the health interval and exit time on top.
        await wait_gone(pids, timeout_s=8)
        # The head notices the silent scheduler and marks it DEAD after dead_after (2 s).
        await cluster.wait_for(
            lambda s: s["schedulers"][0]["state"] == "DEAD", timeout_s=10, what="scheduler marked DEAD"
        )


async def test_delete_leaves_no_replica_process(tmp_path: Path, examples_dir: Path) -> None:
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(echo_spec(examples_dir, replicas=2))
        pids = [r["pid"] for r in await cluster.wait_ready("echo", 2)]
        await cluster.client.delete("echo")
        await wait_gone(pids, timeout_s=15)
        status = await cluster.status()
        assert status["deployments"] == []
        assert cluster.leftover_replicas() == []


async def test_scale_up_and_down(tmp_path: Path, examples_dir: Path) -> None:
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(echo_spec(examples_dir, replicas=1))
        first = await cluster.wait_ready("echo", 1)
        await cluster.client.scale("echo", 3)
        three = await cluster.wait_ready("echo", 3)
        assert first[0]["id"] in {r["id"] for r in three}, "scaling up must keep the running replica"
        await cluster.client.scale("echo", 1)
        one = await cluster.wait_ready("echo", 1)
        gone = [r["pid"] for r in three if r["id"] != one[0]["id"]]
        await wait_gone(gone, timeout_s=15)


async def test_head_restart_nacks_then_scheduler_reregisters_and_replicas_are_adopted(
    tmp_path: Path, examples_dir: Path
) -> None:
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(echo_spec(examples_dir, replicas=2))
        before = {r["id"] for r in await cluster.wait_ready("echo", 2)}
        assert cluster.head is not None
        cluster.head.kill_all()
        # The data plane does not need the head.
        x = np.ones((1, 16), dtype=np.float32)
        out, _ = await cluster.send("echo", {"x": x})
        np.testing.assert_array_equal(out["x"], x)
        await asyncio.to_thread(cluster.restart_head)
        await cluster.reconnect()
        after = await cluster.wait_ready("echo", 2, timeout_s=20)
        assert {r["id"] for r in after} == before, "the restarted head must adopt the running replicas"
        assert cluster.schedulers[0].log.read_text().count("registered with the head") >= 2


async def test_paused_scheduler_is_marked_dead_then_nacked_and_rejoins(
    tmp_path: Path, examples_dir: Path
) -> None:
    async with ProcessCluster(tmp_path, schedulers=2) as cluster:
        await cluster.deploy(echo_spec(examples_dir, replicas=2))
        await cluster.wait_ready("echo", 2)
        paused = cluster.schedulers[0]
        sched_id = (await cluster.status())["schedulers"]
        os.kill(paused.pid, signal.SIGSTOP)
        try:
            status = await cluster.wait_for(
                lambda s: any(x["state"] == "DEAD" for x in s["schedulers"]),
                timeout_s=10,
                what="the paused scheduler marked DEAD",
            )
            dead = [x["id"] for x in status["schedulers"] if x["state"] == "DEAD"]
            assert len(dead) == 1 and dead[0] in {x["id"] for x in sched_id}
        finally:
            os.kill(paused.pid, signal.SIGCONT)
        # Back: its next health update is NACKed, it registers again, and the deployment
        # settles at exactly its replica count.
        await cluster.wait_for(
            lambda s: all(x["state"] == "ALIVE" for x in s["schedulers"]),
            timeout_s=10,
            what="the scheduler back ALIVE",
        )
        await cluster.wait_ready("echo", 2, timeout_s=20)
        assert "NACK" in paused.log.read_text()


async def test_unknown_deployment_and_bad_input_are_clear_errors(tmp_path: Path, examples_dir: Path) -> None:
    from shoal.errors import InvalidArgument, NotFound

    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(echo_spec(examples_dir, replicas=1, inputs=[{"name": "x", "shape": [-1, 16]}]))
        await cluster.wait_ready("echo", 1)
        with pytest.raises(NotFound, match="nope"):
            await cluster.send("nope", {"x": np.ones((1, 16), dtype=np.float32)})
        with pytest.raises(InvalidArgument, match="x"):
            await cluster.send("echo", {"x": np.ones((1, 3), dtype=np.float32)})
        # The replica that refused the bad request still serves.
        out, _ = await cluster.send("echo", {"x": np.ones((2, 16), dtype=np.float32)})
        assert out["x"].shape == (2, 16)


async def test_a_cluster_that_does_not_start_leaves_no_process(tmp_path: Path) -> None:
    """A scheduler that cannot start (here a flag it does not take; on a loaded machine, one
    slower than the wait) failed the test and left its head running, reparented to init:
    ``async with`` never reached its exit."""
    cluster = ProcessCluster(tmp_path, scheduler_args=[["--no-such-flag"]])
    with pytest.raises(RuntimeError, match="process exited"):
        async with cluster:
            pass
    assert cluster.head is not None and cluster.head.proc is not None
    assert not cluster.head.alive()

"""Replicas and ingress workers forked from a scheduler's zygote (``shoal.zygote``), as real
processes: each is still its own process, with its own log, session and exit status."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from shoal.testing.cluster import ProcessCluster
from shoal.testing.etcd import echo_spec
from shoal.testing.wait import until

pytestmark = pytest.mark.timeout(90)


def echo(examples: Path, name: str = "echo", **extra: Any) -> dict[str, Any]:
    return {**echo_spec(name, 1, examples), **extra}


def zygote_of(cluster: ProcessCluster) -> psutil.Process:
    (zygote,) = [
        p
        for p in psutil.Process(cluster.schedulers[0].pid).children()
        if p.cmdline()[:2] == ["shoal", "zygote"]
    ]
    return zygote


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def events(cluster: ProcessCluster) -> list[str]:
    import httpx

    assert cluster.head is not None
    async with httpx.AsyncClient() as http:
        resp = await http.get(f"http://{cluster.head.endpoints['head_http']}/api/status")
        resp.raise_for_status()
        return [e["message"] for e in resp.json()["events"]]


async def test_replicas_and_ingress_workers_are_forked_as_processes_of_their_own(
    tmp_path: Path, examples_dir: Path
) -> None:
    async with ProcessCluster(tmp_path, env={"SHOAL_INGRESS_WORKERS": "2"}) as cluster:
        await cluster.deploy(echo(examples_dir))
        (replica,) = await cluster.wait_ready("echo", 1)
        scheduler = psutil.Process(cluster.schedulers[0].pid)
        zygote = zygote_of(cluster)
        # The replica: a child of the zygote that reads as `python -m shoal.replica_main`, in a
        # session of its own (a Ctrl-C at the scheduler's terminal does not reach it).
        rep = psutil.Process(replica["pid"])
        assert rep.ppid() == zygote.pid
        assert "shoal.replica_main" in rep.cmdline() and replica["id"] in rep.cmdline()
        assert os.getsid(rep.pid) == rep.pid
        log = cluster.schedulers[0].state / "logs" / f"replica_{replica['id']}.log"
        assert "loaded" in log.read_text()
        # The ingress worker: forked too, in the scheduler's session.
        (worker,) = [p for p in zygote.children() if "shoal.ingress_worker" in p.cmdline()]
        assert os.getsid(worker.pid) == os.getsid(scheduler.pid)
        x = np.arange(16, dtype=np.float32).reshape(1, 16)
        outputs, _ = await cluster.send("echo", {"x": x})
        np.testing.assert_array_equal(outputs["x"], x)

        # Exit statuses reach the scheduler through the zygote, and the replacement is forked too.
        os.kill(rep.pid, signal.SIGKILL)
        replacement = await ready_other_than(cluster, replica["id"])
        assert psutil.Process(replacement["pid"]).ppid() == zygote.pid
        await until_event(cluster, f"replica {replica['id']} died: process killed by SIGKILL")
        # A model that does not load: its exit status and last log line.
        await cluster.deploy(echo(examples_dir, "broken", model="echo:Missing"))
        await until_event(cluster, "died: process exited with code 1")
        # The zygote ends with its scheduler (its children end once they find it gone).
        os.kill(scheduler.pid, signal.SIGKILL)
        await until(lambda: not alive(zygote.pid), "the zygote's end")


async def test_a_scheduler_whose_zygote_died_still_starts_and_watches_replicas(
    tmp_path: Path, examples_dir: Path
) -> None:
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(echo(examples_dir))
        (replica,) = await cluster.wait_ready("echo", 1)
        zygote = zygote_of(cluster)
        zygote.kill()
        await until(lambda: not alive(zygote.pid), "the zygote's end")
        assert alive(replica["pid"]), "the zygote's children outlive it"
        # The scheduler still notices the replica's end (no exit status now), and starts the
        # replacement as a new process of its own.
        os.kill(replica["pid"], signal.SIGKILL)
        replacement = await ready_other_than(cluster, replica["id"])
        assert psutil.Process(replacement["pid"]).ppid() == cluster.schedulers[0].pid
        assert "shoal.replica_main" in psutil.Process(replacement["pid"]).cmdline()
        await until_event(cluster, f"replica {replica['id']} died: process exited with code 255")


DRAW = """
import multiprocessing

import numpy as np


class Draw:
    def __init__(self):
        self.draw = float(np.random.rand())
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            self.spawned = pool.map(abs, [-3])[0]

    def predict(self, inputs):
        return {"draw": np.array([[self.draw, self.spawned]])}
"""


async def test_forked_replicas_draw_their_own_random_numbers_and_can_spawn_processes(tmp_path: Path) -> None:
    (tmp_path / "draw.py").write_text(DRAW)
    spec = {
        "name": "draw",
        "backend": "python",
        "model": "draw:Draw",
        "base_dir": str(tmp_path),
        "replicas": 2,
        "resources": {"cpus": 0.1},
    }
    async with ProcessCluster(tmp_path / "cluster") as cluster:
        await cluster.deploy(spec)
        replicas = await cluster.wait_ready("draw", 2)
        draws: dict[str, list[float]] = {}
        x = np.zeros((1, 1), dtype=np.float32)
        while len(draws) < 2:
            outputs, rid = await cluster.send("draw", {"x": x})
            draws[rid] = outputs["draw"][0].tolist()
        assert set(draws) == {r["id"] for r in replicas}
        (a, spawned_a), (b, spawned_b) = draws.values()
        assert a != b, "numpy's global generator must be reseeded in each forked replica"
        # A spawned pool starts from the replica's module, not the scheduler's CLI.
        assert spawned_a == spawned_b == 3


ZYGOTE_SCRIPT = """
import asyncio, json, sys
from shoal.zygote import Zygote

zygote = Zygote.fork()
assert zygote is not None


async def main():
    codes = []
    with open(sys.argv[1], "ab") as out:
        for args in (["--help"], ["--bogus"]):
            argv = [sys.executable, "-m", "shoal.replica_main", *args]
            child = zygote.spawn(argv, env={}, out=out, new_session=True)
            codes.append(await child.wait())
    print(json.dumps(codes))


asyncio.run(main())
zygote.close()
"""


def test_a_zygote_child_writes_to_its_file_and_reports_its_exit_status(tmp_path: Path) -> None:
    out = tmp_path / "child.log"
    done = subprocess.run(
        [sys.executable, "-c", ZYGOTE_SCRIPT, str(out)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [0, 2]  # --help, then argparse's usage error
    text = out.read_text()
    assert "usage: python -m shoal.replica_main" in text
    assert "error: the following arguments are required: --replica-id" in text


async def ready_other_than(cluster: ProcessCluster, replica_id: str) -> dict[str, Any]:
    def others(status: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            r
            for d in status["deployments"]
            for r in d["replicas"]
            if d["name"] == "echo" and r["id"] != replica_id and r["state"] == "READY"
        ]

    status = await cluster.wait_for(lambda s: len(others(s)) == 1, timeout_s=20, what="a replacement")
    return others(status)[0]


async def until_event(cluster: ProcessCluster, text: str) -> None:
    seen: list[str] = []

    async def check() -> bool:
        seen[:] = await events(cluster)
        return any(text in m for m in seen)

    deadline = asyncio.get_running_loop().time() + 20
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"no event with {text!r} in {seen}"
        await asyncio.sleep(0.1)

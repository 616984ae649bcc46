"""A replica is held to its deployment's ``resources.memory_mb`` (``shoal/scheduler/supervisor.py``),
with real processes on port 0.

Before, ``memory_mb`` only placed replicas: a model that grew past it kept growing, until the
machine ran out and the kernel's OOM killer picked a process, which may be the scheduler.
Now the scheduler kills the replica that went over, says so, and a replacement serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from shoal.scheduler.supervisor import memory_mb
from shoal.testing.cluster import ProcessCluster
from tests.integration.test_zygote import ready_other_than, until_event, zygote_of

pytestmark = pytest.mark.timeout(90)

LIMIT_MB = 400

HOG = '''
import threading

import numpy as np


class Hog:
    """Echoes ``x``; a request whose first value is N > 0 makes it take N MB and keep them,
    just after its answer: killed while the request ran, the replica would have it retried
    on another replica (as for any replica that dies), which it would take down as well."""

    def __init__(self) -> None:
        self.kept = []

    def predict(self, inputs):
        mb = int(inputs["x"].flat[0])
        if mb > 0:
            threading.Timer(0.1, self._take, (mb,)).start()
        return {"x": inputs["x"]}

    def _take(self, mb):
        self.kept.append(np.ones(mb * 2**20, dtype=np.uint8))  # written: resident
'''


def hog_spec(folder: Path) -> dict[str, Any]:
    (folder / "hog.py").write_text(HOG)
    return {
        "name": "echo",
        "backend": "python",
        "model": "hog:Hog",
        "base_dir": str(folder),
        "replicas": 1,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}],
        "outputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}],
        "resources": {"cpus": 0.1, "memory_mb": LIMIT_MB},
    }


def oom_score_adj(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


async def test_a_replica_over_its_memory_limit_is_killed_and_replaced(tmp_path: Path) -> None:
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(hog_spec(tmp_path))
        [replica] = await cluster.wait_ready("echo", 1)
        used = memory_mb(replica["pid"])
        assert used is not None and used < LIMIT_MB / 2, used
        # What allocates faster than a ping meets the kernel's OOM killer, which takes the
        # replica (replica_oom_score_adj 1000) before its scheduler.
        scheduler = cluster.schedulers[0].proc
        assert scheduler is not None
        assert oom_score_adj(replica["pid"]) == 1000
        assert oom_score_adj(scheduler.pid) < 1000
        zygote = zygote_of(cluster)

        # Under the limit it serves, and keeps serving.
        small = np.array([[100.0]], dtype=np.float32)
        outputs, _ = await cluster.send("echo", {"x": small})
        np.testing.assert_array_equal(outputs["x"], small)
        await asyncio.sleep(1.5)  # a ping or more: it had the 100 MB, and stays
        await cluster.send("echo", {"x": np.zeros((1, 1), dtype=np.float32)})
        [same] = await cluster.wait_ready("echo", 1)
        assert same["id"] == replica["id"]

        # Over it: the answer comes back, then the replica is killed within a ping or two.
        await cluster.send("echo", {"x": np.array([[LIMIT_MB]], dtype=np.float32)})
        replacement = await ready_other_than(cluster, replica["id"])
        assert not psutil.pid_exists(replica["pid"]) or psutil.Process(replica["pid"]).status() == "zombie"
        # The head's events say why, and so do `shoal status` and the scheduler's log.
        await until_event(cluster, f"replica {replica['id']} died: used ")
        await until_event(cluster, f"MB of memory, over its limit of {LIMIT_MB} MB (resources.memory_mb)")
        status = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "shoal.cli", "--head", cluster.head_address, "status"],
            capture_output=True,
            text=True,
            timeout=30,
            env=cluster.env,
        )
        assert status.returncode == 0, status.stderr
        died = [line for line in status.stdout.splitlines() if f"replica {replica['id']} died" in line]
        assert died and f"over its limit of {LIMIT_MB} MB (resources.memory_mb)" in died[0], status.stdout
        log = cluster.schedulers[0].log.read_text()
        assert f"replica {replica['id']} used " in log and "killing it" in log

        # The replacement serves.
        outputs, _ = await cluster.send("echo", {"x": small})
        np.testing.assert_array_equal(outputs["x"], small)
        assert psutil.Process(replacement["pid"]).ppid() == zygote.pid


PARENT = '''
import subprocess
import sys

CHILD = "import sys, time\\nmb = int(sys.stdin.readline() or 0)\\nkept = bytearray(mb * 2**20)\\n" + (
    "for i in range(0, len(kept), 4096): kept[i] = 1\\ntime.sleep(3600)"
)


class Parent:
    """Echoes ``x``; at its start it starts a child, which takes N MB (and keeps them) when
    a request's first value is N > 0, and runs on when its input closes."""

    def __init__(self, pidfile: str) -> None:
        self.child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE)
        with open(pidfile, "w") as f:
            f.write(str(self.child.pid))

    def predict(self, inputs):
        mb = int(inputs["x"].flat[0])
        if mb > 0:
            self.child.stdin.write(f"{mb}\\n".encode())
            self.child.stdin.flush()
        return {"x": inputs["x"]}
'''


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def until_gone(pid: int) -> None:
    for _ in range(100):  # SIGKILL: gone at once, but give the kernel a moment
        if not running(pid):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the replica's child outlived it")


async def test_the_processes_a_replica_started_die_with_it_when_it_is_killed(tmp_path: Path) -> None:
    """Killed over its memory limit, a replica takes the processes its model started with it.
    Before, only the replica was killed: its child, the one holding the memory, ran on
    (orphaned, its memory still taken), one more for each replacement."""
    (tmp_path / "parent.py").write_text(PARENT)
    pidfile = tmp_path / "child.pid"
    spec = {
        **hog_spec(tmp_path),
        "model": "parent:Parent",
        "options": {"pidfile": str(pidfile)},
    }
    child = 0
    try:
        async with ProcessCluster(tmp_path) as cluster:
            await cluster.deploy(spec)
            [replica] = await cluster.wait_ready("echo", 1)
            child = int(pidfile.read_text())
            assert psutil.Process(child).ppid() == replica["pid"]
            await cluster.send("echo", {"x": np.array([[LIMIT_MB]], dtype=np.float32)})
            await ready_other_than(cluster, replica["id"])
            await until_event(cluster, f"replica {replica['id']} died: used ")

            await until_gone(child)
    finally:
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


async def test_the_processes_a_replica_started_die_with_it_when_it_exits(tmp_path: Path) -> None:
    """Scaled away, a replica drains and exits by itself; what its model started goes with
    it. Before, its child ran on, orphaned (ppid 1), with its memory (100 MB in the probe)."""
    (tmp_path / "parent.py").write_text(PARENT)
    pidfile = tmp_path / "child.pid"
    spec = {**hog_spec(tmp_path), "model": "parent:Parent", "options": {"pidfile": str(pidfile)}}
    child = 0
    try:
        async with ProcessCluster(tmp_path) as cluster:
            await cluster.deploy(spec)
            [replica] = await cluster.wait_ready("echo", 1)
            child = int(pidfile.read_text())
            assert psutil.Process(child).ppid() == replica["pid"]
            await cluster.client.scale("echo", 0)
            for _ in range(300):  # drained (no request in flight), then it exits
                if not running(replica["pid"]):
                    break
                await asyncio.sleep(0.1)
            assert not running(replica["pid"]), "the scaled-away replica still runs"
            await until_gone(child)
    finally:
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


async def test_a_replica_whose_model_came_from_a_uri_is_held_to_its_memory_limit(tmp_path: Path) -> None:
    """A model named by URI (here its code folder, ``file://``) starts once fetched, and is
    held to ``memory_mb`` like any other. Before, such a replica was never measured: it grew
    past its limit (400 MB taken against a limit of 400) and served on."""
    code = tmp_path / "code"
    code.mkdir()
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy({**hog_spec(code), "base_dir": code.as_uri()})
        [replica] = await cluster.wait_ready("echo", 1)
        await cluster.send("echo", {"x": np.array([[LIMIT_MB]], dtype=np.float32)})
        await until_event(cluster, f"replica {replica['id']} died: used ")
        await ready_other_than(cluster, replica["id"])

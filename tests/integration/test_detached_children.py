"""Processes a replica's model detached from it (``setsid``, ``start_new_session``, a daemon
forked twice) end with the replica, however it ends: real processes on port 0.

Before, a replica's process group was killed with it, and a process that had left the group
was missed: a model's server started in a session of its own, or a daemon, ran on after its
replica was scaled away, killed, or left by its killed scheduler, holding its memory, GPU
and ports (``sleep`` here).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from shoal.testing.cluster import ProcessCluster
from shoal.testing.etcd import echo_spec
from tests.integration.test_zygote import ready_other_than, zygote_of

pytestmark = pytest.mark.timeout(90)

GONE_WITHIN_S = 10.0
PIDFILE = "detached.pids"

DETACHER = '''
import os
import subprocess
import sys
import time

DAEMON = """
import os, sys
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
os.execvp("sleep", ["sleep", "3600"])
"""


class Detacher:
    """Echoes ``x``. At its start it leaves two processes running outside its process group,
    ``sleep`` in a session of its own and ``sleep`` as a daemon (forked twice, ``setsid``
    between), and adds their pids to ``pidfile``."""

    def __init__(self, pidfile: str) -> None:
        quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.own = subprocess.Popen(["sleep", "3600"], start_new_session=True, **quiet)
        daemon_file = f"{pidfile}.{os.getpid()}"
        subprocess.run([sys.executable, "-c", DAEMON, daemon_file], check=True, timeout=30, **quiet)
        deadline = time.monotonic() + 30
        while not os.path.exists(daemon_file) and time.monotonic() < deadline:
            time.sleep(0.01)
        with open(daemon_file) as f:
            daemon = int(f.read())
        with open(pidfile, "a") as f:  # a line per replica, written at once
            f.write(f"{self.own.pid} {daemon}\\n")

    def predict(self, inputs):
        return {"x": inputs["x"]}
'''


def detacher_spec(folder: Path, pidfile: Path) -> dict[str, Any]:
    (folder / "detacher.py").write_text(DETACHER)
    return {
        **echo_spec("echo", 1, folder),
        "model": "detacher:Detacher",
        "options": {"pidfile": str(pidfile)},
    }


def runs(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.asynccontextmanager
async def detached_cluster(
    tmp_path: Path,
) -> AsyncIterator[tuple[ProcessCluster, dict[str, Any], list[psutil.Process]]]:
    """A cluster serving one replica of :data:`DETACHER`, the replica, and the two processes
    its model detached (checked to be out of its process group). Whatever any replica's
    model detached and is left at the end is killed."""
    pidfile = tmp_path / PIDFILE
    detached: list[psutil.Process] = []
    since = time.time()
    try:
        async with ProcessCluster(tmp_path / "cluster") as cluster:
            await cluster.deploy(detacher_spec(tmp_path, pidfile))
            [replica] = await cluster.wait_ready("echo", 1)
            detached = read_detached(pidfile)
            assert len(detached) == 2
            for proc in detached:
                assert runs(proc)
                assert os.getpgid(proc.pid) != replica["pid"], "not detached: the group kill reaches it"
            yield cluster, replica, detached
    finally:
        kill_left(pidfile, since)


def read_detached(pidfile: Path, after: int = 0) -> list[psutil.Process]:
    """The processes the replicas' models detached, in the order they started, but the
    first ``after``."""
    return [psutil.Process(int(pid)) for pid in pidfile.read_text().split()[after:]]


def kill_left(pidfile: Path, since: float) -> None:
    """Kill the ``sleep`` processes listed in ``pidfile`` that started after ``since``."""
    with contextlib.suppress(FileNotFoundError):
        for pid in pidfile.read_text().split():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(int(pid))
                if proc.cmdline() == ["sleep", "3600"] and proc.create_time() >= since - 1:
                    proc.kill()


async def until_gone(procs: list[psutil.Process], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + GONE_WITHIN_S
    while any(runs(p) for p in procs):
        left = [p.pid for p in procs if runs(p)]
        assert asyncio.get_running_loop().time() < deadline, f"{what}: {left} still run"
        await asyncio.sleep(0.1)


async def test_detached_processes_end_with_a_replica_scaled_away(tmp_path: Path) -> None:
    async with detached_cluster(tmp_path) as (cluster, replica, detached):
        await cluster.client.scale("echo", 0)
        await until_gone([psutil.Process(replica["pid"])], "the scaled-away replica")
        await until_gone(detached, "what its model detached")


async def test_detached_processes_end_with_a_replica_killed_with_sigkill(tmp_path: Path) -> None:
    async with detached_cluster(tmp_path) as (cluster, replica, detached):
        zygote = zygote_of(cluster)
        os.kill(replica["pid"], signal.SIGKILL)
        await until_gone(detached, "what the killed replica's model detached")
        # The zygote reaped them and told its scheduler nothing of them: the replacement
        # is forked as before.
        replacement = await ready_other_than(cluster, replica["id"])
        assert psutil.Process(replacement["pid"]).ppid() == zygote.pid
        assert not [p for p in zygote.children() if p.status() == psutil.STATUS_ZOMBIE]


async def test_detached_processes_end_with_a_replica_whose_scheduler_was_killed(tmp_path: Path) -> None:
    async with detached_cluster(tmp_path) as (cluster, replica, detached):
        rep = psutil.Process(replica["pid"])
        os.kill(cluster.schedulers[0].pid, signal.SIGKILL)
        # The orphaned replica leaves after orphan_after_s (2 s here), and takes them along.
        await until_gone([rep], "the orphaned replica")
        await until_gone(detached, "what the orphaned replica's model detached")


async def test_detached_processes_end_with_replicas_killed_once_the_zygote_is_gone(tmp_path: Path) -> None:
    """Its zygote gone, a scheduler starts replicas as processes of its own and takes over
    the zygote's; what either detached comes to it when the replica is killed with SIGKILL."""
    async with detached_cluster(tmp_path) as (cluster, replica, detached):
        scheduler = psutil.Process(cluster.schedulers[0].pid)
        zygote = zygote_of(cluster)
        zygote.kill()
        await until_gone([zygote], "the zygote")
        first = psutil.Process(replica["pid"])
        first.kill()
        await until_gone(detached, "what the zygote's replica detached")

        replacement = psutil.Process((await ready_other_than(cluster, replica["id"]))["pid"])
        assert replacement.ppid() == scheduler.pid
        more = read_detached(tmp_path / PIDFILE, after=len(detached))
        assert len(more) == 2 and all(runs(p) for p in more)
        replacement.kill()
        await until_gone(more, "what the scheduler's own replica detached")
        # Reaped too, and so are the replicas: none is left a zombie of the scheduler.
        reaped = [*detached, *more, first, replacement]
        deadline = asyncio.get_running_loop().time() + GONE_WITHIN_S
        while left := [p.pid for p in reaped if p.is_running()]:
            assert asyncio.get_running_loop().time() < deadline, f"not reaped: {left}"
            await asyncio.sleep(0.1)


HELPER_PER_REQUEST = """
import subprocess


class Helper:
    def predict(self, inputs):
        # A helper in the background, as 'os.system("cmd &")' leaves one: once the shell has
        # exited, it is the replica's (a subreaper), and a zombie once it exits.
        subprocess.run(["sh", "-c", "true &"], check=True)
        return {"x": inputs["x"]}
"""


async def test_helpers_a_model_leaves_per_request_do_not_pile_up_as_zombies(tmp_path: Path) -> None:
    """Before, every helper a model left in the background stayed a zombie in its replica
    until the replica exited: 50 after 50 requests (a process-table slot each; under a pids
    limit of a few thousand, as containers have, forks then fail for the whole pod)."""
    (tmp_path / "helper_per_request.py").write_text(HELPER_PER_REQUEST)
    spec = {**echo_spec("helper", 1, tmp_path), "model": "helper_per_request:Helper"}
    env = {"SHOAL_REPLICA_REAP_ORPHANS_S": "0.5"}
    async with ProcessCluster(tmp_path / "cluster", env=env) as cluster:
        await cluster.deploy(spec)
        [replica] = await cluster.wait_ready("helper", 1)
        for _ in range(20):
            await cluster.send("helper", {"x": np.ones((1, 2), np.float32)})
        replica_proc = psutil.Process(replica["pid"])

        def zombies() -> int:
            return sum(1 for p in replica_proc.children() if p.status() == psutil.STATUS_ZOMBIE)

        deadline = asyncio.get_running_loop().time() + GONE_WITHIN_S
        while (left := zombies()) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        assert left == 0, f"{left} exited helpers are still zombies in the replica"
        log = (cluster.schedulers[0].state / "logs" / f"replica_{replica['id']}.log").read_text()
        assert "process(es) its model had detached" in log

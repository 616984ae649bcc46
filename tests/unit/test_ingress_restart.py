"""When the scheduler restarts an ingress worker that exited (``shoal.run.IngressWorkers``),
with stand-in worker processes (a sleeping Python) so that each exit is the test's own.

A signal to the whole process group (``systemctl stop``, ``timeout``, Ctrl-C) reaches a
worker as it reaches the scheduler; a worker still starting dies of it before its handler
is in place, and the scheduler could see that exit before running its own handler. It then
logged the worker as lost and started it again while it stopped (seen with ``shoal up``
sent SIGTERM 0.8 s after its start)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import pytest

from shoal.config import Settings
from shoal.run import IngressWorkers
from shoal.scheduler.child import ChildProcess
from shoal.scheduler.ingress import IngressHub
from shoal.scheduler.router import Router
from shoal.testing.fakes import FakeReplicas
from shoal.testing.wait import until

pytestmark = pytest.mark.timeout(20)


class SleepingWorkers(IngressWorkers):
    """Workers whose processes only sleep: every exit is one the test caused."""

    spawned = 0

    async def _spawn(self, worker_id: str) -> None:
        argv = [sys.executable, "-c", "import time; time.sleep(60)"]
        self._procs[worker_id] = ChildProcess.spawn(argv, env=os.environ, out=None, new_session=False)
        self.spawned += 1


def workers() -> SleepingWorkers:
    hub = IngressHub(Router("s1", Settings(), FakeReplicas()))
    return SleepingWorkers(Settings(), "127.0.0.1:1", "s1", 1, hub)


async def test_a_worker_that_exits_is_started_again() -> None:
    w = workers()
    await w.start()
    try:
        (first,) = w.pids()
        w._procs["s1/ingress-1"].send_signal(signal.SIGKILL)
        await until(lambda: w.restarts == 1 and w.pids() != [first], "a new worker", timeout_s=5)
    finally:
        await w.aclose()


async def test_a_worker_that_dies_of_the_groups_signal_as_the_scheduler_stops_is_not_started_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="shoal")
    w = workers()
    await w.start()
    try:
        proc = w._procs["s1/ingress-1"]
        proc.send_signal(signal.SIGTERM)  # reached the worker first
        await proc.wait()
        await asyncio.sleep(0.02)  # and its exit was seen before the scheduler's own handler ran
        await w.drain(grace_s=1.0)
        await asyncio.sleep(0.5)  # past the pause before a restart
        assert (w.restarts, w.spawned) == (0, 1)
        assert "starting it again" not in caplog.text
    finally:
        await w.aclose()

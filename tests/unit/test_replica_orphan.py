"""A replica's side of the death path on a FakeClock: it leaves when its scheduler has been
unreachable for ``orphan_after_s`` (measured from the last answer, not counted in calls),
and at once when the scheduler NACKs it."""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys

import pytest

from shoal.config import Settings
from shoal.core.alive import process_runs
from shoal.core.clock import FakeClock
from shoal.core.spec import parse_spec
from shoal.errors import Unavailable
from shoal.replica.process import BUSY_SCHEDULER_FACTOR, ReplicaProcess

pytestmark = pytest.mark.timeout(10)

SPEC = parse_spec({"name": "echo", "backend": "python", "model": "m.py"})


class Scheduler:
    """The replica's scheduler: reachable or not, and knowing the replica or not."""

    def __init__(self) -> None:
        self.reachable = True
        self.knows = True
        self.calls = 0

    async def register(self, replica_id: str, address: str, pid: int) -> tuple[bool, float]:
        return True, 1.0

    async def health(self, replica_id: str, state: str, in_flight: int, queued: int) -> bool:
        self.calls += 1
        if not self.reachable:
            raise Unavailable("scheduler unreachable")
        return self.knows


async def heartbeat(clock: FakeClock, run: asyncio.Task[None]) -> None:
    """One health interval (1 s): the replica calls its scheduler, then waits again or ends."""
    await clock.wait_for_sleepers(1)
    clock.advance(1.0)
    waiting = asyncio.ensure_future(clock.wait_for_sleepers(1))
    await asyncio.wait({waiting, run}, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)


async def test_an_unreachable_scheduler_orphans_the_replica_after_orphan_after_s() -> None:
    clock = FakeClock()
    scheduler = Scheduler()
    replica = ReplicaProcess("echo-1", SPEC, Settings(orphan_after_s=3.0), scheduler, clock=clock)
    run = asyncio.create_task(replica.run("127.0.0.1:1", 1))
    await heartbeat(clock, run)  # answered at t=1
    scheduler.reachable = False

    await heartbeat(clock, run)  # t=2: silent 1 s
    await heartbeat(clock, run)  # t=3: silent 2 s
    assert not run.done()
    await heartbeat(clock, run)  # t=4: silent 3 s

    await asyncio.wait_for(run, 2.0)
    assert replica.exit_reason.startswith("scheduler unreachable for 3.0s")
    assert scheduler.calls == 4


async def test_a_scheduler_back_in_time_keeps_the_replica() -> None:
    clock = FakeClock()
    scheduler = Scheduler()
    replica = ReplicaProcess("echo-1", SPEC, Settings(orphan_after_s=3.0), scheduler, clock=clock)
    run = asyncio.create_task(replica.run("127.0.0.1:1", 1))
    scheduler.reachable = False
    for _ in range(2):
        await heartbeat(clock, run)
    scheduler.reachable = True
    await heartbeat(clock, run)
    scheduler.reachable = False
    for _ in range(2):
        await heartbeat(clock, run)
    assert not run.done()

    scheduler.reachable, scheduler.knows = True, False  # the scheduler forgot it: NACK
    await heartbeat(clock, run)
    await asyncio.wait_for(run, 2.0)
    assert replica.exit_reason == "NACKed by the scheduler"


async def test_a_scheduler_whose_process_runs_but_does_not_answer_is_given_longer() -> None:
    """A flood of requests on the scheduler's port starved its event loop for 6 s: replicas of
    every deployment left as orphans though their scheduler ran. Now they wait for a scheduler
    that runs BUSY_SCHEDULER_FACTOR times longer, and one that is gone orphans them as before."""
    for runs in (True, False):
        clock = FakeClock()
        scheduler = Scheduler()
        settings = Settings(orphan_after_s=3.0)
        alive = functools.partial(bool, runs)
        replica = ReplicaProcess("echo-1", SPEC, settings, scheduler, clock=clock, scheduler_runs=alive)
        run = asyncio.create_task(replica.run("127.0.0.1:1", 1))
        await heartbeat(clock, run)  # answered at t=1
        scheduler.reachable = False
        beats = 0
        while not run.done() and beats < 60:
            await heartbeat(clock, run)
            beats += 1
        await asyncio.wait_for(run, 2.0)
        silent = 3.0 * BUSY_SCHEDULER_FACTOR if runs else 3.0
        assert beats == silent
        why = "its process runs but does not answer" if runs else "no orphans"
        assert (
            replica.exit_reason == f"scheduler unreachable for {silent:.1f}s (scheduler unreachable); {why}"
        )


def test_process_runs_knows_a_process_from_a_later_one_of_its_number() -> None:
    assert process_runs(0) is None
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        runs = process_runs(child.pid)
        assert runs is not None and runs()
    finally:
        child.kill()
        child.wait()
    assert not runs()
    gone = process_runs(child.pid)  # gone before it was watched: it does not run (not "not known")
    assert gone is not None and not gone()

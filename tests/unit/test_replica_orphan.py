"""A replica's side of the death path on a FakeClock: it leaves when its scheduler has been
unreachable for ``orphan_after_s`` (measured from the last answer, not counted in calls),
and at once when the scheduler NACKs it."""

from __future__ import annotations

import asyncio

import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.spec import parse_spec
from shoal.errors import Unavailable
from shoal.replica.process import ReplicaProcess

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

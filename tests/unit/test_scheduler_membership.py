"""Scheduler ids survive restarts, and DEAD schedulers are forgotten (issue 13, item 10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.cluster import ALIVE, DEAD, ClusterState
from shoal.core.placement import Capacity
from shoal.head.node import HeadNode, cluster_status
from shoal.scheduler.node import scheduler_id
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers
from shoal.types import SchedulerRegistration

pytestmark = pytest.mark.timeout(10)


def test_the_scheduler_id_is_kept_in_the_state_folder(tmp_path: Path) -> None:
    settings = Settings(state_dir=str(tmp_path / "state"))

    first = scheduler_id(settings)
    assert first.startswith("sched-")
    assert (tmp_path / "state" / "scheduler_id").read_text().strip() == first
    assert scheduler_id(settings) == first  # a restart: the same id

    assert scheduler_id(settings.replace(scheduler_id="mine")) == "mine"  # a setting wins
    assert scheduler_id(Settings(state_dir=str(tmp_path / "other"))) != first  # another folder


def test_an_unreadable_kept_id_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "scheduler_id").write_text("not an id / at all\n")
    made = scheduler_id(Settings(state_dir=str(tmp_path)))
    assert made.startswith("sched-") and (tmp_path / "scheduler_id").read_text().strip() == made


def test_a_dead_scheduler_is_forgotten_after_forget_after_s() -> None:
    clock = FakeClock()
    state = ClusterState(clock=clock, dead_after_s=5.0, forget_after_s=60.0)
    state.register("s1", "s1:1", "s1:2", Capacity(4, 1024, 0))

    clock.advance(6)
    assert state.expire() == ["s1"] and state.schedulers["s1"].state == DEAD
    clock.advance(50)  # silent 56 s: still shown as DEAD
    state.expire()
    assert state.schedulers["s1"].state == DEAD
    clock.advance(5)  # silent 61 s
    state.expire()
    assert "s1" not in state.schedulers
    assert [e.kind for e in state.events][-1] == "scheduler_forgotten"

    # It may come back: NACKed as unknown, then it registers again.
    assert not state.health("s1", 1, [])
    state.register("s1", "s1:1", "s1:2", Capacity(4, 1024, 0))
    assert state.schedulers["s1"].state == ALIVE


def test_forget_after_0_keeps_dead_schedulers() -> None:
    clock = FakeClock()
    state = ClusterState(clock=clock, dead_after_s=5.0, forget_after_s=0)
    state.register("s1", "s1:1", "s1:2", Capacity(4, 1024, 0))
    clock.advance(10**6)
    state.expire()
    assert state.schedulers["s1"].state == DEAD


async def test_the_head_drops_a_forgotten_scheduler_from_its_status(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    head = HeadNode(Settings(dead_after_s=5, forget_dead_after_s=60), store, fleet, clock)
    try:
        await head.register_scheduler(
            SchedulerRegistration(
                "s1", "s1:1", "s1:2", Capacity(4, 1024, 0), pid=1, hostname="h", replicas=()
            )
        )
        clock.advance(30)
        await head.reconcile_once()
        assert [s["state"] for s in cluster_status(head)["schedulers"]] == [DEAD]
        clock.advance(31)
        await head.reconcile_once()
        assert cluster_status(head)["schedulers"] == []
    finally:
        await head.aclose()

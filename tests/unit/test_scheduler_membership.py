"""Scheduler ids survive restarts, and DEAD schedulers are forgotten (issue 13, item 10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.cluster import ALIVE, DEAD, ClusterState
from shoal.core.placement import Capacity
from shoal.errors import AlreadyExists
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


# A second process under a live scheduler's id (a cloned machine image carrying
# <state>/scheduler_id, a copied --scheduler-id) is refused; restarts are not.


def _two_ids_state(clock: FakeClock) -> ClusterState:
    state = ClusterState(clock=clock, dead_after_s=5.0, stream_end_grace_s=3.0)
    state.register("sa", "10.0.0.1:7000", "10.0.0.1:7001", Capacity(4, 1024, 1), pid=11, hostname="ma")
    assert state.health("sa", 1, [])  # its stream is open: updates come on it
    return state


def test_a_second_scheduler_under_a_live_id_is_refused_and_changes_nothing() -> None:
    clock = FakeClock()
    state = _two_ids_state(clock)
    clock.advance(0.5)
    events = len(state.events)

    with pytest.raises(AlreadyExists) as refused:
        state.register("sa", "10.0.0.9:7100", "10.0.0.9:7101", Capacity(8, 2048, 0), pid=99, hostname="mb")

    message = str(refused.value)
    assert "'sa'" in message and "10.0.0.1:7000" in message and "pid 11" in message
    assert "--scheduler-id" in message and "<state>/scheduler_id" in message
    sched = state.schedulers["sa"]
    assert (sched.address, sched.pid, sched.capacity, sched.state) == (
        "10.0.0.1:7000",
        11,
        Capacity(4, 1024, 1),
        ALIVE,
    )
    assert [e.kind for e in state.events][events:] == ["scheduler_refused"]
    assert state.health("sa", 2, [])  # the scheduler that holds the id goes on as before


def test_the_same_scheduler_registering_again_is_taken() -> None:
    # After a NACK or a broken stream, from the same address: no refusal.
    clock = FakeClock()
    state = _two_ids_state(clock)
    state.register("sa", "10.0.0.1:7000", "10.0.0.1:7001", Capacity(4, 1024, 1), pid=11, hostname="ma")
    assert state.schedulers["sa"].state == ALIVE


def test_a_restarted_scheduler_is_taken_once_its_old_stream_ended() -> None:
    # kill -9 and started again on another port: the old process's connection closed.
    clock = FakeClock()
    state = _two_ids_state(clock)
    state.stream_ended("sa", clock.now())
    clock.advance(0.5)
    state.register("sa", "10.0.0.1:7200", "10.0.0.1:7201", Capacity(4, 1024, 1), pid=12, hostname="ma")
    assert (state.schedulers["sa"].address, state.schedulers["sa"].pid) == ("10.0.0.1:7200", 12)


def test_with_the_stream_end_grace_off_a_restarted_scheduler_is_still_taken() -> None:
    # dead_after_stream_end_s 0: a stream's end no longer hastens a death, but it still
    # says the old process is gone.
    clock = FakeClock()
    state = ClusterState(clock=clock, dead_after_s=5.0, stream_end_grace_s=0)
    state.register("sa", "10.0.0.1:7000", "10.0.0.1:7001", Capacity(4, 1024, 1), pid=11)
    assert state.health("sa", 1, [])
    state.stream_ended("sa", clock.now())
    assert state.dies_at(state.schedulers["sa"]) == clock.now() + 5.0  # not hastened
    state.register("sa", "10.0.0.1:7200", "10.0.0.1:7201", Capacity(4, 1024, 1), pid=12)
    assert state.schedulers["sa"].pid == 12


def test_a_scheduler_silent_past_dead_after_s_or_dead_gives_up_its_id() -> None:
    clock = FakeClock()
    state = _two_ids_state(clock)
    clock.advance(5.5)  # silent past dead_after_s, not yet marked DEAD by a reconcile pass
    state.register("sa", "10.0.0.2:7000", "10.0.0.2:7001", Capacity(4, 1024, 1), pid=21)
    assert state.schedulers["sa"].address == "10.0.0.2:7000"

    clock.advance(6)
    assert state.expire() == ["sa"]
    state.register("sa", "10.0.0.3:7000", "10.0.0.3:7001", Capacity(4, 1024, 1), pid=31)
    assert (state.schedulers["sa"].address, state.schedulers["sa"].state) == ("10.0.0.3:7000", ALIVE)


async def test_the_head_refuses_a_second_scheduler_under_a_live_id(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    head = HeadNode(Settings(dead_after_s=5), store, fleet, clock)

    def reg(address: str, pid: int) -> SchedulerRegistration:
        return SchedulerRegistration(
            "sa", address, address + "1", Capacity(4, 1024, 0), pid=pid, hostname="h", replicas=()
        )

    try:
        await head.register_scheduler(reg("a:7000", 11))
        assert await head.scheduler_health("sa", 1, [], waited_s=0.0)
        with pytest.raises(AlreadyExists, match="in use by a live scheduler at a:7000 \\(pid 11"):
            await head.register_scheduler(reg("b:7000", 99))
        [shown] = cluster_status(head)["schedulers"]
        assert (shown["address"], shown["pid"], shown["state"]) == ("a:7000", 11, ALIVE)

        head.health_stream_ended("sa", clock.now())  # the first one exits
        await head.register_scheduler(reg("b:7000", 99))
        [shown] = cluster_status(head)["schedulers"]
        assert (shown["address"], shown["pid"]) == ("b:7000", 99)
    finally:
        await head.aclose()


def test_a_registration_naming_a_live_schedulers_address_from_another_host_is_refused() -> None:
    # The address is the scheduler's own claim: a process holding the shared scheduler
    # certificate named it from another machine and took the live scheduler's id (and
    # with it the head's view of its replicas, and its blob claims). The same host, or a
    # loopback one for a loopback registration, is the scheduler registering again.
    clock = FakeClock()
    state = ClusterState(clock=clock, dead_after_s=5.0, stream_end_grace_s=3.0)
    capacity = Capacity(4, 1024, 1)
    state.register("sa", "10.0.0.1:7000", "10.0.0.1:7001", capacity, pid=11, peer="10.0.0.1")
    assert state.health("sa", 1, [])
    with pytest.raises(AlreadyExists):
        state.register("sa", "10.0.0.1:7000", "10.0.0.1:7001", capacity, pid=99, peer="10.0.0.9")
    assert (state.schedulers["sa"].pid, state.schedulers["sa"].peer) == (11, "10.0.0.1")
    state.register("sa", "10.0.0.1:7000", "10.0.0.1:7001", capacity, pid=11, peer="10.0.0.1")
    state.register("sb", "127.0.0.1:7000", "127.0.0.1:7001", capacity, pid=12, peer="127.0.0.1")
    assert state.health("sb", 1, [])
    state.register("sb", "127.0.0.1:7000", "127.0.0.1:7001", capacity, pid=12, peer="::1")
    assert state.schedulers["sb"].state == ALIVE

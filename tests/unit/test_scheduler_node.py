"""SchedulerNode over fakes: the head is a FakeHeadLink, replica processes come from a
FakeLauncher, replicas answer through FakeReplicas, time is a FakeClock. What the head
hears when a replica dies, and that it hears it even when a health call fails or the
head NACKs and the scheduler registers again."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.spec import parse_spec
from shoal.errors import AlreadyExists, InvalidArgument, PermissionDenied, ShoalError
from shoal.proto import shoal_pb2 as pb
from shoal.scheduler.node import SchedulerNode
from shoal.testing.fakes import FakeHeadLink, FakeLauncher, FakeReplicas
from shoal.testing.wait import until
from shoal.types import RoutingTable, SchedulerRegistration

pytestmark = pytest.mark.timeout(10)

SPEC = parse_spec({"name": "echo", "backend": "python", "model": "m.py"})


@dataclass
class Harness:
    node: SchedulerNode
    head: FakeHeadLink
    launcher: FakeLauncher
    clock: FakeClock

    async def ready(self, rid: str) -> None:
        await self.node.supervisor.create(rid, SPEC)
        assert await self.node.supervisor.register(rid, f"{rid}:9000", self.launcher.process(rid).pid)


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    settings = Settings(
        state_dir=str(tmp_path),
        cpus=2,
        memory_mb=1024,
        gpus=0,
        ingress_workers=1,
        heartbeat_interval_s=1.0,
    )
    head = FakeHeadLink(interval_s=1.0)
    launcher = FakeLauncher()
    clock = FakeClock()
    node = SchedulerNode(settings, "s1", head, FakeReplicas(), launcher=launcher, clock=clock)
    node.start("s1:7000", "s1:7001")
    await head.wait_until(lambda hd: bool(hd.acked))
    yield Harness(node, head, launcher, clock)
    await node.aclose(0)


async def test_the_scheduler_registers_and_reports_its_replicas(h: Harness) -> None:
    [reg] = h.head.registrations
    assert (reg.scheduler_id, reg.address, reg.http_address) == ("s1", "s1:7000", "s1:7001")
    assert reg.capacity.cpus == 2

    await h.ready("echo-1")

    # A change is reported at once, not at the next heartbeat.
    await h.head.wait_until(
        lambda hd: any(r.id == "echo-1" and r.state == "READY" for r in hd.acked[-1].replicas)
    )


async def test_the_scheduler_says_the_first_table_after_registering_at_once_and_later_ones_when_asked(
    h: Harness,
) -> None:
    """It registers saying it will say which table it routes by, so the head waits for its
    word from then on: the first table after registering is said at once, not at the next
    heartbeat; a later one only when it carries ``ack`` (a control call waits on it)."""
    [reg] = h.head.registrations
    assert reg.says_routes
    h.head.push_table(RoutingTable(version=1))
    await h.head.wait_until(lambda hd: hd.health_calls[-1].routes_version == 1)
    calls = len(h.head.health_calls)
    h.head.push_table(RoutingTable(version=2))
    await asyncio.sleep(0.05)
    assert len(h.head.health_calls) == calls  # said with the next heartbeat (the clock stands)
    h.head.push_table(RoutingTable(version=3, ack=True))
    await h.head.wait_until(lambda hd: hd.health_calls[-1].routes_version == 3)


async def test_the_head_hears_at_once_why_a_replica_died(h: Harness) -> None:
    await h.ready("echo-1")

    h.launcher.process("echo-1").exit(1, "RuntimeError: CUDA out of memory\n")

    await h.head.wait_until(lambda hd: "echo-1" in hd.exit_reasons())
    assert h.head.exit_reasons()["echo-1"] == "process exited with code 1: RuntimeError: CUDA out of memory"
    dead = [r for r in h.head.acked[-1].replicas if r.id == "echo-1"]
    assert [r.state for r in dead] == ["DEAD"]


async def test_an_exit_reason_is_reported_until_the_head_acknowledges_it(h: Harness) -> None:
    await h.ready("echo-1")
    acked_before = len(h.head.acked)

    h.head.fail()  # the head is unreachable when the replica dies
    h.launcher.process("echo-1").exit(-signal.SIGKILL)
    await h.head.wait_until(lambda hd: any(c.answer == "error" for c in hd.health_calls))
    assert len(h.head.acked) == acked_before
    # The next reports (after a backoff, and a registration) carry it again.
    h.head.recover()
    await h.clock.wait_for_sleepers(2)  # the head link's backoff, and the pings
    h.clock.advance(1.0)

    await h.head.wait_until(lambda hd: "echo-1" in hd.exit_reasons())
    assert h.head.exit_reasons()["echo-1"] == "process killed by SIGKILL"
    assert len(h.head.registrations) == 2
    # Acknowledged, it is not reported again.
    await h.clock.wait_for_sleepers(2)  # the heartbeat, and the pings
    h.clock.advance(1.0)
    count = len(h.head.acked)
    await h.head.wait_until(lambda hd: len(hd.acked) > count)
    assert all(r.id != "echo-1" for r in h.head.acked[-1].replicas)


async def test_after_a_nack_the_scheduler_registers_again_and_still_reports_the_death(h: Harness) -> None:
    await h.ready("echo-1")
    await h.ready("echo-2")
    h.head.nack = True  # say the head restarted and does not know this scheduler

    h.launcher.process("echo-1").exit(2)
    await h.head.wait_until(lambda hd: hd.health_calls[-1].answer == "nack")
    h.head.nack = False

    await h.head.wait_until(lambda hd: "echo-1" in hd.exit_reasons())
    reg = h.head.registrations[-1]
    assert len(h.head.registrations) == 2
    assert [r.id for r in reg.replicas] == ["echo-2"]  # running replicas only
    assert h.head.exit_reasons()["echo-1"] == "process exited with code 2"


def test_health_updates_carry_no_allocation() -> None:
    # The head computes allocations from the replicas it placed; the field is retired.
    assert "allocated" not in pb.SchedulerHealth.DESCRIPTOR.fields_by_name


async def test_closing_tells_the_head_the_replicas_stopped(tmp_path: Path) -> None:
    head = FakeHeadLink()
    launcher = FakeLauncher()
    settings = Settings(state_dir=str(tmp_path), cpus=1, memory_mb=512, gpus=0, ingress_workers=1)
    node = SchedulerNode(settings, "s1", head, FakeReplicas(), launcher=launcher, clock=FakeClock())
    node.start("s1:7000", "s1:7001")
    await head.wait_until(lambda hd: bool(hd.acked))
    await node.supervisor.create("echo-1", SPEC)

    await node.aclose(0)

    assert launcher.process("echo-1").signals == [signal.SIGTERM]
    assert head.exit_reasons() == {"echo-1": "stopped"}
    assert head.closed


async def test_a_scheduler_whose_id_the_head_refuses_twice_stops_trying(tmp_path: Path) -> None:
    # Another live scheduler holds the id: one more try after dead_after_s + 1 (the holder
    # may be this scheduler's killed predecessor), then no more, no health update (not even
    # the last one at close: it would be taken for the other's), and the process is told to stop.
    attempts: list[SchedulerRegistration] = []

    class RefusingHead(FakeHeadLink):
        async def register(self, reg: SchedulerRegistration) -> float:
            attempts.append(reg)
            raise AlreadyExists("scheduler id 's1' is in use by a live scheduler at s1:9000 (pid 7)")

    head = RefusingHead()
    settings = Settings(state_dir=str(tmp_path), cpus=1, memory_mb=512, gpus=0, ingress_workers=1)
    clock = FakeClock()
    node = SchedulerNode(settings, "s1", head, FakeReplicas(), launcher=FakeLauncher(), clock=clock)
    told: list[str] = []
    node.on_refused = lambda: told.append("stop")
    node.start("s1:7000", "s1:7001")
    try:
        await until(lambda: len(attempts) == 1)
        await asyncio.sleep(0.05)
        assert node.refused is None and told == []  # not yet: it tries once more
        clock.advance(settings.dead_after_s + 1.0)
        await until(lambda: node.refused is not None)
        assert told == ["stop"]
        assert node.refused is not None and "in use by a live scheduler at s1:9000" in str(node.refused)
        assert str(tmp_path / "scheduler_id") in str(node.refused)  # where its id came from
        assert not node.registered.is_set()
        # Time passes (backoffs, heartbeats would come due): no second attempt.
        for _ in range(5):
            clock.advance(1.0)
            await asyncio.sleep(0.01)
    finally:
        await node.aclose(0)
    assert len(attempts) == 2
    assert head.health_calls == []


async def test_a_restarted_scheduler_refused_while_its_predecessor_dies_is_taken_next_try(
    tmp_path: Path,
) -> None:
    """kill -9 and an immediate restart on a loaded machine: the head had not yet seen the
    old process's stream end and refused the id; the scheduler exited for good (CI saw
    tests/integration/test_scheduler_restart.py fail so). Now it tries once more, after the
    head has had time to declare the old one dead."""
    attempts: list[SchedulerRegistration] = []

    class DyingHolderHead(FakeHeadLink):
        async def register(self, reg: SchedulerRegistration) -> float:
            attempts.append(reg)
            if len(attempts) == 1:
                raise AlreadyExists("scheduler id 's1' is in use by a live scheduler at s1:9000 (pid 7)")
            return await super().register(reg)

    head = DyingHolderHead()
    settings = Settings(state_dir=str(tmp_path), cpus=1, memory_mb=512, gpus=0, ingress_workers=1)
    clock = FakeClock()
    node = SchedulerNode(settings, "s1", head, FakeReplicas(), launcher=FakeLauncher(), clock=clock)
    node.start("s1:7000", "s1:7001")
    try:
        await until(lambda: len(attempts) == 1)
        clock.advance(settings.dead_after_s + 1.0)
        await until(lambda: node.registered.is_set())
        assert node.refused is None and len(attempts) == 2
    finally:
        await node.aclose(0)


@pytest.mark.parametrize(
    "refusal",
    [
        PermissionDenied(
            "RegisterScheduler needs a scheduler's certificate; the caller presented a client's"
        ),
        InvalidArgument("replicas: 10001 reports, over the limit of 10000"),
    ],
)
async def test_a_registration_the_head_refuses_is_logged_once_and_tried_each_heartbeat(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, refusal: ShoalError
) -> None:
    """A head that refuses the registration itself (the wrong certificate in place, a report
    an older head does not take) was retried in silence for good: the scheduler served no
    one and said nothing. Now the head's reason is logged once, the call tried again each
    heartbeat (not the fast backoff of an unreachable head), and the recovery said once."""
    attempts: list[SchedulerRegistration] = []

    class CountingHead(FakeHeadLink):
        async def register(self, reg: SchedulerRegistration) -> float:
            attempts.append(reg)
            return await super().register(reg)

    head = CountingHead()
    head.fail(refusal)
    settings = Settings(
        state_dir=str(tmp_path), cpus=1, memory_mb=512, gpus=0, ingress_workers=1, heartbeat_interval_s=2.0
    )
    clock = FakeClock()
    node = SchedulerNode(settings, "s1", head, FakeReplicas(), launcher=FakeLauncher(), clock=clock)
    caplog.set_level("INFO", logger="shoal")
    node.start("s1:7000", "s1:7001")
    try:
        for _ in range(5):  # five heartbeats of refusals
            await asyncio.sleep(0.02)
            clock.advance(settings.heartbeat_interval_s)
        await asyncio.sleep(0.02)
        refused = [
            r
            for r in caplog.records
            if "the head refused this scheduler's registration or report: " in r.message
        ]
        assert len(refused) == 1, [r.message for r in caplog.records]
        assert refused[0].levelname == "ERROR"
        assert str(refusal) in refused[0].message
        assert refused[0].message.endswith("trying again every 2s")
        assert not node.registered.is_set()
        assert 5 <= len(attempts) <= 6  # one a heartbeat
        head.recover()
        clock.advance(settings.heartbeat_interval_s)
        await until(lambda: node.registered.is_set())
        assert any(
            "the head takes this scheduler's registration and reports now" in r.message
            for r in caplog.records
        )
    finally:
        await node.aclose(0)

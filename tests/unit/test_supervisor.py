"""ReplicaSupervisor over fakes: processes from a FakeLauncher, replicas from FakeReplicas,
time from a FakeClock. The replica-death path: a replica that exits or stops answering
pings is marked dead, cleaned out of the registry and the router, its pending requests are
retried once elsewhere, and its exit reason is kept for the head until acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from shoal.config import Settings
from shoal.core import payload
from shoal.core.clock import FakeClock
from shoal.core.cluster import ReplicaReport
from shoal.core.payload import Tensors
from shoal.core.spec import DeploymentSpec
from shoal.core.states import ReplicaState
from shoal.errors import ResourceExhausted, Unavailable
from shoal.scheduler.machine import Bound
from shoal.scheduler.router import Router
from shoal.scheduler.supervisor import ReplicaSupervisor
from shoal.testing.fakes import FakeLauncher, FakeReplicaClient, FakeReplicas
from tests.unit.conftest import make_spec

pytestmark = pytest.mark.timeout(10)


def x(value: float) -> Tensors:
    return payload.from_arrays({"x": np.array([value], dtype=np.float32)})


@dataclass
class Harness:
    supervisor: ReplicaSupervisor
    router: Router
    replicas: FakeReplicas
    launcher: FakeLauncher
    clock: FakeClock
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    oom_kills: list[int] = field(default_factory=lambda: [0])  # what the kernel counts

    async def start(self, rid: str, spec: DeploymentSpec | None = None, *, ready: bool = True) -> None:
        """Create replica ``rid``; with ``ready``, it registers at ``rid:9000``."""
        await self.supervisor.create(rid, spec or make_spec())
        if ready:
            assert await self.supervisor.register(rid, f"{rid}:9000", self.launcher.process(rid).pid)

    def ended(self, rid: str) -> ReplicaReport | None:
        _, reports = self.supervisor.reports()
        return next((r for r in reports if r.id == rid and r.state in ("DEAD", "STOPPED")), None)

    async def wait_ended(self, rid: str) -> ReplicaReport:
        """Wait until the supervisor has cleaned ``rid`` out (its last step tells ``on_change``)."""
        async with asyncio.timeout(2.0):
            while True:
                self.changed.clear()
                tomb = self.ended(rid)
                routed = [h.replica_id for h in self.router.handles("echo")]
                if tomb is not None and rid not in self.supervisor.registry and rid not in routed:
                    return tomb
                await self.changed.wait()

    async def tick(self, seconds: float) -> None:
        """Move the clock on and wait until the ping loop sleeps again."""
        await self.clock.wait_for_sleepers(1)
        self.clock.advance(seconds)
        await self.clock.wait_for_sleepers(1)


@contextlib.asynccontextmanager
async def harness(tmp_path: Path, *, max_starts: int = 0, max_replicas: int = 0) -> AsyncIterator[Harness]:
    settings = Settings(ping_interval_s=1.0, shutdown_grace_s=5.0)
    replicas = FakeReplicas()
    clock = FakeClock()
    router = Router("s1", settings, replicas, clock=clock)
    launcher = FakeLauncher()
    changed = asyncio.Event()
    oom_kills = [0]
    supervisor = ReplicaSupervisor(
        settings,
        router,
        replicas,
        log_dir=tmp_path / "logs",
        scheduler_address=lambda: "s1:7000",
        on_change=changed.set,
        launcher=launcher,
        clock=clock,
        max_starts=max_starts,
        max_replicas=max_replicas,
        oom_kills=lambda: Bound(oom_kills[0], "cgroup /x memory.events"),
    )
    supervisor.start()
    try:
        yield Harness(supervisor, router, replicas, launcher, clock, changed, oom_kills)
    finally:
        await supervisor.aclose(0)
        await router.aclose()


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(tmp_path) as h:
        yield h


async def test_a_replica_is_started_as_python_m_shoal_replica_main_with_its_log(h: Harness) -> None:
    version = await h.supervisor.create("echo-1", make_spec())

    process = h.launcher.process("echo-1")
    assert process.argv[1:3] == ["-m", "shoal.replica_main"]
    assert process.argv[process.argv.index("--scheduler") + 1] == "s1:7000"
    assert process.log_path == h.supervisor.log_dir / "replica_echo-1.log"
    assert h.supervisor.reports() == (version, [h.supervisor.registry["echo-1"].report()])
    assert h.supervisor.registry["echo-1"].state == "STARTING"


async def test_a_replica_that_exits_is_dead_with_the_reason_from_its_log(h: Harness) -> None:
    await h.start("echo-1")
    assert h.router.ready_count("echo") == 1

    h.launcher.process("echo-1").exit(1, "Traceback ...\nValueError: no weights\n")
    tomb = await h.wait_ended("echo-1")

    assert tomb.state == "DEAD"
    assert tomb.message == "process exited with code 1: ValueError: no weights"
    assert tomb.crashed  # of its own doing: the head backs its deployment off
    assert h.router.ready_count("echo") == 0
    assert h.supervisor.deaths["echo"] == 1


async def test_a_model_that_fails_to_load_reads_as_shoals_other_errors(h: Harness) -> None:
    await h.start("echo-1", ready=False)
    traceback = (
        "Traceback (most recent call last):\n"
        '  File "shoal/backends/python.py", line 119, in _load\n'
        "shoal.errors.InvalidArgument: Bad(**options) raised ValueError: no weights\n"
    )

    h.launcher.process("echo-1").exit(1, traceback)

    # Before: "... code 1: shoal.errors.InvalidArgument: Bad(**options) raised ValueError: ..."
    tomb = await h.wait_ended("echo-1")
    assert tomb.message == "process exited with code 1: Bad(**options) raised ValueError: no weights"


async def test_a_replica_killed_by_a_signal_says_which(h: Harness) -> None:
    await h.start("echo-1")

    h.launcher.process("echo-1").exit(-signal.SIGKILL)

    tomb = await h.wait_ended("echo-1")
    assert tomb.message == "process killed by SIGKILL"
    assert not tomb.crashed  # kill -9: from outside, replaced at once


async def test_a_replica_killed_by_the_oom_killer_says_so_and_crashed(h: Harness) -> None:
    # Before, an OOM kill read as any SIGKILL, no crash: a model the kernel took again and
    # again was restarted at once, for ever.
    await h.start("echo-1")
    await h.start("echo-2")

    h.oom_kills[0] += 1  # the kernel counts its kill, then the SIGKILL lands
    h.launcher.process("echo-1").exit(-signal.SIGKILL)
    tomb = await h.wait_ended("echo-1")
    assert tomb.message == (
        "process killed by the kernel's OOM killer (SIGKILL; counted in cgroup /x memory.events)"
    )
    assert tomb.crashed
    # One kill counted, one replica: a kill -9 after it is an operator's.
    h.launcher.process("echo-2").exit(-signal.SIGKILL)
    tomb = await h.wait_ended("echo-2")
    assert (tomb.message, tomb.crashed) == ("process killed by SIGKILL", False)


async def test_an_oom_kill_of_another_process_is_not_a_later_kill_9s(h: Harness) -> None:
    await h.start("echo-1")
    h.oom_kills[0] += 1  # the OOM killer took some other process of the group
    await h.tick(1.0)
    await h.tick(1.0)  # no replica died of it by the next ping: not a replica's

    h.launcher.process("echo-1").exit(-signal.SIGKILL)

    tomb = await h.wait_ended("echo-1")
    assert (tomb.message, tomb.crashed) == ("process killed by SIGKILL", False)


@pytest.mark.parametrize(
    ("code", "crashed"),
    [(3, True), (-signal.SIGSEGV, True), (-signal.SIGABRT, True), (0, False), (-signal.SIGTERM, False)],
)
async def test_a_replica_that_dies_unasked_crashed_unless_killed_from_outside(
    h: Harness, code: int, crashed: bool
) -> None:
    await h.start("echo-1")

    h.launcher.process("echo-1").exit(code)

    assert (await h.wait_ended("echo-1")).crashed is crashed


async def test_a_replica_whose_model_exits_with_status_0_crashed(h: Harness) -> None:
    """Status 0 without the replica's stopping file: the model's ``os._exit(0)``, not the
    replica stopping (asked to, NACKed, orphaned). Before, it was no crash: restarted at
    once, for ever."""
    await h.start("echo-1")

    h.launcher.process("echo-1").exit(0, by_its_model=True)

    tomb = await h.wait_ended("echo-1")
    assert tomb.crashed
    assert tomb.message == "process exited with code 0 without being asked to stop"


@pytest.mark.parametrize(("code", "state"), [(0, "STOPPED"), (3, "DEAD"), (-signal.SIGSEGV, "DEAD")])
async def test_a_replica_that_stops_of_itself_as_its_scheduler_shuts_down_stopped(
    h: Harness, code: int, state: str
) -> None:
    """SIGTERM to every process of the service at once (``systemctl stop``): the replica
    drains and exits 0 as the scheduler shuts down. That is a stop, not a death (it was
    logged as one, and counted); a crash then is still a crash."""
    await h.start("echo-1")
    h.supervisor.stop_creating()

    h.launcher.process("echo-1").exit(code)

    tomb = await h.wait_ended("echo-1")
    assert (tomb.state, tomb.crashed) == (ReplicaState[state], code != 0)
    assert h.supervisor.deaths["echo"] == (code != 0)


async def test_a_request_on_a_replica_that_dies_is_retried_once_on_another(h: Harness) -> None:
    await h.start("a")
    await h.start("b")
    a, b = h.replicas.client("a:9000"), h.replicas.client("b:9000")
    a.gate = asyncio.Event()  # a never answers: it dies with the request on it
    b.gate = asyncio.Event()
    request = asyncio.create_task(h.router.send("echo", x(7), request_id="req-7"))
    holder = await _first_to_receive(a, b)
    other = b if holder is a else a
    assert other.gate is not None
    other.gate.set()

    h.launcher.process(holder.address.split(":")[0]).exit(-signal.SIGKILL)
    outputs, served_by = await request

    assert served_by == other.address.split(":")[0]
    assert float(payload.to_arrays(outputs)["x"][0]) == 7.0
    assert [c.request_id for c in a.requests] + [c.request_id for c in b.requests] == ["req-7", "req-7"]
    await h.wait_ended(holder.address.split(":")[0])


async def test_a_request_that_kills_two_replicas_fails_once_saying_so(h: Harness) -> None:
    await h.start("a")
    await h.start("b")
    a, b = h.replicas.client("a:9000"), h.replicas.client("b:9000")
    a.gate, b.gate = asyncio.Event(), asyncio.Event()
    request = asyncio.create_task(h.router.send("echo", x(1), request_id="qod"))

    first = await _first_to_receive(a, b)
    second = b if first is a else a
    for holder in (first, second):
        await holder.wait_for_requests(1)
        rid = holder.address.split(":")[0]
        h.launcher.process(rid).exit(-signal.SIGKILL)
        await h.wait_ended(rid)

    with pytest.raises(Unavailable, match="2 replica\\(s\\) failed while serving it"):
        await request
    assert len(a.requests) == len(b.requests) == 1
    assert h.router.stats()["echo"].given_up == 1


async def test_missed_pings_mark_a_replica_dead_kill_it_and_clean_it_out(h: Harness) -> None:
    await h.start("echo-1", make_spec(health={"ping_failures": 3}))
    client = h.replicas.client("echo-1:9000")
    client.fail()  # hangs or unreachable: pings fail

    await h.tick(1.0)
    await h.tick(1.0)
    assert h.launcher.process("echo-1").signals == []
    assert h.router.ready_count("echo") == 1
    await h.tick(1.0)

    tomb = await h.wait_ended("echo-1")
    assert h.launcher.process("echo-1").signals == [signal.SIGKILL]
    assert tomb.state == "DEAD"
    assert tomb.message == "failed 3 pings in a row"
    assert not tomb.crashed  # a busy machine can miss pings: not the model's crash
    assert client.closed


async def test_a_ping_that_succeeds_again_resets_the_count(h: Harness) -> None:
    await h.start("echo-1", make_spec(health={"ping_failures": 2}))
    client = h.replicas.client("echo-1:9000")

    client.fail()
    await h.tick(1.0)
    client.recover()
    await h.tick(1.0)
    client.fail()
    await h.tick(1.0)

    assert h.supervisor.registry["echo-1"].ping_failures == 1
    assert h.launcher.process("echo-1").signals == []


async def test_a_replica_not_ready_in_time_is_killed(h: Harness) -> None:
    await h.start("echo-1", make_spec(health={"start_timeout_s": 3}), ready=False)

    await h.tick(3.0)
    assert h.launcher.process("echo-1").signals == []
    await h.tick(1.0)

    assert (await h.wait_ended("echo-1")).message == "not ready after 3s"
    # Too late now: the scheduler no longer knows it (NACK), so it shuts itself down.
    assert not await h.supervisor.register("echo-1", "echo-1:9000", 1)


async def test_starts_past_max_concurrent_starts_wait_queued_and_start_in_turn(tmp_path: Path) -> None:
    # Before, a deploy of 50 replicas started 50 processes loading at once on 2 CPUs.
    spec = make_spec(health={"start_timeout_s": 3})
    async with harness(tmp_path, max_starts=2) as h:
        for rid in ("a", "b", "c", "d"):
            await h.supervisor.create(rid, spec)
        await asyncio.sleep(0)  # the queued ones' tasks reach their wait

        assert sorted(h.launcher.processes) == ["a", "b"]
        states = {r.id: (r.state, r.message) for r in h.supervisor.reports()[1]}
        assert states["d"] == (
            "QUEUED",
            "waiting to start: this scheduler starts 2 at a time (max_concurrent_starts), "
            "1 more waiting ahead of it",
        )
        # Waiting does not count toward start_timeout_s: only a and b time out.
        await h.tick(4.0)
        await h.wait_ended("a")
        await h.wait_ended("b")
        async with asyncio.timeout(2):
            while sorted(h.launcher.processes) != ["a", "b", "c", "d"]:
                await asyncio.sleep(0)
        assert {r.id: r.state for r in h.supervisor.reports()[1]}["c"] == "STARTING"
        # A slot frees once a starting replica is READY; a queued one removed never starts.
        await h.supervisor.create("e", spec)
        await h.supervisor.create("f", spec)
        assert await h.supervisor.remove("e", graceful=True)
        assert (await h.wait_ended("e")).state == "STOPPED"
        assert await h.supervisor.register("c", "c:9000", h.launcher.process("c").pid)
        async with asyncio.timeout(2):
            while "f" not in h.launcher.processes:
                await asyncio.sleep(0)
        assert "e" not in h.launcher.processes


async def test_a_create_past_max_replicas_is_refused_by_the_scheduler_itself(tmp_path: Path) -> None:
    # The head places within each scheduler's max_replicas, but the scheduler took any
    # create it was sent: a head with an older view (or a client speaking its API) could
    # start past the bound. Replicas that ended free their place.
    async with harness(tmp_path, max_replicas=2) as h:
        await h.supervisor.create("a", make_spec())
        await h.supervisor.create("b", make_spec())
        with pytest.raises(
            ResourceExhausted, match=r"refused: this scheduler runs 2 replicas, its max_replicas \(2\)"
        ):
            await h.supervisor.create("c", make_spec())
        assert "c" not in h.supervisor.registry and "c" not in h.launcher.processes
        assert await h.supervisor.remove("a", graceful=False)
        await h.wait_ended("a")
        await h.supervisor.create("c", make_spec())
        assert sorted(h.supervisor.registry) == ["b", "c"]


async def test_unknown_replicas_are_nacked(h: Harness) -> None:
    # A replica left from an earlier scheduler (an orphan) registers or reports health here.
    assert not await h.supervisor.register("stray-1", "stray:9000", 1)
    assert not await h.supervisor.health("stray-1", "READY", 0, 0)
    await h.start("echo-1")
    assert await h.supervisor.health("echo-1", "READY", 2, 1)
    assert h.supervisor.registry["echo-1"].in_flight == 2


async def test_a_removed_replica_drains_and_is_reported_stopped(h: Harness) -> None:
    await h.start("echo-1")
    client = h.replicas.client("echo-1:9000")

    assert await h.supervisor.remove("echo-1", graceful=True)
    assert h.router.ready_count("echo") == 0  # no new requests while it drains
    await h.clock.wait_for_sleepers(2)  # the ping loop, and the stop waiting for the exit
    assert client.drains == [5.0]
    h.launcher.process("echo-1").exit(0)

    tomb = await h.wait_ended("echo-1")
    assert (tomb.state, tomb.message) == ("STOPPED", "stopped")
    assert h.supervisor.deaths["echo"] == 0


async def test_a_replica_that_ignores_sigterm_is_killed_after_the_grace(h: Harness) -> None:
    await h.start("echo-1")
    process = h.launcher.process("echo-1")
    process.stubborn = True

    await h.supervisor.remove("echo-1", graceful=False)
    await h.clock.wait_for_sleepers(2)  # the ping loop, and the stop waiting for the exit
    assert process.signals == [signal.SIGTERM]
    h.clock.advance(2.0)

    await h.wait_ended("echo-1")
    assert process.signals == [signal.SIGTERM, signal.SIGKILL]


async def test_exit_reasons_stay_until_the_head_acknowledges_them(h: Harness) -> None:
    await h.start("a")
    await h.start("b")
    h.launcher.process("a").exit(3)
    await h.wait_ended("a")

    version, first = h.supervisor.reports()
    # A failed health call acknowledges nothing: the next report carries it again.
    assert h.supervisor.reports() == (version, first)
    h.launcher.process("b").exit(4)
    await h.wait_ended("b")
    h.supervisor.acknowledge(version)  # the head took the first report, not the second

    _, reports = h.supervisor.reports()
    assert [r.id for r in reports] == ["b"]
    assert reports[0].message == "process exited with code 4"


async def _first_to_receive(*clients: FakeReplicaClient) -> FakeReplicaClient:
    """The first of ``clients`` to receive a request."""
    waits = {asyncio.ensure_future(c.wait_for_requests(1)): c for c in clients}
    done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return waits[next(iter(done))]


async def test_one_memory_check_walks_the_process_table_once_for_all_replicas(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, each replica held to a ``memory_mb`` had the whole process table read to find
    its children: 0.76 s of the scheduler's event loop every ping interval at 100 replicas."""
    held = make_spec(resources={"cpus": 0.1, "memory_mb": 2**20})
    for i in range(20):
        await h.start(f"echo-{i}", held)
    await h.start("small", make_spec(resources={"cpus": 0.1, "memory_mb": 1}))
    for process in h.launcher.processes.values():
        process.pid = os.getpid()  # a real process to measure (the fakes are not killed)
    walks: list[object] = []
    monkeypatch.setattr(psutil, "process_iter", counted(psutil.process_iter, walks))
    monkeypatch.setattr(psutil.Process, "children", counted(psutil.Process.children, walks))

    await h.tick(1.0)

    assert len(walks) == 1
    tomb = await h.wait_ended("small")
    assert tomb.message.endswith("over its limit of 1 MB (resources.memory_mb)"), tomb.message
    assert all(f"echo-{i}" in h.supervisor.registry for i in range(20))


def counted(walk: Callable[..., Any], calls: list[object]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(walk)
        return walk(*args, **kwargs)

    return wrapper

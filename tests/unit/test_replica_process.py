"""ReplicaProcess without sockets: registration, NACK, orphaning, draining."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from shoal.config import Settings
from shoal.core.spec import parse_spec
from shoal.errors import DeadlineExceeded, Unavailable
from shoal.replica.process import ReplicaProcess
from shoal.testing.wait import until

MODEL = """
import asyncio
import numpy as np

class Slow:
    def __init__(self, delay_s=0.0):
        self.delay_s = delay_s

    async def predict(self, inputs):
        await asyncio.sleep(self.delay_s)
        return {"y": inputs["x"] * 2}
"""


class Link:
    """A scripted scheduler: answers registration and health updates as told."""

    def __init__(self, *, register_ack: bool = True, health: list[bool | Exception] | None = None) -> None:
        self.register_ack = register_ack
        self.health_answers = list(health or [])
        self.health_calls = 0

    async def register(self, replica_id: str, address: str, pid: int) -> tuple[bool, float]:
        return self.register_ack, 0.01

    async def health(self, replica_id: str, state: str, in_flight: int, queued: int) -> bool:
        self.health_calls += 1
        answer = self.health_answers.pop(0) if self.health_answers else True
        if isinstance(answer, Exception):
            raise answer
        return answer


def make(tmp_path: Path, link: Link, delay_s: float = 0.0, **settings: float) -> ReplicaProcess:
    (tmp_path / "slow_model.py").write_text(MODEL)
    spec = parse_spec(
        {
            "name": "slow",
            "backend": "python",
            "model": "slow_model:Slow",
            "options": {"delay_s": delay_s},
            "base_dir": str(tmp_path),
            "timeout_s": 5,
        }
    )
    return ReplicaProcess("slow-000001", spec, Settings(**settings), link)  # type: ignore[arg-type]


async def test_nack_on_health_update_stops_the_replica(tmp_path: Path) -> None:
    link = Link(health=[True, True, False])
    replica = make(tmp_path, link)
    await replica.load()
    await asyncio.wait_for(replica.run("127.0.0.1:1", 1), 5)
    assert replica.exit_reason == "NACKed by the scheduler"
    assert link.health_calls == 3
    await replica.drain()
    assert replica.state == "STOPPED"


async def test_nack_at_registration_stops_before_serving(tmp_path: Path) -> None:
    replica = make(tmp_path, Link(register_ack=False))
    await replica.load()
    await asyncio.wait_for(replica.run("127.0.0.1:1", 1), 5)
    assert "NACK" in replica.exit_reason
    with pytest.raises(Unavailable):
        await replica.infer("r1", {"x": np.ones((1, 2), np.float32)}, 1.0)
    await replica.drain()


async def test_a_loaded_replica_serves_while_its_registration_is_answered(tmp_path: Path) -> None:
    """The scheduler routes to a replica once it accepts its registration; over the local
    hop that first request can overtake the acknowledgement, and must be served."""
    answered = asyncio.Event()

    class SlowAck(Link):
        async def register(self, replica_id: str, address: str, pid: int) -> tuple[bool, float]:
            await answered.wait()
            return True, 0.01

    replica = make(tmp_path, SlowAck())
    with pytest.raises(Unavailable):  # not loaded yet
        await replica.infer("r0", {"x": np.ones((1, 2), np.float32)}, 1.0)
    await replica.load()
    run = asyncio.create_task(replica.run("127.0.0.1:1", 1))
    await until(lambda: replica._registering, "the registration is on its way")
    out = await replica.infer("r1", {"x": np.ones((1, 2), np.float32)}, 1.0)
    np.testing.assert_array_equal(out["y"], np.full((1, 2), 2.0, np.float32))
    answered.set()
    await until(lambda: replica.state == "READY", "the replica is READY")
    replica.request_stop()
    await asyncio.wait_for(run, 5)
    await replica.drain()


async def test_orphaned_replica_stops_after_orphan_after(tmp_path: Path) -> None:
    link = Link(health=[Unavailable("scheduler gone")] * 1000)
    replica = make(tmp_path, link, orphan_after_s=0.2)
    await replica.load()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(replica.run("127.0.0.1:1", 1), 5)
    took = loop.time() - started
    assert "scheduler unreachable" in replica.exit_reason
    assert took >= 0.2  # it waited orphan_after_s before giving up
    await replica.drain()


async def test_a_passing_outage_shorter_than_orphan_after_is_survived(tmp_path: Path) -> None:
    link = Link(health=[Unavailable("blip"), Unavailable("blip"), True, False])
    replica = make(tmp_path, link, orphan_after_s=5)
    await replica.load()
    await asyncio.wait_for(replica.run("127.0.0.1:1", 1), 5)
    assert replica.exit_reason == "NACKed by the scheduler"  # not orphaned by the blips
    await replica.drain()


async def test_drain_finishes_in_flight_work(tmp_path: Path) -> None:
    replica = make(tmp_path, Link(), delay_s=0.2)
    await replica.load()
    runner = asyncio.create_task(replica.run("127.0.0.1:1", 1))
    await until(lambda: replica.state == "READY", "registration")
    request = asyncio.create_task(replica.infer("r1", {"x": np.ones((1, 2), np.float32)}, 5.0))
    await until(lambda: replica.in_flight == 1, "the request in flight")
    replica.request_stop(grace_s=5)
    await runner
    await replica.drain()
    out = await request
    np.testing.assert_array_equal(out["y"], np.full((1, 2), 2, np.float32))
    assert replica.state == "STOPPED"


async def test_timeout_answers_deadline_exceeded(tmp_path: Path) -> None:
    replica = make(tmp_path, Link(), delay_s=1.0)
    await replica.load()
    runner = asyncio.create_task(replica.run("127.0.0.1:1", 1))
    await until(lambda: replica.state == "READY", "registration")
    with pytest.raises(DeadlineExceeded, match=r"timed out after 0\.1s"):
        await replica.infer("r1", {"x": np.ones((1, 2), np.float32)}, 0.1)
    replica.request_stop(grace_s=0)
    await runner
    await replica.drain()

"""ReplicaProcess without sockets: registration, NACK, orphaning, draining."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from shoal.backends.base import INLINE_AFTER
from shoal.config import Settings
from shoal.core.spec import parse_spec
from shoal.errors import DeadlineExceeded, Internal, InvalidArgument, Unavailable
from shoal.proto import shoal_pb2 as pb
from shoal.replica.process import ReplicaProcess
from shoal.rpc import codec
from shoal.rpc.hop import HopClient, HopServer
from shoal.rpc.replica_service import ReplicaService
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


def make(
    tmp_path: Path, link: Link, delay_s: float = 0.0, batch: int = 1, **settings: float
) -> ReplicaProcess:
    (tmp_path / "slow_model.py").write_text(MODEL)
    spec = parse_spec(
        {
            "name": "slow",
            "backend": "python",
            "model": "slow_model:Slow",
            "options": {"delay_s": delay_s},
            "base_dir": str(tmp_path),
            "timeout_s": 5,
            "batching": {"max_batch_size": batch, "max_delay_ms": 5},
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


ROW = {"x": np.ones((1, 2), np.float32)}


async def ready(replica: ReplicaProcess) -> asyncio.Task[None]:
    await replica.load()
    runner = asyncio.create_task(replica.run("127.0.0.1:1", 1))
    await until(lambda: replica.state == "READY", "registration")
    return runner


async def stop(replica: ReplicaProcess, runner: asyncio.Task[None]) -> None:
    replica.request_stop(grace_s=0)
    await runner
    await replica.drain()


async def test_begin_answers_a_batched_request_as_infer_does(tmp_path: Path) -> None:
    """The local hop's path (no coroutine per request) gives the same answers and errors."""
    replica = make(tmp_path, Link(), batch=4)
    runner = await ready(replica)
    answers = await asyncio.gather(*(replica.begin(f"r{i}", ROW, 5.0) for i in range(6)))
    for out in answers:
        np.testing.assert_array_equal(out["y"], np.full((1, 2), 2.0, np.float32))
    assert replica.in_flight == 0
    assert replica.describe().requests == 6
    with pytest.raises(InvalidArgument, match="scalar"):
        await replica.begin("bad", {"x": np.float32(1.0)}, 5.0)  # type: ignore[dict-item]
    with pytest.raises(InvalidArgument, match="not multiplexed"):
        await replica.begin("bad", ROW, 5.0, "some-model")
    await stop(replica, runner)


async def test_begin_gives_up_a_queued_request_at_its_deadline_or_when_cancelled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A request given up while queued leaves the queue: its rows never run. The log names
    it either way (a cancelled one was not named: a composed call whose caller's deadline
    passed first left no line in the called replica's log)."""
    replica = make(tmp_path, Link(), delay_s=0.3, batch=4)
    runner = await ready(replica)
    assert replica.batcher is not None
    first = replica.begin("r1", ROW, 5.0)
    await until(lambda: replica.batcher is not None and replica.batcher.in_flight == 1, "the model busy")
    late = replica.begin("r2", ROW, 0.05)
    with pytest.raises(DeadlineExceeded, match=r"request r2 timed out after 0\.05s"):
        await late
    gone = replica.begin("r3", ROW, 5.0)
    assert replica.queued == 1
    with caplog.at_level("INFO", logger="shoal.replica"):
        gone.cancel()
        await asyncio.sleep(0)
    assert "request r3 was given up by its caller" in caplog.text
    assert replica.queued == 0
    assert replica.batcher.dropped == 2
    await first
    assert replica.in_flight == 0
    assert replica.describe().requests == 1  # only the first ran
    await stop(replica, runner)


async def test_a_cancelled_request_of_an_unbatched_replica_is_named_in_its_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    replica = make(tmp_path, Link(), delay_s=0.3)
    runner = await ready(replica)
    running = replica.begin("caller-7~1", ROW, 5.0)
    await until(lambda: replica.in_flight == 1, "the request running")
    with caplog.at_level("INFO", logger="shoal.replica"):
        running.cancel()
        await until(lambda: replica.in_flight == 0, "the request given up")
    assert "request caller-7~1 was given up by its caller" in caplog.text
    await stop(replica, runner)


STEPS_MODEL = """
import time

import shoal

class Steps:
    def __init__(self):
        self.steps = 0
        self.ended = None

    def predict(self, inputs):
        # Works in steps, as an encoder's passes do, and stops once nobody waits.
        for _ in range(200):
            if shoal.given_up():
                self.ended = "given up"
                raise RuntimeError("given up")
            time.sleep(0.01)
            self.steps += 1
        self.ended = "ran every step"
        return {"y": inputs["x"]}
"""


@pytest.mark.parametrize("batch", [1, 4])
async def test_a_model_call_sees_its_request_given_up_at_the_deadline(tmp_path: Path, batch: int) -> None:
    """A request whose deadline passed was not marked given up (only one its caller
    cancelled was), so a model that works in steps (the transformers encoder's passes of
    32 texts) ran every step for nobody: a request of 512 long texts with a 2 s deadline
    held its replica 13 s. With and without batching, the call now sees it at once."""
    (tmp_path / "steps_model.py").write_text(STEPS_MODEL)
    spec = parse_spec(
        {
            "name": "steps",
            "backend": "python",
            "model": "steps_model:Steps",
            "base_dir": str(tmp_path),
            "batching": {"max_batch_size": batch, "max_delay_ms": 1},
        }
    )
    replica = ReplicaProcess("steps-000001", spec, Settings(), Link())
    runner = await ready(replica)
    model = replica.backend._model  # type: ignore[union-attr]
    with pytest.raises(DeadlineExceeded, match=r"timed out after 0\.1s"):
        await replica.begin("r1", ROW, 0.1)
    await until(lambda: model.ended is not None, "the model call to end", timeout_s=10)
    assert model.ended == "given up", model.steps  # 200 steps of 10 ms, for nobody, before
    assert model.steps < 50
    await stop(replica, runner)


async def over_the_hop(replica: ReplicaProcess, path: Path) -> tuple[HopServer, HopClient]:
    """The replica's hop server (1 MiB frames, as the scheduler's side) and a client of it."""
    service = ReplicaService(replica)
    server = HopServer(path, service.outcome, 1 << 20, begin=service.begin)
    await server.start()
    return server, HopClient(path, "127.0.0.1:1", 1 << 20)


async def test_the_hop_answers_through_begin_and_a_lost_scheduler_drops_its_queued_requests(
    tmp_path: Path,
) -> None:
    replica = make(tmp_path, Link(), delay_s=0.3, batch=4)
    runner = await ready(replica)
    server, client = await over_the_hop(replica, tmp_path / "hop.sock")
    tensor = codec.encode(ROW)
    outcome = await client.push(pb.Task(request_id="r1", inputs=tensor, timeout_s=5.0), 5.0)
    np.testing.assert_array_equal(codec.decode(outcome.outputs)["y"], np.full((1, 2), 2.0, np.float32))
    bad = await client.push(
        pb.Task(request_id="r2", inputs=codec.encode({"x": ROW["x"][0, 0]}), timeout_s=5.0), 5.0
    )
    assert bad.error_code == "INVALID_ARGUMENT" and "scalar" in bad.error_message
    busy = asyncio.create_task(client.push(pb.Task(request_id="r3", inputs=tensor, timeout_s=5.0), 5.0))
    await until(lambda: replica.in_flight == 1 and replica.queued == 0, "r3 running")
    queued = asyncio.create_task(client.push(pb.Task(request_id="r4", inputs=tensor, timeout_s=5.0), 5.0))
    await until(lambda: replica.queued == 1, "r4 queued")
    await client.close()  # the scheduler went away
    for task in (busy, queued):
        with pytest.raises(Unavailable):
            await task
    await until(lambda: replica.queued == 0, "r4 out of the queue")
    await until(lambda: replica.in_flight == 0, "r3 finished or given up")
    # Only r1's model call answered: r3's was given up while it ran, r4 never ran (r2 was refused).
    assert replica.describe().requests == 1
    await server.stop()
    await stop(replica, runner)


GROW_MODEL = """
import numpy as np
class Grow:
    def predict(self, inputs):
        return {"y": np.repeat(inputs["x"], int(inputs["times"][0]), axis=1)}
"""


async def test_an_answer_too_big_for_a_message_fails_alone_and_the_connection_stays(tmp_path: Path) -> None:
    """A model answer over max_message_mb is that request's INVALID_ARGUMENT; before, the
    hop frame over the limit broke the connection, failing every request waiting on it."""
    (tmp_path / "grow_model.py").write_text(GROW_MODEL)
    spec = parse_spec(
        {"name": "grow", "backend": "python", "model": "grow_model:Grow", "base_dir": str(tmp_path)}
    )
    replica = ReplicaProcess("grow-000001", spec, Settings(max_message_mb=1), Link())
    runner = await ready(replica)
    server, client = await over_the_hop(replica, tmp_path / "hop.sock")
    x = np.ones((1, 100_000), np.float32)  # 400 KB in

    def task(request_id: str, times: int) -> pb.Task:
        inputs = codec.encode({"x": x, "times": np.array([times], np.int64)})
        return pb.Task(request_id=request_id, inputs=inputs, timeout_s=5.0)

    big, small = await asyncio.gather(client.push(task("big", 4), 5.0), client.push(task("small", 2), 5.0))
    assert big.error_code == "INVALID_ARGUMENT"
    assert "the answer holds 1600000 bytes of tensors, over the limit of 983040" in big.error_message
    assert not small.error_code and codec.decode(small.outputs)["y"].shape == (1, 200_000)
    again = await client.push(task("again", 1), 5.0)  # the same connection still answers
    assert not again.error_code
    assert len(server.connections) == 1
    await client.close()
    await server.stop()
    await stop(replica, runner)


SYNC_MODEL = """
class Echo:
    def predict(self, inputs):
        return {"y": inputs["x"] * 2}
"""


def batched(tmp_path: Path, name: str, source: str, cls: str, max_delay_ms: float) -> ReplicaProcess:
    """A replica of python model ``cls`` (defined in ``source``), batching up to 8 rows."""
    (tmp_path / f"{name}_model.py").write_text(source)
    spec = parse_spec(
        {
            "name": name,
            "backend": "python",
            "model": f"{name}_model:{cls}",
            "base_dir": str(tmp_path),
            "batching": {"max_batch_size": 8, "max_delay_ms": max_delay_ms},
        }
    )
    return ReplicaProcess(f"{name}-000001", spec, Settings(), Link())


async def test_a_lone_request_to_a_model_on_the_loop_is_answered_without_the_queue(tmp_path: Path) -> None:
    """Once a sync model's calls run on the event loop, a request that arrives alone at an
    idle replica is answered at once (ReplicaProcess.begin returns it done), counted as a
    batch of one; a bad one fails alone."""
    replica = batched(tmp_path, "echo", SYNC_MODEL, "Echo", max_delay_ms=5)
    runner = await ready(replica)
    for i in range(INLINE_AFTER + 1):  # short calls on the model thread first: then on the loop
        await replica.begin(f"warm{i}", ROW, 5.0)
    assert replica.backend is not None and replica.backend.predict_now(ROW) is not None
    before = replica.describe().batch_sizes.get(1, 0)
    answer = replica.begin("r1", ROW, 5.0)
    assert answer.done()
    np.testing.assert_array_equal(answer.result()["y"], np.full((1, 2), 2.0, np.float32))
    assert replica.describe().batch_sizes[1] == before + 1
    bad = replica.begin("r2", {"z": ROW["x"]}, 5.0)
    assert bad.done()
    with pytest.raises(Internal, match="KeyError"):
        bad.result()
    assert replica.in_flight == 0
    await stop(replica, runner)


ONE_AT_A_TIME = """
import asyncio

class Normalise:
    supports_batching = False

    async def predict(self, inputs):
        await asyncio.sleep(0.02)  # long enough for the others to queue behind it
        x = inputs["x"]
        return {"y": x / x.sum()}
"""


async def test_a_model_that_takes_one_request_at_a_time_never_sees_two(tmp_path: Path) -> None:
    """A model whose class says ``supports_batching = False``, deployed with batching: each
    request runs alone. Before, six concurrent requests of four equal values each were
    concatenated and each answered with its share of the six requests' sum (0.05 for the
    first), not 0.25."""
    replica = batched(tmp_path, "one", ONE_AT_A_TIME, "Normalise", max_delay_ms=50)
    runner = await ready(replica)
    xs = [{"x": np.full(4, i + 1, np.float32)} for i in range(6)]
    answers = await asyncio.gather(*(replica.infer(f"r{i}", x, 5.0) for i, x in enumerate(xs)))
    for answer in answers:
        np.testing.assert_allclose(answer["y"], np.full(4, 0.25, np.float32))
    assert replica.describe().batches == 6
    await stop(replica, runner)


LOUD_MODEL = """
class Loud:
    def predict(self, inputs):
        raise ValueError("boom " * 400_000)
"""


async def test_a_models_huge_error_message_is_cut_before_it_leaves_the_replica(tmp_path: Path) -> None:
    """Before, a model's 2 MB exception message went whole to the scheduler, and from there
    to a REST client as a 2,000,037-byte error body."""
    replica = batched(tmp_path, "loud", LOUD_MODEL, "Loud", max_delay_ms=5)
    runner = await ready(replica)
    task = pb.Task(request_id="r1", inputs=codec.encode(ROW), timeout_s=5.0)
    outcome = await ReplicaService(replica).outcome(task)
    assert outcome.error_code == "INTERNAL"
    assert outcome.error_message.startswith("model raised ValueError: boom boom")
    assert outcome.error_message.endswith("more characters)")
    assert len(outcome.error_message) <= 6000
    await stop(replica, runner)


def test_a_timeout_is_said_to_the_millisecond() -> None:
    # What a router sends is what is left of the client's timeout: "after 19.9999s" before.
    from shoal.replica.process import _timed_out

    assert str(_timed_out("r1", 19.99994)).endswith("request r1 timed out after 20s")
    assert "timed out after 0.05s (model id 'a' was still loading)" in str(
        _timed_out("r1", 0.05, " (model id 'a' was still loading)")
    )

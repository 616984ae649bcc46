"""Health updates on one stream per scheduler (``Head/StreamHealth``, issue 16).

In process: a real head (``HeadNode`` on a ``MemoryStore``, ``HeadService``) behind a real
gRPC server on 127.0.0.1 port 0, and a real ``SchedulerNode`` talking to it through
``GrpcHeadLink`` (its replica processes from a ``FakeLauncher``). Then real processes: a
killed head, restarted, hears the scheduler's stream again.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.cluster import ALIVE, DEAD
from shoal.core.spec import parse_spec
from shoal.errors import Unavailable
from shoal.head.leader import LeaderInfo, Leadership, LeaseBackend
from shoal.head.node import HeadNode
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.clients import GrpcHeadLink
from shoal.rpc.head_service import HeadService
from shoal.rpc.server import bind, new_server
from shoal.rpc.standby import LEADER_METADATA, StandbyInterceptor
from shoal.scheduler.node import SchedulerNode
from shoal.store import MemoryStore
from shoal.testing.cluster import ProcessCluster
from shoal.testing.fakes import FakeLauncher, FakeReplicas, FakeSchedulers
from shoal.testing.wait import until

pytestmark = pytest.mark.timeout(60)

SPEC = parse_spec({"name": "echo", "backend": "python", "model": "m.py"})
STREAM = "/shoal.v1.Head/StreamHealth"
UNARY = "/shoal.v1.Head/SendHealthUpdate"
REGISTER = "/shoal.v1.Head/RegisterScheduler"


class Calls(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """The methods called on the server, in order."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        self.methods.append(details.method)
        return await continuation(details)

    def count(self, method: str) -> int:
        return self.methods.count(method)


class BreakingHead(HeadService):
    """Ends the first health stream it serves UNAVAILABLE after ``after`` updates (a
    connection reset, a proxy restarting); later streams are served as usual."""

    def __init__(self, node: HeadNode, after: int) -> None:
        super().__init__(node)
        self.after = after
        self.broke = asyncio.Event()

    async def StreamHealth(self, requests: Any, context: Any) -> AsyncIterator[pb.HealthReply]:
        if self.broke.is_set():
            async for reply in super().StreamHealth(requests, context):
                yield reply
            return
        answered = 0
        async for reply in super().StreamHealth(requests, context):
            yield reply
            answered += 1
            if answered == self.after:
                self.broke.set()
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")


@asynccontextmanager
async def serving(servicer: pbg.HeadServicer | None, *interceptors: Any) -> AsyncIterator[str]:
    server = new_server(Settings(), list(interceptors))
    if servicer is not None:
        pbg.add_HeadServicer_to_server(servicer, server)
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def head_node(clock: FakeClock | None = None) -> HeadNode:
    # Schedulers heartbeat every 0.05 s (the head tells them at registration).
    return HeadNode(Settings(heartbeat_interval_s=0.05), MemoryStore(), FakeSchedulers(), clock)


@dataclass
class Scheduler:
    node: SchedulerNode
    link: GrpcHeadLink
    launcher: FakeLauncher = field(default_factory=FakeLauncher)

    async def ready(self, rid: str) -> None:
        await self.node.supervisor.create(rid, SPEC)
        assert await self.node.supervisor.register(rid, f"{rid}:9000", self.launcher.process(rid).pid)


@asynccontextmanager
async def scheduler(address: str, tmp_path: Path) -> AsyncIterator[Scheduler]:
    settings = Settings(
        state_dir=str(tmp_path), cpus=2, memory_mb=1024, gpus=0, ingress_workers=1, rpc_timeout_s=5
    )
    link = GrpcHeadLink(address, settings)
    launcher = FakeLauncher()
    node = SchedulerNode(settings, "s1", link, FakeReplicas(), launcher=launcher)
    node.start("s1:7000", "s1:7001")
    try:
        yield Scheduler(node, link, launcher)
    finally:
        await node.aclose(0)


def leader_named(err: grpc.aio.AioRpcError) -> str:
    """The leader a standby's refusal names in its trailing metadata."""
    return str(dict(cast(Any, err.trailing_metadata() or ()))[LEADER_METADATA])


def routed(head: HeadNode, rid: str) -> bool:
    dep = head.routes.deployments.get(SPEC.name)
    return dep is not None and any(r.replica_id == rid for r in dep.routes)


async def test_a_broken_stream_reconnects_and_the_replicas_stay_routed(tmp_path: Path) -> None:
    head = head_node()
    head.desired[SPEC.name] = SPEC
    calls = Calls()
    servicer = BreakingHead(head, after=5)
    async with serving(servicer, calls) as address, scheduler(address, tmp_path) as s:
        await s.ready("echo-1")
        await until(lambda: routed(head, "echo-1"), "the replica routed", 10)

        await asyncio.wait_for(servicer.broke.wait(), 10)
        # The scheduler opens a new stream; its replica stayed routed at the head throughout.
        await until(lambda: calls.count(STREAM) == 2, "a second health stream", 10)
        seen = head.state.schedulers["s1"].last_seen
        await until(lambda: head.state.schedulers["s1"].last_seen > seen, "updates on the new stream", 10)
        assert routed(head, "echo-1")
        assert head.state.schedulers["s1"].state == ALIVE
        assert s.node.router.ready_count(SPEC.name) == 1  # the scheduler routes to it too
    assert calls.count(UNARY) == 0  # every update went on a stream


async def test_a_head_that_does_not_know_the_scheduler_nacks_on_the_stream_and_it_registers_again(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    head = head_node(clock)
    calls = Calls()
    async with serving(HeadService(head), calls) as address, scheduler(address, tmp_path) as s:
        await until(lambda: "s1" in head.state.schedulers, "the scheduler registered", 10)
        # Silent (on the head's clock) past dead_after_s: declared dead, it is not known.
        clock.advance(head.settings.dead_after_s + 1)
        head.state.expire()
        assert head.state.schedulers["s1"].state == DEAD

        await until(lambda: calls.count(REGISTER) == 2, "a second registration", 10)
        await until(lambda: head.state.schedulers["s1"].state == ALIVE, "the scheduler alive again", 10)
        # The head takes it back when it reads the registration; the scheduler knows only
        # once the reply reaches it (asserted at once, this failed 1 run in 10 under -n 2).
        await until(s.node.registered.is_set, "the scheduler registered again", 10)
    assert calls.count(STREAM) == 1  # the NACK came on the stream, which stayed open
    assert calls.count(UNARY) == 0


async def test_a_standby_answers_the_stream_with_where_the_leader_is(tmp_path: Path) -> None:
    leader_head = head_node()
    standby = Leadership(cast(LeaseBackend, None), "leader", LeaderInfo("standby:1", "standby:2"), ttl_s=3)
    async with (
        serving(HeadService(leader_head)) as leader_address,
        serving(HeadService(head_node()), StandbyInterceptor(standby)) as standby_address,
    ):
        standby.leader = LeaderInfo(leader_address, "leader:2")
        async with grpc.aio.insecure_channel(standby_address) as channel:
            stream = pbg.HeadStub(channel).StreamHealth()  # type: ignore[call-arg]
            # The standby refuses the stream as it opens: the refusal can reach the client
            # before its first write is through (seen in a clean-clone run) or at the read.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stream.write(pb.SchedulerHealth(scheduler_id="s1"))
                await stream.read()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert leader_address in str(refused.value.details())
        assert leader_named(refused.value) == leader_address

        # A scheduler given both heads moves on to the leader, and streams there.
        async with scheduler(f"{standby_address},{leader_address}", tmp_path) as s:
            await until(lambda: "s1" in leader_head.state.schedulers, "registered at the leader", 10)
            await until(lambda: s.link._stream is not None, "a health stream", 10)
            assert s.link._heads.address == leader_address
            assert not s.link.unary_health


async def test_a_head_that_stops_leading_ends_the_open_streams_naming_the_new_leader() -> None:
    me = Leadership(cast(LeaseBackend, None), "leader", LeaderInfo("a:1", "a:2"), ttl_s=3)
    me.leading = me.serving = True
    async with serving(HeadService(head_node()), StandbyInterceptor(me)) as address:
        async with grpc.aio.insecure_channel(address) as channel:
            stream = pbg.HeadStub(channel).StreamHealth()  # type: ignore[call-arg]
            await stream.write(pb.SchedulerHealth(scheduler_id="s1"))
            reply = await stream.read()
            assert isinstance(reply, pb.HealthReply) and reply.ack is False  # served: not registered here
            me.leading = me.serving = False
            me.leader = LeaderInfo("b:1", "b:2")
            await stream.write(pb.SchedulerHealth(scheduler_id="s1"))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stream.read()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert leader_named(refused.value) == "b:1"


async def test_a_head_without_the_stream_gets_unary_updates() -> None:
    """An older head answers StreamHealth UNIMPLEMENTED: the scheduler falls back for good."""
    seen: list[str] = []

    async def unary(request: pb.SchedulerHealth, context: Any) -> pb.HealthReply:
        seen.append(request.scheduler_id)
        return pb.HealthReply(ack=True)

    old_head = grpc.method_handlers_generic_handler(
        "shoal.v1.Head",
        {
            "SendHealthUpdate": grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=pb.SchedulerHealth.FromString,
                response_serializer=pb.HealthReply.SerializeToString,
            )
        },
    )
    server = new_server(Settings())
    server.add_generic_rpc_handlers((old_head,))
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    link = GrpcHeadLink(f"127.0.0.1:{port}", Settings(rpc_timeout_s=5))
    try:
        assert await link.health("s1", 1, [], {}) is True
        assert await link.health("s1", 2, [], {}) is True
        assert link.unary_health
        assert seen == ["s1", "s1"]
    finally:
        await link.close()
        await server.stop(None)


async def test_a_health_stream_to_no_head_fails_as_a_call_would() -> None:
    async with serving(None) as address:
        pass  # the port is closed again: nothing answers there
    link = GrpcHeadLink(address, Settings(rpc_timeout_s=2))
    try:
        with pytest.raises(Unavailable):
            await link.health("s1", 1, [], {})
        assert not link.unary_health
    finally:
        await link.close()


# -- real processes -------------------------------------------------------------------------


async def test_a_killed_head_restarted_hears_the_schedulers_stream_again(tmp_path: Path) -> None:
    async with ProcessCluster(tmp_path) as cluster:

        def alive(status: dict[str, Any]) -> bool:
            return [s["state"] for s in status["schedulers"]] == [ALIVE]

        await cluster.wait_for(alive, 30, "the scheduler alive")
        assert cluster.head is not None
        cluster.head.kill_all()
        await asyncio.to_thread(cluster.restart_head)
        await cluster.wait_for(alive, 30, "the scheduler alive at the restarted head")
        # What is checked is that it stays so past dead_after_s (2 s): its updates reach the
        # restarted head, not only its registration.
        await asyncio.sleep(2.5)
        status = await cluster.status()
        assert alive(status)
        assert status["schedulers"][0]["last_seen_s"] < 1.0
    log = (tmp_path / "scheduler0" / "scheduler0.log").read_text()
    assert "no health stream" not in log


async def test_a_killed_scheduler_is_dead_when_its_stream_ends_a_silent_one_after_dead_after_s(
    tmp_path: Path,
) -> None:
    # dead_after_s 30 s: a scheduler killed (its connection closes, its stream ends) is dead
    # 1 s later; one stopped (SIGSTOP: silent, its connection open, as behind a network cut)
    # stays ALIVE until dead_after_s.
    env = {"SHOAL_DEAD_AFTER_S": "30", "SHOAL_DEAD_AFTER_STREAM_END_S": "1"}
    async with ProcessCluster(tmp_path, schedulers=2, env=env) as cluster:

        def states(status: dict[str, Any]) -> dict[int, str]:
            return {s["pid"]: s["state"] for s in status["schedulers"]}

        killed, stopped = cluster.schedulers
        await cluster.wait_for(
            lambda s: states(s) == {killed.pid: ALIVE, stopped.pid: ALIVE}, 30, "both schedulers alive"
        )
        stopped.signal(signal.SIGSTOP)
        try:
            killed.signal(signal.SIGKILL)
            at = time.monotonic()
            status = await cluster.wait_for(
                lambda s: states(s)[killed.pid] == DEAD, 20, "the killed one dead"
            )
            assert time.monotonic() - at < 15  # not dead_after_s (30 s)
            assert states(status)[stopped.pid] == ALIVE
            dead = [e["message"] for e in status["events"] if e["kind"] == "scheduler_dead"]
            assert len(dead) == 1 and "health stream ended" in dead[0], dead
        finally:
            stopped.signal(signal.SIGCONT)

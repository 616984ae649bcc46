"""The head's side of ``StreamHealth`` over in-memory twins (no sockets): a reply per update
in order, NACK for a scheduler it does not know, and the head's allowance for its own
lateness taken from the updates' ``sent_s`` (a stream carries no deadline per update)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.cluster import ALIVE, DEAD
from shoal.core.placement import Capacity
from shoal.head.node import HeadNode
from shoal.proto import shoal_pb2 as pb
from shoal.rpc.head_service import HeadService
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers
from shoal.types import SchedulerRegistration

pytestmark = pytest.mark.timeout(10)


async def register(node: HeadNode, sid: str) -> None:
    await node.register_scheduler(
        SchedulerRegistration(sid, f"{sid}:1", f"{sid}:2", Capacity(1, 1024, 0), pid=1, hostname="h")
    )


async def updates(*messages: pb.SchedulerHealth) -> AsyncIterator[pb.SchedulerHealth]:
    for message in messages:
        yield message


async def test_each_update_gets_its_reply_in_order_nack_for_an_unknown_scheduler(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    node = HeadNode(Settings(), store, fleet, clock)
    await register(node, "s1")
    stream = HeadService(node).StreamHealth(
        updates(
            pb.SchedulerHealth(scheduler_id="s1", sent_s=1.0),
            pb.SchedulerHealth(scheduler_id="nobody", sent_s=1.1),
            pb.SchedulerHealth(scheduler_id="s1", sent_s=1.2),
        ),
        None,  # type: ignore[arg-type]
    )
    assert [reply.ack async for reply in stream] == [True, False, True]
    await node.aclose()


async def test_an_update_that_waited_in_the_head_gives_schedulers_that_much_longer(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    node = HeadNode(Settings(dead_after_s=5), store, fleet, clock)
    await register(node, "s1")
    await register(node, "s2")
    now = time.monotonic()
    # s1's second update was sent 3 s before the head read it (its first, at once).
    stream = HeadService(node).StreamHealth(
        updates(
            pb.SchedulerHealth(scheduler_id="s1", sent_s=now),
            pb.SchedulerHealth(scheduler_id="s1", sent_s=now - 3),
        ),
        None,  # type: ignore[arg-type]
    )
    assert [reply.ack async for reply in stream] == [True, True]

    clock.advance(6)  # s2 silent past dead_after_s, not past it plus the 3 s
    await node.reconcile_once()
    assert node.state.schedulers["s2"].state == ALIVE

    clock.advance(2.5)
    await node.reconcile_once()
    assert node.state.schedulers["s2"].state == DEAD
    await node.aclose()


async def test_a_scheduler_whose_stream_ended_is_dead_after_the_grace_not_dead_after_s(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    # A killed scheduler's connection closes: its stream ends at once, while a silent one's
    # stays open. The first is dead dead_after_stream_end_s later, the second dead_after_s.
    node = HeadNode(Settings(dead_after_s=30, dead_after_stream_end_s=3), store, fleet, clock)
    await register(node, "killed")
    await register(node, "silent")
    service = HeadService(node)
    stream = service.StreamHealth(updates(pb.SchedulerHealth(scheduler_id="killed")), None)  # type: ignore[arg-type]
    assert [reply.ack async for reply in stream] == [True]  # and then the stream ends

    clock.advance(2.9)
    await node.reconcile_once()
    assert node.state.schedulers["killed"].state == ALIVE
    clock.advance(0.2)
    await node.reconcile_once()
    assert node.state.schedulers["killed"].state == DEAD
    assert node.state.schedulers["silent"].state == ALIVE
    dead = [e.message for e in node.state.events if e.kind == "scheduler_dead"]
    assert dead == [
        "scheduler killed its health stream ended and it sent no update for 3s; "
        "0 replica(s) to place elsewhere"
    ]
    clock.advance(27)
    await node.reconcile_once()
    assert node.state.schedulers["silent"].state == DEAD
    await node.aclose()


async def test_a_scheduler_that_sends_on_a_new_stream_stays_alive(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    node = HeadNode(Settings(dead_after_s=30, dead_after_stream_end_s=3), store, fleet, clock)
    await register(node, "s1")
    service = HeadService(node)
    first = service.StreamHealth(updates(pb.SchedulerHealth(scheduler_id="s1")), None)  # type: ignore[arg-type]
    assert [reply.ack async for reply in first] == [True]  # broken: it reconnects
    clock.advance(1)
    second = service.StreamHealth(updates(pb.SchedulerHealth(scheduler_id="s1")), None)  # type: ignore[arg-type]
    reply = await anext(aiter(second))
    assert reply.ack  # the new stream stays open from here on
    clock.advance(10)
    await node.reconcile_once()
    assert node.state.schedulers["s1"].state == ALIVE
    await second.aclose()  # and now this one ends too
    clock.advance(3.1)
    await node.reconcile_once()
    assert node.state.schedulers["s1"].state == DEAD
    await node.aclose()


async def test_the_end_of_an_old_stream_seen_after_an_update_on_a_new_one_is_ignored(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    node = HeadNode(Settings(dead_after_s=30, dead_after_stream_end_s=3), store, fleet, clock)
    await register(node, "s1")
    service = HeadService(node)
    old = service.StreamHealth(updates(pb.SchedulerHealth(scheduler_id="s1")), None)  # type: ignore[arg-type]
    assert (await anext(aiter(old))).ack
    clock.advance(1)
    new = service.StreamHealth(updates(pb.SchedulerHealth(scheduler_id="s1")), None)  # type: ignore[arg-type]
    assert (await anext(aiter(new))).ack
    await old.aclose()  # its end is seen only now, after the update on the new stream
    clock.advance(10)
    await node.reconcile_once()
    assert node.state.schedulers["s1"].state == ALIVE
    await new.aclose()
    await node.aclose()


async def test_with_the_grace_off_a_stream_end_changes_nothing(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    node = HeadNode(Settings(dead_after_s=5, dead_after_stream_end_s=0), store, fleet, clock)
    await register(node, "s1")
    stream = HeadService(node).StreamHealth(updates(pb.SchedulerHealth(scheduler_id="s1")), None)  # type: ignore[arg-type]
    assert [reply.ack async for reply in stream] == [True]
    clock.advance(4.9)
    await node.reconcile_once()
    assert node.state.schedulers["s1"].state == ALIVE
    clock.advance(0.2)
    await node.reconcile_once()
    assert node.state.schedulers["s1"].state == DEAD
    await node.aclose()

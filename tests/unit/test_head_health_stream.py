"""The head's side of ``StreamHealth`` over in-memory twins (no sockets): a reply per update
in order, NACK for a scheduler it does not know, and the head's allowance for its own
lateness taken from the updates' ``sent_s`` (a stream carries no deadline per update)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.cluster import ALIVE, DEAD
from shoal.core.placement import Capacity
from shoal.head.node import DEATHS_TOGETHER_S, HeadNode
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


def one_update(service: HeadService, sid: str) -> AsyncGenerator[pb.HealthReply, None]:
    """A health stream of ``sid`` carrying one update; it ends when the update is answered
    and read to the end, or when closed (``aclose``: a scheduler that went away)."""
    stream = service.StreamHealth(updates(pb.SchedulerHealth(scheduler_id=sid)), None)  # type: ignore[arg-type]
    assert isinstance(stream, AsyncGenerator)
    return stream


async def state_after(node: HeadNode, seconds: float, sid: str) -> str:
    """``sid``'s state after ``seconds`` more on the head's clock and a reconcile pass."""
    cast(FakeClock, node.clock).advance(seconds)
    await node.reconcile_once()
    return node.state.schedulers[sid].state


def grace_node(store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock, grace: float = 3) -> HeadNode:
    return HeadNode(Settings(dead_after_s=30, dead_after_stream_end_s=grace), store, fleet, clock)


async def test_a_scheduler_whose_stream_ended_is_dead_after_the_grace_not_dead_after_s(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    # A killed scheduler's connection closes: its stream ends at once, while a silent one's
    # stays open. The first is dead dead_after_stream_end_s later, the second dead_after_s.
    node = grace_node(store, fleet, clock)
    await register(node, "killed")
    await register(node, "silent")
    assert [reply.ack async for reply in one_update(HeadService(node), "killed")] == [True]

    assert await state_after(node, 2.9, "killed") == ALIVE
    assert await state_after(node, 0.2, "killed") == DEAD
    assert node.state.schedulers["silent"].state == ALIVE
    dead = [e.message for e in node.state.events if e.kind == "scheduler_dead"]
    assert dead == [
        "scheduler killed its health stream ended and it sent no update for 3s; "
        "0 replica(s) to place elsewhere"
    ]
    assert await state_after(node, 27, "silent") == DEAD
    await node.aclose()


async def test_a_scheduler_that_sends_on_a_new_stream_stays_alive(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    node = grace_node(store, fleet, clock)
    await register(node, "s1")
    service = HeadService(node)
    assert [reply.ack async for reply in one_update(service, "s1")] == [True]  # broken: it reconnects
    clock.advance(1)
    second = one_update(service, "s1")
    assert (await anext(aiter(second))).ack  # the new stream stays open from here on
    assert await state_after(node, 10, "s1") == ALIVE
    await second.aclose()  # and now this one ends too
    assert await state_after(node, 3.1, "s1") == DEAD
    await node.aclose()


async def test_the_end_of_an_old_stream_seen_after_an_update_on_a_new_one_is_ignored(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    node = grace_node(store, fleet, clock)
    await register(node, "s1")
    service = HeadService(node)
    old = one_update(service, "s1")
    assert (await anext(aiter(old))).ack
    clock.advance(1)
    new = one_update(service, "s1")
    assert (await anext(aiter(new))).ack
    await old.aclose()  # its end is seen only now, after the update on the new stream
    assert await state_after(node, 10, "s1") == ALIVE
    await new.aclose()
    await node.aclose()


async def test_with_the_grace_off_a_stream_end_changes_nothing(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    node = HeadNode(Settings(dead_after_s=5, dead_after_stream_end_s=0), store, fleet, clock)
    await register(node, "s1")
    assert [reply.ack async for reply in one_update(HeadService(node), "s1")] == [True]
    assert await state_after(node, 4.9, "s1") == ALIVE
    assert await state_after(node, 0.2, "s1") == DEAD
    await node.aclose()


async def test_schedulers_whose_streams_end_together_are_declared_dead_in_one_pass(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    # Killed together, their streams end some milliseconds apart: the reconcile loop's next
    # wake-up (``_next_death_s``) comes late enough for one pass to find every one of them.
    node = grace_node(store, fleet, clock)
    service = HeadService(node)
    for sid in ("s1", "s2", "s3"):
        await register(node, sid)
        assert [reply.ack async for reply in one_update(service, sid)] == [True]
        clock.advance(0.04)
    wake = node._next_death_s()
    assert 3 < wake < 3 + DEATHS_TOGETHER_S
    assert await state_after(node, wake, "s1") == DEAD
    assert [node.state.schedulers[s].state for s in ("s2", "s3")] == [DEAD, DEAD]
    await node.aclose()

"""Router.stream over in-memory replicas: chunks in order, slots held for the whole stream and
released however it ends, limits and queue bound as for send, retries only before the first chunk."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shoal.config import Settings
from shoal.core.spec import DeploymentSpec
from shoal.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ReplicaGone,
    ResourceExhausted,
    Unavailable,
)
from shoal.scheduler.router import RETRY_PAUSE_S, Router
from shoal.testing.fakes import FakeReplicaClient, FakeReplicas
from shoal.testing.wait import until
from shoal.types import GenerateChunk, GenerateRequest, Route
from tests.unit.conftest import make_spec as build_spec
from tests.unit.test_router import table

pytestmark = pytest.mark.timeout(10)

PROMPT = GenerateRequest(prompt="the quick brown fox", max_tokens=16)


def make_spec(**changes: Any) -> DeploymentSpec:
    return build_spec("lm", backend="vllm", model="m", **changes)


@pytest.fixture
def fakes() -> FakeReplicas:
    return FakeReplicas()


@pytest.fixture
async def router(fakes: FakeReplicas) -> AsyncIterator[Router]:
    r = Router("s1", Settings(), fakes, policy="round_robin")
    yield r
    await r.aclose()


def add(router: Router, fakes: FakeReplicas, spec: DeploymentSpec, *rids: str) -> list[FakeReplicaClient]:
    for rid in rids:
        router.add(rid, spec, f"{rid}:9000", "s1")
    return [fakes.clients[f"{rid}:9000"] for rid in rids]


async def collect(router: Router, request: GenerateRequest = PROMPT, **kwargs: Any) -> list[GenerateChunk]:
    async with contextlib.aclosing(router.stream("lm", request, **kwargs)) as chunks:
        return [c async for c in chunks]


def in_flight(router: Router) -> int:
    return router.load()["lm"].in_flight


async def test_chunks_come_in_order_and_the_last_has_the_counts(router: Router, fakes: FakeReplicas) -> None:
    [a] = add(router, fakes, make_spec(), "a")

    chunks = await collect(router, request_id="req-1")

    assert [c.text for c in chunks] == [" the", " quick", " brown", " fox", ""]
    assert [c.last for c in chunks] == [False, False, False, False, True]
    assert (chunks[-1].finish_reason, chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == (
        "stop",
        4,
        4,
    )
    assert [g.request_id for g in a.generations] == ["req-1"]
    assert a.generations[0].request == PROMPT
    assert 0 < a.generations[0].timeout_s <= 60.0
    assert in_flight(router) == 0
    assert router.stats()["lm"].outcomes["ok"] == 1


async def test_without_stream_one_chunk_has_everything(router: Router, fakes: FakeReplicas) -> None:
    add(router, fakes, make_spec(), "a")

    [chunk] = await collect(router, GenerateRequest(prompt="a b c", max_tokens=2, stream=False))

    assert chunk == GenerateChunk(text=" a b", finish_reason="length", prompt_tokens=3, completion_tokens=2)


async def test_the_slot_is_held_until_the_stream_ends(router: Router, fakes: FakeReplicas) -> None:
    [a] = add(router, fakes, make_spec(max_ongoing_requests=1), "a")
    first = router.stream("lm", PROMPT)
    assert (await anext(first)).text == " the"
    assert in_flight(router) == 1

    # A second stream waits for the slot: the replica takes one request at a time.
    second = asyncio.create_task(collect(router))
    await until(lambda: router.load()["lm"].queued == 1, "the second stream waiting")
    assert not second.done()

    rest = [c.text async for c in first]
    assert rest == [" quick", " brown", " fox", ""]
    assert len(await second) == 5
    assert a.max_in_flight == 1
    assert in_flight(router) == 0


async def test_closing_the_stream_early_releases_the_slot_and_stops_the_replica(
    router: Router, fakes: FakeReplicas
) -> None:
    [a] = add(router, fakes, make_spec(), "a")
    chunks = router.stream("lm", PROMPT)
    await anext(chunks)

    await chunks.aclose()

    assert in_flight(router) == 0
    assert a.in_flight == 0 and a.streams_closed == 1
    # The client chose to stop after part of an answer: not an error.
    assert router.stats()["lm"].outcomes["ok"] == 1


async def test_cancelling_the_consumer_releases_the_slot(router: Router, fakes: FakeReplicas) -> None:
    [a] = add(router, fakes, make_spec(), "a")
    a.piece_delay_s = 10.0
    seen = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(router.stream("lm", PROMPT)) as chunks:
            async for _ in chunks:
                seen.set()

    task = asyncio.create_task(consume())
    await seen.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert in_flight(router) == 0
    assert a.streams_closed == 1


async def test_a_replica_failing_before_the_first_chunk_is_replaced(
    router: Router, fakes: FakeReplicas
) -> None:
    a, b = add(router, fakes, make_spec(), "a", "b")
    a.fail_after_chunks = 0

    chunks = await collect(router)

    assert "".join(c.text for c in chunks) == " the quick brown fox"
    assert len(a.generations) == 1 and len(b.generations) == 1
    assert in_flight(router) == 0


async def test_a_replica_failing_after_the_first_chunk_fails_the_stream(
    router: Router, fakes: FakeReplicas
) -> None:
    a, b = add(router, fakes, make_spec(), "a", "b")
    a.fail_after_chunks = 2
    got: list[str] = []

    with pytest.raises(Unavailable, match="went away"):
        async with contextlib.aclosing(router.stream("lm", PROMPT)) as chunks:
            async for chunk in chunks:
                got.append(chunk.text)

    # The client has seen part of an answer: another replica would not continue it.
    assert got == [" the", " quick"]
    assert b.generations == []
    assert in_flight(router) == 0
    assert router.stats()["lm"].outcomes["unavailable"] == 1


async def test_every_replica_failing_is_unavailable(router: Router, fakes: FakeReplicas) -> None:
    for fake in add(router, fakes, make_spec(), "a", "b"):
        fake.fail_after_chunks = 0

    with pytest.raises(Unavailable, match="failed on 2 replica"):
        await collect(router, timeout_s=2.0)


async def test_a_replica_that_says_it_is_going_gets_no_generation_and_costs_no_attempt(
    fakes: FakeReplicas,
) -> None:
    # One attempt only: a draining replica's refusal ran nothing, so it is not one, and the
    # replica is sent nothing new (as for send). Before, it spent the attempt: the
    # generation failed, and the next went to the draining replica again.
    router = Router("s1", Settings(request_attempts=1), fakes, policy="round_robin")
    try:
        a, b = add(router, fakes, make_spec(), "a", "b")
        a.fail(ReplicaGone("replica a is DRAINING: it takes no new request"))
        for _ in range(4):
            chunks = await collect(router)
            assert "".join(c.text for c in chunks) == " the quick brown fox"
        assert len(b.generations) == 4
        assert router.ready_count("lm") == 1
        assert router.stats()["lm"].outcomes["ok"] == 4
    finally:
        await router.aclose()


async def test_a_generation_refused_by_a_draining_remote_replica_waits_for_the_next_table(
    router: Router, fakes: FakeReplicas
) -> None:
    # The only replica this router knows (another scheduler's) drains; the table listing its
    # replacement comes later than RETRY_PAUSE_S. The generation waits for it.
    spec = make_spec()
    await router.apply_table(table(1, spec, Route("old", "old:9000", "s2")))
    fakes.clients["old:9000"].fail(ReplicaGone("replica old is DRAINING: it takes no new request"))

    task = asyncio.create_task(collect(router, timeout_s=5.0))
    await asyncio.sleep(2 * RETRY_PAUSE_S)
    assert not task.done()
    await router.apply_table(table(2, spec, Route("new", "new:9000", "s3")))

    chunks = await asyncio.wait_for(task, 5.0)
    assert "".join(c.text for c in chunks) == " the quick brown fox"
    assert len(fakes.clients["new:9000"].generations) == 1


async def test_errors_from_the_replica_are_not_retried(router: Router, fakes: FakeReplicas) -> None:
    a, b = add(router, fakes, make_spec(), "a", "b")
    a.fail(InvalidArgument("model 'lm' does not generate text"))
    b.fail(InvalidArgument("model 'lm' does not generate text"))

    with pytest.raises(InvalidArgument):
        await collect(router)

    assert router.stats()["lm"].outcomes["invalid"] == 1


async def test_unknown_deployment_is_not_found(router: Router) -> None:
    with pytest.raises(NotFound):
        await collect(router)


async def test_a_full_queue_is_refused_at_once(router: Router, fakes: FakeReplicas) -> None:
    [a] = add(router, fakes, make_spec(max_ongoing_requests=1, max_queued_requests=1), "a")
    gate = a.gate = asyncio.Event()
    holding = asyncio.create_task(collect(router))
    waiting = asyncio.create_task(collect(router))
    await until(lambda: in_flight(router) == 1 and router.load()["lm"].queued == 1, "one held, one queued")

    with pytest.raises(ResourceExhausted):
        await collect(router)

    gate.set()
    assert len(await holding) == 5 and len(await waiting) == 5


async def test_no_room_before_the_deadline_is_deadline_exceeded(router: Router, fakes: FakeReplicas) -> None:
    [a] = add(router, fakes, make_spec(max_ongoing_requests=1), "a")
    a.gate = asyncio.Event()
    holding = asyncio.create_task(collect(router))
    await until(lambda: in_flight(router) == 1, "the first stream on the replica")

    with pytest.raises(DeadlineExceeded):
        await collect(router, timeout_s=0.1)

    a.gate.set()
    await holding

"""ByteBudget: request bytes in flight on one ingress process, bounded (shoal.core.budget)."""

from __future__ import annotations

import asyncio

import pytest

from shoal.core.budget import SMALL, ByteBudget
from shoal.errors import DeadlineExceeded, ResourceExhausted

pytestmark = pytest.mark.asyncio

MB = 1 << 20


async def test_fits_go_on_at_once_and_one_request_always_runs() -> None:
    budget = ByteBudget(10 * MB)
    assert await budget.take(4 * MB, 1) == 0.0
    assert await budget.take(6 * MB, 1) == 0.0
    assert budget.held == 10 * MB
    budget.give(4 * MB)
    budget.give(6 * MB)
    # Larger than the whole limit, alone: it runs (max_message_mb may exceed a process's share).
    assert await budget.take(50 * MB, 1) == 0.0
    budget.give(50 * MB)
    assert budget.held == 0


async def test_waits_in_order_for_room_then_goes_on() -> None:
    budget = ByteBudget(10 * MB)
    await budget.take(8 * MB, 1)
    order: list[str] = []

    async def wait(name: str, n: int) -> None:
        await budget.take(n, 5)
        order.append(name)

    first = asyncio.create_task(wait("first", 6 * MB))
    await asyncio.sleep(0)
    second = asyncio.create_task(wait("second", 3 * MB))  # would fit now, but queues behind first
    await asyncio.sleep(0.01)
    assert order == [] and budget.waiting == 9 * MB
    budget.give(8 * MB)
    await asyncio.gather(first, second)
    assert order == ["first", "second"]
    assert budget.held == 9 * MB and budget.waiting == 0


async def test_refused_when_the_queue_for_room_is_full() -> None:
    budget = ByteBudget(10 * MB)
    await budget.take(9 * MB, 1)
    waiter = asyncio.create_task(budget.take(8 * MB, 5))
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted, match="max_inflight_mb"):
        await budget.take(4 * MB, 5)
    budget.give(9 * MB)
    await waiter
    assert budget.held == 8 * MB


async def test_deadline_while_waiting_leaves_nothing_behind() -> None:
    budget = ByteBudget(10 * MB)
    await budget.take(9 * MB, 1)
    with pytest.raises(DeadlineExceeded, match="room"):
        await budget.take(5 * MB, 0.05)
    assert budget.waiting == 0 and budget.held == 9 * MB
    budget.give(9 * MB)
    assert await budget.take(10 * MB, 1) == 0.0


async def test_cancelled_waiter_lets_the_next_one_in() -> None:
    budget = ByteBudget(10 * MB)
    await budget.take(9 * MB, 1)
    big = asyncio.create_task(budget.take(9 * MB, 5))
    await asyncio.sleep(0.01)
    small_enough = asyncio.create_task(budget.take(1 * MB, 5))
    await asyncio.sleep(0.01)
    assert not small_enough.done()  # first come, first served
    big.cancel()
    await asyncio.sleep(0.01)
    assert small_enough.done() and budget.held == 10 * MB and budget.waiting == 0


async def test_small_requests_never_queue_behind_large_ones() -> None:
    budget = ByteBudget(10 * MB)
    await budget.take(9 * MB, 1)
    waiter = asyncio.create_task(budget.take(9 * MB, 5))
    await asyncio.sleep(0.01)
    assert budget.room(SMALL) and not budget.room(SMALL + 1)
    assert await budget.take(SMALL, 0.01) == 0.0
    waiter.cancel()


async def test_no_limit() -> None:
    budget = ByteBudget(0)
    for _ in range(3):
        assert await budget.take(100 * MB, 0.01) == 0.0
    assert budget.held == 0


async def test_try_take_is_take_without_waiting() -> None:
    budget = ByteBudget(10 * MB)
    assert budget.try_take(8 * MB)
    assert not budget.try_take(3 * MB) and budget.held == 8 * MB  # nothing held on False
    assert budget.try_take(SMALL)
    budget.give(8 * MB)
    budget.give(SMALL)
    assert budget.held == 0

"""ByteBudget: request bytes in flight on one ingress process, bounded (shoal.core.budget)."""

from __future__ import annotations

import asyncio

import pytest

from shoal.core import budget as budgets
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


class Releases:
    """A ``release`` that counts its calls (they come on the loop's executor thread)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


async def settled(releases: Releases, calls: int, timeout_s: float = 2.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while releases.calls < calls and loop.time() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # and no more than that
    return releases.calls == calls


async def test_free_memory_is_released_once_large_requests_are_done() -> None:
    releases = Releases()
    budget = ByteBudget(100 * MB, release=releases)
    assert budget.try_take(SMALL)  # a small request in flight throughout does not hold it back
    await budget.take(20 * MB, 1)
    await budget.take(20 * MB, 1)
    budget.give(20 * MB)
    assert await settled(releases, 0)  # one large request is still in flight
    budget.give(20 * MB)
    assert await settled(releases, 1)
    # Below TRIM_AFTER of large requests since: nothing to release.
    await budget.take(8 * MB, 1)
    budget.give(8 * MB)
    assert await settled(releases, 1)
    budget.give(SMALL)


async def test_releases_come_at_most_once_a_period_and_the_last_is_not_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(budgets, "TRIM_EVERY_S", 0.3)
    releases = Releases()
    budget = ByteBudget(100 * MB, release=releases)
    for _ in range(3):  # three bursts in quick succession
        await budget.take(40 * MB, 1)
        budget.give(40 * MB)
    assert await settled(releases, 1, timeout_s=0.1)
    # The bursts after the first are released together, once the period has passed.
    assert await settled(releases, 2, timeout_s=1.0)
    assert await settled(releases, 2, timeout_s=0.4)


async def test_bytes_of_refused_requests_count_toward_a_release() -> None:
    # 12 MB in flight, 12 waiting, 12 refused: 36 MB came, over TRIM_AFTER only with the
    # refused request's (gRPC had read its bytes before it was refused).
    assert 24 * MB < budgets.TRIM_AFTER <= 36 * MB
    releases = Releases()
    budget = ByteBudget(20 * MB, release=releases)
    await budget.take(12 * MB, 1)
    waiting = asyncio.create_task(budget.take(12 * MB, 5))
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted):
        await budget.take(12 * MB, 1)
    budget.give(12 * MB)
    await waiting
    budget.give(12 * MB)
    assert await settled(releases, 1)


async def test_release_free_memory_runs_here() -> None:
    budgets.release_free_memory()  # a full collection, and malloc_trim where glibc has it


async def test_a_body_that_grows_is_held_while_it_fits_and_alone_whatever_its_size() -> None:
    """try_grow: a chunked or compressed body, its size known only as it is read."""
    budget = ByteBudget(10 * MB)
    assert budget.try_grow(0, 30 * MB)  # nobody else holds anything: it grows past the limit
    budget.give(30 * MB)
    assert budget.held == 0
    await budget.take(6 * MB, 1)
    assert budget.try_grow(0, SMALL)  # small pieces always pass
    assert budget.try_grow(SMALL, 3 * MB)  # fits beside the 6 MB
    assert not budget.try_grow(SMALL + 3 * MB, 2 * MB)  # would pass 10 MB: refused, nothing more held
    assert budget.held == 6 * MB + SMALL + 3 * MB
    budget.give(SMALL + 3 * MB)
    budget.give(6 * MB)
    assert budget.held == 0


async def test_memory_is_released_after_bodies_that_grew() -> None:
    released: list[int] = []
    budget = ByteBudget(1 << 40, release=lambda: released.append(1))
    for _ in range(2):
        assert budget.try_grow(0, SMALL)
        assert budget.try_grow(SMALL, budgets.TRIM_AFTER)
        budget.give(SMALL + budgets.TRIM_AFTER)
    assert released  # counted as large requests, as take() counts them

"""``shoal.core.tasks.cancel_and_wait``: a component's ``stop`` cancels its own task and
waits for it, and a cancellation of whoever is stopping it, arriving during that wait, is
passed on. ``with suppress(CancelledError): await task`` swallowed it: the stopper went on
as if nobody had cancelled it (a shutdown past its grace kept running)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from shoal.core.tasks import cancel_and_wait

pytestmark = pytest.mark.timeout(10)


async def slow_to_end(cleaned: asyncio.Event, cleanup_s: float) -> None:
    """A task that needs a moment to clean up once cancelled (closing a connection)."""
    try:
        await asyncio.Event().wait()
    finally:
        await asyncio.sleep(cleanup_s)
        cleaned.set()


async def stop_with(waiter: str, task: asyncio.Task[None], stopped: list[str]) -> None:
    if waiter == "cancel_and_wait":
        await cancel_and_wait(task)
    else:  # the pattern it replaced
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    stopped.append("went on")


@pytest.mark.parametrize("waiter", ["cancel_and_wait", "suppress"])
async def test_the_stoppers_own_cancellation_is_passed_on(waiter: str) -> None:
    cleaned = asyncio.Event()
    task = asyncio.create_task(slow_to_end(cleaned, 0.2))
    await asyncio.sleep(0)
    stopped: list[str] = []
    stopper = asyncio.create_task(stop_with(waiter, task, stopped))
    await asyncio.sleep(0.05)  # the stopper waits for the task's cleanup
    stopper.cancel()
    await asyncio.wait([stopper])
    if waiter == "suppress":  # what the old pattern did: the cancel was lost
        assert not stopper.cancelled() and stopped == ["went on"]
        return
    assert stopper.cancelled(), "the stopper's cancellation was swallowed"
    assert stopped == []
    assert task.done()


async def test_the_tasks_own_cancellation_is_not_raised() -> None:
    cleaned = asyncio.Event()
    task = asyncio.create_task(slow_to_end(cleaned, 0.01))
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled() and cleaned.is_set()


async def test_an_error_the_task_ends_with_as_it_is_cancelled_is_not_raised() -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise OSError("connection reset") from None

    task = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert isinstance(task.exception(), OSError)


async def test_a_task_already_done_is_waited_for_without_error() -> None:
    task = asyncio.create_task(asyncio.sleep(0))
    await task
    await cancel_and_wait(task)


async def test_a_stopper_cancelled_before_it_stops_still_stops_its_task() -> None:
    """``finally: await cancel_and_wait(t)`` in a component cancelled from outside: the task
    ends, and the cancellation goes on up."""
    cleaned = asyncio.Event()
    inner: list[asyncio.Task[None]] = []

    async def component() -> None:
        task = asyncio.create_task(slow_to_end(cleaned, 0.01))
        inner.append(task)
        try:
            await asyncio.Event().wait()
        finally:
            await cancel_and_wait(task)

    outer = asyncio.create_task(component())
    await asyncio.sleep(0.01)
    outer.cancel()
    await asyncio.wait([outer])
    assert outer.cancelled() and inner[0].cancelled() and cleaned.is_set()

"""``shoal.core.clock.wait_for``: a time limit that never loses a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from shoal.core.clock import sleep_or_event, wait_for

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize("passes", [0, 1, 2, 3])
async def test_a_wait_cancelled_as_its_event_fires_is_cancelled(passes: int) -> None:
    """On Python 3.11 ``asyncio.wait_for`` returned the event's result instead when the event
    fired within two loop passes of the cancel: a loop waiting that way ran on, and whoever
    cancelled it waited for good (the blob mirror's ``aclose``)."""
    event = asyncio.Event()

    async def loop() -> None:
        while True:
            await wait_for(event.wait(), 60)
            event.clear()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    event.set()
    for _ in range(passes):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


async def test_wait_for_gives_the_result_or_times_out_and_cancels() -> None:
    assert await wait_for(asyncio.sleep(0, "done"), 1) == "done"
    assert await wait_for(asyncio.sleep(0, "no limit"), None) == "no limit"
    cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        await wait_for(slow(), 0.01)
    assert cancelled.is_set()
    event = asyncio.Event()
    assert not await sleep_or_event(event, 0.01)
    event.set()
    assert await sleep_or_event(event, 60)

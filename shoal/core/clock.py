"""Time as a seam: the real clock, and a fake one for tests of the control loops.

Everything in the control plane that reads the time or waits for it (the head's
reconcile loop, the scheduler's head link and pings, the router's deadlines and
retry pauses, a replica's health loop) goes through a :class:`Clock`, so a test
can move time by hand with :class:`FakeClock` instead of sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return after ``seconds`` of this clock's time."""
        ...

    async def wait(self, aw: Awaitable[object], seconds: float) -> bool:
        """Await ``aw`` for up to ``seconds``: True when it finished (its exception, if any, is
        raised), False when the time ran out first (``aw`` is then cancelled)."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait(self, aw: Awaitable[object], seconds: float) -> bool:
        # Not asyncio.wait_for (see wait_for below): a router waiting for a free replica lost
        # its client's cancel that way whenever the slot came free in the same loop pass
        # (clients hanging up together: the first one's freed slot went to the next, which
        # then ran for nobody).
        try:
            await wait_for(aw, seconds)
        except TimeoutError:
            return False
        return True


class FakeClock:
    """A clock that moves only when told to (:meth:`advance`).

    ``sleep`` and ``wait`` block until the clock has been advanced past their end;
    :meth:`wait_for_sleepers` lets a test wait until the code under test has reached its
    next wait, so a test steps a loop without real sleeps. For one event loop.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self._changed: asyncio.Event | None = None  # made on first use, inside the loop

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time on; wakes every sleep that ends by the new time."""
        self._now += seconds
        for end, future in list(self._sleepers):
            if end <= self._now and not future.done():
                future.set_result(None)

    @property
    def sleepers(self) -> int:
        """How many sleeps (and timed waits) are blocked on this clock now."""
        return sum(1 for _, f in self._sleepers if not f.done())

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        entry = (self._now + seconds, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        self._fire()
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    async def wait(self, aw: Awaitable[object], seconds: float) -> bool:
        task = asyncio.ensure_future(aw)
        timer = asyncio.ensure_future(self.sleep(seconds))
        try:
            await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, timer, return_exceptions=True)
        if task.cancelled():
            return False
        task.result()  # raises what ``aw`` raised
        return True

    async def wait_for_sleepers(self, count: int = 1, timeout_s: float = 2.0) -> None:
        """Wait (real time, up to ``timeout_s``) until at least ``count`` sleeps are blocked on
        this clock; ``TimeoutError`` otherwise."""
        async with asyncio.timeout(timeout_s):
            while self.sleepers < count:
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()
                self._changed.clear()

    def _fire(self) -> None:
        if self._changed is not None:
            self._changed.set()


async def wait_for(aw: Awaitable[T], seconds: float | None) -> T:
    """``aw``'s result, or TimeoutError (``aw`` cancelled) after ``seconds`` (None: no limit).

    Use it in place of ``asyncio.wait_for`` (ruff refuses that in ``shoal/``): on Python 3.11
    ``asyncio.wait_for`` returns ``aw``'s result when ``aw`` is done by the time the task
    cancelled around it runs, and the cancellation is lost. A loop waiting that way for an
    event then ran on after its ``TaskSet`` cancelled it, and the ``aclose`` awaiting it never
    returned: the blob mirror's, when a blob came whole in the same loop pass (a unit test
    hung in a full-suite run). Here the wait runs in the caller's task under
    ``asyncio.timeout``, which passes a cancellation on."""
    async with asyncio.timeout(seconds):
        return await aw


async def sleep_or_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``event`` is set; True when the event fired."""
    try:
        await wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


class Signal:
    """Wakes every current waiter; callable from sync code (no lock needed)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout_s: float, clock: Clock) -> None:
        """Until the next :meth:`fire`, or ``timeout_s`` of ``clock``'s time."""
        await clock.wait(self._event.wait(), timeout_s)

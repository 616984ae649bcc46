"""Owned background tasks: every task a component starts is in its TaskSet and
is cancelled and awaited when the component closes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from shoal.errors import ShoalError

log = logging.getLogger("shoal.tasks")

T = TypeVar("T")


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has ended, whatever it ended with. A cancellation
    of the caller while it waits is passed on: ``with suppress(CancelledError): await task``
    cannot tell the task's own cancellation from its caller's, and swallowed both, so the
    one who stopped a component went on as if nobody had cancelled it."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:  # what a cancelled task ends with is moot to the one who cancelled it
        log.debug("%s ended with an error as it was cancelled", task, exc_info=True)


async def until(
    stream: AsyncIterator[T], stop: Callable[[], ShoalError | None], every_s: float
) -> AsyncIterator[T]:
    """``stream``'s items until ``stop()`` names an error, asked before each item and every
    ``every_s`` while none comes: then that error is raised (``stream`` is closed). For
    streams with no end of their own (a log follow) whose reason to go on can end."""
    items = aiter(stream)
    step: asyncio.Future[T] | None = None
    try:
        while True:
            if (error := stop()) is not None:
                raise error
            step = asyncio.ensure_future(anext(items))
            while not (await asyncio.wait({step}, timeout=every_s))[0]:
                if (error := stop()) is not None:
                    raise error
            try:
                yield step.result()
            except StopAsyncIteration:
                return
    finally:
        # Stopped, or cancelled itself (an outer until): the item awaited is cancelled first,
        # since a generator cannot be closed while it runs.
        try:
            if step is not None and not step.done():
                await cancel_and_wait(step)  # raises again when the reader itself is cancelled
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()


class TaskSet:
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called: :meth:`spawn` then raises RuntimeError."""
        return self._closed

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start ``coro`` as a task owned by this set. A task that fails is logged, not lost."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self.owner} is closed")
        task = asyncio.create_task(coro, name=f"{self.owner}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    async def aclose(self) -> None:
        """Cancel every task and wait for all of them."""
        self._closed = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def __len__(self) -> int:
        return len(self._tasks)

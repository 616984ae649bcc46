"""Waiting for a condition in a test, instead of sleeping and hoping it happened."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(check: Callable[[], object], what: str = "condition", timeout_s: float = 10.0) -> None:
    """Return once ``check()`` is true; raise ``TimeoutError`` naming ``what`` after ``timeout_s``.

    ``check`` is called on the event loop between short pauses, so it must not block; the
    pauses also let other tasks run, so a condition another task brings about is seen.
    """
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not seen in {timeout_s:g}s")
        await asyncio.sleep(0.005)

"""Running a component's event loop: uvloop when it is installed (the default),
the standard asyncio loop otherwise or when asked (``event_loop: asyncio``)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from shoal.errors import InvalidArgument

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], event_loop: str = "auto") -> T:
    if event_loop not in ("auto", "uvloop", "asyncio"):
        main.close()
        raise InvalidArgument(f"event_loop must be auto, uvloop or asyncio, got {event_loop!r}")
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                main.close()
                raise InvalidArgument("event_loop uvloop needs the uvloop package") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)

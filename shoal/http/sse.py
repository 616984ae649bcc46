"""Server-sent events for streamed generations (Triton's ``generate_stream``, OpenAI's ``stream``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

MEDIA_TYPE = "text/event-stream"


def event(doc: Any) -> bytes:
    """One ``data:`` event carrying ``doc`` as JSON."""
    return b"data: " + json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response of ``events``; ``close`` runs when the response ends
    for any reason (the last event sent, an error, the client gone), so the generation
    behind it stops and its replica slot is released at once."""

    def __init__(self, events: AsyncIterator[bytes], close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(
            events,
            media_type=MEDIA_TYPE,
            # No caching, and no buffering by proxies (nginx honours X-Accel-Buffering).
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._close()

"""Server-sent events for streamed generations (Triton's ``generate_stream``, OpenAI's ``stream``).

A stream sends no more than setting ``sse_keepalive_s`` (15 s) without a byte: when it
has nothing else to send (a long prompt being read, a request queued behind others, a slow
piece) it sends a comment line, ``: keep-alive``, which SSE clients skip (the ``openai``
client and browsers' ``EventSource`` among them). Before, such a stream sent nothing until
its first piece, and a proxy that cuts connections idle for 60 s (nginx's
``proxy_read_timeout``, an AWS load balancer's idle timeout) cut it. See :func:`open_stream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

MEDIA_TYPE = "text/event-stream"

#: An SSE comment line: clients skip it, proxies see the connection busy.
KEEPALIVE = b": keep-alive\n\n"


#: Characters JSON leaves as they are that Python's ``str.splitlines``, and so httpx's
#: ``aiter_lines``, take for line breaks: an event's text escapes them (:func:`event`).
_LINE_BREAKS = ("\u2028", "\u2029", "\x85")


def event(doc: Any) -> bytes:
    """One ``data:`` event carrying ``doc`` as JSON, on one line for any line reader: text
    stays unescaped but for :data:`_LINE_BREAKS`. Before, a model's U+2028 cut its event in
    two for a client reading lines with httpx, which then failed to parse either half."""
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    if not text.isascii():
        for breaks in _LINE_BREAKS:
            if breaks in text:
                text = text.replace(breaks, f"\\u{ord(breaks):04x}")
    return b"data: " + text.encode() + b"\n\n"


async def open_stream(
    events: AsyncIterator[bytes],
    close: Callable[[], Awaitable[None]],
    keepalive_s: float,
    error_event: Callable[[Exception], bytes],
) -> EventStream:
    """The response of ``events`` (see :class:`EventStream`), once its first event came or
    ``keepalive_s`` passed (0: once it came).

    An error ``events`` raises before its first event, within ``keepalive_s``, propagates:
    the caller answers it as an ordinary error response (a full queue is a 429, a prompt
    the model refuses a 400, not a stream that fails), and ``close`` has run. A stream
    whose first event takes longer (a long prompt, a queue) begins then, with a keep-alive,
    so that a proxy does not cut it; an error after that ends it with ``error_event(err)``,
    as the stream's own errors after its first event do.

    Cancelling the wait (its client gone, :func:`~shoal.http.server.unless_gone`) stops
    ``events`` and runs ``close``."""
    first = asyncio.ensure_future(anext(events))
    try:
        done, _ = await asyncio.wait((first,), timeout=keepalive_s if keepalive_s > 0 else None)
        if done:
            head = first.result()
    except BaseException:
        first.cancel()
        await asyncio.wait((first,))  # ``events`` unwinds; what it raised is told by ``raise``
        await close()
        raise
    if done:
        return EventStream(_after(head, events), close, keepalive_s)
    return EventStream(_late(first, events, error_event), close, keepalive_s, quiet=True)


async def _after(head: bytes, rest: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    yield head
    async for item in rest:
        yield item


async def _late(
    first: asyncio.Future[bytes], rest: AsyncIterator[bytes], error_event: Callable[[Exception], bytes]
) -> AsyncGenerator[bytes, None]:
    """The events of a stream that began before its first event: that event's error is
    the stream's last event. Cancelled while it waits, the wait for the event is too."""
    try:
        head = await first
    except StopAsyncIteration:
        return
    except Exception as err:
        yield error_event(err)
        return
    yield head
    async for item in rest:
        yield item


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response of ``events``; ``close`` runs when the response ends
    for any reason (the last event sent, an error, the client gone), so the generation
    behind it stops and its replica slot is released at once.

    With ``keepalive_s`` (0: none), a keep-alive goes out whenever the stream has sent
    nothing for ``keepalive_s`` (between half that and that, checked every half), and at
    once after the response's head when ``quiet`` (the wait for its first event already
    took that long). A keep-alive is written like any event: to a client that reads
    nothing it adds bytes that wait, it does not count as read (``http_idle_timeout_s``)."""

    def __init__(
        self,
        events: AsyncIterator[bytes],
        close: Callable[[], Awaitable[None]],
        keepalive_s: float = 0.0,
        *,
        quiet: bool = False,
    ) -> None:
        super().__init__(
            events,
            media_type=MEDIA_TYPE,
            # No caching, and no buffering by proxies (nginx honours X-Accel-Buffering).
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._events = events
        self._close = close
        self._keepalive_s = keepalive_s
        self._quiet = quiet
        self._sent = True  # since the last look of the keep-alive timer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
            await self._close()

    async def stream_response(self, send: Send) -> None:
        if self._keepalive_s <= 0:
            await super().stream_response(send)
            return
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if self._quiet:
            await send(_body(KEEPALIVE))
        # One lock around every write: a keep-alive never lands inside another send, nor is
        # written while an event waits for the client to make room.
        lock = asyncio.Lock()
        # Owned here: cancelled and waited for before this returns, however it ends.
        ticker = asyncio.ensure_future(self._keep_alive(send, lock))
        try:
            async for chunk in self.body_iterator:
                async with lock:
                    self._sent = True
                    await send(_body(chunk))
        finally:
            ticker.cancel()
            # Its end, not its CancelledError; cancelled here too (the client gone), this
            # raises, and the ticker, cancelled, ends on the loop's next pass.
            await asyncio.wait((ticker,))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _keep_alive(self, send: Send, lock: asyncio.Lock) -> None:
        """Every ``keepalive_s / 2``: a keep-alive when nothing was sent since the last look."""
        period = self._keepalive_s / 2
        while True:
            await asyncio.sleep(period)
            if self._sent:
                self._sent = False
                continue
            async with lock:
                try:
                    await send(_body(KEEPALIVE))
                except Exception:
                    return  # the client is gone: the stream's own next send says so


def _body(chunk: bytes | str | memoryview) -> Message:
    data = chunk.encode() if isinstance(chunk, str) else chunk
    return {"type": "http.response.body", "body": data, "more_body": True}

"""Wrapping a ``grpc.aio`` method handler: a check before its behaviour runs, and one on
each message of a client stream (the interceptors of ``shoal.rpc.auth``,
``shoal.rpc.standby`` and ``shoal.rpc.decode``)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc

from shoal.rpc.status import Context

Check = Callable[[Any, Context], Awaitable[None]]
"""``check(request, context)``: aborts the call to refuse it. ``request`` is None for a
client stream's call (its messages go to ``each``)."""


async def _each(requests: AsyncIterator[Any], each: Check, context: Context) -> AsyncIterator[Any]:
    async for request in requests:
        await each(request, context)
        yield request


class DeferredAbort(Exception):
    """A check's refusal of a message of a bidirectional stream, raised where the messages
    are read, and sent as the call's status by the handler's own task (``stream_stream``).

    Why: a handler may read its messages in a task of its own while it writes answers
    (``ModelStreamInfer``). ``context.abort`` sends the status at once, from whichever task
    calls it: from the reader, while the handler's task wrote an answer, the client got
    INTERNAL ("Internal error from Core") instead of the check's status, now and then."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _DeferringContext:
    """``context`` whose ``abort`` raises :class:`DeferredAbort` instead of sending."""

    def __init__(self, context: Context) -> None:
        self._context = context

    async def abort(self, code: grpc.StatusCode, details: str = "", *_: Any) -> None:
        raise DeferredAbort(code, details)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def deferred(err: BaseException) -> DeferredAbort | None:
    """The :class:`DeferredAbort` that ``err`` is or holds (a TaskGroup's group of errors)."""
    if isinstance(err, DeferredAbort):
        return err
    if isinstance(err, BaseExceptionGroup):
        return next((d for e in err.exceptions if (d := deferred(e)) is not None), None)
    return None


def wrap_handler(
    handler: Any,
    before: Check,
    *,
    each: Check | None = None,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> Any:
    """``handler`` with ``before`` run ahead of its behaviour, ``each`` on every message of a
    client stream, and ``request_deserializer`` instead of its own (when given).

    The handlers of a ``grpc.aio`` server are coroutines and async generators (the stubs
    describe sync ones), hence ``Any``; a server-streaming one may be either (a coroutine
    writes its answers with ``context.write``), and is wrapped as what it is."""
    kw: dict[str, Any] = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }

    def stream(requests: Any, context: Context) -> Any:
        return requests if each is None else _each(requests, each, context)

    if handler.unary_unary is not None:
        uu = handler.unary_unary

        async def unary_unary(request: Any, context: Context) -> Any:
            await before(request, context)
            return await uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
    if handler.unary_stream is not None:
        us = handler.unary_stream

        if not inspect.isasyncgenfunction(us):  # it writes its answers with context.write

            async def unary_stream_writes(request: Any, context: Context) -> None:
                await before(request, context)
                await us(request, context)

            return grpc.unary_stream_rpc_method_handler(unary_stream_writes, **kw)

        async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            await before(request, context)
            async for item in us(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
    if handler.stream_unary is not None:
        su = handler.stream_unary

        async def stream_unary(requests: Any, context: Context) -> Any:
            await before(None, context)
            return await su(stream(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
    ss = handler.stream_stream
    assert ss is not None

    async def stream_stream(requests: Any, context: Context) -> AsyncIterator[Any]:
        await before(None, context)
        messages = (
            requests if each is None else _each(requests, each, cast(Context, _DeferringContext(context)))
        )
        try:
            async for item in ss(messages, context):
                yield item
        except BaseException as err:
            refused = deferred(err)
            if refused is None:
                raise
            await context.abort(refused.code, refused.details)

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)

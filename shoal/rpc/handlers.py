"""Wrapping a ``grpc.aio`` method handler: a check before its behaviour runs, and one on
each message of a client stream (the interceptors of ``shoal.rpc.auth``,
``shoal.rpc.standby`` and ``shoal.rpc.decode``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from shoal.rpc.status import Context

Check = Callable[[Any, Context], Awaitable[None]]
"""``check(request, context)``: aborts the call to refuse it. ``request`` is None for a
client stream's call (its messages go to ``each``)."""


async def _each(requests: AsyncIterator[Any], each: Check, context: Context) -> AsyncIterator[Any]:
    async for request in requests:
        await each(request, context)
        yield request


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
    describe sync ones), hence ``Any``."""
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
        async for item in ss(stream(requests, context), context):
            yield item

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)

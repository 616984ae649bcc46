"""Requests that are no message of their type are refused with INVALID_ARGUMENT.

grpc.aio decodes a request with the method's deserializer before the servicer runs; a
``DecodeError`` there (bytes that are no protobuf message, a string field that is not
UTF-8) escapes as UNKNOWN "Unexpected <class 'DecodeError'>", which reads as a server
fault. :class:`DecodeGuard` gives each method a deserializer that keeps such a request as
:class:`Undecodable`, and refuses it (or, in a client stream, the first such message) with
INVALID_ARGUMENT naming the message type, before the servicer sees it.

With a :class:`shoal.core.budget.ByteBudget`, ``ModelInfer`` holds its request's bytes
(the message's length) from before the message is parsed until its answer is written: a
message that finds no room is kept unparsed while it waits for room (parsed, a 60 MB
request costs another 60 MB and, on first reading its tensor, a third), or refused when
the queue for room is full. Forty 60 MB requests at once grew an ingress process to
12.8 GB without any bound, 6.5 GB with the data plane's alone (taken after the parse).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from shoal.core import budget as budgets
from shoal.core.budget import ByteBudget
from shoal.errors import InvalidArgument, ShoalError
from shoal.rpc.handlers import wrap_handler
from shoal.rpc.status import Context, abort

if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


#: The methods whose requests hold bytes of the budget from before they are parsed.
BUDGETED = frozenset({"/inference.GRPCInferenceService/ModelInfer"})


class _Sized:
    """A request of ``size`` bytes: parsed (``message``) when there was room as it came in,
    else kept as it came (``raw``) until there is."""

    __slots__ = ("message", "raw", "size")

    def __init__(self, size: int, message: Any = None, raw: bytes = b"") -> None:
        self.size = size
        self.message = message
        self.raw = raw


class Undecodable:
    """A request whose bytes did not decode: ``why`` says so."""

    def __init__(self, why: str) -> None:
        self.why = why


def _lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as err:
            return Undecodable(str(err) or "the request is no protobuf message")

    return decode


def model_name(message: Any, raw: bytes) -> str:
    """The request's ``model_name``: from the parsed message, else from the raw bytes when
    it is their first field (as protobuf writes it; "" otherwise), without parsing the rest."""
    if message is not None:
        return str(message.model_name)
    if len(raw) < 2 or raw[0] != 0x0A:  # field 1, length-delimited
        return ""
    length, shift, i = 0, 0, 1
    while i < len(raw) and i < 6:
        byte = raw[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return raw[i : i + min(length, 1024)].decode("utf-8", "replace")
        shift += 7
    return ""


def _sized(deserializer: Callable[[bytes], Any], budget: ByteBudget) -> Callable[[bytes], Any]:
    lenient = _lenient(deserializer)

    def decode(raw: bytes) -> Any:
        size = len(raw)
        if budget.room(size):
            message = lenient(raw)
            return message if type(message) is Undecodable else _Sized(size, message=message)
        return _Sized(size, raw=raw)

    return decode


async def _refuse(request: Any, context: Context) -> None:
    """Refuses an undecodable request, or message of a client stream."""
    if isinstance(request, Undecodable):
        await abort(context, InvalidArgument(f"the request does not decode: {request.why}"))


class DecodeGuard(_Interceptor):
    """See the module's docstring. Put it after the other interceptors (innermost): a
    caller they refuse is refused for that first."""

    def __init__(
        self, budget: ByteBudget | None = None, refused: Callable[[str, ShoalError], None] | None = None
    ) -> None:
        """``refused(model, error)``: told of a request the budget refused (to count and log it)."""
        self._budget = budget
        self._refused = refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        wrapped: grpc.RpcMethodHandler[Any, Any] = self.wrap(details.method, await continuation(details))
        return wrapped

    def wrap(self, method: str, handler: Any) -> Any:
        """``handler`` guarded (the same for every call of ``method``: ``shoal.rpc.server``
        wraps each method once, when it is registered)."""
        if handler is None or handler.request_deserializer is None:
            return handler
        if handler.unary_unary is not None:
            # The data plane's calls (ModelInfer): one coroutine, not wrap_handler's two.
            behaviour = handler.unary_unary
            if self._budget is not None and method in BUDGETED:
                return _budgeted(handler, self._budget, self._refused)

            async def unary_unary(request: Any, context: Context) -> Any:
                if type(request) is Undecodable:
                    await _refuse(request, context)
                return await behaviour(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return wrap_handler(
            handler, _refuse, each=_refuse, request_deserializer=_lenient(handler.request_deserializer)
        )


def _budgeted(handler: Any, budget: ByteBudget, refused: Callable[[str, ShoalError], None] | None) -> Any:
    behaviour = handler.unary_unary
    deserializer = handler.request_deserializer

    async def unary_unary(request: Any, context: Context) -> Any:
        if type(request) is Undecodable:
            await _refuse(request, context)
        size = request.size
        try:
            if not budget.try_take(size):
                left = context.time_remaining()
                await budget.take(size, budgets.DEFAULT_WAIT_S if left is None else max(0.0, left))
        except ShoalError as err:
            if refused is not None:
                refused(model_name(request.message, request.raw), err)
            # The abort's exception and this frame form a cycle that only a full collection
            # frees: without this, each refused request's bytes outlived it (1 GB after a
            # flood of 60 MB requests, most of them refused).
            request.raw, request.message = b"", None
            await abort(context, err)
        held = budgets.HELD.set(True)
        try:
            message = request.message
            if message is None:
                message = _lenient(deserializer)(request.raw)
                request.raw = b""
                if type(message) is Undecodable:
                    await _refuse(message, context)
            return await behaviour(message, context)
        finally:
            budgets.HELD.reset(held)
            budget.give(size)

    return grpc.unary_unary_rpc_method_handler(
        unary_unary,
        request_deserializer=_sized(deserializer, budget),
        response_serializer=handler.response_serializer,
    )

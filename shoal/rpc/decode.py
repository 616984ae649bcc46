"""Requests that are no message of their type are refused with INVALID_ARGUMENT.

grpc.aio decodes a request with the method's deserializer before the servicer runs; a
``DecodeError`` there (bytes that are no protobuf message, a string field that is not
UTF-8) escapes as UNKNOWN "Unexpected <class 'DecodeError'>", which reads as a server
fault. :class:`DecodeGuard` gives each method a deserializer that keeps such a request as
:class:`Undecodable`, and refuses it (or, in a client stream, the first such message) with
INVALID_ARGUMENT naming the message type, before the servicer sees it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from shoal.errors import InvalidArgument
from shoal.rpc.handlers import wrap_handler
from shoal.rpc.status import Context, abort

if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


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


async def _refuse(request: Any, context: Context) -> None:
    """Refuses an undecodable request, or message of a client stream."""
    if isinstance(request, Undecodable):
        await abort(context, InvalidArgument(f"the request does not decode: {request.why}"))


class DecodeGuard(_Interceptor):
    """See the module's docstring. Put it after the other interceptors (innermost): a
    caller they refuse is refused for that first."""

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

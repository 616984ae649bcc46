"""The one table between shoal's error codes and gRPC status codes."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
import grpc.aio

from shoal.errors import Code, ShoalError, from_code

TO_GRPC: dict[Code, grpc.StatusCode] = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}
Context = grpc.aio.ServicerContext[Any, Any]

FROM_GRPC: dict[grpc.StatusCode, Code] = {v: k for k, v in TO_GRPC.items()}
FROM_GRPC[grpc.StatusCode.CANCELLED] = Code.UNAVAILABLE
FROM_GRPC[grpc.StatusCode.UNKNOWN] = Code.INTERNAL
FROM_GRPC[grpc.StatusCode.UNIMPLEMENTED] = Code.INTERNAL
FROM_GRPC[grpc.StatusCode.ABORTED] = Code.UNAVAILABLE
FROM_GRPC[grpc.StatusCode.DATA_LOSS] = Code.INTERNAL
FROM_GRPC[grpc.StatusCode.OUT_OF_RANGE] = Code.INVALID_ARGUMENT


def to_error(err: grpc.aio.AioRpcError) -> ShoalError:
    """A failed call as shoal's error, keeping the peer's message."""
    code = FROM_GRPC.get(err.code(), Code.INTERNAL)
    return from_code(code, err.details() or err.code().name)


async def abort(context: Context, err: ShoalError) -> NoReturn:
    await context.abort(TO_GRPC[err.code], err.message)
    raise AssertionError("unreachable")  # context.abort raises

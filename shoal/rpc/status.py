"""The one table between shoal's error codes and gRPC status codes."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
import grpc.aio

from shoal.errors import Code, ReplicaGone, ShoalError, Unimplemented, from_code

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


GOING_METADATA = "shoal-going"
"""Trailing metadata on a replica's UNAVAILABLE that says it is going (ReplicaGone: draining
or stopped, it ran nothing): the scheduler retires it and retries elsewhere without
spending an attempt. The task streams carry the same as ``TaskOutcome.going``."""


def to_error(err: grpc.aio.AioRpcError) -> ShoalError:
    """A failed call as shoal's error, keeping the peer's message."""
    if err.code() == grpc.StatusCode.UNIMPLEMENTED:
        return Unimplemented(f"UNIMPLEMENTED: {err.details() or 'no such call'}")
    code = FROM_GRPC.get(err.code(), Code.INTERNAL)
    message = err.details() or err.code().name
    # grpc-stubs gives AioRpcError the sync error's _Metadatum; grpc.aio's are (key, value) pairs.
    trailing = tuple(err.trailing_metadata() or ())
    if code is Code.UNAVAILABLE and (GOING_METADATA, "1") in trailing:  # type: ignore[comparison-overlap]
        return ReplicaGone(message)
    return from_code(code, message)


#: The most bytes a status message takes in its trailer, where it travels percent-encoded
#: (each byte of a character past printable ASCII, and "%", as three). A client refuses
#: trailers over its metadata limit (8 KiB by default): a message quoting a 10,000-character
#: model name reached the client as RESOURCE_EXHAUSTED "received metadata size exceeds
#: soft limit", not as the NOT_FOUND it was.
MAX_DETAILS_BYTES = 6000


def details(message: str) -> str:
    """``message`` cut to fit MAX_DETAILS_BYTES once percent-encoded, saying how much was cut."""
    if len(message) * 3 <= MAX_DETAILS_BYTES:
        return message
    size = 0
    for i, char in enumerate(message):
        size += 1 if " " <= char <= "~" and char != "%" else 3 * len(char.encode(errors="replace"))
        if size > MAX_DETAILS_BYTES - 40:  # room for the note on what was cut
            return f"{message[:i]}... ({len(message) - i} more characters)"
    return message


STANDBY_METADATA = "shoal-standby"
"""Trailing metadata on a refusal that changed nothing (a standby's, a deposed head's): a
client may send the call to another head whatever it does."""


async def abort(context: Context, err: ShoalError) -> NoReturn:
    if err.nothing_done:
        context.set_trailing_metadata(((STANDBY_METADATA, "1"),))
    elif isinstance(err, ReplicaGone):
        context.set_trailing_metadata(((GOING_METADATA, "1"),))
    await context.abort(TO_GRPC[err.code], details(err.message))
    raise AssertionError("unreachable")  # context.abort raises

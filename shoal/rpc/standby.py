"""A standby head's gRPC answer: every call fails UNAVAILABLE, naming where the leader is,
but a blob ``Download`` (a head taking over fetches from a standby a blob it lacks).

UNAVAILABLE is the code shoal's clients retry and move on from, so a scheduler or CLI given
several head addresses (``--head a:8470,b:8470``) goes on to the next one. The leader's
address is also sent as trailing metadata ``shoal-leader`` for clients that want to go
straight there, and every refusal carries ``shoal-standby``: the call was not acted on, so
even one that must not be carried out twice (a delete) may go to another head.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from shoal.head.leader import Leadership, standby_error
from shoal.rpc.handlers import wrap_handler
from shoal.rpc.status import STANDBY_METADATA, Context, abort

LEADER_METADATA = "shoal-leader"
BLOB_DOWNLOAD = "/shoal.v1.Blob/Download"
"""The one call a standby answers: its copies of the blobs (``shoal.head.blob_mirror``)."""

if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class StandbyInterceptor(_Interceptor):
    """Refuses every call unless this head leads and has loaded its state (``serving``),
    but :data:`BLOB_DOWNLOAD` (the auth interceptor still checks it); a client stream is
    refused at its first message after this head stops serving.

    Put it before the auth interceptor: a standby has not loaded the tokens, and its answer
    holds no secret."""

    def __init__(self, leadership: Leadership) -> None:
        self._leadership = leadership

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        wrapped: grpc.RpcMethodHandler[Any, Any] = self.wrap(details.method, await continuation(details))
        return wrapped

    def wrap(self, method: str, handler: Any) -> Any:
        """``handler`` refused while this head does not serve (the same wrapper for every
        call: ``shoal.rpc.server`` wraps each method once, when it is registered)."""
        if handler is None or method == BLOB_DOWNLOAD:
            return handler  # a head taking over may fetch from a standby the blobs it lacks
        leadership = self._leadership

        async def check(_request: object, context: Context) -> None:
            if leadership.serving:
                return
            trailing = [(STANDBY_METADATA, "1")]
            if leadership.leader is not None:
                trailing.append((LEADER_METADATA, leadership.leader.grpc))
            context.set_trailing_metadata(tuple(trailing))
            await abort(context, standby_error(leadership))

        # Checked again on every message of a client stream (StreamHealth): a head that
        # stops leading ends the streams open to it on their next message.
        return wrap_handler(handler, check, each=check)

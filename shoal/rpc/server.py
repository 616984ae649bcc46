"""Starting gRPC servers: bind, report the port actually bound, stop with grace."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import grpc
import grpc.aio

from shoal.config import Settings
from shoal.core.budget import ByteBudget
from shoal.errors import ShoalError, Unavailable
from shoal.rpc.channels import channel_options
from shoal.rpc.decode import DecodeGuard


def new_server(
    settings: Settings,
    interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
    *,
    reuse_port: bool = False,
    budget: ByteBudget | None = None,
    refused: Callable[[str, ShoalError], None] | None = None,
) -> grpc.aio.Server:
    """A server with shoal's options. ``reuse_port``: the port is shared with other
    processes (a scheduler's ingress workers); otherwise a second bind of it fails.
    ``budget``: the data plane's bytes in flight, which ``ModelInfer`` holds from before
    it parses a request (:mod:`shoal.rpc.decode`); ``refused(model, error)`` counts and logs
    a request it refused."""
    options = [
        *channel_options(settings),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        # Accept the clients' keepalive pings (every 10 s, also when idle) instead
        # of answering them with GOAWAY "too_many_pings".
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        *connection_limits(settings),
    ]
    # Innermost: a request that does not decode is refused with INVALID_ARGUMENT, not UNKNOWN.
    chain = [*interceptors, DecodeGuard(budget, refused)]
    guards = [i for i in chain if isinstance(i, Guard)]
    if len(guards) == len(chain):
        return cast(grpc.aio.Server, GuardedServer(grpc.aio.server(options=options), guards))
    return grpc.aio.server(options=options, interceptors=chain)


def connection_limits(settings: Settings) -> list[tuple[str, int]]:
    """What bounds a server's connections, as HTTP's servers bound theirs: without these, a
    connection that never sent the HTTP/2 preface stayed open 120 s (gRPC's default), and
    20,000 of them took every file descriptor of a scheduler (and of the head in its process),
    so no call, gRPC or HTTP, was served until they closed."""
    options = [("grpc.server_handshake_timeout_ms", round(settings.grpc_handshake_timeout_s * 1000))]
    if settings.grpc_idle_timeout_s > 0:
        options.append(("grpc.max_connection_idle_ms", round(settings.grpc_idle_timeout_s * 1000)))
    if settings.grpc_max_connections > 0:
        options.append(("grpc.max_allowed_incoming_connections", settings.grpc_max_connections))
    return options


@runtime_checkable
class Guard(Protocol):
    """An interceptor whose wrapping depends on the method alone (shoal's own: auth,
    standby, decode): ``wrap(method, handler)`` is what ``intercept_service`` returns."""

    def wrap(self, method: str, handler: Any) -> Any: ...


class GuardedServer:
    """A ``grpc.aio.Server`` whose method handlers are wrapped by its guards once, when
    they are registered, instead of by interceptors on every call, and found by one
    lookup in a dict of all its methods.

    Why, from profiles of a scheduler's ingress under perf_analyzer (noop, c=32):
    - py-spy had grpc.aio's interceptor chain (a coroutine per interceptor, the auth rules
      scanned by prefix, the decode guard's wrapper built anew) at 5-7% of its samples.
    - cProfile: a quarter of the ingress's Python calls a request were one
      ``asyncio.wait`` over ~30 futures. grpc.aio's serving loop keeps a pending
      request-call future per registered method (``add_registered_method_handlers``; the
      scheduler's port has ~30 methods) and waits on all of them for every call that
      arrives. Methods are kept here instead and served through one generic handler: that
      loop then waits on one future.

    Same order as interceptors: the first guard is the outermost."""

    def __init__(self, server: grpc.aio.Server, guards: Sequence[Guard]) -> None:
        self._server = server
        self._guards = list(guards)
        self._methods: dict[str, Any] = {}
        self._others: list[_GuardedHandlers] = []
        server.add_generic_rpc_handlers((_Lookup(self._methods, self._others),))

    def _wrap(self, method: str, handler: Any) -> Any:
        for guard in reversed(self._guards):
            handler = guard.wrap(method, handler)
        return handler

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]) -> None:
        self._others.extend(_GuardedHandlers(h, self._wrap) for h in handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            method = f"/{service}/{name}"
            self._methods[method] = self._wrap(method, handler)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


if TYPE_CHECKING:
    _Generic = grpc.GenericRpcHandler[Any, Any]
else:
    _Generic = grpc.GenericRpcHandler

# Wrapped handlers kept per generic handler: one per method it answers; a handler that
# answers any name (none of shoal's does) is wrapped on each call past this many.
_MAX_KEPT = 256


class _Lookup(_Generic):
    """A :class:`GuardedServer`'s one generic handler: its methods by name, then the
    generic handlers that named none."""

    def __init__(self, methods: dict[str, Any], others: list[_GuardedHandlers]) -> None:
        self._methods = methods
        self._others = others

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = self._methods.get(handler_call_details.method)
        if handler is not None:
            return handler
        for other in self._others:
            handler = other.service(handler_call_details)
            if handler is not None:
                return handler
        return None


class _GuardedHandlers(_Generic):
    """A generic handler's answers, each method's wrapped once (kept per method it knows)."""

    def __init__(self, inner: grpc.GenericRpcHandler[Any, Any], wrap: Callable[[str, Any], Any]) -> None:
        self._inner = inner
        self._wrap = wrap
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is None or known[0] is not handler:
            known = (handler, self._wrap(method, handler))
            if len(self._wrapped) < _MAX_KEPT:
                self._wrapped[method] = known
        return known[1]


def bind(
    server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None = None
) -> int:
    """Bind ``host:port`` (port 0 picks a free one), with TLS when ``credentials`` are given
    (``shoal.rpc.tls.server_credentials``, made for this port alone: they follow renewed
    files per port); returns the bound port."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(target)
        else:
            bound = server.add_secure_port(target, credentials)
    except RuntimeError as err:
        raise Unavailable(f"cannot listen on {target}: {err}") from None
    if bound == 0:
        raise Unavailable(f"cannot listen on {target}: address in use or not available")
    return bound

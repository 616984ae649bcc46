"""Starting gRPC servers: bind, report the port actually bound, stop with grace."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

from shoal.config import Settings
from shoal.errors import Unavailable
from shoal.rpc.channels import channel_options
from shoal.rpc.decode import DecodeGuard


def new_server(
    settings: Settings,
    interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
    *,
    reuse_port: bool = False,
) -> grpc.aio.Server:
    """A server with shoal's options. ``reuse_port``: the port is shared with other
    processes (a scheduler's ingress workers); otherwise a second bind of it fails."""
    options = [
        *channel_options(settings),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        # Accept the clients' keepalive pings (every 10 s, also when idle) instead
        # of answering them with GOAWAY "too_many_pings".
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
    ]
    # Innermost: a request that does not decode is refused with INVALID_ARGUMENT, not UNKNOWN.
    return grpc.aio.server(options=options, interceptors=[*interceptors, DecodeGuard()])


def bind(
    server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None = None
) -> int:
    """Bind ``host:port`` (port 0 picks a free one), with TLS when ``credentials`` are given
    (``shoal.rpc.tls.server_credentials``); returns the bound port."""
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

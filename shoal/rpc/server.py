"""Starting gRPC servers: bind, report the port actually bound, stop with grace."""

from __future__ import annotations

import grpc.aio

from shoal.config import Settings
from shoal.errors import Unavailable
from shoal.rpc.channels import channel_options


def new_server(settings: Settings) -> grpc.aio.Server:
    options = [
        *channel_options(settings),
        ("grpc.so_reuseport", 0),
        # Accept the clients' keepalive pings (every 10 s, also when idle) instead
        # of answering them with GOAWAY "too_many_pings".
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]
    return grpc.aio.server(options=options)


def bind(server: grpc.aio.Server, host: str, port: int) -> int:
    """Bind ``host:port`` (port 0 picks a free one); returns the bound port."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(target)
    except RuntimeError as err:
        raise Unavailable(f"cannot listen on {target}: {err}") from None
    if bound == 0:
        raise Unavailable(f"cannot listen on {target}: address in use or not available")
    return bound

"""Starting gRPC servers: bind, report the port actually bound, stop with grace."""

from __future__ import annotations

import grpc.aio

from shoal.config import Settings
from shoal.errors import Unavailable
from shoal.rpc.channels import channel_options


def new_server(settings: Settings) -> grpc.aio.Server:
    return grpc.aio.server(options=[*channel_options(settings), ("grpc.so_reuseport", 0)])


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

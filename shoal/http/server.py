"""The HTTP server every component runs: uvicorn on a socket shoal binds itself."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn

from shoal import certs


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HttpServer:
    """uvicorn on a socket we bind ourselves, so port 0 works and the port is known."""

    def __init__(
        self, app: Any, host: str, port: int, tls: certs.Files | None = None, *, reuse_port: bool = False
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # several ingress processes share the port; the kernel spreads connections
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self.sock.bind((host, port))
        except OSError as err:
            self.sock.close()
            from shoal.errors import Unavailable

            raise Unavailable(f"cannot listen on {_addr(host, port)}: {err.strerror}") from None
        self.port = self.sock.getsockname()[1]
        # HTTPS with the component's certificate when TLS is on (no client certificate asked:
        # browsers and HTTP clients authenticate with tokens).
        self.scheme = "https" if tls is not None else "http"
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
            ssl_certfile=str(tls.cert) if tls is not None else None,
            ssl_keyfile=str(tls.key) if tls is not None else None,
        )
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="http")
        while not self.server.started and not self._task.done():
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task
        self.sock.close()

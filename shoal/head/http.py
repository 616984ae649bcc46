"""The head's HTTP surface: the REST API (``/api/...``)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from shoal.head.node import HeadNode, cluster_status


def head_app(node: HeadNode) -> Starlette:
    async def status(request: Request) -> JSONResponse:
        async with node.lock:
            return JSONResponse(cluster_status(node))

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/api/status", status), Route("/healthz", healthz)])

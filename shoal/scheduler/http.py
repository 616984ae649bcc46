"""The scheduler's HTTP ingress."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shoal.scheduler.node import SchedulerNode


def scheduler_app(node: SchedulerNode) -> Starlette:
    async def live(request: Request) -> Response:
        return Response(status_code=200)

    async def ready(request: Request) -> Response:
        return Response(status_code=200 if node.registered.is_set() else 503)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "scheduler": node.id})

    return Starlette(
        routes=[Route("/v2/health/live", live), Route("/v2/health/ready", ready), Route("/healthz", healthz)]
    )

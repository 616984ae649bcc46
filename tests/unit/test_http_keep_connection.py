"""What the HTTP server logs of an error its app raised after sending an answer."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shoal.http.server import _KeepConnection

pytestmark = pytest.mark.timeout(10)


def _fail() -> None:
    raise RuntimeError("a bug")


async def before(request: Request) -> Response:
    _fail()
    return Response()


async def after(request: Request) -> Response:
    return Response("done", background=BackgroundTask(_fail))


async def internal_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": f"internal error: {exc}"}, 500)


APP = _KeepConnection(
    Starlette(
        routes=[Route("/before", before), Route("/after", after)],
        exception_handlers={Exception: internal_error},
    )
)


@pytest.mark.parametrize(
    ("path", "status", "line"),
    [
        # Before: "error after answering GET /before", though the 500 was the error's answer.
        ("/before", 500, "GET /before failed, answered 500"),
        ("/after", 200, "error after answering GET /after (200)"),
    ],
)
async def test_the_log_says_whether_the_answer_was_the_errors(
    caplog: pytest.LogCaptureFixture, path: str, status: int, line: str
) -> None:
    transport = httpx.ASGITransport(app=APP, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://shoal") as http:
        reply = await http.get(path)

    assert reply.status_code == status
    assert [r.getMessage() for r in caplog.records if r.name == "shoal.http"] == [line]
    assert "RuntimeError: a bug" in caplog.text

"""schemathesis against the head's REST API: cases generated from its own OpenAPI schema
(``/openapi.json``), positive and negative, sent to the app (a real ``HeadNode`` on a
``MemoryStore``, fake schedulers) served by shoal's own HTTP server (``HttpServer``) on a
loopback port of this process, over one keep-alive connection, and each answer checked
against the schema: no 5xx, documented status codes, content types and bodies; and the
next request on the same connection is served.

``SHOAL_FUZZ_EXAMPLES`` sets the examples per test (see docs/security.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import example, given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from shoal.auth import Role
from shoal.config import Settings
from shoal.core.spec import parse_spec
from shoal.head.node import HeadNode
from shoal.http.head import head_app, openapi_schema
from shoal.http.server import HttpServer
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers
from tests.unit.fuzzing import fuzz_settings, still_served

pytestmark = pytest.mark.timeout(600)

FUZZ = fuzz_settings(40)
SCHEMA = schemathesis.openapi.from_dict(openapi_schema())
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@dataclass
class Head:
    loop: asyncio.AbstractEventLoop
    node: HeadNode
    client: httpx.AsyncClient
    admin: str

    def send(self, case: Any, token: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        kwargs = case.as_transport_kwargs(base_url=str(self.client.base_url), headers=headers)
        kwargs.pop("cookies", None)  # the API reads none
        if isinstance(kwargs.get("data"), str | bytes):
            kwargs["content"] = kwargs.pop("data")  # raw bodies (negative cases): httpx's name for them
        response = self.loop.run_until_complete(self.client.request(**kwargs))
        still_served(self.loop, self.client, response, "/healthz")
        return response


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    """The head's app with one token and one deployment, on a loop of its own."""
    loop = asyncio.new_event_loop()

    async def setup() -> Head:
        node = HeadNode(Settings(control_rate_limit=0, max_message_mb=1), MemoryStore(), FakeSchedulers())
        await node.tokens.load()
        _, admin = await node.create_token(Role.ADMIN, "root")
        await node.apply(parse_spec({"name": "echo", "backend": "python", "model": "m:M"}))
        server = HttpServer(head_app(node), "127.0.0.1", 0)
        await server.start()
        servers.append(server)
        client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{server.port}", limits=httpx.Limits(max_connections=1), timeout=30
        )
        return Head(loop, node, client, admin)

    servers: list[HttpServer] = []
    h = loop.run_until_complete(setup())
    yield h
    loop.run_until_complete(h.client.aclose())
    loop.run_until_complete(servers[0].stop())
    loop.run_until_complete(h.node.aclose())
    loop.close()


@FUZZ
@given(case=SCHEMA.as_strategy())
def test_valid_requests_follow_the_schema(head: Head, case: Any) -> None:
    response = head.send(case, head.admin)
    case.validate_response(response, checks=CHECKS)


@FUZZ
@given(case=SCHEMA.as_strategy(generation_mode=GenerationMode.NEGATIVE))
def test_invalid_requests_are_refused_with_4xx(head: Head, case: Any) -> None:
    response = head.send(case, head.admin)
    case.validate_response(response, checks=[*CHECKS, negative_data_rejection])


@FUZZ
@given(case=SCHEMA.as_strategy())
def test_requests_without_a_token_are_refused(head: Head, case: Any) -> None:
    for token in (None, "shoal_wrong"):
        response = head.send(case, token)
        assert response.status_code == 401, (case.operation.label, response.text)
        case.validate_response(response, checks=CHECKS)


def test_schema_is_served_and_describes_auth(head: Head) -> None:
    doc = head.loop.run_until_complete(head.client.get("/openapi.json")).json()
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for item in doc["paths"].values():
        for method, op in item.items():
            if method != "parameters":
                assert {"401", "403", "429"} <= set(op["responses"]), op["summary"]


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD"]),
    path=st.sampled_from(
        [
            "/",
            "/docs",
            "/api",
            "/openapi.json",
            "/healthz",
            "/metrics",
            "/static/{x}",
            "/api/deployments/{x}",
            "/api/replicas/{x}/logs?tail_bytes={y}",
            "/api/events?deployment={x}&limit={y}",
            "/api/series?window_s={y}",
        ]
    ),
    x=st.text(st.characters(codec=None, exclude_categories=()), max_size=8),
    y=st.sampled_from(["1e23", "-1", "nan", "99999999999999999999999", "0x10", ""])
    | st.text(max_size=6)
    | st.integers().map(str),
    body=st.binary(max_size=64),
)
@example(method="GET", path="/api/replicas/{x}/logs?tail_bytes={y}", x="\ud800", y="\udfff", body=b"")
def test_routes_outside_the_schema(head: Head, method: str, path: str, x: str, y: str, body: bytes) -> None:
    """The routes the schema leaves out (the dashboard, its files, health, the schema itself)
    and query values the schema's types do not generate: never a 5xx, and the connection
    serves the next request."""
    # A lone surrogate goes as its bytes (not UTF-8 the server must refuse): quote() itself
    # raised UnicodeEncodeError on one, failing the test before any request was sent.
    target = path.format(
        x=quote(x, safe="", errors="surrogatepass"), y=quote(y, safe="", errors="surrogatepass")
    )
    request = head.client.request(
        method, target, content=body, headers={"Authorization": f"Bearer {head.admin}"}
    )
    response = head.loop.run_until_complete(request)
    assert response.status_code < 500, (method, target, response.status_code, response.text[:300])
    still_served(head.loop, head.client, response, "/healthz")

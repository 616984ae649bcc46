"""schemathesis against the head's REST API: cases generated from its own OpenAPI schema
(``/openapi.json``), positive and negative, sent to the in-process app (a real ``HeadNode``
on a ``MemoryStore``, fake schedulers) through httpx's ASGI transport, and each answer
checked against the schema: no 5xx, documented status codes, content types and bodies.

``SHOAL_FUZZ_EXAMPLES`` sets the examples per test (see docs/security.md).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
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
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers

pytestmark = pytest.mark.timeout(600)

EXAMPLES = int(os.environ.get("SHOAL_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
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
        kwargs = case.as_transport_kwargs(base_url="http://head", headers=headers)
        kwargs.pop("cookies", None)  # the API reads none
        if isinstance(kwargs.get("data"), str | bytes):
            kwargs["content"] = kwargs.pop("data")  # raw bodies (negative cases): httpx's name for them
        return self.loop.run_until_complete(self.client.request(**kwargs))


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    """The head's app with one token and one deployment, on a loop of its own."""
    loop = asyncio.new_event_loop()

    async def setup() -> Head:
        node = HeadNode(Settings(control_rate_limit=0, max_message_mb=1), MemoryStore(), FakeSchedulers())
        await node.tokens.load()
        _, admin = await node.create_token(Role.ADMIN, "root")
        await node.apply(parse_spec({"name": "echo", "backend": "python", "model": "m:M"}))
        transport = httpx.ASGITransport(app=head_app(node))
        return Head(loop, node, httpx.AsyncClient(transport=transport, base_url="http://head"), admin)

    h = loop.run_until_complete(setup())
    yield h
    loop.run_until_complete(h.client.aclose())
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

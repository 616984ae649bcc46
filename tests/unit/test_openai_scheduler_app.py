"""The OpenAI API's errors through the scheduler's whole HTTP app (its guards, its own
404/405 and 500 handlers), not the OpenAI routes alone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

import httpx
import numpy as np
import pytest

from shoal.config import Settings
from shoal.core.spec import parse_spec
from shoal.http.scheduler import scheduler_app
from shoal.scheduler.node import SchedulerNode
from shoal.scheduler.router import Router
from shoal.testing.fakes import FakeReplicas
from shoal.types import Arrays, HeadLink

pytestmark = pytest.mark.timeout(10)


def nan_embedding(inputs: Arrays) -> Arrays:
    return {"embedding": np.full((len(inputs["text"]), 4), np.nan, dtype=np.float32)}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    fakes = FakeReplicas(handler=nan_embedding)
    router = Router("s1", Settings(), fakes, policy="round_robin")
    node = SchedulerNode(Settings(), "s1", cast(HeadLink, None), fakes, router=router)
    node.registered.set()
    spec = {"name": "emb", "backend": "transformers", "model": "m", "options": {"task": "embedding"}}
    router.add("emb-1", parse_spec(spec), "emb-1:1", "s1")
    transport = httpx.ASGITransport(app=scheduler_app(node), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://shoal") as client:
        yield client
    await router.aclose()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/foo", 404), ("POST", "/v1/models", 405), ("GET", "/v1/embeddings", 405)],
)
async def test_unknown_v1_paths_and_methods_answer_openais_shape(
    http: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    # Before: {"error": "Not Found: GET /v1/foo"}, a string where OpenAI's clients read an object.
    reply = await http.request(method, path)

    assert reply.status_code == status
    assert reply.json()["error"]["type"] == "invalid_request_error"


async def test_other_paths_keep_the_schedulers_format(http: httpx.AsyncClient) -> None:
    reply = await http.get("/v2/foo")

    assert reply.status_code == 404
    assert reply.json() == {"error": "Not Found: GET /v2/foo"}


async def test_a_nan_embedding_is_a_500_in_openais_shape(http: httpx.AsyncClient) -> None:
    reply = await http.post("/v1/embeddings", json={"model": "emb", "input": "hi"})

    assert reply.status_code == 500
    assert reply.json()["error"] == {
        "message": "model 'emb' answered non-finite values in output 'embedding'",
        "type": "server_error",
        "param": None,
        "code": "internal",
    }

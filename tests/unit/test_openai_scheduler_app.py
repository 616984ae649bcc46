"""The OpenAI API's errors through the scheduler's whole HTTP app (its guards, its own
404/405 and 500 handlers), not the OpenAI routes alone."""

from __future__ import annotations

import logging
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


CHAT = [{"role": "user", "content": "hi"}]
REFUSED = [
    ("gen", "/v1/chat/completions", {"model": "gen", "messages": CHAT, "logprobs": True}),
    ("gen", "/v1/chat/completions", {"model": "gen", "messages": CHAT, "stream": "yes"}),
    ("gen", "/v1/completions", {"model": "gen", "prompt": "hi", "max_tokens": -1}),
    ("gen", "/v1/embeddings", {"model": "gen", "input": "hi"}),  # it does not embed
    ("emb", "/v1/chat/completions", {"model": "emb", "messages": CHAT}),  # it does not generate
    ("emb", "/v1/embeddings", {"model": "emb", "input": ""}),
    ("gen", "/v2/models/gen/generate", {"text_input": 5}),
    ("gen", "/v2/models/gen/generate_stream", {"text_input": "hi", "parameters": []}),
    ("emb", "/v2/models/emb/generate", {"text_input": "hi"}),  # it does not generate
]


@pytest.mark.parametrize(("deployment", "path", "body"), REFUSED)
async def test_a_refusal_by_the_openai_or_generate_door_is_counted_and_logged(
    caplog: pytest.LogCaptureFixture, deployment: str, path: str, body: dict[str, object]
) -> None:
    """docs/operations.md: shoal_requests_total counts every request, refused ones included,
    whatever door it came in by. Before, these doors' own refusals of a known model (a
    parameter shoal does not take, a model of the wrong kind) were in neither the metrics,
    the dashboard's error rate nor the log; the REST and gRPC doors' were in all three."""
    caplog.set_level(logging.INFO, logger="shoal.dataplane")
    fakes = FakeReplicas()
    router = Router("s1", Settings(), fakes)
    node = SchedulerNode(Settings(), "s1", cast(HeadLink, None), fakes, router=router)
    node.registered.set()
    for name, task in (("emb", "embedding"), ("gen", "generation")):
        spec = {"name": name, "backend": "transformers", "model": "m", "options": {"task": task}}
        router.add(f"{name}-1", parse_spec(spec), f"{name}-1:1", "s1")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=scheduler_app(node)), base_url="http://shoal"
    ) as http:
        reply = await http.post(path, json=body)
    await router.aclose()

    assert reply.status_code == 400, reply.text
    assert router.stats()[deployment].outcomes["invalid"] == 1
    door = "openai" if path.startswith("/v1/") else "generate"
    assert [r for r in caplog.records if f"to {deployment} ({door}) refused" in r.getMessage()]
    assert not [c for c in fakes.clients.values() if c.requests or c.generations]  # no replica was asked


async def test_an_unknown_model_at_the_openai_door_is_logged_not_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="shoal.dataplane")
    router = Router("s1", Settings(), FakeReplicas())
    node = SchedulerNode(Settings(), "s1", cast(HeadLink, None), FakeReplicas(), router=router)
    node.registered.set()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=scheduler_app(node)), base_url="http://shoal"
    ) as http:
        reply = await http.post("/v1/chat/completions", json={"model": "nope\n1", "messages": CHAT})
    await router.aclose()
    assert reply.status_code == 404
    assert router.stats() == {}
    assert [r for r in caplog.records if "to nope\n1 (openai) refused" in r.getMessage()]

"""The REST inference route (``shoal.http.infer``), answered ahead of the Starlette app: what
a client sees at its edges is what the rest of the API gives (405 for another method, 404
for a path that is not a route, ``{"error": ...}`` JSON for every refusal, 500 JSON for a
bug with the connection kept), over fake replicas."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import pytest

from shoal.config import Settings
from shoal.http.scheduler import scheduler_app
from shoal.scheduler.dataplane import InferCall
from shoal.scheduler.node import SchedulerNode
from shoal.scheduler.router import Router
from shoal.testing.fakes import FakeReplicas
from shoal.types import HeadLink
from tests.unit.conftest import make_spec

pytestmark = pytest.mark.timeout(10)

TENSORS = [
    {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
    {"name": "u", "datatype": "UINT64", "shape": [-1]},
    {"name": "s", "datatype": "BYTES", "shape": [-1]},
]
BIG = 2**64 - 1  # UINT64's largest
DOC = {
    "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]},
        {"name": "u", "datatype": "UINT64", "shape": [1], "data": [7]},
        {"name": "s", "datatype": "BYTES", "shape": [1], "data": ["hé"]},
    ]
}


@pytest.fixture
async def node() -> AsyncIterator[SchedulerNode]:
    fakes = FakeReplicas()
    router = Router("s1", Settings(), fakes, policy="round_robin")
    node = SchedulerNode(Settings(max_message_mb=1), "s1", cast(HeadLink, None), fakes, router=router)
    node.registered.set()
    router.add("a", make_spec(inputs=TENSORS, outputs=TENSORS), "a:9000", "s1")
    yield node
    await router.aclose()


@pytest.fixture
async def http(node: SchedulerNode) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=scheduler_app(node), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://shoal") as client:
        yield client


async def test_json_in_json_out_by_name_and_by_version(http: httpx.AsyncClient) -> None:
    for path in ("/v2/models/echo/infer", "/v2/models/echo/versions/1/infer"):
        r = await http.post(path, json={**DOC, "id": "q"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        assert int(r.headers["content-length"]) == len(r.content)
        assert r.json()["id"] == "q" and r.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v2/models/echo/infer", 405),
        ("PUT", "/v2/models/echo/versions/1/infer", 405),
        ("POST", "/v2/models//infer", 404),
        ("POST", "/v2/models/echo/versions/1/2/infer", 404),
        ("POST", "/v3/models/echo/infer", 404),
    ],
)
async def test_what_is_not_an_inference_route_is_answered_by_the_app(
    http: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    r = await http.request(method, path, json=DOC)
    assert r.status_code == status
    assert path in r.json()["error"]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "message"),
    [
        ("/v2/models/nope/infer", b"{}", {}, 404, "nope"),
        ("/v2/models/echo/infer", b"[", {}, 400, "not valid JSON"),
        (
            "/v2/models/echo/infer",
            b"{}",
            {"content-encoding": "br"},
            400,
            "unsupported Content-Encoding 'br'",
        ),
        ("/v2/models/echo/infer", b"x" * (2 << 20), {}, 413, "over the limit of 1048576 bytes"),
        ("/v2/models/echo/infer", b"{}", {"inference-header-content-length": "9"}, 400, "Inference-Header"),
    ],
)
async def test_refusals_are_json_errors_naming_the_problem(
    http: httpx.AsyncClient, path: str, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    r = await http.post(path, content=body, headers=headers)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    assert message in r.json()["error"]


async def test_a_bug_is_a_500_json_error_and_is_logged(
    node: SchedulerNode,
    http: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(call: InferCall) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(node.dataplane, "infer", broken)
    with caplog.at_level(logging.ERROR, "shoal.http"):
        r = await http.post("/v2/models/echo/infer", json=DOC)
    assert (r.status_code, r.json()) == (500, {"error": "internal error: RuntimeError: a bug"})
    assert "a bug" in caplog.text


async def test_json_that_only_pythons_json_reads_is_read_and_written_as_before(
    http: httpx.AsyncClient,
) -> None:
    # NaN and Infinity (Triton writes them so), a UINT64 past INT64, text beyond ASCII.
    body = (
        '{"id": "null", "inputs": ['
        '{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [NaN, Infinity, -Infinity, 0.5]},'
        f'{{"name": "u", "datatype": "UINT64", "shape": [1], "data": [{BIG}]}},'
        '{"name": "s", "datatype": "BYTES", "shape": [1], "data": ["h\u00e9 null"]}]}'
    )
    r = await http.post("/v2/models/echo/infer", content=body)
    assert r.status_code == 200, r.text
    assert "NaN,Infinity,-Infinity,0.5" in r.text
    doc = r.json()
    assert doc["id"] == "null"
    assert [o["data"] for o in doc["outputs"][1:]] == [[BIG], ["hé null"]]
    # An integer past 64 bits where one is taken (orjson reads it as a float).
    r = await http.post(
        "/v2/models/echo/infer", content=json.dumps({**DOC, "parameters": {"timeout": BIG + 1}})
    )
    assert r.status_code == 200, r.text
    # Without them: the same answer.
    r = await http.post("/v2/models/echo/infer", json=DOC)
    assert r.status_code == 200, r.text
    assert [o["data"] for o in r.json()["outputs"]] == [[1.0, 2.0, 3.0, 4.0], [7], ["hé"]]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"id": "\\ud800", "inputs": []}', "'id' must be a string of valid Unicode"),
        (
            f'{{"inputs": [{{"name": "u", "datatype": "UINT64", "shape": [1], "data": [{BIG + 1}]}}]}}',
            f"UINT64 element 0 is {BIG + 1}, outside [0, {BIG}]",
        ),
        ('{"inputs": [}', "request body is not valid JSON"),
        ("[1]", "request JSON must be an object"),
    ],
    ids=["lone-surrogate", "past-uint64", "broken", "not-an-object"],
)
async def test_json_errors_name_the_problem(http: httpx.AsyncClient, body: str, message: str) -> None:
    r = await http.post("/v2/models/echo/infer", content=body)
    assert r.status_code == 400
    assert message in r.json()["error"]

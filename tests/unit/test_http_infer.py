"""The REST inference route (``shoal.http.infer``), answered ahead of the Starlette app: what
a client sees at its edges is what the rest of the API gives (405 for another method, 404
for a path that is not a route, ``{"error": ...}`` JSON for every refusal, 500 JSON for a
bug with the connection kept), over fake replicas."""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
import pytest

from shoal.config import Settings
from shoal.errors import BodyTooLarge, InvalidArgument
from shoal.http.coding import MAX_GZIP_MEMBERS
from shoal.http.infer import read_asgi_body
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


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[SchedulerNode]:
    """A scheduler over fake replicas: ``echo`` declares TENSORS, ``free`` declares none."""
    fakes = FakeReplicas()
    router = Router("s1", Settings(), fakes, policy="round_robin")
    node = SchedulerNode(settings, "s1", cast(HeadLink, None), fakes, router=router)
    node.registered.set()
    router.add("a", make_spec(inputs=TENSORS, outputs=TENSORS), "a:9000", "s1")
    router.add("b", make_spec("free"), "b:9000", "s1")
    try:
        yield node
    finally:
        await router.aclose()


@asynccontextmanager
async def client_of(node: SchedulerNode) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=scheduler_app(node), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://shoal") as client:
        yield client


@pytest.fixture
async def node() -> AsyncIterator[SchedulerNode]:
    async with serving(Settings(max_message_mb=1)) as node:
        yield node


@pytest.fixture
async def http(node: SchedulerNode) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(node) as client:
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
        # a timeout past float range was a 500 (OverflowError), one past 2^64 was taken
        *(
            (
                "/v2/models/echo/infer",
                b'{"inputs":[],"parameters":{"timeout":1' + b"0" * digits + b"}}",
                {},
                400,
                "parameter 'timeout' must be a non-negative integer (µs) below 2^64, got 1000",
            )
            for digits in (20, 310, 4000)
        ),
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
    # An integer past 64 bits where an integer is taken (orjson reads it as a float): json
    # reads it again, so the refusal (a timeout is a uint64) names the integer sent.
    r = await http.post(
        "/v2/models/echo/infer", content=json.dumps({**DOC, "parameters": {"timeout": BIG + 1}})
    )
    assert r.status_code == 400 and r.json()["error"].endswith(f"below 2^64, got {BIG + 1}"), r.text
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


def _receive_of(body: bytes) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


_TEXT = json.dumps(DOC).encode()


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        # RFC 1952 2.2: a gzip body is a series of members (``cat a.gz b.gz``)
        (gzip.compress(_TEXT[:40]) + gzip.compress(_TEXT[40:]), "gzip"),
        (gzip.compress(_TEXT[:10]) + gzip.compress(b"") + gzip.compress(_TEXT[10:]), "gzip"),
        (gzip.compress(_TEXT) + b"\0" * 8, "gzip"),  # zero padding, as gzip -d allows
        (zlib.compress(_TEXT), "deflate"),
        (gzip.compress(_TEXT), "x-gzip"),  # RFC 9110 8.4.1.3: the same as gzip; it was refused
    ],
)
async def test_every_gzip_member_of_a_body_is_read(body: bytes, encoding: str) -> None:
    assert await read_asgi_body(_receive_of(body), str(len(body)), encoding, 1 << 20) == _TEXT


@pytest.mark.parametrize(
    ("body", "encoding", "message"),
    [
        (gzip.compress(_TEXT) + b"junk", "gzip", "4 bytes after the end of its gzip data"),
        (zlib.compress(_TEXT) + b"junk", "deflate", "4 bytes after the end of its deflate data"),
        (zlib.compress(_TEXT) + zlib.compress(b"x"), "deflate", "after the end of its deflate data"),
        (gzip.compress(_TEXT) + gzip.compress(b"x")[:-3], "gzip", "truncated gzip data"),
        (gzip.compress(_TEXT) + b"\x1f\x8bnot gzip", "gzip", "not valid gzip data"),
        (gzip.compress(b"") * (MAX_GZIP_MEMBERS + 1), "gzip", f"over {MAX_GZIP_MEMBERS} gzip members"),
    ],
)
async def test_bytes_after_a_compressed_body_are_refused(body: bytes, encoding: str, message: str) -> None:
    """Before, they were dropped: a body read as its first gzip member alone, junk unseen."""
    with pytest.raises(InvalidArgument, match=message):
        await read_asgi_body(_receive_of(body), str(len(body)), encoding, 1 << 20)


async def test_later_gzip_members_count_toward_the_body_limit() -> None:
    body = gzip.compress(b" " * 600) + gzip.compress(b" " * 600)
    with pytest.raises(BodyTooLarge, match="decompresses to over the limit of 1000 bytes"):
        await read_asgi_body(_receive_of(body), str(len(body)), "gzip", 1000)


async def test_a_two_member_gzip_request_is_answered(http: httpx.AsyncClient) -> None:
    body = gzip.compress(_TEXT[:40]) + gzip.compress(_TEXT[40:])
    r = await http.post("/v2/models/echo/infer", content=body, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]


_HUGE = "n" * (1 << 20)  # a 1 MiB name
_X = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}


@pytest.mark.parametrize(
    ("model", "doc", "headers", "problem"),
    [
        ("echo", {"inputs": [_X, {**_X, "name": _HUGE}]}, {}, "; model 'echo' takes 'x', 'u', 's'"),
        ("free", {"inputs": [{**_X, "name": _HUGE}] * 2}, {}, " is given twice"),
        ("free", {"inputs": [{"name": _HUGE, "datatype": "FP32", "shape": [1]}]}, {}, ": no data: give"),
        (
            "free",
            {"inputs": [{**_X, "name": _HUGE, "parameters": {"shared_memory_region": "r"}}]},
            {},
            ": shared memory is not supported",
        ),
        ("echo", {**DOC, "outputs": [{"name": _HUGE}]}, {}, "; model 'echo' returns 'x', 'u', 's'"),
        ("free", {"inputs": [_X], "outputs": [{"name": _HUGE}] * 2}, {}, " is requested twice"),
        (
            "free",
            {"inputs": [_X], "outputs": [{"name": _HUGE, "parameters": {"binary_data": 1}}]},
            {},
            ": parameter 'binary_data' must be true or false, got 1",
        ),
        ("free", {"inputs": [_X], "parameters": {"binary_data_output": _HUGE}}, {}, "must be true or false"),
        ("free", {"inputs": [_X], "parameters": {"sequence_start": _HUGE}}, {}, "must be true or false"),
        ("free", {"inputs": [_X], "parameters": {"multiplexed_model_id": [_HUGE]}}, {}, "must be a string"),
        ("free", {"inputs": [_X]}, {"content-encoding": _HUGE}, "unsupported Content-Encoding"),
        ("free", {"inputs": [_X]}, {"content-length": _HUGE}, "Content-Length must be an integer"),
    ],
    ids=[
        "unknown-input",
        "input-twice",
        "input-without-data",
        "input-shared-memory",
        "unknown-output",
        "output-twice",
        "output-binary-data",
        "binary-data-output",
        "sequence-start",
        "model-id",
        "content-encoding",
        "content-length",
    ],
)
async def test_a_huge_client_string_is_quoted_cut_in_a_refusal(
    model: str, doc: dict[str, Any], headers: dict[str, str], problem: str
) -> None:
    """Before, the refusal quoted it whole: a 1 MiB tensor name came back in a 1 MiB error."""
    body = json.dumps(doc).encode()
    async with serving(Settings(max_message_mb=4, max_json_on_loop_kb=8192)) as node, client_of(node) as http:
        r = await http.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    assert r.status_code == 400, r.text[:300]
    assert len(r.content) < 2000, r.text[:300]
    message = r.json()["error"]
    assert problem in message and "more characters)" in message, message

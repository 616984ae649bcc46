"""The REST inference route (``shoal.http.infer``), answered ahead of the Starlette app: what
a client sees at its edges is what the rest of the API gives (405 for another method, 404
for a path that is not a route, ``{"error": ...}`` JSON for every refusal, 500 JSON for a
bug with the connection kept), over fake replicas."""

from __future__ import annotations

import gzip
import json
import logging
import threading
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
import pytest

from shoal.config import Settings
from shoal.errors import BodyTooLarge, InvalidArgument
from shoal.http import coding
from shoal.http.coding import MAX_GZIP_MEMBERS, negotiate
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
        # httpx asks for gzip by default: then Content-Length is the compressed body's
        r = await http.post(path, json={**DOC, "id": "q"}, headers={"Accept-Encoding": "identity"})
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


async def test_content_encoding_in_several_header_lines_is_one_list(http: httpx.AsyncClient) -> None:
    """RFC 9110 5.3: field lines of one name combine into a comma-separated list. Before,
    the last line alone was read: a gzip body sent with ``gzip`` then ``identity`` was read
    as it came (400 "not valid JSON"), and one compressed twice was decoded once."""
    body = gzip.compress(json.dumps(DOC).encode())
    lines = [("Content-Encoding", "gzip"), ("Content-Encoding", "identity")]
    r = await http.post("/v2/models/echo/infer", content=body, headers=lines)
    assert r.status_code == 200, r.text

    twice = gzip.compress(body)
    lines = [("Content-Encoding", "gzip"), ("Content-Encoding", "gzip")]
    r = await http.post("/v2/models/echo/infer", content=twice, headers=lines)
    assert r.status_code == 400, r.text
    assert (
        r.json()["error"]
        == "Content-Encoding 'gzip, gzip' applies 2 codings; shoal decodes one (gzip or deflate)"
    )


async def test_accept_encoding_in_several_header_lines_is_one_list(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, only the last line counted: ``gzip`` then ``br`` got no compression."""
    monkeypatch.setattr(coding, "MIN_BYTES", 0)  # DOC's answer is small
    lines = [("Accept-Encoding", "gzip"), ("Accept-Encoding", "br")]
    async with http.stream("POST", "/v2/models/echo/infer", json=DOC, headers=lines) as r:
        assert r.status_code == 200
        assert r.headers["content-encoding"] == "gzip"


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


# ---------------------------------------------------------------- compressed answers

_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


async def _raw_answer(
    http: httpx.AsyncClient, doc: dict[str, Any], accept: str
) -> tuple[httpx.Headers, bytes]:
    """The answer's headers and its body as it came (httpx decodes a compressed body)."""
    headers = {"Accept-Encoding": accept}
    async with http.stream("POST", "/v2/models/echo/infer", json=doc, headers=headers) as r:
        assert r.status_code == 200
        return r.headers, b"".join([chunk async for chunk in r.aiter_raw()])


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("accept", ["gzip", "deflate", "x-gzip", "br, deflate;q=0.5, gzip;q=0.9"])
async def test_an_answer_is_compressed_as_the_client_accepts(
    http: httpx.AsyncClient, accept: str, binary: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, Accept-Encoding was ignored: every answer went uncompressed."""
    monkeypatch.setattr(coding, "MIN_BYTES", 0)  # DOC's answer is small
    doc = {**DOC, "parameters": {"binary_data_output": binary}}
    plain_headers, plain = await _raw_answer(http, doc, "identity")
    headers, body = await _raw_answer(http, doc, accept)
    used = "deflate" if accept == "deflate" else "gzip"
    assert "content-encoding" not in plain_headers
    assert (headers["content-encoding"], headers["vary"]) == (used, "Accept-Encoding")
    assert int(headers["content-length"]) == len(body)
    assert zlib.decompress(body, _WBITS[used]) == plain
    # Triton's binary extension: the length of the JSON header in the uncompressed body
    length = headers.get("inference-header-content-length")
    assert length == plain_headers.get("inference-header-content-length")
    assert (length is not None) == binary
    header = json.loads(plain[: int(length)] if length else plain)
    assert [o["name"] for o in header["outputs"]] == ["x", "u", "s"]


@pytest.mark.parametrize(
    "accept", ["br", "gzip;q=0", "identity", "*;q=0", "gzip;q=0.5, identity", "gzip, deflate"]
)
async def test_an_answer_the_client_does_not_take_compressed_goes_as_it_is(
    http: httpx.AsyncClient, accept: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """And one under coding.MIN_BYTES (DOC's), whatever the client accepts: requests and
    httpx send "gzip, deflate" unasked, and zlib saves little of a few hundred bytes."""
    if accept != "gzip, deflate":
        monkeypatch.setattr(coding, "MIN_BYTES", 0)
    _, plain = await _raw_answer(http, DOC, "identity")
    headers, body = await _raw_answer(http, DOC, accept)
    assert "content-encoding" not in headers and headers["vary"] == "Accept-Encoding"
    assert body == plain


@pytest.mark.parametrize(
    ("accept", "used"),
    [
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("GZip ; Q=1.0", "gzip"),
        ("gzip, deflate, br, zstd", "gzip"),  # httpx's and curl's
        ("deflate, gzip", "gzip"),  # equal weights: gzip first
        ("deflate;q=0.9, gzip;q=0.8", "deflate"),
        ("gzip;q=0.001", "gzip"),
        ("gzip;q=0, deflate", "deflate"),
        ("*", "gzip"),
        ("*, gzip;q=0", "deflate"),
        ("*;q=0.5, identity;q=0.6", ""),
        ("identity, gzip", "gzip"),  # equal weights: compressed first
        ("gzip;q=0.5, identity", ""),
        ("x-gzip", "gzip"),
        ("", ""),
        ("br", ""),
        ("identity", ""),
        ("*;q=0", ""),  # nothing acceptable: uncompressed, rather than a 406
        ("gzip;q=2, deflate;q=abc, gzip;level=9", ""),  # not a weight: the entry is ignored
        (",,gzip;q=0.7,,", "gzip"),
    ],
)
def test_accept_encoding_weights_choose_the_coding(accept: str, used: str) -> None:
    assert negotiate(accept) == used


async def test_a_large_answer_is_compressed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over max_json_on_loop_kb, as a large JSON body is parsed off the loop."""
    threads: list[bool] = []
    encode = coding.encode

    def spy(body: bytes, used: str) -> bytes:
        threads.append(threading.current_thread() is threading.main_thread())
        return encode(body, used)

    monkeypatch.setattr(coding, "encode", spy)
    async with serving(Settings(max_json_on_loop_kb=2)) as node, client_of(node) as http:
        for rows in (64, 512):  # an answer of 1.2 KiB, then one of 8 KiB
            data = bytes(range(16)) * rows
            tensor = {"name": "x", "datatype": "FP32", "shape": [rows, 4]}
            header = json.dumps(
                {
                    "inputs": [{**tensor, "parameters": {"binary_data_size": len(data)}}],
                    "parameters": {"binary_data_output": True},
                }
            ).encode()
            r = await http.post(
                "/v2/models/free/infer",
                content=header + data,
                headers={"Inference-Header-Content-Length": str(len(header)), "Accept-Encoding": "gzip"},
            )
            assert r.status_code == 200, r.text
            assert r.headers["content-encoding"] == "gzip" and r.content.endswith(data)
    assert threads == [True, False]

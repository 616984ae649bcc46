"""A hostile web page against a head and a scheduler on loopback in plaintext, with no
token yet (the bootstrap window, when the head's own machine may change anything): the
requests a browser sends for a page of another site without asking first (no CORS
preflight), and those of a page whose name was pointed at 127.0.0.1 (DNS rebinding).

Before, the head answered ``POST /api/deployments`` with a JSON spec sent as
``text/plain`` from ``Origin: https://evil.example`` 201, and every request with
``Host: evil.example:8471`` as if it were its own page's."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest

from shoal.config import Settings
from shoal.head.node import HeadNode
from shoal.run import start_head, start_scheduler
from tests.unit import test_triton_python as triton_python

pytestmark = pytest.mark.timeout(60)

SPEC = '{"name": "pwn", "backend": "python", "model": "os:system", "replicas": 0}'
EVIL = "https://evil.example"


def settings(tmp_path: Path) -> Settings:
    return Settings(
        head_port=0,
        head_http_port=0,
        grpc_port=0,
        http_port=0,
        state_dir=str(tmp_path / "state"),
        heartbeat_interval_s=0.2,
        cpus=1,
        memory_mb=1000,
        gpus=0,
    )


@pytest.fixture
async def head(tmp_path: Path) -> AsyncIterator[tuple[HeadNode, httpx.AsyncClient]]:
    async with AsyncExitStack() as stack:
        node, _, http_address = await start_head(settings(tmp_path), stack)
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=f"http://{http_address}", timeout=10)
        )
        yield node, client


@pytest.mark.parametrize(
    ("method", "path", "body", "headers"),
    [
        # What a form or fetch(..., {mode: "no-cors"}) of another site sends.
        ("POST", "/api/deployments", SPEC, {"Content-Type": "text/plain", "Origin": EVIL}),
        (
            "POST",
            "/api/deployments",
            SPEC,
            {
                "Content-Type": "application/x-www-form-urlencoded",
                "Origin": EVIL,
                "Sec-Fetch-Site": "cross-site",
            },
        ),
        (
            "POST",
            "/api/deployments/echo/scale",
            '{"replicas": 3}',
            {"Content-Type": "text/plain", "Origin": "null"},
        ),
        ("POST", "/api/deployments/echo/restart", None, {"Origin": EVIL}),
        ("POST", "/api/deployments/echo/rollback", None, {"Sec-Fetch-Site": "same-site"}),
        # Another port of this machine is another origin (a dev server on localhost:3000).
        ("POST", "/api/deployments/echo/restart", None, {"Origin": "http://127.0.0.1:3000"}),
    ],
)
async def test_a_page_of_another_site_changes_nothing(
    head: tuple[HeadNode, httpx.AsyncClient],
    method: str,
    path: str,
    body: str | None,
    headers: dict[str, str],
) -> None:
    node, client = head
    r = await client.post("/api/deployments", json={"name": "echo", "backend": "python", "model": "m:M"})
    assert r.status_code == 201, r.text
    before = await seen(client)
    r = await client.request(method, path, content=body, headers=headers)
    assert r.status_code == 403, r.text
    assert "refusing" in r.json()["error"] and "page" in r.json()["error"], r.text
    assert set(node.desired) == {"echo"}
    assert await seen(client) == before


async def seen(client: httpx.AsyncClient) -> tuple[object, ...]:
    """What a change to ``echo`` would change: its spec, target and revisions."""
    found = (await client.get("/api/deployments/echo")).json()
    history = (await client.get("/api/deployments/echo/history")).json()
    return found["spec"], found["target_replicas"], history


async def test_a_change_must_be_sent_as_json(head: tuple[HeadNode, httpx.AsyncClient]) -> None:
    """A page may send a body as text/plain or a form to any site; JSON only after a
    preflight, which the head never grants. Without an Origin (a browser that sends none)
    a text or form body is refused all the same, naming what to send."""
    node, client = head
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = await client.post("/api/deployments", content=SPEC, headers={"Content-Type": kind})
        assert r.status_code == 400, (kind, r.text)
        assert "must be sent as Content-Type: application/json" in r.json()["error"], r.text
        assert kind in r.json()["error"]
    assert node.desired == {}


async def test_the_heads_own_pages_and_clients_still_change(head: tuple[HeadNode, httpx.AsyncClient]) -> None:
    """What the CLI-less clients send (curl, httpx: no Origin), and the API docs page's
    same-origin fetch (Origin of the head itself, Sec-Fetch-Site same-origin)."""
    node, client = head
    own = str(client.base_url).rstrip("/")
    spec = SPEC.replace("os:system", "m:M")
    json_type = {"Content-Type": "application/json; charset=utf-8"}
    r = await client.post("/api/deployments", content=spec, headers=json_type)
    assert r.status_code == 201, r.text
    for headers in ({"Origin": own}, {"Origin": own, "Sec-Fetch-Site": "same-origin"}):
        r = await client.post("/api/deployments/pwn/scale", json={"replicas": 0}, headers=headers)
        assert r.status_code == 200, r.text
        r = await client.post("/api/deployments/pwn/restart", headers=headers)
        assert r.status_code == 200, r.text
    r = await client.delete("/api/deployments/pwn", headers={"Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 200, r.text
    assert node.desired == {}


async def test_a_rebound_name_reaches_neither_head_nor_scheduler(tmp_path: Path) -> None:
    """A page at evil.example, its name pointed at 127.0.0.1, is same-origin with its own
    requests: only its Host header tells them apart. Loopback names still work."""
    async with AsyncExitStack() as stack:
        s = settings(tmp_path)
        node, head_address, head_http_address = await start_head(s, stack)
        _, _, scheduler_http_address = await start_scheduler(s, stack, head_address)
        head_http, scheduler_http = f"http://{head_http_address}", f"http://{scheduler_http_address}"
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=10))
        port = httpx.URL(head_http).port
        for base, path in ((head_http, "/api/status"), (scheduler_http, "/v2/health/live")):
            for host in (f"evil.example:{port}", "evil.example", "127.0.0.1.evil.example", "localhost.evil"):
                r = await client.get(base + path, headers={"Host": host})
                assert r.status_code == 403, (base, host, r.text)
                assert f"Host {host} is not a name of this machine's loopback" in r.json()["error"]
            for host in (f"localhost:{port}", "127.0.0.1", f"[::1]:{port}", "app.localhost", "LOCALHOST"):
                r = await client.get(base + path, headers={"Host": host})
                assert r.status_code == 200, (base, host, r.text)
        r = await client.post(
            head_http + "/api/deployments",
            content=SPEC,
            headers={"Host": f"evil.example:{port}", "Content-Type": "application/json"},
        )
        assert r.status_code == 403, r.text
        assert node.desired == {}


async def test_a_rebound_name_gets_no_bootstrap_from_a_head_on_every_address(tmp_path: Path) -> None:
    """A head on 0.0.0.0 in plaintext (``--insecure``) checks no Host, so a page rebound to
    127.0.0.1 reaches it from loopback, same-origin as far as its browser knows. Before, it
    was the head's own machine then, and while no token exists could deploy; now a caller
    on loopback is this machine only when its Host names loopback too."""
    async with AsyncExitStack() as stack:
        s = dataclasses.replace(settings(tmp_path), host="0.0.0.0", insecure=True)
        node, _, http_address = await start_head(s, stack)
        port = int(http_address.rsplit(":", 1)[1])
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10)
        )
        json = {"Content-Type": "application/json"}
        r = await client.post(
            "/api/deployments", content=SPEC, headers={**json, "Host": f"evil.example:{port}"}
        )
        assert r.status_code == 403, r.text
        assert node.desired == {}
        ok = SPEC.replace('"os:system"', '"echo.py:Echo"').replace("pwn", "mine")
        r = await client.post("/api/deployments", content=ok, headers={**json, "Host": f"localhost:{port}"})
        assert r.status_code == 201, r.text  # this machine's own caller: the bootstrap holds


async def test_a_repository_change_from_a_page_of_another_site_is_refused(tmp_path: Path) -> None:
    """A scheduler serving a Triton repository loads and unloads its models over HTTP
    (``/v2/repository/models/NAME/load``), and while no token exists its own machine may:
    as at the head, a change a page of another site makes the browser send is refused 403,
    and one whose body is declared as another type than JSON 400. Before, the 400 was
    missing there: a load sent as ``text/plain`` loaded the model."""
    repo = tmp_path / "models"
    (repo / "add_sub" / "1").mkdir(parents=True)
    (repo / "add_sub" / "config.pbtxt").write_text(triton_python.CONFIG)
    (repo / "add_sub" / "1" / "model.py").write_text(triton_python.MODEL)
    async with AsyncExitStack() as stack:
        s = dataclasses.replace(settings(tmp_path), model_repository=str(repo))
        node, head_address, _ = await start_head(s, stack)
        _, _, http_address = await start_scheduler(s, stack, head_address)
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=f"http://{http_address}", timeout=50)
        )
        load, unload = "/v2/repository/models/add_sub/load", "/v2/repository/models/add_sub/unload"
        for headers in (
            {"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"},
            {"Origin": EVIL, "Content-Type": "text/plain"},
            {"Origin": EVIL},
        ):
            r = await client.post(load, content="{}", headers=headers)
            assert r.status_code == 403, (headers, r.text)
            assert "a browser may change this server only from its own pages" in r.json()["error"]
        r = await client.post(load, content='{"parameters": {}}', headers={"Content-Type": "text/plain"})
        assert r.status_code == 400, r.text
        assert "the body must be sent as Content-Type: application/json" in r.json()["error"]
        assert node.desired == {}

        # Its own page, and a client that is no browser: loaded, served.
        own = {"Origin": f"http://{http_address}", "Sec-Fetch-Site": "same-origin"}
        r = await client.post(load, json={}, headers=own)
        assert r.status_code == 200, r.text
        assert list(node.desired) == ["add_sub"]
        r = await client.post(unload, content="{}", headers={"Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403, r.text
        assert (await client.get("/v2/models/add_sub/ready")).status_code == 200
        r = await client.post(unload)
        assert r.status_code == 200, r.text

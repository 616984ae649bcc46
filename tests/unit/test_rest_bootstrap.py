"""The head's REST API before the first token exists (issue 13, item 3): HTTPS asks for no
client certificate, so a caller on another machine may read but not change anything; on
the head's own machine (loopback) the bootstrap stays open, as does gRPC, where mutual TLS
vouches for the caller."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from shoal.auth import Role, check_control
from shoal.config import Settings
from shoal.errors import PermissionDenied
from shoal.head.node import HeadNode
from shoal.http.head import head_app
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers

pytestmark = pytest.mark.timeout(10)

SPEC = {"name": "echo", "backend": "python", "model": "echo:Echo", "replicas": 0}


@pytest.fixture
async def head(store: MemoryStore, fleet: FakeSchedulers) -> AsyncIterator[HeadNode]:
    node = HeadNode(Settings(), store, fleet)
    yield node
    await node.aclose()


@asynccontextmanager
async def rest(head: HeadNode, peer: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=head_app(head), client=(peer, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client


async def test_without_tokens_another_machine_may_read_but_not_change(head: HeadNode) -> None:
    async with rest(head, "203.0.113.9") as client:
        assert (await client.get("/api/status")).status_code == 200
        for method, path, body in (
            ("POST", "/api/deployments", SPEC),
            ("POST", "/api/deployments/echo/scale", {"replicas": 2}),
            ("DELETE", "/api/deployments/echo", None),
        ):
            r = await client.request(method, path, json=body)
            assert r.status_code == 403, (method, path)
            assert "no token exists yet" in r.json()["error"]
    assert head.desired == {}


async def test_without_tokens_the_heads_own_machine_may_change(head: HeadNode) -> None:
    for peer in ("127.0.0.1", "::1"):
        async with rest(head, peer) as client:
            # From loopback, but naming another host: a page whose name was pointed at
            # 127.0.0.1 (DNS rebinding), in this machine's browser. Not this machine's caller.
            r = await client.post("/api/deployments", json=SPEC, headers={"Host": "evil.example"})
            assert r.status_code == 403 and "no token exists yet" in r.text, r.text
    assert head.desired == {}
    for peer in ("127.0.0.1", "::1"):
        async with rest(head, peer) as client:
            r = await client.post("/api/deployments", json=SPEC)
            assert r.status_code in (200, 201), r.text
    assert set(head.desired) == {"echo"}


async def test_once_a_token_exists_a_deploy_token_works_from_anywhere(head: HeadNode) -> None:
    await head.create_token(Role.ADMIN, "ops")
    _, secret = await head.create_token(Role.DEPLOY, "ci")
    async with rest(head, "203.0.113.9") as client:
        assert (await client.post("/api/deployments", json=SPEC)).status_code == 401
        r = await client.post("/api/deployments", json=SPEC, headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 201


async def test_grpc_callers_vouched_for_by_their_transport_keep_the_bootstrap(store: MemoryStore) -> None:
    head = HeadNode(Settings(), store, FakeSchedulers())
    try:
        assert check_control(head.tokens, None, Role.DEPLOY, what="ApplyDeployment", loopback=False) is None
        with pytest.raises(PermissionDenied):
            check_control(head.tokens, None, Role.DEPLOY, what="x", loopback=False, vouched=False)
    finally:
        await head.aclose()

"""Client input to the head's REST API is answered 4xx, never 5xx (issue 13, item 8, for
the head's own routes)."""

from __future__ import annotations

import httpx
import pytest

from shoal.config import Settings
from shoal.head.node import HeadNode
from shoal.http.head import head_app
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize("tail", ["1e23", str(10**30), str(2**63), "-5", "nan", ""])
async def test_a_log_tail_out_of_range_is_400(store: MemoryStore, fleet: FakeSchedulers, tail: str) -> None:
    node = HeadNode(Settings(), store, fleet)
    try:
        transport = httpx.ASGITransport(app=head_app(node))
        async with httpx.AsyncClient(transport=transport, base_url="http://head") as client:
            r = await client.get(f"/api/replicas/r1/logs?tail_bytes={tail}")
        assert r.status_code == 400
        assert "tail_bytes must be an integer from 0 to" in r.json()["error"]
    finally:
        await node.aclose()


async def test_an_unknown_deployment_name_is_quoted_cut(store: MemoryStore, fleet: FakeSchedulers) -> None:
    """Before: a 5,000-character name came back whole in the 404."""
    node = HeadNode(Settings(), store, fleet)
    name = "d" * 5_000
    try:
        transport = httpx.ASGITransport(app=head_app(node))
        async with httpx.AsyncClient(transport=transport, base_url="http://head") as client:
            for r in (
                await client.get(f"/api/deployments/{name}"),
                await client.delete(f"/api/deployments/{name}"),
                await client.get(f"/api/deployments/{name}/history"),
            ):
                assert r.status_code == 404, r.text[:200]
                message = r.json()["error"]
                assert "(4802 more characters)" in message and len(message) < 300, message[:300]
    finally:
        await node.aclose()

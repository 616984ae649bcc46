"""Client input to the head's REST API is answered 4xx, never 5xx (issue 13, item 8, for
the head's own routes)."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest

from shoal.config import Settings
from shoal.core.placement import Capacity
from shoal.errors import InvalidArgument
from shoal.head.node import HeadNode
from shoal.http.head import head_app
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers
from shoal.types import SchedulerRegistration

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize("tail", ["1e23", str(10**30), str(2**63), "-5", "nan", ""])
async def test_a_log_tail_out_of_range_is_400(store: MemoryStore, fleet: FakeSchedulers, tail: str) -> None:
    node = HeadNode(Settings(), store, fleet)
    try:
        transport = httpx.ASGITransport(app=head_app(node))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
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
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
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


async def test_a_log_asked_for_by_an_id_no_replica_can_have_is_400_and_no_scheduler_is_asked(
    store: MemoryStore, fleet: FakeSchedulers
) -> None:
    """Before: the head sent any id, a path or 10,000 characters, to every live scheduler
    (this fake scheduler answers whatever it is asked), and a 404 quoted it whole."""
    node = HeadNode(Settings(), store, fleet)
    capacity = Capacity(cpus=1, memory_mb=100, gpus=0)
    await node.register_scheduler(SchedulerRegistration("s1", "10.0.0.1:1", "10.0.0.1:2", capacity, 1, "m"))
    ids = ["../../etc/passwd", "/etc/passwd", "a\x00b", "abc\n", "A", "x" * 10_000]
    fleet.client("s1", "10.0.0.1:1").logs.update(dict.fromkeys(ids, b"root:x:0:0"))
    try:
        for rid in ids:  # as ReadLog (gRPC, shoal logs) asks
            with pytest.raises(InvalidArgument, match="is no replica id"):
                await anext(node.read_log(rid, 100, False))
        transport = httpx.ASGITransport(app=head_app(node))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            for rid in ids:
                r = await client.get(f"/api/replicas/{quote(rid, safe='')}/logs")
                # An id with a '/' matches no route (404); any other is refused by the head.
                assert r.status_code == (404 if "/" in rid else 400), (rid[:20], r.text[:200])
                message = r.json()["error"] if r.status_code == 400 else ""
                assert r.status_code == 404 or ("is no replica id" in message and len(message) < 400)
    finally:
        await node.aclose()

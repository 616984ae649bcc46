"""The head's bounds on what clients create, set in its environment, over real gRPC and
HTTP: a create past one is refused naming the setting, and a client's retry is not invited."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from shoal.core.spec import parse_spec
from shoal.errors import ResourceExhausted
from shoal.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(60)


async def test_a_deployment_past_max_deployments_is_refused_over_grpc_and_rest(tmp_path: Path) -> None:
    async with ProcessCluster(tmp_path, schedulers=0, env={"SHOAL_MAX_DEPLOYMENTS": "1"}) as cluster:
        idle = {"backend": "python", "model": "m:M", "replicas": 0}
        await cluster.deploy({"name": "a", **idle})
        with pytest.raises(
            ResourceExhausted, match=r"^the head holds 1 deployments, its limit \(setting max_deployments\)"
        ):
            await cluster.deploy({"name": "b", **idle})
        assert cluster.head is not None
        async with httpx.AsyncClient(base_url=f"http://{cluster.head.endpoints['head_http']}") as rest:
            answer = await rest.post("/api/deployments", json={"name": "b", **idle})
            assert answer.status_code == 409, answer.text
            assert "setting max_deployments" in answer.json()["error"]
            assert [d["name"] for d in (await rest.get("/api/deployments")).json()] == ["a"]
        await cluster.client.apply(parse_spec({"name": "a", **idle, "options": {"v": 2}}))  # an update
        await cluster.client.delete("a")
        await cluster.deploy({"name": "b", **idle})

"""The head's bounds on what clients create, set in its environment, over real gRPC and
HTTP: a create past one is refused naming the setting, and a client's retry is not invited."""

from __future__ import annotations

import asyncio
import signal
import time
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


async def test_a_scheduler_past_max_schedulers_waits_for_a_place_and_joins_when_one_dies(
    tmp_path: Path,
) -> None:
    async with ProcessCluster(tmp_path, schedulers=1, env={"SHOAL_MAX_SCHEDULERS": "1"}) as cluster:
        first = await cluster.wait_for(lambda s: len(s["schedulers"]) == 1, what="the first scheduler")
        second = await asyncio.to_thread(cluster.add_scheduler)
        deadline = time.monotonic() + 15
        while "setting max_schedulers" not in second.log.read_text():
            assert time.monotonic() < deadline, second.log.read_text()[-2000:]
            await asyncio.sleep(0.1)
        line = next(x for x in second.log.read_text().splitlines() if "setting max_schedulers" in x)
        assert "the head refused this scheduler: the head holds 1 live schedulers" in line
        assert line.endswith("or raise max_schedulers; trying again every 0.2s")
        assert [s["id"] for s in (await cluster.status())["schedulers"]] == [first["schedulers"][0]["id"]]

        cluster.schedulers[0].signal(signal.SIGKILL)  # declared dead: its place goes to the second
        status = await cluster.wait_for(
            lambda s: (
                [x["state"] for x in s["schedulers"]] == ["ALIVE"]
                and s["schedulers"][0]["id"] != first["schedulers"][0]["id"]
            ),
            what="the second scheduler registered",
        )
        assert "the head has room for this scheduler now" in second.log.read_text()
        assert any("forgotten to make room" in e["message"] for e in status["events"])

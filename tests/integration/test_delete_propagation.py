"""A deleted deployment is gone from every scheduler at once, while its replicas drain.

Before, a scheduler that still had a draining replica of it kept the deployment: requests
waited for a replica that would never take them and answered 504 after 60 s, and the
model stayed in the repository index.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from shoal.testing.cluster import ProcessCluster
from shoal.testing.gate import entered, gate_model, hold, release
from shoal.testing.wait import until

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio]

BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


async def test_a_deleted_deployment_answers_404_everywhere_within_a_second(
    tmp_path: Path,
) -> None:
    async with ProcessCluster(tmp_path, schedulers=2) as cluster:
        folder = tmp_path / "gate"
        # A held answer, so the replica is still draining when the delete lands.
        spec = {"name": "echod", **gate_model(folder), "replicas": 1, "resources": {"cpus": 0.1}}
        await cluster.deploy(spec)
        await cluster.wait_ready("echod", 1)
        urls = [f"http://{cluster.http_address(i)}" for i in range(2)]
        async with httpx.AsyncClient(timeout=30) as http:
            for url in urls:  # both schedulers route to it (one over the network)
                assert (await http.post(f"{url}/v2/models/echod/infer", json=BODY)).status_code == 200
            # A slow request on the scheduler that runs the replica, in flight at the delete.
            status = await cluster.status()
            [host] = [
                r["scheduler"] for d in status["deployments"] if d["name"] == "echod" for r in d["replicas"]
            ]
            [home] = [f"http://{s['http_address']}" for s in status["schedulers"] if s["id"] == host]
            hold(folder)
            in_flight = asyncio.create_task(http.post(f"{home}/v2/models/echod/infer", json=BODY))
            await until(lambda: entered(folder), "the request in the model")
            await cluster.client.delete("echod")
            deleted_at = time.monotonic()
            for url in urls:
                while True:
                    # A request that beats the delete to this scheduler is routed to the
                    # replica, where it waits behind the held one: not an answer yet.
                    try:
                        r = await http.post(f"{url}/v2/models/echod/infer", json=BODY, timeout=0.5)
                    except httpx.TimeoutException:
                        assert time.monotonic() - deleted_at < 5, (url, "no answer")
                        continue
                    if r.status_code == 404:
                        break
                    assert time.monotonic() - deleted_at < 5, (url, r.status_code, r.text)
                    await asyncio.sleep(0.05)
                index = (await http.post(f"{url}/v2/repository/index")).json()
                assert "echod" not in [m["name"] for m in index]
            took = time.monotonic() - deleted_at
            # The request that was on the replica when it was deleted still gets its answer.
            assert not in_flight.done()
            release(folder)
            assert (await in_flight).status_code == 200
    assert took < 2.0, f"404 everywhere took {took:.2f}s after the delete"

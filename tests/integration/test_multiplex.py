"""Model multiplexing with real replicas (issue 18, item 1): two replicas holding two model ids
each serve five ids; each id stays on the replica that loaded it, the least recently used id
is evicted when a full replica gets a new one, and /metrics counts loads, evictions and hits
per model id."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import pytest

from shoal.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(90)

MODELS = '''
import os

import numpy as np


class Tenants:
    """One tiny model per customer: model id ``tN`` multiplies by N."""

    def load_model(self, model_id):
        return Tenant(float(model_id[1:]))


class Tenant:
    def __init__(self, scale):
        self.scale = scale

    def predict(self, inputs):
        x = inputs["x"]
        return {"y": x * self.scale, "pid": np.full(len(x), os.getpid(), dtype=np.int64)}
'''


def counts(text: str, family: str) -> dict[str, float]:
    pattern = rf'^{family}_total\{{deployment="tenants",model_id="([^"]+)"\}} (\S+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.MULTILINE)}


async def deploy_tenants(
    cluster: ProcessCluster, models: Path, code: str, replicas: int, **spec: float
) -> None:
    """Deploy ``code``'s ``Tenants`` as deployment ``tenants``, two model ids per replica
    (``load_timeout_s`` goes in its ``multiplexing``), and wait for its replicas."""
    models.mkdir()
    (models / "tenants.py").write_text(code)
    mux: dict[str, float] = {"max_models_per_replica": 2}
    if "load_timeout_s" in spec:
        mux["load_timeout_s"] = spec.pop("load_timeout_s")
    base = {"name": "tenants", "backend": "python", "model": "tenants:Tenants", "base_dir": str(models)}
    await cluster.deploy(
        {**base, "replicas": replicas, "resources": {"cpus": 0.1}, "multiplexing": mux, **spec}
    )
    await cluster.wait_ready("tenants", replicas)


async def test_ids_stay_on_their_replica_and_the_least_recent_is_evicted(tmp_path: Path) -> None:
    async with ProcessCluster(tmp_path / "cluster") as cluster:
        await deploy_tenants(cluster, tmp_path / "models", MODELS, replicas=2)
        base = f"http://{cluster.http_address()}"
        async with httpx.AsyncClient(base_url=base, timeout=20) as http:

            async def infer(model_id: str) -> int:
                body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [2.0]}]}
                r = await http.post(
                    "/v2/models/tenants/infer", json=body, headers={"shoal-multiplexed-model-id": model_id}
                )
                assert r.status_code == 200, r.text
                outputs = {o["name"]: o["data"] for o in r.json()["outputs"]}
                assert outputs["y"] == [2.0 * float(model_id[1:])]  # its own model answered
                return int(outputs["pid"][0])

            # Three ids, five requests each: one load per id, the rest hits, each on one replica.
            served: dict[str, set[int]] = {}
            for _ in range(5):
                for model_id in ("t1", "t2", "t3"):
                    served.setdefault(model_id, set()).add(await infer(model_id))
            assert all(len(pids) == 1 for pids in served.values()), served
            assert len(set.union(*served.values())) == 2  # new ids spread over both replicas

            # Two more: the replica with a free slot takes the first; the second finds both full,
            # and the replica it goes to evicts its least recently used id.
            for model_id in ("t4", "t5"):
                await infer(model_id)

            # The counts come with each replica's pings (every 0.2 s here): wait for all 15 + 2.
            deadline = time.monotonic() + 10
            while True:
                text = (await http.get("/metrics")).text
                seen = sum(counts(text, "shoal_multiplexed_model_loads").values())
                seen += sum(counts(text, "shoal_multiplexed_model_hits").values())
                if seen >= 17:
                    break
                assert time.monotonic() < deadline, f"17 loads and hits not in /metrics:\n{text}"
                await asyncio.sleep(0.1)
        assert counts(text, "shoal_multiplexed_model_loads") == {f"t{i}": 1.0 for i in range(1, 6)}
        evictions = counts(text, "shoal_multiplexed_model_evictions")
        assert sum(evictions.values()) == 1.0
        assert set(evictions) <= {"t1", "t2", "t3"}
        assert counts(text, "shoal_multiplexed_model_hits") == {"t1": 4.0, "t2": 4.0, "t3": 4.0}


SLOW_MODELS = '''
import os
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


class Tenants:
    """Model id ``stuck`` loads only once the file ``release`` exists (a network share that
    does not answer); any other id loads at once."""

    def load_model(self, model_id):
        if model_id == "stuck":
            (HERE / "stuck-started").touch()
            deadline = time.monotonic() + 60
            while not (HERE / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return Tenant(model_id)


class Tenant:
    def __init__(self, model_id):
        self.model_id = model_id

    def predict(self, inputs):
        return {"pid": np.full(len(inputs["x"]), os.getpid(), dtype=np.int64)}
'''


async def test_a_stuck_load_holds_up_no_other_id_and_is_answered_past_its_bound(tmp_path: Path) -> None:
    """One replica, two slots. Before: model id ``stuck``'s load held the replica's one lock,
    so a request for ``t2`` waited the whole deadline (20 s here) for it. Now ``t2`` loads
    in the other slot at once; ``stuck``'s request is answered UNAVAILABLE once its load
    runs past ``load_timeout_s``, and once that load returns the id is served."""
    models = tmp_path / "models"
    async with ProcessCluster(tmp_path / "cluster") as cluster:
        await deploy_tenants(cluster, models, SLOW_MODELS, replicas=1, timeout_s=20, load_timeout_s=2)
        base = f"http://{cluster.http_address()}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:

            async def infer(model_id: str) -> httpx.Response:
                body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
                headers = {"shoal-multiplexed-model-id": model_id}
                return await http.post("/v2/models/tenants/infer", json=body, headers=headers)

            stuck = asyncio.create_task(infer("stuck"))
            deadline = time.monotonic() + 10
            while not (models / "stuck-started").exists():
                assert time.monotonic() < deadline, "the load of 'stuck' did not begin"
                await asyncio.sleep(0.05)
            started = time.monotonic()
            r = await infer("t2")
            assert r.status_code == 200, r.text
            assert time.monotonic() - started < 5  # not the 20 s deadline

            r = await stuck
            assert r.status_code == 503, r.text
            assert "model id 'stuck' did not load within 2s (multiplexing.load_timeout_s)" in r.text

            (models / "release").touch()
            deadline = time.monotonic() + 10
            while (r := await infer("stuck")).status_code != 200:
                assert r.status_code == 503 and "did not load within 2s" in r.text, r.text
                assert time.monotonic() < deadline, r.text
                await asyncio.sleep(0.1)

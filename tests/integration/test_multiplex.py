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


async def test_ids_stay_on_their_replica_and_the_least_recent_is_evicted(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tenants.py").write_text(MODELS)
    async with ProcessCluster(tmp_path / "cluster") as cluster:
        await cluster.deploy(
            {
                "name": "tenants",
                "backend": "python",
                "model": "tenants:Tenants",
                "base_dir": str(models),
                "replicas": 2,
                "resources": {"cpus": 0.1},
                "multiplexing": {"max_models_per_replica": 2},
            }
        )
        await cluster.wait_ready("tenants", 2)
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

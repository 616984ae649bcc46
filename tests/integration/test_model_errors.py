"""A model's exception as a client sees it, through a real scheduler and replica: its
message cut at the replica, once, saying how much was left out (``limits.error_text``).

Before, a python model raising ``ValueError("x" * 5_000_000)`` had the whole message built
into the request's error; the replica cut it to fit a gRPC trailer (5,984 characters), and
the scheduler cut that again, so that a gRPC client read ``... (29 more characters)`` of a
message 5,000,000 long, while an HTTP client got 6,001 bytes."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from shoal.errors import Internal
from shoal.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(60)

MODEL = """
class Loud:
    def predict(self, inputs):
        raise ValueError("x" * 5_000_000)
"""


async def test_a_models_huge_exception_message_reaches_clients_cut_once(tmp_path: Path) -> None:
    (tmp_path / "loud.py").write_text(MODEL)
    async with ProcessCluster(tmp_path / "cluster") as cluster:
        await cluster.deploy(
            {
                "name": "loud",
                "backend": "python",
                "model": "loud:Loud",
                "base_dir": str(tmp_path),
                "resources": {"cpus": 0.1},
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
                "outputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
            }
        )
        await cluster.wait_ready("loud", 1)
        expected = "model raised ValueError: " + "x" * 2000 + "... (4998000 more characters)"

        with pytest.raises(Internal) as failed:
            await cluster.send("loud", {"x": np.ones(2, np.float32)})
        assert str(failed.value) == expected

        async with httpx.AsyncClient(base_url=f"http://{cluster.http_address()}") as http:
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}
            answer = await http.post("/v2/models/loud/infer", json=body)
        assert answer.status_code == 500
        assert answer.json() == {"error": expected}

        logs = [p for p in (tmp_path / "cluster").rglob("*.log")]
        assert max(len(line) for p in logs for line in p.read_text(errors="replace").splitlines()) < 3000

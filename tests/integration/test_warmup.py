"""Warmup in real replicas (``warmup:`` in a spec), on port 0: the model is called that
many times on inputs the replica makes before the replica is READY, and a warmup call that
fails keeps the replica from starting, saying which call and why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.testing.cluster import ProcessCluster
from tests.integration.test_zygote import until_event

pytestmark = pytest.mark.timeout(90)

COUNTING = '''
from pathlib import Path

import numpy as np


class Counting:
    """Echoes ``x``, writing each call's input to calls.txt beside it; refuses all-zero
    inputs when ``picky`` (a model that cannot take the warmup's zeros)."""

    def __init__(self, picky: bool = False) -> None:
        self.picky = picky
        self.calls = Path(__file__).with_name("calls.txt")

    def predict(self, inputs):
        x = inputs["x"]
        with self.calls.open("a") as f:
            f.write(f"{x.shape} {x.sum():g}\\n")
        if self.picky and not x.any():
            raise ValueError("all zeros: nothing to predict from")
        return {"x": x}
'''


def spec(folder: Path, name: str, **extra: Any) -> dict[str, Any]:
    (folder / "counting.py").write_text(COUNTING)
    return {
        "name": name,
        "backend": "python",
        "model": "counting:Counting",
        "base_dir": str(folder),
        "replicas": 1,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "resources": {"cpus": 0.1},
        **extra,
    }


async def test_a_replica_warms_up_before_it_is_ready(tmp_path: Path) -> None:
    warm = tmp_path / "warm"
    warm.mkdir()
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(spec(warm, "warm", warmup=3))
        [replica] = await cluster.wait_ready("warm", 1)
        # Three calls on one row of zeros, before any request.
        assert (warm / "calls.txt").read_text().splitlines() == ["(1, 4) 0"] * 3
        log = (cluster.schedulers[0].state / "logs" / f"replica_{replica['id']}.log").read_text()
        assert "model warmed up with 3 call(s): the first took" in log

        x = np.ones((1, 4), dtype=np.float32)
        outputs, _ = await cluster.send("warm", {"x": x})
        np.testing.assert_array_equal(outputs["x"], x)
        assert (warm / "calls.txt").read_text().splitlines()[3:] == ["(1, 4) 4"]


async def test_a_warmup_call_that_fails_keeps_the_replica_from_starting(tmp_path: Path) -> None:
    picky = tmp_path / "picky"
    picky.mkdir()
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(spec(picky, "picky", warmup=2, options={"picky": True}))
        # The head's event: "replica picky-... died: process exited with code 1:
        # warmup call 1 of 2 failed: INTERNAL: model raised ValueError:
        # all zeros: nothing to predict from".
        await until_event(cluster, "warmup call 1 of 2 failed")
        await until_event(cluster, "all zeros: nothing to predict from")
        status = await cluster.status()
        [dep] = [d for d in status["deployments"] if d["name"] == "picky"]
        assert not [r for r in dep["replicas"] if r["state"] == "READY"]

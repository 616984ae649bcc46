"""While a scheduler shuts down, the head places new replicas on the others, and the
deployment does not back off for it. Real processes on port 0.

Before, the head placed a replica on a scheduler shutting down (the emptiest), its create
was refused, and the deployment backed off (1 s, then 2 s, ...) until the head declared
that scheduler dead: ``shoal deploy`` meanwhile failed on "its replicas fail to start (2
times in a row): this scheduler is shutting down", though another scheduler had room."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import numpy as np
import pytest

import shoal
from shoal.rpc.clients import NativeClient
from shoal.testing.cluster import ProcessCluster
from shoal.testing.gate import entered, gate_model, hold, release
from shoal.testing.wait import until

pytestmark = pytest.mark.timeout(60)

ECHO = """
class Echo:
    def predict(self, inputs):
        return inputs
"""


async def test_a_deploy_while_a_scheduler_shuts_down_goes_to_another(tmp_path: Path) -> None:
    folder = tmp_path / "gate"
    (tmp_path / "echo.py").write_text(ECHO)
    # The second scheduler is the emptiest: placement's first choice. Its shutdown waits for
    # the request held in its replica (a grace of 30 s), the whole test long.
    args = [["--cpus", "1"], ["--cpus", "2"]]
    env = {"SHOAL_SHUTDOWN_GRACE_S": "30"}
    async with ProcessCluster(tmp_path, schedulers=2, scheduler_args=args, env=env) as cluster:
        # Both registered first: placed before the second had, the replica went to the first.
        for _ in range(200):
            if len((await cluster.status())["schedulers"]) == 2:
                break
            await asyncio.sleep(0.05)
        await cluster.deploy({"name": "gated", **gate_model(folder), "resources": {"cpus": 0.1}})
        (gated,) = await cluster.wait_ready("gated", 1)
        ids = {s["pid"]: s["id"] for s in (await cluster.status())["schedulers"]}
        leaving, staying = ids[cluster.schedulers[1].pid], ids[cluster.schedulers[0].pid]
        assert gated["scheduler"] == leaving
        async with NativeClient(cluster.scheduler_address(1), cluster.settings) as client:
            hold(folder)
            held = asyncio.create_task(
                client.infer("gated", {"x": np.ones((1, 1), np.float32)}, timeout_s=30)
            )
            await until(lambda: entered(folder), "the request in the model", timeout_s=20)
            cluster.schedulers[1].signal(signal.SIGTERM)
            await until(lambda: "shutting down" in cluster.schedulers[1].log.read_text(), "the signal taken")

            spec = {"name": "echo", "backend": "python", "model": "echo:Echo", "base_dir": str(tmp_path)}
            async with shoal.AsyncClient(cluster.head_address) as head:
                await head.deploy({**spec, "resources": {"cpus": 0.5}}, timeout_s=30)
            (echo,) = await cluster.wait_ready("echo", 1)
            assert echo["scheduler"] == staying
            release(folder)
            await held

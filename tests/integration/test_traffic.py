"""A traffic route on a real cluster (issue 18, item 2): ``shoal route`` splits a name's requests
over two deployments, clients keep calling the name (native, OIP REST, OpenAI's model lookup),
a shadow's copies are counted on the scheduler's /metrics, and a route in a YAML file promotes."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

import shoal
from shoal.errors import NotFound
from shoal.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
X = np.ones((1, 16), np.float32)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[ProcessCluster]:
    async with ProcessCluster(tmp_path / "cluster") as c:
        yield c


async def shoal_cli(cluster: ProcessCluster, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shoal.cli",
        "--head",
        cluster.head_address,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def poll(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 10.0) -> None:
    """Until ``check()`` holds (each check is a request: it paces itself), or fail naming ``what``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"{what} not seen in {timeout_s:g}s"
        await asyncio.sleep(0.05)


def shadow_copies(metrics: str, outcome: str) -> float:
    m = re.search(
        rf'shoal_shadow_requests_total\{{outcome="{outcome}",route="clf",target="v3"\}} (\S+)', metrics
    )
    return float(m.group(1)) if m else 0.0


async def test_a_route_splits_promotes_and_shadows_on_a_real_cluster(
    cluster: ProcessCluster, tmp_path: Path
) -> None:
    async with shoal.AsyncClient(cluster.head_address) as c:
        for name in ("v1", "v2", "v3"):
            doc = {"name": name, "backend": "python", "model": "echo:Echo", "base_dir": str(EXAMPLES)}
            await c.deploy({**doc, "resources": {"cpus": 0.1}}, wait=False)
        for name in ("v1", "v2", "v3"):
            await cluster.wait_ready(name, 1)
        out = await shoal_cli(cluster, "route", "clf", "v1=80", "v2=20", "--shadow", "v3")
        assert out.strip() == "route clf: v1=80 v2=20 (shadow v3)"
        assert re.search(r"^clf +v1=80 v2=20 \(shadow v3\)$", await shoal_cli(cluster, "route"), re.M)

        status = await c.status()
        owner = {r.id: d.name for d in status.deployments for r in d.replicas}
        handle = c.handle("clf")

        async def served_by() -> str:
            return owner[(await handle.request({"x": X})).replica_id]

        # The scheduler has the route once a request to its name is answered (the table is pushed).
        async def answered() -> bool:
            try:
                await served_by()
            except NotFound:
                return False
            return True

        await poll(answered, "the route at the scheduler")
        shares = Counter([await served_by() for _ in range(200)])
        assert set(shares) == {"v1", "v2"} and 15 <= shares["v2"] <= 70, shares

        async with httpx.AsyncClient(base_url=f"http://{cluster.http_address()}", timeout=10) as http:
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16}]}
            r = await http.post("/v2/models/clf/infer", json=body)
            assert r.status_code == 200 and r.json()["model_name"] == "clf"
            assert (await http.get("/v1/models/clf")).status_code == 200
            # Every request routed to clf sent a copy to v3: counted, the answers discarded.
            sent = sum(shares.values()) + 1 + 1  # and the ones that found the route, and REST's

            async def counted() -> bool:
                return shadow_copies((await http.get("/metrics")).text, "ok") >= sent

            await poll(counted, f"{sent} shadow copies counted")

        # Promote with a route in a spec file: every request to clf goes to v2.
        (tmp_path / "route.yaml").write_text("kind: route\nname: clf\ntargets: {v2: 100}\n")
        assert "route clf: v2=100" in await shoal_cli(cluster, "deploy", str(tmp_path / "route.yaml"))

        async def promoted() -> bool:
            return await served_by() == "v2" and await served_by() == "v2" and await served_by() == "v2"

        await poll(promoted, "the promotion at the scheduler")
        assert {await served_by() for _ in range(20)} == {"v2"}
        await c.delete_route("clf")
        assert await c.routes() == []

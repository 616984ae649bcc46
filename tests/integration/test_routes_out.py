"""A control call that changes what schedulers route by answers once the new routing table
has been sent to every scheduler: a client that opens a connection once it returns meets
the new table at every scheduler and in every ingress worker. Real head, two schedulers of
two ingress workers each, real HTTP on port 0. (What is left is the table's trip of a few
milliseconds: a request on a connection already open can still beat it, docs/operations.md.)

Seen: a deployment created without waiting (``shoal deploy --no-wait``, ``POST
/api/deployments``, a ``min_replicas: 0`` deployment) and asked for at once was unknown
(404) at 37 of 40 schedulers asked, for up to the head's table interval (0.1 s), and a
revoked token was accepted that long after the revoke answered."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from shoal.api import AsyncClient
from shoal.core.spec import load_spec_file, parse_spec
from shoal.testing.cluster import ProcessCluster

pytestmark = [pytest.mark.timeout(120)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
X = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]}


async def ask_every_ingress(cluster: ProcessCluster, method: str, path: str, **kw: object) -> list[int]:
    """The status each scheduler answers, three times each on a new connection (so that the
    kernel spreads them over the ingress workers sharing the port)."""
    codes = []
    for i in range(2):
        for _ in range(3):
            async with httpx.AsyncClient(base_url=f"http://{cluster.http_address(i)}", timeout=10) as web:
                codes.append((await web.request(method, path, **kw)).status_code)  # type: ignore[arg-type]
    return codes


async def test_a_deployment_and_a_revoked_token_meet_every_ingress_when_the_call_answers(
    tmp_path: Path,
) -> None:
    (echo,) = load_spec_file(EXAMPLES / "echo.yaml")
    async with ProcessCluster(tmp_path, schedulers=2, env={"SHOAL_INGRESS_WORKERS": "2"}) as cluster:
        for i in range(5):
            # No replica to wait for: the deploy answers at once, and the spec declares its
            # inputs, so the metadata needs none either. Two in a row: the second's table
            # is the one the head holds back (tables go out at most every 0.1 s).
            for name in (f"first-{i}", f"fresh-{i}"):
                await cluster.deploy(
                    echo.model_copy(update={"name": name, "replicas": 0, "base_dir": str(EXAMPLES)})
                )
            assert await ask_every_ingress(cluster, "GET", f"/v2/models/fresh-{i}") == [200] * 6

        admin = (await cluster.client.create_token("admin", "ops")).token
        async with AsyncClient(cluster.head_address, token=admin) as ops:
            app = (await ops.create_token("infer", "app")).token
            locked = parse_spec(
                {
                    **json.loads(echo.to_json()),
                    "name": "locked",
                    "base_dir": str(EXAMPLES),
                    "auth": {"tokens": ["app"]},
                }
            )
            await ops.deploy(locked)
            bearer = {"Authorization": f"Bearer {app}"}
            path = "/v2/models/locked/infer"
            assert await ask_every_ingress(cluster, "POST", path, json=X, headers=bearer) == [200] * 6

            await ops.create_token("read", "other")  # a table out just before the revoke's
            await ops.revoke_token("app")
            assert await ask_every_ingress(cluster, "POST", path, json=X, headers=bearer) == [401] * 6

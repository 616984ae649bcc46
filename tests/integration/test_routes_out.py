"""A control call that changes what schedulers route by answers once every scheduler, and
every one of its ingress processes, routes by the new table: a request sent the moment it
returns, on a connection already open, meets the new table everywhere. Real head, two
schedulers of two ingress processes each, real HTTP on port 0.

Seen: a deployment created without waiting (``shoal deploy --no-wait``, ``POST
/api/deployments``, a ``min_replicas: 0`` deployment) and asked for at once was unknown
(404) at 37 of 40 ingress processes asked, for up to the head's table interval (0.1 s), and
a revoked token was accepted that long after the revoke answered. Waiting until the head
had sent the table still left 1 to 7 of 40: the table's trip to the scheduler and on to
its ingress workers."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from shoal.api import AsyncClient
from shoal.core.spec import load_spec_file, parse_spec
from shoal.testing.cluster import ProcessCluster

pytestmark = [pytest.mark.timeout(120)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
X = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]}
CONNECTIONS = 4
"""Connections opened to each scheduler: the kernel spreads them over its ingress processes."""


@contextlib.asynccontextmanager
async def open_connections(cluster: ProcessCluster) -> AsyncIterator[list[httpx.AsyncClient]]:
    """CONNECTIONS clients per scheduler, each with its connection open already."""
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for i in range(2):
            for _ in range(CONNECTIONS):
                web = await stack.enter_async_context(
                    httpx.AsyncClient(base_url=f"http://{cluster.http_address(i)}", timeout=10)
                )
                assert (await web.get("/v2/health/live")).status_code == 200
                clients.append(web)
        yield clients


async def ask(clients: list[httpx.AsyncClient], method: str, path: str, **kw: object) -> list[int]:
    return [(await web.request(method, path, **kw)).status_code for web in clients]  # type: ignore[arg-type]


async def test_a_deployment_and_a_revoked_token_meet_every_ingress_when_the_call_answers(
    tmp_path: Path,
) -> None:
    (echo,) = load_spec_file(EXAMPLES / "echo.yaml")
    everywhere = 2 * CONNECTIONS
    async with (
        ProcessCluster(tmp_path, schedulers=2, env={"SHOAL_INGRESS_WORKERS": "2"}) as cluster,
        open_connections(cluster) as clients,
    ):
        for i in range(5):
            # No replica to wait for: the deploy answers at once, and the spec declares its
            # inputs, so the metadata needs none either. Two in a row: the second's table
            # is the one the head holds back (tables go out at most every 0.1 s).
            for name in (f"first-{i}", f"fresh-{i}"):
                await cluster.deploy(
                    echo.model_copy(update={"name": name, "replicas": 0, "base_dir": str(EXAMPLES)})
                )
            assert await ask(clients, "GET", f"/v2/models/fresh-{i}") == [200] * everywhere

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
            assert await ask(clients, "POST", path, json=X, headers=bearer) == [200] * everywhere

            await ops.create_token("read", "other")  # a table out just before the revoke's
            await ops.revoke_token("app")
            assert await ask(clients, "POST", path, json=X, headers=bearer) == [401] * everywhere

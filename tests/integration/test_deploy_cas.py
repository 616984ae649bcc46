"""Two operators deploying the same deployment at once, over real gRPC to a head process: with
``if_revision`` (``shoal deploy --if-revision N``) the one based on a revision that is no
longer current is refused, naming the current one; before, the second silently undid the
first and neither learnt of it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import shoal
from shoal.errors import FailedPrecondition, InvalidArgument
from shoal.testing.cluster import FAST, ProcessCluster

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


def echo(**options: Any) -> dict[str, Any]:
    return {
        "name": "echo",
        "backend": "python",
        "model": "echo:Echo",
        "base_dir": str(ROOT / "examples"),
        "resources": {"cpus": 0.1},
        "options": options,
    }


@pytest.fixture
async def head(tmp_path: Path) -> AsyncIterator[ProcessCluster]:
    async with ProcessCluster(tmp_path / "cluster", schedulers=0) as c:  # applies need no scheduler
        yield c


def shoal_cli(head: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **FAST}
    env.pop("SHOAL_HEAD", None)
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", "--head", head, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


async def test_an_apply_from_a_stale_revision_is_refused_over_grpc_and_by_the_cli(
    head: ProcessCluster, tmp_path: Path
) -> None:
    async with shoal.AsyncClient(head.head_address) as c:
        assert (await c.deploy(echo(), wait=False, if_revision=0)).revision == 1
        # Both operators read the spec and its revision (1), in one read.
        (read,) = (await c.status(("echo",))).deployments
        seen = read.revision
        a = await c.deploy(echo(who="a"), wait=False, if_revision=seen)
        with pytest.raises(FailedPrecondition, match="'echo' is at revision 2 \\(updated\\), not revision 1"):
            await c.deploy(echo(who="b"), wait=False, if_revision=seen)
        with pytest.raises(InvalidArgument, match="if_revision must be a revision number"):
            await c.deploy(echo(who="b"), wait=False, if_revision=-1)
        history = await c.history("echo")
        assert a.revision == 2
        assert [json.loads(r.spec_json)["options"] for r in history] == [{}, {"who": "a"}]

        spec = tmp_path / "echo.json"  # JSON is YAML
        spec.write_text(json.dumps(echo(who="c")))
        stale = shoal_cli(head.head_address, "deploy", "--no-wait", "--if-revision", "1", str(spec))
        fresh = shoal_cli(head.head_address, "deploy", "--no-wait", "--if-revision", "2", str(spec))
        negative = shoal_cli(head.head_address, "deploy", "--no-wait", "--if-revision", "-1", str(spec))
        assert stale.returncode == 1, stale
        assert (
            "deployment 'echo' is at revision 2 (updated), not revision 1: nothing was applied"
            in stale.stderr
        )
        assert fresh.returncode == 0, fresh
        assert "deployment echo updated (revision 3)" in fresh.stdout
        assert negative.returncode != 0
        assert "--if-revision must be an integer from 0 to 2147483647, got -1" in negative.stderr
        assert [r.number for r in await c.history("echo")] == [1, 2, 3]
        assert seen == 1 and read.spec["options"] == {}
        assert (await c.status(("echo",))).deployments[0].revision == 3


async def test_an_if_revision_from_before_a_delete_is_refused_after_the_name_is_created_again(
    head: ProcessCluster,
) -> None:
    async with shoal.AsyncClient(head.head_address) as c:
        await c.deploy(echo(), wait=False)
        seen = (await c.deploy(echo(who="a"), wait=False)).revision  # a client reads revision 2
        await c.delete("echo")
        # Someone else creates and updates another deployment of that name.
        assert (await c.deploy(echo(who="b"), wait=False)).revision == 3
        assert (await c.deploy(echo(who="c"), wait=False)).revision == 4

        with pytest.raises(FailedPrecondition, match="'echo' is at revision 4 \\(updated\\), not revision 2"):
            await c.deploy(echo(who="x"), wait=False, if_revision=seen)
        assert [r.number for r in await c.history("echo")] == [3, 4]
        assert (await c.status(("echo",))).deployments[0].spec["options"] == {"who": "c"}

        # A scale chosen for that spec is refused too, over gRPC and by the CLI.
        with pytest.raises(
            FailedPrecondition, match="is at revision 4 \\(updated\\), not revision 2: nothing was scaled"
        ):
            await c.scale("echo", 3, if_revision=seen)
        stale = shoal_cli(head.head_address, "scale", "echo", "3", "--if-revision", "3")
        fresh = shoal_cli(head.head_address, "scale", "echo", "3", "--if-revision", "4")
        assert stale.returncode == 1, stale
        assert (
            "deployment 'echo' is at revision 4 (updated), not revision 3: nothing was scaled" in stale.stderr
        )
        assert fresh.returncode == 0, fresh
        assert (await c.status(("echo",))).deployments[0].spec["replicas"] == 3


async def test_of_two_scales_at_once_from_the_same_count_one_goes_through_over_grpc_and_the_cli(
    head: ProcessCluster,
) -> None:
    # Two clients read 1 replica; one means 2, the other 3. Before, both went through (if_revision
    # cannot tell them apart: a scale makes no revision) and the last silently won.
    async with shoal.AsyncClient(head.head_address) as a, shoal.AsyncClient(head.head_address) as b:
        await a.deploy(echo(), wait=False)
        seen = (await a.status(("echo",))).deployments[0].spec["replicas"]
        assert seen == 1
        results = await asyncio.gather(
            a.scale("echo", 2, if_replicas=seen), b.scale("echo", 3, if_replicas=seen), return_exceptions=True
        )
        lost = [r for r in results if isinstance(r, FailedPrecondition)]
        assert results.count(None) == 1 and len(lost) == 1, results
        now = (await a.status(("echo",))).deployments[0].spec["replicas"]
        assert now in (2, 3)
        assert f"'echo' is scaled to {now} replicas, not 1: nothing was scaled" in str(lost[0])
        assert [e.kind for e in await a.events("echo")].count("scaled") == 1

        stale = shoal_cli(head.head_address, "scale", "echo", "4", "--if-replicas", "1")
        absurd = shoal_cli(head.head_address, "scale", "echo", "4", "--if-replicas", "-1")
        fresh = shoal_cli(head.head_address, "scale", "echo", "4", "--if-replicas", str(now))
        assert stale.returncode == 1, stale
        assert f"deployment 'echo' is scaled to {now} replicas, not 1: nothing was scaled" in stale.stderr
        assert (
            absurd.returncode != 0
            and "--if-replicas must be an integer from 0 to 1000, got -1" in absurd.stderr
        )
        assert fresh.returncode == 0, fresh
        assert (await a.status(("echo",))).deployments[0].spec["replicas"] == 4

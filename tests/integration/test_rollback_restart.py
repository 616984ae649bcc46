"""Deploys that tell the truth about updates, through the CLI against a real cluster: an update
whose module does not import rolls back by itself while the old replica serves; a model's
edited files are a change ``shoal deploy`` rolls out; ``shoal restart`` replaces replicas
one at a time. A client sends requests throughout and none may fail. With
``serve_revisions: 2`` deploy, rollback and restart do not wait for the kept revision."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shoal.testing.cluster import ProcessCluster
from shoal.testing.wait import until
from tests.integration.test_control_plane import load, replicas_of

pytestmark = pytest.mark.timeout(240)

MODEL = "class Model:\n    def predict(self, inputs):\n        return dict(inputs)\n"


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str


async def cli(cluster: ProcessCluster, *args: str, timeout_s: float = 150) -> Ran:
    """The CLI as a user runs it, in a subprocess, while this test's event loop keeps the load going."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shoal.cli",
        "--head",
        cluster.head_address,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "SHOAL_HEAD"},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


def write_spec(folder: Path, module: str, replicas: int) -> Path:
    spec = folder / "echo.yaml"
    spec.write_text(
        f"name: echo\nbackend: python\nmodel: '{module}:Model'\n"
        f"replicas: {replicas}\nresources:\n  cpus: 0.1\n"
    )
    return spec


def ids(status: dict[str, Any]) -> set[str]:
    return {r["id"] for r in replicas_of(status)}


async def test_an_update_that_does_not_import_rolls_back_while_the_old_replica_serves(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "app.py").write_text(MODEL)
    (folder / "broken.py").write_text("import no_such_module_marker_91\n")
    async with ProcessCluster(tmp_path / "cluster") as cluster:
        first = await cli(cluster, "deploy", str(write_spec(folder, "app", 1)))
        assert first.code == 0, first.stderr
        assert "deployment echo created (revision 1)" in first.stdout
        old = ids(await cluster.status())
        async with load(cluster) as stats:
            await until(lambda: stats["ok"] > 0, "a first answer")
            update = await cli(cluster, "deploy", "--timeout", "100", str(write_spec(folder, "broken", 1)))
            status = await cluster.status()
            at_rollback = stats["ok"]
            await until(lambda: stats["ok"] >= at_rollback + 20, "answers after the rollback")

        assert update.code == 1, update.stdout + update.stderr
        assert "deployment echo updated (revision 2): model changed" in update.stdout
        assert "no_such_module_marker_91" in update.stderr  # the reason, from the replica's traceback
        assert "deployment echo rolled back to revision 1 (as revision 3)" in update.stderr
        assert "Traceback" in update.stderr or "ModuleNotFoundError" in update.stderr
        # The old replica served throughout and is the deployment's only one; the spec is the old one.
        assert stats["failures"] == []
        assert ids(status) == old
        dep = next(d for d in status["deployments"] if d["name"] == "echo")
        assert dep["spec"]["model"] == "app:Model"
        history = await cli(cluster, "history", "echo")
        assert history.code == 0, history.stderr
        lines = history.stdout.splitlines()
        assert lines[0].split()[:3] == ["REVISION", "TIME", "KIND"]
        assert "failed: " in lines[2] and "no_such_module_marker_91" in lines[2], history.stdout
        assert "rolled back to revision 1" in lines[3] and lines[3].rstrip().endswith("current")
        events = await cli(cluster, "events", "echo")
        kinds = [line.split()[3] for line in events.stdout.splitlines()[1:]]
        assert kinds == ["created", "updated", "failed", "rolled_back"], events.stdout


async def test_edited_model_files_roll_out_and_restart_replaces_replicas_without_failing_requests(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "app.py").write_text(MODEL)
    spec = write_spec(folder, "app", 2)
    async with ProcessCluster(tmp_path / "cluster") as cluster:
        assert (await cli(cluster, "deploy", str(spec))).code == 0
        assert "deployment echo unchanged" in (await cli(cluster, "deploy", str(spec))).stdout
        async with load(cluster) as stats:
            await until(lambda: stats["ok"] > 0, "a first answer")
            before = ids(await cluster.status())
            (folder / "app.py").write_text(MODEL + "# edited: a new version of the code\n")
            edited = await cli(cluster, "deploy", str(spec))
            after_edit = ids(await cluster.status())
            restarted = await cli(cluster, "restart", "echo")
            after_restart = ids(await cluster.status())
            # Back to the first revision (the spec before the edit): rolled like any update.
            rolled = await cli(cluster, "rollback", "echo", "1")
            after_rollback = ids(await cluster.status())
            at_end = stats["ok"]
            await until(lambda: stats["ok"] >= at_end + 20, "answers after the restart")

        assert edited.code == 0, edited.stderr
        assert "model files changed (hash " in edited.stdout and "; rolling update" in edited.stdout
        assert "ready after" in edited.stdout
        assert restarted.code == 0, restarted.stderr
        assert "restarting: replicas replaced one at a time (revision 3)" in restarted.stdout
        assert "ready after" in restarted.stdout
        assert rolled.code == 0, rolled.stderr
        assert "deployment echo rolling back to revision 1 (as revision 4)" in rolled.stdout
        assert "ready after" in rolled.stdout
        # Every replica replaced, three times, and not one request failed.
        assert len(after_edit) == len(after_restart) == len(after_rollback) == 2
        assert (
            not before & after_edit and not after_edit & after_restart and not after_restart & after_rollback
        )
        assert stats["failures"] == []
        history = await cli(cluster, "history", "echo")
        kinds = [line.split()[3] for line in history.stdout.splitlines()[1:]]
        assert kinds == ["created", "updated", "restarted", "rolled_back"], history.stdout
        # The spec file, deployed again, is the edited files' revision again; and once more, unchanged.
        assert "model files changed" in (await cli(cluster, "deploy", str(spec))).stdout
        assert "deployment echo unchanged" in (await cli(cluster, "deploy", str(spec))).stdout


async def test_deploy_rollback_and_restart_do_not_wait_for_the_revision_kept_serving(tmp_path: Path) -> None:
    """``serve_revisions: 2`` keeps the previous revision's replica serving, for good: each
    command is done once the current revision's replica is READY, long before its timeout."""
    folder = tmp_path / "models"
    folder.mkdir()
    for module in ("app", "other"):
        (folder / f"{module}.py").write_text(MODEL)

    def kept_spec(module: str) -> str:
        path = folder / f"{module}.yaml"
        path.write_text(
            f"name: echo\nbackend: python\nmodel: '{module}:Model'\nreplicas: 1\n"
            "serve_revisions: 2\nresources:\n  cpus: 0.1\n"
        )
        return str(path)

    async with ProcessCluster(tmp_path / "cluster") as cluster:
        first = await cli(cluster, "deploy", "--timeout", "60", kept_spec("app"))
        assert first.code == 0, first.stdout + first.stderr
        for args, kept, revisions in (
            (("deploy", "--timeout", "30", kept_spec("other")), 1, [1, 2]),
            (("rollback", "echo", "1", "--timeout", "30"), 2, [2, 3]),  # revision 1's replica, now 3
            (("restart", "echo", "--timeout", "30"), 2, [2, 4]),
        ):
            ran = await cli(cluster, *args)
            assert ran.code == 0, ran.stdout + ran.stderr
            assert f"echo 1/1 ready, 1 of revision {kept} kept serving" in ran.stdout, ran.stdout
            assert "ready after" in ran.stdout
            assert sorted(r["revision"] for r in replicas_of(await cluster.status())) == revisions

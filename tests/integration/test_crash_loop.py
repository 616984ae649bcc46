"""A model that crashes soon after READY backs off and ends FAILED, and ``deploy --min-ready``
says so; a replica killed from outside is replaced at once. Real processes on port 0.

Before, a replica's death once it was READY was never a failed start: a model that exits a
second after loading was restarted at once, for ever, ``shoal deploy`` passed it and ``shoal
status`` showed it healthy between deaths (``health.stable_after_s``, 60 s by default).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

import shoal
from shoal.core.cluster import FAILED, FAILED_AFTER
from shoal.core.spec import STABLE_AFTER_S
from shoal.errors import FailedPrecondition
from shoal.testing.cluster import ProcessCluster
from tests.integration.test_rollback_restart import cli
from tests.integration.test_zygote import ready_other_than

pytestmark = pytest.mark.timeout(120)

DOOMED = """
import os
import threading


class Doomed:
    \"\"\"Loads, then exits with status 3 a second and a half later (a background thread's
    fatal error, a driver that gives up).\"\"\"

    def __init__(self) -> None:
        threading.Timer(1.5, os._exit, (3,)).start()

    def predict(self, inputs):
        return inputs


class Quits:
    \"\"\"Loads, then exits with status 0 a second and a half later (a library's exit(0)).\"\"\"

    def __init__(self) -> None:
        threading.Timer(1.5, os._exit, (0,)).start()

    def predict(self, inputs):
        return inputs


class Fine:
    def predict(self, inputs):
        return inputs
"""


def spec(folder: Path, model: str) -> dict[str, Any]:
    (folder / "doomed.py").write_text(DOOMED)
    return {
        "name": "echo",
        "backend": "python",
        "model": model,
        "base_dir": str(folder),
        "replicas": 1,
        "resources": {"cpus": 0.1},
    }


def echo(status: dict[str, Any]) -> dict[str, Any]:
    return next(d for d in status["deployments"] if d["name"] == "echo")


async def test_a_model_crashing_after_ready_fails_the_deploy_and_ends_failed(tmp_path: Path) -> None:
    async with ProcessCluster(tmp_path) as cluster:
        async with shoal.AsyncClient(cluster.head_address) as client:
            with pytest.raises(FailedPrecondition) as failed:
                await client.deploy(spec(tmp_path, "doomed:Doomed"), min_ready_s=5.0, timeout_s=60.0)
        message = str(failed.value)
        assert "deployment echo failed: its replicas fail to start (2 times in a row)" in message
        assert "after READY: process exited with code 3" in message

        # The head goes on backing off, then stops starting it: FAILED, with the reason.
        status = await cluster.wait_for(
            lambda s: echo(s)["pending_reason"].startswith(FAILED), timeout_s=60, what="FAILED"
        )
        reason = echo(status)["pending_reason"]
        assert f"{FAILED_AFTER} replicas in a row died before READY or within {STABLE_AFTER_S:.0f}s" in reason
        assert "process exited with code 3" in reason
        events = [e for e in status["events"] if e["deployment"] == "echo"]
        assert [e["kind"] for e in events].count("replica_died") == FAILED_AFTER
        assert any(e["kind"] == "deployment_failed" for e in events)


async def test_a_replica_killed_from_outside_soon_after_ready_is_replaced_at_once(tmp_path: Path) -> None:
    # kill -9 (an operator, the OOM killer, a chaos run) is not the model's doing: however
    # often, no backoff and never FAILED.
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(spec(tmp_path, "doomed:Fine"))
        [replica] = await cluster.wait_ready("echo", 1)
        for _ in range(FAILED_AFTER):
            os.kill(replica["pid"], signal.SIGKILL)
            replica = await ready_other_than(cluster, replica["id"])
        status = await cluster.status()
        assert echo(status)["pending_reason"] == ""
        assert not any(e["kind"] == "deployment_failed" for e in status["events"])
        reasons = [e["message"] for e in status["events"] if e["kind"] == "replica_died"]
        assert len(reasons) == FAILED_AFTER and all("SIGKILL" in m for m in reasons), reasons


async def test_a_model_exiting_with_status_0_backs_off_a_sigterm_from_outside_does_not(
    tmp_path: Path,
) -> None:
    """A replica that stops as told (SIGTERM) exits with status 0 too: replaced at once. Its
    model's exit(0) is a crash. Before, that was restarted at once for ever (25 deaths in 20
    s, never FAILED), status saying nothing."""
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(spec(tmp_path, "doomed:Fine"))
        [replica] = await cluster.wait_ready("echo", 1)
        os.kill(replica["pid"], signal.SIGTERM)
        await ready_other_than(cluster, replica["id"])
        assert echo(await cluster.status())["pending_reason"] == ""

        await cluster.deploy(spec(tmp_path, "doomed:Quits"))
        status = await cluster.wait_for(
            lambda s: "replica start failure(s), retrying in" in echo(s)["pending_reason"],
            timeout_s=30,
            what="a back-off",
        )
        assert (
            "after READY: process exited with code 0 without being asked to stop"
            in (echo(status)["pending_reason"])
        )


async def test_an_update_crashing_after_ready_is_rolled_back(tmp_path: Path) -> None:
    # The rolling update drained the old replica once the new one was READY: the rollback
    # starts the previous revision again, and it serves.
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(spec(tmp_path, "doomed:Fine"))
        await cluster.wait_ready("echo", 1)
        await cluster.deploy(spec(tmp_path, "doomed:Doomed"))

        def rolled_back(status: dict[str, Any]) -> bool:
            dep = echo(status)
            ready = [r for r in dep["replicas"] if r["state"] == "READY"]
            return dep["spec"]["model"] == "doomed:Fine" and len(ready) == 1 == len(dep["replicas"])

        status = await cluster.wait_for(rolled_back, timeout_s=90, what="a rollback to doomed:Fine")
        kinds = [e["kind"] for e in status["events"] if e["deployment"] == "echo"]
        assert "deployment_failed" in kinds
        history = await cluster.client.history("echo")
        assert [r.kind for r in history][-1] == "rolled_back"


async def test_the_deploy_command_waits_min_ready_and_fails_a_model_that_crashes_after_ready(
    tmp_path: Path,
) -> None:
    # As a user runs it: `shoal deploy FILE --min-ready S` exits 0 only once the new replica
    # has stayed READY S seconds, and 1 with the crash's words when it dies sooner.
    async with ProcessCluster(tmp_path) as cluster:
        fine = tmp_path / "fine.yaml"
        fine.write_text(yaml.safe_dump(spec(tmp_path, "doomed:Fine")))
        ran = await cli(cluster, "deploy", str(fine), "--min-ready", "3", "--timeout", "60")
        assert ran.code == 0, ran.stderr
        assert "echo 1/1 ready, to stay READY 3s more" in ran.stdout
        assert ran.stdout.rstrip().endswith("echo 1/1 ready"), ran.stdout

        doomed = tmp_path / "doomed.yaml"
        doomed.write_text(yaml.safe_dump(spec(tmp_path, "doomed:Doomed")))
        ran = await cli(cluster, "deploy", str(doomed), "--min-ready", "5", "--timeout", "60")
        assert ran.code == 1, ran.stdout
        assert "deployment echo failed: its replicas fail to start" in ran.stderr
        assert "after READY: process exited with code 3" in ran.stderr
        # The update is rolled back, and the command says so.
        assert "deployment echo rolled back to revision 1" in ran.stderr

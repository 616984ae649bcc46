"""ReplicaSupervisor with a model named by URI, over a FakeLauncher: the replica is
DOWNLOADING (progress in its message) until the artifact cache has the model, then its
process starts on the cached copy; a failed download ends it DEAD with the reason."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shoal.cli.commands import render_status
from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.cluster import ReplicaReport
from shoal.core.spec import DeploymentSpec
from shoal.errors import InvalidArgument
from shoal.scheduler.artifacts import ArtifactCache
from shoal.scheduler.router import Router
from shoal.scheduler.supervisor import ReplicaSupervisor
from shoal.testing.fakes import FakeLauncher, FakeReplicas
from shoal.testing.wait import until
from tests.unit.conftest import make_spec

pytestmark = pytest.mark.timeout(10)


@dataclass
class Harness:
    supervisor: ReplicaSupervisor
    launcher: FakeLauncher
    cache: ArtifactCache

    def report(self, rid: str) -> ReplicaReport:
        return next(r for r in self.supervisor.reports()[1] if r.id == rid)

    def launched_spec(self, rid: str) -> dict[str, object]:
        argv = self.launcher.process(rid).argv
        doc: dict[str, object] = json.loads(Path(argv[argv.index("--spec-file") + 1]).read_text())
        return doc

    def launched_settings(self, rid: str) -> dict[str, object]:
        argv = self.launcher.process(rid).argv
        doc: dict[str, object] = json.loads(argv[argv.index("--settings-json") + 1])
        return doc


@contextlib.asynccontextmanager
async def harness(tmp_path: Path, **settings: object) -> AsyncIterator[Harness]:
    config = Settings(ping_interval_s=1.0, shutdown_grace_s=1.0, **settings)  # type: ignore[arg-type]
    clock = FakeClock()
    replicas = FakeReplicas()
    router = Router("s1", config, replicas, clock=clock)
    launcher = FakeLauncher()
    cache = ArtifactCache(tmp_path / "artifacts", limit_bytes=10**6)
    supervisor = ReplicaSupervisor(
        config,
        router,
        replicas,
        log_dir=tmp_path / "logs",
        scheduler_address=lambda: "s1:7000",
        on_change=lambda: None,
        launcher=launcher,
        clock=clock,
        artifacts=cache,
    )
    supervisor.start()
    yield Harness(supervisor, launcher, cache)
    await supervisor.aclose(0)
    await router.aclose()


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(tmp_path) as x:
        yield x


def sklearn_spec(uri: str) -> DeploymentSpec:
    return make_spec("iris", backend="sklearn", model=uri)


async def test_a_replica_downloads_then_starts_from_the_cache(h: Harness, tmp_path: Path) -> None:
    src = tmp_path / "models" / "model.joblib"
    src.parent.mkdir()
    src.write_bytes(b"a fitted model")
    spec = sklearn_spec(src.as_uri())
    await h.supervisor.create("iris-1", spec)

    waiting = h.report("iris-1")
    assert waiting.state == "DOWNLOADING"
    assert src.as_uri() in waiting.message
    assert "iris-1" not in h.launcher.processes  # no process before the model is here

    await until(lambda: "iris-1" in h.launcher.processes, "the replica's launch")
    model = Path(str(h.launched_spec("iris-1")["model"]))
    assert model.parent.parent == tmp_path / "artifacts" and model.read_bytes() == b"a fitted model"
    report = h.report("iris-1")
    assert report.state == "STARTING" and report.pid == h.launcher.process("iris-1").pid
    assert report.spec_hash == spec.process_hash()  # the head's spec, not the local copy's


async def test_a_second_replica_starts_from_the_same_copy(h: Harness, tmp_path: Path) -> None:
    src = tmp_path / "model.joblib"
    src.write_bytes(b"a fitted model")
    spec = sklearn_spec(src.as_uri())
    await h.supervisor.create("iris-1", spec)
    await h.supervisor.create("iris-2", spec)
    await until(lambda: {"iris-1", "iris-2"} <= h.launcher.processes.keys(), "both launches")
    assert h.launched_spec("iris-1")["model"] == h.launched_spec("iris-2")["model"]
    assert len(h.cache.blobs()) == 1


async def test_a_failed_download_ends_the_replica_dead_with_the_reason(h: Harness, tmp_path: Path) -> None:
    uri = (tmp_path / "missing.joblib").as_uri()
    await h.supervisor.create("iris-1", sklearn_spec(uri))

    def dead() -> ReplicaReport | None:
        return next((r for r in h.supervisor.reports()[1] if r.id == "iris-1" and r.state == "DEAD"), None)

    await until(dead, "the replica's death")
    tomb = dead()
    assert tomb is not None
    assert tomb.message == f"fetching the model failed: {uri}: no such object or folder"
    assert "iris-1" not in h.launcher.processes and "iris-1" not in h.supervisor.registry
    assert "no such object" in h.supervisor.log_path("iris-1").read_text()


async def test_a_replica_removed_while_downloading_stops_without_a_process(
    h: Harness, tmp_path: Path
) -> None:
    src = tmp_path / "model.joblib"
    src.write_bytes(b"m")
    await h.supervisor.create("iris-1", sklearn_spec(src.as_uri()))
    assert await h.supervisor.remove("iris-1", graceful=True)

    def stopped() -> bool:
        return any(r.id == "iris-1" and r.state == "STOPPED" for r in h.supervisor.reports()[1])

    await until(stopped, "the replica's stop")
    assert "iris-1" not in h.launcher.processes


async def test_the_replica_may_read_the_cached_copy_when_model_dirs_are_restricted(tmp_path: Path) -> None:
    allowed = tmp_path / "models"
    allowed.mkdir()
    (allowed / "model.joblib").write_bytes(b"m")
    async with harness(tmp_path, allowed_model_dirs=(str(allowed),)) as h:
        await h.supervisor.create("iris-1", sklearn_spec((allowed / "model.joblib").as_uri()))
        await until(lambda: "iris-1" in h.launcher.processes, "the replica's launch")
        dirs = h.launched_settings("iris-1")["allowed_model_dirs"]
        model = Path(str(h.launched_spec("iris-1")["model"]))
        assert dirs == [str(allowed.resolve()), str(model.parent.resolve())]


async def test_the_replica_gets_the_schedulers_grpc_connection_limits(tmp_path: Path) -> None:
    limits = {"grpc_handshake_timeout_s": 3.0, "grpc_idle_timeout_s": 60.0, "grpc_max_connections": 64}
    async with harness(tmp_path, **limits) as h:
        await h.supervisor.create("iris-1", make_spec("iris"))
        await until(lambda: "iris-1" in h.launcher.processes, "the replica's launch")
        given = h.launched_settings("iris-1")
        assert {k: given[k] for k in limits} == limits
        assert Settings.load(env={}, flags=given).grpc_max_connections == 64


def test_shoal_status_shows_a_downloading_replicas_progress() -> None:
    replica = {
        "id": "iris-1",
        "scheduler": "s1",
        "state": "DOWNLOADING",
        "pid": 0,
        "address": "",
        "in_flight": 0,
        "message": "downloading s3://models/iris.joblib: 1.0/4.0 MB (25%)",
    }
    status = {
        "schedulers": [],
        "deployments": [
            {
                "name": "iris",
                "target_replicas": 1,
                "pending_reason": "",
                "spec": {"backend": "sklearn", "model": "s3://models/iris.joblib"},
                "replicas": [replica],
            }
        ],
    }
    assert "DOWNLOADING (downloading s3://models/iris.joblib: 1.0/4.0 MB (25%))" in render_status(status)


async def test_the_scheduler_checks_the_uri_against_its_own_settings(tmp_path: Path) -> None:
    async with harness(tmp_path, allowed_model_dirs=(str(tmp_path),)) as h:
        with pytest.raises(InvalidArgument, match="allowed_model_uris"):
            await h.supervisor.create("iris-1", sklearn_spec("s3://models/iris.joblib"))
        assert "iris-1" not in h.supervisor.registry

"""The CLI's side of revisions: the hash of a model's files, how ``deploy`` follows a rollout
when the head keeps a restart count or rolls back, or keeps earlier revisions serving
(``serve_revisions``), and the history table."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shoal.cli.revisions import render_history
from shoal.config import Settings
from shoal.core import model_hash as mh
from shoal.core.clock import FakeClock
from shoal.core.cluster import FAILED, FAILED_AFTER, CreateReplica
from shoal.core.deploy_watch import DeployWatch
from shoal.core.placement import Capacity
from shoal.core.spec import DeploymentSpec, parse_spec, parse_spec_json
from shoal.head.node import HeadNode, cluster_status
from shoal.rpc.convert import lifecycle_from_pb, lifecycle_to_pb, revision_from_pb, revision_to_pb
from shoal.store import MemoryStore
from shoal.store.history import LifecycleEvent, Revision
from shoal.testing.fakes import FakeSchedulers
from shoal.types import SchedulerRegistration
from tests.unit.test_versions import make_ready, settle
from tests.unit.test_versions import spec as versioned

pytestmark = pytest.mark.timeout(10)


def python_spec(folder: Path, model: str = "app:Model") -> DeploymentSpec:
    return parse_spec({"name": "app", "backend": "python", "model": model}, base_dir=folder)


def test_a_python_models_hash_follows_its_module_and_the_py_files_beside_it(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("class Model: pass\n")
    (tmp_path / "helpers.py").write_text("X = 1\n")
    (tmp_path / "notes.txt").write_text("not code")
    spec = python_spec(tmp_path)
    first = mh.model_hash(spec)
    assert len(first) == 16

    (tmp_path / "notes.txt").write_text("other text")
    assert mh.model_hash(spec) == first
    (tmp_path / "helpers.py").write_text("X = 2\n")
    second = mh.model_hash(spec)
    assert second != first
    (tmp_path / "app.py").write_text("class Model: pass  # edited\n")
    assert mh.model_hash(spec) not in (first, second)
    assert mh.with_model_hash(spec).model_hash == mh.model_hash(spec)
    # A hash the spec sets itself is kept.
    assert mh.with_model_hash(spec.model_copy(update={"model_hash": "given"})).model_hash == "given"


def test_a_model_not_on_this_machine_has_no_hash(tmp_path: Path) -> None:
    assert mh.model_hash(python_spec(tmp_path, "missing:Model")) == ""
    hub = parse_spec({"name": "t", "backend": "transformers", "model": "org/some-model"})
    assert mh.model_hash(hub) == ""


def test_a_model_folder_is_hashed_within_bounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "model"
    (folder / "__pycache__").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"\0" * 100)
    (folder / "config.json").write_text("{}")
    (folder / "__pycache__" / "x.pyc").write_bytes(b"skipped")
    spec = parse_spec({"name": "m", "backend": "onnx", "model": str(folder)})
    assert [p.name for p in mh.model_files(spec)[1]] == ["config.json", "weights.bin"]
    full = mh.model_hash(spec)

    # Past the content budget a file counts by size and modification time, unread.
    monkeypatch.setattr(mh, "MAX_CONTENT_BYTES", 10)
    by_size = mh.model_hash(spec)
    assert by_size != full
    (folder / "weights.bin").write_bytes(b"\1" * 100)
    os.utime(folder / "weights.bin", ns=(1, 1))
    assert mh.model_hash(spec) != by_size

    # Past MAX_FILES the rest are counted, not read.
    monkeypatch.setattr(mh, "MAX_FILES", 1)
    only_first = mh.model_hash(spec)
    (folder / "weights.bin").write_bytes(b"\2" * 100)
    assert mh.model_hash(spec) == only_first


def status(s: DeploymentSpec, *replicas: tuple[str, str, str], reason: str = "") -> dict[str, Any]:
    """A status with one deployment: replicas as (id, state, spec hash)."""
    return {
        "deployments": [
            {
                "name": s.name,
                "spec": s.model_dump(mode="json"),
                "target_replicas": 1,
                "pending_reason": reason,
                "replicas": [{"id": i, "state": st, "spec_hash": h} for i, st, h in replicas],
            }
        ]
    }


def test_the_heads_restart_count_does_not_make_a_deploy_wait_for_its_replicas(tmp_path: Path) -> None:
    from_file = python_spec(tmp_path)
    at_head = from_file.model_copy(update={"restarts": 2})
    current = status(at_head, ("app-a", "READY", at_head.process_hash()))
    watch = DeployWatch.after_apply(current, [from_file])
    assert watch.observe(current, now=0).done


def test_a_rollback_to_running_replicas_is_done_once_the_failed_ones_are_gone(tmp_path: Path) -> None:
    good, bad = python_spec(tmp_path, "good:Model"), python_spec(tmp_path, "bad:Model")
    before = status(
        bad, ("app-old", "READY", good.process_hash()), ("app-new", "STARTING", bad.process_hash())
    )
    watch = DeployWatch.after_apply(before, [good], from_file=False)
    v = watch.observe(
        status(good, ("app-old", "READY", good.process_hash()), ("app-new", "STARTING", bad.process_hash())),
        now=0,
    )
    assert not v.done and "1 old" in v.line
    assert watch.observe(status(good, ("app-old", "READY", good.process_hash())), now=1).done


def test_a_spec_changed_at_the_head_ends_the_wait(tmp_path: Path) -> None:
    good, bad = python_spec(tmp_path, "good:Model"), python_spec(tmp_path, "bad:Model")
    watch = DeployWatch.after_apply(status(good, ("app-old", "READY", good.process_hash())), [bad])
    v = watch.observe(status(good, ("app-old", "READY", good.process_hash())), now=5)
    assert v.failure.startswith("deployment app now runs another spec than the one deployed (rolled back")


# ------------------------------------------------------------------ serve_revisions: kept, not old
# With ``serve_revisions`` N the head keeps the replicas of the N-1 latest earlier revisions
# serving, for good: a deploy, rollback or restart is done once the current revision's
# replicas are READY (and those of revisions older than the kept ones gone), not when the
# kept ones are gone. Status documents as the head builds them, over fake schedulers.


@pytest.fixture
async def head(clock: FakeClock) -> AsyncIterator[tuple[HeadNode, FakeSchedulers]]:
    store, fleet = MemoryStore(), FakeSchedulers()
    node = HeadNode(Settings(dead_after_s=3600.0), store, fleet, clock)
    await node.register_scheduler(
        SchedulerRegistration("s1", "s1:7000", "s1:7001", Capacity(16, 8192, 0), pid=1, hostname="h")
    )
    yield node, fleet
    await node.aclose()
    await store.close()


async def deployed(node: HeadNode, fleet: FakeSchedulers, *specs: DeploymentSpec) -> None:
    """Each spec applied in turn, its rollout settled with every replica READY."""
    for s in specs:
        await node.apply(s)
        await settle(node, fleet)


async def test_a_deploy_that_keeps_the_previous_revision_serving_is_done_once_the_new_one_is_ready(
    head: tuple[HeadNode, FakeSchedulers],
) -> None:
    node, fleet = head
    await deployed(node, fleet, versioned("a", serve_revisions=2))
    before = cluster_status(node)
    second = versioned("b", serve_revisions=2)
    await node.apply(second)
    watch = DeployWatch.after_apply(before, [second])
    assert watch.watched[0].old_replicas  # still an update that rolls out (and may roll back)
    await node.reconcile_once()
    v = watch.observe(cluster_status(node), now=0)
    assert not v.done and v.line == "echo 0/1 ready, 1 starting, 1 of revision 1 kept serving"
    await make_ready(node, fleet)
    v = watch.observe(cluster_status(node), now=1)
    assert v.done and v.line == "echo 1/1 ready, 1 of revision 1 kept serving"
    # What the head does next changes nothing: revision 1 keeps serving.
    await settle(node, fleet)
    assert sorted(r["revision"] for r in cluster_status(node)["deployments"][0]["replicas"]) == [1, 2]
    assert watch.observe(cluster_status(node), now=2).done


async def test_replicas_of_revisions_older_than_the_kept_ones_are_waited_for(
    head: tuple[HeadNode, FakeSchedulers],
) -> None:
    node, fleet = head
    await deployed(node, fleet, *(versioned(v, serve_revisions=3) for v in "abc"))
    before = cluster_status(node)
    fourth = versioned("d", serve_revisions=3)
    await node.apply(fourth)
    watch = DeployWatch.after_apply(before, [fourth])
    await node.reconcile_once()
    await make_ready(node, fleet)
    v = watch.observe(cluster_status(node), now=0)  # revision 1 not drained yet
    assert not v.done and v.line == "echo 1/1 ready, 1 old, 2 of revisions 2 and 3 kept serving"
    await settle(node, fleet)
    v = watch.observe(cluster_status(node), now=1)
    assert v.done and v.line == "echo 1/1 ready, 2 of revisions 2 and 3 kept serving"


async def test_a_rollback_to_a_kept_revision_is_done_at_once_and_keeps_the_one_it_left(
    head: tuple[HeadNode, FakeSchedulers],
) -> None:
    node, fleet = head
    await deployed(node, fleet, versioned("a", serve_revisions=2), versioned("b", serve_revisions=2))
    before = cluster_status(node)
    rev, _ = await node.rollback("echo", 1)
    watch = DeployWatch.after_apply(before, [parse_spec_json(rev.spec_json)], from_file=False)
    await node.reconcile_once()
    v = watch.observe(cluster_status(node), now=0)
    assert v.done and v.line == "echo 1/1 ready, 1 of revision 2 kept serving"


async def test_a_restart_waits_for_the_replicas_it_replaces_not_for_the_kept_revision(
    head: tuple[HeadNode, FakeSchedulers],
) -> None:
    node, fleet = head
    await deployed(node, fleet, versioned("a", serve_revisions=2), versioned("b", serve_revisions=2))
    before = cluster_status(node)
    rev, _ = await node.restart("echo")
    watch = DeployWatch.after_apply(before, [parse_spec_json(rev.spec_json)], from_file=False)
    await node.reconcile_once()
    await make_ready(node, fleet)
    v = watch.observe(cluster_status(node), now=0)  # revision 2's replica not drained yet
    assert not v.done and v.line == "echo 1/1 ready, 1 old, 1 of revision 1 kept serving"
    await settle(node, fleet)
    v = watch.observe(cluster_status(node), now=1)
    assert v.done and v.line == "echo 1/1 ready, 1 of revision 1 kept serving"


async def test_a_deploy_of_the_running_spec_with_a_kept_revision_is_done_at_once(
    head: tuple[HeadNode, FakeSchedulers],
) -> None:
    node, fleet = head
    second = versioned("b", serve_revisions=2)
    await deployed(node, fleet, versioned("a", serve_revisions=2), second)
    status = cluster_status(node)  # also what `shoal up` watches after a head restart
    assert DeployWatch.after_apply(status, [second]).observe(status, now=0).done


async def test_a_failed_revision_is_not_taken_for_one_the_head_keeps(
    head: tuple[HeadNode, FakeSchedulers], clock: FakeClock
) -> None:
    """The head keeps the latest earlier revisions that did not fail: after a rollback whose
    replicas failed (FAILED, never rolled back by itself), the next deploy keeps the revision
    before it, and is done once its own replica is READY and revision 2's (not drained while
    the failed revision had no replica READY) is gone."""
    node, fleet = head
    await deployed(node, fleet, *(versioned(v, serve_revisions=2) for v in "abc"))
    await node.rollback("echo", 1)  # revision 4: "a" again, revision 3 kept
    for _ in range(FAILED_AFTER):
        [create] = [a for a in await node.reconcile_once() if isinstance(a, CreateReplica)]
        await make_ready(node, fleet, gone={create.replica_id})  # it died starting
        clock.advance(60)
    await node.reconcile_once()
    before = cluster_status(node)
    assert before["deployments"][0]["pending_reason"].startswith(FAILED)
    fifth = versioned("e", serve_revisions=2)
    await node.apply(fifth)
    watch = DeployWatch.after_apply(before, [fifth])
    await node.reconcile_once()
    await make_ready(node, fleet)
    v = watch.observe(cluster_status(node), now=0)  # revision 2's replica not drained yet
    assert not v.done and v.line == "echo 1/1 ready, 1 old, 1 of revision 3 kept serving"
    await settle(node, fleet)
    v = watch.observe(cluster_status(node), now=1)
    assert v.done and v.line == "echo 1/1 ready, 1 of revision 3 kept serving"


def test_history_marks_the_current_revision_and_failures() -> None:
    revs = [
        Revision(1, 0.0, "created", "{}", "aaa", "created"),
        Revision(2, 0.0, "updated", "{}", "bbb", "model changed", outcome="failed: ImportError: x"),
        Revision(
            3, 0.0, "rolled_back", "{}", "aaa", "rolled back to revision 1 (revision 2 failed)", rollback_to=1
        ),
    ]
    lines = render_history(revs).splitlines()
    assert lines[0].split() == ["REVISION", "TIME", "KIND", "SPEC", "HASH", "CHANGE", "OUTCOME"]
    assert lines[1].rstrip().endswith("created")
    assert lines[2].rstrip().endswith("failed: ImportError: x")
    assert lines[3].rstrip().endswith("current")


def test_revisions_and_events_cross_grpc_unchanged() -> None:
    rev = Revision(3, 1.5, "rolled_back", '{"a": 1}', "h", "c", "failed: x", 1)
    assert revision_from_pb(revision_to_pb(rev)) == rev
    for event in (LifecycleEvent(1.5, "a", "created", None, "m"), LifecycleEvent(1.5, "a", "scaled", 0, "m")):
        assert lifecycle_from_pb(lifecycle_to_pb(event)) == event

"""The CLI's side of revisions: the hash of a model's files, how ``deploy`` follows a rollout
when the head keeps a restart count or rolls back, and the history table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from shoal.cli.revisions import render_history
from shoal.core import model_hash as mh
from shoal.core.deploy_watch import DeployWatch
from shoal.core.spec import DeploymentSpec, parse_spec
from shoal.rpc.convert import lifecycle_from_pb, lifecycle_to_pb, revision_from_pb, revision_to_pb
from shoal.store.history import LifecycleEvent, Revision

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

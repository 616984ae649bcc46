"""``allowed_model_dirs`` on a real cluster (head and scheduler processes on port 0, real
replicas): a python deployment's ``base_dir`` must be an existing folder inside an allowed
one, and its module is imported from there alone, never found elsewhere on ``sys.path``.

Before, a ``base_dir`` that did not exist was applied (201) and each replica imported the
module from wherever ``sys.path`` had one (``jp`` from the virtualenv's ``bin``,
``cloudpickle:dumps`` from site-packages), refusing it only afterwards ("module ... (loaded
from ...) is outside the folders"): the check that ``docs/security.md`` promises runs
before anything is imported ran after.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from shoal.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(90)

MARKED = """\
import pathlib

pathlib.Path({marker!r}).write_text("imported")


class Model:
    def predict(self, inputs):
        return inputs
"""

MODEL = "class M:\n    def predict(self, inputs):\n        return inputs\n"


def python(name: str, model: str, base_dir: Path | str, replicas: int = 1) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "python",
        "model": model,
        "base_dir": str(base_dir),
        "replicas": replicas,
        "resources": {"cpus": 0.1},
    }


async def test_a_missing_base_dir_never_imports_a_module_from_sys_path(tmp_path: Path) -> None:
    allowed = tmp_path / "models"
    allowed.mkdir()
    (allowed / "m.py").write_text(MODEL)
    (allowed / "plain-file").write_text("not a folder")
    # A module outside the allowed folder, on every process's sys.path (PYTHONPATH), that
    # leaves a marker when imported.
    outside = tmp_path / "outside"
    outside.mkdir()
    module = f"shoal_outside_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "outside-was-imported"
    (outside / f"{module}.py").write_text(MARKED.format(marker=str(marker)))
    pythonpath = os.pathsep.join(p for p in (str(outside), os.environ.get("PYTHONPATH", "")) if p)
    env = {"SHOAL_ALLOWED_MODEL_DIRS": str(allowed), "PYTHONPATH": pythonpath}

    async with ProcessCluster(tmp_path / "cluster", env=env) as cluster:
        assert cluster.head is not None
        async with httpx.AsyncClient(base_url=f"http://{cluster.head.endpoints['head_http']}") as http:
            # The head may run apart from the schedulers, so a base_dir it does not see is
            # taken; every replica refuses it before importing anything.
            missing = python("x", f"{module}:Model", allowed / "nope")
            r = await http.post("/api/deployments", json=missing, timeout=10)
            assert r.status_code == 201, r.text
            status = await cluster.wait_for(
                lambda s: any("fail" in d["pending_reason"].lower() for d in s["deployments"]),
                timeout_s=30,
                what="a replica start failure",
            )
            reason = next(d["pending_reason"] for d in status["deployments"] if d["name"] == "x")
            assert "nope' does not exist" in reason and "allowed_model_dirs" in reason, reason
            logs = [p.read_text() for p in cluster.root.rglob("replica_*.log")]
            assert logs and all("does not exist" in text for text in logs), logs
            assert not any("loaded from" in text for text in logs), logs

            # A base_dir the head sees as a file is refused at apply time.
            r = await http.post(
                "/api/deployments", json=python("y", "m:M", allowed / "plain-file"), timeout=10
            )
            assert r.status_code == 400 and "is not a folder" in r.json()["error"], r.text

            # The same cluster serves a module that is in its allowed base_dir.
            r = await http.post("/api/deployments", json=python("ok", "m:M", allowed), timeout=10)
            assert r.status_code == 201, r.text
            await cluster.wait_ready("ok", 1)
        assert not marker.exists(), "the module outside the allowed folders was imported"
    assert cluster.leftover_replicas() == []


EVIL_PICKLE = "import pathlib; pathlib.Path({marker!r}).touch()"


class _RunsCode:
    """Pickled, it runs ``code`` when loaded: what a hostile .joblib file holds."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (self.code,)


async def test_a_multiplexed_sklearn_id_whose_file_links_outside_is_refused(tmp_path: Path) -> None:
    """The control-plane sweep's finding 4: ``tenants/t2.joblib``, a link to a pickle outside
    the allowed folder, ran when a request named model id ``t2``."""
    allowed, outside = tmp_path / "models", tmp_path / "outside"
    (allowed / "tenants").mkdir(parents=True)
    outside.mkdir()
    marker = tmp_path / "pickle-ran"
    joblib.dump(_RunsCode(EVIL_PICKLE.format(marker=str(marker))), outside / "evil.joblib")
    (allowed / "tenants" / "t2.joblib").symlink_to(outside / "evil.joblib")
    X = np.array([[0.0], [1.0], [2.0], [3.0]], dtype=np.float32)
    joblib.dump(LogisticRegression().fit(X, [0, 0, 1, 1]), allowed / "tenants" / "t1.joblib")
    spec = {
        "name": "tenants",
        "backend": "sklearn",
        "model": str(allowed / "tenants"),
        "resources": {"cpus": 0.1},
        "multiplexing": {"max_models_per_replica": 2},
    }
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [3.0]}]}

    async with ProcessCluster(
        tmp_path / "cluster", env={"SHOAL_ALLOWED_MODEL_DIRS": str(allowed)}
    ) as cluster:
        await cluster.deploy(spec)
        await cluster.wait_ready("tenants", 1)
        async with httpx.AsyncClient(base_url=f"http://{cluster.http_address()}", timeout=20) as http:
            r = await http.post(
                "/v2/models/tenants/infer", json=body, headers={"shoal-multiplexed-model-id": "t2"}
            )
            assert r.status_code == 403, r.text
            error = r.json()["error"]
            assert "model id 't2'" in error and "outside the folders" in error, error
            assert str(outside) not in error, error
            r = await http.post(
                "/v2/models/tenants/infer", json=body, headers={"shoal-multiplexed-model-id": "t1"}
            )
            assert r.status_code == 200, r.text
        assert not marker.exists(), "the pickle outside the allowed folder was loaded"
    assert cluster.leftover_replicas() == []


async def test_a_file_uri_folder_never_brings_code_from_outside(tmp_path: Path) -> None:
    """The control-plane sweep's finding 3: ``pkg/evil.py`` linked to a module outside the
    allowed folder. ``base_dir: .../pkg`` was refused, ``base_dir: file:///.../pkg/`` applied;
    the scheduler copied the folder, following the link, and the replica imported the copy."""
    allowed, outside = tmp_path / "models", tmp_path / "outside"
    (allowed / "pkg").mkdir(parents=True)
    outside.mkdir()
    marker = tmp_path / "outside-was-imported"
    (outside / "evil.py").write_text(MARKED.format(marker=str(marker)))
    (allowed / "pkg" / "evil.py").symlink_to(outside / "evil.py")
    # A module inside that imports the linked one: the head passes it, the fetch must not.
    (allowed / "pkg" / "m.py").write_text("from evil import Model as _Evil\n\n\nclass M(_Evil):\n    pass\n")

    async with ProcessCluster(
        tmp_path / "cluster", env={"SHOAL_ALLOWED_MODEL_DIRS": str(allowed)}
    ) as cluster:
        assert cluster.head is not None
        async with httpx.AsyncClient(base_url=f"http://{cluster.head.endpoints['head_http']}") as http:
            uri = (allowed / "pkg").as_uri() + "/"
            for base_dir in (str(allowed / "pkg"), uri):
                r = await http.post(
                    "/api/deployments", json=python("evil", "evil:Model", base_dir), timeout=10
                )
                assert r.status_code == 400 and "module 'evil'" in r.json()["error"], (base_dir, r.text)
            r = await http.post("/api/deployments", json=python("m", "m:M", uri), timeout=10)
            assert r.status_code == 201, r.text
            status = await cluster.wait_for(
                lambda s: any("leads outside" in d["pending_reason"] for d in s["deployments"]),
                timeout_s=30,
                what="the fetch's refusal",
            )
            reason = next(d["pending_reason"] for d in status["deployments"] if d["name"] == "m")
            assert "evil.py leads outside the folders" in reason and str(outside) not in reason, reason
        assert not marker.exists(), "the module outside the allowed folder was imported"
    assert cluster.leftover_replicas() == []

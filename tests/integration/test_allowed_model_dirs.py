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
import pytest

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


def python(name: str, model: str, base_dir: Path, replicas: int = 1) -> dict[str, Any]:
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

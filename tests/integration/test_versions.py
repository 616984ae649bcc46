"""Versions on a real cluster (issue 17): a deployment's revision N is OIP version N.

A python model whose answer says which revision's spec it runs (an option added to its
input): revision 1, then revision 2 with ``serve_revisions: 2``, so that both serve.
REST and tritonclient's gRPC client reach each version, the metadata lists both, and a
version that does not serve is a 404 naming those that do.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as tgrpc_aio
from tritonclient.utils import InferenceServerException

from shoal.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(90)

MODEL = """
import numpy as np


class Adder:
    def __init__(self, add: float = 0.0) -> None:
        self.add = add

    def predict(self, inputs):
        return {"y": (inputs["x"] + self.add).astype(np.float32)}
"""
TENSORS = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
}


def spec(folder: Path, add: float, **fields: Any) -> dict[str, Any]:
    return {
        "name": "adder",
        "backend": "python",
        "model": "adder:Adder",
        "base_dir": str(folder),
        "options": {"add": add},
        "resources": {"cpus": 0.1},
        **TENSORS,
        **fields,
    }


def body() -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}]}


async def test_each_serving_revision_is_a_version_every_client_reaches(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "adder.py").write_text(MODEL)
    async with ProcessCluster(tmp_path / "cluster") as cluster:
        await cluster.deploy(spec(folder, 10.0))
        await cluster.wait_ready("adder", 1)
        await cluster.deploy(spec(folder, 20.0, serve_revisions=2))
        await cluster.wait_ready("adder", 2, timeout_s=60)
        assert sorted(r["revision"] for r in await cluster.replicas("adder")) == [1, 2]

        base = f"http://{cluster.http_address()}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            # The scheduler learns each replica's revision from the head's next routing table.
            deadline = time.monotonic() + 15
            while (versions := (await http.get("/v2/models/adder")).json().get("versions")) != ["1", "2"]:
                assert time.monotonic() < deadline, f"metadata lists versions {versions}, not 1 and 2"
                await asyncio.sleep(0.05)

            async def infer(path: str) -> tuple[int, dict[str, Any]]:
                r = await http.post(f"/v2/models/adder{path}/infer", json=body())
                return r.status_code, r.json()

            for path, version, want in (
                ("/versions/1", "1", [11.0, 12.0]),
                ("/versions/2", "2", [21.0, 22.0]),
                ("", "2", [21.0, 22.0]),  # no version: the newest
            ):
                for _ in range(3):
                    status, doc = await infer(path)
                    assert status == 200, doc
                    assert (doc["model_version"], doc["outputs"][0]["data"]) == (version, want)

            status, doc = await infer("/versions/3")
            assert status == 404
            assert doc["error"] == "model 'adder' has no version '3' serving; versions that serve: 1, 2"
            status, doc = await infer("/versions/first")
            assert status == 400 and "version 'first' is not a version number" in doc["error"]
            assert (await http.get("/v2/models/adder/versions/1/ready")).status_code == 200
            assert (await http.get("/v2/models/adder/versions/3/ready")).status_code == 404
            index = (await http.post("/v2/repository/index", json={})).json()
            assert [(e["name"], e["version"], e["state"]) for e in index] == [
                ("adder", "1", "READY"),
                ("adder", "2", "READY"),
            ]

        client = tgrpc_aio.InferenceServerClient(cluster.scheduler_address())
        try:
            x = tgrpc_aio.InferInput("x", [2], "FP32")
            x.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
            for version, want in (("1", [11.0, 12.0]), ("2", [21.0, 22.0])):
                result = await client.infer("adder", [x], model_version=version)
                np.testing.assert_array_equal(result.as_numpy("y"), np.array(want, dtype=np.float32))
                assert result.get_response().model_version == version
            metadata = await client.get_model_metadata("adder", model_version="1")
            assert list(metadata.versions) == ["1", "2"]
            with pytest.raises(InferenceServerException) as missing:
                await client.infer("adder", [x], model_version="7")
            assert missing.value.status() == "StatusCode.NOT_FOUND"
            assert "versions that serve: 1, 2" in (missing.value.message() or "")
        finally:
            await client.close()

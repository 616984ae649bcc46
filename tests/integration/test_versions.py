"""Versions on a real cluster (issue 17): a deployment's revision N is OIP version N.

A python model whose answer says which revision's spec it runs (an option added to its
input): revision 1, then revision 2 with ``serve_revisions: 2``, so that both serve.
REST and tritonclient's gRPC client reach each version, the metadata lists both, and a
version that does not serve is a 404 naming those that do. An update that changes the
model's inputs leaves the earlier version callable with its own inputs, and described by
them.
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


SUMMER = """
import numpy as np


class Summer:
    def __init__(self, input: str = "x") -> None:
        self.input = input

    def predict(self, inputs):
        return {"total": inputs[self.input].sum(axis=1).astype(np.float32)}
"""


def summer(folder: Path, name: str, width: int, **fields: Any) -> dict[str, Any]:
    """Model ``ver``: one input ``name`` of ``width`` columns, summed per row into ``total``."""
    return {
        "name": "ver",
        "backend": "python",
        "model": "summer:Summer",
        "base_dir": str(folder),
        "options": {"input": name},
        "resources": {"cpus": 0.1},
        "inputs": [{"name": name, "datatype": "FP32", "shape": [-1, width]}],
        "outputs": [{"name": "total", "datatype": "FP32", "shape": [-1]}],
        **fields,
    }


def rows(name: str, width: int) -> dict[str, Any]:
    return {"inputs": [{"name": name, "datatype": "FP32", "shape": [1, width], "data": [1.0] * width}]}


async def test_an_earlier_version_keeps_its_own_inputs_after_an_update_changes_them(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "summer.py").write_text(SUMMER)
    async with ProcessCluster(tmp_path / "cluster") as cluster:
        await cluster.deploy(summer(folder, "x", 16, serve_revisions=2))
        await cluster.wait_ready("ver", 1)
        await cluster.deploy(summer(folder, "y", 4, serve_revisions=2))
        await cluster.wait_ready("ver", 2, timeout_s=60)

        base = f"http://{cluster.http_address()}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            deadline = time.monotonic() + 15
            while (versions := (await http.get("/v2/models/ver")).json().get("versions")) != ["1", "2"]:
                assert time.monotonic() < deadline, f"metadata lists versions {versions}, not 1 and 2"
                await asyncio.sleep(0.05)

            async def infer(path: str, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
                r = await http.post(f"/v2/models/ver{path}/infer", json=doc)
                return r.status_code, r.json()

            for path, doc, version, want in (
                ("/versions/1", rows("x", 16), "1", [16.0]),
                ("/versions/2", rows("y", 4), "2", [4.0]),
                ("", rows("y", 4), "2", [4.0]),  # no version: the current one's inputs
            ):
                for _ in range(3):  # whichever ingress process or replica answers
                    status, answer = await infer(path, doc)
                    assert status == 200, (path, answer)
                    assert (answer["model_version"], answer["outputs"][0]["data"]) == (version, want)

            # Each version refuses the other's input, naming its own.
            status, answer = await infer("/versions/1", rows("y", 4))
            assert status == 400, answer
            assert answer["error"] == "unknown input 'y'; model 'ver' takes 'x'"
            status, answer = await infer("/versions/2", rows("x", 16))
            assert status == 400 and answer["error"] == "unknown input 'x'; model 'ver' takes 'y'"
            status, answer = await infer("", rows("x", 16))
            assert status == 400 and answer["error"] == "unknown input 'x'; model 'ver' takes 'y'"
            # Version 1 checks its own shapes too: 4 columns are not its 16.
            status, answer = await infer("/versions/1", rows("x", 4))
            assert status == 400 and "'x'" in answer["error"] and "16" in answer["error"], answer

            old = (await http.get("/v2/models/ver/versions/1")).json()
            assert (old["inputs"], old["versions"]) == (
                [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
                ["1", "2"],
            )
            assert old["outputs"] == [{"name": "total", "datatype": "FP32", "shape": [-1]}]
            for path in ("", "/versions/2"):
                assert (await http.get(f"/v2/models/ver{path}")).json()["inputs"] == [
                    {"name": "y", "datatype": "FP32", "shape": [-1, 4]}
                ]
            config = (await http.get("/v2/models/ver/versions/1/config")).json()
            assert [(t["name"], t["dims"]) for t in config["input"]] == [("x", [-1, 16])]

        client = tgrpc_aio.InferenceServerClient(cluster.scheduler_address())
        try:
            x = tgrpc_aio.InferInput("x", [1, 16], "FP32")
            x.set_data_from_numpy(np.ones((1, 16), dtype=np.float32))
            result = await client.infer("ver", [x], model_version="1")
            np.testing.assert_array_equal(result.as_numpy("total"), np.array([16.0], dtype=np.float32))
            with pytest.raises(InferenceServerException) as refused:
                await client.infer("ver", [x])
            assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert "takes 'y'" in (refused.value.message() or "")
            metadata = await client.get_model_metadata("ver", model_version="1")
            assert [(t.name, list(t.shape)) for t in metadata.inputs] == [("x", [-1, 16])]
            metadata = await client.get_model_metadata("ver")
            assert [(t.name, list(t.shape)) for t in metadata.inputs] == [("y", [-1, 4])]
        finally:
            await client.close()

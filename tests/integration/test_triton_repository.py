"""A Triton model repository served unchanged: built with skl2onnx in Triton's layout,
deployed with ``shoal deploy --model-repository``, driven with tritonclient's inference
and repository calls (index, unload, load) over gRPC and HTTP."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("skl2onnx")

import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_iris
from sklearn.linear_model import LinearRegression, LogisticRegression
from tritonclient.utils import InferenceServerException

from shoal.rpc.repository import GrpcDeployer
from shoal.testing.cluster import ProcessCluster
from tests.unit import test_triton_python as triton_python

pytestmark = [pytest.mark.timeout(120)]
T = TypeVar("T")

IRIS_CONFIG = """
platform: "onnxruntime_onnx"
max_batch_size: 16
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [
  { name: "label" data_type: TYPE_INT64 dims: [ ] },
  { name: "probabilities" data_type: TYPE_FP32 dims: [ 3 ] label_filename: "species.txt" }
]
dynamic_batching { max_queue_delay_microseconds: 1000 }
instance_group [ { count: 1 kind: KIND_CPU } ]
version_policy: { specific: { versions: [ 1 ] } }
"""
# No config: served with the tensors the ONNX file declares, and the latest version.
LINEAR = "linear"


def build_repository(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """iris: version 1 predicts the classes, version 2 (not served) their reverse; linear: one
    version, no config.pbtxt. Returns iris's rows and version 1's labels for them."""
    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    for version, labels in ((1, y), (2, 2 - y)):
        model = LogisticRegression(max_iter=500).fit(x, labels)
        onx = to_onnx(
            model, initial_types=[("x", FloatTensorType([None, 4]))], options={id(model): {"zipmap": False}}
        )
        folder = root / "iris" / str(version)
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(onx.SerializeToString())
    (root / "iris" / "config.pbtxt").write_text(IRIS_CONFIG)
    (root / "iris" / "species.txt").write_text("setosa\nversicolor\nvirginica\n")
    regression = LinearRegression().fit(x[:, :3], x[:, 3])
    (root / LINEAR / "1").mkdir(parents=True)
    (root / LINEAR / "1" / "model.onnx").write_bytes(to_onnx(regression, x[:1, :3]).SerializeToString())
    # A Triton python model (TritonPythonModel, pb_utils), from the unit tests.
    (root / "add_sub" / "1").mkdir(parents=True)
    (root / "add_sub" / "config.pbtxt").write_text(triton_python.CONFIG)
    (root / "add_sub" / "1" / "model.py").write_text(triton_python.MODEL)
    rows = x[::25]
    return rows, y[::25]


def shoal_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", *args],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "SHOAL_HEAD": ""},
    )


async def over_http(cluster: ProcessCluster, call: Callable[[thttp.InferenceServerClient], T]) -> T:
    def run() -> T:
        client = thttp.InferenceServerClient(cluster.http_address(), network_timeout=90.0)
        try:
            return call(client)
        finally:
            client.close()

    return await asyncio.to_thread(run)


def index_of(entries: list[Any]) -> dict[str, tuple[str, str, str]]:
    def get(e: Any, key: str) -> str:
        return str(e[key] if isinstance(e, dict) else getattr(e, key))

    return {get(e, "name"): (get(e, "version"), get(e, "state"), get(e, "reason")) for e in entries}


async def test_a_triton_repository_serves_and_loads_and_unloads(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    rows, labels = build_repository(repo)
    async with ProcessCluster(
        tmp_path / "cluster", scheduler_args=[["--model-repository", str(repo)]]
    ) as cluster:
        deployed = await asyncio.to_thread(
            shoal_cli, "--head", cluster.head_address, "deploy", "--model-repository", str(repo)
        )
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        # What a load asks the head while it waits: no FAILED reason for a model that serves.
        deployer = GrpcDeployer(cluster.head_address, cluster.settings)
        try:
            assert await deployer.failures(None) == {}
        finally:
            await deployer.close()
        grpc_client = tgrpc_aio.InferenceServerClient(cluster.scheduler_address())
        try:
            index = index_of((await grpc_client.get_model_repository_index()).models)
            assert index == {
                "iris": ("1", "READY", ""),
                LINEAR: ("1", "READY", ""),
                "add_sub": ("1", "READY", ""),
            }

            # The python model: initialize, then execute per request, in its replica.
            a, b = (
                tgrpc_aio.InferInput("INPUT0", [1, 2], "FP32"),
                tgrpc_aio.InferInput("INPUT1", [1, 2], "FP32"),
            )
            a.set_data_from_numpy(np.array([[1.0, 2.0]], dtype=np.float32))
            b.set_data_from_numpy(np.array([[0.5, 0.5]], dtype=np.float32))
            summed = await grpc_client.infer("add_sub", [a, b])
            assert summed.as_numpy("OUTPUT0").tolist() == [[1.5, 2.5]]

            # The version policy chose version 1: the classes, not their reverse; batched over gRPC.
            x = tgrpc_aio.InferInput("x", list(rows.shape), "FP32")
            x.set_data_from_numpy(rows)
            result = await grpc_client.infer("iris", [x])
            assert result.as_numpy("label").tolist() == labels.tolist()
            # Its top class, named by the config's label_filename (the classification extension).
            top = await grpc_client.infer(
                "iris", [x], outputs=[tgrpc_aio.InferRequestedOutput("probabilities", class_count=1)]
            )
            species = ["setosa", "versicolor", "virginica"]
            named = [row[0].decode().split(":") for row in top.as_numpy("probabilities")]
            assert [(int(index), name) for _, index, name in named] == [(y, species[y]) for y in labels]
            config = (await grpc_client.get_model_config("iris")).config
            assert config.max_batch_size == 16
            # More rows than its config.pbtxt's max_batch_size: refused, as Triton refuses it
            # (before, the 18 rows ran as one model call).
            many = tgrpc_aio.InferInput("x", [18, 4], "FP32")
            many.set_data_from_numpy(np.repeat(rows, 3, axis=0))
            with pytest.raises(InferenceServerException, match="batch-size must be <= 16 for 'iris'") as big:
                await grpc_client.infer("iris", [many])
            assert big.value.status() == "StatusCode.INVALID_ARGUMENT"

            # The model without a config, over HTTP: the tensors its file declares.
            def linear(client: thttp.InferenceServerClient) -> tuple[int, ...]:
                name = client.get_model_metadata(LINEAR)["inputs"][0]["name"]
                inp = thttp.InferInput(name, [2, 3], "FP32")
                inp.set_data_from_numpy(rows[:2, :3].copy())
                out = client.infer(LINEAR, [inp]).as_numpy("variable")
                assert out is not None
                return tuple(out.shape)

            assert await over_http(cluster, linear) == (2, 1)

            # Unload over gRPC: the model stops serving, the index says so.
            await grpc_client.unload_model("iris")
            index = index_of((await grpc_client.get_model_repository_index()).models)
            assert index["iris"] == ("1", "UNAVAILABLE", "unloaded")
            with pytest.raises(InferenceServerException, match="unknown model 'iris'"):
                await grpc_client.infer("iris", [x])

            # A model that cannot be mapped is listed with the field that stops it, and refused.
            (repo / "pipeline").mkdir()
            (repo / "pipeline" / "config.pbtxt").write_text('platform: "ensemble"\n')

            def load_refused(client: thttp.InferenceServerClient) -> str:
                with pytest.raises(InferenceServerException) as err:
                    client.load_model("pipeline")
                return str(err.value)

            assert "pipeline/config.pbtxt: platform: 'ensemble'" in await over_http(cluster, load_refused)

            # Load over HTTP: returns once the model serves again.
            def load(client: thttp.InferenceServerClient) -> list[Any]:
                client.load_model("iris")
                assert client.is_model_ready("iris")
                index: list[Any] = client.get_model_repository_index()
                return index

            index = index_of(await over_http(cluster, load))
            assert index["iris"] == ("1", "READY", "")
            assert index["pipeline"][1] == "UNAVAILABLE" and "platform" in index["pipeline"][2]
            result = await grpc_client.infer("iris", [x])
            assert result.as_numpy("label").tolist() == labels.tolist()

            # A model whose replicas die before READY: the load says why the head gave up,
            # and so does the index afterwards (before: "loading" for ever).
            (repo / "broken" / "1").mkdir(parents=True)
            (repo / "broken" / "config.pbtxt").write_text(triton_python.CONFIG)
            (repo / "broken" / "1" / "model.py").write_text("raise RuntimeError('cannot import me')\n")
            with pytest.raises(InferenceServerException, match="did not load: FAILED") as refused:
                await grpc_client.load_model("broken")
            assert "cannot import me" in str(refused.value)
            index = index_of((await grpc_client.get_model_repository_index()).models)
            assert index["broken"][1] == "UNAVAILABLE" and index["broken"][2].startswith("FAILED")
        finally:
            await grpc_client.close()

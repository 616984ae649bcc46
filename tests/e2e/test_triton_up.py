"""``shoal up --model-repository`` as a user runs it: every model of a Triton repository
serves at start; ``shoal deploy --model-repository`` refuses a repository it cannot map."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("skl2onnx")

import tritonclient.http as thttp
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LinearRegression
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import stop_group

CONFIG = """
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "variable" data_type: TYPE_FP32 dims: [ 1 ] } ]
version_policy: { latest: { num_versions: 1 } }
"""


def linear_repository(root: Path) -> None:
    """``sum``: version 1 adds its two inputs, version 2 (the latest, which serves) doubles the sum."""
    x = np.random.default_rng(0).random((20, 2), dtype=np.float32)
    for version, scale in ((1, 1.0), (2, 2.0)):
        model = LinearRegression().fit(x, scale * x.sum(axis=1))
        onx = to_onnx(model, initial_types=[("x", FloatTensorType([None, 2]))])
        (root / "sum" / str(version)).mkdir(parents=True)
        (root / "sum" / str(version) / "model.onnx").write_bytes(onx.SerializeToString())
    (root / "sum" / "config.pbtxt").write_text(CONFIG)


def test_shoal_deploy_refuses_a_repository_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "seq" / "1").mkdir(parents=True)
    (tmp_path / "seq" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\nsequence_batching { }\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal.cli",
            "--head",
            "127.0.0.1:1",
            "deploy",
            "--model-repository",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "seq/config.pbtxt: sequence_batching: sequence batching" in proc.stderr, proc.stderr


def test_shoal_up_serves_every_model_of_the_repository(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    linear_repository(repo)
    state, log = tmp_path / "state", tmp_path / "up.log"
    ports = ["--head-port", "0", "--dashboard-port", "0", "--grpc-port", "0", "--http-port", "0"]
    env = {
        **os.environ,
        "SHOAL_HEARTBEAT_INTERVAL_S": "0.2",
        "SHOAL_RECONCILE_INTERVAL_S": "0.2",
        "SHOAL_PING_INTERVAL_S": "0.2",
        "SHOAL_SHUTDOWN_GRACE_S": "3",
        "SHOAL_INGRESS_WORKERS": "1",
        "SHOAL_DEAD_AFTER_S": "1",  # the head waits this long for schedulers before it places
    }
    with open(log, "w") as out:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shoal.cli",
                "up",
                "--state",
                str(state),
                *ports,
                "--model-repository",
                str(repo),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "all deployments ready" not in log.read_text():
            assert up.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        address = json.loads((state / "endpoints.json").read_text())["scheduler_http"]
        client = thttp.InferenceServerClient(address)
        try:
            index = client.get_model_repository_index()
            assert [(m["name"], m["version"], m["state"]) for m in index] == [("sum", "2", "READY")]
            x = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
            inp = thttp.InferInput("x", [2, 2], "FP32")
            inp.set_data_from_numpy(x)
            result = client.infer("sum", [inp], model_version="2")
            out = result.as_numpy("variable")
            assert out is not None
            np.testing.assert_allclose(out.reshape(-1), [6.0, 14.0], rtol=1e-4)
            # The version that serves is the repository's: metadata, answers, and version routes.
            assert result.get_response()["model_version"] == "2"
            assert client.get_model_metadata("sum")["versions"] == ["2"]
            with pytest.raises(InferenceServerException, match="its only version is '2'"):
                client.infer("sum", [inp], model_version="1")
        finally:
            client.close()
    finally:
        stop_group(up)

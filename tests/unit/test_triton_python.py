"""Triton's python backend models from a repository, run by shoal's python backend
(shoal.backends.triton_python), with Triton's add_sub example as the model."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from shoal.backends import load_backend
from shoal.core.model_dirs import check_deployable
from shoal.core.triton_repo import read_model, served_version
from shoal.errors import Internal, InvalidArgument
from shoal.replica.compose import CallContext, GivenUp, current_call
from shoal.scheduler.models import model_version

CONFIG = """
backend: "python"
max_batch_size: 4
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ 2 ] },
  { name: "INPUT1" data_type: TYPE_FP32 dims: [ 2 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 2 ] },
  { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 2 ] }
]
"""

# Triton's python_backend examples/add_sub/model.py, trimmed; it refuses negative inputs.
MODEL = """
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        self.version = args["model_version"]
        config = pb_utils.get_output_config_by_name(self.model_config, "OUTPUT0")
        self.output0_dtype = pb_utils.triton_string_to_numpy(config["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            in_0 = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            in_1 = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            if (in_0 < 0).any():
                error = pb_utils.TritonError("INPUT0 must not be negative", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            out_0 = pb_utils.Tensor("OUTPUT0", (in_0 + in_1).astype(self.output0_dtype))
            out_1 = pb_utils.Tensor("OUTPUT1", in_0 - in_1)
            responses.append(pb_utils.InferenceResponse(output_tensors=[out_0, out_1]))
        return responses

    def finalize(self):
        print("finalized version", self.version)
"""


def add_sub(root: Path, version: int = 3) -> None:
    (root / "add_sub" / str(version)).mkdir(parents=True)
    (root / "add_sub" / "config.pbtxt").write_text(CONFIG)
    (root / "add_sub" / str(version) / "model.py").write_text(MODEL)


def test_a_python_model_maps_to_the_python_backend(tmp_path: Path) -> None:
    add_sub(tmp_path)
    m = read_model(tmp_path, "add_sub")
    spec = m.spec
    assert spec is not None and spec.backend == "python"
    assert spec.options["model_file"] == str((tmp_path / "add_sub" / "3" / "model.py").resolve())
    assert [(t.name, t.shape) for t in spec.inputs] == [("INPUT0", (-1, 2)), ("INPUT1", (-1, 2))]
    assert spec.batching.max_batch_size == 4
    assert served_version(tmp_path, spec) == 3 and model_version(spec) == "3"


def test_a_python_model_must_declare_its_tensors(tmp_path: Path) -> None:
    add_sub(tmp_path)
    (tmp_path / "add_sub" / "config.pbtxt").write_text('backend: "python"\n')
    with pytest.raises(InvalidArgument, match=r"config\.pbtxt: input: a python model must declare it"):
        read_model(tmp_path, "add_sub")


async def test_a_python_model_runs_with_initialize_execute_and_finalize(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    add_sub(tmp_path)
    spec = read_model(tmp_path, "add_sub").spec
    assert spec is not None
    backend = load_backend(spec)
    backend.load()
    try:
        a = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
        b = np.ones((2, 2), dtype=np.float32)
        out = await backend.predict({"INPUT0": a, "INPUT1": b})
        np.testing.assert_array_equal(out["OUTPUT0"], a + b)
        np.testing.assert_array_equal(out["OUTPUT1"], a - b)
        with pytest.raises(InvalidArgument, match="INPUT0 must not be negative"):
            await backend.predict({"INPUT0": -a, "INPUT1": b})
    finally:
        backend.unload()
    assert "finalized version 3" in capfd.readouterr().out


# A model that works in steps and stops when its request is cancelled, as Triton's models do.
STEPS = """
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        (request,) = requests
        x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
        for step in range(200):
            if request.is_cancelled():
                error = pb_utils.TritonError(f"{request.request_id()} cancelled after {step} steps")
                return [pb_utils.InferenceResponse(output_tensors=[], error=error)]
            time.sleep(0.01)
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", x)])]
"""


async def test_a_python_model_sees_its_request_cancelled(tmp_path: Path) -> None:
    """``InferenceRequest.is_cancelled()`` and ``request_id()``, which Triton's models call,
    were missing (AttributeError). is_cancelled is true once every request the call holds
    was given up (the replica marks one whose deadline passed or whose client left)."""
    (tmp_path / "steps" / "1").mkdir(parents=True)
    (tmp_path / "steps" / "config.pbtxt").write_text(CONFIG.replace("max_batch_size: 4", "max_batch_size: 0"))
    (tmp_path / "steps" / "1" / "model.py").write_text(STEPS)
    spec = read_model(tmp_path, "steps").spec
    assert spec is not None
    backend = load_backend(spec)
    backend.load()
    given_up = GivenUp()
    x = {"INPUT0": np.ones(2, np.float32), "INPUT1": np.ones(2, np.float32)}
    try:
        token = current_call.set(CallContext(("req-7",), time.monotonic() + 60, (given_up,)))
        try:
            running = asyncio.ensure_future(backend.predict(x))
        finally:
            current_call.reset(token)
        await asyncio.sleep(0.1)
        given_up.set()
        with pytest.raises(Internal, match=r"req-7 cancelled after \d+ steps"):
            await asyncio.wait_for(running, 1.0)  # 200 steps of 10 ms when it could not tell
    finally:
        backend.unload()


def test_with_allowed_model_dirs_python_models_are_refused(tmp_path: Path) -> None:
    add_sub(tmp_path)
    spec = read_model(tmp_path, "add_sub").spec
    assert spec is not None
    with pytest.raises(InvalidArgument, match="outside the folders models may come from"):
        check_deployable(spec, (str(tmp_path),))

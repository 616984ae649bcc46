"""The digits classifier served two ways on a real cluster answers the same.

``digits`` is the scikit-learn pipeline (``examples/train_digits.py``, trained into a
temporary copy of ``examples/``) on the ``sklearn`` backend; ``digits-onnx`` is the same
pipeline converted with ``examples/convert_digits_onnx.py``'s ``convert`` and run by ONNX
Runtime on the ``onnx`` backend. Both answer the whole test split over the Open Inference
Protocol (tritonclient, gRPC) with the same labels and, to float32 rounding, the same
probabilities.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import joblib
import numpy as np
import pytest
import pytest_asyncio

pytest.importorskip("onnxruntime")
pytest.importorskip("skl2onnx")

import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio

from shoal.testing.cluster import ProcessCluster

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="module")]


def example(examples: Path, name: str) -> ModuleType:
    """``examples/<name>.py`` imported as a module."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", examples / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(
    tmp_path_factory: pytest.TempPathFactory, examples_dir: Path
) -> AsyncIterator[ProcessCluster]:
    root = tmp_path_factory.mktemp("real")
    onnx_file = example(examples_dir, "convert_digits_onnx").convert(
        joblib.load(examples_dir / "digits.joblib"), root / "digits.onnx"
    )
    common = {"replicas": 1, "resources": {"cpus": 0.1}}
    async with ProcessCluster(root / "cluster") as c:
        await c.deploy(
            {"name": "digits", "backend": "sklearn", "model": str(examples_dir / "digits.joblib"), **common}
        )
        await c.deploy(
            {
                "name": "digits-onnx",
                "backend": "onnx",
                "model": str(onnx_file),
                "options": {"intra_op_threads": 1},
                **common,
            }
        )
        await c.wait_ready("digits", 1)
        await c.wait_ready("digits-onnx", 1)
        yield c


async def predict(
    client: tgrpc_aio.InferenceServerClient, model: str, x: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    inp = tgrpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = await client.infer(model, [inp])
    label, probabilities = result.as_numpy("label"), result.as_numpy("probabilities")
    assert label is not None and probabilities is not None
    return label, probabilities


async def test_sklearn_and_onnx_agree_on_the_test_split(cluster: ProcessCluster, examples_dir: Path) -> None:
    _, x_test, _, y_test = example(examples_dir, "train_digits").split()
    client = tgrpc_aio.InferenceServerClient(cluster.scheduler_address())
    try:
        sk_label, sk_prob = await predict(client, "digits", x_test)
        onnx_label, onnx_prob = await predict(client, "digits-onnx", x_test)
        onnx_meta = await client.get_model_metadata("digits-onnx", as_json=True)
    finally:
        await client.close()

    assert sk_label.shape == onnx_label.shape == (len(x_test),)
    assert sk_label.dtype == onnx_label.dtype == np.int64
    np.testing.assert_array_equal(onnx_label, sk_label)
    np.testing.assert_allclose(onnx_prob, sk_prob, atol=1e-4)
    assert (sk_label == y_test).mean() > 0.9
    assert onnx_meta["platform"] == "onnx"
    assert [(t["name"], t["datatype"]) for t in onnx_meta["inputs"]] == [("input", "FP32")]

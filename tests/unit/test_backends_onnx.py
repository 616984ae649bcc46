"""The onnx backend on the digits classifier converted by examples/convert_digits_onnx.py."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import joblib
import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("skl2onnx")

from shoal.backends import Backend, load_backend
from shoal.backends.onnx import OnnxBackend
from shoal.core.spec import DeploymentSpec, TensorSpec, load_spec_file, parse_spec
from shoal.errors import InvalidArgument

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example(name: str) -> ModuleType:
    """An example script imported as a module (not run as __main__)."""
    spec = importlib.util.spec_from_file_location(f"shoal_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The digits classifier trained by train_digits.py, as joblib and as ONNX, plus its test split."""
    folder = tmp_path_factory.mktemp("digits")
    train, convert = example("train_digits"), example("convert_digits_onnx")
    train.main([str(folder / "digits.joblib")])
    estimator = joblib.load(folder / "digits.joblib")
    convert.convert(estimator, folder / "digits.onnx")
    _, x_test, _, y_test = train.split()
    return {"folder": folder, "estimator": estimator, "x_test": x_test, "y_test": y_test}


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    loaded: list[Backend] = []
    yield loaded
    for backend in loaded:
        backend.unload()


def onnx_spec(path: Path, **extra: Any) -> DeploymentSpec:
    return parse_spec(
        {"name": "digits-onnx", "backend": "onnx", "model": path.name, **extra}, base_dir=path.parent
    )


def loaded(spec: DeploymentSpec, backends: list[Backend]) -> Backend:
    backend = load_backend(spec)
    backend.load()
    backends.append(backend)
    return backend


async def test_onnx_and_sklearn_agree_on_the_digits_test_split(
    digits: dict[str, Any], backends: list[Backend]
) -> None:
    backend = loaded(onnx_spec(digits["folder"] / "digits.onnx"), backends)
    assert isinstance(backend, OnnxBackend)
    assert backend.providers == ["CPUExecutionProvider"]
    # The same interface as the sklearn deployment.
    assert backend.inputs() == (TensorSpec(name="input", datatype="FP32", shape=(-1, 64)),)
    assert backend.outputs() == (
        TensorSpec(name="label", datatype="INT64", shape=(-1,)),
        TensorSpec(name="probabilities", datatype="FP32", shape=(-1, 10)),
    )
    assert backend.supports_batching

    x, estimator = digits["x_test"], digits["estimator"]
    out = await backend.predict({"input": x})
    assert out["label"].dtype == np.int64 and out["label"].shape == (len(x),)
    np.testing.assert_array_equal(out["label"], estimator.predict(x))
    assert out["probabilities"].dtype == np.float32 and out["probabilities"].shape == (len(x), 10)
    np.testing.assert_allclose(out["probabilities"], estimator.predict_proba(x), atol=1e-5)
    assert float(np.mean(out["label"] == digits["y_test"])) > 0.9


async def test_onnx_session_options(digits: dict[str, Any], backends: list[Backend]) -> None:
    options = {"intra_op_threads": 1, "inter_op_threads": 1, "providers": ["CPUExecutionProvider"]}
    backend = loaded(onnx_spec(digits["folder"] / "digits.onnx", options=options), backends)
    out = await backend.predict({"input": digits["x_test"][:3]})
    assert out["label"].shape == (3,)
    # Asking for GPUs on a machine without CUDA falls back to the CPU.
    gpu = onnx_spec(digits["folder"] / "digits.onnx", resources={"gpus": 1})
    assert loaded(gpu, backends).providers == ["CPUExecutionProvider"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"providers": ["NoSuchExecutionProvider"]}, "ONNX Runtime here has no NoSuchExecutionProvider"),
        ({"intra_op_threads": 0}, "intra_op_threads must be a positive integer"),
        ({"threads": 2}, "unknown onnx option 'threads'"),
    ],
)
def test_onnx_bad_options_are_invalid_argument(
    digits: dict[str, Any], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        load_backend(onnx_spec(digits["folder"] / "digits.onnx", options=options)).load()


def test_onnx_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"onnx model file '.*missing\.onnx' does not exist"):
        load_backend(onnx_spec(tmp_path / "missing.onnx")).load()
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(InvalidArgument, match=r"cannot load '.*junk\.onnx' with ONNX Runtime"):
        load_backend(onnx_spec(tmp_path / "junk.onnx")).load()


@pytest.mark.parametrize("where", ["data.bin", "../outside/secret.bin", "ABSOLUTE", "link.bin"])
def test_onnx_external_data_must_lie_in_the_model_folder(tmp_path: Path, where: str) -> None:
    """``allowed_model_dirs`` confines the model file; ONNX Runtime (pinned) confines the
    files its tensors' external data come from to that file's folder: a location that is
    absolute, climbs out, or is a link out is refused at load, so a model in an allowed
    folder cannot read (and serve back) a file elsewhere."""
    from onnx import TensorProto, helper

    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    secret = outside / "secret.bin"
    secret.write_bytes(np.arange(10, dtype=np.float32).tobytes())
    (inside / "link.bin").symlink_to(secret)
    (inside / "data.bin").write_bytes(secret.read_bytes())  # its own: loads
    weights = TensorProto(
        name="w", data_type=TensorProto.FLOAT, dims=[10], data_location=TensorProto.EXTERNAL
    )
    location = str(secret) if where == "ABSOLUTE" else where
    for key, value in (("location", location), ("offset", "0"), ("length", "40")):
        weights.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "leak",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [10])],
        initializer=[weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    (inside / "leak.onnx").write_bytes(model.SerializeToString())

    if where == "data.bin":
        load_backend(onnx_spec(inside / "leak.onnx")).load()
        return
    with pytest.raises(
        InvalidArgument, match=r"cannot load '.*leak\.onnx' with ONNX Runtime: .*External data"
    ):
        load_backend(onnx_spec(inside / "leak.onnx")).load()


async def test_onnx_refuses_inputs_that_do_not_fit(digits: dict[str, Any], backends: list[Backend]) -> None:
    backend = loaded(onnx_spec(digits["folder"] / "digits.onnx"), backends)
    cases: dict[str, dict[str, np.ndarray]] = {
        r"input 'input': expected shape \[-1,64\], got \[2,10\]": {"input": np.zeros((2, 10), np.float32)},
        "input 'input': expected datatype FP32, got FP64": {"input": np.zeros((2, 64))},
        "unknown input 'pixels'; the model takes 'input'": {"pixels": np.zeros((2, 64), np.float32)},
        "unknown input 'extra'": {"input": np.zeros((2, 64), np.float32), "extra": np.zeros(2, np.float32)},
    }
    for message, inputs in cases.items():
        with pytest.raises(InvalidArgument, match=message):
            await backend.predict(inputs)


async def test_onnx_refusals_from_the_runtime_are_invalid_argument(
    digits: dict[str, Any], backends: list[Backend]
) -> None:
    # A spec that declares looser tensors than the model lets a bad input reach ONNX Runtime.
    declared = [{"name": "input", "datatype": "FP64", "shape": [-1, -1]}]
    backend = loaded(onnx_spec(digits["folder"] / "digits.onnx", inputs=declared), backends)
    with pytest.raises(InvalidArgument, match="the model refused its inputs"):
        await backend.predict({"input": np.zeros((2, 64))})


async def test_onnx_string_tensors_are_bytes(tmp_path: Path, backends: list[Backend]) -> None:
    onnx = pytest.importorskip("onnx")
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("Identity", ["words"], ["same"])],
        "strings",
        [helper.make_tensor_value_info("words", onnx.TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("same", onnx.TensorProto.STRING, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "strings.onnx"))
    backend = loaded(onnx_spec(tmp_path / "strings.onnx"), backends)
    assert backend.inputs() == (TensorSpec(name="words", datatype="BYTES", shape=(-1,)),)
    words = np.array([b"caf\xc3\xa9", b"shoal"], dtype=object)
    out = await backend.predict({"words": words})
    assert out["same"].tolist() == [b"caf\xc3\xa9", b"shoal"]


async def test_digits_onnx_example_spec(
    digits: dict[str, Any], tmp_path: Path, backends: list[Backend]
) -> None:
    shutil.copy(EXAMPLES / "digits-onnx.yaml", tmp_path)
    shutil.copy(digits["folder"] / "digits.onnx", tmp_path)  # its model path is relative to the spec
    (spec,) = load_spec_file(tmp_path / "digits-onnx.yaml")
    assert (spec.name, spec.backend, spec.resources.cpus) == ("digits-onnx", "onnx", 0.5)
    backend = loaded(spec, backends)
    out = await backend.predict({"input": digits["x_test"]})
    assert float(np.mean(out["label"] == digits["y_test"])) > 0.9

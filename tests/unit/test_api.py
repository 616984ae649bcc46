"""The Python API's pieces that need no cluster: ``@shoal.deployment`` as a thin layer over the
spec, input typing, and ``import shoal`` staying cheap."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import shoal
from shoal.api import to_arrays
from shoal.core.spec import Batching, parse_spec
from shoal.decorator import is_target, load_target, spec_of
from shoal.errors import InvalidArgument

pytestmark = pytest.mark.timeout(30)


@shoal.deployment(replicas=2, batching=Batching(max_batch_size=8, max_delay_ms=2), options={"k": 1})
class MyModel:
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return inputs


class Plain:
    pass


def test_a_decorated_class_is_the_spec_a_yaml_file_would_give() -> None:
    spec = spec_of(MyModel)
    here = Path(__file__).resolve()
    # This module is tests.unit.test_api: replicas import it from the folder above tests/.
    assert spec == parse_spec(
        {
            "name": "my-model",
            "backend": "python",
            "model": "tests.unit.test_api:MyModel",
            "base_dir": str(here.parents[2]),
            "replicas": 2,
            "batching": {"max_batch_size": 8, "max_delay_ms": 2},
            "options": {"k": 1},
        }
    )
    assert spec_of(Plain).name == "plain" and spec_of(Plain).replicas == 1
    assert spec_of(spec) is spec
    assert spec_of({"name": "a", "backend": "sklearn", "model": "m.joblib"}).name == "a"

    @dataclasses.dataclass
    class Mine:
        name: str = "b"
        backend: str = "sklearn"
        model: str = "m.joblib"
        replicas: int = 2

    assert spec_of(Mine()) == parse_spec(
        {"name": "b", "backend": "sklearn", "model": "m.joblib", "replicas": 2}
    )


def test_a_bad_field_is_refused_where_the_decorator_is_written() -> None:
    with pytest.raises(InvalidArgument, match="replicas"):
        shoal.deployment(replicas=-1)(Plain)
    with pytest.raises(InvalidArgument, match="wat"):
        shoal.deployment(wat=1)(Plain)


def test_classes_replicas_cannot_import_are_refused_with_the_reason() -> None:
    def inner() -> type:
        class Local:
            pass

        return Local

    with pytest.raises(InvalidArgument, match="top level"):
        spec_of(inner())
    notebook = types.ModuleType("__notebook__")  # no __file__, as a Jupyter cell's class
    cls = type("Cell", (), {"__module__": notebook.__name__})
    sys.modules[notebook.__name__] = notebook
    try:
        with pytest.raises(InvalidArgument, match="not defined in a module file"):
            spec_of(cls)
    finally:
        del sys.modules[notebook.__name__]
    with pytest.raises(InvalidArgument, match="cannot deploy a int"):
        spec_of(3)


def test_deploy_targets_name_a_file_and_a_class(tmp_path: Path) -> None:
    assert is_target("app.py:Model") and is_target("dir/my_app.py:M2")
    assert not is_target("app.yaml") and not is_target("app.py") and not is_target("app.py:a.b")
    with pytest.raises(InvalidArgument, match="no file"):
        load_target(str(tmp_path / "missing.py:Model"))
    (tmp_path / "shoal_unit_broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(InvalidArgument, match="RuntimeError: boom"):
        load_target(str(tmp_path / "shoal_unit_broken.py:Model"))
    assert "shoal_unit_broken" not in sys.modules
    (tmp_path / "shoal_unit_app.py").write_text("X = 1\n")
    with pytest.raises(InvalidArgument, match="no class 'X'"):
        load_target(str(tmp_path / "shoal_unit_app.py:X"))


def test_inputs_are_typed_by_the_spec_and_ragged_lists_refused() -> None:
    spec = parse_spec(
        {"name": "a", "backend": "sklearn", "model": "m", "inputs": [{"name": "x", "datatype": "INT64"}]}
    )
    assert to_arrays({"x": [1, 2]}, spec)["x"].dtype == np.int64
    assert to_arrays({"y": [1.5]}, spec)["y"].dtype == np.float32
    assert to_arrays({"s": ["a"]})["s"].dtype == object
    kept = np.zeros(3, np.float16)
    assert to_arrays({"x": kept})["x"] is kept
    with pytest.raises(InvalidArgument, match="input 'x': ragged"):
        to_arrays({"x": [[1, 2], [3]]})
    with pytest.raises(InvalidArgument, match="mapping of input names"):
        to_arrays({})


def test_import_shoal_does_not_import_grpc_until_a_call() -> None:
    code = (
        "import sys, shoal\n"
        "c = shoal.connect('127.0.0.1:1')\n"
        "print('grpc' in sys.modules, shoal.deployment is shoal.decorator.deployment)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_shoal_deploy_takes_a_file_and_class_as_well_as_yaml(tmp_path: Path) -> None:
    from shoal.cli.deploy import _specs_in

    (tmp_path / "shoal_unit_deploy_app.py").write_text(
        "import shoal\n\n\n@shoal.deployment(replicas=3)\nclass Model:\n    pass\n"
    )
    (specs, routes) = _specs_in(f"{tmp_path}/shoal_unit_deploy_app.py:Model")
    assert [(s.name, s.model, s.replicas, s.base_dir) for s in specs] == [
        ("model", "shoal_unit_deploy_app:Model", 3, str(tmp_path.resolve()))
    ]
    assert routes == []

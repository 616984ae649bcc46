"""The request's inputs: random, shaped from the model's metadata, or read from files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shoal.errors import InvalidArgument


def random_inputs(infos: Sequence[Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors shaped from model metadata (``-1`` dimensions become 1)."""
    from shoal.core.tensors import DATATYPES

    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for t in infos:
        shape = tuple(1 if d < 0 else d for d in t.shape) or (1,)
        dtype = DATATYPES.get(t.datatype)
        if dtype is None:
            raise InvalidArgument(f"input {t.name!r} has unknown datatype {t.datatype!r}")
        if t.datatype == "BYTES":
            arr = np.empty(shape, dtype=object)
            arr.flat[:] = [b"shoal-bench"] * arr.size
        elif t.datatype == "BOOL":
            arr = rng.random(shape) < 0.5
        elif dtype.kind in "iu":
            arr = rng.integers(0, 16, size=shape).astype(dtype)
        else:
            arr = rng.random(shape, dtype=np.float32).astype(dtype)
        out[t.name] = arr
    return out


def load_inputs(specs: Sequence[str], infos: Sequence[Any]) -> dict[str, np.ndarray]:
    """Inputs from ``--input`` values: ``FILE.json``, ``FILE.npy`` or ``NAME=FILE.npy``.

    JSON is ``{"name": nested list}`` or an OIP request (``{"inputs": [{name, shape,
    datatype, data}]}``); lists take the datatype the metadata declares (FP32 for floats
    when it declares none). A bare ``.npy`` file feeds the model's first input.
    """
    from shoal.core import tensors

    declared = {t.name: t.datatype for t in infos}
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        name, eq, path_text = spec.partition("=")
        if not eq:
            name, path_text = "", spec
        path = Path(path_text)
        try:
            if path.suffix == ".npy":
                arr = np.load(path, allow_pickle=False)
                if not name:
                    if not infos:
                        raise InvalidArgument(f"{path}: name the input (NAME={path}): no model metadata")
                    name = infos[0].name
                datatype = declared.get(name)
                if datatype and datatype != "BYTES":
                    arr = arr.astype(tensors.DATATYPES[datatype])
                out[name] = arr
                continue
            doc = json.loads(path.read_text())
        except OSError as err:
            raise InvalidArgument(f"cannot read {path}: {err.strerror}") from None
        except ValueError as err:
            raise InvalidArgument(f"{path}: {err}") from None
        if isinstance(doc, dict) and isinstance(doc.get("inputs"), list):
            for t in doc["inputs"]:
                out[t["name"]] = tensors.from_json(t["datatype"], t["shape"], t["data"], name=t["name"])
            continue
        if not isinstance(doc, dict) or not doc:
            raise InvalidArgument(f"{path}: expected a JSON object mapping input names to lists")
        for key, value in doc.items():
            arr = np.asarray(value)
            datatype = declared.get(key) or ("FP32" if arr.dtype.kind in "iuf" else tensors.datatype_of(arr))
            out[key] = tensors.from_json(datatype, list(arr.shape), arr.tolist(), name=key)
    return out

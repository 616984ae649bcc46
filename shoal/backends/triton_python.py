"""Triton's python backend models (``model.py`` with a ``TritonPythonModel``), run by
shoal's ``python`` backend.

A Triton repository model with ``backend: "python"`` maps to a ``python`` deployment of
``shoal.backends.triton_python:TritonPython`` (:mod:`shoal.core.triton_repo`), which loads
the model's ``model.py``, calls its ``initialize(args)`` once, ``execute(requests)`` per
batch with one request holding the batch's tensors, and ``finalize()`` at unload.

The model imports ``triton_python_backend_utils``, which needs Triton's server; this
module registers a stand-in under that name with the part of it a model that computes
tensors uses:
``Tensor`` (``name()``, ``as_numpy()``), ``InferenceRequest`` (``inputs()``,
``requested_output_names()``, ``request_id()``, ``is_cancelled()``: true once every request
it holds was given up, its deadline passed or its client gone), ``InferenceResponse``
(``output_tensors``, ``error``),
``TritonError``, ``TritonModelException``, ``get_input_tensor_by_name``,
``get_output_tensor_by_name``, ``get_input_config_by_name``,
``get_output_config_by_name``, ``triton_string_to_numpy``. What it does not provide
(business logic scripting with ``InferenceRequest.exec``, decoupled response senders,
DLPack) fails when the model calls it, naming the missing attribute.

An error response (``InferenceResponse(error=TritonError(...))``) reaches the client as
INVALID_ARGUMENT when its code is ``INVALID_ARG``, else INTERNAL.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

from shoal.errors import Internal, InvalidArgument
from shoal.replica.compose import CallContext, current_call

UTILS = "triton_python_backend_utils"

_NUMPY = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}


class Tensor:
    def __init__(self, name: str, array: Any) -> None:
        self._name = name
        self._array = np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def is_cpu(self) -> bool:
        return True


class InferenceRequest:
    def __init__(
        self, inputs: list[Tensor], requested_output_names: list[str], call: CallContext | None = None
    ) -> None:
        self._inputs = inputs
        self._requested = requested_output_names
        self._call = call

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def requested_output_names(self) -> list[str]:
        return self._requested

    def request_id(self) -> str:
        """The id of the (first) request this one holds; "" when not known."""
        return self._call.request_ids[0] if self._call is not None else ""

    def is_cancelled(self) -> bool:
        """Whether every request this one holds (a batch's) was given up: its deadline passed
        or its client went away. A model that works in steps polls it, as in Triton, to stop
        computing what nobody will read."""
        return self._call is not None and self._call.abandoned


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS = range(7)

    def __init__(self, message: str, code: int = 1) -> None:
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class TritonModelException(Exception):
    pass


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None) -> None:
        self._outputs = list(output_tensors or [])
        self._error = error

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


def _by_name(tensors: list[Tensor], name: str) -> Tensor | None:
    return next((t for t in tensors if t.name() == name), None)


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return _by_name(request.inputs(), name)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return _by_name(response.output_tensors(), name)


def get_input_config_by_name(config: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((c for c in config.get("input", []) if c.get("name") == name), None)


def get_output_config_by_name(config: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((c for c in config.get("output", []) if c.get("name") == name), None)


def triton_string_to_numpy(data_type: str) -> Any:
    return _NUMPY[data_type]


def utils_module() -> types.ModuleType:
    """The ``triton_python_backend_utils`` models import: this module's stand-in, registered
    under that name (Triton's own needs Triton's server), unless one is registered already."""
    existing = sys.modules.get(UTILS)
    if existing is not None:
        return existing
    module = types.ModuleType(UTILS, "shoal's stand-in for Triton's python backend utilities")
    for name in (
        "Tensor",
        "InferenceRequest",
        "InferenceResponse",
        "TritonError",
        "TritonModelException",
        "get_input_tensor_by_name",
        "get_output_tensor_by_name",
        "get_input_config_by_name",
        "get_output_config_by_name",
        "triton_string_to_numpy",
    ):
        setattr(module, name, globals()[name])
    sys.modules[UTILS] = module
    return module


class TritonPython:
    """Runs ``model_file``'s ``TritonPythonModel`` as a shoal python model.

    ``model_config``: the model's ``config.pbtxt`` as Triton's JSON (what ``initialize``
    gets as ``args["model_config"]``); the other arguments fill the rest of ``args``.
    """

    def __init__(
        self,
        model_file: str,
        model_config: str,
        model_name: str,
        model_version: str,
        model_repository: str,
        max_batch_size: int = 0,
    ) -> None:
        utils_module()  # before model.py imports it
        path = Path(model_file)
        config = json.loads(model_config)
        self._outputs = [o["name"] for o in config.get("output", [])]
        self.supports_batching = max_batch_size > 0
        # Triton puts the model's version folder first on the path (siblings of model.py import).
        folder = str(path.parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        spec = importlib.util.spec_from_file_location(f"triton_model_{model_name}", path)
        if spec is None or spec.loader is None:
            raise InvalidArgument(f"{path} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cls = getattr(module, "TritonPythonModel", None)
        if cls is None:
            raise InvalidArgument(f"{path} defines no TritonPythonModel class")
        self._model = cls()
        initialize = getattr(self._model, "initialize", None)
        if callable(initialize):
            initialize(
                {
                    "model_config": model_config,
                    "model_instance_kind": "CPU",
                    "model_instance_name": f"{model_name}_0",
                    "model_instance_device_id": "0",
                    "model_repository": model_repository,
                    "model_version": model_version,
                    "model_name": model_name,
                }
            )

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = InferenceRequest(
            [Tensor(name, array) for name, array in inputs.items()],
            requested_output_names=list(self._outputs),
            call=current_call.get(),
        )
        responses = self._model.execute([request])
        if not isinstance(responses, list | tuple) or len(responses) != 1:
            raise Internal("TritonPythonModel.execute must return one response per request")
        response = responses[0]
        if response.has_error():
            error = response.error()
            message = error.message() if callable(getattr(error, "message", None)) else str(error)
            code = error.code() if callable(getattr(error, "code", None)) else TritonError.INTERNAL
            raise (InvalidArgument if code == TritonError.INVALID_ARG else Internal)(message)
        return {t.name(): t.as_numpy() for t in response.output_tensors()}

    def unload(self) -> None:
        finalize = getattr(self._model, "finalize", None)
        if callable(finalize):
            finalize()

"""The ``onnx`` backend: an .onnx file run by ONNX Runtime.

``spec.model_path()`` is the .onnx file. Inputs and outputs, when the spec declares none,
come from the model: its names, datatypes and shapes, with ``-1`` for every dimension that
is symbolic or unknown. Every output is computed; ``string`` tensors are BYTES both ways.

Options:

- ``intra_op_threads`` (int): threads one operator may use; ONNX Runtime's default when unset.
- ``inter_op_threads`` (int): threads running independent operators in parallel.
- ``providers`` (list of names): execution providers in order of preference, each one
  ONNX Runtime here offers. Default: ``CUDAExecutionProvider`` then ``CPUExecutionProvider``
  when the spec asks for GPUs (``resources.gpus > 0``) and CUDA is available, else CPU only.

Only tensors can be served: a scikit-learn classifier converted with skl2onnx must be
converted with ``options={id(model): {"zipmap": False}}`` so its probabilities are a
tensor rather than a sequence of maps (see ``examples/convert_digits_onnx.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from shoal.backends.base import Backend, Tensors
from shoal.core.limits import error_text
from shoal.core.spec import DeploymentSpec, TensorSpec
from shoal.errors import Internal, InvalidArgument

log = logging.getLogger(__name__)

OPTIONS = frozenset({"intra_op_threads", "inter_op_threads", "providers"})

# ONNX Runtime's type strings -> Open Inference Protocol datatypes.
_DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16",
    "tensor(string)": "BYTES",
}
_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"


def _shape(dims: Any) -> tuple[int, ...]:
    # ONNX Runtime reports a symbolic dimension as its name (str) and an unknown one as None.
    if dims is None:
        return ()
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims)


def _tensor_spec(arg: Any, kind: str, path: str) -> TensorSpec:
    datatype = _DATATYPES.get(arg.type)
    if datatype is None:
        hint = " (convert scikit-learn classifiers with options zipmap=False)" if "map" in arg.type else ""
        raise InvalidArgument(
            f"{path}: {kind} {arg.name!r} is a {arg.type}; only tensors can be served{hint}"
        )
    return TensorSpec(name=arg.name, datatype=datatype, shape=_shape(arg.shape))


def _positive_int(options: Mapping[str, Any], name: str) -> int | None:
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"option {name} must be a positive integer, got {value!r}")
    return value


def _to_model_strings(array: np.ndarray) -> np.ndarray:
    # ONNX Runtime takes string tensors as object arrays of str.
    out = np.empty(array.shape, dtype=object)
    out.flat[:] = [v.decode() if isinstance(v, bytes) else str(v) for v in array.flat]
    return out


def _to_wire_strings(array: np.ndarray) -> np.ndarray:
    out = np.empty(array.shape, dtype=object)
    out.flat[:] = [v if isinstance(v, bytes) else str(v).encode() for v in array.flat]
    return out


class OnnxBackend(Backend):
    """Serves ``spec.model_path()`` with an ONNX Runtime ``InferenceSession``."""

    inline_calls = True  # short calls run on the event loop (Backend.run_sync)

    def __init__(self, spec: DeploymentSpec) -> None:
        super().__init__(spec)
        self._session: Any = None
        self._model_inputs: dict[str, TensorSpec] = {}
        self._output_names: list[str] = []

    @property
    def supports_batching(self) -> bool:
        """True when every model input takes any number of rows along axis 0."""
        return all(t.shape[:1] == (-1,) for t in self._derived_inputs)

    @property
    def providers(self) -> list[str]:
        """The execution providers the loaded session uses, in order of preference."""
        return list(self._session.get_providers()) if self._session is not None else []

    def _choose_providers(self) -> list[str]:
        available = list(ort.get_available_providers())
        wanted = self.spec.options.get("providers")
        if wanted is not None:
            if isinstance(wanted, str):
                wanted = [wanted]
            if not isinstance(wanted, list) or not wanted or not all(isinstance(p, str) for p in wanted):
                raise InvalidArgument(f"option providers must be a list of provider names, got {wanted!r}")
            missing = [p for p in wanted if p not in available]
            if missing:
                raise InvalidArgument(
                    f"ONNX Runtime here has no {missing[0]}; available: {', '.join(available)}"
                )
            return wanted
        if self.spec.resources.gpus > 0:
            if _CUDA in available:
                return [_CUDA, _CPU]
            log.warning(
                "%s: the spec asks for GPUs but ONNX Runtime here has no CUDA; using CPU", self.spec.name
            )
        return [_CPU]

    def _load(self) -> None:
        options = self.spec.options
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise InvalidArgument(f"unknown onnx option {unknown[0]!r}; known: {', '.join(sorted(OPTIONS))}")
        session_options = ort.SessionOptions()
        intra = _positive_int(options, "intra_op_threads")
        inter = _positive_int(options, "inter_op_threads")
        if intra is not None:
            session_options.intra_op_num_threads = intra
        if inter is not None:
            session_options.inter_op_num_threads = inter
        providers = self._choose_providers()

        path = self.spec.model_path()
        if not path.is_file():
            raise InvalidArgument(f"onnx model file {str(path)!r} does not exist")
        try:
            session = ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
        except Exception as err:
            raise InvalidArgument(f"cannot load {str(path)!r} with ONNX Runtime: {err}") from err

        inputs = tuple(_tensor_spec(arg, "input", str(path)) for arg in session.get_inputs())
        outputs = tuple(_tensor_spec(arg, "output", str(path)) for arg in session.get_outputs())
        self._session = session
        self._model_inputs = {t.name: t for t in inputs}
        self._output_names = [t.name for t in outputs]
        self._derived_inputs = inputs
        self._derived_outputs = outputs
        log.info("%s: %s on %s", self.spec.name, path.name, ", ".join(session.get_providers()))

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        super().check_inputs(inputs)
        # A spec may declare its own tensors; the model's names still have to match.
        missing = sorted(set(self._model_inputs) - set(inputs))
        if missing:
            raise InvalidArgument(f"missing input {missing[0]!r}")

    async def _predict(self, inputs: Tensors) -> Tensors:
        return await self.run_sync(self._run, self._feed(inputs))

    def _blocking(self, inputs: Tensors) -> tuple[Callable[..., Tensors], tuple[Any, ...]] | None:
        return self._run, (self._feed(inputs),)

    def _feed(self, inputs: Tensors) -> Tensors:
        return {
            name: _to_model_strings(array) if array.dtype.kind in "OSU" else array
            for name, array in inputs.items()
            if name in self._model_inputs
        }

    def _run(self, feed: Tensors) -> Tensors:
        try:
            results = self._session.run(self._output_names, feed)
        except (ort_state.InvalidArgument, ort_state.InvalidGraph) as err:
            raise InvalidArgument(f"the model refused its inputs: {err}") from None
        except Exception as err:
            raise Internal(f"model raised {error_text(err)}") from err
        outputs: Tensors = {}
        for name, value in zip(self._output_names, results, strict=True):
            array = np.asarray(value)
            outputs[name] = _to_wire_strings(array) if array.dtype.kind in "OSU" else array
        return outputs

    def _unload(self) -> None:
        self._session = None

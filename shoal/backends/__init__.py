"""Model backends: plug-ins behind load / predict / unload.

:func:`load_backend` picks the backend a spec names. Each backend lives in its own module,
imported only when a spec asks for it, so a framework's heavy dependencies are needed only
by the replicas that serve it.
"""

from __future__ import annotations

import importlib

from shoal.backends.base import Backend, Tensors, check_inputs, coerce_outputs, datatype_of
from shoal.core.spec import DeploymentSpec
from shoal.errors import InvalidArgument

__all__ = ["AVAILABLE", "Backend", "Tensors", "check_inputs", "coerce_outputs", "datatype_of", "load_backend"]

# backend name -> "module:class".
AVAILABLE: dict[str, str] = {
    "python": "shoal.backends.python:PythonBackend",
    "sklearn": "shoal.backends.sklearn:SklearnBackend",
    "onnx": "shoal.backends.onnx:OnnxBackend",
    "transformers": "shoal.backends.transformers:TransformersBackend",
    "vllm": "shoal.backends.vllm:VllmBackend",
}


def load_backend(spec: DeploymentSpec) -> Backend:
    """The backend for ``spec``, constructed but not loaded: call ``load()`` next, off the event loop.

    Raises InvalidArgument when the backend is unknown, not available in this version of
    shoal, or needs packages that are not installed.
    """
    target = AVAILABLE.get(spec.backend)
    if target is None:
        known = ", ".join(sorted(AVAILABLE))
        raise InvalidArgument(f"backend {spec.backend!r} is not available in this shoal; available: {known}")
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InvalidArgument(
            f"backend {spec.backend!r} needs a package that is not installed here: {err}"
        ) from err
    cls: type[Backend] = getattr(module, class_name)
    return cls(spec)

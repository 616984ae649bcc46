"""The ``python`` backend: a user's class, named ``module:Class`` in the spec.

``Class`` is one name (no dots), a class or a factory function defined in the module
itself (not one it imports). The module is imported with the spec's folder (``base_dir``)
first on ``sys.path``, the class is built as ``Class(**options)``, and its
``predict(inputs) -> outputs`` (dicts of
name -> numpy array, batched along axis 0) is called per batch. ``predict`` may be a plain
method, run on the backend's model thread, or ``async def``, awaited on the replica's
event loop. ``unload()`` or ``close()`` on the class, if present, is called at unload.

A class may set ``supports_batching = False`` when its predict takes one row at a time.

This runs the user's code with the replica's rights: whoever may deploy may run code. With
the ``allowed_model_dirs`` setting (``allowed_dirs`` here, set by the replica before
``load``), only modules that are files under ``base_dir``, inside those folders, are
imported, after the same check the head made (``shoal.core.model_dirs``).

Imports are cached per process, as Python caches them: a replica serves one model, so
two specs naming the same module from different folders never meet in one process.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from typing import Any

from shoal.backends.base import Backend, Tensors, coerce_outputs
from shoal.core import model_dirs
from shoal.core.spec import DeploymentSpec
from shoal.errors import Internal, InvalidArgument, ShoalError

log = logging.getLogger(__name__)


class PythonBackend(Backend):
    """Runs a user's Python class. See the module docstring for the contract."""

    def __init__(self, spec: DeploymentSpec) -> None:
        super().__init__(spec)
        self._model: Any = None
        self._async_predict = False
        self.allowed_dirs: tuple[str, ...] = ()

    @property
    def supports_batching(self) -> bool:
        return bool(getattr(self._model, "supports_batching", True))

    def _load(self) -> None:
        module_name, attr = model_dirs.python_target(self.spec.model)
        model_dirs.check_deployable(self.spec, self.allowed_dirs)
        if self.spec.base_dir:
            # First on sys.path, and left there: the model may import its siblings lazily.
            if self.spec.base_dir in sys.path:
                sys.path.remove(self.spec.base_dir)
            sys.path.insert(0, self.spec.base_dir)
            importlib.invalidate_caches()
        where = f" (from {self.spec.base_dir})" if self.spec.base_dir else ""
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            raise InvalidArgument(f"cannot import module {module_name!r}{where}: {err}") from err
        except Exception as err:
            raise InvalidArgument(
                f"importing module {module_name!r}{where} raised {type(err).__name__}: {err}"
            ) from err
        model_dirs.check_module_file(self.spec, module, self.allowed_dirs)

        try:
            target: Any = getattr(module, attr)
        except AttributeError:
            raise InvalidArgument(f"module {module_name!r}{where} has no attribute {attr!r}") from None
        model_dirs.check_defined_in(module, attr, target)

        try:
            model = target(**self.spec.options)
        except Exception as err:
            raise InvalidArgument(f"{attr}(**options) raised {type(err).__name__}: {err}") from err
        predict = getattr(model, "predict", None)
        if not callable(predict):
            raise InvalidArgument(f"{self.spec.model!r} has no predict(inputs) method")
        self._model = model
        self._async_predict = inspect.iscoroutinefunction(predict)

    async def _predict(self, inputs: Tensors) -> Tensors:
        if self._async_predict:
            try:
                result = await self._model.predict(inputs)
            except ShoalError:
                raise
            except Exception as err:
                raise Internal(f"model raised {type(err).__name__}: {err}") from err
            return coerce_outputs(result)
        # Converting the outputs can cost as much as a small model: keep it off the loop too.
        return await self.run_sync(self._predict_blocking, inputs)

    def _predict_blocking(self, inputs: Tensors) -> Tensors:
        try:
            result = self._model.predict(inputs)
        except ShoalError:
            # A model may refuse an input on purpose (InvalidArgument): that reaches the client as is.
            raise
        except Exception as err:
            raise Internal(f"model raised {type(err).__name__}: {err}") from err
        return coerce_outputs(result)

    def _unload(self) -> None:
        model, self._model = self._model, None
        release = getattr(model, "unload", None) or getattr(model, "close", None)
        if callable(release):
            try:
                release()
            except Exception:
                # Shutting down goes on: the process is about to exit anyway.
                log.exception("%s: the model's %s() raised", self.spec.name, release.__name__)

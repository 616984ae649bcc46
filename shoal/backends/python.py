"""The ``python`` backend: a user's class, named ``module:Class`` in the spec.

``Class`` is one name (no dots), a class or a factory function defined in the module
itself (not one it imports). The module is imported with the spec's folder (``base_dir``)
first on ``sys.path``, the class is built as ``Class(**options)``, and its
``predict(inputs) -> outputs`` (dicts of
name -> numpy array, batched along axis 0; an output name is at most 256 characters, as a
spec's tensor names, else Internal) is called per batch. ``predict`` may be a plain
method, run on the backend's model thread, or ``async def``, awaited on the replica's
event loop. ``unload()`` or ``close()`` on the class, if present, is called at unload.
What ``predict`` raises reaches the client: a :class:`shoal.errors.ShoalError` as it is,
anything else (``SystemExit`` and ``KeyboardInterrupt`` too: ``sys.exit()`` in a model does
not end its replica) as Internal ``model raised ...``; at load, as the deployment's reason.

A class may set ``supports_batching = False`` when its predict takes one request at a time
(no rows along axis 0): the replica then runs each request alone, whatever the spec's
``batching``.

For a deployment with ``multiplexing``, the class needs ``load_model(model_id)`` instead of
(or besides) ``predict``: the replica calls it, on a worker thread, on a model id's first
request, and it returns an object with ``predict`` (and optionally ``unload``/``close``,
called when the id is evicted), used as above. What it raises reaches the client: a
:class:`shoal.errors.ShoalError` as it is (``NotFound`` for an id it does not know, say),
anything else as Internal. An optional ``has_model(model_id)`` says cheaply whether an id
exists: a replica whose slots are full asks it before it evicts a loaded id for a new one.

A model may call other deployments (``shoal.replica.compose``): it finds them in
``self.deployments`` (set after construction unless the class sets that name itself),
or takes them as a ``deployments`` argument of its constructor when it declares one.

This runs the user's code with the replica's rights: whoever may deploy may run code. With
the ``allowed_model_dirs`` setting (``allowed_dirs`` here, set by the replica before
``load``), only modules that are files under ``base_dir``, inside those folders, are
imported, after the same check the head made (``shoal.core.model_dirs``): ``base_dir``
must be an existing folder here, and the module is looked up in it alone
(``model_dirs.import_confined``), never on the rest of ``sys.path``.

Imports are cached per process, as Python caches them: a replica serves one model, so
two specs naming the same module from different folders never meet in one process.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any

from shoal.backends.base import MODEL_FAILURES, Backend, Tensors, coerce_outputs
from shoal.core import model_dirs
from shoal.core.limits import error_text
from shoal.core.spec import DeploymentSpec
from shoal.errors import Internal, InvalidArgument, NotFound, ShoalError

log = logging.getLogger(__name__)


class PythonBackend(Backend):
    """Runs a user's Python class. See the module docstring for the contract."""

    inline_calls = True  # short calls run on the event loop (Backend.run_sync)

    def _may_inline(self) -> bool:
        # A model that calls other deployments blocks on them: never on the loop.
        taken = bool(getattr(self.deployments, "taken", False))
        return super()._may_inline() and not taken

    def __init__(self, spec: DeploymentSpec) -> None:
        super().__init__(spec)
        self._model: Any = None
        self._async_predict = False
        # Handles to other deployments (shoal.replica.compose.Deployments), set by the replica.
        self.deployments: Any = None

    @property
    def supports_batching(self) -> bool:
        return bool(getattr(self._model, "supports_batching", True))

    def _load(self) -> None:
        module_name, attr = model_dirs.python_target(self.spec.model)
        # Here, where the files are: with allowed_dirs, base_dir must be an existing folder.
        model_dirs.check_deployable(self.spec, self.allowed_dirs, files_here=True)
        if self.spec.base_dir:
            # First on sys.path, and left there: the model may import its siblings lazily.
            if self.spec.base_dir in sys.path:
                sys.path.remove(self.spec.base_dir)
            sys.path.insert(0, self.spec.base_dir)
            importlib.invalidate_caches()
        where = f" (from {self.spec.base_dir})" if self.spec.base_dir else ""
        try:
            if self.allowed_dirs:
                # From base_dir alone: a module missing there must not be found on sys.path.
                module = model_dirs.import_confined(self.spec, module_name, self.allowed_dirs)
            else:
                module = importlib.import_module(module_name)
        except model_dirs.ImportRefused:
            raise
        except ModuleNotFoundError as err:
            raise InvalidArgument(f"cannot import module {module_name!r}{where}: {err}") from err
        except MODEL_FAILURES as err:
            raise InvalidArgument(
                f"importing module {module_name!r}{where} raised {error_text(err)}"
            ) from err
        model_dirs.check_module_file(self.spec, module, self.allowed_dirs)

        try:
            target: Any = getattr(module, attr)
        except AttributeError:
            raise InvalidArgument(f"module {module_name!r}{where} has no attribute {attr!r}") from None
        model_dirs.check_defined_in(module, attr, target)

        kwargs = dict(self.spec.options)
        if self.deployments is not None and _takes(target, "deployments") and "deployments" not in kwargs:
            kwargs["deployments"] = self.deployments
        try:
            model = target(**kwargs)
        except MODEL_FAILURES as err:
            raise InvalidArgument(f"{attr}(**options) raised {error_text(err)}") from err
        if self.deployments is not None and not hasattr(model, "deployments"):
            with contextlib.suppress(AttributeError, TypeError):  # __slots__, a frozen class
                model.deployments = self.deployments
        if self.spec.multiplexing is not None:
            if not callable(getattr(model, "load_model", None)):
                raise InvalidArgument(
                    f"{self.spec.model!r} has no load_model(model_id) method, which a multiplexed "
                    "deployment needs"
                )
            self._model = model
            return
        self._adopt(model, repr(self.spec.model))

    def _adopt(self, model: Any, what: str) -> None:
        predict = getattr(model, "predict", None)
        if not callable(predict):
            raise InvalidArgument(f"{what} has no predict(inputs) method")
        self._model = model
        self._async_predict = inspect.iscoroutinefunction(predict)

    def model_backend(self, model_id: str) -> Backend:
        if self.spec.multiplexing is None or self._model is None:
            return super().model_backend(model_id)
        has_model = getattr(self._model, "has_model", None)
        return _MultiplexedModel(
            self.spec, self._model.load_model, model_id, has_model if callable(has_model) else None
        )

    async def _predict(self, inputs: Tensors) -> Tensors:
        if self._async_predict:
            try:
                result = await self._model.predict(inputs)
            except ShoalError:
                raise
            except MODEL_FAILURES as err:
                raise Internal(f"model raised {error_text(err)}") from err
            return coerce_outputs(result)
        # Converting the outputs can cost as much as a small model: keep it off the loop too.
        return await self.run_sync(self._predict_blocking, inputs)

    def _blocking(self, inputs: Tensors) -> tuple[Callable[..., Tensors], tuple[Any, ...]] | None:
        return None if self._async_predict else (self._predict_blocking, (inputs,))

    def _predict_blocking(self, inputs: Tensors) -> Tensors:
        try:
            result = self._model.predict(inputs)
        except ShoalError:
            # A model may refuse an input on purpose (InvalidArgument): that reaches the client as is.
            raise
        except MODEL_FAILURES as err:
            raise Internal(f"model raised {error_text(err)}") from err
        return coerce_outputs(result)

    def _unload(self) -> None:
        model, self._model = self._model, None
        release = getattr(model, "unload", None) or getattr(model, "close", None)
        if callable(release):
            try:
                release()
            except MODEL_FAILURES:
                # Shutting down goes on: the process is about to exit anyway.
                log.exception("%s: the model's %s() raised", self.spec.name, release.__name__)


def _takes(target: Any, name: str) -> bool:
    """Whether calling ``target`` accepts a keyword argument ``name`` (not via ``**kwargs``:
    those are the spec's options)."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    param = params.get(name)
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


class _MultiplexedModel(PythonBackend):
    """One model id of a multiplexed python deployment: ``load()`` calls ``load_model(model_id)``."""

    def __init__(
        self,
        spec: DeploymentSpec,
        load_model: Callable[[str], Any],
        model_id: str,
        has_model: Callable[[str], Any] | None = None,
    ) -> None:
        super().__init__(spec)
        self._load_model = load_model
        self._has_model = has_model
        self.model_id = model_id

    def check_exists(self) -> None:
        """The class's ``has_model(model_id)``, when it has one: false is NOT_FOUND, before a
        full replica evicts a loaded id for a load bound to fail."""
        if self._has_model is None or self._has_model(self.model_id):
            return
        cls = self.spec.model.rsplit(":", 1)[-1]
        raise NotFound(f"model id {self.model_id!r}: {cls}.has_model({self.model_id!r}) is false")

    def _load(self) -> None:
        try:
            model = self._load_model(self.model_id)
        except ShoalError:
            raise
        except MODEL_FAILURES as err:
            raise Internal(f"load_model({self.model_id!r}) raised {error_text(err)}") from err
        self._adopt(model, f"what load_model({self.model_id!r}) returned")

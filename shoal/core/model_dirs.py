"""Where model code and files may come from: the ``allowed_model_dirs`` setting.

A ``python`` spec runs the module it names, and a ``sklearn`` file is a pickle, which runs
code as it loads: whoever may deploy may run code on the schedulers' machines. With
``allowed_model_dirs`` set, specs may use only code and files under those folders:

* ``python``: ``base_dir`` must lie inside an allowed folder, and (in the replica) the
  module must be a file found under ``base_dir``, not an installed or built-in module
  (``os:system`` is refused);
* ``sklearn`` and ``onnx``: the model file must lie inside an allowed folder.

The head checks this when a spec is applied (InvalidArgument), and every replica checks it
again before it loads anything, with the files in front of it (symbolic links resolved).
``transformers`` and ``vllm`` name hub models as often as folders and are not restricted.
An empty setting allows any folder.
"""

from __future__ import annotations

import importlib.machinery
import os
from collections.abc import Sequence
from pathlib import Path

from shoal.core.spec import DeploymentSpec
from shoal.errors import InvalidArgument

FILE_BACKENDS = ("sklearn", "onnx")


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(str(path)))))


def inside(path: str | Path, allowed: Sequence[str]) -> bool:
    """Whether ``path`` (symbolic links resolved) lies in one of the ``allowed`` folders."""
    real = _real(path)
    return any(real == _real(a) or real.is_relative_to(_real(a)) for a in allowed)


def _refuse(spec: DeploymentSpec, what: str, allowed: Sequence[str]) -> InvalidArgument:
    return InvalidArgument(
        f"deployment {spec.name!r}: {what} is outside the folders models may come from "
        f"(setting allowed_model_dirs: {', '.join(allowed)})"
    )


def check_model_dirs(spec: DeploymentSpec, allowed: Sequence[str]) -> None:
    """InvalidArgument when ``spec`` names code or files outside ``allowed`` (nothing when empty)."""
    if not allowed:
        return
    if spec.backend == "python":
        if not spec.base_dir:
            raise _refuse(spec, "a python module with no base_dir (an installed or built-in module)", allowed)
        if not inside(spec.base_dir, allowed):
            raise _refuse(spec, f"base_dir {spec.base_dir!r}", allowed)
    elif spec.backend in FILE_BACKENDS and not inside(spec.model_path(), allowed):
        raise _refuse(spec, f"model file {str(spec.model_path())!r}", allowed)


def check_module_source(spec: DeploymentSpec, module: str, allowed: Sequence[str]) -> None:
    """Before importing ``module`` for a ``python`` spec: its top-level package or module must
    be a file found in ``spec.base_dir``, which lies in ``allowed``. InvalidArgument otherwise."""
    if not allowed:
        return
    check_model_dirs(spec, allowed)
    top = module.split(".", 1)[0]
    found = importlib.machinery.PathFinder.find_spec(top, [spec.base_dir])
    origin = None
    if found is not None:
        origin = found.origin or next(iter(found.submodule_search_locations or []), None)
    if origin is None or not inside(origin, allowed):
        raise _refuse(spec, f"module {module!r} (not a file under base_dir {spec.base_dir!r})", allowed)


def check_module_file(spec: DeploymentSpec, module: object, allowed: Sequence[str]) -> None:
    """After importing: the module object came from a file in ``allowed`` (not from
    ``sys.modules``' copy of a module of the same name, nor a built-in). InvalidArgument otherwise."""
    if not allowed:
        return
    file = getattr(module, "__file__", None)
    if not isinstance(file, str) or not inside(file, allowed):
        name = getattr(module, "__name__", "?")
        raise _refuse(spec, f"module {name!r} (loaded from {file or 'no file'})", allowed)

"""``@shoal.deployment``: a class as a deployment spec, and nothing more.

    @shoal.deployment(replicas=2, batching={"max_batch_size": 8, "max_delay_ms": 2})
    class Doubler:
        def predict(self, inputs):
            return {"y": inputs["x"] * 2}

The decorator returns the class unchanged, with the spec's fields kept on it. :func:`spec_of`
turns it into the :class:`~shoal.core.spec.DeploymentSpec` a YAML file would give: backend
``python``, ``model`` the class's ``module:Class``, ``base_dir`` the folder its module is
imported from, ``name`` the class's name in kebab case (``MyModel`` → ``my-model``) unless
given. Every other keyword is a spec field, validated as a YAML spec is (``InvalidArgument``
naming the problem, at decoration time).

The replicas import the module by name, so the class must be defined at the top level of a
module file (not in a notebook cell, not inside a function); a script that deploys its own
class keeps the deploying under ``if __name__ == "__main__":`` so that importing it does not
deploy again.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, overload

from pydantic import BaseModel

from shoal.core.spec import DeploymentSpec, parse_spec
from shoal.errors import InvalidArgument

T = TypeVar("T", bound=type)

_FIELDS = "__shoal_deployment__"


@overload
def deployment(cls: T, /) -> T: ...


@overload
def deployment(*, name: str | None = None, **fields: Any) -> Callable[[T], T]: ...


def deployment(cls: T | None = None, /, *, name: str | None = None, **fields: Any) -> T | Callable[[T], T]:
    """Mark a class as a deployment: ``@shoal.deployment`` or ``@shoal.deployment(replicas=2, ...)``.

    ``fields`` are spec fields (``replicas``, ``batching``, ``resources``, ``options``,
    ``inputs``, ...), as mappings or as the spec's own models (``shoal.core.spec.Batching``).
    Raises InvalidArgument when they do not make a valid spec.
    """

    def mark(c: T) -> T:
        if not isinstance(c, type):
            raise InvalidArgument(f"@shoal.deployment decorates a class, got {type(c).__name__}")
        plain = {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in fields.items()}
        setattr(c, _FIELDS, {"name": name, **plain})
        spec_of(c)  # refuse a bad spec where it is written, not when it is deployed
        return c

    return mark(cls) if cls is not None else mark


def kebab(name: str) -> str:
    """``MyModel`` → ``my-model``: a class name as a deployment name."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name).lower()


def spec_of(target: DeploymentSpec | Mapping[str, Any] | type | object) -> DeploymentSpec:
    """The spec ``target`` stands for: a spec as is, a mapping (or a dataclass instance, as
    its fields) parsed as a YAML document is, or a class (decorated or not: undecorated,
    every field takes its default).

    Raises InvalidArgument naming the problem.
    """
    if isinstance(target, DeploymentSpec):
        return target
    if isinstance(target, Mapping):
        return parse_spec(dict(target))
    if dataclasses.is_dataclass(target) and not isinstance(target, type):
        return parse_spec(dataclasses.asdict(target))
    if not isinstance(target, type):
        # A str is most often a YAML file's path or a "file.py:Class" target, which the
        # command line reads and the API does not: say how to give either.
        hint = (
            " (for a file, run 'shoal deploy FILE', or give the mapping yaml.safe_load reads"
            " from it, or the class itself)"
            if isinstance(target, str)
            else ""
        )
        raise InvalidArgument(
            f"cannot deploy a {type(target).__name__}: give a DeploymentSpec, a mapping or a class{hint}"
        )
    fields = dict(getattr(target, _FIELDS, None) or {})
    name = fields.pop("name", None) or kebab(target.__name__)
    module, base_dir = _importable(target)
    doc = {"name": name, "backend": "python", "model": f"{module}:{target.__name__}", **fields}
    return parse_spec({**doc, "base_dir": str(base_dir)})


def _importable(cls: type) -> tuple[str, Path]:
    """The module name replicas import ``cls`` by, and the folder to import it from."""
    where = f"class {cls.__qualname__}"
    if "." in cls.__qualname__:
        raise InvalidArgument(f"{where} must be defined at the top level of its module to be deployed")
    module = sys.modules.get(cls.__module__)
    file = getattr(module, "__file__", None)
    if not isinstance(file, str):
        raise InvalidArgument(
            f"{where} is not defined in a module file (a notebook cell or the interpreter?): replicas "
            "import it by name, so define it in a .py file and import it from there"
        )
    path = Path(file).resolve()
    name = cls.__module__
    if name == "__main__":
        name = path.stem  # a script: replicas import it as a module of that name
    depth = name.count(".") + (1 if path.name == "__init__.py" else 0)
    return name, path.parents[depth]


def load_target(target: str) -> DeploymentSpec:
    """``app.py:Model`` (what ``shoal deploy`` takes besides YAML files) as a spec: the file is
    imported as module ``app``, as replicas will import it, and ``Model`` made a spec by
    :func:`spec_of`. Raises InvalidArgument."""
    file, _, attr = target.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise InvalidArgument(f"{target}: no file {file}")
    module_name = path.stem
    loader = importlib.util.spec_from_file_location(module_name, path)
    if loader is None or loader.loader is None:
        raise InvalidArgument(f"{target}: {file} is not a Python module")
    if module_name in sys.modules:
        raise InvalidArgument(
            f"{target}: module name {module_name!r} is already taken by another module; rename {file}"
        )
    module = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module
    try:
        loader.loader.exec_module(module)
    except SystemExit as err:
        # A script's own code run at import (argparse, sys.exit): before, shoal deploy ended
        # there, with the script's usage line or message and its status, naming no file.
        del sys.modules[module_name]
        raise InvalidArgument(
            f"{target}: importing {file} exited (sys.exit({err.code!r})); replicas import it too, "
            "so keep a script's own code under if __name__ == '__main__':"
        ) from None
    except Exception as err:
        del sys.modules[module_name]
        raise InvalidArgument(f"{target}: importing {file} raised {type(err).__name__}: {err}") from None
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise InvalidArgument(f"{target}: {file} has no class {attr!r}")
    return spec_of(cls)


def is_target(arg: str) -> bool:
    """Whether a ``shoal deploy`` argument names a class (``app.py:Model``) rather than a YAML file."""
    return re.fullmatch(r".+\.py:[A-Za-z_]\w*", arg) is not None

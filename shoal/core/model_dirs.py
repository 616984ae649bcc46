"""Where model code and files may come from: the ``allowed_model_dirs`` setting.

A ``python`` spec runs the module it names, and a ``sklearn`` file is a pickle, which runs
code as it loads: whoever may deploy may run code on the schedulers' machines. With
``allowed_model_dirs`` set, specs may use only code and files under those folders:

* ``python``: ``base_dir`` must lie inside an allowed folder, the module must be a file
  found under ``base_dir``, not an installed or built-in module (``os:system`` is
  refused), and the object after ``:`` a plain name bound at the top level of that file
  by a ``class``, ``def`` or assignment, not by an import (``echo:np.f2py.os.system`` and
  ``echo:np`` are refused; read from files of at most :data:`MAX_PARSED_BYTES`, and after
  the import for any file);
* ``sklearn`` and ``onnx``: the model file must lie inside an allowed folder, and so must
  each model id's file of a multiplexed ``sklearn`` deployment, which the backend opens
  with :func:`open_inside` on the id's first request.

One check, :func:`check_deployable`, runs in the head when a spec is applied
(InvalidArgument) and in every replica before it imports or loads anything, with the files
in front of it (symbolic links resolved). A head that does not see ``base_dir`` (the code
lives only on the schedulers' machines) checks what needs no files: the folder, the form
of ``model``, and that the module is not a standard-library or built-in one; the replica
(``files_here``) refuses a ``base_dir`` that is not an existing folder, and imports the
module from ``base_dir`` alone (:func:`import_confined`), never from the rest of
``sys.path``. After the import the replica checks again (:func:`check_module_file`,
:func:`check_defined_in`): the module came from its file, and the object is a class or
function defined in it.
``transformers`` and ``vllm`` name hub models as often as folders and are not restricted.
An empty setting allows any folder.

URIs (``model``, or a python deployment's ``base_dir``: ``s3://``, ``gs://``, ``http(s)://``,
``file://``; ``shoal.core.spec.URI_SCHEMES``) are fetched by the schedulers, and the
``allowed_model_uris`` setting says which: a URI must start with one of its prefixes (at a
``/``), and no path segment may be ``.`` or ``..``. With that setting empty, any URI is
allowed while ``allowed_model_dirs`` is empty too, and none once it is set. A ``file://`` URI
is a path on the scheduler's machine and is checked as one, against ``allowed_model_dirs``
(a python ``base_dir`` given so, where the head sees it, as that folder named by its path
is); the scheduler that copies it checks each file it copies (symbolic links resolved,
``shoal.scheduler.artifacts``), since the copy is what the replica runs.
A ``blob://`` URI (a file or folder ``shoal deploy`` uploaded, ``shoal.core.blobs``) is
allowed by the prefix ``blob://`` alone.
"""

from __future__ import annotations

import ast
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import os
import re
import stat
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import BinaryIO, cast

from shoal.core.spec import DeploymentSpec, uri_scheme
from shoal.errors import FailedPrecondition, InvalidArgument, PermissionDenied

FILE_BACKENDS = ("sklearn", "onnx")
MAX_PARSED_BYTES = 64 * 1024
"""Largest module file whose top-level names are read before import; larger ones are
checked only after the replica imports them (:func:`check_defined_in`), which refuses the
same names. ``ast.parse`` holds the GIL throughout, so in a thread too it holds the head's
event loop: 1.8 s for a file of 1 MiB, the bound before (six clients posting refused specs
naming one made every replica of ``shoal up`` lose its scheduler), 0.14 s for 64 KiB, once
per version of a file (:data:`PARSED_FILES_KEPT`)."""
PARSED_FILES_KEPT = 64
"""Module files whose top-level names are kept, by real path, device, inode, size and
modification time: a spec applied again, or refused again, does not parse its file again.
At most a few MB (64 KiB of source binds at most about 10,000 names)."""

_TARGET = re.compile(r"^(?P<module>[A-Za-z_]\w*(\.[A-Za-z_]\w*)*):(?P<name>[A-Za-z_]\w*)$")


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(str(path)))))


def inside(path: str | Path, allowed: Sequence[str]) -> bool:
    """Whether ``path`` (symbolic links resolved) lies in one of the ``allowed`` folders."""
    real = _real(path)
    return any(real == _real(a) or real.is_relative_to(_real(a)) for a in allowed)


class OutsideAllowed(PermissionDenied):
    """A file :func:`open_inside` refused: its real path (``real``, for the operator's log;
    an answer to a client need not show it) is outside the allowed folders."""

    def __init__(self, path: str | Path, real: str, allowed: Sequence[str]) -> None:
        super().__init__(
            f"{str(path)!r} (symbolic links resolved: {real!r}) is outside the folders models may "
            f"come from (setting allowed_model_dirs: {', '.join(allowed)})"
        )
        self.real = real


def open_inside(path: str | Path, allowed: Sequence[str]) -> BinaryIO:
    """``path`` opened for reading in binary, when it is a regular file and, with ``allowed``
    set, its real path lies in one of those folders. :class:`OutsideAllowed` or
    FailedPrecondition (not a regular file) otherwise; OSError as ``open`` raises it.

    The check is of the file opened, not of the path before opening it: a link swapped
    between a check and the open is caught (the real path must still lead to the file that
    was opened). Opened without blocking, so a FIFO is refused rather than waited on."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise FailedPrecondition(f"{str(path)!r} is not a regular file")
        if allowed:
            real = os.path.realpath(path)
            try:
                here = os.stat(real)
                same = (here.st_dev, here.st_ino) == (opened.st_dev, opened.st_ino)
            except OSError:
                same = False
            if not same or not inside(real, allowed):
                raise OutsideAllowed(path, real, allowed)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _refuse(spec: DeploymentSpec, what: str, allowed: Sequence[str]) -> InvalidArgument:
    return InvalidArgument(
        f"deployment {spec.name!r}: {what} is outside the folders models may come from "
        f"(setting allowed_model_dirs: {', '.join(allowed)})"
    )


def file_uri_path(uri: str) -> Path:
    """The local path a ``file://`` URI names (``file:///p`` or ``file://localhost/p``).
    InvalidArgument for another host."""
    parts = urllib.parse.urlsplit(uri.partition("#")[0])
    if parts.netloc not in ("", "localhost"):
        raise InvalidArgument(
            f"{uri!r}: a file:// URI names a path on the scheduler's machine, not host {parts.netloc!r}"
        )
    return Path(urllib.parse.unquote(parts.path))


def uri_allowed(uri: str, allowed_uris: Sequence[str]) -> bool:
    """Whether ``uri`` starts with one of ``allowed_uris`` (at a ``/``, schemes compared
    lowercased) and has no ``.`` or ``..`` path segment, percent-encoded or not."""
    bare = uri.partition("#")[0]
    scheme = uri_scheme(bare)
    rest = bare[len(scheme) + 3 :]
    if any(urllib.parse.unquote(seg) in (".", "..") for seg in rest.split("/")):
        return False
    for prefix in allowed_uris:
        p_scheme = uri_scheme(prefix)
        p_rest = prefix[len(p_scheme) + 3 :].rstrip("/")
        if p_scheme == scheme == "blob" and not p_rest:  # 'blob://': anything uploaded
            return True
        if p_scheme == scheme and p_rest and (rest == p_rest or rest.startswith(p_rest + "/")):
            return True
    return False


def _check_uri(spec: DeploymentSpec, uri: str, allowed: Sequence[str], allowed_uris: Sequence[str]) -> None:
    if uri_scheme(uri) == "file":
        path = file_uri_path(uri)
        if allowed and not inside(path, allowed):
            raise _refuse(spec, f"{uri!r} (the path {str(path)!r})", allowed)
        return
    if allowed_uris:
        if not uri_allowed(uri, allowed_uris):
            raise InvalidArgument(
                f"deployment {spec.name!r}: {uri!r} is outside the URIs models may come from "
                f"(setting allowed_model_uris: {', '.join(allowed_uris)})"
            )
    elif allowed:
        raise InvalidArgument(
            f"deployment {spec.name!r}: {uri!r} is a URI, and with allowed_model_dirs set models come "
            "only from those folders; list the URI prefixes models may come from in allowed_model_uris"
        )


def check_model_dirs(spec: DeploymentSpec, allowed: Sequence[str], allowed_uris: Sequence[str] = ()) -> None:
    """InvalidArgument when ``spec`` names code or files outside ``allowed``, or a URI that
    ``allowed_uris`` and ``allowed`` refuse (nothing when both are empty)."""
    uri = spec.artifact_uri()
    if uri:
        _check_uri(spec, uri, allowed, allowed_uris)
        return
    if not allowed:
        return
    if spec.backend == "python":
        if not spec.base_dir:
            raise _refuse(spec, "a python module with no base_dir (an installed or built-in module)", allowed)
        if not inside(spec.base_dir, allowed):
            raise _refuse(spec, f"base_dir {spec.base_dir!r}", allowed)
    elif spec.backend in FILE_BACKENDS and not inside(spec.model_path(), allowed):
        raise _refuse(spec, f"model file {str(spec.model_path())!r}", allowed)


def python_target(model: str) -> tuple[str, str]:
    """``module:Name`` as ``(module, Name)``; the name is one identifier, no dots.
    InvalidArgument otherwise."""
    match = _TARGET.match(model.strip())
    if match is None:
        raise InvalidArgument(
            f"python model {model!r} must be 'module:Class', Class one name (no dots): a class or "
            "factory function defined in that module, e.g. 'my_model:MyModel'"
        )
    return match["module"], match["name"]


def check_deployable(
    spec: DeploymentSpec,
    allowed: Sequence[str],
    allowed_uris: Sequence[str] = (),
    *,
    files_here: bool = False,
) -> None:
    """Everything about ``spec``'s code and files that can be told before running any of it:
    InvalidArgument when a python model is not ``module:Class``, when it names code or files
    outside ``allowed``, or a URI outside ``allowed_uris`` (nothing more when both are
    empty). The head calls it when a spec is applied, the replica before it loads.

    ``files_here``: the caller is where the model's files must be (the replica), so with
    ``allowed`` set a python ``base_dir`` that is not an existing folder is refused. Without
    it (the head, which may run on another machine than the schedulers) a ``base_dir`` that
    does not exist here is taken for one on the schedulers' machines only, and only what
    needs no files is checked; one that exists here but is not a folder is refused."""
    check_model_dirs(spec, allowed, allowed_uris)
    if spec.backend != "python":
        return
    # The form first, folders or not: before, 'model: my_model' (no class) was applied and
    # failed in each replica, four times, before the head marked the deployment FAILED.
    module, name = python_target(spec.model)
    if not allowed:
        return
    # A file:// folder is checked here as the same folder named by its path would be: the
    # scheduler's fetch checks every file it copies, but this answer comes at deploy time.
    local = uri_scheme(spec.base_dir) == "file"
    base = file_uri_path(spec.base_dir) if local else Path(spec.base_dir)
    if not base.is_dir():
        if files_here or base.exists():
            raise _no_folder(spec, allowed, base)
        # Not on this machine (a head apart from the schedulers): what needs no files.
        if module.split(".", 1)[0] in (*sys.stdlib_module_names, *sys.builtin_module_names):
            raise _refuse(spec, f"module {module!r} (a standard-library or built-in module)", allowed)
        return
    file = module_file(str(base), module)
    if file is None or not inside(file, allowed):
        raise _refuse(spec, f"module {module!r} (not a file under base_dir {spec.base_dir!r})", allowed)
    names = _top_level_names(file) if file.suffix == ".py" else None
    if isinstance(names, str):
        raise InvalidArgument(f"deployment {spec.name!r}: module file {file} does not parse: {names}")
    if names is not None and name not in names:
        raise _refuse(
            spec, f"{name!r} (not a class, function or assignment at the top level of {file})", allowed
        )


def _no_folder(spec: DeploymentSpec, allowed: Sequence[str], base: Path | None = None) -> InvalidArgument:
    what = "is not a folder" if (base or Path(spec.base_dir)).exists() else "does not exist"
    return InvalidArgument(
        f"deployment {spec.name!r}: base_dir {spec.base_dir!r} {what} on this machine; with "
        f"allowed_model_dirs set ({', '.join(allowed)}) a python module is imported only from "
        "its base_dir, which must be a folder inside one of them"
    )


class ImportRefused(InvalidArgument):
    """What :func:`import_confined` refuses, told apart from what the module's own code raises."""


def import_confined(spec: DeploymentSpec, module: str, allowed: Sequence[str]) -> ModuleType:
    """Import ``module`` (dotted: a package's submodule) from ``spec.base_dir`` alone, with
    ``allowed`` set: each part not yet imported is looked up in ``base_dir`` (then in its
    package's folders) only, never on the rest of ``sys.path`` nor by other finders, and its
    file is checked to lie in ``allowed`` before it runs. A part already imported must have
    come from a file in ``allowed`` (:func:`check_module_file`). :class:`ImportRefused`
    otherwise; what the module's own code raises propagates."""
    if not Path(spec.base_dir).is_dir():
        raise ImportRefused(_no_folder(spec, allowed).message)
    parts = module.split(".")
    path: list[str] = [spec.base_dir]
    parent: ModuleType | None = None
    loaded: ModuleType | None = None
    for i, part in enumerate(parts):
        name = ".".join(parts[: i + 1])
        if i and not path:
            raise ImportRefused(f"cannot import module {module!r}: {parts[i - 1]!r} is not a package")
        loaded = sys.modules.get(name)
        if loaded is not None:
            try:
                check_module_file(spec, loaded, allowed)
            except InvalidArgument as err:
                raise ImportRefused(err.message) from None
        else:
            found = find_spec(name, path)
            if found is None or found.loader is None or not found.has_location or found.origin is None:
                what = f"module {module!r} (not a file under base_dir {spec.base_dir!r})"
                raise ImportRefused(_refuse(spec, what, allowed).message)
            if not inside(found.origin, allowed):
                what = f"module {name!r} (found at {found.origin})"
                raise ImportRefused(_refuse(spec, what, allowed).message)
            loaded = importlib.util.module_from_spec(found)
            sys.modules[name] = loaded
            try:
                found.loader.exec_module(loaded)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            loaded = sys.modules.get(name, loaded)  # a module may replace itself there, as import allows
            if parent is not None:
                setattr(parent, part, loaded)
        parent = loaded
        path = list(getattr(loaded, "__path__", None) or [])
    assert loaded is not None
    return loaded


def find_spec(name: str, path: Sequence[str]) -> importlib.machinery.ModuleSpec | None:
    """What ``importlib.machinery.PathFinder.find_spec(name, path)`` finds, with finders made
    for this call and dropped after it.

    PathFinder keeps the finder of each folder it searched in ``sys.path_importer_cache``,
    forever, keyed by the folder's spelling; a FileFinder holds the folder's listing. The head
    looks a module up for every spec applied, so each new spelling of a ``base_dir``
    (``/models/./.``, ...) kept a listing: 150 refused specs naming a folder of 20,000 files
    took the head from 88 MB to 729 MB. A namespace package's portions are gathered as
    PathFinder does, in a spec with no loader."""
    portions: list[str] = []
    for entry in path:
        finder = _finder(entry)
        found = finder.find_spec(name) if finder is not None else None
        if found is None:
            continue
        if found.loader is not None:
            return found
        portions.extend(found.submodule_search_locations or [])
    if not portions:
        return None
    namespace = importlib.machinery.ModuleSpec(name, None, is_package=True)
    namespace.submodule_search_locations = portions
    return namespace


def _finder(entry: str) -> importlib.abc.PathEntryFinder | None:
    """A new finder for the folder (or zip file) ``entry``, from ``sys.path_hooks`` as the
    import system makes one, but not cached; None when no hook takes it."""
    for hook in sys.path_hooks:
        try:
            return cast(importlib.abc.PathEntryFinder, hook(entry))
        except ImportError:
            continue
    return None


def module_file(base_dir: str, module: str) -> Path | None:
    """The file ``module`` (dotted: a package's submodule) is imported from when ``base_dir``
    is the only folder searched; None when it is not found there, or is a namespace package.
    Leaves nothing cached (:func:`find_spec`)."""
    path = [base_dir]
    found = None
    parts = module.split(".")
    for i in range(len(parts)):
        if found is not None:
            path = list(found.submodule_search_locations or [])
            if not path:
                return None
        found = find_spec(".".join(parts[: i + 1]), path)
        if found is None:
            return None
    if found is None or not found.has_location or found.origin is None:
        return None
    return Path(found.origin)


def _top_level_names(file: Path) -> frozenset[str] | str | None:
    """Names a module binds at its top level other than by import: ``class``, ``def`` and
    assignments, also inside top-level ``if``/``try``/``with`` blocks. None when the file is
    over :data:`MAX_PARSED_BYTES`; why, when it cannot be read or does not parse (the
    replica's import would fail too). Kept for the last :data:`PARSED_FILES_KEPT` files."""
    try:
        stat = file.stat()
    except OSError as err:
        return f"cannot read it: {err.strerror}"
    if stat.st_size > MAX_PARSED_BYTES:
        return None
    return _names_in(str(_real(file)), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=PARSED_FILES_KEPT)
def _names_in(real: str, device: int, inode: int, size: int, mtime_ns: int) -> frozenset[str] | str | None:
    """:func:`_top_level_names` of the file at ``real``; the other arguments are its
    version, the cache's key."""
    try:
        with open(real, "rb") as f:
            source = f.read(MAX_PARSED_BYTES + 1)
    except OSError as err:
        return f"cannot read it: {err.strerror}"
    if len(source) > MAX_PARSED_BYTES:  # it grew since its size was read
        return None
    try:
        tree = ast.parse(source, filename=real)
    except SyntaxError as err:
        return f"line {err.lineno}: {err.msg}"
    except (RecursionError, MemoryError) as err:
        # MemoryError: CPython's parser raises it when its own stack runs out, e.g. at 10,000
        # nested minus signs; before, it escaped as HTTP 500 / gRPC UNKNOWN.
        return f"nested too deeply for Python's parser ({type(err).__name__})"
    except ValueError as err:  # a NUL byte
        return str(err)
    names: set[str] = set()
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, ast.If | ast.Try | ast.With):
            todo.extend(node.body)
            todo.extend(getattr(node, "orelse", []))
            todo.extend(getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                todo.extend(handler.body)
    return frozenset(names)


def check_defined_in(module: object, name: str, obj: object) -> None:
    """After importing: ``obj`` (``module.name``) is a class or a function defined in
    ``module`` itself, not one it imported. InvalidArgument otherwise. Applies whatever
    ``allowed_model_dirs`` says: it is the form of every python model."""
    where = getattr(module, "__name__", "?")
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        raise InvalidArgument(f"{where}:{name} is a {type(obj).__name__}, not a class or factory function")
    if getattr(obj, "__module__", None) != where:
        raise InvalidArgument(
            f"{where}:{name} is defined in module {getattr(obj, '__module__', '?')!r}, not in {where!r}: "
            "name a class or factory defined in the module itself"
        )


def check_module_file(spec: DeploymentSpec, module: object, allowed: Sequence[str]) -> None:
    """After importing: the module object came from a file in ``allowed`` (not from
    ``sys.modules``' copy of a module of the same name, nor a built-in). InvalidArgument otherwise."""
    if not allowed:
        return
    file = getattr(module, "__file__", None)
    if not isinstance(file, str) or not inside(file, allowed):
        name = getattr(module, "__name__", "?")
        raise _refuse(spec, f"module {name!r} (loaded from {file or 'no file'})", allowed)

"""``allowed_model_dirs`` cannot be walked around (issue 13, item 2).

The object after ``:`` in a python model is one name, a class or factory defined in the
module itself; and the head refuses at deploy time what the replica would refuse, with
the same check (``shoal.core.model_dirs.check_deployable``).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shoal.backends.python import PythonBackend
from shoal.config import Settings
from shoal.core import model_dirs
from shoal.core.model_dirs import check_deployable
from shoal.core.spec import DeploymentSpec, parse_spec
from shoal.errors import FailedPrecondition, InvalidArgument
from shoal.head.node import HeadNode
from shoal.replica.process import ReplicaProcess
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers

pytestmark = pytest.mark.timeout(10)

SOURCE = """\
import os
from collections import OrderedDict
from os import system

import numpy as np

alias = os.system


class Model:
    def predict(self, inputs):
        return inputs


def factory(**options):
    return Model()


if True:
    class Guarded(Model):
        pass
"""


@pytest.fixture
def allowed(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """An allowed folder holding a model module with a fresh name (imports are cached)."""
    folder = tmp_path / "models"
    folder.mkdir()
    module = f"shoal_t_{uuid.uuid4().hex[:8]}"
    (folder / f"{module}.py").write_text(SOURCE)
    yield folder, module
    sys.modules.pop(module, None)
    if str(folder) in sys.path:
        sys.path.remove(str(folder))


def spec(model: str, base_dir: Path | str) -> DeploymentSpec:
    return parse_spec(
        {
            "name": "evil",
            "backend": "python",
            "model": model,
            "base_dir": str(base_dir),
            "options": {"command": "id > /tmp/pwned"},
        }
    )


def load(s: DeploymentSpec, allowed: tuple[str, ...]) -> PythonBackend:
    backend = PythonBackend(s)
    backend.allowed_dirs = allowed
    backend.load()
    return backend


@pytest.fixture
async def head(allowed: tuple[Path, str]) -> AsyncIterator[HeadNode]:
    store = MemoryStore()
    node = HeadNode(Settings(allowed_model_dirs=(str(allowed[0]),)), store, FakeSchedulers())
    yield node
    await node.aclose()
    await store.close()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("np.f2py.os.system", "must be 'module:Class'"),  # the walk-around of the issue
        ("Model.predict", "must be 'module:Class'"),
        ("np", "not a class, function or assignment at the top level"),
        ("system", "not a class, function or assignment at the top level"),
        ("os", "not a class, function or assignment at the top level"),
        ("Missing", "not a class, function or assignment at the top level"),
    ],
)
async def test_the_head_and_the_replica_refuse_a_name_not_defined_in_the_module(
    head: HeadNode, allowed: tuple[Path, str], target: str, message: str
) -> None:
    folder, module = allowed
    bad = spec(f"{module}:{target}", folder)

    with pytest.raises(InvalidArgument, match=message):
        await head.apply(bad)
    with pytest.raises(InvalidArgument, match=message):
        load(bad, (str(folder),))
    assert head.desired == {}


async def test_an_installed_module_with_an_allowed_base_dir_is_refused_at_deploy(
    head: HeadNode, allowed: tuple[Path, str]
) -> None:
    folder, _ = allowed
    for target in ("os:system", "subprocess:Popen", "json:loads"):
        with pytest.raises(InvalidArgument, match="not a file under base_dir"):
            await head.apply(spec(target, folder))


async def test_classes_and_factories_defined_in_the_module_are_accepted(
    head: HeadNode, allowed: tuple[Path, str]
) -> None:
    folder, module = allowed
    for target in ("Model", "factory", "Guarded"):
        good = spec(f"{module}:{target}", folder).model_copy(update={"name": target.lower(), "options": {}})
        await head.apply(good)
        backend = load(good, (str(folder),))
        assert backend.loaded
        backend.unload()


def test_an_alias_of_an_imported_object_passes_the_files_but_not_the_import(
    allowed: tuple[Path, str],
) -> None:
    folder, module = allowed
    aliased = spec(f"{module}:alias", folder)
    check_deployable(aliased, (str(folder),))  # an assignment: only the import can tell
    with pytest.raises(InvalidArgument, match="not a class or factory"):
        load(aliased, (str(folder),))


def test_without_allowed_dirs_the_replica_still_takes_only_names_defined_in_the_module(
    allowed: tuple[Path, str],
) -> None:
    folder, module = allowed
    with pytest.raises(InvalidArgument, match="defined in module 'collections'"):
        load(spec(f"{module}:OrderedDict", folder), ())
    with pytest.raises(InvalidArgument, match="not a class or factory"):
        load(spec(f"{module}:system", folder), ())
    with pytest.raises(InvalidArgument, match="must be 'module:Class'"):
        load(spec(f"{module}:np.f2py.os.system", folder), ())


def test_a_head_that_does_not_see_base_dir_checks_what_needs_no_files(tmp_path: Path) -> None:
    allowed = (str(tmp_path),)
    elsewhere = tmp_path / "on-the-schedulers-only"
    check_deployable(spec("my_model:Model", elsewhere), allowed)
    for bad, message in (
        ("os:system", "standard-library or built-in"),
        ("posix:system", "standard-library or built-in"),
        ("my_model:np.f2py.os.system", "must be 'module:Class'"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            check_deployable(spec(bad, elsewhere), allowed)


@pytest.mark.parametrize("model", ["my_model", "my_model:", ":Model", "a:b:c", "my_model:Model.predict"])
async def test_a_head_without_allowed_dirs_refuses_a_model_that_is_not_module_class(
    tmp_path: Path, model: str
) -> None:
    """Before: the head took 'model: my_model' and each replica failed on it, four times,
    until the head marked the deployment FAILED."""
    store = MemoryStore()
    node = HeadNode(Settings(), store, FakeSchedulers())
    try:
        with pytest.raises(InvalidArgument, match="must be 'module:Class'"):
            await node.apply(spec(model, tmp_path))
        assert node.desired == {}
        await node.apply(spec("my_model:Model", tmp_path))  # the form is all it checks here
        assert list(node.desired) == [spec("my_model:Model", tmp_path).name]
    finally:
        await node.aclose()
        await store.close()


# ---------------------------------------------------------------- base_dir must be a folder

MARKED = """\
import pathlib

pathlib.Path({marker!r}).write_text("imported")


class Model:
    def predict(self, inputs):
        return inputs
"""


@pytest.fixture
def outside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A module on ``sys.path`` but outside every allowed folder, that leaves a marker file
    when it is imported: (its name, the marker)."""
    folder = tmp_path / "on-sys-path"
    folder.mkdir()
    name = f"shoal_outside_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "outside-was-imported"
    (folder / f"{name}.py").write_text(MARKED.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(folder))
    yield name, marker
    sys.modules.pop(name, None)


async def test_a_base_dir_that_does_not_exist_is_refused_before_anything_is_imported(
    head: HeadNode, allowed: tuple[Path, str], outside: tuple[str, Path]
) -> None:
    """The prober's case: base_dir inside an allowed folder but missing, the module only on
    sys.path elsewhere. Before, the replica skipped its file check and imported the module
    from sys.path, refusing it only afterwards ('loaded from ...')."""
    folder, _ = allowed
    name, marker = outside
    missing = spec(f"{name}:Model", folder / "nope")

    # The head may run apart from the schedulers: a base_dir it does not see may exist there.
    await head.apply(missing)
    # Where the files must be (the replica, its backend), it is refused, before any import.
    with pytest.raises(InvalidArgument, match=r"base_dir .*/nope' does not exist"):
        load(missing, (str(folder),))
    assert not marker.exists() and name not in sys.modules
    settings = Settings(allowed_model_dirs=(str(folder),))
    with pytest.raises(InvalidArgument, match=r"base_dir .*/nope' does not exist"):
        await ReplicaProcess("r-1", missing, settings, link=None).load()  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"base_dir .*/nope' does not exist"):
        check_deployable(missing, (str(folder),), files_here=True)
    assert not marker.exists() and name not in sys.modules


async def test_a_base_dir_that_is_a_file_is_refused_at_deploy_and_in_the_replica(
    head: HeadNode, allowed: tuple[Path, str], outside: tuple[str, Path]
) -> None:
    folder, _ = allowed
    name, marker = outside
    (folder / "plain-file").write_text("not a folder")
    bad = spec(f"{name}:Model", folder / "plain-file")

    with pytest.raises(InvalidArgument, match="is not a folder"):
        await head.apply(bad)
    with pytest.raises(InvalidArgument, match="is not a folder"):
        load(bad, (str(folder),))
    assert head.desired == {} and not marker.exists()


def test_the_import_never_falls_through_to_sys_path(
    allowed: tuple[Path, str], outside: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The import itself looks in base_dir alone: with the check before it out of the way
    (say the module file went away between the two), a module found only elsewhere on
    sys.path is refused unimported, and a module already imported from elsewhere is refused."""
    folder, _ = allowed
    name, marker = outside
    monkeypatch.setattr(model_dirs, "check_deployable", lambda *args, **kwargs: None)
    with pytest.raises(InvalidArgument, match="not a file under base_dir"):
        load(spec(f"{name}:Model", folder), (str(folder),))
    assert not marker.exists() and name not in sys.modules
    with pytest.raises(InvalidArgument, match="loaded from"):
        load(spec("json:JSONDecoder", folder), (str(folder),))


def test_a_package_in_base_dir_still_imports_with_its_siblings(allowed: tuple[Path, str]) -> None:
    folder, _ = allowed
    package = f"shoal_pkg_{uuid.uuid4().hex[:8]}"
    (folder / package).mkdir()
    (folder / package / "__init__.py").write_text("")
    (folder / f"{package}_helper.py").write_text("VALUE = 3\n")
    (folder / package / "model.py").write_text(
        f"from {package}_helper import VALUE\n\n\nclass Model:\n"
        "    def predict(self, inputs):\n        return inputs\n\n    value = VALUE\n"
    )
    try:
        backend = load(
            spec(f"{package}.model:Model", folder).model_copy(update={"options": {}}), (str(folder),)
        )
        assert backend.loaded and backend._model.value == 3
        assert sys.modules[package].model is sys.modules[f"{package}.model"]
        backend.unload()
    finally:
        for module in (package, f"{package}.model", f"{package}_helper"):
            sys.modules.pop(module, None)


# ---------------------------------------------------------------- reading the module's names


def parses() -> int:
    """How many module files were read and parsed (each once per version) since the cache
    was last cleared."""
    return model_dirs._names_in.cache_info().misses


async def test_a_module_file_of_1_mib_is_not_parsed_by_the_head(
    head: HeadNode, allowed: tuple[Path, str]
) -> None:
    """ast.parse holds the GIL, so the head's event loop too, even in a thread: 1.8 s for a
    file of 1 MiB. Six clients posting specs that named one, all refused, made every replica
    of shoal up lose its scheduler. A file that large is checked after the replica's import."""
    folder, _ = allowed
    model_dirs._names_in.cache_clear()
    line = "x = [" + ", ".join(["1"] * 50) + "]\n"
    (folder / "big.py").write_text("class Big:\n    pass\n" + line * 6500)
    assert 1000 * 1000 < (folder / "big.py").stat().st_size <= 1024 * 1024  # the bound was 1 MiB

    await head.apply(spec("big:Nope", folder))
    assert parses() == 0


async def test_a_module_file_is_parsed_once_per_version(head: HeadNode, allowed: tuple[Path, str]) -> None:
    folder, module = allowed
    model_dirs._names_in.cache_clear()
    for _ in range(3):
        with pytest.raises(InvalidArgument, match=r"'Missing' \(not a class, function or assignment"):
            await head.apply(spec(f"{module}:Missing", folder))
    await head.apply(spec(f"{module}:Model", folder))
    assert parses() == 1
    # Edited: parsed again, and the new name is found.
    (folder / f"{module}.py").write_text(SOURCE + "\n\nclass Missing(Model):\n    pass\n")
    await head.apply(spec(f"{module}:Missing", folder))
    assert parses() == 2


@pytest.mark.parametrize(
    ("source", "why"),
    [
        # CPython's parser raises MemoryError for this (its own stack); it was HTTP 500 /
        # gRPC UNKNOWN "Unexpected <class 'MemoryError'>".
        ("class Deep:\n    pass\n\nx = " + "-" * 10_000 + "1\n", "nested too deeply for Python's parser"),
        ("class Deep:\n    pass\n\nx = (\n", "line 4: '\\(' was never closed"),
        ("class Deep:\n    pass\n\x00\n", "null bytes"),
    ],
)
async def test_a_module_file_that_does_not_parse_is_refused_naming_it(
    head: HeadNode, allowed: tuple[Path, str], source: str, why: str
) -> None:
    folder, _ = allowed
    file = folder / "deep.py"
    file.write_text(source)
    bad = spec("deep:Deep", folder)

    with pytest.raises(InvalidArgument, match=f"module file {file} does not parse: .*{why}"):
        await head.apply(bad)
    with pytest.raises(InvalidArgument, match=f"module file {file} does not parse: .*{why}"):
        check_deployable(bad, (str(folder),), files_here=True)
    assert head.desired == {}


async def test_looking_a_module_up_caches_nothing_however_base_dir_is_spelled(
    head: HeadNode, allowed: tuple[Path, str]
) -> None:
    """Each new spelling of one folder (``/models/./.`` ...) left a finder holding the
    folder's listing in ``sys.path_importer_cache``, for good: 150 refused specs against a
    folder of 20,000 files took the head from 88 MB to 729 MB."""
    folder, module = allowed
    before = set(sys.path_importer_cache)
    for k in range(1, 21):
        spelled = str(folder) + "/." * k
        with pytest.raises(InvalidArgument, match="not a class, function or assignment"):
            await head.apply(spec(f"{module}:Nope", spelled))
        await head.apply(spec(f"{module}:Model", spelled).model_copy(update={"name": f"ok-{k}"}))
    assert set(sys.path_importer_cache) == before
    # The replica's confined import finds its module the same way.
    # The replica's confined import finds its module the same way; only base_dir, which the
    # backend puts on sys.path for the model's own imports, may be cached, once.
    backend = load(
        spec(f"{module}:Model", str(folder) + "/./.").model_copy(update={"options": {}}), (str(folder),)
    )
    backend.unload()
    assert set(sys.path_importer_cache) - before <= {str(folder) + "/./."}


def test_open_inside_checks_the_file_it_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What loads a model file (a multiplexed sklearn id's, each file a scheduler copies from a
    file:// URI) opens it with model_dirs.open_inside."""
    folder, outside = tmp_path / "models", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (folder / "plain").write_bytes(b"inside")
    (outside / "secret").write_bytes(b"outside")
    (folder / "link-out").symlink_to(outside / "secret")
    (folder / "link-in").symlink_to(folder / "plain")
    allowed = (str(folder),)
    for name in ("plain", "link-in"):
        with model_dirs.open_inside(folder / name, allowed) as f:
            assert f.read() == b"inside"
    with pytest.raises(model_dirs.OutsideAllowed, match="outside the folders") as err:
        model_dirs.open_inside(folder / "link-out", allowed)
    assert err.value.real == str(outside / "secret")
    with model_dirs.open_inside(folder / "link-out", ()) as f:  # no folders set: any file
        assert f.read() == b"outside"
    # A FIFO is refused, not waited on.
    os.mkfifo(folder / "fifo")
    with pytest.raises(FailedPrecondition, match="not a regular file"):
        model_dirs.open_inside(folder / "fifo", allowed)
    # The link changed between the open and the look at where it leads: the path it leads
    # to now is inside, but it is not the file that was opened.
    real = os.path.realpath
    monkeypatch.setattr(
        os.path, "realpath", lambda p: str(folder / "plain") if "link-out" in str(p) else real(p)
    )
    with pytest.raises(model_dirs.OutsideAllowed):
        model_dirs.open_inside(folder / "link-out", allowed)

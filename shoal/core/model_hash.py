"""A hash of a deployment's model files, as the CLI sees them: ``shoal deploy`` puts it in the
spec (``model_hash``), so that editing a model's code or files is a change the head rolls out.

What is hashed:

* ``python``: the module's file and the other ``.py`` files in its folder (for a package,
  ``__init__.py``: every ``.py`` file under the package's folder);
* other backends: the model file, or every file under the model folder;
* nothing (an empty hash) when the model is not a file or folder on this machine (a hub
  name, a path only the schedulers see).

Bounded, so that a deploy stays fast beside a large model folder: at most
:data:`MAX_FILES` files (in path order; more are counted, not read), and at most
:data:`MAX_CONTENT_BYTES` of content read in all; a file past that budget counts by its
size and modification time instead of its content. Folders named ``.*`` and
``__pycache__`` are skipped.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from shoal.core.model_dirs import module_file, python_target
from shoal.core.spec import DeploymentSpec
from shoal.errors import InvalidArgument

MAX_FILES = 1000
"""Most files hashed per model; the count of the rest is hashed instead."""
MAX_CONTENT_BYTES = 256 * 1024 * 1024
"""Most bytes of content read per model; later files count by size and modification time."""
_CHUNK = 1024 * 1024


def model_files(spec: DeploymentSpec) -> tuple[Path, list[Path]]:
    """The folder the hash is relative to, and the files it covers (sorted); none when the
    model is not on this machine."""
    if spec.backend == "python":
        try:
            module, _ = python_target(spec.model)
        except InvalidArgument:
            return Path(), []
        file = module_file(spec.base_dir, module) if spec.base_dir else None
        if file is None or not file.is_file():
            return Path(), []
        folder = file.parent
        if file.name == "__init__.py":
            return folder, sorted(_walk(folder, suffix=".py"))
        return folder, sorted(p for p in folder.glob("*.py") if p.is_file())
    path = spec.model_path()
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        return path, sorted(_walk(path))
    return Path(), []


def _walk(root: Path, suffix: str = "") -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in files:
            if name.endswith(suffix):
                yield Path(folder) / name


def model_hash(spec: DeploymentSpec) -> str:
    """16 hex digits over the model's files (see the module's docstring); "" when there are none."""
    root, files = model_files(spec)
    if not files:
        return ""
    digest = hashlib.sha256()
    budget = MAX_CONTENT_BYTES
    for path in files[:MAX_FILES]:
        try:
            st = path.stat()
            digest.update(str(path.relative_to(root)).encode(errors="surrogateescape") + b"\0")
            if st.st_size <= budget:
                budget -= st.st_size
                with path.open("rb") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
            else:
                digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            continue  # vanished or unreadable: the replica will say so when it loads
        digest.update(b"\0")
    if len(files) > MAX_FILES:
        digest.update(f"+{len(files) - MAX_FILES} files".encode())
    return digest.hexdigest()[:16]


def with_model_hash(spec: DeploymentSpec) -> DeploymentSpec:
    """``spec`` with ``model_hash`` set from the files, unless the spec already sets one."""
    if spec.model_hash:
        return spec
    return spec.model_copy(update={"model_hash": model_hash(spec)})

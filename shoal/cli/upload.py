"""``shoal deploy`` uploading local models to the head's blob store.

A spec's model file or folder (a python deployment's code folder, ``base_dir``) that exists
on the CLI's machine is uploaded when the schedulers may not see it: by default when the
head is not on this machine's loopback, or a scheduler runs on another host (its hostname
differs); always with ``--upload``, never with ``--no-upload``. The spec sent then names
the blob (``blob://sha256:<hex>/<name>``, ``shoal.core.blobs``) instead of the path.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shoal.auth import is_loopback
from shoal.config import Settings
from shoal.core.blobs import BlobRef, pack
from shoal.core.spec import DeploymentSpec
from shoal.rpc.blobs import upload
from shoal.rpc.clients import head_addresses


def local_artifact(spec: DeploymentSpec) -> Path | None:
    """The file or folder on this machine that ``spec``'s replicas load: the python code
    folder, or the model path; None when it names a URI or nothing here."""
    if spec.artifact_uri():
        return None
    if spec.backend == "python":
        return Path(spec.base_dir) if spec.base_dir and Path(spec.base_dir).is_dir() else None
    path = spec.model_path()
    return path if path.is_file() or path.is_dir() else None


def naming_blob(spec: DeploymentSpec, ref: BlobRef) -> DeploymentSpec:
    """``spec`` with its local file or folder replaced by the blob ``ref``."""
    if spec.backend == "python":
        return spec.model_copy(update={"base_dir": ref.uri})
    return spec.model_copy(update={"model": ref.uri, "base_dir": ""})


def remote_cluster(settings: Settings, status: Mapping[str, Any]) -> bool:
    """Whether a scheduler may not see this machine's files: the head is not on loopback,
    or a scheduler registered from another hostname."""
    hosts = [a.rpartition(":")[0] or a for a in head_addresses(settings.head_address)]
    here = socket.gethostname()
    others = any(s.get("hostname") not in ("", here) for s in status.get("schedulers", []))
    return others or not all(is_loopback(h) for h in hosts)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


async def upload_local_models(
    specs: Sequence[DeploymentSpec], settings: Settings, mode: bool | None, status: Mapping[str, Any]
) -> list[DeploymentSpec]:
    """``specs``, those with a local model uploaded (see the module's docstring) naming
    its blob. ``mode``: True always, False never, None when :func:`remote_cluster`.
    Raises ShoalError when the head refuses an upload or cannot be reached."""
    if mode is False or (mode is None and not remote_cluster(settings, status)):
        return list(specs)
    done: dict[Path, BlobRef] = {}
    out = []
    for spec in specs:
        path = local_artifact(spec)
        if path is None:
            out.append(spec)
            continue
        path = path.resolve()
        if path not in done:
            done[path] = await _upload_one(path, settings)
        out.append(naming_blob(spec, done[path]))
    return out


async def _upload_one(path: Path, settings: Settings) -> BlobRef:
    packed = await asyncio.to_thread(pack, path, Path(tempfile.gettempdir()))
    what = f"{path}{'/' if packed.ref.folder else ''}"
    shown = [0]

    def progress(done: int, total: int) -> None:
        # A line per tenth, not per chunk.
        step = max(total // 10, 1)
        if done == total or done // step > shown[0]:
            shown[0] = done // step
            print(f"uploading {what}: {_mb(done)} of {_mb(total)}", file=sys.stderr, flush=True)

    try:
        sent = await upload(settings, packed, progress)
    finally:
        packed.discard()
    done = "uploaded" if sent else "the head has"
    print(f"{done} {what} as sha256:{packed.ref.sha256[:12]} ({_mb(packed.size)})", flush=True)
    return packed.ref

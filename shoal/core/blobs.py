"""Blobs: model files and folders in the cluster's own artifact store, named by content.

A blob is a sequence of bytes named by its SHA-256 (lowercase hex). A file is its own
blob; a folder travels as a tar that :func:`pack` makes deterministic (the same files give
the same bytes, so the same hash, on any machine). A spec names a blob by a URI,
``blob://sha256:<hex>/<name>`` for a file and ``blob://sha256:<hex>/<name>/`` for a folder,
``<name>`` being the original's base name (what ``shoal status`` shows, and the name the
copy takes in a scheduler's artifact cache).

Pure: no network; the files are read and written here, the transfers live in ``shoal.rpc.blobs``
(each source's stream bounded by :func:`until_idle`, for a scheduler's fetch and a head's
mirror alike).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import stat
import tarfile
import tempfile
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import FailedPrecondition, InvalidArgument, Unavailable

SCHEME = "blob"
CHUNK = 1024 * 1024 - 1024
"""Bytes per message of an upload or a download: under 1 MiB, so that a message, its other
fields included, fits the smallest message limit (``max_message_mb`` 1)."""
IDLE_S = 30.0
"""A download from one source (a peer scheduler, a head) that sends no byte for this long
ends (:func:`until_idle`), and the next source is tried."""
HEX = re.compile(r"^[0-9a-f]{64}\Z")  # \Z: "$" also matches before a final newline
_URI = re.compile(r"^blob://sha256:(?P<hex>[0-9a-f]{64})/(?P<name>[^/]+)(?P<folder>/?)$")
SKIPPED = ("__pycache__",)
"""Folders a packed folder leaves out: Python writes them as it imports, which would change the hash."""


@dataclass(frozen=True)
class BlobRef:
    """What a ``blob://`` URI names."""

    sha256: str
    name: str  # the original file's or folder's base name
    folder: bool  # a tar of a folder, unpacked where it is used

    @property
    def uri(self) -> str:
        return f"{SCHEME}://sha256:{self.sha256}/{urllib.parse.quote(self.name)}{'/' if self.folder else ''}"


def parse_uri(uri: str) -> BlobRef:
    """The blob ``uri`` names; ValueError saying what is wrong."""
    match = _URI.match(uri)
    if match is None:
        raise ValueError(
            f"{uri!r} is no blob URI: 'blob://sha256:<64 lowercase hex digits>/<name>' for a file, "
            "with a '/' after the name for a folder"
        )
    name = urllib.parse.unquote(match["name"])
    if name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"{uri!r}: the name after the hash must be a plain file or folder name")
    return BlobRef(match["hex"], name, bool(match["folder"]))


def check_hex(sha256: str) -> str:
    """``sha256`` if it is 64 lowercase hex digits; InvalidArgument otherwise."""
    if not HEX.match(sha256):
        raise InvalidArgument(
            f"a blob is named by its SHA-256 as 64 lowercase hex digits, got {sha256[:80]!r}"
        )
    return sha256


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Packed:
    """A local file or folder ready to upload: ``path`` holds the blob's bytes (the file
    itself, or a temporary tar that :meth:`discard` deletes)."""

    ref: BlobRef
    path: Path
    size: int
    temporary: bool

    def discard(self) -> None:
        if self.temporary:
            self.path.unlink(missing_ok=True)


def pack(source: Path, tmp_dir: Path | None = None) -> Packed:
    """``source`` (a file, or a folder packed by :func:`pack_folder` into a temporary file
    under ``tmp_dir``) with its hash. InvalidArgument when it is neither."""
    if source.is_file():
        return Packed(BlobRef(file_sha256(source), source.name, False), source, source.stat().st_size, False)
    if not source.is_dir():
        raise InvalidArgument(f"{source} is neither a file nor a folder")
    fd, name = tempfile.mkstemp(prefix=".shoal-pack-", suffix=".tar", dir=tmp_dir)
    os.close(fd)
    tar = Path(name)
    try:
        pack_folder(source, tar)
        return Packed(BlobRef(file_sha256(tar), source.resolve().name, True), tar, tar.stat().st_size, True)
    except BaseException:
        tar.unlink(missing_ok=True)
        raise


def pack_folder(folder: Path, out: Path) -> None:
    """Write ``folder``'s files as a tar to ``out``, the same bytes for the same content:
    entries in path order, times and owners zeroed, modes 0644 (0755 for folders and files
    any execute bit is set on). Files reached through a symbolic link are packed as files;
    folders reached through one, and ``__pycache__`` folders, are left out."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in _entries(folder):
            rel = path.relative_to(folder).as_posix()
            st = path.stat()
            info = tarfile.TarInfo(rel)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
                continue
            info.size = st.st_size
            info.mode = 0o755 if st.st_mode & 0o111 else 0o644
            with path.open("rb") as f:
                tar.addfile(info, f)


def _entries(folder: Path) -> list[Path]:
    out: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED and not os.path.islink(os.path.join(root, d)))
        base = Path(root)
        out.extend(base / d for d in dirs)
        out.extend(base / f for f in files if (base / f).is_file())
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def unpack(tar_path: Path, dest: Path) -> None:
    """Extract a packed folder into ``dest`` (created), refusing what a packed folder never
    holds (links, devices, absolute paths, ``..``): FailedPrecondition."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tar_path, "r") as tar:
            for member in tar.getmembers():
                if not (member.isfile() or member.isdir()):
                    raise FailedPrecondition(
                        f"blob {tar_path.name}: {member.name!r} is neither a file nor a folder"
                    )
            tar.extractall(dest, filter="data")
    except tarfile.TarError as err:
        raise FailedPrecondition(f"blob {tar_path.name} is not a folder shoal packed: {err}") from None


async def read_chunks(path: Path, offset: int) -> AsyncIterator[bytes]:
    """The bytes of ``path`` from ``offset``, :data:`CHUNK` at a time, read in a worker thread.
    FileNotFoundError when it is missing; InvalidArgument for an offset outside it."""
    f = await asyncio.to_thread(path.open, "rb")
    try:
        size = os.fstat(f.fileno()).st_size
        if offset < 0 or offset > size:
            raise InvalidArgument(f"offset {offset} is outside blob {path.name} ({size} bytes)")
        f.seek(offset)
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk
    finally:
        f.close()


async def until_idle(chunks: AsyncIterator[bytes], source: str, idle_s: float) -> AsyncIterator[bytes]:
    """``chunks``, ending Unavailable (naming ``source``) when none comes for ``idle_s``: a
    source that stalls with its connection open (a stopped process) holds no fetch for
    ever. ``chunks`` is closed when this ends, however it ends."""
    try:
        while True:
            try:
                async with asyncio.timeout(idle_s):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise Unavailable(f"{source} sent no byte for {idle_s:g}s") from None
            yield chunk
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()

"""The scheduler's artifact cache: models named by URI, fetched once per machine.

A deployment's ``model`` (or a python deployment's ``base_dir``, its code's folder) may be a
URI (``shoal.core.spec.URI_SCHEMES``). Before a replica of it starts, its scheduler takes a
:class:`Lease` on a local copy from :meth:`ArtifactCache.acquire`, which downloads it only
when the cache lacks it. Everything lives in ``root`` (``<state_dir>/artifacts``):

* ``<sha256>/``: one blob, named by the hash of its content. A single object is stored
  under its own name (``<sha256>/model.joblib``; the hash is the file's, what ``sha256sum``
  prints); a folder's files keep their paths below it, and the hash is that of its manifest,
  the lines ``<sha256 of the file>  <path>`` sorted by path, each ending in a newline.
* ``index.json``: which blob each URI's current version is, a version being the size and
  version marks (ETag, version id, modification time) the source lists for each object. A
  source that lists no version mark is downloaded again each time (its blob is shared all
  the same, by content).
* ``tmp/``: downloads in progress; emptied when the cache opens.

A ``file://`` URI is read at the path :func:`shoal.core.model_dirs.file_uri_path` gives, the
one the head and the scheduler checked. Symbolic links in it are followed, and with
``allowed_dirs`` (the scheduler's ``allowed_model_dirs``) set, each must lead inside those
folders: the listing refuses a link that leads out, naming it, before anything is copied,
and each file is checked again as it is opened (``model_dirs.open_inside``), so a link
changed in between cannot pass. Before, the folder was copied with fsspec, which followed a
link to a module outside the allowed folders; the copy, in the cache, was then allowed to
the replica, which imported it.

Verified: each object's byte count must equal the size the source lists, and a URI ending in
``#sha256=<hex>`` must have that hash (and once a blob of that hash is cached for the URI,
the source is not contacted again; but a ``file://`` URI with ``allowed_dirs`` set is
listed, and its links checked, each time).

Bounded by ``limit_bytes``: the least recently used blobs that no lease holds are deleted to
make room before a download and after it; one object or folder larger than the limit is
refused. Blobs held by a lease (a running replica) are never deleted, so the folder may pass
the limit while they alone fill it.

Concurrent :meth:`ArtifactCache.acquire` calls for one URI share one download, whose
:class:`Progress` :meth:`ArtifactCache.progress` shows. Objects are read through fsspec
(s3fs for ``s3://``, aiohttp for ``http(s)://``; ``gs://`` needs gcsfs installed) in worker
threads, with each library's standard credentials: ``AWS_ACCESS_KEY_ID`` and the rest,
``~/.aws``, ``AWS_ENDPOINT_URL`` for an S3-compatible store; ``GOOGLE_APPLICATION_CREDENTIALS``.

A ``blob://`` URI (the cluster's own store, ``shoal.core.blobs``) is fetched from a peer
scheduler or the head through ``blob_source`` (``shoal.scheduler.blob_fetch``) and cached
under its hash: a file as ``<sha256>/<name>``, a folder as its tar ``<sha256>/<sha256>.tar``
beside the files unpacked in ``<sha256>/<name>/`` (the tar is what :meth:`blob_file` serves
to peers). Limited and evicted as the rest; each eviction is told to the head
(:attr:`ArtifactCache.on_evicted`), which then no longer points peers here for it.

Not safe across threads: call it from the scheduler's event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import posixpath
import re
import secrets
import shutil
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from shoal.core import blobs, model_dirs
from shoal.core.spec import uri_scheme
from shoal.core.tasks import TaskSet
from shoal.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ShoalError,
    Unavailable,
)
from shoal.scheduler import blob_fetch

log = logging.getLogger("shoal.scheduler")

CHUNK = 1024 * 1024
_HASH_DIR = re.compile(r"^[0-9a-f]{64}$")
_VERSION_KEYS = (
    "VersionId",
    "ETag",
    "etag",
    "generation",
    "md5Hash",
    "LastModified",
    "Last-Modified",
    "mtime",
)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


@dataclass
class Progress:
    """One download's progress: bytes written so far, of ``total`` (0 while unknown)."""

    uri: str
    done: int = 0
    total: int = 0

    def describe(self) -> str:
        if self.total <= 0:
            return f"downloading {self.uri}: {_mb(self.done)} MB"
        percent = min(100, 100 * self.done // self.total)
        return f"downloading {self.uri}: {_mb(self.done)}/{_mb(self.total)} MB ({percent}%)"


@dataclass(frozen=True)
class _Entry:
    rel: str  # its path inside the blob
    remote: str  # its path on the source's filesystem
    size: int | None
    version: str  # the version marks the source lists, as JSON; "" when none


@dataclass
class _Blob:
    size: int
    last_used: float
    pins: int = 0


@dataclass
class _Download:
    progress: Progress
    waiters: int = 0
    task: asyncio.Task[tuple[str, str]] | None = None
    blob: str = ""  # set once the waiters' pins are counted


class Lease:
    """A local copy of a URI's content, kept while the lease is held: ``path`` is the file
    (a single object) or the folder. :meth:`release` once the replica using it has ended."""

    def __init__(self, cache: ArtifactCache, blob: str, path: Path) -> None:
        self.blob = blob
        self.path = path
        self._cache: ArtifactCache | None = cache

    @property
    def folder(self) -> Path:
        """The blob's folder: what a replica reading ``path`` must be allowed to read."""
        return self.path if self.path.is_dir() else self.path.parent

    def release(self) -> None:
        """Idempotent."""
        cache, self._cache = self._cache, None
        if cache is not None:
            cache._unpin(self.blob)


def split_uri(uri: str) -> tuple[str, str]:
    """``(uri without its fragment, the sha256 its fragment asks for or "")``."""
    bare, _, fragment = uri.partition("#")
    return bare, fragment.removeprefix("sha256=") if fragment.startswith("sha256=") else ""


class ArtifactCache:
    """See the module's docstring. ``root`` is created on the first :meth:`acquire`.
    ``allowed_dirs``: the folders a ``file://`` URI's files must lie in (any when empty)."""

    def __init__(self, root: Path, *, limit_bytes: int, allowed_dirs: Sequence[str] = ()) -> None:
        self.root = root
        self.limit_bytes = limit_bytes
        self.allowed_dirs = tuple(allowed_dirs)
        self._blobs: dict[str, _Blob] = {}
        self._index: dict[str, dict[str, str]] = {}  # key -> {"uri", "hash", "path"}
        self._downloads: dict[str, _Download] = {}
        self._reserved = 0  # bytes of downloads in progress
        self._opened = False
        self._open_lock = asyncio.Lock()
        self._stop = threading.Event()
        self._tasks = TaskSet("artifacts")
        self.blob_source: blob_fetch.BlobSource | None = None  # set by the composition root
        self.blob_give_up_s = 120.0
        """A ``blob://`` fetch fails once no source has sent a byte for this long."""
        self.blob_idle_s = blobs.IDLE_S
        """A ``blob://`` fetch leaves a source that sends no byte for this long for the next."""
        self.on_evicted: Callable[[list[str]], None] = lambda sha256s: None
        """Called with the hashes of the blobs an eviction deleted (the head is told:
        ``blob_fetch.Announcer.released``)."""

    # ------------------------------------------------------------ public

    def progress(self, uri: str) -> Progress | None:
        """The download of ``uri`` in progress; None when there is none."""
        download = self._downloads.get(uri)
        return download.progress if download is not None else None

    def size(self) -> int:
        """Bytes the cached blobs take."""
        return sum(b.size for b in self._blobs.values())

    def blobs(self) -> list[str]:
        """The hashes of the cached blobs."""
        return list(self._blobs)

    def blob_file(self, sha256: str) -> Path | None:
        """The file whose bytes are blob ``sha256``, if cached: a folder's tar, or a single
        object; None otherwise (for what a peer's Download asks)."""
        if sha256 not in self._blobs or not blobs.HEX.match(sha256):
            return None
        folder = self.root / sha256
        tar = folder / f"{sha256}.tar"
        if tar.is_file():
            return tar
        try:
            entries = list(folder.iterdir())
        except OSError:
            return None
        return entries[0] if len(entries) == 1 and entries[0].is_file() else None

    async def acquire(self, uri: str) -> Lease:
        """A lease on the local copy of ``uri``, downloaded first when it is not cached.

        Raises NotFound (no such object), PermissionDenied (the credentials may not read it,
        or a ``file://`` URI's file lies outside ``allowed_dirs``),
        FailedPrecondition (the content fails verification, is larger than the cache, or the
        scheme's library is not installed), Unavailable (anything else the source answered),
        each naming the URI. Safe to call concurrently: calls for one URI share a download."""
        await self._open()
        download = self._downloads.get(uri)
        if download is None:
            download = _Download(Progress(split_uri(uri)[0]))
            download.task = self._tasks.spawn(self._fetch(uri, download), "fetch")
            self._downloads[uri] = download
        task = download.task
        assert task is not None
        download.waiters += 1
        try:
            blob, rel = await asyncio.shield(task)
        except BaseException:
            if download.blob:
                self._unpin(download.blob)  # its pin was counted; this caller leaves
            else:
                download.waiters -= 1
            raise
        return Lease(self, blob, self.root / blob / rel if rel else self.root / blob)

    async def aclose(self) -> None:
        """Stop the downloads in progress (their threads at their next chunk)."""
        self._stop.set()
        await self._tasks.aclose()

    # ------------------------------------------------------------ fetching

    async def _fetch(self, uri: str, download: _Download) -> tuple[str, str]:
        """The blob and the path inside it of ``uri``, downloaded if need be; pins the blob
        once per waiter, synchronously with leaving ``_downloads``."""
        try:
            blob, rel, fresh = await self._find_or_download(uri, download)
        finally:
            del self._downloads[uri]
        # No await between registering the blob and pinning it: no eviction comes between.
        self._blobs[blob].pins += download.waiters
        download.blob = blob
        self._touch(blob)
        if fresh:
            try:
                await self._evict(room=0)
                await asyncio.to_thread(self._save_index)
            except OSError as err:
                log.warning("artifact cache %s: %s", self.root, err)
        return blob, rel

    async def _find_or_download(self, uri: str, download: _Download) -> tuple[str, str, bool]:
        """(blob, path inside it, whether it was downloaded now)."""
        bare, expected = split_uri(uri)
        if uri_scheme(bare) == blobs.SCHEME:
            return await self._fetch_blob(bare, download)
        local = uri_scheme(bare) == "file"
        # With allowed_dirs, a file:// URI is always listed: that is cheap, and where its
        # links are checked (the blob may have been copied under other rules).
        if expected and expected in self._blobs and not (local and self.allowed_dirs):
            for item in self._index.values():
                if item["uri"] == bare and item["hash"] == expected and self._present(item):
                    return expected, item["path"], False
        if local:
            fs, (entries, single) = None, await asyncio.to_thread(_local_listing, bare, self.allowed_dirs)
        else:
            fs, entries, single = await asyncio.to_thread(_listing, bare)
        key = _index_key(bare, entries)
        found = self._index.get(key) if key else None
        if found is not None and found["hash"] in self._blobs and self._present(found):
            log.info("%s is cached as %s", bare, found["hash"][:12])
            return found["hash"], found["path"], False
        sizes = [e.size for e in entries]
        total = sum(s for s in sizes if s is not None)
        if total > self.limit_bytes:
            raise FailedPrecondition(
                f"{bare} is {_mb(total)} MB, more than this scheduler's artifact cache holds "
                f"(setting artifact_cache_mb: {_mb(self.limit_bytes)})"
            )
        download.progress.total = total if None not in sizes else 0
        await self._evict(room=total)
        self._reserved += total
        tmp = self.root / "tmp" / secrets.token_hex(8)
        try:
            blob = await asyncio.to_thread(
                _download, fs, bare, entries, single, tmp, download.progress, self._stop, self.allowed_dirs
            )
            if expected and blob != expected:
                raise FailedPrecondition(f"{bare}: its sha256 is {blob}, not {expected} as the URI asks")
            size = await asyncio.to_thread(_place, tmp, self.root / blob)
        finally:
            self._reserved -= total
            await asyncio.to_thread(shutil.rmtree, tmp, True)
        rel = entries[0].rel if single else ""
        was = self._blobs.get(blob)
        self._blobs[blob] = _Blob(size=size, last_used=time.time(), pins=was.pins if was else 0)
        log.info("downloaded %s (%s MB) as %s", bare, _mb(size), blob[:12])
        if key:
            self._index[key] = {"uri": bare, "hash": blob, "path": rel}
        return blob, rel, True

    async def _fetch_blob(self, uri: str, download: _Download) -> tuple[str, str, bool]:
        """(blob, path inside it, whether it was fetched now) of a ``blob://`` URI."""
        try:
            ref = blobs.parse_uri(uri)
        except ValueError as err:
            raise FailedPrecondition(str(err)) from None
        rel = ref.name
        if ref.sha256 in self._blobs and (self.root / ref.sha256 / rel).exists():
            return ref.sha256, rel, False
        if self.blob_source is None:
            raise FailedPrecondition(f"{uri}: this scheduler has no head to fetch blobs from")
        reserved = 0

        async def admit(size: int) -> None:
            nonlocal reserved
            if size > self.limit_bytes:
                raise FailedPrecondition(
                    f"{uri} is {_mb(size)} MB, more than this scheduler's artifact cache holds "
                    f"(setting artifact_cache_mb: {_mb(self.limit_bytes)})"
                )
            # A folder takes its tar and its files: twice its size.
            room = 2 * size if ref.folder else size
            await self._evict(room=room)
            self._reserved += room
            reserved = room

        def on_bytes(done: int, total: int) -> None:
            download.progress.done, download.progress.total = done, total

        tmp = self.root / "tmp" / secrets.token_hex(8)
        try:
            await asyncio.to_thread(tmp.mkdir, parents=True)
            data = tmp / (f"{ref.sha256}.tar" if ref.folder else ref.name)
            await blob_fetch.fetch(
                self.blob_source,
                ref,
                data,
                admit=admit,
                on_bytes=on_bytes,
                stop=self._stop,
                give_up_s=self.blob_give_up_s,
                idle_s=self.blob_idle_s,
            )
            if ref.folder:
                await asyncio.to_thread(blobs.unpack, data, tmp / ref.name)
            size = await asyncio.to_thread(_place, tmp, self.root / ref.sha256)
        finally:
            self._reserved -= reserved
            await asyncio.to_thread(shutil.rmtree, tmp, True)
        was = self._blobs.get(ref.sha256)
        self._blobs[ref.sha256] = _Blob(size=size, last_used=time.time(), pins=was.pins if was else 0)
        log.info("fetched %s (%s MB)", uri, _mb(size))
        return ref.sha256, rel, True

    def _present(self, item: dict[str, str]) -> bool:
        return (self.root / item["hash"] / item["path"]).exists()

    # ------------------------------------------------------------ bookkeeping

    async def _open(self) -> None:
        async with self._open_lock:
            if not self._opened:
                self._blobs, self._index = await asyncio.to_thread(_scan, self.root)
                self._opened = True

    def _touch(self, blob: str) -> None:
        self._blobs[blob].last_used = time.time()
        try:
            os.utime(self.root / blob)  # the LRU order survives a restart
        except OSError:
            pass

    def _unpin(self, blob: str) -> None:
        entry = self._blobs.get(blob)
        if entry is None:
            return
        entry.pins = max(0, entry.pins - 1)
        self._touch(blob)
        if self.size() > self.limit_bytes and not self._tasks.closed:
            self._tasks.spawn(self._evict(room=0), "evict")

    async def _evict(self, *, room: int) -> None:
        """Delete least recently used unpinned blobs until the cache, the
        downloads in progress and ``room`` fit the limit. Decided on the event loop, so a
        blob chosen here cannot be pinned meanwhile; deleted in a thread."""
        total = self.size() + self._reserved + room
        victims = []
        for blob, entry in sorted(self._blobs.items(), key=lambda kv: kv[1].last_used):
            if total <= self.limit_bytes:
                break
            if entry.pins:
                continue
            victims.append(blob)
            total -= entry.size
            del self._blobs[blob]
        if not victims:
            return
        self._index = {k: v for k, v in self._index.items() if v["hash"] in self._blobs}
        trash = []
        for blob in victims:
            # Renamed at once (out of the way of a download of the same content), deleted later.
            target = self.root / "tmp" / f"evicted-{blob}-{secrets.token_hex(4)}"
            try:
                os.rename(self.root / blob, target)
                trash.append(target)
            except OSError as err:
                log.warning("could not evict artifact %s: %s", blob, err)
        log.info("evicted %d artifact(s) to keep the cache under %s MB", len(victims), _mb(self.limit_bytes))
        self.on_evicted(victims)
        await asyncio.to_thread(_remove_all, trash)
        await asyncio.to_thread(self._save_index)

    def _save_index(self) -> None:
        path = self.root / "index.json"
        tmp = path.with_name(f"index.json.{secrets.token_hex(4)}")
        tmp.write_text(json.dumps(self._index, sort_keys=True))
        os.replace(tmp, path)


# ---------------------------------------------------------------- in worker threads


def _scan(root: Path) -> tuple[dict[str, _Blob], dict[str, dict[str, str]]]:
    """The blobs under ``root`` and its index; empties ``tmp/``."""
    shutil.rmtree(root / "tmp", ignore_errors=True)
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    blobs = {}
    for path in root.iterdir():
        if path.is_dir() and _HASH_DIR.match(path.name):
            blobs[path.name] = _Blob(size=_du(path), last_used=path.stat().st_mtime)
    try:
        raw = json.loads((root / "index.json").read_text())
    except (OSError, ValueError):
        raw = {}
    index = {
        k: v
        for k, v in (raw.items() if isinstance(raw, dict) else [])
        if isinstance(v, dict) and {"uri", "hash", "path"} <= v.keys() and v["hash"] in blobs
    }
    return blobs, index


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _remove_all(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _safe_rel(rel: str, uri: str) -> str:
    """``rel`` if it is a plain relative path (no ``..``, not absolute); FailedPrecondition otherwise."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise FailedPrecondition(f"{uri}: the source lists an object named {rel!r}, which is no plain path")
    return rel


def _version(info: dict[str, Any]) -> str:
    marks = {k: str(info[k]) for k in _VERSION_KEYS if info.get(k)}
    return json.dumps(marks, sort_keys=True) if marks else ""


def _listing(uri: str) -> tuple[Any, list[_Entry], bool]:
    """(the filesystem, the objects ``uri`` names, whether it is a single object). Raises
    ShoalError naming ``uri``."""
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri, **_storage_options(uri))
        info = fs.info(path)
        if info.get("type") != "directory":
            name = posixpath.basename(urllib.parse.urlsplit(path).path.rstrip("/")) or "model"
            return fs, [_Entry(_safe_rel(name, uri), path, info.get("size"), _version(info))], True
        root = str(path).rstrip("/")
        found = fs.find(root, detail=True)
        entries = [
            _Entry(
                _safe_rel(posixpath.relpath(name, root), uri),
                name,
                item.get("size"),
                _version(item),
            )
            for name, item in sorted(found.items())
            if item.get("type") != "directory"
        ]
    except ShoalError:
        raise
    except Exception as err:
        raise _explain(uri, err) from None
    if not entries:
        raise NotFound(f"{uri}: an empty folder")
    return fs, entries, False


def _local_listing(uri: str, allowed: Sequence[str]) -> tuple[list[_Entry], bool]:
    """(the files a ``file://`` URI names, whether it is a single file), read at the path
    ``model_dirs.file_uri_path`` gives (fsspec reads ``file://localhost/p`` as
    ``/localhost/p`` and leaves ``%20`` as it is: not the path the head checked). Links are
    followed; with ``allowed`` set each must lead inside those folders, PermissionDenied
    naming it otherwise. FailedPrecondition for what is not a regular file (a FIFO would
    hang the copy) and for a folder reached a second time through a link (a loop, or links
    that would copy one folder many times over). Raises ShoalError naming ``uri``."""
    try:
        path = model_dirs.file_uri_path(uri)
    except InvalidArgument as err:
        raise FailedPrecondition(err.message) from None
    where = uri
    try:
        root = os.path.realpath(path)
        if allowed and not model_dirs.inside(root, allowed):
            raise _outside(uri, "", root, allowed)
        top = os.stat(root)
        if not stat.S_ISDIR(top.st_mode):
            _regular(uri, "", top)
            return [_Entry(_safe_rel(path.name or "model", uri), root, top.st_size, _mtime(top))], True
        entries: list[_Entry] = []
        walked = {root: ""}  # real folder -> where it was copied
        todo = [(root, "")]
        while todo:
            folder, rel = todo.pop()
            with os.scandir(folder) as listing:
                children = list(listing)
            for child in children:
                child_rel = f"{rel}/{child.name}" if rel else child.name
                where = f"{uri} ({child_rel})"
                real = child.path  # in a real folder: real, unless it is a link
                if child.is_symlink():
                    real = os.path.realpath(child.path)
                    if allowed and not model_dirs.inside(real, allowed):
                        raise _outside(uri, child_rel, real, allowed)
                st = os.stat(real)
                if stat.S_ISDIR(st.st_mode):
                    if real in walked:
                        first = f"as {walked[real]!r}" if walked[real] else "as the URI itself"
                        raise FailedPrecondition(
                            f"{uri}: {child_rel} is a link to a folder already copied {first}; "
                            "a folder is copied once"
                        )
                    walked[real] = child_rel
                    todo.append((real, child_rel))
                else:
                    _regular(uri, child_rel, st)
                    entries.append(_Entry(_safe_rel(child_rel, uri), real, st.st_size, _mtime(st)))
    except ShoalError:
        raise
    except OSError as err:
        raise _explain(where, err) from None
    if not entries:
        raise NotFound(f"{uri}: an empty folder")
    return sorted(entries, key=lambda e: e.rel), False


def _outside(uri: str, rel: str, real: str, allowed: Sequence[str]) -> PermissionDenied:
    """The refusal of a file:// URI's entry ``rel`` (the URI itself when empty) whose real path
    ``real`` is outside ``allowed``: it names the entry, not where it leads (logged here)."""
    what = f"{uri}: {rel}" if rel else uri
    log.warning("%s leads to %s, outside allowed_model_dirs: not fetched", what, real)
    return PermissionDenied(
        f"{what} leads outside the folders models may come from (symbolic links resolved; "
        f"setting allowed_model_dirs: {', '.join(allowed)})"
    )


def _regular(uri: str, rel: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise FailedPrecondition(f"{uri}: {rel or 'it'} is not a regular file nor a folder")


def _mtime(st: os.stat_result) -> str:
    """A local file's version mark, as fsspec's listing gave it (the index keys stay the same)."""
    return json.dumps({"mtime": str(st.st_mtime)}, sort_keys=True)


READ_TIMEOUT_S = 60.0
"""HTTP(S): a download fails when no byte arrives for this long (no bound on its total time)."""


def _storage_options(uri: str) -> dict[str, Any]:
    """fsspec options per scheme: HTTP without aiohttp's default bound of 5 minutes on a whole
    request, which a large model takes longer than; a read that stalls fails instead. (S3:
    botocore's own, a 60 s read timeout and retries.)"""
    if uri.split("://", 1)[0].lower() not in ("http", "https"):
        return {}
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=READ_TIMEOUT_S)
    return {"client_kwargs": {"timeout": timeout}}


def _explain(uri: str, err: Exception) -> ShoalError:
    if isinstance(err, FileNotFoundError):
        return NotFound(f"{uri}: no such object or folder")
    if isinstance(err, PermissionError):
        return PermissionDenied(f"{uri}: access denied ({err})")
    if isinstance(err, ImportError) or (isinstance(err, ValueError) and "protocol" in str(err).lower()):
        return FailedPrecondition(f"{uri}: {err}")
    return Unavailable(f"{uri}: {type(err).__name__}: {err}")


def _index_key(uri: str, entries: list[_Entry]) -> str:
    """The key of this version of ``uri``; "" when an object lists no version mark."""
    if any(not e.version or e.size is None for e in entries):
        return ""
    doc = [uri, [(e.rel, e.size, e.version) for e in entries]]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()


def _download(
    fs: Any,
    uri: str,
    entries: list[_Entry],
    single: bool,
    tmp: Path,
    progress: Progress,
    stop: threading.Event,
    allowed: Sequence[str] = (),
) -> str:
    """Copy ``entries`` under ``tmp``, checking each size; returns the blob's hash. ``fs``
    None: local files (:func:`_local_listing`), each checked against ``allowed`` again as
    it is opened."""
    manifest = []
    # HTTP: a stream (not range requests, which not every server answers). Others: blocks
    # of 8 MiB, so that progress moves in steps that small.
    options = {"block_size": 0} if fs is not None and "http" in fs.protocol else {"block_size": 8 * CHUNK}
    for e in entries:
        dest = tmp / e.rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        count = 0
        try:
            source: BinaryIO = (
                model_dirs.open_inside(e.remote, allowed)
                if fs is None
                else fs.open(e.remote, "rb", **options)
            )
            with source as src, open(dest, "wb") as out:
                while chunk := src.read(CHUNK):
                    if stop.is_set():
                        raise Unavailable(f"{uri}: the download was stopped (the scheduler is shutting down)")
                    out.write(chunk)
                    digest.update(chunk)
                    count += len(chunk)
                    progress.done += len(chunk)
        except model_dirs.OutsideAllowed as err:
            raise _outside(uri, "" if single else e.rel, err.real, allowed) from None
        except ShoalError:
            raise
        except Exception as err:
            raise _explain(uri if single else f"{uri} ({e.rel})", err) from None
        if e.size is not None and count != e.size:
            raise FailedPrecondition(
                f"{uri}: {e.rel} came as {count} bytes, but the source lists {e.size} "
                "(an interrupted download?)"
            )
        manifest.append(f"{digest.hexdigest()}  {e.rel}\n")
    if single:
        return manifest[0].split(" ", 1)[0]
    return hashlib.sha256(
        "".join(sorted(manifest, key=lambda line: line.split("  ", 1)[1])).encode()
    ).hexdigest()


def _place(tmp: Path, final: Path) -> int:
    """Move the verified download ``tmp`` to ``final``: renamed whole, or, when ``final``
    exists (the same content came from another URI), the files it lacks moved in. Returns
    the size of ``final``."""
    if not final.exists():
        os.rename(tmp, final)
    else:
        for path in sorted(tmp.rglob("*")):
            target = final / path.relative_to(tmp)
            if path.is_file() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(path, target)
    return _du(final)

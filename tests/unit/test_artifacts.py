"""The scheduler's artifact cache over file:// URIs: blobs named by their sha256, fetched once
per version of a URI, verified, bounded by a size limit with least-recently-used eviction
that spares what running replicas use."""

from __future__ import annotations

import asyncio
import hashlib
import os
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from shoal.errors import FailedPrecondition, NotFound, PermissionDenied
from shoal.scheduler import artifacts
from shoal.scheduler.artifacts import ArtifactCache

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
async def cache(tmp_path: Path) -> AsyncIterator[ArtifactCache]:
    c = ArtifactCache(tmp_path / "artifacts", limit_bytes=10_000)
    yield c
    await c.aclose()


def write(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path``; its file:// URI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path.as_uri()


def edit_in_place(path: Path, data: bytes) -> None:
    """Change the content but not the size or modification time: what the source lists
    stays the same, so only a fresh download would see the change."""
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


async def test_a_file_is_cached_under_its_sha256_with_its_name(cache: ArtifactCache, tmp_path: Path) -> None:
    uri = write(tmp_path / "src" / "model.joblib", b"weights" * 10)
    lease = await cache.acquire(uri)
    digest = hashlib.sha256(b"weights" * 10).hexdigest()
    assert lease.path == tmp_path / "artifacts" / digest / "model.joblib"
    assert lease.path.read_bytes() == b"weights" * 10
    assert cache.blobs() == [digest]


async def test_a_second_acquire_does_not_download_again_until_the_source_changes(
    cache: ArtifactCache, tmp_path: Path
) -> None:
    src = tmp_path / "src" / "model.bin"
    uri = write(src, b"AAAA")
    first = await cache.acquire(uri)
    edit_in_place(src, b"BBBB")
    second = await cache.acquire(uri)
    assert second.path == first.path and second.path.read_bytes() == b"AAAA"  # not fetched again
    write(src, b"CCCCC")  # another size and time: another version
    third = await cache.acquire(uri)
    assert third.path.read_bytes() == b"CCCCC"


async def test_the_index_survives_a_restart(tmp_path: Path) -> None:
    src = tmp_path / "src" / "model.bin"
    uri = write(src, b"AAAA")
    first = ArtifactCache(tmp_path / "artifacts", limit_bytes=10_000)
    path = (await first.acquire(uri)).path
    await first.aclose()
    edit_in_place(src, b"BBBB")
    again = ArtifactCache(tmp_path / "artifacts", limit_bytes=10_000)
    lease = await again.acquire(uri)
    assert lease.path == path and lease.path.read_bytes() == b"AAAA"
    await again.aclose()


async def test_a_folder_keeps_its_paths(cache: ArtifactCache, tmp_path: Path) -> None:
    write(tmp_path / "code" / "my_model.py", b"class M: pass\n")
    write(tmp_path / "code" / "pkg" / "helper.py", b"X = 1\n")
    lease = await cache.acquire((tmp_path / "code").as_uri())
    assert lease.path.is_dir()
    assert (lease.path / "my_model.py").read_bytes() == b"class M: pass\n"
    assert (lease.path / "pkg" / "helper.py").read_bytes() == b"X = 1\n"
    assert lease.folder == lease.path


async def test_a_sha256_in_the_uri_is_verified(cache: ArtifactCache, tmp_path: Path) -> None:
    uri = write(tmp_path / "m.bin", b"the real content")
    wrong = "0" * 64
    with pytest.raises(FailedPrecondition, match=f"its sha256 is [0-9a-f]{{64}}, not {wrong}"):
        await cache.acquire(f"{uri}#sha256={wrong}")
    assert cache.blobs() == []  # nothing unverified is kept
    right = hashlib.sha256(b"the real content").hexdigest()
    lease = await cache.acquire(f"{uri}#sha256={right}")
    assert lease.blob == right
    (tmp_path / "m.bin").unlink()
    # Cached under that hash: the source is not needed again.
    again = await cache.acquire(f"{uri}#sha256={right}")
    assert again.path.read_bytes() == b"the real content"


async def test_a_missing_object_is_not_found(cache: ArtifactCache, tmp_path: Path) -> None:
    uri = (tmp_path / "nothing.joblib").as_uri()
    with pytest.raises(NotFound, match=r"nothing\.joblib: no such object or folder"):
        await cache.acquire(uri)


async def test_an_object_larger_than_the_cache_is_refused(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "artifacts", limit_bytes=100)
    uri = write(tmp_path / "big.bin", b"x" * 200)
    with pytest.raises(FailedPrecondition, match="more than this scheduler's artifact cache holds"):
        await cache.acquire(uri)
    await cache.aclose()


def du(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != "index.json")


async def test_eviction_keeps_the_folder_under_its_limit_least_recently_used_first(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "artifacts", limit_bytes=3000)
    uris = [write(tmp_path / f"m{i}.bin", bytes([i]) * 1000) for i in range(5)]
    blobs = []
    for uri in uris:
        lease = await cache.acquire(uri)
        blobs.append(lease.blob)
        lease.release()
        assert du(tmp_path / "artifacts") <= 3000
    assert set(cache.blobs()) == set(blobs[2:])  # the three most recently used
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir() if len(p.name) == 64) == sorted(
        blobs[2:]
    )
    await cache.aclose()


async def test_what_a_running_replica_uses_is_never_evicted(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "artifacts", limit_bytes=2000)
    held = await cache.acquire(write(tmp_path / "held.bin", b"h" * 1000))  # the oldest, and kept
    for i in range(3):
        (await cache.acquire(write(tmp_path / f"m{i}.bin", bytes([i]) * 1000))).release()
    assert held.blob in cache.blobs()
    assert held.path.read_bytes() == b"h" * 1000
    assert du(tmp_path / "artifacts") <= 2000
    held.release()
    await cache.aclose()


async def test_concurrent_acquires_of_one_uri_share_one_download(
    cache: ArtifactCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shoal.scheduler import artifacts

    calls = []
    real = artifacts._download

    def counted(*args: object, **kwargs: object) -> str:
        calls.append(args[1])
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(artifacts, "_download", counted)
    uri = write(tmp_path / "m.bin", b"m" * 5000)
    leases = await asyncio.gather(*(cache.acquire(uri) for _ in range(4)))
    assert len(calls) == 1
    assert len({lease.path for lease in leases}) == 1
    # All four hold it: the blob stays while any lease does.
    for lease in leases[:3]:
        lease.release()
    (await cache.acquire(write(tmp_path / "other.bin", b"o" * 6000))).release()
    assert leases[3].blob in cache.blobs()


# ------------------------------------------------------------------ allowed_model_dirs


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """An allowed folder ``models`` holding ``pkg/`` (a module and a link to a module inside
    ``models``), and a folder ``outside`` beside it: (models, outside)."""
    models, outside = tmp_path / "models", tmp_path / "outside"
    write(models / "pkg" / "m.py", b"import evil\n")
    write(models / "shared.py", b"X = 1\n")
    (models / "pkg" / "shared.py").symlink_to(models / "shared.py")
    write(outside / "evil.py", b"print('outside')\n")
    write(outside / "lib" / "more.py", b"print('outside too')\n")
    return models, outside


async def test_a_file_uri_folder_with_a_link_outside_the_allowed_folders_is_refused(
    tmp_path: Path, tree: tuple[Path, Path]
) -> None:
    """The control-plane sweep's finding 3: ``models/pkg/evil.py`` linked to a module
    outside; ``file:///.../models/pkg/`` was copied into the cache, the link followed, and
    the replica imported the copy. Before, both acquires below succeeded."""
    models, outside = tree
    cache = ArtifactCache(tmp_path / "artifacts", limit_bytes=10_000, allowed_dirs=(str(models),))
    try:
        (models / "pkg" / "evil.py").symlink_to(outside / "evil.py")
        with pytest.raises(PermissionDenied, match=r"pkg/: evil\.py leads outside the folders") as err:
            await cache.acquire((models / "pkg").as_uri() + "/")
        assert str(outside) not in err.value.message  # where it leads is the scheduler's log's
        (models / "pkg" / "evil.py").unlink()
        (models / "pkg" / "lib").symlink_to(outside / "lib")  # a folder: a whole tree
        with pytest.raises(PermissionDenied, match=r"lib leads outside the folders"):
            await cache.acquire((models / "pkg").as_uri())
        assert cache.blobs() == [] and list((tmp_path / "artifacts" / "tmp").iterdir()) == []

        # Links that stay inside are followed, and copied as files.
        (models / "pkg" / "lib").unlink()
        lease = await cache.acquire((models / "pkg").as_uri())
        assert sorted(p.name for p in lease.path.iterdir()) == ["m.py", "shared.py"]
        assert not (lease.path / "shared.py").is_symlink()
        assert (lease.path / "shared.py").read_bytes() == b"X = 1\n"
    finally:
        await cache.aclose()
    # Without allowed folders any folder may be named, and its links are followed.
    (models / "pkg" / "evil.py").symlink_to(outside / "evil.py")
    anything = ArtifactCache(tmp_path / "artifacts-2", limit_bytes=10_000)
    try:
        lease = await anything.acquire((models / "pkg").as_uri())
        assert (lease.path / "evil.py").read_bytes() == b"print('outside')\n"
    finally:
        await anything.aclose()


async def test_a_link_changed_after_the_listing_is_caught_as_the_file_is_opened(
    tmp_path: Path, tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    models, outside = tree
    listing = artifacts._local_listing

    def then_swap(uri: str, allowed: Sequence[str]) -> tuple[list[Any], bool]:
        found = listing(uri, allowed)
        (models / "shared.py").unlink()
        (models / "shared.py").symlink_to(outside / "evil.py")
        return found

    monkeypatch.setattr(artifacts, "_local_listing", then_swap)
    cache = ArtifactCache(tmp_path / "artifacts", limit_bytes=10_000, allowed_dirs=(str(models),))
    try:
        with pytest.raises(PermissionDenied, match=r"shared\.py leads outside the folders"):
            await cache.acquire((models / "pkg").as_uri())
        assert cache.blobs() == []
    finally:
        await cache.aclose()


async def test_a_file_uri_is_read_at_the_path_that_was_checked(cache: ArtifactCache, tmp_path: Path) -> None:
    """The path model_dirs.file_uri_path gives, which the head and the scheduler check; fsspec
    read ``file://localhost/p`` as ``/localhost/p`` and ``%20`` as it is."""
    write(tmp_path / "a b" / "model.bin", b"weights")
    lease = await cache.acquire("file://localhost" + urllib.parse.quote(str(tmp_path / "a b" / "model.bin")))
    assert lease.path.read_bytes() == b"weights" and lease.path.name == "model.bin"


async def test_what_a_folder_copy_refuses(cache: ArtifactCache, tmp_path: Path) -> None:
    """A FIFO (the copy would wait on it for good) and a folder reached twice through links
    (a loop, or links that would copy one folder over and over)."""
    write(tmp_path / "fifo" / "model.bin", b"w")
    os.mkfifo(tmp_path / "fifo" / "pipe")
    with pytest.raises(FailedPrecondition, match="pipe is not a regular file"):
        await cache.acquire((tmp_path / "fifo").as_uri())
    write(tmp_path / "loop" / "sub" / "model.bin", b"w")
    (tmp_path / "loop" / "sub" / "up").symlink_to(tmp_path / "loop")
    with pytest.raises(FailedPrecondition, match="sub/up is a link to a folder already copied as the URI"):
        await cache.acquire((tmp_path / "loop").as_uri())

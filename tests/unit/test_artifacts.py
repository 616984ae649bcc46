"""The scheduler's artifact cache over file:// URIs: blobs named by their sha256, fetched once
per version of a URI, verified, bounded by a size limit with least-recently-used eviction
that spares what running replicas use."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shoal.errors import FailedPrecondition, NotFound
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

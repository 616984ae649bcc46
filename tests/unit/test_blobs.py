"""The cluster's artifact store without sockets: packing folders, the head's blob store
(resumable uploads, collection), fetching from peers and the head into the artifact cache."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shoal.config import Settings
from shoal.core.blobs import BlobRef, pack, parse_uri, unpack
from shoal.core.clock import FakeClock
from shoal.core.model_dirs import check_deployable
from shoal.core.spec import parse_spec
from shoal.errors import (
    FailedPrecondition,
    InvalidArgument,
    LimitReached,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from shoal.head.blobs import BlobStore, in_use
from shoal.head.node import HeadNode
from shoal.scheduler.artifacts import ArtifactCache
from shoal.scheduler.blob_fetch import HEAD, Located, fetch
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers

pytestmark = pytest.mark.timeout(10)


def make_folder(root: Path, mtime: int) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "model.py").write_text("class M: pass\n")
    (root / "sub" / "weights.bin").write_bytes(b"\x00\x01" * 5000)
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "model.cpython-311.pyc").write_bytes(os.urandom(64))
    for path in [root, *root.rglob("*")]:
        os.utime(path, (mtime, mtime))
    return root


# ------------------------------------------------------------------ packing


def test_a_folder_packs_to_the_same_hash_wherever_it_lies_and_whenever_it_was_written(tmp_path: Path) -> None:
    a = pack(make_folder(tmp_path / "a" / "model", mtime=1_000_000))
    b = pack(make_folder(tmp_path / "b" / "model", mtime=2_000_000))
    try:
        assert a.ref.folder and a.ref.name == "model"
        assert a.ref.sha256 == b.ref.sha256 == hashlib.sha256(a.path.read_bytes()).hexdigest()
        (tmp_path / "b" / "model" / "sub" / "weights.bin").write_bytes(b"\x00\x02" * 5000)
        c = pack(tmp_path / "b" / "model")
        assert c.ref.sha256 != a.ref.sha256
        c.discard()
        out = tmp_path / "out"
        unpack(a.path, out)
        assert (out / "sub" / "weights.bin").read_bytes() == b"\x00\x01" * 5000
        assert os.access(out / "run.sh", os.X_OK) and not os.access(out / "model.py", os.X_OK)
        assert not (out / "__pycache__").exists()
    finally:
        a.discard()
        b.discard()
    assert not a.path.exists()


def test_a_file_is_its_own_blob(tmp_path: Path) -> None:
    (tmp_path / "m.joblib").write_bytes(b"pickle")
    packed = pack(tmp_path / "m.joblib")
    assert packed.path == tmp_path / "m.joblib" and not packed.temporary
    assert packed.ref == BlobRef(hashlib.sha256(b"pickle").hexdigest(), "m.joblib", False)
    assert parse_uri(packed.ref.uri) == packed.ref
    with pytest.raises(InvalidArgument, match="neither a file nor a folder"):
        pack(tmp_path / "missing")


def test_a_blob_uri_in_a_spec_is_checked() -> None:
    good = "blob://sha256:" + "a" * 64 + "/code/"
    spec = parse_spec({"name": "p", "backend": "python", "model": "m:M", "base_dir": good})
    assert spec.artifact_uri() == good
    with pytest.raises(InvalidArgument, match="no blob URI"):
        parse_spec({"name": "s", "backend": "sklearn", "model": "blob://sha256:abc/m.joblib"})


def test_with_model_folders_confined_uploaded_models_need_blob_listed_in_allowed_model_uris(
    tmp_path: Path,
) -> None:
    spec = parse_spec({"name": "m", "backend": "sklearn", "model": "blob://sha256:" + "a" * 64 + "/m.joblib"})
    check_deployable(spec, [], [])
    with pytest.raises(
        InvalidArgument, match="list the URI prefixes models may come from in allowed_model_uris"
    ):
        check_deployable(spec, [str(tmp_path)], [])
    with pytest.raises(InvalidArgument, match="outside the URIs models may come from"):
        check_deployable(spec, [str(tmp_path)], ["s3://models/"])
    check_deployable(spec, [str(tmp_path)], ["blob://"])


# ------------------------------------------------------------------ the head's store


async def chunks_of(data: bytes, size: int = 1000, fail_after: int = -1) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        if i == fail_after:
            raise ConnectionResetError("the stream dropped")
        yield data[i : i + size]


DATA = os.urandom(10_000)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs", max_bytes=1_000_000, grace_s=100.0)


async def test_a_dropped_upload_resumes_at_the_offset_the_head_kept(store: BlobStore) -> None:
    with pytest.raises(ConnectionResetError):
        await store.receive(SHA, len(DATA), 0, chunks_of(DATA, fail_after=4000))
    info = store.stat(SHA)
    assert (info.complete, info.have, info.size) == (False, 4000, len(DATA))
    with pytest.raises(InvalidArgument, match="starts at offset 5000, but the head has 4000 bytes of it"):
        await store.receive(SHA, len(DATA), 5000, chunks_of(DATA[5000:]))
    with pytest.raises(ConnectionResetError):  # from the start again: what the head has is skipped
        await store.receive(SHA, len(DATA), 0, chunks_of(DATA, size=1500, fail_after=6000))
    assert store.stat(SHA).have == 6000
    done = await store.receive(SHA, len(DATA), 6000, chunks_of(DATA[6000:]))
    assert done.complete and store.stat(SHA).complete
    assert b"".join([c async for c in store.read(SHA, 9000)]) == DATA[9000:]


async def test_a_dropped_upload_that_announced_a_wrong_size_does_not_keep_the_right_one_out(
    store: BlobStore,
) -> None:
    """It used to: every later upload of the blob was refused ('was announced as N bytes,
    not M') until the partial upload was collected, blob_grace_s (an hour) later."""
    with pytest.raises(ConnectionResetError):  # announced 1,000 bytes too many, then dropped
        await store.receive(SHA, len(DATA) + 1000, 0, chunks_of(DATA, fail_after=4000))
    done = await store.receive(SHA, len(DATA), 4000, chunks_of(DATA[4000:]))
    assert done.complete and b"".join([c async for c in store.read(SHA, 0)]) == DATA

    other = b"other bytes" * 100
    sha = hashlib.sha256(other).hexdigest()
    with pytest.raises(ConnectionResetError):  # announced far more than the blob, and sent past its end
        await store.receive(sha, 10 * len(other), 0, chunks_of(other * 3, fail_after=2000))
    with pytest.raises(Unavailable, match="upload it again from the start"):
        await store.receive(sha, len(other), 0, chunks_of(other))
    assert store.stat(sha).have == 0
    assert (await store.receive(sha, len(other), 0, chunks_of(other))).complete


async def test_the_head_refuses_a_wrong_hash_a_size_over_its_limit_and_an_unknown_blob(
    store: BlobStore,
) -> None:
    wrong = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(InvalidArgument, match=f"hash to sha256:{SHA}, not sha256:{wrong}"):
        await store.receive(wrong, len(DATA), 0, chunks_of(DATA))
    assert store.stat(wrong).have == 0  # the bad bytes are gone: a new upload starts over
    with pytest.raises(InvalidArgument, match="at most 0 MB"):
        await store.receive(SHA, 2_000_000, 0, chunks_of(DATA))
    with pytest.raises(InvalidArgument, match="more than its 10 bytes"):
        await store.receive(SHA, 10, 0, chunks_of(DATA))
    with pytest.raises(InvalidArgument, match="64 lowercase hex"):
        store.stat("../etc")
    with pytest.raises(NotFound):
        [c async for c in store.read(wrong, 0)]
    spec = parse_spec({"name": "m", "backend": "sklearn", "model": f"blob://sha256:{wrong}/m.joblib"})
    with pytest.raises(InvalidArgument, match="names a blob this head does not have"):
        store.check_named(spec)


async def test_the_head_refuses_an_upload_past_its_total_of_blobs_or_into_its_last_free_disk(
    tmp_path: Path,
) -> None:
    """Each blob was bounded (max_blob_mb), their number was not: a deploy token could fill
    the head's disk with blobs no deployment names (kept for blob_grace_s, an hour), and
    then every change to the state file beside them failed. The whole blobs and the
    uploads in progress count; what is refused keeps nothing."""
    store = BlobStore(tmp_path / "blobs", max_bytes=1_000_000, grace_s=100.0, max_total=25_000)
    blobs = [os.urandom(10_000) for _ in range(3)]
    shas = [hashlib.sha256(b).hexdigest() for b in blobs]
    assert (await store.receive(shas[0], 10_000, 0, chunks_of(blobs[0]))).complete
    with pytest.raises(ConnectionResetError):  # dropped: its 10,000 bytes stay reserved
        await store.receive(shas[1], 10_000, 0, chunks_of(blobs[1], fail_after=2000))
    with pytest.raises(ResourceExhausted, match=r"holds 20000 bytes of blobs .* max_blobs_mb"):
        await store.admit(shas[2], 10_000)  # a Stat naming the size: before a byte is sent
    with pytest.raises(ResourceExhausted, match=r"holds 20000 bytes of blobs .* max_blobs_mb"):
        await store.receive(shas[2], 10_000, 0, chunks_of(blobs[2]))
    assert store.stat(shas[2]).have == 0
    await store.admit(shas[2], 5_000)  # what would fit passes, as do the blobs held
    await store.admit(shas[1], 10_000)
    await store.admit(shas[0], 10_000)
    # The dropped one continues, and one already whole is taken again as ever.
    assert (await store.receive(shas[1], 10_000, 2000, chunks_of(blobs[1][2000:]))).complete
    assert (await store.receive(shas[0], 10_000, 0, chunks_of(blobs[0]))).complete

    full = BlobStore(tmp_path / "full", max_bytes=1_000_000, grace_s=100.0, keep_free=2**62)
    with pytest.raises(ResourceExhausted, match=r"would leave less than .* free on the disk"):
        await full.admit(shas[2], 10_000)
    with pytest.raises(ResourceExhausted, match=r"would leave less than .* free on the disk"):
        await full.receive(shas[2], 10_000, 0, chunks_of(blobs[2]))
    assert full.stat(shas[2]).have == 0


async def test_the_head_refuses_an_upload_past_its_number_of_blobs_and_forgets_what_it_refused(
    tmp_path: Path,
) -> None:
    """Bytes were bounded (max_blobs_mb, at the size each upload announced), the number of
    blobs was not: an upload announcing 1 byte and sending none kept a file under
    ``partial/`` each, until blob_grace_s (3,000 such: 3,000 files, each upload's admission
    1.8 ms at first and 16 ms at the end). Whole blobs and uploads in progress or dropped count."""
    store = BlobStore(tmp_path / "blobs", max_bytes=1_000_000, grace_s=100.0, max_count=3)
    blobs = [os.urandom(100) for _ in range(4)]
    shas = [hashlib.sha256(b).hexdigest() for b in blobs]
    assert (await store.receive(shas[0], 100, 0, chunks_of(blobs[0]))).complete
    assert not (await store.receive(shas[1], 100, 0, chunks_of(b""))).complete  # announced, none sent
    with pytest.raises(ConnectionResetError):  # dropped after 10 bytes
        await store.receive(shas[2], 100, 0, chunks_of(blobs[2], size=10, fail_after=10))
    strangers = [secrets.token_hex(32) for _ in range(5)]
    for sha in strangers:
        with pytest.raises(LimitReached) as refused:
            await store.receive(sha, 1, 0, chunks_of(b""))
    assert str(refused.value) == (
        f"the head holds 3 blobs (whole, and uploads in progress or dropped), its limit (setting "
        f"max_blobs): blob sha256:{strangers[-1]} was not taken; delete the deployments that name old "
        "ones (their blobs go blob_grace_s later, and a dropped upload blob_grace_s after its last "
        "byte), or raise max_blobs"
    )
    assert refused.value.http_status == 409
    assert sorted(p.name for p in (tmp_path / "blobs" / "partial").iterdir()) == sorted(shas[1:3])
    assert not store._locks and not store._lock_users  # nothing kept of what was refused

    # The blobs it holds are taken as ever: one whole again, the partial ones continued.
    assert (await store.receive(shas[0], 100, 0, chunks_of(blobs[0]))).complete
    assert (await store.receive(shas[1], 100, 0, chunks_of(blobs[1]))).complete
    assert (await store.receive(shas[2], 100, 10, chunks_of(blobs[2][10:]))).complete
    # One collected (named by no deployment for blob_grace_s) makes room.
    assert (await store.collect({shas[0], shas[1]}, time.time() + 50)) == []
    with pytest.raises(LimitReached):
        await store.receive(shas[3], 100, 0, chunks_of(blobs[3]))
    assert await store.collect({shas[0], shas[1]}, time.time() + 150) == [shas[2]]
    assert (await store.receive(shas[3], 100, 0, chunks_of(blobs[3]))).complete


async def test_blobs_no_deployment_or_kept_revision_names_are_collected_after_the_grace(
    store: BlobStore, tmp_path: Path
) -> None:
    other = os.urandom(100)
    other_sha = hashlib.sha256(other).hexdigest()
    await store.receive(SHA, len(DATA), 0, chunks_of(DATA))
    await store.receive(other_sha, len(other), 0, chunks_of(other))
    with pytest.raises(ConnectionResetError):
        await store.receive(SHA[::-1], 5000, 0, chunks_of(DATA[:5000], fail_after=1000))
    now = os.path.getmtime(tmp_path / "blobs" / SHA)

    # A head with a deployment whose two revisions name the two blobs.
    node = HeadNode(Settings(), MemoryStore(), FakeSchedulers(), FakeClock())
    node.blobs = store
    spec = {"name": "m", "backend": "sklearn", "model": f"blob://sha256:{SHA}/m.joblib"}
    await node.apply(parse_spec(spec))
    await node.apply(parse_spec({**spec, "model": f"blob://sha256:{other_sha}/m.joblib"}))
    assert in_use(node) == {SHA, other_sha}

    assert await store.collect(set(), now + 50) == []  # within the grace
    assert await store.collect(in_use(node), now + 150) == []  # named: kept
    assert not (tmp_path / "blobs" / "partial" / SHA[::-1]).exists()  # an idle partial upload is not

    await node.delete("m")
    assert in_use(node) == set()
    assert await store.collect(set(), now + 200) == []  # its grace starts again from when it was named
    assert sorted(await store.collect(set(), now + 251)) == sorted([SHA, other_sha])
    assert not store.stat(SHA).complete
    await node.aclose()


# ------------------------------------------------------------------ fetching


class FakeSource:
    """The head and peers, each with the blob's bytes; a source may fail after some bytes."""

    def __init__(self, data: bytes, holders: list[str]) -> None:
        self.data = data
        self.holders = holders
        self.fail_after: dict[str, int] = {}
        self.calls: list[tuple[str, int]] = []
        self.head_has = True
        self.held: list[str] = []
        self.head_down = 0  # the head fails this many more locates (and downloads meanwhile)
        self.damaged: dict[str, bytes] = {}  # address -> its copy, sent once and found damaged
        self.stalls: set[str] = set()  # sends nothing, its stream open (a stopped process)
        self.broken: set[str] = set()  # fails every download at once
        self.fetching_back = 0  # the head says this many more times it fetches back its lost copy

    async def locate(self, sha256: str) -> Located:
        if self.head_down:
            self.head_down -= 1
            raise Unavailable("the head is down")
        if not self.head_has:
            raise NotFound(f"the head has no blob sha256:{sha256}")
        if self.fetching_back:
            self.fetching_back -= 1
            return Located(0, ["holder:9"], fetching_back=True)
        return Located(len(self.data), list(self.holders))

    async def hold(self, sha256: str) -> None:
        self.held.append(sha256)

    async def release(self, sha256: str) -> None:
        self.held.remove(sha256)

    async def download(self, address: str, sha256: str, offset: int) -> AsyncIterator[bytes]:
        self.calls.append((address, offset))
        if address == HEAD and self.head_down:
            raise Unavailable("the head is down")
        if address in self.stalls:
            await asyncio.Event().wait()
        if address in self.broken:
            raise Unavailable(f"{address or 'head'} is broken")
        if (damaged := self.damaged.pop(address, None)) is not None:
            for i in range(offset, len(damaged) - 1000, 1000):
                yield damaged[i : i + 1000]  # all but the last chunk, held back for the hash check
            raise NotFound(f"{address or 'the head'}'s copy was damaged and is deleted")
        stop = self.fail_after.pop(address, len(self.data))
        for i in range(offset, len(self.data), 1000):
            if i >= stop:
                raise Unavailable(f"{address or 'head'} died")
            yield self.data[i : i + 1000]


async def fetch_into(
    source: FakeSource, dest: Path, sha: str = SHA, *, give_up_s: float = 5, idle_s: float = 5
) -> list[int]:
    admitted: list[int] = []

    async def admit(size: int) -> None:
        admitted.append(size)

    await fetch(
        source,
        BlobRef(sha, "m.bin", False),
        dest,
        admit=admit,
        on_bytes=lambda done, total: None,
        stop=threading.Event(),
        give_up_s=give_up_s,
        idle_s=idle_s,
        retry_s=0.01,
    )
    return admitted


async def test_a_fetch_continues_from_the_head_where_a_dying_peer_stopped(tmp_path: Path) -> None:
    source = FakeSource(DATA, holders=["peer:1"])
    source.fail_after["peer:1"] = 6000
    assert await fetch_into(source, tmp_path / "m.bin") == [len(DATA)]
    assert (tmp_path / "m.bin").read_bytes() == DATA
    assert source.calls == [("peer:1", 0), (HEAD, 6000)]
    assert source.held == [SHA]  # the head now lists this scheduler for its peers


async def test_a_fetch_waits_for_a_head_that_died_mid_download_and_resumes(tmp_path: Path) -> None:
    source = FakeSource(DATA, holders=[])
    source.fail_after[HEAD] = 3000
    source.head_down = 3
    await fetch_into(source, tmp_path / "m.bin")
    assert (tmp_path / "m.bin").read_bytes() == DATA
    assert source.calls[0] == (HEAD, 0) and source.calls[-1] == (HEAD, 3000)


async def test_a_fetch_leaves_a_peer_that_stalls_for_the_next_source(tmp_path: Path) -> None:
    """A peer that sends nothing, its connection open (a stopped process), used to hold the
    fetch for ever (the head's mirror had an idle bound; a scheduler's fetch had none)."""
    source = FakeSource(DATA, holders=["peer:1"])
    source.stalls.add("peer:1")
    async with asyncio.timeout(5):
        await fetch_into(source, tmp_path / "m.bin", idle_s=0.2)
    assert (tmp_path / "m.bin").read_bytes() == DATA
    assert source.calls == [("peer:1", 0), (HEAD, 0)]


async def test_a_fetch_that_gives_up_names_each_source_tried_and_why_it_failed(tmp_path: Path) -> None:
    source = FakeSource(DATA, holders=["peer:1", "peer:2"])
    source.stalls.add("peer:1")
    source.broken.update(["peer:2", HEAD])
    with pytest.raises(Unavailable) as failed:
        async with asyncio.timeout(5):
            await fetch_into(source, tmp_path / "m.bin", give_up_s=0.3, idle_s=0.1)
    message = str(failed.value)
    assert "no source sent a byte for 0.3s; tried " in message
    assert "peer:1 (failed at byte 0: peer:1 sent no byte for 0.1s)" in message
    assert "peer:2 (failed at byte 0: peer:2 is broken)" in message
    assert "the head (failed at byte 0: head is broken)" in message


async def test_a_fetch_waiting_for_the_head_to_fetch_a_lost_blob_back_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It used to download from the head each round (which has no copy yet) and log a
    warning each time, every 2 s: now it waits, says so once (info), warns when it gives up."""
    source = FakeSource(DATA, holders=[])
    source.fetching_back = 6
    with caplog.at_level(logging.INFO, logger="shoal.scheduler"):
        assert await fetch_into(source, tmp_path / "m.bin") == [len(DATA)]
    assert (tmp_path / "m.bin").read_bytes() == DATA
    assert source.calls == [(HEAD, 0)]  # not before the head had it back
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in said] == [logging.INFO]
    assert "waiting for the head to fetch it back (it lost its copy)" in said[0][1]

    caplog.clear()
    source = FakeSource(DATA, holders=[])
    source.fetching_back = 10**6
    with caplog.at_level(logging.INFO, logger="shoal.scheduler"), pytest.raises(Unavailable) as failed:
        await fetch_into(source, tmp_path / "m.bin", give_up_s=0.3)
    assert "tried the head (it was fetching the blob back from a scheduler holding it)" in str(failed.value)
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.WARNING]
    assert source.calls == []


async def test_a_fetch_drops_the_bytes_of_a_source_that_found_its_copy_damaged(tmp_path: Path) -> None:
    """The head sends a damaged copy but its last chunk, then ends NotFound (it checks the
    hash as it serves, and deletes it). The fetch used to continue after those bytes from
    the next source, and fail its hash check at the end: now it drops them."""
    source = FakeSource(DATA, holders=["peer:1"])
    source.fail_after["peer:1"] = 0
    source.damaged[HEAD] = DATA[:3000] + bytes([DATA[3000] ^ 0xFF]) + DATA[3001:]
    await fetch_into(source, tmp_path / "m.bin")
    assert (tmp_path / "m.bin").read_bytes() == DATA
    assert source.calls[:2] == [("peer:1", 0), (HEAD, 0)] and source.calls[-1][1] == 0


async def test_a_fetch_fails_clearly_for_a_blob_the_head_lacks_or_bytes_that_are_not_it(
    tmp_path: Path,
) -> None:
    source = FakeSource(DATA, holders=[])
    source.head_has = False
    with pytest.raises(FailedPrecondition, match="the head has no blob"):
        await fetch_into(source, tmp_path / "m.bin")
    source = FakeSource(DATA, holders=[])
    with pytest.raises(FailedPrecondition, match="the bytes fetched hash to"):
        await fetch_into(source, tmp_path / "m.bin", sha="0" * 64)


async def test_the_artifact_cache_unpacks_a_folder_blob_and_serves_its_tar_to_peers(tmp_path: Path) -> None:
    packed = pack(make_folder(tmp_path / "src" / "code", mtime=1))
    source = FakeSource(packed.path.read_bytes(), holders=[])
    cache = ArtifactCache(tmp_path / "artifacts", limit_bytes=10_000_000)
    cache.blob_source = source
    try:
        lease = await cache.acquire(packed.ref.uri)
        assert lease.path == tmp_path / "artifacts" / packed.ref.sha256 / "code"
        assert (lease.path / "sub" / "weights.bin").read_bytes() == b"\x00\x01" * 5000
        served = cache.blob_file(packed.ref.sha256)
        assert served is not None and served.read_bytes() == packed.path.read_bytes()
        again = await cache.acquire(packed.ref.uri)  # cached: not fetched again
        assert again.path == lease.path and len(source.calls) == 1
        assert cache.blob_file("f" * 64) is None
    finally:
        await cache.aclose()
        packed.discard()

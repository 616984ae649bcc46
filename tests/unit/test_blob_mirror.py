"""Standby heads keep a copy of every blob (shoal.head.blob_mirror), the leader's upload
waits for one, a single head fetches back a blob it lost, and a scheduler tells each head
it registers with which blobs it holds.

No sockets: a MemoryStore for the shared store, BlobStores on tmp folders, fake peers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from shoal.errors import NotFound, Unavailable
from shoal.head import blobs as blobs_module
from shoal.head.blob_mirror import INDEX, BlobMirror
from shoal.head.blobs import BlobStore, standby_holder
from shoal.scheduler import blob_fetch
from shoal.scheduler.blob_fetch import Announcer, Located
from shoal.store import MemoryStore
from shoal.testing.wait import until

pytestmark = pytest.mark.timeout(10)

DATA = os.urandom(10_000)
SHA = hashlib.sha256(DATA).hexdigest()
ME = standby_holder("standby:1")


async def chunks_of(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 1000):
        yield data[i : i + 1000]


class FakePeers:
    """The leader's and schedulers' blobs by address; what the standby told the leader."""

    def __init__(self) -> None:
        self.blobs: dict[str, dict[str, bytes]] = {}
        self.fail_after: dict[str, int] = {}  # address -> the stream drops at this byte
        self.stall: set[str] = set()  # addresses that answer and then send nothing
        self.calls: list[tuple[str, int, bool]] = []
        self.hellos: list[str] = []
        self.held: list[tuple[str, str]] = []

    async def hello(self, leader: str) -> None:
        self.hellos.append(leader)

    async def hold(self, leader: str, sha256: str) -> None:
        self.held.append((leader, sha256))

    async def download(self, address: str, sha256: str, offset: int, *, head: bool) -> AsyncIterator[bytes]:
        self.calls.append((address, offset, head))
        data = self.blobs.get(address, {}).get(sha256)
        if data is None:
            raise NotFound(f"{address} has no blob sha256:{sha256}")
        stop = self.fail_after.pop(address, len(data))
        if address in self.stall:
            await asyncio.sleep(3600)
        for i in range(offset, len(data), 1000):
            if i >= stop:
                raise Unavailable(f"{address} died")
            yield data[i : i + 1000]


class Head:
    """One head's view for a mirror: whether it leads, whom it follows, what it names."""

    def __init__(self) -> None:
        self.leading = False
        self.leader: str | None = "leader:1"
        self.named: set[str] = set()
        self.holders: dict[str, list[str]] = {}

    def mirror(self, blobs: BlobStore, store: MemoryStore, peers: FakePeers) -> BlobMirror:
        return BlobMirror(
            blobs,
            store,
            peers,
            leading=lambda: self.leading,
            leader=lambda: None if self.leading else self.leader,
            named=lambda: self.named,
            holders=lambda sha256: list(self.holders.get(sha256, [])),
            settle_s=0,
        )


def blob_store(root: Path, max_bytes: int = 1_000_000) -> BlobStore:
    return BlobStore(root, max_bytes=max_bytes, grace_s=100.0)


async def test_the_leader_lists_what_it_holds_and_a_standby_copies_it_resuming_and_tells_the_leader(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    leader_blobs = blob_store(tmp_path / "leader")
    await leader_blobs.receive(SHA, len(DATA), 0, chunks_of(DATA))
    leader = Head()
    leader.leading = True
    await leader.mirror(leader_blobs, store, FakePeers()).run_pass()
    assert [(e.key, json.loads(e.value)) for e in await store.list(INDEX)] == [
        (INDEX + SHA, {"size": len(DATA)})
    ]

    peers = FakePeers()
    peers.blobs["leader:1"] = {SHA: DATA}
    peers.fail_after["leader:1"] = 4000
    standby_blobs = blob_store(tmp_path / "standby")
    mirror = Head().mirror(standby_blobs, store, peers)
    await mirror.run_pass()  # the stream drops at byte 4000
    await mirror.settle()
    assert standby_blobs.stat(SHA).have == 4000 and not standby_blobs.stat(SHA).complete
    mirror._failures.clear()  # skip the pause before the next try
    await mirror.run_pass()
    await mirror.settle()
    assert (tmp_path / "standby" / SHA).read_bytes() == DATA
    assert peers.calls == [("leader:1", 0, True), ("leader:1", 4000, True)]
    assert ("leader:1", SHA) in peers.held and peers.hellos
    assert mirror.listed() == {SHA}  # what a standby keeps from collection


async def test_a_standby_keeps_no_bytes_that_are_not_the_blob_and_skips_one_over_its_limit(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    big = "b" * 64
    await store.put(INDEX + SHA, json.dumps({"size": len(DATA)}))
    await store.put(INDEX + big, json.dumps({"size": 2_000_000}))
    await store.put(INDEX + "not-a-hash", "{}")
    peers = FakePeers()
    # The last byte changed (not set to one value: DATA is random, and ends in that value
    # one run in 256, as one run of make test found).
    peers.blobs["leader:1"] = {SHA: DATA[:-1] + bytes([DATA[-1] ^ 0xFF])}
    standby_blobs = blob_store(tmp_path / "standby")
    mirror = Head().mirror(standby_blobs, store, peers)
    await mirror.run_pass()
    await mirror.settle()
    assert not standby_blobs.stat(SHA).complete and standby_blobs.stat(SHA).have == 0
    assert [c[0] for c in peers.calls] == ["leader:1"]  # never asked for the big one
    assert peers.held == [] and mirror._failures[SHA][0] == 1


async def test_after_a_takeover_the_leader_fetches_a_listed_blob_from_a_scheduler_and_drops_dead_entries(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    dead = "d" * 64  # listed, held by nobody, named by nothing: collected, or never acknowledged
    await store.put(INDEX + SHA, json.dumps({"size": len(DATA)}))
    await store.put(INDEX + dead, json.dumps({"size": 10}))
    peers = FakePeers()
    peers.blobs["sched:2"] = {SHA: DATA}
    head = Head()
    head.leading = True
    head.named = {SHA}
    head.holders = {SHA: ["sched:1", "sched:2"]}
    peers.blobs["sched:1"] = {}
    blobs = blob_store(tmp_path / "new-leader")
    mirror = head.mirror(blobs, store, peers)
    await mirror.run_pass()
    await mirror.settle()
    assert (tmp_path / "new-leader" / SHA).read_bytes() == DATA
    assert {c[0] for c in peers.calls} <= {"sched:1", "sched:2"} and not any(c[2] for c in peers.calls)
    assert [e.key for e in await store.list(INDEX)] == [INDEX + SHA]
    assert peers.hellos == []  # a leader tells nobody


async def test_a_new_leader_fetches_from_a_standby_that_holds_a_blob_and_waits_before_dropping_entries(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    dead = "d" * 64
    await store.put(INDEX + SHA, json.dumps({"size": len(DATA)}))
    await store.put(INDEX + dead, json.dumps({"size": 10}))
    peers = FakePeers()
    peers.blobs["standby:3"] = {SHA: DATA}  # another standby, which told this head it has it
    blobs = blob_store(tmp_path / "new-leader")
    blobs.add_holder(SHA, standby_holder("standby:3"))
    mirror = BlobMirror(
        blobs,
        store,
        peers,
        leading=lambda: True,
        leader=lambda: None,
        named=set,
        holders=lambda sha256: [],
        settle_s=3600,
    )
    await mirror.run_pass()
    await mirror.settle()
    assert (tmp_path / "new-leader" / SHA).read_bytes() == DATA
    assert peers.calls == [("standby:3", 0, True)]
    # Led too briefly for every holder to have spoken: nothing is dropped yet.
    assert {e.key for e in await store.list(INDEX)} == {INDEX + SHA, INDEX + dead}


async def test_an_upload_waits_for_a_live_standby_copy_and_not_without_standbys(tmp_path: Path) -> None:
    blobs = blob_store(tmp_path / "leader")
    await blobs.receive(SHA, len(DATA), 0, chunks_of(DATA))
    assert await blobs.wait_for_standby(SHA, 5)  # no standby said it is there
    blobs.standby_seen(ME)
    assert not await blobs.wait_for_standby(SHA, 0.05)
    waiting = asyncio.ensure_future(blobs.wait_for_standby(SHA, 5))
    await asyncio.sleep(0)
    assert not waiting.done()
    blobs.add_holder(SHA, ME)
    assert await waiting


async def test_a_blob_being_read_is_not_collected(tmp_path: Path) -> None:
    blobs = blob_store(tmp_path / "leader")
    await blobs.receive(SHA, len(DATA), 0, chunks_of(DATA))
    reading = blobs.read(SHA, 0)
    first = await anext(reading)
    assert await blobs.collect(set(), now=1e12) == []  # unnamed for ages, but a standby reads it
    rest = b"".join([c async for c in reading])
    assert first + rest == DATA
    assert await blobs.collect(set(), now=1e12) == [SHA]


def single_head(
    blobs: BlobStore,
    store: MemoryStore,
    peers: FakePeers,
    holders: list[str],
    gone: Callable[[str, str], None] = lambda sha256, address: None,
) -> BlobMirror:
    """The mirror of a head without standbys (the SQLite store): it leads, always."""
    return BlobMirror(
        blobs,
        store,
        peers,
        leading=lambda: True,
        leader=lambda: None,
        named=lambda: {SHA},
        holders=lambda sha256: list(holders),
        every_s=3600,  # passes only when woken
        idle_s=0.2,
        gone=gone,
    )


async def test_a_single_head_fetches_back_a_blob_damaged_on_its_disk_from_a_scheduler_holding_it(
    tmp_path: Path,
) -> None:
    """The damaged copy is deleted as it is served (commit 6281c05); the head used to wait
    for a new upload of it. Now the read that found it wakes the mirror, which fetches the
    blob back from a scheduler holding it."""
    store = MemoryStore()
    blobs = blob_store(tmp_path / "head")
    await blobs.receive(SHA, len(DATA), 0, chunks_of(DATA))
    peers = FakePeers()
    peers.blobs["sched:1"] = {SHA: DATA}
    mirror = single_head(blobs, store, peers, ["sched:1"])
    await mirror.run_pass()  # lists the blob, with its size
    assert [e.key for e in await store.list(INDEX)] == [INDEX + SHA]
    path = tmp_path / "head" / SHA
    path.write_bytes(DATA[:-1] + bytes([DATA[-1] ^ 0xFF]))
    mirror.start()
    try:
        with pytest.raises(NotFound, match=r"damaged on its disk .* fetches it back from a scheduler"):
            async for _ in blobs.read(SHA, 0):
                pass
        async with asyncio.timeout(5):
            while not blobs.stat(SHA).complete:
                await asyncio.sleep(0.01)
        assert path.read_bytes() == DATA
        assert peers.calls == [("sched:1", 0, False)]
    finally:
        await mirror.aclose()


async def test_a_fetch_back_leaves_a_scheduler_that_stalls_or_sends_more_than_the_recorded_size(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    await store.put(INDEX + SHA, json.dumps({"size": len(DATA)}))
    peers = FakePeers()
    peers.blobs = {"long:1": {SHA: DATA + b"x" * 1000}, "stalls:1": {SHA: DATA}, "good:1": {SHA: DATA}}
    peers.stall.add("stalls:1")
    blobs = blob_store(tmp_path / "head")
    mirror = single_head(blobs, store, peers, ["long:1", "stalls:1"])
    async with asyncio.timeout(5):
        await mirror.run_pass()
        await mirror.settle()
    assert not blobs.stat(SHA).complete and mirror._failures[SHA][0] == 1
    assert sorted(c[0] for c in peers.calls) == ["long:1", "stalls:1"]

    mirror = single_head(blobs, store, peers, ["good:1"])
    await mirror.run_pass()
    await mirror.settle()
    assert (tmp_path / "head" / SHA).read_bytes() == DATA


async def test_a_fetch_back_drops_a_holder_that_answers_it_has_no_such_blob(tmp_path: Path) -> None:
    """Its eviction went unheard (the head was away): it stayed listed, and schedulers
    waited for a fetch back from it until they gave up."""
    store = MemoryStore()
    await store.put(INDEX + SHA, json.dumps({"size": len(DATA)}))
    peers = FakePeers()
    peers.blobs = {"evicted:1": {}, "stalls:1": {SHA: DATA}}
    peers.stall.add("stalls:1")
    gone: list[tuple[str, str]] = []
    mirror = single_head(
        blob_store(tmp_path / "head"), store, peers, ["evicted:1", "stalls:1"], lambda *g: gone.append(g)
    )
    await mirror.run_pass()
    await mirror.settle()
    assert gone == [(SHA, "evicted:1")]  # not the one that stalled: it may come back


class FakeHead:
    """Records each hold and release; ``attempts`` counts the tries, failed ones too."""

    def __init__(self) -> None:
        self.held: list[str] = []
        self.released: list[str] = []
        self.attempts = 0
        self.down = False
        self.called = asyncio.Condition()

    async def locate(self, sha256: str) -> Located:
        raise AssertionError("not asked")

    async def hold(self, sha256: str) -> None:
        await self._attempt()
        self.held.append(sha256)

    async def release(self, sha256: str) -> None:
        await self._attempt()
        self.released.append(sha256)

    async def _attempt(self) -> None:
        async with self.called:
            self.attempts += 1
            self.called.notify_all()
        if self.down:
            raise Unavailable("the head is down")

    def download(self, address: str, sha256: str, offset: int) -> AsyncIterator[bytes]:
        raise AssertionError("not asked")

    async def wait_attempts(self, n: int) -> None:
        async with asyncio.timeout(5), self.called:
            await self.called.wait_for(lambda: self.attempts >= n)


async def test_a_scheduler_tells_each_head_it_registers_with_every_blob_it_holds() -> None:
    head = FakeHead()
    cache = ["a" * 64, "b" * 64]
    announcer = Announcer(head, lambda: cache)
    try:
        announcer.registered()
        await head.wait_attempts(2)
        assert head.held == cache
        head.down = True
        announcer.registered()  # the head fails: the round ends at its first blob
        await head.wait_attempts(3)
        head.down = False
        announcer.registered()  # registered again (a new leader): told again, all of them
        await head.wait_attempts(5)
        assert head.held == cache + cache and head.attempts == 5
    finally:
        await announcer.aclose()


async def test_a_scheduler_tells_the_head_each_blob_its_cache_evicts_keeping_a_bounded_backlog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The head used to list a scheduler as a holder of a blob for ever once it had fetched
    it, evicted or not."""
    monkeypatch.setattr(blob_fetch, "MAX_RELEASES", 3)
    head = FakeHead()
    cache = ["c" * 64]
    announcer = Announcer(head, lambda: cache)
    try:
        announcer.released(["a" * 64, "c" * 64])  # c was fetched again meanwhile: not told
        await until(lambda: head.released == ["a" * 64], "the eviction told")
        assert head.attempts == 1

        head.down = True
        announcer.released([c * 64 for c in "defgh"])  # the head fails: kept, the 3 newest
        await head.wait_attempts(2)
        head.down = False
        announcer.released(["i" * 64])  # the next eviction sends them too
        await until(lambda: len(head.released) == 4, "the backlog told")
        assert head.released == ["a" * 64, "g" * 64, "h" * 64, "i" * 64]

        head.down = True
        announcer.released(["j" * 64])
        await head.wait_attempts(6)
        head.down = False
        announcer.registered()  # the head forgot every record of this scheduler: no backlog
        await head.wait_attempts(7)  # the announcement of what it holds
        assert head.held == cache and head.released[-1] == "i" * 64
    finally:
        await announcer.aclose()


def test_the_heads_holder_records_follow_the_schedulers_and_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blobs_module, "MAX_HELD", 2)
    blobs = blob_store(tmp_path / "head")
    one, two, three = "1" * 64, "2" * 64, "3" * 64
    blobs.add_holder(one, "a")
    blobs.add_holder(two, "a")
    blobs.add_holder(three, "a")  # past MAX_HELD: not recorded
    blobs.add_holder(one, "b")
    blobs.add_holder(one, ME)
    assert blobs.holders(one) == {"a", "b", ME} and blobs.holders(three) == set()
    blobs.drop_holder(two, "a")  # evicted
    blobs.add_holder(three, "a")  # room again
    assert blobs.holders(two) == set() and blobs.holders(three) == {"a"}
    blobs.forget_holder("a")  # registered again
    assert blobs.holders(one) == {"b", ME} and blobs.holders(three) == set()
    blobs.keep_holders({"c"})  # b was forgotten by the head; standby heads are kept
    assert blobs.holders(one) == {ME}
    assert blobs._held == {ME: {one}} and blobs._holders == {one: {ME}}


@pytest.mark.parametrize("passes", [0, 1, 2])
async def test_a_mirror_woken_as_it_is_closed_closes(tmp_path: Path, passes: int) -> None:
    """A blob that came whole (its wake) within two loop passes of ``aclose`` left the
    mirror's loop running and ``aclose`` waiting for good: the loop waited on
    ``asyncio.wait_for``, which lost the cancellation (a full-suite run hung here once)."""
    blobs = blob_store(tmp_path / "head")
    mirror = single_head(blobs, MemoryStore(), FakePeers(), [])
    mirror.start()
    await asyncio.sleep(0.05)  # past its first pass, waiting for a wake
    blobs.on_whole(SHA)
    for _ in range(passes):
        await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await mirror.aclose()

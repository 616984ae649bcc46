"""The Store contract, run against MemoryStore, SqliteStore and EtcdStore (a real etcd
process on loopback); then SQLite's and etcd's own promises."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import threading
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import pytest
import pytest_asyncio

from shoal import certs
from shoal.errors import Code, Internal, InvalidArgument
from shoal.rpc.etcd_client import EtcdTarget, etcd_client, parse_store_url
from shoal.store import Batch, Entry, Event, MemoryStore, SqliteStore, Store, StoreError
from shoal.store import sqlite as sqlite_store
from shoal.store.base import DEFAULT_HISTORY_LIMIT, DEFAULT_MAX_PENDING, MAX_COMMIT, Watch, WatchLost
from shoal.store.etcd import EtcdStore, Fenced
from shoal.store.history import EVENTS, MAX_MESSAGE, REVISIONS, History
from shoal.testing.etcd import EtcdCluster, free_ports, require_etcd

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(10)]


class MakeStore(Protocol):
    async def __call__(self, *, history_limit: int = ..., max_pending: int = ...) -> Store: ...


def sqlite_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("shoal-sqlite")]


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member for this module; each store gets a key prefix of its own."""
    require_etcd()
    with EtcdCluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


def open_etcd_store(
    cluster: EtcdCluster,
    *,
    history_limit: int = DEFAULT_HISTORY_LIMIT,
    max_pending: int = DEFAULT_MAX_PENDING,
) -> Awaitable[EtcdStore]:
    client = etcd_client(EtcdTarget(parse_store_url(cluster.url)))
    root = f"test-{uuid.uuid4().hex}/"
    return EtcdStore(client, root=root, history_limit=history_limit, max_pending=max_pending).open()


@pytest.fixture(params=["memory", "sqlite", "etcd"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def make_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    stores: list[Store] = []
    cluster = request.getfixturevalue("etcd") if kind == "etcd" else None

    async def make(**limits: int) -> Store:
        store: Store
        if kind == "memory":
            store = MemoryStore(**limits)
        elif cluster is not None:
            store = await open_etcd_store(cluster, **limits)
        else:
            store = await SqliteStore(tmp_path / "state.db", **limits).open()
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()
    assert not sqlite_threads()


@pytest_asyncio.fixture
async def store(make_store: MakeStore) -> Store:
    return await make_store()


async def take(watch: Watch, n: int) -> list[Event]:
    return [await asyncio.wait_for(anext(watch), 2) for _ in range(n)]


async def assert_quiet(watch: Watch) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(watch), 0.05)


async def assert_ended(watch: Watch) -> None:
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(watch), 2)


# -- the contract, for every store ---------------------------------------------------------


async def test_put_get_delete(store: Store) -> None:
    assert await store.get("a") is None
    revision = await store.put("a", "1")
    assert await store.get("a") == Entry("a", "1", revision)
    revision = await store.put("a", "2")
    assert await store.get("a") == Entry("a", "2", revision)
    assert await store.delete("a") is True
    assert await store.get("a") is None
    assert await store.delete("a") is False
    await store.put("empty value", "")
    assert await store.get("empty value") == Entry("empty value", "", revision + 2)


async def test_list_by_prefix_sorted_by_key(store: Store) -> None:
    keys = ["b/2", "a/z", "a/1", "a/10", "a/é", "a/2", "ab", "a/\U0001f600", "a/\uffff"]
    for key in keys:
        await store.put(key, key.upper())
    under_a = await store.list("a/")
    assert [e.key for e in under_a] == sorted(k for k in keys if k.startswith("a/"))
    assert all(e.value == e.key.upper() for e in under_a)
    assert [e.key for e in await store.list()] == sorted(keys)
    assert [e.key for e in await store.list("a")] == sorted(k for k in keys if k.startswith("a"))
    assert await store.list("c") == []
    assert await store.list("a/10/") == []


async def test_revisions_are_store_wide_and_increase(store: Store) -> None:
    r1 = await store.put("x", "1")
    r2 = await store.put("y", "1")
    r3 = await store.put("x", "2")
    assert (r1, r2, r3) == (1, 2, 3)
    assert await store.delete("y")
    assert await store.delete("y") is False  # a no-op does not bump the revision
    r5 = await store.put("z", "1")
    assert r5 == 5
    assert [(e.key, e.revision) for e in await store.list()] == [("x", 3), ("z", 5)]


async def test_put_if(store: Store) -> None:
    created = await store.put_if("k", "v1", 0)
    assert created is not None
    assert await store.put_if("k", "again", 0) is None
    assert await store.put_if("k", "stale", created + 1) is None
    assert (await store.get("k")) == Entry("k", "v1", created)
    updated = await store.put_if("k", "v2", created)
    assert updated is not None and updated > created
    assert await store.put_if("k", "stale", created) is None
    assert (await store.get("k")) == Entry("k", "v2", updated)
    assert await store.put_if("missing", "v", 7) is None
    await store.delete("k")
    assert await store.put_if("k", "v3", 0) is not None


async def test_watch_sees_puts_and_deletes_in_order(store: Store) -> None:
    async with asyncio.timeout(5):
        watch = store.watch("a/")  # registers now, before the first __anext__
        r1 = await store.put("a/1", "x")
        await store.put("b/1", "x")
        r3 = await store.put("a/2", "y")
        await store.delete("b/1")
        assert await store.delete("a/1")
        await store.delete("a/1")
        r6 = await store.put_if("a/2", "z", r3)
        assert r6 is not None
        assert await take(watch, 4) == [
            Event("put", "a/1", "x", r1),
            Event("put", "a/2", "y", r3),
            Event("delete", "a/1", None, r1 + 4),
            Event("put", "a/2", "z", r6),
        ]
        await assert_quiet(watch)
        await watch.aclose()


async def test_every_watch_gets_every_event(store: Store) -> None:
    everything, under_a = store.watch(), store.watch("a")
    await store.put("a", "1")
    await store.put("b", "2")
    assert [e.key for e in await take(everything, 2)] == ["a", "b"]
    assert [e.key for e in await take(under_a, 1)] == ["a"]
    await assert_quiet(under_a)


async def test_watch_replays_from_a_revision(store: Store) -> None:
    r1 = await store.put("a/1", "1")
    r2 = await store.put("a/2", "2")
    await store.put("b/1", "3")
    r4 = await store.put("a/1", "4")
    watch = store.watch("a/", start_revision=r1)
    r5 = await store.put("a/3", "5")  # written before the first __anext__: delivered once
    assert await take(watch, 3) == [
        Event("put", "a/2", "2", r2),
        Event("put", "a/1", "4", r4),
        Event("put", "a/3", "5", r5),
    ]
    r6 = await store.put("a/4", "6")
    assert await take(watch, 1) == [Event("put", "a/4", "6", r6)]
    await assert_quiet(watch)

    from_start = store.watch("", start_revision=0)
    assert [e.revision for e in await take(from_start, 6)] == [1, 2, 3, 4, 5, 6]
    await assert_quiet(from_start)

    from_now = store.watch("a/", start_revision=r6)
    await assert_quiet(from_now)
    r7 = await store.put("a/5", "7")
    assert [e.revision for e in await take(from_now, 1)] == [r7]


async def test_watch_from_a_forgotten_revision_is_lost(make_store: MakeStore) -> None:
    store = await make_store(history_limit=3)
    for i in range(5):
        await store.put(f"k{i}", str(i))
    kept = store.watch("", start_revision=2)  # revisions 3..5 are remembered
    assert [e.revision for e in await take(kept, 3)] == [3, 4, 5]
    lost = store.watch("", start_revision=1)
    with pytest.raises(WatchLost):
        await anext(lost)
    await assert_ended(lost)


async def test_slow_watch_is_lost_after_what_it_buffered(make_store: MakeStore) -> None:
    store = await make_store(max_pending=3)
    watch = store.watch()
    for i in range(5):
        await store.put(f"k{i}", str(i))
    assert [e.revision for e in await take(watch, 3)] == [1, 2, 3]
    with pytest.raises(WatchLost):
        await anext(watch)
    await assert_ended(watch)
    resumed = store.watch(start_revision=3)
    assert [e.revision for e in await take(resumed, 2)] == [4, 5]


async def test_watch_aclose_ends_a_waiting_consumer(store: Store) -> None:
    watch = store.watch()
    waiter = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0)
    await watch.aclose()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiter, 2)
    await store.put("k", "v")
    await assert_ended(watch)


async def test_close_ends_watches_after_buffered_events(store: Store) -> None:
    watch = store.watch()
    revision = await store.put("k", "v")
    await store.close()
    assert await take(watch, 1) == [Event("put", "k", "v", revision)]
    await assert_ended(watch)


async def test_closed_store_refuses_calls(store: Store) -> None:
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreError) as raised:
        await store.get("k")
    assert isinstance(raised.value, Internal)
    calls = (
        store.put("k", "v"),
        store.put_if("k", "v", 0),
        store.delete("k"),
        store.list(),
        store.commit({"k": "v"}),
    )
    for call in calls:
        with pytest.raises(StoreError):
            await call
    with pytest.raises(StoreError):
        store.watch()


async def test_invalid_arguments(store: Store) -> None:
    with pytest.raises(InvalidArgument):
        await store.put("", "v")
    with pytest.raises(InvalidArgument):
        await store.put("bad\ud800", "v")
    with pytest.raises(InvalidArgument):
        await store.put("k", "bad\udfff")
    with pytest.raises(InvalidArgument):
        await store.put_if("k", "v", -1)
    with pytest.raises(InvalidArgument):
        store.watch("", start_revision=-1)
    assert await store.list() == []


async def test_concurrent_puts_all_land_with_distinct_revisions(store: Store) -> None:
    watch = store.watch()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(store.put(f"key/{i:03}", str(i))) for i in range(100)]
    revisions = [t.result() for t in tasks]
    assert sorted(revisions) == list(range(1, 101))
    entries = await store.list("key/")
    assert [(e.key, e.value) for e in entries] == [(f"key/{i:03}", str(i)) for i in range(100)]
    assert {e.revision for e in entries} == set(revisions)
    events = await take(watch, 100)
    assert [e.revision for e in events] == list(range(1, 101))


async def test_concurrent_put_if_has_one_winner(store: Store) -> None:
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(store.put_if("leader", f"n{i}", 0)) for i in range(20)]
    winners = [i for i, t in enumerate(tasks) if t.result() is not None]
    assert len(winners) == 1
    entry = await store.get("leader")
    assert entry is not None and entry.value == f"n{winners[0]}"


async def test_commit_writes_every_key_at_consecutive_revisions(store: Store) -> None:
    await store.put("old", "0")
    await store.put("gone", "0")
    watch = store.watch()

    revision = await store.commit({"b": "2", "a": "1", "old": "1"}, ["gone", "missing", "gone"])

    assert revision == 6
    assert await store.list() == [Entry("a", "1", 4), Entry("b", "2", 3), Entry("old", "1", 5)]
    # Watchers see every change, in the order the commit lists them.
    assert await take(watch, 4) == [
        Event("put", "b", "2", 3),
        Event("put", "a", "1", 4),
        Event("put", "old", "1", 5),
        Event("delete", "gone", None, 6),
    ]
    await assert_quiet(watch)
    # Nothing to change: the revision stays.
    assert await store.commit({}, ["missing"]) == 6
    assert await store.put("next", "") == 7


async def test_commit_replays_after_a_watch_revision(store: Store) -> None:
    first = await store.commit({"a/1": "1", "b/1": "1"})
    second = await store.commit({"a/2": "2"}, ["a/1"])
    assert (first, second) == (2, 4)
    replayed = store.watch("a/", start_revision=0)
    assert await take(replayed, 3) == [
        Event("put", "a/1", "1", 1),
        Event("put", "a/2", "2", 3),
        Event("delete", "a/1", None, 4),
    ]
    await assert_quiet(replayed)
    middle = store.watch("", start_revision=2)  # from inside the first commit
    assert [e.revision for e in await take(middle, 2)] == [3, 4]


async def test_a_commit_refused_in_part_writes_nothing(store: Store) -> None:
    await store.put("k", "before")
    watch = store.watch()
    refused = [
        ({"k": "after", "b": "bad\udfff"}, ()),
        ({"k": "after", "": "empty key"}, ()),
        ({"k": "after", "bad\ud800": "v"}, ()),
        ({"k": "after"}, ["k"]),  # put and deleted
        ({"k": "after"}, ["x", ""]),
        ({f"many/{i}": "" for i in range(MAX_COMMIT)}, ["k"]),
    ]
    for puts, deletes in refused:
        with pytest.raises(InvalidArgument):
            await store.commit(puts, deletes)
    assert await store.list() == [Entry("k", "before", 1)]
    await assert_quiet(watch)
    assert await store.commit({f"many/{i}": "" for i in range(MAX_COMMIT - 1)}, ["k"]) == 1 + MAX_COMMIT


async def test_concurrent_commits_do_not_interleave(store: Store) -> None:
    async with asyncio.TaskGroup() as tg:
        for i in range(20):
            tg.create_task(store.commit({f"c/{i:02}/a": str(i), f"c/{i:02}/b": str(i)}))
            tg.create_task(store.put(f"p/{i:02}", str(i)))
    entries = {e.key: e.revision for e in await store.list()}
    assert len(entries) == 60
    assert all(entries[f"c/{i:02}/b"] == entries[f"c/{i:02}/a"] + 1 for i in range(20))
    assert sorted(entries.values()) == list(range(1, 61))


# -- SQLite ----------------------------------------------------------------------------------


# ---------------------------------------------------------------- history (over either store)


async def test_history_keeps_the_last_events_oldest_first(store: Store) -> None:
    history = History(store, max_events=3)
    for i in range(5):
        await history.record("a" if i % 2 else "b", "updated", f"change {i}\nsecond line", revision=i)

    assert [e.message for e in history.events()] == [
        "change 2 second line",
        "change 3 second line",
        "change 4 second line",
    ]
    assert [e.revision for e in history.events("a")] == [3]
    assert [e.revision for e in history.events(limit=2)] == [3, 4]
    assert len(await store.list(EVENTS)) == 3
    again = History(store, max_events=3)
    await again.load()
    assert again.events() == history.events()
    await again.record("a", "deleted", "gone")
    assert [e.kind for e in again.events()] == ["updated", "updated", "deleted"]
    long = await again.record("a", "failed", "x" * 5000)
    assert len(long.message) == MAX_MESSAGE and long.message.endswith("…")


async def test_a_noisy_deployment_cannot_push_out_the_others_events(store: Store) -> None:
    """Past the cluster's limit the oldest event of the deployment holding the most goes:
    the oldest of all went before, so a deployment failing over and over left no other
    deployment an event (its 'created' gone, and what went wrong with it)."""
    history = History(store, max_events=5)
    await history.record("quiet", "created", "revision 1")
    await history.record("other", "created", "revision 1")
    for i in range(20):
        await history.record("noisy", "failed", f"crash {i}")

    assert [e.kind for e in history.events("quiet")] == ["created"]
    assert [e.kind for e in history.events("other")] == ["created"]
    assert [e.message for e in history.events("noisy")] == [f"crash {i}" for i in (17, 18, 19)]
    assert len(await store.list(EVENTS)) == 5
    again = History(store, max_events=5)
    await again.load()
    await again.record("noisy", "failed", "crash 20")
    assert [e.deployment for e in again.events()] == ["quiet", "other", "noisy", "noisy", "noisy"]


async def test_history_keeps_the_last_revisions_per_deployment(store: Store) -> None:
    history = History(store, max_revisions=2)
    for model in ("m1", "m2", "m3"):
        await history.add_revision("app", "updated", f'{{"model": "{model}"}}', model, f"to {model}")
    await history.add_revision("other", "created", "{}", "h", "created")
    await history.set_outcome("app", 3, "failed: boom")

    assert [(r.number, r.spec_hash, r.outcome) for r in history.revisions("app")] == [
        (2, "m2", ""),
        (3, "m3", "failed: boom"),
    ]
    again = History(store, max_revisions=2)
    await again.load()
    assert again.revisions("app") == history.revisions("app")
    assert (await again.add_revision("app", "rolled_back", "{}", "m2", "back", rollback_to=2)).number == 4
    await again.forget("app")
    assert again.revisions("app") == [] and [r.number for r in again.revisions("other")] == [1]
    assert [e.key for e in await store.list(REVISIONS)] == ["revisions/other/0000000001"]


async def test_history_numbers_never_repeat_for_a_name_across_deletes_and_reloads(store: Store) -> None:
    history = History(store)
    for model in ("m1", "m2"):
        await history.add_revision("app", "updated", "{}", model, f"to {model}")
    last = await history.forget("app")  # what the tombstone keeps
    assert last == 2 and await history.forget("app") == 0
    assert (await history.add_revision("app", "created", "{}", "m3", "created", above=last)).number == 3

    await history.raise_floor(7)  # a tombstone holding 7 went
    await history.raise_floor(5)  # lower: the floor stays
    again = History(store)
    await again.load()
    assert again.floor == 7
    assert (await again.add_revision("new", "created", "{}", "h", "created")).number == 8
    assert (await again.add_revision("app", "updated", "{}", "m4", "to m4")).number == 4
    assert (await again.add_revision("other", "created", "{}", "h", "created", above=9)).number == 10
    assert [e.key for e in await store.list("revision-")] == ["revision-floor"]


async def test_history_staged_in_a_batch_changes_once_the_batch_is_committed(store: Store) -> None:
    history = History(store, max_revisions=2)
    await history.add_revision("app", "created", "{}", "h1", "created")

    refused = Batch()
    staged = history.staged(refused)
    staged.add_revision("app", "updated", "{}", "h2", "to h2")
    refused.put("", "a key the store refuses")
    with pytest.raises(InvalidArgument):
        await refused.commit(store)
    assert [r.number for r in history.revisions("app")] == [1]
    assert [e.key for e in await store.list()] == [f"{REVISIONS}app/0000000001"]

    batch = Batch()
    staged = history.staged(batch)
    staged.add_revision("app", "updated", "{}", "h2", "to h2")
    staged.add_revision("app", "updated", "{}", "h3", "to h3")  # pushes revision 1 out
    staged.record("app", "updated", "revision 3: to h3", 3)
    assert [r.number for r in staged.revisions("app")] == [2, 3]
    assert [r.number for r in history.revisions("app")] == [1] and history.events() == []
    await batch.commit(store)
    assert [r.number for r in history.revisions("app")] == [2, 3]
    assert [e.message for e in history.events()] == ["revision 3: to h3"]
    again = History(store)
    await again.load()
    assert again.revisions("app") == history.revisions("app") and again.events() == history.events()


async def test_history_skips_rows_it_cannot_read(store: Store) -> None:
    await store.put("events/000000000001", "not json")
    await store.put(
        "events/000000000002",
        '{"time": 1.0, "deployment": "a", "kind": "created", "revision": 1, "message": "m"}',
    )
    await store.put("revisions/a/0000000001", '{"number": 2}')
    history = History(store)
    await history.load()
    assert [e.kind for e in history.events()] == ["created"]
    assert history.revisions("a") == []
    await history.record("a", "deleted", "gone")
    assert (await store.list(EVENTS))[-1].key == "events/000000000003"


async def test_sqlite_keeps_history_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with SqliteStore(path) as store:
        history = History(store)
        await history.add_revision("app", "created", "{}", "h1", "created")
        await history.record("app", "created", "revision 1: created", 1)
    async with SqliteStore(path) as store:
        again = History(store)
        await again.load()
        assert [(e.kind, e.revision) for e in again.events()] == [("created", 1)]
        assert [r.spec_hash for r in again.revisions("app")] == ["h1"]
    assert not sqlite_threads()


async def test_sqlite_keeps_data_and_revision_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with SqliteStore(path) as store:
        await store.put("deployments/a", "spec-a")
        await store.put("deployments/b", "spec-b")
        await store.put("schedulers/s1", "x")
        last = await store.put("deployments/a", "spec-a2")
        assert await store.delete("schedulers/s1")
    assert not sqlite_threads()

    async with SqliteStore(path) as store:
        assert await store.list() == [
            Entry("deployments/a", "spec-a2", last),
            Entry("deployments/b", "spec-b", 2),
        ]
        watch = store.watch("deployments/", start_revision=2)
        assert await store.put("deployments/c", "spec-c") == last + 2
        assert await take(watch, 2) == [
            Event("put", "deployments/a", "spec-a2", last),
            Event("put", "deployments/c", "spec-c", last + 2),
        ]
    assert not sqlite_threads()


async def test_sqlite_file_layout_and_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "folders" / "state.db"
    store = SqliteStore(path, history_limit=3)
    assert not path.parent.exists()  # the constructor does no I/O
    with pytest.raises(StoreError):
        await store.get("k")
    await store.open()
    try:
        for i in range(10):
            await store.put(f"k{i}", str(i))
        assert await store._call(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]) == 1
    finally:
        await store.close()
    with pytest.raises(StoreError):
        await store.open()  # once only

    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert [r[1] for r in conn.execute("PRAGMA table_info(kv)")] == ["key", "value", "revision"]
        assert conn.execute("SELECT count(*) FROM kv").fetchone()[0] == 10
        assert conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0] == 10
        assert [r[0] for r in conn.execute("SELECT revision FROM changes ORDER BY 1")] == [8, 9, 10]
    finally:
        conn.close()


async def test_sqlite_log_held_by_an_outside_reader_is_told_and_shrinks_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A process holding a read transaction on the file (a sqlite3 shell, a backup tool)
    keeps checkpoints from copying the write-ahead log back: it grows with every write. The
    head says so, once, and the log shrinks back once the reader is gone; before, it kept
    the largest size it reached (132 MB after 5,000 writes of 2 KB, for good)."""
    monkeypatch.setattr(sqlite_store, "JOURNAL_SIZE_LIMIT", 1 << 20)
    monkeypatch.setattr(sqlite_store, "WAL_WARN_BYTES", 4 << 20)
    path = tmp_path / "state.db"
    wal = Path(f"{path}-wal")
    value = "v" * 2000
    async with SqliteStore(path) as store:
        await store.put("k", value)
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM kv").fetchone()  # holds its snapshot
        with caplog.at_level("WARNING", logger="shoal.store"):
            for i in range(600):
                await store.put(f"k{i % 20}", value)
        held = wal.stat().st_size
        assert held > 8 << 20
        told = [r.getMessage() for r in caplog.records if "write-ahead log" in r.getMessage()]
        assert len(told) == 1, told  # once, not once a write
        assert "read transaction open" in told[0] and str(wal) in told[0]
        reader.execute("ROLLBACK")
        reader.close()
        for i in range(300):
            await store.put(f"k{i % 20}", value)
        assert wal.stat().st_size <= 1 << 20
        assert (await store.get("k19")) is not None


async def test_sqlite_replay_history_is_bounded_in_characters(tmp_path: Path) -> None:
    """A thousand applies of the largest spec kept about 1.2 GB of changes in the file, all
    read into memory by one replay: the changes kept hold at most history_bytes characters."""
    path = tmp_path / "state.db"
    async with SqliteStore(path, history_bytes=1_000) as store:
        for i in range(5):
            await store.put(f"k{i}", str(i) * 400)
        await store.delete("k0")
        last = await store.put("small", "s")
        # k3 and k4 (400 each), the delete and "s" fit in 1,000 characters; k2 with them not.
        with pytest.raises(WatchLost):
            await take(store.watch("", start_revision=2), 1)
        replayed = await take(store.watch("", start_revision=3), 4)
        assert [(e.kind, e.key) for e in replayed] == [
            ("put", "k3"),
            ("put", "k4"),
            ("delete", "k0"),
            ("put", "small"),
        ]
        assert replayed[-1].revision == last
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT value FROM meta WHERE name = 'history_chars'").fetchone()[0] == 801
        # A file from before the count was kept: counted once when opened.
        conn.execute("DELETE FROM meta WHERE name = 'history_chars'")
        conn.commit()
    finally:
        conn.close()
    async with SqliteStore(path, history_bytes=1_000) as store:
        await store.put("k5", "5" * 300)
        with pytest.raises(WatchLost):
            await take(store.watch("", start_revision=3), 1)
        assert [e.key for e in await take(store.watch("", start_revision=4), 4)] == [
            "k4",
            "k0",
            "small",
            "k5",
        ]


async def test_sqlite_a_commit_the_file_refuses_midway_writes_nothing(tmp_path: Path) -> None:
    """As a disk filling between the rows of one change: the change is not half written."""
    path = tmp_path / "state.db"
    async with SqliteStore(path) as store:
        await store.put("k", "before")
    conn = sqlite3.connect(path)
    try:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON kv WHEN NEW.key = 'refused'"
            " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
        conn.commit()
    finally:
        conn.close()
    async with SqliteStore(path) as store:
        watch = store.watch()
        with pytest.raises(StoreError, match="disk is full"):
            await store.commit({"k": "after", "a": "1", "refused": "2"}, ["k2"])
        assert await store.list() == [Entry("k", "before", 1)]
        await assert_quiet(watch)
        assert await store.commit({"a": "1"}, ["k"]) == 3
        assert [e.revision for e in await take(store.watch(start_revision=0), 3)] == [1, 2, 3]
    conn = sqlite3.connect(path)
    try:
        chars = conn.execute("SELECT value FROM meta WHERE name = 'history_chars'").fetchone()[0]
        assert chars == len("before") + len("1")
    finally:
        conn.close()


@pytest.mark.parametrize(
    "garbage", [b"this is not a database\n" * 200, b"SQLite format 3\x00" + b"\xff" * 4080]
)
async def test_sqlite_corrupt_file_is_a_clear_error(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(garbage)
    with pytest.raises(StoreError, match=r"state\.db"):
        await SqliteStore(path).open()
    assert not sqlite_threads()


async def test_sqlite_unreadable_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open state store"):
        await SqliteStore(tmp_path).open()  # a folder, not a file
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot open state store"):
        await SqliteStore(tmp_path / "file" / "state.db").open()  # parent is a file
    assert not sqlite_threads()


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        await SqliteStore(path).open()


async def test_sqlite_refuses_a_foreign_database(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE kv (k TEXT, v TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a shoal store"):
        await SqliteStore(path).open()
    assert not sqlite_threads()


async def test_both_stores_satisfy_the_protocol(tmp_path: Path) -> None:
    stores: list[Store] = [MemoryStore(), SqliteStore(tmp_path / "s.db")]  # checked by mypy
    assert len(stores) == 2

    async def generator() -> AsyncGenerator[Event, None]:
        yield Event("put", "k", "v", 1)

    watch: Watch = generator()  # an async generator is a Watch too
    assert watch is not None


# -- etcd ----------------------------------------------------------------------------------


async def test_etcd_stores_on_one_root_share_one_revision_sequence(etcd: EtcdCluster) -> None:
    root = f"shared-{uuid.uuid4().hex}/"
    target = EtcdTarget(parse_store_url(etcd.url))
    async with (
        EtcdStore(etcd_client(target), root=root) as a,
        EtcdStore(etcd_client(target), root=root) as b,
    ):
        watch = a.watch("k/")
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task((a, b)[i % 2].put(f"k/{i:02}", str(i))) for i in range(40)]
        assert sorted(t.result() for t in tasks) == list(range(1, 41))
        # a sees b's writes, in order
        assert [e.revision for e in await take(watch, 40)] == list(range(1, 41))
        assert await b.get("k/00") == await a.get("k/00")
        # a compare-and-set against a revision b moved on from fails
        entry = await a.get("k/01")
        assert entry is not None
        assert await b.put("k/01", "b wins") == 41
        assert await a.put_if("k/01", "a loses", entry.revision) is None
        assert (await a.get("k/01")) == Entry("k/01", "b wins", 41)


async def test_etcd_lists_and_replays_more_than_a_grpc_message_holds(etcd: EtcdCluster) -> None:
    """A list (a head loading the state as it takes over) of more than 4 MiB failed
    'Received message larger than max (6032070 vs. 4194304)': 30 deployments of 20
    revisions of 10 KB were enough to keep every standby from leading."""
    store = await open_etcd_store(etcd)
    try:
        value = "x" * 10_000
        for i in range(450):  # 4.5 MB under one prefix, and in the changes kept for replay
            await store.put(f"revisions/d{i // 20:02}/{i % 20:010}", value)
        assert len(await store.list("revisions/")) == 450
        watch = store.watch("revisions/", start_revision=0)
        try:
            assert [e.revision for e in await take(watch, 450)] == list(range(1, 451))
        finally:
            await watch.aclose()
    finally:
        await store.close()


async def test_etcd_a_commit_over_the_request_limit_writes_nothing(etcd: EtcdCluster) -> None:
    """etcd refuses a request over --max-request-bytes (1.5 MiB by default): a revision row
    holding a large spec escaped twice was refused after the spec itself was written."""
    store = await open_etcd_store(etcd)
    try:
        await store.put("k", "before")
        watch = store.watch()
        with pytest.raises(StoreError, match="too large"):
            await store.commit({"k": "after", "big": "x" * 1_000_000})
        assert await store.list() == [Entry("k", "before", 1)]
        await assert_quiet(watch)
        assert await store.commit({"k": "after", "small": "x"}) == 3
        assert [e.revision for e in await take(watch, 2)] == [2, 3]
    finally:
        await store.close()


async def test_etcd_a_watch_made_after_a_write_does_not_get_that_write(
    etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd tells this process of its own writes through its watch, a little later than the
    write's answer: under load a watch made right after a put was handed that put. Here
    every delivery is held back 0.2 s, as a loaded machine does."""
    store = await open_etcd_store(etcd)
    deliver = store._deliver

    async def late(events: Sequence[Event]) -> None:
        await asyncio.sleep(0.2)
        await deliver(events)

    monkeypatch.setattr(store, "_deliver", late)
    try:
        await store.put("k", "before")
        watch = store.watch()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(watch), 0.5)
        assert await store.put("k", "after") == 2
        assert [e.revision for e in await take(watch, 1)] == [2]
    finally:
        await store.close()


async def test_etcd_fenced_store_writes_only_while_it_holds_the_key(etcd: EtcdCluster) -> None:
    store = await open_etcd_store(etcd)
    try:
        leader = f"leader-{uuid.uuid4().hex}"
        await store.client.put(leader.encode(), b"head-a")
        fenced: list[str] = []
        store.fence(leader, "head-a", lambda: fenced.append("called"))
        assert await store.put("deployments/x", "1") == 1
        await store.client.put(leader.encode(), b"head-b")  # another head took over
        for write in (
            store.put("deployments/x", "2"),
            store.delete("deployments/x"),
            store.put_if("y", "1", 0),
        ):
            with pytest.raises(Fenced, match="head-b") as refused:
                await write
            assert refused.value.code is Code.UNAVAILABLE  # the client may try the head that leads
        assert fenced == ["called"] * 3
        assert await store.list() == [Entry("deployments/x", "1", 1)]
        await store.client.delete(leader.encode())  # its lease ran out: nobody leads
        with pytest.raises(Fenced, match="nobody"):
            await store.put("deployments/x", "3")
        store.unfence()
        assert await store.put("deployments/x", "4") == 2
    finally:
        await store.close()


async def test_etcd_over_tls_with_client_certificates(tmp_path: Path) -> None:
    require_etcd()
    tls = tmp_path / "tls"
    certs.init(tls)  # ca.crt, client.crt and client.key are what --store-tls-dir reads
    with EtcdCluster(tmp_path / "etcd", tls_dir=tls) as cluster:
        url = f"{cluster.url},localhost:{cluster.members[0].client_port}"  # one name checked for all
        async with EtcdStore(etcd_client(EtcdTarget(parse_store_url(url), str(tls)))) as store:
            assert await store.put("k", "over TLS") == 1
            assert await store.get("k") == Entry("k", "over TLS", 1)
        ca_only = tmp_path / "ca-only"
        ca_only.mkdir()
        (ca_only / "ca.crt").write_bytes((tls / "ca.crt").read_bytes())
        with pytest.raises(StoreError):  # etcd asks for a client certificate
            await EtcdStore(etcd_client(EtcdTarget(parse_store_url(cluster.url), str(ca_only)))).open()
        with pytest.raises(StoreError):  # plaintext to a TLS member
            await EtcdStore(etcd_client(EtcdTarget(parse_store_url(cluster.url)))).open()
    with pytest.raises(InvalidArgument, match=r"ca\.crt"):
        await EtcdStore(etcd_client(EtcdTarget((("127.0.0.1", 1),), str(tmp_path / "nowhere")))).open()


async def test_etcd_unreachable_is_a_store_error() -> None:
    (port,) = free_ports(1)  # nobody listens there
    client = etcd_client(EtcdTarget((("127.0.0.1", port),)))
    with pytest.raises(StoreError, match="etcd"):
        await EtcdStore(client).open()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("sqlite:///x", "etcd://"),
        ("etcd://", "bad endpoint"),
        ("etcd://host:notaport", "bad endpoint"),
        ("etcd://a:1,/path", "bad endpoint"),
    ],
)
async def test_etcd_store_url_must_name_endpoints(url: str, problem: str) -> None:
    with pytest.raises(InvalidArgument, match=problem):
        parse_store_url(url)


async def test_etcd_store_url_endpoints() -> None:
    assert parse_store_url("etcd://10.0.0.1:2379,db.example:32379,other") == (
        ("10.0.0.1", 2379),
        ("db.example", 32379),
        ("other", 2379),
    )


async def test_sqlite_a_write_the_file_refuses_is_logged_as_well_as_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A disk gone read-only: every deploy, scale and delete failed INTERNAL at the client
    ("state store ...: disk I/O error") and the head's log said nothing. It is logged now."""
    path = tmp_path / "state.db"
    async with SqliteStore(path) as store:
        await store.put("deployments/a", "spec-a")
        await store._call(lambda conn: conn.execute("PRAGMA query_only = ON"))  # as a read-only disk
        with caplog.at_level("ERROR", logger="shoal.store"), pytest.raises(StoreError, match="readonly"):
            await store.put("deployments/b", "spec-b")
        assert [r.getMessage() for r in caplog.records if r.name == "shoal.store"] == [
            f"state store {path}: attempt to write a readonly database"
        ]
        await store._call(lambda conn: conn.execute("PRAGMA query_only = OFF"))  # the disk back
        await store.put("deployments/b", "spec-b")
        assert [e.key for e in await store.list()] == ["deployments/a", "deployments/b"]


async def test_sqlite_a_second_store_on_an_open_file_is_refused(tmp_path: Path) -> None:
    """Two heads on one state file (their pid files on different machines or in different
    pid namespaces, or started at the same instant) each kept their own revisions and event
    numbers and overwrote the other's rows. The second is refused, by the file's path or
    another one leading to it."""
    path = tmp_path / "state" / "state.db"
    (tmp_path / "other").symlink_to(tmp_path / "state")
    async with SqliteStore(path) as first:
        await first.put("deployments/a", "spec-a")
        for same in (path, tmp_path / "other" / "state.db"):
            with pytest.raises(StoreError, match=r"another process .*state\.db.*stop it") as refused:
                await SqliteStore(same).open()
            assert str(path) in str(refused.value) or str(same) in str(refused.value)
        assert await first.put("deployments/b", "spec-b") == 2
    async with SqliteStore(tmp_path / "other" / "state.db") as second:  # once the first closed
        assert [e.key for e in await second.list()] == ["deployments/a", "deployments/b"]
    assert not sqlite_threads()


@pytest.mark.parametrize("how", ["folder deleted", "file replaced"])
async def test_sqlite_refuses_writes_once_its_file_is_gone(tmp_path: Path, how: str) -> None:
    """The state folder deleted while the head ran (a cleanup, a volume unmounted): every
    later deploy "succeeded" into the deleted file, and the next start had none of them."""
    path = tmp_path / "state" / "state.db"
    async with SqliteStore(path) as store:
        await store.put("deployments/a", "spec-a")
        if how == "folder deleted":
            shutil.rmtree(path.parent)
        else:
            path.rename(tmp_path / "moved.db")
            path.write_bytes(b"")
        with pytest.raises(StoreError, match="deleted or replaced while it was open"):
            await store.put("deployments/b", "spec-b")
        with pytest.raises(StoreError, match="deleted or replaced while it was open"):
            await store.delete("deployments/a")
        assert [e.key for e in await store.list()] == ["deployments/a"]  # reads still answer


async def test_sqlite_a_write_lock_another_process_holds_fails_the_next_writes_at_once(
    tmp_path: Path,
) -> None:
    """Another process holding the file's write lock (a sqlite3 shell in a transaction): the
    head holds its lock across each write, so every deploy, scale and delete queued behind
    the first waited the whole busy timeout in turn, and the head's status, health updates
    and registrations waited behind them. After one write timed out, the next ones give up
    at once (a short wait), until one gets the lock."""
    path = tmp_path / "state.db"
    async with SqliteStore(path, busy_timeout_s=0.5) as store:
        await store.put("deployments/a", "spec-a")
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            for _ in range(3):
                with pytest.raises(StoreError, match="another process holds its write lock"):
                    await store.put("deployments/b", "spec-b")
            timeout = await store._call(lambda conn: conn.execute("PRAGMA busy_timeout").fetchone()[0])
            assert timeout < 500  # the second and third did not wait the whole timeout
            holder.execute("ROLLBACK")
        finally:
            holder.close()
        assert await store.put("deployments/b", "spec-b") == 2
        timeout = await store._call(lambda conn: conn.execute("PRAGMA busy_timeout").fetchone()[0])
        assert timeout == 500  # waits again, now that writes go through

    # At start, too: it was refused as 'unreadable, corrupt, or not a shoal store'.
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="another process holds its write lock") as refused:
            await SqliteStore(path, busy_timeout_s=0.2).open()
        assert "corrupt" not in str(refused.value)
    finally:
        holder.close()


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` read-only for this process: root writes a file whatever its mode, but not
    an immutable one."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        yield
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


async def test_sqlite_a_read_only_file_is_refused_as_such_not_as_corrupt(tmp_path: Path) -> None:
    """It was refused as 'unreadable, corrupt, or not a shoal store': an operator told so
    may move a good file aside and start the head without its deployments."""
    path = tmp_path / "state.db"
    async with SqliteStore(path) as store:
        await store.put("deployments/a", "spec-a")
    with (
        read_only(path),
        pytest.raises(StoreError, match=r"cannot be written .*give this user write") as refused,
    ):
        await SqliteStore(path).open()
    assert "corrupt" not in str(refused.value)
    assert not sqlite_threads()

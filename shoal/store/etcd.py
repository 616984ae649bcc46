"""The state store on etcd v3, for heads that share their state (and stand by for each other).

Keys, all under ``root`` (default ``shoal/``)::

    <root>rev                     the store revision, decimal
    <root>kv/<key>                b"<revision>\\n" + the value (UTF-8)
    <root>changes/<revision:020>  one change as JSON, the last ``history_limit`` of them
    <root>leader                  the leading head (see :mod:`shoal.head.leader`)

Why a counter of our own: the :class:`~shoal.store.base.Store` contract promises a store-wide
revision that every change bumps by exactly one, and etcd's revision also moves for writes
shoal does not count (the leader key, other users of the cluster). Each write (a put, a
delete, or a :meth:`~shoal.store.base.Store.commit` of several keys) is one etcd
transaction that compares the counter (so writers never interleave), moves it on by one
per change, writes the keys, appends one change per key and trims the oldest; with a
fence set (:meth:`EtcdStore.fence`) the same transaction also compares the leader key, so
a deposed head writes nothing. etcd applies a transaction whole or not at all: one it
refuses (over ``--max-request-bytes``, 1.5 MiB by default) writes nothing.

Watches: one etcd watch on ``<root>changes/``, started by :meth:`EtcdStore.open`, feeds a
:class:`~shoal.store.base.WatchHub`; it sees the writes of every process on the cluster.
Replay reads ``<root>changes/``. When the etcd watch breaks (a member died) it is made
again and the changes it missed are read from ``<root>changes/``.

The etcd client (:mod:`aetcd`) is built by the caller (:mod:`shoal.rpc.etcd_client`): this
module makes no channel. Errors from etcd (unreachable, timed out) raise :class:`StoreError`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Self

import aetcd

from shoal.core.tasks import cancel_and_wait
from shoal.errors import Code
from shoal.store.base import (
    DEFAULT_HISTORY_LIMIT,
    DEFAULT_MAX_PENDING,
    Entry,
    Event,
    StoreError,
    Watch,
    WatchHub,
    WatchLost,
    check_commit,
    check_key,
    check_revision,
    check_text,
    check_watch,
)

log = logging.getLogger("shoal.store")

DEFAULT_ROOT = "shoal/"
_CLOSE_DRAIN_S = 2.0  # how long close() waits for the watch to deliver this store's own writes


class Fenced(StoreError):
    """A write was refused because this process no longer holds the key it was fenced on.

    Raised by every write of an :class:`EtcdStore` after :meth:`EtcdStore.fence` once the
    fence key's value differs: another head leads, or this head's lease ran out. Its code
    is UNAVAILABLE (not INTERNAL): the caller's request may succeed at the head that leads,
    and the transaction changed nothing (``nothing_done``), so even a delete may go there.
    """

    code = Code.UNAVAILABLE
    nothing_done = True


def _prefix_end(prefix: bytes) -> bytes:
    return aetcd.utils.prefix_range_end(prefix)  # type: ignore[no-any-return]


class EtcdStore:
    """A :class:`~shoal.store.base.Store` on an etcd v3 cluster.

    Lifecycle: the constructor does no I/O; ``await store.open()`` (or ``async with``)
    reaches etcd, starts the watch and raises :class:`StoreError` when etcd cannot be
    reached. :meth:`close` ends watches and closes the client (which the store owns).

    Concurrency: use from the loop that opened it. Writes from this process go one at a
    time (a lock); writes from other processes are ordered by the counter's compare, and a
    write that lost the race is retried.
    """

    def __init__(
        self,
        client: aetcd.Client,
        *,
        root: str = DEFAULT_ROOT,
        history_limit: int = DEFAULT_HISTORY_LIMIT,
        max_pending: int = DEFAULT_MAX_PENDING,
        name: str = "etcd",
    ) -> None:
        if history_limit < 1 or max_pending < 1:
            raise ValueError("history_limit and max_pending must be >= 1")
        self._client = client
        self._root = root.encode()
        self._rev_key = self._root + b"rev"
        self._kv = self._root + b"kv/"
        self._changes = self._root + b"changes/"
        self._history_limit = history_limit
        self._hub = WatchHub(max_pending=max_pending)
        self._name = name
        self._state = "new"
        self._write_lock = asyncio.Lock()
        self._revision: int | None = None  # the counter as this process last saw it
        self._delivered = 0  # the newest revision handed to the hub
        self._written = 0  # the newest revision this process wrote
        self._progress = asyncio.Condition()
        self._follower: asyncio.Task[None] | None = None
        self._fence: tuple[bytes, bytes] | None = None
        self._on_fenced: Callable[[], None] | None = None

    @property
    def client(self) -> aetcd.Client:
        """The etcd client, for leader election over the same connection."""
        return self._client

    @property
    def root(self) -> str:
        return self._root.decode()

    async def open(self) -> Self:
        """Reach etcd and start following changes. May be called once."""
        if self._state != "new":
            raise StoreError(f"state store {self._name}: open() may be called once")
        self._state = "opening"
        try:
            watch = await self._etcd(self._client.watch(self._changes, range_end=_prefix_end(self._changes)))
            self._delivered = await self._read_revision()
        except BaseException:
            self._state = "closed"
            with contextlib.suppress(Exception):
                await self._client.close()
            raise
        self._follower = asyncio.create_task(self._follow(watch), name="shoal-etcd-watch")
        self._state = "open"
        return self

    async def close(self) -> None:
        if self._state == "closed":
            return
        opened = self._state == "open"
        self._state = "closed"
        if opened:
            # Let the watch hand over this process's own writes before the watches end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CLOSE_DRAIN_S), self._progress:
                    await self._progress.wait_for(lambda: self._delivered >= self._written)
        try:
            if self._follower is not None:
                await cancel_and_wait(self._follower)  # raises again when close() is cancelled
        finally:
            self._hub.close()
            with contextlib.suppress(Exception):
                await self._client.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- fencing --------------------------------------------------------------------------

    def fence(self, key: str, value: str, on_fenced: Callable[[], None] | None = None) -> None:
        """From now on, every write also requires etcd key ``key`` to hold ``value``.

        A write made when it does not raises :class:`Fenced` and changes nothing, after
        calling ``on_fenced``. The leader election sets it to the leader key and this head's
        value, and steps down when called.
        """
        self._fence = (key.encode(), value.encode())
        self._on_fenced = on_fenced

    def unfence(self) -> None:
        self._fence = self._on_fenced = None

    # -- leases, for the leader election (shoal.head.leader.LeaseBackend) ----------------

    @property
    def leader_key(self) -> str:
        """The etcd key the heads on this store campaign for."""
        return self.root + "leader"

    async def grant_lease(self, ttl_s: int) -> int:
        self._check_open()
        lease = await self._etcd(self._client.lease(ttl_s))
        return int(lease.id)

    async def renew_lease(self, lease: int) -> int:
        self._check_open()
        reply = await self._etcd(self._client.refresh_lease(lease))
        return 0 if reply is None else int(reply.TTL)

    async def revoke_lease(self, lease: int) -> None:
        self._check_open()
        await self._etcd(self._client.revoke_lease(lease))

    async def create_leased(self, key: str, value: str, lease: int) -> bool:
        self._check_open()
        tx = self._client.transactions
        raw = key.encode()
        ok, _ = await self._etcd(
            self._client.transaction([tx.create(raw) == 0], [tx.put(raw, value.encode(), lease)], [])
        )
        return bool(ok)

    async def read_key(self, key: str) -> str | None:
        self._check_open()
        got = await self._etcd(self._client.get(key.encode()))
        return None if got is None else bytes(got.value).decode(errors="replace")

    # -- the Store protocol ---------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        self._check_open()
        check_key(key)
        got = await self._etcd(self._client.get(self._kv + key.encode()))
        return None if got is None else _entry(key, got.value)

    async def put(self, key: str, value: str) -> int:
        self._check_open()
        check_key(key)
        check_text(value, "value")
        written = await self._write([(key, value)])
        assert written is not None  # an unconditional put always writes
        return written[0]

    async def put_if(self, key: str, value: str, expected_revision: int) -> int | None:
        self._check_open()
        check_key(key)
        check_text(value, "value")
        check_revision(expected_revision, "expected_revision")
        written = await self._write([(key, value)], expected_revision)
        return None if written is None else written[0]

    async def delete(self, key: str) -> bool:
        self._check_open()
        check_key(key)
        written = await self._write([(key, None)])
        assert written is not None
        return written[1] > 0

    async def commit(self, puts: Mapping[str, str], deletes: Sequence[str] = ()) -> int:
        self._check_open()
        changes: builtins.list[tuple[str, str | None]] = [*puts.items()]
        changes += [(key, None) for key in check_commit(puts, deletes)]
        written = await self._write(changes)
        assert written is not None
        return written[0]

    async def list(self, prefix: str = "") -> builtins.list[Entry]:
        self._check_open()
        check_text(prefix, "prefix")
        start = self._kv + prefix.encode()
        got = await self._etcd(self._client.get_prefix(start))
        # etcd sorts keys by bytes; UTF-8 bytes sort like code points.
        entries = [_entry(kv.key[len(self._kv) :].decode(), kv.value) for kv in got]
        return sorted(entries, key=lambda e: e.key.encode())

    def watch(self, prefix: str = "", start_revision: int | None = None) -> Watch:
        self._check_open()
        check_watch(prefix, start_revision)
        replay = None
        if start_revision is not None:
            start = start_revision

            async def replay_history() -> Sequence[Event]:
                history = await self._history(start)
                return [e for e in history if e.key.startswith(prefix)]

            replay = replay_history
        # This process's own writes reach the hub through etcd's watch, after their answers:
        # one made before this watch may not have arrived yet, and is not this watch's.
        return self._hub.watch(prefix, start_revision, replay, after=self._written)

    # -- writing --------------------------------------------------------------------------

    async def _write(
        self, changes: Sequence[tuple[str, str | None]], expected: int | None = None
    ) -> tuple[int, int] | None:
        """Changes (a value, or ``None`` to delete) in one transaction, taking consecutive
        revisions; a delete of a missing key is skipped. Returns the new store revision and
        how many changes were written; ``None`` when ``expected`` (for the one change of a
        put_if) did not match. Retries lost races."""
        tx = self._client.transactions
        async with self._write_lock:
            while True:
                if self._revision is None:
                    self._revision = await self._read_revision()
                current = self._revision
                kept: builtins.list[tuple[str, str | None]] = []
                for key, value in changes:
                    if expected is None and value is not None:
                        kept.append((key, value))
                        continue
                    got = await self._etcd(self._client.get(self._kv + key.encode()))
                    have = 0 if got is None else _entry(key, got.value).revision
                    if (expected is not None and have != expected) or (value is None and have == 0):
                        continue
                    kept.append((key, value))
                if not kept:
                    # Read under the counter: valid only if no other process wrote since.
                    if await self._unchanged(current):
                        return None if expected is not None and not kept else (current, 0)
                    continue
                ops = []
                for revision, (key, value) in enumerate(kept, start=current + 1):
                    change: dict[str, Any] = {
                        "rev": revision,
                        "kind": "put" if value is not None else "delete",
                        "key": key,
                    }
                    kv_key = self._kv + key.encode()
                    if value is not None:
                        change["value"] = value
                        ops.append(tx.put(kv_key, b"%d\n" % revision + value.encode()))
                    else:
                        ops.append(tx.delete(kv_key))
                    ops.append(tx.put(self._change_key(revision), json.dumps(change).encode()))
                last = current + len(kept)
                ops.append(tx.put(self._rev_key, str(last).encode()))
                # Changes up to here are dropped; never one this transaction writes (etcd
                # refuses a put and a delete of one key in a transaction).
                trim = min(last - self._history_limit, current)
                if trim > 0:
                    ops.append(tx.delete(self._changes, self._change_key(trim + 1)))
                compare = [
                    tx.value(self._rev_key) == str(current).encode()
                    if current
                    else tx.version(self._rev_key) == 0
                ]
                fence = self._fence
                if fence is not None:
                    compare.append(tx.value(fence[0]) == fence[1])
                failure = [tx.get(fence[0])] if fence is not None else []
                ok, responses = await self._etcd(self._client.transaction(compare, ops, failure))
                if ok:
                    self._revision = self._written = last
                    return last, len(kept)
                if fence is not None:
                    holder = responses[0][0][0] if responses and responses[0] else None
                    if holder != fence[1]:
                        if self._on_fenced is not None:
                            self._on_fenced()
                        raise Fenced(
                            f"state store {self._name}: not written, this head no longer holds "
                            f"{fence[0].decode()!r} (now {holder.decode() if holder else 'nobody'})"
                        )
                self._revision = None  # another process wrote: read the counter again

    async def _unchanged(self, current: int) -> bool:
        """Whether the counter is still ``current`` (else forget it, to retry)."""
        now = await self._read_revision()
        if now == current:
            return True
        self._revision = None
        return False

    async def _read_revision(self) -> int:
        got = await self._etcd(self._client.get(self._rev_key))
        return 0 if got is None else int(got.value)

    def _change_key(self, revision: int) -> bytes:
        return self._changes + b"%020d" % revision

    # -- watching -------------------------------------------------------------------------

    async def _history(self, start_revision: int) -> builtins.list[Event]:
        """Changes after ``start_revision``; :class:`WatchLost` when they are not all kept."""
        got = await self._etcd(self._client.get_prefix(self._changes))
        events = sorted((_change(kv.value) for kv in got), key=lambda e: e.revision)
        # Every write keeps its own change, so an empty log means nothing was written yet.
        compacted = events[0].revision - 1 if events else 0
        if start_revision < compacted:
            raise WatchLost(
                f"cannot replay after revision {start_revision}: history starts after {compacted}"
            )
        return [e for e in events if e.revision > start_revision]

    async def _follow(self, watch: Any) -> None:
        """Publish every change etcd reports, in order; on a broken watch, watch again and
        read what was missed from the changes log."""
        delay = 0.1
        while True:
            try:
                async for update in watch:
                    if update.kind != aetcd.EventKind.PUT:
                        continue  # a trimmed change
                    event = _change(update.kv.value)
                    await self._deliver([event])
                    delay = 0.1
                raise StoreError("the etcd watch ended")
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await watch.cancel()
                raise
            except Exception as err:  # any failure: watch again
                log.warning("state store %s: watch broke (%s); watching again", self._name, err)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                try:
                    watch = await self._etcd(
                        self._client.watch(self._changes, range_end=_prefix_end(self._changes))
                    )
                    await self._deliver(await self._history(self._delivered))
                except WatchLost as lost:
                    log.error("state store %s: watches missed changes: %s", self._name, lost)
                except Exception as again:
                    log.warning("state store %s: cannot watch yet: %s", self._name, again)

    async def _deliver(self, events: Sequence[Event]) -> None:
        fresh = [e for e in events if e.revision > self._delivered]
        if not fresh:
            return
        self._hub.publish(fresh)
        async with self._progress:
            self._delivered = fresh[-1].revision
            self._progress.notify_all()

    # -- plumbing -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state != "open":
            raise StoreError(f"state store {self._name} is not open")

    async def _etcd(self, call: Any) -> Any:
        """Await an aetcd call; its errors become :class:`StoreError`."""
        try:
            return await call
        except aetcd.ClientError as err:
            raise StoreError(f"state store {self._name}: {type(err).__name__}: {err}") from err


def _entry(key: str, raw: bytes) -> Entry:
    revision, _, value = raw.partition(b"\n")
    try:
        return Entry(key, value.decode(), int(revision))
    except (ValueError, UnicodeDecodeError) as err:
        raise StoreError(f"state store: key {key!r} holds something shoal did not write") from err


def _change(raw: bytes) -> Event:
    try:
        data = json.loads(raw)
        revision, key = int(data["rev"]), data["key"]
        if data["kind"] == "put":
            return Event("put", key, data["value"], revision)
        return Event("delete", key, None, revision)
    except (ValueError, KeyError, TypeError) as err:
        raise StoreError(f"state store: a change shoal did not write: {raw[:80]!r}") from err

"""The embedded state store: one SQLite file in WAL mode.

Tables::

    kv(key TEXT PRIMARY KEY, value TEXT NOT NULL, revision INTEGER NOT NULL)
    meta(name TEXT PRIMARY KEY, value INTEGER NOT NULL)
        'revision': the store revision; 'compacted': the newest revision trimmed from changes;
        'history_chars': the characters of the values in changes
    changes(revision INTEGER PRIMARY KEY, kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT)
        the last ``history_limit`` changes, for watch replay, their values at most
        ``history_bytes`` characters in all

Durability: ``synchronous=NORMAL`` in WAL mode, so a write that returned survives the
process dying; an OS crash or power loss may lose the last writes but never corrupts the
file (SQLite's documented trade-off). Watches see the writes of this store instance only,
not those of other processes on the same file.

One store per file: an open store holds an exclusive ``flock`` on ``<file>.lock`` beside it
(released by the kernel when the process dies), and a second store on the file, from any
process and by any path, is refused. Two heads on one file each kept their own event
numbers and overwrote each other's rows; the heads' pid files do not see a head on another
machine sharing the folder, or in another pid namespace.

A write is refused (``StoreError``) once the file at the path is not the one opened (its
folder deleted, the file replaced): SQLite kept writing to the deleted file, every change
returned as saved, and the next start had none of them.

Another process holding the file's write lock: a write waits ``busy_timeout_s`` for it,
then fails; the writes after it wait only :data:`BUSY_RETRY_S` until one goes through, as
the head holds its own lock across each write and every control call queued behind them
would otherwise wait the whole timeout in turn.
"""

from __future__ import annotations

import asyncio
import builtins
import fcntl
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, Self, TypeVar

from shoal.store.base import (
    DEFAULT_HISTORY_BYTES,
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

T = TypeVar("T")

log = logging.getLogger("shoal.store")

BUSY_TIMEOUT_S = 5.0
"""How long a write waits for a write lock another process holds on the file."""

BUSY_RETRY_S = 0.1
"""How long a write waits for it after a write found it held past the timeout."""

JOURNAL_SIZE_LIMIT = 64 << 20
"""``PRAGMA journal_size_limit``: the write-ahead log (``<file>-wal``) is cut back to this
many bytes each time a checkpoint lets it start over. Without it the log kept the largest
size it ever reached: 132 MB after 5,000 writes under an outside reader, 132 MB still
after the reader left and 2,000 more writes."""

WAL_WARN_BYTES = 256 << 20
"""Past this many bytes of write-ahead log a write logs a WARNING (at most once every
:data:`WAL_WARN_EVERY_S`): checkpoints cannot copy the log back into the file while
another process holds a read transaction open on it, so the log grows with every write
until that reader ends (a ``sqlite3`` shell left in a transaction, a backup or monitoring
tool reading the file)."""

WAL_WARN_EVERY_S = 300.0

SCHEMA_VERSION = 1
"""Stored in ``PRAGMA user_version``; a file from a newer shoal is refused."""

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, revision INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    (
        "CREATE TABLE IF NOT EXISTS changes (revision INTEGER PRIMARY KEY,"
        " kind TEXT NOT NULL CHECK (kind IN ('put', 'delete')), key TEXT NOT NULL, value TEXT)"
    ),
    "INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0), ('compacted', 0)",
    # The characters of the values in changes (a file from before it was kept: counted once).
    (
        "INSERT OR IGNORE INTO meta (name, value) SELECT 'history_chars', coalesce(sum(length(value)), 0)"
        " FROM changes WHERE NOT EXISTS (SELECT 1 FROM meta WHERE name = 'history_chars')"
    ),
)


class SqliteStore:
    """A :class:`~shoal.store.base.Store` in one SQLite file.

    Lifecycle: the constructor does no I/O. ``await store.open()`` (which returns the
    store) or ``async with SqliteStore(path) as store:`` creates the parent folder and the
    file if missing, and raises :class:`StoreError` when the file is unreadable, read-only,
    corrupt, not a shoal store, or open in another process. ``close`` ends watches and
    stops the worker thread.

    Concurrency: one connection lives on one dedicated worker thread and every SQLite call
    runs there, in submission order, so the event loop never blocks on disk. Any number
    of tasks on the loop that opened the store may call it at once; each write is one
    transaction. Calls from another thread or loop are not supported.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        history_limit: int = DEFAULT_HISTORY_LIMIT,
        history_bytes: int = DEFAULT_HISTORY_BYTES,
        max_pending: int = DEFAULT_MAX_PENDING,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
    ) -> None:
        if history_limit < 1 or history_bytes < 1 or max_pending < 1:
            raise ValueError("history_limit, history_bytes and max_pending must be >= 1")
        if busy_timeout_s < 0:
            raise ValueError("busy_timeout_s must be >= 0")
        self._path = Path(path)
        self._history_limit = history_limit
        self._history_bytes = history_bytes
        self._busy_timeout_ms = round(busy_timeout_s * 1000)
        self._busy = False  # a write found the file's write lock held past the timeout
        self._hub = WatchHub(max_pending=max_pending)
        self._state: Literal["new", "opening", "open", "closed"] = "new"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # used on the worker thread only
        self._lock_file: int | None = None  # the fd holding the flock
        self._file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened
        self._wal = Path(f"{self._path}-wal")
        self._wal_warned = -math.inf  # when a write last warned of a large write-ahead log

    @property
    def path(self) -> Path:
        return self._path

    async def open(self) -> Self:
        """Open (creating if needed) the file. May be called once."""
        if self._state != "new":
            raise StoreError(f"state store {self._path}: open() may be called once")
        self._state = "opening"
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoal-sqlite")
        try:
            await self._loop.run_in_executor(self._executor, self._open_sync)
        except BaseException:
            self._state = "closed"
            self._shutdown()
            raise
        if self._state != "opening":  # closed while opening
            self._shutdown()
            raise StoreError(f"state store {self._path} was closed while opening")
        self._state = "open"
        return self

    async def close(self) -> None:
        if self._state == "closed":
            return
        self._state = "closed"
        if self._executor is not None and self._loop is not None:
            try:
                # Runs after every call already submitted, so their events are published first.
                await self._loop.run_in_executor(self._executor, self._close_sync)
            finally:
                self._shutdown()
        self._hub.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def get(self, key: str) -> Entry | None:
        check_key(key)
        return await self._call(lambda conn: _get(conn, key))

    async def put(self, key: str, value: str) -> int:
        check_key(key)
        check_text(value, "value")
        revision = await self._call(lambda conn: self._put(conn, key, value, None))
        assert revision is not None  # an unconditional put always writes
        return revision

    async def put_if(self, key: str, value: str, expected_revision: int) -> int | None:
        check_key(key)
        check_text(value, "value")
        check_revision(expected_revision, "expected_revision")
        return await self._call(lambda conn: self._put(conn, key, value, expected_revision))

    async def delete(self, key: str) -> bool:
        check_key(key)
        return await self._call(lambda conn: self._delete(conn, key))

    async def commit(self, puts: Mapping[str, str], deletes: Sequence[str] = ()) -> int:
        changes: builtins.list[tuple[str, str | None]] = [*puts.items()]
        changes += [(key, None) for key in check_commit(puts, deletes)]
        return await self._call(lambda conn: self._commit(conn, changes))

    async def list(self, prefix: str = "") -> builtins.list[Entry]:
        check_text(prefix, "prefix")
        return await self._call(lambda conn: _list(conn, prefix))

    def watch(self, prefix: str = "", start_revision: int | None = None) -> Watch:
        self._check_open()
        check_watch(prefix, start_revision)
        replay = None
        if start_revision is not None:
            start = start_revision

            async def replay_history() -> Sequence[Event]:
                return await self._call(lambda conn: _history(conn, prefix, start))

            replay = replay_history
        return self._hub.watch(prefix, start_revision, replay)

    # -- on the event loop ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state != "open":
            raise StoreError(f"state store {self._path} is not open")

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._check_open()
        assert self._loop is not None and self._executor is not None
        if asyncio.get_running_loop() is not self._loop:
            raise StoreError(f"state store {self._path} used from another event loop")
        return await self._loop.run_in_executor(self._executor, self._guarded, fn)

    def _shutdown(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.submit(self._close_sync)  # no-op when already closed
            # The worker is idle or finishing the close: this returns promptly.
            executor.shutdown(wait=True)

    # -- on the worker thread ---------------------------------------------------------

    def _guarded(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            raise StoreError(f"state store {self._path} is not open")
        try:
            return fn(self._conn)
        except sqlite3.Error as err:
            # Logged here too: the caller gets INTERNAL with this message, and the head's log
            # used to say nothing while every deploy, scale and delete failed (a disk gone
            # read-only: "disk I/O error").
            message = f"state store {self._path}: {err}"
            if _primary_code(err) == sqlite3.SQLITE_BUSY:
                message += ": another process holds its write lock; changes fail until it lets go"
            log.error("%s", message)
            raise StoreError(message) from err

    def _open_sync(self) -> None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_file = _hold_lock(self._path)
            conn = sqlite3.connect(self._path, isolation_level=None)
            stat = os.stat(self._path)
        except (OSError, sqlite3.Error) as err:
            self._close_sync()
            raise StoreError(f"cannot open state store {self._path}: {err}") from err
        self._file_id = (stat.st_dev, stat.st_ino)
        try:
            _init(conn, self._path, self._busy_timeout_ms)
        except BaseException as err:
            conn.close()
            self._close_sync()
            if _primary_code(err) == sqlite3.SQLITE_BUSY:
                raise StoreError(
                    f"state store {self._path}: another process holds its write lock ({err}); "
                    "let it finish, then start again"
                ) from err
            if _primary_code(err) == sqlite3.SQLITE_READONLY:
                # Not "corrupt": an operator told so may move a good file aside.
                raise StoreError(
                    f"state store {self._path} cannot be written ({err}): the head writes it; give "
                    "this user write access to it and its folder, or mount them read-write"
                ) from err
            if isinstance(err, sqlite3.Error):
                raise StoreError(
                    f"state store {self._path} is unreadable, corrupt, or not a shoal store: {err}; "
                    "restore it from a copy, or move it aside to start this head without its deployments"
                ) from err
            raise
        self._conn = conn

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        fd, self._lock_file = self._lock_file, None
        if fd is not None:
            os.close(fd)  # releases the flock

    @contextmanager
    def _writing(self, conn: sqlite3.Connection) -> Iterator[None]:
        """One write transaction, on the file opened; see the module's docstring."""
        try:
            stat = os.stat(self._path)
            same = (stat.st_dev, stat.st_ino) == self._file_id
        except FileNotFoundError:
            same = False
        if not same:
            gone = StoreError(
                f"state store {self._path} was deleted or replaced while it was open: changes are "
                "refused, as they would not be in the file the next start reads; the deployments "
                "this head runs are in 'shoal status --json' (their specs), to deploy again after "
                "a restart"
            )
            log.error("%s", gone)
            raise gone
        try:
            with _transaction(conn, "IMMEDIATE"):
                yield
        except sqlite3.OperationalError as err:
            if _primary_code(err) == sqlite3.SQLITE_BUSY and not self._busy:
                self._busy = True
                conn.execute(f"PRAGMA busy_timeout = {round(BUSY_RETRY_S * 1000)}")
            raise
        if self._busy:
            self._busy = False
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        self._check_wal()

    def _check_wal(self) -> None:
        """Warn when the write-ahead log has grown past :data:`WAL_WARN_BYTES` (one ``stat``
        a write, about 2 µs): a reader outside this store is holding checkpoints back."""
        try:
            size = self._wal.stat().st_size
        except OSError:
            return
        now = time.monotonic()
        if size > WAL_WARN_BYTES and now - self._wal_warned >= WAL_WARN_EVERY_S:
            self._wal_warned = now
            log.warning(
                "state store %s: its write-ahead log %s is %d MB and cannot be copied back into "
                "the file, because another process holds a read transaction open on it (a sqlite3 "
                "shell left in a transaction, a backup or monitoring tool reading the file); it "
                "grows with every write until that transaction ends, then shrinks to %d MB",
                self._path,
                self._wal,
                size >> 20,
                JOURNAL_SIZE_LIMIT >> 20,
            )

    def _put(self, conn: sqlite3.Connection, key: str, value: str, expected: int | None) -> int | None:
        with self._writing(conn):
            if expected is not None and _key_revision(conn, key) != expected:
                return None
            event = self._change(conn, key, value)
        self._publish([event])
        return event.revision

    def _delete(self, conn: sqlite3.Connection, key: str) -> bool:
        with self._writing(conn):
            if _key_revision(conn, key) == 0:
                return False
            event = self._change(conn, key, None)
        self._publish([event])
        return True

    def _commit(self, conn: sqlite3.Connection, changes: Sequence[tuple[str, str | None]]) -> int:
        """Every change in one transaction; a delete of a missing key is skipped."""
        with self._writing(conn):
            events = [
                self._change(conn, key, value)
                for key, value in changes
                if value is not None or _key_revision(conn, key) != 0
            ]
            revision = _meta(conn, "revision")
        self._publish(events)
        return revision

    def _change(self, conn: sqlite3.Connection, key: str, value: str | None) -> Event:
        """Write one change inside the caller's transaction; its event."""
        revision = _bump(conn)
        if value is None:
            conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            event = Event("delete", key, None, revision)
        else:
            conn.execute(
                "INSERT INTO kv (key, value, revision) VALUES (?, ?, ?) ON CONFLICT (key)"
                " DO UPDATE SET value = excluded.value, revision = excluded.revision",
                (key, value, revision),
            )
            event = Event("put", key, value, revision)
        self._record(conn, event)
        return event

    def _record(self, conn: sqlite3.Connection, event: Event) -> None:
        conn.execute(
            "INSERT INTO changes (revision, kind, key, value) VALUES (?, ?, ?, ?)",
            (event.revision, event.kind, event.key, event.value),
        )
        # The oldest changes go: past history_limit of them, and while the values kept
        # hold more than history_bytes characters (counted in meta, so that a write reads
        # only the values it drops).
        count_cutoff = event.revision - self._history_limit
        kept = _meta(conn, "history_chars") + len(event.value or "")
        cutoff = 0
        oldest = conn.execute("SELECT revision, coalesce(length(value), 0) FROM changes ORDER BY revision")
        try:
            for revision, size in oldest:
                if revision > count_cutoff and kept <= self._history_bytes:
                    break
                cutoff, kept = revision, kept - size
        finally:
            oldest.close()
        conn.execute("UPDATE meta SET value = ? WHERE name = 'history_chars'", (kept,))
        if cutoff > 0:
            conn.execute("DELETE FROM changes WHERE revision <= ?", (cutoff,))
            conn.execute("UPDATE meta SET value = max(value, ?) WHERE name = 'compacted'", (cutoff,))

    def _publish(self, events: Sequence[Event]) -> None:
        # Called after commit, on the one worker thread: call_soon_threadsafe keeps commit
        # order, and the callback runs before the writer's own await resumes.
        assert self._loop is not None
        if events:
            self._loop.call_soon_threadsafe(self._hub.publish, events)


@contextmanager
def _transaction(conn: sqlite3.Connection, mode: Literal["DEFERRED", "IMMEDIATE"]) -> Iterator[None]:
    conn.execute(f"BEGIN {mode}")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _primary_code(err: BaseException) -> int | None:
    """SQLite's primary result code of ``err`` (its extended code's low byte), if any."""
    code = getattr(err, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _hold_lock(path: Path) -> int:
    """Take the exclusive flock on ``<path>.lock``; its fd, which holds it until closed.
    StoreError when another process (or store) holds it."""
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(
            f"state store {path} is open in another process (it holds {lock}): another head "
            "runs on this file, perhaps on another machine sharing the folder; stop it first, "
            "or give this head a state folder of its own"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _init(conn: sqlite3.Connection, path: Path, busy_timeout_ms: int) -> None:
    conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
    (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
    if str(mode).lower() != "wal":
        raise StoreError(f"state store {path}: cannot use WAL mode (the file system gave {mode!r})")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"state store {path} has schema version {version}; this shoal reads up to {SCHEMA_VERSION}"
        )
    with _transaction(conn, "IMMEDIATE"):
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    # An existing file must have the columns this code reads.
    conn.execute("SELECT key, value, revision FROM kv LIMIT 0")
    conn.execute("SELECT revision, kind, key, value FROM changes LIMIT 0")
    _meta(conn, "revision")
    _meta(conn, "compacted")
    _meta(conn, "history_chars")


def _meta(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    if row is None or not isinstance(row[0], int):
        raise StoreError(f"state store is corrupt: meta {name!r} is {row!r}")
    return row[0]


def _bump(conn: sqlite3.Connection) -> int:
    revision = _meta(conn, "revision") + 1
    conn.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (revision,))
    return revision


def _key_revision(conn: sqlite3.Connection, key: str) -> int:
    row = conn.execute("SELECT revision FROM kv WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else 0


def _get(conn: sqlite3.Connection, key: str) -> Entry | None:
    row = conn.execute("SELECT value, revision FROM kv WHERE key = ?", (key,)).fetchone()
    return Entry(key, row[0], row[1]) if row else None


def _list(conn: sqlite3.Connection, prefix: str) -> list[Entry]:
    # TEXT compares as UTF-8 bytes, which orders like Python's code points; keys under the
    # prefix are one contiguous run starting at the prefix.
    entries = []
    cursor = conn.execute("SELECT key, value, revision FROM kv WHERE key >= ? ORDER BY key", (prefix,))
    try:
        for key, value, revision in cursor:
            if not key.startswith(prefix):
                break
            entries.append(Entry(key, value, revision))
    finally:
        cursor.close()  # an unfinished read would pin a WAL snapshot
    return entries


def _history(conn: sqlite3.Connection, prefix: str, start_revision: int) -> list[Event]:
    with _transaction(conn, "DEFERRED"):
        compacted = _meta(conn, "compacted")
        if start_revision < compacted:
            raise WatchLost(
                f"cannot replay {prefix!r} after revision {start_revision}: history starts after {compacted}"
            )
        rows = conn.execute(
            "SELECT revision, kind, key, value FROM changes WHERE revision > ? ORDER BY revision",
            (start_revision,),
        ).fetchall()
    return [
        Event("put" if kind == "put" else "delete", key, value, revision)
        for revision, kind, key, value in rows
        if key.startswith(prefix)
    ]

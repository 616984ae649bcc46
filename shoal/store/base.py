"""The state store seam: keys, values, revisions and watches.

The head keeps all durable state behind :class:`Store`. Implementations: the in-memory
:class:`~shoal.store.memory.MemoryStore` (tests), the embedded
:class:`~shoal.store.sqlite.SqliteStore` (the default) and an etcd store.

Revisions: every committed change (a put, or a delete of a key that existed) bumps one
store-wide counter by one. An empty store is at revision 0, so its first write gets
revision 1. :attr:`Entry.revision` is the revision of the last change to that key. The
changes of one :meth:`Store.commit` take consecutive revisions, in the order it lists
them, and are all visible or none is: a reader never sees part of one.

Watching: :meth:`Store.watch` registers at once, when called, not at the first
``__anext__``; nothing committed after the call is missed. To follow a prefix without a
gap, watch first, then list, and drop events whose revision is not above the listed
entry's revision (a change may show up in both).

Errors: :class:`StoreError` (the store cannot do its job: closed, unreadable, corrupt) and
its subclass :class:`WatchLost` (a watch cannot deliver every event: list again, then
watch again). Both are :class:`shoal.errors.Internal`. Bad keys raise
:class:`shoal.errors.InvalidArgument`.
"""

from __future__ import annotations

import asyncio
import builtins
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, Self

from shoal.errors import Internal, InvalidArgument

DEFAULT_HISTORY_LIMIT = 1000
"""Changes a store remembers for :meth:`Store.watch` replay."""

DEFAULT_HISTORY_BYTES = 64 * 1024 * 1024
"""Characters of values those changes may hold in all; past it the oldest go first. A
thousand applies of the largest spec (each write also a revision row holding it) kept
about 1.2 GB in the SQLite file, all of it read into memory by one replay."""

MAX_COMMIT = 60
"""Changes one :meth:`Store.commit` may hold: etcd refuses a transaction of more than 128
operations (its ``--max-txn-ops`` default), and each change takes two."""

DEFAULT_MAX_PENDING = 10_000
"""Events a watch buffers for a slow consumer before it gives up with :class:`WatchLost`."""


class StoreError(Internal):
    """The store cannot serve the call: it is closed, or its storage is unreadable or corrupt."""


class WatchLost(StoreError):
    """A watch cannot deliver every event under its prefix.

    Raised when ``start_revision`` is older than the history the store keeps, or when the
    consumer fell more than ``max_pending`` events behind. Events delivered before the
    error are complete and in order: resume with ``watch(prefix, start_revision=<last
    revision seen>)``, or list again and watch from there.
    """


@dataclass(frozen=True)
class Entry:
    """A key, its value, and the store revision of the last change to the key."""

    key: str
    value: str
    revision: int


@dataclass(frozen=True)
class Event:
    """One committed change. ``value`` is ``None`` for deletes."""

    kind: Literal["put", "delete"]
    key: str
    value: str | None
    revision: int


class Watch(Protocol):
    """What :meth:`Store.watch` returns: an async iterator of events that can be closed.

    Consume it from one task at a time. ``aclose`` may be called from any task on the
    loop; it ends the iteration. An async generator satisfies this protocol.
    """

    def __aiter__(self) -> AsyncIterator[Event]: ...

    async def __anext__(self) -> Event: ...

    async def aclose(self) -> None: ...


class Store(Protocol):
    """A key-value store with a store-wide revision and watches.

    Concurrency: every method must be used from the event loop the store was opened on (not
    from other threads). Any number of tasks may call any methods concurrently; each write
    is atomic and revisions are handed out in commit order. A write whose caller is
    cancelled may or may not have been applied. After :meth:`close`, every call raises
    :class:`StoreError` and open watches end.
    """

    async def get(self, key: str) -> Entry | None:
        """The entry at ``key``, or ``None`` when there is none."""
        ...

    async def put(self, key: str, value: str) -> int:
        """Set ``key`` to ``value`` unconditionally; return the new store revision."""
        ...

    async def put_if(self, key: str, value: str, expected_revision: int) -> int | None:
        """Compare-and-set: write only if the key's revision is ``expected_revision``.

        ``expected_revision=0`` means the key must not exist. Returns the new store
        revision, or ``None`` (nothing written) when the key's revision differs.
        """
        ...

    async def delete(self, key: str) -> bool:
        """Remove ``key``. Returns whether it existed; only then is the revision bumped."""
        ...

    async def commit(self, puts: Mapping[str, str], deletes: Sequence[str] = ()) -> int:
        """Set every key of ``puts`` and remove every key of ``deletes``, all or nothing.

        The changes take consecutive revisions: the puts in the mapping's order, then the
        deletes of keys that exist (a missing one is skipped, as :meth:`delete` does).
        Returns the new store revision (the current one when nothing changed). When the
        store refuses any of it (a value too large for etcd, a full disk) nothing is
        written and :class:`StoreError` is raised. InvalidArgument for a bad key or value,
        or a key both put and deleted. On etcd, at most :data:`MAX_COMMIT` changes.
        """
        ...

    async def list(self, prefix: str = "") -> builtins.list[Entry]:
        """Every entry whose key starts with ``prefix``, sorted by key (code point order)."""
        ...

    def watch(self, prefix: str = "", start_revision: int | None = None) -> Watch:
        """Events for keys under ``prefix`` in revision order, starting now.

        Registers before returning. With ``start_revision``, the watch first replays the
        changes with a revision above it, then continues live; if the store no longer
        remembers that far back, iteration raises :class:`WatchLost`. Without it, the
        watch may also deliver a change committed just before the call. The iteration
        ends when the store closes. Close the watch when done with it.
        """
        ...

    async def close(self) -> None:
        """Release the store's resources and end its watches. Idempotent."""
        ...


class Batch:
    """Writes gathered for one :meth:`Store.commit`, and what to do once it succeeded.

    For a change that writes several keys (a spec, its revision row, its event): gather
    them, then :meth:`commit`; the callbacks given to :meth:`then` (the caller's in-memory
    updates) run only when the store took every write, in the order given. The last word
    on a key wins: a put after a delete of it puts, a delete after a put deletes.
    """

    def __init__(self) -> None:
        self.puts: dict[str, str] = {}
        self.deletes: dict[str, None] = {}
        self._then: builtins.list[Callable[[], None]] = []

    def put(self, key: str, value: str) -> None:
        self.deletes.pop(key, None)
        self.puts[key] = value

    def delete(self, key: str) -> None:
        self.puts.pop(key, None)
        self.deletes[key] = None

    def then(self, update: Callable[[], None]) -> None:
        """Call ``update`` once the batch is committed (never when the commit fails)."""
        self._then.append(update)

    async def commit(self, store: Store) -> int:
        """Write the batch with one :meth:`Store.commit`, then run the updates; the new
        store revision. Raises what the commit raises, nothing written or updated then."""
        revision = await store.commit(self.puts, builtins.list(self.deletes))
        for update in self._then:
            update()
        return revision


def check_key(key: str) -> None:
    """Raise :class:`InvalidArgument` unless ``key`` is a non-empty string storable as UTF-8."""
    if not isinstance(key, str) or not key:
        raise InvalidArgument(f"store keys must be non-empty strings, got {key!r}")
    check_text(key, "key")


def check_text(text: str, what: str) -> None:
    """Raise :class:`InvalidArgument` unless ``text`` is a string storable as UTF-8."""
    if not isinstance(text, str):
        raise InvalidArgument(f"store {what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidArgument(f"store {what} is not valid unicode: {err}") from None


def check_commit(puts: Mapping[str, str], deletes: Sequence[str]) -> builtins.list[str]:
    """Validate the arguments of :meth:`Store.commit`; the keys to delete, once each."""
    for key, value in puts.items():
        check_key(key)
        check_text(value, "value")
    if isinstance(deletes, str):
        raise InvalidArgument("store commit: deletes must be a sequence of keys, not one string")
    gone = builtins.list(dict.fromkeys(deletes))
    for key in gone:
        check_key(key)
        if key in puts:
            raise InvalidArgument(f"store commit: key {key!r} is both put and deleted")
    if len(puts) + len(gone) > MAX_COMMIT:
        raise InvalidArgument(
            f"store commit: {len(puts) + len(gone)} changes; one commit holds at most {MAX_COMMIT}"
        )
    return gone


def check_revision(revision: int, what: str) -> None:
    """Raise :class:`InvalidArgument` unless ``revision`` is an integer >= 0."""
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
        raise InvalidArgument(f"{what} must be an integer >= 0, got {revision!r}")


def check_watch(prefix: str, start_revision: int | None) -> None:
    """Validate the arguments of :meth:`Store.watch`."""
    check_text(prefix, "prefix")
    if start_revision is not None:
        check_revision(start_revision, "start_revision")


class BufferedWatch:
    """A :class:`Watch` fed by a :class:`WatchHub`; what both built-in stores return.

    Live events are buffered from construction. When ``replay`` is given, the first
    ``__anext__`` awaits it (the changes after ``start_revision`` that the store remembers)
    and merges it in front of the live buffer, dropping duplicates by revision.
    """

    def __init__(
        self,
        prefix: str,
        *,
        start_revision: int | None,
        replay: Callable[[], Awaitable[Sequence[Event]]] | None,
        max_pending: int,
        on_close: Callable[[BufferedWatch], None],
        after: int = 0,
    ) -> None:
        self._prefix = prefix
        # Events at or below this revision are not delivered: those before ``start_revision``,
        # or without one, those committed before the watch (``after``).
        self._floor = start_revision if start_revision is not None else after
        self._replay = replay
        self._max_pending = max_pending
        self._on_close = on_close
        self._pending: deque[Event] = deque()
        self._wake = asyncio.Event()
        self._error: WatchLost | None = None
        self._ended = False  # no more live events will come; deliver what is buffered
        self._closed = False  # the consumer is done; deliver nothing more

    def push(self, event: Event) -> None:
        """Buffer ``event`` if it is under the prefix and new. Call on the loop thread only."""
        if self._ended or event.revision <= self._floor or not event.key.startswith(self._prefix):
            return
        if len(self._pending) >= self._max_pending:
            self._error = WatchLost(
                f"watch on {self._prefix!r} fell more than {self._max_pending} events behind "
                f"at revision {event.revision}"
            )
            self._end()
            return
        self._pending.append(event)
        self._wake.set()

    def end(self) -> None:
        """The source is gone (the store closed): stop after what is buffered."""
        self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._on_close(self)
        self._wake.set()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        if self._replay is not None and not self._ended and not self._closed:
            try:
                history = await self._replay()
            except WatchLost:
                await self.aclose()
                raise
            # Only after success: a cancelled replay is retried by the next __anext__.
            self._replay = None
            if history:
                floor = max(self._floor, history[-1].revision)
                live = [e for e in self._pending if e.revision > floor]
                replayed = [e for e in history if e.revision > self._floor]
                self._pending = deque([*replayed, *live])
                self._floor = floor
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._pending:
                event = self._pending.popleft()
                self._floor = max(self._floor, event.revision)
                return event
            if self._error is not None:
                error, self._error = self._error, None
                self._closed = True
                raise error
            if self._ended:
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()

    async def aclose(self) -> None:
        """Stop watching now; buffered events are dropped. Idempotent."""
        self._closed = True
        self._pending.clear()
        self._end()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class WatchHub:
    """Fans committed events out to a store's in-process watches.

    For :class:`Store` implementations. Use on the event loop thread only. Watches are
    held weakly: one its consumer dropped goes away without being closed.
    """

    def __init__(self, *, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self._max_pending = max_pending
        self._watches: weakref.WeakSet[BufferedWatch] = weakref.WeakSet()

    def watch(
        self,
        prefix: str,
        start_revision: int | None,
        replay: Callable[[], Awaitable[Sequence[Event]]] | None,
        *,
        after: int = 0,
    ) -> BufferedWatch:
        """Register a new watch; it buffers every event published from now on, above
        revision ``after`` when it has no ``start_revision``: a store whose events are
        published later than its writes are answered (etcd's) names the newest revision
        written so far, which the watch must not be handed.

        The caller validates ``prefix`` and ``start_revision`` (:func:`check_watch`).
        """
        watch = BufferedWatch(
            prefix,
            start_revision=start_revision,
            replay=replay,
            max_pending=self._max_pending,
            on_close=self._watches.discard,
            after=after,
        )
        self._watches.add(watch)
        return watch

    def publish(self, events: Sequence[Event]) -> None:
        """Hand committed ``events`` (in revision order) to every watch."""
        for watch in list(self._watches):
            for event in events:
                watch.push(event)

    def close(self) -> None:
        """End every watch after what it has buffered."""
        for watch in list(self._watches):
            watch.end()
        self._watches.clear()

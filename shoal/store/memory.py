"""An in-memory :class:`~shoal.store.base.Store`: no I/O, for tests of the head's control loop."""

from __future__ import annotations

import builtins
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Self

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


class MemoryStore:
    """A dict behind the :class:`~shoal.store.base.Store` protocol; nothing survives ``close``.

    Behaves like the durable stores, revisions and watch replay included. Every method
    runs to completion without yielding to the event loop, so each call is atomic; use it
    from one event loop. ``history_limit`` changes are kept for watch replay;
    ``max_pending`` bounds each watch's buffer.
    """

    def __init__(
        self, *, history_limit: int = DEFAULT_HISTORY_LIMIT, max_pending: int = DEFAULT_MAX_PENDING
    ) -> None:
        if history_limit < 1 or max_pending < 1:
            raise ValueError("history_limit and max_pending must be >= 1")
        self._entries: dict[str, Entry] = {}
        self._revision = 0
        self._history: deque[Event] = deque(maxlen=history_limit)
        self._compacted = 0  # the newest revision dropped from the history
        self._hub = WatchHub(max_pending=max_pending)
        self._closed = False

    async def get(self, key: str) -> Entry | None:
        self._check_open()
        check_key(key)
        return self._entries.get(key)

    async def put(self, key: str, value: str) -> int:
        self._check_open()
        check_key(key)
        check_text(value, "value")
        return self._commit(Event("put", key, value, self._revision + 1))

    async def put_if(self, key: str, value: str, expected_revision: int) -> int | None:
        self._check_open()
        check_key(key)
        check_text(value, "value")
        check_revision(expected_revision, "expected_revision")
        current = self._entries.get(key)
        if (current.revision if current else 0) != expected_revision:
            return None
        return self._commit(Event("put", key, value, self._revision + 1))

    async def delete(self, key: str) -> bool:
        self._check_open()
        check_key(key)
        if key not in self._entries:
            return False
        self._commit(Event("delete", key, None, self._revision + 1))
        return True

    async def commit(self, puts: Mapping[str, str], deletes: Sequence[str] = ()) -> int:
        self._check_open()
        gone = [key for key in check_commit(puts, deletes) if key in self._entries]
        changes = [*((key, value) for key, value in puts.items()), *((key, None) for key in gone)]
        events = [
            Event("put" if value is not None else "delete", key, value, self._revision + i)
            for i, (key, value) in enumerate(changes, start=1)
        ]
        for event in events:
            self._commit(event)
        return self._revision

    async def list(self, prefix: str = "") -> builtins.list[Entry]:
        self._check_open()
        check_text(prefix, "prefix")
        return [self._entries[k] for k in sorted(k for k in self._entries if k.startswith(prefix))]

    def watch(self, prefix: str = "", start_revision: int | None = None) -> Watch:
        self._check_open()
        check_watch(prefix, start_revision)
        replay = None
        if start_revision is not None:
            # Taken now, so the replay covers exactly what the live buffer does not.
            history = self._replay(prefix, start_revision)

            async def replay_now() -> Sequence[Event]:
                if isinstance(history, WatchLost):
                    raise history
                return history

            replay = replay_now
        return self._hub.watch(prefix, start_revision, replay)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hub.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _replay(self, prefix: str, start_revision: int) -> builtins.list[Event] | WatchLost:
        if start_revision < self._compacted:
            return WatchLost(
                f"cannot replay {prefix!r} after revision {start_revision}: "
                f"history starts after {self._compacted}"
            )
        return [e for e in self._history if e.revision > start_revision and e.key.startswith(prefix)]

    def _commit(self, event: Event) -> int:
        if event.kind == "put":
            assert event.value is not None
            self._entries[event.key] = Entry(event.key, event.value, event.revision)
        else:
            del self._entries[event.key]
        self._revision = event.revision
        if len(self._history) == self._history.maxlen:
            self._compacted = self._history[0].revision
        self._history.append(event)
        self._hub.publish([event])
        return event.revision

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the store is closed")

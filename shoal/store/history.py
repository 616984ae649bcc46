"""What happened to deployments, kept in the store: revisions per deployment and lifecycle
events cluster-wide, both bounded.

Keys (over any :class:`~shoal.store.base.Store`, so every store keeps them)::

    revisions/<deployment>/<number, 10 digits>   a Revision as JSON
    revision-floor                                the revision numbering's floor (below)
    events/<sequence, 12 digits>                  a LifecycleEvent as JSON

Revision numbers of a name never repeat, so that an ``if_revision`` read before a delete
never matches a deployment of that name created after it. A deployment's numbers go up by
one; one with none kept starts above ``above`` (the number its tombstone holds, the last
of the deployment deleted: :meth:`StagedHistory.forget` returns it) and above the floor,
the highest number of the deleted deployments whose tombstones are gone
(:meth:`StagedHistory.raise_floor`). Storage stays bounded: one number per tombstone, one
for the whole store, none for every name ever used.

:class:`History` loads both at :meth:`History.load` and keeps a copy in memory; reads are
from memory, writes go to the store first. A change that writes several rows (a revision and
the oldest it pushes out, an event and the one it evicts) is one
:meth:`~shoal.store.base.Store.commit`; :meth:`History.staged` gathers them into a
:class:`~shoal.store.base.Batch` of the caller's, so that a head commits a deployment's spec
with its revision and event, all or nothing. A row that does not parse (written by hand or
by another version) is skipped with a warning, never fatal. Not safe for concurrent
writers: the head calls it under its lock.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Any

from shoal.errors import InvalidArgument
from shoal.store.base import Batch, Store

log = logging.getLogger("shoal.store")

REVISIONS = "revisions/"
EVENTS = "events/"
FLOOR = "revision-floor"
MAX_REVISIONS = 20
"""Revisions kept per deployment; the oldest goes when a new one comes."""
MAX_EVENTS = 1000
"""Lifecycle events kept for the whole cluster. Past it the oldest event of the deployment
holding the most goes (of the oldest such when several hold as many): a deployment whose
replicas fail over and over cannot push every other deployment's events out."""
EVENT_KINDS = ("created", "updated", "failed", "rolled_back", "restarted", "scaled", "deleted")
MAX_MESSAGE = 1000
"""Longest event message kept (characters); a longer one is cut and ends with an ellipsis."""
MAX_REVISION = 2**31 - 1
"""The highest revision number an apply's ``if_revision`` may name (an int32 on the wire)."""


def check_if_revision(value: object) -> int:
    """An apply's ``if_revision`` (the revision the deployment must be at, 0: that it must not
    exist) as an integer; InvalidArgument for a negative number or one that is no integer."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_REVISION:
        raise InvalidArgument(
            f"if_revision must be a revision number from 1 to {MAX_REVISION}, or 0 for a deployment "
            f"that does not exist yet; got {value!r}"
        )
    return value


@dataclass(frozen=True)
class LifecycleEvent:
    """Something that happened to a deployment. ``time``: unix seconds; ``revision``: the
    revision it made or concerns, when there is one; ``message``: one line."""

    time: float
    deployment: str
    kind: str
    revision: int | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Revision:
    """One version of a deployment's spec: a new one for every change that replaces its
    replicas (``created``, ``updated``, ``restarted``, ``rolled_back``).

    ``change``: what changed, one line. ``outcome``: ``""`` (no verdict), or ``failed: ...``
    once its replicas kept dying before READY. ``rollback_to``: for a rollback, the revision
    whose spec it applies again (0 otherwise)."""

    number: int
    time: float
    kind: str
    spec_json: str
    spec_hash: str
    change: str
    outcome: str = ""
    rollback_to: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Kept:
    """The revisions and events kept, and the reads over them."""

    def __init__(self, max_revisions: int, max_events: int) -> None:
        self.max_revisions = max_revisions
        self._max_events = max_events
        self._revisions: dict[str, list[Revision]] = {}
        self._events: deque[tuple[int, LifecycleEvent]] = deque()
        self._per_deployment: collections.Counter[str] = collections.Counter()
        self._next_event = 1
        self.floor = 0  # a deployment with no revisions kept numbers above it
        self._counted: dict[str, tuple[list[Revision], int]] = {}  # spec_chars's counts

    def events(self, deployment: str = "", limit: int = 0) -> list[LifecycleEvent]:
        """Events, oldest first: of ``deployment`` only when given, the last ``limit`` when > 0."""
        out = [e for _, e in self._events if not deployment or e.deployment == deployment]
        return out[-limit:] if limit > 0 else out

    def revisions(self, deployment: str) -> list[Revision]:
        """The deployment's revisions kept, oldest first."""
        return list(self._revisions.get(deployment, []))

    def current(self, deployment: str) -> Revision | None:
        revs = self._revisions.get(deployment)
        return revs[-1] if revs else None

    def get(self, deployment: str, number: int) -> Revision | None:
        return next((r for r in self._revisions.get(deployment, []) if r.number == number), None)

    def spec_chars(self) -> int:
        """Characters of spec JSON in every revision kept (``max_specs_mb``). Each
        deployment's count is kept with its list of revisions and taken again when the list
        is another: a kept list is never changed in place (a ``StagedHistory`` changes a copy
        of it). Summing every revision at each apply took 11 ms at 2,000 deployments of 20
        revisions each; this, 2,000 look-ups."""
        counted: dict[str, tuple[list[Revision], int]] = {}
        for name, revs in self._revisions.items():
            kept = self._counted.get(name)
            if kept is None or kept[0] is not revs:
                kept = (revs, sum(len(r.spec_json) for r in revs))
            counted[name] = kept
        self._counted = counted
        return sum(chars for _, chars in counted.values())


class History(_Kept):
    """Revisions and lifecycle events of the deployments, over a store.

    Each write method is one store commit; :meth:`staged` gathers several into the
    caller's batch instead."""

    def __init__(
        self, store: Store, *, max_revisions: int = MAX_REVISIONS, max_events: int = MAX_EVENTS
    ) -> None:
        if max_revisions < 1 or max_events < 1:
            raise ValueError("max_revisions and max_events must be >= 1")
        super().__init__(max_revisions, max_events)
        self.store = store

    async def load(self) -> None:
        """Read every revision and event the store holds."""
        self._revisions = {}
        for entry in await self.store.list(REVISIONS):
            name, _, number = entry.key.removeprefix(REVISIONS).rpartition("/")
            try:
                rev = Revision(**json.loads(entry.value))
                if str(rev.number) != number.lstrip("0"):
                    raise ValueError(f"it holds revision {rev.number}")
            except (ValueError, TypeError, RecursionError) as err:
                log.warning("skipping unreadable revision row %r: %s", entry.key, err)
                continue
            self._revisions.setdefault(name, []).append(rev)
        self._events = deque()
        entries = await self.store.list(EVENTS)
        for entry in entries:
            try:
                seq = int(entry.key.removeprefix(EVENTS))
                event = LifecycleEvent(**json.loads(entry.value))
            except (ValueError, TypeError, RecursionError) as err:
                log.warning("skipping unreadable event row %r: %s", entry.key, err)
                continue
            self._events.append((seq, event))
        self._per_deployment = collections.Counter(e.deployment for _, e in self._events)
        floor = await self.store.get(FLOOR)
        self.floor = 0
        if floor is not None:
            try:
                self.floor = int(floor.value)
            except ValueError:
                log.warning("skipping unreadable revision floor %r: %r", FLOOR, floor.value)
        if entries:
            try:
                self._next_event = int(entries[-1].key.removeprefix(EVENTS)) + 1
            except ValueError:
                self._next_event = len(entries) + 1

    def staged(self, batch: Batch) -> StagedHistory:
        """A copy of what is kept whose writes go into ``batch``; it becomes this history's
        own once the batch is committed, and is dropped when the commit fails. Reads from it
        see its writes. One at a time, under the writer's lock, committed or dropped before
        this history is written again."""
        return StagedHistory(self, batch)

    async def record(
        self, deployment: str, kind: str, message: str, revision: int | None = None
    ) -> LifecycleEvent:
        """:meth:`StagedHistory.record`, committed at once."""
        batch = Batch()
        event = self.staged(batch).record(deployment, kind, message, revision)
        await batch.commit(self.store)
        return event

    async def add_revision(
        self,
        deployment: str,
        kind: str,
        spec_json: str,
        spec_hash: str,
        change: str,
        rollback_to: int = 0,
        *,
        above: int = 0,
    ) -> Revision:
        """:meth:`StagedHistory.add_revision`, committed at once."""
        batch = Batch()
        rev = self.staged(batch).add_revision(
            deployment, kind, spec_json, spec_hash, change, rollback_to, above=above
        )
        await batch.commit(self.store)
        return rev

    async def set_outcome(self, deployment: str, number: int, outcome: str) -> None:
        """:meth:`StagedHistory.set_outcome`, committed at once."""
        batch = Batch()
        self.staged(batch).set_outcome(deployment, number, outcome)
        await batch.commit(self.store)

    async def forget(self, deployment: str) -> int:
        """:meth:`StagedHistory.forget`, committed at once."""
        batch = Batch()
        last = self.staged(batch).forget(deployment)
        await batch.commit(self.store)
        return last

    async def raise_floor(self, number: int) -> None:
        """:meth:`StagedHistory.raise_floor`, committed at once."""
        batch = Batch()
        self.staged(batch).raise_floor(number)
        await batch.commit(self.store)

    def _adopt(self, staged: StagedHistory) -> None:
        self._revisions = staged._revisions
        self._events = staged._events
        self._per_deployment = staged._per_deployment
        self._next_event = staged._next_event
        self.floor = staged.floor


class StagedHistory(_Kept):
    """A history's writes gathered into a batch (:meth:`History.staged`)."""

    def __init__(self, history: History, batch: Batch) -> None:
        super().__init__(history.max_revisions, history._max_events)
        self._batch = batch
        self._revisions = dict(history._revisions)  # each list copied before it changes
        self._copied: set[str] = set()
        self._events = deque(history._events)
        self._per_deployment = collections.Counter(history._per_deployment)
        self._next_event = history._next_event
        self.floor = history.floor
        batch.then(lambda: history._adopt(self))

    def record(self, deployment: str, kind: str, message: str, revision: int | None = None) -> LifecycleEvent:
        """Keep an event (its message made one line of at most MAX_MESSAGE characters); past
        ``max_events`` the oldest of the deployment holding the most goes (MAX_EVENTS)."""
        line = " ".join(message.split("\n"))
        if len(line) > MAX_MESSAGE:
            line = line[: MAX_MESSAGE - 1] + "…"
        event = LifecycleEvent(time.time(), deployment, kind, revision, line)
        seq = self._next_event
        self._batch.put(f"{EVENTS}{seq:012d}", json.dumps(event.to_dict()))
        self._next_event += 1
        self._events.append((seq, event))
        self._per_deployment[deployment] += 1
        while len(self._events) > self._max_events:
            self._evict()
        return event

    def _evict(self) -> None:
        """Forget the oldest event of the deployment holding the most."""
        most = max(self._per_deployment.values())
        at = next(i for i, (_, e) in enumerate(self._events) if self._per_deployment[e.deployment] == most)
        seq, event = self._events[at]
        del self._events[at]
        self._per_deployment[event.deployment] -= 1
        if not self._per_deployment[event.deployment]:
            del self._per_deployment[event.deployment]
        self._batch.delete(f"{EVENTS}{seq:012d}")

    def add_revision(
        self,
        deployment: str,
        kind: str,
        spec_json: str,
        spec_hash: str,
        change: str,
        rollback_to: int = 0,
        *,
        above: int = 0,
    ) -> Revision:
        """A new revision, numbered one above the last; the oldest goes past ``max_revisions``.
        The first of a deployment with none kept: one above ``above`` (the last number of a
        deployment of that name deleted before, from its tombstone) and the floor."""
        revs = self._own(deployment)
        number = (revs[-1].number if revs else max(above, self.floor)) + 1
        rev = Revision(number, time.time(), kind, spec_json, spec_hash, change, rollback_to=rollback_to)
        self._put(deployment, rev)
        revs.append(rev)
        while len(revs) > self.max_revisions:
            old = revs.pop(0)
            self._batch.delete(_revision_key(deployment, old.number))
        return rev

    def set_outcome(self, deployment: str, number: int, outcome: str) -> None:
        """Record how a revision ended (``failed: ...``). Nothing when it is no longer kept."""
        revs = self._own(deployment)
        for i, rev in enumerate(revs):
            if rev.number == number:
                revs[i] = replace(rev, outcome=outcome)
                self._put(deployment, revs[i])
        if not revs:
            del self._revisions[deployment]

    def forget(self, deployment: str) -> int:
        """Drop a deleted deployment's revisions (its events stay). The number of its last (0:
        none kept), for its tombstone to keep: a deployment of that name created while the
        tombstone is there numbers above it (``add_revision``'s ``above``), and once it
        goes, :meth:`raise_floor` takes the number."""
        self._copied.discard(deployment)
        revs = self._revisions.pop(deployment, [])
        for rev in revs:
            self._batch.delete(_revision_key(deployment, rev.number))
        return revs[-1].number if revs else 0

    def raise_floor(self, number: int) -> None:
        """A tombstone goes that held ``number`` (:meth:`forget`): from now on a deployment
        with no revisions kept numbers above it, whatever its name."""
        if number > self.floor:
            self.floor = number
            self._batch.put(FLOOR, str(number))

    def _own(self, deployment: str) -> list[Revision]:
        """The deployment's revisions, copied the first time this draft changes them."""
        if deployment not in self._copied:
            self._copied.add(deployment)
            self._revisions[deployment] = list(self._revisions.get(deployment, []))
        return self._revisions.setdefault(deployment, [])

    def _put(self, deployment: str, rev: Revision) -> None:
        self._batch.put(_revision_key(deployment, rev.number), json.dumps(rev.to_dict()))


def _revision_key(deployment: str, number: int) -> str:
    return f"{REVISIONS}{deployment}/{number:010d}"

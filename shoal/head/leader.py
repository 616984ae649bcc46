"""Which of several heads on one store leads: an election over a lease, and the fence.

Heads that share an etcd store campaign for one key (``<root>leader``). The key is created
only when it does not exist (an etcd transaction on ``create_revision == 0``) and is
attached to a lease that the leader renews every third of its TTL. The others stand by: they
read the key to tell callers where the leader is, and claim it once it is gone (the leader
resigned, or its lease ran out because it died or lost etcd).

The leader fences its store on the key's value (:meth:`LeaseBackend.fence`): each write
compares it in the same transaction, so once the lease is gone nothing this head writes
lands. It also stops acting on its own: a leader that has not renewed its lease by the time
the lease could have run out (measured from when its last successful renewal was *sent*)
gives up, before any standby can have claimed the key. The caller then stops the head.

Not thread-safe; one event loop. :class:`Leadership` spawns nothing: its caller runs
:meth:`Leadership.campaign` then :meth:`Leadership.hold` in a task it owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

from shoal.core.clock import wait_for
from shoal.errors import ShoalError, Unavailable

log = logging.getLogger("shoal.head")

_MARGIN_S = 0.1
"""A leader stops acting this long before its lease could run out (clock drift, the call)."""
_RETRY_S = 0.05
"""After a failed renewal, the next try comes this soon."""


@dataclass(frozen=True)
class LeaderInfo:
    """Where a head answers (its advertised gRPC and REST addresses), and a token unique to
    this campaign (so that a restarted head on the same address is a different leader)."""

    grpc: str
    http: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LeaderInfo | None:
        """The leader a key holds; ``None`` for a value no head wrote."""
        try:
            data = json.loads(text)
            return cls(str(data["grpc"]), str(data["http"]), str(data["token"]))
        except (ValueError, KeyError, TypeError):
            return None


class LeaseBackend(Protocol):
    """What an election needs from the store (``shoal.store.etcd.EtcdStore`` has it).

    Every method raises :class:`~shoal.store.base.StoreError` when the store cannot answer.
    """

    async def grant_lease(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds; its id."""
        ...

    async def renew_lease(self, lease: int) -> int:
        """Renew ``lease``; the seconds it now has left (0 or less: it is gone)."""
        ...

    async def revoke_lease(self, lease: int) -> None:
        """End ``lease`` now; keys attached to it are deleted."""
        ...

    async def create_leased(self, key: str, value: str, lease: int) -> bool:
        """Create ``key`` (attached to ``lease``) only if it does not exist; whether it did."""
        ...

    async def read_key(self, key: str) -> str | None:
        """The value of ``key``, or ``None``."""
        ...

    def fence(self, key: str, value: str, on_fenced: Callable[[], None] | None = None) -> None:
        """Make every later write of the store require ``key`` to hold ``value``; call
        ``on_fenced`` when a write is refused for that."""
        ...


def lease_ttl(dead_after_s: float) -> int:
    """The leader lease's TTL for a cluster whose schedulers die after ``dead_after_s``:
    about 60% of it (whole seconds, at least 1), so that with the standbys' polling a new
    head leads within ``dead_after_s`` of the leader's death."""
    return max(1, math.floor(dead_after_s * 0.6))


class Leadership:
    """One head's part in the election for ``key``.

    ``leading``: whether this head leads now (and may act). ``serving``: set by the caller
    once the head has loaded its state as leader; the head answers calls only then (cleared
    with ``leading``). ``leader``: the head that leads, as last read (this one while leading;
    ``None`` when nobody does or it is not known yet). ``on_change`` is called after
    ``leader`` changes.
    """

    def __init__(
        self,
        backend: LeaseBackend,
        key: str,
        me: LeaderInfo,
        *,
        ttl_s: int,
        poll_s: float | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        if ttl_s < 1:
            raise ValueError("ttl_s must be >= 1")
        self.backend = backend
        self.key = key
        self.me = me
        self.ttl_s = ttl_s
        self.poll_s = poll_s if poll_s is not None else min(0.5, ttl_s / 4)
        self.leading = False
        self.serving = False
        self.leader: LeaderInfo | None = None
        self._on_change = on_change or (lambda: None)
        self._lease = 0
        self._valid_until = 0.0  # monotonic time by which the lease may have run out
        self._deposed = asyncio.Event()  # set when the store refused a write, or by step_down
        self._stepping_down = ""  # why step_down was called

    def describe(self) -> str:
        """One line for callers of a standby: who leads."""
        if self.leading:
            if not self.serving:
                return "this head has just been elected and is loading the cluster state"
            return f"this head leads ({self.me.grpc})"
        if self.leader is None:
            return "this head stands by; no head leads right now (an election is under way)"
        return f"this head stands by; the leader is at {self.leader.grpc} (REST {self.leader.http})"

    async def campaign(self) -> None:
        """Return once this head leads, its store fenced on the key. Until then follow the
        leader (``leader``) every ``poll_s``. Store errors are logged and retried."""
        value = self.me.to_json()
        quiet = False
        while True:
            try:
                holder = await self.backend.read_key(self.key)
                if holder is None:
                    if await self._claim(value):
                        return
                    holder = await self.backend.read_key(self.key)
                self._set_leader(LeaderInfo.from_json(holder) if holder is not None else None)
                quiet = False
            except ShoalError as err:
                if not quiet:
                    log.warning("leader election: the store does not answer: %s (retrying)", err)
                    quiet = True
            await asyncio.sleep(self.poll_s)

    async def _claim(self, value: str) -> bool:
        sent = time.monotonic()
        lease = await self.backend.grant_lease(self.ttl_s)
        try:
            won = await self.backend.create_leased(self.key, value, lease)
        except BaseException:
            await _quietly(self.backend.revoke_lease(lease))
            raise
        if not won:
            await _quietly(self.backend.revoke_lease(lease))
            return False
        self._lease = lease
        self._valid_until = sent + self.ttl_s
        self._deposed = asyncio.Event()
        self._stepping_down = ""
        self.backend.fence(self.key, value, self._deposed.set)
        self.leading = True
        self._set_leader(self.me)
        log.info("this head leads now (lease %x, TTL %ds)", lease, self.ttl_s)
        return True

    async def hold(self) -> None:
        """Renew the lease every third of its TTL (soon again after a failure); return once
        leadership is lost: etcd says the lease is gone, it was not renewed in time (then it
        may have run out), or the store refused a write as fenced. ``leading`` is already
        false when this returns (or raises).

        Cancelled (the head shuts down), the lease is still this head's: :meth:`resign`
        revokes it then. Returned, there is nothing left to give up (lost, or revoked here)."""
        assert self.leading, "hold() after campaign()"
        try:
            await self._renew()
            self._lease = 0
        finally:
            self.leading = self.serving = False
            self._set_leader(None)

    async def _renew(self) -> None:
        pause = self.ttl_s / 3
        while True:
            # Never past the moment the lease may run out; at once when a write was fenced.
            with contextlib.suppress(TimeoutError):
                await wait_for(self._deposed.wait(), max(0.0, min(pause, self._left())))
            if self._deposed.is_set() and self._stepping_down:
                log.error("leadership given up: %s", self._stepping_down)
                # Revoked, the key goes at once: a standby leads without waiting out the TTL.
                await _quietly(self.backend.revoke_lease(self._lease))
                return
            if self._deposed.is_set():
                log.error("leadership lost: the store refused a write (another head leads)")
                return
            sent = time.monotonic()
            left = self._left()
            if left <= 0:
                log.error("leadership lost: the lease was not renewed within its TTL")
                return
            try:
                # One try may hang on an etcd member that just died: give each a share of
                # the time left, and try again soon (etcd elects a new leader in a second).
                remaining = await wait_for(
                    self.backend.renew_lease(self._lease), min(left, max(0.2, self.ttl_s / 3))
                )
            except (ShoalError, TimeoutError) as err:
                if pause != _RETRY_S:  # once per outage
                    log.warning("leader lease not renewed: %s (retrying)", err or "timed out")
                pause = _RETRY_S
                continue
            pause = self.ttl_s / 3
            if remaining <= 0:
                log.error("leadership lost: the lease ran out (another head may lead now)")
                return
            self._valid_until = sent + min(remaining, self.ttl_s)

    def step_down(self, reason: str) -> None:
        """Stop leading on purpose: ``hold`` revokes the lease and returns (so a standby leads
        at once), and the caller stops the head as when leadership is lost."""
        if self.leading and not self._stepping_down:
            self._stepping_down = reason
            self._deposed.set()

    def _left(self) -> float:
        """Seconds this head may still act as leader (a margin short of the lease's end)."""
        return self._valid_until - time.monotonic() - _MARGIN_S

    async def resign(self) -> None:
        """Give up leading now: revoke the lease, so that a standby claims the key at once.
        Also after :meth:`hold` was cancelled (which already cleared ``leading``): the lease
        outlives it until revoked. Waits at most the lease's TTL (etcd unreachable: the lease
        runs out by itself by then)."""
        lease, self._lease = self._lease, 0
        self.leading = self.serving = False
        if lease:
            try:
                await wait_for(_quietly(self.backend.revoke_lease(lease)), self.ttl_s)
            except TimeoutError:
                log.warning("leader election: lease not revoked in %ds (etcd does not answer)", self.ttl_s)
            self._set_leader(None)

    def _set_leader(self, leader: LeaderInfo | None) -> None:
        if leader != self.leader:
            self.leader = leader
            self._on_change()


async def _quietly(aw: object) -> None:
    try:
        await aw  # type: ignore[misc]
    except ShoalError as err:
        log.warning("leader election: %s", err)


def standby_error(leadership: Leadership) -> Unavailable:
    """What a standby head answers every call with (UNAVAILABLE: callers move to another head)."""
    return Unavailable(leadership.describe())

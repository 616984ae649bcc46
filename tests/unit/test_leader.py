"""The head election (shoal.head.leader) over an in-memory lease backend: who leads, what a
standby says, and a leader cut off from its store giving up before its lease can run out.
The same election over real etcd: tests/integration/test_standby_heads.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from shoal.errors import Unavailable
from shoal.head.leader import LeaderInfo, Leadership, lease_ttl, standby_error
from shoal.store.base import StoreError

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(10)]


class Backend:
    """Leases that never run out by themselves; ``cut_off`` makes every call hang."""

    def __init__(self) -> None:
        self.keys: dict[str, tuple[str, int]] = {}
        self.leases: set[int] = set()
        self.fenced: tuple[str, str] | None = None
        self.on_fenced: Callable[[], None] | None = None
        self.cut_off = False
        self.failing = False
        self._next = 0

    async def _reach(self) -> None:
        if self.failing:
            raise StoreError("etcd is unreachable")
        if self.cut_off:
            await asyncio.Event().wait()

    async def grant_lease(self, ttl_s: int) -> int:
        await self._reach()
        self._next += 1
        self.leases.add(self._next)
        return self._next

    async def renew_lease(self, lease: int) -> int:
        await self._reach()
        return 1 if lease in self.leases else 0

    async def revoke_lease(self, lease: int) -> None:
        await self._reach()
        self.expire(lease)

    def expire(self, lease: int) -> None:
        self.leases.discard(lease)
        self.keys = {k: v for k, v in self.keys.items() if v[1] != lease}

    async def create_leased(self, key: str, value: str, lease: int) -> bool:
        await self._reach()
        if key in self.keys:
            return False
        self.keys[key] = (value, lease)
        return True

    async def read_key(self, key: str) -> str | None:
        await self._reach()
        held = self.keys.get(key)
        return None if held is None else held[0]

    def fence(self, key: str, value: str, on_fenced: Callable[[], None] | None = None) -> None:
        self.fenced = (key, value)
        self.on_fenced = on_fenced


def head(backend: Backend, name: str, ttl_s: int = 1) -> Leadership:
    return Leadership(backend, "leader", LeaderInfo(f"{name}:8470", f"{name}:8471"), ttl_s=ttl_s, poll_s=0.01)


async def wait_until(condition: object, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_one_head_leads_the_other_names_it_and_takes_over_when_it_resigns() -> None:
    backend = Backend()
    a, b = head(backend, "a"), head(backend, "b")
    await a.campaign()
    assert a.leading and backend.fenced == ("leader", a.me.to_json())
    standby = asyncio.ensure_future(b.campaign())
    await wait_until(lambda: b.leader == a.me)
    assert not b.leading
    error = standby_error(b)
    assert isinstance(error, Unavailable) and "the leader is at a:8470" in error.message
    assert "loading the cluster state" in a.describe()  # elected, not serving yet
    a.serving = True
    assert "this head leads" in a.describe()

    await a.resign()
    await asyncio.wait_for(standby, 5)
    assert b.leading and not a.leading
    assert backend.fenced == ("leader", b.me.to_json())


async def test_a_leader_whose_lease_is_gone_stops_leading() -> None:
    backend = Backend()
    a = head(backend, "a")
    await a.campaign()
    a.serving = True
    backend.expire(a._lease)  # its lease ran out in etcd (say, a long pause)
    await asyncio.wait_for(a.hold(), 5)
    assert not a.leading and not a.serving


async def test_a_leader_whose_write_was_fenced_stops_at_once() -> None:
    backend = Backend()
    a = head(backend, "a", ttl_s=30)  # its lease would last long: the fence ends it first
    await a.campaign()
    holding = asyncio.ensure_future(a.hold())
    await asyncio.sleep(0)
    assert backend.on_fenced is not None
    backend.on_fenced()  # the store refused a write: another head holds the key
    await asyncio.wait_for(holding, 5)
    assert not a.leading


async def test_a_leader_that_steps_down_gives_its_lease_up_and_a_standby_leads_at_once() -> None:
    backend = Backend()
    a, b = head(backend, "a", ttl_s=30), head(backend, "b", ttl_s=30)  # leases that last
    await a.campaign()
    holding = asyncio.ensure_future(a.hold())
    standby = asyncio.ensure_future(b.campaign())
    await wait_until(lambda: b.leader == a.me)

    a.step_down("cut from every scheduler")

    await asyncio.wait_for(holding, 5)
    assert not a.leading and a._lease not in backend.leases  # revoked, not left to run out
    await asyncio.wait_for(standby, 5)
    assert b.leading


async def test_a_leader_shut_down_while_holding_revokes_its_lease_on_resign() -> None:
    # What shoal.run._lead does on SIGTERM: hold() is cancelled (which clears ``leading``),
    # then resign(). The lease must be revoked all the same, not left to run out.
    backend = Backend()
    a, b = head(backend, "a", ttl_s=30), head(backend, "b", ttl_s=30)  # leases that last
    await a.campaign()
    holding = asyncio.ensure_future(a.hold())
    standby = asyncio.ensure_future(b.campaign())
    await wait_until(lambda: b.leader == a.me)
    lease = a._lease

    holding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holding
    assert not a.leading and lease in backend.leases  # cancelled: the lease is still a's
    await a.resign()

    assert lease not in backend.leases  # revoked: the key went with it
    await asyncio.wait_for(standby, 5)
    assert b.leading
    await a.resign()  # once more: nothing left to give up
    assert b.leading and backend.keys["leader"] == (b.me.to_json(), b._lease)


@pytest.mark.parametrize("failure", ["hangs", "errors"])
async def test_a_leader_cut_off_from_the_store_gives_up_before_its_lease_can_run_out(failure: str) -> None:
    backend = Backend()
    a = head(backend, "a", ttl_s=1)
    claimed = time.monotonic()  # the lease was granted after this: it lasts at least 1 s from here
    await a.campaign()
    if failure == "hangs":
        backend.cut_off = True
    else:
        backend.failing = True
    await asyncio.wait_for(a.hold(), 5)
    gave_up = time.monotonic()
    assert not a.leading
    # Safety, not speed: a standby may claim the key once the lease ran out, so this head
    # must have stopped by then.
    assert gave_up < claimed + a.ttl_s


async def test_a_standby_rides_out_store_errors() -> None:
    backend = Backend()
    b = head(backend, "b")
    backend.failing = True
    standby = asyncio.ensure_future(b.campaign())
    await asyncio.sleep(0.05)
    assert not standby.done() and b.leader is None
    assert "no head leads" in b.describe()
    backend.failing = False
    await asyncio.wait_for(standby, 5)
    assert b.leading


async def test_lease_ttl_fits_in_dead_after() -> None:
    assert lease_ttl(5.0) == 3
    assert lease_ttl(2.0) == 1
    assert lease_ttl(0.5) == 1

"""What a head does with a store it cannot fully trust (issue 13, items 1 and 6).

- A row that does not parse: the head starts, the deployment is broken in the status
  (naming the key), its replicas are kept, and applying or deleting repairs it.
- A store that does not know a deployment schedulers run (empty, truncated, foreign):
  nothing is removed, except after a delete left a tombstone; the head waits
  ``dead_after_s`` after every start before placing or removing anything, but one over
  a store it created at a port the system picked (nothing can be there to adopt).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.cluster import READY, ReplicaReport
from shoal.core.placement import Capacity
from shoal.core.spec import DeploymentSpec
from shoal.errors import FailedPrecondition, NotFound
from shoal.head.node import HeadNode, cluster_status
from shoal.http.head import head_app
from shoal.run import _open_store
from shoal.store import MemoryStore, SqliteStore, StoreError
from shoal.testing.fakes import FakeSchedulers
from shoal.types import SchedulerRegistration
from tests.unit.conftest import make_spec

pytestmark = pytest.mark.timeout(10)

# As a head before the fix stored it: ``"timeout_s": Infinity`` went in as null.
POISON_ROW = '{"name":"poison","backend":"python","model":"echo:Echo","replicas":0,"timeout_s":null}'


def ready(rid: str, spec: DeploymentSpec) -> ReplicaReport:
    return ReplicaReport(
        rid, spec.name, READY, address=f"{rid}:9000", spec_hash=spec.process_hash(), ready_at=1.0
    )


@pytest.fixture
async def started(store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock) -> AsyncIterator[HeadNode]:
    """A head over ``store`` as the test leaves it, for the test to start. Its reconcile loop
    may run a pass beside the test's own ``reconcile_once``: tests check what reached the
    schedulers (``fleet``), which does not depend on which pass acted."""
    node = HeadNode(Settings(), store, fleet, clock)
    yield node
    await node.aclose()


async def join(head: HeadNode, sid: str, *replicas: ReplicaReport) -> None:
    await head.register_scheduler(
        SchedulerRegistration(
            sid, f"{sid}:7000", f"{sid}:7001", Capacity(8, 8192, 0), pid=1, hostname="h", replicas=replicas
        )
    )


async def past_adoption(head: HeadNode, clock: FakeClock) -> None:
    clock.advance(head.settings.dead_after_s + 0.1)
    await join_beat(head)


async def join_beat(head: HeadNode) -> None:
    # Keep every known scheduler alive across a clock jump.
    for sched in list(head.state.schedulers.values()):
        reports = [
            ReplicaReport(r.id, r.deployment, r.reported_state or r.state, r.address, spec_hash=r.spec_hash)
            for r in head.state.replicas.values()
            if r.scheduler_id == sched.id
        ]
        await head.scheduler_health(sched.id, sched.registry_version, reports)


# ------------------------------------------------------------------ item 1: an unreadable row


async def test_a_head_starts_over_an_unreadable_row_and_marks_it_broken(
    store: MemoryStore, started: HeadNode, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    echo = make_spec("echo")
    await store.put("deployments/echo", echo.to_json())
    await store.put("deployments/poison", POISON_ROW)

    await started.start()

    assert started.desired == {"echo": echo}
    status = {d["name"]: d for d in cluster_status(started)["deployments"]}
    assert status["echo"]["broken"] == ""
    broken = status["poison"]
    assert "'deployments/poison'" in broken["broken"] and "timeout_s" in broken["broken"]
    assert broken["pending_reason"].startswith("broken: the stored spec at 'deployments/poison'")
    assert (broken["target_replicas"], broken["spec"]) == (0, {})
    # The good deployment is served; the broken one is not in the routing table.
    assert set(started.routes.deployments) <= {"echo"}


async def test_status_over_rest_answers_with_a_broken_row(store: MemoryStore, started: HeadNode) -> None:
    await store.put("deployments/poison", POISON_ROW)
    await started.start()

    app = head_app(started)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://head") as client:
        r = await client.get("/api/status")

    assert r.status_code == 200
    [dep] = r.json()["deployments"]
    assert dep["name"] == "poison" and "deployments/poison" in dep["broken"]


async def test_the_replicas_of_a_broken_deployment_are_kept(
    store: MemoryStore, started: HeadNode, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    await store.put("deployments/poison", POISON_ROW)
    await started.start()
    poison = make_spec("poison")
    await join(started, "s1", ready("poison-1", poison))
    await past_adoption(started, clock)

    await started.reconcile_once()
    assert fleet.client("s1", "s1:7000").removed == []
    [dep] = cluster_status(started)["deployments"]
    assert [r["id"] for r in dep["replicas"]] == ["poison-1"]


async def test_a_broken_deployment_is_repaired_by_apply_or_delete(
    store: MemoryStore, started: HeadNode, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    await store.put("deployments/poison", POISON_ROW)
    await store.put("deployments/other", POISON_ROW.replace("poison", "other"))
    await started.start()

    with pytest.raises(FailedPrecondition, match=r"broken.*apply a new spec or delete it"):
        await started.scale("poison", 2)

    fixed = make_spec("poison")
    await started.apply(fixed)
    assert started.desired["poison"] == fixed and "poison" not in started.broken

    await started.delete("other")
    assert await store.get("deployments/other") is None
    assert [d["name"] for d in cluster_status(started)["deployments"]] == ["poison"]


# ------------------------------------------------------------------ item 6: an empty store


async def test_a_head_on_an_empty_store_removes_nothing_schedulers_report(
    started: HeadNode, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    echo = make_spec("echo", replicas=2)
    await started.start()  # an empty store: new, truncated, or a fresh --state
    await join(started, "s1", ready("echo-1", echo), ready("echo-2", echo))

    # During the adoption wait, and after it, nothing is removed.
    await started.reconcile_once()
    await past_adoption(started, clock)
    await started.reconcile_once()
    assert fleet.client("s1", "s1:7000").removed == []

    [dep] = cluster_status(started)["deployments"]
    assert dep["name"] == "echo" and len(dep["replicas"]) == 2
    assert "not in the head's store" in dep["pending_reason"] and "shoal delete echo" in dep["pending_reason"]

    # Applying the spec again adopts them: nothing new starts.
    await started.apply(echo)
    await started.reconcile_once()
    assert fleet.client("s1", "s1:7000").created == []


async def test_the_adoption_wait_applies_on_every_start(
    started: HeadNode, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    await started.start()
    await join(started, "s1")
    await started.apply(make_spec("echo"))

    await started.reconcile_once()
    [dep] = cluster_status(started)["deployments"]
    assert dep["pending_reason"].startswith("waiting")
    assert fleet.client("s1", "s1:7000").created == []

    await past_adoption(started, clock)
    await started.reconcile_once()
    assert len(fleet.client("s1", "s1:7000").created) == 1


async def test_the_routing_table_says_when_the_head_waits_for_schedulers_to_register_again(
    started: HeadNode, clock: FakeClock
) -> None:
    # Schedulers keep the replicas of those not registered yet while it says so.
    echo = make_spec("echo")
    await started.start()
    await started.apply(echo)
    await join(started, "s1", ready("r1", echo))
    await started.reconcile_once()
    waiting = started.routes
    assert waiting.adopting and [r.replica_id for r in waiting.deployments["echo"].routes] == ["r1"]

    await past_adoption(started, clock)
    await started.reconcile_once()
    after = started.routes
    assert not after.adopting and after.version > waiting.version


@pytest.mark.parametrize("where", ["a picked port", "loopback, its port given"])
async def test_a_head_on_a_store_it_created_at_a_picked_port_places_at_once(
    where: str, tmp_path: Path, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    """Nothing to adopt: no head ever placed a replica from the new file, and no scheduler
    could have been given the address before the system picked its port, or no other
    machine reaches it (loopback: ``make up``, ``shoal up`` on its default ports). A fresh
    ``shoal up --head-port 0`` was ready 5.3 s after it started, 5 s of them this wait."""
    port = 0 if where == "a picked port" else 8470
    settings = Settings(head_port=port, state_dir=str(tmp_path))
    store, created = await _open_store(settings, tmp_path)
    node = HeadNode(settings, store, fleet, clock)
    try:
        assert created
        await node.start(new_store=created)
        await join(node, "s1")
        await node.apply(make_spec("echo"))

        await node.reconcile_once()
        [dep] = cluster_status(node)["deployments"]
        assert not dep["pending_reason"].startswith("waiting")
        # Placed by this pass or the loop's (whose calls to schedulers run in a task).
        assert [r.scheduler_id for r in node.state.replicas.of("echo")] == ["s1"]
    finally:
        await node.aclose()
        await store.close()


async def test_a_restarted_head_over_an_existing_store_still_waits(
    tmp_path: Path, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    settings = Settings(head_port=0, state_dir=str(tmp_path))
    store, created = await _open_store(settings, tmp_path)
    first = HeadNode(settings, store, fleet, clock)
    await first.start(new_store=created)
    await first.apply(make_spec("echo"))
    await first.aclose()
    await store.close()

    # Even one the first head wrote nothing to: another head may have placed replicas then.
    for path in (tmp_path / "state.db", tmp_path / "empty" / "state.db"):
        if path.parent.name == "empty":
            async with SqliteStore(path):
                pass
        store, created = await _open_store(settings, path.parent)
        second = HeadNode(settings, store, fleet, clock)
        try:
            assert not created
            await second.start(new_store=created)
            await join(second, "s1")
            await second.apply(make_spec("other"))
            await second.reconcile_once()
            assert all(
                d["pending_reason"].startswith("waiting") for d in cluster_status(second)["deployments"]
            )
            assert fleet.client("s1", "s1:7000").created == []
        finally:
            await second.aclose()
            await store.close()


@pytest.mark.parametrize("why", ["port given, on every address", "store not new", "store holds a deployment"])
async def test_a_new_store_alone_or_a_picked_port_alone_does_not_end_the_wait(
    why: str, store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    """A head whose state folder was lost (a new disk, a container without a volume),
    started again at its address, hears from schedulers on other machines of the replicas
    they still run: it must wait for them, on its new store too."""
    if why == "store holds a deployment":
        await store.put("deployments/echo", make_spec("echo").to_json())
    reachable = Settings(head_port=8470, host="0.0.0.0", insecure=True)
    node = HeadNode(reachable if why.startswith("port") else Settings(head_port=0), store, fleet, clock)
    try:
        await node.start(new_store=why != "store not new")
        await join(node, "s1")
        await node.apply(make_spec("other"))
        await node.reconcile_once()
        assert fleet.client("s1", "s1:7000").created == []
        await past_adoption(node, clock)
        await node.reconcile_once()
        assert [r.scheduler_id for r in node.state.replicas.of("other")] == ["s1"]
    finally:
        await node.aclose()


async def test_a_tombstone_removes_the_replicas_of_a_deleted_deployment_after_a_restart(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    echo = make_spec("echo")
    first = HeadNode(Settings(), store, fleet, clock)
    await first.start()
    await first.apply(echo)
    await first.delete("echo")
    await first.aclose()
    tomb = await store.get("tombstones/echo")
    assert tomb is not None and "deleted_at" in json.loads(tomb.value)

    # A replica that outlived the delete (its scheduler was away) shows up at a new head.
    second = HeadNode(Settings(), store, fleet, clock)
    try:
        await second.start()
        await join(second, "s1", ready("echo-1", echo))
        await past_adoption(second, clock)
        await second.reconcile_once()
        assert fleet.client("s1", "s1:7000").removed == [("echo-1", True)]

        # Applying the name again lifts the tombstone.
        await second.apply(echo)
        assert await store.get("tombstones/echo") is None and second.deleted == {}
    finally:
        await second.aclose()


async def test_delete_of_a_name_only_schedulers_know_removes_its_replicas(
    started: HeadNode, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    echo = make_spec("echo")
    await started.start()
    await join(started, "s1", ready("echo-1", echo))
    await past_adoption(started, clock)

    with pytest.raises(NotFound):
        await started.delete("nothing")
    await started.reconcile_once()
    assert fleet.client("s1", "s1:7000").removed == []
    await started.delete("echo")  # the operator's explicit command

    await started.reconcile_once()
    assert fleet.client("s1", "s1:7000").removed == [("echo-1", True)]


# ------------------------------------------------------------------ an unreadable token row


async def test_an_unreadable_token_row_neither_stops_the_head_nor_reopens_the_bootstrap(
    store: MemoryStore, started: HeadNode
) -> None:
    await store.put("tokens/ops", '{"name": "ops", "role": 3}')
    await store.put("deployments/echo", make_spec("echo").to_json())

    await started.start()

    assert "echo" in started.desired
    assert started.tokens.unreadable == {"ops"} and not started.tokens.empty
    transport = httpx.ASGITransport(app=head_app(started))
    async with httpx.AsyncClient(transport=transport, base_url="http://head") as client:
        assert (await client.get("/api/status")).status_code == 401  # tokens still required

    await started.revoke_token("ops")
    assert await store.get("tokens/ops") is None and started.tokens.empty


async def test_old_tombstones_go_at_the_next_delete_unless_replicas_still_run(
    store: MemoryStore, started: HeadNode
) -> None:
    week_and_a_day = time.time() - 8 * 86_400
    for name in ("gone", "lingering"):
        await store.put(f"tombstones/{name}", json.dumps({"deleted_at": week_and_a_day}))
    await store.put("tombstones/garbled", "not json")  # kept: its age is unknown
    await started.start()
    await join(started, "s1", ready("lingering-1", make_spec("lingering")))
    await started.apply(make_spec("echo"))

    await started.delete("echo")

    assert sorted(e.key for e in await store.list("tombstones/")) == [
        "tombstones/echo",
        "tombstones/garbled",
        "tombstones/lingering",
    ]
    assert set(started.deleted) == {"echo", "garbled", "lingering"}


# ------------------------------------------------------------------ a change refused in part


class LimitedStore(MemoryStore):
    """Refuses a value over ``limit`` characters, as etcd refuses a request over its
    ``--max-request-bytes`` (1.5 MiB by default; a revision row and its change record hold
    the spec escaped twice), and as a full disk refuses whichever write comes next."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    async def put(self, key: str, value: str) -> int:
        return await self.commit({key: value})

    async def commit(self, puts: Mapping[str, str], deletes: Sequence[str] = ()) -> int:
        for key, value in puts.items():
            if len(value) > self.limit:
                raise StoreError(f"etcdserver: request is too large ({key}: {len(value)} characters)")
        return await super().commit(puts, deletes)


async def test_a_change_the_store_refuses_in_part_is_not_applied(
    fleet: FakeSchedulers, clock: FakeClock
) -> None:
    """Over a real etcd a 412 KB spec whose tensor names hold quotes did this: the spec was
    written, its revision row refused; the client was told INTERNAL, and a retry said
    "unchanged", with no revision."""
    spec = make_spec("quoted", inputs=[{"name": '"' * 200, "datatype": "FP32", "shape": [1]}])
    store = LimitedStore(limit=len(spec.to_json()) + 100)  # the spec fits; its revision row does not
    node = HeadNode(Settings(), store, fleet, clock)
    await node.start()
    try:
        with pytest.raises(StoreError, match="too large"):
            await node.apply(spec)
        assert "quoted" not in node.desired
        assert await store.list() == []
        assert node.history.revisions("quoted") == [] and node.history.events("quoted") == []

        store.limit = 10_000
        result = await node.apply(spec)
        assert (result.created, result.changed, result.revision) == (True, True, 1)
    finally:
        await node.aclose()


async def test_an_apply_the_store_refuses_midway_leaves_nothing_behind(
    tmp_path: Path, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    """The store takes the spec and the revision row, then refuses the event (a disk
    filling between two rows): the deployment is neither applied nor half stored."""
    path = tmp_path / "state.db"
    async with SqliteStore(path) as store:
        node = HeadNode(Settings(), store, fleet, clock)
        await node.start()
        try:
            await node.apply(make_spec("echo"))
            with closing(sqlite3.connect(path, isolation_level=None)) as conn:
                conn.execute(
                    "CREATE TRIGGER full BEFORE INSERT ON kv WHEN NEW.key LIKE 'events/%'"
                    " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
                )
            stored = await store.list()

            with pytest.raises(StoreError, match="disk is full"):
                await node.apply(make_spec("echo", model="m:Other"))
            with pytest.raises(StoreError, match="disk is full"):
                await node.apply(make_spec("new"))

            assert await store.list() == stored
            assert node.desired == {"echo": make_spec("echo")}
            assert [r.number for r in node.history.revisions("echo")] == [1]
            assert node.history.revisions("new") == []
            with closing(sqlite3.connect(path, isolation_level=None)) as conn:
                conn.execute("DROP TRIGGER full")
            result = await node.apply(make_spec("echo", model="m:Other"))
            assert (result.changed, result.revision) == (True, 2)
        finally:
            await node.aclose()


class FillingStore(MemoryStore):
    """Once ``full`` is set, refuses every write touching a key that starts with it: a disk
    that fills between two writes of one change (the event row comes last)."""

    full: str | None = None

    async def put(self, key: str, value: str) -> int:
        self._check([key])
        return await super().put(key, value)

    async def delete(self, key: str) -> bool:
        self._check([key])
        return await super().delete(key)

    async def commit(self, puts: Mapping[str, str], deletes: Sequence[str] = ()) -> int:
        self._check([*puts, *deletes])
        return await super().commit(puts, deletes)

    def _check(self, keys: list[str]) -> None:
        if self.full is not None and any(k.startswith(self.full) for k in keys):
            raise StoreError("state store: database or disk is full")


@pytest.mark.parametrize("change", ["restart", "rollback", "scale", "delete"])
async def test_a_change_the_store_refuses_changes_nothing(
    change: str, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    store = FillingStore()
    node = HeadNode(Settings(), store, fleet, clock)
    await node.start()
    try:
        await node.apply(make_spec("echo"))
        await node.apply(make_spec("echo", model="m:Other"))
        stored = await store.list()
        desired, events = dict(node.desired), node.history.events()

        store.full = "events/"
        with pytest.raises(StoreError, match="disk is full"):
            if change == "restart":
                await node.restart("echo")
            elif change == "rollback":
                await node.rollback("echo")
            elif change == "scale":
                await node.scale("echo", 3)
            else:
                await node.delete("echo")

        assert await store.list() == stored
        assert node.desired == desired and node.deleted == {}
        assert [r.number for r in node.history.revisions("echo")] == [1, 2]
        assert node.history.events() == events
    finally:
        await node.aclose()

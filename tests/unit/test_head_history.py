"""Revisions, rollback (asked for, and by itself when an update's replicas keep failing),
restart, and lifecycle events: HeadNode over a MemoryStore, fake schedulers, a FakeClock."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Mapping, Sequence

import httpx
import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.cluster import FAILED_AFTER, READY, REPLICA_DEAD, CreateReplica, RemoveReplica, ReplicaReport
from shoal.core.placement import Capacity
from shoal.core.spec import DeploymentSpec, parse_spec
from shoal.core.states import ReplicaState
from shoal.errors import FailedPrecondition, InvalidArgument, NotFound
from shoal.head.node import HeadNode
from shoal.http.head import head_app
from shoal.store import MemoryStore, StoreError
from shoal.testing.fakes import FakeSchedulers
from shoal.types import SchedulerRegistration

pytestmark = pytest.mark.timeout(10)


def make_spec(model: str = "good:M", **extra: object) -> DeploymentSpec:
    return parse_spec({"name": "app", "backend": "python", "model": model, "resources": {"cpus": 1}, **extra})


@pytest.fixture
async def head(store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock) -> AsyncIterator[HeadNode]:
    # A scheduler that stays alive while the clock jumps past the start backoffs.
    node = HeadNode(Settings(dead_after_s=1e6), store, fleet, clock)
    await node.register_scheduler(
        SchedulerRegistration("s1", "s1:7000", "s1:7001", Capacity(8, 8192, 0), pid=42, hostname="h")
    )
    yield node
    await node.aclose()


def report(rid: str, spec: DeploymentSpec, state: ReplicaState, message: str = "") -> ReplicaReport:
    ready_at = 1.0 if state == READY else 0.0
    return ReplicaReport(
        rid,
        spec.name,
        state,
        address=f"{rid}:9",
        spec_hash=spec.process_hash(),
        message=message,
        ready_at=ready_at,
    )


async def serving(head: HeadNode, fleet: FakeSchedulers, spec: DeploymentSpec) -> list[str]:
    """Deploy ``spec`` and report its replicas READY; their ids."""
    await head.apply(spec)
    await head.reconcile_once()
    client = fleet.clients["s1"]
    ids = [rid for rid, s in client.created if s == spec]
    assert await head.scheduler_health("s1", client.registry_version, [report(r, spec, READY) for r in ids])
    return ids


async def fail_new_replicas(
    head: HeadNode, fleet: FakeSchedulers, clock: FakeClock, old: list[ReplicaReport], new: DeploymentSpec
) -> None:
    """Every replica of ``new`` the head starts dies before READY, FAILED_AFTER times."""
    client = fleet.client("s1", "s1:7000")
    for _ in range(FAILED_AFTER):
        creates = [a for a in await head.reconcile_once() if isinstance(a, CreateReplica)]
        assert [a.spec for a in creates] == [new]
        dead = [report(a.replica_id, new, REPLICA_DEAD, "ImportError: no module named nope") for a in creates]
        assert await head.scheduler_health("s1", client.registry_version, [*old, *dead])
        clock.advance(60)  # past any backoff


async def test_an_update_whose_replicas_keep_failing_rolls_back_and_keeps_the_old_replica(
    head: HeadNode, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    v1, v2 = make_spec("good:M"), make_spec("broken:M")
    [old] = await serving(head, fleet, v1)
    assert (await head.apply(v2)).revision == 2

    await fail_new_replicas(head, fleet, clock, [report(old, v1, READY)], v2)
    actions = await head.reconcile_once()

    assert head.desired["app"] == v1
    assert not [a for a in actions if isinstance(a, CreateReplica)]
    assert old not in [a.replica_id for a in actions if isinstance(a, RemoveReplica)]
    assert [r.replica_id for r in head.routes.deployments["app"].routes] == [old]
    revisions = head.history.revisions("app")
    assert [(r.number, r.kind, r.rollback_to) for r in revisions] == [
        (1, "created", 0),
        (2, "updated", 0),
        (3, "rolled_back", 1),
    ]
    assert revisions[1].outcome.startswith("failed: ") and "ImportError" in revisions[1].outcome
    events = head.history.events("app")
    assert [(e.kind, e.revision) for e in events] == [
        ("created", 1),
        ("updated", 2),
        ("failed", 2),
        ("rolled_back", 1),
    ]
    assert "ImportError: no module named nope" in events[2].message
    assert events[3].message == "rolled back to revision 1 (revision 2 failed), as revision 3"
    # Nothing more happens: no new starts of v2, no rollback loop.
    clock.advance(60)
    assert await head.reconcile_once() == []
    assert len(head.history.revisions("app")) == 3


async def test_a_new_deployment_that_fails_is_failed_with_nothing_to_roll_back_to(
    head: HeadNode, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    broken = make_spec("broken:M")
    await head.apply(broken)
    await fail_new_replicas(head, fleet, clock, [], broken)
    await head.reconcile_once()

    assert head.desired["app"] == broken
    assert [e.kind for e in head.history.events("app")] == ["created", "failed"]
    assert head.history.revisions("app")[0].outcome.startswith("failed: ")


async def test_restart_replaces_the_replicas_and_a_spec_file_keeps_the_count(
    head: HeadNode, fleet: FakeSchedulers
) -> None:
    v1 = make_spec()
    await serving(head, fleet, v1)

    rev, new = await head.restart("app")

    assert (rev.number, rev.kind, new.restarts) == (2, "restarted", 1)
    assert new.process_hash() != v1.process_hash()
    actions = await head.reconcile_once()
    assert [type(a) for a in actions] == [CreateReplica]  # the old one goes once the new is READY
    assert [e.kind for e in head.history.events("app")] == ["created", "restarted"]
    # The spec file, applied again, does not undo the restart.
    result = await head.apply(v1)
    assert not result.changed and head.desired["app"].restarts == 1


async def test_rollback_applies_the_previous_revision_keeping_the_replica_count(
    head: HeadNode, fleet: FakeSchedulers
) -> None:
    await head.apply(make_spec("a:M"))
    await head.apply(make_spec("b:M"))
    await head.scale("app", 3)

    rev, spec = await head.rollback("app")

    assert (rev.number, rev.kind, rev.rollback_to) == (3, "rolled_back", 1)
    assert (spec.model, spec.replicas) == ("a:M", 3)
    assert head.desired["app"] == spec
    again, _ = await head.rollback("app", 2)
    assert head.desired["app"].model == "b:M" and again.rollback_to == 2
    kinds = [e.kind for e in head.history.events("app")]
    assert kinds == ["created", "updated", "scaled", "rolled_back", "rolled_back"]


async def test_rollback_refuses_what_it_cannot_do(head: HeadNode) -> None:
    with pytest.raises(NotFound, match="no deployment named 'app'"):
        await head.rollback("app")
    await head.apply(make_spec())
    with pytest.raises(FailedPrecondition, match="no earlier revision"):
        await head.rollback("app")
    with pytest.raises(NotFound, match=r"has no revision 7 \(kept: 1 to 1\)"):
        await head.rollback("app", 7)
    with pytest.raises(FailedPrecondition, match="already runs the spec of revision 1"):
        await head.rollback("app", 1)
    with pytest.raises(InvalidArgument, match="revision must be >= 1"):
        await head.rollback("app", -1)


@pytest.mark.parametrize("revision", [0, 1])
async def test_a_deploy_while_a_rollback_is_checked_is_not_undone_silently(
    head: HeadNode, monkeypatch: pytest.MonkeyPatch, revision: int
) -> None:
    """A rollback picks its target under the head's lock, checks it outside (it may read the
    model's file), then applies it. Before, a deploy in that gap (revision 3, c:M) was
    undone: the rollback applied a:M over it, though c:M's previous revision is b:M."""
    await head.apply(make_spec("a:M"))
    await head.apply(make_spec("b:M"))
    checking, deployed = threading.Event(), threading.Event()

    def check_then_wait(spec: DeploymentSpec, *args: object) -> None:
        if spec.model == "a:M":  # the rollback's check of revision 1: hold it
            checking.set()
            deployed.wait(5)

    monkeypatch.setattr("shoal.head.node.check_deployable", check_then_wait)
    rolling = asyncio.create_task(head.rollback("app", revision))
    assert await asyncio.to_thread(checking.wait, 5)
    await head.apply(make_spec("c:M"))
    deployed.set()

    with pytest.raises(FailedPrecondition) as err:
        await rolling
    assert str(err.value) == (
        "deployment 'app' got revision 3 (updated) while the rollback was checked, after "
        "revision 2 (updated): nothing was rolled back; look at its history and roll back again"
    )
    assert head.desired["app"].model == "c:M"
    assert [r.number for r in head.history.revisions("app")] == [1, 2, 3]
    if revision == 0:
        rev, spec = await head.rollback("app")  # asked again: from c:M, its previous one
        assert (spec.model, rev.rollback_to) == ("b:M", 2)


async def test_a_model_hash_change_is_an_update_that_says_so(head: HeadNode) -> None:
    await head.apply(make_spec(model_hash="a1b2c3d4e5f6"))
    result = await head.apply(make_spec(model_hash="c3d4e5f6a7b8"))
    assert result.changed and result.change == "model files changed (hash a1b2c3d4 → c3d4e5f6)"
    assert result.revision == 2


async def test_history_and_events_survive_a_new_head_and_delete_drops_revisions(
    head: HeadNode, store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    await head.apply(make_spec("a:M"))
    await head.apply(make_spec("b:M"))
    await head.delete("app")

    again = HeadNode(Settings(), store, fleet, clock)
    await again.start()
    try:
        assert [e.kind for e in again.history.events("app")] == ["created", "updated", "deleted"]
        assert again.history.revisions("app") == []
        await again.apply(make_spec("c:M"))
        # Numbered above the deleted one's (its tombstone's): its revisions never repeat.
        assert [r.number for r in again.history.revisions("app")] == [3]
    finally:
        await again.aclose()


async def test_events_route_has_the_dashboards_shape_and_filters(head: HeadNode) -> None:
    await head.apply(make_spec())
    await head.apply(parse_spec({"name": "other", "backend": "python", "model": "x:M"}))
    await head.scale("app", 2)
    transport = httpx.ASGITransport(app=head_app(head))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        everything = (await client.get("/api/events")).json()
        mine = (await client.get("/api/events?deployment=app&limit=1")).json()
        bad = await client.get("/api/events?limit=0")
        history = (await client.get("/api/deployments/app/history")).json()
        missing = await client.get("/api/deployments/nope/history")
        rolled = await client.post("/api/deployments/app/rollback", json={"revision": "x"})
        # Found by the schema fuzzer: 0 was taken as "the previous revision" (200).
        zero = await client.post("/api/deployments/app/rollback", json={"revision": 0})
        schema = (await client.get("/openapi.json")).json()

    assert set(everything) == {"events"}
    assert [(e["deployment"], e["kind"], e["revision"]) for e in everything["events"]] == [
        ("app", "created", 1),
        ("other", "created", 1),
        ("app", "scaled", 1),
    ]
    [event] = mine["events"]
    assert set(event) == {"time", "deployment", "kind", "revision", "message"}
    assert isinstance(event["time"], float) and event["message"] == "replicas 1 → 2"
    assert bad.status_code == 400 and "limit must be an integer from 1 to 1000" in bad.json()["error"]
    assert [r["number"] for r in history["revisions"]] == [1]
    assert history["revisions"][0]["spec"]["model"] == "good:M"
    assert missing.status_code == 404
    assert rolled.status_code == 400 and "revision" in rolled.json()["error"]
    assert zero.status_code == 400 and "N an integer >= 1" in zero.json()["error"]
    for path in ("/api/events", "/api/deployments/{name}/history", "/api/deployments/{name}/rollback"):
        assert path in schema["paths"]


async def test_a_restart_whose_replicas_fail_rolls_back_to_the_running_ones(
    head: HeadNode, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    v1 = make_spec()
    [old] = await serving(head, fleet, v1)
    _, restarted = await head.restart("app")

    await fail_new_replicas(head, fleet, clock, [report(old, v1, READY)], restarted)
    await head.reconcile_once()

    assert head.desired["app"] == v1  # restarts back to 0: the running replica's spec
    assert [(r.kind, r.rollback_to) for r in head.history.revisions("app")] == [
        ("created", 0),
        ("restarted", 0),
        ("rolled_back", 1),
    ]


async def test_a_rollback_whose_replicas_fail_is_not_rolled_back_again(
    head: HeadNode, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    v1, v2 = make_spec("a:M"), make_spec("b:M")
    await head.apply(v1)
    await head.apply(v2)
    await head.rollback("app", 1)

    await fail_new_replicas(head, fleet, clock, [], v1)
    await head.reconcile_once()

    assert head.desired["app"] == v1
    assert [r.kind for r in head.history.revisions("app")] == ["created", "updated", "rolled_back"]
    assert [e.kind for e in head.history.events("app")][-1] == "failed"


async def test_a_rollback_body_is_read_whatever_its_framing_and_a_misspelt_field_is_refused(
    head: HeadNode,
) -> None:
    """Before: a chunked body (no Content-Length) was taken as no body, and a key the route
    does not take was ignored: both rolled back to the previous revision, not the one named."""
    for model in ("a:M", "b:M", "c:M"):
        await head.apply(make_spec(model=model))

    async def chunked(doc: bytes) -> AsyncIterator[bytes]:
        yield doc

    transport = httpx.ASGITransport(app=head_app(head))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        typo = await client.post("/api/deployments/app/rollback", json={"revison": 1})
        extra = await client.post("/api/deployments/app/scale", json={"replicas": 2, "replica": 3})
        assert head.desired["app"].model == "c:M" and head.desired["app"].replicas == 1
        rolled = await client.post("/api/deployments/app/rollback", content=chunked(b'{"revision": 1}'))
        assert rolled.status_code == 200, rolled.text
        assert rolled.json() == {"name": "app", "revision": 4, "to": 1}
        assert head.desired["app"].model == "a:M"
        # No body, in either framing, is the previous revision (3, c).
        assert (await client.post("/api/deployments/app/rollback", content=chunked(b""))).json()["to"] == 3
        assert (await client.post("/api/deployments/app/rollback")).json()["to"] == 4

    assert typo.status_code == 400
    assert typo.json()["error"] == (
        "body must be {} or {\"revision\": N} with N an integer >= 1: unknown field(s) 'revison'"
    )
    assert extra.status_code == 400
    assert (
        extra.json()["error"]
        == "body must be {\"replicas\": N} with N an integer: unknown field(s) 'replica'"
    )


class RefusingStore(MemoryStore):
    """Refuses every write while ``refusing`` (a full disk, a lock another process holds)."""

    refusing = False

    async def put(self, key: str, value: str) -> int:
        return await self.commit({key: value})

    async def commit(self, puts: Mapping[str, str], deletes: Sequence[str] = ()) -> int:
        if self.refusing:
            raise StoreError("state store: database or disk is full")
        return await super().commit(puts, deletes)


async def test_a_failure_found_while_the_store_refuses_writes_is_rolled_back_once_it_takes_them(
    fleet: FakeSchedulers, clock: FakeClock
) -> None:
    """The reconcile pass that found the update failed could not record it: the pass ended
    there (nothing else placed or removed), and the failure was dropped, so the update was
    never rolled back, its old replica left to serve alone."""
    store = RefusingStore()
    node = HeadNode(Settings(dead_after_s=1e6), store, fleet, clock)
    await node.register_scheduler(
        SchedulerRegistration("s1", "s1:7000", "s1:7001", Capacity(8, 8192, 0), pid=42, hostname="h")
    )
    try:
        v1, v2 = make_spec("good:M"), make_spec("broken:M")
        [old] = await serving(node, fleet, v1)
        await node.apply(v2)
        await fail_new_replicas(node, fleet, clock, [report(old, v1, READY)], v2)

        store.refusing = True
        await node.reconcile_once()  # the pass goes on; the failure waits for the store
        assert node.desired["app"] == v2
        store.refusing = False
        await node.reconcile_once()
        assert node.desired["app"] == v1
        assert [(e.kind, e.revision) for e in node.history.events("app")][-2:] == [
            ("failed", 2),
            ("rolled_back", 1),
        ]
    finally:
        await node.aclose()

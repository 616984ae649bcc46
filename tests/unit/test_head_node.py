"""HeadNode over a MemoryStore, fake scheduler clients and a FakeClock.

The reconcile loop is not started (except to check that a new head reloads the
store); tests call ``reconcile_once()`` themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from pathlib import Path

import httpx
import pytest

from shoal import metrics
from shoal.cli.commands import render_status
from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.cluster import READY, STARTING, CreateReplica, RemoveReplica, ReplicaRecord, ReplicaReport
from shoal.core.placement import Capacity
from shoal.core.spec import DeploymentSpec, parse_spec, parse_spec_json
from shoal.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from shoal.head import node as head_node
from shoal.head.blobs import BlobStore
from shoal.head.node import ROUTES_GAP_S, ApplyResult, HeadNode, cluster_status, needs_look, status_of
from shoal.http.head import head_app
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers
from shoal.testing.wait import until
from shoal.types import LoadReport, Route, RoutingTable, SchedulerRegistration

pytestmark = pytest.mark.timeout(10)


def make_spec(name: str = "echo", *, replicas: int = 1, model: str = "m:Model") -> DeploymentSpec:
    return parse_spec({"name": name, "backend": "python", "model": model, "replicas": replicas})


@pytest.fixture
async def head(store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock) -> AsyncIterator[HeadNode]:
    node = HeadNode(Settings(), store, fleet, clock)
    yield node
    await node.aclose()


async def join(head: HeadNode, sid: str = "s1", *replicas: ReplicaReport, says_routes: bool = False) -> None:
    interval = await head.register_scheduler(
        SchedulerRegistration(
            sid,
            f"{sid}:7000",
            f"{sid}:7001",
            Capacity(8, 8192, 0),
            pid=42,
            hostname="host",
            replicas=replicas,
            says_routes=says_routes,
        )
    )
    assert interval == 1.0


def autoscaled(**autoscaling: float) -> DeploymentSpec:
    """Deployment ``auto``, autoscaled as given."""
    return parse_spec({"name": "auto", "backend": "python", "model": "m:Model", "autoscaling": autoscaling})


def ready(rid: str, spec: DeploymentSpec) -> ReplicaReport:
    return ReplicaReport(
        rid, spec.name, READY, address=f"{rid}:9000", spec_hash=spec.process_hash(), ready_at=1.0
    )


# ------------------------------------------------------------------ deployments


async def test_apply_persists_and_a_new_head_reloads_it(
    head: HeadNode, store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    spec = make_spec(replicas=2)

    assert await head.apply(spec) == ApplyResult(created=True, changed=True, revision=1, change="created")

    entry = await store.get("deployments/echo")
    assert entry is not None
    assert parse_spec_json(entry.value) == spec

    again = HeadNode(Settings(), store, fleet, clock)
    await again.start()
    try:
        assert again.desired == {"echo": spec}
    finally:
        await again.aclose()


async def test_applying_the_same_spec_again_changes_nothing(head: HeadNode, store: MemoryStore) -> None:
    spec = make_spec()
    await head.apply(spec)
    revision = (await store.list("deployments/"))[0].revision

    assert await head.apply(spec) == ApplyResult(created=False, changed=False, revision=1)
    assert (await store.list("deployments/"))[0].revision == revision

    assert await head.apply(make_spec(model="v2:Model")) == ApplyResult(
        created=False, changed=True, revision=2, change="model changed"
    )
    assert head.desired["echo"].model == "v2:Model"


async def test_a_spec_that_differs_only_in_key_order_or_whitespace_is_unchanged(
    head: HeadNode, store: MemoryStore
) -> None:
    """Before, options {"a": 1, "b": {"c": 1}} written in another order was an update:
    ``changed`` (``shoal deploy`` printed 'updated (revision 1): unchanged'), the spec written
    to the store again and an event recorded, as a CI pipeline re-rendering YAML does every time."""
    text = '{"name": "echo", "backend": "python", "model": "m:Model", "options": {"a": 1, "b": {"c": 1}}}'
    await head.apply(parse_spec_json(text))
    revision = (await store.list("deployments/"))[0].revision
    reordered = (
        '{ "options": {"b": {\n "c": 1}, "a": 1},  "model": "m:Model", "backend": "python", "name": "echo"}'
    )

    assert await head.apply(parse_spec_json(reordered)) == ApplyResult(
        created=False, changed=False, revision=1
    )
    assert (await store.list("deployments/"))[0].revision == revision
    assert [e.kind for e in head.history.events("echo")] == ["created"]
    # A value's type is a change: 1 is not 1.0, nor true.
    for value in ("1.0", "true"):
        result = await head.apply(parse_spec_json(text.replace('"a": 1', f'"a": {value}')))
        assert result.changed and result.change == "options changed"


async def test_scale_persists_the_new_count_and_reconcile_follows_it(
    head: HeadNode, store: MemoryStore, fleet: FakeSchedulers
) -> None:
    await join(head)
    await head.apply(make_spec(replicas=1))
    await head.reconcile_once()

    await head.scale("echo", 3)

    entry = await store.get("deployments/echo")
    assert entry is not None
    assert parse_spec_json(entry.value).replicas == 3
    actions = await head.reconcile_once()
    assert [type(a) for a in actions] == [CreateReplica, CreateReplica]
    assert len(fleet.clients["s1"].created) == 3


async def test_scale_and_delete_of_an_unknown_deployment_are_not_found(head: HeadNode) -> None:
    with pytest.raises(NotFound, match=r"^no deployment named 'nope'$"):
        await head.scale("nope", 2)
    with pytest.raises(NotFound, match=r"^no deployment named 'nope'$"):
        await head.delete("nope")


async def test_scale_refuses_a_count_the_spec_does_not_allow(head: HeadNode, store: MemoryStore) -> None:
    # A spec allows at most 1000 replicas. If scale stored 5000, the next head
    # could not parse its own store and would fail to start.
    await head.apply(make_spec())

    with pytest.raises(InvalidArgument, match="replicas"):
        await head.scale("echo", 5000)

    entry = await store.get("deployments/echo")
    assert entry is not None
    assert parse_spec_json(entry.value).replicas == 1


async def test_scale_of_an_autoscaled_deployment_is_refused_over_rest_too(
    head: HeadNode, store: MemoryStore
) -> None:
    # The autoscaler owns the count: a stored replicas would change nothing but the event log.
    auto = parse_spec(
        {
            "name": "auto",
            "backend": "python",
            "model": "m:Model",
            "autoscaling": {"min_replicas": 0, "max_replicas": 2},
        }
    )
    await head.apply(auto)
    refusal = (
        "deployment 'auto' is autoscaled: the autoscaler sets its replica count between min_replicas 0 "
        "and max_replicas 2; to change that, edit autoscaling in its spec (or remove it for a fixed count) "
        "and deploy it"
    )
    with pytest.raises(FailedPrecondition) as err:
        await head.scale("auto", 7)
    assert str(err.value) == refusal

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=head_app(head)), base_url="http://localhost"
    ) as c:
        reply = await c.post("/api/deployments/auto/scale", json={"replicas": 7})
    assert reply.status_code == 400 and refusal in reply.text

    entry = await store.get("deployments/auto")
    assert entry is not None and parse_spec_json(entry.value) == auto
    assert [e.kind for e in await head.lifecycle_events("auto", 0)] == ["created"]


async def test_delete_forgets_the_deployment_and_removes_its_replicas(
    head: HeadNode, store: MemoryStore, fleet: FakeSchedulers
) -> None:
    await join(head)
    await head.apply(make_spec(replicas=2))
    await head.reconcile_once()
    created = fleet.clients["s1"].created_ids

    await head.delete("echo")

    assert await store.get("deployments/echo") is None
    assert head.desired == {}
    actions = await head.reconcile_once()
    assert all(isinstance(a, RemoveReplica) for a in actions)
    assert sorted(fleet.clients["s1"].removed) == sorted((rid, True) for rid in created)


async def test_a_deployment_created_again_before_the_deleted_ones_replicas_went_does_not_get_them(
    head: HeadNode, fleet: FakeSchedulers
) -> None:
    """Delete, then deploy the same name with a new model before the next reconcile pass (at
    once over the Python API, or within the second the loop rests after a long pass). Before,
    the deleted deployment's READY replicas became the new one's previous revision: they kept
    serving its requests with the deleted model while it rolled out, and were drained only as
    the new replicas became READY."""
    await join(head)
    old = make_spec(replicas=2, model="old:Model")
    await head.apply(old)
    await head.reconcile_once()
    client = fleet.clients["s1"]
    deleted = client.created_ids
    assert await head.scheduler_health("s1", client.registry_version, [ready(r, old) for r in deleted])
    await head.delete("echo")

    new = make_spec(replicas=2, model="new:Model")
    await head.apply(new)
    actions = await head.reconcile_once()

    assert sorted(a.replica_id for a in actions if isinstance(a, RemoveReplica)) == sorted(deleted)
    assert [a.spec.model for a in actions if isinstance(a, CreateReplica)] == ["new:Model"] * 2
    assert head.routes.deployments["echo"].routes == ()  # none of the deleted ones serves it
    # Their scheduler still reports them READY until they have drained: still not the new one's.
    assert await head.scheduler_health("s1", client.registry_version, [ready(r, old) for r in deleted])
    assert not [a for a in await head.reconcile_once() if isinstance(a, RemoveReplica | CreateReplica)]
    assert head.routes.deployments["echo"].routes == ()


# ------------------------------------------------------------------ reconcile


async def test_reconcile_once_creates_replicas_on_the_scheduler(
    head: HeadNode, fleet: FakeSchedulers
) -> None:
    await join(head)
    spec = make_spec(replicas=2)
    await head.apply(spec)

    actions = await head.reconcile_once()

    client = fleet.clients["s1"]
    assert client.address == "s1:7000"
    assert [a.replica_id for a in actions if isinstance(a, CreateReplica)] == client.created_ids
    assert [s for _, s in client.created] == [spec, spec]
    assert {head.state.replicas[rid].state for rid in client.created_ids} == {STARTING}
    assert await head.reconcile_once() == []
    assert len(client.created) == 2


async def test_a_deployment_whose_count_fails_keeps_it_and_the_others_are_reconciled(
    head: HeadNode, fleet: FakeSchedulers, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: an OverflowError in one deployment's autoscaling (a target of 5e-324) ended
    every pass, and a replica killed in another deployment was not replaced for 90 s."""
    await join(head)
    auto = parse_spec(
        {"name": "auto", "backend": "python", "model": "m:Model", "autoscaling": {"max_replicas": 3}}
    )
    await head.apply(auto)
    await head.apply(make_spec(replicas=2))
    decide = head.autoscaler.decide

    def broken(deployment: str, *args: object, **kwargs: object) -> object:
        if deployment == "auto":
            raise OverflowError("cannot convert float infinity to integer")
        return decide(deployment, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(head.autoscaler, "decide", broken)

    await head.reconcile_once()
    await head.reconcile_once()

    created = [s.name for _, s in fleet.clients["s1"].created]
    assert sorted(created) == ["auto", "echo", "echo"]  # auto keeps its first count, 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1  # once, not in every pass
    assert "deployment auto: its replica count could not be computed" in errors[0].getMessage()
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is OverflowError


async def test_a_burst_that_wakes_many_passes_weighs_by_its_time_not_its_passes(
    head: HeadNode, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    """Health updates with queued requests wake extra passes. Before, 1.5 s of 1 request in
    flight (3 passes) then 0.4 s of 10 queued (20 passes) averaged 8.8 by pass and scaled to
    5 replicas; over the time it held the load averaged 2.9, 2 replicas at target 2."""
    await join(head)
    auto = autoscaled(max_replicas=5, target_ongoing_requests=2, upscale_delay_s=0)
    await head.apply(auto)
    await head.reconcile_once()
    version = fleet.clients["s1"].registry_version

    async def pass_with(load: LoadReport, then_s: float) -> None:
        assert await head.scheduler_health("s1", version, [], {"auto": load})
        await head.reconcile_once()
        clock.advance(then_s)

    for _ in range(3):
        await pass_with(LoadReport(in_flight=1), 0.5)
    for _ in range(20):
        await pass_with(LoadReport(in_flight=1, queued=9), 0.02)

    [dep] = cluster_status(head)["deployments"]
    assert dep["target_replicas"] == 2


async def test_a_replica_starting_from_zero_is_not_scaled_away_before_it_is_ready(
    head: HeadNode, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    """A model whose start outlasts its clients' timeout plus downscale_delay_s: the request
    that woke it timed out, the load fell to 0, and the replica was stopped while it still
    loaded; the next request started another, stopped the same way, and it never served (6 of
    6 requests DEADLINE_EXCEEDED over 30 s for a 6 s start). A scale-down now waits for the
    replicas starting to be READY, then for downscale_delay_s."""
    await join(head)
    auto = autoscaled(min_replicas=0, max_replicas=2, downscale_delay_s=1)
    await head.apply(auto)
    await head.reconcile_once()  # its first replica
    client = fleet.clients["s1"]

    async def pass_with(load: LoadReport, *reports: ReplicaReport) -> list[str]:
        assert await head.scheduler_health("s1", client.registry_version, list(reports), {"auto": load})
        actions = await head.reconcile_once()
        clock.advance(0.5)
        return [type(a).__name__ for a in actions]

    for _ in range(6):  # idle: down to zero
        await pass_with(LoadReport(), ready(client.created_ids[0], auto))
    await pass_with(LoadReport())
    assert head.targets["auto"] == 0 and not head.state.replicas.of("auto")
    assert await pass_with(LoadReport(queued=1)) == ["CreateReplica"]
    rid = client.created_ids[-1]
    loading = ReplicaReport(rid, "auto", STARTING, spec_hash=auto.process_hash())
    for _ in range(20):  # the request gave up; the replica loads for 10 s
        assert await pass_with(LoadReport(), loading) == []
    assert head.targets["auto"] == 1
    # READY: now idle for downscale_delay_s, it goes.
    actions = [await pass_with(LoadReport(), ready(rid, auto)) for _ in range(8)]
    assert head.targets["auto"] == 0
    assert sum(a == ["RemoveReplica"] for a in actions) == 1


async def test_a_new_head_keeps_a_deployment_scaled_to_zero_at_zero(
    head: HeadNode, store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    """A head restart (or a standby head taking over) found no replica of an autoscaled
    deployment and took the spec's first count: every deployment scaled to zero started a
    replica at once (3 of 3 in a cluster, READY, then stopped after downscale_delay_s).
    What runs is what it keeps, none included; a new deployment still starts at its first."""
    await head.apply(autoscaled(min_replicas=0, max_replicas=2))
    await head.aclose()
    again = HeadNode(Settings(), store, fleet, clock)
    await again.start()
    try:
        clock.advance(again.settings.dead_after_s + 0.1)  # past the wait for schedulers to register
        await join(again)  # running nothing
        await again.apply(make_spec())  # a new one, fixed, beside it
        await again.reconcile_once()
        assert [spec.name for _, spec in fleet.clients["s1"].created] == ["echo"]
        assert again.targets["auto"] == 0
    finally:
        await again.aclose()


@pytest.mark.parametrize(
    ("bounds", "running", "shown"),
    [
        ({"min_replicas": 1, "max_replicas": 4}, 3, 3),  # scaled up to 3 by load
        ({"min_replicas": 2, "max_replicas": 4}, 2, 2),  # min_replicas above the spec's replicas (1)
        ({"min_replicas": 0, "max_replicas": 2}, 0, 0),  # scaled to zero
        ({"min_replicas": 2, "max_replicas": 4}, 1, 2),  # below its bounds: the next pass scales to 2
    ],
)
async def test_a_restarted_head_shows_the_count_it_keeps_for_an_autoscaled_deployment(
    bounds: dict[str, float],
    running: int,
    shown: int,
    head: HeadNode,
    store: MemoryStore,
    fleet: FakeSchedulers,
    clock: FakeClock,
) -> None:
    """Until the autoscaler set its count, a restarted head (or a standby taking over) showed
    an autoscaled deployment's spec count (1) as its target, in shoal status, /api/status and
    the metrics, for the wait for schedulers and until its first pass: not what ran, nor what
    the head then kept. It shows what the head keeps (what runs, within the bounds)."""
    auto = autoscaled(**bounds)
    await head.apply(auto)
    await head.aclose()
    again = HeadNode(Settings(), store, fleet, clock)
    await again.start()
    try:
        await join(again, "s1", *(ready(f"auto-{i}", auto) for i in range(running)))

        def targets() -> tuple[int, int, bool, str]:
            [dep] = cluster_status(again)["deployments"]
            [brief] = status_of(again, brief=True).deployments
            text = metrics.HeadMetrics(again).text().decode()
            [line] = [x for x in text.splitlines() if x.startswith("shoal_deployment_target_replicas{")]
            return dep["target_replicas"], brief.target_replicas, needs_look(again, "auto"), line

        line = f'shoal_deployment_target_replicas{{deployment="auto"}} {float(shown)}'
        # During the wait for schedulers to register again: what runs.
        assert targets() == (shown, shown, running < shown, line)
        # Past it, the first pass keeps that count (no load yet: no decision), and says so.
        await past_wait(again, clock)
        await again.reconcile_once()
        assert again.targets["auto"] == shown
        assert targets()[:2] == (shown, shown)
    finally:
        await again.aclose()


async def past_wait(head: HeadNode, clock: FakeClock) -> None:
    """Past the wait for schedulers after a start, every scheduler still alive."""
    clock.advance(head.settings.dead_after_s + 0.1)
    for sched in list(head.state.schedulers.values()):
        reports = [
            ReplicaReport(r.id, r.deployment, r.reported_state or r.state, r.address, spec_hash=r.spec_hash)
            for r in head.state.replicas.of("auto")
            if r.scheduler_id == sched.id
        ]
        assert await head.scheduler_health(sched.id, sched.registry_version, reports)


async def test_without_a_scheduler_nothing_is_created_and_status_says_why(head: HeadNode) -> None:
    await head.apply(make_spec())

    assert await head.reconcile_once() == []

    [dep] = cluster_status(head)["deployments"]
    assert (dep["name"], dep["target_replicas"], dep["ready_replicas"]) == ("echo", 1, 0)
    assert dep["pending_reason"] == "no live scheduler"


async def test_status_says_what_fractions_add_up_to(head: HeadNode) -> None:
    """Before: ``allocated: {"cpus": 0.30000000000000004}`` in ``shoal status --json``, and a
    free amount of -4e-16 in the metrics."""
    await join(head)
    three_tenths = {"replicas": 3, "resources": {"cpus": 0.1}}
    await head.apply(parse_spec({"name": "echo", "backend": "python", "model": "m:Model", **three_tenths}))
    await head.reconcile_once()

    [s1] = cluster_status(head)["schedulers"]
    assert s1["allocated"]["cpus"] == 0.3


async def test_a_create_refused_by_its_scheduler_is_retried_after_a_backoff(
    head: HeadNode, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    await join(head)
    await head.apply(make_spec())
    client = fleet.client("s1", "s1:7000")
    client.create_error = ResourceExhausted("gpus 0.8: no GPU of this scheduler has that much free")

    assert len(await head.reconcile_once()) == 1
    assert client.created == []
    assert head.state.replicas == {}

    assert await head.reconcile_once() == []
    [dep] = cluster_status(head)["deployments"]
    assert dep["pending_reason"] == (
        "1 replica start failure(s), retrying in 1s: gpus 0.8: no GPU of this scheduler has that much free"
    )
    assert "replica_create_failed" in [e["kind"] for e in cluster_status(head)["events"]]

    client.create_error = None
    clock.advance(1.5)
    assert await head.scheduler_health("s1", client.registry_version, [])
    actions = await head.reconcile_once()

    assert [type(a) for a in actions] == [CreateReplica]
    assert len(client.created) == 1
    assert cluster_status(head)["deployments"][0]["pending_reason"] == ""


async def test_a_scheduler_that_cannot_take_a_replica_is_passed_by_for_dead_after_s(
    head: HeadNode, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    """Shutting down, or out of reach: no fault of the deployment's, which does not back off
    for it (before: "1 replica start failure(s)", two of which failed a ``shoal deploy``)."""
    await join(head)
    await head.apply(make_spec())
    client = fleet.client("s1", "s1:7000")
    client.create_error = Unavailable("this scheduler is shutting down")

    assert len(await head.reconcile_once()) == 1
    assert await head.reconcile_once() == []
    [dep] = cluster_status(head)["deployments"]
    assert dep["pending_reason"] == (
        "scheduler s1 takes no replica now (this scheduler is shutting down); placing there again in 5s"
    )

    client.create_error = None
    clock.advance(5.0)
    assert await head.scheduler_health("s1", client.registry_version, [])
    assert [type(a) for a in await head.reconcile_once()] == [CreateReplica]
    assert len(client.created) == 1


async def test_a_start_refused_while_the_cluster_shuts_down_is_no_warning(
    head: HeadNode, fleet: FakeSchedulers, caplog: pytest.LogCaptureFixture
) -> None:
    """``shoal up`` stopped in its first seconds: a start in flight meets the scheduler
    shutting down, after the head paused. Seen: a WARNING on every such Ctrl-C."""
    await join(head)
    await head.apply(make_spec())
    client = fleet.client("s1", "s1:7000")

    async def refused(replica_id: str, spec: DeploymentSpec) -> int:
        head.pause()  # shoal up's shutdown pauses the head while the call is out
        raise Unavailable("this scheduler is shutting down")

    client.create_replica = refused  # type: ignore[method-assign]
    with caplog.at_level("INFO", logger="shoal.head"):
        assert len(await head.reconcile_once()) == 1
    [line] = [r for r in caplog.records if "could not create replica" in r.getMessage()]
    assert line.levelname == "INFO" and "shutting down" in line.getMessage()


async def test_a_replica_a_scheduler_cannot_take_goes_to_another_at_once(
    head: HeadNode, fleet: FakeSchedulers
) -> None:
    await join(head, "s1")
    await join(head, "s2")
    await head.apply(make_spec())
    fleet.client("s1", "s1:7000").create_error = Unavailable("this scheduler is shutting down")

    [first] = await head.reconcile_once()
    assert isinstance(first, CreateReplica) and first.scheduler_id == "s1"  # the first by id
    [second] = await head.reconcile_once()

    assert isinstance(second, CreateReplica) and second.scheduler_id == "s2"
    assert len(fleet.clients["s2"].created) == 1
    assert cluster_status(head)["deployments"][0]["pending_reason"] == ""


async def test_a_failing_remove_is_retried(head: HeadNode, fleet: FakeSchedulers, clock: FakeClock) -> None:
    await join(head)
    spec = make_spec()
    await head.apply(spec)
    await head.reconcile_once()
    client = fleet.clients["s1"]
    [rid] = client.created_ids
    assert await head.scheduler_health("s1", client.registry_version, [ready(rid, spec)])
    client.remove_error = Unavailable("connection reset")
    await head.delete("echo")

    actions = await head.reconcile_once()
    assert [(type(a), a.replica_id) for a in actions] == [(RemoveReplica, rid)]
    assert client.removed == []

    # The scheduler never got the request: it still runs the replica and says so.
    client.remove_error = None
    for _ in range(4):
        clock.advance(2.0)
        assert await head.scheduler_health("s1", client.registry_version, [ready(rid, spec)])
        await head.reconcile_once()

    assert client.removed == [(rid, True)]


async def test_a_rollout_that_raises_resources_starts_when_there_is_room(
    head: HeadNode, fleet: FakeSchedulers
) -> None:
    # 4 cpus; two replicas of 1 cpu hold 2 of them. The new spec needs 2 cpus per
    # replica: the first new replica fits in the 2 cpus still free.
    await head.register_scheduler(
        SchedulerRegistration("s1", "s1:7000", "s1:7001", Capacity(4, 8192, 0), pid=42, hostname="host")
    )
    v1 = parse_spec(
        {"name": "echo", "backend": "python", "model": "m:Model", "replicas": 2, "resources": {"cpus": 1}}
    )
    await head.apply(v1)
    await head.reconcile_once()
    client = fleet.clients["s1"]
    reports = [ready(rid, v1) for rid in client.created_ids]
    assert await head.scheduler_health("s1", client.registry_version, reports)
    assert cluster_status(head)["schedulers"][0]["allocated"]["cpus"] == 2.0

    v2 = parse_spec({**v1.model_dump(), "resources": {"cpus": 2}})
    await head.apply(v2)
    actions = await head.reconcile_once()

    assert head.state.pending_reasons == {}
    assert [type(a) for a in actions] == [CreateReplica]
    assert len(client.created) == 3
    assert client.created[-1][1] == v2


async def test_health_from_an_unknown_scheduler_is_nacked(head: HeadNode) -> None:
    assert await head.scheduler_health("ghost", 1, []) is False


async def test_a_silent_scheduler_is_declared_dead_and_must_register_again(
    head: HeadNode, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    await join(head, "s1")
    await join(head, "s2")
    await head.apply(make_spec())
    await head.reconcile_once()
    [(sid, client)] = [(s, c) for s, c in fleet.clients.items() if c.created]
    other = "s2" if sid == "s1" else "s1"

    clock.advance(3)
    assert await head.scheduler_health(other, 0, [])
    clock.advance(3)
    actions = await head.reconcile_once()

    assert [(a.scheduler_id, type(a)) for a in actions] == [(other, CreateReplica)]
    assert await head.scheduler_health(sid, client.registry_version, []) is False


async def test_a_head_behind_in_reading_health_updates_gives_schedulers_that_much_longer(
    head: HeadNode, clock: FakeClock
) -> None:
    """A head short of CPU read updates late, took its own lateness for silent schedulers and
    declared them dead (bench/scale.py at 1,000 schedulers on a busy machine). The deadline
    an update carries says how long it waited in the head."""
    await join(head, "s1")
    assert await head.scheduler_health("s1", 1, [], deadline_left_s=5.0)  # read at once
    clock.advance(1)
    assert await head.scheduler_health("s1", 1, [], deadline_left_s=2.0)  # waited 3 s in the head

    clock.advance(5.5)  # silent for 5.5 s: past dead_after_s (5), not past 5 + 3
    await head.reconcile_once()
    assert head.state.schedulers["s1"].state == "ALIVE"

    clock.advance(3)  # 8.5 s
    await head.reconcile_once()
    assert head.state.schedulers["s1"].state == "DEAD"
    assert await head.scheduler_health("s1", 1, [], deadline_left_s=5.0) is False


async def test_a_head_that_caught_up_declares_silent_schedulers_dead_after_dead_after_s(
    head: HeadNode, clock: FakeClock
) -> None:
    await join(head, "s1")
    await join(head, "s2")
    assert await head.scheduler_health("s1", 1, [], deadline_left_s=5.0)
    assert await head.scheduler_health("s1", 1, [], deadline_left_s=1.0)  # 4 s late, once
    for _ in range(6):  # s2 goes on, its updates read at once: the head caught up
        clock.advance(1)
        assert await head.scheduler_health("s2", 1, [], deadline_left_s=5.0)
        await head.reconcile_once()

    assert head.state.schedulers["s1"].state == "DEAD"  # 6 s silent, 5 s allowed again
    assert head.state.schedulers["s2"].state == "ALIVE"


@pytest.mark.parametrize("standby", [True, False])
async def test_a_leader_that_hears_from_no_scheduler_while_a_standby_reaches_it_steps_down(
    head: HeadNode, clock: FakeClock, tmp_path: Path, standby: bool
) -> None:
    head.blobs = BlobStore(tmp_path, max_bytes=1 << 20, grace_s=60)
    if standby:
        head.blobs.standby_seen("b:8470")
    isolated: list[str] = []
    head.on_isolated = isolated.append
    await join(head, "s1")
    await join(head, "s2")
    await head.reconcile_once()
    clock.advance(2)
    assert await head.scheduler_health("s1", 1, [])
    clock.advance(4)  # s2 silent for 6 s: dead, s1 still alive
    await head.reconcile_once()
    assert isolated == []

    clock.advance(2)  # s1 silent for 6 s too: every scheduler gone
    await head.reconcile_once()

    # With a standby that still reaches this head, it is more likely cut from the
    # schedulers than they all died: it steps down. A lone head stays.
    assert len(isolated) == (1 if standby else 0)
    assert all("every scheduler went silent" in reason for reason in isolated)


# ------------------------------------------------------------------ routes


async def test_watch_routes_yields_a_new_table_when_a_replica_becomes_ready(
    head: HeadNode, fleet: FakeSchedulers
) -> None:
    await join(head)
    spec = make_spec()
    await head.apply(spec)
    await head.reconcile_once()
    [rid] = fleet.clients["s1"].created_ids

    watch = head.watch_routes("s2")
    assert isinstance(watch, AsyncGenerator)
    async with contextlib.aclosing(watch) as tables:
        first: RoutingTable = await asyncio.wait_for(anext(tables), 1)
        assert first.deployments["echo"].spec == spec
        assert first.deployments["echo"].routes == ()

        assert await head.scheduler_health("s1", fleet.clients["s1"].registry_version, [ready(rid, spec)])
        second: RoutingTable = await asyncio.wait_for(anext(tables), 1)

    assert second.version > first.version
    assert second.deployments["echo"].routes == (Route(rid, f"{rid}:9000", "s1", 0, revision=1),)
    assert head.routes == second


async def test_a_rejoining_scheduler_brings_its_ready_replicas_back_into_the_routes(head: HeadNode) -> None:
    spec = make_spec()
    await head.apply(spec)

    await join(head, "s1", ready("echo-abc123", spec))

    assert head.routes.deployments["echo"].routes == (
        Route("echo-abc123", "echo-abc123:9000", "s1", 0, revision=1),
    )
    assert await head.reconcile_once() == []


async def test_a_burst_of_registrations_reaches_a_stream_as_a_few_tables_with_every_route(
    head: HeadNode,
) -> None:
    """1,000 schedulers registering sent every stream a table per registration (a million
    messages): streams are woken at most every ROUTES_GAP_S and send the newest table."""
    spec = make_spec()
    await head.apply(spec)
    tables: list[RoutingTable] = []
    complete = asyncio.Event()

    async def watch() -> None:
        async for table in head.watch_routes("watcher"):
            tables.append(table)
            if len(table.deployments["echo"].routes) == 200:
                complete.set()
            await asyncio.sleep(0.02)  # sending takes a while: newer versions came meanwhile

    watching = asyncio.create_task(watch())
    try:
        started = asyncio.get_running_loop().time()
        for i in range(200):
            await join(head, f"s{i:03}", ready(f"echo-{i:06x}", spec))
            await asyncio.sleep(0.005)  # as between gRPC calls: the stream may run
        await asyncio.wait_for(complete.wait(), 5)
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching

    # One table per wake, however slow the stream: the first, then one per ROUTES_GAP_S at
    # most (the last has them all). Woken per version, it sent one per 20 ms.
    assert len(tables) <= 2 + elapsed / ROUTES_GAP_S[0], (len(tables), elapsed)
    assert len(tables) < 50
    assert tables[-1] == head.routes


async def test_a_health_update_rebuilds_only_the_entries_of_its_replicas_deployments(
    head: HeadNode, fleet: FakeSchedulers
) -> None:
    a, b = make_spec("a"), make_spec("b")
    await head.apply(a)
    await head.apply(b)
    await join(head, "s1", ReplicaReport("a-000001", "a", STARTING, spec_hash=a.process_hash()))
    await join(head, "s2", ready("b-000001", b))
    before = head.routes
    asked: list[list[str] | None] = []
    routes = head.state.routes

    def spy(only: Iterable[str] | None = None) -> dict[str, list[ReplicaRecord]]:
        asked.append(None if only is None else list(only))
        return routes(only)

    head.state.routes = spy  # type: ignore[method-assign]
    assert await head.scheduler_health("s1", 1, [ready("a-000001", a)])

    # Only a's replicas were walked (at 10,000 replicas, every entry at every change was
    # most of the head's work), and b's entry is the same object (streams skip it).
    assert asked == [["a"]]
    after = head.routes
    assert after.version > before.version
    assert after.deployments["b"] is before.deployments["b"]
    assert after.deployments["a"].routes == (Route("a-000001", "a-000001:9000", "s1", 0, revision=1),)
    # The same as a table built from nothing.
    again = HeadNode(Settings(), MemoryStore(), fleet, FakeClock())
    again.desired, again.history = head.desired, head.history
    again.state.replicas, again.state.schedulers = head.state.replicas, head.state.schedulers
    assert again._table() == dict(after.deployments)


async def test_watch_routes_ends_when_the_head_closes(store: MemoryStore, fleet: FakeSchedulers) -> None:
    node = HeadNode(Settings(), store, fleet, FakeClock())
    tables = node.watch_routes("s1")
    await asyncio.wait_for(anext(tables), 1)

    async def next_table() -> RoutingTable:
        return await anext(tables)

    waiting = asyncio.create_task(next_table())
    await asyncio.sleep(0.01)

    await node.aclose()

    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 1)


async def test_a_routes_change_answers_once_every_stream_sent_it_and_a_stuck_stream_slows_one_call(
    head: HeadNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment created and asked for at once was unknown at schedulers (404) for up to
    ROUTES_GAP_S, a revoked token accepted: the call answered before the table went out. It
    answers once every stream sent it now; a stream that does not take it within
    ROUTES_OUT_S is waited for once, not by every call, until it has caught up."""
    monkeypatch.setattr(head_node, "ROUTES_OUT_S", 0.3)
    loop = asyncio.get_running_loop()
    seen: list[int] = []

    async def read() -> None:
        async for table in head.watch_routes("s1"):
            seen.append(table.version)

    async def timed(spec: DeploymentSpec) -> float:
        started = loop.time()
        await head.apply(spec)
        return loop.time() - started

    reader = asyncio.create_task(read())
    stuck = head.watch_routes("s2")
    assert isinstance(stuck, AsyncGenerator)

    async def next_table() -> RoutingTable:
        return await anext(stuck)

    await next_table()
    first = asyncio.create_task(next_table())  # takes the next table, then is not read again
    await until(lambda: bool(seen), "the reader's first table")
    try:
        assert await timed(make_spec("a")) >= 0.3  # the stuck stream, waited for once
        assert seen[-1] == head.routes.version
        assert first.done()
        assert await timed(make_spec("b")) < 0.3  # not again
        assert seen[-1] == head.routes.version

        caught_up = asyncio.create_task(next_table())  # it reads again: sends the newest
        await until(lambda: caught_up.done(), "the stuck stream's newest table")
        again = asyncio.create_task(next_table())
        await asyncio.sleep(0.01)
        assert await timed(make_spec("c")) >= 0.3  # waited for again, once
        assert again.done()
    finally:
        reader.cancel()
        await stuck.aclose()


async def test_a_routes_change_answers_once_each_scheduler_says_it_routes_by_it(
    head: HeadNode, fleet: FakeSchedulers
) -> None:
    """Sent is not routed by: a scheduler applies a table as it reads it and passes it on to
    its ingress workers, and a request right after the call could still meet the old one (1
    to 7 of 40 asked). A scheduler that says which table it routes by (health updates'
    routes_version) is waited for until it says this one: it is asked to say at once (ack)."""
    await join(head, "s1")
    tables: list[RoutingTable] = []

    async def read() -> None:
        async for table in head.watch_routes("s1"):
            tables.append(table)

    async def say(version: int) -> None:
        assert await head.scheduler_health("s1", 0, [], routes_version=version)

    reader = asyncio.create_task(read())
    await head.apply(make_spec("z"))  # s1 has said no table yet: not waited for
    await until(lambda: bool(tables) and "z" in tables[-1].deployments, "the first table")
    await say(tables[-1].version)
    try:
        applying = asyncio.create_task(head.apply(make_spec("a")))
        await until(lambda: any("a" in t.deployments for t in tables), "the new table sent")
        await asyncio.sleep(0.1)
        assert not applying.done()  # sent, not yet routed by
        assert tables[-1].ack  # asked to say so at once
        # The same spec again (another client; a retry of a call whose answer was lost):
        # nothing changes, and it answers once the table is routed by too (before, at once).
        again = asyncio.create_task(head.apply(make_spec("a")))
        await asyncio.sleep(0.1)
        assert not again.done()
        await say(tables[-1].version)
        await asyncio.wait_for(applying, 1.0)
        assert not (await asyncio.wait_for(again, 1.0)).changed
        # A table no call waits on asks nothing.
        await head.scheduler_health("s1", 0, [ready("a-000001", make_spec("a"))])
        await until(lambda: len(tables[-1].deployments["a"].routes) == 1, "the route's table")
        assert not tables[-1].ack
    finally:
        reader.cancel()


def read_tables(head: HeadNode, scheduler_id: str) -> tuple[list[RoutingTable], asyncio.Task[None]]:
    """The tables the head streams to ``scheduler_id``, as they come, and the reading task."""
    tables: list[RoutingTable] = []

    async def read() -> None:
        async for table in head.watch_routes(scheduler_id):
            tables.append(table)

    return tables, asyncio.create_task(read())


async def apply_waits_for_the_word(head: HeadNode, tables: list[RoutingTable], name: str) -> None:
    """Apply deployment ``name``: once its table is sent to s1, the call still waits, and
    answers when s1 says it routes by that table."""
    applying = asyncio.create_task(head.apply(make_spec(name)))
    await until(lambda: name in tables[-1].deployments, "the new table sent")
    await asyncio.sleep(0.1)
    assert not applying.done()  # waits for s1's word on it
    assert await head.scheduler_health("s1", 0, [], routes_version=tables[-1].version)
    await asyncio.wait_for(applying, 1.0)


async def test_a_scheduler_routing_by_a_new_heads_first_table_is_waited_for(head: HeadNode) -> None:
    """A head with nothing in its store sends schedulers an empty first table. It was
    version 0, and a scheduler routing by it said 0, which reads as "says nothing": so the
    first change after such a start was taken at the send by every scheduler, and a request
    right after it could meet a worker without it (seen: a 404 for a deployment just
    created, 2 in 11 runs of tests/integration/test_routes_out.py beside other tests)."""
    await join(head, "s1")
    tables, reader = read_tables(head, "s1")
    await until(lambda: bool(tables), "the first table")
    try:
        assert not tables[0].deployments
        assert await head.scheduler_health("s1", 0, [], routes_version=tables[0].version)
        await apply_waits_for_the_word(head, tables, "a")
    finally:
        reader.cancel()


async def test_a_scheduler_that_registered_saying_it_will_say_is_waited_for_before_its_first_word(
    head: HeadNode,
) -> None:
    """A scheduler says which table it routes by once it has taken one, up to a heartbeat
    after it registered: a deployment created meanwhile was taken at the send to it, and a
    request right after the call could meet one of its workers without it. One that
    registers saying it will say (this version's schedulers) is waited for from then on;
    one that does not (another version) is still taken at the send."""
    await join(head, "s1", says_routes=True)
    tables, reader = read_tables(head, "s1")
    await until(lambda: bool(tables), "the first table")
    try:
        await apply_waits_for_the_word(head, tables, "a")  # no word said before this one
        await join(head, "s1")  # registered again, as another version would: taken at the send
        await asyncio.wait_for(head.apply(make_spec("b")), 1.0)
    finally:
        reader.cancel()


async def test_a_word_on_a_table_this_head_never_made_is_not_taken(head: HeadNode) -> None:
    # A head started again numbers its tables from 1; a scheduler still saying the old
    # head's 500 would have been taken to route by every table up to it.
    await join(head, "s1")
    tables, reader = read_tables(head, "s1")
    await head.apply(make_spec("z"))
    await until(lambda: bool(tables) and "z" in tables[-1].deployments, "the first table")
    try:
        assert await head.scheduler_health("s1", 0, [], routes_version=head.routes.version + 500)
        assert await head.scheduler_health("s1", 0, [], routes_version=tables[-1].version)
        await apply_waits_for_the_word(head, tables, "a")
    finally:
        reader.cancel()


async def test_a_scheduler_late_taking_a_table_shows_so_in_the_status_until_it_catches_up(
    head: HeadNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(head_node, "ROUTES_OUT_S", 0.2)
    await join(head, "s1")
    tables: list[RoutingTable] = []

    async def read() -> None:
        async for table in head.watch_routes("s1"):
            tables.append(table)

    def lagging() -> bool:
        return next(s for s in status_of(head).schedulers if s.id == "s1").routes_lagging

    reader = asyncio.create_task(read())
    await head.apply(make_spec("z"))
    await until(lambda: bool(tables) and "z" in tables[-1].deployments, "the first table")
    try:
        assert await head.scheduler_health("s1", 0, [], routes_version=tables[-1].version)
        assert not lagging()
        await head.apply(make_spec("a"))  # s1 never says it routes by this one: 0.2 s, then on
        assert lagging()
        assert status_of(head).to_json()["schedulers"][0]["routes_lagging"] is True
        assert "ALIVE (tables late)" in render_status(status_of(head).to_json())
        assert await head.scheduler_health("s1", 0, [], routes_version=head.routes.version)
        assert not lagging()
    finally:
        reader.cancel()


async def test_applies_back_to_back_do_not_wait_for_the_wave_gap_of_health_changes(head: HeadNode) -> None:
    # Each apply waits for its table to go out; with the 0.1 s gap between waves that health
    # changes get, ten applies in a row took a second. A control call's wave comes sooner.
    seen: list[int] = []

    async def read() -> None:
        async for table in head.watch_routes("s1"):
            seen.append(table.version)

    reader = asyncio.create_task(read())
    await until(lambda: bool(seen), "the reader's first table")
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        for i in range(10):
            await head.apply(make_spec(f"d{i}"))
            assert seen[-1] == head.routes.version
        # Ten waves 0.1 s apart took 0.9 s at least; a control call's wave comes 5 ms after the last.
        assert loop.time() - started < 7 * ROUTES_GAP_S[0]
    finally:
        reader.cancel()


async def test_aclose_closes_the_scheduler_clients(head: HeadNode, fleet: FakeSchedulers) -> None:
    await join(head)
    await head.apply(make_spec())
    await head.reconcile_once()

    await head.aclose()

    assert fleet.clients["s1"].closed


async def heartbeats(node: HeadNode, sid: str) -> None:
    """``sid``'s health updates, every 20 ms, until cancelled."""
    while True:
        assert await node.scheduler_health(sid, 0, [])
        await asyncio.sleep(0.02)


async def test_a_silent_schedulers_replicas_are_replaced_once_it_is_dead_not_at_the_next_interval(
    store: MemoryStore, fleet: FakeSchedulers
) -> None:
    """The reconcile loop wakes when the next scheduler could be declared dead: with passes
    30 s apart, s1's replica is still placed on s2 as soon as s1 has been silent dead_after_s."""
    node = HeadNode(Settings(dead_after_s=0.2, reconcile_interval_s=30), store, fleet)
    spec = make_spec()
    await node.apply(spec)
    await join(node, "s1", ready("echo-1", spec))
    await join(node, "s2")
    await node.start()

    beating = asyncio.create_task(heartbeats(node, "s2"))
    try:
        await until(lambda: bool(fleet.client("s2", "s2:7000").created), "a replacement on s2", 5)
        assert node.state.schedulers["s1"].state == "DEAD"
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        await node.aclose()


async def test_a_scheduler_that_does_not_answer_does_not_hold_up_the_next_pass(
    store: MemoryStore, fleet: FakeSchedulers
) -> None:
    """The loop's passes do not wait for their calls to schedulers: while s1 has not answered
    the CreateReplica of one deployment, the next deployment is placed all the same."""
    node = HeadNode(Settings(dead_after_s=0.3, reconcile_interval_s=0.05), store, fleet)
    answer = asyncio.Event()
    asked: list[str] = []

    async def create_replica(replica_id: str, spec: DeploymentSpec) -> int:
        asked.append(spec.name)
        await answer.wait()
        return 1

    fleet.client("s1", "s1:7000").create_replica = create_replica  # type: ignore[method-assign]
    await join(node, "s1")
    await node.start()

    beating = asyncio.create_task(heartbeats(node, "s1"))
    try:
        await node.apply(make_spec("a"))
        await until(lambda: asked == ["a"], "a placed on s1", 5)
        await node.apply(make_spec("b"))
        await until(lambda: asked == ["a", "b"], "b placed while a's call hangs", 5)
    finally:
        answer.set()
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        await node.aclose()

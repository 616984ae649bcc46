"""ClusterState: membership, reconcile decisions, rolling updates, backoff, placement.

A ``Sim`` plays a scheduler: it applies the head's actions to its own registry (as a
real scheduler would), confirms creations and sends health reports. Time is a
``FakeClock``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pytest

from shoal.core.clock import FakeClock
from shoal.core.cluster import (
    BACKOFF_MAX_S,
    DRAINING,
    FAILED_AFTER,
    PENDING,
    READY,
    REPLICA_DEAD,
    STARTING,
    Action,
    ClusterState,
    CreateReplica,
    RemoveReplica,
    ReplicaReport,
)
from shoal.core.placement import Capacity
from shoal.core.spec import STABLE_AFTER_S, DeploymentSpec, parse_spec
from tests.unit.conftest import make_spec

pytestmark = pytest.mark.timeout(10)


def want(*specs: DeploymentSpec) -> dict[str, tuple[DeploymentSpec, int]]:
    return {s.name: (s, s.replicas) for s in specs}


def creates(actions: Iterable[Action]) -> list[CreateReplica]:
    return [a for a in actions if isinstance(a, CreateReplica)]


def removes(actions: Iterable[Action]) -> list[RemoveReplica]:
    return [a for a in actions if isinstance(a, RemoveReplica)]


class Sim:
    """One scheduler: its registry of replicas and its registry version."""

    def __init__(self, state: ClusterState, sid: str, *, cpus: float = 8.0, max_replicas: int = 0) -> None:
        self.state = state
        self.id = sid
        self.capacity = Capacity(cpus=cpus, memory_mb=4096, gpus=0)
        self.max_replicas = max_replicas
        self.version = 0
        self.running: dict[str, ReplicaReport] = {}
        self.register()

    def register(self) -> None:
        self.state.register(
            self.id,
            f"{self.id}:7000",
            f"{self.id}:7001",
            self.capacity,
            replicas=list(self.running.values()),
            max_replicas=self.max_replicas,
        )

    def act(self, actions: Sequence[Action]) -> None:
        """Do what the head asked of this scheduler, confirming creations."""
        for a in actions:
            if a.scheduler_id != self.id:
                continue
            self.version += 1
            if isinstance(a, CreateReplica):
                self.running[a.replica_id] = ReplicaReport(
                    a.replica_id, a.deployment, STARTING, spec_hash=a.spec.process_hash()
                )
                self.state.confirm_created(a.replica_id, self.version)
            else:
                del self.running[a.replica_id]

    def ready(self, *rids: str) -> None:
        for rid in rids:
            rep = self.running[rid]
            self.running[rid] = ReplicaReport(
                rid,
                rep.deployment,
                READY,
                address=f"{rid}:9000",
                spec_hash=rep.spec_hash,
                ready_at=self.state.clock.now(),
            )

    def die(self, rid: str, message: str, *, crashed: bool = False) -> None:
        """``crashed``: of its own doing (an error exit); False: killed from outside (kill -9)."""
        rep = self.running[rid]
        self.running[rid] = ReplicaReport(
            rid,
            rep.deployment,
            REPLICA_DEAD,
            spec_hash=rep.spec_hash,
            message=message,
            ready_at=rep.ready_at,
            crashed=crashed,
        )

    def beat(self) -> bool:
        ack = self.state.health(self.id, self.version, list(self.running.values()))
        self.running = {rid: r for rid, r in self.running.items() if r.state != REPLICA_DEAD}
        return ack


def states(state: ClusterState, deployment: str = "echo") -> dict[str, str]:
    return {r.id: r.state for r in state.replicas.values() if r.deployment == deployment}


def ready_ids(state: ClusterState, deployment: str = "echo") -> list[str]:
    return [r.id for r in state.routes().get(deployment, [])]


def event_kinds(state: ClusterState) -> list[str]:
    return [e.kind for e in state.events]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(clock: FakeClock) -> ClusterState:
    return ClusterState(clock=clock, dead_after_s=5.0)


def converge(
    state: ClusterState, sims: Sequence[Sim], desired: dict[str, tuple[DeploymentSpec, int]]
) -> None:
    """Reconcile, create, make everything READY, until nothing is left to do."""
    for _ in range(10):
        actions = state.reconcile(desired)
        if not actions:
            return
        for sim in sims:
            sim.act(actions)
            sim.ready(*[rid for rid, r in sim.running.items() if r.state == STARTING])
            assert sim.beat()
    raise AssertionError("reconcile did not converge")


# ------------------------------------------------------------------ creation


def test_a_registered_scheduler_gets_one_create_per_replica(state: ClusterState) -> None:
    Sim(state, "s1")
    spec = make_spec(replicas=3)

    actions = state.reconcile(want(spec))

    assert removes(actions) == []
    made = creates(actions)
    assert len(made) == 3
    assert {a.scheduler_id for a in made} == {"s1"}
    assert {a.deployment for a in made} == {"echo"}
    assert all(a.spec == spec for a in made)
    assert len({a.replica_id for a in made}) == 3
    assert all(a.replica_id.startswith("echo-") for a in made)
    assert states(state) == {a.replica_id: PENDING for a in made}


def test_creates_are_not_repeated_while_pending(state: ClusterState) -> None:
    Sim(state, "s1")
    spec = make_spec(replicas=2)
    first = state.reconcile(want(spec))

    assert state.reconcile(want(spec)) == []
    assert len(states(state)) == 2
    assert len(creates(first)) == 2


def test_health_reports_confirm_and_ready_the_created_replicas(state: ClusterState) -> None:
    s1 = Sim(state, "s1")
    spec = make_spec(replicas=2)
    actions = state.reconcile(want(spec))
    ids = sorted(a.replica_id for a in creates(actions))

    s1.act(actions)
    assert s1.beat()
    assert states(state) == dict.fromkeys(ids, STARTING)
    assert state.routes() == {}

    s1.ready(*ids)
    assert s1.beat()
    assert states(state) == dict.fromkeys(ids, READY)
    assert ready_ids(state) == ids
    assert [r.address for r in state.routes()["echo"]] == [f"{rid}:9000" for rid in ids]
    assert event_kinds(state).count("replica_ready") == 2
    assert state.reconcile(want(spec)) == []


def test_a_report_older_than_the_creation_does_not_drop_the_replica(state: ClusterState) -> None:
    Sim(state, "s1")
    spec = make_spec()
    [create] = creates(state.reconcile(want(spec)))
    state.confirm_created(create.replica_id, 5)

    # Sent by the scheduler before it added the replica: version 4 does not know it.
    assert state.health("s1", 4, [])
    assert states(state) == {create.replica_id: STARTING}
    assert state.reconcile(want(spec)) == []

    # Version 5 should know it: it is gone.
    assert state.health("s1", 5, [])
    assert states(state) == {}
    [died] = [e for e in state.events if e.kind == "replica_died"]
    assert died.replica_id == create.replica_id
    assert died.message == f"replica {create.replica_id} died: no longer reported by its scheduler"


def test_a_pending_replica_survives_any_report_until_confirmed(state: ClusterState) -> None:
    Sim(state, "s1")
    spec = make_spec()
    [create] = creates(state.reconcile(want(spec)))

    assert state.health("s1", 100, [])
    assert states(state) == {create.replica_id: PENDING}


def test_a_ready_replica_missing_from_a_newer_report_is_replaced_at_once(state: ClusterState) -> None:
    s1 = Sim(state, "s1")
    spec = make_spec(replicas=2)
    converge(state, [s1], want(spec))
    lost, kept = sorted(s1.running)

    del s1.running[lost]
    s1.version += 1
    assert s1.beat()

    assert set(states(state)) == {kept}
    actions = state.reconcile(want(spec))
    assert removes(actions) == []
    [create] = creates(actions)
    assert create.replica_id not in (lost, kept)
    assert state.pending_reasons == {}


def test_a_dead_report_replaces_the_replica_and_records_an_event(state: ClusterState) -> None:
    s1 = Sim(state, "s1")
    spec = make_spec()
    converge(state, [s1], want(spec))
    [rid] = s1.running

    s1.die(rid, "exit code 137")
    assert s1.beat()

    assert states(state) == {}
    assert ready_ids(state) == []
    event = state.events[-1]
    assert (event.kind, event.replica_id, event.deployment, event.scheduler_id) == (
        "replica_died",
        rid,
        "echo",
        "s1",
    )
    assert event.message == f"replica {rid} died: exit code 137"
    # It had been READY: no start-failure backoff.
    [create] = creates(state.reconcile(want(spec)))
    assert create.scheduler_id == "s1"
    assert create.replica_id != rid


# ------------------------------------------------------------------ membership


def test_unknown_scheduler_health_is_nacked(state: ClusterState) -> None:
    assert state.health("nobody", 1, []) is False
    assert state.schedulers == {}


def test_a_silent_scheduler_dies_its_replicas_move_and_it_rejoins(
    state: ClusterState, clock: FakeClock
) -> None:
    s1, s2 = Sim(state, "s1"), Sim(state, "s2")
    spec = make_spec(replicas=2)
    converge(state, [s1, s2], want(spec))
    assert (len(s1.running), len(s2.running)) == (1, 1)
    [old_on_s1] = s1.running

    # s2 keeps beating; s1 goes silent. Exactly dead_after_s is not yet dead.
    clock.advance(3.0)
    assert s2.beat()
    clock.advance(2.0)
    assert state.reconcile(want(spec)) == []
    assert state.schedulers["s1"].state == "ALIVE"

    clock.advance(0.5)
    actions = state.reconcile(want(spec))

    assert state.schedulers["s1"].state == "DEAD"
    assert state.schedulers["s2"].state == "ALIVE"
    assert [(a.scheduler_id, a.deployment) for a in creates(actions)] == [("s2", "echo")]
    assert removes(actions) == []
    dead = [e for e in state.events if e.kind == "scheduler_dead"]
    assert [e.message for e in dead] == [
        "scheduler s1 missed health updates for 5s; 1 replica(s) to place elsewhere"
    ]
    assert old_on_s1 not in state.replicas
    s2.act(actions)
    [replacement] = [a.replica_id for a in creates(actions)]
    s2.ready(replacement)
    assert s2.beat()

    # s1 comes back to life: its updates are refused until it registers again.
    assert s1.beat() is False
    assert old_on_s1 not in state.replicas

    s1.register()
    assert state.schedulers["s1"].state == "ALIVE"
    assert "scheduler_rejoined" in event_kinds(state)
    assert states(state)[old_on_s1] == READY
    assert s1.beat()

    actions = state.reconcile(want(spec))
    assert creates(actions) == []
    # Three READY replicas for a target of two: the newest goes.
    assert [(a.scheduler_id, a.replica_id) for a in removes(actions)] == [("s2", replacement)]
    live = [rid for rid, st in states(state).items() if st != DRAINING]
    assert len(live) == 2
    assert state.reconcile(want(spec)) == []


def test_a_scheduler_that_restarts_empty_gets_its_replicas_again(state: ClusterState) -> None:
    s1 = Sim(state, "s1")
    spec = make_spec(replicas=2)
    converge(state, [s1], want(spec))
    before = set(s1.running)

    s1.running.clear()  # restarted: its replica processes are gone
    s1.register()

    assert states(state) == {}
    actions = state.reconcile(want(spec))
    assert len(creates(actions)) == 2
    assert not before & {a.replica_id for a in creates(actions)}


# ------------------------------------------------------------------ scaling and deletion


def test_scale_down_removes_replicas_that_are_not_ready_first(state: ClusterState) -> None:
    s1 = Sim(state, "s1")
    spec = make_spec(replicas=3)
    actions = state.reconcile(want(spec))
    s1.act(actions)
    first, second, third = [a.replica_id for a in creates(actions)]
    s1.ready(first, second)
    assert s1.beat()

    actions = state.reconcile(want(spec.model_copy(update={"replicas": 1})))

    assert creates(actions) == []
    # Not READY first, then the newest READY one; all graceful.
    assert [(a.replica_id, a.graceful) for a in removes(actions)] == [(third, True), (second, True)]
    assert states(state) == {first: READY, second: DRAINING, third: DRAINING}
    assert ready_ids(state) == [first]


def test_deleting_a_deployment_removes_only_its_replicas(state: ClusterState) -> None:
    s1 = Sim(state, "s1")
    echo, other = make_spec(replicas=2), make_spec("other")
    converge(state, [s1], want(echo, other))
    echo_ids = sorted(states(state, "echo"))

    actions = state.reconcile(want(other), deleted={"echo"})

    assert creates(actions) == []
    assert sorted(a.replica_id for a in removes(actions)) == echo_ids
    assert all(a.graceful for a in removes(actions))
    assert list(states(state, "other").values()) == [READY]
    assert state.reconcile(want(other), deleted={"echo"}) == []

    s1.act(actions)
    assert s1.beat()
    assert states(state, "echo") == {}
    assert event_kinds(state).count("replica_stopped") == 2


def test_changing_only_the_replica_count_recreates_nothing(state: ClusterState) -> None:
    s1 = Sim(state, "s1")
    spec = make_spec(replicas=2)
    converge(state, [s1], want(spec))
    before = set(states(state))

    up = parse_spec(
        {**spec.model_dump(), "replicas": 3, "autoscaling": {"min_replicas": 1, "max_replicas": 5}}
    )
    assert up.process_hash() == spec.process_hash()
    actions = state.reconcile({"echo": (up, 3)})

    assert removes(actions) == []
    assert len(creates(actions)) == 1
    assert before < set(states(state))


# ------------------------------------------------------------------ rolling update


def test_a_model_change_rolls_without_dropping_below_the_target(state: ClusterState) -> None:
    s1 = Sim(state, "s1")
    v1 = make_spec(replicas=2, model="m1")
    converge(state, [s1], want(v1))
    old = sorted(states(state))
    v2 = make_spec(replicas=2, model="m2")
    assert v2.process_hash() != v1.process_hash()

    # Step 1: one new replica (surge of one), nothing removed yet.
    actions = state.reconcile(want(v2))
    assert removes(actions) == []
    [new1] = creates(actions)
    assert new1.spec.model == "m2"
    s1.act(actions)
    assert s1.beat()
    assert state.reconcile(want(v2)) == []
    assert ready_ids(state) == old

    # Step 2: new1 READY -> one old goes, the next new one starts.
    s1.ready(new1.replica_id)
    assert s1.beat()
    actions = state.reconcile(want(v2))
    [new2] = creates(actions)
    [gone] = removes(actions)
    assert gone.replica_id in old
    assert len(ready_ids(state)) == 2
    s1.act(actions)
    assert s1.beat()
    assert len(ready_ids(state)) == 2

    # Step 3: new2 READY -> the last old one goes.
    s1.ready(new2.replica_id)
    assert s1.beat()
    actions = state.reconcile(want(v2))
    assert creates(actions) == []
    assert [a.replica_id for a in removes(actions)] == [r for r in old if r != gone.replica_id]
    assert ready_ids(state) == sorted([new1.replica_id, new2.replica_id])
    s1.act(actions)
    assert s1.beat()

    assert state.reconcile(want(v2)) == []
    assert {r.spec_hash for r in state.replicas.values()} == {v2.process_hash()}
    assert len(state.replicas) == 2


def test_a_rollout_with_no_room_to_surge_drains_one_old_replica_first(state: ClusterState) -> None:
    s1 = Sim(state, "s1", cpus=2.0)
    v1 = make_spec(replicas=2, model="m1", cpus=1.0)
    converge(state, [s1], want(v1))
    old = sorted(states(state))
    v2 = make_spec(replicas=2, model="m2", cpus=1.0)

    # Full machine: no new replica fits beside the old ones, so one old one drains first.
    actions = state.reconcile(want(v2))
    assert creates(actions) == []
    [gone] = removes(actions)
    assert gone.replica_id in old
    assert "draining one old replica first" in state.pending_reasons["echo"]
    # Only one at a time: nothing more until it is gone.
    assert state.reconcile(want(v2)) == []
    s1.act(actions)
    assert s1.beat()
    # Its room goes to the first new replica; then the rollout goes on as usual.
    converge(state, [s1], want(v2))
    assert {r.spec_hash for r in state.replicas.values()} == {v2.process_hash()}
    assert len(ready_ids(state)) == 2


def test_a_rollout_on_a_scheduler_at_its_max_replicas_drains_one_old_replica_first(
    state: ClusterState,
) -> None:
    s1 = Sim(state, "s1", cpus=8.0, max_replicas=2)
    v1 = make_spec(replicas=2, model="m1", cpus=0.1)
    converge(state, [s1], want(v1))
    v2 = make_spec(replicas=2, model="m2", cpus=0.1)

    actions = state.reconcile(want(v2))

    assert creates(actions) == [] and len(removes(actions)) == 1
    assert state.pending_reasons["echo"] == (
        "no scheduler has room (max_replicas 2 reached on s1); draining one old replica first to make room"
    )
    s1.act(actions)
    assert s1.beat()
    converge(state, [s1], want(v2))
    assert {r.spec_hash for r in state.replicas.values()} == {v2.process_hash()}
    assert len(ready_ids(state)) == 2


def test_a_rollout_to_replicas_too_big_for_any_scheduler_keeps_the_old_ones(state: ClusterState) -> None:
    """Draining to make room cannot help a replica no scheduler is big enough for: it used to
    drain every old replica, one a pass, and leave nothing serving."""
    s1 = Sim(state, "s1", cpus=1.0)
    v1 = make_spec(replicas=2, model="m1", cpus=0.5)
    converge(state, [s1], want(v1))
    old = sorted(states(state))
    v2 = make_spec(replicas=2, model="m2", cpus=2.0)

    for _ in range(4):
        actions = state.reconcile(want(v2))
        assert actions == []
        s1.act(actions)
        assert s1.beat()
    assert ready_ids(state) == old
    assert state.pending_reasons["echo"].startswith("no scheduler is big enough (cpus 2 > 1")
    assert "draining" not in state.pending_reasons["echo"]


def test_a_rollout_drains_only_where_a_new_replica_could_fit(state: ClusterState) -> None:
    """Old replicas on two schedulers with no room for a new one: only where freeing an old
    one's room lets a new one fit is one drained (small: 0.2 free, 0.7 once one goes; big:
    0.3 free, 0.8 once one goes; a new one takes 0.75)."""
    small, big = Sim(state, "small", cpus=1.2), Sim(state, "big", cpus=2.3)
    v1 = make_spec(replicas=4, model="m1", cpus=0.5)
    converge(state, [small, big], want(v1))
    filler = make_spec(name="filler", replicas=1, cpus=1.0)
    desired = {**want(v1), **want(filler)}
    converge(state, [small, big], desired)
    on_big = {r.id for r in state.replicas.values() if r.deployment == "echo" and r.scheduler_id == "big"}
    assert len(on_big) == 2 and len(states(state)) == 4
    v2 = make_spec(replicas=4, model="m2", cpus=0.75)

    actions = state.reconcile({**want(v2), **want(filler)})
    assert creates(actions) == []
    [gone] = removes(actions)
    assert gone.replica_id in on_big
    small.act(actions)
    big.act(actions)
    assert small.beat() and big.beat()
    # One is missing now: nothing more is drained until a new one is READY in its room.
    [made] = creates(state.reconcile({**want(v2), **want(filler)}))
    assert made.scheduler_id == "big"


def test_a_rollout_that_no_single_drain_makes_room_for_drains_nothing(state: ClusterState) -> None:
    """Room for a new replica needs two old ones gone: the update waits, saying why, with
    every old replica serving (before, it drained them one a pass, each for nothing)."""
    s1 = Sim(state, "s1", cpus=1.0)
    v1 = make_spec(replicas=2, model="m1", cpus=0.5)
    converge(state, [s1], want(v1))
    old = sorted(states(state))
    v2 = make_spec(replicas=2, model="m2", cpus=0.8)
    for _ in range(3):
        actions = state.reconcile(want(v2))
        assert actions == []
    assert ready_ids(state) == old
    assert state.pending_reasons["echo"].startswith("no scheduler has room (cpus 0.8 > 0 free on s1")


def test_a_rollout_whose_new_replicas_fail_keeps_the_old_ones(state: ClusterState) -> None:
    s1 = Sim(state, "s1")
    v1 = make_spec(replicas=2, model="m1")
    converge(state, [s1], want(v1))
    old = sorted(states(state))

    v2 = make_spec(replicas=2, model="broken")
    actions = state.reconcile(want(v2))
    s1.act(actions)
    [new] = creates(actions)
    s1.die(new.replica_id, "cannot load model")
    assert s1.beat()

    assert state.reconcile(want(v2)) == []
    assert ready_ids(state) == old


# ------------------------------------------------------------------ start-failure backoff


def test_a_replica_dying_before_ready_delays_the_next_creation(state: ClusterState, clock: FakeClock) -> None:
    s1 = Sim(state, "s1")
    spec = make_spec()
    actions = state.reconcile(want(spec))
    s1.act(actions)
    [first] = creates(actions)
    s1.die(first.replica_id, "ImportError: no module named model")
    assert s1.beat()

    assert state.reconcile(want(spec)) == []
    assert state.pending_reasons == {
        "echo": "1 replica start failure(s), retrying in 1s: ImportError: no module named model"
    }
    clock.advance(0.9)
    assert state.reconcile(want(spec)) == []

    clock.advance(0.2)
    actions = state.reconcile(want(spec))
    [second] = creates(actions)
    assert state.pending_reasons == {}

    # A second failure doubles the wait.
    s1.act(actions)
    s1.die(second.replica_id, "ImportError: no module named model")
    assert s1.beat()
    assert state.reconcile(want(spec)) == []
    assert state.pending_reasons["echo"].startswith("2 replica start failure(s), retrying in 2s")
    clock.advance(1.5)
    assert state.reconcile(want(spec)) == []
    clock.advance(0.6)
    assert len(creates(state.reconcile(want(spec)))) == 1


def test_staying_ready_resets_the_backoff(state: ClusterState, clock: FakeClock) -> None:
    s1 = Sim(state, "s1")
    spec = make_spec()
    for _ in range(3):  # three start failures: the next wait would be 4s
        actions = state.reconcile(want(spec))
        s1.act(actions)
        [c] = creates(actions)
        s1.die(c.replica_id, "boom")
        assert s1.beat()
        clock.advance(10.0)
        assert s1.beat()

    actions = state.reconcile(want(spec))
    s1.act(actions)
    [ok] = creates(actions)
    s1.ready(ok.replica_id)
    assert s1.beat()
    clock.advance(STABLE_AFTER_S)
    assert s1.beat()
    s1.die(ok.replica_id, "crashed later", crashed=True)  # READY for STABLE_AFTER_S: replaced at once
    assert s1.beat()
    actions = state.reconcile(want(spec))
    s1.act(actions)
    [c] = creates(actions)
    s1.die(c.replica_id, "boom")
    assert s1.beat()

    assert state.reconcile(want(spec)) == []
    assert state.pending_reasons["echo"] == "1 replica start failure(s), retrying in 1s: boom"


def crash_after_ready(
    state: ClusterState, s1: Sim, spec: DeploymentSpec, *, crashed: bool = True, up_s: float = 1.0
) -> str:
    """Start a replica of ``spec``, see it READY, and have it die ``up_s`` later."""
    actions = state.reconcile(want(spec))
    s1.act(actions)
    [c] = creates(actions)
    assert s1.beat()
    s1.ready(c.replica_id)
    assert s1.beat()
    state.clock.advance(up_s)  # type: ignore[attr-defined]  # a FakeClock
    s1.die(c.replica_id, "process exited with code 1: RuntimeError: lost the device", crashed=crashed)
    assert s1.beat()
    return c.replica_id


def test_replicas_crashing_soon_after_ready_back_off_then_fail(state: ClusterState, clock: FakeClock) -> None:
    # Before, a READY replica's death was never a failed start: one whose model exits a second
    # after loading restarted at once, for ever, and the deployment looked healthy.
    s1 = Sim(state, "s1")
    spec = make_spec()
    crash_after_ready(state, s1, spec)

    assert state.reconcile(want(spec)) == []
    assert state.pending_reasons["echo"] == (
        "1 replica start failure(s), retrying in 1s: "
        "died 1s after READY: process exited with code 1: RuntimeError: lost the device"
    )
    for wait in (1.0, 2.0):
        clock.advance(wait)
        crash_after_ready(state, s1, spec)
    clock.advance(4.0)
    crash_after_ready(state, s1, spec)

    assert state.reconcile(want(spec)) == []
    assert state.pending_reasons["echo"].startswith(
        f"FAILED: {FAILED_AFTER} replicas in a row died before READY or within {STABLE_AFTER_S:.0f}s of it"
    )
    [(name, _, message)] = state.take_failed()
    assert name == "echo" and message.startswith("died 1s after READY: process exited with code 1")
    clock.advance(100.0)
    assert state.reconcile(want(spec)) == []  # no more starts until the next deploy


def test_replicas_killed_from_outside_soon_after_ready_are_replaced_at_once(
    state: ClusterState, clock: FakeClock
) -> None:
    # kill -9 (a chaos run, the OOM killer) is not the model's doing: no backoff, never FAILED.
    s1 = Sim(state, "s1")
    spec = make_spec()
    for _ in range(2 * FAILED_AFTER):
        crash_after_ready(state, s1, spec, crashed=False)
        assert state.pending_reasons == {}
    assert len(creates(state.reconcile(want(spec)))) == 1
    assert state.take_failed() == []


def test_a_crash_long_after_ready_is_replaced_at_once(state: ClusterState, clock: FakeClock) -> None:
    s1 = Sim(state, "s1")
    spec = make_spec()
    actions = state.reconcile(want(spec))
    s1.act(actions)
    [c] = creates(actions)
    s1.ready(c.replica_id)
    assert s1.beat()
    clock.advance(STABLE_AFTER_S + 1.0)
    s1.die(c.replica_id, "process exited with code 1: MemoryError", crashed=True)
    assert s1.beat()

    assert len(creates(state.reconcile(want(spec)))) == 1
    assert state.pending_reasons == {}


@pytest.mark.parametrize(("stable_after_s", "judged"), [(None, False), (120.0, True)])
def test_health_stable_after_s_sets_how_long_ready_proves_a_spec(
    clock: FakeClock, stable_after_s: float | None, judged: bool
) -> None:
    # A model that crashes 90 s after every READY: past the default 60 s each crash is
    # replaced at once, for ever; with stable_after_s 120 it is the crash loop it is. Before,
    # the 60 s was a constant that no spec (and no test) could change.
    state = ClusterState(clock=clock, dead_after_s=1e6)  # the scheduler lives through the jumps
    s1 = Sim(state, "s1")
    spec = make_spec(health={} if stable_after_s is None else {"stable_after_s": stable_after_s})
    for _ in range(FAILED_AFTER):
        crash_after_ready(state, s1, spec, up_s=90.0)
        clock.advance(BACKOFF_MAX_S)
    state.reconcile(want(spec))
    reason = state.pending_reasons.get("echo", "")
    if judged:
        assert reason.startswith(
            f"FAILED: {FAILED_AFTER} replicas in a row died before READY or within 120s of it"
        )
        assert "died 90s after READY" in reason
        assert [name for name, _, _ in state.take_failed()] == ["echo"]
    else:
        assert reason == ""
        assert state.take_failed() == []


def test_reaching_ready_alone_does_not_end_a_run_of_failures(state: ClusterState, clock: FakeClock) -> None:
    # A replica that fails to load, then one that loads and crashes a second later: two in a row.
    s1 = Sim(state, "s1")
    spec = make_spec()
    actions = state.reconcile(want(spec))
    s1.act(actions)
    [c] = creates(actions)
    s1.die(c.replica_id, "boom")
    assert s1.beat()
    clock.advance(1.1)
    crash_after_ready(state, s1, spec)

    assert state.reconcile(want(spec)) == []
    assert state.pending_reasons["echo"].startswith("2 replica start failure(s), retrying in 2s")


def test_a_failed_create_call_backs_off_and_records_an_event(state: ClusterState, clock: FakeClock) -> None:
    Sim(state, "s1")
    spec = make_spec()
    [c] = creates(state.reconcile(want(spec)))

    state.create_failed(c.replica_id, "scheduler unreachable")

    assert states(state) == {}
    assert state.events[-1].kind == "replica_create_failed"
    assert state.events[-1].message == f"could not create {c.replica_id}: scheduler unreachable"
    assert state.reconcile(want(spec)) == []
    assert (
        state.pending_reasons["echo"] == "1 replica start failure(s), retrying in 1s: scheduler unreachable"
    )
    clock.advance(1.01)
    assert len(creates(state.reconcile(want(spec)))) == 1


# ------------------------------------------------------------------ placement


def test_a_replica_is_not_placed_where_it_does_not_fit(state: ClusterState) -> None:
    Sim(state, "small", cpus=1.0)
    big = make_spec("big", cpus=2.0)

    assert state.reconcile(want(big)) == []
    assert state.pending_reasons == {"big": "no scheduler is big enough (cpus 2 > 1, the largest capacity)"}
    assert state.replicas == {}

    Sim(state, "large", cpus=4.0)
    [c] = creates(state.reconcile(want(big)))
    assert c.scheduler_id == "large"
    assert state.pending_reasons == {}


def test_placement_counts_what_replicas_already_hold(state: ClusterState) -> None:
    Sim(state, "s1", cpus=2.0)
    spec = make_spec(replicas=3, cpus=1.0)
    state.resources_of = {"echo": Capacity(cpus=1.0)}

    actions = state.reconcile(want(spec))

    assert len(creates(actions)) == 2
    assert state.pending_reasons == {"echo": "no scheduler has room (cpus 1 > 0 free on s1)"}


def test_a_scheduler_takes_no_more_replicas_than_its_max_replicas(state: ClusterState) -> None:
    # memory_mb 0 (the default) is not counted: before, a 2-CPU scheduler took 200 of these.
    s1 = Sim(state, "s1", cpus=2.0, max_replicas=3)
    spec = make_spec(replicas=5, resources={"cpus": 0.01})

    s1.act(state.reconcile(want(spec)))

    assert len(s1.running) == 3
    assert state.pending_reasons == {"echo": "no scheduler has room (max_replicas 3 reached on s1)"}
    # Another deployment finds no slot either; a second scheduler takes the rest.
    other = make_spec("other", resources={"cpus": 0.01})
    assert creates(state.reconcile(want(spec, other))) == []
    s2 = Sim(state, "s2", cpus=2.0, max_replicas=3)
    s2.act(state.reconcile(want(spec, other)))
    assert sorted(a.deployment for a in s2.running.values()) == ["echo", "echo", "other"]
    assert state.pending_reasons == {}


def test_the_pending_reason_names_max_replicas_beside_what_else_is_short(state: ClusterState) -> None:
    Sim(state, "sa", cpus=1.0, max_replicas=1)
    Sim(state, "sb", cpus=1.0)
    spec = make_spec(replicas=3, cpus=0.6)

    assert len(creates(state.reconcile(want(spec)))) == 2

    assert state.pending_reasons == {
        "echo": "no scheduler has room (cpus 0.6 > 0.4 free on sb, the closest of 2)"
    }


def test_the_pending_reason_names_what_is_short_where_the_replica_could_fit(state: ClusterState) -> None:
    # sb, the only scheduler with a GPU, has its one cpu taken; sa has cpus but no GPU.
    sb = Sim(state, "sb", cpus=1.0)
    sb.capacity = Capacity(cpus=1.0, memory_mb=4096, gpus=1)
    sb.register()
    hog = make_spec("hog", cpus=1.0)
    sb.act(state.reconcile(want(hog)))
    Sim(state, "sa", cpus=8.0)
    gpu = make_spec("gpu", replicas=5, resources={"cpus": 0.01, "gpus": 0.2})

    assert creates(state.reconcile(want(hog, gpu))) == []
    assert state.pending_reasons == {
        "gpu": "no scheduler has room (cpus 0.01 > 0 free on sb; sa too small for it)"
    }


def test_no_scheduler_means_a_pending_reason(state: ClusterState) -> None:
    assert state.reconcile(want(make_spec())) == []
    assert state.pending_reasons == {"echo": "no live scheduler"}


def test_replicas_spread_across_schedulers(state: ClusterState) -> None:
    Sim(state, "s1")
    Sim(state, "s2")
    Sim(state, "s3")

    actions = state.reconcile(want(make_spec(replicas=6)))

    per_scheduler = [a.scheduler_id for a in creates(actions)]
    assert sorted(per_scheduler) == ["s1", "s1", "s2", "s2", "s3", "s3"]


def test_routes_leave_out_replicas_of_dead_schedulers(state: ClusterState, clock: FakeClock) -> None:
    s1, s2 = Sim(state, "s1"), Sim(state, "s2")
    converge(state, [s1, s2], want(make_spec(replicas=2)))
    [on_s2] = s2.running

    clock.advance(6.0)
    assert s2.beat()
    state.expire()

    assert ready_ids(state) == [on_s2]

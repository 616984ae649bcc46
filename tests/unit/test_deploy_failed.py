"""A deployment whose replicas keep dying before READY is FAILED: the crash loop stops until a
deploy (over ``ClusterState``, no I/O)."""

from __future__ import annotations

import pytest

from shoal.core.clock import FakeClock
from shoal.core.cluster import (
    FAILED,
    FAILED_AFTER,
    READY,
    REPLICA_DEAD,
    ClusterState,
    CreateReplica,
    ReplicaReport,
)
from shoal.core.placement import Capacity
from shoal.core.spec import DeploymentSpec, parse_spec

pytestmark = pytest.mark.timeout(10)


def spec(model: str) -> DeploymentSpec:
    return parse_spec({"name": "app", "backend": "python", "model": model, "resources": {"cpus": 0.5}})


def start_and_die(state: ClusterState, s: DeploymentSpec, version: int, message: str) -> list[CreateReplica]:
    """One pass; every replica it starts dies before READY."""
    creates = [a for a in state.reconcile({s.name: (s, 1)}) if isinstance(a, CreateReplica)]
    for a in creates:
        state.confirm_created(a.replica_id, version)
    dead = [
        ReplicaReport(a.replica_id, s.name, REPLICA_DEAD, spec_hash=s.process_hash(), message=message)
        for a in creates
    ]
    assert state.health("s1", version, dead)
    return creates


@pytest.fixture
def state() -> ClusterState:
    s = ClusterState(clock=FakeClock(), dead_after_s=1e9)
    s.register("s1", "s1:1", "s1:2", Capacity(2, 4096, 0))
    return s


def test_replicas_dying_before_ready_end_in_failed_and_no_more_starts(state: ClusterState) -> None:
    broken = spec("broken:M")
    assert isinstance(state.clock, FakeClock)
    for i in range(FAILED_AFTER):
        assert len(start_and_die(state, broken, i + 1, "ValueError: boom")) == 1
        state.clock.advance(60)  # past any backoff
    for _ in range(3):
        assert state.reconcile({"app": (broken, 1)}) == []
        state.clock.advance(60)
    reason = state.pending_reasons["app"]
    assert reason.startswith(FAILED) and "ValueError: boom" in reason
    assert [e.kind for e in state.events].count("deployment_failed") == 1


def test_a_deploy_of_another_spec_starts_afresh(state: ClusterState) -> None:
    broken, fixed = spec("broken:M"), spec("fixed:M")
    assert isinstance(state.clock, FakeClock)
    for i in range(FAILED_AFTER):
        start_and_die(state, broken, i + 1, "boom")
        state.clock.advance(60)
    (create,) = [a for a in state.reconcile({"app": (fixed, 1)}) if isinstance(a, CreateReplica)]
    assert "app" not in state.pending_reasons
    ok = ReplicaReport(create.replica_id, "app", READY, spec_hash=fixed.process_hash(), ready_at=1.0)
    state.confirm_created(create.replica_id, 10)
    assert state.health("s1", 10, [ok])
    assert state.reconcile({"app": (fixed, 1)}) == []


def test_failed_create_calls_back_off_but_do_not_fail_the_deployment(state: ClusterState) -> None:
    s = spec("m:M")
    assert isinstance(state.clock, FakeClock)
    for _ in range(FAILED_AFTER + 1):
        (create,) = [a for a in state.reconcile({"app": (s, 1)}) if isinstance(a, CreateReplica)]
        state.create_failed(create.replica_id, "scheduler unreachable")
        state.clock.advance(60)
    assert [a for a in state.reconcile({"app": (s, 1)}) if isinstance(a, CreateReplica)]


def test_a_deploy_of_the_same_spec_tries_again(state: ClusterState) -> None:
    # The user fixed the model's code in place: deploying the unchanged spec starts it again.
    broken = spec("broken:M")
    assert isinstance(state.clock, FakeClock)
    for i in range(FAILED_AFTER):
        start_and_die(state, broken, i + 1, "boom")
        state.clock.advance(60)
    assert state.reconcile({"app": (broken, 1)}) == []
    assert state.clear_start_failures("app")
    creates = [a for a in state.reconcile({"app": (broken, 1)}) if isinstance(a, CreateReplica)]
    assert len(creates) == 1
    assert not state.clear_start_failures("app")

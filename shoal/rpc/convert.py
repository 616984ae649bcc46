"""Protobuf <-> domain conversions for the control plane: one function each way per type.

Tensors have their own module (``shoal.rpc.codec``, on the data path); everything the
head, schedulers, replicas and the CLI exchange about the cluster is converted here, so a
field added to a domain type is added in one place.
"""

from __future__ import annotations

import dataclasses
import json

from shoal.core.cluster import ReplicaReport
from shoal.core.placement import Capacity
from shoal.core.spec import TensorSpec
from shoal.core.states import ReplicaState, SchedulerState
from shoal.core.status import (
    ClusterEvent,
    ClusterStatus,
    DeploymentStatus,
    ReplicaStatus,
    SchedulerStatus,
)
from shoal.core.traffic import TrafficRoute, parse_route
from shoal.errors import InvalidArgument
from shoal.proto import shoal_pb2 as pb
from shoal.store.history import LifecycleEvent, Revision
from shoal.types import DeploymentRoutes, RoutingTable

_STATES: dict[int, ReplicaState] = {
    int(v): ReplicaState(n) for n, v in pb.ReplicaState.items() if n in ReplicaState.__members__
}
"""Wire value -> state, built once: a health update decodes a state per replica (at 1,000
schedulers, 10,000 a second), and ``ReplicaState.values()`` builds a list at every call."""


def state_name(state: int) -> ReplicaState:
    """A replica's state from the wire. Unset or unknown (a newer peer): STARTING, which keeps
    it out of routing without removing it."""
    return _STATES.get(state, ReplicaState.STARTING)


def state_value(state: ReplicaState | str) -> pb.ReplicaState.ValueType:
    return pb.ReplicaState.Value(state) if state in pb.ReplicaState.keys() else pb.REPLICA_STATE_UNSPECIFIED


def report_to_pb(r: ReplicaReport) -> pb.ReplicaStatus:
    return pb.ReplicaStatus(
        replica_id=r.id,
        deployment=r.deployment,
        state=state_value(r.state),
        address=r.address,
        pid=r.pid,
        in_flight=r.in_flight,
        queued=r.queued,
        spec_hash=r.spec_hash,
        message=r.message,
        ready_at=r.ready_at,
        crashed=r.crashed,
    )


def report_from_pb(r: pb.ReplicaStatus) -> ReplicaReport:
    return ReplicaReport(
        id=r.replica_id,
        deployment=r.deployment,
        state=state_name(r.state),
        address=r.address,
        pid=r.pid,
        in_flight=r.in_flight,
        queued=r.queued,
        spec_hash=r.spec_hash,
        message=r.message,
        ready_at=r.ready_at,
        crashed=r.crashed,
    )


def meta_to_pb(t: TensorSpec) -> pb.TensorMeta:
    return pb.TensorMeta(name=t.name, datatype=t.datatype, shape=t.shape, optional=t.optional)


def meta_from_pb(t: pb.TensorMeta) -> TensorSpec:
    return TensorSpec(name=t.name, datatype=t.datatype, shape=tuple(t.shape), optional=t.optional)


def capacity_to_pb(c: Capacity) -> pb.Resources:
    return pb.Resources(cpus=c.cpus, memory_mb=c.memory_mb, gpus=c.gpus)


def capacity_from_pb(r: pb.Resources) -> Capacity:
    return Capacity(r.cpus, r.memory_mb, r.gpus)


def _replica_state(name: str) -> ReplicaState:
    return ReplicaState(name) if name in ReplicaState.__members__ else ReplicaState.STARTING


def _scheduler_state(name: str) -> SchedulerState:
    return SchedulerState(name) if name in SchedulerState.__members__ else SchedulerState.DEAD


def status_to_pb(status: ClusterStatus) -> pb.ClusterStatus:
    return pb.ClusterStatus(
        schedulers=[
            pb.SchedulerInfo(
                scheduler_id=s.id,
                address=s.address,
                http_address=s.http_address,
                state=s.state,
                pid=s.pid,
                hostname=s.hostname,
                last_seen_s=s.last_seen_s,
                capacity=capacity_to_pb(s.capacity),
                allocated=capacity_to_pb(s.allocated),
                max_replicas=s.max_replicas,
                replicas=s.replicas,
                routes_lagging=s.routes_lagging,
            )
            for s in status.schedulers
        ],
        deployments=[
            pb.DeploymentInfo(
                name=d.name,
                target_replicas=d.target_replicas,
                pending_reason=d.pending_reason,
                broken=d.broken,
                spec_json=json.dumps(d.spec) if d.spec else "",
                revision=d.revision,
                replicas=[
                    pb.ReplicaInfo(
                        replica_id=r.id,
                        deployment=d.name,
                        scheduler_id=r.scheduler,
                        state=r.state,
                        pid=r.pid,
                        address=r.address,
                        in_flight=r.in_flight,
                        queued=r.queued,
                        message=r.message,
                        spec_hash=r.spec_hash,
                        revision=r.revision,
                    )
                    for r in d.replicas
                ],
            )
            for d in status.deployments
        ],
        events=[
            pb.ClusterEvent(
                at=e.at,
                kind=e.kind,
                message=e.message,
                deployment=e.deployment,
                replica_id=e.replica_id,
                scheduler_id=e.scheduler_id,
            )
            for e in status.events
        ],
    )


def status_from_pb(status: pb.ClusterStatus) -> ClusterStatus:
    return ClusterStatus(
        schedulers=tuple(
            SchedulerStatus(
                id=s.scheduler_id,
                address=s.address,
                http_address=s.http_address,
                state=_scheduler_state(s.state),
                pid=s.pid,
                hostname=s.hostname,
                last_seen_s=round(s.last_seen_s, 3),
                capacity=capacity_from_pb(s.capacity),
                allocated=capacity_from_pb(s.allocated),
                max_replicas=s.max_replicas,
                replicas=s.replicas,
                routes_lagging=s.routes_lagging,
            )
            for s in status.schedulers
        ),
        deployments=tuple(
            DeploymentStatus(
                name=d.name,
                target_replicas=d.target_replicas,
                pending_reason=d.pending_reason,
                broken=d.broken,
                spec=json.loads(d.spec_json) if d.spec_json else {},
                revision=d.revision,
                replicas=tuple(
                    ReplicaStatus(
                        id=r.replica_id,
                        scheduler=r.scheduler_id,
                        state=_replica_state(r.state),
                        pid=r.pid,
                        address=r.address,
                        in_flight=r.in_flight,
                        queued=r.queued,
                        message=r.message,
                        spec_hash=r.spec_hash,
                        revision=r.revision,
                    )
                    for r in d.replicas
                ),
            )
            for d in status.deployments
        ),
        events=tuple(
            ClusterEvent(
                at=e.at,
                kind=e.kind,
                message=e.message,
                deployment=e.deployment,
                replica_id=e.replica_id,
                scheduler_id=e.scheduler_id,
            )
            for e in status.events
        ),
    )


def revision_to_pb(r: Revision) -> pb.RevisionInfo:
    # RevisionInfo's fields are Revision's, name for name.
    return pb.RevisionInfo(**dataclasses.asdict(r))


def revision_from_pb(r: pb.RevisionInfo) -> Revision:
    return Revision(**{f.name: getattr(r, f.name) for f in dataclasses.fields(Revision)})


def lifecycle_to_pb(e: LifecycleEvent) -> pb.LifecycleEvent:
    return pb.LifecycleEvent(
        time=e.time,
        deployment=e.deployment,
        kind=e.kind,
        has_revision=e.revision is not None,
        revision=e.revision or 0,
        message=e.message,
    )


def lifecycle_from_pb(e: pb.LifecycleEvent) -> LifecycleEvent:
    revision = e.revision if e.has_revision else None
    return LifecycleEvent(
        time=e.time, deployment=e.deployment, kind=e.kind, revision=revision, message=e.message
    )


def traffic_to_pb(route: TrafficRoute) -> pb.TrafficRoute:
    return pb.TrafficRoute(
        name=route.name,
        targets=[pb.TrafficTarget(deployment=t, weight=w) for t, w in route.targets],
        shadow=route.shadow,
    )


def traffic_from_pb(msg: pb.TrafficRoute) -> TrafficRoute:
    """Checked as the head checks a new route: InvalidArgument naming the problem."""
    targets = {t.deployment: t.weight for t in msg.targets}
    if len(msg.targets) != len(targets):
        raise InvalidArgument(f"route {msg.name!r}: a target is given twice")
    doc: dict[str, object] = {"name": msg.name, "targets": targets}
    if msg.shadow:
        doc["shadow"] = msg.shadow
    return parse_route(doc)


def routes_to_pb(dep: DeploymentRoutes) -> pb.DeploymentRoutes:
    """One deployment's routing-table entry (replicas without load: see ``Route.in_flight``)."""
    return pb.DeploymentRoutes(
        spec_json=dep.spec.to_json(),
        allowed_token_hashes=dep.allowed_tokens,
        routes=[
            pb.Route(
                replica_id=r.replica_id, address=r.address, scheduler_id=r.scheduler_id, revision=r.revision
            )
            for r in dep.routes
        ],
        revision=dep.revision,
        failed=dep.failed,
        unplaced=dep.unplaced,
    )


def table_frame_to_pb(table: RoutingTable) -> pb.RoutingTable:
    """A routing table without its deployments' entries (the caller adds those it sends)."""
    msg = pb.RoutingTable(
        version=table.version,
        token_hashes=table.token_hashes,
        deleted=table.deleted,
        ack=table.ack,
        adopting=table.adopting,
    )
    for name, route in table.traffic.items():
        msg.traffic[name].CopyFrom(traffic_to_pb(route))
    return msg

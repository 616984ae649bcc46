"""The cluster as the head sees it, typed: what ``shoal status``, ``GET /api/status`` and
the dashboard show.

One shape. The head builds it (``HeadNode.status()``), ``shoal.rpc.convert`` carries it over
gRPC and back, and ``ClusterStatus.to_json()`` is the JSON of ``shoal status --json`` and
``/api/status``, whichever side it was built on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from shoal.core.placement import Capacity
from shoal.core.states import ReplicaState, SchedulerState


@dataclass(frozen=True)
class SchedulerStatus:
    id: str
    address: str
    http_address: str
    state: SchedulerState
    pid: int
    hostname: str
    last_seen_s: float  # seconds since its last health update
    capacity: Capacity
    allocated: Capacity  # what the head has placed on it


@dataclass(frozen=True)
class ReplicaStatus:
    id: str
    scheduler: str
    state: ReplicaState
    pid: int = 0
    address: str = ""
    in_flight: int = 0
    queued: int = 0
    message: str = ""
    spec_hash: str = ""  # the process hash of the spec it runs (DeploymentSpec.process_hash)
    revision: int = 0  # the revision of its deployment it runs: its OIP version (0: not known)


@dataclass(frozen=True)
class DeploymentStatus:
    name: str
    target_replicas: int
    pending_reason: str = ""  # why it has fewer replicas than asked; "FAILED: ..." once failed
    broken: str = ""  # why its stored spec cannot be read (the store's row is kept)
    spec: dict[str, Any] = field(default_factory=dict)  # as JSON; empty when broken or unknown
    replicas: tuple[ReplicaStatus, ...] = ()

    @property
    def ready_replicas(self) -> int:
        return sum(1 for r in self.replicas if r.state == ReplicaState.READY)


@dataclass(frozen=True)
class ClusterEvent:
    at: float  # Unix time
    kind: str
    message: str
    deployment: str = ""
    replica_id: str = ""
    scheduler_id: str = ""


@dataclass(frozen=True)
class ClusterStatus:
    schedulers: tuple[SchedulerStatus, ...] = ()
    deployments: tuple[DeploymentStatus, ...] = ()
    events: tuple[ClusterEvent, ...] = ()  # the most recent, oldest first

    def deployment(self, name: str) -> DeploymentStatus | None:
        return next((d for d in self.deployments if d.name == name), None)

    def to_json(self) -> dict[str, Any]:
        """The JSON shape of ``shoal status --json`` and ``GET /api/status``."""
        return {
            "schedulers": [_plain(asdict(s)) for s in self.schedulers],
            "deployments": [
                _plain({**asdict(d), "ready_replicas": d.ready_replicas}) for d in self.deployments
            ],
            "events": [_plain(asdict(e)) for e in self.events],
        }


def _plain(value: Any) -> Any:
    """JSON's own types: lists for tuples, plain strings for states."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, StrEnum):
        return str(value)
    return value

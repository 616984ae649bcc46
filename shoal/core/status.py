"""The cluster as the head sees it, typed: what ``shoal status``, ``GET /api/status`` and
the dashboard show.

One shape. The head builds it (``HeadNode.status()``), ``shoal.rpc.convert`` carries it over
gRPC and back, and ``ClusterStatus.to_json()`` is the JSON of ``shoal status --json`` and
``/api/status``, whichever side it was built on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any, get_type_hints

from shoal.core.placement import Capacity
from shoal.core.states import ReplicaState, SchedulerState

_set = object.__setattr__  # how a frozen dataclass sets its own fields


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
    max_replicas: int = 0  # replicas it runs at most; 0: no bound
    replicas: int = 0  # replicas the head has placed on it (stopping ones included)
    # It did not route by a new table within ROUTES_OUT_S of a call waiting on it, and has not
    # caught up since: its requests may be routed by an older table (shoal.head.node).
    routes_lagging: bool = False


@dataclass(frozen=True, init=False)
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

    # Written out, as the fields are: a frozen dataclass's own __init__ sets each field by
    # object.__setattr__, 3.1 µs a replica; this sets the instance's mapping at once, 1.0 µs
    # (10,000 of them in each whole-cluster status). tests/unit/test_status.py checks that it
    # takes the fields, in order, with their defaults.
    def __init__(
        self,
        id: str,
        scheduler: str,
        state: ReplicaState,
        pid: int = 0,
        address: str = "",
        in_flight: int = 0,
        queued: int = 0,
        message: str = "",
        spec_hash: str = "",
        revision: int = 0,
    ) -> None:
        _set(
            self,
            "__dict__",
            {
                "id": id,
                "scheduler": scheduler,
                "state": state,
                "pid": pid,
                "address": address,
                "in_flight": in_flight,
                "queued": queued,
                "message": message,
                "spec_hash": spec_hash,
                "revision": revision,
            },
        )


@dataclass(frozen=True, init=False)
class DeploymentStatus:
    name: str
    target_replicas: int
    pending_reason: str = ""  # why it has fewer replicas than asked; "FAILED: ..." once failed
    broken: str = ""  # why its stored spec cannot be read (the store's row is kept)
    # As JSON; empty when broken or unknown. The head's is shared by every status built from
    # the same spec, and by their to_json(): read it, never change it.
    spec: dict[str, Any] = field(default_factory=dict)
    replicas: tuple[ReplicaStatus, ...] = ()
    revision: int = 0  # its current revision, read with spec: what an apply's if_revision names (0: none)

    # Written out, as ReplicaStatus's is (spec: None for a new empty mapping).
    def __init__(
        self,
        name: str,
        target_replicas: int,
        pending_reason: str = "",
        broken: str = "",
        spec: dict[str, Any] | None = None,
        replicas: tuple[ReplicaStatus, ...] = (),
        revision: int = 0,
    ) -> None:
        _set(
            self,
            "__dict__",
            {
                "name": name,
                "target_replicas": target_replicas,
                "pending_reason": pending_reason,
                "broken": broken,
                "spec": {} if spec is None else spec,
                "replicas": replicas,
                "revision": revision,
            },
        )

    @property
    def ready_replicas(self) -> int:
        return sum(1 for r in self.replicas if r.state == ReplicaState.READY)

    def to_json(self, max_replicas: int | None = None) -> dict[str, Any]:
        """One deployment of ``ClusterStatus.to_json()`` (``GET /api/deployments/NAME``).
        ``max_replicas``: list at most that many of its replicas (those not READY or with
        a message first, then by id) and count the others by state in ``more_replicas``."""
        doc = _flat(self)
        replicas = self.replicas
        if max_replicas is not None:
            look = [r for r in replicas if r.state != ReplicaState.READY or r.message]
            fine = [r for r in replicas if not (r.state != ReplicaState.READY or r.message)]
            shown = {r.id for r in (look + fine)[:max_replicas]}
            replicas = tuple(r for r in self.replicas if r.id in shown)
            more = Counter(str(r.state) for r in self.replicas if r.id not in shown)
            doc["more_replicas"] = dict(sorted(more.items()))
        doc["replicas"] = [_flat(r) for r in replicas]
        doc["ready_replicas"] = self.ready_replicas
        return doc


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

    def to_json(self, max_replicas: int | None = None) -> dict[str, Any]:
        """The JSON shape of ``shoal status --json`` and ``GET /api/status``
        (``max_replicas``: see :meth:`DeploymentStatus.to_json`).

        Built field by field, not by ``dataclasses.asdict``: that deep-copied each spec and
        walked every value, 0.7 s of the head's event loop at 10,000 replicas at each poll of
        the dashboard; 0.04 s now. Each deployment's ``spec`` is the status's own mapping,
        not a copy."""
        return {
            "schedulers": [_flat(s) for s in self.schedulers],
            "deployments": [d.to_json(max_replicas) for d in self.deployments],
            "events": [_flat(e) for e in self.events],
        }


def _flat(obj: Any) -> dict[str, Any]:
    """A status dataclass as JSON's types, one level down: states as plain strings, a
    Capacity as a mapping; other values as they are (a spec is JSON already).

    A copy of the instance's ``__dict__`` (its fields, in order), then the fields whose type
    needs it converted: reading each field by name and testing its type was 3.5 µs a record,
    this 0.5 µs (12,000 records at 10,000 replicas)."""
    doc = dict(vars(obj))
    enums, capacities = _conversions(type(obj))
    for name in enums:
        doc[name] = str(doc[name])
    for name in capacities:
        doc[name] = asdict(doc[name])
    return doc


_CONVERSIONS: dict[type, tuple[tuple[str, ...], tuple[str, ...]]] = {}


def _conversions(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The fields of status dataclass ``cls`` typed as a StrEnum, and those typed Capacity."""
    found = _CONVERSIONS.get(cls)
    if found is None:
        hints = get_type_hints(cls)
        typed = [(f.name, hints[f.name]) for f in fields(cls)]
        enums = tuple(n for n, t in typed if isinstance(t, type) and issubclass(t, StrEnum))
        found = _CONVERSIONS[cls] = (enums, tuple(n for n, t in typed if t is Capacity))
    return found

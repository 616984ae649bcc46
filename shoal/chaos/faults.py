"""What a fault is (:class:`Fault`), what is recorded of one (:class:`FaultRecord`), and
when it has recovered: :func:`converged`, or the n-th replacement replica READY."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


def deployment_of(status: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    return next((d for d in status.get("deployments", []) if d["name"] == name), None)


def converged(status: Mapping[str, Any], name: str) -> bool:
    """The deployment has exactly its replica count, every replica READY on a live scheduler."""
    dep = deployment_of(status, name)
    if dep is None or not status.get("schedulers"):
        return False
    alive = {s["id"] for s in status["schedulers"] if s["state"] == "ALIVE"}
    reps = dep["replicas"]
    return len(reps) == dep["target_replicas"] and all(
        r["state"] == "READY" and r["scheduler"] in alive for r in reps
    )


@dataclass
class FaultContext:
    """What a fault sees: the deployment, the head's last status before it, and a scratch dict."""

    deployment: str
    before: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)


REPLACEMENT = "replacement"
CONVERGED = "converged"

Recovery = str | Callable[[Mapping[str, Any], FaultContext], bool]


@dataclass
class Fault:
    """Something done to the cluster at ``at_s`` seconds into the run.

    ``inject`` does it and returns what it hit (for the report); raising ``Skip`` records
    the fault as skipped. Recovery is measured from the injection to the first status
    where ``recovery`` holds: ``"replacement"`` (the n-th such fault recovers when the n-th
    replica started during the run is READY), ``"converged"`` (see
    :func:`converged`), or a predicate over (status, context). A fault that is undone
    later (a partition and its healing) is two faults, each with its own recovery.
    """

    kind: str
    at_s: float
    inject: Callable[[FaultContext], Awaitable[str]]
    recovery: Recovery = CONVERGED


class Skip(Exception):
    """A fault that could not be injected (nothing to hit); the run goes on."""


@dataclass
class FaultRecord:
    kind: str
    at_s: float
    target: str = ""
    recovered_at_s: float | None = None
    injected_at_s: float = 0.0  # when inject returned: only statuses asked for later count
    replacement: str = ""  # for "replacement" recovery: the replica counted for this fault
    skipped: str = ""
    ctx: FaultContext | None = None
    recovery: Recovery = CONVERGED

    @property
    def pending(self) -> bool:
        return not self.skipped and self.recovered_at_s is None

    @property
    def recovered_s(self) -> float | None:
        if self.recovered_at_s is None:
            return None
        return round(self.recovered_at_s - self.at_s, 3)

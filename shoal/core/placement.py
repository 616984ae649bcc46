"""Where a new replica goes: pure functions over plain data."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shoal.core.spec import Resources

EPSILON = 1e-9


@dataclass(frozen=True)
class Capacity:
    cpus: float = 0.0
    memory_mb: float = 0.0
    gpus: float = 0.0

    def __add__(self, other: Capacity) -> Capacity:
        return Capacity(self.cpus + other.cpus, self.memory_mb + other.memory_mb, self.gpus + other.gpus)

    def __sub__(self, other: Capacity) -> Capacity:
        return Capacity(self.cpus - other.cpus, self.memory_mb - other.memory_mb, self.gpus - other.gpus)

    @classmethod
    def of(cls, r: Resources) -> Capacity:
        return cls(r.cpus, r.memory_mb, r.gpus)

    @classmethod
    def total(cls, items: Iterable[Capacity]) -> Capacity:
        out = cls()
        for c in items:
            out = out + c
        return out

    def fits(self, need: Capacity) -> bool:
        return (
            need.cpus <= self.cpus + EPSILON
            and need.memory_mb <= self.memory_mb + EPSILON
            and need.gpus <= self.gpus + EPSILON
        )


@dataclass(frozen=True)
class Candidate:
    """A live scheduler as placement sees it."""

    scheduler_id: str
    free: Capacity
    replicas_of_deployment: int
    replicas_total: int


def choose(candidates: Sequence[Candidate], need: Capacity) -> tuple[str | None, str]:
    """Pick the scheduler for one replica needing ``need``.

    Spreads a deployment's replicas (fewest of this deployment first), then
    prefers the emptiest machine. Returns ``(scheduler_id, "")`` or
    ``(None, reason)`` when no scheduler has room.
    """
    if not candidates:
        return None, "no live scheduler"
    fitting = [c for c in candidates if c.free.fits(need)]
    if not fitting:
        best = max(candidates, key=lambda c: (c.free.cpus, c.free.memory_mb, c.free.gpus))
        short = []
        if need.cpus > best.free.cpus + EPSILON:
            short.append(f"cpus {need.cpus:g} > {max(best.free.cpus, 0):g} free")
        if need.memory_mb > best.free.memory_mb + EPSILON:
            short.append(f"memory_mb {need.memory_mb:g} > {max(best.free.memory_mb, 0):g} free")
        if need.gpus > best.free.gpus + EPSILON:
            short.append(f"gpus {need.gpus:g} > {max(best.free.gpus, 0):g} free")
        return None, f"no scheduler has room ({', '.join(short)} on the emptiest)"
    best = min(
        fitting, key=lambda c: (c.replicas_of_deployment, -c.free.cpus, c.replicas_total, c.scheduler_id)
    )
    return best.scheduler_id, ""

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
    capacity: Capacity | None = None  # all it has, free or not; None: not known (taken as enough)
    max_replicas: int = 0  # replicas it runs at most (its ``max_replicas`` setting); 0: no bound

    @property
    def full(self) -> bool:
        """It runs as many replicas as its ``max_replicas`` allows."""
        return full(self.replicas_total, self.max_replicas)


def full(replicas: int, max_replicas: int) -> bool:
    """Whether a scheduler running ``replicas`` takes no more under ``max_replicas`` (0: no bound)."""
    return 0 < max_replicas <= replicas


RESOURCES = ("cpus", "memory_mb", "gpus")
NAMED = 2
"""Schedulers a reason names at most besides the closest; the rest are counted."""


def choose(candidates: Sequence[Candidate], need: Capacity) -> tuple[str | None, str]:
    """Pick the scheduler for one replica needing ``need``.

    Spreads a deployment's replicas (fewest of this deployment first), then
    prefers the emptiest machine. Returns ``(scheduler_id, "")`` or
    ``(None, reason)`` when no scheduler has room (:func:`no_room_reason`).
    """
    if not candidates:
        return None, "no live scheduler"
    fitting = [c for c in candidates if c.free.fits(need) and not c.full]
    if not fitting:
        return None, no_room_reason(candidates, need)
    best = min(
        fitting, key=lambda c: (c.replicas_of_deployment, -c.free.cpus, c.replicas_total, c.scheduler_id)
    )
    return best.scheduler_id, ""


SLOTS = "max_replicas"
"""The name a shortfall takes when a scheduler runs all the replicas its setting allows."""


def _shortfalls(have: Capacity, need: Capacity, slots: int = 0) -> list[tuple[str, float, float]]:
    """The resources ``have`` is short of for ``need``: (name, asked, had, never below 0);
    ``slots``: it runs that many replicas, its ``max_replicas`` (``(SLOTS, slots, 0)``)."""
    short = [
        (r, getattr(need, r), max(getattr(have, r), 0.0))
        for r in RESOURCES
        if getattr(need, r) > getattr(have, r) + EPSILON
    ]
    if slots:
        short.append((SLOTS, float(slots), 0.0))
    return short


def _slots(c: Candidate) -> int:
    """``c``'s ``max_replicas`` when it runs that many, else 0 (``_shortfalls``)."""
    return c.max_replicas if c.full else 0


def _closeness(have: Capacity, need: Capacity, scheduler_id: str, slots: int = 0) -> tuple[int, float, str]:
    """How far ``have`` is from ``need``: fewest resources short, then the smallest part of
    the ask missing (a fraction, so cpus and memory_mb compare; all of it for a replica
    slot), then the id."""
    short = _shortfalls(have, need, slots)
    return (
        len(short),
        sum((asked - had) / asked if asked > 0 and r != SLOTS else 1.0 for r, asked, had in short),
        scheduler_id,
    )


def _describe(short: list[tuple[str, float, float]], what: str = "") -> str:
    """``cpus 2 > 1 free, gpus 1 > 0 free``: each resource short, asked > had; a scheduler
    running all the replicas it may, ``max_replicas 8 reached``."""
    suffix = f" {what}" if what else ""
    return ", ".join(
        f"{SLOTS} {asked:g} reached" if r == SLOTS else f"{r} {asked:g} > {had:g}{suffix}"
        for r, asked, had in short
    )


def _names(ids: Sequence[str]) -> str:
    """At most ``NAMED`` ids, then how many more."""
    shown = ", ".join(ids[:NAMED])
    return f"{shown} and {len(ids) - NAMED} more" if len(ids) > NAMED else shown


def no_room_reason(candidates: Sequence[Candidate], need: Capacity) -> str:
    """Why no scheduler of ``candidates`` (none with room free) can take ``need`` now.

    ``no scheduler is big enough (...)`` when none could even empty (its capacity falls
    short): the spec or the machines must change, freeing room cannot help. Otherwise
    ``no scheduler has room (...)`` with what is short on the scheduler that comes closest
    among those big enough (``max_replicas 8 reached`` when it runs as many replicas as
    its setting allows), and which others are too small. Bounded for any cluster size.
    """
    big_enough = [c for c in candidates if c.capacity is None or c.capacity.fits(need)]
    if not big_enough:
        sized = [c.capacity for c in candidates if c.capacity is not None]
        largest = Capacity(*(max(getattr(c, r) for c in sized) for r in RESOURCES))
        over = _shortfalls(largest, need)
        if over:  # no scheduler has that much of one resource
            tail = "the largest capacity" if len(over) == 1 else "the largest capacities"
            return f"no scheduler is big enough ({_describe(over)}, {tail})"
        # Each resource is somewhere, but not all of them together on one scheduler.
        closest = min(candidates, key=lambda c: _closeness(c.capacity or need, need, c.scheduler_id))
        text = _describe(_shortfalls(closest.capacity or need, need), "capacity")
        more = f", the closest of {len(candidates)}" if len(candidates) > 1 else ""
        return f"no scheduler is big enough ({text} on {closest.scheduler_id}{more})"
    closest = min(big_enough, key=lambda c: _closeness(c.free, need, c.scheduler_id, _slots(c)))
    text = f"{_describe(_shortfalls(closest.free, need, _slots(closest)), 'free')} on {closest.scheduler_id}"
    if len(big_enough) > 1:
        text += f", the closest of {len(big_enough)}"
    too_small = sorted({c.scheduler_id for c in candidates} - {c.scheduler_id for c in big_enough})
    if too_small:
        text += f"; {_names(too_small)} too small for it"
    return f"no scheduler has room ({text})"

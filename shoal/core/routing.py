"""Routing policies: which of a deployment's replicas gets the next request.

Pure functions over a list of candidates that expose ``in_flight`` and
``local``; the router gives only replicas with room.
"""

from __future__ import annotations

import collections
import itertools
import random
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Protocol, TypeVar


class Candidate(Protocol):
    @property
    def in_flight(self) -> int: ...

    @property
    def local(self) -> bool: ...


C = TypeVar("C", bound=Candidate)


class Policy(Protocol):
    def pick(self, candidates: Sequence[C]) -> C: ...


class PowerOfTwo:
    """Power of two choices on in-flight count, local replicas first."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[C]) -> C:
        local = [c for c in candidates if c.local]
        pool = local or candidates
        if len(pool) == 1:
            return pool[0]
        a, b = self._rng.sample(range(len(pool)), 2)
        return pool[a] if pool[a].in_flight <= pool[b].in_flight else pool[b]


class RoundRobin:
    """Each candidate in turn, local or not."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, candidates: Sequence[C]) -> C:
        return candidates[next(self._counter) % len(candidates)]


POLICIES: dict[str, Callable[[], Policy]] = {"p2c": PowerOfTwo, "round_robin": RoundRobin}


def pick_for_model(
    candidates: Sequence[C],
    held: Callable[[C], Collection[str]],
    model_id: str,
    capacity: int,
    policy: Policy,
) -> C:
    """Model multiplexing: a candidate that holds ``model_id`` (``held``), the least loaded of
    them; else, so that new ids spread over the pool, one of those holding the fewest ids
    while that is under ``capacity``, by ``policy``; else any, by ``policy`` (that replica
    evicts its least recently used id). ``candidates`` all have room for a request; it must
    not be empty."""
    holders = [c for c in candidates if model_id in held(c)]
    if holders:
        return min(holders, key=lambda c: c.in_flight)
    fewest = min(len(held(c)) for c in candidates)
    if fewest < capacity:
        return policy.pick([c for c in candidates if len(held(c)) == fewest])
    return policy.pick(candidates)


def default_revisions(revisions: Iterable[int], replicas: int) -> frozenset[int]:
    """Which revisions take requests that name no version, for a deployment that keeps
    several revisions serving (``serve_revisions`` > 1); ``revisions``: the revision of each
    replica that takes requests (0: not known yet, never chosen).

    The newest revision that has a replica; while it has fewer than ``replicas`` (its
    rolling update is under way) the next newest too, so that an update does not leave its
    first new replica alone with every request. Empty when no revision is known."""
    counts = collections.Counter(r for r in revisions if r > 0)
    newest = sorted(counts, reverse=True)[:2]
    if not newest:
        return frozenset()
    if counts[newest[0]] >= replicas:
        return frozenset(newest[:1])
    return frozenset(newest)


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {sorted(POLICIES)}") from None

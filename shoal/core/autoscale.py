"""The autoscaling decision: how many replicas a deployment should have, from
recent load. A pure class over plain numbers and a clock.

Desired count = ceil(average load over the look-back window /
``target_ongoing_requests``), clamped to ``[min_replicas, max_replicas]``. The
average is over time: each observed load counts for as long as it held (until the
next observation), however many passes observed a span of time. A
change is applied only after the desired count has stayed on the same side
of the current count for ``upscale_delay_s`` (up) or ``downscale_delay_s``
(down); going down additionally needs the load to fit the smaller count with
a margin, so a steady load never flaps, and no replica of the deployment to be
starting (the delay counts from when the last one is READY). From zero replicas,
any load scales to one at once: a request is waiting.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field

from shoal.core.clock import Clock
from shoal.core.spec import Autoscaling

LOOK_BACK_S = 2.0
DOWNSCALE_MARGIN = 0.8  # the smaller count must run at <= 80% of target load
SPAN_S = LOOK_BACK_S / 100
"""Observations closer together than this are kept as their mean over time: however often
passes observe the load (health updates with queued requests wake extra ones), a
deployment's track holds at most ``2 * LOOK_BACK_S / SPAN_S + 2`` spans, and only a span
that straddles the window's start, shorter than this, is counted by its mean rather than
exactly (under 1% of the window)."""


@dataclass
class _Track:
    spans: deque[tuple[float, float]] = field(default_factory=deque)
    """Closed spans, (start, mean load), each until the next one's start (the last one
    until ``open_since``), from the one holding the window's start."""
    open_since: float | None = None  # the open span's start; None before the first observation
    open_area: float = 0.0  # load x seconds of the open span up to ``latest_at``
    latest: float = 0.0  # the latest load observed, holding since ``latest_at``
    latest_at: float = 0.0
    up_since: float | None = None
    down_since: float | None = None

    def observe(self, now: float, load: float) -> None:
        """Take ``load`` as the load from ``now`` on; drop the spans before the window."""
        opened = self.open_since
        if opened is None:
            opened = now
        elif now - opened < SPAN_S:
            self.open_area += self.latest * (now - self.latest_at)
        else:
            # The open span closes at its last observation; the load observed then held alone
            # until now: a span of its own, exact however long.
            if self.latest_at > opened:
                self.spans.append((opened, self.open_area / (self.latest_at - opened)))
            self.spans.append((self.latest_at, self.latest))
            opened, self.open_area = now, 0.0
        self.open_since = opened
        self.latest, self.latest_at = load, now
        # The span holding the window's start stays: it gives the load there.
        start = now - LOOK_BACK_S
        while self.spans and (self.spans[1][0] if len(self.spans) > 1 else opened) <= start:
            self.spans.popleft()

    def mean(self, now: float) -> float:
        """:meth:`Autoscaler.load`."""
        opened = self.open_since
        if opened is None:
            return 0.0
        start = max(now - LOOK_BACK_S, self.spans[0][0] if self.spans else opened)
        if now <= start:
            return self.latest
        # (since, until, mean load): the closed spans, the open one up to its last
        # observation, and the latest load since.
        segments = [(since, until, mean) for (since, mean), (until, _) in itertools.pairwise(self.spans)]
        if self.spans:
            since, mean = self.spans[-1]
            segments.append((since, opened, mean))
        if self.latest_at > opened:
            segments.append((opened, self.latest_at, self.open_area / (self.latest_at - opened)))
        segments.append((self.latest_at, now, self.latest))
        area = sum(mean * max(0.0, until - max(since, start)) for since, until, mean in segments)
        return area / (now - start)


@dataclass(frozen=True)
class Decision:
    deployment: str
    current: int
    desired: int
    load: float
    reason: str


class Autoscaler:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._tracks: dict[str, _Track] = {}

    def observe(self, deployment: str, load: float) -> None:
        """Record the deployment's total load now: requests in flight plus queued. It counts
        in the average for as long as it holds: until the next observation."""
        self._tracks.setdefault(deployment, _Track()).observe(self.clock.now(), load)

    def forget(self, deployment: str) -> None:
        self._tracks.pop(deployment, None)

    def load(self, deployment: str) -> float:
        """The load averaged over time across the last ``LOOK_BACK_S`` (since the first
        observation, when that is more recent): each observed load weighs the time it
        held. The latest load when no time has passed since the first observation; 0.0
        before it."""
        track = self._tracks.get(deployment)
        return 0.0 if track is None else track.mean(self.clock.now())

    def decide(
        self, deployment: str, policy: Autoscaling, current: int, starting: int = 0
    ) -> Decision | None:
        """The new replica count, or None to keep ``current``. ``starting``: how many of the
        deployment's replicas are still on their way to READY; while any is, the count does
        not go down, and the downscale delay starts again once none is. Stopping a replica
        that loads wastes its start; for a model whose start outlasts its clients' timeout
        (the request that woke it gave up, and the load fell to 0), each replica started
        was stopped before it could serve, and none ever did."""
        track = self._tracks.setdefault(deployment, _Track())
        now = self.clock.now()
        load = self.load(deployment)
        latest = track.latest
        target = policy.target_ongoing_requests
        # Clamped before math.ceil, which raises for an infinite quotient: the spec bounds the
        # target from below, and the quotient past max_replicas says no more than it does.
        wanted = min(load / target, policy.max_replicas) if load > 0 else 0.0
        desired = max(policy.min_replicas, min(policy.max_replicas, math.ceil(wanted - 1e-9)))
        if current < policy.min_replicas or current > policy.max_replicas:
            track.up_since = track.down_since = None
            bounded = max(policy.min_replicas, min(policy.max_replicas, current))
            return Decision(deployment, current, bounded, load, "outside the bounds")
        if current == 0 and latest > 0:
            track.up_since = track.down_since = None
            return Decision(deployment, 0, max(1, desired), load, "a request is waiting and no replica runs")
        if desired > current:
            track.down_since = None
            if track.up_since is None:
                track.up_since = now
            if now - track.up_since >= policy.upscale_delay_s:
                track.up_since = None
                return Decision(
                    deployment, current, desired, load, f"load {load:.1f} > {current} x target {target:g}"
                )
            return None
        track.up_since = None
        fits_smaller = load <= desired * target * DOWNSCALE_MARGIN
        if desired < current and fits_smaller and not starting:
            if track.down_since is None:
                track.down_since = now
            if now - track.down_since >= policy.downscale_delay_s:
                track.down_since = None
                return Decision(
                    deployment, current, desired, load, f"load {load:.1f} fits {desired} x target {target:g}"
                )
            return None
        track.down_since = None
        return None

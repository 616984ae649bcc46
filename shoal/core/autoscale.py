"""The autoscaling decision: how many replicas a deployment should have, from
recent load. A pure class over plain numbers and a clock.

Desired count = ceil(average load over the look-back window /
``target_ongoing_requests``), clamped to ``[min_replicas, max_replicas]``. A
change is applied only after the desired count has stayed on the same side
of the current count for ``upscale_delay_s`` (up) or ``downscale_delay_s``
(down); going down additionally needs the load to fit the smaller count with
a margin, so a steady load never flaps. From zero replicas, any load scales to
one at once: a request is waiting.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from shoal.core.clock import Clock
from shoal.core.spec import Autoscaling

LOOK_BACK_S = 2.0
DOWNSCALE_MARGIN = 0.8  # the smaller count must run at <= 80% of target load


@dataclass
class _Track:
    samples: deque[tuple[float, float]] = field(default_factory=deque)
    up_since: float | None = None
    down_since: float | None = None


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
        """Record the deployment's total load now: requests in flight plus queued."""
        track = self._tracks.setdefault(deployment, _Track())
        now = self.clock.now()
        track.samples.append((now, load))
        while track.samples and track.samples[0][0] < now - LOOK_BACK_S:
            track.samples.popleft()

    def forget(self, deployment: str) -> None:
        self._tracks.pop(deployment, None)

    def load(self, deployment: str) -> float:
        track = self._tracks.get(deployment)
        if track is None or not track.samples:
            return 0.0
        return sum(v for _, v in track.samples) / len(track.samples)

    def decide(self, deployment: str, policy: Autoscaling, current: int) -> Decision | None:
        """The new replica count, or None to keep ``current``."""
        track = self._tracks.setdefault(deployment, _Track())
        now = self.clock.now()
        load = self.load(deployment)
        latest = track.samples[-1][1] if track.samples else 0.0
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
        if desired < current and fits_smaller:
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

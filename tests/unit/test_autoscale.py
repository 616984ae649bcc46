"""The autoscaling decision, with a fake clock."""

from __future__ import annotations

import pytest

from shoal.core.autoscale import LOOK_BACK_S, SPAN_S, Autoscaler
from shoal.core.clock import FakeClock
from shoal.core.spec import Autoscaling, parse_spec
from shoal.errors import InvalidArgument

POLICY = Autoscaling(
    min_replicas=1, max_replicas=5, target_ongoing_requests=2, upscale_delay_s=3, downscale_delay_s=10
)


def run(
    scaler: Autoscaler,
    clock: FakeClock,
    load: float,
    seconds: float,
    current: int,
    policy: Autoscaling = POLICY,
) -> tuple[int, list[float]]:
    """Feed ``load`` every 0.5 s for ``seconds``, applying decisions; returns (count, times of changes)."""
    changes = []
    t = 0.0
    while t < seconds:
        scaler.observe("d", load)
        decision = scaler.decide("d", policy, current)
        if decision is not None and decision.desired != current:
            current = decision.desired
            changes.append(t)
        clock.advance(0.5)
        t += 0.5
    return current, changes


def test_scales_up_after_the_upscale_delay_to_load_over_target() -> None:
    clock = FakeClock()
    scaler = Autoscaler(clock)
    count, changes = run(scaler, clock, load=7, seconds=2.5, current=1)
    assert count == 1 and changes == []  # not before upscale_delay_s
    count, changes = run(scaler, clock, load=7, seconds=2, current=count)
    assert count == 4  # ceil(7 / 2)
    assert len(changes) == 1


def test_never_above_max_nor_below_min() -> None:
    clock = FakeClock()
    scaler = Autoscaler(clock)
    count, _ = run(scaler, clock, load=1000, seconds=10, current=1)
    assert count == 5
    count, _ = run(scaler, clock, load=0, seconds=60, current=count)
    assert count == 1


def test_steady_load_does_not_flap() -> None:
    clock = FakeClock()
    scaler = Autoscaler(clock)
    count, _ = run(scaler, clock, load=6, seconds=5, current=1)
    assert count == 3
    # 6 in flight on 3 replicas is exactly the target: nothing changes for minutes.
    count, changes = run(scaler, clock, load=6, seconds=300, current=count)
    assert count == 3 and changes == []
    # Load that would fit 2 replicas only at 100% does not scale down (margin).
    count, changes = run(scaler, clock, load=4, seconds=300, current=count)
    assert count == 3 and changes == []


def test_scales_down_only_after_the_downscale_delay() -> None:
    clock = FakeClock()
    scaler = Autoscaler(clock)
    count, changes = run(scaler, clock, load=1, seconds=9, current=4)
    assert count == 4 and changes == []
    count, changes = run(scaler, clock, load=1, seconds=3, current=count)
    assert count == 1 and len(changes) == 1


def test_a_short_dip_does_not_scale_down() -> None:
    clock = FakeClock()
    scaler = Autoscaler(clock)
    count, _ = run(scaler, clock, load=0.5, seconds=6, current=3)  # dip shorter than 10 s
    count, changes = run(scaler, clock, load=6, seconds=20, current=count)
    assert count == 3 and changes == []


def test_scale_to_zero_and_back_from_zero_at_once() -> None:
    policy = Autoscaling(
        min_replicas=0, max_replicas=3, target_ongoing_requests=1, upscale_delay_s=5, downscale_delay_s=2
    )
    clock = FakeClock()
    scaler = Autoscaler(clock)
    count, _ = run(scaler, clock, load=0, seconds=3, current=1, policy=policy)
    assert count == 0
    # One waiting request scales from zero on the next look, ignoring upscale_delay_s.
    scaler.observe("d", 1)
    decision = scaler.decide("d", policy, 0)
    assert decision is not None and decision.desired == 1
    assert "waiting" in decision.reason


def test_changed_bounds_apply_at_once() -> None:
    clock = FakeClock()
    scaler = Autoscaler(clock)
    scaler.observe("d", 0)
    narrower = Autoscaling(min_replicas=2, max_replicas=3, target_ongoing_requests=2)
    decision = scaler.decide("d", narrower, 5)
    assert decision is not None and decision.desired == 3
    decision = scaler.decide("d", narrower, 1)
    assert decision is not None and decision.desired == 2


def test_a_target_too_small_for_the_quotient_scales_to_max_without_raising() -> None:
    """A target of 5e-324 (refused by the spec now, MIN_TARGET_ONGOING_REQUESTS) made any
    load an infinite count: OverflowError from math.ceil in every reconcile pass."""
    clock = FakeClock()
    scaler = Autoscaler(clock)
    tiny = Autoscaling.model_construct(**{**POLICY.model_dump(), "target_ongoing_requests": 5e-324})
    count, _ = run(scaler, clock, load=3, seconds=5, current=1, policy=tiny)
    assert count == 5  # max_replicas


def feed(scaler: Autoscaler, clock: FakeClock, load: float, seconds: float, passes: int) -> None:
    """``passes`` observations of ``load`` spread evenly over ``seconds``."""
    for _ in range(passes):
        scaler.observe("d", load)
        clock.advance(seconds / passes)


def test_the_load_is_averaged_over_time_whatever_the_number_of_passes() -> None:
    """Health updates with queued requests wake extra passes: before, a burst of 0.4 s
    observed in 20 passes after 1.6 s of low load observed in 8 averaged 7.2 by sample
    (4 replicas wanted) where the load over the 2 s window averaged 2.8 (2 replicas)."""
    instant = Autoscaling(min_replicas=1, max_replicas=5, target_ongoing_requests=2, upscale_delay_s=0)
    loads = []
    for burst_passes in (2, 20):
        clock = FakeClock()
        scaler = Autoscaler(clock)
        feed(scaler, clock, load=1, seconds=1.6, passes=8)
        feed(scaler, clock, load=10, seconds=0.4, passes=burst_passes)
        scaler.observe("d", 1)  # the burst is over
        loads.append(scaler.load("d"))
        decision = scaler.decide("d", instant, 1)
        assert decision is not None and decision.desired == 2  # ceil((1.6 x 1 + 0.4 x 10) / 2 s / 2)
    assert loads[0] == pytest.approx(2.8) and loads[1] == pytest.approx(2.8)


def test_a_quiet_period_after_a_burst_weighs_by_its_length_too() -> None:
    """The same as above the other way round: a burst of many passes, then a longer quiet
    period of few passes, averages by the time each load held."""
    clock = FakeClock()
    scaler = Autoscaler(clock)
    feed(scaler, clock, load=8, seconds=0.5, passes=25)
    feed(scaler, clock, load=0, seconds=1.5, passes=3)
    assert scaler.load("d") == pytest.approx(2.0)  # (0.5 x 8 + 1.5 x 0) / 2 s
    clock.advance(0.5)  # the burst's first 0.5 s leaves the window: only quiet time is left
    assert scaler.load("d") == pytest.approx(0.0, abs=1e-9)


def test_a_storm_of_passes_keeps_a_bounded_track() -> None:
    """10,000 passes in 2 s with a load that changes at each: the track stays within its
    bound, and the average stays the one over time."""
    clock = FakeClock()
    scaler = Autoscaler(clock)
    for i in range(10_000):
        scaler.observe("d", 4 if i % 2 else 2)
        clock.advance(LOOK_BACK_S / 10_000)
    assert len(scaler._tracks["d"].spans) <= 2 * LOOK_BACK_S / SPAN_S + 2
    assert scaler.load("d") == pytest.approx(3.0, abs=0.1)


def test_scale_to_zero_without_a_queue_is_refused_naming_both_fields() -> None:
    """At zero replicas a request waits in the queue while a replica starts, and that wait
    is what scales the deployment up. With ``max_queued_requests: 0`` every request was
    refused RESOURCE_EXHAUSTED at once, nothing ever waited, and the deployment stayed at
    zero for good, serving nothing."""
    doc = {
        "name": "d",
        "backend": "python",
        "model": "echo:Echo",
        "max_queued_requests": 0,
        "autoscaling": {"min_replicas": 0, "max_replicas": 2},
    }
    with pytest.raises(InvalidArgument, match=r"min_replicas 0 needs max_queued_requests of at least 1"):
        parse_spec(doc)
    # A floor of one replica serves without a queue; a queue lets it start from zero.
    parse_spec({**doc, "autoscaling": {"min_replicas": 1, "max_replicas": 2}})
    parse_spec({**doc, "max_queued_requests": 1})


def test_no_scale_down_while_a_replica_is_starting_and_the_delay_counts_from_then() -> None:
    clock = FakeClock()
    scaler = Autoscaler(clock)
    for _ in range(60):  # idle for 30 s, one of the 2 replicas loading
        scaler.observe("d", 0)
        assert scaler.decide("d", POLICY, 2, starting=1) is None
        clock.advance(0.5)
    waited = 0.0
    while (decision := scaler.decide("d", POLICY, 2)) is None:
        clock.advance(0.5)
        scaler.observe("d", 0)
        waited += 0.5
    assert decision.desired == 1
    assert waited >= POLICY.downscale_delay_s

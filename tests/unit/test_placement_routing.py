"""Placement (``choose``) and the routing policies (power of two choices, round robin)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from shoal.core.placement import Candidate, Capacity, choose
from shoal.core.routing import PowerOfTwo, RoundRobin, make_policy

pytestmark = pytest.mark.timeout(10)


def cand(
    sid: str, cpus: float = 4.0, *, memory_mb: float = 1024, gpus: float = 0, of_dep: int = 0, total: int = 0
) -> Candidate:
    return Candidate(
        sid, Capacity(cpus, memory_mb, gpus), replicas_of_deployment=of_dep, replicas_total=total
    )


# ------------------------------------------------------------------ choose


def test_choose_without_candidates_says_there_is_no_live_scheduler() -> None:
    assert choose([], Capacity(cpus=1)) == (None, "no live scheduler")


def test_choose_skips_schedulers_without_room() -> None:
    need = Capacity(cpus=2, memory_mb=512)
    got = choose(
        [cand("a", cpus=1), cand("b", cpus=2, memory_mb=256), cand("c", cpus=2, memory_mb=512)], need
    )
    assert got == ("c", "")


def test_choose_names_every_short_resource_on_the_closest_scheduler() -> None:
    need = Capacity(cpus=4, memory_mb=2048, gpus=1)
    # a is short of two resources, b of all three: a comes closest.
    reason = choose([cand("a", cpus=1, memory_mb=4096), cand("b", cpus=3, memory_mb=1024)], need)
    assert reason == (None, "no scheduler has room (cpus 4 > 1 free, gpus 1 > 0 free on a, the closest of 2)")


def test_choose_reports_overcommitted_free_capacity_as_zero() -> None:
    assert choose([cand("a", cpus=-1)], Capacity(cpus=1)) == (
        None,
        "no scheduler has room (cpus 1 > 0 free on a)",
    )


def test_choose_passes_by_a_scheduler_at_its_max_replicas_and_says_so() -> None:
    full = Candidate("a", Capacity(8, 4096), replicas_of_deployment=0, replicas_total=3, max_replicas=3)
    short = cand("b", cpus=0.5, total=1)

    assert choose([full, Candidate("c", Capacity(1), 0, 2, max_replicas=3)], Capacity(cpus=1)) == ("c", "")
    # a has every resource free but no replica slot (all of a replica missing); b has a slot
    # and half the cpus: b comes closer.
    assert choose([full, short], Capacity(cpus=1)) == (
        None,
        "no scheduler has room (cpus 1 > 0.5 free on b, the closest of 2)",
    )
    assert choose([full], Capacity(cpus=1)) == (None, "no scheduler has room (max_replicas 3 reached on a)")


def sized(sid: str, capacity: Capacity, held: Capacity = Capacity()) -> Candidate:
    """A scheduler of ``capacity`` whose replicas hold ``held``."""
    return Candidate(sid, capacity - held, replicas_of_deployment=0, replicas_total=0, capacity=capacity)


def test_the_reason_names_the_resource_short_where_it_could_fit_not_on_the_emptiest() -> None:
    # sa has no GPU at all; sb has one, free, but its CPUs are full: CPU on sb is the limit.
    sa = sized("sa", Capacity(cpus=8, memory_mb=8192, gpus=0))
    sb = sized("sb", Capacity(cpus=2, memory_mb=8192, gpus=1), held=Capacity(cpus=2, memory_mb=512))
    need = Capacity(cpus=0.01, gpus=0.2)
    for order in ([sa, sb], [sb, sa]):
        assert choose(order, need) == (
            None,
            "no scheduler has room (cpus 0.01 > 0 free on sb; sa too small for it)",
        )
    # Once CPUs are freed on sb, it goes there.
    assert choose([sa, sized("sb", sb.capacity or Capacity(), held=Capacity(cpus=1))], need) == ("sb", "")


def test_the_closest_scheduler_is_short_of_fewest_resources_then_of_the_least() -> None:
    cap = Capacity(cpus=4, memory_mb=4096)
    need = Capacity(cpus=2, memory_mb=2048)
    a = sized("a", cap, held=Capacity(cpus=3, memory_mb=3000))  # short of both
    b = sized("b", cap, held=Capacity(cpus=2.5))  # short of half a cpu: a quarter of the ask
    c = sized("c", cap, held=Capacity(memory_mb=2560))  # short of 512 of 2048 MB: a quarter too
    d = sized("d", cap, held=Capacity(memory_mb=3072))  # short of half the memory asked
    assert choose([a, d, c, b], need) == (
        None,
        "no scheduler has room (cpus 2 > 1.5 free on b, the closest of 4)",
    )
    assert choose([a, d, c], need) == (
        None,
        "no scheduler has room (memory_mb 2048 > 1536 free on c, the closest of 3)",
    )


def test_a_replica_bigger_than_every_scheduler_says_none_is_big_enough() -> None:
    schedulers = [sized(s, Capacity(cpus=4, memory_mb=1000)) for s in ("sa", "sb")]
    assert choose(schedulers, Capacity(cpus=0.1, memory_mb=1500)) == (
        None,
        "no scheduler is big enough (memory_mb 1500 > 1000, the largest capacity)",
    )
    # Not for want of room: empty or full, the answer is the same.
    full = [sized(s, Capacity(cpus=4, memory_mb=1000), held=Capacity(cpus=4)) for s in ("sa", "sb")]
    assert choose(full, Capacity(cpus=0.1, memory_mb=1500)) == choose(
        schedulers, Capacity(cpus=0.1, memory_mb=1500)
    )
    # The largest capacity of each resource, wherever it is.
    mixed = [sized("sa", Capacity(cpus=16, memory_mb=1000)), sized("sb", Capacity(cpus=4, memory_mb=2000))]
    assert choose(mixed, Capacity(cpus=32, memory_mb=4000)) == (
        None,
        "no scheduler is big enough (cpus 32 > 16, memory_mb 4000 > 2000, the largest capacities)",
    )


def test_a_replica_that_fits_each_resource_somewhere_but_not_all_on_one_is_too_big() -> None:
    sa = sized("sa", Capacity(cpus=16, memory_mb=8192, gpus=0))
    sb = sized("sb", Capacity(cpus=4, memory_mb=8192, gpus=1))
    assert choose([sa, sb], Capacity(cpus=8, gpus=1)) == (
        None,
        "no scheduler is big enough (cpus 8 > 4 capacity on sb, the closest of 2)",
    )


def test_the_reason_stays_short_on_a_large_cluster() -> None:
    need = Capacity(cpus=1, memory_mb=200, gpus=1)
    cap = Capacity(cpus=64, memory_mb=262144, gpus=8)
    full = [sized(f"scheduler-{i:04d}.example.internal", cap, held=cap) for i in range(600)]
    small = [
        sized(f"cpu-only-{i:04d}.example.internal", Capacity(cpus=64, memory_mb=262144)) for i in range(400)
    ]
    _, reason = choose(full + small, need)
    assert reason == (
        "no scheduler has room (cpus 1 > 0 free, memory_mb 200 > 0 free, gpus 1 > 0 free on "
        "scheduler-0000.example.internal, the closest of 600; cpu-only-0000.example.internal, "
        "cpu-only-0001.example.internal and 398 more too small for it)"
    )
    assert len(reason) < 250
    _, reason = choose(small, need)
    assert reason == "no scheduler is big enough (gpus 1 > 0, the largest capacity)"


def test_choose_allows_an_exact_fit_and_fractions() -> None:
    assert choose([cand("a", cpus=0.3, gpus=0.5)], Capacity(cpus=0.1 + 0.2, gpus=0.5)) == ("a", "")


def test_choose_spreads_a_deployment_before_filling_the_emptiest_machine() -> None:
    got = choose([cand("big", cpus=64, of_dep=1), cand("small", cpus=2, of_dep=0)], Capacity(cpus=1))
    assert got == ("small", "")


def test_choose_prefers_more_free_cpus_then_fewer_replicas_then_id() -> None:
    need = Capacity(cpus=1)
    assert choose([cand("a", cpus=2), cand("b", cpus=6)], need) == ("b", "")
    assert choose([cand("a", total=3), cand("b", total=1)], need) == ("b", "")
    assert choose([cand("b"), cand("a")], need) == ("a", "")


# ------------------------------------------------------------------ policies


@dataclass
class Rep:
    name: str
    in_flight: int = 0
    local: bool = False


def test_p2c_with_two_candidates_always_takes_the_less_busy() -> None:
    policy = PowerOfTwo(random.Random(1))
    busy, idle = Rep("busy", 5), Rep("idle", 0)
    assert {policy.pick([busy, idle]).name for _ in range(50)} == {"idle"}
    assert {policy.pick([idle, busy]).name for _ in range(50)} == {"idle"}


def test_p2c_never_picks_the_busiest_and_spreads_over_the_rest() -> None:
    policy = PowerOfTwo(random.Random(7))
    reps = [Rep("a", 0), Rep("b", 1), Rep("c", 2), Rep("d", 9)]
    picks = Counter(policy.pick(reps).name for _ in range(300))
    assert "d" not in picks
    assert set(picks) == {"a", "b", "c"}
    assert picks["a"] > picks["b"] > picks["c"]


def test_p2c_prefers_local_replicas_even_when_busier() -> None:
    policy = PowerOfTwo(random.Random(3))
    reps = [Rep("remote1", 0), Rep("local", 10, local=True), Rep("remote2", 0)]
    assert {policy.pick(reps).name for _ in range(50)} == {"local"}


def test_p2c_balances_between_local_replicas_only() -> None:
    policy = PowerOfTwo(random.Random(3))
    reps = [Rep("remote", 0), Rep("l1", 4, local=True), Rep("l2", 1, local=True)]
    assert {policy.pick(reps).name for _ in range(50)} == {"l2"}


def test_p2c_with_one_candidate_returns_it() -> None:
    only = Rep("only", 100)
    assert PowerOfTwo().pick([only]) is only


def test_round_robin_cycles_in_order_regardless_of_load_or_locality() -> None:
    policy = RoundRobin()
    reps = [Rep("a", 9, local=True), Rep("b", 0), Rep("c", 0)]
    assert [policy.pick(reps).name for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]


def test_make_policy_by_name() -> None:
    assert isinstance(make_policy("p2c"), PowerOfTwo)
    assert isinstance(make_policy("round_robin"), RoundRobin)
    with pytest.raises(
        ValueError, match=r"unknown routing policy 'random'; choose one of \['p2c', 'round_robin'\]"
    ):
        make_policy("random")

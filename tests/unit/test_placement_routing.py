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


def test_choose_names_every_short_resource_on_the_emptiest_scheduler() -> None:
    need = Capacity(cpus=4, memory_mb=2048, gpus=1)
    reason = choose([cand("a", cpus=1, memory_mb=4096), cand("b", cpus=3, memory_mb=1024)], need)
    assert reason == (
        None,
        "no scheduler has room (cpus 4 > 3 free, memory_mb 2048 > 1024 free, "
        "gpus 1 > 0 free on the emptiest)",
    )


def test_choose_reports_overcommitted_free_capacity_as_zero() -> None:
    assert choose([cand("a", cpus=-1)], Capacity(cpus=1)) == (
        None,
        "no scheduler has room (cpus 1 > 0 free on the emptiest)",
    )


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

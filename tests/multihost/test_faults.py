"""Faults between machines, each host a network namespace: a head on host 0 and a scheduler
on each further host, every process bound to its host's address, so that every call
between head, schedulers and replicas crosses the test network.

Each test states what the design promises for its fault and measures it: what the head
decides, what the data plane does with requests sent to a live scheduler's ingress while
the fault lasts, and that healing converges on exactly the replica count, no duplicates.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from shoal.chaos import Load, inputs_for
from shoal.testing.netns import NetCluster
from shoal.testing.wait import until
from tests.multihost.conftest import MakeCluster
from tests.multihost.helpers import (
    echo,
    events,
    exactly,
    figure,
    ready_by_scheduler,
    replica_processes,
    replicas_of,
    scheduler_state,
    watch,
    window,
)

pytestmark = pytest.mark.timeout(90)

SPEC_INPUTS = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]}


def load(cluster: NetCluster, scheduler: int, concurrency: int = 4, rate: float = 100.0) -> Load:
    """Paced load on one scheduler's ingress (paced so that two cores keep up with the rest)."""
    return Load(
        cluster.scheduler_address(scheduler),
        "echo",
        inputs_for(SPEC_INPUTS),
        cluster.settings,
        concurrency=concurrency,
        rate=rate,
        timeout_s=30,
    )


async def converge_exactly(
    cluster: NetCluster, count: int, *, alive: str, timeout_s: float = 20
) -> dict[str, Any]:
    """Wait until scheduler ``alive`` is ALIVE again and there are exactly ``count`` READY
    replicas in the head's view *and* as processes; returns the status then."""

    def ok(status: dict[str, Any]) -> bool:
        return scheduler_state(status, alive) == "ALIVE" and exactly(count)(status)

    await cluster.wait_for(ok, timeout_s=timeout_s, what=f"{alive} back and exactly {count} replicas")
    deadline = time.monotonic() + 10
    while len(replica_processes(cluster)) != count:
        assert time.monotonic() < deadline, (
            f"{len(replica_processes(cluster))} replica processes, want {count}"
        )
        await asyncio.sleep(0.1)
    status = await cluster.status()
    assert ok(status), status
    return status


async def test_scheduler_partitioned_from_head(
    make_cluster: MakeCluster, examples_dir: Path, figures: list[dict[str, Any]]
) -> None:
    """sched-0 cannot reach the head (nor the head it) for longer than dead_after (2 s here).

    Promised: the head marks it DEAD and places its replica on sched-1; sched-0 keeps serving
    requests that reach its ingress from its own replica (the data plane does not need the
    head); sched-1 serves throughout. On healing, the head NACKs sched-0's health update,
    sched-0 registers again with its replica, and the surplus is removed: exactly two.
    """
    cluster = await make_cluster(schedulers=2)
    hosts = cluster.hosts
    await cluster.deploy(echo(examples_dir, replicas=2))
    await cluster.wait_for(lambda s: ready_by_scheduler(s) == {"sched-0": 1, "sched-1": 1}, what="spread")
    seen: list[dict[str, Any]] = []
    async with load(cluster, 0) as on_cut, load(cluster, 1) as on_other:
        await until(lambda: len(on_cut.samples) >= 20 and len(on_other.samples) >= 20, "load before the cut")
        cut_at = time.monotonic()
        hosts.partition(cluster.scheduler_host(0), cluster.head_host)
        status = await cluster.wait_for(
            lambda s: scheduler_state(s, "sched-0") == "DEAD" and ready_by_scheduler(s) == {"sched-1": 2},
            timeout_s=15,
            what="sched-0 DEAD, its replica replaced on sched-1",
        )
        replaced_in = time.monotonic() - cut_at
        await watch(cluster, 3.0, seen.append)  # the partition lasts ~2.5x dead_after
        served_while_cut = len(on_cut.samples)
        hosts.heal(cluster.scheduler_host(0), cluster.head_host)
        healed_at = time.monotonic()
        await converge_exactly(cluster, 2, alive="sched-0")
        converged_in = time.monotonic() - healed_at
        during = window(on_cut, cut_at, time.monotonic()) + window(on_other, cut_at, time.monotonic())
        after = len(on_cut.samples)
        await until(lambda: len(on_cut.samples) >= after + 20, "answers after healing")
    # Not before dead_after (2 s), counted from sched-0's last health update the head got:
    # up to one heartbeat (0.2 s) before the cut.
    assert 2.0 - 0.2 <= replaced_in < 10, replaced_in
    assert len(replicas_of(status)) == 2
    assert all(len(replicas_of(s)) <= 2 for s in seen), "duplicates while cut"
    assert on_cut.failures() == [], on_cut.examples
    assert on_other.failures() == [], on_other.examples
    assert served_while_cut > 100
    kinds = [e["kind"] for e in await events(cluster)]
    assert "scheduler_dead" in kinds and "scheduler_rejoined" in kinds
    assert scheduler_state(await cluster.status(), "sched-0") == "ALIVE"
    assert converged_in < 10, converged_in
    figures.append(
        figure(
            "a scheduler cut from the head for ~6 s (dead_after 2 s); load on both schedulers",
            during,
            f"replaced in {replaced_in:.1f} s; exactly 2 again {converged_in:.1f} s after healing",
            "test_faults.py::test_scheduler_partitioned_from_head",
        )
    )


async def test_schedulers_partitioned_from_each_other(
    make_cluster: MakeCluster, examples_dir: Path, figures: list[dict[str, Any]]
) -> None:
    """sched-0 (an ingress with no replica of its own) is cut from sched-1; both still reach
    the head, so the head changes nothing: no scheduler DEAD, no replica moved.

    Promised: requests sent to sched-0 go to the replica it can reach (sched-2's), none fails.
    Measured: a request already on its way to sched-1's replica when the link goes silent
    waits until gRPC gives up on that connection (an unanswered ping: keepalive_timeout,
    5 s, after a ping that goes out with traffic, or every keepalive_time, 10 s, when idle)
    or the healed link brings it through, then is retried elsewhere; power-of-two-choices
    steers new requests away from the replica with requests stuck on it, so few wait.
    """
    cluster = await make_cluster(schedulers=3, scheduler_args=[["--cpus", "0"], [], []])
    hosts = cluster.hosts
    await cluster.deploy(echo(examples_dir, replicas=2))
    status = await cluster.wait_for(
        lambda s: ready_by_scheduler(s) == {"sched-1": 1, "sched-2": 1}, what="one replica on each"
    )
    on_1 = next(r["id"] for r in replicas_of(status) if r["scheduler"] == "sched-1")
    on_2 = next(r["id"] for r in replicas_of(status) if r["scheduler"] == "sched-2")
    before = sorted(r["id"] for r in replicas_of(status))
    seen: list[dict[str, Any]] = []
    async with load(cluster, 0) as through, load(cluster, 1) as local:
        await until(lambda: len(through.samples) >= 20 and len(local.samples) >= 20, "load before the cut")
        cut = through.now()
        hosts.partition(cluster.scheduler_host(0), cluster.scheduler_host(1))
        await watch(cluster, 6.0, seen.append)
        healed = through.now()
        hosts.heal(cluster.scheduler_host(0), cluster.scheduler_host(1))
        # Once healed, sched-0 uses sched-1's replica again.
        await until(
            lambda: any(s.replica == on_1 and s.at > healed for s in through.samples),
            "sched-0 routing to sched-1's replica again",
            timeout_s=20,
        )
    assert through.failures() == [], through.examples
    assert local.failures() == [], local.examples
    assert seen and all(
        scheduler_state(s, "sched-0") == scheduler_state(s, "sched-1") == "ALIVE"
        and sorted(r["id"] for r in replicas_of(s)) == before
        for s in seen
    ), "the head moved something"
    cut_off = [s for s in through.samples if cut < s.at < healed]
    assert sum(1 for s in cut_off if s.replica == on_2) > 100, "sched-0 did not fail over to sched-2"
    stuck = [s for s in cut_off if s.latency_s > 1.0]
    assert len(stuck) <= 8, f"{len(stuck)} requests waited on the unreachable replica"
    assert max(s.latency_s for s in through.samples) < 16, "held longer than keepalive allows"
    longest = max(s.latency_s for s in through.samples)
    figures.append(
        figure(
            "two schedulers cut from each other for 6 s; load on the one without replicas",
            cut_off,
            f"nothing to recover (head unaffected); {len(stuck)} request(s) held up to {longest:.1f} s",
            "test_faults.py::test_schedulers_partitioned_from_each_other",
        )
    )


async def test_latency_and_loss_on_every_link(
    make_cluster: MakeCluster, examples_dir: Path, figures: list[dict[str, Any]]
) -> None:
    """Every host sends with 25 ms of delay and 3% loss; each request crosses from sched-0's
    ingress to a replica on sched-1 and back (a 50 ms round trip before loss).

    Promised: requests succeed (TCP retransmits what is lost; nothing in shoal gives up on a
    slow link), latency grows by about the round trip, and the control plane keeps its
    nerve: no scheduler declared DEAD, no replica replaced (heartbeats every 0.2 s against a
    2 s dead_after survive retransmissions).
    """
    cluster = await make_cluster(schedulers=2, scheduler_args=[["--cpus", "0"], []])
    hosts = cluster.hosts
    await cluster.deploy(echo(examples_dir, replicas=2))
    status = await cluster.wait_for(lambda s: ready_by_scheduler(s) == {"sched-1": 2}, what="two on sched-1")
    before = sorted(r["id"] for r in replicas_of(status))
    seen: list[dict[str, Any]] = []
    async with load(cluster, 0, concurrency=8, rate=60) as ld:
        await until(lambda: len(ld.samples) >= 30, "a baseline before the delay")
        slow_from = ld.now()
        mechanisms = {hosts.delay(h, 25, loss_pct=3) for h in hosts.hosts}
        await watch(cluster, 6.0, seen.append, every_s=0.25)
        slow_to = ld.now()
        for h in hosts.hosts:
            hosts.undelay(h)
        after = len(ld.samples)
        await until(lambda: len(ld.samples) >= after + 30, "answers after the delay")
    assert ld.failures() == [], ld.examples
    fast = sorted(s.latency_s for s in ld.samples if s.at < slow_from)
    slow = sorted(s.latency_s for s in ld.samples if slow_from + 0.5 < s.at < slow_to - 0.5)
    assert len(slow) > 100
    assert slow[len(slow) // 2] >= 0.045, f"median {slow[len(slow) // 2]:.3f}s with a 50 ms round trip"
    assert slow[len(slow) // 2] > 3 * fast[len(fast) // 2]
    assert seen and all(
        all(s2["state"] == "ALIVE" for s2 in s["schedulers"])
        and sorted(r["id"] for r in replicas_of(s)) == before
        for s in seen
    ), "the control plane lost its nerve"
    figures.append(
        figure(
            f"25 ms delay and 3% loss on every host's packets for 6 s ({'/'.join(sorted(mechanisms))})",
            [s for s in ld.samples if slow_from <= s.at <= slow_to],
            f"nothing to recover; median {fast[len(fast) // 2] * 1000:.1f} -> "
            f"{slow[len(slow) // 2] * 1000:.0f} ms",
            "test_faults.py::test_latency_and_loss_on_every_link",
        )
    )


async def test_host_paused_and_resumed(
    make_cluster: MakeCluster, examples_dir: Path, figures: list[dict[str, Any]]
) -> None:
    """sched-2's host hangs (every process in it SIGSTOPped: scheduler and replica; the kernel
    still acknowledges TCP, nothing answers) for longer than dead_after, then goes on.

    Promised: the head marks sched-2 DEAD and places its replica on sched-1. Requests sent to
    sched-0 (an ingress without replicas) that were waiting on sched-2's hung replica are
    retried on sched-1's when the head's new routing table drops it, so none fails; they wait
    about dead_after. On resuming, sched-2 is NACKed, registers again with its replica, and
    the surplus goes: exactly two replicas, no duplicates.
    """
    cluster = await make_cluster(schedulers=3, scheduler_args=[["--cpus", "0"], [], []])
    hosts = cluster.hosts
    await cluster.deploy(echo(examples_dir, replicas=2))
    await cluster.wait_for(lambda s: ready_by_scheduler(s) == {"sched-1": 1, "sched-2": 1}, what="spread")
    seen: list[dict[str, Any]] = []
    async with load(cluster, 0) as ld:
        await until(lambda: len(ld.samples) >= 20, "load before the pause")
        paused_at = time.monotonic()
        stopped = hosts.pause(cluster.scheduler_host(2))
        assert len(stopped) >= 2  # the scheduler and its replica
        await cluster.wait_for(
            lambda s: scheduler_state(s, "sched-2") == "DEAD" and ready_by_scheduler(s) == {"sched-1": 2},
            timeout_s=15,
            what="sched-2 DEAD, its replica replaced on sched-1",
        )
        replaced_in = time.monotonic() - paused_at
        await watch(cluster, max(0.0, 4.0 - replaced_in), seen.append)
        hosts.resume(cluster.scheduler_host(2))
        resumed_at = time.monotonic()
        status = await converge_exactly(cluster, 2, alive="sched-2")
        converged_in = time.monotonic() - resumed_at
        during = window(ld, paused_at, time.monotonic())
        after = len(ld.samples)
        await until(lambda: len(ld.samples) >= after + 20, "answers after resuming")
    assert ld.failures() == [], ld.examples
    assert max(s.latency_s for s in ld.samples) < 8
    assert replaced_in < 10
    assert all(len(replicas_of(s)) <= 2 for s in seen)
    assert scheduler_state(status, "sched-2") == "ALIVE"
    assert converged_in < 10
    kinds = [e["kind"] for e in await events(cluster)]
    assert "scheduler_dead" in kinds and "scheduler_rejoined" in kinds
    figures.append(
        figure(
            "a scheduler's host frozen (SIGSTOP) for 4 s; load on another scheduler",
            during,
            f"replaced in {replaced_in:.1f} s; exactly 2 again {converged_in:.1f} s after resuming",
            "test_faults.py::test_host_paused_and_resumed",
        )
    )

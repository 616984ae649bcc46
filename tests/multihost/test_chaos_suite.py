"""The chaos suite: one cluster across four hosts (a head and three schedulers, each in its
own network namespace), loaded through sched-0's ingress the whole time, while one fault
after another hits the rest of it. Each phase is a ``shoal chaos`` run (the replica kills
through the command itself, the rest through its engine with faults of their own) and
adds a row to the reliability table (docs/reliability.md):

    SHOAL_RELIABILITY_OUT=/tmp/reliability.md .venv/bin/pytest tests/multihost

The phases run in file order on the same cluster; each ends with the deployment whole.
Promised, and asserted: no request sent to a live scheduler fails while a healthy replica
exists (the router retries requests whose replica died; the data plane does not need the
head), and every fault recovers within a bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from shoal.chaos import Chaos, Fault, FaultContext, converged
from shoal.core.spec import DeploymentSpec, load_spec_file, parse_spec
from shoal.testing.netns import Hosts, NetCluster
from tests.multihost.helpers import alive, exactly, replica_processes, replicas_of, scheduler_state, watch

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(150)]

REPLICAS = 3
RATE = 200  # requests a second through sched-0, 8 callers


@dataclass
class Suite:
    hosts: Hosts
    cluster: NetCluster
    examples: Path
    figures: list[dict[str, Any]]

    def spec(self, **changes: Any) -> DeploymentSpec:
        """examples/echo.yaml, as a user deploys it, with REPLICAS replicas."""
        (spec,) = load_spec_file(self.examples / "echo.yaml")
        return parse_spec({**spec.model_dump(mode="json"), "replicas": REPLICAS, **changes})

    def chaos(self) -> Chaos:
        return Chaos(
            self.cluster.head_address,
            "echo",
            self.cluster.settings,
            address=self.cluster.scheduler_address(0),
            concurrency=8,
            rate=RATE,
            timeout_s=30,
            seed=7,
        )

    def row(self, fault: str, doc: Mapping[str, Any], kind: str, recovery: str, test: str) -> None:
        k = doc["by_kind"][kind]
        self.figures.append(
            {
                "fault": fault,
                "requests": k["requests"],
                "failed": k["failed"],
                "recovery": recovery,
                "p99_ms": k["p99_ms"],
                "test": f"test_chaos_suite.py::{test}",
            }
        )

    async def whole(self, timeout_s: float = 30) -> dict[str, Any]:
        """Wait for exactly REPLICAS READY replicas, as the head sees them and as processes."""
        status = await self.cluster.wait_for(
            exactly(REPLICAS), timeout_s=timeout_s, what="the deployment whole"
        )
        deadline = asyncio.get_running_loop().time() + 10
        while len(replica_processes(self.cluster)) != REPLICAS:
            assert asyncio.get_running_loop().time() < deadline, replica_processes(self.cluster)
            await asyncio.sleep(0.1)
        return status


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def suite(
    netns_ready: None,
    examples_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    figures: list[dict[str, Any]],
) -> AsyncIterator[Suite]:
    hosts = Hosts(4).start()
    cluster = NetCluster(hosts, tmp_path_factory.mktemp("chaos-suite"))
    try:
        await cluster.__aenter__()
        s = Suite(hosts, cluster, examples_dir, figures)
        await cluster.deploy(s.spec())
        await s.whole()
        yield s
    finally:
        try:
            await cluster.close()
        finally:
            hosts.close()


def recovery_text(k: Mapping[str, Any], what: str) -> str:
    r = k["recovery_s"]
    if k["injected"] == 1:
        return f"{r['max']:.1f} s ({what})"
    return f"median {r['median']:.1f} s, max {r['max']:.1f} s ({what})"


async def test_replica_kills_every_second_for_30_s(suite: Suite) -> None:
    """``shoal chaos --kill-replicas-every 1 --duration 30``, the command itself: zero failed
    requests (the router retries a request whose replica died), every kill replaced."""
    cluster = suite.cluster
    env = {k: v for k, v in os.environ.items() if k != "SHOAL_HEAD"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shoal.chaos",
        "--head",
        cluster.head_address,
        "echo",
        "--url",
        cluster.scheduler_address(0),
        "--kill-replicas-every",
        "1",
        "--duration",
        "30",
        "--settle",
        "3",
        "--rate",
        str(RATE),
        "--seed",
        "1",
        "--max-failed",
        "0",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 100)
    assert proc.returncode == 0, err.decode()[-3000:] + out.decode()[-3000:]
    doc = json.loads(out)
    kills = doc["by_kind"]["kill_replica"]
    assert doc["failed"] == 0, doc["error_examples"]
    assert kills["injected"] >= 27, kills  # a tick finding no READY replica is skipped, not faked
    assert kills["recovered"] == kills["injected"], doc["faults"]
    assert kills["recovery_s"]["max"] < 10, kills
    assert doc["unrecovered"] == 0
    suite.row(
        "kill -9 a random replica every second for 30 s (examples/echo.yaml, 3 replicas, 3 schedulers)",
        doc,
        "kill_replica",
        recovery_text(kills, "a replacement READY"),
        "test_replica_kills_every_second_for_30_s",
    )
    await suite.whole()


async def test_scheduler_kill(suite: Suite) -> None:
    """``kill -9`` sched-2: its replica is replaced elsewhere once the head marks it DEAD
    (dead_after 2 s), its orphaned replica exits on its own, and no request fails."""
    cluster = suite.cluster
    orphans = [p for p in cluster.scheduler_host(2).pids() if p != cluster.schedulers[2].pid]
    chaos = suite.chaos()
    doc = await chaos.run([chaos.kill_scheduler(2.0, "sched-2")], duration_s=2.0, settle_s=2.0)
    k = doc["by_kind"]["kill_scheduler"]
    assert doc["failed"] == 0, doc["error_examples"]
    assert k["injected"] == k["recovered"] == 1, doc["faults"]
    assert k["recovery_s"]["max"] < 10
    assert not any(alive(p) for p in orphans), "orphaned replicas still running"
    suite.row(
        "kill -9 a scheduler (one of the three replicas on it)",
        doc,
        "kill_scheduler",
        recovery_text(k, "marked DEAD, replaced elsewhere"),
        "test_scheduler_kill",
    )
    # Back to three schedulers for what follows; it rejoins as sched-2 with no replicas.
    await asyncio.to_thread(cluster.restart_scheduler, 2)
    await cluster.wait_for(lambda s: scheduler_state(s, "sched-2") == "ALIVE", what="sched-2 back")
    await suite.whole()


async def test_head_restart(suite: Suite) -> None:
    """``kill -9`` the head and start it again: the data plane serves from its last routing
    table meanwhile (no request fails), schedulers re-register with their replicas, and the
    new head adopts them: the same replicas after as before, and none started meanwhile
    (the new head waits dead_after for every scheduler before placing anything)."""
    cluster = suite.cluster
    before = sorted(r["id"] for r in replicas_of(await cluster.status()))

    start_s: list[float] = []

    async def restart() -> str:
        assert cluster.head is not None
        cluster.head.kill_all()
        await asyncio.sleep(1.0)  # headless for a second
        began = time.monotonic()
        await asyncio.to_thread(cluster.restart_head)
        start_s.append(time.monotonic() - began)
        return "head (kill -9, restarted after 1 s)"

    seen: set[str] = set()
    chaos = suite.chaos()
    watcher = asyncio.create_task(
        watch(cluster, 8.0, lambda s: seen.update(r["id"] for r in replicas_of(s)), every_s=0.05)
    )
    doc = await chaos.run([chaos.restart_head(2.0, restart)], duration_s=2.0, settle_s=2.0)
    await watcher
    await cluster.reconnect()
    assert seen <= set(before), f"the new head started replicas: {sorted(seen - set(before))}"
    k = doc["by_kind"]["restart_head"]
    assert doc["failed"] == 0, doc["error_examples"]
    assert k["injected"] == k["recovered"] == 1, doc["faults"]
    # Within 10 s of the new head's ports opening: a quiet start takes 0.65 s, but on a
    # machine starved of CPU (two burners beside -n 3) it took 9-18 s, which is the
    # machine's, not what this bounds (schedulers registering again, replicas adopted).
    assert k["recovery_s"]["max"] < 10 + start_s[0], start_s
    status = await suite.whole()
    assert sorted(r["id"] for r in replicas_of(status)) == before, "the new head replaced running replicas"
    suite.row(
        "kill -9 the head, restart it 1 s later",
        doc,
        "restart_head",
        recovery_text(k, "schedulers re-registered, replicas adopted"),
        "test_head_restart",
    )


async def test_scheduler_partitioned_from_head_then_healed(suite: Suite) -> None:
    """sched-1 cannot reach the head for 5 s (dead_after 2 s): the head marks it DEAD and
    places its replica elsewhere; healed, sched-1 is NACKed, re-registers, and the surplus
    goes: exactly three replicas again. No request to sched-0 fails meanwhile."""
    cluster, hosts = suite.cluster, suite.hosts
    cut_host, head_host = cluster.scheduler_host(1), cluster.head_host

    async def cut(ctx: FaultContext) -> str:
        hosts.partition(cut_host, head_host)
        return f"sched-1 ({cut_host.address}) <-/-> head"

    async def heal(ctx: FaultContext) -> str:
        hosts.heal(cut_host, head_host)
        return "sched-1 <-> head"

    def replaced(status: Mapping[str, Any], ctx: FaultContext) -> bool:
        return scheduler_state(dict(status), "sched-1") == "DEAD" and converged(status, "echo")

    def back(status: Mapping[str, Any], ctx: FaultContext) -> bool:
        return scheduler_state(dict(status), "sched-1") == "ALIVE" and converged(status, "echo")

    chaos = suite.chaos()
    doc = await chaos.run(
        [Fault("partition", 2.0, cut, recovery=replaced), Fault("heal", 7.0, heal, recovery=back)],
        duration_s=7.0,
        settle_s=2.0,
    )
    assert doc["failed"] == 0, doc["error_examples"]
    for kind in ("partition", "heal"):
        k = doc["by_kind"][kind]
        assert k["injected"] == k["recovered"] == 1, doc["faults"]
        assert k["recovery_s"]["max"] < 10
    await suite.whole()
    suite.row(
        "a scheduler cut from the head for 5 s",
        doc,
        "partition",
        recovery_text(doc["by_kind"]["partition"], "marked DEAD, replaced elsewhere"),
        "test_scheduler_partitioned_from_head_then_healed",
    )
    suite.row(
        "... and healed",
        doc,
        "heal",
        recovery_text(doc["by_kind"]["heal"], "re-registered, surplus removed: exactly 3"),
        "test_scheduler_partitioned_from_head_then_healed",
    )


async def test_rolling_update(suite: Suite) -> None:
    """A changed spec rolls every replica (new ones first, old ones drained): no request fails,
    including those in flight on another scheduler's replica when it leaves the table."""
    cluster = suite.cluster

    async def roll(ctx: FaultContext) -> str:
        await cluster.deploy(suite.spec(options={"delay_ms": 1}))
        return "echo: options.delay_ms 0 -> 1"

    def rolled(status: Mapping[str, Any], ctx: FaultContext) -> bool:
        old = {r["id"] for r in replicas_of(ctx.before)}
        return converged(status, "echo") and not old & {r["id"] for r in replicas_of(dict(status))}

    chaos = suite.chaos()
    doc = await chaos.run([Fault("rolling_update", 2.0, roll, recovery=rolled)], duration_s=2.0, settle_s=2.0)
    k = doc["by_kind"]["rolling_update"]
    assert doc["failed"] == 0, doc["error_examples"]
    assert k["injected"] == k["recovered"] == 1, doc["faults"]
    assert k["recovery_s"]["max"] < 20
    await suite.whole()
    suite.row(
        "rolling update of all 3 replicas",
        doc,
        "rolling_update",
        recovery_text(k, "every replica replaced"),
        "test_rolling_update",
    )

"""Requests that one scheduler routes to another scheduler's replica, when that replica
leaves the routing table while they are in flight. Runs on loopback (no namespaces needed):
the schedulers are separate processes either way."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.errors import ShoalError
from shoal.rpc.clients import NativeClient
from shoal.testing.cluster import ProcessCluster
from shoal.testing.gate import calls, entered, gate_model, hold, release
from shoal.testing.wait import until
from tests.multihost.helpers import X, echo, replicas_of

pytestmark = pytest.mark.timeout(60)


async def test_rolling_update_answers_requests_in_flight_on_a_remote_replica(tmp_path: Path) -> None:
    """sched-0 has no room for replicas; it routes to sched-1's. A rolling update drains that
    replica while held requests are on it, and the head's next routing table drops it from
    sched-0's router before they are answered. Promised (a rolling update fails no request):
    each is answered, by the draining replica or retried on the new one, not left hanging."""
    folder = tmp_path / "gate"

    def gated(version: float) -> dict[str, Any]:
        # A changed option needs new processes: max_hold_s tells the versions apart.
        spec = {"name": "echo", **gate_model(folder), "replicas": 1, "resources": {"cpus": 0.1}}
        return {**spec, "options": {**spec["options"], "max_hold_s": version}}

    async with ProcessCluster(tmp_path, schedulers=2, scheduler_args=[["--cpus", "0"], []]) as cluster:
        await cluster.deploy(gated(60))
        (old,) = await cluster.wait_ready("echo", 1)
        async with NativeClient(cluster.scheduler_address(0), cluster.settings) as client:
            hold(folder)
            pending = [asyncio.create_task(client.infer("echo", {"x": X}, timeout_s=20)) for _ in range(3)]
            await until(lambda: entered(folder), "requests in the old replica's model")
            await cluster.deploy(gated(59))
            await cluster.wait_for(
                lambda s: any(r["id"] != old["id"] and r["state"] == "READY" for r in replicas_of(s)),
                what="the new replica READY",
            )
            release(folder)
            results = await asyncio.gather(*pending, return_exceptions=True)
        await cluster.wait_for(
            lambda s: [r["id"] for r in replicas_of(s)] != [old["id"]] and len(replicas_of(s)) == 1,
            what="the old replica replaced",
        )
    failed = [r for r in results if isinstance(r, BaseException)]
    assert failed == [], failed
    for outputs, _ in results:  # type: ignore[misc]
        np.testing.assert_array_equal(outputs["x"], X)


async def test_a_remote_replica_that_drains_answers_what_it_holds_and_runs_nothing_twice(
    tmp_path: Path,
) -> None:
    """As above, but nothing may run twice. Seen: when the head's table dropped the draining
    replica, sched-0's router closed its stream to it, and the requests held there were sent
    again to the new replica, while the draining one went on with the call it had begun:
    that request's model ran twice (a text generation streaming from it was cut instead).
    The draining replica answers what it took; sched-0 waits for those answers."""
    folder = tmp_path / "gate"
    spec = {"name": "echo", **gate_model(folder), "replicas": 1, "resources": {"cpus": 0.1}}

    def version(max_hold_s: float) -> dict[str, Any]:
        return {**spec, "options": {**spec["options"], "max_hold_s": max_hold_s}}

    async with ProcessCluster(tmp_path, schedulers=2, scheduler_args=[["--cpus", "0"], []]) as cluster:
        await cluster.deploy(version(60))
        (old,) = await cluster.wait_ready("echo", 1)
        xs = [X * (i + 1) for i in range(3)]
        async with NativeClient(cluster.scheduler_address(0), cluster.settings) as client:
            hold(folder)
            pending = [asyncio.create_task(client.infer("echo", {"x": x}, timeout_s=20)) for x in xs]
            await until(lambda: entered(folder), "a request in the old replica's model")
            await cluster.deploy(version(59))
            await cluster.wait_for(
                lambda s: any(r["id"] == old["id"] and r["state"] == "DRAINING" for r in replicas_of(s)),
                what="the old replica draining",
            )
            # The head's next table (sent within ROUTES_GAP_S) drops it at sched-0.
            await asyncio.sleep(1.5)
            release(folder)
            results = await asyncio.gather(*pending, return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert failed == [], failed
    ran = calls(folder)
    assert sorted(ran) == sorted(repr({"x": [float(x[0, 0])]}) for x in xs), ran
    for x, (outputs, replica) in zip(xs, results, strict=True):  # type: ignore[misc]
        np.testing.assert_array_equal(outputs["x"], x)
        assert replica == old["id"]


async def test_a_restarted_head_does_not_take_a_silent_schedulers_replicas_from_the_others(
    tmp_path: Path, examples_dir: Path
) -> None:
    """sched-0 has no room for replicas; it routes to sched-1's. The head is killed and
    started again while sched-1 is stopped (SIGSTOP: it registers again late, as one whose
    reconnect backoff is long or whose machine is slow does), so sched-0 registers first and
    the new head's table lists no replica of echo. Its replica still answers: sched-0 goes on
    routing to it while the new head waits for the schedulers to register again (its
    adoption wait, ``dead_after_s``). Seen: sched-0 dropped the replica with that table, and
    every request to echo waited (and timed out) until sched-1 registered."""

    def alive(status: dict[str, Any]) -> set[str]:
        return {s["http_address"] for s in status["schedulers"] if s["state"] == "ALIVE"}

    env = {"SHOAL_DEAD_AFTER_S": "15", "SHOAL_ORPHAN_AFTER_S": "30"}
    args = [["--cpus", "0"], []]
    async with ProcessCluster(tmp_path, schedulers=2, scheduler_args=args, env=env) as cluster:
        await cluster.deploy(echo(examples_dir, 1))
        await cluster.wait_ready("echo", 1)
        async with NativeClient(cluster.scheduler_address(0), cluster.settings) as client:
            await client.infer("echo", {"x": X}, timeout_s=10)
            silent = cluster.schedulers[1]
            assert silent.proc is not None
            silent.proc.send_signal(signal.SIGSTOP)
            try:
                assert cluster.head is not None
                cluster.head.kill_all()
                await asyncio.to_thread(cluster.restart_head)
                await cluster.reconnect()
                await cluster.wait_for(
                    lambda s: alive(s) == {cluster.http_address(0)}, what="sched-0 registered again"
                )
                answered, failed = 0, []
                for _ in range(15):  # 3 s, well within the new head's 15 s adoption wait
                    try:
                        outputs, _ = await client.infer("echo", {"x": X}, timeout_s=1.0)
                    except ShoalError as err:
                        failed.append(repr(err))
                    else:
                        np.testing.assert_array_equal(outputs["x"], X)
                        answered += 1
                    await asyncio.sleep(0.2)
                status = await cluster.status()
            finally:
                silent.proc.send_signal(signal.SIGCONT)
    assert alive(status) == {cluster.http_address(0)}, "sched-1 registered while stopped"
    assert failed == [], f"{answered} answered; failed: {failed[:3]}"

"""Requests that one scheduler routes to another scheduler's replica, when that replica
leaves the routing table while they are in flight. Runs on loopback (no namespaces needed):
the schedulers are separate processes either way."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from shoal.rpc.clients import NativeClient
from shoal.testing.cluster import ProcessCluster
from tests.multihost.helpers import X, echo, replicas_of

pytestmark = pytest.mark.timeout(60)


async def test_rolling_update_answers_requests_in_flight_on_a_remote_replica(
    tmp_path: Path, examples_dir: Path
) -> None:
    """sched-0 has no room for replicas; it routes to sched-1's. A rolling update drains that
    replica while slow requests are on it, and the head's next routing table drops it from
    sched-0's router before they are answered. Promised (a rolling update fails no request):
    each is answered, by the draining replica or retried on the new one, not left hanging."""
    async with ProcessCluster(tmp_path, schedulers=2, scheduler_args=[["--cpus", "0"], []]) as cluster:
        await cluster.deploy(echo(examples_dir, replicas=1, options={"delay_ms": 1500}))
        (old,) = await cluster.wait_ready("echo", 1)
        async with NativeClient(cluster.scheduler_address(0), cluster.settings) as client:
            started = time.monotonic()
            pending = [asyncio.create_task(client.infer("echo", {"x": X}, timeout_s=8)) for _ in range(3)]
            await asyncio.sleep(0.2)
            await cluster.deploy(echo(examples_dir, replicas=1, options={"delay_ms": 1400}))
            results = await asyncio.gather(*pending, return_exceptions=True)
            took = time.monotonic() - started
        await cluster.wait_for(
            lambda s: [r["id"] for r in replicas_of(s)] != [old["id"]] and len(replicas_of(s)) == 1,
            what="the old replica replaced",
        )
    failed = [r for r in results if isinstance(r, BaseException)]
    assert failed == [], failed
    for outputs, _ in results:  # type: ignore[misc]
        np.testing.assert_array_equal(outputs["x"], X)
    assert took < 6, f"answered after {took:.1f}s"

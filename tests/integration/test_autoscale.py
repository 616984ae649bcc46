"""Autoscaling with real processes: up under load, down after it, to zero and back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.errors import DeadlineExceeded, Unavailable
from shoal.rpc.clients import NativeClient
from shoal.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(120)


def spec(examples: Path, **autoscaling: Any) -> dict[str, Any]:
    return {
        "name": "echo",
        "backend": "python",
        "model": "echo:Echo",
        "options": {"delay_ms": 40},
        "base_dir": str(examples),
        "resources": {"cpus": 0.1},
        "autoscaling": {
            "target_ongoing_requests": 2,
            "upscale_delay_s": 0.5,
            "downscale_delay_s": 1.5,
            **autoscaling,
        },
    }


def count(status: dict[str, Any]) -> tuple[int, int]:
    dep = next(d for d in status["deployments"] if d["name"] == "echo")
    return dep["target_replicas"], sum(r["state"] == "READY" for r in dep["replicas"])


async def test_scales_up_under_load_and_back_down(tmp_path: Path, examples_dir: Path) -> None:
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(spec(examples_dir, min_replicas=1, max_replicas=3))
        await cluster.wait_ready("echo", 1)
        x = np.ones((1, 16), np.float32)
        stop = asyncio.Event()
        failures: list[str] = []

        async def worker(client: NativeClient) -> None:
            while not stop.is_set():
                try:
                    await client.infer("echo", {"x": x}, timeout_s=20)
                except Exception as err:
                    failures.append(repr(err))

        async with NativeClient(cluster.scheduler_address(), cluster.settings) as client:
            workers = [asyncio.create_task(worker(client)) for _ in range(8)]
            started = time.monotonic()
            # 8 requests in flight / target 2 = 4, bounded by max_replicas 3.
            await cluster.wait_for(lambda s: count(s) == (3, 3), timeout_s=30, what="3 READY replicas")
            scaled_up_in = time.monotonic() - started
            # Steady load: no flapping while it lasts.
            for _ in range(10):
                assert count(await cluster.status())[0] == 3
                await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*workers)
        assert failures == []
        assert scaled_up_in < 30
        await cluster.wait_for(lambda s: count(s) == (1, 1), timeout_s=30, what="back to 1 replica")


async def test_scale_to_zero_and_cold_start(tmp_path: Path, examples_dir: Path) -> None:
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(spec(examples_dir, min_replicas=0, max_replicas=2))

        # Idle: scales to zero after downscale_delay_s.
        def drained(s: dict[str, Any]) -> bool:
            dep = next(d for d in s["deployments"] if d["name"] == "echo")
            return bool(dep["target_replicas"] == 0 and dep["replicas"] == [])

        await cluster.wait_for(drained, timeout_s=30, what="zero replicas")
        assert cluster.leftover_replicas() == []
        # A request now is held while a replica starts, then served.
        x = np.arange(16, dtype=np.float32).reshape(1, 16)
        started = time.monotonic()
        out, replica = await cluster.send("echo", {"x": x}, timeout_s=30)
        cold_start = time.monotonic() - started
        np.testing.assert_array_equal(out["x"], x)
        assert replica.startswith("echo-")
        assert cold_start < 30
        _, ready = count(await cluster.status())
        assert ready == 1


async def test_requests_held_at_zero_are_refused_once_the_model_cannot_start(
    tmp_path: Path, examples_dir: Path
) -> None:
    """Requests held at zero replicas for a model that cannot load are answered with why, as
    soon as its deployment is FAILED; they used to wait out their whole timeout for a replica
    that would never be started, and got DEADLINE_EXCEEDED '(0 ready)'."""
    async with ProcessCluster(tmp_path) as cluster:
        bad = spec(examples_dir, min_replicas=0, max_replicas=2)
        await cluster.deploy({**bad, "options": {"delay_ms": -1}})
        x = np.ones((1, 4), np.float32)
        held = await asyncio.gather(
            *(cluster.send("echo", {"x": x}, timeout_s=30) for _ in range(3)), return_exceptions=True
        )
        for answer in held:
            assert isinstance(answer, Unavailable), answer
            assert "FAILED" in answer.message and "delay_ms must be >= 0" in answer.message
        # A request that comes later is refused at once, with the same words.
        with pytest.raises(Unavailable, match="delay_ms must be >= 0"):
            await cluster.send("echo", {"x": x}, timeout_s=30)


async def test_a_request_held_at_zero_with_no_room_says_why(tmp_path: Path, examples_dir: Path) -> None:
    """A request woke a deployment at zero on a full cluster: it waited out its timeout and was
    told the start took too long ('it scales from zero, ... a longer timeout, or
    autoscaling.min_replicas 1, avoids the wait'), while the replica was never placed. Now the
    answer names what status does: no scheduler has room."""
    async with ProcessCluster(tmp_path, scheduler_args=[["--cpus", "1"]]) as cluster:
        hog = {**spec(examples_dir), "name": "hog", "resources": {"cpus": 1}, "autoscaling": None}
        await cluster.deploy(hog)
        await cluster.wait_ready("hog", 1)
        await cluster.deploy(
            {**spec(examples_dir, min_replicas=0, max_replicas=2), "replicas": 0, "resources": {"cpus": 1}}
        )
        await cluster.wait_for(
            lambda s: any(d["name"] == "echo" for d in s["deployments"]), timeout_s=10, what="echo known"
        )
        await asyncio.sleep(0.5)  # the table with the deployment reaches the scheduler
        x = np.ones((1, 16), np.float32)
        with pytest.raises(DeadlineExceeded) as caught:
            await cluster.send("echo", {"x": x}, timeout_s=3)
        message = caught.value.message
        assert "no scheduler has room (cpus 1 > 0 free" in message, message
        assert "a longer timeout" not in message, message
        dep = next(d for d in (await cluster.status())["deployments"] if d["name"] == "echo")
        assert dep["pending_reason"].startswith("no scheduler has room"), dep

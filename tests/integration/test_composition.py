"""Composed deployments (issue 18, item 3): a python model calls other deployments through
the router, with the calling request's deadline and id; a three-stage pipeline loses no
request when a replica of its middle stage is killed."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from shoal.rpc.clients import NativeClient
from shoal.testing.cluster import ProcessCluster
from shoal.testing.wait import until

pytestmark = pytest.mark.timeout(120)

MODELS = '''
import time

import numpy as np


class Front:
    """Stage one: a plain predict, on the model thread, calls the next two stages."""

    def predict(self, inputs):
        doubled = self.deployments["double"].infer({"x": inputs["x"] + 1})
        return self.deployments["square"].infer(doubled)


class AsyncFront:
    """The same from ``async def predict``, with the handles given to the constructor."""

    def __init__(self, deployments):
        self.stages = deployments

    async def predict(self, inputs):
        doubled = await self.stages["double"].ainfer({"x": inputs["x"] + 1})
        return await self.stages["square"].ainfer(doubled)


class Double:
    def __init__(self, delay_ms=0):
        self.delay_s = delay_ms / 1000

    def predict(self, inputs):
        time.sleep(self.delay_s)
        return {"x": inputs["x"] * 2}


class Square:
    def predict(self, inputs):
        return {"x": inputs["x"] ** 2}


class Slow:
    def predict(self, inputs):
        time.sleep(5)
        return inputs


class CallsSlow:
    def predict(self, inputs):
        return self.deployments["slow"].infer(inputs)


class Refuses:
    """A target whose every replica answers UNAVAILABLE (its backend is down, say); counts
    the calls it gets in the file ``log``."""

    def __init__(self, log):
        self.log = log

    def predict(self, inputs):
        from shoal.errors import Unavailable

        with open(self.log, "a") as f:
            f.write("call\\n")
        raise Unavailable("the store behind this model is down")


class CallsRefuses:
    def __init__(self, log):
        self.log = log

    def predict(self, inputs):
        with open(self.log, "a") as f:
            f.write("call\\n")
        return self.deployments["refuses"].infer(inputs)


class Tenants:
    """Multiplexed: model id ``tN`` multiplies by N."""

    def load_model(self, model_id):
        return Scale(float(model_id[1:]))


class Scale:
    def __init__(self, n):
        self.n = n

    def predict(self, inputs):
        return {"x": inputs["x"] * self.n}


class CallsTenant:
    """Calls the tenants deployment with its model id ``t3``, then a deployment that is not there."""

    def predict(self, inputs):
        out = self.deployments["tenants"].infer(inputs, model_id="t3")
        if float(inputs["x"].flat[0]) < 0:
            return self.deployments["no-such-deployment"].infer(inputs)
        return out


class CallsItself:
    def predict(self, inputs):
        return self.deployments["self-caller"].infer(inputs)
'''


def spec(models: Path, name: str, cls: str, replicas: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "python",
        "model": f"stages:{cls}",
        "base_dir": str(models),
        "replicas": replicas,
        "resources": {"cpus": 0.1},
        **extra,
    }


@pytest.fixture
def models(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "stages.py").write_text(MODELS)
    return folder


async def test_a_pipeline_loses_no_request_when_a_middle_replica_is_killed(
    tmp_path: Path, models: Path
) -> None:
    async with ProcessCluster(tmp_path / "cluster") as cluster:
        await cluster.deploy(spec(models, "front", "Front"))
        await cluster.deploy(spec(models, "afront", "AsyncFront"))
        # 20 ms per call in the middle, so requests are in flight on the replica killed.
        await cluster.deploy(spec(models, "double", "Double", replicas=2, options={"delay_ms": 20}))
        await cluster.deploy(spec(models, "square", "Square"))
        for name, count in (("front", 1), ("afront", 1), ("square", 1)):
            await cluster.wait_ready(name, count)
        middle = await cluster.wait_ready("double", 2)

        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        expected = ((x + 1) * 2) ** 2
        failures: list[str] = []
        answered = 0
        stop = asyncio.Event()

        async def client(native: NativeClient, entry: str) -> None:
            nonlocal answered
            while not stop.is_set():
                try:
                    out, _ = await native.infer(entry, {"x": x}, timeout_s=20)
                    np.testing.assert_array_equal(out["x"], expected)
                    answered += 1
                except Exception as err:
                    failures.append(f"{entry}: {err!r}")

        async with NativeClient(cluster.scheduler_address(), cluster.settings) as native:
            clients = [asyncio.create_task(client(native, e)) for e in ("front", "afront") * 4]
            await until(lambda: answered >= 20, "answers through both pipelines")
            os.kill(middle[0]["pid"], signal.SIGKILL)
            seen = answered
            await until(lambda: answered >= seen + 100, "answers after the kill", timeout_s=30)
            stop.set()
            await asyncio.gather(*clients)
        assert failures == []


async def test_a_call_carries_the_deadline_and_request_id_and_a_self_call_is_refused(
    tmp_path: Path, models: Path
) -> None:
    async with ProcessCluster(tmp_path / "cluster") as cluster:
        await cluster.deploy(spec(models, "calls-slow", "CallsSlow"))
        await cluster.deploy(spec(models, "slow", "Slow"))
        await cluster.deploy(spec(models, "self-caller", "CallsItself"))
        for name in ("calls-slow", "slow", "self-caller"):
            await cluster.wait_ready(name, 1)
        x = np.ones((1, 2), dtype=np.float32)

        async with NativeClient(cluster.scheduler_address(), cluster.settings) as native:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await native.infer("calls-slow", {"x": x}, timeout_s=1.0, request_id="trace-me")
            # The 5 s call downstream had only what was left of the caller's second.
            assert time.monotonic() - started < 4.0

            with pytest.raises(Exception, match="cannot call itself"):
                await native.infer("self-caller", {"x": x}, timeout_s=5)

        # The downstream replica's log names the request that caused its call.
        [slow] = await cluster.replicas("slow")
        log = cluster.schedulers[0].state / "logs" / f"replica_{slow['id']}.log"
        await until(lambda: "trace-me" in log.read_text(), "the caller's request id in slow's log")


async def test_a_target_that_fails_is_not_retried_again_on_each_caller(tmp_path: Path, models: Path) -> None:
    """The target's router retries it on request_attempts replicas; then the caller answers
    UNAVAILABLE, final. Before, the caller's router took that for its own replica failing and
    retried the whole request on another caller replica: the target saw request_attempts **
    depth calls (4 here), the callers 2, and the client waited for all of them."""
    calls, targets = tmp_path / "callers.log", tmp_path / "targets.log"
    async with ProcessCluster(tmp_path / "cluster") as cluster:
        await cluster.deploy(spec(models, "front", "CallsRefuses", replicas=2, options={"log": str(calls)}))
        await cluster.deploy(spec(models, "refuses", "Refuses", replicas=2, options={"log": str(targets)}))
        await cluster.wait_ready("front", 2)
        await cluster.wait_ready("refuses", 2)
        x = np.ones((1, 2), dtype=np.float32)
        async with NativeClient(cluster.scheduler_address(), cluster.settings) as native:
            with pytest.raises(Unavailable, match="the store behind this model is down"):
                await native.infer("front", {"x": x}, timeout_s=10)
    assert calls.read_text().count("call") == 1
    assert targets.read_text().count("call") == cluster.settings.request_attempts == 2


async def test_a_call_names_a_multiplexed_model_and_a_missing_target_is_no_404(
    tmp_path: Path, models: Path
) -> None:
    async with ProcessCluster(tmp_path / "cluster") as cluster:
        await cluster.deploy(spec(models, "front", "CallsTenant"))
        await cluster.deploy(spec(models, "tenants", "Tenants", multiplexing={"max_models_per_replica": 2}))
        await cluster.wait_ready("front", 1)
        await cluster.wait_ready("tenants", 1)
        x = np.full((1, 2), 2.0, dtype=np.float32)
        async with NativeClient(cluster.scheduler_address(), cluster.settings) as native:
            # Before, a handle had no model id to give: the target refused every call.
            out, _ = await native.infer("front", {"x": x}, timeout_s=10)
            np.testing.assert_array_equal(out["x"], x * 3)
            # Before: NOT_FOUND "no deployment named ..." for a request to 'front', which exists.
            with pytest.raises(FailedPrecondition, match="deployment 'front' calls 'no-such-deployment'"):
                await native.infer("front", {"x": -x}, timeout_s=10)

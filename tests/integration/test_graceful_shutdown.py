"""SIGTERM to a scheduler under load, with an ingress worker beside its main process: every
request admitted before the signal (running on the replica or queued in a router) is
answered; those that come later are refused clearly (HTTP 503 in the OIP shape with
``Retry-After``, gRPC UNAVAILABLE); one still running when ``shutdown_grace_s`` runs out is
refused the same way; the scheduler exits soon after the grace.

Before: the replicas drained first, the requests queued in the routers waited for a replica
that would never come, and the HTTP server cancelled them 2 s later (a bare 500).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

from shoal.errors import Code, ShoalError
from shoal.rpc.clients import NativeClient
from shoal.testing.cluster import ProcessCluster
from shoal.testing.gate import entered, gate_model, hold, release
from shoal.testing.wait import until

pytestmark = pytest.mark.timeout(90)

GRACE_S = 5.0
X = np.ones((1, 4), np.float32)
BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0] * 4}]}


def gated(name: str, folder: Path, **extra: Any) -> dict[str, Any]:
    return {"name": name, **gate_model(folder), "resources": {"cpus": 0.1}, "timeout_s": 30, **extra}


async def post(url: str) -> httpx.Response:
    """On a connection of its own, so the kernel may give it to either ingress process."""
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(url, json=BODY)


def refused(reply: httpx.Response) -> str:
    assert reply.status_code == 503, (reply.status_code, reply.text[:300])
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.headers["retry-after"] == "1"
    error: str = reply.json()["error"]
    assert "the scheduler is shutting down" in error
    return error


async def test_sigterm_answers_admitted_requests_and_refuses_the_rest(tmp_path: Path) -> None:
    held, stuck = tmp_path / "held", tmp_path / "stuck"
    env = {"SHOAL_INGRESS_WORKERS": "2", "SHOAL_SHUTDOWN_GRACE_S": str(GRACE_S)}
    async with ProcessCluster(tmp_path, env=env) as cluster:
        # One at a time, the rest queued in the routers (each process takes half the queue).
        await cluster.deploy(gated("held", held, max_ongoing_requests=1, max_queued_requests=16))
        await cluster.deploy(gated("stuck", stuck))
        await cluster.wait_ready("held", 1)
        await cluster.wait_ready("stuck", 1)
        sched = cluster.schedulers[0]
        base = f"http://{cluster.http_address()}/v2/models"
        hold(held)
        hold(stuck)
        async with NativeClient(cluster.scheduler_address(), cluster.settings) as grpc:
            admitted = [asyncio.create_task(post(f"{base}/held/infer")) for _ in range(6)]
            admitted_grpc = [asyncio.create_task(grpc.infer("held", {"x": X})) for _ in range(2)]
            running = asyncio.create_task(post(f"{base}/stuck/infer"))
            await until(lambda: entered(held) and entered(stuck), "requests in the models", timeout_s=20)
            await asyncio.sleep(0.5)  # the others reach a router's queue
            assert not any(t.done() for t in [*admitted, *admitted_grpc, running])

            signalled = time.monotonic()
            sched.signal(signal.SIGTERM)
            await until(lambda: "shutting down" in sched.log.read_text(), "the scheduler shutting down")
            await asyncio.sleep(0.5)  # its ingress worker told too
            for reply in await asyncio.gather(*(post(f"{base}/held/infer") for _ in range(4))):
                refused(reply)
            with pytest.raises(ShoalError) as late:
                await grpc.infer("held", {"x": X}, timeout_s=10)
            assert late.value.code == Code.UNAVAILABLE
            assert "the scheduler is shutting down" in late.value.message

            # Past the 2 s the HTTP servers give requests when they stop: still answered.
            await asyncio.sleep(max(0.0, signalled + 2.5 - time.monotonic()))
            answered = [t for t in [*admitted, *admitted_grpc] if t.done()]
            assert not answered, [t.result() if not t.exception() else t.exception() for t in answered]
            release(held)
            replies = await asyncio.gather(*admitted)
            assert [r.status_code for r in replies] == [200] * 6, [r.text[:200] for r in replies]
            for out, _ in await asyncio.gather(*admitted_grpc):
                np.testing.assert_array_equal(out["x"], X)

            # Never released: refused when the grace runs out, not left to the HTTP server.
            error = refused(await running)
            assert "grace" in error
            assert time.monotonic() - signalled < GRACE_S + 2.0
        assert await asyncio.to_thread(sched.wait, 30) == 0
        assert time.monotonic() - signalled < GRACE_S + 5.0
        log = sched.log.read_text()
        assert "Exception in ASGI application" not in log and "Traceback" not in log, log[-3000:]
        assert not cluster.leftover_replicas()


async def test_a_second_signal_while_shutting_down_stops_at_once(tmp_path: Path) -> None:
    # A replica busy with a request it will not finish: the first SIGTERM waits out the grace
    # (60 s here) for it; a second, as a second Ctrl-C, kills it and the ingress worker now.
    held = tmp_path / "held"
    env = {"SHOAL_INGRESS_WORKERS": "2", "SHOAL_SHUTDOWN_GRACE_S": "60"}
    async with ProcessCluster(tmp_path, env=env) as cluster:
        await cluster.deploy(gated("held", held))
        [replica] = await cluster.wait_ready("held", 1)
        sched = cluster.schedulers[0]
        hold(held)
        running = asyncio.create_task(post(f"http://{cluster.http_address()}/v2/models/held/infer"))
        await until(lambda: entered(held), "the request in the model", timeout_s=20)
        started = psutil.Process(sched.pid).children(recursive=True)  # zygote, ingress worker, replica
        assert len(started) >= 3, started

        sched.signal(signal.SIGTERM)
        await until(lambda: "shutting down" in sched.log.read_text(), "the scheduler shutting down")
        await asyncio.sleep(1.0)
        assert sched.alive(), "exited before its grace, with a request in flight"
        signalled = time.monotonic()
        sched.signal(signal.SIGTERM)
        assert await asyncio.to_thread(sched.wait, 10) == 128 + signal.SIGTERM
        assert time.monotonic() - signalled < 5.0
        assert "SIGTERM again while shutting down: stopping now" in sched.log.read_text()

        def left() -> list[psutil.Process]:
            alive = []
            for p in started:
                with contextlib.suppress(psutil.NoSuchProcess):
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(p)
            return alive

        await until(lambda: not left(), "every process it started gone", timeout_s=5)
        assert replica["pid"] in [p.pid for p in started]
        with contextlib.suppress(httpx.HTTPError):
            assert (await running).status_code != 200
        release(held)

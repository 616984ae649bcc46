"""Structured logs with request ids from ingress to replica, and Prometheus metrics."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from shoal.errors import InvalidArgument
from shoal.metrics import STATES
from shoal.rpc.clients import NativeClient
from shoal.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(90)


def json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


async def test_request_id_is_carried_from_ingress_to_replica_in_json_logs(
    tmp_path: Path, examples_dir: Path
) -> None:
    env = {"SHOAL_LOG_FORMAT": "json", "SHOAL_LOG_LEVEL": "DEBUG"}
    async with ProcessCluster(tmp_path, env=env) as cluster:
        await cluster.deploy(
            {
                "name": "echo",
                "backend": "python",
                "model": "echo:Echo",
                "base_dir": str(examples_dir),
                "resources": {"cpus": 0.1},
                "inputs": [{"name": "x", "shape": [-1, 16]}],
            }
        )
        (replica,) = await cluster.wait_ready("echo", 1)
        async with NativeClient(cluster.scheduler_address(), cluster.settings) as client:
            await client.infer("echo", {"x": np.ones((1, 16), np.float32)}, request_id="trace-me-123")
            with pytest.raises(InvalidArgument):
                await client.infer("echo", {"x": np.ones((1, 3), np.float32)}, request_id="bad-input-456")
        scheduler_lines = json_lines(cluster.schedulers[0].log)
        replica_lines = json_lines(cluster.schedulers[0].state / "logs" / f"replica_{replica['id']}.log")
        assert scheduler_lines and replica_lines, "every line is one JSON object"
        assert {"ts", "level", "logger", "msg"} <= set(scheduler_lines[0])
        at_ingress = [x for x in scheduler_lines if x.get("request_id") == "trace-me-123"]
        at_replica = [x for x in replica_lines if x.get("request_id") == "trace-me-123"]
        assert at_ingress and at_replica
        assert at_replica[0]["replica_id"] == replica["id"]
        # Each request has a unique key inside shoal, whatever id the client reuses.
        assert at_replica[0]["request_key"].startswith("trace-me-123~")
        # Invalid input is refused at the scheduler's door, and logged there with the id.
        failed = [x for x in scheduler_lines if x.get("request_id") == "bad-input-456"]
        assert failed and "refused" in failed[0]["msg"] and "expected shape [-1,16]" in failed[0]["msg"]
        assert not [x for x in replica_lines if x.get("request_id") == "bad-input-456"]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text format."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    raise AssertionError(f"no sample {name} {labels} in:\n{text[:3000]}")


async def two_echoes(cluster: ProcessCluster, examples_dir: Path) -> None:
    """Deploy ``echo`` (examples/echo.py), two replicas, and wait for them."""
    await cluster.deploy(
        {
            "name": "echo",
            "backend": "python",
            "model": "echo:Echo",
            "replicas": 2,
            "base_dir": str(examples_dir),
            "resources": {"cpus": 0.25},
            "inputs": [{"name": "x", "shape": [-1, 16]}],
        }
    )
    await cluster.wait_ready("echo", 2)


async def test_metrics_on_head_and_scheduler_after_traffic(tmp_path: Path, examples_dir: Path) -> None:
    async with ProcessCluster(tmp_path) as cluster:
        await two_echoes(cluster, examples_dir)
        async with NativeClient(cluster.scheduler_address(), cluster.settings) as client:
            for _ in range(25):
                await client.infer("echo", {"x": np.ones((1, 16), np.float32)})
            for _ in range(3):
                with pytest.raises(InvalidArgument):
                    await client.infer("echo", {"x": np.ones((1, 2), np.float32)})
        assert cluster.head is not None
        async with httpx.AsyncClient() as http:
            head = (await http.get(f"http://{cluster.head.endpoints['head_http']}/metrics")).text
            sched = (await http.get(f"http://{cluster.http_address()}/metrics")).text
        assert metric(sched, "shoal_requests_total", deployment="echo", outcome="ok") == 25
        assert metric(sched, "shoal_requests_total", deployment="echo", outcome="invalid") == 3
        assert metric(sched, "shoal_request_latency_seconds_count", deployment="echo") == 28
        assert metric(sched, "shoal_request_latency_seconds_bucket", deployment="echo", le="+Inf") == 28
        assert metric(sched, "shoal_request_latency_seconds_sum", deployment="echo") > 0
        assert metric(sched, "shoal_replicas", deployment="echo", state="READY") == 2
        assert metric(sched, "shoal_replica_starts_total", deployment="echo") == 2
        assert metric(sched, "shoal_scheduler_resources", resource="cpus", kind="allocated") == 0.5
        assert metric(head, "shoal_replicas", deployment="echo", state="READY") == 2
        assert metric(head, "shoal_deployment_target_replicas", deployment="echo") == 2
        assert metric(head, "shoal_schedulers", state="ALIVE") == 1

        # Deleted, the deployment leaves every family of the scheduler's text: its starts and
        # deaths stayed, one series each for every deployment ever deleted there.
        await cluster.client.delete("echo")
        gone = 'deployment="echo"'
        deadline = time.monotonic() + 20
        async with httpx.AsyncClient() as http:
            while gone in (sched := (await http.get(f"http://{cluster.http_address()}/metrics")).text):
                lines = [line for line in sched.splitlines() if gone in line]
                assert time.monotonic() < deadline, lines
                await asyncio.sleep(0.2)


async def test_counts_summed_over_replicas_do_not_go_down_when_a_replica_exits(
    tmp_path: Path, examples_dir: Path
) -> None:
    """``shoal_batch_size`` sums the counts the scheduler's replicas report: a replica that
    exited took its counts out of the sum, and the histogram went down (Prometheus's
    ``rate()`` reads a decrease as a restart from 0, a burst that never happened)."""
    async with ProcessCluster(tmp_path) as cluster:
        await two_echoes(cluster, examples_dir)
        served: dict[str, int] = {}
        async with NativeClient(cluster.scheduler_address(), cluster.settings) as client:
            for _ in range(20):
                _, replica_id = await client.infer("echo", {"x": np.ones((1, 16), np.float32)})
                served[replica_id] = served.get(replica_id, 0) + 1

        async def scrape() -> str:
            async with httpx.AsyncClient() as http:
                return (await http.get(f"http://{cluster.http_address()}/metrics")).text

        def replicas(text: str) -> float:
            return sum(metric(text, "shoal_replicas", deployment="echo", state=s) for s in STATES)

        deadline = time.monotonic() + 10
        while metric(await scrape(), "shoal_batch_size_count", deployment="echo") < 20:
            assert time.monotonic() < deadline  # the replicas' pings bring their counts
            await asyncio.sleep(0.1)
        await cluster.client.scale("echo", 1)
        deadline = time.monotonic() + 20
        while replicas(text := await scrape()) != 1:  # one has exited and left the registry
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        # Its calls stay counted: each replica served some of the 20 ({served}).
        assert metric(text, "shoal_batch_size_count", deployment="echo") == 20, served
        assert metric(text, "shoal_batch_size_bucket", deployment="echo", le="1.0") == 20

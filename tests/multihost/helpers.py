"""Helpers shared by the multi-host tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from shoal.chaos import Load, Sample, latency_stats
from shoal.testing.netns import NetCluster

X = np.ones((1, 16), np.float32)


def echo(examples: Path, replicas: int, cpus: float = 0.1, **extra: Any) -> dict[str, Any]:
    return {
        "name": "echo",
        "backend": "python",
        "model": "echo:Echo",
        "base_dir": str(examples),
        "replicas": replicas,
        "resources": {"cpus": cpus},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
        "outputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
        **extra,
    }


def replicas_of(status: dict[str, Any], name: str = "echo") -> list[dict[str, Any]]:
    return next((d["replicas"] for d in status["deployments"] if d["name"] == name), [])


def ready_by_scheduler(status: dict[str, Any], name: str = "echo") -> dict[str, int]:
    out: dict[str, int] = {}
    for r in replicas_of(status, name):
        if r["state"] == "READY":
            out[r["scheduler"]] = out.get(r["scheduler"], 0) + 1
    return out


def scheduler_state(status: dict[str, Any], scheduler_id: str) -> str:
    return next((s["state"] for s in status["schedulers"] if s["id"] == scheduler_id), "ABSENT")


def exactly(count: int, name: str = "echo") -> Callable[[dict[str, Any]], bool]:
    """The deployment has exactly ``count`` replicas, all READY on live schedulers."""

    def ok(status: dict[str, Any]) -> bool:
        alive = {s["id"] for s in status["schedulers"] if s["state"] == "ALIVE"}
        reps = replicas_of(status, name)
        return len(reps) == count and all(r["state"] == "READY" and r["scheduler"] in alive for r in reps)

    return ok


async def events(cluster: NetCluster) -> list[dict[str, Any]]:
    """The head's recent cluster events (schedulers, replicas): ``events`` of ``GET /api/status``
    (``/api/events`` has the deployments' lifecycle events)."""
    async with httpx.AsyncClient(timeout=5) as client:
        reply = await client.get(f"http://{cluster.head_http}/api/status")
        reply.raise_for_status()
        doc = reply.json()
    return list(doc["events"])


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def replica_processes(cluster: NetCluster) -> list[int]:
    """Live replica processes in the schedulers' namespaces (whatever the head believes)."""
    out = []
    for i in range(len(cluster.schedulers)):
        for pid in cluster.scheduler_host(i).pids():
            try:
                if "shoal.replica_main" in psutil.Process(pid).cmdline():
                    out.append(pid)
            except psutil.NoSuchProcess:
                pass
    return out


async def watch(
    cluster: NetCluster, seconds: float, record: Callable[[dict[str, Any]], None], every_s: float = 0.1
) -> None:
    """Poll the head's status for ``seconds``, handing each status to ``record``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            record(await cluster.status())
        except Exception:
            pass
        await asyncio.sleep(every_s)


def window(load: Load, start: float, end: float) -> list[Sample]:
    """Requests of ``load`` sent between two ``time.monotonic()`` instants."""
    return [s for s in load.samples if start <= load.t0 + s.at <= end]


def figure(fault: str, samples: Sequence[Sample], recovery: str, test: str) -> dict[str, Any]:
    """One row of the reliability table from the requests sent while the fault lasted."""
    stats = latency_stats(samples)
    return {
        "fault": fault,
        "requests": stats["requests"],
        "failed": stats["failed"],
        "recovery": recovery,
        "p99_ms": stats["p99_ms"],
        "test": test,
    }


def render_figures(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    out = [
        "| fault | requests | failed | recovery time | p99 during | measured by |",
        "| --- | ---: | ---: | --- | ---: | --- |",
    ]
    for r in rows:
        p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.0f} ms"
        out.append(
            f"| {r['fault']} | {r['requests']} | {r['failed']} | {r['recovery']} | {p99} | `{r['test']}` |"
        )
    return "\n".join(out)

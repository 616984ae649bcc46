"""Figures for the core cluster: replica start time, replacement after kill -9,
and native SendRequest latency for the echo model at concurrency 1 and 16.

    .venv/bin/python bench/core_figures.py [--seconds 10] [--json]

Runs a real head and scheduler (separate processes, port 0, default intervals)
and prints a markdown table. Numbers depend on the machine: compare them with
ones measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from shoal.rpc.clients import NativeClient
from shoal.testing.cluster import FAST, ProcessCluster

ROOT = Path(__file__).resolve().parent.parent


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


async def latency(cluster: ProcessCluster, concurrency: int, seconds: float) -> dict[str, float]:
    x = np.ones((1, 16), dtype=np.float32)
    lat: list[float] = []
    errors = 0
    async with NativeClient(cluster.scheduler_address(), cluster.settings) as client:
        for _ in range(20):  # warm the channel and the replica
            await client.infer("echo", {"x": x})
        stop = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < stop:
                t = time.perf_counter()
                try:
                    await client.infer("echo", {"x": x})
                except Exception:
                    errors += 1
                    continue
                lat.append((time.perf_counter() - t) * 1000)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return {
        "concurrency": concurrency,
        "requests": len(lat),
        "errors": errors,
        "throughput_rps": len(lat) / elapsed,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
    }


async def run(seconds: float) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    with tempfile.TemporaryDirectory() as tmp:
        cluster = ProcessCluster(Path(tmp), env=env)
        # Drop the tests' short intervals: measure with the defaults users get.
        for key in FAST:
            cluster.env.pop(key, None)
        async with cluster:
            spec = {
                "name": "echo",
                "backend": "python",
                "model": "echo:Echo",
                "base_dir": str(ROOT / "examples"),
                "replicas": 2,
                "resources": {"cpus": 0.25},
            }
            await cluster.deploy(spec)
            replicas = await cluster.wait_ready("echo", 2, timeout_s=60)
            log = cluster.schedulers[0].log.read_text()
            starts = [float(m) for m in re.findall(r"is READY at \S+ after ([0-9.]+)s", log)]

            kills = []
            for _ in range(3):
                victim = replicas[0]
                os.kill(victim["pid"], signal.SIGKILL)
                t = time.monotonic()
                replicas = await cluster.wait_ready("echo", 2, timeout_s=60)
                while victim["id"] in {r["id"] for r in replicas}:
                    replicas = await cluster.wait_ready("echo", 2, timeout_s=60)
                kills.append(time.monotonic() - t)
                await asyncio.sleep(1.0)
            log = cluster.schedulers[0].log.read_text()
            starts = [float(m) for m in re.findall(r"is READY at \S+ after ([0-9.]+)s", log)]
            lat = [await latency(cluster, c, seconds) for c in (1, 16)]
    return {
        "replica_start_s": {"median": statistics.median(starts), "max": max(starts), "n": len(starts)},
        "replacement_after_kill9_s": {"median": statistics.median(kills), "max": max(kills), "n": len(kills)},
        "send_request": lat,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of load per concurrency")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = asyncio.run(run(args.seconds))
    if args.json:
        print(json.dumps(out, indent=2))
        return
    s, k = out["replica_start_s"], out["replacement_after_kill9_s"]
    print(
        f"replica start (process start to READY): median {s['median']:.2f}s, max {s['max']:.2f}s (n={s['n']})"
    )
    print(
        f"replacement after kill -9 (kill to READY): median {k['median']:.2f}s, "
        f"max {k['max']:.2f}s (n={k['n']})"
    )
    print("\n| concurrency | requests | errors | req/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|")
    for r in out["send_request"]:
        print(
            f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['throughput_rps']:.0f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()

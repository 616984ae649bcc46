"""How fast autoscaling reacts: time from a load step until the replica count
reaches its target, and a cold start from zero replicas (request sent -> answered).

    .venv/bin/python bench/autoscale.py [--json]

A real head and scheduler (separate processes) with the default intervals; the
deployment uses the spec's default upscale delay (3 s) unless --upscale-delay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from shoal.rpc.clients import NativeClient
from shoal.testing.cluster import FAST, ProcessCluster

ROOT = Path(__file__).resolve().parent.parent


def spec(name: str, **autoscaling: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "python",
        "model": "echo:Echo",
        "options": {"delay_ms": 40},
        "base_dir": str(ROOT / "examples"),
        "resources": {"cpus": 0.1},
        "autoscaling": {"target_ongoing_requests": 2, **autoscaling},
    }


def ready(status: dict[str, Any], name: str) -> int:
    dep = next(d for d in status["deployments"] if d["name"] == name)
    return sum(r["state"] == "READY" for r in dep["replicas"])


async def run(upscale_delay: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = ProcessCluster(Path(tmp))
        for key in FAST:
            cluster.env.pop(key, None)
        async with cluster:
            await cluster.deploy(spec("step", min_replicas=1, max_replicas=4, upscale_delay_s=upscale_delay))
            await cluster.deploy(spec("cold", min_replicas=0, max_replicas=1, downscale_delay_s=2))
            await cluster.wait_ready("step", 1, timeout_s=60)
            x = np.ones((1, 16), np.float32)
            stop = asyncio.Event()

            async def worker(client: NativeClient) -> None:
                while not stop.is_set():
                    await client.infer("step", {"x": x}, timeout_s=60)

            async with NativeClient(cluster.scheduler_address(), cluster.settings) as client:
                step_at = time.monotonic()
                tasks = [asyncio.create_task(worker(client)) for _ in range(8)]  # load 8 / target 2 -> 4
                await cluster.wait_for(lambda s: ready(s, "step") == 4, timeout_s=120, what="4 replicas")
                step_s = time.monotonic() - step_at
                stop.set()
                await asyncio.gather(*tasks)

            def at_zero(s: dict[str, Any]) -> bool:
                dep = next(d for d in s["deployments"] if d["name"] == "cold")
                return dep["replicas"] == [] and dep["target_replicas"] == 0

            await cluster.wait_for(at_zero, timeout_s=120, what="cold at zero")
            t = time.monotonic()
            await cluster.send("cold", {"x": x}, timeout_s=60)
            cold_s = time.monotonic() - t
    return {"load_step_to_target_s": step_s, "upscale_delay_s": upscale_delay, "cold_start_s": cold_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upscale-delay", type=float, default=3.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = asyncio.run(run(args.upscale_delay))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(
            f"load step (1 -> 4 replicas, upscale_delay_s {out['upscale_delay_s']:g}): "
            f"{out['load_step_to_target_s']:.2f}s to 4 READY"
        )
        print(f"cold start from zero (request sent -> answered): {out['cold_start_s']:.2f}s")


if __name__ == "__main__":
    main()

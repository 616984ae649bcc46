"""Model multiplexing: many sklearn model ids over a small pool, routed with affinity or blind.

100 model ids (a RandomForest of 20 trees each, trained on a different bootstrap sample of
scikit-learn's digits), one ``sklearn`` deployment with ``multiplexing:
{max_models_per_replica: 20}`` and 2 replicas, in a real local cluster (head, scheduler and
replica processes, ``shoal.testing.ProcessCluster``). Requests name their model id with the
``shoal-multiplexed-model-id`` header, drawn from a Zipf distribution over the ids (weight
1/rank^s), from ``--concurrency`` closed-loop HTTP clients. Two modes, in turns (A B A B):

- ``affinity``: shoal's router (``multiplex_affinity: true``, the default): an id goes to the
  replica that holds it, new ids spread;
- ``blind``: ``multiplex_affinity: false``: power of two choices on in-flight requests,
  blind to model ids (so each id lands on either replica at random).

Each round starts a fresh cluster, sends ``--warmup`` requests, then measures ``--requests``:
the hit rate from ``/metrics`` (hits / (hits + loads) over the measured requests), evictions,
and client-side latency. Not part of ``make test``. ``--write`` saves the table and how it
was made to ``bench/multiplex.md``, which ``bench/report.py`` puts in ``docs/benchmarks.md``::

    .venv/bin/python bench/multiplex.py [--requests N] [--concurrency C] [--zipf S] [--rounds R] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import joblib
import numpy as np

from shoal.testing.cluster import ProcessCluster

IDS = 100
PER_REPLICA = 20
REPLICAS = 2


def train(folder: Path, seed: int = 0) -> np.ndarray:
    """Write ``IDS`` models as ``folder/customer-NNN.joblib``; returns rows to send."""
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    rng = np.random.default_rng(seed)
    for i in range(IDS):
        sample = rng.integers(0, len(x), len(x))
        model = RandomForestClassifier(n_estimators=20, random_state=i).fit(x[sample], y[sample])
        joblib.dump(model, folder / f"customer-{i:03d}.joblib")
    return x[:256]


def counters(text: str) -> dict[str, float]:
    """Loads, evictions, hits: summed over model ids."""
    out = {}
    for family in ("loads", "evictions", "hits"):
        pattern = rf"^shoal_multiplexed_model_{family}_total\{{[^}}]*\}} (\S+)$"
        out[family] = sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))
    return out


async def drive(
    base: str, rows: np.ndarray, ids: list[str], weights: np.ndarray, n: int, concurrency: int, seed: int
) -> tuple[list[float], float]:
    """``n`` requests from ``concurrency`` clients; returns latencies (s) and the wall time."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(ids), size=n, p=weights)
    bodies = [
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": rows[i % len(rows)].tolist()}
            ]
        }
        for i in range(n)
    ]
    latencies: list[float] = []
    next_i = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:

        async def client() -> None:
            nonlocal next_i
            while next_i < n:
                i = next_i
                next_i += 1
                started = time.perf_counter()
                r = await http.post(
                    "/v2/models/tenants/infer",
                    json=bodies[i],
                    headers={"shoal-multiplexed-model-id": ids[picks[i]]},
                )
                latencies.append(time.perf_counter() - started)
                if r.status_code != 200:
                    raise RuntimeError(f"{r.status_code}: {r.text}")

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started


async def one_round(
    mode: str, models: Path, rows: np.ndarray, args: argparse.Namespace, seed: int
) -> dict[str, float]:
    ranks = np.arange(1, IDS + 1, dtype=np.float64)
    weights = 1 / ranks**args.zipf
    weights /= weights.sum()
    ids = [f"customer-{i:03d}" for i in np.random.default_rng(seed).permutation(IDS)]  # rank -> id
    env = {"SHOAL_MULTIPLEX_AFFINITY": "true" if mode == "affinity" else "false"}
    with tempfile.TemporaryDirectory(prefix="shoal-mux-") as tmp:
        async with ProcessCluster(Path(tmp), env=env) as cluster:
            await cluster.deploy(
                {
                    "name": "tenants",
                    "backend": "sklearn",
                    "model": str(models),
                    "replicas": REPLICAS,
                    "resources": {"cpus": 0.5},
                    "multiplexing": {"max_models_per_replica": PER_REPLICA},
                }
            )
            await cluster.wait_ready("tenants", REPLICAS, timeout_s=60)
            base = f"http://{cluster.http_address()}"
            await drive(base, rows, ids, weights, args.warmup, args.concurrency, seed + 1)
            async with httpx.AsyncClient(base_url=base) as http:
                before = await settled(http)
                latencies, wall = await drive(
                    base, rows, ids, weights, args.requests, args.concurrency, seed + 2
                )
                after = await settled(http)
    loads = after["loads"] - before["loads"]
    hits = after["hits"] - before["hits"]
    q = statistics.quantiles(latencies, n=100)
    return {
        "hit_rate": hits / (hits + loads),
        "loads": loads,
        "evictions": after["evictions"] - before["evictions"],
        "p50_ms": q[49] * 1000,
        "p99_ms": q[98] * 1000,
        "rps": args.requests / wall,
    }


async def settled(http: httpx.AsyncClient) -> dict[str, float]:
    """The counters once they stop moving: the replicas' pings (every 0.2 s in the cluster)
    have reported every request sent so far."""
    last = counters((await http.get("/metrics")).text)
    while True:
        await asyncio.sleep(0.6)
        now = counters((await http.get("/metrics")).text)
        if now == last:
            return now
        last = now


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--zipf", type=float, default=1.0, help="the exponent s: weight 1/rank^s")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="save the table to bench/multiplex.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-mux-models-") as tmp:
        models = Path(tmp)
        t = time.monotonic()
        rows = train(models)
        size = sum(f.stat().st_size for f in models.iterdir()) / IDS / 1024
        print(f"trained {IDS} models in {time.monotonic() - t:.0f}s, {size:.0f} KiB each on average")
        results: dict[str, list[dict[str, float]]] = {"affinity": [], "blind": []}
        for r in range(args.rounds):
            for mode in ("affinity", "blind"):
                res = await one_round(mode, models, rows, args, seed=r * 10)
                results[mode].append(res)
                print(mode, {k: round(v, 3) for k, v in res.items()}, flush=True)
    table = [
        "| routing | hit rate | loads | evictions | p50 ms | p99 ms | req/s | per round: hit rate, p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, runs in results.items():
        med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        each = "; ".join(f"{run['hit_rate']:.1%}, {run['p99_ms']:.0f}" for run in runs)
        table.append(
            f"| {mode} | {med['hit_rate']:.1%} | {med['loads']:.0f} | {med['evictions']:.0f} "
            f"| {med['p50_ms']:.1f} | {med['p99_ms']:.1f} | {med['rps']:.0f} | {each} |"
        )
    command = "bench/multiplex.py " + " ".join(sys.argv[1:])
    page = [
        f"`.venv/bin/python {command}`: {IDS} sklearn model ids "
        f"(RandomForest, 20 trees, {size:.0f} KiB each as joblib), {REPLICAS} replicas with "
        f"`max_models_per_replica: {PER_REPLICA}`, Zipf s = {args.zipf:g} over the ids, "
        f"{args.concurrency} closed-loop HTTP clients, {args.warmup} requests of warm-up then "
        f"{args.requests} measured, {args.rounds} round(s) A B A B, medians. `affinity` is shoal's "
        "router; `blind` is `multiplex_affinity: false` (power of two choices, blind to model ids). "
        f"Machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        *table,
    ]
    print("\n".join(page))
    if args.write:
        (Path(__file__).resolve().parent / "multiplex.md").write_text("\n".join(page) + "\n")


if __name__ == "__main__":
    asyncio.run(main())

"""A light model's latency beside CPU-bound ones, A B A B under environment changes.

    .venv/bin/python bench/neighbour.py --variant off=SHOAL_INGRESS_SCHED_BATCH=false --variant on

Each variant is a ``shoal up`` cluster (all up at once, variants as in ``bench/env_ab.py``)
serving the suite's noop model with batching and ``burn``: two replicas whose every call
spends ``--burn-ms`` of CPU (20 by default), so that on a small machine the replicas keep
the CPUs the ingress processes run on busy. In each round, for each variant in turn (the
order reversed every round), perf_analyzer loads ``burn`` at c=2 in the background while a
second perf_analyzer measures noop at c=1: its requests a second, p50 and p99. What it
shows is the cost of a scheduling choice to the latency of requests that share CPUs with
busy replicas; ``env_ab.py`` shows what it buys under load. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import env_ab  # noqa: E402 - bench/ is not a package

BURN = '''"""Spends a fixed amount of CPU a call: a stand-in for a CPU-bound model."""
import time


class Burn:
    def __init__(self, ms: float) -> None:
        self.seconds = ms / 1000

    def predict(self, inputs):
        end = time.thread_time() + self.seconds
        while time.thread_time() < end:
            pass
        return dict(inputs)
'''


def deploy(burn_ms: float) -> str:
    burn = (
        "name: burn\nbackend: python\nmodel: 'burn:Burn'\n"
        f"options: {{ms: {burn_ms}}}\n"
        "inputs: [{name: x, datatype: FP32, shape: [-1, 16]}]\n"
        "outputs: [{name: x, datatype: FP32, shape: [-1, 16]}]\n"
        "replicas: 2\nresources: {cpus: 0.25}\n"
    )
    return env_ab.spec("noop") + "---\n" + burn


def noop_c1(url: str) -> tuple[float, float, float]:
    """perf_analyzer noop c=1 over gRPC: (requests a second, p50 ms, p99 ms)."""
    argv = [str(env_ab.PERF_ANALYZER), "-m", "noop", "-u", url, "-i", "grpc", "--shape", "x:1,16"]
    argv += ["--concurrency-range", "1", "-p", "4000", "-s", "1000", "-r", "3", "--percentile", "99"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120).stdout
    rate = [line for line in out.splitlines() if "Throughput:" in line]
    lat = {
        k: float(line.split(":")[1].split()[0]) / 1000
        for line in out.splitlines()
        for k in ("p50", "p99")
        if f"{k} latency:" in line
    }
    if not rate or len(lat) < 2:
        raise SystemExit(f"perf_analyzer gave no figures:\n{out[-2000:]}")
    return float(rate[-1].split("Throughput:")[1].split()[0]), lat["p50"], lat["p99"]


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--variant", type=env_ab.parse_variant, action="append", required=True)
    args.add_argument("--rounds", type=int, default=6)
    args.add_argument("--burn-ms", type=float, default=20.0)
    opts = args.parse_args()
    names = [name for name, _ in opts.variant]
    if len(names) < 2 or len(set(names)) != len(names):
        args.error("give at least two --variant, with different names (the first is the reference)")
    if opts.rounds < 1 or opts.burn_ms <= 0:
        args.error("--rounds must be at least 1 and --burn-ms above 0")
    if not env_ab.PERF_ANALYZER.exists():
        raise SystemExit("no perf_analyzer: run .venv/bin/python bench/peers.py perf-analyzer")
    clusters: dict[str, env_ab.Cluster] = {}
    try:
        for name, env in opts.variant:
            clusters[name] = env_ab.Cluster(
                env, 2, "noop", extra_files={"burn.py": BURN}, deploy=deploy(opts.burn_ms)
            )
        got: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}
        for index in range(opts.rounds):
            for name in names if index % 2 == 0 else names[::-1]:
                url = clusters[name].url
                burn = [str(env_ab.PERF_ANALYZER), "-m", "burn", "-u", url, "-i", "grpc"]
                burn += ["--shape", "x:1,16", "--concurrency-range", "2", "-p", "60000", "-r", "1"]
                background = subprocess.Popen(burn, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    time.sleep(1.5)  # the burn replicas busy first
                    rate, p50, p99 = noop_c1(url)
                finally:
                    background.kill()
                    background.wait()
                got[name].append((rate, p50, p99))
                print(f"round {index} {name:>10} {rate:7.0f} req/s  p50 {p50:5.2f} ms  p99 {p99:5.2f} ms")
        for name in names:
            rates, p50s, p99s = zip(*got[name], strict=True)
            print(
                f"{name:>10}: median {statistics.median(rates):.0f} req/s, "
                f"p50 {statistics.median(p50s):.2f} ms, p99 {statistics.median(p99s):.2f} ms "
                f"(p99 {min(p99s):.2f}-{max(p99s):.2f})"
            )
    finally:
        for cluster in clusters.values():
            cluster.stop()


if __name__ == "__main__":
    main()

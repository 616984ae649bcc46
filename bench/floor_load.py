"""What one grpc.aio call costs at different loads: the gRPC floor's CPU per request at
perf_analyzer noop concurrency 32 (its one process saturated) and at fixed request rates
(``--request-rate-range``), in turn.

Why: each of a scheduler's two ingress processes serves about half of what the floor
serves alone, and grpc.aio's per-call CPU is not fixed: with fewer calls per wake-up of
its poller thread and event loop, each call pays more of the wake-ups. This measures how
much, on the floor itself, so that shoal's ingress CPU per request (``bench/cpu_profile.py``)
can be read against the floor at the same load, not only at saturation. Not part of
``make test``; needs perf_analyzer (``bench/peers.py perf-analyzer``)::

    .venv/bin/python bench/floor_load.py [--rates 1500,800] [--rounds 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import systems  # noqa: E402
import tools  # noqa: E402


def measure(address: str, floor: psutil.Process, load: list[str]) -> tuple[float, float, float]:
    """Requests a second, the floor's CPU µs a request and the cores it used, over one
    perf_analyzer run with ``load`` (three 3 s windows)."""
    argv = [str(tools.PERF_ANALYZER), "-m", "noop", "-u", address, "-i", "grpc", "--shape", "x:1,16"]
    argv += [*load, "-p", "3000", "-s", "1000", "-r", "3"]
    cpu0, began = sum(floor.cpu_times()[:2]), time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    wall, cpu = time.monotonic() - began, sum(floor.cpu_times()[:2]) - cpu0
    lines = [line for line in out.stdout.splitlines() if "Throughput:" in line]
    if not lines:
        raise SystemExit(f"perf_analyzer gave no throughput:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    rate = float(lines[-1].split("Throughput:")[1].split()[0])
    # Per request over the whole run (perf_analyzer's warm-up included on both sides).
    return rate, cpu / (rate * wall) * 1e6, cpu / wall


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("--rates", default="1500,800", help="request rates, comma-separated")
    args.add_argument("--rounds", type=int, default=2)
    ns = args.parse_args()
    loads = [("c=32", ["--concurrency-range", "32"])]
    loads += [(f"{r}/s", ["--request-rate-range", r]) for r in ns.rates.split(",") if r]
    with tempfile.TemporaryDirectory(prefix="shoal-floor-load-") as work:
        floor = systems.SYSTEMS["floor-grpc"].start(Path(work), only_noop=True)
        try:
            proc = psutil.Process(floor.pids()[0])
            print("| round | load | requests/s | floor CPU µs a request | cores |")
            print("|---|---|---|---|---|")
            for i in range(ns.rounds):
                for name, load in loads:
                    rate, us, cores = measure(floor.grpc, proc, load)
                    print(f"| {i + 1} | {name} | {rate:,.0f} | {us:.0f} | {cores:.2f} |", flush=True)
        finally:
            systems.stop(floor)


if __name__ == "__main__":
    main()

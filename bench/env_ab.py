"""shoal under an environment change, A B A B: is a lever worth keeping?

Starts one ``shoal up`` cluster per variant, all up at once: one of the suite's models
(``--workload``: noop, the default, or sklearn) with batching, as ``bench/run`` serves it,
and two ingress processes. Loads them in turn with perf_analyzer over gRPC (or
``--protocol http``), the order reversed every round, so each pair of points is seconds
apart. Prints each variant's requests a second and p50 per round, then the median of its
per-round ratios to the first variant. A variant is a set of environment variables
for the whole cluster (every ``SHOAL_*`` setting, gRPC's ``GRPC_EXPERIMENTS``, ...). Not
part of ``make test``::

    .venv/bin/python bench/env_ab.py --variant default= \
        --variant pollset=GRPC_EXPERIMENTS=pollset_alternative
    .venv/bin/python bench/env_ab.py --variant two= --variant one=SHOAL_INGRESS_WORKERS=1 -c 1

A variant is ``NAME`` (no change) or ``NAME=VAR=VALUE[,VAR=VALUE...]``; two variants with
no change (an A A run) show the noise. Needs perf_analyzer (``bench/peers.py
perf-analyzer``). The clusters share the machine's CPUs while idle; the one being loaded
has them to itself but for the others' background work (a few ms a second).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import systems  # noqa: E402 - bench/ is not a package

ROOT = BENCH.parent
PERF_ANALYZER = BENCH / ".peers" / "perf-analyzer" / "perf_analyzer"
READY = "all deployments ready"
# The suite's models with batching, as bench/run serves them: workload -> perf_analyzer's --shape.
SHAPES = {"noop": "x:1,16", "sklearn": "input:1,64"}


def spec(workload: str) -> str:
    return (
        systems.SHOAL_SPECS[workload].format(name=workload)
        + "replicas: 1\nresources: {cpus: 0.25}\n"
        + systems.SHOAL_BATCHING
    )


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``NAME=VAR=VALUE,VAR=VALUE`` -> (NAME, {VAR: VALUE}); ``NAME=`` -> (NAME, {}). An item
    with no ``=`` continues the value before it, so that a list keeps its commas:
    ``x=GRPC_EXPERIMENTS=a,b,SHOAL_X=1`` -> {GRPC_EXPERIMENTS: "a,b", SHOAL_X: "1"}."""
    name, _, rest = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected NAME or NAME=VAR=VALUE[,VAR=VALUE]")
    env: dict[str, str] = {}
    last = ""
    for item in filter(None, rest.split(",")):
        var, eq, value = item.partition("=")
        if not eq and last:
            env[last] += "," + item
            continue
        if not eq or not var:
            raise argparse.ArgumentTypeError(f"variant {text!r}: {item!r} is not VAR=VALUE")
        env[var] = value
        last = var
    return name, env


class Cluster:
    """``shoal up`` in a folder of its own with ``env`` added to this process's environment."""

    def __init__(self, env: dict[str, str], workers: int, workload: str, protocol: str) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="shoal-env-ab-"))
        shutil.copy(ROOT / "examples" / "echo.py", self.work / "echo.py")
        if workload == "sklearn":
            systems.digits_model(sys.executable, self.work)
        (self.work / "deploy.yaml").write_text(spec(workload))
        full = {**os.environ, "PYTHONPATH": str(ROOT), "SHOAL_INGRESS_WORKERS": str(workers), **env}
        full.pop("SHOAL_HEAD", None)
        state = self.work / "state"
        argv = [sys.executable, "-m", "shoal.cli", "up", "--state", str(state), "--deploy", "deploy.yaml"]
        argv += ["--head-port", "0", "--dashboard-port", "0", "--grpc-port", "0", "--http-port", "0"]
        # A session of its own, as bench/run starts every server: with the kernel's autogroups
        # (sched_autogroup_enabled) that is also a scheduling group of its own, apart from
        # perf_analyzer's. In perf_analyzer's group, SCHED_BATCH ingress threads served 1.28x;
        # in their own, 0.96x (docs/architecture.md).
        self.proc = subprocess.Popen(
            argv,
            cwd=self.work,
            env=full,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        seen = []
        for line in self.proc.stdout:
            seen.append(line)
            if READY in line:
                break
        else:
            raise SystemExit("shoal up exited before its deployment was ready:\n" + "".join(seen[-20:]))
        # Keep its pipe drained, or a chatty cluster blocks on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        endpoints = json.loads((state / "endpoints.json").read_text())
        self.url = endpoints["scheduler" if protocol == "grpc" else "scheduler_http"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.work, ignore_errors=True)


def load(url: str, concurrency: int, workload: str, protocol: str) -> tuple[float, float]:
    """perf_analyzer over ``protocol``: (requests a second, p50 ms), three 1 s windows."""
    argv = [str(PERF_ANALYZER), "-m", workload, "-u", url, "-i", protocol, "--shape", SHAPES[workload]]
    argv += ["--concurrency-range", str(concurrency), "-p", "3000", "-s", "1000", "-r", "3"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120).stdout
    rate = [line for line in out.splitlines() if "Throughput:" in line]
    p50 = [line for line in out.splitlines() if "p50 latency:" in line]
    if not rate or not p50:
        raise SystemExit(f"perf_analyzer gave no figures:\n{out[-2000:]}")
    return float(rate[-1].split("Throughput:")[1].split()[0]), float(p50[-1].split(":")[1].split()[0]) / 1000


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument(
        "--variant", type=parse_variant, action="append", required=True, help="NAME=VAR=VALUE,..."
    )
    args.add_argument("--rounds", type=int, default=6)
    args.add_argument("-c", "--concurrency", type=int, default=32)
    args.add_argument("--ingress-workers", type=int, default=2)
    args.add_argument("--workload", choices=sorted(SHAPES), default="noop")
    args.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    opts = args.parse_args()
    if len(opts.variant) < 2:
        args.error("give at least two --variant (the first is the reference)")
    names = [name for name, _ in opts.variant]
    if len(set(names)) != len(names):
        args.error(f"variant names must differ (each names a cluster): {', '.join(names)}")
    if opts.rounds < 1 or opts.concurrency < 1:
        args.error("--rounds and --concurrency must be at least 1")
    if not PERF_ANALYZER.exists():
        raise SystemExit("no perf_analyzer: run .venv/bin/python bench/peers.py perf-analyzer")
    clusters: dict[str, Cluster] = {}
    try:
        for name, env in opts.variant:
            clusters[name] = Cluster(env, opts.ingress_workers, opts.workload, opts.protocol)
        for cluster in clusters.values():
            load(cluster.url, opts.concurrency, opts.workload, opts.protocol)  # warm up
        rates: dict[str, list[float]] = {name: [] for name in clusters}
        for index in range(opts.rounds):
            for name in names if index % 2 == 0 else names[::-1]:
                rate, p50 = load(clusters[name].url, opts.concurrency, opts.workload, opts.protocol)
                rates[name].append(rate)
                print(f"round {index} {name:>12} {rate:8.0f} req/s  p50 {p50:6.2f} ms", flush=True)
        for name in names:
            ratios = [a / b for a, b in zip(rates[name], rates[names[0]], strict=True)]
            spread = ", ".join(f"{r:.3f}" for r in ratios)
            print(f"{name:>12}: median {statistics.median(ratios):.3f}x {names[0]} ({spread})")
    finally:
        for cluster in clusters.values():
            cluster.stop()


if __name__ == "__main__":
    main()

"""Where a request's CPU goes in each of shoal's processes: py-spy under perf_analyzer load.

Starts ``shoal up`` with the noop model (batching 32 / 1 ms, one replica, one ingress
process), loads it with perf_analyzer over gRPC at concurrency 32, records the scheduler
and the replica with py-spy for a few seconds each, and sorts the samples by the part of
shoal they fell in (the innermost shoal frame of each stack; "library" when none: gRPC
and the event loop). Results go to ``bench/results/profile-LABEL.json``; every saved
label is rendered side by side in ``bench/profile.md``, which ``docs/benchmarks.md``
includes. py-spy samples without stopping the process (``--nonblocking``): stopped for a
sample in the middle of a model call, the replica took the call for one that blocked
and sent its model's calls to the model thread (``shoal.backends.base.INLINE_STRIKES``),
so the profile showed a path the unprofiled replica does not take. Not part of
``make test``::

    .venv/bin/python bench/cpu_profile.py --label after
    git worktree add /tmp/before OLD
    .venv/bin/python bench/cpu_profile.py --label before --source /tmp/before

Needs perf_analyzer (``bench/peers.py perf-analyzer``) and py-spy (``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import systems  # noqa: E402 - bench/ is not a package
import tools  # noqa: E402

ROOT = BENCH.parent
RESULTS = BENCH / "results"
PERF_ANALYZER = BENCH / ".peers" / "perf-analyzer" / "perf_analyzer"
ROUNDS = 2  # of the floor and shoal in turn, for CPU per request
SPEC = """name: noop
backend: python
model: 'echo:Echo'
inputs: [{name: x, datatype: FP32, shape: [-1, 16]}]
outputs: [{name: x, datatype: FP32, shape: [-1, 16]}]
replicas: 1
resources: {cpus: 0.25}
batching: {max_batch_size: 32, max_delay_ms: 1}
"""
# The part of shoal a sample is in: the innermost frame from one of these files.
PARTS = [
    ("tensor decode/encode", ("shoal/core/tensors.py", "shoal/rpc/codec.py", "numpy/")),
    (
        "checks and accounting",
        (
            "shoal/core/payload.py",
            "shoal/scheduler/dataplane.py",
            "shoal/scheduler/models.py",
            "shoal/core/limits.py",
            "shoal/core/stats.py",
        ),
    ),
    ("routing", ("shoal/scheduler/router.py", "shoal/scheduler/handle.py", "shoal/core/routing.py")),
    ("replica stream, scheduler side", ("shoal/rpc/task_stream.py", "shoal/rpc/clients.py")),
    ("local hop framing (both sides)", ("shoal/rpc/hop.py",)),
    (
        "ingress adapter",
        ("shoal/rpc/inference_service.py", "shoal/rpc/scheduler_service.py", "shoal/rpc/auth.py"),
    ),
    ("head", ("shoal/head/", "shoal/core/cluster.py", "shoal/store/")),
    ("batcher", ("shoal/replica/batcher.py",)),
    ("model (backend)", ("shoal/backends/",)),
    ("replica adapter", ("shoal/rpc/replica_service.py", "shoal/replica/process.py")),
]
LIBRARY = "gRPC and the event loop (library code)"


def part(stack: list[str]) -> str:
    for frame in reversed(stack):
        for name, files in PARTS:
            if any(f in frame for f in files):
                return name
    return LIBRARY


def shares(raw: Path) -> dict[str, float]:
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if n.isdigit():
            counts[part(stack.split(";"))] += int(n)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in counts.items()}


# py-spy beside this Python (the project's .venv) when it is not on PATH.
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


def cpu_per_request(
    address: str, procs: dict[str, psutil.Process], shape: str | None
) -> tuple[dict[str, float], float]:
    """Each process's CPU microseconds per request over one perf_analyzer run (noop gRPC
    c=32), and the run's requests a second."""
    before = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
    pids = [p.pid for p in procs.values()]
    point = tools.perf_analyzer(address, "noop", "grpc", 32, lambda: pids, shape=shape)
    after = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
    served = max(point.throughput * point.seconds, 1.0)
    return {k: (after[k] - before[k]) / served * 1e6 for k in procs}, point.throughput


def profile(source: Path, seconds: float) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="shoal-profile-"))
    shutil.copy(ROOT / "examples" / "echo.py", work / "echo.py")
    (work / "deploy.yaml").write_text(SPEC)
    env = {**os.environ, "PYTHONPATH": str(source), "SHOAL_INGRESS_WORKERS": "1", "SHOAL_HEAD": ""}
    state = work / "state"
    argv = [sys.executable, "-m", "shoal.cli", "up", "--state", str(state), "--head-port", "0"]
    argv += ["--dashboard-port", "0", "--grpc-port", "0", "--http-port", "0", "--deploy", "deploy.yaml"]
    up = subprocess.Popen(
        argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert up.stdout is not None
        deadline = time.monotonic() + 90
        for line in up.stdout:
            if "all deployments ready" in line:
                break
            if time.monotonic() > deadline:
                raise SystemExit("shoal did not come up")
        grpc = json.loads((state / "endpoints.json").read_text())["scheduler"]
        replica = next(
            p.pid
            for p in psutil.Process(up.pid).children(recursive=True)
            if "shoal.replica" in " ".join(p.cmdline())
        )
        out: dict[str, object] = {"sampling": "nonblocking"}
        # CPU per request first, with nothing attached: psutil over perf_analyzer runs, A B A B
        # against the gRPC floor (one grpc.aio process answering noop: what the gRPC part of
        # a request costs at least), both up the whole time.
        procs = {"scheduler": psutil.Process(up.pid), "replica": psutil.Process(replica)}
        floor = systems.SYSTEMS["floor-grpc"].start(work / "floor", only_noop=True)
        floor_runs, shoal_runs = [], []
        try:
            floor_procs = {"floor": psutil.Process(floor.pids()[0])}
            for _ in range(ROUNDS):
                floor_runs.append(cpu_per_request(floor.grpc, floor_procs, None))
                shoal_runs.append(cpu_per_request(grpc, procs, "x:1,16"))
        finally:
            systems.stop(floor)
        out["cpu_us"] = {k: round(statistics.median(r[0][k] for r in shoal_runs)) for k in procs}
        out["throughput"] = round(statistics.median(r[1] for r in shoal_runs))
        out["floor_cpu_us"] = round(statistics.median(r[0]["floor"] for r in floor_runs))
        out["floor_throughput"] = round(statistics.median(r[1] for r in floor_runs))
        load = [str(PERF_ANALYZER), "-m", "noop", "-u", grpc, "-i", "grpc", "--shape", "x:1,16"]
        load += [
            "--concurrency-range",
            "32",
            "-p",
            str(int((2 * seconds + 4) * 1000)),
            "-s",
            "1000",
            "-r",
            "2",
        ]
        loader = subprocess.Popen(load, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(2)
        for name, pid in (("scheduler", up.pid), ("replica", replica)):
            raw = work / f"{name}.txt"
            spy = [PY_SPY, "record", "--nonblocking", "-d", str(int(seconds)), "-r", "200"]
            spy += ["--format", "raw"]
            subprocess.run([*spy, "-p", str(pid), "-o", str(raw)], check=True, capture_output=True)
            out[name] = shares(raw)
        loader.communicate(timeout=120)
        return out
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def _cpu_cells(run: dict[str, Any]) -> dict[str, str]:
    """One run's column of the CPU-per-request table."""
    cpu: dict[str, int] = run["cpu_us"]
    shoal = sum(cpu.values())
    floor = run.get("floor_cpu_us")
    return {
        "scheduler": str(cpu.get("scheduler", "?")),
        "replica": str(cpu.get("replica", "?")),
        "shoal, both": str(shoal),
        "the floor": str(floor) if floor else "-",
        "shoal / the floor": f"{shoal / floor:.2f}x" if floor else "-",
        "requests/s, shoal": f"{run['throughput']:,}",
        "requests/s, the floor": f"{run['floor_throughput']:,}" if "floor_throughput" in run else "-",
    }


def render() -> str:
    runs = {
        p.stem.removeprefix("profile-"): json.loads(p.read_text())
        for p in sorted(RESULTS.glob("profile-*.json"))
    }
    labels = sorted(runs, key=lambda k: (k != "before", k))
    lines = [
        "Share of each process's CPU samples (py-spy, 200 Hz, 5 s, under perf_analyzer noop gRPC c=32,",
        "batching 32 / 1 ms, one ingress process), by the innermost shoal frame of each sample",
        "(`bench/cpu_profile.py`):",
        "",
    ]
    for proc in ("scheduler", "replica"):
        parts = sorted(
            {k for r in runs.values() for k in r.get(proc, {})},
            key=lambda k: -runs[labels[-1]].get(proc, {}).get(k, 0),
        )
        lines.append(
            f"| {proc} | " + " | ".join(f"{lb} ({runs[lb].get('commit', '?')})" for lb in labels) + " |"
        )
        lines.append("|---|" + "---|" * len(labels))
        for k in parts:
            cells = " | ".join(f"{100 * runs[lb].get(proc, {}).get(k, 0):.0f}%" for lb in labels)
            lines.append(f"| {k} | {cells} |")
        lines.append("")
    measured = [lb for lb in labels if "cpu_us" in runs[lb]]
    if measured:
        lines.append(
            "CPU per request (psutil over perf_analyzer noop gRPC c=32 runs, nothing attached), "
            "microseconds, and the requests a second of those runs; where the floor is given, "
            "the median of two rounds, each after a round of the gRPC floor "
            "(`bench/floors/grpc_echo.py`, one grpc.aio process: what the gRPC part of a request "
            'costs at least; "-": not measured in that run):'
        )
        lines.append("")
        lines.append(
            "| process | " + " | ".join(f"{lb} ({runs[lb].get('commit', '?')})" for lb in measured) + " |"
        )
        lines.append("|---|" + "---|" * len(measured))
        columns = [_cpu_cells(runs[lb]) for lb in measured]
        for label in columns[0]:
            lines.append(f"| {label} | " + " | ".join(c[label] for c in columns) + " |")
        lines.append("")
    latest = runs[labels[-1]]
    own = {proc: 1 - latest.get(proc, {}).get(LIBRARY, 0) for proc in ("scheduler", "replica")}
    lines.append(
        f"In the latest run ({labels[-1]}), shoal's own code is {100 * own['scheduler']:.0f}% of the "
        f"scheduler's samples and {100 * own['replica']:.0f}% of the replica's; the rest is library "
        "code: gRPC's per-call work and its poller thread, the event loop, the model thread. These "
        "are shares of each process's samples, not costs per request: `docs/architecture.md` gives "
        "the CPU per request before and after the local hop."
    )
    stopped = [lb for lb in labels if runs[lb].get("sampling") != "nonblocking"]
    if stopped:
        lines.append("")
        lines.append(
            f"Sampled with py-spy stopping the process ({', '.join(stopped)}): a replica stopped "
            "that way in the middle of a model call takes it for a call that blocked and sends its "
            "model's calls to the model thread (seen in its log), so those replica columns likely "
            "show the thread hop, a path the unprofiled replica does not take."
        )
    return "\n".join(lines)


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--label", default="after")
    args.add_argument("--source", type=Path, default=ROOT, help="the checkout to profile (default: this one)")
    args.add_argument("--seconds", type=float, default=5.0)
    ns = args.parse_args()
    result = profile(ns.source.resolve(), ns.seconds)
    commit = subprocess.run(
        ["git", "-C", str(ns.source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    result["commit"] = commit.stdout.strip()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"profile-{ns.label}.json").write_text(json.dumps(result, indent=2))
    (BENCH / "profile.md").write_text(render() + "\n")
    print(render())


if __name__ == "__main__":
    main()

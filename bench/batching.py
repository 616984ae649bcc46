"""Dynamic batching off vs on in shoal, for a model whose cost per call is fixed.

    .venv/bin/python bench/batching.py                      # native protocol, shoal bench
    .venv/bin/python bench/batching.py --tool perf_analyzer  # OIP gRPC, once the ingress exists

One ``shoal up`` serves two deployments of the echo example with ``delay_ms`` (a sleep per
model call, whatever the batch size: the case batching exists for): ``fixed`` without
batching and ``fixed_batch`` with ``max_batch_size`` 32. Both are loaded at the same
concurrency, alternately (A B A B), in the same run; the throughput ratio is printed, and
the run is saved to ``bench/results/batching-<time>.json``. With a 5 ms call and 32 callers
the ideal ratio is 32 (the batch fills); what is lost on the way is batching overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
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

import psutil
import tools

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

SPEC = """name: {name}
backend: python
model: 'echo:Echo'
options: {{delay_ms: {delay}}}
replicas: 1
resources: {{cpus: 0.25}}
max_ongoing_requests: 256
inputs: [{{name: x, datatype: FP32, shape: [-1, 16]}}]
outputs: [{{name: x, datatype: FP32, shape: [-1, 16]}}]
"""


def start(
    work: Path, delay_ms: float, batch: int, max_delay_ms: float
) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    shutil.copy(ROOT / "examples" / "echo.py", work / "echo.py")
    batching = f"batching: {{max_batch_size: {batch}, max_delay_ms: {max_delay_ms}}}\n"
    (work / "deploy.yaml").write_text(
        SPEC.format(name="fixed", delay=delay_ms)
        + "---\n"
        + SPEC.format(name="fixed_batch", delay=delay_ms)
        + batching
    )
    log = open(work / "up.log", "wb")
    argv = [sys.executable, "-m", "shoal.cli", "up", "--state", str(work / "state")]
    argv += ["--head-port", "0", "--dashboard-port", "0", "--grpc-port", "0", "--http-port", "0"]
    argv += ["--deploy", str(work / "deploy.yaml")]
    proc = subprocess.Popen(
        argv,
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "SHOAL_HEAD": ""},
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"shoal up exited: {(work / 'up.log').read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("shoal up not ready after 120 s")
        if (work / "state" / "endpoints.json").exists() and "shoal is up" in (work / "up.log").read_text():
            endpoints = json.loads((work / "state" / "endpoints.json").read_text())
            if ready(endpoints["head"]):
                return proc, endpoints
        time.sleep(0.25)


def ready(head: str) -> bool:
    from shoal.config import Settings
    from shoal.rpc.clients import ControlClient

    async def go() -> bool:
        client = ControlClient(head, Settings.load(file=None, flags={"head_address": head}))
        try:
            deps = (await client.status()).to_json()["deployments"]
        finally:
            await client.close()
        return len(deps) == 2 and all(any(r["state"] == "READY" for r in d["replicas"]) for d in deps)

    return asyncio.run(go())


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tool", choices=["shoal-bench", "perf_analyzer"], default="shoal-bench")
    p.add_argument("--protocol", choices=["native", "grpc", "http"], default="native", help="for shoal bench")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--delay-ms", type=float, default=5.0, help="the fixed cost of one model call")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="shoal-batching-"))
    proc, endpoints = start(work, args.delay_ms, args.max_batch_size, args.max_delay_ms)
    rows: list[dict[str, object]] = []

    def pids() -> list[int]:
        try:
            return [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        except psutil.Error:
            return []

    input_file = work / "x.json"
    input_file.write_text(json.dumps({"x": [[0.5] * 16]}))
    try:
        for rnd in range(1, args.repeat + 1):
            for model in ("fixed", "fixed_batch"):
                if args.tool == "perf_analyzer":
                    point = tools.perf_analyzer(
                        endpoints["scheduler"], model, "grpc", args.concurrency, pids, shape="x:1,16"
                    )
                else:
                    address = endpoints["scheduler_http" if args.protocol == "http" else "scheduler"]
                    point = tools.shoal_bench(
                        address,
                        model,
                        args.protocol,
                        args.concurrency,
                        pids,
                        input_file=input_file,
                        duration_s=args.duration,
                    )
                rows.append({"round": rnd, "model": model, **point.as_dict()})
                status = (
                    point.failed[:200]
                    if point.failed
                    else f"{point.throughput:,.1f} req/s p50 {point.p50_ms} ms"
                )
                print(f"round {rnd} {model:<12} {status}", flush=True)
    finally:
        stop(proc)
        shutil.rmtree(work, ignore_errors=True)

    ratios = []
    for rnd in range(1, args.repeat + 1):
        off = next((r for r in rows if r["round"] == rnd and r["model"] == "fixed"), None)
        on = next((r for r in rows if r["round"] == rnd and r["model"] == "fixed_batch"), None)
        if off and on and off["throughput"] and on["throughput"]:
            ratios.append(float(on["throughput"]) / float(off["throughput"]))  # type: ignore[arg-type]
    ideal = min(args.concurrency, args.max_batch_size)
    result = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": vars(args),
        "points": rows,
        "ratios": ratios,
        "ratio_median": statistics.median(ratios) if ratios else None,
        "ideal_ratio": ideal,
    }
    out = BENCH / "results" / f"batching-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if ratios:
        print(
            f"batching on/off throughput ratio: {statistics.median(ratios):.2f}x (per round: "
            f"{', '.join(f'{r:.2f}' for r in ratios)}; ideal {ideal}x for a {args.delay_ms:g} ms call, "
            f"concurrency {args.concurrency}) -> {out.relative_to(ROOT)}"
        )
        return 0
    print("no ratio: a measurement failed", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

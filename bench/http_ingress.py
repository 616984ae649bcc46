"""The HTTP data plane's CPU per request: shoal's ingress against the bare Starlette floor.

    git worktree add /tmp/before OLD
    .venv/bin/python bench/http_ingress.py --before /tmp/before [--rounds 2] [--duration 5]

wrk c=32 (one thread, keep-alive, the V2 JSON bodies of ``bench/tools.py``) against the floor
(``bench/floors/starlette_json.py`` under uvicorn with h11, and again with httptools) and
shoal from ``--before`` and from ``--after`` (default: this checkout), in turns, A B A B:
``noop`` and ``sklearn_batch`` (one replica each, two ingress processes on 2 CPUs).
For each it prints requests a second and the CPU microseconds per request of each kind of
process (psutil user + system over the run, divided by the requests wrk counted): ``ingress``
is shoal's main process (head and scheduler in ``shoal up``) plus its ingress workers;
``wrk`` is the load tool's own, which shares the CPUs. On a
shared machine the CPU per request is the steadier figure; the ratios to the floor measured in
the same round come last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import systems, tools

FLOORS = ("floor-h11", "floor-httptools")


def kind(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "gone"
    if "replica_main" in cmd:
        return "replica"
    if "ingress_worker" in cmd or "shoal.cli" in cmd:
        return "ingress"
    return "floor" if "uvicorn" in cmd else "other"


def cpu(pids: list[int]) -> dict[tuple[int, str], float]:
    out = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            t = p.cpu_times()
            out[(pid, kind(p))] = t.user + t.system
        except psutil.Error:
            pass
    return out


class Floor:
    """The Starlette floor under uvicorn with the given parser."""

    def __init__(self, http: str, work: Path) -> None:
        self.port = systems.free_port()
        model = systems.digits_model(systems.PROJECT_PYTHON, work)
        code = (
            f"import sys; sys.path.insert(0, {str(systems.BENCH / 'floors')!r}); import joblib, uvicorn, "
            f"starlette_json; uvicorn.run(starlette_json.app(joblib.load({str(model)!r})), port={self.port}, "
            f"http={http!r}, log_level='warning', access_log=False)"
        )
        self.proc = subprocess.Popen([systems.PROJECT_PYTHON, "-c", code])
        while not systems.http_ok(f"http://127.0.0.1:{self.port}/v2/health/live"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {http} floor exited with {self.proc.returncode}")
            time.sleep(0.2)
        self.http = f"127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def measure(
    url: str, body: bytes, pids: Callable[[], list[int]], seconds: float
) -> tuple[tools.Point, dict[str, int]]:
    before = cpu(pids())
    point = tools.wrk(url, body, 32, pids, duration_s=seconds)
    after = cpu(pids())
    per: dict[str, float] = {}
    for key, value in after.items():
        per[key[1]] = per.get(key[1], 0.0) + value - before.get(key, 0.0)
    n = max(point.requests, 1)
    per["wrk"] = point.tool_cpu * point.seconds  # wrk's own CPU, about: it shares the CPUs
    return point, {k: round(v / n * 1e6) for k, v in sorted(per.items()) if k != "other"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the checkout measured as before")
    parser.add_argument("--after", type=Path, default=systems.ROOT, help="default: this checkout")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of wrk per point")
    ns = parser.parse_args()
    sources = {"shoal-before": ns.before.resolve(), "shoal-after": ns.after.resolve()}
    workloads = tools.workloads()
    work = Path(tempfile.mkdtemp(prefix="http-ingress-"))
    rows: list[dict[str, Any]] = []
    for round_ in range(ns.rounds):
        for sid in (*FLOORS, *sources):
            run: Floor | systems.Running
            if sid in FLOORS:
                run = Floor(sid.removeprefix("floor-"), work)
            else:
                os.environ["PYTHONPATH"] = str(sources[sid])
                try:
                    run = systems.SYSTEMS["shoal"].start(work / sid)
                finally:
                    del os.environ["PYTHONPATH"]
            try:
                for workload in ("noop", "sklearn"):
                    model = workload if sid in FLOORS or workload == "noop" else "sklearn_batch"
                    url = f"http://{run.http}/v2/models/{model}/infer"
                    body = workloads[workload].json_body()
                    measure(url, body, run.pids, 1.0)  # warm up
                    point, per = measure(url, body, run.pids, ns.duration)
                    row = {
                        "round": round_,
                        "system": sid,
                        "model": model,
                        "rps": point.throughput,
                        "errors": point.errors,
                        "cpu_us_per_request": per,
                    }
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            finally:
                run.stop() if isinstance(run, Floor) else systems.stop(run)
    print("shoal's requests a second / the floor's (h11, httptools), same round:")
    for round_ in range(ns.rounds):
        for workload in ("noop", "sklearn"):
            got = {r["system"]: r["rps"] for r in rows if r["round"] == round_ and workload in r["model"]}
            for sid in sources:
                ratios = " / ".join(f"{got[sid] / got[f]:.2f}" if got.get(f) else "-" for f in FLOORS)
                print(f"  round {round_} {workload} {sid}: {ratios}")


if __name__ == "__main__":
    main()

"""The load tools the suite drives, each returning one :class:`Point`.

- ``perf_analyzer`` (Triton's, C++): OIP over gRPC or HTTP (binary tensors); needs the
  server's ModelConfig.
- ``h2load`` (nghttp2): replays one serialized gRPC ``ModelInferRequest`` over HTTP/2;
  drives any OIP gRPC server (MLServer has no ModelConfig, so perf_analyzer cannot).
- ``wrk``: HTTP/1.1 keep-alive POSTs of one V2 JSON body; drives every HTTP server alike.
- ``shoal bench`` (``python -m shoal.loadgen``): the only tool that speaks shoal's native
  protocol; also run against the gRPC floor so its numbers have a same-tool reference.

Each run records the tool's own CPU time (it shares the two cores with the server) and
the server tree's CPU time over the same span.
"""

from __future__ import annotations

import csv
import json
import os
import re
import resource
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PERF_ANALYZER = BENCH / ".peers" / "perf-analyzer" / "perf_analyzer"


@dataclass
class Point:
    """One measurement: a tool loading one model at one concurrency."""

    tool: str
    protocol: str
    concurrency: int
    throughput: float = 0.0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    requests: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    tool_cpu: float = 0.0
    server_cpu: float = 0.0
    command: str = ""
    failed: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Workload:
    """A model's input as every tool sends it: one row."""

    name: str
    input_name: str
    array: np.ndarray

    def json_body(self) -> bytes:
        t = {
            "name": self.input_name,
            "shape": list(self.array.shape),
            "datatype": "FP32",
            "data": self.array.ravel().tolist(),
        }
        return json.dumps({"inputs": [t]}).encode()

    def grpc_frame(self, model: str) -> bytes:
        """A length-prefixed gRPC message holding the ModelInferRequest."""
        from shoal.proto import grpc_service_pb2 as pb

        req = pb.ModelInferRequest(model_name=model)
        req.inputs.add(name=self.input_name, datatype="FP32", shape=self.array.shape)
        req.raw_input_contents.append(self.array.astype("<f4").tobytes())
        body = req.SerializeToString()
        return b"\x00" + struct.pack(">I", len(body)) + body


def workloads() -> dict[str, Workload]:
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(0)
    digit = load_digits().data[:1].astype(np.float32)
    return {
        "noop": Workload("noop", "x", rng.random((1, 16), dtype=np.float32)),
        "sklearn": Workload("sklearn", "input", digit),
    }


# ---------------------------------------------------------------- running a tool


def tree_cpu(pids: Callable[[], Sequence[int]]) -> float:
    """User + system seconds of the processes ``pids()`` names (children included)."""
    total = 0.0
    for pid in pids():
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_tool(
    argv: Sequence[str],
    server_pids: Callable[[], Sequence[int]],
    timeout_s: float,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], float, float, float]:
    """Run a load tool to completion: (process, wall seconds, tool CPU s, server CPU s)."""
    cpu0, srv0, t0 = _children_cpu(), tree_cpu(server_pids), time.monotonic()
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout_s, env={**os.environ, **(env or {})}
    )
    wall = time.monotonic() - t0
    return proc, wall, _children_cpu() - cpu0, tree_cpu(server_pids) - srv0


def _finish(
    point: Point, proc: subprocess.CompletedProcess[str], wall: float, tool: float, srv: float
) -> Point:
    point.tool_cpu = round(tool / wall, 3) if wall else 0.0
    point.server_cpu = round(srv / wall, 3) if wall else 0.0
    if proc.returncode != 0 and not point.failed:
        point.failed = f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-400:]}"
    return point


# ---------------------------------------------------------------- perf_analyzer


def perf_analyzer(
    address: str,
    model: str,
    protocol: str,
    concurrency: int,
    server_pids: Callable[[], Sequence[int]],
    *,
    window_ms: int = 1000,
    shape: str | None = None,
) -> Point:
    """Triton's perf_analyzer, closed loop at ``concurrency``, three measurement windows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        argv = [
            str(PERF_ANALYZER),
            "-m",
            model,
            "-u",
            address,
            "-i",
            protocol,
            "--concurrency-range",
            str(concurrency),
            "-p",
            str(window_ms),
            # No stability gate: on a shared two-core machine windows rarely agree within 50%, and
            # perf_analyzer then reports nothing. Three windows are measured; rounds handle noise.
            "-s",
            "1000",
            "-r",
            "3",
            "-f",
            str(out),
        ]
        if shape:
            argv += ["--shape", shape]
        point = Point(
            "perf_analyzer",
            protocol,
            concurrency,
            command=" ".join(a for a in argv if a not in ("-f", str(out))).replace(str(BENCH), "bench"),
        )
        proc, wall, tool, srv = run_tool(argv, server_pids, timeout_s=120)
        if out.exists():
            rows = list(csv.DictReader(out.open()))
            if rows:
                row = rows[-1]
                point.throughput = float(row["Inferences/Second"])
                point.p50_ms = float(row["p50 latency"]) / 1000
                point.p90_ms = float(row["p90 latency"]) / 1000
                point.p99_ms = float(row["p99 latency"]) / 1000
        m = re.findall(r"Request count: (\d+)", proc.stdout)
        point.requests = int(m[-1]) if m else 0
        point.seconds = round(wall, 2)
        if point.throughput == 0.0:
            point.failed = f"no result: {(proc.stderr or proc.stdout).strip()[-400:]}"
        return _finish(point, proc, wall, tool, srv)


# ---------------------------------------------------------------- wrk


def wrk(
    url: str,
    body: bytes,
    concurrency: int,
    server_pids: Callable[[], Sequence[int]],
    *,
    duration_s: float = 2.0,
) -> Point:
    """wrk, one thread, ``concurrency`` keep-alive connections POSTing ``body`` as JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        # The body is read from a file so any bytes survive; `done` prints what wrk's summary lacks.
        (Path(tmp) / "body.json").write_bytes(body)
        script.write_text(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'local f = io.open("{tmp}/body.json", "rb")\n'
            "wrk.body = f:read('*a')\n"
            "f:close()\n"
            "done = function(summary, latency, requests)\n"
            '  io.write(string.format("JSON {\\"requests\\": %d, \\"status\\": %d, \\"connect\\": %d, '
            '\\"read\\": %d, \\"write\\": %d, \\"timeout\\": %d, \\"duration_us\\": %d, '
            '\\"p50\\": %d, \\"p90\\": %d, \\"p99\\": %d}\\n", summary.requests, summary.errors.status, '
            "summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout, "
            "summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99)))\n"
            "end\n"
        )
        argv = [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{duration_s:g}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ]
        point = Point(
            "wrk",
            "http-json",
            concurrency,
            command=f"wrk -t1 -c{concurrency} -d{duration_s:g}s -s post.lua {url}",
        )
        proc, wall, tool, srv = run_tool(argv, server_pids, timeout_s=duration_s + 60)
    m = re.search(r"^JSON (\{.*\})$", proc.stdout, re.M)
    if m:
        doc = json.loads(m.group(1))
        seconds = doc["duration_us"] / 1e6
        errors = {k: doc[k] for k in ("status", "connect", "read", "write", "timeout") if doc[k]}
        point.errors = sum(errors.values())
        point.error_kinds = {("non-2xx" if k == "status" else k): v for k, v in errors.items()}
        point.requests = doc["requests"]
        point.throughput = round((doc["requests"] - doc["status"]) / seconds, 1) if seconds else 0.0
        point.p50_ms, point.p90_ms, point.p99_ms = (doc[k] / 1000 for k in ("p50", "p90", "p99"))
        point.seconds = round(seconds, 2)
    else:
        point.failed = f"no result: {(proc.stderr or proc.stdout).strip()[-400:]}"
    return _finish(point, proc, wall, tool, srv)


# ---------------------------------------------------------------- h2load


def h2load(
    address: str,
    frame: bytes,
    concurrency: int,
    server_pids: Callable[[], Sequence[int]],
    *,
    duration_s: float = 2.0,
) -> Point:
    """h2load replaying a gRPC ModelInfer call: one HTTP/2 connection, ``concurrency`` streams.

    h2load judges only the HTTP status; the suite checks the same request over a real gRPC
    client first, and ``grpc-status`` trailers are not read here.
    """
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "req.bin"
        data.write_bytes(frame)
        log = Path(tmp) / "h2.log"
        url = f"http://{address}/inference.GRPCInferenceService/ModelInfer"
        argv = [
            "h2load",
            "-c1",
            f"-m{concurrency}",
            f"-D{int(duration_s * 1000)}ms",
            "--warm-up-time=500ms",
            "-d",
            str(data),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--log-file",
            str(log),
            url,
        ]
        point = Point(
            "h2load",
            "grpc",
            concurrency,
            command=" ".join(f"'{a}'" if " " in a else a for a in argv)
            .replace(str(data), "req.bin")
            .replace(str(log), "h2.log"),
        )
        proc, wall, tool, srv = run_tool(argv, server_pids, timeout_s=duration_s + 60)
        durations = []
        statuses: dict[str, int] = {}
        if log.exists():
            for line in log.read_text().splitlines():
                parts = line.split("\t")
                if len(parts) >= 3:
                    statuses[parts[1]] = statuses.get(parts[1], 0) + 1
                    if parts[1] == "200":
                        durations.append(int(parts[2]))
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", proc.stdout)
    if m and durations:
        lat = np.asarray(durations) / 1000.0  # microseconds -> ms
        point.throughput = float(m.group(3))
        point.p50_ms, point.p90_ms, point.p99_ms = (
            round(float(np.percentile(lat, q)), 3) for q in (50, 90, 99)
        )
        point.requests = sum(statuses.values())
        bad = {f"HTTP {k}": v for k, v in statuses.items() if k != "200"}
        point.errors, point.error_kinds = sum(bad.values()), bad
        point.seconds = duration_s
    else:
        point.failed = f"no result: {(proc.stderr or proc.stdout).strip()[-400:]}"
    return _finish(point, proc, wall, tool, srv)


# ---------------------------------------------------------------- shoal bench


def shoal_bench(
    address: str,
    model: str,
    protocol: str,
    concurrency: int,
    server_pids: Callable[[], Sequence[int]],
    *,
    input_file: Path | None = None,
    duration_s: float = 2.0,
) -> Point:
    """``python -m shoal.loadgen`` (what ``shoal bench`` runs) against ``address``."""
    argv = [
        sys.executable,
        "-m",
        "shoal.loadgen",
        model,
        "--url",
        address,
        "--protocol",
        protocol,
        "-c",
        str(concurrency),
        "-d",
        str(duration_s),
        "--warmup",
        "0.5",
        "--json",
    ]
    if input_file is not None:
        argv += ["--input", str(input_file)]
    shown = ["shoal", "bench", *argv[3:]]
    point = Point(
        "shoal bench",
        protocol,
        concurrency,
        command=" ".join(shown).replace(str(input_file), "INPUT.json").replace(" --json", ""),
    )
    proc, wall, tool, srv = run_tool(argv, server_pids, timeout_s=duration_s + 90)
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        point.failed = f"no result: {(proc.stderr or proc.stdout).strip()[-400:]}"
        return _finish(point, proc, wall, tool, srv)
    point.throughput = doc["throughput_rps"]
    lat = doc["latency_ms"]
    point.p50_ms, point.p90_ms, point.p99_ms = lat["p50"], lat["p90"], lat["p99"]
    point.requests, point.errors, point.error_kinds = doc["requests"], doc["errors"], doc["errors_by_kind"]
    point.seconds = doc["duration_s"]
    point = _finish(point, proc, wall, tool, srv)
    # The generator's own count excludes interpreter start-up, which run_tool's wall includes.
    point.tool_cpu = doc["client_cpu_share"]
    return point

"""``shoal bench`` against a real ``shoal up``: a smoke test of the load generator."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class Cluster:
    def __init__(self, proc: subprocess.Popen[str], endpoints: dict[str, str], state: Path) -> None:
        self.proc = proc
        self.endpoints = endpoints
        self.state = state


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """``shoal up`` on free ports with the echo example, stopped (with every child) after."""
    tmp = tmp_path_factory.mktemp("bench")
    state, log = tmp / "state", tmp / "up.log"
    env = {**os.environ, "SHOAL_HEAD": "", "SHOAL_SHUTDOWN_GRACE_S": "3"}
    ports = ["--head-port", "0", "--dashboard-port", "0", "--grpc-port", "0", "--http-port", "0"]
    argv = [sys.executable, "-m", "shoal.cli", "up", "--state", str(state), *ports]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*argv, "--deploy", str(EXAMPLES / "echo.yaml")],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while "shoal is up" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield Cluster(proc, json.loads((state / "endpoints.json").read_text()), state)
    finally:
        try:
            children = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def bench_command(head: str) -> list[str]:
    """``shoal bench`` once the CLI registers it, else the module that implements it."""
    from shoal.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "bench" in sub.choices:
        return [sys.executable, "-m", "shoal.cli", "--head", head, "bench"]
    return [sys.executable, "-m", "shoal.loadgen", "--head", head]


def bench(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*bench_command(cluster.endpoints["head"]), *args],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "SHOAL_HEAD": ""},
    )
    if check:
        assert proc.returncode == 0, f"shoal bench {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def wait_ready(cluster: Cluster, name: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(
            [sys.executable, "-m", "shoal.cli", "--head", cluster.endpoints["head"], "status", "--json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode == 0:
            deps = {d["name"]: d for d in json.loads(out.stdout)["deployments"]}
            if name in deps and any(r["state"] == "READY" for r in deps[name]["replicas"]):
                return
        assert time.monotonic() < deadline, f"{name} not ready: {out.stdout} {out.stderr}"
        time.sleep(0.2)


def check_result(doc: dict[str, Any], protocol: str) -> None:
    assert doc["protocol"] == protocol
    assert doc["requests"] > 0 and doc["ok"] == doc["requests"]
    assert doc["errors"] == 0, doc["errors_by_kind"]
    assert doc["throughput_rps"] > 0
    for key in ("p50", "p90", "p99", "max"):
        assert isinstance(doc["latency_ms"][key], float) and doc["latency_ms"][key] > 0, doc["latency_ms"]
    assert doc["latency_ms"]["p50"] <= doc["latency_ms"]["p99"] <= doc["latency_ms"]["max"]


def test_native_closed_loop(cluster: Cluster) -> None:
    wait_ready(cluster, "echo")
    proc = bench(cluster, "echo", "--protocol", "native", "--duration", "2", "--concurrency", "4", "--json")
    doc = json.loads(proc.stdout)
    check_result(doc, "native")
    assert doc["mode"] == "closed" and doc["concurrency"] == 4
    assert 1.5 <= doc["duration_s"] <= 10
    assert proc.stderr == ""  # no progress line unless asked, when stderr is not a terminal


def test_native_open_loop_with_two_workers_and_the_table(cluster: Cluster) -> None:
    wait_ready(cluster, "echo")
    proc = bench(
        cluster,
        "echo",
        "--protocol",
        "native",
        "--rate",
        "200",
        "--requests",
        "100",
        "--workers",
        "2",
        "--concurrency",
        "8",
        "--progress",
    )
    table = proc.stdout
    assert "open loop, 200 req/s" in table and "2 workers" in table
    assert "requests    100 (ok 100, errors 0)" in table
    for word in ("throughput", "p50", "p90", "p99", "max"):
        assert word in table


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_open_inference_protocol(cluster: Cluster, protocol: str) -> None:
    wait_ready(cluster, "echo")
    proc = bench(cluster, "echo", "--protocol", protocol, "--duration", "2", "--concurrency", "4", "--json")
    check_result(json.loads(proc.stdout), protocol)


@pytest.mark.parametrize(
    ("protocol", "port"), [("grpc", "scheduler"), ("native", "scheduler"), ("http", "scheduler_http")]
)
def test_the_default_target_is_the_inference_port_shoal_up_prints(
    cluster: Cluster, protocol: str, port: str
) -> None:
    """Before, gRPC and native went to the scheduler's control port (with ingress workers, the
    default, a port of its main process alone), not the 8001 the banner shows."""
    wait_ready(cluster, "echo")
    args = ["echo", "--protocol", protocol, "--requests", "20", "--json"]
    doc = json.loads(bench(cluster, *args, "--state", str(cluster.state)).stdout)
    check_result(doc, protocol)
    assert doc["address"] == cluster.endpoints[port]


def test_unknown_model_is_a_one_line_error(cluster: Cluster) -> None:
    proc = bench(cluster, "nope", "--protocol", "native", "--requests", "5", check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shoal: error:") and "nope" in lines[0], proc.stderr

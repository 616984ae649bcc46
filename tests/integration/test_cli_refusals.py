"""The CLI beside real processes: a second process on a running ``shoal up``'s state folder,
a request timeout of any finite size, and a head that takes connections but never answers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from shoal.testing.cluster import FAST, Component, ProcessCluster

pytestmark = pytest.mark.timeout(120)

ENV = {**os.environ, **FAST}
ENV.pop("SHOAL_HEAD", None)
PORTS = ["--grpc-port", "0", "--http-port", "0"]


def shoal(*args: str, env: dict[str, str] = ENV, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    """``shoal ARGS`` to its end. One that is still running after ``timeout_s`` (it started
    when it should have been refused) is killed with everything it started, and fails the test."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"shoal {' '.join(args)} still ran after {timeout_s}s:\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Component]:
    """``shoal up`` on port 0, nothing deployed."""
    comp = Component(
        "up", ["up", "--head-port", "0", "--dashboard-port", "0", *PORTS], tmp_path / "state", ENV
    )
    try:
        comp.start(("head", "scheduler"))
        yield comp
    finally:
        comp.signal(signal.SIGTERM)
        if comp.proc is not None:
            try:
                comp.wait(15)
            except subprocess.TimeoutExpired:
                pass
        comp.kill_all()


def test_a_scheduler_or_head_on_a_running_ups_state_folder_is_refused(up: Component) -> None:
    state = str(up.state)
    refused = [
        shoal("--head", up.endpoints["head"], "scheduler", "--state", state, *PORTS),
        shoal("head", "--state", state, "--port", "0", "--http-port", "0"),
    ]
    for proc, role in zip(refused, ["scheduler", "head"], strict=True):
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stderr.splitlines() == [
            f"shoal: error: shoal up already runs with state folder {state} (pid {up.pid}); "
            f"'shoal down --state {state}' stops it, or give this {role} a state folder of its own"
        ]
    # Still the only scheduler the head knows, and shoal up's pid file is its own.
    status = json.loads(shoal("--head", up.endpoints["head"], "status", "--json").stdout)
    assert [s["pid"] for s in status["schedulers"]] == [up.pid]
    assert json.loads((up.state / "up.pid").read_text())["pid"] == up.pid


async def test_a_request_timeout_of_any_finite_size_is_sent_and_a_non_finite_one_refused(
    tmp_path: Path, examples_dir: Path
) -> None:
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(
            {"name": "echo", "backend": "python", "model": "echo:Echo", "base_dir": str(examples_dir)}
        )
        await cluster.wait_ready("echo", 1)
        data = json.dumps({"x": [[float(i) for i in range(16)]]})
        head = ["--head", cluster.head_address, "predict", "echo", "--data", data, "--timeout"]
        for timeout in ("1e9", "1e10", "1e300"):
            proc = shoal(*head, timeout)
            assert proc.returncode == 0, (timeout, proc.stderr)
            assert json.loads(proc.stdout) == {"x": [list(range(16))]}
        for timeout in ("inf", "nan", "-1"):
            proc = shoal(*head, timeout)
            assert proc.returncode == 1
            assert proc.stderr.splitlines() == [
                f"shoal: error: timeout_s must be a finite number >= 0, got {timeout}"
            ]


def test_a_head_that_never_answers_is_named(silent_port: int) -> None:
    address = f"127.0.0.1:{silent_port}"
    proc = shoal("--head", address, "status", env={**ENV, "SHOAL_RPC_TIMEOUT_S": "1"})
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"shoal: error: the head at {address} did not answer in time"), line

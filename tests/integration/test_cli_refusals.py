"""The CLI beside real processes: a second process on a running ``shoal up``'s state folder."""

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

from shoal.testing.cluster import FAST, Component

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

"""Fixtures for the e2e tier: ``shoal up`` as a user starts it, and the CLI beside it."""

from __future__ import annotations

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


def shoal(*args: str, head: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "--head", head, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "SHOAL_HEAD": ""},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"shoal {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


class Up:
    def __init__(self, proc: subprocess.Popen[str], state: Path, log: Path) -> None:
        self.proc = proc
        self.state = state
        self.log = log
        self.endpoints: dict[str, str] = {}
        self.descendants: set[int] = set()

    @property
    def head(self) -> str:
        return self.endpoints["head"]

    def remember_children(self) -> None:
        try:
            self.descendants |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass


def start_up(state: Path, log: Path, examples_dir: Path) -> Up:
    """``shoal up`` as ``make up`` runs it (digits and echo), on port 0, once it says it is up.
    :func:`stop_up` stops it and everything it started."""
    env = {
        **os.environ,
        "SHOAL_PING_INTERVAL_S": "0.2",
        "SHOAL_HEARTBEAT_INTERVAL_S": "0.2",
        "SHOAL_RECONCILE_INTERVAL_S": "0.2",
        "SHOAL_SHUTDOWN_GRACE_S": "3",
    }
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shoal.cli",
                "up",
                "--state",
                str(state),
                "--head-port",
                "0",
                "--dashboard-port",
                "0",
                "--grpc-port",
                "0",
                "--http-port",
                "0",
                "--deploy",
                str(examples_dir / "digits.yaml"),
                "--deploy",
                str(examples_dir / "echo.yaml"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
    u = Up(proc, state, log)
    try:
        deadline = time.monotonic() + 30
        while "shoal is up" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        u.endpoints = json.loads((state / "endpoints.json").read_text())
    except BaseException:
        stop_up(u)
        raise
    return u


def stop_up(u: Up) -> None:
    u.remember_children()
    if u.proc.poll() is None:
        u.proc.send_signal(signal.SIGTERM)
        try:
            u.proc.wait(20)
        except subprocess.TimeoutExpired:
            u.proc.kill()
    for pid in u.descendants:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def up(tmp_path: Path, examples_dir: Path) -> Iterator[Up]:
    u = start_up(tmp_path / "state", tmp_path / "up.log", examples_dir)
    try:
        yield u
    finally:
        stop_up(u)


def stop_group(proc: subprocess.Popen[str], grace_s: float = 30) -> None:
    """Stop a process started with ``start_new_session`` and all of its group: SIGTERM,
    then SIGKILL after ``grace_s``."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_ready(up: Up, name: str, count: int, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status: dict[str, Any] = json.loads(shoal("status", "--json", head=up.head).stdout)
        dep = next((d for d in status["deployments"] if d["name"] == name), None)
        if dep and sum(r["state"] == "READY" for r in dep["replicas"]) == count == len(dep["replicas"]):
            return status
        assert time.monotonic() < deadline, f"{name} not ready: {status}"
        time.sleep(0.2)

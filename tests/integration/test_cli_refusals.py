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

import shoal as shoal_api
from shoal.errors import HeadUnreachable, Unimplemented
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


async def test_another_of_shoals_ports_given_as_the_heads_is_named(up: Component) -> None:
    """Before, ``--head`` at a scheduler's inference port ended in 'shoal: error: Method not
    found!', and at an HTTP port in 'is it running? Start one with shoal up', where a server
    had answered, in HTTP/1."""
    grpc_port = up.endpoints["scheduler"]
    async with shoal_api.AsyncClient(grpc_port) as client:
        with pytest.raises(Unimplemented) as err:
            await client.status()
    said = str(err.value)
    assert said.startswith(
        f"the server at {grpc_port} does not serve the head's control API (UNIMPLEMENTED: "
    )
    proc = shoal("--head", grpc_port, "status")
    assert proc.returncode == 1
    api, cli = shoal_api.AsyncClient.point_at_head, "point --head / SHOAL_HEAD at it"
    assert proc.stderr.splitlines() == [f"shoal: error: {said.replace(api, cli)}"]
    for address in (up.endpoints["head_http"], up.endpoints["scheduler_http"]):
        async with shoal_api.AsyncClient(address) as client:
            with pytest.raises(HeadUnreachable) as unreachable:
                await client.status()
        assert str(unreachable.value).startswith(
            f"cannot reach the head at {address}: a server answers there in HTTP/1, not gRPC"
        )

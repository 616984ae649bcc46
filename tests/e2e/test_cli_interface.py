"""The interface as the README writes it (``shoal scheduler --head``, ``--version``, ``down``,
``logs``, ``/docs``), and deploys that answer at once when they cannot succeed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.e2e.conftest import Up, shoal, stop_group, wait_ready

pytestmark = pytest.mark.timeout(180)


def shoal_bare(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The CLI with no --head before the command (and no SHOAL_HEAD): what the README shows."""
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k != "SHOAL_HEAD"},
    )


def gone(pids: set[int], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while left := [
        p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]:
        assert time.monotonic() < deadline, f"still running: {left}"
        time.sleep(0.1)


def test_version() -> None:
    proc = shoal_bare("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("shoal ")


def test_docs_logs_and_down(up: Up) -> None:
    status = wait_ready(up, "digits", 2)
    base = f"http://{up.endpoints['head_http']}"
    with urllib.request.urlopen(f"{base}/docs", timeout=10) as r:
        assert r.status == 200 and "/openapi.json" in r.read().decode()
    with urllib.request.urlopen(f"{base}/", timeout=10) as r:
        assert 'href="/docs"' in r.read().decode()

    # A deployment's logs: every replica's, each line prefixed with its replica.
    replicas = [r["id"] for d in status["deployments"] if d["name"] == "digits" for r in d["replicas"]]
    out = shoal("logs", "digits", head=up.head).stdout
    for rid in replicas:
        assert f"{rid} | " in out and "loaded in" in out
    # The head's log, from the state folder on this machine.
    head_log = shoal_bare("logs", "head", "--state", str(up.state))
    assert head_log.returncode == 0 and "head listening on" in head_log.stdout

    # --follow: lines as they come, until Ctrl-C.
    for target in ("digits", "head"):
        argv = [
            sys.executable,
            "-m",
            "shoal.cli",
            "--head",
            up.head,
            "logs",
            "-f",
            target,
            "--state",
            str(up.state),
        ]
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as follow:
            try:
                assert follow.stdout is not None and follow.stderr is not None
                first = follow.stdout.readline()  # the test's timeout bounds this
                assert first.split(" | ")[0] in replicas if target == "digits" else first
                follow.send_signal(signal.SIGINT)
                assert follow.wait(10) == 0, follow.stderr.read()
            finally:
                if follow.poll() is None:
                    follow.kill()

    # shoal down, from another shell, stops shoal up and everything it started.
    up.remember_children()
    down = shoal_bare("down", "--state", str(up.state), timeout=60)
    assert down.returncode == 0, down.stderr
    assert f"stopping shoal up (pid {up.proc.pid})" in down.stdout and "stopped" in down.stdout
    assert up.proc.wait(5) == 0
    gone(up.descendants)
    assert not (up.state / "up.pid").exists()
    assert "nothing to stop" in shoal_bare("down", "--state", str(up.state)).stdout


@pytest.fixture
def head_and_scheduler(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, Path]]:
    """``shoal head`` alone, with its own state folder; the test starts the scheduler."""
    env = {**os.environ, "SHOAL_HEARTBEAT_INTERVAL_S": "0.2"}
    env.pop("SHOAL_HEAD", None)
    head_state, sched_state = tmp_path / "head", tmp_path / "sched"
    argv = [
        sys.executable,
        "-m",
        "shoal.cli",
        "head",
        "--state",
        str(head_state),
        "--port",
        "0",
        "--http-port",
        "0",
    ]
    with open(tmp_path / "head.out", "w") as out:
        head = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    procs = [head]
    try:
        deadline = time.monotonic() + 30
        while not (head_state / "endpoints.json").exists():
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.out").read_text()
            time.sleep(0.05)
        yield head, head_state, sched_state
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
        for state in (sched_state, head_state):
            shoal_bare("down", "--state", str(state))


def test_scheduler_takes_head_after_the_command(
    head_and_scheduler: tuple[subprocess.Popen[str], Path, Path], tmp_path: Path
) -> None:
    head, head_state, sched_state = head_and_scheduler
    address = json.loads((head_state / "endpoints.json").read_text())["head"]
    argv = [
        "scheduler",
        "--head",
        address,
        "--state",
        str(sched_state),
        "--grpc-port",
        "0",
        "--http-port",
        "0",
    ]
    with open(tmp_path / "sched.out", "w") as out:
        sched = subprocess.Popen(
            [sys.executable, "-m", "shoal.cli", *argv], stdout=out, stderr=subprocess.STDOUT, text=True
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            status = json.loads(shoal("status", "--json", head=address).stdout)
            if [s["pid"] for s in status["schedulers"] if s["state"] == "ALIVE"] == [sched.pid]:
                break
            assert sched.poll() is None and time.monotonic() < deadline, (tmp_path / "sched.out").read_text()
            time.sleep(0.2)
        assert "scheduler" in shoal_bare("logs", "scheduler", "--state", str(sched_state)).stdout
        down = shoal_bare("down", "--state", str(sched_state))
        assert down.returncode == 0 and f"stopping shoal scheduler (pid {sched.pid})" in down.stdout
        assert sched.wait(5) == 0
    finally:
        if sched.poll() is None:
            sched.kill()
            sched.wait()
    assert shoal_bare("down", "--state", str(head_state)).returncode == 0
    assert head.wait(5) == 0


# ------------------------------------------------------------------ deploys that answer


def write_model(folder: Path, name: str, code: str, *, cpus: float = 0.1) -> Path:
    (folder / f"{name}.py").write_text(code)
    spec = folder / f"{name}.yaml"
    spec.write_text(f"name: {name}\nbackend: python\nmodel: '{name}:Model'\nresources: {{cpus: {cpus}}}\n")
    return spec


def test_no_room_is_an_answer(up: Up, tmp_path: Path) -> None:
    spec = write_model(
        tmp_path, "huge", "class Model:\n    def predict(self, inputs):\n        return inputs\n", cpus=64
    )
    started = time.monotonic()
    proc = shoal("deploy", str(spec), head=up.head, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert time.monotonic() - started < 15
    # 64 cpus is more than the local scheduler has in all: freeing room would not help.
    assert "deployment huge cannot be placed: no scheduler is big enough (cpus 64 >" in proc.stderr
    assert "Freeing room cannot help" in proc.stderr
    assert "Traceback" not in proc.stderr
    # --no-wait leaves it pending, and says nothing is wrong.
    assert shoal("deploy", "--no-wait", str(spec), head=up.head).returncode == 0
    dep = next(
        d
        for d in json.loads(shoal("status", "--json", head=up.head).stdout)["deployments"]
        if d["name"] == "huge"
    )
    assert dep["pending_reason"].startswith("no scheduler is big enough")


def test_replicas_that_fail_to_start_fail_the_deploy_with_the_reason(up: Up, tmp_path: Path) -> None:
    spec = write_model(
        tmp_path,
        "broken",
        "class Model:\n    def __init__(self):\n        raise ValueError('bad weights: marker-7f3')\n"
        "    def predict(self, inputs):\n        return inputs\n",
    )
    started = time.monotonic()
    proc = shoal("deploy", "--timeout", "100", str(spec), head=up.head, check=False, timeout=120)
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert took < 45, f"{took:.0f}s"
    assert "deployment broken failed: its replicas fail to start" in proc.stderr
    assert "marker-7f3" in proc.stderr
    # Not a line a second: one per change.
    assert len(proc.stdout.splitlines()) <= 8, proc.stdout


def test_an_update_that_does_not_start_is_not_ready(up: Up, tmp_path: Path) -> None:
    good = "class Model:\n    def predict(self, inputs):\n        return inputs\n"
    spec = write_model(tmp_path, "app", good)
    assert "ready after" in shoal("deploy", str(spec), head=up.head).stdout
    (tmp_path / "app2.py").write_text("import no_such_module_marker_91\n")
    spec.write_text(spec.read_text().replace("'app:Model'", "'app2:Model'"))
    proc = shoal("deploy", "--timeout", "100", str(spec), head=up.head, check=False, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "ready after" not in proc.stdout
    assert "no_such_module_marker_91" in proc.stderr


def test_a_models_tracebacks_are_in_its_replicas_log(up: Up, tmp_path: Path) -> None:
    no_load = write_model(
        tmp_path,
        "noload",
        "class Model:\n    def __init__(self):\n        raise ValueError('cannot load: marker-load')\n",
    )
    bad_predict = write_model(
        tmp_path,
        "badpredict",
        "class Model:\n    def predict(self, inputs):\n        raise RuntimeError('marker-predict')\n",
    )
    # Load: the deploy's error shows the end of the dead replica's log: its traceback.
    proc = shoal("deploy", "--timeout", "100", str(no_load), head=up.head, check=False, timeout=120)
    assert "Traceback (most recent call last)" in proc.stderr and "in __init__" in proc.stderr, proc.stderr
    # Predict: the replica's log has the model's traceback.
    shoal("deploy", str(bad_predict), head=up.head)
    x = json.dumps({"x": [[1.0]]})
    assert shoal("predict", "badpredict", "--data", x, head=up.head, check=False).returncode == 1
    out = shoal("logs", "badpredict", head=up.head).stdout
    assert "in predict" in out and "RuntimeError: marker-predict" in out, out


def test_a_restarted_up_says_which_deployment_cannot_run(up: Up, tmp_path: Path, examples_dir: Path) -> None:
    spec = write_model(
        tmp_path, "huge", "class Model:\n    def predict(self, inputs):\n        return inputs\n", cpus=64
    )
    shoal("deploy", "--no-wait", str(spec), head=up.head)
    assert shoal_bare("down", "--state", str(up.state)).returncode == 0
    assert up.proc.wait(5) == 0
    # The same state again: huge comes back from the store, and still fits nowhere.
    log = tmp_path / "again.log"
    ports = ["--head-port", "0", "--dashboard-port", "0", "--grpc-port", "0", "--http-port", "0"]
    argv = ["up", "--state", str(up.state), *ports, "--deploy", str(examples_dir / "echo.yaml")]
    env = {
        **os.environ,
        "SHOAL_HEARTBEAT_INTERVAL_S": "0.2",
        "SHOAL_DEAD_AFTER_S": "1",
        "SHOAL_SHUTDOWN_GRACE_S": "3",
    }
    with open(log, "w") as out:
        again = subprocess.Popen(
            [sys.executable, "-m", "shoal.cli", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "cannot be placed" not in log.read_text():
            assert "all deployments ready" not in log.read_text(), log.read_text()
            assert again.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert "deployment huge cannot be placed: no scheduler is big enough" in log.read_text()
    finally:
        stop_group(again)

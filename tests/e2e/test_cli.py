"""The CLI as a user runs it: ``shoal up`` in the foreground, other commands beside it."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.e2e.conftest import Up, shoal, start_up, stop_up, wait_ready

pytestmark = pytest.mark.timeout(120)


def test_up_serves_the_digits_classifier(up: Up) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    status = wait_ready(up, "digits", 2)
    digits = load_digits()
    _, x_test, _, y_test = train_test_split(digits.data, digits.target, test_size=0.25, random_state=0)
    data = json.dumps({"input": x_test[:20].tolist()})
    out = json.loads(shoal("predict", "digits", "--data", data, head=up.head).stdout)
    assert sorted(out) == ["label", "probabilities"]
    labels = np.array(out["label"])
    assert (labels == y_test[:20]).mean() >= 0.9
    assert np.array(out["probabilities"]).shape == (20, 10)

    # status --json: the documented shape, states in capitals.
    (sched,) = status["schedulers"]
    assert {"id", "address", "state", "pid"} <= set(sched)
    assert sched["state"] == "ALIVE" and sched["pid"] == up.proc.pid
    names = {d["name"] for d in status["deployments"]}
    assert names == {"digits", "echo"}
    for dep in status["deployments"]:
        for r in dep["replicas"]:
            assert {"id", "scheduler", "state", "pid"} <= set(r)
            assert r["scheduler"] == sched["id"]
            assert psutil.pid_exists(r["pid"])

    # The human table names the scheduler and every replica.
    table = shoal("status", head=up.head).stdout
    assert sched["id"] in table
    for dep in status["deployments"]:
        for r in dep["replicas"]:
            assert r["id"] in table


def test_deploy_scale_delete(up: Up, examples_dir: Path, tmp_path: Path) -> None:
    wait_ready(up, "echo", 1)
    spec = tmp_path / "echo2.yaml"
    spec.write_text((examples_dir / "echo.yaml").read_text().replace("name: echo", "name: echo2"))
    # echo.py lives beside the original spec; point base_dir there via a copy of the module.
    (tmp_path / "echo.py").write_text((examples_dir / "echo.py").read_text())
    out = shoal("deploy", str(spec), head=up.head).stdout
    assert "deployment echo2 created" in out and "ready after" in out
    shoal("scale", "echo2", "2", head=up.head)
    status = wait_ready(up, "echo2", 2)
    pids = [r["pid"] for d in status["deployments"] if d["name"] == "echo2" for r in d["replicas"]]
    x = json.dumps({"x": [[float(i) for i in range(16)]]})
    assert json.loads(shoal("predict", "echo2", "--data", x, head=up.head).stdout) == {"x": [list(range(16))]}
    shoal("delete", "echo2", head=up.head)
    deadline = time.monotonic() + 15
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, "replicas of a deleted deployment still running"
        time.sleep(0.1)


def test_errors_are_one_line_without_traceback(up: Up, tmp_path: Path) -> None:
    cases = [
        (["predict", "nope", "--data", "{}"], "nope"),
        (["predict", "echo", "--data", "not json"], "not valid JSON"),
        (["scale", "nope", "3"], "nope"),
        (["delete", "nope"], "nope"),
        (["deploy", str(tmp_path / "missing.yaml")], "missing.yaml"),
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: Bad Name\nbackend: tensorflow\nmodel: x\n")
    cases.append((["deploy", str(bad)], "backend"))
    # TLS towards a plaintext head: gRPC's own log lines ("I1205 ... Handshake failed")
    # came before and after shoal's.
    shoal("certs", "init", str(tmp_path / "certs"), head=up.head)
    cases.append((["status", "--tls-dir", str(tmp_path / "certs")], "cannot reach the head"))
    for args, needle in cases:
        proc = shoal(*args, head=up.head, check=False)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("shoal: error:"), proc.stderr
        assert needle in lines[0], (needle, lines[0])


def test_unreachable_head_is_a_clear_error() -> None:
    proc = shoal("status", head="127.0.0.1:1", check=False, timeout=30)
    assert proc.returncode == 1
    assert "cannot reach the head at 127.0.0.1:1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigterm_stops_everything_up_started(up: Up) -> None:
    wait_ready(up, "digits", 2)
    wait_ready(up, "echo", 1)
    up.remember_children()
    assert len(up.descendants) >= 3
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(30) == 0
    deadline = time.monotonic() + 10
    while True:
        left = [
            p
            for p in up.descendants
            if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        ]
        if not left:
            break
        assert time.monotonic() < deadline, f"left behind: {left}"
        time.sleep(0.1)
    assert "stopped" in up.log.read_text()


def test_logs_shows_what_the_replicas_model_printed(up: Up, tmp_path: Path) -> None:
    model = tmp_path / "chatty.py"
    model.write_text(
        "class Chatty:\n"
        "    def __init__(self):\n"
        "        print('chatty model loaded: hello from the replica', flush=True)\n"
        "    def predict(self, inputs):\n"
        "        return inputs\n"
    )
    spec = tmp_path / "chatty.yaml"
    spec.write_text("name: chatty\nbackend: python\nmodel: 'chatty:Chatty'\nresources: {cpus: 0.1}\n")
    shoal("deploy", str(spec), head=up.head)
    status = wait_ready(up, "chatty", 1)
    (replica,) = next(d for d in status["deployments"] if d["name"] == "chatty")["replicas"]
    out = shoal("logs", replica["id"], head=up.head).stdout
    assert "chatty model loaded: hello from the replica" in out
    assert shoal("logs", "nope-000000", head=up.head, check=False).returncode == 1


def test_up_again_says_what_its_specs_changed(up: Up, examples_dir: Path, tmp_path: Path) -> None:
    """Deployments outlive ``shoal up``, and the next one applies its specs again (README).
    It said ``deployment NAME updated`` for each, changed or not; now it says what
    ``shoal deploy`` says: unchanged, or what changed."""
    wait_ready(up, "echo", 1)
    shoal("scale", "echo", "2", head=up.head)
    stop_up(up)
    again = start_up(up.state, tmp_path / "again.log", examples_dir)
    try:
        lines = again.log.read_text().splitlines()
    finally:
        stop_up(again)
    assert "deployment digits unchanged" in lines, lines
    assert "deployment echo updated (revision 1): replicas 2 → 1" in lines, lines

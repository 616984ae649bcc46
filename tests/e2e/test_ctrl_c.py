"""Ctrl-C twice, as a terminal sends it: SIGINT to the command's whole process group.

The first stops gracefully (here it waits for a request held in a model, with 60 s of
grace); the second, while it shuts down, stops at once: exit 130, every process the command
started gone (ingress worker, zygote, replica), as ``docs/operations.md`` says. A second
SIGTERM is tested on a scheduler alone in ``tests/integration/test_graceful_shutdown.py``
(``shoal scheduler`` and ``shoal up`` share the handler, ``shoal.run._serve``). A head
alone has nothing to wait for when it stops, so no second signal finds it shutting down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from shoal.testing.gate import entered, gate_model, hold, release
from tests.e2e.conftest import Up, wait_ready

pytestmark = pytest.mark.timeout(90)

ENV = {
    "SHOAL_SHUTDOWN_GRACE_S": "60",
    "SHOAL_PING_INTERVAL_S": "0.2",
    "SHOAL_HEARTBEAT_INTERVAL_S": "0.2",
    "SHOAL_RECONCILE_INTERVAL_S": "0.2",
    "SHOAL_DEAD_AFTER_S": "2",  # how long a new head waits for schedulers before placing
}


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "gate"
    yield folder
    release(folder)


def start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], Path]:
    """``shoal ARGS`` in a process group of its own, as a shell starts a foreground job."""
    log = tmp_path / f"{args[0]}.log"
    env = {k: v for k, v in os.environ.items() if k != "SHOAL_HEAD"} | ENV
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shoal.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
    return proc, log


def wait_log(proc: subprocess.Popen[str], log: Path, text: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def ctrl_c(proc: subprocess.Popen[str]) -> None:
    os.killpg(proc.pid, signal.SIGINT)


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


@dataclass
class Held:
    """``shoal up`` with one request held in its model, and everything it had started then."""

    proc: subprocess.Popen[str]
    log: Path
    sender: threading.Thread
    outcome: list[object]  # the request's HTTP status, or the error it ended with
    started: list[psutil.Process]


@pytest.fixture
def held(tmp_path: Path, gate: Path) -> Iterator[Held]:
    spec = tmp_path / "held.yaml"
    # Two replicas: one holds the request, the other is idle when the signal comes.
    spec.write_text(
        json.dumps({"name": "held", **gate_model(gate), "replicas": 2, "resources": {"cpus": 0.1}})
    )
    state = tmp_path / "state"
    ports = ("--head-port", "0", "--dashboard-port", "0", "--grpc-port", "0", "--http-port", "0")
    proc, log = start(tmp_path, "up", "--state", str(state), *ports, "--deploy", str(spec))
    try:
        wait_log(proc, log, "shoal is up")
        up = Up(proc, state, log)
        up.endpoints = endpoints = json.loads((state / "endpoints.json").read_text())
        wait_ready(up, "held", 2)
        hold(gate)
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]})
        request = urllib.request.Request(
            f"http://{endpoints['scheduler_http']}/v2/models/held/infer",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        outcome: list[object] = []

        def send() -> None:
            try:
                with urllib.request.urlopen(request, timeout=30) as reply:
                    outcome.append(reply.status)
            except (urllib.error.URLError, ConnectionError) as err:
                outcome.append(err)

        sender = threading.Thread(target=send)
        sender.start()
        deadline = time.monotonic() + 20
        while not entered(gate):
            assert time.monotonic() < deadline, "the request never reached the model"
            time.sleep(0.05)
        started = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        assert all(n in names for n in ("shoal.replica_main", "shoal.ingress_worker", "zygote")), names
        yield Held(proc, log, sender, outcome, started)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def gone(started: list[psutil.Process]) -> None:
    deadline = time.monotonic() + 5
    while left := running(started):
        assert time.monotonic() < deadline, f"still running: {left}"
        time.sleep(0.1)


def test_ctrl_c_twice_stops_shoal_up_and_every_process_it_started_at_once(held: Held) -> None:
    proc, log = held.proc, held.log
    ctrl_c(proc)
    wait_log(proc, log, "shutting down")
    time.sleep(1.0)
    assert proc.poll() is None, "exited before its grace, with a request in flight"
    signalled = time.monotonic()
    ctrl_c(proc)
    assert proc.wait(10) == 130
    assert time.monotonic() - signalled < 5.0
    assert "SIGINT again while shutting down: stopping now" in log.read_text()
    gone(held.started)
    held.sender.join(30)
    assert held.outcome and held.outcome[0] != 200, held.outcome


@pytest.mark.parametrize("reach", ["group", "every process"])
def test_sigterm_to_the_whole_group_stops_shoal_up_gracefully(held: Held, gate: Path, reach: str) -> None:
    """What ``timeout`` sends on expiry (SIGTERM to the process group: the replicas, in
    sessions of their own, are not in it) and systemd on ``systemctl stop`` (its default
    KillMode=control-group: SIGTERM to every process of the service at once, replicas
    included). The request held in the model is still answered; the zygote stays until the
    scheduler closes it (it died at once, and was reported lost: "the zygote ... is gone");
    and a replica that drains of the same signal stopped, it did not die (it was logged as
    dead, with a warning, and counted)."""
    zygote = [p for p in held.started if "zygote" in " ".join(p.cmdline())]
    if reach == "group":
        os.killpg(held.proc.pid, signal.SIGTERM)
    else:
        for p in [psutil.Process(held.proc.pid), *held.started]:
            p.send_signal(signal.SIGTERM)
    stops_gracefully(held, gate, zygote)


def test_a_hangup_stops_shoal_up_gracefully(held: Held, gate: Path) -> None:
    """The terminal closing: SIGHUP to its foreground process group. Before, the scheduler
    died of it at once (the request in flight failed), and so did the zygote and the ingress
    workers; the replicas, in sessions of their own, ran on until ``orphan_after_s``."""
    zygote = [p for p in held.started if "zygote" in " ".join(p.cmdline())]
    os.killpg(held.proc.pid, signal.SIGHUP)
    stops_gracefully(held, gate, zygote)


def stops_gracefully(held: Held, gate: Path, zygote: list[psutil.Process]) -> None:
    """After the signal: the held request is answered, the zygote waits for the scheduler,
    and shoal up exits 0 without a death, a restart or a traceback in its log."""
    proc, log = held.proc, held.log
    wait_log(proc, log, "shutting down")
    time.sleep(0.5)
    assert running(zygote), "the zygote died of the signal, before the scheduler closed it"
    release(gate)
    assert proc.wait(30) == 0, log.read_text()[-3000:]
    held.sender.join(30)
    assert held.outcome == [200], held.outcome
    text = log.read_text()
    for wrong in ("is gone", "died", "starting it again", "Traceback"):
        assert wrong not in text, text[-3000:]
    gone(held.started)

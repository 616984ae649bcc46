"""``shoal up`` and ``shoal head`` refuse settings they cannot run with: one line naming the
setting, exit status 1, and nothing left running."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import Up, stop_group

pytestmark = pytest.mark.timeout(120)


def refused(command: str, *args: str, state: Path, timeout_s: float = 30) -> str:
    """Run ``shoal COMMAND --state STATE ARGS`` (every port 0 unless ARGS names it) and return
    its error, the last line it writes; fail, after stopping it and all it started, if it starts."""
    ports = (
        {"--port": "0", "--http-port": "0"}
        if command == "head"
        else {"--head-port": "0", "--dashboard-port": "0", "--grpc-port": "0", "--http-port": "0"}
    )
    defaults = [x for flag, port in ports.items() if flag not in args for x in (flag, port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", command, "--state", str(state), *defaults, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")},
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_group(proc, grace_s=20)
        out, err = proc.communicate()
        raise AssertionError(f"shoal {command} {' '.join(args)} started:\n{out}\n{err}") from None
    assert proc.returncode == 1, (args, proc.returncode, out, err)
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("shoal: error: "), err
    return last.removeprefix("shoal: error: ")


@pytest.mark.parametrize(
    ("args", "config", "message"),
    [
        (["--http-port", "70000"], "", "--http-port: http_port must be from 0 to 65535, got 70000"),
        (["--cpus", "-5"], "", "--cpus: cpus must be -1 or >= 0, got -5.0"),
        (["--ingress-workers", "-4"], "", "--ingress-workers: ingress_workers must be from 0 to 256, got -4"),
        # The flag as typed, where it is not the setting's name.
        (["--grace", "-3"], "", "--grace: shutdown_grace_s must be >= 0, got -3.0"),
        (["--dashboard-port", "-1"], "", "--dashboard-port: head_http_port must be from 0 to 65535, got -1"),
        ([], "grpc_port: 70000\n", "grpc_port must be from 0 to 65535, got 70000"),
        ([], "log_level: LOUD\n", "log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got 'LOUD'"),
        ([], "log_format: xml\n", "log_format must be text or json, got 'xml'"),
        ([], "dead_after_s: 0\n", "dead_after_s must be > 0, got 0"),
    ],
)
def test_up_refuses_a_setting_out_of_its_range(
    tmp_path: Path, args: list[str], config: str, message: str
) -> None:
    if config:
        file = tmp_path / "shoal.yaml"
        file.write_text(config)
        args = [*args, "--config", str(file)]
        message = f"config file {file}: {message}"
    assert refused("up", *args, state=tmp_path / "state") == message


def test_a_second_up_on_the_ports_of_a_running_one_is_refused(up: Up, tmp_path: Path) -> None:
    grpc = up.endpoints["scheduler"].rsplit(":", 1)[1]
    http = up.endpoints["scheduler_http"].rsplit(":", 1)[1]
    head = up.endpoints["head"].rsplit(":", 1)[1]
    # Two ingress processes: the ports are bound with SO_REUSEPORT, which the kernel let
    # this second cluster share with the first.
    workers = ["--ingress-workers", "2"]
    state = tmp_path / "second"
    assert refused("up", "--grpc-port", grpc, *workers, state=state).startswith(
        f"port {grpc} is in use (grpc_port): "
    )
    assert refused("up", "--http-port", http, *workers, state=state).startswith(
        f"port {http} is in use (http_port): "
    )
    assert refused("head", "--port", head, state=state).startswith(f"port {head} is in use (head_port): ")


def test_up_refuses_the_same_port_for_grpc_and_http(tmp_path: Path) -> None:
    # A port this test holds, so that nothing else takes it; the two being equal is said first.
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = str(held.getsockname()[1])
        message = refused("up", "--grpc-port", port, "--http-port", port, state=tmp_path / "state")
    assert message == f"grpc_port and http_port are both {port}: each needs a port of its own"


def test_up_checks_every_spec_before_it_applies_any(tmp_path: Path) -> None:
    """A spec refused for its files used to stop ``shoal up`` after the specs before it were
    applied: they stayed in the store and came back on the next start."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    for folder in (allowed, outside):
        folder.mkdir()
        (folder / "m.py").write_text("class M:\n    def predict(self, inputs):\n        return inputs\n")
    good, bad = allowed / "good.yaml", outside / "bad.yaml"
    good.write_text("name: good\nbackend: python\nmodel: 'm:M'\n")
    bad.write_text("name: bad\nbackend: python\nmodel: 'm:M'\n")
    state = tmp_path / "state"
    message = refused(
        "up", "--allow-model-dir", str(allowed), "--deploy", str(good), "--deploy", str(bad), state=state
    )
    assert message.startswith("deployment 'bad': ") and "outside the folders" in message, message
    assert not list(state.glob("*.db")), list(state.iterdir())  # no store: nothing was applied

"""bench/peers.py's command line: a wrong name is refused before anything is installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PEERS = Path(__file__).resolve().parents[2] / "bench" / "peers.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PEERS), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_help_lists_the_peers() -> None:
    done = run("--help")
    assert done.returncode == 0, done.stderr
    assert "ray, mlserver, pytriton, perf-analyzer" in done.stdout


def test_an_unknown_peer_is_refused_by_name_and_nothing_is_installed() -> None:
    # Before, any argument was looked up as a requirement list: --help and typos crashed
    # with a KeyError traceback after printing "peers: <name> ...".
    done = run("perf-analyzer", "pytorch")
    assert done.returncode == 2
    assert "unknown peer pytorch" in done.stderr
    assert "Traceback" not in done.stderr
    assert "peers:" not in done.stdout, "refused before the first install began"

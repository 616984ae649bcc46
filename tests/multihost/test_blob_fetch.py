"""A model deployed from a folder on the head's host reaches a scheduler on another host
(network namespace) that has never seen it, through the cluster's own artifact store, even
when the head is killed in the middle of the scheduler's download."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.multihost.conftest import MakeCluster
from tests.multihost.helpers import X, echo, replicas_of

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
PADDING_MB = 16
_PROGRESS = re.compile(r"downloading blob://\S+: ([0-9.]+)/([0-9.]+) MB")


async def test_a_scheduler_elsewhere_gets_an_uploaded_model_though_the_head_dies_mid_download(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = await make_cluster(schedulers=1)
    code = tmp_path / "echo"
    code.mkdir()
    shutil.copy(ROOT / "examples" / "echo.py", code / "echo.py")
    (code / "weights.bin").write_bytes(os.urandom(PADDING_MB * 2**20))  # a model's heft
    spec = tmp_path / "echo.yaml"
    spec.write_text(yaml.safe_dump(echo(code, replicas=1)))
    # What the head sends leaves at 40 Mbit/s (5 MB/s): the download lasts a few seconds.
    head = cluster.head_host
    head.run(
        "tc",
        "qdisc",
        "replace",
        "dev",
        head.dev,
        "root",
        "tbf",
        "rate",
        "40mbit",
        "burst",
        "64kb",
        "latency",
        "500ms",
    )

    # The head is on another host's address: shoal deploy uploads the folder on its own.
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "shoal.cli", "--head", cluster.head_address, "deploy", "--no-wait", str(spec)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**cluster.env, "SHOAL_HEAD": ""},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"uploaded {code}/ as sha256:" in proc.stdout

    def downloading(status: dict[str, object]) -> bool:
        for r in replicas_of(status):
            found = _PROGRESS.search(r.get("message", ""))
            if r["state"] == "DOWNLOADING" and found and 0 < float(found[1]) < float(found[2]):
                return True
        return False

    await cluster.wait_for(downloading, timeout_s=30, what="the scheduler part-way through the download")
    assert cluster.head is not None
    cluster.head.signal(signal.SIGKILL)
    cluster.head.wait(10)
    cluster.restart_head()
    await cluster.reconnect()

    await cluster.wait_ready("echo", 1, timeout_s=45)
    outputs, _ = await cluster.send("echo", {"x": X})
    np.testing.assert_array_equal(outputs["x"], X)
    # It went on from the bytes it had, not from the start.
    log = cluster.schedulers[0].log.read_text()
    resumed = re.search(r"from the head failed at byte (\d+)", log)
    assert resumed is not None and int(resumed[1]) > 0, log[-3000:]

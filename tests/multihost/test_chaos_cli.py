"""``shoal chaos`` as a user runs it, against a cluster on loopback (no namespaces needed):
a scheduler killed, then the head killed and started again by ``--head-restart-cmd``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.testing.cluster import ProcessCluster
from tests.multihost.helpers import echo, exactly

pytestmark = pytest.mark.timeout(90)


async def test_chaos_kills_a_scheduler_and_restarts_the_head(tmp_path: Path, examples_dir: Path) -> None:
    restarted: list[int] = []
    async with ProcessCluster(tmp_path, schedulers=2) as cluster:
        await cluster.deploy(echo(examples_dir, replicas=2))
        await cluster.wait_for(exactly(2), what="two replicas")
        assert cluster.head is not None
        port = cluster.head_address.rsplit(":", 1)[1]
        http = cluster.head.endpoints["head_http"].rsplit(":", 1)[1]
        state = str(cluster.head.state)
        head_cmd = shlex.join(
            [sys.executable, "-m", "shoal.cli", "head", "--port", port, "--http-port", http, "--state", state]
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "shoal.chaos",
                "--head",
                cluster.head_address,
                "echo",
                "--url",
                cluster.scheduler_address(0),
                "--kill-scheduler",
                "1",
                "--restart-head",
                "6",
                "--head-restart-cmd",
                head_cmd,
                "--head-log",
                str(tmp_path / "restarted-head.log"),
                "--duration",
                "6",
                "--settle",
                "1",
                "--rate",
                "100",
                "--max-failed",
                "0",
                "--json",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=cluster.env,  # the restarted head gets the same short intervals
            )
            raw_out, raw_err = await asyncio.wait_for(proc.communicate(), 70)
            out, err = raw_out.decode(), raw_err.decode()
            doc = json.loads(out) if out.startswith("{") else {}
            for f in doc.get("faults", []):
                m = re.search(r"restarted as pid (\d+)", f["target"])
                if m:
                    restarted.append(int(m.group(1)))
            assert proc.returncode == 0, err[-3000:] + out[-3000:]
            assert doc["failed"] == 0
            kinds = {f["kind"]: f for f in doc["faults"]}
            assert set(kinds) == {"kill_scheduler", "restart_head"}
            assert all(f["recovered_s"] is not None and f["recovered_s"] < 15 for f in kinds.values()), kinds
            assert doc["latency_ms"]["after"]["requests"] > 0
            # The restarted head runs the cluster: one scheduler left, both replicas on it.
            await cluster.reconnect()
            status = await cluster.wait_for(exactly(2), what="two replicas under the new head")
            assert len({r["scheduler"] for r in status["deployments"][0]["replicas"]}) == 1
            assert restarted and cluster.head.proc is not None and cluster.head.proc.poll() is not None
        finally:
            for pid in restarted:
                try:
                    os.killpg(pid, signal.SIGKILL)  # the head and nothing else: its own session
                except ProcessLookupError:
                    pass


def test_chaos_refuses_a_head_restart_it_cannot_do() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "shoal.chaos", "--head", "127.0.0.1:1", "echo", "--restart-head", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert "--head-restart-cmd" in proc.stderr

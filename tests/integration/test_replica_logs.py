"""A model that prints in a loop keeps its rotated log within ``replica_log_max_mb``. Real
processes on port 0.

Before, the scheduler copied the whole log once it was past the cap: what the model wrote in
a ping interval, far more than the cap, went to ``.log.1`` as well (221 MB each for a 10 MB
cap, the scheduler reading and writing all of it again every second)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from shoal.testing.cluster import ProcessCluster
from shoal.testing.wait import until

pytestmark = pytest.mark.timeout(60)

CHATTY = """
import sys
import threading
import time


class Chatty:
    \"\"\"Prints 64 lines of about 1 KB every 5 ms (about 12 MB a second), for ever.\"\"\"

    def __init__(self) -> None:
        threading.Thread(target=self._print, daemon=True).start()

    def _print(self) -> None:
        n = 0
        while True:
            for _ in range(64):
                n += 1
                sys.stdout.write(f"line {n} " + "y" * 1000 + "\\n")
            time.sleep(0.005)

    def predict(self, inputs):
        return inputs
"""

CAP_MB = 0.25


async def test_a_model_printing_in_a_loop_keeps_its_rotated_log_within_the_cap(tmp_path: Path) -> None:
    (tmp_path / "chatty.py").write_text(CHATTY)
    env = {"SHOAL_REPLICA_LOG_MAX_MB": str(CAP_MB)}
    async with ProcessCluster(tmp_path, env=env) as cluster:
        spec = {"name": "chatty", "backend": "python", "model": "chatty:Chatty", "base_dir": str(tmp_path)}
        await cluster.deploy({**spec, "resources": {"cpus": 0.1}})
        (replica,) = await cluster.wait_ready("chatty", 1)
        (log,) = cluster.root.rglob(f"replica_{replica['id']}.log")
        rotated = log.with_name(log.name + ".1")
        await until(rotated.exists, "the first rotation")

        sizes, heads = [], []
        for _ in range(10):  # over a few ping intervals (0.2 s in test clusters): a few rotations
            text = rotated.read_bytes()  # empty while the scheduler rewrites it
            sizes.append(len(text))
            if text:
                heads.append(text[:40])
            await asyncio.sleep(0.1)
        assert max(sizes) <= CAP_MB * 2**20, sizes
        # Each from a line's start: the model's, or the replica's own first lines (timed).
        assert all(re.match(rb"line \d+ y|\d\d:\d\d:\d\d ", head) for head in heads), heads

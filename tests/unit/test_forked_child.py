"""``shoal.zygote.ForkedChild``: a forked replica's exit status, and when it is not known."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import pytest

from shoal.zygote import UNKNOWN_EXIT, ForkedChild

pytestmark = pytest.mark.timeout(10)


async def test_a_reported_exit_status_is_known() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10)"])
    try:
        child = ForkedChild(proc.pid)
        child.exited(3)  # as the zygote reports it
        assert await child.wait() == 3
        assert child.status_known
    finally:
        proc.kill()
        proc.wait()


async def test_a_child_that_outlives_its_zygote_ends_with_an_unknown_status() -> None:
    # Its end is seen through its pidfd, with no status: UNKNOWN_EXIT stands in, and the
    # scheduler must not take it for the model's crash (shoal/scheduler/supervisor.py).
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10)"])
    try:
        child = ForkedChild(proc.pid)
        child.orphaned()
        child.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(child.wait(), 5) == UNKNOWN_EXIT
        assert not child.status_known
    finally:
        proc.kill()
        proc.wait()

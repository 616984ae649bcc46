"""``shoal.core.subreaper``: away from Linux nothing changes; the orphan reaper reaps orphans
alone (integration tests cover the replica: ``tests/integration/test_detached_children.py``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shoal.core import subreaper


def test_elsewhere_than_on_linux_no_process_becomes_a_subreaper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert subreaper.become_subreaper() is False


# Run in a process of its own: a subreaper for good, and the reaper reaps its children.
REAPER_SCRIPT = """
import json, multiprocessing, os, subprocess, sys, threading, time
from shoal.core.subreaper import OrphanReaper, become_subreaper

assert become_subreaper()
# Orphans: a shell leaves three helpers and exits; they exit too, and are given to us.
subprocess.run(["sh", "-c", "true & true & true &"], check=True)
# A model thread's own child, which exits with 3 and is waited for later, by its Popen.
hold = threading.Event()
result = {}

def model():
    child = subprocess.Popen(["sh", "-c", "exit 3"])
    hold.wait()
    result["thread"] = child.wait()

thread = threading.Thread(target=model)
thread.start()
# A multiprocessing child of the main thread that exits with 4 and is joined later.
process = multiprocessing.get_context("fork").Process(target=os._exit, args=(4,))
process.start()
time.sleep(0.5)
reaper = OrphanReaper(after_s=5.0)
young = reaper.scan(100.0)
old = reaper.scan(105.0)
hold.set()
thread.join()
process.join()
print(json.dumps({"young": young, "old": old, "thread": result["thread"], "mp": process.exitcode}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="child subreapers are Linux's")
def test_the_reaper_reaps_exited_orphans_and_leaves_what_the_model_waits_for() -> None:
    # A replica is a subreaper: a model that ran 'sh -c "helper &"' per request left a zombie
    # per request in it for as long as it ran (50 after 50 requests).
    done = subprocess.run(
        [sys.executable, "-c", REAPER_SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    seen = json.loads(done.stdout)
    assert seen["young"] == 0  # exited less than after_s ago: left
    assert seen["old"] == 3  # the three orphans, and nothing else
    assert seen["thread"] == 3  # its own Popen still reads its exit status
    assert seen["mp"] == 4  # and a multiprocessing child its exit code

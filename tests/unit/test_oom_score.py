"""A replica's ``oom_score_adj`` (setting ``replica_oom_score_adj``, docs/operations.md,
"Memory"): set at its start, and a value it may not set is logged, not fatal."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shoal.replica_main import first_for_the_oom_killer

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(not Path("/proc/self/oom_score_adj").exists(), reason="Linux only"),
]


def test_the_value_is_what_the_process_then_has() -> None:
    # In a process of its own: raising it here would leave this test process first in line.
    code = (
        "from shoal.replica_main import first_for_the_oom_killer\n"
        "first_for_the_oom_killer(700)\n"
        "print(open('/proc/self/oom_score_adj').read().strip())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=True)
    assert out.stdout.strip() == "700"


def test_a_value_the_process_may_not_set_is_logged_and_the_replica_starts_anyway(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Lowering it below the scheduler's without CAP_SYS_RESOURCE: the kernel answers EACCES."""

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", "/proc/self/oom_score_adj")

    monkeypatch.setattr("shoal.replica_main.open", refused, raising=False)
    caplog.set_level(logging.INFO, logger="shoal.replica")
    first_for_the_oom_killer(-5)  # no exception: the replica goes on starting
    assert [r.getMessage() for r in caplog.records] == [
        "oom_score_adj not set to -5 (setting replica_oom_score_adj): "
        "[Errno 13] Permission denied: '/proc/self/oom_score_adj'"
    ]

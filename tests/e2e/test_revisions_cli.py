"""``shoal up`` and ``shoal deploy`` agree on a spec: the same file deployed again is no change."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import Up, shoal

pytestmark = pytest.mark.timeout(120)


def test_deploying_the_file_up_deployed_is_unchanged_and_has_one_revision(up: Up, examples_dir: Path) -> None:
    out = shoal("deploy", str(examples_dir / "echo.yaml"), head=up.head).stdout
    assert "deployment echo unchanged" in out, out
    history = shoal("history", "echo", head=up.head).stdout.splitlines()
    assert len(history) == 2, history
    assert history[1].split()[0] == "1" and history[1].rstrip().endswith("current")
    events = shoal("events", "echo", head=up.head).stdout.splitlines()
    assert [line.split()[3] for line in events[1:]] == ["created"], events

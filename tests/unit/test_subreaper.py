"""``shoal.core.subreaper`` away from Linux: nothing changes (integration tests cover Linux:
``tests/integration/test_detached_children.py``)."""

from __future__ import annotations

import sys

import pytest

from shoal.core import subreaper


def test_elsewhere_than_on_linux_no_process_becomes_a_subreaper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert subreaper.become_subreaper() is False

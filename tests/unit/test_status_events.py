"""``shoal status`` lists the cluster's latest events under its tables: a replica that died
shows only as its replacement's row otherwise, with no word of why."""

from __future__ import annotations

from typing import Any

from shoal.cli.commands import STATUS_EVENTS, render_status
from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.head.node import HeadNode
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers


def status(events: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schedulers": [], "deployments": [], "events": events}


def event(i: int) -> dict[str, Any]:
    return {
        "at": 1_700_000_000.0 + i,
        "kind": "replica_dead",
        "message": f"replica echo-{i:03d} died: used 812 MB of memory, over its limit of 400 MB",
        "deployment": "echo",
        "replica_id": f"echo-{i:03d}",
        "scheduler_id": "s1",
    }


def test_the_latest_events_are_listed_oldest_first_with_their_reason() -> None:
    lines = render_status(status([event(i) for i in range(STATUS_EVENTS + 5)])).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("EVENT TIME"))
    rows = lines[header + 1 :]
    rows = [r for r in rows if "replica echo-" in r]
    assert len(rows) == STATUS_EVENTS
    assert "replica echo-005 died" in rows[0] and "replica echo-014 died" in rows[-1]
    assert all("over its limit of 400 MB" in r and "replica_dead" in r for r in rows)


def test_no_events_no_event_table() -> None:
    assert "EVENT TIME" not in render_status(status([]))
    assert "EVENT TIME" not in render_status({"schedulers": [], "deployments": []})


async def test_the_head_answers_its_last_50_events_and_status_shows_10(
    store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    """docs/operations.md: `shoal status --json` and `GET /api/status` carry the last 50
    events the head kept, `shoal status` the latest 10, oldest first."""
    node = HeadNode(Settings(), store, fleet, clock)
    try:
        for i in range(120):
            node.state.event("replica_died", f"replica r{i:03d} died: used 812 MB of memory")
        status = await node.status()
        assert [e.message.split()[1] for e in status.events] == [f"r{i:03d}" for i in range(70, 120)]
        shown = [line for line in render_status(status.to_json()).splitlines() if "replica r" in line]
        assert [line.split("replica ")[1][:4] for line in shown] == [f"r{i:03d}" for i in range(110, 120)]
    finally:
        await node.aclose()


def test_a_message_cannot_write_to_the_terminal_or_start_a_row() -> None:
    """A replica's death reason is the last line of its log, which a model's crash writes
    raw (``ValueError: <the client's text>`` from Python's own excepthook): its escape
    sequences reached the terminal of whoever ran ``shoal status``, and a newline started
    a row of the writer's making."""
    message = "process exited with code 1: ValueError: \x1b[2J\x1b]0;pwned\x07\nfake row"
    crash = {**event(0), "message": message}
    reason = {"name": "echo", "replicas": [], "target_replicas": 1, "spec": {}}
    reason["pending_reason"] = "bad\rmodel"
    shown = render_status({"schedulers": [], "deployments": [reason], "events": [crash]})
    assert "\x1b" not in shown and "\x07" not in shown and "\r" not in shown
    assert "ValueError: \\x1b[2J\\x1b]0;pwned\\x07\\nfake row" in shown
    assert "bad\\rmodel" in shown
    assert not any(line.startswith("fake row") for line in shown.splitlines())

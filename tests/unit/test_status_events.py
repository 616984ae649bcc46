"""``shoal status`` lists the cluster's latest events under its tables: a replica that died
shows only as its replacement's row otherwise, with no word of why."""

from __future__ import annotations

from typing import Any

from shoal.cli.commands import STATUS_EVENTS, render_status


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

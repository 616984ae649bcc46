"""Replica logs stay bounded: a log past ``replica_log_max_mb`` has its newest
``replica_log_max_mb`` moved to ``.log.1`` and starts afresh, and only the newest
``replica_logs_kept`` logs of ended replicas stay; what is kept is still read whole
(``shoal logs`` reads through ``ReplicaSupervisor.read_log``)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.spec import parse_spec
from shoal.errors import NotFound
from shoal.scheduler.router import Router
from shoal.scheduler.supervisor import ReplicaSupervisor, rotate_log
from shoal.testing.fakes import FakeLauncher, FakeReplicas

pytestmark = pytest.mark.timeout(10)

SPEC = parse_spec({"name": "echo", "backend": "python", "model": "m.py"})
KB = 1024


def make(
    tmp_path: Path, clock: FakeClock, **settings: Any
) -> tuple[ReplicaSupervisor, FakeLauncher, asyncio.Event]:
    """A supervisor over fakes, its launcher, and an event its ``on_change`` sets (the last
    thing it does when a replica ends)."""
    launcher = FakeLauncher()
    changed = asyncio.Event()
    s = Settings(ping_interval_s=1.0, **settings)
    sup = ReplicaSupervisor(
        s,
        Router("s1", s, FakeReplicas(), clock=clock),
        FakeReplicas(),
        log_dir=tmp_path / "logs",
        scheduler_address=lambda: "s1:7000",
        on_change=changed.set,
        launcher=launcher,
        clock=clock,
    )
    return sup, launcher, changed


@pytest.fixture
async def clock() -> AsyncIterator[FakeClock]:
    yield FakeClock()


async def read(sup: ReplicaSupervisor, rid: str, tail_bytes: int = 0) -> bytes:
    return b"".join([c async for c in sup.read_log(rid, tail_bytes=tail_bytes)])


async def tick(clock: FakeClock) -> None:
    """One ping interval: the supervisor's loop runs once and sleeps again."""
    await clock.wait_for_sleepers(1)
    clock.advance(1.0)
    await clock.wait_for_sleepers(1)


def test_a_file_written_in_append_mode_carries_on_at_the_start_after_rotation(tmp_path: Path) -> None:
    # The replica's stdout is an inherited descriptor in append mode: after the copy and
    # the truncation its next write lands at offset 0, not after a hole.
    path = tmp_path / "replica_r.log"
    with open(path, "ab", buffering=0) as child:
        child.write(b"old line\n" * 3)
        rotate_log(path, KB)
        child.write(b"new line\n")

    assert path.read_bytes() == b"new line\n"
    assert (tmp_path / "replica_r.log.1").read_bytes() == b"old line\n" * 3


def test_the_rotated_copy_keeps_the_newest_whole_lines_within_the_cap(tmp_path: Path) -> None:
    # A model printing in a loop writes far past the cap between two checks: .log.1 keeps
    # the cap's worth of its newest lines, from a line's start, not the whole file.
    path = tmp_path / "replica_r.log"
    lines = [f"line {i:04d}\n".encode() for i in range(1000)]  # 10 bytes each
    path.write_bytes(b"".join(lines))

    rotate_log(path, 2505)  # the last 2,505 bytes start inside line 749

    assert (tmp_path / "replica_r.log.1").read_bytes() == b"".join(lines[750:])
    assert path.read_bytes() == b""


async def test_a_log_past_its_cap_moves_to_dot_1_and_is_still_read_whole(
    tmp_path: Path, clock: FakeClock
) -> None:
    sup, _, _ = make(tmp_path, clock, replica_log_max_mb=4 / 1024)  # 4 KB
    sup.start()
    try:
        await sup.create("echo-1", SPEC)
        log = sup.log_dir / "replica_echo-1.log"
        with open(log, "ab") as child:
            child.write(b"a" * 3 * KB)
        await tick(clock)
        assert not log.with_name("replica_echo-1.log.1").exists()  # under the cap: left alone

        with open(log, "ab") as child:
            child.write(b"b" * 2 * KB)
        await tick(clock)
        with open(log, "ab") as child:
            child.write(b"c" * KB)

        # Its newest 4 KB (no line starts in them: the bytes as they are), not all 5.
        assert log.stat().st_size == KB
        assert log.with_name("replica_echo-1.log.1").stat().st_size == 4 * KB
        assert await read(sup, "echo-1") == b"a" * 2 * KB + b"b" * 2 * KB + b"c" * KB
        assert await read(sup, "echo-1", tail_bytes=2 * KB) == b"b" * KB + b"c" * KB
        assert await read(sup, "echo-1", tail_bytes=KB // 2) == b"c" * (KB // 2)
    finally:
        await sup.aclose(0)


async def test_only_the_newest_logs_of_ended_replicas_are_kept(tmp_path: Path, clock: FakeClock) -> None:
    sup, launcher, changed = make(tmp_path, clock, replica_logs_kept=2)
    sup.start()
    try:
        await sup.create("running", SPEC)
        for i in range(4):
            rid = f"crash-{i}"
            await sup.create(rid, SPEC)
            os.utime(sup.log_dir / f"replica_{rid}.log", (1000 + i, 1000 + i))  # older first
            changed.clear()
            launcher.process(rid).exit(1, f"boom {i}\n")
            await asyncio.wait_for(changed.wait(), 2.0)  # the supervisor's last step for it
        # The running replica's log is older than all of them, and kept.
        os.utime(sup.log_dir / "replica_running.log", (1, 1))

        assert sorted(p.name for p in sup.log_dir.iterdir()) == [
            "replica_crash-2.log",
            "replica_crash-2.spec.json",
            "replica_crash-3.log",
            "replica_crash-3.spec.json",
            "replica_running.log",
            "replica_running.spec.json",
        ]
        assert await read(sup, "crash-3") == b"boom 3\n"
        with pytest.raises(NotFound):
            await read(sup, "crash-0")
    finally:
        await sup.aclose(0)


async def test_a_starting_scheduler_deletes_all_but_the_newest_old_logs(
    tmp_path: Path, clock: FakeClock
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    for i in range(5):
        for suffix in (".log", ".log.1", ".spec.json"):
            (logs / f"replica_old-{i}{suffix}").write_text("x")
        os.utime(logs / f"replica_old-{i}.log", (1000 + i, 1000 + i))
    (logs / "scheduler.log").write_text("not a replica's")
    sup, _, _ = make(tmp_path, clock, replica_logs_kept=3)

    sup.start()
    await sup.aclose(0)

    assert sorted(p.name for p in logs.glob("*.log")) == [
        "replica_old-2.log",
        "replica_old-3.log",
        "replica_old-4.log",
        "scheduler.log",
    ]
    assert len(list(logs.glob("*.log.1"))) == len(list(logs.glob("*.spec.json"))) == 3

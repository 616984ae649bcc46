"""Finding shoal's processes on this machine, and killing and restarting them: a fault only
hits a process whose command line shows it is the one the head names."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def local_replica(pid: int, replica_id: str) -> bool:
    """Whether ``pid`` is, on this machine, the replica process ``replica_id``."""
    cmd = _cmdline(pid) if pid > 0 else []
    return "shoal.replica_main" in cmd and replica_id in cmd


def local_scheduler(pid: int) -> bool:
    """Whether ``pid`` is, on this machine, a ``shoal scheduler`` process (not ``shoal up``)."""
    cmd = _cmdline(pid) if pid > 0 else []
    return "scheduler" in cmd and any("shoal" in part for part in cmd)


def find_head_pid(head_address: str) -> int | None:
    """The process on this machine that listens on the head's port and runs ``shoal head``."""
    heads = listening_pids(head_address, "head")
    return min(heads) if heads else None


def listening_pids(address: str, role: str = "") -> set[int]:
    """The shoal processes on this machine (with ``role``, say ``head``, in their command
    line when given) that listen on ``address``'s port: a scheduler whose inference port the
    load targets is among them (its registered address, the control port, differs from that
    port). Empty when none here listens on it."""
    try:
        port = int(address.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return set()
    pids = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if (role and role not in cmd) or not any("shoal" in part for part in cmd):
            continue
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns):
            pids.add(proc.pid)
    return pids


def head_restarter(head_address: str, cmd: str, pid: int, log_path: Path) -> Callable[[], Awaitable[str]]:
    """Kill the head process ``pid`` with SIGKILL, wait for it to go, then run ``cmd`` (a shell
    command, detached, its output appended to ``log_path``)."""

    async def restart() -> str:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(pid) and time.monotonic() < deadline:
            with contextlib.suppress(psutil.NoSuchProcess):
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            await asyncio.sleep(0.02)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                shell=True,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        return f"head pid {pid} killed; restarted as pid {proc.pid}: {cmd}"

    return restart

"""Processes that leave their parent's process group, and end with it all the same.

A replica's process group is killed with it (``shoal.scheduler.child.kill_group``), but a
process its model detaches (``setsid``, ``start_new_session=True``, a daemon forked twice)
leaves the group, and once its parent is gone the kernel gives it to init: it ran on after
its replica, with its memory, GPU and ports. A child subreaper (Linux 3.4+, ``prctl``) is
given instead the orphans among its descendants: a replica that is one keeps what its model
detached among its descendants and ends them when it exits (:func:`end_descendants`); the
zygote that forks replicas is one too, and ends what a replica killed with SIGKILL (which
cleans up nothing) left to it (:func:`adopted`, :func:`kill_tree`); so is the scheduler's
process, for the replicas it starts itself (``shoal.scheduler.child.end_adopted``).

Elsewhere than on Linux :func:`become_subreaper` does nothing and says so. Out of reach
on Linux too: a process started outside this process tree on the model's behalf (a
``systemd-run`` unit, a container, a process another daemon starts).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Container, Iterator, Sequence

import psutil

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
PR_GET_CHILD_SUBREAPER = 37

ENDING_GRACE_S = 1.0
"""How long :func:`end_descendants` gives its descendants after SIGTERM, then after SIGKILL.
Short: a replica ends them on its way out, 1-2 s before its scheduler would kill it."""


def become_subreaper() -> bool:
    """Make this process a child subreaper: orphaned descendants become its children rather
    than init's. Not inherited by the children it forks. False where it cannot be (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def is_subreaper() -> bool:
    """Whether this process is a child subreaper (:func:`become_subreaper`)."""
    if not sys.platform.startswith("linux"):
        return False
    flag = ctypes.c_int(0)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0 and flag.value)
    except (OSError, AttributeError):
        return False


def end_descendants(grace_s: float = ENDING_GRACE_S) -> int:
    """End every descendant of this process: SIGTERM, up to ``grace_s`` for them to exit, then
    SIGKILL for those left (and up to ``grace_s`` again), then reap this process's children.
    Returns how many there were. For a process on its way out: it reaps children whatever
    started them, their exit statuses lost to code that would have waited for them."""
    try:
        me = psutil.Process()
    except psutil.Error:
        return 0
    ended: set[int] = set()
    # Another SIGKILL round for what was forked between a listing and its signals.
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
        family = _descendants(me)
        if not family:
            break
        ended.update(p.pid for p in family)
        for proc in family:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)  # psutil checks it is the same process (its start time)
        deadline = time.monotonic() + grace_s
        while True:
            reap()
            if not any(_runs(p) for p in family) or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
    reap()
    return len(ended)


def adopted(known: Container[int]) -> list[psutil.Process]:
    """This process's children whose pid is not in ``known``: for a subreaper that starts no
    process but those it knows, the orphans it was given."""
    try:
        return [p for p in psutil.Process().children() if p.pid not in known]
    except psutil.Error:
        return []


def kill_tree(proc: psutil.Process) -> None:
    """SIGKILL ``proc`` and its descendants (those gone meanwhile skipped). Not reaped."""
    with contextlib.suppress(psutil.Error):
        for member in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                member.kill()


def reaped() -> Iterator[tuple[int, int]]:
    """Reap the children of this process that have exited: ``(pid, wait status)`` of each."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def reap() -> None:
    """Reap every child of this process that has exited (their exit statuses are dropped)."""
    for _ in reaped():
        pass


def _descendants(proc: psutil.Process) -> Sequence[psutil.Process]:
    try:
        return [p for p in proc.children(recursive=True) if _runs(p)]
    except psutil.Error:
        return []


def _runs(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False

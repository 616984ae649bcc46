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


class OrphanReaper:
    """Reaps the orphans a long-lived subreaper (a replica) is given, once they exit.

    A subreaper's adopted orphans that exit stay zombies until it waits for them, and a
    replica, running a model's code, waited for none: a model that ran ``sh -c "helper &"``
    per request left a zombie per request, a process-table slot each, until the replica
    exited (50 after 50 requests; under a pids limit of a few thousand, as containers
    have, forks then fail for every process of the pod).

    Which children are orphans is read from the kernel: ``/proc/self/task/TID/children``
    lists each child under the thread that forked it, and an adopted orphan under the main
    thread (``find_new_reaper`` picks the thread group's first live thread). A zombie under
    another thread is a child the model's own code started there, and is left to it
    (``Popen.wait``, ``multiprocessing`` and asyncio's child watchers wait for it with its
    exit status). One under the main thread that has been a zombie for ``after_s`` is
    reaped, except a ``multiprocessing`` child (it would read as alive for good): code that
    waits for a child does so as it exits, so that one is left only by code that never
    will, or that polls it seldom (``Popen.poll`` then reads 0, not its exit status).
    Without that file (a kernel without CONFIG_PROC_CHILDREN) every zombie child counts.

    :meth:`scan` costs one ``waitid`` when no child is a zombie."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self.reaped = 0
        self._since: dict[int, float] = {}  # zombie pid -> when first seen one

    def scan(self, now: float) -> int:
        """Reap the orphans that have been zombies ``after_s`` or longer at ``now``
        (monotonic seconds); how many were reaped."""
        try:
            if os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                self._since.clear()
                return 0
        except ChildProcessError:
            self._since.clear()
            return 0
        known = _multiprocessing_children()
        zombies = [pid for pid in _main_thread_children() if pid not in known and _zombie(pid)]
        self._since = {pid: self._since.get(pid, now) for pid in zombies}
        count = 0
        for pid, since in list(self._since.items()):
            if now - since < self.after_s:
                continue
            del self._since[pid]
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    count += 1
        self.reaped += count
        return count


def _main_thread_children() -> list[int]:
    """This process's children listed under its main thread (see :class:`OrphanReaper`);
    every child where the kernel does not list them by thread."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            return [int(pid) for pid in f.read().split()]
    except OSError:
        try:
            return [p.pid for p in psutil.Process().children()]
        except psutil.Error:
            return []


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # The state follows the command's closing parenthesis (a command may hold one too).
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"Z"


def _multiprocessing_children() -> set[int]:
    """Pids of the ``multiprocessing`` processes this process started and has not joined:
    those its own code waits for (``Process.join``, ``is_alive``), never reaped here."""
    module = sys.modules.get("multiprocessing.process")
    children = getattr(module, "_children", ()) if module is not None else ()
    pids = set()
    for child in list(children):
        try:
            pid = child.pid  # None before start; ValueError once closed
        except ValueError:
            continue
        if isinstance(pid, int):
            pids.add(pid)
    return pids


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

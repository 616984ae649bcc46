"""Replica processes as children of the scheduler: started with the standard
library's ``subprocess`` and awaited through a pidfd.

Why not ``asyncio.create_subprocess_exec``: under uvloop it forks through
libuv, and a plain ``fork()`` in a process that runs gRPC threads runs gRPC's
fork handlers in the child, which sometimes crashed replicas with SIGSEGV
before they reached ``exec``. ``subprocess.Popen`` uses vfork/posix_spawn on
Linux, which run no fork handlers; a pidfd (Linux 5.3+) then tells the event
loop when the child exits, with no thread per child.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO

from shoal.core.subreaper import adopted, is_subreaper, kill_tree

_started: set[int] = set()
"""Pids of this process's children it started (or took over: ``watch_adopted``), not yet
reaped: those :func:`end_adopted` leaves alone."""
_reaping: set[int] = set()
"""Pids of the adopted children killed and not reaped yet."""


class ChildProcess:
    """A started child process. Create with :meth:`spawn` from a running event loop."""

    def __init__(self, popen: subprocess.Popen[bytes], leads_group: bool = False) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._leads_group = leads_group
        self.status_known = True  # waited for here: its exit status is its own
        self._exited = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._pidfd = os.pidfd_open(popen.pid)
        _started.add(popen.pid)
        self._loop.add_reader(self._pidfd, self._check)
        self._check()

    @classmethod
    def spawn(
        cls, argv: Sequence[str], *, env: Mapping[str, str], out: IO[bytes] | None, new_session: bool = True
    ) -> ChildProcess:
        """Start ``argv`` with ``env``, stdout and stderr to ``out`` (None: this process's)."""
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=dict(env),
            start_new_session=new_session,
            close_fds=True,
        )
        return cls(popen, leads_group=new_session)

    def _check(self) -> None:
        if self._exited.is_set():
            return
        if self._leads_group and self._popen.returncode is None and _ended_unreaped(self.pid):
            # What it started and left running (kill_group). Before it is reaped: its pid is
            # still its group's id, so the signal can reach no process that reused the number.
            kill_group(self.pid)
        if self._popen.poll() is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            _started.discard(self.pid)
            end_adopted()  # what it left us (the kernel hands it over before the exit shows)
            self._exited.set()

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    async def wait(self) -> int:
        await self._exited.wait()
        code = self._popen.returncode
        assert code is not None
        return code

    def send_signal(self, sig: int) -> None:
        """Signal the child unless it has already exited (and been reaped). SIGKILL to one
        started in a session of its own kills its process group: what it started, too."""
        if self._popen.poll() is None:
            if sig == signal.SIGKILL and self._leads_group:
                # Not reaped (poll), so its pid is still its group's id: no other's.
                kill_group(self.pid)
            try:
                self._popen.send_signal(sig)
            except ProcessLookupError:
                pass


def _ended_unreaped(pid: int) -> bool:
    """Whether child ``pid`` has exited, without reaping it (it stays a zombie)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already
        return False


def kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads. A replica starts in a session of its own, and
    the processes its model starts stay in its group: killed alone (over its memory limit,
    for missed pings, after its grace), it left them running, orphaned, with their memory
    (a child holding 300 MB per replacement: 4 left, 1.2 GB, 9 s into a crash loop); and
    so did one that exited by itself (drained, scaled away: a 100 MB child left).

    Also once the leader has exited: the kernel gives its number to no new process while
    its group still has members, and with none left there is nothing to kill. (A
    ``ChildProcess`` signals it before reaping its leader, so not even then.)"""
    if pid <= 1:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def took_over(pid: int, ended: bool = False) -> None:
    """Child ``pid``, started by another process (the zygote, gone now: its children came to
    this one as a subreaper), is this process's to reap (``ended``: it was reaped, or it is
    not this process's child)."""
    if ended:
        _started.discard(pid)
    else:
        _started.add(pid)


def end_adopted() -> None:
    """In a child subreaper (``shoal scheduler``, ``shoal up``: ``shoal.core.subreaper``),
    kill the children it was given, with their descendants, and reap them once they have
    exited: what a replica started as a new process and killed with SIGKILL had detached
    from its process group. Only children outside this process's session: a replica starts
    in a session of its own, and what it starts can never come back to this one; this
    process's own children it did not start here (a library's) stay in it. Call from the
    event loop, once a child has exited."""
    if not is_subreaper():
        return
    loop = asyncio.get_running_loop()
    mine = os.getsid(0)
    for orphan in adopted(_started):
        try:
            if orphan.pid in _reaping or os.getsid(orphan.pid) == mine:
                continue
            pidfd = os.pidfd_open(orphan.pid)
        except (ProcessLookupError, PermissionError):
            continue  # reaped by another meanwhile
        kill_tree(orphan)
        _reaping.add(orphan.pid)
        loop.add_reader(pidfd, _reap_adopted, loop, orphan.pid, pidfd)


def _reap_adopted(loop: asyncio.AbstractEventLoop, pid: int, pidfd: int) -> None:
    """Reap the killed orphan ``pid`` (by its pidfd: no other process), then end what it in
    turn left to this process."""
    with contextlib.suppress(ChildProcessError):
        if os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG) is None:
            return  # not yet
    loop.remove_reader(pidfd)
    os.close(pidfd)
    _reaping.discard(pid)
    end_adopted()

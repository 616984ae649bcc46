"""Ingress workers and replicas forked from a zygote, so they share the memory of the
modules every shoal process imports.

A fresh ``python -m shoal.replica_main`` imports about 500 modules (grpc, protobuf, numpy,
pydantic, shoal itself) into about 35 MB of memory of its own, and every ingress worker and
replica repeats that. ``shoal up`` and ``shoal scheduler`` instead fork a zygote from their
own process once it has imported everything, before it starts a thread, an event loop or
gRPC (grpc and fork do not mix once channels or servers exist). The zygote forks each ingress
worker and replica on request: the pages of those modules stay shared copy-on-write between
the scheduler, the zygote and every child, and PSS (which splits a shared page between its
sharers) counts them about once. ``gc.freeze()`` before the fork keeps the collector from
writing into those objects (which would unshare their pages).

A forked child is what ``python -m MODULE ARGS`` was: its own process (its own session for
a replica), stdin ``/dev/null``, stdout and stderr to the file the scheduler gave, the
environment it was given, ``sys.argv`` as ``-m`` sets it, and a command line that still reads
``python -m MODULE ARGS`` (rewritten in place, cut to the space the scheduler's own command
line had). It starts in milliseconds, since nothing is imported again.

The scheduler's end is :class:`Zygote`; :meth:`Zygote.launcher` and :meth:`Zygote.spawn`
start children through it and fall back to a plain ``subprocess`` start (the children's
modules are not forkable here, the zygote is gone, or it could not fork). Children stay
children of the zygote, which reaps them and tells the scheduler each one's exit status.
It is a child subreaper (``shoal.core.subreaper``): what a replica killed with SIGKILL
leaves running outside its process group comes to the zygote, which kills it.
The zygote exits when the scheduler closes it or goes away; its children do not: they go on
as before (a replica exits on its own once its scheduler is unreachable).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import importlib
import io
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any, NoReturn

from shoal.core.subreaper import adopted, become_subreaper, kill_tree, reaped
from shoal.scheduler.child import ChildProcess, end_adopted, kill_group, took_over

log = logging.getLogger("shoal.zygote")

FORKABLE = ("shoal.ingress_worker", "shoal.replica_main")
"""The modules a zygote runs as ``python -m``; it has imported them before it forks."""

PRELOAD = (*FORKABLE, "uvloop")
"""Imported before the fork (``uvloop``: ``shoal.aio`` imports it when a loop starts)."""

MESSAGE_BYTES = 1 << 20
REPLY_TIMEOUT_S = 10.0
UNKNOWN_EXIT = 255
"""The exit status reported for a child whose zygote went away before it exited."""


class ForkedChild:
    """A process the zygote forked: the scheduler's view (``shoal.scheduler.supervisor.Process``).
    Its exit status comes from the zygote (:meth:`Zygote._pump`)."""

    def __init__(self, pid: int, leads_group: bool = False) -> None:
        self.pid = pid
        self._leads_group = leads_group
        self._code: int | None = None
        self._exited = asyncio.Event()
        # Signals go through a pidfd: once its pid is reaped and reused, they reach no other process.
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = -1
        self._watched = False
        self.status_known = True  # False once its zygote went away first: UNKNOWN_EXIT stands in

    @property
    def returncode(self) -> int | None:
        return self._code

    async def wait(self) -> int:
        await self._exited.wait()
        assert self._code is not None
        return self._code

    def send_signal(self, sig: int) -> None:
        """Signal it unless it has exited (its exit status arrived). SIGKILL to one forked in
        a session of its own kills its process group too (``kill_group``)."""
        if self._code is None and self._pidfd >= 0:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass
            if sig == signal.SIGKILL and self._leads_group:
                # Its status not yet in: reaped a moment ago at most, and a number is not given
                # again while a group (its children) still holds it.
                kill_group(self.pid)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def exited(self, code: int) -> None:
        if self._code is None:
            if self._leads_group:
                kill_group(self.pid)  # what it started and left running (kill_group)
            self._code = code
            self._exited.set()
        if self._pidfd >= 0:
            if self._watched:
                asyncio.get_running_loop().remove_reader(self._pidfd)
                # Its zygote gone, it came to the scheduler's process when that is a subreaper:
                # reaped here then (by its pidfd: no other process), with what it left.
                with contextlib.suppress(ChildProcessError):
                    os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
                took_over(self.pid, ended=True)
                end_adopted()
            os.close(self._pidfd)
            self._pidfd = -1

    def orphaned(self) -> None:
        """The zygote is gone: nobody will report this child's exit status, so watch for its
        end through its pidfd and report :data:`UNKNOWN_EXIT`."""
        if self._code is not None:
            return
        self.status_known = False
        if self._pidfd < 0:
            self.exited(UNKNOWN_EXIT)
            return
        self._watched = True
        took_over(self.pid)
        asyncio.get_running_loop().add_reader(self._pidfd, self.exited, UNKNOWN_EXIT)


class Zygote:
    """The scheduler's end of a zygote. Use from one thread (the event loop's, once it runs)."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.pid = pid
        self._sock = sock
        self._sock.setblocking(False)
        self._children: dict[int, ForkedChild] = {}
        self._replies: dict[int, dict[str, Any]] = {}
        self._exits: dict[int, int] = {}  # statuses that came before their child was known
        self._next = 0
        self._reading: asyncio.AbstractEventLoop | None = None
        self._pidfd = -1
        self.alive = True

    @classmethod
    def fork(cls, preload: Sequence[str] = PRELOAD) -> Zygote | None:
        """Import ``preload``, then fork the zygote from this process; None (and nothing
        forked) when this process already runs another Python thread. Call before this
        process starts an event loop or uses gRPC. Objects that exist now are frozen out of
        the garbage collector for good, here and in the zygote (``gc.freeze``)."""
        for name in preload:
            importlib.import_module(name)
        if threading.active_count() > 1:
            log.info(
                "no zygote: %d threads run already; children start as new processes", threading.active_count()
            )
            return None
        sys.stdout.flush()  # or the zygote and each child would hold a copy of what is buffered
        sys.stderr.flush()
        gc.collect()
        gc.freeze()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            try:
                mine.close()
            finally:
                _serve(theirs)
        theirs.close()
        return cls(mine, pid)

    # ------------------------------------------------------------ starting children

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        out: IO[bytes] | None,
        new_session: bool,
    ) -> ForkedChild | None:
        """Fork ``argv`` (``[python, "-m", MODULE, *args]``, MODULE in :data:`FORKABLE`) with
        ``env``, stdout and stderr to ``out`` (None: this process's), in a session of its own
        when ``new_session``. None when the zygote cannot: start it some other way. Blocks
        until the zygote answers (a fork: milliseconds). Call from the event loop."""
        if not self.alive or len(argv) < 3 or argv[1] != "-m" or argv[2] not in FORKABLE:
            return None
        loop = asyncio.get_running_loop()
        if self._reading is not loop:
            loop.add_reader(self._sock, self._pump)
            self._reading = loop
            # Reap the zygote as soon as it dies, rather than keep a zombie until close().
            self._pidfd = os.pidfd_open(self.pid)
            loop.add_reader(self._pidfd, self._died)
        self._next += 1
        ident = self._next
        request = {"id": ident, "argv": list(argv), "env": dict(env), "session": new_session}
        fds = [out.fileno()] if out is not None else []
        try:
            socket.send_fds(self._sock, [json.dumps(request).encode()], fds)
        except OSError as err:
            log.warning("the zygote (pid %d) took no request (%s); starting a new process", self.pid, err)
            if isinstance(err, (BrokenPipeError, ConnectionResetError)):
                self._gone()
            return None
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        while ident not in self._replies and self.alive:
            left = deadline - time.monotonic()
            if left <= 0:
                # Killed, so that it cannot fork this child late, beside the one started instead.
                log.warning(
                    "the zygote (pid %d) did not answer in %.0fs: killing it", self.pid, REPLY_TIMEOUT_S
                )
                os.kill(self.pid, signal.SIGKILL)
                self._gone()
                return None
            poller.poll(left * 1000)
            self._pump()
        reply = self._replies.pop(ident, None)
        if reply is None:
            return None
        if "error" in reply:
            log.warning("the zygote could not start %s: %s; starting a new process", argv[2], reply["error"])
            return None
        child = ForkedChild(int(reply["pid"]), leads_group=new_session)
        self._children[child.pid] = child
        if child.pid in self._exits:
            child.exited(self._exits.pop(child.pid))
        return child

    def launcher(self) -> _Launcher:
        """A ``shoal.scheduler.supervisor.Launcher``: forks replicas here, or starts them with
        :meth:`ChildProcess.spawn` when this zygote cannot."""
        return _Launcher(self)

    # ------------------------------------------------------------ the zygote's answers

    def _pump(self) -> None:
        """Read every message the zygote has sent: replies and exit statuses."""
        while self.alive:
            try:
                data = self._sock.recv(MESSAGE_BYTES)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                log.warning("the zygote (pid %d) is gone; new children start as new processes", self.pid)
                self._gone()
                return
            msg = json.loads(data)
            if "exited" in msg:
                pid, code = int(msg["exited"]), int(msg["code"])
                child = self._children.pop(pid, None)
                if child is None:
                    self._exits[pid] = code
                else:
                    child.exited(code)
            else:
                self._replies[int(msg["id"])] = msg

    def _died(self) -> None:
        self._pump()  # what it sent before it died (then EOF: _gone)
        self._gone()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)

    def _gone(self) -> None:
        if not self.alive:
            return
        self.alive = False
        if self._reading is not None:
            with contextlib.suppress(RuntimeError):  # its loop closed already
                self._reading.remove_reader(self._sock)
                self._reading.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._reading = None
        self._sock.close()
        # Outside the event loop (close()), nobody waits for the children any more.
        if _in_loop():
            for child in self._children.values():
                child.orphaned()
        self._children.clear()

    def close(self) -> None:
        """Stop the zygote (its children go on) and reap it. Call once the children are stopped."""
        self._gone()
        with contextlib.suppress(ChildProcessError):
            deadline = time.monotonic() + 5.0
            while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    return
                time.sleep(0.01)


def _in_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _Launcher:
    def __init__(self, zygote: Zygote) -> None:
        self._zygote = zygote

    def __call__(
        self, argv: Sequence[str], *, env: Mapping[str, str], out: IO[bytes]
    ) -> ForkedChild | ChildProcess:
        child = self._zygote.spawn(argv, env=env, out=out, new_session=True)
        return child if child is not None else ChildProcess.spawn(argv, env=env, out=out)


@contextlib.contextmanager
def zygote() -> Iterator[Zygote | None]:
    """:meth:`Zygote.fork` here, closed on the way out (None: children start as new processes)."""
    z = Zygote.fork()
    try:
        yield z
    finally:
        if z is not None:
            z.close()


# ---------------------------------------------------------------- the zygote process


def _serve(sock: socket.socket) -> NoReturn:
    """The zygote: fork a child per request, report each child's exit, until the socket closes."""
    code = 0
    try:
        _loop(sock)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the scheduler went away
    except BaseException:  # the zygote must never return into its parent's stack
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _loop(sock: socket.socket) -> None:
    set_title(["shoal", "zygote"])
    # The scheduler's logging handlers (its log file among them) are not the zygote's to use.
    logging.getLogger().handlers[:] = []
    # Ctrl-C at a terminal, SIGTERM to the whole group or cgroup (systemd's stop, timeout),
    # and SIGHUP when the terminal closes reach us too: the scheduler stops on them and closes
    # us once its replicas are stopped, while we still reap them, pass on their exit statuses
    # and kill what they leave behind. Until then we were gone on a SIGTERM or SIGHUP, and
    # the scheduler warned that we were lost.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # A replica killed with SIGKILL cleans up nothing: what its model detached from its
    # process group (which its scheduler kills) comes to us, not to init, and is ended (_reap).
    become_subreaper()
    forked: set[int] = set()  # the children we forked and have not reaped
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                _reap(sock, forked)
                continue
            data, fds, _, _ = socket.recv_fds(sock, MESSAGE_BYTES, 4)
            if not data:
                return
            request = json.loads(data)
            try:
                pid = os.fork()
            except OSError as err:
                reply: dict[str, Any] = {"id": request["id"], "error": str(err)}
            else:
                if pid == 0:
                    _child(request, fds, [sock.fileno(), wake_r, wake_w])
                forked.add(pid)
                reply = {"id": request["id"], "pid": pid}
            for fd_ in fds:
                os.close(fd_)
            sock.send(json.dumps(reply).encode())
        _reap(sock, forked)


def _reap(sock: socket.socket, forked: set[int]) -> None:
    """Reap the children that exited, and tell the scheduler of those in ``forked``. Then kill
    the others: orphans given to us as a subreaper, by the time a replica's exit is reaped
    (the kernel hands them over before it signals the exit), and their descendants, which
    come to us in turn as each dies. The scheduler is told nothing of them."""
    for pid, status in reaped():
        if pid in forked:
            forked.discard(pid)
            sock.send(json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}).encode())
    for orphan in adopted(forked):
        kill_tree(orphan)


def _child(request: dict[str, Any], fds: list[int], zygote_fds: list[int]) -> NoReturn:
    """In a forked child: become ``python -m MODULE ARGS`` as asked, run it, exit."""
    code = 1
    try:
        for fd in zygote_fds:
            os.close(fd)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if request["session"]:
            os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        if fds:
            os.dup2(fds[0], 1)
            os.dup2(fds[0], 2)
            for fd in fds:
                os.close(fd)
        # Unbuffered, as PYTHONUNBUFFERED=1 makes them: a crash loses no line of the log.
        sys.stdout = _text(1)
        sys.stderr = _text(2)
        os.environ.clear()
        os.environ.update(request["env"])
        argv: list[str] = request["argv"]
        set_title(argv)
        module = importlib.import_module(argv[2])
        sys.argv = [module.__file__ or argv[2], *argv[3:]]
        # As `-m MODULE` leaves it: multiprocessing's spawn (a model's pool, joblib) starts its
        # processes from __main__'s name, which must not be the scheduler's CLI.
        sys.modules["__main__"] = module
        _reseed()
        module.main()
        code = 0
    except SystemExit as done:
        code = _exit_code(done.code)
    except BaseException:  # as the interpreter does: the traceback, then status 1
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(BaseException):
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reseed() -> None:
    """numpy's global generator, once imported, is not reseeded on fork (``random``'s is):
    without this, every replica forked after something imported ``numpy.random`` would
    draw the same numbers."""
    generator = sys.modules.get("numpy.random")
    if generator is not None:
        generator.seed()


def _text(fd: int) -> io.TextIOWrapper:
    return io.TextIOWrapper(
        io.FileIO(fd, "w", closefd=False), errors="backslashreplace", line_buffering=True, write_through=True
    )


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def set_title(argv: Sequence[str]) -> None:
    """Rewrite this process's command line (``/proc/PID/cmdline``, what ``ps`` and psutil show)
    to ``argv``, in place: cut to the space the original had, the rest NUL. Without that a
    forked child would read as its parent (tools that find a replica by its command line
    rely on it)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])
    except (OSError, IndexError, ValueError):
        return
    size = end - start
    if size <= 1:
        return
    # Keep what identifies it when space is short (the module and its first two arguments: a
    # replica's id): the interpreter's path goes first, then "python -m".
    words = [os.path.basename(argv[0]), *argv[1:]]
    if len(b"\0".join(w.encode() for w in words[:5])) >= size:
        words = words[2:]
    text = b"\0".join(w.encode() for w in words)[: size - 1]
    ctypes.memmove(start, text + b"\0" * (size - len(text)), size)

"""The local hop: a scheduler's requests to the replicas on its own machine, as
length-prefixed protobuf frames over a Unix domain socket.

Why not gRPC here: a profile of the scheduler under perf_analyzer (noop, c=32) put the
``PushTasks`` stream's client side (``_StreamRequestMixin._write``/``_read`` and the
grpc.aio poller thread) at about a third of the ingress process's CPU, and grpc.aio's
stream work at most of the replica's. The same ``Task``/``TaskOutcome`` messages framed
over a Unix socket by an ``asyncio.Protocol`` carried 6x the requests a second of the
gRPC stream shape in ``bench/local_hop.py``. Everything else between scheduler and
replica (Ping, Describe, Drain, Generate) and every hop between machines stays gRPC.

Frames: a 4-byte little-endian length, then one serialized ``pb.Task`` (scheduler to
replica) or ``pb.TaskOutcome`` (back). Each side writes everything ready in one loop
iteration with one ``write`` (``writelines`` past 64 KiB; a message with 64 KiB of
tensors or more is written in parts, its tensors' bytes never joined: ``shoal.rpc.wire``).
A frame longer than ``max_message_mb`` ends the connection.

Who can connect: the socket lives in the scheduler's hop folder, which only the
scheduler's user may open (mode 0700; :func:`hop_dir`): the same reach as the replica's
key on disk. When the connection breaks (the replica died or drained), every request
waiting on it fails with Unavailable at once, so the router retries it elsewhere, and the
next request connects again, as with the gRPC stream (``shoal.rpc.task_stream``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import logging
import os
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from shoal.core.payload import Tensors
from shoal.errors import Unavailable
from shoal.proto import shoal_pb2 as pb
from shoal.rpc.task_stream import expire_outcome, fail_waiting
from shoal.rpc.wire import Buffer, Framed, framed

log = logging.getLogger("shoal.rpc")

_HEADER = struct.Struct("<I")
# sun_path holds 108 bytes on Linux (104 on the BSDs); a longer path cannot be bound.
_MAX_SOCKET_PATH = 100


def hop_dir(state_dir: str | os.PathLike[str]) -> Path:
    """The folder (created, mode 0700) where a scheduler's local replicas put their hop
    sockets: ``<state_dir>/hop`` when a socket path there fits, else a folder in the
    temporary directory named by a hash of the state folder (still one per scheduler)."""
    state = Path(state_dir).resolve()
    folder = state / "hop"
    if len(str(folder / socket_name("255.255.255.255:65535"))) > _MAX_SOCKET_PATH:
        digest = hashlib.sha256(str(state).encode()).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / f"shoal-hop-{os.getuid()}-{digest}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # mkdir's mode is cut by the umask, and an old folder may be looser
    remove_stale_sockets(folder)  # a scheduler killed before (-9) left its replicas' there
    sweep_hop_dirs(keep=folder)
    return folder


SWEEP_AFTER_S = 600.0
"""How long a folder in the temporary directory, and a socket in it, must have been left
unchanged before another scheduler's start may remove them (:func:`sweep_hop_dirs`)."""

SWEEP_MAX = 1000
"""At most this many folders are looked at by one start (each may cost a connect per
socket): a temporary directory of any size delays a start by a bounded time, and the next
starts take the rest."""


def sweep_hop_dirs(keep: Path) -> None:
    """Remove the hop folders of this user's killed schedulers from the temporary directory:
    in each unchanged for :data:`SWEEP_AFTER_S`, the sockets no replica listens on (and as
    old), then the folder when nothing is left in it. A folder whose replica still listens
    stays, and so does a live scheduler's with no replica (a replica makes the folder again
    if it went: :meth:`HopServer.start`).

    Before, a folder stayed for good when its scheduler was killed with its replicas (-9, as
    a test's clean-up or an OOM kill of the group does) or when its replicas outlived it:
    only the same state folder's next scheduler looked in it, and a state folder in a test's
    temporary path never has one. 1,698 had piled up in one day of test runs on one machine,
    about 26 from each run of the suite, 1,407 sockets in them."""
    uid = os.getuid()
    now = time.time()
    folders = Path(tempfile.gettempdir()).glob(f"shoal-hop-{uid}-*")
    for folder in itertools.islice((f for f in folders if f != keep), SWEEP_MAX):
        try:
            info = folder.lstat()
        except OSError:  # gone meanwhile
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or now - info.st_mtime < SWEEP_AFTER_S:
            continue
        remove_stale_sockets(folder, min_age_s=SWEEP_AFTER_S)
        with contextlib.suppress(OSError):  # not empty: a replica listens there
            folder.rmdir()


def release_hop_dir(folder: str | os.PathLike[str]) -> None:
    """At a scheduler's exit, after its replicas: remove the sockets no replica listens on
    any more, then the folder when :func:`hop_dir` put it in the temporary directory and
    nothing is left in it. One under the state folder stays, as the state does.

    Before, a replica stopped by its scheduler left its socket behind, and so did its
    folder: 3,065 ``shoal-hop-*`` folders had piled up in /tmp, 18 of 25 from one
    session's runs still holding sockets."""
    path = Path(folder)
    remove_stale_sockets(path)
    if path.parent == Path(tempfile.gettempdir()) and path.name.startswith("shoal-hop-"):
        with contextlib.suppress(OSError):  # not empty: a replica still listens there
            path.rmdir()


def remove_stale_sockets(folder: Path, min_age_s: float = 0.0) -> None:
    """Remove the ``*.sock`` files in ``folder`` that refuse a connection: their replica
    is gone (a live one accepts, even while busy: the kernel queues the connection). With
    ``min_age_s``, only those made that long ago: a replica binds its socket a moment
    before it listens, and in that moment the socket refuses too."""
    now = time.time()
    for path in folder.glob("*.sock"):
        if min_age_s > 0:
            try:
                if now - path.lstat().st_mtime < min_age_s:
                    continue
            except OSError:
                continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.2)
            try:
                probe.connect(str(path))
            except (ConnectionRefusedError, FileNotFoundError):
                with contextlib.suppress(OSError):
                    path.unlink()
            except OSError:
                pass  # not ours to judge (a full backlog, a timeout): leave it


def socket_name(address: str) -> str:
    """The hop socket's file name for the replica whose gRPC address is ``address``: the
    address is unique among the live replicas on a machine."""
    return address.replace(":", "_").replace("/", "_").replace("[", "").replace("]", "") + ".sock"


def socket_path(folder: str | os.PathLike[str], address: str) -> Path:
    return Path(folder) / socket_name(address)


class _Frames:
    """Splits a byte stream into frames, read straight into its buffers (the protocols are
    ``asyncio.BufferedProtocol``s: :meth:`get_buffer`, then :meth:`updated`).

    Small frames go through one reused buffer and are copied out of it once. A frame too
    large for it is read into a buffer of its own size, which becomes the frame: no copy.
    Before, every read came as a new ``bytes``, was appended to a growing buffer and copied
    out of it: 40 ms of copies a 16 MiB echo, scheduler and replica together, of the
    copies left after the local hop stopped building large messages whole.
    """

    BUFFER = 256 * 1024

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._buf = bytearray(self.BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0  # the first byte not yet taken
        self._end = 0  # the end of what has been read
        self._big: bytearray | None = None  # a large frame being read, and how much of it is
        self._big_have = 0

    def get_buffer(self) -> memoryview:
        """Where the next read goes: the rest of a large frame, else the shared buffer's free end."""
        if self._big is not None:
            return memoryview(self._big)[self._big_have :]
        if self._end == len(self._buf):  # full: move the frame begun to the front
            n = self._end - self._start
            self._buf[:n] = self._view[self._start : self._end].tobytes()
            self._start, self._end = 0, n
        return self._view[self._end :]

    def updated(self, nbytes: int) -> list[bytes | bytearray]:
        """The frames completed by ``nbytes`` read into :meth:`get_buffer`'s buffer. Raises
        ValueError for a frame over the limit."""
        frames: list[bytes | bytearray] = []
        if self._big is not None:
            self._big_have += nbytes
            if self._big_have == len(self._big):
                frames.append(self._big)
                self._big = None
            return frames
        buf, view = self._buf, self._view
        start, end = self._start, self._end + nbytes
        while end - start >= 4:
            (n,) = _HEADER.unpack_from(buf, start)
            if n > self._max:
                raise ValueError(f"a frame of {n} bytes is over the limit of {self._max}")
            if end - start - 4 >= n:
                frames.append(bytes(view[start + 4 : start + 4 + n]))
                start += 4 + n
                continue
            if 4 + n > len(buf):  # will not fit the shared buffer: a buffer of its own
                have = end - start - 4
                big = bytearray(n)
                big[:have] = view[start + 4 : end]
                self._big, self._big_have = big, have
                start = end
            break
        if start == end:
            start = end = 0
        self._start, self._end = start, end
        return frames

    def feed(self, data: bytes) -> list[bytes | bytearray]:
        """The frames ``data`` completes (the same reading, for bytes at hand)."""
        frames: list[bytes | bytearray] = []
        at = 0
        while at < len(data):
            room = self.get_buffer()
            n = min(len(room), len(data) - at)
            room[:n] = data[at : at + n]
            at += n
            frames += self.updated(n)
        return frames


#: Past this many bytes a write hands the transport its pieces (``writelines``) instead of
#: joining them first: a copy less of a large tensor; below it one joined write costs less.
_JOIN_BELOW = 64 * 1024


class _Writer:
    """Coalesces writes: the frames queued in one loop iteration go out in one ``write`` at
    its end. When ``eager()`` says so for the first frame of an iteration, that frame goes
    out at once instead (the rest of the iteration's still together, after it): a lone
    request or answer then waits for no later turn of the loop.

    Eager only for a lone frame: on the scheduler's side while a single request is pending
    on the connection, on the replica's while nothing else runs for it. Frames that go
    together must arrive together: requests for the replica's batcher to batch them, and a
    batch's answers so that their clients' next requests come back as one burst."""

    def __init__(self, transport: asyncio.Transport, eager: Callable[[], bool] | None = None) -> None:
        self._transport = transport
        self._out: list[Buffer] = []
        self._gathering = False
        self._eager = eager
        self._loop = asyncio.get_running_loop()

    def send(self, message: bytes) -> None:
        if not self._gathering:
            self._gathering = True
            self._loop.call_soon(self._flush)
            if self._eager is not None and self._eager():
                if not self._transport.is_closing():
                    if len(message) < _JOIN_BELOW:
                        self._transport.write(_HEADER.pack(len(message)) + message)
                    else:
                        self._transport.writelines((_HEADER.pack(len(message)), message))
                return
        self._out.append(_HEADER.pack(len(message)))
        self._out.append(message)

    def send_framed(self, message: Framed) -> None:
        """:meth:`send` for a message in parts (:mod:`shoal.rpc.wire`): they go to the
        transport unjoined."""
        header = _HEADER.pack(message.size)
        if not self._gathering:
            self._gathering = True
            self._loop.call_soon(self._flush)
            if self._eager is not None and self._eager():
                if not self._transport.is_closing():
                    self._transport.writelines((header, *message.parts))
                return
        self._out.append(header)
        self._out.extend(message.parts)

    def _flush(self) -> None:
        self._gathering = False
        out, self._out = self._out, []
        if out and not self._transport.is_closing():
            if sum(map(len, out)) < _JOIN_BELOW:
                self._transport.write(b"".join(out))
            else:
                self._transport.writelines(out)


# ---------------------------------------------------------------- the scheduler's side


class _ClientProtocol(asyncio.BufferedProtocol):
    def __init__(self, hop: HopClient, max_bytes: int) -> None:
        self._hop = hop
        self._frames = _Frames(max_bytes)
        self.transport: asyncio.Transport | None = None
        self.writer: _Writer | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self.transport = transport
        pending = self._hop.pending
        self.writer = _Writer(transport, eager=lambda: len(pending) <= 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._frames.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            frames = self._frames.updated(nbytes)
        except ValueError as err:
            self._hop.broken(self, f"bad frame from the replica ({err})")
            return
        pending = self._hop.pending
        for raw in frames:
            try:
                outcome = pb.TaskOutcome.FromString(cast(bytes, raw))  # a large frame's bytearray parses too
            except Exception as err:  # a malformed message: the connection is not to be trusted
                self._hop.broken(self, f"unreadable outcome from the replica ({err})")
                return
            future = pending.get(outcome.tag)
            if future is not None and not future.done():
                future.set_result(outcome)

    def connection_lost(self, exc: Exception | None) -> None:
        self._hop.broken(self, f"connection lost ({exc})" if exc else "connection closed")
        if not self.lost.done():
            self.lost.set_result(None)


class HopClient:
    """One replica's hop connection, for many concurrent ``push`` calls on one event loop.
    The same contract as :class:`shoal.rpc.task_stream.TaskStream`."""

    def __init__(self, path: str | os.PathLike[str], address: str, max_bytes: int) -> None:
        self.path = str(path)
        self._address = address
        self._max = max_bytes
        self._proto: _ClientProtocol | None = None
        self._connecting = asyncio.Lock()
        self.pending: dict[int, asyncio.Future[pb.TaskOutcome]] = {}
        self._tags = itertools.count(1)
        self._closed = False

    async def push(self, task: pb.Task, timeout_s: float, inputs: Tensors = ()) -> pb.TaskOutcome:
        """Send ``task`` and wait for its outcome. Raises Unavailable when the connection
        cannot be made or breaks, DeadlineExceeded after ``timeout_s``. ``inputs``: tensors
        to send as the task's inputs in parts, their bytes unjoined (``shoal.rpc.wire``);
        ``task`` then has none of its own."""
        proto = self._proto
        if proto is None or proto.transport is None or proto.transport.is_closing():
            proto = await self._connect()
        tag = next(self._tags)
        task.tag = tag
        loop = asyncio.get_running_loop()
        future: asyncio.Future[pb.TaskOutcome] = loop.create_future()
        pending = self.pending
        pending[tag] = future
        assert proto.writer is not None
        if inputs:
            proto.writer.send_framed(
                framed(task.SerializeToString(), 2, ((t.name, t.datatype, t.shape, t.data) for t in inputs))
            )
        else:
            proto.writer.send(task.SerializeToString())
        # await_outcome's body, inline: one coroutine less on every request's way back.
        timer = loop.call_later(timeout_s, expire_outcome, future, task.request_id, timeout_s)
        try:
            return await future
        except asyncio.CancelledError:
            # The caller went away (its client cancelled or hung up): the replica drops the
            # task if it has not run yet, instead of computing an answer nobody reads.
            writer = proto.writer
            if future.cancelled() and writer is not None and proto.transport is not None:
                if not proto.transport.is_closing():
                    writer.send(pb.Task(tag=tag, cancel=True).SerializeToString())
            raise
        finally:
            timer.cancel()
            pending.pop(tag, None)

    async def _connect(self) -> _ClientProtocol:
        async with self._connecting:
            if self._closed:
                raise Unavailable(f"replica at {self._address}: client closed")
            proto = self._proto
            if proto is not None and proto.transport is not None and not proto.transport.is_closing():
                return proto
            loop = asyncio.get_running_loop()
            try:
                _, made = await loop.create_unix_connection(
                    lambda: _ClientProtocol(self, self._max), self.path
                )
            except OSError as err:
                raise Unavailable(
                    f"replica at {self._address}: cannot connect to {self.path} ({err})"
                ) from None
            self._proto = made
            return made

    def broken(self, proto: _ClientProtocol, why: str) -> None:
        """``proto``'s connection is over: fail everything waiting on it; the next push reconnects.
        Each future is set once, so each request fails exactly once (the router retries it)."""
        if self._proto is proto:
            self._proto = None
        if proto.transport is not None:
            proto.transport.abort()
        fail_waiting(self.pending, Unavailable(f"replica at {self._address}: hop {why}"))

    async def close(self) -> None:
        """Fail every pending ``push`` with Unavailable at once, and close the connection."""
        self._closed = True
        proto = self._proto
        self._proto = None
        fail_waiting(self.pending, Unavailable(f"replica at {self._address}: client closed"))
        if proto is not None and proto.transport is not None:
            proto.transport.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await proto.lost


# ---------------------------------------------------------------- the replica's side

Run = Callable[[pb.Task], Awaitable[pb.TaskOutcome]]
# Starts a task (the bool: it came alone, not with others to batch it with) and calls back
# with its outcome; returns what to cancel if the scheduler goes away first (None: answered
# already). ``ReplicaService.begin``: no task per request.
# The outcome may come in parts (``shoal.rpc.wire``: a large answer's bytes unjoined).
Begin = Callable[[pb.Task, Callable[[pb.TaskOutcome | Framed], None], bool], "asyncio.Future[Any] | None"]


class _ServerProtocol(asyncio.BufferedProtocol):
    def __init__(self, server: HopServer) -> None:
        self._server = server
        self._frames = _Frames(server.max_bytes)
        self._transport: asyncio.Transport | None = None
        self._writer: _Writer | None = None
        self._running: dict[int, asyncio.Future[Any]] = {}  # by tag

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        # Answers to a batch go back together (the first one alone would make its client's
        # next request arrive alone, and bursts would split in two at every turn).
        self._writer = _Writer(transport, eager=self._lone)
        self._server.connections.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._frames.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            frames = self._frames.updated(nbytes)
            tasks = [pb.Task.FromString(cast(bytes, raw)) for raw in frames]
        except Exception as err:  # an oversized or malformed frame: not a scheduler speaking
            log.warning("hop: closing a connection that sent %s", err)
            self.close()
            return
        begin = self._server.begin
        alone = len(tasks) == 1
        running = self._running
        for task in tasks:
            tag = task.tag
            if task.cancel:  # its caller went away: drop it, unanswered, if it still runs
                dropped = running.pop(tag, None)
                if dropped is not None:
                    dropped.cancel()
                continue
            if begin is not None:
                started = begin(task, self._reply, alone)
                if started is None:
                    continue
            else:
                started = asyncio.create_task(self._run(task))
            running[tag] = started
            # Tags are unique on a connection; called with the future, pop takes it as its default.
            started.add_done_callback(functools.partial(running.pop, tag))

    async def _run(self, task: pb.Task) -> None:
        self._reply(await self._server.run(task))

    def _lone(self) -> bool:
        """Whether nothing else is running for this connection (a lone answer: send it now)."""
        return not self._running

    def _reply(self, outcome: pb.TaskOutcome | Framed) -> None:
        if self._writer is not None:
            if isinstance(outcome, Framed):
                self._writer.send_framed(outcome)
            else:
                self._writer.send(outcome.SerializeToString())

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()  # sends what is buffered first

    def connection_lost(self, exc: Exception | None) -> None:
        # The scheduler went away: stop the work it asked for, as the gRPC stream does.
        self._writer = None
        for t in list(self._running.values()):
            t.cancel()
        self._server.connections.discard(self)


class HopServer:
    """Serves one replica's hop socket; ``run`` turns a task into its outcome (``begin``,
    when given, does the same from callbacks: see :data:`Begin`)."""

    def __init__(
        self, path: str | os.PathLike[str], run: Run, max_bytes: int, *, begin: Begin | None = None
    ) -> None:
        self.path = Path(path)
        self.run = run
        self.begin = begin
        self.max_bytes = max_bytes
        self.connections: set[_ServerProtocol] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if not self.path.parent.exists():
            # Its scheduler's folder, removed by another scheduler's start while it had no
            # replica for a while (sweep_hop_dirs): made again, as private.
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.path.parent.chmod(0o700)
        # A socket left by a dead replica that had the same address: nobody listens on it.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _ServerProtocol(self), str(self.path))
        self.path.chmod(0o600)

    async def stop(self) -> None:
        """Stop accepting, close every connection (after what is already written), remove the socket."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

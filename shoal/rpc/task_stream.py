"""The scheduler's side of ``PushTasks``: one long-lived bidirectional stream per
replica; tasks are tagged, sent in batches, and answers matched by tag as they
arrive (in any order).

Why: a unary gRPC call sets up a call, metadata, a deadline and a status per
request, and even one stream write costs about as much in grpc.aio (py-spy:
``_StreamRequestMixin.write`` was 16% of the scheduler's loop under load with
one write per request). So one writer task sends everything queued since its
last write as one ``TaskBatch``: at low load a batch is one task, under load
many requests share a write. When the stream breaks (the replica died, the
network failed), every request waiting on it fails with Unavailable at once, so
the router retries it elsewhere, and the next request opens a new stream.

A replica ends the stream itself (a clean end, not an error) only when it stops: what
waits on it then, and every later ``push``, fails with ReplicaGone (the replica is going;
the router sends it nothing new), instead of opening a stream to a replica that is exiting
(its failure was retried on that same replica, and the request was lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from shoal.core import limits
from shoal.errors import Code, DeadlineExceeded, ReplicaGone, ShoalError, Unavailable, from_code
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.status import to_error

log = logging.getLogger("shoal.rpc")

#: After a failed write, how long the stream's read side has to say why (the replica's end
#: of the stream, or its error) before the requests waiting on it fail Unavailable.
_READ_SAYS_WHY_S = 1.0


class TaskStream:
    """Safe for concurrent ``push`` calls from many tasks on one event loop. ``stub`` gives
    the stub to open the stream on, asked each time the stream is opened (not per task):
    after the stream broke, the next one may be on a new channel (a certificate renewed)."""

    def __init__(self, stub: Callable[[], pbg.ReplicaAsyncStub], address: str) -> None:
        self._stub = stub
        self._address = address
        self._call: Any = None  # grpc.aio.StreamStreamCall[pb.TaskBatch, pb.OutcomeBatch]
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[pb.TaskOutcome]] = {}
        self._outbox: list[pb.Task] = []
        self._wake = asyncio.Event()
        self._tags = itertools.count(1)
        self._closed = False
        self._ended = False  # the replica ended the stream: it stops, and takes nothing new

    async def push(self, task: pb.Task, timeout_s: float) -> pb.TaskOutcome:
        """Send ``task`` and wait for its outcome. Raises Unavailable if the stream breaks,
        ReplicaGone once the replica ended it (it stops), DeadlineExceeded after ``timeout_s``."""
        if self._closed:
            raise Unavailable(f"replica at {self._address}: client closed")
        if self._ended:
            raise ReplicaGone(f"replica at {self._address} ended its task stream: it is stopping")
        tag = next(self._tags)
        task.tag = tag
        future: asyncio.Future[pb.TaskOutcome] = asyncio.get_running_loop().create_future()
        self._pending[tag] = future
        self._open()
        self._outbox.append(task)
        self._wake.set()
        try:
            return await await_outcome(self._pending, task, future, timeout_s)
        except asyncio.CancelledError:
            # The caller went away: the replica drops the task if it has not run yet.
            if future.cancelled() and self._call is not None and not self._closed:
                self._outbox.append(pb.Task(tag=tag, cancel=True))
                self._wake.set()
            raise

    def _open(self) -> None:
        if self._call is None or self._call.done():
            call = self._stub().PushTasks()  # type: ignore[call-arg]  # grpc-stubs predate the no-arg form
            self._call = call
            reader = asyncio.create_task(self._read(call), name=f"task-stream-read {self._address}")
            self._reader = reader
            self._writer = asyncio.create_task(
                self._write(call, reader), name=f"task-stream-write {self._address}"
            )

    async def _write(self, call: Any, reader: asyncio.Task[None]) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if not self._outbox:
                    continue
                batch, self._outbox = self._outbox, []
                await call.write(pb.TaskBatch(tasks=batch))
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as err:
            # A write fails too when the replica ended the stream (it stops) as it went out:
            # the read side says which, at once (its end, or the stream's error). Failing here
            # first made its requests Unavailable, each of which spent one of its
            # request_attempts, where the replica's end (ReplicaGone) spends none.
            with contextlib.suppress(Exception):  # its timeout, or what the read side raised
                async with asyncio.timeout(_READ_SAYS_WHY_S):
                    await asyncio.shield(reader)
            self._fail(call, Unavailable(f"replica at {self._address}: stream broken ({err})"))

    async def _read(self, call: Any) -> None:
        error: ShoalError = Unavailable(f"replica at {self._address}: stream ended")
        try:
            while True:
                batch = await call.read()
                if batch is grpc.aio.EOF:  # type: ignore[attr-defined]
                    # Set even when a newer stream replaced this one (a push that found this
                    # call done before this task ran): that one goes to the same replica.
                    self._ended = True
                    error = ReplicaGone(f"replica at {self._address} ended its task stream: it is stopping")
                    break
                for outcome in batch.outcomes:
                    future = self._pending.get(outcome.tag)
                    if future is not None and not future.done():
                        future.set_result(outcome)
        except grpc.aio.AioRpcError as err:
            error = Unavailable(f"replica at {self._address}: {to_error(err)}")
        finally:
            self._fail(call, error)

    def _fail(self, call: Any, error: ShoalError) -> None:
        """The stream ``call`` is over: fail everything waiting on it; the next push reopens.

        With :meth:`close`, the only place a pending request of this replica fails: when the
        replica dies the stream breaks (here) or the router closes the client (``close``),
        whichever comes first; a future is set once, so each request fails exactly once and
        the router retries it. (``ReplicaHandle.fail_pending`` relies on this.)"""
        if self._call is not call:
            return
        self._call = None
        call.cancel()
        self._outbox = []
        fail_waiting(self._pending, error)
        if self._writer is not None and self._writer is not asyncio.current_task():
            self._writer.cancel()

    async def close(self) -> None:
        """Fail every pending ``push`` with Unavailable at once, and stop the stream."""
        self._closed = True
        call = self._call
        self._call = None
        # Fail what waits here now: the reader's own _fail is a no-op once _call is None, and
        # a request left pending would wait for its whole deadline (the router retries these).
        fail_waiting(self._pending, Unavailable(f"replica at {self._address}: client closed"))
        if call is not None:
            call.cancel()
        tasks = [t for t in (self._reader, self._writer) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def await_outcome(
    pending: dict[int, asyncio.Future[pb.TaskOutcome]],
    task: pb.Task,
    future: asyncio.Future[pb.TaskOutcome],
    timeout_s: float,
) -> pb.TaskOutcome:
    """Wait for ``task``'s outcome (sent, its ``future`` in ``pending`` under its tag) at most
    ``timeout_s``, then forget it either way. The deadline is a timer that fails the
    future (cheaper per request than an ``asyncio.timeout`` scope around the await)."""
    timer = future.get_loop().call_later(timeout_s, expire_outcome, future, task.request_id, timeout_s)
    try:
        return await future
    finally:
        timer.cancel()
        pending.pop(task.tag, None)


def expire_outcome(future: asyncio.Future[pb.TaskOutcome], request_id: str, timeout_s: float) -> None:
    """A waiting request's deadline passed: it fails with DeadlineExceeded (once)."""
    if not future.done():
        future.set_exception(
            DeadlineExceeded(f"request {limits.shown(request_id)} timed out after {timeout_s:g}s")
        )


def fail_waiting(pending: dict[int, asyncio.Future[pb.TaskOutcome]], error: ShoalError) -> None:
    """Fail every request still waiting on a replica's connection, each once."""
    for future in list(pending.values()):
        if not future.done():
            future.set_exception(error)


def outcome_error(outcome: pb.TaskOutcome) -> ShoalError | None:
    """The error an outcome carries, or None for a success."""
    if not outcome.error_code:
        return None
    try:
        code = Code(outcome.error_code)
    except ValueError:
        code = Code.INTERNAL
    if outcome.going:
        return ReplicaGone(outcome.error_message)
    error = from_code(code, outcome.error_message)
    if outcome.final:
        error.retry_elsewhere = False
    return error

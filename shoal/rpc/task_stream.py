"""The scheduler's side of ``PushTasks``: one long-lived bidirectional stream per
replica, tasks written in order and answers matched by tag as they arrive.

Why: a unary gRPC call sets up a call, metadata, a deadline and a status per
request; on the stream a request is one message each way. When the stream
breaks (the replica died, the network failed), every request waiting on it
fails with Unavailable at once, so the router retries it elsewhere, and the
next request opens a new stream.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import grpc
import grpc.aio

from shoal.errors import Code, DeadlineExceeded, ShoalError, Unavailable, from_code
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.status import to_error

log = logging.getLogger("shoal.rpc")


class TaskStream:
    """Safe for concurrent ``push`` calls from many tasks on one event loop."""

    def __init__(self, stub: pbg.ReplicaStub, address: str) -> None:
        self._stub = stub
        self._address = address
        self._call: Any = None  # grpc.aio.StreamStreamCall[pb.Task, pb.TaskOutcome]
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[pb.TaskOutcome]] = {}
        self._tags = itertools.count(1)
        self._lock = asyncio.Lock()  # one writer at a time; one opener
        self._closed = False

    async def push(self, task: pb.Task, timeout_s: float) -> pb.TaskOutcome:
        """Send ``task`` and wait for its outcome. Raises Unavailable if the stream breaks,
        DeadlineExceeded after ``timeout_s``."""
        tag = next(self._tags)
        task.tag = tag
        future: asyncio.Future[pb.TaskOutcome] = asyncio.get_running_loop().create_future()
        self._pending[tag] = future
        try:
            async with self._lock:
                call = self._open()
                try:
                    await call.write(task)
                except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as err:
                    raise Unavailable(f"replica at {self._address}: stream broken ({err})") from None
            try:
                async with asyncio.timeout(timeout_s):
                    return await future
            except TimeoutError:
                raise DeadlineExceeded(f"request {task.request_id} timed out after {timeout_s:g}s") from None
        finally:
            self._pending.pop(tag, None)

    def _open(self) -> Any:
        if self._closed:
            raise Unavailable(f"replica at {self._address}: client closed")
        if self._call is None or self._call.done():
            self._call = self._stub.PushTasks()  # type: ignore[call-arg]  # grpc-stubs predate the no-argument form
            self._reader = asyncio.create_task(self._read(self._call), name=f"task-stream {self._address}")
        return self._call

    async def _read(self, call: Any) -> None:
        error: ShoalError = Unavailable(f"replica at {self._address}: stream ended")
        try:
            while True:
                outcome = await call.read()
                if outcome is grpc.aio.EOF:  # type: ignore[attr-defined]
                    break
                future = self._pending.get(outcome.tag)
                if future is not None and not future.done():
                    future.set_result(outcome)
        except grpc.aio.AioRpcError as err:
            error = Unavailable(f"replica at {self._address}: {to_error(err)}")
        finally:
            if self._call is call:
                self._call = None
            for future in list(self._pending.values()):
                if not future.done():
                    future.set_exception(error)

    async def close(self) -> None:
        self._closed = True
        call, reader = self._call, self._reader
        self._call = None
        if call is not None:
            call.cancel()
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


def outcome_error(outcome: pb.TaskOutcome) -> ShoalError | None:
    """The error an outcome carries, or None for a success."""
    if not outcome.error_code:
        return None
    try:
        code = Code(outcome.error_code)
    except ValueError:
        code = Code.INTERNAL
    return from_code(code, outcome.error_message)

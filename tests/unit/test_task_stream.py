"""``TaskStream`` when a write fails: the stream's read side says why before the requests
waiting on it fail. A replica that ends its stream (it stops) makes them ReplicaGone, which
spends none of a request's ``request_attempts``; a stream that broke makes them Unavailable.

Before, a write that failed as the replica ended the stream failed its requests Unavailable
at once, before the read side saw the replica's end: each spent an attempt, and with
``request_attempts: 1`` the request failed instead of going to another replica.

The calls are stand-ins for grpc.aio's, so which side fails first is decided, not raced.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import grpc.aio
import pytest

from shoal.errors import ReplicaGone, Unavailable
from shoal.proto import shoal_pb2 as pb
from shoal.rpc import task_stream
from shoal.rpc.task_stream import TaskStream

pytestmark = pytest.mark.timeout(10)


class FailingWrites:
    """A ``PushTasks`` call whose writes fail at once, and whose read side, after
    ``after_s``, ends (the replica ended the stream), raises, or waits for ever."""

    def __init__(self, read: str, after_s: float = 0.05) -> None:
        self.read_side = read
        self.after_s = after_s
        self.cancelled = False

    async def write(self, batch: pb.TaskBatch) -> None:
        raise grpc.aio.UsageError("RPC already finished")

    async def read(self) -> Any:
        await asyncio.sleep(self.after_s if self.read_side != "never" else 3600)
        if self.read_side == "error":
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "connection reset", ""
            )
        return grpc.aio.EOF  # type: ignore[attr-defined]

    def done(self) -> bool:
        return False

    def cancel(self) -> None:
        self.cancelled = True


def stream_over(call: FailingWrites) -> TaskStream:
    return TaskStream(lambda: SimpleNamespace(PushTasks=lambda: call), "10.0.0.1:9000")  # type: ignore[arg-type, return-value]


async def test_a_write_that_fails_as_the_replica_ends_its_stream_is_replica_gone() -> None:
    stream = stream_over(FailingWrites("end"))
    with pytest.raises(ReplicaGone, match="ended its task stream: it is stopping"):
        await stream.push(pb.Task(request_id="r1"), timeout_s=5)
    # And what comes after goes elsewhere at once: the replica takes nothing new.
    with pytest.raises(ReplicaGone):
        await stream.push(pb.Task(request_id="r2"), timeout_s=5)


async def test_a_write_that_fails_on_a_broken_stream_is_unavailable() -> None:
    stream = stream_over(FailingWrites("error"))
    with pytest.raises(Unavailable) as err:
        await stream.push(pb.Task(request_id="r1"), timeout_s=5)
    assert not isinstance(err.value, ReplicaGone)


async def test_a_read_side_that_says_nothing_fails_the_request_unavailable_soon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(task_stream, "_READ_SAYS_WHY_S", 0.1)
    call = FailingWrites("never")
    stream = stream_over(call)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(Unavailable, match="stream broken") as err:
        await stream.push(pb.Task(request_id="r1"), timeout_s=5)
    assert not isinstance(err.value, ReplicaGone)
    assert loop.time() - began < 2  # not the request's deadline
    assert call.cancelled
    await stream.close()

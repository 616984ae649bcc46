"""``shoal.core.tasks.until``: a stream with no end of its own, ended when its reason to go
on ends (a log follow whose token is revoked, or whose scheduler is declared dead)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from shoal.core.tasks import until
from shoal.errors import ShoalError, Unauthenticated, Unavailable

pytestmark = pytest.mark.timeout(10)


async def forever(closed: list[str], name: str) -> AsyncIterator[bytes]:
    """One item, then nothing, ever (a follow of a quiet log)."""
    try:
        yield b"first"
        await asyncio.Event().wait()
    finally:
        closed.append(name)


async def test_items_pass_until_stop_names_an_error_while_the_stream_is_quiet() -> None:
    closed: list[str] = []
    error: list[ShoalError] = []
    got = []
    with pytest.raises(Unavailable, match="dead"):
        async for item in until(forever(closed, "s"), lambda: error[0] if error else None, 0.01):
            got.append(item)
            error.append(Unavailable("dead"))
    assert got == [b"first"] and closed == ["s"]


async def test_nested_the_outer_error_is_raised_and_both_streams_are_closed() -> None:
    """The head's ReadLog (token revoked) over HeadNode.read_log (scheduler alive): cancelling
    the inner one used to end in 'aclose(): asynchronous generator is already running'."""
    closed: list[str] = []
    revoked: list[ShoalError] = []
    inner = until(forever(closed, "inner"), lambda: None, 0.01)
    got = []
    with pytest.raises(Unauthenticated):
        async for item in until(inner, lambda: revoked[0] if revoked else None, 0.01):
            got.append(item)
            revoked.append(Unauthenticated("revoked"))
    assert got == [b"first"] and closed == ["inner"]


async def test_a_stream_that_ends_ends_it() -> None:
    async def two() -> AsyncIterator[int]:
        yield 1
        yield 2

    assert [i async for i in until(two(), lambda: None, 0.01)] == [1, 2]


class Quiet:
    """An async iterator that is not a generator (a stream object): one item, then none;
    what it is told to do is recorded."""

    def __init__(self, closed: list[str]) -> None:
        self.closed = closed
        self.sent = False

    def __aiter__(self) -> Quiet:
        return self

    async def __anext__(self) -> bytes:
        if not self.sent:
            self.sent = True
            return b"first"
        await asyncio.Event().wait()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed.append("closed")


@pytest.mark.parametrize("kind", ["generator", "stream object"])
async def test_a_reader_cancelled_while_it_waits_closes_the_stream_too(kind: str) -> None:
    """A client gone while its follow waits for the next item: the reader's task is
    cancelled, the item awaited is cancelled, and the stream is closed as well (a log file
    closed, a watch ended); the cancellation goes on up."""
    closed: list[str] = []
    got: list[bytes] = []
    stream: AsyncIterator[bytes] = forever(closed, "closed") if kind == "generator" else Quiet(closed)

    async def read() -> None:
        async for item in until(stream, lambda: None, 10.0):
            got.append(item)

    reader = asyncio.create_task(read())
    while not got:
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)  # waiting for the next item
    reader.cancel()
    await asyncio.wait([reader])
    assert reader.cancelled() and closed == ["closed"]

"""Bytes in flight: how much request data one ingress process holds at once.

Every request a scheduler admits is copied several times before its answer is written
(the transport's message, the task for the replica, the replica's answer, the response),
so memory grows with the bytes in flight, not with the number of requests. Forty clients
each sending a 60 MB tensor at once grew one ingress process to 12.8 GB, and small
requests on it waited up to 30 s. :class:`ByteBudget` bounds it:

* a request whose bytes fit beside those in flight goes on at once, and so does any
  request when nothing is in flight (one request of the largest message size always runs),
  and any of at most :data:`SMALL` bytes: small requests never queue behind large ones
  (their number is bounded by ``max_queued_requests``);
* otherwise it waits, first come first served, for room, until its deadline
  (DeadlineExceeded after that);
* requests waiting hold their bytes too (once, not copied further), so the waiting bytes
  are bounded by the same limit: past it a request is refused at once with
  ResourceExhausted, which clients retry.

Safe on one event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars

from shoal.errors import DeadlineExceeded, ResourceExhausted

#: Set while a transport holds a request's bytes itself (gRPC ``ModelInfer``, which takes
#: them before it parses the message): the data plane then takes none for it.
HELD: contextvars.ContextVar[bool] = contextvars.ContextVar("shoal_budget_held", default=False)


#: How long a request with no deadline of its own waits for room (a deployment's default timeout).
DEFAULT_WAIT_S = 60.0

#: Requests of at most this many bytes go on at once, counted but never held back.
SMALL = 64 * 1024


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB"


class ByteBudget:
    """``limit`` bytes in flight (0: no limit). ``what`` names the setting in messages."""

    def __init__(self, limit: int, what: str = "max_inflight_mb") -> None:
        self.limit = limit
        self.what = what
        self.held = 0
        self.waiting = 0  # bytes of the requests queued for room
        self._queue: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def _fits(self, n: int) -> bool:
        return self.held == 0 or self.held + n <= self.limit

    def _now(self, n: int) -> bool:
        return n <= SMALL or (not self._queue and self._fits(n))

    def room(self, n: int) -> bool:
        """Whether :meth:`take` of ``n`` bytes would go on at once now."""
        return self.limit <= 0 or n <= 0 or self._now(n)

    def try_take(self, n: int) -> bool:
        """:meth:`take` when it would go on at once (no coroutine: the common case); False,
        holding nothing, when the caller must await :meth:`take`."""
        if self.limit <= 0 or n <= 0:
            return True
        if self._now(n):
            self.held += n
            return True
        return False

    async def take(self, n: int, timeout_s: float) -> float:
        """Hold ``n`` bytes; :meth:`give` them back when the request is done. Returns the
        seconds spent waiting for room. Raises ResourceExhausted when the queue for room
        is full, DeadlineExceeded when no room came within ``timeout_s``."""
        if self.limit <= 0 or n <= 0:
            return 0.0
        if self._now(n):
            self.held += n
            return 0.0
        if self.waiting and self.waiting + n > self.limit:
            raise ResourceExhausted(
                f"this ingress process holds {_mb(self.held)} of requests in flight and "
                f"{_mb(self.waiting)} waiting for room; this request's {_mb(n)} would pass "
                f"{_mb(self.limit)} ({self.what}, this process's share): retry shortly"
            )
        loop = asyncio.get_running_loop()
        started = loop.time()
        future: asyncio.Future[None] = loop.create_future()
        entry = (n, future)
        self._queue.append(entry)
        self.waiting += n
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except BaseException as err:
            if future.done() and not future.cancelled():
                self.give(n)  # room came as the wait ended: hand it on
            else:
                future.cancel()
                self._queue.remove(entry)
                self.waiting -= n
                self._wake()
            if isinstance(err, TimeoutError):
                raise DeadlineExceeded(
                    f"waited {timeout_s:g}s for room for this request's {_mb(n)}: "
                    f"{_mb(self.held)} of requests are in flight on this ingress process "
                    f"({self.what}: {_mb(self.limit)} for this process)"
                ) from None
            raise
        return loop.time() - started

    def give(self, n: int) -> None:
        """Give back what :meth:`take` held."""
        if self.limit <= 0 or n <= 0:
            return
        self.held -= n
        self._wake()

    def _wake(self) -> None:
        while self._queue and self._fits(self._queue[0][0]):
            n, future = self._queue.popleft()
            self.waiting -= n
            self.held += n
            future.set_result(None)

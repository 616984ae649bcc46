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
  ResourceExhausted, which clients retry;
* an answer made but not yet written to its client (a ``ModelStreamInfer`` stream's, whose
  client reads slowly or not at all) is held too, room or not (:meth:`ByteBudget.keep`):
  it is made already, and while such answers put the process over its limit, large
  requests wait as above and streams read no further requests
  (:meth:`ByteBudget.under_limit`);
* when nothing is in flight any more after large requests (:data:`TRIM_AFTER` bytes or
  more since the last time), the process hands its free heap back to the system
  (:func:`release_free_memory`, at most once every :data:`TRIM_EVERY_S`).

Safe on one event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import ctypes
import ctypes.util
import functools
import gc
import logging
from collections.abc import Callable

from shoal.errors import DeadlineExceeded, ResourceExhausted

#: Set while a transport holds a request's bytes itself (gRPC ``ModelInfer``, which takes
#: them before it parses the message): the data plane then takes none for it.
HELD: contextvars.ContextVar[bool] = contextvars.ContextVar("shoal_budget_held", default=False)


#: How long a request with no deadline of its own waits for room (a deployment's default timeout).
DEFAULT_WAIT_S = 60.0

#: Requests of at most this many bytes go on at once, counted but never held back.
SMALL = 64 * 1024

#: Bytes of large requests after which an ingress process, once idle, releases free memory.
TRIM_AFTER = 32 << 20

#: At most one release in this many seconds (each costs page faults to the next requests).
TRIM_EVERY_S = 1.0

log = logging.getLogger(__name__)


def release_free_memory() -> None:
    """Free what only a full collection frees (cycles through exceptions and their frames
    hold request buffers), then give the C heap's free pages back to the system (glibc
    ``malloc_trim``; elsewhere nothing). Large requests are copied into buffers glibc keeps
    after they are freed: after four 60 MB requests at once an idle ingress process held
    166 MB of RSS, 70 MB with this (65 MB before them)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB"


class ByteBudget:
    """``limit`` bytes in flight (0: no limit). ``what`` names the setting in messages."""

    def __init__(
        self,
        limit: int,
        what: str = "max_inflight_mb",
        release: Callable[[], None] | None = release_free_memory,
    ) -> None:
        """``release``: called, on a thread, when large requests are done (see the module);
        None: never."""
        self.limit = limit
        self.what = what
        self.held = 0
        self.waiting = 0  # bytes of the requests queued for room
        self._queue: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._release = release
        self._large = 0  # bytes of requests over SMALL since the last release
        self._big = 0  # requests over SMALL in flight
        self._released_at = -TRIM_EVERY_S
        self._later: asyncio.TimerHandle | None = None
        self._under: asyncio.Future[None] | None = None  # set once held is within the limit

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
            if n > SMALL:
                self._large += n
                self._big += 1
            return True
        return False

    def try_grow(self, have: int, more: int) -> bool:
        """Hold ``more`` bytes besides the ``have`` this caller holds already, when they fit
        now (always when nobody else holds any); False, holding no more, otherwise. For a
        body whose size shows only as it arrives or is decoded (chunked, compressed): the
        caller refuses it instead of waiting while it holds bytes. ``give`` the sum."""
        if self.limit <= 0 or more <= 0:
            return True
        total = have + more
        if total > SMALL and not (self.held == have or self.held + more <= self.limit):
            return False
        self.held += more
        if total > SMALL:
            self._large += more if have > SMALL else total
            if have <= SMALL:
                self._big += 1
        return True

    def keep(self, n: int) -> None:
        """Hold ``n`` bytes now, room or not: an answer already made, waiting to be written
        (its room cannot be waited for). :meth:`give` them back once written."""
        if self.limit <= 0 or n <= 0:
            return
        self.held += n
        if n > SMALL:
            self._large += n
            self._big += 1

    async def under_limit(self) -> None:
        """Wait until the bytes held are within the limit (at once when they are): what
        :meth:`keep` holds can put them over it."""
        while self.limit > 0 and self.held > self.limit:
            if self._under is None or self._under.done():
                self._under = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._under)

    async def take(self, n: int, timeout_s: float) -> float:
        """Hold ``n`` bytes; :meth:`give` them back when the request is done. Returns the
        seconds spent waiting for room. Raises ResourceExhausted when the queue for room
        is full, DeadlineExceeded when no room came within ``timeout_s``."""
        if self.limit <= 0 or n <= 0:
            return 0.0
        if n > SMALL:
            self._large += n  # counted whether it goes on, waits or is refused
        if self._now(n):
            self.held += n
            if n > SMALL:
                self._big += 1
            return 0.0
        if self.waiting and self.waiting + n > self.limit:
            raise ResourceExhausted(
                f"this ingress process holds {mb(self.held)} of requests in flight and "
                f"{mb(self.waiting)} waiting for room; this request's {mb(n)} would pass "
                f"{mb(self.limit)} ({self.what}, this process's share): retry shortly"
            )
        loop = asyncio.get_running_loop()
        started = loop.time()
        future: asyncio.Future[None] = loop.create_future()
        entry = (n, future)
        self._queue.append(entry)
        self.waiting += n
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: see SystemClock.wait
                await asyncio.shield(future)
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
                    f"waited {timeout_s:g}s for room for this request's {mb(n)}: "
                    f"{mb(self.held)} of requests are in flight on this ingress process "
                    f"({self.what}: {mb(self.limit)} for this process)"
                ) from None
            raise
        return loop.time() - started

    def give(self, n: int) -> None:
        """Give back what :meth:`take` held."""
        if self.limit <= 0 or n <= 0:
            return
        self.held -= n
        if n > SMALL:
            self._big -= 1
            if self._big == 0 and not self._queue:
                self._idle()
        self._wake()

    def _idle(self) -> None:
        """No large request in flight: release free memory if :data:`TRIM_AFTER` bytes of
        them came since the last time, now or once :data:`TRIM_EVERY_S` has passed since
        then (if still idle)."""
        release = self._release
        if release is None or self._large < TRIM_AFTER or self._later is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on a loop (a test): at once
            self._large = 0
            release()
            return
        wait = self._released_at + TRIM_EVERY_S - loop.time()
        if wait > 0:
            self._later = loop.call_later(wait, self._again)
            return
        self._large = 0
        self._released_at = loop.time()
        loop.run_in_executor(None, release).add_done_callback(_logged)

    def _again(self) -> None:
        self._later = None
        if self._big == 0 and not self._queue:
            self._idle()

    def _wake(self) -> None:
        under = self._under
        if under is not None and self.held <= self.limit:
            self._under = None
            if not under.done():
                under.set_result(None)
        while self._queue and self._fits(self._queue[0][0]):
            n, future = self._queue.popleft()
            self.waiting -= n
            self.held += n
            self._big += 1  # only requests over SMALL wait
            future.set_result(None)


def _logged(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.warning("releasing free memory failed: %s", done.exception())

"""Dynamic batching inside a replica: many requests, one model call.

Requests queue in arrival order. A collector task takes the oldest request and waits
until requests compatible with it (same input names, dtypes and shapes past axis 0) hold
``max_batch_size`` rows, or until ``max_delay_ms`` has passed since that request arrived;
it then concatenates them along axis 0, calls the model once and hands each caller its own
rows of every output. Batches run one at a time: the model is the bottleneck, and requests
that arrive while it runs make the next batch bigger.

    async with Batcher(backend.predict, max_batch_size=32, max_delay_ms=5) as batcher:
        outputs = await batcher.submit({"x": rows})

A request larger than ``max_batch_size`` is not refused: it runs alone. With
``max_batch_size == 1`` nothing is queued; ``submit`` calls the model directly.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import numpy as np

from shoal.core.limits import shown
from shoal.errors import Internal, InvalidArgument, Unavailable
from shoal.logs import EXCEPTION_TEXT_CHARS
from shoal.replica.compose import CallContext, current_call

log = logging.getLogger(__name__)

# Model calls over which the batcher remembers how many requests were in play (Batcher._in_play).
IN_PLAY_CALLS = 16

Tensors = dict[str, np.ndarray]
RunFn = Callable[[Tensors], Awaitable[Tensors]]
# What requests must share to be concatenated: whether they have no rows, and (name, dtype,
# shape past axis 0) per input. A request of 0 rows is batched only with others of 0 rows:
# the model then sees no rows whether it comes alone or under load. Before, it answered such
# a request alone with the model's error (scikit-learn refuses 0 samples) and in a batch
# with 0 rows of the batch's outputs: 16 of 20 answered, 4 refused, depending on the load.
_Key = tuple[bool, tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...]]


class _Group:
    """The queued requests of one key (they can share a model call), and how many of its
    kind were in play at the end of recent calls (``Batcher._note_in_play``)."""

    __slots__ = ("in_play", "key", "requests", "rows")

    def __init__(self, key: _Key) -> None:
        self.key = key
        self.rows = 0  # queued rows
        self.requests = 0  # queued requests
        # The most of the calls for this group in Batcher's window: the requests a call
        # served and the ones of this key queued behind it. 0: none of those calls, so no
        # client of this kind is on its way back; only a new request can join the group.
        self.in_play = 0


@dataclass(eq=False)
class _Request:
    inputs: Tensors
    rows: int
    group: _Group
    arrived: float
    future: asyncio.Future[Tensors] = field(repr=False)
    # The request this is (id, deadline), for models that call other deployments.
    call: CallContext | None = field(default_factory=current_call.get, repr=False)
    started: bool = False
    # It found the model busy or other requests queued: it may wait for company. One that
    # arrives at an idle batcher with nothing queued runs at once.
    waits: bool = True


def _rows_and_key(inputs: Tensors) -> tuple[int, _Key]:
    if not inputs:
        raise InvalidArgument("a request to a batched model needs at least one input")
    rows: int | None = None
    first = ""
    key = []
    for name in sorted(inputs):
        array = inputs[name]
        if array.ndim == 0:
            raise InvalidArgument(
                f"input {name!r} is a scalar; a batched model takes tensors whose axis 0 counts rows"
            )
        if rows is None:
            rows, first = array.shape[0], name
        elif array.shape[0] != rows:
            raise InvalidArgument(f"input {name!r} has {array.shape[0]} rows but {first!r} has {rows}")
        key.append((name, array.dtype, array.shape[1:]))
    assert rows is not None
    return rows, (rows == 0, tuple(key))


def _split(outputs: object, rows: list[int]) -> list[Tensors]:
    """Cut each output along axis 0 into one piece per request. Raises Internal if it cannot."""
    if not isinstance(outputs, dict):
        raise Internal(f"model returned {type(outputs).__name__} for a batch; expected a dict of arrays")
    total = sum(rows)
    for name, array in outputs.items():
        if not isinstance(array, np.ndarray) or array.ndim == 0 or array.shape[0] != total:
            got = f"shape {list(array.shape)}" if isinstance(array, np.ndarray) else type(array).__name__
            raise Internal(
                f"model output {name!r} has {got} for a batch of {total} rows; "
                "a batched model must return one row along axis 0 per input row"
            )
    if len(rows) == 1:
        return [dict(outputs)]  # one request: its rows are all of them
    pieces: list[Tensors] = []
    start = 0
    for n in rows:
        pieces.append({name: array[start : start + n] for name, array in outputs.items()})
        start += n
    return pieces


class Batcher:
    """Gathers concurrent requests into batches for ``run``.

    ``submit`` is safe to call from many tasks at once. A caller that is cancelled before
    its batch starts leaves the queue; one cancelled after only loses its answer. When
    ``run`` raises for a batch of several requests, each is run again alone, so only the
    requests that fail alone get an exception.

    A request that arrives while the model is idle and nothing is queued runs at once,
    unless the model just served several requests (less than ``max_delay_ms`` ago: their
    clients' next requests are coming); ``max_delay_ms`` only holds requests that arrive
    while the model is busy or others wait, and only until as many are queued as were in
    play at the end of recent calls (``_in_play``: then every closed-loop client is back),
    or as many of their own kind (same key: no other can join their batch). While the
    oldest request's kind waits for its own, a kind all of whose are back runs before it.
    A request that ran at once is not counted in play, and once the model has been idle
    ``max_delay_ms`` nobody is.

    Counters, for health updates and metrics: :attr:`queued`, :attr:`in_flight`,
    :attr:`dropped` (requests cancelled while queued), and of the successful model calls
    only (Triton's *executions*: a failed batch run again one request at a time counts the
    calls that answered, not the batch): :attr:`requests` (requests they answered),
    :attr:`batches` (the calls), :attr:`batch_sizes` (rows per call -> how many calls),
    :attr:`compute_ns` (their time inside ``run``).
    """

    def __init__(
        self,
        run: RunFn,
        max_batch_size: int,
        max_delay_ms: float,
        *,
        run_now: Callable[[Tensors], Tensors | None] | None = None,
    ) -> None:
        """``run_now``: ``run`` at once, synchronously, or None when it cannot
        (``Backend.predict_now``); :meth:`try_now` uses it."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {max_delay_ms}")
        self._run = run
        self._run_now = run_now
        self.max_batch_size = max_batch_size
        self.max_delay_ms = max_delay_ms
        self._max_delay_s = max_delay_ms / 1000

        self._queue: collections.deque[_Request] = collections.deque()
        # The groups with requests queued or calls in the in-play window, by key.
        self._groups: dict[_Key, _Group] = {}
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()  # set while nothing runs; aclose waits on it for direct calls
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._closing = False

        self._in_flight = 0
        self._running: _Group | None = None  # the group whose batch runs
        # When the last model call ended, and for how many requests. A request within
        # max_delay_ms of a call for several is likely the first of a burst of answers
        # coming back as new requests (closed-loop clients): it waits for the others
        # instead of running alone (measured: running such firsts alone halved throughput
        # at concurrency 32, in twice as many smaller batches).
        self._last_end = float("-inf")
        self._last_call_s = 0.0  # how long the last model call took
        self._last_requests = 0  # requests in the last model call
        # The requests in play when each of the last IN_PLAY_CALLS model calls ended: the
        # ones it served (but one that ran at once: _run_batch) and the ones queued behind
        # it; forgotten once the model has idled max_delay_ms (_forget_in_play). Once as
        # many are queued as the most of those, every closed-loop client is back: the
        # batch runs without waiting out max_delay_ms (measured, 4 clients, max_delay_ms
        # 5: batched at 0.30x the throughput of unbatched, each round held 5 ms with the
        # whole burst queued). Counting the queued ones keeps two groups of clients
        # answered in turn from running as two small batches for ever (the first waits
        # for the second); the most over several calls keeps a batch that ran short,
        # while some clients were still on their way, from setting the size of the next:
        # after a fall in load, the batches wait out max_delay_ms for IN_PLAY_CALLS calls
        # at most, as they all did before this rule.
        self._in_play: collections.deque[int] = collections.deque(maxlen=IN_PLAY_CALLS)
        # The same calls by group: the group each served (None: a call of try_now) and how
        # many of its kind were in play at its end (_Group.in_play is the most per group).
        # Requests of another key cannot join a group, so a group whose kind is all queued
        # need not wait for the others' clients: with mixed shapes (or requests of 0 rows
        # among others), the requests left queued behind one shape's batch were held
        # max_delay_ms for clients that would come back with the other shape, if at all.
        self._in_play_groups: collections.deque[_Group | None] = collections.deque(maxlen=IN_PLAY_CALLS)
        self._in_play_own: collections.deque[int] = collections.deque(maxlen=IN_PLAY_CALLS)
        self.requests = 0
        self.batches = 0
        self.compute_ns = 0
        self.dropped = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the collector (only needed when ``max_batch_size > 1``). Idempotent."""
        if self._started:
            return
        if self._closing:
            raise RuntimeError("a closed Batcher cannot be started again")
        self._started = True
        if self.max_batch_size > 1:
            self._task = asyncio.create_task(self._collect(), name="shoal-batcher")

    async def aclose(self) -> None:
        """Stop taking requests, finish the queued and running ones, stop the collector.

        If ``aclose`` itself is cancelled, the running batch is cancelled and every request
        still queued gets Unavailable; the CancelledError then propagates.
        """
        self._closing = True
        self._wakeup.set()
        task = self._task
        if task is not None:
            try:
                # Awaiting the task directly: cancelling aclose cancels the collector too.
                await task
            except Exception:
                log.exception("the batcher's collector failed")
        await self._idle.wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- observability ------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Requests whose model call is running."""
        return self._in_flight

    # -- requests -----------------------------------------------------------------------

    async def submit(self, inputs: Tensors) -> Tensors:
        """Run ``inputs`` (each tensor's axis 0 counts rows) as part of a batch; return its rows.

        Raises whatever ``run`` raised for the batch; Internal when the model's outputs do not
        have one row per input row; InvalidArgument for inputs that cannot be batched (no
        inputs, scalars, differing row counts); Unavailable once the batcher is closing.
        """
        if self._closing:
            raise Unavailable("the replica is shutting down")
        if self.max_batch_size == 1:
            return await self._run_direct(inputs)
        request = self.enqueue(inputs)
        try:
            return await request.future
        except asyncio.CancelledError:
            self.cancel(request)
            raise

    def enqueue(self, inputs: Tensors, call: CallContext | None = None) -> _Request:
        """``submit`` without a coroutine, for callers that answer from a callback (the local
        hop): queue ``inputs`` and return the request, whose ``future`` gets the rows. Who
        gives up on it calls :meth:`cancel`. Only when ``max_batch_size > 1``; raises as
        ``submit`` does, at once. ``call``: the request it serves (default: the current one).
        """
        if self._closing:
            raise Unavailable("the replica is shutting down")
        if self._task is None:
            raise RuntimeError("Batcher.enqueue called before start()")
        if self._task.done():
            raise Internal("the batcher's collector has stopped")
        rows, key = _rows_and_key(inputs)
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._in_flight or self._queue:
            waits = True
        else:
            if self._in_play and now - self._last_end >= self._max_delay_s:
                self._forget_in_play()
            waits = self._burst_expected(now)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(key)
        request = _Request(
            inputs=inputs,
            rows=rows,
            group=group,
            arrived=now,
            future=loop.create_future(),
            call=call if call is not None else current_call.get(),
            waits=waits,
        )
        self._queue.append(request)
        group.rows += rows
        group.requests += 1
        self._wakeup.set()
        return request

    def try_now(self, inputs: Tensors, call: CallContext | None = None) -> Tensors | None:
        """The request's rows at once, when it would run alone anyway (nothing runs or
        waits, and no burst is on its way: see ``_Request.waits``) and the model's calls
        run on the event loop (``run_now``); None otherwise (then :meth:`enqueue` or
        :meth:`submit` it). Raises what :meth:`submit` raises. Counted as a batch of one.

        Why: at concurrency 1 every request takes this path, and the collector's wake-up
        and the future's callbacks were two of the replica's four loop turns a request.
        """
        if self._run_now is None or self._in_flight or self._queue or self._closing or not self._started:
            return None
        loop = asyncio.get_running_loop()
        if self.max_batch_size > 1:
            now = loop.time()
            if self._burst_expected(now):
                return None
            if self._in_play and now - self._last_end >= self._max_delay_s:
                self._forget_in_play()
            rows = _rows_and_key(inputs)[0]
        else:
            rows = next((a.shape[0] for a in inputs.values() if a.ndim > 0), 1)
        started = time.perf_counter_ns()
        token = current_call.set(call if call is not None else current_call.get())
        try:
            outputs = self._run_now(inputs)
        finally:
            current_call.reset(token)
        if outputs is None:
            return None
        took_ns = time.perf_counter_ns() - started
        self._last_end = loop.time()
        self._last_call_s = took_ns / 1e9
        self._last_requests = 1
        self._note_in_play(0, None, 0)  # it ran at once: see _run_batch
        answer = _split(outputs, [rows])[0] if self.max_batch_size > 1 else outputs
        # _count, inlined: this is every request's path at concurrency 1 (a call costs 60 ns).
        self.requests += 1
        self.batches += 1
        self.batch_sizes[rows] += 1
        self.compute_ns += took_ns
        return answer

    def cancel(self, request: _Request, error: BaseException | None = None) -> None:
        """Give up on ``request``: it leaves the queue if its batch has not started (its rows
        are not run), and its future is cancelled, or fails with ``error``."""
        if not request.future.done():
            if error is None:
                request.future.cancel()
            else:
                request.future.set_exception(error)
        if not request.started:
            self._forget(request)

    async def _run_direct(self, inputs: Tensors) -> Tensors:
        # No queue and no hop through the collector: concurrent callers run concurrently,
        # and a sync backend serialises them on its own thread.
        rows = next((a.shape[0] for a in inputs.values() if a.ndim > 0), 1)
        self._in_flight += 1
        self._idle.clear()
        started = time.perf_counter_ns()
        try:
            outputs = await self._run(inputs)
            self._count(1, rows, time.perf_counter_ns() - started)
            return outputs
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def _count(self, requests: int, rows: int, took_ns: int) -> None:
        """Count one successful model call of ``rows`` rows for ``requests`` requests."""
        self.requests += requests
        self.batches += 1
        self.batch_sizes[rows] += 1
        self.compute_ns += took_ns

    def _burst_expected(self, now: float) -> bool:
        """Whether a request arriving now is likely the first of several: the last model
        call served several requests and ended less than ``max_delay_ms`` ago, so their
        clients' next requests are on their way. After a call of one request (a lone
        client) nothing else is coming, and waiting would only add latency."""
        return self._last_requests > 1 and now - self._last_end < self._max_delay_s

    def _forget(self, request: _Request) -> None:
        try:
            self._queue.remove(request)
        except ValueError:
            return
        group = request.group
        group.rows -= request.rows
        group.requests -= 1
        if not group.requests and not group.in_play and group is not self._running:
            self._drop_group(group)
        self.dropped += 1

    def _drop_group(self, group: _Group) -> None:
        if self._groups.get(group.key) is group:
            del self._groups[group.key]

    def _forget_in_play(self) -> None:
        """Forget who was in play: the model has been idle max_delay_ms (nothing runs or
        waits), so no client answered before is coming back within the time a request
        would wait for it. Without this, a burst after an idle spell waited max_delay_ms
        for as many as were in play before it, up to IN_PLAY_CALLS calls ago."""
        self._in_play.clear()
        self._in_play_groups.clear()
        self._in_play_own.clear()
        self._groups.clear()  # nothing is queued: no request refers to one

    def _note_in_play(self, total: int, group: _Group | None, own: int) -> None:
        """Remember a call's end: ``total`` requests in play (it served them or they were
        queued), ``own`` of them ``group``'s (None: a call of one by try_now, which holds
        nobody back). Updates the groups' ``in_play``; forgets groups no longer needed."""
        groups, owns = self._in_play_groups, self._in_play_own
        gone = groups[0] if len(groups) == IN_PLAY_CALLS else None
        gone_own = owns[0] if gone is not None else 0
        self._in_play.append(total)
        groups.append(group)
        owns.append(own)
        if group is not None:
            if own > group.in_play:
                group.in_play = own
            elif not group.in_play and not group.requests:
                self._drop_group(group)
        if gone is not None:
            if gone_own >= gone.in_play:  # it was the most: take the most of the rest
                gone.in_play = max((n for g, n in zip(groups, owns, strict=True) if g is gone), default=0)
            if not gone.in_play and not gone.requests:
                self._drop_group(gone)

    # -- the collector ------------------------------------------------------------------

    async def _collect(self) -> None:
        try:
            while True:
                batch = await self._next_batch()
                if batch is None:
                    return
                await self._run_batch(batch)
        finally:
            # Whatever stopped us, nobody may wait forever on a request we will not run.
            while self._queue:
                request = self._queue.popleft()
                if not request.future.done():
                    request.future.set_exception(Unavailable("the replica is shutting down"))
            self._groups.clear()

    async def _next_batch(self) -> list[_Request] | None:
        """Wait for a batch to be due and take it off the queue; None once closing and empty."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return None
                await self._wait(None)
                continue
            head = self._queue[0]
            group = head.group
            if self._closing or group.rows >= self.max_batch_size:
                break
            if not head.waits:
                # Nothing to wait for: the model is idle and nobody else is queued, so
                # holding this request max_delay_ms would only add latency (c=1 with
                # batching on costs what it costs with batching off).
                break
            now = loop.time()
            remaining = head.arrived + self._max_delay_s - now
            if remaining <= 0:
                break
            ready: _Group | None = None
            if not self._in_flight:
                in_play = max(self._in_play, default=0)
                if (in_play and len(self._queue) >= in_play) or group.requests >= group.in_play:
                    # Every client in play is back (see _in_play), or every one of the
                    # head's kind: those of other kinds cannot join its batch.
                    ready = group
                elif group.requests < len(self._queue):
                    # The head waits for its own kind; a group behind it may not.
                    ready = self._ready_behind(group)
            if ready is not None:
                # Wait on for stragglers only while the model has been idle no longer than
                # its last call took: a fast model runs the burst at once, a slow one still
                # gathers what its cost is worth (32 clients, a 5 ms call: running at the
                # count alone gave 7.6-11.6x the unbatched throughput where waiting gave
                # 12.7-12.9x).
                straggle = self._last_end + self._last_call_s - now
                if straggle <= 0:
                    return self._take(ready)
                remaining = min(remaining, straggle)
            await self._wait(remaining)
        return self._take(head.group)

    def _ready_behind(self, head: _Group) -> _Group | None:
        """The group of the oldest request queued behind ``head``'s that need not wait
        any longer: it is full, or every one of its kind in play is queued."""
        for request in self._queue:
            group = request.group
            if group is not head and (group.rows >= self.max_batch_size or group.requests >= group.in_play):
                return group
        return None

    async def _wait(self, seconds: float | None) -> None:
        """Sleep until a request arrives, aclose is called, or ``seconds`` pass (None: no limit)."""
        self._wakeup.clear()
        if seconds is None:
            await self._wakeup.wait()
            return
        try:
            async with asyncio.timeout(seconds):
                await self._wakeup.wait()
        except TimeoutError:
            pass

    def _take(self, group: _Group) -> list[_Request]:
        """``group``'s oldest requests, in order, up to max_batch_size rows (at least one)."""
        batch: list[_Request] = []
        rest: collections.deque[_Request] = collections.deque()
        total = 0
        full = False
        for request in self._queue:
            if full or request.group is not group:
                rest.append(request)
            elif not batch or total + request.rows <= self.max_batch_size:
                batch.append(request)
                total += request.rows
            else:
                # Stop at the first that does not fit, so a big request is never overtaken
                # for ever by smaller ones behind it.
                full = True
                rest.append(request)
        self._queue = rest
        group.rows -= total
        group.requests -= len(batch)
        for request in batch:
            request.started = True
        return batch

    async def _run_singly(self, batch: list[_Request]) -> None:
        for request in batch:
            if request.future.done():  # its caller gave up meanwhile
                continue
            started = time.perf_counter_ns()
            token = current_call.set(request.call)
            try:
                outputs = await self._run(request.inputs)
                piece = _split(outputs, [request.rows])[0]
                self._count(1, request.rows, time.perf_counter_ns() - started)
            except asyncio.CancelledError:
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(Unavailable("the replica shut down while the request ran"))
                raise
            except Exception as err:
                if not request.future.done():
                    request.future.set_exception(err)
                continue
            finally:
                current_call.reset(token)
            if not request.future.done():
                request.future.set_result(piece)

    async def _run_batch(self, batch: list[_Request]) -> None:
        rows = [r.rows for r in batch]
        began = asyncio.get_running_loop().time()
        self._in_flight = len(batch)
        self._running = batch[0].group
        self._idle.clear()
        try:
            try:
                if len(batch) == 1:
                    inputs = batch[0].inputs
                else:
                    names = batch[0].inputs.keys()
                    inputs = {n: np.concatenate([r.inputs[n] for r in batch], axis=0) for n in names}
                started = time.perf_counter_ns()
                token = current_call.set(CallContext.merge(r.call for r in batch))
                try:
                    outputs = await self._run(inputs)
                finally:
                    current_call.reset(token)
                pieces = _split(outputs, rows)
                self._count(len(batch), sum(rows), time.perf_counter_ns() - started)
            except asyncio.CancelledError:
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(
                            Unavailable("the replica shut down while the request ran")
                        )
                raise
            except Exception as err:
                if all(r.future.done() for r in batch):
                    return  # each given up meanwhile (a model that stops when nobody waits): none to answer
                if len(batch) == 1:
                    if not batch[0].future.done():
                        batch[0].future.set_exception(err)
                    return
                # One bad request must not fail the others batched with it: run each alone,
                # so only the offender gets an error.
                # A model's error often quotes its input: cut, as a traceback's text is.
                log.info(
                    "a batch of %d requests failed (%s); running them one by one",
                    len(batch),
                    shown(str(err), EXCEPTION_TEXT_CHARS),
                )
                await self._run_singly(batch)
                return
            for request, piece in zip(batch, pieces, strict=True):
                if not request.future.done():  # its caller may have given up meanwhile
                    request.future.set_result(piece)
        finally:
            self._in_flight = 0
            self._last_end = asyncio.get_running_loop().time()
            self._last_call_s = self._last_end - began
            self._last_requests = len(batch)
            self._running = None
            # A request that ran at once (it found the model idle and nothing queued: only
            # ever a batch's first) is a lone client's as far as anyone knows (see
            # _burst_expected): it is not counted in play, so the requests that queued behind
            # it, of its shape or not, do not wait max_delay_ms for its client's next one.
            served = len(batch) if batch[0].waits else len(batch) - 1
            group = batch[0].group
            self._note_in_play(served + len(self._queue), group, served + group.requests)
            self._idle.set()

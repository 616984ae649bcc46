"""What one generator process does: a :class:`Plan`, the :class:`Result` it measured, and
the loops that run it, closed (:func:`closed_loop`, also ``shoal chaos``'s) or open."""

from __future__ import annotations

import array
import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal.errors import Unavailable

# ---------------------------------------------------------------- plan and result


@dataclass(frozen=True)
class Plan:
    """What one generator process does. ``requests`` 0 means run for ``duration_s``."""

    protocol: str
    address: str
    model: str
    concurrency: int
    duration_s: float = 10.0
    requests: int = 0
    rate: float = 0.0
    arrival: str = "poisson"
    warmup_s: float = 0.0
    timeout_s: float = 60.0
    connections: int = 1
    seed: int = 0


@dataclass
class Result:
    """What a run measured; latencies in nanoseconds, one per successful request."""

    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ns: array.array[int] = field(default_factory=lambda: array.array("q"))
    started: float = math.inf
    ended: float = 0.0
    cpu_s: float = 0.0
    warmup_requests: int = 0

    def merge(self, other: Result) -> None:
        self.ok += other.ok
        self.errors.update(other.errors)
        self.latencies_ns.extend(other.latencies_ns)
        self.started = min(self.started, other.started)
        self.ended = max(self.ended, other.ended)
        self.cpu_s += other.cpu_s
        self.warmup_requests += other.warmup_requests


class Counters:
    """Per-worker counts of finished requests for the progress line (two slots a worker)."""

    def __init__(self, slots: Any) -> None:
        self.slots = slots

    def total(self) -> tuple[int, int]:
        values = list(self.slots)
        return sum(values[0::2]), sum(values[1::2])


# ---------------------------------------------------------------- the load loop


async def run_plan(
    plan: Plan,
    inputs: Mapping[str, np.ndarray],
    *,
    counters: Any = None,
    slot: int = 0,
    gate: Callable[[], Awaitable[float]] | None = None,
) -> Result:
    """Load ``plan.model`` with ``inputs`` and return what was measured.

    ``counters[2*slot]``/``[2*slot+1]`` count successes/errors as they happen (for a
    progress line in another thread or process). ``gate``, when given, is awaited once
    the first request has succeeded and returns the ``time.time()`` at which to start,
    so that several processes start together. Raises Unavailable when the first request
    fails, naming why.
    """
    from shoal.rpc.loadgen_client import open_target

    target = open_target(
        plan.protocol,
        plan.address,
        plan.model,
        inputs,
        connections=plan.connections,
        timeout_s=plan.timeout_s,
    )
    try:
        failed = await target.probe()
        if failed is not None:
            raise Unavailable(f"{plan.protocol} request to {plan.model!r} at {plan.address} failed: {failed}")
        senders = [target.sender() for _ in range(plan.concurrency)]
        if gate is not None:
            start_at = await gate()
            await asyncio.sleep(max(0.0, start_at - time.time()))
        if plan.rate > 0:
            return await _open_loop(plan, senders, counters, slot)
        return await _closed_loop(plan, senders, counters, slot)
    finally:
        await target.aclose()


async def closed_loop(steps: Sequence[Callable[[], Awaitable[bool]]]) -> None:
    """The closed loop, for ``shoal bench`` and ``shoal chaos`` alike: one caller per step,
    each awaiting its step again as soon as it returns, until it returns False. A step
    sends one request and records it. The callers belong to one TaskGroup: an exception
    in a step ends the others and propagates; cancelling this call cancels them all."""

    async def caller(step: Callable[[], Awaitable[bool]]) -> None:
        while await step():
            pass

    async with asyncio.TaskGroup() as tg:
        for step in steps:
            tg.create_task(caller(step))


def _limits(plan: Plan, t0: int) -> tuple[int, int]:
    warm_end = t0 + int(plan.warmup_s * 1e9)
    end = warm_end + int(plan.duration_s * 1e9) if not plan.requests else 2**62
    return warm_end, end


async def _closed_loop(plan: Plan, senders: Sequence[Any], counters: Any, slot: int) -> Result:
    result = Result()
    lat = result.latencies_ns
    errors = result.errors
    clock = time.perf_counter_ns
    cpu0 = time.process_time()
    t0 = clock()
    warm_end, end = _limits(plan, t0)
    budget = [plan.requests if plan.requests else 2**62]
    ok_slot, err_slot = 2 * slot, 2 * slot + 1
    box = counters if counters is not None else [0, 0] * (slot + 1)

    def step_of(send: Any) -> Callable[[], Awaitable[bool]]:
        async def step() -> bool:
            start = clock()
            if start >= end:
                return False
            if start >= warm_end:
                if budget[0] <= 0:
                    return False
                budget[0] -= 1
            failed = await send()
            done = clock()
            if start < warm_end:
                result.warmup_requests += 1
            elif failed is None:
                lat.append(done - start)
                box[ok_slot] += 1
            else:
                errors[failed] += 1
                box[err_slot] += 1
            return True

        return step

    await closed_loop([step_of(send) for send in senders])
    result.ok = len(lat)
    result.started = time.time() - (clock() - warm_end) / 1e9
    result.ended = time.time()
    result.cpu_s = time.process_time() - cpu0
    return result


async def _open_loop(plan: Plan, senders: Sequence[Any], counters: Any, slot: int) -> Result:
    result = Result()
    lat = result.latencies_ns
    errors = result.errors
    clock = time.perf_counter_ns
    rng = random.Random(plan.seed)
    idle = list(senders)
    free = asyncio.Semaphore(len(senders))
    ok_slot, err_slot = 2 * slot, 2 * slot + 1
    box = counters if counters is not None else [0, 0] * (slot + 1)
    cpu0 = time.process_time()
    t0 = clock()
    warm_end, end = _limits(plan, t0)
    gap_ns = 1e9 / plan.rate

    async def one(scheduled: int) -> None:
        # Latency runs from the scheduled start: waiting for a free caller counts.
        async with free:
            send = idle.pop()
            try:
                failed = await send()
            finally:
                idle.append(send)
        done = clock()
        if scheduled < warm_end:
            result.warmup_requests += 1
        elif failed is None:
            lat.append(done - scheduled)
            box[ok_slot] += 1
        else:
            errors[failed] += 1
            box[err_slot] += 1

    sent = 0
    next_at = float(t0)
    async with asyncio.TaskGroup() as tg:
        while True:
            next_at += rng.expovariate(1.0) * gap_ns if plan.arrival == "poisson" else gap_ns
            if next_at >= end or (plan.requests and sent >= plan.requests):
                break
            delay = (next_at - clock()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            if next_at >= warm_end:
                sent += 1
            tg.create_task(one(int(next_at)))
    result.ok = len(lat)
    result.started = time.time() - (clock() - warm_end) / 1e9
    result.ended = time.time()
    result.cpu_s = time.process_time() - cpu0
    return result

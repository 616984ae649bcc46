"""The load under chaos: callers sending shoal's native request to one scheduler, each
request kept as a :class:`Sample` (when, how long, how it failed, which replica answered).
The callers run in ``shoal bench``'s closed loop (:func:`shoal.loadgen.loops.closed_loop`)."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.config import Settings
from shoal.core.clock import wait_for
from shoal.errors import InvalidArgument, ShoalError
from shoal.loadgen.loops import closed_loop
from shoal.types import Arrays


def inputs_for(spec: Mapping[str, Any], seed: int = 0) -> Arrays:
    """A request for a deployment, shaped from its declared inputs (``-1`` dimensions become 1)."""
    from shoal.core.tensors import DATATYPES

    declared = spec.get("inputs") or []
    if not declared:
        raise InvalidArgument(
            f"deployment {spec.get('name')!r} declares no inputs; shoal chaos shapes its requests from them"
        )
    rng = np.random.default_rng(seed)
    out: Arrays = {}
    for t in declared:
        shape = tuple(1 if d < 0 else d for d in t.get("shape", [-1])) or (1,)
        datatype = t.get("datatype", "FP32")
        if datatype == "BYTES":
            arr = np.empty(shape, dtype=object)
            arr.flat[:] = [b"shoal-chaos"] * arr.size
        elif datatype == "BOOL":
            arr = rng.random(shape) < 0.5
        elif DATATYPES[datatype].kind in "iu":
            arr = rng.integers(0, 16, size=shape).astype(DATATYPES[datatype])
        else:
            arr = rng.random(shape).astype(DATATYPES[datatype])
        out[t["name"]] = arr
    return out


@dataclass(frozen=True)
class Sample:
    """One request: when it was sent (seconds since ``Load.t0``), how long it took, how it failed."""

    at: float
    latency_s: float
    error: str | None  # None when it succeeded, else its kind (UNAVAILABLE, DEADLINE_EXCEEDED, ...)
    replica: str = ""  # the replica that answered
    request_id: str = ""


class Load:
    """``concurrency`` callers sending one request each, again and again, to a scheduler's
    native ingress until stopped. ``rate`` > 0 paces the callers to that many requests a
    second in total. Records every request as a :class:`Sample`; never raises for a failed
    request. Lifecycle: ``async with Load(...)`` (or ``start()`` / ``stop()``)."""

    def __init__(
        self,
        address: str,
        deployment: str,
        inputs: Arrays,
        settings: Settings,
        *,
        concurrency: int = 8,
        timeout_s: float = 30.0,
        rate: float = 0.0,
    ) -> None:
        self.address = address
        self.deployment = deployment
        self.inputs = inputs
        self.settings = settings
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.rate = rate
        self.samples: list[Sample] = []
        self.examples: dict[str, str] = {}  # error kind -> first message
        self.t0 = time.monotonic()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._next_at = 0.0
        self._ids = itertools.count(1)
        self._client: Any = None

    async def start(self) -> None:
        from shoal.rpc.clients import NativeClient

        self._client = NativeClient(self.address, self.settings)
        self.t0 = time.monotonic()
        self._next_at = self.t0
        self._task = asyncio.create_task(closed_loop([self._step] * self.concurrency), name="chaos-load")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        self._task = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> Load:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def _step(self) -> bool:
        """One request, paced when ``rate`` is set, recorded; False once stopped."""
        if self._stop.is_set():
            return False
        if self.rate > 0:
            at = self._next_at = max(self._next_at + 1.0 / self.rate, time.monotonic() - 1.0)
            delay = at - time.monotonic()
            if delay > 0:
                try:
                    await wait_for(self._stop.wait(), delay)
                    return False
                except TimeoutError:
                    pass
        start = time.monotonic()
        error: str | None = None
        replica = ""
        # Named, so that a failed request can be followed through the schedulers' logs.
        request_id = f"chaos-{os.getpid()}-{next(self._ids)}"
        try:
            _, replica = await self._client.infer(
                self.deployment, self.inputs, timeout_s=self.timeout_s, request_id=request_id
            )
        except ShoalError as err:
            error = err.code.name
            self.examples.setdefault(error, f"{request_id}: {str(err)[:300]}")
        except Exception as err:  # a failed request is a measurement, not a crash
            error = type(err).__name__
            self.examples.setdefault(error, f"{request_id}: {str(err)[:300]}")
        done = time.monotonic()
        self.samples.append(Sample(start - self.t0, done - start, error, replica, request_id))
        return True

    def failures(self) -> list[Sample]:
        return [s for s in self.samples if s.error is not None]


def latency_stats(samples: Sequence[Sample]) -> dict[str, Any]:
    """Requests, failures and latency percentiles (ms, of successful requests) of ``samples``."""
    ok = np.array([s.latency_s for s in samples if s.error is None]) * 1000

    def pct(q: float) -> float | None:
        return round(float(np.percentile(ok, q)), 2) if ok.size else None

    return {
        "requests": len(samples),
        "failed": sum(1 for s in samples if s.error is not None),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "max_ms": round(float(ok.max()), 2) if ok.size else None,
    }

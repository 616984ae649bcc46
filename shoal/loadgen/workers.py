"""A plan split over several generator processes started together, their results merged."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np

from shoal.errors import Unavailable
from shoal.loadgen.loops import Counters, Plan, Result, run_plan


def _split(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


def _worker_plan(plan: Plan, workers: int, index: int) -> Plan:
    return Plan(
        **{
            **asdict(plan),
            "concurrency": _split(plan.concurrency, workers, index),
            "requests": _split(plan.requests, workers, index) if plan.requests else 0,
            "rate": plan.rate / workers,
            "connections": max(1, _split(plan.connections, workers, index)),
            "seed": plan.seed + index,
        }
    )


def _worker_main(
    plan: Plan, inputs: dict[str, np.ndarray], counters: Any, slot: int, ready: Any, go: Any, out: Any
) -> None:
    """One worker process: connect, say ready, wait for the common start time, run, report."""

    async def gate() -> float:
        ready.put(slot)
        return float(await asyncio.to_thread(go.get))

    try:
        result = asyncio.run(run_plan(plan, inputs, counters=counters, slot=slot, gate=gate))
        doc = {
            "ok": result.ok,
            "errors": dict(result.errors),
            "latencies": result.latencies_ns.tobytes(),
            "started": result.started,
            "ended": result.ended,
            "cpu_s": result.cpu_s,
            "warmup": result.warmup_requests,
        }
        out.put((slot, None, doc))
    except BaseException as err:  # reported to the parent, which raises it
        ready.put(slot)
        out.put((slot, f"{type(err).__name__}: {err}", None))


def run_workers(
    plan: Plan, inputs: Mapping[str, np.ndarray], workers: int, progress: Callable[[Counters], None] | None
) -> Result:
    """Run ``plan`` split over ``workers`` processes started together; merge their results."""
    workers = max(1, min(workers, plan.concurrency))
    ctx = multiprocessing.get_context("spawn")
    slots = ctx.Array("q", 2 * workers, lock=False)
    ready, go, out = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(_worker_plan(plan, workers, i), dict(inputs), slots, i, ready, go, out),
            daemon=True,
        )
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        start_at = time.time() + 0.2
        for _ in procs:
            go.put(start_at)
        stop = threading.Event()
        ticker = None
        if progress is not None:
            counters = Counters(slots)

            def tick() -> None:
                while not stop.wait(1.0):
                    progress(counters)

            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
        merged = Result()
        problems = []
        for _ in procs:
            slot, problem, doc = out.get()
            if problem is not None:
                problems.append(f"worker {slot}: {problem}")
                continue
            part = Result(
                ok=doc["ok"],
                errors=Counter(doc["errors"]),
                started=doc["started"],
                ended=doc["ended"],
                cpu_s=doc["cpu_s"],
                warmup_requests=doc["warmup"],
            )
            part.latencies_ns.frombytes(doc["latencies"])
            merged.merge(part)
        stop.set()
        if problems:
            raise Unavailable("; ".join(problems))
        return merged
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()

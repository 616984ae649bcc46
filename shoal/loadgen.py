"""``shoal bench NAME``: a load generator for shoal and any Open Inference Protocol server.

    shoal bench echo --protocol grpc --concurrency 32 --duration 10
    shoal bench digits --url 127.0.0.1:8000 --protocol http --rate 500 --requests 5000 --json

Closed loop by default (``--concurrency`` callers, each sending its next request when the
last one is answered); ``--rate R`` makes it an open loop: requests start on a Poisson (or
``--arrival fixed``) schedule whatever the server does, at most ``--concurrency`` in flight,
and latency counts from the scheduled start, so a server that falls behind shows it.

The request is serialized once and sent as raw bytes (``shoal.rpc.loadgen_client``), so one
process keeps up with most servers on the same machine; ``--workers K`` runs K processes
and merges their results. The final table gives requests, errors by kind (gRPC status or
HTTP status), throughput, latency percentiles and the generator's own CPU use: a
generator near 100% of a core is measuring itself; add workers.

This module knows nothing of the wire; ``add_parser`` registers the ``bench`` subcommand
on shoal's CLI, and ``python -m shoal.loadgen`` runs it alone.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import math
import multiprocessing
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shoal.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

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


# ---------------------------------------------------------------- several processes


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


# ---------------------------------------------------------------- inputs


def random_inputs(infos: Sequence[Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors shaped from model metadata (``-1`` dimensions become 1)."""
    from shoal.core.tensors import DATATYPES

    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for t in infos:
        shape = tuple(1 if d < 0 else d for d in t.shape) or (1,)
        dtype = DATATYPES.get(t.datatype)
        if dtype is None:
            raise InvalidArgument(f"input {t.name!r} has unknown datatype {t.datatype!r}")
        if t.datatype == "BYTES":
            arr = np.empty(shape, dtype=object)
            arr.flat[:] = [b"shoal-bench"] * arr.size
        elif t.datatype == "BOOL":
            arr = rng.random(shape) < 0.5
        elif dtype.kind in "iu":
            arr = rng.integers(0, 16, size=shape).astype(dtype)
        else:
            arr = rng.random(shape, dtype=np.float32).astype(dtype)
        out[t.name] = arr
    return out


def load_inputs(specs: Sequence[str], infos: Sequence[Any]) -> dict[str, np.ndarray]:
    """Inputs from ``--input`` values: ``FILE.json``, ``FILE.npy`` or ``NAME=FILE.npy``.

    JSON is ``{"name": nested list}`` or an OIP request (``{"inputs": [{name, shape,
    datatype, data}]}``); lists take the datatype the metadata declares (FP32 for floats
    when it declares none). A bare ``.npy`` file feeds the model's first input.
    """
    from shoal.core import tensors

    declared = {t.name: t.datatype for t in infos}
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        name, eq, path_text = spec.partition("=")
        if not eq:
            name, path_text = "", spec
        path = Path(path_text)
        try:
            if path.suffix == ".npy":
                arr = np.load(path, allow_pickle=False)
                if not name:
                    if not infos:
                        raise InvalidArgument(f"{path}: name the input (NAME={path}): no model metadata")
                    name = infos[0].name
                datatype = declared.get(name)
                if datatype and datatype != "BYTES":
                    arr = arr.astype(tensors.DATATYPES[datatype])
                out[name] = arr
                continue
            doc = json.loads(path.read_text())
        except OSError as err:
            raise InvalidArgument(f"cannot read {path}: {err.strerror}") from None
        except ValueError as err:
            raise InvalidArgument(f"{path}: {err}") from None
        if isinstance(doc, dict) and isinstance(doc.get("inputs"), list):
            for t in doc["inputs"]:
                out[t["name"]] = tensors.from_json(t["datatype"], t["shape"], t["data"], name=t["name"])
            continue
        if not isinstance(doc, dict) or not doc:
            raise InvalidArgument(f"{path}: expected a JSON object mapping input names to lists")
        for key, value in doc.items():
            arr = np.asarray(value)
            datatype = declared.get(key) or ("FP32" if arr.dtype.kind in "iuf" else tensors.datatype_of(arr))
            out[key] = tensors.from_json(datatype, list(arr.shape), arr.tolist(), name=key)
    return out


# ---------------------------------------------------------------- report


def summarize(result: Result, plan: Plan, workers: int) -> dict[str, Any]:
    """The JSON document ``--json`` prints."""
    lat = np.frombuffer(result.latencies_ns, dtype=np.int64) / 1e6 if result.ok else np.zeros(0)
    elapsed = max(result.ended - result.started, 1e-9) if result.ok or result.errors else 0.0
    errors = sum(result.errors.values())

    def pct(q: float) -> float | None:
        return round(float(np.percentile(lat, q)), 3) if lat.size else None

    return {
        "model": plan.model,
        "protocol": plan.protocol,
        "address": plan.address,
        "mode": "open" if plan.rate else "closed",
        "concurrency": plan.concurrency,
        "rate": plan.rate or None,
        "workers": workers,
        "requests": result.ok + errors,
        "ok": result.ok,
        "errors": errors,
        "errors_by_kind": dict(sorted(result.errors.items())),
        "duration_s": round(elapsed, 3),
        "throughput_rps": round(result.ok / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {
            "p50": pct(50),
            "p90": pct(90),
            "p99": pct(99),
            "max": round(float(lat.max()), 3) if lat.size else None,
            "mean": round(float(lat.mean()), 3) if lat.size else None,
        },
        "client_cpu_s": round(result.cpu_s, 2),
        "client_cpu_share": round(result.cpu_s / elapsed, 3) if elapsed else 0.0,
        "warmup_requests": result.warmup_requests,
    }


def render(doc: Mapping[str, Any]) -> str:
    """The human table."""
    lat = doc["latency_ms"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    load = (
        f"open loop, {doc['rate']:g} req/s, at most {doc['concurrency']} in flight"
        if doc["mode"] == "open"
        else f"closed loop, concurrency {doc['concurrency']}"
    )
    rows = [
        ("target", f"{doc['protocol']}://{doc['address']} model {doc['model']}"),
        ("load", f"{load}, {doc['workers']} worker{'s' if doc['workers'] > 1 else ''}"),
        ("duration", f"{doc['duration_s']:.2f} s"),
        ("requests", f"{doc['requests']} (ok {doc['ok']}, errors {doc['errors']})"),
    ]
    for kind, n in doc["errors_by_kind"].items():
        rows.append(("  error", f"{kind}: {n}"))
    rows += [
        ("throughput", f"{doc['throughput_rps']:.1f} req/s"),
        (
            "latency ms",
            f"p50 {ms(lat['p50'])}  p90 {ms(lat['p90'])}  p99 {ms(lat['p99'])}  max {ms(lat['max'])}",
        ),
        ("client CPU", f"{doc['client_cpu_share'] * 100:.0f}% of one core ({doc['client_cpu_s']:.1f} s)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


class Progress:
    """The live line on stderr: redrawn in a terminal, else one line a second when asked."""

    def __init__(self, enabled: bool, tty: bool) -> None:
        self.enabled = enabled or tty
        self.tty = tty
        self.t0 = time.monotonic()
        self.last = (self.t0, 0)

    def __call__(self, counters: Counters) -> None:
        if not self.enabled:
            return
        ok, err = counters.total()
        now = time.monotonic()
        rate = (ok - self.last[1]) / max(now - self.last[0], 1e-9)
        self.last = (now, ok)
        line = f"{now - self.t0:6.1f}s  {ok} ok  {err} errors  {rate:,.0f} req/s"
        if self.tty:
            sys.stderr.write(f"\r{line}\033[K")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ---------------------------------------------------------------- command


async def _resolve(args: argparse.Namespace) -> tuple[str, Sequence[Any]]:
    """The ingress address to load and the model's inputs (metadata), from --url or the head."""
    from shoal.rpc.loadgen_client import TensorInfo, model_metadata

    address = args.url
    spec_inputs: list[Any] = []
    if address:
        for prefix in ("http://", "https://", "grpc://"):
            address = address.removeprefix(prefix)
        address = address.rstrip("/")
    else:
        from shoal.config import Settings
        from shoal.rpc.clients import ControlClient

        settings = Settings.load(file=None, flags={"head_address": args.head})
        client = ControlClient(settings.head_address, settings)
        try:
            status = (await client.status()).to_json()
        except Unavailable as err:
            raise Unavailable(
                f"cannot reach the head at {settings.head_address} ({err}); is it running? "
                "Point --head / SHOAL_HEAD at it, or give --url HOST:PORT"
            ) from None
        finally:
            await client.close()
        dep = next((d for d in status["deployments"] if d["name"] == args.name), None)
        if dep is None:
            raise NotFound(f"no deployment named {args.name!r}")
        alive = [s for s in status["schedulers"] if s["state"] == "ALIVE"]
        if not alive:
            raise Unavailable("no live scheduler to send requests to")
        address = alive[0]["http_address"] if args.protocol == "http" else alive[0]["address"]
        spec_inputs = [
            TensorInfo(t["name"], t.get("datatype", "FP32"), tuple(t.get("shape", (-1,))))
            for t in dep["spec"].get("inputs", [])
        ]
    infos: Sequence[Any] = spec_inputs
    if not infos:
        try:
            infos = await model_metadata(args.protocol, address, args.name)
        except FailedPrecondition as err:
            if not args.input:
                raise InvalidArgument(
                    f"cannot learn the inputs of {args.name!r} ({err}); give them with --input"
                ) from None
            infos = []
    return address, infos


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed ``args`` describe; prints the table (or JSON)."""
    if args.duration is not None and args.requests is not None:
        raise InvalidArgument("give --duration or --requests, not both")
    if args.rate is not None and args.rate <= 0:
        raise InvalidArgument(f"--rate must be > 0, got {args.rate}")
    concurrency = args.concurrency or (256 if args.rate else 1)
    if concurrency < 1 or args.workers < 1:
        raise InvalidArgument("--concurrency and --workers must be >= 1")

    address, infos = asyncio.run(_resolve(args))
    inputs = load_inputs(args.input, infos) if args.input else random_inputs(infos)
    if not inputs:
        raise InvalidArgument(f"model {args.name!r} declares no inputs; give them with --input")
    plan = Plan(
        protocol=args.protocol,
        address=address,
        model=args.name,
        concurrency=concurrency,
        duration_s=args.duration if args.duration is not None else (0.0 if args.requests else 10.0),
        requests=args.requests or 0,
        rate=args.rate or 0.0,
        arrival=args.arrival,
        warmup_s=args.warmup,
        timeout_s=args.timeout,
        connections=args.connections,
    )
    progress = Progress(args.progress, sys.stderr.isatty())
    workers = max(1, min(args.workers, concurrency))
    if workers == 1:
        result = asyncio.run(_run_with_progress(plan, inputs, progress))
    else:
        result = run_workers(plan, inputs, workers, progress if progress.enabled else None)
    progress.done()
    doc = summarize(result, plan, workers)
    print(json.dumps(doc, indent=2) if args.json else render(doc), flush=True)
    return 0


async def _run_with_progress(plan: Plan, inputs: Mapping[str, np.ndarray], progress: Progress) -> Result:
    slots = [0, 0]
    if not progress.enabled:
        return await run_plan(plan, inputs, counters=slots)
    counters = Counters(slots)

    async def tick() -> None:
        while True:
            await asyncio.sleep(1.0)
            progress(counters)

    async with asyncio.TaskGroup() as tg:
        ticker = tg.create_task(tick())
        try:
            return await run_plan(plan, inputs, counters=slots)
        finally:
            ticker.cancel()


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="deployment (model) to load")
    p.add_argument("--url", help="send to this ingress (HOST:PORT) instead of asking the head")
    p.add_argument("--protocol", choices=["grpc", "http", "native"], default="grpc")
    p.add_argument("-c", "--concurrency", type=int, help="callers in flight (default 1; open loop 256)")
    p.add_argument("-d", "--duration", type=float, help="seconds to measure (default 10)")
    p.add_argument("-n", "--requests", type=int, help="stop after this many requests instead")
    p.add_argument("--rate", type=float, help="open loop: start this many requests per second")
    p.add_argument("--arrival", choices=["poisson", "fixed"], default="poisson", help="open-loop schedule")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds of unmeasured load first")
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="FILE",
        help="FILE.json, FILE.npy or NAME=FILE.npy (default: random data shaped from the model metadata)",
    )
    p.add_argument("--workers", type=int, default=1, help="generator processes (default 1)")
    p.add_argument("--connections", type=int, default=1, help="gRPC channels (default 1; HTTP: one a caller)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    p.add_argument("--progress", action="store_true", help="a progress line a second on stderr")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``bench`` on shoal's CLI; ``--head`` comes from the CLI's global options."""
    p = sub.add_parser("bench", help="load a deployment and report throughput and latency")
    _add_options(p)
    p.set_defaults(fn=cmd_bench)


def main(argv: Sequence[str] | None = None) -> None:
    from shoal.cli.common import run_command

    parser = argparse.ArgumentParser(prog="python -m shoal.loadgen", description=__doc__.split("\n")[0])
    parser.add_argument("--head", help="the head's gRPC address (default $SHOAL_HEAD or localhost:8470)")
    _add_options(parser)
    parser.set_defaults(fn=cmd_bench)
    run_command(parser.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

"""``shoal bench``: the command's options, and the run they describe."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import shoal.loadgen
from shoal.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from shoal.loadgen.inputs import load_inputs, random_inputs
from shoal.loadgen.loops import Counters, Plan, Result, run_plan
from shoal.loadgen.report import Progress, render, summarize
from shoal.loadgen.workers import run_workers


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

        settings = Settings.load(
            file=None, flags={"head_address": args.head, "state_dir": getattr(args, "state", None)}
        )
        client = ControlClient(settings.head_address, settings)
        try:
            status = (await client.status()).to_json()
        except Unavailable as err:
            from shoal.api import head_unreachable

            raise head_unreachable(
                settings,
                err,
                point="point --head / SHOAL_HEAD at it, or give --url HOST:PORT",
                tls="SHOAL_TLS_DIR",
            ) from None
        finally:
            await client.close()
        dep = next((d for d in status["deployments"] if d["name"] == args.name), None)
        if dep is None:
            raise NotFound(f"no deployment named {args.name!r}")
        address = default_target(args.protocol, status["schedulers"], local_endpoints(settings.state_dir))
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


def local_endpoints(state_dir: str | Path) -> dict[str, str]:
    """The addresses a head or scheduler with this state folder wrote (``endpoints.json``,
    what ``shoal up`` prints); empty when there is none or it cannot be read."""
    try:
        doc = json.loads((Path(state_dir) / "endpoints.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in doc.items() if isinstance(v, str)} if isinstance(doc, dict) else {}


def default_target(protocol: str, schedulers: Sequence[Mapping[str, Any]], local: Mapping[str, str]) -> str:
    """The address ``shoal bench`` loads without ``--url``: a live scheduler's inference port,
    the one ``shoal up`` prints: its HTTP port for ``http``, its gRPC port for ``grpc`` and
    ``native`` (``SendRequest`` is served there too). The scheduler on this machine (``local``,
    its ``endpoints.json``) when the head lists it live, else the first live one.

    The head knows a scheduler's HTTP port but, for gRPC, only its control address: with
    several ingress processes (the default), a port of its main process alone. The gRPC port
    comes from ``local``; for a scheduler elsewhere the control address is the fallback, which
    answers inference too. Before, bench always loaded the control address (a port such as
    46335, not the 8001 the banner shows) and so measured one ingress process of several.
    """
    alive = [s for s in schedulers if s["state"] == "ALIVE"]
    if not alive:
        raise Unavailable("no live scheduler to send requests to")
    mine = next((s for s in alive if local.get("scheduler_control") == s["address"]), None)
    chosen = mine or alive[0]
    if protocol == "http":
        return str(chosen["http_address"])
    if mine is not None and local.get("scheduler"):
        return local["scheduler"]
    return str(chosen["address"])


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
    p.add_argument(
        "--url",
        help="send to this ingress (HOST:PORT). Default: a live scheduler's inference port, the one "
        "'shoal up' prints: its gRPC port (8001 unless changed) for grpc and native, its HTTP port "
        "(8000) for http; the head names the schedulers, this machine's state folder the gRPC port",
    )
    p.add_argument(
        "--state",
        help="state folder of the scheduler on this machine (default ./.shoal or $SHOAL_STATE_DIR): its "
        "endpoints.json has the gRPC port; without it, gRPC goes to the scheduler's control port, "
        "served by its main process only",
    )
    p.add_argument(
        "--protocol",
        choices=["grpc", "http", "native"],
        default="grpc",
        help="OIP gRPC, OIP HTTP/REST, or shoal's native SendRequest (gRPC port) (default grpc)",
    )
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
    # Imported here: the --workers processes import this package and need none of the CLI.
    from shoal.cli.common import run_alone

    run_alone("python -m shoal.loadgen", shoal.loadgen.__doc__ or "", _add_options, cmd_bench, argv)

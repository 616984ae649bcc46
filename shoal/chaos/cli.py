"""``shoal chaos``: the command's options, and the run they describe."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import shoal.chaos
from shoal.chaos.engine import Chaos
from shoal.chaos.faults import Fault
from shoal.chaos.processes import find_head_pid, head_restarter
from shoal.chaos.report import render
from shoal.cli.common import CLI_GIVE_TLS_DIR, CLI_POINT_AT_HEAD, EXIT_ERROR, run_alone
from shoal.config import Settings
from shoal.errors import FailedPrecondition, InvalidArgument, Unavailable


def cmd_chaos(args: argparse.Namespace) -> int:
    """Run what the parsed ``args`` describe; prints the report."""
    if args.duration <= 0:
        raise InvalidArgument(f"--duration must be > 0, got {args.duration}")
    if args.kill_replicas_every is not None and args.kill_replicas_every <= 0:
        raise InvalidArgument(f"--kill-replicas-every must be > 0, got {args.kill_replicas_every}")
    if args.concurrency < 1:
        raise InvalidArgument("--concurrency must be >= 1")
    if args.restart_head is not None and not args.head_restart_cmd:
        raise InvalidArgument(
            "--restart-head needs --head-restart-cmd: the command that starts the head again "
            "(shoal chaos cannot know how it was started)"
        )
    if args.scheduler and args.kill_scheduler is None:
        raise InvalidArgument("--scheduler names the victim of --kill-scheduler")
    settings = Settings.load(flags={"head_address": args.head})
    address = args.url or ""
    for prefix in ("grpc://", "http://"):
        address = address.removeprefix(prefix)
    chaos = Chaos(
        settings.head_address,
        args.name,
        settings,
        address=address,
        avoid=[args.scheduler] if args.scheduler else [],
        concurrency=args.concurrency,
        rate=args.rate or 0.0,
        timeout_s=args.timeout,
        seed=args.seed,
    )
    faults: list[Fault] = []
    if args.kill_replicas_every:
        t = args.kill_replicas_every
        while t <= args.duration + 1e-9:
            faults.append(chaos.kill_replica(round(t, 3)))
            t += args.kill_replicas_every
    if args.kill_scheduler is not None:
        faults.append(chaos.kill_scheduler(args.kill_scheduler, args.scheduler or ""))
    if args.restart_head is not None:
        pid = args.head_pid or find_head_pid(settings.head_address)
        if not pid:
            raise FailedPrecondition(
                f"no process on this machine listens on the head's port ({settings.head_address}); "
                "give its pid with --head-pid"
            )
        faults.append(
            chaos.restart_head(
                args.restart_head,
                head_restarter(settings.head_address, args.head_restart_cmd, pid, Path(args.head_log)),
            )
        )

    async def go() -> dict[str, Any]:
        try:
            return await chaos.run(
                faults,
                duration_s=args.duration,
                settle_s=args.settle,
                recover_timeout_s=args.recover_timeout,
            )
        except Unavailable as err:
            from shoal.api import head_unreachable

            raise head_unreachable(settings, err, point=CLI_POINT_AT_HEAD, tls=CLI_GIVE_TLS_DIR) from None

    doc = asyncio.run(go())
    print(json.dumps(doc, indent=2) if args.json else render(doc), flush=True)
    if args.max_failed is not None and doc["failed"] > args.max_failed:
        print(
            f"shoal chaos: {doc['failed']} request(s) failed (allowed: {args.max_failed})",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return 0


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="deployment to load")
    p.add_argument(
        "--url",
        help="send requests to this gRPC address, HOST:PORT (default: a live scheduler's address as "
        "'shoal status' lists it, its control port, which answers inference too)",
    )
    p.add_argument("-c", "--concurrency", type=int, default=8, help="callers in flight (default 8)")
    p.add_argument("--rate", type=float, help="pace the callers to this many requests a second in total")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    p.add_argument(
        "-d", "--duration", type=float, default=30.0, help="seconds of fault injection (default 30)"
    )
    p.add_argument("--settle", type=float, default=5.0, help="seconds of load after recovery (default 5)")
    p.add_argument(
        "--recover-timeout", type=float, default=60.0, help="longest wait for faults to recover (default 60)"
    )
    p.add_argument(
        "--kill-replicas-every", type=float, metavar="S", help="kill -9 a random replica every S s"
    )
    p.add_argument("--kill-scheduler", type=float, metavar="AT", help="kill -9 a scheduler AT s into the run")
    p.add_argument("--scheduler", metavar="ID", help="the scheduler --kill-scheduler kills (default: random)")
    p.add_argument("--restart-head", type=float, metavar="AT", help="kill -9 and restart the head AT s in")
    p.add_argument("--head-restart-cmd", metavar="CMD", help="shell command that starts the head again")
    p.add_argument("--head-pid", type=int, help="the head's pid (default: found by its port)")
    p.add_argument(
        "--head-log", default="shoal-chaos-head.log", help="where the restarted head's output goes"
    )
    p.add_argument("--seed", type=int, help="seed for picking victims")
    p.add_argument("--max-failed", type=int, help="exit 1 when more requests than this failed")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``chaos`` on shoal's CLI; ``--head`` comes from the CLI's global options."""
    p = sub.add_parser("chaos", help="load a deployment while killing replicas, schedulers or the head")
    _add_options(p)
    p.set_defaults(fn=cmd_chaos)


def main(argv: Sequence[str] | None = None) -> None:
    run_alone("python -m shoal.chaos", shoal.chaos.__doc__ or "", _add_options, cmd_chaos, argv, epilog=True)

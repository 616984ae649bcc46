"""``shoal history``, ``shoal rollback``, ``shoal restart`` and ``shoal events``: a deployment's
revisions and lifecycle, as the head keeps them in its store."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from shoal.cli.common import INT32_MAX, add_client_flags, in_range, seconds, text_table, with_client
from shoal.cli.deploy import status_reader, wait_for
from shoal.config import Settings
from shoal.core.deploy_watch import DeployWatch
from shoal.core.spec import parse_spec_json
from shoal.store.history import LifecycleEvent, Revision


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def render_history(revisions: Sequence[Revision]) -> str:
    """The table of ``shoal history``: the last revision is marked current."""
    rows = []
    for i, rev in enumerate(revisions):
        outcome = rev.outcome or ("current" if i == len(revisions) - 1 else "")
        rows.append([str(rev.number), _when(rev.time), rev.kind, rev.spec_hash, rev.change, outcome])
    return text_table(["REVISION", "TIME", "KIND", "SPEC HASH", "CHANGE", "OUTCOME"], rows)


def render_events(events: Sequence[LifecycleEvent]) -> str:
    rows = [
        [_when(e.time), e.deployment, e.kind, "" if e.revision is None else str(e.revision), e.message]
        for e in events
    ]
    return text_table(["TIME", "DEPLOYMENT", "KIND", "REVISION", "MESSAGE"], rows)


def cmd_history(args: argparse.Namespace) -> int:
    async def go(client: Any, settings: Settings) -> int:
        print(render_history(await client.history(args.name)))
        return 0

    return with_client(args, go)


def cmd_events(args: argparse.Namespace) -> int:
    in_range("--limit", args.limit, INT32_MAX)

    async def go(client: Any, settings: Settings) -> int:
        print(render_events(await client.events(args.name or "", args.limit)))
        return 0

    return with_client(args, go)


async def _follow(client: Any, before: Any, rev: Revision, args: argparse.Namespace) -> int:
    """Wait like ``shoal deploy`` until the revision's replicas are READY and the others gone."""
    if not args.wait:
        return 0
    watch = DeployWatch.after_apply(before, [parse_spec_json(rev.spec_json)], from_file=False)
    code, _ = await wait_for(status_reader(client, [args.name]), watch, args.timeout)
    return code


def cmd_rollback(args: argparse.Namespace) -> int:
    if args.revision is not None:
        # Revisions are numbered from 1; a 0 given went to the previous one (RollbackRequest's
        # 0), a revision it did not name.
        in_range("revision", args.revision, INT32_MAX, low=1)

    async def go(client: Any, settings: Settings) -> int:
        before = await status_reader(client, [args.name])()
        rev = await client.rollback(args.name, args.revision or 0)
        print(f"deployment {args.name} rolling back to revision {rev.rollback_to} (as revision {rev.number})")
        return await _follow(client, before, rev, args)

    return with_client(args, go)


def cmd_restart(args: argparse.Namespace) -> int:
    async def go(client: Any, settings: Settings) -> int:
        before = await status_reader(client, [args.name])()
        rev = await client.restart(args.name)
        print(f"deployment {args.name} restarting: replicas replaced one at a time (revision {rev.number})")
        return await _follow(client, before, rev, args)

    return with_client(args, go)


def _wait_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-wait", dest="wait", action="store_false", help="return once the head has it")
    p.add_argument(
        "--timeout", type=seconds, default=120.0, help="seconds to wait for replicas (default 120)"
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("history", help="a deployment's revisions: number, time, change, outcome")
    p.add_argument("name", help="the deployment's name")
    add_client_flags(p)
    p.set_defaults(fn=cmd_history)

    p = sub.add_parser(
        "rollback",
        help="apply an earlier revision again, replicas replaced one at a time",
        description="Apply an earlier revision's spec again as a rolling update (the replica count "
        "stays the current one), then wait until its replicas are READY.",
    )
    p.add_argument("name", help="the deployment's name")
    p.add_argument(
        "revision",
        nargs="?",
        type=int,
        help="the revision, from 1 (default: the latest earlier one that did not fail and differs from now)",
    )
    _wait_flags(p)
    add_client_flags(p)
    p.set_defaults(fn=cmd_rollback)

    p = sub.add_parser(
        "restart",
        help="replace a deployment's replicas one at a time (they load the model's files again)",
        description="Replace the replicas one at a time: a new one starts, and an old one drains only "
        "once the new one is READY, so requests keep being answered. Then wait until done.",
    )
    p.add_argument("name", help="the deployment's name")
    _wait_flags(p)
    add_client_flags(p)
    p.set_defaults(fn=cmd_restart)

    p = sub.add_parser("events", help="deployments' lifecycle events, oldest first")
    p.add_argument("name", nargs="?", help="only this deployment's")
    p.add_argument("--limit", type=int, default=50, help="the last N (default 50; 0: all kept)")
    add_client_flags(p)
    p.set_defaults(fn=cmd_events)

"""``shoal route``: traffic routes, one name sending its requests to deployments by weight
(``shoal/core/traffic.py``)."""

from __future__ import annotations

import argparse
from typing import Any

from shoal.cli.common import add_client_flags, text_table, with_client
from shoal.config import Settings
from shoal.core.traffic import parse_weights
from shoal.errors import InvalidArgument


def cmd_route(args: argparse.Namespace) -> int:
    if args.delete:
        if not args.name or args.targets or args.shadow is not None:
            raise InvalidArgument("shoal route --delete NAME takes the route's name only")
    elif args.name and not args.targets:
        raise InvalidArgument(f"give the targets of route {args.name!r} as DEPLOYMENT=WEIGHT, e.g. a=90 b=10")
    elif args.shadow is not None and not args.targets:
        raise InvalidArgument(
            "--shadow belongs to a route: shoal route NAME DEPLOYMENT=WEIGHT... --shadow DEPLOYMENT"
        )
    elif args.shadow == "":
        raise InvalidArgument("--shadow takes a deployment name; leave it out for a route without a shadow")
    route = parse_weights(args.name, args.targets, args.shadow or "") if args.targets else None

    async def go(client: Any, settings: Settings) -> int:
        if args.delete:
            await client.delete_route(args.name)
            print(f"route {args.name} deleted")
        elif route is not None:
            await client.route(route)
            print(f"route {route.name}: {route.describe()}")
        else:
            rows = [[r.name, r.describe()] for r in await client.routes()]
            print(text_table(["ROUTE", "TARGETS"], rows))
        return 0

    return with_client(args, go)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "route",
        help="send a name's requests to deployments by weight (canary, promotion, shadow)",
        description="Create or replace a traffic route: clients call NAME (OIP, native, OpenAI) and each "
        "request goes to one target, drawn by weight (integers summing to 100). 'shoal route NAME b=100' "
        "promotes b; --shadow DEPLOYMENT also sends it a copy of every request, its answer discarded and "
        "counted. Without arguments: list the routes.",
    )
    p.add_argument("name", nargs="?", help="the route's name (no deployment may have it)")
    p.add_argument(
        "targets", nargs="*", metavar="DEPLOYMENT=WEIGHT", help="a target and its share (weights sum to 100)"
    )
    p.add_argument("--shadow", metavar="DEPLOYMENT", help="a deployment that gets a copy of each request")
    p.add_argument("--delete", action="store_true", help="delete the route NAME")
    add_client_flags(p)
    p.set_defaults(fn=cmd_route)

"""The head's traffic routes (``shoal route``), kept in the store under ``routes/<name>``.

The head sends them to every scheduler in the routing table; schedulers draw each request's
target (``shoal.scheduler.router``). What is checked here, against the head's deployments:
a route's name is no deployment's (nor a deployment's a route's: ``HeadNode.apply``), its
targets and shadow exist when it is set, and a deployment a route sends to is not deleted
(``HeadNode.delete``). Should a route name a missing target all the same (its store entry
edited), its requests drawn for that target answer NotFound naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from shoal.core.traffic import TrafficRoute, parse_route_json
from shoal.errors import FailedPrecondition, InvalidArgument, LimitReached, NotFound
from shoal.store.base import Store

log = logging.getLogger("shoal.head")

ROUTES = "routes/"


class TrafficRoutes:
    """Routes by name, mirrored in the store. Not locked: the head calls it under its lock."""

    def __init__(self, store: Store, limit: int) -> None:
        self.store = store
        self.limit = limit  # setting max_routes: ``set`` creates none past it
        self.routes: dict[str, TrafficRoute] = {}

    async def load(self) -> None:
        """Read every route from the store; one that does not parse is logged and left out."""
        for entry in await self.store.list(ROUTES):
            name = entry.key.removeprefix(ROUTES)
            try:
                route = parse_route_json(entry.value)
                if route.name != name:
                    raise InvalidArgument(f"it holds the route {route.name!r}")
            except InvalidArgument as err:
                log.error("route %s at %r cannot be read, left out: %s", name, entry.key, err)
                continue
            self.routes[name] = route

    async def set(
        self, route: TrafficRoute, deployments: Collection[str], protected: Collection[str] = ()
    ) -> bool:
        """Create or replace ``route``; whether it changed. FailedPrecondition when its name is a
        deployment's or it sends to a ``protected`` one (its spec's ``auth.tokens``: tokens are
        checked by the name called) or is a route itself (routes do not chain), NotFound
        naming a target of weight above 0 (or the shadow) that is no deployment: a target of
        weight 0 is not checked. LimitReached for a new route when ``limit`` routes exist
        (replacing one is never refused). Nothing is written unless it returns."""
        if route.name in deployments:
            raise FailedPrecondition(
                f"route {route.name!r}: a deployment has that name; a route needs a name of its own"
            )
        chained = [d for d in route.deployments if d in self.routes]
        if chained:
            # Said as it is: "no deployment named 'x'; deploy the targets first" sent the
            # operator to deploy a name that a route holds, which a deploy refuses.
            raise FailedPrecondition(
                f"route {route.name!r}: {chained[0]!r} is a route, and a route sends to deployments "
                f"only (routes do not chain); name the deployments of route {chained[0]!r} instead"
            )
        missing = [d for d in route.deployments if d not in deployments]
        if missing:
            raise NotFound(
                f"route {route.name!r}: no deployment named {', '.join(map(repr, missing))}; "
                "deploy the targets first"
            )
        locked = [d for d in route.deployments if d in protected]
        if locked:
            raise FailedPrecondition(
                f"route {route.name!r}: deployment {locked[0]!r} needs a token (auth.tokens); "
                "a route cannot send to it"
            )
        if self.routes.get(route.name) == route:
            return False
        if route.name not in self.routes and len(self.routes) >= self.limit:
            raise LimitReached.count(
                "route",
                len(self.routes),
                "max_routes",
                route.name,
                "delete routes no longer used ('shoal route --delete NAME')",
            )
        await self.store.put(ROUTES + route.name, route.to_json())
        self.routes[route.name] = route
        return True

    async def delete(self, name: str) -> None:
        """NotFound when there is no route ``name``."""
        if name not in self.routes:
            raise NotFound(f"no route named {name!r}")
        await self.store.delete(ROUTES + name)
        del self.routes[name]

    def check_deployment_name(self, name: str) -> None:
        """FailedPrecondition when a route has this name (a deployment may not take it)."""
        if name in self.routes:
            raise FailedPrecondition(
                f"deployment {name!r}: a route has that name ('shoal route --delete {name}' removes it)"
            )

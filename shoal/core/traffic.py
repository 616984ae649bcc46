"""Traffic routes: one name that sends its requests to several deployments by weight.

    shoal route classifier classifier-v1=90 classifier-v2=10 --shadow classifier-v3

or, in a spec file beside deployments (``shoal deploy``), a document of kind ``route``::

    kind: route
    name: classifier
    targets: {classifier-v1: 90, classifier-v2: 10}
    shadow: classifier-v3        # optional (null or "": none): gets a copy of every request,
                                 # its answer discarded

Clients keep calling ``classifier`` (OIP, native, OpenAI); each request goes to one target,
drawn by weight; ``shoal route classifier classifier-v2=100`` promotes. The rules, checked
by :func:`parse_route` (InvalidArgument naming the problem): weights are integers from 0 to
100 summing to 100; target and shadow names are deployment names, none of them the route's
own name, the shadow none of the targets. The head checks the rest against its state: a
route's name is no deployment's, its targets exist.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.core.limits import short_repr, shown
from shoal.core.spec import NAME_PATTERN, DeploymentSpec, check_names_once, parse_spec, spec_documents
from shoal.errors import InvalidArgument

ROUTE_KIND = "route"
"""``kind`` of a route document in a spec file."""
MAX_TARGETS = 16


@dataclass(frozen=True)
class TrafficRoute:
    """A name and its weighted targets (deployment names, weights summing to 100)."""

    name: str
    targets: tuple[tuple[str, int], ...]
    shadow: str = ""

    def pick(self, rng: random.Random) -> str:
        """One target, drawn by weight with ``rng``."""
        draw = rng.randrange(100)
        for target, weight in self.targets:
            if draw < weight:
                return target
            draw -= weight
        raise AssertionError("weights sum to 100")  # parse_route guarantees it

    @property
    def deployments(self) -> tuple[str, ...]:
        """Every deployment it sends to: the targets (weight > 0), then the shadow."""
        return (*(t for t, w in self.targets if w > 0), *((self.shadow,) if self.shadow else ()))

    def to_doc(self) -> dict[str, Any]:
        """The document :func:`parse_route` reads back (YAML's, the REST API's)."""
        doc: dict[str, Any] = {"kind": ROUTE_KIND, "name": self.name, "targets": dict(self.targets)}
        if self.shadow:
            doc["shadow"] = self.shadow
        return doc

    def to_json(self) -> str:
        return json.dumps(self.to_doc())

    def describe(self) -> str:
        """``a=90 b=10 (shadow c)``: one line for tables and logs."""
        line = " ".join(f"{t}={w}" for t, w in self.targets)
        return line + (f" (shadow {self.shadow})" if self.shadow else "")


def is_route_doc(doc: object) -> bool:
    """Whether a spec file's document is a route (``kind: route``) rather than a deployment."""
    return isinstance(doc, Mapping) and doc.get("kind") == ROUTE_KIND


def _check_name(what: str, name: object) -> str:
    if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
        raise InvalidArgument(
            f"{what} {short_repr(name)}: a deployment name (lowercase letters, digits, '-', '_' and '.', "
            "at most 63 characters)"
        )
    return name


def parse_route(doc: object) -> TrafficRoute:
    """A route from its document (``name``, ``targets`` mapping names to weights, optional
    ``shadow``: a deployment name, none when left out, null or ``""``; optional ``kind:
    route``). Raises InvalidArgument naming the problem."""
    if not isinstance(doc, Mapping):
        raise InvalidArgument(f"a route must be a mapping, got {type(doc).__name__}")
    unknown = sorted(str(k) for k in doc if k not in ("kind", "name", "targets", "shadow"))
    if unknown:
        raise InvalidArgument(
            f"route: unknown field(s) {shown(', '.join(unknown))} (fields: name, targets, shadow)"
        )
    if doc.get("kind", ROUTE_KIND) != ROUTE_KIND:
        raise InvalidArgument(f"route: kind must be {ROUTE_KIND!r}, got {short_repr(doc.get('kind'))}")
    name = _check_name("route name", doc.get("name"))
    where = f"route {name!r}"
    targets = doc.get("targets")
    if not isinstance(targets, Mapping) or not targets:
        raise InvalidArgument(f"{where}: targets must map deployment names to weights, e.g. {{a: 90, b: 10}}")
    if len(targets) > MAX_TARGETS:
        raise InvalidArgument(f"{where}: {len(targets)} targets, over the limit of {MAX_TARGETS}")
    pairs = []
    for target, weight in targets.items():
        _check_name(f"{where}: target", target)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
            raise InvalidArgument(
                f"{where}: the weight of {target!r} must be an integer from 0 to 100, "
                f"got {short_repr(weight)}"
            )
        if target == name:
            raise InvalidArgument(f"{where}: a route cannot send to itself")
        pairs.append((str(target), weight))
    total = sum(w for _, w in pairs)
    if total != 100:
        raise InvalidArgument(f"{where}: weights must sum to 100, they sum to {total}")
    shadow = doc.get("shadow")
    if shadow is None:
        shadow = ""  # null is no shadow, as is leaving it out
    if not isinstance(shadow, str):
        # Not taken as no shadow: a user who wrote [] or 0 meant something, and is told.
        raise InvalidArgument(
            f'{where}: shadow must be a deployment name (leave it out, or give null or "", for none), '
            f"got {short_repr(shadow)}"
        )
    if shadow:
        _check_name(f"{where}: shadow", shadow)
        if shadow == name or shadow in targets:
            raise InvalidArgument(
                f"{where}: the shadow {shadow!r} must be neither the route nor one of its targets"
            )
    return TrafficRoute(name, tuple(pairs), str(shadow))


def parse_route_json(text: str) -> TrafficRoute:
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise InvalidArgument(f"route is not valid JSON: {err}") from None
    return parse_route(doc)


def parse_weights(name: str, assignments: Iterable[str], shadow: str = "") -> TrafficRoute:
    """``shoal route NAME a=90 b=10``'s arguments as a route."""
    targets: dict[str, object] = {}
    for item in assignments:
        target, sep, weight = item.partition("=")
        if not sep or not weight.strip().isdigit():
            raise InvalidArgument(f"{item!r}: give each target as DEPLOYMENT=WEIGHT, e.g. a=90 b=10")
        if target in targets:
            raise InvalidArgument(f"{target!r} is given twice")
        targets[target] = int(weight)
    doc: dict[str, object] = {"name": name, "targets": targets}
    if shadow:
        doc["shadow"] = shadow
    return parse_route(doc)


def load_file(path: str | Path) -> tuple[list[DeploymentSpec], list[TrafficRoute]]:
    """A spec file's deployments and routes (documents of ``kind: route``), each in file order,
    the file read once (it may be ``/dev/stdin``). Errors as
    :func:`shoal.core.spec.load_spec_file`'s."""
    path = Path(path)
    docs = spec_documents(path)
    specs = [parse_spec(d, base_dir=path.parent) for d in docs if not is_route_doc(d)]
    check_names_once(path, specs)
    return specs, [parse_route(d) for d in docs if is_route_doc(d)]

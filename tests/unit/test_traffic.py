"""Traffic routes (issue 18, item 2) over fakes: the rules of a route, the head that keeps them
and sends them in the routing table, and a scheduler's doors that split a name's requests by
weight, promote, and shadow copies whose answers (and failures) never reach the client."""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import pytest

from shoal.auth import Role
from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.spec import parse_spec
from shoal.core.traffic import TrafficRoute, parse_route, parse_weights
from shoal.errors import FailedPrecondition, Internal, InvalidArgument, NotFound
from shoal.head.node import HeadNode
from shoal.http.head import head_app
from shoal.http.scheduler import scheduler_app
from shoal.proto import shoal_pb2 as pb
from shoal.rpc import codec
from shoal.rpc.clients import RoutingTableDecoder
from shoal.rpc.ingress import counts_from_pb, counts_to_pb, table_to_pb
from shoal.rpc.scheduler_service import SchedulerService
from shoal.scheduler.ingress import Counts
from shoal.scheduler.node import SchedulerNode
from shoal.scheduler.router import Router
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeReplicas, FakeSchedulers
from shoal.testing.wait import until
from shoal.types import HeadLink, RoutingTable
from tests.unit.test_dataplane import Aborted, Context

pytestmark = pytest.mark.timeout(20)

X = np.ones((1, 4), np.float32)


def spec(name: str) -> Any:
    return parse_spec({"name": name, "backend": "python", "model": "m:M"})


# ------------------------------------------------------------------ the rules


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"name": "r", "targets": {"a": 90, "b": 20}}, "weights must sum to 100, they sum to 110"),
        ({"name": "r", "targets": {"a": 50.5, "b": 49.5}}, "the weight of 'a' must be an integer"),
        ({"name": "r", "targets": {"a": True, "b": 99}}, "the weight of 'a' must be an integer"),
        ({"name": "r", "targets": {"r": 100}}, "cannot send to itself"),
        ({"name": "r", "targets": {}}, "targets must map deployment names to weights"),
        ({"name": "r", "targets": {"a": 100}, "shadow": "a"}, "neither the route nor one of its targets"),
        ({"name": "R!", "targets": {"a": 100}}, "route name 'R!'"),
        ({"name": "r", "targets": {"a": 100}, "weights": 1}, "unknown field(s) weights"),
    ],
)
def test_a_bad_route_is_refused_naming_the_problem(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_route(doc)
    assert message in str(err.value)


@pytest.mark.parametrize("shadow", [[], 0, False, {}, ["c"], 1.5])
def test_a_shadow_of_another_type_than_a_name_is_refused(shadow: object) -> None:
    """Before, ``[]``, ``0``, ``false`` or ``{}`` were taken silently as no shadow."""
    with pytest.raises(InvalidArgument) as err:
        parse_route({"name": "r", "targets": {"a": 100}, "shadow": shadow})
    assert str(err.value) == (
        f"route 'r': shadow must be a deployment name (leave it out, or give null or \"\", "
        f"for none), got {shadow!r}"
    )


@pytest.mark.parametrize("shadow", [None, ""])
def test_a_shadow_of_null_or_empty_is_no_shadow(shadow: object) -> None:
    """What the REST API shows for a route without one (``"shadow": ""``) reads back as it."""
    route = parse_route({"name": "r", "targets": {"a": 100}, "shadow": shadow})
    assert route == TrafficRoute("r", (("a", 100),)) and route.deployments == ("a",)


def test_the_command_lines_weights_are_a_route() -> None:
    route = parse_weights("clf", ["a=90", "b=10"], shadow="c")
    assert route == TrafficRoute("clf", (("a", 90), ("b", 10)), "c")
    assert parse_route(route.to_doc()) == route
    with pytest.raises(InvalidArgument, match="DEPLOYMENT=WEIGHT"):
        parse_weights("clf", ["a:90"])


# ------------------------------------------------------------------ the head


@pytest.fixture
async def head(store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock) -> AsyncIterator[HeadNode]:
    node = HeadNode(Settings(), store, fleet, clock)
    yield node
    await node.aclose()


async def test_the_head_keeps_routes_checks_names_and_sends_them_to_schedulers(
    head: HeadNode, store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    for name in ("a", "b"):
        await head.apply(spec(name))
    route = parse_weights("clf", ["a=90", "b=10"])
    with pytest.raises(NotFound, match="route 'clf': no deployment named 'c'"):
        await head.set_route(parse_weights("clf", ["a=90", "b=10"], shadow="c"))
    with pytest.raises(FailedPrecondition, match="a deployment has that name"):
        await head.set_route(parse_weights("a", ["b=100"]))
    await head.set_route(route)
    assert head.routes.traffic == {"clf": route}
    with pytest.raises(FailedPrecondition, match="a route has that name"):
        await head.apply(spec("clf"))
    # A route to a route is said to be one (before: "no deployment named 'clf'; deploy the
    # targets first", and deploying that name is refused).
    for chained in (parse_weights("outer", ["clf=100"]), parse_weights("outer", ["a=100"], shadow="clf")):
        with pytest.raises(FailedPrecondition) as err:
            await head.set_route(chained)
        assert str(err.value) == (
            "route 'outer': 'clf' is a route, and a route sends to deployments only (routes do "
            "not chain); name the deployments of route 'clf' instead"
        )

    # Kept in the store: a new head serves the same routes.
    again = HeadNode(Settings(), store, fleet, clock)
    await again.start()
    try:
        await again._publish_routes()
        assert again.routes.traffic == {"clf": route}
    finally:
        await again.aclose()

    # The routing table carries them to schedulers and their ingress workers, unchanged.
    decoded = RoutingTableDecoder().decode(table_to_pb(head.routes))
    assert decoded.traffic == {"clf": route}

    await head.delete_route("clf")
    assert head.routes.traffic == {}
    with pytest.raises(NotFound, match="no route named 'clf'"):
        await head.delete_route("clf")


async def test_a_deployment_a_route_sends_to_is_not_deleted(head: HeadNode) -> None:
    """Before: the delete went through and the route's requests drawn for it answered
    NOT_FOUND (10% of them here) until someone changed the route."""
    for name in ("a", "b", "c"):
        await head.apply(spec(name))
    await head.set_route(parse_weights("clf", ["a=90", "b=10"], shadow="c"))

    for target in ("b", "c"):
        with pytest.raises(FailedPrecondition) as refused:
            await head.delete(target)
        assert f"deployment {target!r} gets requests from route 'clf'" in refused.value.message
        assert "(a=90 b=10 (shadow c))" in refused.value.message
        assert "shoal route --delete clf" in refused.value.message
        assert target in head.desired

    await head.set_route(parse_weights("clf", ["a=100"]))  # b's weight to a, c's shadow gone
    await head.delete("b")
    await head.delete("c")
    assert set(head.desired) == {"a"}


def test_a_scheduler_leaves_out_a_route_that_does_not_parse() -> None:
    msg = pb.RoutingTable(version=1)
    msg.traffic["bad"].CopyFrom(
        pb.TrafficRoute(name="bad", targets=[pb.TrafficTarget(deployment="a", weight=5)])
    )
    msg.traffic["good"].CopyFrom(
        pb.TrafficRoute(name="good", targets=[pb.TrafficTarget(deployment="a", weight=100)])
    )
    assert list(RoutingTableDecoder().decode(msg).traffic) == ["good"]


# ------------------------------------------------------------------ a scheduler's doors


class Doors:
    def __init__(self, node: SchedulerNode, http: httpx.AsyncClient, fakes: FakeReplicas) -> None:
        self.node = node
        self.router = node.router
        self.http = http
        self.fakes = fakes
        self.native = SchedulerService(node)

    async def route(self, route: TrafficRoute) -> None:
        await self.router.apply_table(RoutingTable(version=1, traffic={route.name: route}))

    async def send(self, model: str) -> pb.InferReply:
        request = pb.InferRequest(deployment=model, inputs=codec.encode({"x": X}))
        return await self.native.SendRequest(request, cast(Any, Context()))

    def served(self) -> Counter[str]:
        return Counter({name: len(self.fakes.clients[f"{name}:1"].requests) for name in ("a", "b", "c")})


@pytest.fixture
async def doors() -> AsyncIterator[Doors]:
    fakes = FakeReplicas()
    settings = Settings()
    router = Router("s1", settings, fakes, rng=random.Random(18))
    node = SchedulerNode(settings, "s1", cast(HeadLink, None), fakes, router=router)
    node.registered.set()
    for name in ("a", "b", "c"):
        router.add(name, spec(name), f"{name}:1", "s1")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=scheduler_app(node)), base_url="http://s"
    ) as c:
        yield Doors(node, c, fakes)
    await router.aclose()


async def test_a_routes_requests_split_by_weight_and_a_promotion_moves_them_all(doors: Doors) -> None:
    await doors.route(parse_weights("clf", ["a=90", "b=10"]))
    for _ in range(1000):
        reply = await doors.send("clf")
        np.testing.assert_array_equal(codec.decode(reply.outputs)["x"], X)
    served = doors.served()
    assert 870 <= served["a"] <= 930 and served["a"] + served["b"] == 1000, served
    assert doors.router.routed == Counter({("clf", "a"): served["a"], ("clf", "b"): served["b"]})
    # Each target's own statistics (the dashboard's per-deployment rates) count what it served.
    assert doors.router.stats()["b"].outcomes["ok"] == served["b"]

    await doors.route(parse_weights("clf", ["b=100"]))  # promote
    for _ in range(50):
        await doors.send("clf")
    assert doors.served()["b"] == served["b"] + 50

    # OIP REST and OpenAI's model lookup take the route's name too.
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}]}
    r = await doors.http.post("/v2/models/clf/infer", json=body)
    assert r.status_code == 200 and r.json()["model_name"] == "clf"


async def test_a_shadow_gets_copies_whose_answers_and_failures_never_reach_the_client(doors: Doors) -> None:
    await doors.route(parse_weights("clf", ["a=100"], shadow="c"))
    doors.fakes.clients["c:1"].fail(Internal("the shadow model raised"))
    for _ in range(20):
        reply = await doors.send("clf")
        assert reply.replica_id == "a"
    await until(lambda: doors.router.shadowed[("clf", "c", "error")] == 20, "20 shadow copies counted")
    doors.fakes.clients["c:1"].recover()
    await doors.send("clf")
    await until(lambda: doors.router.shadowed[("clf", "c", "ok")] == 1, "a shadow copy answered")
    metrics = (await doors.http.get("/metrics")).text
    assert 'shoal_route_requests_total{route="clf",target="a"} 21.0' in metrics
    assert 'shoal_shadow_requests_total{outcome="error",route="clf",target="c"} 20.0' in metrics

    # An ingress worker's counts (as it reports them over gRPC) are added in.
    worker = Counts(routed={"clf": 4}, shadowed={"clf/error": 2})
    doors.node.hub.report("w1", 1234, {"a": counts_from_pb(counts_to_pb(worker)), "c": worker})
    metrics = (await doors.http.get("/metrics")).text
    assert 'shoal_route_requests_total{route="clf",target="a"} 25.0' in metrics
    assert 'shoal_shadow_requests_total{outcome="error",route="clf",target="c"} 22.0' in metrics


async def test_a_deleted_route_leaves_the_metrics(doors: Doors) -> None:
    """Its series stayed for as long as the scheduler ran, one per route ever set (a canary
    per release, say); set again, it goes on from what it counted."""
    await doors.route(parse_weights("canary-7", ["a=100"], shadow="c"))
    for _ in range(3):
        await doors.send("canary-7")
    await until(lambda: doors.router.shadowed[("canary-7", "c", "ok")] == 3, "3 shadow copies counted")
    assert 'route="canary-7"' in (await doors.http.get("/metrics")).text
    await doors.router.apply_table(RoutingTable(version=2))  # the route deleted
    assert 'route="canary-7"' not in (await doors.http.get("/metrics")).text
    await doors.route(parse_weights("canary-7", ["a=100"]))
    await doors.send("canary-7")
    metrics = (await doors.http.get("/metrics")).text
    assert 'shoal_route_requests_total{route="canary-7",target="a"} 4.0' in metrics


async def test_a_route_to_a_deleted_target_answers_404_naming_it(doors: Doors) -> None:
    await doors.route(parse_weights("clf", ["gone=100"]))
    with pytest.raises(Aborted) as err:
        await doors.send("clf")
    assert "route 'clf': its target deployment 'gone' does not exist" in err.value.message
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}]}
    r = await doors.http.post("/v2/models/clf/infer", json=body)
    assert r.status_code == 404 and "'gone'" in r.json()["error"]


# ------------------------------------------------------------------ the head's REST API


async def test_routes_over_the_rest_api_need_the_deploy_role(head: HeadNode) -> None:

    for name in ("a", "b"):
        await head.apply(spec(name))
    transport = httpx.ASGITransport(app=head_app(head))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
        r = await c.put("/api/routes/clf", json={"targets": {"a": 90, "b": 10}})
        assert r.status_code == 200 and r.json() == {
            "name": "clf",
            "targets": {"a": 90, "b": 10},
            "shadow": "",
        }
        assert (await c.get("/api/routes")).json() == {"routes": [r.json()]}
        assert head.routes.traffic["clf"] == parse_weights("clf", ["a=90", "b=10"])
        r = await c.put("/api/routes/clf", json={"targets": {"a": 90, "b": 9}})
        assert r.status_code == 400 and "sum to 99" in r.json()["error"]
        r = await c.put("/api/routes/clf", json={"targets": {"a": 90, "b": 10}, "shadow": []})
        assert r.status_code == 400 and "shadow must be a deployment name" in r.json()["error"]
        r = await c.put("/api/routes/clf", json={"targets": {"nope": 100}})
        assert r.status_code == 404 and "no deployment named 'nope'" in r.json()["error"]
        r = await c.put("/api/routes/a", json={"targets": {"b": 100}})
        assert r.status_code == 400 and "a deployment has that name" in r.json()["error"]

        await head.create_token(Role.ADMIN, "admin")  # the first token must be an admin's
        _, secret = await head.create_token(Role.READ, "reader")
        read_only = {"authorization": f"Bearer {secret}"}
        r = await c.put("/api/routes/clf", json={"targets": {"b": 100}}, headers=read_only)
        assert r.status_code == 403
        assert (await c.get("/api/routes", headers=read_only)).status_code == 200
        _, admin = await head.create_token(Role.DEPLOY, "deployer")
        r = await c.delete("/api/routes/clf", headers={"authorization": f"Bearer {admin}"})
        assert r.status_code == 200 and head.routes.traffic == {}


async def test_a_route_never_opens_a_deployment_that_needs_a_token(head: HeadNode, doors: Doors) -> None:
    await head.create_token(Role.ADMIN, "admin")
    await head.create_token(Role.INFER, "t")
    await head.apply(
        parse_spec({"name": "locked", "backend": "python", "model": "m:M", "auth": {"tokens": ["t"]}})
    )
    await head.apply(spec("a"))
    with pytest.raises(FailedPrecondition, match="needs a token"):
        await head.set_route(parse_weights("clf", ["locked=100"]))
    # A scheduler that has such a route anyway (the deployment took a token later) refuses it.
    locked = parse_spec({"name": "locked", "backend": "python", "model": "m:M", "auth": {"tokens": ["t"]}})
    doors.router.add("l", locked, "l:1", "s1")
    await doors.route(parse_weights("clf", ["locked=100"]))
    with pytest.raises(Aborted) as err:
        await doors.send("clf")
    assert "needs a token; call it by its own name" in err.value.message


# ------------------------------------------------------------------ the command line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["route", "clf", "a=90", "b=20"], "weights must sum to 100, they sum to 110"),
        (["route", "clf"], "give the targets of route 'clf' as DEPLOYMENT=WEIGHT"),
        (["route", "--delete", "clf", "a=100"], "takes the route's name only"),
        (["route", "clf", "a=100", "--shadow", "a"], "neither the route nor one of its targets"),
        (["route", "clf", "a=100", "--shadow", ""], "--shadow takes a deployment name"),
        (["route", "--delete", "clf", "--shadow", ""], "takes the route's name only"),
        (["route", "--shadow", "c"], "--shadow belongs to a route"),
    ],
)
def test_shoal_route_refuses_bad_arguments_before_calling_the_head(argv: list[str], message: str) -> None:
    from shoal.cli import build_parser

    args = build_parser().parse_args(["--head", "127.0.0.1:1", *argv])
    with pytest.raises(InvalidArgument) as err:
        args.fn(args)
    assert message in str(err.value)


@pytest.mark.parametrize("with_route", [False, True])
def test_a_spec_file_is_read_once_so_that_a_pipe_works(with_route: bool) -> None:
    """`shoal deploy /dev/stdin` and `shoal deploy <(...)` said 'holds no deployment spec':
    the file was read twice, and a pipe is empty the second time."""
    from shoal.core.traffic import load_file

    text = "name: a\nbackend: python\nmodel: m:M\n"
    if with_route:
        text += "---\nkind: route\nname: clf\ntargets: {a: 100}\n"
    read, write = os.pipe()
    try:
        os.write(write, text.encode())
        os.close(write)
        specs, routes = load_file(f"/dev/fd/{read}")
    finally:
        os.close(read)
    assert [s.name for s in specs] == ["a"]
    assert routes == ([parse_weights("clf", ["a=100"])] if with_route else [])


def test_a_spec_file_holds_deployments_and_routes(tmp_path: Path) -> None:
    from shoal.core.traffic import load_file

    path = tmp_path / "canary.yaml"
    path.write_text(
        "name: a\nbackend: python\nmodel: m:M\n---\n"
        "kind: route\nname: clf\ntargets: {a: 100}\n---\n"
        "name: b\nbackend: python\nmodel: m:M\n"
    )
    specs, routes = load_file(path)
    assert [s.name for s in specs] == ["a", "b"] and specs[0].base_dir == str(tmp_path.resolve())
    assert routes == [parse_weights("clf", ["a=100"])]
    path.write_text("kind: route\nname: clf\ntargets: {a: 50}\n")
    with pytest.raises(InvalidArgument, match="sum to 50"):
        load_file(path)


@pytest.mark.parametrize("field", ["kind", "name", "targets", "shadow"])
def test_a_route_file_value_quoted_in_an_error_is_short_whatever_it_holds(tmp_path: Path, field: str) -> None:
    """Before, the error printed the value whole: six levels of nine-fold aliases (9**6 items
    from 400 bytes) made a 3 MB message, and nine levels never finished."""
    from shoal.core.traffic import load_file

    anchors = ['&a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    anchors += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 6)]
    bomb = f"[{', '.join(anchors)}]"
    doc = {"kind": "route", "name": "clf", "targets": "{a: 100}", "shadow": "b"}
    doc[field] = bomb if field != "targets" else f"{{a: {bomb}}}"
    path = tmp_path / "route.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in doc.items()))
    with pytest.raises(InvalidArgument) as info:
        load_file(path)
    assert len(str(info.value)) < 600, len(str(info.value))

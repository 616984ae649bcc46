"""The whole cluster's status, as ``shoal status --json`` and ``/api/status`` show it, is what
its inputs say, field by field: a varied cluster (two revisions running, an autoscaled
deployment, a broken row, one only a scheduler knows, a deleted one still draining,
replicas in several states, out of id order across schedulers) against the JSON written
out here from those inputs. What ``bench/status_build.py`` measures must not change it."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.cluster import DRAINING, READY, STARTING, ReplicaReport
from shoal.core.placement import Capacity
from shoal.core.spec import parse_spec
from shoal.core.status import ClusterStatus, DeploymentStatus, ReplicaStatus
from shoal.head import node as node_module
from shoal.head.node import HeadNode
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers
from shoal.types import SchedulerRegistration

pytestmark = pytest.mark.timeout(10)

ALPHA = {"name": "alpha", "backend": "python", "model": "m:M", "replicas": 3}
ALPHA_2 = {**ALPHA, "options": {"v": 2}}
BETA = {
    "name": "beta",
    "backend": "python",
    "model": "m:B",
    "replicas": 1,
    "autoscaling": {"min_replicas": 2, "max_replicas": 4},
}


@pytest.fixture
async def head(store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock) -> AsyncIterator[HeadNode]:
    node = HeadNode(Settings(), store, fleet, clock)
    old, new, beta = parse_spec(ALPHA), parse_spec(ALPHA_2), parse_spec(BETA)
    await node.apply(old)
    await node.apply(new)
    await node.apply(beta)
    node.broken["poison"] = "the stored spec cannot be read"
    node.deleted["gone"] = 1.0
    node.state.pending_reasons["beta"] = "no scheduler has room"
    s1 = (
        ReplicaReport("alpha-c", "alpha", READY, "10.0.0.1:1", 11, 2, 1, old.process_hash()),
        ReplicaReport("ghost-1", "ghost", STARTING, "", 12, message="loading"),
        ReplicaReport("gone-1", "gone", DRAINING, "10.0.0.1:3", 13),
    )
    s0 = (
        ReplicaReport("alpha-a", "alpha", READY, "10.0.0.2:1", 21, 0, 0, new.process_hash()),
        ReplicaReport("alpha-b", "alpha", STARTING, "10.0.0.2:2", 22, spec_hash="unknown", message="m"),
        ReplicaReport("beta-1", "beta", READY, "10.0.0.2:3", 23, 5, 0, beta.process_hash()),
    )
    for sid, reps, cap, most in (("s1", s1, Capacity(8, 2048, 1), 0), ("s0", s0, Capacity(4, 1024, 0), 9)):
        await node.register_scheduler(
            SchedulerRegistration(
                sid, f"{sid}:7000", f"{sid}:7001", cap, 7, f"h-{sid}", reps, max_replicas=most
            )
        )
    yield node
    await node.aclose()


def _replica(id: str, scheduler: str, state: str, address: str, pid: int, **rest: Any) -> dict[str, Any]:
    doc = {
        "id": id,
        "scheduler": scheduler,
        "state": state,
        "pid": pid,
        "address": address,
        "in_flight": 0,
        "queued": 0,
        "message": "",
        "spec_hash": "",
        "revision": 0,
    }
    return doc | rest


def expected(head: HeadNode) -> dict[str, Any]:
    """The status's JSON, from the fixture's inputs (the events as the head recorded them)."""
    old, new, beta = parse_spec(ALPHA).process_hash(), parse_spec(ALPHA_2).process_hash(), parse_spec(BETA)
    alpha = [
        _replica("alpha-a", "s0", "READY", "10.0.0.2:1", 21, spec_hash=new, revision=2),
        _replica("alpha-b", "s0", "STARTING", "10.0.0.2:2", 22, spec_hash="unknown", message="m"),
        _replica(
            "alpha-c", "s1", "READY", "10.0.0.1:1", 11, in_flight=2, queued=1, spec_hash=old, revision=1
        ),
    ]
    ghost = [_replica("ghost-1", "s1", "STARTING", "", 12, message="loading")]
    unknown = (
        "not in the head's store (a new or damaged store?): its replicas are kept; "
        "'shoal delete ghost' removes them"
    )
    return {
        "schedulers": [
            {
                "id": sid,
                "address": f"{sid}:7000",
                "http_address": f"{sid}:7001",
                "state": "ALIVE",
                "pid": 7,
                "hostname": f"h-{sid}",
                "last_seen_s": 0.0,
                "capacity": cap,
                "allocated": {"cpus": cpus, "memory_mb": 0.0, "gpus": 0.0},
                "max_replicas": most,
                "replicas": 3,
                "routes_lagging": False,
            }
            # Allocated: a cpu for each replica of a spec the head has (not ghost's, gone's).
            for sid, cap, most, cpus in (
                ("s0", {"cpus": 4, "memory_mb": 1024, "gpus": 0}, 9, 3.0),
                ("s1", {"cpus": 8, "memory_mb": 2048, "gpus": 1}, 0, 1.0),
            )
        ],
        "deployments": [
            {
                "name": "alpha",
                "target_replicas": 3,
                "pending_reason": "",
                "broken": "",
                "spec": parse_spec(ALPHA_2).model_dump(mode="json"),
                "replicas": alpha,
                "revision": 2,
                "ready_replicas": 2,
            },
            {
                "name": "beta",
                "target_replicas": 2,
                "pending_reason": "no scheduler has room",
                "broken": "",
                "spec": beta.model_dump(mode="json"),
                "replicas": [
                    _replica(
                        "beta-1",
                        "s0",
                        "READY",
                        "10.0.0.2:3",
                        23,
                        in_flight=5,
                        spec_hash=beta.process_hash(),
                        revision=1,
                    )
                ],
                "revision": 1,
                "ready_replicas": 1,
            },
            {
                "name": "ghost",
                "target_replicas": 0,
                "pending_reason": unknown,
                "broken": "",
                "spec": {},
                "replicas": ghost,
                "revision": 0,
                "ready_replicas": 0,
            },
            {
                "name": "poison",
                "target_replicas": 0,
                "pending_reason": "broken: the stored spec cannot be read; its replicas are kept until a "
                "new spec is applied or it is deleted",
                "broken": "the stored spec cannot be read",
                "spec": {},
                "replicas": [],
                "revision": 0,
                "ready_replicas": 0,
            },
        ],
        "events": [
            {
                "at": e.wall,
                "kind": e.kind,
                "message": e.message,
                "deployment": e.deployment,
                "replica_id": e.replica_id,
                "scheduler_id": e.scheduler_id,
            }
            for e in list(head.state.events)[-50:]
        ],
    }


async def test_the_status_is_what_its_inputs_say_byte_for_byte(head: HeadNode) -> None:
    built = (await head.status()).to_json()

    assert built["events"], "the registrations are events"
    assert json.dumps(built) == json.dumps(expected(head))


async def test_a_status_of_some_deployments_shows_them_as_the_whole_status_does(head: HeadNode) -> None:
    whole = {d["name"]: d for d in (await head.status()).to_json()["deployments"]}

    for name in ("alpha", "ghost", "poison"):
        (one,) = (await head.status(only=(name, "gone", "nowhere"))).to_json()["deployments"]
        assert json.dumps(one) == json.dumps(whole[name])


async def test_a_brief_status_has_the_names_targets_and_reasons_alone(head: HeadNode) -> None:
    brief = (await head.status(brief=True)).to_json()

    assert brief["schedulers"] == brief["events"] == []
    assert [(d["name"], d["target_replicas"], d["replicas"], d["spec"]) for d in brief["deployments"]] == [
        ("alpha", 3, [], {}),
        ("beta", 2, [], {}),
        ("ghost", 0, [], {}),
        ("poison", 0, [], {}),
    ]


@pytest.mark.parametrize("cls", [ReplicaStatus, DeploymentStatus])
def test_the_written_out_constructors_take_the_fields_in_order_with_their_defaults(cls: type) -> None:
    params = list(inspect.signature(cls).parameters.values())
    fields = dataclasses.fields(cls)

    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields, strict=True):
        if f.default is not dataclasses.MISSING:
            assert p.default == f.default, f.name
        elif f.default_factory is not dataclasses.MISSING:
            assert p.default is None, f.name  # None: a new value of the factory
        else:
            assert p.default is inspect.Parameter.empty, f.name
    required = {p.name: "x" for p in params if p.default is inspect.Parameter.empty}
    made = cls(**required)
    assert list(vars(made)) == [f.name for f in fields]
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.x = 1


async def test_a_changed_spec_shows_at_the_next_status(head: HeadNode) -> None:
    """Each spec's JSON is dumped once and kept with it: a scale, a restart and an apply are
    new specs, seen at once."""
    assert (await head.status(only=("alpha",))).deployments[0].spec["replicas"] == 3

    await head.scale("alpha", 5)
    assert (await head.status(only=("alpha",))).deployments[0].spec["replicas"] == 5
    await head.restart("alpha")
    assert (await head.status()).deployments[0].spec["restarts"] == 1
    await head.apply(parse_spec({**ALPHA_2, "options": {"v": 3}}))
    (alpha,) = (await head.status(only=("alpha",))).to_json()["deployments"]
    assert (alpha["spec"]["options"], alpha["spec"]["restarts"], alpha["revision"]) == ({"v": 3}, 1, 4)


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, bool]]:
    """The (only, brief) of each status the head builds."""
    out: list[tuple[object, bool]] = []
    real = node_module.status_of

    def counted(node: HeadNode, only: Any = None, *, brief: bool = False) -> ClusterStatus:
        out.append((only, brief))
        return real(node, only, brief=brief)

    monkeypatch.setattr(node_module, "status_of", counted)
    return out


async def test_calls_waiting_together_share_one_build_made_after_each_asked(
    head: HeadNode, builds: list[tuple[object, bool]]
) -> None:
    async with head.lock:  # a long control call
        first = asyncio.create_task(head.status())
        await asyncio.sleep(0)
        head.state.pending_reasons["beta"] = "changed after the first call, before the second"
        second = [asyncio.create_task(head.status()) for _ in range(4)]
        brief = asyncio.create_task(head.status(brief=True))
        alpha = asyncio.create_task(head.status(only=["alpha"]))
        await asyncio.sleep(0)
        assert builds == []
    statuses = [await t for t in (first, *second)]

    assert all(s is statuses[0] for s in statuses)
    assert statuses[0].deployment("beta").pending_reason.startswith("changed")  # type: ignore[union-attr]
    assert [d.name for d in (await brief).deployments] == ["alpha", "beta", "ghost", "poison"]
    assert [d.name for d in (await alpha).deployments] == ["alpha"]
    assert sorted(builds, key=str) == sorted([(None, False), (None, True), (["alpha"], False)], key=str)

    head.state.pending_reasons["beta"] = "changed after that build"
    assert (await head.status()).deployment("beta").pending_reason.startswith("changed after that")  # type: ignore[union-attr]
    assert len(builds) == 4


async def test_a_builder_cancelled_while_waiting_leaves_the_build_to_those_that_joined(
    head: HeadNode, builds: list[tuple[object, bool]]
) -> None:
    async with head.lock:
        builder = asyncio.create_task(head.status())
        await asyncio.sleep(0)
        joined = [asyncio.create_task(head.status()) for _ in range(3)]
        await asyncio.sleep(0)
        builder.cancel()
        for _ in range(3):  # its cancellation reaches those that joined, one of them builds
            await asyncio.sleep(0)
    statuses = [await t for t in joined]

    with pytest.raises(asyncio.CancelledError):
        await builder
    assert all(s is statuses[0] for s in statuses) and len(builds) == 1
    assert [d.name for d in statuses[0].deployments] == ["alpha", "beta", "ghost", "poison"]


async def test_a_joined_call_cancelled_leaves_the_others_their_status(
    head: HeadNode, builds: list[tuple[object, bool]]
) -> None:
    async with head.lock:
        builder = asyncio.create_task(head.status())
        await asyncio.sleep(0)
        joined = [asyncio.create_task(head.status()) for _ in range(2)]
        await asyncio.sleep(0)
        joined[0].cancel()
        await asyncio.sleep(0)
    assert (await builder) is (await joined[1])
    with pytest.raises(asyncio.CancelledError):
        await joined[0]
    assert len(builds) == 1 and not head._status_builds

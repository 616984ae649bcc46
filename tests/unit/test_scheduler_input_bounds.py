"""The head's bounds on the strings a scheduler sends (``shoal.core.reports``): in its
registration and its health updates, over the gRPC servicer and a HeadNode on a MemoryStore.
Before, a registration with 1 MB for its id, addresses and hostname and a report with a 1 MB
message made ``GET /api/status`` 11 MB, an event and a log line of 2 MB, and put the id into
the routing table sent to every scheduler; an update from an unknown 1 MB id wrote a 1 MB log
line each heartbeat."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.cluster import REPLICA_ID, CreateReplica
from shoal.core.limits import MAX_SCHEDULER_ID_CHARS
from shoal.core.reports import MAX_REPORTS
from shoal.core.stats import BUCKETS
from shoal.errors import InvalidArgument
from shoal.head.node import HeadNode
from shoal.proto import shoal_pb2 as pb
from shoal.rpc.head_service import HeadService
from shoal.scheduler.node import scheduler_id
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers
from tests.unit.conftest import Aborted, FakeContext, make_spec

pytestmark = pytest.mark.timeout(10)

BIG = "x" * 1_000_000


class StreamContext(FakeContext):
    def time_remaining(self) -> float:
        return 5.0


@pytest.fixture
async def head(store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock) -> AsyncIterator[HeadNode]:
    node = HeadNode(Settings(), store, fleet, clock)
    yield node
    await node.aclose()


def registration(sid: str = "s1", **fields: Any) -> pb.RegisterSchedulerRequest:
    fields.setdefault("address", f"{sid[:20]}:7000")
    return pb.RegisterSchedulerRequest(
        scheduler_id=sid, pid=42, capacity=pb.Resources(cpus=4, memory_mb=1024), **fields
    )


def replica(rid: str = "m-abc123", **fields: Any) -> pb.ReplicaStatus:
    fields = {"deployment": "m", "state": pb.READY, "address": "10.0.0.1:9000", **fields}
    return pb.ReplicaStatus(replica_id=rid, **fields)


async def refused(call: Any) -> FakeContext:
    context = StreamContext()
    with pytest.raises(Aborted):
        await call(cast(Any, context))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(context.details) < 500  # the value is quoted, not repeated
    return context


async def register(service: HeadService, request: pb.RegisterSchedulerRequest) -> None:
    await service.RegisterScheduler(request, cast(Any, StreamContext()))


async def health(service: HeadService, request: pb.SchedulerHealth) -> bool:
    return (await service.SendHealthUpdate(request, cast(Any, StreamContext()))).ack


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"scheduler_id": BIG},
            f"scheduler_id: a scheduler id of {len(BIG)} characters, over the limit of 253: ",
        ),
        ({"scheduler_id": "s 1"}, "scheduler_id: 's 1' is no scheduler id: letters, digits, "),
        ({"scheduler_id": ""}, "scheduler_id: '' is no scheduler id"),
        ({"address": ""}, "address is required"),
        ({"address": BIG}, f"address is {len(BIG)} characters, over the limit of 300: "),
        ({"http_address": BIG}, f"http_address is {len(BIG)} characters, over the limit of 300: "),
        (
            {"replicas": [replica("M-" + "y" * 200)]},
            "replica_id: 'M-yyyyy",
        ),
        (
            {"replicas": [replica(deployment=BIG)]},
            "replica m-abc123: deployment: 'xxxx",
        ),
        (
            {"replicas": [replica(spec_hash=BIG)]},
            f"replica m-abc123: spec_hash is {len(BIG)} characters, over the limit of 128",
        ),
    ],
)
async def test_a_registration_past_a_bound_is_refused_naming_the_field(
    head: HeadNode, fields: dict[str, Any], expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    service = HeadService(head)
    request = registration(**{"sid": fields.pop("scheduler_id", "s1")}, **fields)

    context = await refused(lambda ctx: service.RegisterScheduler(request, ctx))

    assert context.details.startswith(expected), context.details
    assert head.state.schedulers == {}
    assert [e.kind for e in head.state.events] == []
    assert max((len(r.getMessage()) for r in caplog.records), default=0) < 500


async def test_an_id_at_the_bound_of_dns_names_registers(head: HeadNode) -> None:
    sid = ".".join(["node-" + "a" * 58] * 4)[:MAX_SCHEDULER_ID_CHARS]  # a Kubernetes node name's most
    assert len(sid) == MAX_SCHEDULER_ID_CHARS
    await register(HeadService(head), registration(sid))
    assert list(head.state.schedulers) == [sid]


async def test_a_long_hostname_and_replica_message_are_kept_cut(head: HeadNode) -> None:
    service = HeadService(head)
    await register(service, registration(hostname=BIG, replicas=[replica(message=BIG)]))
    assert head.state.schedulers["s1"].hostname == "x" * 253 + f"... ({len(BIG) - 253} more characters)"
    assert head.state.replicas["m-abc123"].message.endswith(f"... ({len(BIG) - 2000} more characters)")

    dead = replica(state=pb.DEAD, message="boom " + BIG)
    assert await health(service, pb.SchedulerHealth(scheduler_id="s1", registry_version=1, replicas=[dead]))
    died = [e for e in head.state.events if e.kind == "replica_died"]
    assert len(died) == 1 and len(died[0].message) < 2100
    status = json.dumps((await head.status()).to_json())
    assert len(status) < 10_000


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        (pb.SchedulerHealth(scheduler_id=BIG), f"scheduler_id: a scheduler id of {len(BIG)} characters"),
        (pb.SchedulerHealth(scheduler_id="s1", replicas=[replica("../../etc")]), "replica_id: '../../etc'"),
        (
            pb.SchedulerHealth(scheduler_id="s1", replicas=[replica(address=BIG)]),
            f"replica m-abc123: address is {len(BIG)} characters, over the limit of 300",
        ),
        (
            pb.SchedulerHealth(scheduler_id="s1", load={BIG: pb.DeploymentLoad(in_flight=1)}),
            "load: 'xxxx",
        ),
        # Counts: a 64 MiB update of tiny reports held the head's lock for every one of them.
        (
            pb.SchedulerHealth(
                scheduler_id="s1", replicas=[replica(f"m-{i:06x}") for i in range(MAX_REPORTS + 1)]
            ),
            f"replicas: {MAX_REPORTS + 1} reports, over the limit of {MAX_REPORTS}",
        ),
        (
            pb.SchedulerHealth(
                scheduler_id="s1", load={f"d{i}": pb.DeploymentLoad() for i in range(MAX_REPORTS + 1)}
            ),
            f"load: {MAX_REPORTS + 1} deployments, over the limit of {MAX_REPORTS}",
        ),
    ],
)
async def test_a_health_update_past_a_bound_is_refused_and_nothing_of_it_applied(
    head: HeadNode, update: pb.SchedulerHealth, expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    service = HeadService(head)
    await register(service, registration(replicas=[replica()]))
    caplog.clear()
    caplog.set_level(logging.INFO)

    context = await refused(lambda ctx: service.SendHealthUpdate(update, ctx))

    assert context.details.startswith(expected), context.details
    assert list(head.state.replicas) == ["m-abc123"]  # not lost for want of a report
    assert max((len(r.getMessage()) for r in caplog.records), default=0) < 500


async def test_latency_counts_of_another_length_are_not_kept(head: HeadNode) -> None:
    # A scheduler of another version may count in other buckets: its update is taken (the
    # charts skip such counts), but the head kept them whatever their number (a million).
    service = HeadService(head)
    await register(service, registration(replicas=[replica()]))
    ours = [1] * (len(BUCKETS) + 1)
    for buckets, kept in (([1] * 1_000_000, ()), ([1, 1], ()), (ours, tuple(ours))):
        load = {"m": pb.DeploymentLoad(requests=1, latency_buckets=buckets)}
        assert await health(service, pb.SchedulerHealth(scheduler_id="s1", registry_version=1, load=load))
        assert head._loads["s1"]["m"].latency == kept
        assert head._loads["s1"]["m"].requests == 1


async def test_a_refused_update_ends_its_health_stream_with_invalid_argument(head: HeadNode) -> None:
    service = HeadService(head)
    await register(service, registration())

    async def updates() -> AsyncIterator[pb.SchedulerHealth]:
        yield pb.SchedulerHealth(scheduler_id="s1", sent_s=1.0)
        yield pb.SchedulerHealth(scheduler_id="s1", sent_s=1.1, replicas=[replica("R1")])
        yield pb.SchedulerHealth(scheduler_id="s1", sent_s=1.2)

    context = StreamContext()
    acks = []
    with pytest.raises(Aborted):
        async for reply in service.StreamHealth(updates(), cast(Any, context)):
            acks.append(reply.ack)
    assert acks == [True]
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert context.details.startswith("replica_id: 'R1' is no replica id")


async def test_the_replica_ids_the_head_makes_pass_its_own_check(head: HeadNode) -> None:
    name = "a" * 62 + "z"  # the longest deployment name
    service = HeadService(head)
    await register(service, registration())
    await head.apply(make_spec(name, 3))
    actions = await head.reconcile_once()
    made = [a.replica_id for a in actions if isinstance(a, CreateReplica)]
    assert len(made) == 3 and all(REPLICA_ID.fullmatch(rid) for rid in made)

    reports = [replica(rid, deployment=name) for rid in made]
    assert await health(service, pb.SchedulerHealth(scheduler_id="s1", registry_version=5, replicas=reports))
    assert sorted(head.state.replicas) == sorted(made)


@pytest.mark.parametrize("source", ["flags", "env"])
def test_a_scheduler_does_not_start_with_an_id_the_head_refuses(source: str) -> None:
    where = {"flags": "--scheduler-id", "env": "environment variable SHOAL_SCHEDULER_ID"}[source]
    for bad, problem in (
        ("s" * 254, "a scheduler id of 254 characters, over the limit of 253"),
        ("gpu box 1", "'gpu box 1' is no scheduler id"),
    ):
        given = {"flags": {"flags": {"scheduler_id": bad}}, "env": {"env": {"SHOAL_SCHEDULER_ID": bad}}}
        with pytest.raises(InvalidArgument) as err:
            Settings.load(**given[source])  # type: ignore[arg-type]
        assert str(err.value).startswith(f"{where}: {problem}")
    assert Settings.load(flags={"scheduler_id": "node-1.example.com"}).scheduler_id == "node-1.example.com"


def test_an_advertised_host_past_the_bound_is_refused_at_start() -> None:
    with pytest.raises(
        InvalidArgument, match=r"^--advertise-host: advertise_host is 254 characters, over the limit of 253$"
    ):
        Settings.load(flags={"advertise_host": "h" * 254})


def test_a_kept_id_at_the_bound_is_kept(tmp_path: Path) -> None:
    (tmp_path / "scheduler_id").write_text("n" * 253 + "\n")
    assert scheduler_id(Settings(state_dir=str(tmp_path))) == "n" * 253
    (tmp_path / "scheduler_id").write_text("n" * 254 + "\n")  # edited by hand: a new id
    assert scheduler_id(Settings(state_dir=str(tmp_path))).startswith("sched-")


def test_settings_made_in_code_with_an_id_the_head_refuses_do_not_start_a_scheduler(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"^scheduler_id: 'a/b' is no scheduler id"):
        scheduler_id(Settings(state_dir=str(tmp_path), scheduler_id="a/b"))

"""Fuzzing every gRPC method served: the head's ``Head`` service, the scheduler's native
``Scheduler`` service and the Open Inference Protocol's ``GRPCInferenceService``, the
internal ``Ingress`` service a scheduler's main process serves its ingress workers, what an
ingress worker serves (``Scheduler`` and ``GRPCInferenceService``), and the replica's
``Replica`` service.

Each request is built from the method's own protobuf descriptor (every field, nested
messages and maps included, any value its type allows), sent to the real servicers (a
``HeadNode`` on a ``MemoryStore`` with fake schedulers; a ``SchedulerNode`` with fake
replicas, a fake head link and a fake launcher; an ``IngressWorker`` following that
scheduler's table in memory; ``ReplicaProcess`` es with a python echo model and the fake
vLLM engine) through a real ``grpc.aio`` server on a loopback port of this process.
Whatever is sent, the status is never UNKNOWN or INTERNAL (an exception the servicer did
not map), the next call on the same channel is served, and a replica keeps running.
Streaming calls get a short deadline: DEADLINE_EXCEEDED from a stream that stays open is
an answer.

``SHOAL_FUZZ_EXAMPLES`` sets the examples per method (see docs/security.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import struct
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message_factory import GetMessageClass
from hypothesis import event, given
from hypothesis import strategies as st

from shoal import metrics
from shoal.config import Settings
from shoal.core.cluster import DRAINING, READY
from shoal.core.spec import parse_spec
from shoal.core.tensors import DATATYPES
from shoal.head.blobs import BlobStore
from shoal.head.node import HeadNode
from shoal.proto import grpc_service_pb2 as oip
from shoal.proto import grpc_service_pb2_grpc as oipg
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.replica.process import ReplicaProcess
from shoal.rpc import codec
from shoal.rpc.blobs import HeadBlobService, SchedulerBlobService
from shoal.rpc.head_service import HeadService
from shoal.rpc.hop import HopServer, socket_path
from shoal.rpc.inference_service import InferenceService
from shoal.rpc.ingress import IngressService
from shoal.rpc.replica_service import ReplicaService
from shoal.rpc.scheduler_service import NativeService, SchedulerService
from shoal.rpc.server import bind, new_server
from shoal.scheduler.ingress import Counts, IngressWorker, snapshot
from shoal.scheduler.node import SchedulerNode
from shoal.scheduler.router import Router
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeHeadLink, FakeLauncher, FakeReplicas, FakeSchedulers
from shoal.testing.wait import until
from shoal.types import RoutingTable
from tests.unit.fuzzing import fuzz_settings

FUZZ = fuzz_settings(25)
WORKER_FUZZ = fuzz_settings(8)
STREAM_DEADLINE_S = 0.5
# A stream that never ends (WatchRoutes, WatchIngress) takes its deadline per example: a
# long pass (SHOAL_FUZZ_EXAMPLES) gets the time it needs.
pytestmark = pytest.mark.timeout(300 + 2 * STREAM_DEADLINE_S * FUZZ.max_examples)
CALL_DEADLINE_S = 10.0
SERVER_FAULTS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

# ---------------------------------------------------------------- requests from descriptors

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
# Names the servicers know, so that requests reach past the first lookup.
_KNOWN = st.sampled_from(["echo", "free", "x", "s", "1", "", "s1", "a", "FP32", "BYTES", "INT64"])
_texts = _KNOWN | st.text(max_size=8)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False) | _texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
    max_leaves=8,
)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return _texts
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode())
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        special = st.sampled_from(["NaN", "Infinity", "-Infinity"])
        return st.floats(width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64, allow_nan=False) | special
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        return st.sampled_from([v.number for v in field.enum_type.values])
    low, high = _INT_RANGES[kind]
    return st.integers(-3, 10).filter(lambda n: low <= n <= high) | st.integers(low, high)


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        assert field.message_type is not None
        full = field.message_type.full_name
        if full == "google.protobuf.Struct":
            return st.dictionaries(_texts, _json, max_size=3)
        if full in ("google.protobuf.Value", "google.protobuf.ListValue"):
            return _json if full.endswith("Value") else st.lists(_json, max_size=3)
        return message_docs(field.message_type, depth + 1)
    return _scalar(field)


def message_docs(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """JSON documents (``json_format`` form) of ``desc``: any subset of its fields."""
    if depth > 3:
        return st.just({})
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in desc.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            optional[field.name] = st.dictionaries(_scalar(key).map(str), _value(value, depth), max_size=3)
        elif field.is_repeated:
            optional[field.name] = st.lists(_value(field, depth), max_size=3)
        else:
            optional[field.name] = _value(field, depth)
    return st.fixed_dictionaries({}, optional=optional)


def build(desc: Descriptor, doc: dict[str, Any]) -> Any | None:
    """The message ``doc`` describes, or None where it cannot be one (two members of a oneof)."""
    try:
        return json_format.ParseDict(doc, GetMessageClass(desc)(), ignore_unknown_fields=False)
    except (json_format.ParseError, ValueError, TypeError):
        return None


# Tasks for a replica whose tensors mostly decode: any datatype, small shapes, bytes of the
# right length (or one byte more or less), BYTES elements with their length prefixes.


@st.composite
def tensors(draw: st.DrawFn) -> pb.Tensor:
    datatype = draw(st.sampled_from([*DATATYPES, "FP8", ""]))
    shape = draw(st.lists(st.integers(0, 3), max_size=3) | st.lists(st.integers(-2, 2**40), max_size=3))
    count = math.prod(shape) if all(0 <= d <= 3 for d in shape) else 1
    if datatype == "BYTES":
        items = draw(st.lists(st.binary(max_size=6), min_size=count, max_size=count))
        data = b"".join(struct.pack("<I", len(item)) + item for item in items)
    else:
        size = count * (DATATYPES[datatype].itemsize if datatype in DATATYPES else 4)
        fill = st.sampled_from([0, 1]) if datatype == "BOOL" else st.integers(0, 255)
        data = bytes(draw(st.lists(fill, min_size=size, max_size=size)))
    data = draw(st.sampled_from([data, data[:-1], data + b"\x01"]))
    return pb.Tensor(name=draw(_KNOWN), datatype=datatype, shape=shape, data=data)


tasks = st.builds(
    pb.Task,
    request_id=_texts,
    inputs=st.lists(tensors(), max_size=3),
    timeout_s=st.floats() | st.sampled_from([0.0, 5.0, -1.0, 1e300]),
    tag=st.integers(-(2**63), 2**63 - 1),
    model_id=st.sampled_from(["", "m1", "m2", "m3"]) | _texts,
)

# ---------------------------------------------------------------- the servers

ECHO_MODEL = """
class Echo:
    def predict(self, inputs):
        return dict(inputs)

    def load_model(self, model_id):
        return Echo()
"""


class ReplicaLink:
    """The scheduler, as a replica sees it: it acknowledges everything."""

    async def register(self, replica_id: str, address: str, pid: int) -> tuple[bool, float]:
        return True, 60.0

    async def health(self, replica_id: str, state: str, in_flight: int, queued: int) -> bool:
        return True


class WorkerLink:
    """A scheduler's main process, in memory, as its ingress worker sees it."""

    def __init__(self, node: SchedulerNode) -> None:
        self.node = node

    async def watch(self) -> AsyncIterator[RoutingTable]:
        yield self.node.hub.table(self.node.table_version)
        await asyncio.Event().wait()

    async def report(self, counts: Mapping[str, Counts], table_version: int = 0) -> dict[str, Counts]:
        self.node.hub.report("w1", 1, dict(counts))
        return self.node.hub.totals(snapshot(self.node.router, self.node.catalog))

    async def metrics(self) -> tuple[bytes, str]:
        return b"", "text/plain"

    async def close(self) -> None:
        pass


@dataclass
class Replica:
    """A ``ReplicaProcess`` served on a loopback port and on a hop socket in ``hop_dir`` (as
    ``shoal.replica_main`` serves it), registered and running."""

    process: ReplicaProcess
    server: grpc.aio.Server
    channel: grpc.aio.Channel
    hop: HopServer
    running: asyncio.Task[None]

    @classmethod
    async def start(cls, config: Settings, doc: dict[str, Any], hop_dir: Path) -> Replica:
        process = ReplicaProcess(f"{doc['name']}-000001", parse_spec(doc), config, ReplicaLink())
        server = new_server(config)
        service = ReplicaService(process)
        pbg.add_ReplicaServicer_to_server(service, server)
        port = bind(server, "127.0.0.1", 0)
        await server.start()
        hop = HopServer(socket_path(hop_dir, f"127.0.0.1:{port}"), service.outcome, config.max_message_bytes)
        await hop.start()
        await process.load()
        running = asyncio.create_task(process.run(f"127.0.0.1:{port}", 1))
        await until(lambda: process.state == READY, "the replica registered")
        return cls(process, server, grpc.aio.insecure_channel(f"127.0.0.1:{port}"), hop, running)

    def assert_running(self) -> None:
        assert not self.running.done(), f"the replica stopped: {self.process.exit_reason}"
        assert self.process.state == READY, self.process.state

    async def aclose(self) -> None:
        self.process.request_stop(0.0)
        await self.running
        await self.process.drain()
        await self.channel.close(None)
        await self.server.stop(None)
        await self.hop.stop()


@dataclass
class Servers:
    loop: asyncio.AbstractEventLoop
    config: Settings
    head: grpc.aio.Channel
    scheduler: grpc.aio.Channel
    worker: grpc.aio.Channel
    replica: Replica
    generator: Replica
    multiplexed: Replica
    echo_doc: dict[str, Any]
    hop_dir: Path

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def rpc(self, method: Any, request: Any) -> Any:
        """``method(request)`` on the loop (grpc.aio looks the loop up when a call is made)."""

        async def made_on_the_loop() -> Any:
            return await method(request, timeout=CALL_DEADLINE_S)

        return self.run(made_on_the_loop())


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    loop = asyncio.new_event_loop()
    models = tmp_path_factory.mktemp("models")
    config = Settings(
        control_rate_limit=0, max_message_mb=1, max_tensor_elements=10_000, state_dir=str(models / "state")
    )
    (models / "fuzz_echo.py").write_text(ECHO_MODEL)
    echo_doc = {"name": "echo", "backend": "python", "model": "fuzz_echo:Echo", "base_dir": str(models)}
    generator_doc = {
        "name": "lm",
        "backend": "vllm",
        "model": str(models),
        "options": {"vllm_module": "shoal.testing.fake_vllm", "max_tokens": 3},
        "timeout_s": 5,
    }

    async def setup() -> tuple[Servers, list[Any]]:
        node = HeadNode(config, MemoryStore(), FakeSchedulers())
        await node.tokens.load()
        await node.apply(parse_spec({"name": "echo", "backend": "python", "model": "m:M"}))
        head_server = new_server(config)
        pbg.add_HeadServicer_to_server(HeadService(node), head_server)
        blobs = BlobStore(models / "blobs", max_bytes=2**20, grace_s=60.0)
        node.blobs = blobs
        pbg.add_BlobServicer_to_server(HeadBlobService(blobs, node), head_server)
        head_port = bind(head_server, "127.0.0.1", 0)
        await head_server.start()

        fakes = FakeReplicas()
        router = Router("s1", config, fakes, policy="round_robin")
        typed = [
            {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "s", "datatype": "BYTES", "shape": [-1]},
        ]
        base = {"backend": "python", "model": "m:M", "timeout_s": 5}
        router.add("a", parse_spec({"name": "echo", **base, "inputs": typed, "outputs": typed}), "a:1", "s1")
        router.add("b", parse_spec({"name": "free", **base}), "b:1", "s1")
        sched = SchedulerNode(
            config, "s1", cast(Any, FakeHeadLink()), fakes, router=router, launcher=FakeLauncher()
        )
        sched.registered.set()
        sched_server = new_server(config)
        pbg.add_SchedulerServicer_to_server(SchedulerService(sched), sched_server)
        oipg.add_GRPCInferenceServiceServicer_to_server(
            InferenceService(sched.dataplane, sched.inference_auth, config), sched_server
        )
        # The main process's service to its ingress workers, as shoal.run serves it.
        registry = metrics.registry(metrics.SchedulerCollector(sched))
        ingress = IngressService(
            sched.hub,
            lambda: snapshot(sched.router, sched.catalog),
            lambda: sched.table_version,
            sched.table_changed,
            lambda: metrics.render(registry),
        )
        pbg.add_IngressServicer_to_server(ingress, sched_server)
        pbg.add_BlobServicer_to_server(SchedulerBlobService(sched.supervisor.artifacts), sched_server)
        sched_port = bind(sched_server, "127.0.0.1", 0)
        await sched_server.start()

        # An ingress worker of that scheduler, serving what shoal.run's workers serve.
        worker = IngressWorker(config, "s1", WorkerLink(sched), fakes)
        following = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.registered.wait(), 5)
        worker_server = new_server(config)
        pbg.add_SchedulerServicer_to_server(NativeService(worker), worker_server)
        oipg.add_GRPCInferenceServiceServicer_to_server(
            InferenceService(worker.dataplane, worker.inference_auth, config), worker_server
        )
        worker_port = bind(worker_server, "127.0.0.1", 0)
        await worker_server.start()

        servers = Servers(
            loop,
            config,
            grpc.aio.insecure_channel(f"127.0.0.1:{head_port}"),
            grpc.aio.insecure_channel(f"127.0.0.1:{sched_port}"),
            grpc.aio.insecure_channel(f"127.0.0.1:{worker_port}"),
            await Replica.start(config, echo_doc, models),
            await Replica.start(config, generator_doc, models),
            await Replica.start(
                config, {**echo_doc, "name": "mux", "multiplexing": {"max_models_per_replica": 2}}, models
            ),
            echo_doc,
            models,
        )
        return servers, [head_server, sched_server, worker_server, following, node, router, sched, blobs]

    s, owned = loop.run_until_complete(setup())
    yield s
    head_server, sched_server, worker_server, following, node, router, sched, blobs = owned
    for channel in (s.head, s.scheduler, s.worker):
        loop.run_until_complete(channel.close(None))
    for server in (head_server, sched_server, worker_server):
        loop.run_until_complete(server.stop(None))
    loop.run_until_complete(s.replica.aclose())
    loop.run_until_complete(s.generator.aclose())
    loop.run_until_complete(s.multiplexed.aclose())
    following.cancel()
    loop.run_until_complete(asyncio.gather(following, return_exceptions=True))
    loop.run_until_complete(sched.aclose())
    loop.run_until_complete(router.aclose())
    loop.run_until_complete(node.aclose())
    loop.run_until_complete(blobs.aclose())
    loop.close()


async def call(
    channel: grpc.aio.Channel, service: str, method: MethodDescriptor, messages: list[Any]
) -> None:
    """``method`` with ``messages`` (the first, for a unary request); raises AioRpcError."""
    path = f"/{service}/{method.name}"
    reply = GetMessageClass(method.output_type)
    out = reply.FromString
    if not method.client_streaming and not method.server_streaming:
        await channel.unary_unary(path, None, out)(messages[0].SerializeToString(), timeout=CALL_DEADLINE_S)
        return
    if not method.client_streaming:
        stream = channel.unary_stream(path, None, out)(
            messages[0].SerializeToString(), timeout=STREAM_DEADLINE_S
        )
        async for _ in stream:
            pass
        return
    # Written one by one: a server may answer (and end the call) before it read them all
    # (an upload refused on its first message), and grpc then fails the client's next write,
    # and the whole call, with an INTERNAL of its own ("Internal error from Core"): the
    # server's status is lost to the client. Such a call is not a server fault.
    both = channel.stream_stream(path, None, out)(None, timeout=STREAM_DEADLINE_S)
    try:
        for m in messages:
            await both.write(m.SerializeToString())
        await both.done_writing()
    except asyncio.InvalidStateError:
        pass  # the server's status came first: read below
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.INTERNAL and "SendMessageOperation" in err.debug_error_string():
            event("a write after the server ended the call")
            return
        raise
    async for _ in both:
        pass


def check(
    servers: Servers,
    channel: grpc.aio.Channel,
    service: str,
    method: MethodDescriptor,
    docs: list[Any],
    replica: Replica | None = None,
) -> grpc.StatusCode | None:
    """Send ``docs`` to ``method``; returns the status (None: OK, or nothing to send)."""
    messages = [m for m in (build(method.input_type, d) for d in docs) if m is not None]
    if not messages:
        return None
    code = None
    try:
        servers.run(call(channel, service, method, messages))
    except grpc.aio.AioRpcError as err:
        assert err.code() not in SERVER_FAULTS, (method.full_name, messages[:2], err.code(), err.details())
        code = err.code()
    # The next call on the same channel is served (the call is made on the loop: grpc.aio
    # looks the loop up when a call is created).
    servers.run(follow_up(servers, channel))
    if replica is not None:
        replica.assert_running()
    return code


async def follow_up(servers: Servers, channel: grpc.aio.Channel) -> None:
    if channel is servers.head:
        await channel.unary_unary("/shoal.v1.Head/GetStatus", None, None)(
            pb.Empty().SerializeToString(), timeout=CALL_DEADLINE_S
        )
    elif channel in (servers.replica.channel, servers.generator.channel):
        await channel.unary_unary("/shoal.v1.Replica/Ping", None, None)(
            pb.PingRequest().SerializeToString(), timeout=CALL_DEADLINE_S
        )
    else:
        await channel.unary_unary("/inference.GRPCInferenceService/ServerLive", None, None)(
            oip.ServerLiveRequest().SerializeToString(), timeout=CALL_DEADLINE_S
        )


def _methods(module: Any, service: str) -> list[MethodDescriptor]:
    return list(module.DESCRIPTOR.services_by_name[service].methods)


HEAD = _methods(pb, "Head")
SCHEDULER = _methods(pb, "Scheduler")
INFERENCE = _methods(oip, "GRPCInferenceService")
INGRESS = _methods(pb, "Ingress")
BLOB = _methods(pb, "Blob")
REPLICA = [m for m in _methods(pb, "Replica") if m.name != "Drain"]
DRAIN = pb.DESCRIPTOR.services_by_name["Replica"].methods_by_name["Drain"]
REPLICA_GENERATE = pb.DESCRIPTOR.services_by_name["Replica"].methods_by_name["Generate"]


def _requests(method: MethodDescriptor) -> st.SearchStrategy[list[dict[str, Any]]]:
    size = 3 if method.client_streaming else 1
    return st.lists(message_docs(method.input_type), min_size=1, max_size=size)


# Every method of every service, on the server that serves it. An ingress worker serves the
# same servicers as its main process over an ``IngressWorker``: a shorter pass there.
CASES = [
    *(("head", m) for m in HEAD + BLOB),
    *(("scheduler", m) for m in SCHEDULER + INFERENCE + INGRESS + BLOB),
    *(("worker", m) for m in SCHEDULER + INFERENCE),
    *(("replica", m) for m in REPLICA),
    ("generator", REPLICA_GENERATE),
]


@pytest.mark.parametrize(("server", "method"), CASES, ids=[f"{s}-{m.full_name}" for s, m in CASES])
def test_methods(servers: Servers, server: str, method: MethodDescriptor) -> None:
    """The replicas: a python echo model, and the fake vLLM engine for Generate."""
    replica = getattr(servers, server) if server in ("replica", "generator") else None
    channel = replica.channel if replica is not None else getattr(servers, server)

    # WatchIngress never ends: each example waits for its deadline, and its two fields are only logged.
    @WORKER_FUZZ if server == "worker" or method.name == "WatchIngress" else FUZZ
    @given(docs=_requests(method))
    def run(docs: list[dict[str, Any]]) -> None:
        check(servers, channel, method.containing_service.full_name, method, docs, replica)

    run()


@FUZZ
@given(doc=message_docs(DRAIN.input_type))
def test_replica_drain(servers: Servers, doc: dict[str, Any]) -> None:
    """Drain on a replica of its own: refused clearly, or accepted and then draining (the
    replica answers until it stops, within the grace it was given)."""
    replica = servers.run(Replica.start(servers.config, servers.echo_doc, servers.hop_dir))
    try:
        message = build(DRAIN.input_type, doc)
        if message is None:
            return
        code = None
        try:
            servers.run(call(replica.channel, DRAIN.containing_service.full_name, DRAIN, [message]))
        except grpc.aio.AioRpcError as err:
            assert err.code() not in SERVER_FAULTS, (message, err.code(), err.details())
            code = err.code()
        if code is None:
            assert replica.process.state == DRAINING
        else:
            assert code == grpc.StatusCode.INVALID_ARGUMENT, code
            replica.assert_running()
    finally:
        servers.run(replica.aclose())


@pytest.mark.parametrize("which", ["replica", "multiplexed"])
@FUZZ
@given(batch=st.lists(tasks, min_size=1, max_size=4))
def test_replica_tasks(servers: Servers, which: str, batch: list[pb.Task]) -> None:
    """Tasks whose tensors mostly decode, to the echo replica (and to one that multiplexes
    model ids, two loaded at most): alone (PushTask), then together on the data stream
    (PushTasks), where the batcher sees them at once. Each is answered, once, with its
    outputs or a clear error; the replica keeps running."""
    replica = getattr(servers, which)
    stub = pbg.ReplicaStub(replica.channel)

    async def alone(task: pb.Task) -> None:
        try:
            await stub.PushTask(task, timeout=CALL_DEADLINE_S)
        except grpc.aio.AioRpcError as err:
            assert err.code() not in SERVER_FAULTS, (task, err.code(), err.details())

    async def together() -> list[pb.TaskOutcome]:
        numbered = [
            pb.Task(
                request_id=t.request_id, inputs=t.inputs, timeout_s=t.timeout_s, tag=i, model_id=t.model_id
            )
            for i, t in enumerate(batch)
        ]
        stream = stub.PushTasks(iter([pb.TaskBatch(tasks=numbered)]), timeout=CALL_DEADLINE_S)
        return [o async for reply in stream for o in reply.outcomes]

    servers.run(alone(batch[0]))
    outcomes = servers.run(together())
    assert sorted(o.tag for o in outcomes) == list(range(len(batch)))
    for o in outcomes:
        event(o.error_code or "answered")
        assert o.error_code not in ("INTERNAL", "UNKNOWN"), (batch[o.tag], o.error_message)
        if not o.error_code:
            sent = {t.name: t for t in batch[o.tag].inputs}
            assert {t.name: t for t in o.outputs} == sent, "the echo model's answer is its request"
    replica.assert_running()


# ---------------------------------------------------------------- findings, kept


def test_regression_an_ingress_workers_read_log_is_refused_clearly(servers: Servers) -> None:
    """ReadLog on an ingress worker answered UNKNOWN: a plain method returning an async
    generator, which grpc.aio iterated as a synchronous one."""
    stub = pbg.SchedulerStub(servers.worker)

    async def read() -> None:
        async for _ in stub.ReadLog(pb.ReadLogRequest(replica_id="x"), timeout=CALL_DEADLINE_S):
            pass

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        servers.run(read())
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
    assert "control port" in (caught.value.details() or "")


@pytest.mark.parametrize(
    "counts",
    [
        pb.IngressCounts(success=-1),
        pb.IngressCounts(outcomes={"ok": -5}),
        pb.IngressCounts(latency=pb.Histogram(counts=[-1], total=0.0)),
        pb.IngressCounts(queue=pb.Histogram(total=float("nan"))),
    ],
    ids=["negative", "outcome", "histogram", "nan-total"],
)
def test_regression_an_ingress_report_cannot_break_the_statistics(
    servers: Servers, counts: pb.IngressCounts
) -> None:
    """A worker's report of a negative count was kept and added into every later total:
    ``ModelStatistics`` (uint64 counts) then failed with UNKNOWN on the main process and
    every worker, for good. Such a report is refused, naming the field."""
    ingress = pbg.IngressStub(servers.scheduler)
    report = pb.IngressReport(worker_id="w9", pid=9, deployments={"echo": counts})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        servers.rpc(ingress.ReportIngress, report)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "deployments['echo']." in (caught.value.details() or "")
    assert_statistics_served(servers)


def test_regression_ingress_sums_past_int64_stay_at_its_maximum(servers: Servers) -> None:
    """Two workers' counts whose sum overflowed int64 made ReportIngress answer UNKNOWN (its
    reply could not be encoded) and ModelStatistics too, for good. Sums stay at the most
    an int64 carries; counts as high as that are not refused (a cumulative count of
    nanoseconds grows large)."""
    ingress = pbg.IngressStub(servers.scheduler)
    high = 2**63 - 1
    counts = pb.IngressCounts(success=high, success_ns=high, given_up=high, outcomes={"ok": high})
    for worker in ("w10", "w11"):
        report = pb.IngressReport(worker_id=worker, pid=10, deployments={"echo": counts})
        totals = servers.rpc(ingress.ReportIngress, report)
    assert totals.deployments["echo"].success == high
    assert totals.deployments["echo"].outcomes["ok"] == high
    assert_statistics_served(servers)


def assert_statistics_served(servers: Servers) -> None:
    for channel in (servers.scheduler, servers.worker):
        stats = servers.rpc(
            oipg.GRPCInferenceServiceStub(channel).ModelStatistics, oip.ModelStatisticsRequest(name="echo")
        )
        assert stats.model_stats[0].name == "echo"


@pytest.mark.parametrize("grace_s", [float("nan"), float("inf"), -1.0, 1e9])
def test_regression_drain_refuses_a_grace_that_is_not_a_duration(servers: Servers, grace_s: float) -> None:
    """Drain took any grace: NaN or a negative one stopped the replica at once (cutting the
    requests in flight), an infinite one let a stuck request keep it from ever exiting."""
    replica = servers.replica
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        servers.rpc(pbg.ReplicaStub(replica.channel).Drain, pb.DrainRequest(grace_s=grace_s))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "grace_s" in (caught.value.details() or "")
    replica.assert_running()


def test_regression_model_ready_of_a_version_that_is_no_number(servers: Servers) -> None:
    """ModelReady naming a version that is not a number answered UNKNOWN (the catalog's
    InvalidArgument escaped the servicer); on the main process and on a worker alike."""
    for channel in (servers.scheduler, servers.worker):
        stub = oipg.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            servers.rpc(stub.ModelReady, oip.ModelReadyRequest(name="echo", version="x"))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "version 'x'" in (caught.value.details() or "")


def test_regression_a_health_update_with_other_latency_buckets(servers: Servers) -> None:
    """A scheduler's health update whose latency histogram had another number of buckets than
    the one before answered UNKNOWN (the head's chart recorder zipped them strictly), so the
    head took it as no answer. It is acknowledged; the chart skips that report."""
    head = pbg.HeadStub(servers.head)
    cpus = pb.Resources(cpus=4, memory_mb=1024)
    servers.rpc(
        head.RegisterScheduler,
        pb.RegisterSchedulerRequest(scheduler_id="s9", address="127.0.0.1:9", capacity=cpus),
    )
    for requests, buckets in ((1, [1]), (2, [1, 1])):
        load = {"echo": pb.DeploymentLoad(requests=requests, latency_buckets=buckets)}
        reply = servers.rpc(head.SendHealthUpdate, pb.SchedulerHealth(scheduler_id="s9", load=load))
        assert reply.ack


# ---------------------------------------------------------------- the local hop

_LENGTH = struct.Struct("<I")
OVER_LIMIT = _LENGTH.pack(2**31)  # the head of a frame longer than max_message_mb


async def hop_outcomes(path: Path, data: bytes, expected: int) -> tuple[list[pb.TaskOutcome], bool]:
    """Send ``data`` on a new hop connection; the outcomes read (up to ``expected``), and
    whether the replica closed the connection."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    outcomes: list[pb.TaskOutcome] = []
    closed = False
    try:
        writer.write(data)
        async with asyncio.timeout(CALL_DEADLINE_S):
            while len(outcomes) < expected:
                try:
                    (n,) = _LENGTH.unpack(await reader.readexactly(4))
                    outcomes.append(pb.TaskOutcome.FromString(await reader.readexactly(n)))
                except asyncio.IncompleteReadError:
                    closed = True
                    break
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return outcomes, closed


def _readable(raw: bytes) -> bool:
    try:
        pb.Task.FromString(raw)
    except Exception:
        return False
    return True


@FUZZ
@given(
    frames=st.lists(
        tasks.map(lambda t: t.SerializeToString()) | st.binary(max_size=40), min_size=1, max_size=4
    ),
    tail=st.sampled_from([b"", b"\x05\x00", OVER_LIMIT]),
)
def test_replica_hop(servers: Servers, frames: list[bytes], tail: bytes) -> None:
    """The replica's local hop (``shoal.rpc.hop``, the data plane from its own machine's
    scheduler) with any frames: tasks, arbitrary bytes, a frame cut short, a length over
    the limit. Frames that all read as tasks get an outcome each, never INTERNAL; otherwise
    the replica closes the connection. Either way a new connection is served and the replica
    keeps running."""
    replica = servers.replica
    data = b"".join(_LENGTH.pack(len(f)) + f for f in frames) + tail
    readable = all(_readable(f) for f in frames)
    outcomes, closed = servers.run(hop_outcomes(replica.hop.path, data, len(frames)))
    if tail == OVER_LIMIT:
        # Not a scheduler speaking: the connection ends (what was read with it may go
        # unanswered; a scheduler's waiting requests fail at once and are retried).
        event("over the limit")
        assert closed
    elif readable:
        assert len(outcomes) == len(frames), (frames, closed)
        assert sorted(o.tag for o in outcomes) == sorted(pb.Task.FromString(f).tag for f in frames)
        for o in outcomes:
            event(o.error_code or "answered")
            assert o.error_code not in ("INTERNAL", "UNKNOWN"), o.error_message
    else:
        event("closed")
        assert closed
    task = pb.Task(request_id="after", tag=7, inputs=codec.encode({"x": np.ones((1, 4), np.float32)}))
    [after], _ = servers.run(
        hop_outcomes(replica.hop.path, _LENGTH.pack(task.ByteSize()) + task.SerializeToString(), 1)
    )
    assert (after.tag, after.error_code) == (7, ""), after.error_message
    replica.assert_running()

"""Fuzzing every gRPC method a client can call: the head's ``Head`` service, the scheduler's
native ``Scheduler`` service and the Open Inference Protocol's ``GRPCInferenceService``.

Each request is built from the method's own protobuf descriptor (every field, nested
messages and maps included, any value its type allows), sent to the real servicers (a
``HeadNode`` on a ``MemoryStore`` with fake schedulers; a ``SchedulerNode`` with fake
replicas, a fake head link and a fake launcher) through a real ``grpc.aio`` server on a
loopback port of this process. Whatever is sent, the status is never UNKNOWN or INTERNAL
(an exception the servicer did not map), and the next call on the same channel is served.
Streaming calls get a short deadline: DEADLINE_EXCEEDED from a stream that stays open is
an answer.

``SHOAL_FUZZ_EXAMPLES`` sets the examples per method (see docs/security.md).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message_factory import GetMessageClass
from hypothesis import given
from hypothesis import strategies as st

from shoal.config import Settings
from shoal.core.spec import parse_spec
from shoal.head.node import HeadNode
from shoal.proto import grpc_service_pb2 as oip
from shoal.proto import grpc_service_pb2_grpc as oipg
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.head_service import HeadService
from shoal.rpc.inference_service import InferenceService
from shoal.rpc.scheduler_service import SchedulerService
from shoal.rpc.server import bind, new_server
from shoal.scheduler.node import SchedulerNode
from shoal.scheduler.router import Router
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeHeadLink, FakeLauncher, FakeReplicas, FakeSchedulers
from tests.unit.fuzzing import fuzz_settings

pytestmark = pytest.mark.timeout(300)

FUZZ = fuzz_settings(25)
STREAM_DEADLINE_S = 0.5
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


# ---------------------------------------------------------------- the servers


@dataclass
class Servers:
    loop: asyncio.AbstractEventLoop
    head: grpc.aio.Channel
    scheduler: grpc.aio.Channel

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    loop = asyncio.new_event_loop()
    config = Settings(control_rate_limit=0, max_message_mb=1, max_tensor_elements=10_000)

    async def setup() -> tuple[Servers, list[Any]]:
        node = HeadNode(config, MemoryStore(), FakeSchedulers())
        await node.tokens.load()
        await node.apply(parse_spec({"name": "echo", "backend": "python", "model": "m:M"}))
        head_server = new_server(config)
        pbg.add_HeadServicer_to_server(HeadService(node), head_server)
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
        sched_port = bind(sched_server, "127.0.0.1", 0)
        await sched_server.start()
        servers = Servers(
            loop,
            grpc.aio.insecure_channel(f"127.0.0.1:{head_port}"),
            grpc.aio.insecure_channel(f"127.0.0.1:{sched_port}"),
        )
        return servers, [head_server, sched_server, node, router, sched]

    s, owned = loop.run_until_complete(setup())
    yield s
    head_server, sched_server, node, router, sched = owned
    loop.run_until_complete(s.head.close(None))
    loop.run_until_complete(s.scheduler.close(None))
    loop.run_until_complete(head_server.stop(None))
    loop.run_until_complete(sched_server.stop(None))
    loop.run_until_complete(sched.aclose())
    loop.run_until_complete(router.aclose())
    loop.run_until_complete(node.aclose())
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
    stream: AsyncIterable[Any]
    if not method.client_streaming:
        stream = channel.unary_stream(path, None, out)(
            messages[0].SerializeToString(), timeout=STREAM_DEADLINE_S
        )
    else:
        stream = channel.stream_stream(path, None, out)(
            iter([m.SerializeToString() for m in messages]), timeout=STREAM_DEADLINE_S
        )
    async for _ in stream:
        pass


def check(
    servers: Servers, channel: grpc.aio.Channel, service: str, method: MethodDescriptor, docs: list[Any]
) -> None:
    messages = [m for m in (build(method.input_type, d) for d in docs) if m is not None]
    if not messages:
        return
    try:
        servers.run(call(channel, service, method, messages))
    except grpc.aio.AioRpcError as err:
        assert err.code() not in SERVER_FAULTS, (method.full_name, messages[:2], err.code(), err.details())
    # The next call on the same channel is served (the call is made on the loop: grpc.aio
    # looks the loop up when a call is created).
    servers.run(follow_up(servers, channel))


async def follow_up(servers: Servers, channel: grpc.aio.Channel) -> None:
    if channel is servers.head:
        await channel.unary_unary("/shoal.v1.Head/GetStatus", None, None)(
            pb.Empty().SerializeToString(), timeout=CALL_DEADLINE_S
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


def _requests(method: MethodDescriptor) -> st.SearchStrategy[list[dict[str, Any]]]:
    size = 3 if method.client_streaming else 1
    return st.lists(message_docs(method.input_type), min_size=1, max_size=size)


@pytest.mark.parametrize("method", HEAD, ids=[m.name for m in HEAD])
def test_head_methods(servers: Servers, method: MethodDescriptor) -> None:
    @FUZZ
    @given(docs=_requests(method))
    def run(docs: list[dict[str, Any]]) -> None:
        check(servers, servers.head, method.containing_service.full_name, method, docs)

    run()


@pytest.mark.parametrize("method", SCHEDULER, ids=[m.name for m in SCHEDULER])
def test_scheduler_methods(servers: Servers, method: MethodDescriptor) -> None:
    @FUZZ
    @given(docs=_requests(method))
    def run(docs: list[dict[str, Any]]) -> None:
        check(servers, servers.scheduler, method.containing_service.full_name, method, docs)

    run()


@pytest.mark.parametrize("method", INFERENCE, ids=[m.name for m in INFERENCE])
def test_inference_methods(servers: Servers, method: MethodDescriptor) -> None:
    @FUZZ
    @given(docs=_requests(method))
    def run(docs: list[dict[str, Any]]) -> None:
        check(servers, servers.scheduler, method.containing_service.full_name, method, docs)

    run()

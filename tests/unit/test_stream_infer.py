"""``ModelStreamInfer`` through a real gRPC server (in this process, on port 0): a stream
that sends a message that does not decode ends with INVALID_ARGUMENT, every time, and a
client that cancels its stream leaves no error in the server's log."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import grpc.aio
import numpy as np
import pytest

from shoal.config import Settings
from shoal.core import payload
from shoal.core.spec import parse_spec
from shoal.proto import grpc_service_pb2 as oip
from shoal.proto import grpc_service_pb2_grpc as oipg
from shoal.rpc.inference_service import InferenceService
from shoal.rpc.server import bind, new_server
from shoal.scheduler.node import SchedulerNode
from shoal.scheduler.router import Router
from shoal.testing.fakes import FakeReplicas
from shoal.types import HeadLink

pytestmark = pytest.mark.timeout(60)

TYPED = [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
# Field 1 (model_name) holding bytes that are not UTF-8: the message does not decode.
UNDECODABLE = b"\x0a\x03\xff\xfe\xfd"


def _good(i: int) -> bytes:
    t = payload.from_array("x", np.arange(4, dtype=np.float32).reshape(1, 4))
    request = oip.ModelInferRequest(model_name="echo", id=str(i))
    request.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
    request.raw_input_contents.append(t.data)
    return request.SerializeToString()


async def _serve(delay_s: float) -> AsyncIterator[str]:
    settings = Settings()
    fakes = FakeReplicas(delay_s=delay_s)
    router = Router("s1", settings, fakes, policy="round_robin")
    node = SchedulerNode(settings, "s1", cast(HeadLink, None), fakes, router=router)
    node.registered.set()
    doc = {"name": "echo", "backend": "python", "model": "m:M", "inputs": TYPED, "outputs": TYPED}
    router.add("a", parse_spec(doc), "a:9000", "s1")
    server = new_server(settings)
    oipg.add_GRPCInferenceServiceServicer_to_server(
        InferenceService(node.dataplane, node.inference_auth, settings), server
    )
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
        await router.aclose()


@pytest.fixture
async def address() -> AsyncIterator[str]:
    async for a in _serve(delay_s=0.0):
        yield a


@pytest.fixture
async def slow_address() -> AsyncIterator[str]:
    async for a in _serve(delay_s=0.05):
        yield a


async def test_a_stream_with_a_message_that_does_not_decode_ends_invalid_argument(address: str) -> None:
    """Before, the read's failure cancelled the handler wherever it was, also inside gRPC's
    write of an answer: against a busy cluster, 2 of 30 such streams stayed open for ever,
    neither answering nor failing (a deadline ends them here: DEADLINE_EXCEEDED). That
    timing did not come back on a quiet machine; this holds the outcome every time.

    A blocking client, in threads: grpc.aio's client, when the server ends a stream while
    it still writes, now and then reads INTERNAL "Internal error from Core" instead of the
    status (its own write failing), whatever the server does."""
    await _twenty_answers_then_invalid_argument(address)


async def test_requests_before_a_message_that_does_not_decode_are_answered_first(slow_address: str) -> None:
    """The same, with requests still running when the bad message comes: before, a request
    sent just before it lost its answer one run in two (the read's failure cancelled them)."""
    await _twenty_answers_then_invalid_argument(slow_address)


async def _twenty_answers_then_invalid_argument(address: str) -> None:
    requests = [_good(i) for i in range(20)] + [UNDECODABLE] + [_good(i) for i in range(5)]

    def one(channel: grpc.Channel) -> tuple[grpc.StatusCode, str, int]:
        call = channel.stream_stream(STREAM, None, None)(iter(requests), timeout=10)
        answered = 0
        try:
            for raw in call:
                reply = oip.ModelStreamInferResponse.FromString(raw)
                answered += not reply.error_message
        except grpc.RpcError as err:
            return err.code(), err.details() or "", answered
        return grpc.StatusCode.OK, "", answered

    with grpc.insecure_channel(address) as channel:
        for _ in range(3):
            outcomes = await asyncio.gather(*(asyncio.to_thread(one, channel) for _ in range(30)))
            assert {code for code, _, _ in outcomes} == {grpc.StatusCode.INVALID_ARGUMENT}, outcomes
            assert all("does not decode" in details for _, details, _ in outcomes)
            # The twenty requests before the bad message are answered before the stream ends.
            assert {answered for _, _, answered in outcomes} == {20}, outcomes


async def test_a_client_that_cancels_its_stream_leaves_no_error_in_the_log(
    slow_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: each cancelled stream logged 'Task exception was never retrieved' at ERROR
    with a BaseExceptionGroup of GeneratorExit."""
    caplog.set_level(logging.WARNING)

    async def requests() -> AsyncIterator[bytes]:
        for i in range(200):
            yield _good(i)

    async with grpc.aio.insecure_channel(slow_address) as channel:
        for _ in range(10):
            call: Any = channel.stream_stream(STREAM, None, None)(requests(), timeout=20)
            for _ in range(3):
                reply = oip.ModelStreamInferResponse.FromString(await call.read())
                assert not reply.error_message
            call.cancel()
        # The server has seen every cancel, and the next stream is served.
        call = channel.stream_stream(STREAM, None, None)(iter([_good(1)]), timeout=20)
        replies = [oip.ModelStreamInferResponse.FromString(r) async for r in call]
        assert [r.infer_response.id for r in replies] == ["1"]
    await asyncio.sleep(0.2)
    gc.collect()  # "never retrieved" is logged when the task is collected
    await asyncio.sleep(0)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]

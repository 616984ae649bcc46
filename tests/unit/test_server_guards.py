"""shoal's gRPC servers apply their guards (auth rules, the decode guard) to each method
once, when it is registered, not through interceptors on every call: the same answers."""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio
import pytest

from shoal.config import Settings
from shoal.rpc.auth import DENY, AuthInterceptor
from shoal.rpc.server import GuardedServer, _GuardedHandlers, bind, new_server

ECHO = "/test.Echo/Say"


def _echo_handlers() -> grpc.GenericRpcHandler[Any, Any]:
    async def say(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return request

    def strict(raw: bytes) -> bytes:
        from google.protobuf.message import DecodeError

        if raw.startswith(b"\xff"):
            raise DecodeError("not a message")
        return raw

    handler = grpc.unary_unary_rpc_method_handler(say, request_deserializer=strict)
    return grpc.method_handlers_generic_handler("test.Echo", {"Say": handler, "Secret": handler})


async def test_guards_answer_as_interceptors_do() -> None:
    server = new_server(Settings(), [AuthInterceptor({"/test.Echo/Secret": DENY}, tls=False)])
    assert isinstance(server, GuardedServer)  # shoal's own interceptors: wrapped once
    server.add_generic_rpc_handlers((_echo_handlers(),))
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            say = channel.unary_unary(ECHO, None, None)  # bytes in, bytes out
            assert await say(b"hello", timeout=5) == b"hello"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await say(b"\xffgarbage", timeout=5)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "does not decode" in (refused.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await channel.unary_unary("/test.Echo/Secret", None, None)(b"x", timeout=5)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await channel.unary_unary("/test.Echo/Nothing", None, None)(b"x", timeout=5)
            assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0)


def test_a_handler_that_answers_any_name_keeps_a_bounded_number_wrapped() -> None:
    """Method names are the client's: a generic handler answering every name must not make
    the server keep one wrapper per name it was ever called with."""

    class AnyName(grpc.GenericRpcHandler):  # type: ignore[type-arg]
        handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)

        def service(self, details: grpc.HandlerCallDetails) -> Any:
            return self.handler

    class Details:
        def __init__(self, method: str) -> None:
            self.method = method

    wrapped_for: list[str] = []

    def wrap(method: str, handler: Any) -> Any:
        wrapped_for.append(method)
        return handler

    guarded = _GuardedHandlers(AnyName(), wrap)
    for i in range(2000):
        assert guarded.service(Details(f"/x/M{i}")) is AnyName.handler  # type: ignore[arg-type]
    assert len(guarded._wrapped) <= 256
    guarded.service(Details("/x/M0"))  # type: ignore[arg-type]
    assert wrapped_for.count("/x/M0") == 1  # kept: wrapped once


async def test_generated_services_are_served_through_the_one_lookup() -> None:
    """Generated code registers each method by name (add_registered_method_handlers);
    the server keeps them itself, guarded, and answers them as grpc.aio would."""
    from shoal.proto import grpc_service_pb2 as oip
    from shoal.proto import grpc_service_pb2_grpc as oipg

    class Live(oipg.GRPCInferenceServiceServicer):
        async def ServerLive(self, request: Any, context: Any) -> oip.ServerLiveResponse:
            return oip.ServerLiveResponse(live=True)

    server = new_server(Settings())
    # The generated stub marks every method abstract; the generated class answers the ones
    # not overridden with UNIMPLEMENTED, which this test relies on (ServerReady).
    oipg.add_GRPCInferenceServiceServicer_to_server(Live(), server)  # type: ignore[abstract]
    assert "/inference.GRPCInferenceService/ServerLive" in server._methods  # type: ignore[attr-defined]
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = oipg.GRPCInferenceServiceStub(channel)
            assert (await stub.ServerLive(oip.ServerLiveRequest(), timeout=5)).live
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", None, None)(
                    b"\xff\xff", timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as unimplemented:
                await stub.ServerReady(oip.ServerReadyRequest(), timeout=5)
            assert unimplemented.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0)

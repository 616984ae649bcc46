"""The gRPC floor on grpclib (pure-Python HTTP/2 on asyncio) instead of grpc.aio: model
``noop`` only, answering as ``grpc_echo.py`` does. For judging whether another gRPC
server library would serve the ingress for less CPU a call. grpclib is no dependency of
shoal; install it beside the checkout to run this::

    .venv/bin/pip install --target /tmp/grpclib grpclib==0.4.8
    PYTHONPATH=/tmp/grpclib:. .venv/bin/python bench/floors/grpclib_echo.py --port 8001

and load it as the floor is loaded (perf_analyzer ``-m noop --shape x:1,16 -i grpc``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import uvloop
from grpclib.const import Cardinality, Handler
from grpclib.server import Server, Stream

from shoal.proto import grpc_service_pb2 as pb
from shoal.proto import model_config_pb2 as mc

SERVICE = "/inference.GRPCInferenceService/"
SHAPE = [1, 16]


async def infer(stream: Stream[Any, Any]) -> None:
    request = await stream.recv_message()
    reply = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
    for t in request.inputs:
        reply.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
    reply.raw_output_contents.extend(request.raw_input_contents)
    await stream.send_message(reply)


def answer(make: Callable[[Any], Any]) -> Callable[[Stream[Any, Any]], Any]:
    async def handle(stream: Stream[Any, Any]) -> None:
        await stream.send_message(make(await stream.recv_message()))

    return handle


def tensor(kind: Any) -> Any:
    return kind(name="x", datatype="FP32", shape=SHAPE)


class Echo:
    def __mapping__(self) -> dict[str, Handler]:
        config = mc.ModelConfig(
            name="noop",
            platform="python",
            input=[mc.ModelInput(name="x", data_type=mc.TYPE_FP32, dims=SHAPE)],
            output=[mc.ModelOutput(name="x", data_type=mc.TYPE_FP32, dims=SHAPE)],
        )
        meta = pb.ModelMetadataResponse.TensorMetadata
        unary: dict[str, tuple[Any, Any, Any]] = {
            "ModelInfer": (infer, pb.ModelInferRequest, pb.ModelInferResponse),
            "ModelMetadata": (
                answer(
                    lambda r: pb.ModelMetadataResponse(
                        name=r.name,
                        versions=["1"],
                        platform="python",
                        inputs=[tensor(meta)],
                        outputs=[tensor(meta)],
                    )
                ),
                pb.ModelMetadataRequest,
                pb.ModelMetadataResponse,
            ),
            "ModelConfig": (
                answer(lambda r: pb.ModelConfigResponse(config=config)),
                pb.ModelConfigRequest,
                pb.ModelConfigResponse,
            ),
            "ServerMetadata": (
                answer(lambda r: pb.ServerMetadataResponse(name="grpclib-floor", version="1")),
                pb.ServerMetadataRequest,
                pb.ServerMetadataResponse,
            ),
            "ServerLive": (
                answer(lambda r: pb.ServerLiveResponse(live=True)),
                pb.ServerLiveRequest,
                pb.ServerLiveResponse,
            ),
            "ServerReady": (
                answer(lambda r: pb.ServerReadyResponse(ready=True)),
                pb.ServerReadyRequest,
                pb.ServerReadyResponse,
            ),
            "ModelReady": (
                answer(lambda r: pb.ModelReadyResponse(ready=r.name == "noop")),
                pb.ModelReadyRequest,
                pb.ModelReadyResponse,
            ),
        }
        return {
            SERVICE + name: Handler(func, Cardinality.UNARY_UNARY, request, reply)
            for name, (func, request, reply) in unary.items()
        }


async def serve(host: str, port: int) -> None:
    server = Server([Echo()])
    await server.start(host, port)
    print(f"grpclib floor listening on {host}:{port}", flush=True)
    await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()

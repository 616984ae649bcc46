"""The gRPC floor: a bare ``grpc.aio`` server answering Open Inference Protocol ModelInfer.

    python bench/floors/grpc_echo.py --port 8001 [--sklearn digits.joblib]

Model ``noop`` echoes its input (FP32 [1,16]); ``sklearn``, when given a joblib file, runs
``predict`` on FP32 [1,64] and answers ``label`` (INT64). One process, one event loop, no
routing, no queue: what any Python OIP server pays at least. ModelMetadata and ModelConfig
are there because perf_analyzer asks for them.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc
import numpy as np

from shoal.proto import grpc_service_pb2 as pb
from shoal.proto import grpc_service_pb2_grpc as pbg
from shoal.proto import model_config_pb2 as mc

MODELS = {"noop": ("x", 16, "x", "FP32"), "sklearn": ("input", 64, "label", "INT64")}


class Echo(pbg.GRPCInferenceServiceServicer):
    def __init__(self, estimator: Any) -> None:
        self.estimator = estimator
        self.names = [m for m in MODELS if m != "sklearn" or estimator is not None]

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name in self.names)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="grpc-floor", version="1", extensions=[])

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        if request.name not in self.names:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name}")
        i, n, o, dt = MODELS[request.name]
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=["1"],
            platform="python",
            inputs=[pb.ModelMetadataResponse.TensorMetadata(name=i, datatype="FP32", shape=[1, n])],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(name=o, datatype=dt, shape=[1, n] if o == i else [1])
            ],
        )

    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        if request.name not in self.names:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name}")
        i, n, o, _ = MODELS[request.name]
        config = mc.ModelConfig(
            name=request.name,
            platform="python",
            max_batch_size=0,
            input=[mc.ModelInput(name=i, data_type=mc.TYPE_FP32, dims=[1, n])],
            output=[
                mc.ModelOutput(
                    name=o,
                    data_type=mc.TYPE_FP32 if o == i else mc.TYPE_INT64,
                    dims=[1, n] if o == i else [1],
                )
            ],
        )
        return pb.ModelConfigResponse(config=config)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        reply = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        if request.model_name == "noop":
            for t in request.inputs:
                reply.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            reply.raw_output_contents.extend(request.raw_input_contents)
        elif request.model_name == "sklearn" and self.estimator is not None:
            shape = list(request.inputs[0].shape)
            x = np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(shape)
            label = np.asarray(self.estimator.predict(x), dtype="<i8")
            reply.outputs.add(name="label", datatype="INT64", shape=label.shape)
            reply.raw_output_contents.append(label.tobytes())
        else:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model_name}")
        return reply


async def serve(host: str, port: int, estimator: Any) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    pbg.add_GRPCInferenceServiceServicer_to_server(Echo(estimator), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"grpc floor listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--sklearn", help="joblib file of a fitted estimator, served as model 'sklearn'")
    args = parser.parse_args()
    estimator = None
    if args.sklearn:
        import joblib

        estimator = joblib.load(args.sklearn)
    asyncio.run(serve(args.host, args.port, estimator))


if __name__ == "__main__":
    main()

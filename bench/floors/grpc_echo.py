"""The gRPC floor: a bare ``grpc.aio`` server answering Open Inference Protocol ModelInfer.

    python bench/floors/grpc_echo.py --port 8001 [--sklearn digits.joblib] [--processes N]

Model ``noop`` echoes its input (FP32 [1,16]); ``sklearn``, when given a joblib file, runs
``predict`` on FP32 [1,64] and answers ``label`` (INT64). One process, one event loop, no
routing, no queue: what any Python OIP server pays at least. ModelMetadata and ModelConfig
are there because perf_analyzer asks for them.

With ``--processes N`` (N > 1) the same server runs in N processes sharing the port, laid
out as a shoal scheduler's N ingress processes are: each on a CPU of its own (when there
are N CPUs) and new connections dealt to them in turn (``shoal.core.reuseport``). That is
the most any ingress spread over N processes could serve on this machine: the same gRPC
work per call and nothing else, no door, no routing, no replica behind it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any

import grpc
import numpy as np

from shoal.core import affinity, reuseport
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


async def serve(host: str, port: int, estimator: Any, index: int, processes: int, argv: list[str]) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    pbg.add_GRPCInferenceServiceServicer_to_server(Echo(estimator), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    others = []
    if index == 0 and processes > 1:
        # The others join the port's SO_REUSEPORT group after this one (gRPC sets the option).
        for i in range(1, processes):
            child = await asyncio.create_subprocess_exec(
                sys.executable, *argv, "--port", str(bound), "--index", str(i), stdout=asyncio.subprocess.PIPE
            )
            assert child.stdout is not None
            if not await child.stdout.readline():
                raise SystemExit(f"floor process {i} exited before it listened")
            others.append(child)
        why = reuseport.deal_port_in_turn(bound, processes)
        print(f"connections: {'in turn' if why is None else why}", flush=True)
    if processes > 1:
        # Every thread the server started, as shoal pins its ingress processes; after the
        # others started, which would have inherited this CPU.
        affinity.pin_ingress(index, processes)
    print(f"grpc floor listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    if index > 0:
        asyncio.get_running_loop().create_task(_until_orphaned(stop))
    await stop.wait()
    for child in others:
        child.terminate()
    await server.stop(0)
    for child in others:
        await child.wait()


async def _until_orphaned(stop: asyncio.Event) -> None:
    """A process after the first stops once the first is gone, even killed (-9)."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(0.5)
    stop.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--sklearn", help="joblib file of a fitted estimator, served as model 'sklearn'")
    parser.add_argument("--processes", type=int, default=1, help="processes sharing the port (see above)")
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.processes <= 64:
        parser.error("--processes: from 1 to 64")
    # What a process after the first is started with: the same, less the port and index.
    argv = [__file__, "--host", args.host, "--processes", str(args.processes)]
    if args.sklearn:
        argv += ["--sklearn", args.sklearn]
    estimator = None
    if args.sklearn:
        import joblib

        estimator = joblib.load(args.sklearn)
    asyncio.run(serve(args.host, args.port, estimator, args.index, args.processes, argv))


if __name__ == "__main__":
    main()

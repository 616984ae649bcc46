"""Large tensors through shoal's gRPC ingress against the grpc.aio floor: c=1 latency of an
FP32 echo of 64 KiB to 16 MiB, the two servers in turns (A B A B), median of each.

shoal serves the bench's ``noop`` deployment (``echo:Echo``, inputs ``x`` FP32 [-1, 16]);
the floor (``floors/grpc_echo.py``) echoes the request's raw contents in its handler. What
shoal adds to the floor's one gRPC leg is the local hop to the replica and back and every
copy of the bytes on the way. Not part of ``make test``::

    .venv/bin/python bench/large_tensors.py [--mib 0.0625,1,4,16] [--requests 20]

To compare two versions of shoal, run it once per version with ``PYTHONPATH`` naming the
other checkout (the servers are started as child processes and import shoal from there).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import systems
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg

_OPTIONS = [("grpc.max_send_message_length", 200 << 20), ("grpc.max_receive_message_length", 200 << 20)]


def request(mib: float) -> pb.ModelInferRequest:
    rows = max(1, int(mib * 2**20 / 64))  # 16 FP32 values a row
    req = pb.ModelInferRequest(model_name="noop")
    req.inputs.add(name="x", datatype="FP32", shape=(rows, 16))
    req.raw_input_contents.append(np.ones((rows, 16), np.float32).tobytes())
    return req


async def measure(addresses: dict[str, str], sizes: list[float], requests: int) -> None:
    channels = {k: grpc.aio.insecure_channel(a, options=_OPTIONS) for k, a in addresses.items()}
    stubs = {k: pbg.GRPCInferenceServiceStub(c) for k, c in channels.items()}
    try:
        print("| MiB | floor p50 ms | shoal p50 ms | shoal / floor |\n|---|---|---|---|")
        for mib in sizes:
            req = request(mib)
            for stub in stubs.values():  # warm up: connections, the replica's first calls
                for _ in range(3):
                    await stub.ModelInfer(req, timeout=120)
            took: dict[str, list[float]] = {k: [] for k in stubs}
            for _ in range(requests):
                for k, stub in stubs.items():
                    started = time.perf_counter()
                    reply = await stub.ModelInfer(req, timeout=120)
                    took[k].append(time.perf_counter() - started)
                    assert reply.raw_output_contents[0] == req.raw_input_contents[0]
            floor, shoal = (statistics.median(took[k]) * 1000 for k in ("floor", "shoal"))
            print(f"| {mib:g} | {floor:.2f} | {shoal:.2f} | {shoal / floor:.2f}x |", flush=True)
    finally:
        for channel in channels.values():
            await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", default="0.0625,1,4,16", help="tensor sizes, MiB, comma-separated")
    parser.add_argument("--requests", type=int, default=20, help="requests per size and server")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shoal-large-"))
    runs = {
        "floor": systems.SYSTEMS["floor-grpc"].start(work / "floor", only_noop=True),
        "shoal": systems.SYSTEMS["shoal"].start(work / "shoal", only_noop=True),
    }
    try:
        sizes = [float(m) for m in args.mib.split(",") if m]
        asyncio.run(measure({k: r.grpc for k, r in runs.items()}, sizes, args.requests))
    finally:
        for run in runs.values():
            systems.stop(run)


if __name__ == "__main__":
    main()

"""The scheduler -> replica hop on one machine: gRPC over TCP loopback, gRPC over a Unix
domain socket, and shoal's local hop (``shoal.rpc.hop``: protobuf frames over a Unix socket).

One grpc.aio server answers a stream-stream echo (the shape of ``PushTasks``: batches of
tasks with 64-byte tensors) on both transports, and a ``HopServer`` echoes the same tasks;
one process drives each closed-loop at concurrency 1 and 32, in turns (A B A B), and
prints req/s and the ratios to gRPC over TCP. Not part of ``make test``::

    .venv/bin/python bench/local_hop.py [--seconds 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio

from shoal.proto import shoal_pb2 as pb
from shoal.rpc.hop import HopClient, HopServer

_METHOD = "/bench.Hop/Echo"


async def _echo(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for raw in requests:
        batch = pb.TaskBatch.FromString(raw)
        out = pb.OutcomeBatch(
            outcomes=[
                pb.TaskOutcome(tag=t.tag, request_id=t.request_id, outputs=t.inputs) for t in batch.tasks
            ]
        )
        yield out.SerializeToString()


async def _drive(address: str, concurrency: int, seconds: float) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(_METHOD)()
        tensor = pb.Tensor(name="x", datatype="FP32", shape=[1, 16], data=bytes(64))
        pending: dict[int, asyncio.Future[None]] = {}
        done = 0
        loop = asyncio.get_running_loop()

        async def reader() -> None:
            async for raw in call:
                for o in pb.OutcomeBatch.FromString(raw).outcomes:
                    pending.pop(o.tag).set_result(None)

        read = asyncio.create_task(reader())
        tags = iter(range(1, 1 << 62))
        end = loop.time() + seconds
        writing = asyncio.Lock()  # one write at a time on a stream, as TaskStream's writer

        async def client() -> None:
            nonlocal done
            while loop.time() < end:
                tag = next(tags)
                fut = loop.create_future()
                pending[tag] = fut
                async with writing:
                    await call.write(
                        pb.TaskBatch(tasks=[pb.Task(tag=tag, inputs=[tensor])]).SerializeToString()
                    )
                await fut
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        await call.done_writing()
        read.cancel()
        return done / elapsed


async def _echo_task(task: pb.Task) -> pb.TaskOutcome:
    return pb.TaskOutcome(tag=task.tag, request_id=task.request_id, outputs=task.inputs)


async def _drive_hop(path: Path, concurrency: int, seconds: float) -> float:
    client = HopClient(path, "hop", 1 << 26)
    tensor = pb.Tensor(name="x", datatype="FP32", shape=[1, 16], data=bytes(64))
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    done = 0

    async def one() -> None:
        nonlocal done
        while loop.time() < end:
            await client.push(pb.Task(inputs=[tensor]), 5.0)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await client.close()
    return done / elapsed


async def main(seconds: float, rounds: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="shoal-hop-"))
    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(_echo)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Hop", {"Echo": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    uds = f"unix:{folder / 'hop.sock'}"
    server.add_insecure_port(uds)
    await server.start()
    hop = HopServer(folder / "hop-raw.sock", _echo_task, 1 << 26)
    await hop.start()
    tcp = f"127.0.0.1:{port}"
    try:
        for c in (1, 32):
            results: dict[str, list[float]] = {"tcp": [], "uds": [], "hop": []}
            for _ in range(rounds):
                for name, address in (("tcp", tcp), ("uds", uds)):
                    results[name].append(await _drive(address, c, seconds))
                results["hop"].append(await _drive_hop(hop.path, c, seconds))
            t, u, h = (statistics.median(results[k]) for k in ("tcp", "uds", "hop"))
            print(
                f"c={c}: gRPC tcp {t:,.0f} req/s, gRPC uds {u:,.0f} req/s ({u / t:.2f}x), "
                f"hop {h:,.0f} req/s ({h / t:.2f}x)"
            )
    finally:
        await hop.stop()
        await server.stop(None)


if __name__ == "__main__":
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--seconds", type=float, default=2.0)
    args.add_argument("--rounds", type=int, default=2)
    ns = args.parse_args()
    asyncio.run(main(ns.seconds, ns.rounds))

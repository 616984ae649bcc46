"""Many clients against a small queue: how fast refusals come back, and what still gets through.

One replica of ``examples/echo.py`` that takes ``--delay-ms`` per request, one at a time
(``max_ongoing_requests: 1``), at most ``--queue`` waiting: at most 1000/delay requests a
second can succeed. ``--clients`` closed-loop clients (each sends its next request as soon
as it has an answer) flood it for ``--duration`` seconds over OIP REST (one keep-alive
connection per client, raw HTTP/1.1 so the load generator stays cheap) and then over OIP
gRPC (one channel, ``ModelInfer``). The table: refusals (503 / RESOURCE_EXHAUSTED) p50 and
p99, successes p50 and p99, and goodput (successes per second), then the ratio of the two
doors' goodputs.

    .venv/bin/python bench/overload.py                    # 256 clients, queue 4, 20 ms
    .venv/bin/python bench/overload.py --clients 64 --duration 5

Runs a real cluster (``shoal.testing.ProcessCluster``) on free loopback ports and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from shoal.proto import grpc_service_pb2 as oip
from shoal.proto import grpc_service_pb2_grpc as oipg
from shoal.testing.cluster import ProcessCluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tools  # bench/tools.py: the wrk runner

ROOT = Path(__file__).resolve().parent.parent
BODY = json.dumps(
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
).encode()
TENSORS = [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]


@dataclass
class Tally:
    ok: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)
    other: dict[str, int] = field(default_factory=dict)

    def row(self, door: str, duration: float) -> str:
        def pct(xs: list[float], q: float) -> str:
            return f"{np.percentile(xs, q) * 1000:.0f}" if xs else "-"

        others = ", ".join(f"{k}: {v}" for k, v in sorted(self.other.items())) or "-"
        return (
            f"| {door} | {len(self.refused)} | {pct(self.refused, 50)} | {pct(self.refused, 99)} "
            f"| {pct(self.refused, 100)} | {len(self.ok)} | {pct(self.ok, 50)} | {pct(self.ok, 99)} "
            f"| {len(self.ok) / duration:.1f} | {others} |"
        )


async def http_client(host: str, port: int, stop: float, tally: Tally) -> None:
    head = (
        f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < stop:
            started = time.monotonic()
            writer.write(head + BODY)
            status_line = await reader.readline()
            length = 0
            close = False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                elif name.lower() == "connection" and "close" in value.lower():
                    close = True
            await reader.readexactly(length)
            took = time.monotonic() - started
            status = status_line.split(b" ")[1].decode() if status_line else "closed"
            if status == "200":
                tally.ok.append(took)
            elif status in ("503", "429"):
                tally.refused.append(took)
            else:
                tally.other[status] = tally.other.get(status, 0) + 1
            if close or not status_line:
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


async def grpc_client(stub: oipg.GRPCInferenceServiceStub, stop: float, tally: Tally) -> None:
    request = oip.ModelInferRequest(model_name="slow")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend([1, 2, 3, 4])
    while time.monotonic() < stop:
        started = time.monotonic()
        try:
            await stub.ModelInfer(request, timeout=60)  # type: ignore[misc]  # grpc.aio stub
            tally.ok.append(time.monotonic() - started)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                tally.refused.append(time.monotonic() - started)
            else:
                tally.other[err.code().name] = tally.other.get(err.code().name, 0) + 1


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--queue", type=int, default=4)
    ap.add_argument("--delay-ms", type=float, default=20.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--only", choices=("http", "wrk", "grpc"), default=None)
    ap.add_argument(
        "--py-spy", metavar="OUT", help="record the scheduler with py-spy (speedscope) during the HTTP run"
    )
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="shoal-overload-"))
    for f in (ROOT / "examples").glob("*.py"):
        shutil.copy(f, root / f.name)
    async with ProcessCluster(root / "cluster") as cluster:
        await cluster.deploy(
            {
                "name": "slow",
                "backend": "python",
                "model": "echo:Echo",
                "base_dir": str(root),
                "options": {"delay_ms": args.delay_ms},
                "resources": {"cpus": 0.1},
                "max_ongoing_requests": 1,
                "max_queued_requests": args.queue,
                "inputs": TENSORS,
                "outputs": TENSORS,
            }
        )
        await cluster.wait_ready("slow", 1)
        print(
            f"{args.clients} closed-loop clients, {args.duration:g} s each door; one replica, "
            f"{args.delay_ms:g} ms per request, max_ongoing_requests 1, max_queued_requests {args.queue}\n"
        )
        print(
            "| door | refused | refused p50 ms | p99 ms | max ms | ok | ok p50 ms | ok p99 ms "
            "| goodput req/s | other |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        goodput: dict[str, float] = {}
        if args.only in (None, "http"):
            host, _, port = cluster.http_address().rpartition(":")
            tally = Tally()
            stop = time.monotonic() + args.duration
            spy = None
            if args.py_spy:
                spy = await asyncio.create_subprocess_exec(
                    str(ROOT / ".venv/bin/py-spy"),
                    "record",
                    "-p",
                    str(cluster.schedulers[0].pid),
                    "-d",
                    str(int(args.duration)),
                    "-f",
                    "speedscope",
                    "-o",
                    args.py_spy,
                    stdout=asyncio.subprocess.DEVNULL,
                )
            await asyncio.gather(*(http_client(host, int(port), stop, tally) for _ in range(args.clients)))
            print(tally.row("OIP REST", args.duration))
            goodput["http"] = len(tally.ok) / args.duration
            if spy is not None:
                await spy.wait()
        if args.only in (None, "wrk") and shutil.which("wrk"):
            # The same flood from wrk (C, one thread): a cheaper load generator, so the server
            # and not the client sets the figures. Its latencies are of every answer (almost
            # all refusals); goodput is its 2xx answers a second.
            point = tools.wrk(
                f"http://{cluster.http_address()}/v2/models/slow/infer",
                BODY,
                args.clients,
                lambda: [],
                duration_s=args.duration,
            )
            refused = point.error_kinds.get("non-2xx", 0)
            ok = point.requests - point.errors
            print(
                f"| OIP REST (wrk, all answers) | {refused} | {point.p50_ms:.0f} | {point.p99_ms:.0f} | - "
                f"| {ok} | - | - | {point.throughput:.1f} | {point.failed or '-'} |"
            )
        if args.only in (None, "grpc"):
            tally = Tally()
            async with grpc.aio.insecure_channel(cluster.scheduler_address()) as channel:
                stub = oipg.GRPCInferenceServiceStub(channel)
                stop = time.monotonic() + args.duration
                await asyncio.gather(*(grpc_client(stub, stop, tally) for _ in range(args.clients)))
            print(tally.row("OIP gRPC", args.duration))
            goodput["grpc"] = len(tally.ok) / args.duration
        if goodput.get("grpc") and "http" in goodput:
            print(f"\nHTTP goodput / gRPC goodput: {goodput['http'] / goodput['grpc']:.2f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())

"""Would a synchronous ingress serve more? A go/no-go probe, not part of ``make test``.

Starts a shoal cluster as ``bench/env_ab.py`` does (noop with batching, two ingress
processes), then two more ingress shapes beside it, each two processes sharing a port, one
pinned on each CPU, that forward OIP ``ModelInfer`` to the same replica over its hop
socket with no door, router or checks (the least any ingress could do):

- ``sync``: gRPC's threaded server; each call's thread writes its task to the hop socket
  and waits on a lock that a reader thread releases with the outcome. No event loop.
- ``aio``: grpc.aio on uvloop and shoal's own ``HopClient``: shoal's shape, less shoal.

Both forwarders' processes are dealt new connections in turn, as shoal's ingress processes
are (``shoal.core.reuseport``); before 2026-12-06 they were dealt by the kernel's hash.
With ``--floors`` two more servers join: the bare grpc.aio floor (``floors/grpc_echo.py``,
one process) and the same floor in two processes laid out as shoal's ingress
(``--processes 2``), the ceiling of the shape. Then one run gives each step from the
floor down to shoal: the shape, the hop and replica (``aio``), and shoal's door.

perf_analyzer noop c=32 loads them in turn, the order reversed each round::

    .venv/bin/python bench/sync_probe.py --rounds 6 [--floors]
"""

from __future__ import annotations

import _thread
import argparse
import asyncio
import glob
import itertools
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import shoal.grpc_defaults  # noqa: E402,F401 - before grpc: the same experiments as shoal

_HEADER = struct.Struct("<I")
# Answered by the shoal cluster's own port: perf_analyzer asks for them once.
PROXIED = ("ServerLive", "ServerReady", "ModelReady", "ModelMetadata", "ModelConfig")


def _metadata_stub(url: str) -> Any:
    import grpc

    from shoal.proto import grpc_service_pb2_grpc as oipg

    return oipg.GRPCInferenceServiceStub(grpc.insecure_channel(url))


class SyncHop:
    """One hop connection shared by every call thread."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.lock = threading.Lock()
        self.pending: dict[int, list[Any]] = {}
        self.tags = itertools.count(1)
        threading.Thread(target=self._read, daemon=True).start()

    def push(self, task: Any) -> Any:
        waiter = _thread.allocate_lock()
        waiter.acquire()
        slot: list[Any] = [waiter, None]
        tag = next(self.tags)
        task.tag = tag
        self.pending[tag] = slot
        data = task.SerializeToString()
        with self.lock:
            self.sock.sendall(_HEADER.pack(len(data)) + data)
        if not waiter.acquire(timeout=30):
            self.pending.pop(tag, None)
            raise TimeoutError
        return slot[1]

    def _read(self) -> None:
        from shoal.proto import shoal_pb2 as pb

        buf = bytearray()
        pending = self.pending
        while True:
            chunk = self.sock.recv(262144)
            if not chunk:
                return
            buf += chunk
            start = 0
            while len(buf) - start >= 4:
                (n,) = _HEADER.unpack_from(buf, start)
                if len(buf) - start - 4 < n:
                    break
                outcome = pb.TaskOutcome.FromString(bytes(buf[start + 4 : start + 4 + n]))
                start += 4 + n
                slot = pending.pop(outcome.tag, None)
                if slot is not None:
                    slot[1] = outcome
                    slot[0].release()
            del buf[:start]


def _server_metadata(oip: Any) -> Any:
    # No extensions, as the floor says: perf_analyzer then asks for no statistics.
    return oip.ServerMetadataResponse(name="probe", version="1", extensions=[])


def _reply(oip: Any, request: Any, outcome: Any) -> Any:
    reply = oip.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
    for t in outcome.outputs:
        reply.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        reply.raw_output_contents.append(t.data)
    return reply


_ids = itertools.count(1)


def _task(pb: Any, request: Any) -> Any:
    # Unique, as the router makes them: the replica keys what runs by request id.
    task = pb.Task(request_id=f"{request.id}~{next(_ids)}", timeout_s=30.0)
    for t, raw in zip(request.inputs, request.raw_input_contents, strict=False):
        task.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape, data=raw)
    return task


def _deal_when_asked(port: int, processes: int) -> None:
    """In a thread: once the parent writes a line (every process has joined the port), deal
    the port's new connections in turn over the ``processes`` sockets, and say how it went."""

    def deal() -> None:
        from shoal.core import reuseport

        if not sys.stdin.readline():
            return
        why = reuseport.deal_port_in_turn(port, processes)
        print(f"dealt: {why or 'in turn'}", flush=True)

    threading.Thread(target=deal, daemon=True).start()


def serve_sync(port: int, sock: str, shoal_url: str, threads: int) -> None:
    import grpc

    from shoal.proto import grpc_service_pb2 as oip
    from shoal.proto import shoal_pb2 as pb

    hop = SyncHop(sock)
    stub = _metadata_stub(shoal_url)

    def infer(request: Any, context: Any) -> Any:
        outcome = hop.push(_task(pb, request))
        if outcome.error_code:
            context.abort(grpc.StatusCode.INTERNAL, outcome.error_message)
        return _reply(oip, request, outcome)

    handlers = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            infer, oip.ModelInferRequest.FromString, oip.ModelInferResponse.SerializeToString
        ),
    }
    handlers["ServerMetadata"] = grpc.unary_unary_rpc_method_handler(
        lambda r, c: _server_metadata(oip),
        oip.ServerMetadataRequest.FromString,
        oip.ServerMetadataResponse.SerializeToString,
    )
    for method in PROXIED:
        call = getattr(stub, method)
        handlers[method] = grpc.unary_unary_rpc_method_handler(
            lambda r, c, call=call: call(r),
            getattr(oip, method + "Request").FromString,
            getattr(oip, method + "Response").SerializeToString,
        )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=[("grpc.so_reuseport", 1)])
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    _deal_when_asked(port, 2)
    print("serving", flush=True)
    server.wait_for_termination()


def serve_aio(port: int, sock: str, shoal_url: str) -> None:
    import grpc
    import uvloop

    from shoal.proto import grpc_service_pb2 as oip
    from shoal.proto import shoal_pb2 as pb
    from shoal.rpc.hop import HopClient

    async def main() -> None:
        hop = HopClient(sock, "probe", 64 << 20)
        channel = grpc.aio.insecure_channel(shoal_url)
        from shoal.proto import grpc_service_pb2_grpc as oipg

        stub = oipg.GRPCInferenceServiceStub(channel)

        async def infer(request: Any, context: Any) -> Any:
            outcome = await hop.push(_task(pb, request), 30.0)
            if outcome.error_code:
                await context.abort(grpc.StatusCode.INTERNAL, outcome.error_message)
            return _reply(oip, request, outcome)

        handlers = {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                infer, oip.ModelInferRequest.FromString, oip.ModelInferResponse.SerializeToString
            ),
        }

        async def server_metadata(request: Any, context: Any) -> Any:
            return _server_metadata(oip)

        handlers["ServerMetadata"] = grpc.unary_unary_rpc_method_handler(
            server_metadata,
            oip.ServerMetadataRequest.FromString,
            oip.ServerMetadataResponse.SerializeToString,
        )
        for method in PROXIED:
            call = getattr(stub, method)

            async def proxy(request: Any, context: Any, call: Any = call) -> Any:
                return await call(request)

            handlers[method] = grpc.unary_unary_rpc_method_handler(
                proxy,
                getattr(oip, method + "Request").FromString,
                getattr(oip, method + "Response").SerializeToString,
            )
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),)
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        _deal_when_asked(port, 2)
        print("serving", flush=True)
        await server.wait_for_termination()

    uvloop.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(shape: str, port: int, sock: str, shoal_url: str, cpu: int, threads: int) -> subprocess.Popen[str]:
    argv = [sys.executable, __file__, "--serve", shape, "--port", str(port), "--sock", sock]
    argv += ["--shoal-url", shoal_url, "--cpu", str(cpu), "--threads", str(threads)]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    if "serving" not in proc.stdout.readline():
        raise SystemExit(f"probe {shape} did not start")
    return proc


def _deal(first: subprocess.Popen[str]) -> str:
    """Ask the first of a shape's processes to deal its port in turn; what it says."""
    assert first.stdin is not None and first.stdout is not None
    first.stdin.write("deal\n")
    first.stdin.flush()
    return first.stdout.readline().strip()


def _floor(processes: int) -> tuple[subprocess.Popen[str], str]:
    argv = [sys.executable, str(BENCH / "floors" / "grpc_echo.py"), "--port", "0"]
    argv += ["--processes", str(processes)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "listening on" in line:
            return proc, line.split("listening on")[1].strip()
    raise SystemExit(f"the floor in {processes} process(es) did not start")


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--rounds", type=int, default=6)
    args.add_argument("-c", "--concurrency", type=int, default=32)
    args.add_argument("--threads", type=int, default=64)
    args.add_argument("--serve", choices=["sync", "aio"])
    args.add_argument("--port", type=int)
    args.add_argument("--sock")
    args.add_argument("--shoal-url")
    args.add_argument("--cpu", type=int)
    args.add_argument("--floors", action="store_true", help="the floor and its two-process shape as well")
    opts = args.parse_args()
    if opts.serve:
        os.sched_setaffinity(0, {opts.cpu})
        if opts.serve == "sync":
            serve_sync(opts.port, opts.sock, opts.shoal_url, opts.threads)
        else:
            serve_aio(opts.port, opts.sock, opts.shoal_url)
        return
    import env_ab

    cluster = env_ab.Cluster({}, 2, "noop", "grpc")
    probes: list[subprocess.Popen[str]] = []
    try:
        socks = glob.glob(str(cluster.work / "state" / "hop" / "*.sock"))
        socks += glob.glob("/tmp/shoal-hop-*/*.sock")
        if len(socks) != 1:
            raise SystemExit(f"expected one replica socket, found {socks}")
        urls = {"shoal": cluster.url}
        for shape in ("sync", "aio"):
            port = _free_port()
            pair = [
                _start(shape, port, socks[0], cluster.url, cpu, opts.threads)
                for cpu in sorted(os.sched_getaffinity(0))[:2]
            ]
            probes += pair
            print(f"{shape}: {_deal(pair[0])}", flush=True)
            urls[shape] = f"127.0.0.1:{port}"
        if opts.floors:
            for name, processes in (("floor", 1), ("split", 2)):
                proc, urls[name] = _floor(processes)
                probes.append(proc)
        names = list(urls)
        for url in urls.values():
            env_ab.load(url, opts.concurrency, "noop", "grpc")  # warm up
        rates: dict[str, list[float]] = {name: [] for name in names}
        for index in range(opts.rounds):
            for name in names if index % 2 == 0 else names[::-1]:
                rate, p50 = env_ab.load(urls[name], opts.concurrency, "noop", "grpc")
                rates[name].append(rate)
                print(f"round {index} {name:>6} {rate:8.0f} req/s  p50 {p50:6.2f} ms", flush=True)
        pairs = [("sync", "shoal"), ("aio", "shoal"), ("sync", "aio")]
        if opts.floors:
            pairs += [("split", "floor"), ("aio", "split"), ("shoal", "split"), ("shoal", "floor")]
        for name, against in pairs:
            ratios = [a / b for a, b in zip(rates[name], rates[against], strict=True)]
            spread = ", ".join(f"{r:.3f}" for r in ratios)
            print(f"{name:>6}: median {statistics.median(ratios):.3f}x {against} ({spread})")
    finally:
        for proc in probes:
            # The floors stop the processes they started on SIGTERM; the forwarders have none.
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        cluster.stop()


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()

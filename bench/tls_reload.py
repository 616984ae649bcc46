"""What taking renewed certificates costs a handshake (``shoal.certwatch``): a gRPC server
with mutual TLS, new connections from client processes as fast as they come, once with the
credentials read at start (``grpc.ssl_server_credentials``, as before) and once with
``shoal.rpc.tls.server_credentials`` (gRPC asks its fetcher before each handshake). Prints
handshakes per second for each, how often the fetcher ran and how often it looked at the
files (``stat``), and the cost of one ``CertWatch.poll`` on its own.

    python bench/tls_reload.py [--seconds 5] [--clients 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

import grpc
import grpc.aio

from shoal import certs, certwatch
from shoal.config import Settings
from shoal.rpc.tls import server_credentials


def _connect(port: int, tls: Path, seconds: float) -> int:
    context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    context.check_hostname = False
    context.load_cert_chain(tls / "client.crt", tls / "client.key")
    done = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with socket.create_connection(("127.0.0.1", port)) as raw, context.wrap_socket(raw):
            done += 1
    return done


def handshakes(port: int, tls: Path, seconds: float, clients: int) -> int:
    """New connections from ``clients`` processes of their own (the server's GIL is its
    own, as in a component) for ``seconds``; how many."""
    with multiprocessing.get_context("spawn").Pool(clients) as pool:
        return sum(pool.starmap(_connect, [(port, tls, seconds)] * clients))


async def serve(
    credentials: grpc.ServerCredentials, tls: Path, seconds: float, clients: int, busy: bool
) -> int:
    server = grpc.aio.server()
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    spin = asyncio.create_task(_spin()) if busy else None
    try:
        return await asyncio.to_thread(handshakes, port, tls, seconds, clients)
    finally:
        if spin is not None:
            spin.cancel()
        await server.stop(0)


async def _spin() -> None:
    """Python work on the event loop, as a loaded component has: the fetcher, called on
    gRPC's thread, waits for the GIL."""
    while True:
        end = time.perf_counter() + 0.001
        while time.perf_counter() < end:
            pass
        await asyncio.sleep(0)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", action="store_true", help="keep the server's event loop busy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tls = Path(folder)
        certs.init(tls)
        ca, cert, key = certs.read(tls, "head")
        watch = certwatch.watch(tls, "head")
        poll = watch.poll
        polls = [0]

        def counted() -> certwatch.Material:
            polls[0] += 1
            return poll()

        watch.poll = counted  # type: ignore[method-assign]
        static_n, dynamic_n, looks = 0, 0, 0
        for _ in range(args.rounds):  # alternated, so that drift on a shared machine hits both
            static = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=True
            )
            static_n += await serve(static, tls, args.seconds, args.clients, args.busy)
            dynamic = server_credentials(Settings(tls_dir=str(tls)), "head")
            assert dynamic is not None
            before = watch.looks
            dynamic_n += await serve(dynamic, tls, args.seconds, args.clients, args.busy)
            looks += watch.looks - before
        watch.poll = poll  # type: ignore[method-assign]
        s = args.seconds * args.rounds
        print(f"read at start:      {static_n / s:8.0f} handshakes/s")
        print(
            f"taken when renewed: {dynamic_n / s:8.0f} handshakes/s; fetcher {polls[0] / s:.0f}/s, "
            f"files looked at {looks / s:.2f}/s ({looks} looks of 3 stat calls in {s:.0f} s)"
        )
        n = 1_000_000
        start = time.perf_counter()
        for _ in range(n):
            poll()
        print(f"CertWatch.poll between looks: {(time.perf_counter() - start) / n * 1e9:.0f} ns")
        start = time.perf_counter()
        for _ in range(1000):
            certwatch._stamp(watch.files)
        print(f"one look (3 stat calls): {(time.perf_counter() - start) / 1000 * 1e6:.1f} us")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

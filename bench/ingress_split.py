"""How a scheduler's ingress processes share new connections: in turn, or by the kernel's hash.

Starts shoal (two ingress processes: the main one and a worker) once with
``ingress_in_turn`` on and once off, opens CONNECTIONS connections to its gRPC port
TRIALS times, and counts how they fell over the two processes (from the processes'
sockets, psutil). With ``--pa``, also perf_analyzer noop c=32 (which opens six
connections) ROUNDS times each way, interleaved. Not part of ``make test``::

    .venv/bin/python bench/ingress_split.py [--trials 20] [--connections 6] [--pa 3]
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import systems  # noqa: E402
import tools  # noqa: E402


def ingress_pids(run: systems.Running) -> list[int]:
    pids = []
    for pid in run.pids():
        try:
            cmd = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue
        if "shoal.cli" in cmd or "shoal.ingress_worker" in cmd:
            pids.append(pid)
    return pids


def split(run: systems.Running, n: int) -> tuple[int, ...]:
    """Open ``n`` connections to the gRPC port; how many each ingress process took, largest first."""
    host, port = run.grpc.rsplit(":", 1)
    pids = ingress_pids(run)
    clients = [socket.create_connection((host, int(port)), timeout=5) for _ in range(n)]
    try:
        mine = {c.getsockname()[1] for c in clients}
        deadline = time.monotonic() + 10
        while True:
            held: collections.Counter[int] = collections.Counter()
            for pid in pids:
                for conn in psutil.Process(pid).net_connections("tcp"):
                    if conn.laddr.port == int(port) and conn.raddr and conn.raddr.port in mine:
                        held[pid] += 1
            if sum(held.values()) == n or time.monotonic() > deadline:
                return tuple(sorted((held.get(p, 0) for p in pids), reverse=True))
            time.sleep(0.02)
    finally:
        for c in clients:
            c.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--connections", type=int, default=6)
    parser.add_argument("--pa", type=int, default=0, help="perf_analyzer rounds each way (0: none)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shoal-split-"))
    modes = {"in turn": "1", "hash": "0"}
    throughput: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(max(1, args.pa)):
        for mode, flag in modes.items():
            saved = dict(os.environ)
            os.environ.update({"SHOAL_INGRESS_WORKERS": "2", "SHOAL_INGRESS_IN_TURN": flag})
            try:
                run = systems.SYSTEMS["shoal"].start(work / f"{flag}{r}", only_noop=True)
            finally:
                os.environ.clear()
                os.environ.update(saved)
            try:
                if r == 0:
                    splits = collections.Counter(split(run, args.connections) for _ in range(args.trials))
                    shown = ", ".join(f"{'/'.join(map(str, k))}: {v}" for k, v in sorted(splits.items()))
                    tries = f"{args.connections} connections, {args.trials} tries"
                    print(f"{mode:8s} {tries}: {shown}", flush=True)
                if args.pa:
                    point = tools.perf_analyzer(run.grpc, "noop", "grpc", 32, run.pids, shape="x:1,16")
                    throughput[mode].append(point.throughput)
                    print(f"  round {r + 1} {mode}: c=32 {point.throughput:,.0f} req/s", flush=True)
            finally:
                systems.stop(run)
    if args.pa:
        for mode, values in throughput.items():
            print(f"{mode:8s} median {statistics.median(values):,.0f} req/s of {[round(v) for v in values]}")


if __name__ == "__main__":
    main()

"""How far one head goes: a real ``shoal head`` process over real gRPC, driven by many
simulated schedulers in this process (issue 16, item 4). Not part of ``make test``::

    .venv/bin/python bench/scale.py --schedulers 1000 --replicas 10000 --json

Each simulated scheduler registers with its replicas already running (the head adopts
them), sends a health update every ``heartbeat_interval_s`` (the default, 1 s) reporting
them, and watches its routing table, as a real scheduler does. One gRPC server here
answers the head's CreateReplica/RemoveReplica calls for all of them (they share one
address); replicas it is asked to create are never reported, so they stay PENDING and
the head does not retry them.

Measured, each in turn:

- **steady**: the head's CPU (cores) and RSS while every scheduler heartbeats;
- **route change**: a deployment applied, until every scheduler's table stream has it;
- **deaths**: 10% of the schedulers stop; from the head declaring them dead (its first
  replacement CreateReplica) to the last replacement placed, and the head's CPU meanwhile.

The figures go to ``docs/scale.md`` (``--markdown``) with the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import psutil

from shoal.core.spec import DeploymentSpec, parse_spec
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg

CAPACITY = pb.Resources(cpus=1024, memory_mb=1 << 20, gpus=0)
NEVER = 1 << 60  # a registry version no health report reaches: created replicas stay PENDING


class SimServer(pbg.SchedulerServicer):
    """The Scheduler service of every simulated scheduler (they share this one address)."""

    def __init__(self) -> None:
        self.created: list[float] = []
        self.removed = 0

    async def CreateReplica(self, request: pb.CreateReplicaRequest, context: Any) -> pb.CreateReplicaReply:
        self.created.append(time.monotonic())
        return pb.CreateReplicaReply(registry_version=NEVER)

    async def RemoveReplica(self, request: pb.RemoveReplicaRequest, context: Any) -> pb.Empty:
        self.removed += 1
        return pb.Empty()


class SimScheduler:
    def __init__(self, i: int, address: str, replicas: list[pb.ReplicaStatus]) -> None:
        self.id = f"sim{i:05d}"
        self.address = address
        self.replicas = replicas
        self.alive = True
        self.tables: list[tuple[float, int, frozenset[str]]] = []  # (received, version, names)

    async def register(self, stub: pbg.HeadStub) -> None:
        await stub.RegisterScheduler(
            pb.RegisterSchedulerRequest(
                scheduler_id=self.id,
                address=self.address,
                http_address=self.address,
                capacity=CAPACITY,
                pid=os.getpid(),
                replicas=self.replicas,
                hostname="sim",
            ),
            timeout=60,
        )

    async def heartbeat(self, stub: pbg.HeadStub, interval_s: float, offset_s: float) -> None:
        await asyncio.sleep(offset_s)
        msg = pb.SchedulerHealth(scheduler_id=self.id, replicas=self.replicas, registry_version=1)
        while self.alive:
            started = time.monotonic()
            try:
                reply = await stub.SendHealthUpdate(msg, timeout=30)
                if not reply.ack:
                    await self.register(stub)
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))

    async def watch(self, stub: pbg.HeadStub) -> None:
        stream: AsyncIterator[pb.RoutingTable] = stub.WatchRoutes(pb.WatchRoutesRequest(scheduler_id=self.id))
        try:
            async for table in stream:
                self.tables.append((time.monotonic(), table.version, frozenset(table.deployments)))
                if not self.alive:
                    return
        except grpc.aio.AioRpcError:
            return


def _spec(name: str, replicas: int) -> DeploymentSpec:
    return parse_spec(
        {"name": name, "backend": "python", "model": "m:M", "replicas": replicas, "resources": {"cpus": 0.01}}
    )


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


async def _measure_cpu(proc: psutil.Process, seconds: float) -> float:
    before, started = _cpu(proc), time.monotonic()
    await asyncio.sleep(seconds)
    return (_cpu(proc) - before) / (time.monotonic() - started)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="shoal-scale-"))
    env = {**os.environ, "SHOAL_LOG_LEVEL": "WARNING"}
    if args.store:
        env["SHOAL_STORE"] = args.store
    log = open(state / "head.log", "ab")
    head = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", "head", "--port", "0", "--http-port", "0", "--state", str(state)],
        stdout=log,
        stderr=log,
        env=env,
        start_new_session=True,
    )
    try:
        endpoints = state / "endpoints.json"
        deadline = time.monotonic() + 30
        while not endpoints.exists():
            if head.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the head did not start: see {state / 'head.log'}")
            await asyncio.sleep(0.05)
        head_address = json.loads(endpoints.read_text())["head"]
        proc = psutil.Process(head.pid)

        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        sim = SimServer()
        pbg.add_SchedulerServicer_to_server(sim, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        address = f"127.0.0.1:{port}"

        # Deployments of replicas/deployments replicas each, spread evenly over the schedulers.
        n_dep = max(1, min(args.deployments, args.replicas))
        specs = [_spec(f"d{i:04d}", args.replicas // n_dep) for i in range(n_dep)]
        per: list[list[pb.ReplicaStatus]] = [[] for _ in range(args.schedulers)]
        k = 0
        for spec in specs:
            for j in range(spec.replicas):
                per[k % args.schedulers].append(
                    pb.ReplicaStatus(
                        replica_id=f"{spec.name}-{j:06x}",
                        deployment=spec.name,
                        state=pb.READY,
                        address=address,
                        pid=1,
                        spec_hash=spec.process_hash(),
                        ready_at=time.time(),
                    )
                )
                k += 1
        sims = [SimScheduler(i, address, per[i]) for i in range(args.schedulers)]

        options = [("grpc.max_receive_message_length", 1 << 30)]
        channel = grpc.aio.insecure_channel(head_address, options=options)
        stub = pbg.HeadStub(channel)
        # A connection per 50 schedulers (each real one has its own): one HTTP/2 connection
        # takes max_concurrent_streams watch streams at most.
        channels = [
            grpc.aio.insecure_channel(head_address, options=[*options, ("grpc.use_local_subchannel_pool", 1)])
            for _ in range(0, len(sims), 50)
        ]
        stubs = [pbg.HeadStub(c) for c in channels]
        started = time.monotonic()
        for batch in range(0, len(sims), 50):
            await asyncio.gather(*(s.register(stubs[batch // 50]) for s in sims[batch : batch + 50]))
        registered_s = time.monotonic() - started
        # Heartbeats from the start: applying the specs can take longer than dead_after_s.
        interval = args.heartbeat_s
        tasks = [
            asyncio.create_task(s.heartbeat(stubs[i // 50], interval, interval * i / len(sims)))
            for i, s in enumerate(sims)
        ]
        tasks += [asyncio.create_task(s.watch(stubs[i // 50])) for i, s in enumerate(sims)]
        if args.py_spy_apply:
            subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "-p",
                    str(head.pid),
                    "-d",
                    "20",
                    "-f",
                    "raw",
                    "-o",
                    args.py_spy_apply,
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for spec in specs:
            request = pb.ApplyDeploymentRequest(spec_json=spec.model_dump_json())
            await stub.ApplyDeployment(request, timeout=60)
        applied_s = time.monotonic() - started - registered_s

        # Steady state, after the adoption wait and a settling period.
        await asyncio.sleep(args.settle)
        spy = None
        if args.py_spy:  # where the head's steady-state CPU goes (a collapsed-stack file)
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "-p",
                    str(head.pid),
                    "-d",
                    str(int(args.duration)),
                    "-f",
                    "raw",
                    "-o",
                    args.py_spy,
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        steady_cores = await _measure_cpu(proc, args.duration)
        if spy is not None:
            spy.wait(30)
        rss_mb = proc.memory_info().rss / 2**20
        status = pb.ClusterStatus.FromString(
            (await stub.GetStatus(pb.Empty(), timeout=60)).SerializeToString()
        )
        ready = sum(1 for d in status.deployments for r in d.replicas if r.state == "READY")

        # A routing change: a new deployment, until every scheduler's stream has it.
        applied = time.monotonic()
        await stub.ApplyDeployment(pb.ApplyDeploymentRequest(spec_json=_spec("marker", 0).model_dump_json()))
        arrivals: list[float] = []
        deadline = applied + 60
        while time.monotonic() < deadline:
            arrivals = [
                next((t for t, _, names in s.tables if t >= applied and "marker" in names), 0.0) for s in sims
            ]
            if all(arrivals):
                break
            await asyncio.sleep(0.05)
        reached = [a - applied for a in arrivals if a]
        tables_per_s = sum(1 for s in sims for t, _, _ in s.tables if t >= applied - args.duration) / (
            args.duration + (time.monotonic() - applied)
        )

        # Deaths: 10% of the schedulers stop heartbeating.
        dying = sims[: max(1, args.schedulers // 10)]
        lost = sum(len(s.replicas) for s in dying)
        created_before = len(sim.created)
        for s in dying:
            s.alive = False
        stopped = time.monotonic()
        cpu_before = _cpu(proc)
        deadline = stopped + 120
        while len(sim.created) - created_before < lost and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        creates = sim.created[created_before:]
        death_cores = (_cpu(proc) - cpu_before) / (time.monotonic() - stopped)

        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await channel.close()
        for c in channels:
            await c.close()
        await server.stop(0)
        return {
            "schedulers": args.schedulers,
            "replicas": args.replicas,
            "deployments": n_dep,
            "store": args.store or "sqlite",
            "heartbeat_s": interval,
            "registered_s": round(registered_s, 2),
            "applied_s": round(applied_s, 2),
            "ready_replicas": ready,
            "steady_cores": round(steady_cores, 3),
            "head_rss_mb": round(rss_mb, 1),
            "route_change_p50_s": round(statistics.median(reached), 3) if reached else None,
            "route_change_max_s": round(max(reached), 3) if reached else None,
            "route_change_reached": f"{len(reached)}/{len(sims)}",
            "tables_per_s": round(tables_per_s, 1),
            "deaths": len(dying),
            "replacements_wanted": lost,
            "replacements_placed": len(creates),
            "first_replacement_after_s": round(creates[0] - stopped, 2) if creates else None,
            "replacement_spread_s": round(creates[-1] - creates[0], 3) if creates else None,
            "cores_during_deaths": round(death_cores, 3),
        }
    finally:
        head.terminate()
        try:
            head.wait(10)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--schedulers", type=int, default=100)
    parser.add_argument("--replicas", type=int, default=1000)
    parser.add_argument("--deployments", type=int, default=100)
    parser.add_argument(
        "--heartbeat-s", type=float, default=1.0, help="the schedulers' interval (default 1 s)"
    )
    parser.add_argument(
        "--settle", type=float, default=8.0, help="seconds before measuring (adoption wait: 5 s)"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of steady state measured")
    parser.add_argument("--store", default="", help="the head's --store (default: SQLite)")
    parser.add_argument("--py-spy", default="", help="record the head's steady state into this file")
    parser.add_argument("--py-spy-apply", default="", help="record the head's first 20 s of applies")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:28} {v}")


if __name__ == "__main__":
    main()

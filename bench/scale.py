"""How far one head goes: a real ``shoal head`` process over real gRPC, driven by many
simulated schedulers spread over several processes (issue 16, item 4). Not part of
``make test``::

    .venv/bin/python bench/scale.py --schedulers 1000 --replicas 10000 --json
    .venv/bin/python bench/scale.py --store etcd --schedulers 300 --replicas 3000
    .venv/bin/python bench/scale.py --sweep 10,100,300,1000 --svg docs/scale.svg

Each simulated scheduler registers with its replicas already running (the head adopts
them), sends a health update every ``heartbeat_interval_s`` (the default, 1 s) reporting
them and its load per deployment on its ``StreamHealth`` stream (``--unary``: a
``SendHealthUpdate`` call each, as to a head without the stream), and watches its routing
table asking for route deltas, as a real scheduler does. They live in ``--sim-procs``
worker processes (default: one per 125 schedulers), each with one gRPC channel per 250 of
its schedulers, sending pre-encoded health updates and reading table streams as bytes, so
that the head, not the simulator, is what runs out of CPU first.
Each worker answers the head's CreateReplica/RemoveReplica calls for its own schedulers
(they share its address: 1,000 schedulers sharing one server in this process made the
server's accepting 900 new connections at once part of what the deaths measured);
replicas it is asked to create are never reported, so they stay PENDING and the head does
not retry them.

Measured, each in turn:

- **steady**: the head's CPU (cores) and RSS while every scheduler heartbeats, the
  simulator's CPU (the workers and this process) and etcd's, the health updates' round
  trip (p50 / p99) and how many schedulers were NACKed and registered again (churn);
- **route change**: a deployment applied, until every scheduler's table stream has it;
- **deaths**: 10% of the schedulers stop: killed (``--deaths killed``, the default: their
  health streams end, as a killed process's connection closes, and the head finds them
  dead ``dead_after_stream_end_s`` later) or silent (``--deaths silent``: their streams stay
  open, as a lost machine's do, and the head finds each dead ``dead_after_s`` after its
  last update); from the head declaring them dead (its first
  replacement CreateReplica) to the last replacement placed, in bursts, and from when the
  last of them could be known dead; how far apart their last health updates were (the
  head can know them dead only that far apart); the head's CPU meanwhile, and the health
  updates' round trip meanwhile (a reconcile pass that held the event loop would show
  there).

``--store etcd`` starts one etcd member (``/usr/bin/etcd``) on free loopback ports for the
run; ``--store etcd://HOST:PORT`` uses a running one.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
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
MARKER = "zz-route-marker"  # the deployment whose arrival is timed (found in a stream's bytes)
HEALTH = "/shoal.v1.Head/SendHealthUpdate"
STREAM_HEALTH = "/shoal.v1.Head/StreamHealth"
SENT_S = b"\x31"  # SchedulerHealth.sent_s (field 6, a double): appended to the encoded update
WATCH = "/shoal.v1.Head/WatchRoutes"
PER_PROC = 125  # schedulers per worker process by default
PER_CHANNEL = 250  # a connection takes max_concurrent_streams (1,024) calls at most: 2 streams each
OPTIONS = [("grpc.max_receive_message_length", 1 << 30), ("grpc.use_local_subchannel_pool", 1)]


# ---------------------------------------------------------------- the layout


def _spec(name: str, replicas: int) -> DeploymentSpec:
    return parse_spec(
        {"name": name, "backend": "python", "model": "m:M", "replicas": replicas, "resources": {"cpus": 0.01}}
    )


def _specs(replicas: int, deployments: int) -> list[DeploymentSpec]:
    n_dep = max(1, min(deployments, replicas))
    return [_spec(f"d{i:04d}", replicas // n_dep) for i in range(n_dep)]


def _replicas_of(
    i: int, schedulers: int, specs: list[DeploymentSpec], address: str
) -> list[pb.ReplicaStatus]:
    """Scheduler ``i``'s replicas: the k-th replica of all (deployment by deployment) runs on
    scheduler ``k % schedulers``. The same in every process, so workers need only their range."""
    per = specs[0].replicas
    hashes = [s.process_hash() for s in specs]
    out = []
    for k in range(i, per * len(specs), schedulers):
        d, j = divmod(k, per)
        out.append(
            pb.ReplicaStatus(
                replica_id=f"{specs[d].name}-{j:06x}",
                deployment=specs[d].name,
                state=pb.READY,
                address=address,
                pid=1,
                spec_hash=hashes[d],
                ready_at=1.0,
            )
        )
    return out


# ---------------------------------------------------------------- a worker process


class Sim:
    """One simulated scheduler in a worker: its requests encoded once."""

    def __init__(self, i: int, address: str, replicas: list[pb.ReplicaStatus]) -> None:
        self.i = i
        self.id = f"sim{i:05d}"
        self.register_request = pb.RegisterSchedulerRequest(
            scheduler_id=self.id,
            address=address,
            http_address=address,
            capacity=CAPACITY,
            pid=os.getpid(),
            replicas=replicas,
            hostname="sim",
        )
        load = {r.deployment: pb.DeploymentLoad(requests=100, latency_buckets=[0] * 17) for r in replicas}
        self.health = pb.SchedulerHealth(
            scheduler_id=self.id, replicas=replicas, registry_version=1, load=load
        ).SerializeToString()
        self.alive = True
        self.silent = False  # stopped with its health stream left open (``--deaths silent``)
        self.tasks: list[asyncio.Task[None]] = []
        self.marker_at = 0.0
        self.tables = 0
        self.reregistered = 0
        self.last_ack = 0.0  # when the last acknowledged health update was sent


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        lo, hi = args.worker
        specs = _specs(args.replicas, args.deployments)
        self.sims = [
            Sim(i, args.address, _replicas_of(i, args.schedulers, specs, args.address)) for i in range(lo, hi)
        ]
        self.head = args.head
        self.interval = args.heartbeat_s
        self.unary = args.unary
        self.schedulers = args.schedulers
        self.rtts: list[tuple[float, float]] = []  # (sent, round trip) of every health update
        self.marked = asyncio.Event()
        self.errors: dict[str, int] = {}  # failed health updates, by status code
        self.failed: list[float] = []  # when each failed one was sent
        self.scheduler = SimServer()
        self.parked: list[Any] = []  # the health streams of schedulers stopped silent, left open

    async def run(self) -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pbg.add_SchedulerServicer_to_server(self.scheduler, server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        for sim in self.sims:  # the head calls this worker's server for its schedulers
            sim.register_request.address = sim.register_request.http_address = address
        n_ch = max(1, math.ceil(len(self.sims) / PER_CHANNEL))
        channels = [grpc.aio.insecure_channel(self.head, options=OPTIONS) for _ in range(n_ch)]
        try:
            started = time.monotonic()
            for b in range(0, len(self.sims), 50):
                batch = self.sims[b : b + 50]
                await asyncio.gather(*(self._register(channels[s.i % n_ch], s) for s in batch))
                for s in batch:  # heartbeats from registration on: the others may take a while
                    ch = channels[s.i % n_ch]
                    s.tasks = [
                        asyncio.create_task(self._heartbeat(ch, s)),
                        asyncio.create_task(self._watch(ch, s)),
                    ]
            self._say({"ready": True, "registered_s": time.monotonic() - started})
            await self._serve_commands()
        finally:
            for s in self.sims:
                for t in s.tasks:
                    t.cancel()
            await asyncio.gather(*(t for s in self.sims for t in s.tasks), return_exceptions=True)
            for ch in channels:
                await ch.close()
            await server.stop(0)

    async def _register(self, channel: grpc.aio.Channel, sim: Sim) -> None:
        await pbg.HeadStub(channel).RegisterScheduler(sim.register_request, timeout=120)

    async def _heartbeat(self, channel: grpc.aio.Channel, sim: Sim) -> None:
        await asyncio.sleep(self.interval * sim.i / self.schedulers)
        if self.unary:
            await self._heartbeat_unary(channel, sim)
            return
        # As GrpcHeadLink does: one stream, a reply to each update; a broken stream is
        # replaced at the next update. Bytes in, bytes out: no encoding per update.
        open_stream = channel.stream_stream(STREAM_HEALTH)
        stream = None
        try:
            while sim.alive:
                sent = time.monotonic()
                try:
                    if stream is None:
                        stream = open_stream()
                    await stream.write(sim.health + SENT_S + struct.pack("<d", sent))
                    raw = await asyncio.wait_for(stream.read(), 30)
                    if raw is grpc.aio.EOF:  # type: ignore[attr-defined]
                        raise ConnectionError("the head ended the health stream")
                    if not self._answered(sim, sent, pb.HealthReply.FromString(raw)):
                        await self._register(channel, sim)
                except (grpc.aio.AioRpcError, TimeoutError, ConnectionError) as err:
                    code = err.code().name if isinstance(err, grpc.aio.AioRpcError) else type(err).__name__
                    self.errors[code] = self.errors.get(code, 0) + 1
                    self.failed.append(sent)
                    if stream is not None:
                        stream.cancel()
                    stream = None
                await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - sent)))
        finally:
            if stream is not None and sim.silent:
                self.parked.append(stream)  # a machine lost: its connection stays open
            elif stream is not None:
                stream.cancel()  # a killed process: its connection closes

    def _answered(self, sim: Sim, sent: float, reply: pb.HealthReply) -> bool:
        """Counts a reply; False: a NACK (register again)."""
        self.rtts.append((sent, time.monotonic() - sent))
        if reply.ack:
            sim.last_ack = sent
        else:
            sim.reregistered += 1
        return reply.ack

    async def _heartbeat_unary(self, channel: grpc.aio.Channel, sim: Sim) -> None:
        """``--unary``: a SendHealthUpdate call per update, as schedulers did before StreamHealth
        (and do with a head without it)."""
        call = channel.unary_unary(HEALTH)
        while sim.alive:
            sent = time.monotonic()
            try:
                reply = pb.HealthReply.FromString(await call(sim.health, timeout=30))
                if not self._answered(sim, sent, reply):
                    await self._register(channel, sim)
            except grpc.aio.AioRpcError as err:
                self.errors[err.code().name] = self.errors.get(err.code().name, 0) + 1
                self.failed.append(sent)
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - sent)))

    async def _watch(self, channel: grpc.aio.Channel, sim: Sim) -> None:
        marker = MARKER.encode()
        request = pb.WatchRoutesRequest(scheduler_id=sim.id, route_deltas=True)  # as GrpcHeadLink asks
        stream = channel.unary_stream(WATCH)(request.SerializeToString())
        try:
            async for raw in stream:
                sim.tables += 1
                # Bytes, not decoded: a whole table of 10,000 routes decoded by 1,000 simulated
                # schedulers would be the simulator's cost, not the head's.
                if not sim.marker_at and marker in raw:
                    sim.marker_at = time.monotonic()
                    if all(s.marker_at or not s.alive for s in self.sims):
                        self.marked.set()
        except grpc.aio.AioRpcError:
            return

    async def _serve_commands(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                return
            if cmd["cmd"] == "stats":
                since, until = cmd["since"], cmd["until"]
                self._say(
                    {
                        "rtts": [round(r, 5) for t, r in self.rtts if since <= t < until],
                        "sent_rtts": [(t, r) for t, r in self.rtts if since <= t < until]
                        if cmd.get("all")
                        else [],
                        "reregistered": sum(s.reregistered for s in self.sims),
                        "tables": sum(s.tables for s in self.sims),
                        "errors": self.errors,
                        "failed": [t for t in self.failed if since <= t < until],
                    }
                )
            elif cmd["cmd"] == "created":  # when the head's CreateReplica calls came
                self._say({"created": [t for t in self.scheduler.created if t >= cmd["since"]]})
            elif cmd["cmd"] == "marker":
                try:
                    await asyncio.wait_for(self.marked.wait(), cmd["timeout"])
                except TimeoutError:
                    pass
                self._say({"arrivals": [s.marker_at for s in self.sims if s.alive]})
            elif cmd["cmd"] == "stop":
                stopping = [s for s in self.sims if s.i in set(cmd["ids"])]
                for s in stopping:
                    s.alive = False
                    s.silent = cmd.get("silent", False)
                    for t in s.tasks[0 if not s.silent else 1 :]:
                        t.cancel()  # cancelled, a read cancels its call: a silent one ends itself
                if stopping and stopping[0].silent:  # each sends nothing after its update in flight
                    await asyncio.gather(*(s.tasks[0] for s in stopping), return_exceptions=True)
                self._say({"last_acks": [s.last_ack for s in stopping]})

    @staticmethod
    def _say(doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()


# ---------------------------------------------------------------- the coordinator


class SimServer(pbg.SchedulerServicer):
    """The Scheduler service of a worker's simulated schedulers (they share its address)."""

    def __init__(self) -> None:
        self.created: list[float] = []
        self.removed = 0

    async def CreateReplica(self, request: pb.CreateReplicaRequest, context: Any) -> pb.CreateReplicaReply:
        self.created.append(time.monotonic())
        return pb.CreateReplicaReply(registry_version=NEVER)

    async def RemoveReplica(self, request: pb.RemoveReplicaRequest, context: Any) -> pb.Empty:
        self.removed += 1
        return pb.Empty()


class WorkerProc:
    def __init__(self, proc: asyncio.subprocess.Process, lo: int, hi: int) -> None:
        self.proc, self.lo, self.hi = proc, lo, hi

    async def ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()
        return await self.read()

    async def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"a simulator worker ({self.lo}-{self.hi}) exited: see its log")
        doc: dict[str, Any] = json.loads(line)
        return doc


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class Meter:
    """CPU seconds of groups of processes over a window."""

    def __init__(self, groups: dict[str, list[psutil.Process]]) -> None:
        self.groups = groups
        self.before = {k: _cpu(v) for k, v in groups.items()}
        self.started = time.monotonic()

    def cores(self) -> dict[str, float]:
        elapsed = time.monotonic() - self.started
        return {k: round((_cpu(v) - self.before[k]) / elapsed, 3) for k, v in self.groups.items()}


def _quantiles(rtts: list[float]) -> dict[str, float | None]:
    if not rtts:
        return {"p50": None, "p99": None, "max": None}
    rtts = sorted(rtts)
    return {
        "p50": round(rtts[len(rtts) // 2], 4),
        "p99": round(rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))], 4),
        "max": round(rtts[-1], 4),
    }


def _bursts(times: list[float], gap_s: float = 0.1) -> list[list[float]]:
    out: list[list[float]] = []
    for i, t in enumerate(times):
        if i == 0 or t - times[i - 1] >= gap_s:
            out.append([round(t - times[0], 3), 0])
        out[-1][1] += 1
    return out


def _timeline(start: float, stats: list[dict[str, Any]], marks: dict[str, float]) -> None:
    ok: dict[int, list[float]] = {}
    failed: dict[int, int] = {}
    for st in stats:
        for t, r in st["sent_rtts"]:
            ok.setdefault(int(t - start), []).append(r)
        for t in st["failed"]:
            failed[int(t - start)] = failed.get(int(t - start), 0) + 1
    for sec in range(max([*ok, *failed, 0]) + 1):
        rtts = sorted(ok.get(sec, []))
        p50 = f"{rtts[len(rtts) // 2]:.3f}" if rtts else "-"
        here = [k for k, v in marks.items() if int(v - start) == sec]
        print(f"{sec:4}s answered {len(rtts):5} failed {failed.get(sec, 0):5} p50 {p50:>6} {' '.join(here)}")


def _py_spy(pid: int, seconds: float, out: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "-p",
            str(pid),
            "-d",
            str(int(seconds)),
            "-f",
            "raw",
            "-o",
            out,
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="shoal-scale-"))
    env = {
        "SHOAL_LOG_LEVEL": "WARNING",
        **os.environ,
        "SHOAL_DEAD_AFTER_S": str(args.dead_after_s),
        "SHOAL_DEAD_AFTER_STREAM_END_S": str(args.stream_end_s),
        # Room for every simulated scheduler past the default bound (1,000).
        "SHOAL_MAX_SCHEDULERS": str(max(1000, args.schedulers)),
    }
    etcd = None
    store = args.store
    if store == "etcd":
        from shoal.testing.etcd import EtcdCluster

        etcd = EtcdCluster(state / "etcd").start()
        store = etcd.url
    if store:
        env["SHOAL_STORE"] = store
    log = open(state / "head.log", "ab")
    head = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", "head", "--port", "0", "--http-port", "0", "--state", str(state)],
        stdout=log,
        stderr=log,
        env=env,
        start_new_session=True,
    )
    workers: list[WorkerProc] = []
    try:
        endpoints = state / "endpoints.json"
        deadline = time.monotonic() + 30
        while not endpoints.exists():
            if head.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the head did not start: see {state / 'head.log'}")
            await asyncio.sleep(0.05)
        head_address = json.loads(endpoints.read_text())["head"]
        proc = psutil.Process(head.pid)

        # The replicas' address in the routes: nothing calls it (the simulated schedulers
        # read their tables as bytes; the head calls the workers' own servers).
        address = "127.0.0.1:9"

        channel = grpc.aio.insecure_channel(head_address, options=OPTIONS)
        stub = pbg.HeadStub(channel)
        while True:  # on etcd the head answers once it leads
            try:
                await stub.GetStatus(pb.StatusRequest(), timeout=5)
                break
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the head does not answer: see {state / 'head.log'}") from None
                await asyncio.sleep(0.1)

        n_procs = args.sim_procs or max(1, math.ceil(args.schedulers / PER_PROC))
        bounds = [args.schedulers * w // n_procs for w in range(n_procs + 1)]
        started = time.monotonic()
        worker_log = open(state / "workers.log", "ab")
        for lo, hi in itertools.pairwise(bounds):
            p = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--worker",
                str(lo),
                str(hi),
                "--head",
                head_address,
                "--address",
                address,
                "--schedulers",
                str(args.schedulers),
                "--replicas",
                str(args.replicas),
                "--deployments",
                str(args.deployments),
                "--heartbeat-s",
                str(args.heartbeat_s),
                *(["--unary"] if args.unary else []),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=worker_log,
                limit=1 << 28,  # a line of --timeline data holds every health update
            )
            workers.append(WorkerProc(p, lo, hi))
        ready = await asyncio.gather(*(w.read() for w in workers))
        registered_s = time.monotonic() - started
        sim_procs = [psutil.Process(os.getpid())] + [psutil.Process(w.proc.pid) for w in workers]
        groups = {"head": [proc], "simulator": sim_procs}
        if etcd is not None:
            groups["etcd"] = [psutil.Process(m.process.pid) for m in etcd.members if m.process]

        spy_apply = _py_spy(head.pid, 20, args.py_spy_apply) if args.py_spy_apply else None
        specs = _specs(args.replicas, args.deployments)
        for spec in specs:
            request = pb.ApplyDeploymentRequest(spec_json=spec.model_dump_json())
            await stub.ApplyDeployment(request, timeout=60)
        applied_s = time.monotonic() - started - registered_s
        if spy_apply is not None:
            spy_apply.wait(60)

        # Steady state, after the adoption wait and a settling period.
        await asyncio.sleep(args.settle)
        spy = _py_spy(head.pid, args.duration, args.py_spy) if args.py_spy else None
        before = await asyncio.gather(*(w.ask({"cmd": "stats", "since": 0, "until": 0}) for w in workers))
        window = time.monotonic()
        meter = Meter(groups)
        await asyncio.sleep(args.duration)
        steady = meter.cores()
        stats = await asyncio.gather(
            *(w.ask({"cmd": "stats", "since": window, "until": time.monotonic()}) for w in workers)
        )
        if spy is not None:
            await asyncio.to_thread(spy.wait, 60)
        rss_mb = proc.memory_info().rss / 2**20
        status = await stub.GetStatus(pb.StatusRequest(), timeout=60)
        ready_replicas = sum(1 for d in status.deployments for r in d.replicas if r.state == "READY")

        # A routing change: a new deployment, until every scheduler's stream has it.
        applied = time.monotonic()
        await stub.ApplyDeployment(pb.ApplyDeploymentRequest(spec_json=_spec(MARKER, 0).model_dump_json()))
        apply_call_s = time.monotonic() - applied  # of the routing change, the head's answer
        got = await asyncio.gather(*(w.ask({"cmd": "marker", "timeout": 60}) for w in workers))
        arrivals = [a for g in got for a in g["arrivals"]]
        reached = [a - applied for a in arrivals if a]

        # Deaths: 10% of the schedulers stop heartbeating (every tenth: spread over workers).
        dying = list(range(0, args.schedulers, 10))
        lost = sum(len(_replicas_of(i, args.schedulers, specs, address)) for i in dying)
        silent = args.deaths == "silent"
        stopping = time.monotonic()
        acks = await asyncio.gather(
            *(w.ask({"cmd": "stop", "ids": dying, "silent": silent}) for w in workers)
        )
        stopped = time.monotonic()
        spy = _py_spy(head.pid, 12, args.py_spy_deaths) if args.py_spy_deaths else None
        # The head may declare the last of them dead dead_after_s after its last health update.
        # Killed (their streams ended), all of them at once after dead_after_stream_end_s.
        last_acks = [a for g in acks for a in g["last_acks"]]
        dead_at = max(last_acks) + args.dead_after_s
        if not silent and not args.unary and args.stream_end_s > 0:
            dead_at = min(dead_at, stopping + min(args.stream_end_s, args.dead_after_s))
        meter = Meter(groups)
        deadline = stopped + 120
        creates: list[float] = []
        while len(creates) < lost and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            got = await asyncio.gather(*(w.ask({"cmd": "created", "since": stopped}) for w in workers))
            creates = sorted(t for g in got for t in g["created"])
        creates = creates[:lost]
        deaths = meter.cores()
        if spy is not None:
            await asyncio.to_thread(spy.wait, 60)
        during = await asyncio.gather(
            *(w.ask({"cmd": "stats", "since": stopped, "until": time.monotonic()}) for w in workers)
        )
        if args.timeline:  # health updates second by second: sent, answered, their p50 round trip
            whole = await asyncio.gather(
                *(w.ask({"cmd": "stats", "since": 0, "until": 1e12, "all": True}) for w in workers)
            )
            marks = {"registered": started + registered_s, "applied": started + registered_s + applied_s}
            marks |= {"measured": window, "route change": applied, "deaths": stopped}
            _timeline(started, whole, marks)

        await channel.close()
        steady_rtts = [r for s in stats for r in s["rtts"]]
        return {
            "schedulers": args.schedulers,
            "replicas": args.replicas,
            "deployments": len(specs),
            "store": "etcd (1 member)" if etcd is not None else (args.store or "sqlite"),
            "sim_procs": n_procs,
            "heartbeat_s": args.heartbeat_s,
            "health": "unary" if args.unary else "stream",
            "registered_s": round(registered_s, 2),
            "worker_registered_s": round(max(r["registered_s"] for r in ready), 2),
            "applied_s": round(applied_s, 2),
            "ready_replicas": ready_replicas,
            "steady_cores": steady["head"],
            "simulator_cores": steady["simulator"],
            "etcd_cores": steady.get("etcd"),
            "health_updates_per_s": round(len(steady_rtts) / args.duration, 1),
            "health_rtt_s": _quantiles(steady_rtts),
            "health_errors": {
                k: sum(s["errors"].get(k, 0) for s in stats) for s in stats for k in s["errors"]
            },
            "tables_in_steady": sum(s["tables"] for s in stats) - sum(s["tables"] for s in before),
            "reregistered_in_steady": sum(s["reregistered"] for s in stats)
            - sum(s["reregistered"] for s in before),
            "head_rss_mb": round(rss_mb, 1),
            "route_change_p50_s": round(statistics.median(reached), 3) if reached else None,
            "route_change_max_s": round(max(reached), 3) if reached else None,
            "route_change_reached": f"{len(reached)}/{len(arrivals)}",
            "route_change_apply_call_s": round(apply_call_s, 3),
            "deaths": len(dying),
            "death": args.deaths,
            "stream_end_s": args.stream_end_s,
            "replacements_wanted": lost,
            "replacements_placed": len(creates),
            "first_replacement_after_s": round(creates[0] - stopped, 2) if creates else None,
            "replacement_spread_s": round(creates[-1] - creates[0], 3) if creates else None,
            # From when the head could first know all of them dead to the last replacement: the
            # detection (a reconcile pass every reconcile_interval_s) plus the pass's own time.
            "replaced_after_all_dead_s": round(creates[-1] - dead_at, 3) if creates else None,
            # The stopped schedulers' last health updates spread over a heartbeat interval:
            # the head can know them dead only that far apart.
            "deaths_known_over_s": round(max(last_acks) - min(last_acks), 3),
            # The replacements in bursts (a gap of 0.1 s or more starts the next): [from the
            # first replacement (s), placed]; one reconcile pass placing them all is one burst.
            "replacement_bursts": _bursts(creates),
            "cores_during_deaths": deaths["head"],
            "health_rtt_during_deaths_s": _quantiles([r for s in during for r in s["rtts"]]),
        }
    finally:
        for w in workers:
            if w.proc.returncode is None:
                try:
                    assert w.proc.stdin is not None
                    w.proc.stdin.write(b'{"cmd": "quit"}\n')
                    await asyncio.wait_for(w.proc.wait(), 10)
                except (TimeoutError, ConnectionError):
                    w.proc.kill()
                    await w.proc.wait()
        head.terminate()
        try:
            head.wait(10)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        log.close()
        if etcd is not None:
            etcd.stop()
        if args.keep:
            print(f"the head's state and log: {state}", file=sys.stderr)
        else:
            shutil.rmtree(state, ignore_errors=True)


# ---------------------------------------------------------------- a sweep, and its plot


def _svg(results: list[dict[str, Any]]) -> str:
    """Head and simulator CPU against schedulers (log scale), with the 0.5-core target."""
    w, h, left, bottom, top, right = 560, 320, 60, 50, 20, 150
    xs = [math.log10(r["schedulers"]) for r in results]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    top_value = max(1.0, *(max(r["steady_cores"], r["simulator_cores"]) for r in results))
    ymax = math.ceil(top_value * 5 + 0.5) / 5  # a round top, in fifths of a core

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def py(y: float) -> float:
        return h - bottom - y / ymax * (h - bottom - top)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>',
        f'<text x="{(left + w - right) / 2}" y="{h - 12}" text-anchor="middle">'
        "schedulers (10 replicas each)</text>",
        f'<text x="14" y="{(top + h - bottom) / 2}" transform="rotate(-90 14 {(top + h - bottom) / 2})" '
        'text-anchor="middle">cores</text>',
        f'<line x1="{left}" y1="{py(0.5)}" x2="{w - right}" y2="{py(0.5)}" '
        'stroke="gray" stroke-dasharray="4"/>',
        f'<text x="{w - right + 6}" y="{py(0.5) + 4}" fill="gray">target 0.5</text>',
    ]
    for r, x in zip(results, xs, strict=True):
        parts.append(
            f'<text x="{px(x)}" y="{h - bottom + 16}" text-anchor="middle">{r["schedulers"]:,}</text>'
        )
    steps = round(ymax * 5)
    for k in range(steps + 1):
        y = k / 5
        parts.append(f'<text x="{left - 6}" y="{py(y) + 4}" text-anchor="end">{y:.1f}</text>')
    for key, color, label in (
        ("steady_cores", "#c0392b", "head"),
        ("simulator_cores", "#2c7fb8", "simulator"),
    ):
        pts = " ".join(f"{px(x):.1f},{py(r[key]):.1f}" for r, x in zip(results, xs, strict=True))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        for r, x in zip(results, xs, strict=True):
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(r[key]):.1f}" r="3" fill="{color}"/>')
        last = results[-1]
        parts.append(f'<text x="{w - right + 6}" y="{py(last[key]) + 4}" fill="{color}">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


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
        "--unary",
        action="store_true",
        help="health updates as unary SendHealthUpdate calls (a head without StreamHealth)",
    )
    parser.add_argument(
        "--dead-after-s", type=float, default=5.0, help="the head's dead_after_s (default 5 s)"
    )
    parser.add_argument(
        "--stream-end-s",
        type=float,
        default=3.0,
        help="the head's dead_after_stream_end_s (default 3 s; 0: off)",
    )
    parser.add_argument(
        "--deaths",
        choices=["killed", "silent"],
        default="killed",
        help="killed (default): the dying schedulers' health streams end, as a killed process's "
        "connection closes; silent: they stop sending and leave their streams open, as a lost "
        "machine or a network cut does",
    )
    parser.add_argument(
        "--settle", type=float, default=8.0, help="seconds before measuring (adoption wait: 5 s)"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of steady state measured")
    parser.add_argument(
        "--store", default="", help="the head's --store: etcd://HOST:PORT, or 'etcd' to start one member here"
    )
    parser.add_argument(
        "--sim-procs",
        type=int,
        default=0,
        help=f"simulator processes (default: one per {PER_PROC} schedulers)",
    )
    parser.add_argument(
        "--sweep", default="", help="schedulers, comma-separated: one run each, 10 replicas each"
    )
    parser.add_argument(
        "--svg", default="", help="with --sweep: plot the cores against schedulers into this file"
    )
    parser.add_argument("--py-spy", default="", help="record the head's steady state into this file")
    parser.add_argument("--py-spy-apply", default="", help="record the head's first 20 s of applies")
    parser.add_argument("--py-spy-deaths", default="", help="record the head's 12 s after the deaths")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--keep", action="store_true", help="keep the head's state folder and log (removed by default)"
    )
    parser.add_argument("--timeline", action="store_true", help="print health updates second by second")
    # A worker process (started by the coordinator): schedulers LO..HI-1.
    parser.add_argument("--worker", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--head", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(Worker(args).run())
        return
    if args.sweep:
        results = []
        for n in (int(s) for s in args.sweep.split(",")):
            args.schedulers, args.replicas = n, 10 * n
            args.deployments = min(100, n)
            results.append(asyncio.run(run(args)))
            print(json.dumps(results[-1]), flush=True)
        if args.svg:
            Path(args.svg).write_text(_svg(results))
        return
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:28} {v}")


if __name__ == "__main__":
    main()

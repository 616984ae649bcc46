"""The replica supervisor: starts replica processes, keeps the registry, pings
them, and cleans out the dead.

The registry (``self.registry``) is guarded by ``self.lock`` (an
``asyncio.Lock``): every change to it, and the version counter the head uses
to order health reports, happens under the lock.

Replica logs: each replica's stdout and stderr go to ``replica_<id>.log`` in
``log_dir``, a file the supervisor opens in append mode and the process inherits.
Bounded two ways, both here, since a replica's prints and a crash's traceback never
pass through its logging: a log past ``replica_log_max_mb`` has its last
``replica_log_max_mb`` copied to ``replica_<id>.log.1`` and is emptied in place (checked
every ping interval; with append mode the process's next write lands at the new start,
and what it writes between the copy and the truncation is lost); and only the newest
``replica_logs_kept`` logs of replicas that no longer run are kept (checked when one ends
and at start), so a crash loop leaves at most that many files behind and ``shoal logs``
still finds the recent ones.

Memory: a replica whose deployment sets ``resources.memory_mb`` is held to it. Every ping
interval the supervisor sums the proportional set size (PSS: shared pages, such as the
zygote's imported modules, split between the processes sharing them) of each replica's
process and the processes it started; over the limit, the replica is killed at once and
reported dead with what it used, as a container runtime kills a container over its memory
limit, before the machine runs out (when the kernel's OOM killer would pick any process,
the scheduler's own included). The head starts a replacement as for any replica that died.

GPUs: each replica gets its devices from ``self.gpus`` (``shoal.scheduler.gpus``) when it is
created, in ``CUDA_VISIBLE_DEVICES``, and gives them back when its process ends. While it
runs, ``replica_<id>.gpus.json`` in ``log_dir`` records them with its pid: a scheduler
started again in the same state folder keeps those devices from new replicas until the
replicas of its previous process (which it does not adopt: they are NACKed, or orphaned,
and exit) have exited.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import psutil

from shoal.config import Settings
from shoal.core.affinity import LoopPins
from shoal.core.clock import Clock, SystemClock
from shoal.core.cluster import DRAINING, READY, REPLICA_DEAD, REPLICA_ID, STARTING, STOPPED, ReplicaReport
from shoal.core.model_dirs import check_model_dirs
from shoal.core.placement import Capacity
from shoal.core.spec import DeploymentSpec
from shoal.core.states import ReplicaState
from shoal.core.tasks import TaskSet
from shoal.errors import AlreadyExists, NotFound, ResourceExhausted, ShoalError, Unavailable
from shoal.scheduler import machine
from shoal.scheduler.artifacts import ArtifactCache
from shoal.scheduler.child import ChildProcess
from shoal.scheduler.gpus import GpuGrant, GpuPool
from shoal.scheduler.machine import Bound
from shoal.scheduler.router import Router
from shoal.scheduler.staging import StagedProcess
from shoal.types import PingResult, ReplicaClient

log = logging.getLogger("shoal.scheduler")

QUEUED = ReplicaState.QUEUED

# Exit reasons kept for the head at most (oldest dropped first), should it stay away long.
MAX_TOMBSTONES = 1000


class Process(Protocol):
    """A started replica process, as the supervisor uses it (:class:`ChildProcess`)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None:
        """None while it runs; negative: killed by that signal."""
        ...

    async def wait(self) -> int:
        """Return its exit code once it has exited."""
        ...

    def send_signal(self, sig: int) -> None:
        """Signal it; a no-op once it has exited."""
        ...

    @property
    def status_known(self) -> bool:
        """Whether :attr:`returncode` is its real exit status: False for a forked replica
        whose zygote went first (``shoal.zygote.UNKNOWN_EXIT`` stands in), which then counts
        as no crash of its own."""
        ...


class Launcher(Protocol):
    """Starts a process: ``argv`` with ``env``, stdout and stderr to ``out`` (which the caller
    closes once this returns), in a session of its own. Called from the event loop."""

    def __call__(self, argv: Sequence[str], *, env: Mapping[str, str], out: IO[bytes]) -> Process: ...


@dataclass(frozen=True)
class ReplicaView:
    id: str
    deployment: str
    state: ReplicaState
    in_flight: int  # as its last ping said
    batch_sizes: Mapping[int, int]  # rows per model call -> calls, cumulative
    # Multiplexed deployments: per model id, cumulative, from pings (see PingResult).
    model_loads: Mapping[str, int] = field(default_factory=dict)
    model_evictions: Mapping[str, int] = field(default_factory=dict)
    model_hits: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SupervisorSnapshot:
    replicas: tuple[ReplicaView, ...]
    # Per deployment, what its replicas that exited counted, summed (no id, no state of its own).
    exited: tuple[ReplicaView, ...]
    starts: Mapping[str, int]  # per deployment, processes started
    deaths: Mapping[str, int]  # per deployment, replicas that died (not stopped on purpose)
    allocated: Capacity


@dataclass
class LocalReplica:
    id: str
    spec: DeploymentSpec
    process: Process
    log_path: Path
    started_mono: float  # the supervisor's clock
    state: ReplicaState = STARTING
    address: str = ""
    in_flight: int = 0
    queued: int = 0
    started_at: float = field(default_factory=time.time)
    ready_at: float = 0.0
    ping_failures: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # cumulative, from pings
    models: PingResult | None = None  # the last ping's model counts (multiplexed deployments)
    removing: bool = False
    dead_reason: str = ""
    crashed: bool = False  # killed by its scheduler for its own doing (over its memory limit)
    gpu: GpuGrant = field(default_factory=GpuGrant)  # its devices (shoal.scheduler.gpus)
    # QUEUED: done once it may start (``ReplicaSupervisor._admit``).
    turn: asyncio.Future[None] | None = None
    queued_behind: Callable[[], str] = lambda: ""  # QUEUED: what it waits for, in words

    @property
    def pid(self) -> int:
        return self.process.pid

    def _message(self) -> str:
        """What its report says besides its state: a download's progress, or why it was
        killed (its process may not be gone yet: the head records the first report of a
        death, and without this it said "replica exited")."""
        if isinstance(self.process, StagedProcess) and self.state == ReplicaState.DOWNLOADING:
            return self.process.describe()
        if self.state == QUEUED:
            return self.queued_behind()
        return self.dead_reason if self.state == REPLICA_DEAD else ""

    def report(self) -> ReplicaReport:
        return ReplicaReport(
            id=self.id,
            deployment=self.spec.name,
            state=self.state,
            address=self.address,
            pid=self.pid,
            in_flight=self.in_flight,
            queued=self.queued,
            spec_hash=self.spec.process_hash(),
            ready_at=self.ready_at,
            message=self._message(),
            crashed=self.crashed and self.state == REPLICA_DEAD,
        )


class ReplicaSupervisor:
    """``launcher`` starts replica processes (:meth:`ChildProcess.spawn` by default) and
    ``clock`` paces pings and bounds waits (the system's by default): the seams that
    tests replace (``shoal.testing.fakes.FakeLauncher``, ``FakeClock``)."""

    def __init__(
        self,
        settings: Settings,
        router: Router,
        client_factory: Callable[[str], ReplicaClient],
        *,
        log_dir: Path,
        scheduler_address: Callable[[], str],
        on_change: Callable[[], None],
        launcher: Launcher | None = None,
        clock: Clock | None = None,
        artifacts: ArtifactCache | None = None,
        gpus: GpuPool | None = None,
        max_starts: int = 0,
        oom_kills: Callable[[], Bound | None] = machine.oom_kills,
        max_replicas: int = 0,
    ) -> None:
        self.settings = settings
        # Replicas it runs at most (``max_replicas``, as offered to the head; 0: no bound).
        # The head places within it; a create past it (a head with an older view, or not
        # shoal's) is refused here all the same: this process's bound has the last word.
        self.max_replicas = max_replicas
        # Replica processes started at once at most (``max_concurrent_starts``; 0: no bound);
        # the others wait QUEUED, first come first started.
        self.max_starts = max_starts
        self._queue: collections.deque[LocalReplica] = collections.deque()
        # The kernel's OOM kills (``shoal.scheduler.machine.oom_kills``): a replica dead of
        # SIGKILL takes one counted past ``_oom_claimed``; one no replica took by the next
        # ping is another process's (``_expire_oom_kills``).
        self._oom_kills = oom_kills
        self._oom_claimed = 0.0
        self._oom_last = 0.0
        # The machine's GPUs and who holds them (none offered by default).
        self.gpus = gpus or GpuPool()
        # Replicas of its previous process still holding GPUs: "<id> (previous process)" -> (pid, start).
        self._previous: dict[str, tuple[int, float]] = {}
        # Models named by URI, fetched before their replicas start (shoal.scheduler.artifacts).
        self.artifacts = artifacts or ArtifactCache(
            Path(settings.state_dir) / "artifacts",
            limit_bytes=settings.artifact_cache_mb * 2**20,
            allowed_dirs=settings.allowed_model_dirs,
        )
        self._launcher: Launcher = launcher or ChildProcess.spawn
        self.clock: Clock = clock or SystemClock()
        self.router = router
        self.scheduler_id = router.scheduler_id
        self._client_factory = client_factory
        self.log_dir = log_dir
        self._scheduler_address = scheduler_address
        self._on_change = on_change
        self.registry: dict[str, LocalReplica] = {}
        self.lock = asyncio.Lock()
        self.version = 0
        # (registry version that recorded it, report): kept until the head acknowledges a
        # health report of that version or newer (see reports / acknowledge).
        self._tombstones: list[tuple[int, ReplicaReport]] = []
        self._pingers: dict[str, ReplicaClient] = {}
        self._tasks = TaskSet("supervisor")
        self._closing = False
        self.starts: collections.Counter[str] = collections.Counter()  # by deployment
        self.deaths: collections.Counter[str] = collections.Counter()
        # What the replicas that left this machine counted, per deployment (:meth:`_keep_counts`).
        self.exited: dict[str, ReplicaView] = {}
        # The busiest replicas' event loops on the ingress CPUs (replica_pin_loop): set by
        # pin_loops once the scheduler's process pinned its ingress.
        self._loop_pins: LoopPins | None = None

    def pin_loops(self, pins: LoopPins) -> None:
        """From now on, READY replicas' event loops go on the ingress CPUs as ``pins`` says
        (``replica_pin_loop``), looked at every ``replica_pin_interval_s``; those READY
        already at the next look."""
        first = self._loop_pins is None
        self._loop_pins = pins
        if first:
            self._tasks.spawn(self._pin_loop(), "pin loops")

    def start(self) -> None:
        counted = self._oom_kills()
        self._oom_claimed = self._oom_last = counted.value if counted is not None else 0.0
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._recover_gpus()
        self._clean_logs()
        self._tasks.spawn(self._ping_loop(), "ping")

    # ------------------------------------------------------------ create / remove

    async def create(self, replica_id: str, spec: DeploymentSpec) -> int:
        """Start a replica process; returns the registry version that includes it. A spec
        whose model is a URI starts DOWNLOADING: its process starts once the artifact cache
        has the model (:meth:`_launch_fetched`), or it ends DEAD with the reason."""
        async with self.lock:
            if self._closing:
                raise Unavailable("this scheduler is shutting down")
            if replica_id in self.registry:
                raise AlreadyExists(f"replica {replica_id} already exists")
            if self.max_replicas:
                held = sum(1 for r in self.registry.values() if not r.state.gone)
                if held >= self.max_replicas:
                    raise ResourceExhausted(
                        f"replica {replica_id} of {spec.name} is refused: this scheduler runs "
                        f"{held} replicas, its max_replicas ({self.max_replicas})"
                    )
            uri = spec.artifact_uri()
            process: Process
            if uri:
                # The head checked it too; this scheduler's own settings have the last word.
                check_model_dirs(spec, self.settings.allowed_model_dirs, self.settings.model_uri_prefixes)
            # Its devices from the start, downloading included: the head counted them when it
            # placed it. ResourceExhausted when no device has room (the head retries later).
            gpu = self.gpus.acquire(replica_id, spec.resources.gpus)
            # A model from a URI downloads first, then waits for a start slot like the others.
            state = ReplicaState.DOWNLOADING if uri else STARTING if self._may_start() else QUEUED
            try:
                if state == STARTING:
                    process = self._launch(replica_id, spec, gpu)
                else:
                    process = StagedProcess(self.artifacts, uri)
            except BaseException:
                self.gpus.release(replica_id)
                raise
            rep = LocalReplica(
                id=replica_id,
                spec=spec,
                process=process,
                log_path=self.log_dir / f"replica_{replica_id}.log",
                started_mono=self.clock.now(),
                state=state,
                gpu=gpu,
            )
            if state == QUEUED:
                self._enqueue(rep)
            self.registry[replica_id] = rep
            self.starts[spec.name] += 1
            self.router.know(spec)
            self.version += 1
            version = self.version
        if isinstance(process, StagedProcess):
            if uri:
                log.info("replica %s of %s waits for %s", replica_id, spec.name, uri)
            else:
                log.info("replica %s of %s waits to start: %s", replica_id, spec.name, rep.queued_behind())
            process.start(
                self._tasks,
                launch=lambda local, folder: self._launch_fetched(rep, local, folder),
                failed=lambda reason: self._fetch_failed(rep, reason),
            )
        else:
            log.info(
                "started replica %s of %s (pid %d%s), log %s",
                replica_id,
                spec.name,
                process.pid,
                self._on_gpus(gpu),
                rep.log_path,
            )
        self._tasks.spawn(self._watch(rep), f"watch-{replica_id}")
        self._on_change()
        return version

    async def _launch_fetched(
        self, rep: LocalReplica, local: Path | None, folder: Path | None
    ) -> Process | None:
        """The model of ``rep`` is at ``local`` (in the cache's ``folder``; None: it has no URI):
        start its process once a start slot is free (QUEUED meanwhile), unless it was removed
        meanwhile (None)."""
        async with self.lock:
            if rep.removing or self._closing:
                return None
            if rep.state == ReplicaState.DOWNLOADING:
                if self._may_start():
                    rep.state = STARTING
                    rep.started_mono = self.clock.now()
                else:
                    rep.state = QUEUED
                    self._enqueue(rep)
                self.version += 1
        if rep.state == QUEUED and rep.turn is not None:
            log.info("replica %s of %s waits to start: %s", rep.id, rep.spec.name, rep.queued_behind())
            self._on_change()
            await rep.turn
        async with self.lock:
            if rep.removing or rep.state != STARTING or self._closing:
                return None
            spec = rep.spec.localized(local) if local is not None else rep.spec
            process = self._launch(rep.id, spec, rep.gpu, extra_dir=folder)
            rep.started_mono = self.clock.now()  # start_timeout_s counts from here
            self.version += 1
        log.info(
            "started replica %s of %s (pid %d%s)%s",
            rep.id,
            rep.spec.name,
            process.pid,
            self._on_gpus(rep.gpu),
            f" from {local}" if local is not None else "",
        )
        self._on_change()
        return process

    def _may_start(self) -> bool:
        """Whether a replica may start its process now: a start slot is free and none waits
        ahead of it (``max_starts``). Under the lock."""
        if not self.max_starts:
            return True
        return not self._queue and self._starting() < self.max_starts

    def _starting(self) -> int:
        """How many replicas are STARTING: each holds a start slot."""
        return sum(1 for r in self.registry.values() if r.state == STARTING)

    def _enqueue(self, rep: LocalReplica) -> None:
        """``rep`` (QUEUED) waits for a start slot, behind those already waiting."""
        rep.turn = asyncio.get_running_loop().create_future()
        self._queue.append(rep)
        rep.queued_behind = lambda: self._queued_behind(rep)

    def _queued_behind(self, rep: LocalReplica) -> str:
        ahead = next((i for i, r in enumerate(self._queue) if r is rep), len(self._queue))
        return (
            f"waiting to start: this scheduler starts {self.max_starts} at a time "
            f"(max_concurrent_starts), {ahead} more waiting ahead of it"
        )

    def _admit(self) -> None:
        """Let the first QUEUED replicas start, as many as there are free start slots: each is
        STARTING from now on (its ``start_timeout_s`` counting) and starts its process (in
        :meth:`_launch_fetched`). Called wherever a replica stops STARTING; no await, so the
        registry cannot change under it."""
        while self._queue:
            rep = self._queue[0]
            if rep.state != QUEUED or rep.removing or self.registry.get(rep.id) is not rep:
                self._queue.popleft()  # removed or dead while it waited
                continue
            if self._starting() >= self.max_starts:
                return
            self._queue.popleft()
            rep.state = STARTING
            rep.started_mono = self.clock.now()
            self.version += 1
            if rep.turn is not None and not rep.turn.done():
                rep.turn.set_result(None)

    def _fetch_failed(self, rep: LocalReplica, reason: str) -> None:
        rep.dead_reason = reason
        try:
            with open(rep.log_path, "a") as f:
                f.write(reason + "\n")
        except OSError:
            pass

    def _on_gpus(self, gpu: GpuGrant) -> str:
        return f", on {self.gpus.describe(gpu)}" if self.gpus.managed else ""

    def _launch(
        self, replica_id: str, spec: DeploymentSpec, gpu: GpuGrant, extra_dir: Path | None = None
    ) -> Process:
        """Write the spec file and start the replica process on the devices of ``gpu``
        (``extra_dir``: a folder its model may come from besides ``allowed_model_dirs``, the
        artifact cache's copy). Under the lock."""
        log_path = self.log_dir / f"replica_{replica_id}.log"
        spec_path = self.log_dir / f"replica_{replica_id}.spec.json"
        spec_path.write_text(spec.to_json())
        self._stopping_file(replica_id).unlink(missing_ok=True)
        allowed = [str(Path(d).resolve()) for d in self.settings.allowed_model_dirs]
        if extra_dir is not None and allowed:
            allowed.append(str(extra_dir.resolve()))
        settings = {
            "host": self.settings.host,
            "advertise_host": self.settings.advertise_host,
            "replica_health_interval_s": self.settings.replica_health_interval_s,
            "orphan_after_s": self.settings.orphan_after_s,
            "max_message_mb": self.settings.max_message_mb,
            "shutdown_grace_s": self.settings.shutdown_grace_s,
            "rpc_timeout_s": self.settings.rpc_timeout_s,
            "log_format": self.settings.log_format,
            "log_level": self.settings.log_level,
            "event_loop": self.settings.event_loop,
            # Out of memory, the kernel kills a replica before its scheduler (shoal.replica_main).
            "replica_oom_score_adj": self.settings.replica_oom_score_adj,
            # The processes its model detached, reaped once they exit (shoal.core.subreaper).
            "replica_reap_orphans_s": self.settings.replica_reap_orphans_s,
            # Security: the replica's certificate, and where its model may come from.
            "tls_dir": str(Path(self.settings.tls_dir).resolve()) if self.settings.tls_dir else "",
            "insecure": self.settings.insecure,
            "max_concurrent_streams": self.settings.max_concurrent_streams,
            # Its gRPC server's connection limits, as the scheduler's (shoal.rpc.server).
            "grpc_handshake_timeout_s": self.settings.grpc_handshake_timeout_s,
            "grpc_idle_timeout_s": self.settings.grpc_idle_timeout_s,
            "grpc_max_connections": self.settings.grpc_max_connections,
            # The local hop: where to put its socket (the scheduler's hop folder).
            "data_plane": self.settings.data_plane,
            "hop_dir": self.settings.hop_dir,
            "allowed_model_dirs": allowed,
        }
        cmd = [
            sys.executable,
            "-m",
            "shoal.replica_main",
            "--replica-id",
            replica_id,
            "--scheduler",
            self._scheduler_address(),
            "--spec-file",
            str(spec_path),
            "--settings-json",
            json.dumps(settings),
            # A replica gives a scheduler whose process runs longer to answer (shoal.replica.process).
            "--scheduler-pid",
            str(os.getpid()),
            # Made when it stops of its own accord: an exit 0 without it is the model's (_watch).
            "--stopping-file",
            str(self._stopping_file(replica_id)),
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.gpus.environment(gpu)}
        with open(log_path, "ab") as out:
            # Own session: a Ctrl-C at the terminal reaches the scheduler, which
            # then drains its replicas in order, rather than all at once.
            process = self._launcher(cmd, env=env, out=out)
        if gpu.devices:
            self._record_gpus(replica_id, process.pid, gpu)
        return process

    def _stopping_file(self, replica_id: str) -> Path:
        return self.log_dir / f"replica_{replica_id}.stopping"

    def _quit(self, rep: LocalReplica, code: int) -> bool:
        """Whether ``rep``, which exited unasked with ``code``, quit of its model's doing: status
        0 with no stopping file (``shoal.replica_main``). Before, such an exit counted as none
        of its own: a model calling ``os._exit(0)`` a moment after loading was restarted at
        once, for ever (25 times in 20 s), its deployment never FAILED."""
        return code == 0 and not self._stopping_file(rep.id).exists()

    # ------------------------------------------------------------ GPUs held across restarts

    def _gpus_record(self, replica_id: str) -> Path:
        return self.log_dir / f"replica_{replica_id}.gpus.json"

    def _record_gpus(self, replica_id: str, pid: int, gpu: GpuGrant) -> None:
        """Note the devices of a started replica, for this scheduler's next process."""
        record = {
            "pid": pid,
            "started": _start_time(pid),
            "devices": self.gpus.names(gpu),
            "share": gpu.share,
        }
        try:
            self._gpus_record(replica_id).write_text(json.dumps(record))
        except OSError as err:
            log.warning("could not record the GPUs of replica %s: %s", replica_id, err)

    def _recover_gpus(self) -> None:
        """At start: hold the devices of the previous process's replicas that still run."""
        for path in self.log_dir.glob("replica_*.gpus.json"):
            rid = path.name.removeprefix("replica_").removesuffix(".gpus.json")
            try:
                record = json.loads(path.read_text())
                pid, started = int(record["pid"]), float(record["started"])
                names, share = [str(n) for n in record["devices"]], float(record["share"])
            except (OSError, ValueError, TypeError, KeyError) as err:
                log.warning("ignoring %s: %s", path, err)
                path.unlink(missing_ok=True)
                continue
            positions = self.gpus.positions(names)
            if not positions or not _running(pid, started):
                path.unlink(missing_ok=True)
                continue
            owner = f"{rid} (previous process)"
            gpu = self.gpus.hold(owner, positions, share)
            self._previous[owner] = (pid, started)
            log.warning(
                "replica %s (pid %d) of this scheduler's previous process still runs: "
                "its %s stays taken until it exits",
                rid,
                pid,
                self.gpus.describe(gpu),
            )

    def _release_previous(self) -> None:
        """Give back the devices of the previous process's replicas that have exited."""
        for owner, (pid, started) in list(self._previous.items()):
            if _running(pid, started):
                continue
            del self._previous[owner]
            gpu = self.gpus.release(owner)
            rid = owner.removesuffix(" (previous process)")
            self._gpus_record(rid).unlink(missing_ok=True)
            log.info(
                "replica %s of the previous process exited: %s free again",
                rid,
                self.gpus.describe(gpu),
            )

    async def remove(self, replica_id: str, *, graceful: bool, grace_s: float | None = None) -> bool:
        """Stop a replica: drain it first when ``graceful``, for ``grace_s`` (default
        ``shutdown_grace_s``). Returns False if unknown."""
        async with self.lock:
            rep = self.registry.get(replica_id)
            if rep is None:
                return False
            if rep.removing:
                return True
            rep.removing = True
            rep.state = DRAINING
            self.version += 1
            self._admit()
        self.router.retire(replica_id)
        self._on_change()
        self._tasks.spawn(self._stop(rep, graceful=graceful, grace_s=grace_s), f"stop-{replica_id}")
        return True

    def kill_now(self) -> None:
        """SIGKILL every replica, and with it what its model started, not draining any (the
        scheduler is about to exit: :meth:`SchedulerNode.kill_now`)."""
        for rep in list(self.registry.values()):
            _signal(rep.process, signal.SIGKILL)

    async def _stop(self, rep: LocalReplica, *, graceful: bool, grace_s: float | None = None) -> None:
        grace = (self.settings.shutdown_grace_s if grace_s is None else grace_s) if graceful else 0.0
        if graceful and rep.address:
            client = self._client_factory(rep.address)
            try:
                await client.drain(grace)
            except ShoalError as err:
                log.info("replica %s did not take the drain request (%s); terminating", rep.id, err)
                _signal(rep.process, signal.SIGTERM)
            finally:
                await client.close()
        else:
            _signal(rep.process, signal.SIGTERM)
        if not await self.clock.wait(rep.process.wait(), grace + 2.0):
            log.warning(
                "replica %s still running %.0fs after it was asked to stop; killing it", rep.id, grace + 2
            )
            _signal(rep.process, signal.SIGKILL)

    async def _watch(self, rep: LocalReplica) -> None:
        """Waits for the process to exit, then cleans it out of the registry."""
        code = await rep.process.wait()
        async with self.lock:
            self.registry.pop(rep.id, None)
            if self._loop_pins is not None:
                self._loop_pins.remove(rep.pid)
            if self.gpus.release(rep.id) is not None:
                self._gpus_record(rep.id).unlink(missing_ok=True)
            pinger = self._pingers.pop(rep.id, None)
            self.version += 1
            self._admit()
            model_quit = False
            if rep.removing or self._stopped_with_us(rep, code):
                state, message = STOPPED, "stopped"
            else:
                state = REPLICA_DEAD
                model_quit = not rep.dead_reason and rep.process.status_known and self._quit(rep, code)
                oom = not rep.dead_reason and code == -signal.SIGKILL and self._oom_killed()
                if oom:
                    rep.dead_reason = f"process killed by the kernel's OOM killer (SIGKILL; counted in {oom})"
                    rep.crashed = True  # its model's memory, as over its memory_mb: crash-loop back-off
                message = rep.dead_reason or _exit_reason(code, rep.log_path, quit=model_quit)
            tomb = rep.report()
            tomb.state = state
            tomb.message = message
            # A forked replica whose zygote went first has no exit status (UNKNOWN_EXIT): no crash.
            own = (
                rep.crashed
                if rep.dead_reason
                else rep.process.status_known and (_crashed(code) or model_quit)
            )
            tomb.crashed = state == REPLICA_DEAD and own
            if state == REPLICA_DEAD:
                self.deaths[rep.spec.name] += 1
            self._keep_counts(rep)
            self._tombstones.append((self.version, tomb))
            del self._tombstones[:-MAX_TOMBSTONES]
        if pinger is not None:
            await pinger.close()
        await self.router.remove(rep.id, failed=state == REPLICA_DEAD)
        if state == REPLICA_DEAD:
            log.warning("replica %s died: %s", rep.id, message)
        else:
            log.info("replica %s stopped", rep.id)
        self._clean_logs()
        self._on_change()

    def _stopped_with_us(self, rep: LocalReplica, code: int) -> bool:
        """Whether a replica this scheduler did not ask to stop stopped cleanly (status 0,
        its stopping file left) while the scheduler shuts down: it got the same signal
        (``systemctl stop`` signals every process of the service at once) and drained. Before,
        it was reported dead, with a warning, on every such stop."""
        return (
            self._closing
            and not rep.dead_reason
            and rep.process.status_known
            and code == 0
            and self._stopping_file(rep.id).exists()
        )

    def _oom_killed(self) -> str:
        """For a replica dead of SIGKILL: when the kernel has counted an OOM kill that no
        replica claimed yet, this one claims it and the answer is what counts them; else ""
        (an operator's ``kill -9`` finds none)."""
        counted = self._oom_kills()
        if counted is None or counted.value <= self._oom_claimed:
            return ""
        self._oom_claimed += 1
        return counted.source

    def _expire_oom_kills(self) -> None:
        """Once a ping interval: the kills counted at the last ping and not claimed since were
        of other processes (the kernel counts a kill before its SIGKILL lands, and the replica's
        exit is seen within milliseconds), so a later ``kill -9`` is not taken for them."""
        counted = self._oom_kills()
        self._oom_claimed = max(self._oom_claimed, self._oom_last)
        self._oom_last = counted.value if counted is not None else self._oom_last

    async def _kill(self, rep: LocalReplica, reason: str, *, crashed: bool = False) -> None:
        """Mark dead at once (no more requests, pending ones retried) and kill the process.
        ``crashed``: for its own doing, as if it had crashed (``ReplicaReport.crashed``)."""
        rep.dead_reason = reason
        rep.crashed = crashed
        rep.state = REPLICA_DEAD
        self._admit()
        await self.router.remove(rep.id, failed=True)
        _signal(rep.process, signal.SIGKILL)

    # ------------------------------------------------------------ from replicas

    async def register(self, replica_id: str, address: str, pid: int) -> bool:
        """A replica finished loading. False (NACK) when this scheduler does not know it."""
        async with self.lock:
            rep = self.registry.get(replica_id)
            if rep is None or rep.removing or rep.state == REPLICA_DEAD:
                return False
            rep.address = address
            rep.state = READY
            rep.ready_at = time.time()
            self.version += 1
            self._admit()
        self.router.add(replica_id, rep.spec, address, self.scheduler_id)
        log.info(
            "replica %s is READY at %s after %.2fs", replica_id, address, self.clock.now() - rep.started_mono
        )
        if self._loop_pins is not None and (cpu := self._loop_pins.add(rep.pid)) is not None:
            log.info("replica %s runs its event loop on CPU %d (replica_pin_loop)", replica_id, cpu)
        self._on_change()
        return True

    async def health(self, replica_id: str, state: str, in_flight: int, queued: int) -> bool:
        async with self.lock:
            rep = self.registry.get(replica_id)
            if rep is None or rep.state == REPLICA_DEAD:
                return False
            rep.in_flight = in_flight
            rep.queued = queued
            return True

    # ------------------------------------------------------------ pings

    async def _ping_loop(self) -> None:
        while True:
            await self.clock.sleep(self.settings.ping_interval_s)
            async with self.lock:
                targets = self._serving()
                starting = [r for r in self.registry.values() if r.state == STARTING]
            await self._rotate_logs()
            self._expire_oom_kills()
            if self._previous:
                async with self.lock:
                    self._release_previous()
            now = self.clock.now()
            for rep in starting:
                if now - rep.started_mono > rep.spec.health.start_timeout_s and not rep.removing:
                    await self._kill(rep, f"not ready after {rep.spec.health.start_timeout_s:g}s")
            await self._hold_to_memory([*starting, *targets])
            if targets:
                await asyncio.gather(*(self._ping(r) for r in targets))

    async def _pin_loop(self) -> None:
        """Every ``replica_pin_interval_s``, shorter than the ping interval: load that moves
        from one model to another (a client's turn, a benchmark's next point) finds its
        replica's loop on an ingress CPU within about half a second, not two pings."""
        while True:
            await self.clock.sleep(self.settings.replica_pin_interval_s)
            async with self.lock:
                ready = self._serving()
            self._move_loops(ready)

    def _serving(self) -> list[LocalReplica]:
        """The READY replicas that are staying, those pinged and whose loops may be pinned
        (under the lock)."""
        return [r for r in self.registry.values() if r.state == READY and r.address and not r.removing]

    def _move_loops(self, ready: Sequence[LocalReplica]) -> None:
        """The busiest READY replicas' event loops onto the ingress CPUs (``LoopPins``)."""
        assert self._loop_pins is not None
        ids = {r.pid: r.id for r in ready}
        was_busy = self._loop_pins.models_busy
        moves = self._loop_pins.rebalance(ids)
        if self._loop_pins.models_busy != was_busy:
            state = "keep CPUs busy: their event loops run free" if not was_busy else "are quiet again"
            log.info("replicas' models %s (replica_pin_loop)", state)
        for pid, cpu in moves:
            where = "on any CPU" if cpu is None else f"on CPU {cpu}"
            log.info("replica %s now runs its event loop %s (replica_pin_loop)", ids[pid], where)

    async def _hold_to_memory(self, replicas: Sequence[LocalReplica]) -> None:
        """Kill each replica whose processes use more memory (PSS) than its ``memory_mb``,
        measured in one walk of the process table, in a thread (:func:`memory_by_family`)."""

        def held(rep: LocalReplica) -> bool:
            # A model from a URI has no process while it downloads (pid 0), and is held once
            # it has one (before, never: its StagedProcess stands in for its whole life).
            return (
                rep.spec.resources.memory_mb > 0
                and not rep.removing
                and rep.state != REPLICA_DEAD
                and rep.pid > 0
            )

        replicas = [rep for rep in replicas if held(rep)]
        if not replicas:
            return
        usage = await asyncio.to_thread(memory_by_family, [rep.pid for rep in replicas])
        for rep in replicas:
            limit = rep.spec.resources.memory_mb
            used = usage.get(rep.pid)
            if used is not None and used > limit and held(rep):
                reason = f"used {used:.0f} MB of memory, over its limit of {limit:g} MB (resources.memory_mb)"
                log.warning("replica %s %s: killing it", rep.id, reason)
                await self._kill(rep, reason, crashed=True)

    async def _ping(self, rep: LocalReplica) -> None:
        pinger = self._pingers.get(rep.id)
        if pinger is None:
            pinger = self._pingers[rep.id] = self._client_factory(rep.address)
        try:
            result = await pinger.ping(rep.spec.health.ping_timeout_s)
        except ShoalError as err:
            rep.ping_failures += 1
            log.info(
                "replica %s missed ping %d/%d: %s",
                rep.id,
                rep.ping_failures,
                rep.spec.health.ping_failures,
                err,
            )
            if rep.ping_failures >= rep.spec.health.ping_failures and rep.state != REPLICA_DEAD:
                await self._kill(rep, f"failed {rep.ping_failures} pings in a row")
            return
        rep.ping_failures = 0
        rep.in_flight = result.in_flight
        rep.queued = result.queued
        rep.batch_sizes = dict(result.batch_sizes)
        rep.models = result if result.model_loads or result.model_hits else None

    # ------------------------------------------------------------ logs

    async def _rotate_logs(self) -> None:
        """Copy the last ``replica_log_max_mb`` of each running replica's log past it to
        ``.log.1`` and empty it."""
        limit = int(self.settings.replica_log_max_mb * 2**20)
        if limit <= 0:
            return
        for rep in list(self.registry.values()):
            try:
                size = rep.log_path.stat().st_size
            except OSError:
                continue
            if size > limit:
                try:
                    await asyncio.to_thread(rotate_log, rep.log_path, limit)
                except OSError as err:
                    log.warning("could not rotate %s: %s", rep.log_path, err)

    def _clean_logs(self) -> None:
        """Delete the logs (and spec files) of replicas that no longer run, but the newest
        ``replica_logs_kept``. On the event loop, so a replica created meanwhile is running."""
        ended = []
        for path in self.log_dir.glob("replica_*.log"):
            rid = path.name.removeprefix("replica_").removesuffix(".log")
            if rid in self.registry or f"{rid} (previous process)" in self._previous:
                continue
            try:
                ended.append((path.stat().st_mtime, rid))
            except OSError:
                continue
        ended.sort(reverse=True)
        for _, rid in ended[max(0, self.settings.replica_logs_kept) :]:
            for suffix in (".log", ".log.1", ".spec.json", ".stopping"):
                try:
                    (self.log_dir / f"replica_{rid}{suffix}").unlink(missing_ok=True)
                except OSError as err:
                    log.warning("could not delete the old log of replica %s: %s", rid, err)

    def log_path(self, replica_id: str) -> Path:
        """The log file of a replica started here (running or not). NotFound if there is none."""
        if not REPLICA_ID.fullmatch(replica_id):
            raise NotFound(f"no replica {replica_id!r}")
        path = self.log_dir / f"replica_{replica_id}.log"
        if not path.is_file():
            raise NotFound(f"no log for replica {replica_id!r} on scheduler {self.scheduler_id}")
        return path

    async def read_log(
        self, replica_id: str, tail_bytes: int = 0, follow: bool = False
    ) -> AsyncIterator[bytes]:
        """The replica's log from ``tail_bytes`` before its end (its rotated part, ``.log.1``,
        first); with ``follow``, then what it writes while it runs (ends once it has exited
        and everything is read)."""
        path = self.log_path(replica_id)
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            older = path.with_name(path.name + ".1")
            if (tail_bytes <= 0 or tail_bytes > size) and older.is_file():
                with open(older, "rb") as g:
                    osize = g.seek(0, os.SEEK_END)
                    g.seek(max(0, osize - (tail_bytes - size)) if tail_bytes > 0 else 0)
                    while chunk := g.read(64 * 1024):
                        yield chunk
            f.seek(max(0, size - tail_bytes) if tail_bytes > 0 else 0)
            while True:
                chunk = f.read(64 * 1024)
                if chunk:
                    yield chunk
                    continue
                if not follow or replica_id not in self.registry:
                    return
                if os.fstat(f.fileno()).st_size < f.tell():
                    f.seek(0)  # rotated meanwhile: what it writes now starts at 0
                await self.clock.sleep(0.2)

    # ------------------------------------------------------------ views

    def reports(self) -> tuple[int, list[ReplicaReport]]:
        """(registry version, every replica's state plus the replicas that ended and are not
        acknowledged yet, with their exit reasons).

        Reading does not clear the ended ones: a health call that fails, or a NACK and the
        registration after it, would lose the exit reason. Call :meth:`acknowledge` with the
        version once the head has taken the report."""
        out = [r.report() for r in self.registry.values()]
        out.extend(tomb for _, tomb in self._tombstones)
        return self.version, out

    def acknowledge(self, version: int) -> None:
        """The head took a report of registry ``version``: forget the replicas that ended by then."""
        self._tombstones = [(v, tomb) for v, tomb in self._tombstones if v > version]

    def allocated(self) -> Capacity:
        return Capacity.total(Capacity.of(r.spec.resources) for r in self.registry.values())

    def _keep_counts(self, rep: LocalReplica) -> None:
        """Add what ``rep`` counted (as its last ping said) to what the exited replicas of its
        deployment did. /metrics sums the counts of the replicas here: one that exited took
        its counts out of the sum, and ``shoal_batch_size`` went down (``rate()`` reads a
        decrease as a restart from 0)."""
        before = self.exited.get(rep.spec.name)
        models = rep.models

        def added(name: str) -> dict[str, int]:
            return _added_ids(getattr(before, name, {}), getattr(models, name, {}))

        self.exited[rep.spec.name] = ReplicaView(
            "",
            rep.spec.name,
            STOPPED,
            0,
            dict(
                collections.Counter(before.batch_sizes if before else {})
                + collections.Counter(rep.batch_sizes)
            ),
            added("model_loads"),
            added("model_evictions"),
            added("model_hits"),
        )

    def snapshot(self) -> SupervisorSnapshot:
        """What /metrics shows of the replicas on this machine, copied: readers never hold
        the registry's entries."""
        return SupervisorSnapshot(
            replicas=tuple(
                ReplicaView(
                    r.id,
                    r.spec.name,
                    r.state,
                    r.in_flight,
                    dict(r.batch_sizes),
                    r.models.model_loads if r.models else {},
                    r.models.model_evictions if r.models else {},
                    r.models.model_hits if r.models else {},
                )
                for r in self.registry.values()
            ),
            exited=tuple(self.exited.values()),
            starts=dict(self.starts),
            deaths=dict(self.deaths),
            allocated=self.allocated(),
        )

    def process_ids(self) -> list[int]:
        return [r.pid for r in self.registry.values()]

    # ------------------------------------------------------------ shutdown

    def stop_creating(self) -> None:
        """Shutting down: :meth:`create` refuses from now on; the replicas running go on."""
        self._closing = True

    async def aclose(self, grace_s: float) -> None:
        """Drain every replica (up to ``grace_s``), kill what is left, stop all tasks."""
        async with self.lock:
            self._closing = True
            reps = list(self.registry.values())
        for rep in reps:
            await self.remove(rep.id, graceful=grace_s > 0, grace_s=grace_s)
        if reps:
            waits = [r.process.wait() for r in reps]
            if not await self.clock.wait(asyncio.gather(*waits), grace_s + 3.0):
                for rep in reps:
                    _signal(rep.process, signal.SIGKILL)
                await asyncio.gather(*(r.process.wait() for r in reps))
        await self._tasks.aclose()
        await self.artifacts.aclose()
        for pinger in self._pingers.values():
            await pinger.close()
        self._pingers.clear()


def _start_time(pid: int) -> float:
    """When process ``pid`` started (0.0 when it cannot be read): with its pid, it tells the
    process apart from a later one given the same pid."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return 0.0


def _running(pid: int, started: float) -> bool:
    """Whether process ``pid`` runs and is the one that started at ``started`` (within 2 s:
    the boot time psutil counts from may move by a second when the clock is adjusted)."""
    try:
        proc = psutil.Process(pid)
        same = not started or abs(proc.create_time() - started) < 2.0
        return same and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, OSError):
        return False


def memory_by_family(pids: Iterable[int]) -> dict[int, float]:
    """For each of ``pids`` that runs, the memory it and every process it started use, in MB:
    the sum of their proportional set sizes (``/proc/PID/smaps_rollup``; resident set sizes
    where that cannot be read). Those that do not run are left out. Blocks: call it in a
    thread.

    One walk of the process table for all of them. A walk per replica
    (``psutil.Process.children`` reads every process's parent) took 0.76 s for 100 replicas
    (180 processes on the machine), every ping interval, on the scheduler's event loop."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    running = set()
    for proc in psutil.process_iter(["ppid"]):
        running.add(proc.pid)
        ppid = proc.info["ppid"]
        if ppid is not None:
            children[ppid].append(proc.pid)
    out = {}
    for pid in pids:
        if pid not in running:
            continue
        total, family, seen = 0, [pid], set()
        while family:
            member = family.pop()
            if member in seen:
                continue
            seen.add(member)
            total += _used_bytes(member)
            family.extend(children.get(member, ()))
        out[pid] = total / 2**20
    return out


def memory_mb(pid: int) -> float | None:
    """What :func:`memory_by_family` says of ``pid`` alone; None when it does not run."""
    return memory_by_family([pid]).get(pid)


def _used_bytes(pid: int) -> int:
    """Process ``pid``'s proportional set size, or resident set size where that cannot be
    read; 0 once it has ended."""
    try:
        return _pss(pid)
    except OSError:
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except (psutil.Error, OSError):
            return 0  # it ended meanwhile


def _pss(pid: int) -> int:
    """Process ``pid``'s proportional set size in bytes. Raises OSError when unreadable."""
    with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
        for line in f:
            if line.startswith(b"Pss:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no Pss in /proc/{pid}/smaps_rollup")


def _signal(process: Process, sig: int) -> None:
    if process.returncode is None:
        try:
            process.send_signal(sig)
        except ProcessLookupError:
            pass


def rotate_log(path: Path, keep_bytes: int) -> None:
    """Copy the last ``keep_bytes`` of ``path`` to ``path.1`` (replacing it), from the first
    line that starts in them, and empty ``path`` in place, so a process writing to it in
    append mode carries on at its start. Raises OSError.

    Only the tail: a model printing in a loop grows its log by what it writes in a ping
    interval, far past the cap, and a whole copy made ``.log.1`` as large and read and wrote
    all of it again (221 MB each with a 10 MB cap)."""
    with open(path, "r+b") as src, open(path.with_name(path.name + ".1"), "wb") as dst:
        end = src.seek(0, os.SEEK_END)
        start = max(0, end - keep_bytes)
        src.seek(max(0, start - 1))
        if start > 0 and src.read(1) != b"\n" and not src.readline(end - start).endswith(b"\n"):
            src.seek(start)  # no line starts in the tail: the tail as it is
        left = end - src.tell()
        while left > 0 and (chunk := src.read(min(left, 2**20))):
            dst.write(chunk)
            left -= len(chunk)
        src.truncate(0)


_CRASH_SIGNALS = frozenset(
    {
        signal.SIGSEGV,
        signal.SIGABRT,
        signal.SIGBUS,
        signal.SIGFPE,
        signal.SIGILL,
        signal.SIGSYS,
        signal.SIGTRAP,
    }
)


def _crashed(code: int) -> bool:
    """Whether a replica that exited unasked with ``code`` crashed: an error status or a crash
    signal. Not a kill from outside (SIGKILL: ``kill -9``; SIGTERM; the kernel's OOM killer is
    told apart where it is counted: ``_oom_killed``), nor status 0 (it stopped as asked, or
    lost its scheduler)."""
    return code > 0 or (code < 0 and -code in _CRASH_SIGNALS)


EXITED_MODEL_IDS = 256
"""Most model ids counted by name in what a deployment's exited replicas counted, as a
replica counts them (``shoal.replica.multiplex.MAX_COUNTED_IDS``); the rest add up under
``_other``, so replicas that each served other ids add up to a bounded set."""


def _added_ids(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    for model_id, n in b.items():
        key = model_id if model_id in out or len(out) < EXITED_MODEL_IDS else "_other"
        out[key] = out.get(key, 0) + n
    return out


def _exit_reason(code: int, log_path: Path, *, quit: bool = False) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"process killed by {name}"
    unasked = " without being asked to stop" if quit else ""
    return f"process exited with code {code}{unasked}{_last_line(log_path)}"


_SHOAL_ERROR = re.compile(r"^shoal\.errors\.[A-Za-z]+: ")
"""The class path a shoal error's traceback ends its last line with."""


def _last_line(path: Path) -> str:
    """The last non-empty line of a replica's log, to explain why it died. A shoal error's
    traceback (a model's load that failed) ends in its class path, which is left out: the
    message reads as shoal's other errors do (``Model(**options) raised ValueError: ...``,
    before ``shoal.errors.InvalidArgument: Model(**options) raised ValueError: ...``)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return f": {_SHOAL_ERROR.sub('', lines[-1])[:300]}" if lines else ""

"""A scheduler: one per machine. Runs the supervisor and the router, and keeps
in touch with the head (registration, health updates, routing table)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from shoal.auth import InferenceAuth
from shoal.config import Settings
from shoal.core.clock import Clock, SystemClock
from shoal.core.limits import SCHEDULER_ID, scheduler_id_problem
from shoal.core.placement import Capacity
from shoal.core.spec import DeploymentSpec
from shoal.core.tasks import TaskSet
from shoal.errors import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ShoalError,
    Unavailable,
)
from shoal.scheduler import machine
from shoal.scheduler.dataplane import DataPlane
from shoal.scheduler.gpus import Devices, GpuPool, machine_devices
from shoal.scheduler.ingress import Counts, IngressHub, ingress_processes, snapshot
from shoal.scheduler.models import ModelCatalog
from shoal.scheduler.router import Router
from shoal.scheduler.supervisor import Launcher, ReplicaSupervisor
from shoal.types import HeadLink, LoadReport, ReplicaClient, SchedulerRegistration

log = logging.getLogger("shoal.scheduler")

ROUTES_CONFIRM_S = 1.0
"""How long a scheduler waits for its ingress workers to route by a new table before it
stops waiting (it tells the head once a later table is routed by everywhere)."""

# The longest a scheduler whose id the head refused waits before its one more try.
REFUSED_RETRY_MAX_S = 60.0


def scheduler_id(settings: Settings) -> str:
    """The id this scheduler registers with: ``settings.scheduler_id`` when set, else the id
    kept in ``<state_dir>/scheduler_id``, made (``sched-<hex>``) and written there at the
    first start. Kept, a restarted scheduler takes its old place at the head instead of
    joining as a new member beside a DEAD one. Does file I/O: call it at the entrypoint.
    InvalidArgument for a ``settings.scheduler_id`` the head would refuse at every try
    (``shoal.core.limits.SCHEDULER_ID``; ``Settings.load`` refuses it already)."""
    if settings.scheduler_id:
        problem = scheduler_id_problem(settings.scheduler_id)
        if problem is not None:
            raise InvalidArgument(f"scheduler_id: {problem}")
        return settings.scheduler_id
    path = Path(settings.state_dir) / "scheduler_id"
    try:
        kept = path.read_text().strip()
    except FileNotFoundError:
        kept = ""
    if SCHEDULER_ID.fullmatch(kept):
        return kept
    new = f"sched-{secrets.token_hex(4)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(new + "\n")
    tmp.replace(path)  # atomic: a crash leaves the old file or the new one, never half
    return new


def machine_capacity(settings: Settings, gpus: Devices | None = None) -> Capacity:
    """CPUs and memory this process may use (``shoal.scheduler.machine``: the machine's, or
    less under a CPU affinity or a control group's limits), GPUs from ``gpus``
    (:func:`gpu_devices` by default); settings override."""
    cpus = settings.cpus if settings.cpus >= 0 else _usable(machine.usable_cpus, "cpus")
    memory = settings.memory_mb if settings.memory_mb >= 0 else _usable(machine.usable_memory_mb, "memory_mb")
    devices = gpus if gpus is not None else gpu_devices(settings)
    return Capacity(cpus, memory, devices.total)


REPLICA_MEMORY_MB = 128
"""The least memory a replica is taken to use when ``max_replicas`` is derived (-1): a
Python interpreter with gRPC and numpy, before its model."""
MAX_REPLICAS_DEFAULT = 100
"""The most replicas a derived ``max_replicas`` allows, however much memory is offered, as
Kubernetes' 110 pods a node: past it the pings, health reports and start-ups of the
replicas alone take the scheduler's CPUs."""


MIN_START_SLOTS = 4
"""The fewest concurrent starts a derived ``max_concurrent_starts`` allows: a model's load
waits on its disk as much as on a CPU."""


def start_slots(setting: int, cpus: float) -> int:
    """The replica processes a scheduler offering ``cpus`` starts at once under
    ``max_concurrent_starts`` ``setting``: as set (0: no bound), or for -1 the CPUs rounded
    up, at least ``MIN_START_SLOTS``."""
    if setting >= 0:
        return setting
    return max(MIN_START_SLOTS, math.ceil(cpus))


def replica_slots(setting: int, memory_mb: float) -> int:
    """The replicas a scheduler offering ``memory_mb`` runs at most under ``max_replicas``
    ``setting``: as set (0: no bound), or for -1 one per ``REPLICA_MEMORY_MB``, from 1 to
    ``MAX_REPLICAS_DEFAULT``. Without a bound, a 2-CPU machine took 200 replicas of
    ``cpus: 0.01`` (each 50 MB and more) and ran out of memory."""
    if setting >= 0:
        return setting
    return max(1, min(MAX_REPLICAS_DEFAULT, int(memory_mb // REPLICA_MEMORY_MB)))


def _usable(measure: Callable[[], machine.Bound], resource: str) -> float:
    """What ``measure`` says this process may use, logged when it is less than the machine's."""
    bound = measure()
    if bound.source != machine.MACHINE:
        log.info("offering %s %g, less than the machine's: %s", resource, bound.value, bound.source)
    return bound.value


def gpu_devices(settings: Settings) -> Devices:
    """The GPUs this scheduler offers its replicas: ``settings.gpus`` of them (all it sees
    when below 0), from its own ``CUDA_VISIBLE_DEVICES`` when set, else counted by NVML."""
    return machine_devices(settings.gpus, os.environ, _count_gpus)


NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")
"""The NVIDIA driver's folder of one entry per GPU (by PCI address): the count when NVML's
Python binding (``nvidia-ml-py``) is not installed."""


def _count_gpus() -> int:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        try:
            return sum(1 for _ in NVIDIA_PROC.iterdir())
        except OSError:  # no NVIDIA driver
            return 0
    try:
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


class SchedulerNode:
    """Lifecycle: ``start(address, http_address)`` once servers are bound; ``aclose()``.

    The seams: ``head`` (the head, :class:`~shoal.testing.fakes.FakeHeadLink` in tests),
    ``replica_client`` (replicas), ``launcher`` (replica processes; ``ChildProcess.spawn``
    by default) and ``clock`` (heartbeats, pings and deadlines; the system's by default).
    """

    def __init__(
        self,
        settings: Settings,
        scheduler_id: str,
        head: HeadLink,
        replica_client: Callable[[str], ReplicaClient],
        *,
        policy: str = "p2c",
        router: Router | None = None,
        launcher: Launcher | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.id = scheduler_id
        self.head = head
        self.address = ""
        self.http_address = ""
        devices = gpu_devices(settings)
        self.capacity = machine_capacity(settings, devices)
        self.max_replicas = replica_slots(settings.max_replicas, self.capacity.memory_mb)
        self._report_now = asyncio.Event()
        # A request waiting for a deployment with no replica: tell the head now, so
        # that it scales up from zero without waiting for the next heartbeat.
        # Ingress workers route by a table this process pushes them; bumped on every change.
        self.table_version = 0
        # The newest head table this process and every ingress worker route by: told to the
        # head with each health update, at once after a table it asked that of (ack).
        self.routes_version = 0
        self._confirming: asyncio.Task[None] | None = None
        self._slow_workers = False
        self.table_changed = asyncio.Event()
        self.router = router or Router(
            scheduler_id,
            settings,
            replica_client,
            policy=policy,
            on_starved=self._report_now.set,
            share=ingress_processes(settings),
            on_change=self._table_changed,
            clock=self.clock,
        )
        self.hub = IngressHub(self.router, on_starved=self._report_now.set)
        self.supervisor = ReplicaSupervisor(
            settings,
            self.router,
            replica_client,
            log_dir=Path(settings.state_dir) / "logs",
            scheduler_address=lambda: self.address,
            on_change=self._report_now.set,
            launcher=launcher,
            clock=self.clock,
            gpus=GpuPool(devices),
            max_starts=start_slots(settings.max_concurrent_starts, self.capacity.cpus),
            max_replicas=self.max_replicas,
        )
        self._tasks = TaskSet(f"scheduler {scheduler_id}")
        # The drains of this scheduler's other ingress processes (``shoal.run.IngressWorkers``):
        # each refuses new requests and returns once those it admitted are answered.
        self.ingress_drains: list[Callable[[float], Awaitable[object]]] = []
        self.ingress_kills: list[Callable[[], None]] = []  # each ingress worker pool's kill_now
        self.registered = asyncio.Event()
        self.on_registered: Callable[[], None] = lambda: None  # after each registration
        # Set when the head refused this scheduler's id (another live scheduler holds it):
        # it no longer registers, and ``on_refused`` is called once, for the process to stop.
        self.refused: AlreadyExists | None = None
        self.on_refused: Callable[[], None] = lambda: None
        # One catalog and one door behind every ingress: statistics count every door.
        self.catalog = ModelCatalog(self.router, ready=self._ready, totals=self._totals)
        self.dataplane = DataPlane(self.router, self.catalog, settings)
        # Inference tokens per deployment, from the head's routing tables.
        self.inference_auth = InferenceAuth(self._spec_of)

    def _ready(self) -> bool:
        # With its first routing table: before it, requests for models it does not run
        # itself are refused UNAVAILABLE (Router.has_table).
        return self.registered.is_set() and self.router.has_table and not self.router.draining

    def _table_changed(self) -> None:
        self.table_version += 1
        self.table_changed.set()

    def totals(self) -> dict[str, Counts]:
        """Per deployment, what this process and its ingress workers counted, summed."""
        return self.hub.totals(snapshot(self.router, self.catalog))

    async def _totals(self) -> dict[str, Counts]:
        return self.totals()

    def load(self) -> dict[str, LoadReport]:
        """Per deployment: in flight, queued and cumulative counts over every ingress process
        (what the head's autoscaler and dashboard see)."""
        return {name: c.load() for name, c in self.totals().items()}

    def _spec_of(self, deployment: str) -> DeploymentSpec | None:
        try:
            return self.router.spec(deployment)
        except NotFound:
            return None

    def start(self, address: str, http_address: str) -> None:
        self.address = address
        self.router.awaits_table = True  # the head's tables say which deployments exist
        self.http_address = http_address
        self.supervisor.start()
        self._tasks.spawn(self._head_loop(), "head")
        self._tasks.spawn(self._routes_loop(), "routes")
        log.info(
            "scheduler %s at %s: %.1f cpus, %.0f MB, %g gpus, %s",
            self.id,
            address,
            self.capacity.cpus,
            self.capacity.memory_mb,
            self.capacity.gpus,
            f"at most {self.max_replicas} replicas" if self.max_replicas else "no bound on replicas",
        )

    async def _head_loop(self) -> None:
        backoff = 0.1
        refused_once = False
        full = False  # the head refused this scheduler for want of room (max_schedulers): said once
        refusal = ""  # the head's last reason for refusing the registration itself: said once
        while True:
            try:
                _, replicas = self.supervisor.reports()
                reg = SchedulerRegistration(
                    scheduler_id=self.id,
                    address=self.address,
                    http_address=self.http_address,
                    capacity=self.capacity,
                    pid=os.getpid(),
                    hostname=socket.gethostname(),
                    replicas=tuple(r for r in replicas if r.state not in ("DEAD", "STOPPED")),
                    max_replicas=self.max_replicas,
                    says_routes=True,
                )
                try:
                    interval = await self.head.register(reg) or self.settings.heartbeat_interval_s
                except AlreadyExists as err:
                    # Another live scheduler holds this id: taking it would make the two take
                    # turns at one place at the head. One more try, once the head has had
                    # time to declare the holder dead: it may be this scheduler's previous
                    # process, killed a moment ago, whose end the head has not seen yet (a
                    # restart right after kill -9 on a loaded machine was refused for good).
                    if refused_once:
                        self._refuse(err)
                        return
                    refused_once = True
                    wait = min(self.settings.dead_after_s + 1.0, REFUSED_RETRY_MAX_S)
                    log.warning("%s; trying once more in %.0fs", err, wait)
                    await self.clock.sleep(wait)
                    continue
                except ResourceExhausted as err:
                    # The head keeps as many schedulers as it may (max_schedulers): a place
                    # frees when one is declared dead. Tried again each heartbeat, said once.
                    if not full:
                        log.warning(
                            "the head refused this scheduler: %s; trying again every %gs",
                            err,
                            self.settings.heartbeat_interval_s,
                        )
                    full = True
                    await self.clock.sleep(self.settings.heartbeat_interval_s)
                    continue
                if full:
                    full = False
                    log.info("the head has room for this scheduler now")
                if refusal:
                    refusal = ""
                    log.info("the head takes this scheduler's registration and reports now")
                log.info("registered with the head")
                # A head started again numbers its tables from 1: say none until its next.
                self.routes_version = 0
                self.registered.set()
                self.on_registered()
                backoff = 0.1
                while True:
                    version, reports = self.supervisor.reports()
                    ack = await self.head.health(self.id, version, reports, self.load(), self.routes_version)
                    if not ack:
                        log.warning("the head does not know this scheduler (NACK); registering again")
                        self.registered.clear()
                        break
                    # Only now are the exit reasons of ended replicas the head's: a call that
                    # failed or was NACKed carries them again in the next report.
                    self.supervisor.acknowledge(version)
                    await self.clock.wait(self._report_now.wait(), interval)
                    self._report_now.clear()
            except (Unavailable, DeadlineExceeded):
                # GrpcHeadLink logs the first failure; keep serving from the last routing table.
                self.registered.clear()
                await self.clock.sleep(backoff)
                backoff = min(backoff * 2, self.settings.heartbeat_interval_s)
            except ShoalError as err:
                # The head answered, and refused: the wrong certificate in this scheduler's
                # place (PERMISSION_DENIED), a registration or report it does not take (an
                # older head). Retried in silence before, the scheduler serving no one.
                # Said once (again only if the reason changes), tried each heartbeat.
                self.registered.clear()
                if str(err) != refusal:
                    refusal = str(err)
                    log.error(
                        "the head refused this scheduler's registration or report: %s (%s); "
                        "trying again every %gs",
                        err,
                        err.code.name,
                        self.settings.heartbeat_interval_s,
                    )
                await self.clock.sleep(self.settings.heartbeat_interval_s)

    def _refuse(self, err: AlreadyExists) -> None:
        """The head refused this scheduler's id: stop trying, and tell the process
        (``on_refused``), which exits with ``refused`` as its one-line error."""
        where = (
            ""
            if self.settings.scheduler_id
            else f"; this id is kept in {Path(self.settings.state_dir) / 'scheduler_id'}"
        )
        self.refused = AlreadyExists(f"the head refused this scheduler: {err}{where}")
        log.error("%s", self.refused)
        self.registered.clear()
        self.on_refused()

    async def _routes_loop(self) -> None:
        backoff = 0.1
        while True:
            try:
                async for table in self.head.watch_routes(self.id):
                    backoff = 0.1
                    self.inference_auth.apply_table(table)
                    self.hub.set_head_table(table)
                    await self.router.apply_table(table)
                    self.hub.ack = table.ack
                    self._table_changed()
                    if self._confirming is not None:
                        self._confirming.cancel()
                    # The first table since registering is said at once too: until its word
                    # the head waits for this scheduler on every table a control call changes.
                    first = self.routes_version == 0
                    self._confirming = asyncio.create_task(self._confirm(table.version, table.ack or first))
            except ShoalError:
                pass
            await self.clock.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _confirm(self, head_version: int, ack: bool) -> None:
        """Once every ingress worker routes by the replica table made from head table
        ``head_version`` (at most ROUTES_CONFIRM_S), say so to the head: at once when it asked
        (``ack``: a control call waits on it), else with the next health update."""
        if await self.hub.routed_by_workers(self.table_version, ROUTES_CONFIRM_S):
            self.routes_version = max(self.routes_version, head_version)
            self._slow_workers = False
            if ack:
                self._report_now.set()
        elif not self._slow_workers:
            self._slow_workers = True  # said once until they keep up again
            log.warning(
                "an ingress worker did not take routing table %d within %gs: the head, which may "
                "wait for it, is told once the workers have a later one",
                head_version,
                ROUTES_CONFIRM_S,
            )

    def kill_now(self) -> None:
        """SIGKILL the ingress workers and every replica (its process group: what its model
        started too), without draining: the process is about to exit (a second signal at
        shutdown, ``shoal.run``). The head treats it as a scheduler killed."""
        for kill in self.ingress_kills:
            kill()
        self.supervisor.kill_now()

    async def aclose(self, grace_s: float | None = None) -> None:
        """Shut down within ``grace_s`` (``shutdown_grace_s``): take no new replica and refuse
        new requests (every ingress process), let the requests admitted finish, then drain and
        stop every replica, then stop talking to the head.

        Requests before replicas: a replica drained while requests were still queued in a
        router for it left them waiting for a replica that would never come (the HTTP server
        then cancelled them: 500). A request not answered when the grace runs out is refused
        (Unavailable, ``the scheduler is shutting down``)."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        started = self.clock.now()
        self.supervisor.stop_creating()
        await asyncio.gather(self.router.drain(grace), *(drain(grace) for drain in self.ingress_drains))
        await self.supervisor.aclose(max(0.0, grace - (self.clock.now() - started)))
        # One last health update so the head learns the replicas are gone; not from a
        # scheduler the head refused: that id's updates are the other scheduler's.
        if self.refused is None:
            try:
                version, reports = self.supervisor.reports()
                await self.clock.wait(self.head.health(self.id, version, reports, {}), 1.0)
            except ShoalError:
                pass
        if self._confirming is not None:
            self._confirming.cancel()
        await self._tasks.aclose()
        await self.router.aclose()
        await self.head.close()

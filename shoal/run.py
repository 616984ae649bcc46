"""Assembling components into processes: bind servers, wire nodes, handle signals.

``run_head``, ``run_scheduler`` and ``run_up`` (head + one scheduler in one
process) run until SIGTERM/SIGINT, then shut down gracefully: replicas drain
within ``shutdown_grace_s`` and nothing is left behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

from shoal import logs, metrics
from shoal.auth import RateLimiter
from shoal.config import Settings
from shoal.core import affinity
from shoal.core.clock import wait_for
from shoal.core.reuseport import deal_port_in_turn
from shoal.core.tasks import TaskSet
from shoal.errors import FailedPrecondition, InvalidArgument
from shoal.head.blob_mirror import BlobMirror
from shoal.head.blobs import BlobStore, drop_holder_at, holder_addresses, in_use, standby_holder
from shoal.head.leader import LeaderInfo, Leadership, lease_ttl
from shoal.head.node import HeadNode
from shoal.http.head import head_app
from shoal.http.scheduler import refuse_when_full, scheduler_app, shutdown_parser
from shoal.http.server import HttpLimits, HttpServer
from shoal.http.standby import StandbyApp
from shoal.ingress_worker import repository_of, settings_doc, tls_files
from shoal.proto import grpc_service_pb2_grpc as oipg
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.auth import HEAD_RULES, SCHEDULER_RULES, AuthInterceptor
from shoal.rpc.blobs import GrpcBlobSource, GrpcHeadPeers, HeadBlobService, SchedulerBlobService
from shoal.rpc.clients import GrpcHeadLink, GrpcReplicaClient, GrpcSchedulerClient
from shoal.rpc.etcd_client import EtcdTarget, etcd_client, parse_store_url
from shoal.rpc.head_service import HeadService
from shoal.rpc.hop import hop_dir, release_hop_dir
from shoal.rpc.inference_service import InferenceService
from shoal.rpc.ingress import IngressService
from shoal.rpc.scheduler_service import SchedulerService
from shoal.rpc.server import bind, new_server
from shoal.rpc.standby import StandbyInterceptor
from shoal.rpc.tls import announce_transport, check_transport, server_credentials
from shoal.scheduler.blob_fetch import Announcer
from shoal.scheduler.child import ChildProcess
from shoal.scheduler.ingress import IngressHub, ingress_processes, snapshot
from shoal.scheduler.node import SchedulerNode, scheduler_id
from shoal.scheduler.supervisor import Process
from shoal.store.base import Store
from shoal.store.etcd import EtcdStore
from shoal.store.sqlite import SqliteStore
from shoal.zygote import Zygote

log = logging.getLogger("shoal")


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


HEAD_PORTS = ("head_port", "head_http_port")
SCHEDULER_PORTS = ("grpc_port", "http_port")


def check_ports(settings: Settings, names: tuple[str, ...]) -> None:
    """Refuse the port settings ``names`` (0, a free port, is never refused): InvalidArgument
    when two name the same port, FailedPrecondition when another process listens on one.

    The inference ports are bound with SO_REUSEPORT when several ingress processes share
    them, and the kernel lets any process of the same user join such a port: a second
    ``shoal up`` on a running one's ports started and took a share of its connections
    (its requests got 404 from the first's models). Two of one process's ports equal did
    the same (gRPC on the HTTP port then failed with 'Failed parsing HTTP/2')."""
    seen: dict[int, str] = {}
    for name in names:
        port = getattr(settings, name)
        if port == 0:
            continue
        if port in seen:
            raise InvalidArgument(f"{seen[port]} and {name} are both {port}: each needs a port of its own")
        seen[port] = name
    for port, name in seen.items():
        if _listened_on(settings.host, port):
            raise FailedPrecondition(
                f"port {port} is in use ({name}): another process listens on {_addr(settings.host, port)}"
            )


def _listened_on(host: str, port: int) -> bool:
    """Whether a socket listens on ``host:port``: binding it without SO_REUSEPORT fails then,
    whether the listener shares its port or not. With SO_REUSEADDR, as the servers bind, so
    that the closed connections of an earlier run (TIME_WAIT) do not count. Any other failure
    (an address not on this machine) is left to the servers' own bind to report."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    return True
    return False


def _write_endpoints(state_dir: Path, **endpoints: str) -> None:
    path = state_dir / "endpoints.json"
    current: dict[str, str] = {}
    if path.exists():
        try:
            current = json.loads(path.read_text())
        except ValueError:
            current = {}
    current.update(endpoints)
    path.write_text(json.dumps(current, indent=2))


async def start_head(
    settings: Settings, stack: AsyncExitStack, on_lost: Callable[[], None] | None = None
) -> tuple[HeadNode, str, str]:
    """Open the store and serve the head. On SQLite the head starts at once; on etcd it
    stands by until it leads (``_lead``), and ``on_lost`` is called if it stops leading."""
    check_transport(settings, "head")
    check_ports(settings, HEAD_PORTS)
    state_dir = Path(settings.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    store, created = await _open_store(settings, state_dir)
    stack.push_async_callback(store.close)
    node = HeadNode(settings, store, lambda sid, addr: GrpcSchedulerClient(sid, addr, settings))
    leadership = None
    if isinstance(store, EtcdStore):
        leadership = Leadership(
            store, store.leader_key, LeaderInfo("", ""), ttl_s=lease_ttl(settings.dead_after_s)
        )
        node.on_isolated = leadership.step_down  # cut from every scheduler: a standby leads
    # One rate limit for the control API, over gRPC and REST together.
    limiter = RateLimiter(settings.control_rate_limit)
    guard = AuthInterceptor(HEAD_RULES, tls=bool(settings.tls_dir), tokens=node.tokens, limiter=limiter)
    server = new_server(settings, [guard] if leadership is None else [StandbyInterceptor(leadership), guard])
    pbg.add_HeadServicer_to_server(HeadService(node), server)
    # The cluster's artifact store: on this head's disk, beside the SQLite file (also on etcd).
    blobs = BlobStore(
        state_dir / "blobs",
        max_bytes=settings.max_blob_mb * 2**20,
        grace_s=settings.blob_grace_s,
        max_total=settings.max_blobs_mb * 2**20,
        max_count=settings.max_blobs,
    )
    node.blobs = blobs
    pbg.add_BlobServicer_to_server(HeadBlobService(blobs, node), server)
    stack.push_async_callback(blobs.aclose)
    port = bind(server, settings.host, settings.head_port, server_credentials(settings, "head"))
    tls = tls_files(settings, "head")
    app = head_app(node, limiter)
    http = HttpServer(
        app if leadership is None else StandbyApp(app, leadership),
        settings.host,
        settings.head_http_port,
        tls,
        limits=HttpLimits.of(settings),
    )
    if leadership is None:
        await node.start(new_store=created)
        _collect_blobs(node)
        stack.push_async_callback(node.aclose)
    await server.start()
    stack.push_async_callback(server.stop, 1.0)
    await http.start()
    stack.push_async_callback(http.stop)
    address = _addr(settings.advertised, port)
    http_address = _addr(settings.advertised, http.port)
    _write_endpoints(state_dir, head=address, head_http=http_address)
    log.info("head listening on %s (gRPC) and %s://%s (REST, dashboard)", address, http.scheme, http_address)
    if leadership is None:
        _mirror_blobs(settings, node, blobs, store, standby_holder(address), stack)
    else:
        leadership.me = LeaderInfo(address, http_address)
        _mirror_blobs(settings, node, blobs, store, standby_holder(address), stack, leadership)
        tasks = TaskSet("head")
        stack.push_async_callback(tasks.aclose)  # before the servers stop: resign first
        tasks.spawn(_lead(leadership, node, on_lost), "leadership")
    return node, address, http_address


def _collect_blobs(node: HeadNode) -> None:
    """Collect the blobs no deployment names, once the head has loaded what it leads."""
    if node.blobs is not None:
        node.blobs.start(lambda: in_use(node), every_s=min(60.0, node.blobs.grace_s))


def _mirror_blobs(
    settings: Settings,
    node: HeadNode,
    blobs: BlobStore,
    store: Store,
    me: str,
    stack: AsyncExitStack,
    leadership: Leadership | None = None,
) -> None:
    """Fetch back the listed blobs this head lacks from the schedulers holding them
    (shoal.head.blob_mirror; ``me``: this head's holder name). With standby heads
    (``leadership``) every head keeps a copy of every blob too, and collects, as leader,
    what no deployment names, as a standby, what the index drops; the single head collects
    already (_collect_blobs)."""
    peers = GrpcHeadPeers(settings, me)
    stack.push_async_callback(peers.aclose)
    mirror = BlobMirror(
        blobs,
        store,
        peers,
        leading=lambda: leadership is None or leadership.serving,
        leader=lambda: (
            leadership.leader.grpc if leadership and leadership.leader and not leadership.leading else None
        ),
        named=lambda: in_use(node),
        holders=lambda sha256: holder_addresses(node, blobs, sha256),
        gone=lambda sha256, address: drop_holder_at(node, blobs, sha256, address),
    )
    mirror.start()
    stack.push_async_callback(mirror.aclose)
    if leadership is not None:
        blobs.start(lambda: in_use(node) if leadership.serving else mirror.listed(), min(60.0, blobs.grace_s))


async def _open_store(settings: Settings, state_dir: Path) -> tuple[SqliteStore | EtcdStore, bool]:
    """The store, and whether this call created it: a SQLite file that did not exist (nor its
    write-ahead log) and holds nothing once open. Never an etcd store: other heads share it."""
    if not settings.store:
        path = state_dir / "state.db"
        existed = path.exists() or Path(f"{path}-wal").exists()
        sqlite = await SqliteStore(path).open()
        return sqlite, not existed and not await sqlite.list()
    target = EtcdTarget(parse_store_url(settings.store), settings.store_tls_dir)
    store = await EtcdStore(etcd_client(target), root=settings.store_root, name=settings.store).open()
    log.info("state store: %s (key prefix %r)", settings.store, settings.store_root)
    return store, False


async def _lead(leadership: Leadership, node: HeadNode, on_lost: Callable[[], None] | None) -> None:
    """Stand by until this head leads; then run the head (which adopts the running replicas
    as a restarted head does) until leadership is lost, and stop acting at once."""
    log.info("standing by for leadership (lease TTL %ds)", leadership.ttl_s)
    try:
        await leadership.campaign()
        try:
            async with asyncio.TaskGroup() as tg:
                # Renew the lease while the state loads too: loading may outlast the TTL.
                holding = tg.create_task(leadership.hold())
                starting = tg.create_task(_serve_as_leader(leadership, node))
                await asyncio.wait([holding])
                starting.cancel()
            log.critical("this head no longer leads: it stops (start it again to stand by)")
        finally:
            node.pause()
            await node.aclose()
            await leadership.resign()
    except Exception:
        # A head that cannot take over (the store failed while it loaded) must not linger
        # as a standby that never campaigns again.
        log.exception("this head failed to lead: it stops (start it again to stand by)")
    if on_lost is not None:
        on_lost()


async def _serve_as_leader(leadership: Leadership, node: HeadNode) -> None:
    await node.start()  # blobs: collected already (_mirror_blobs)
    leadership.serving = leadership.leading


async def start_scheduler(
    settings: Settings, stack: AsyncExitStack, head_address: str, zygote: Zygote | None = None
) -> tuple[SchedulerNode, str, str]:
    """Bind the scheduler's ports and start it. The head, the replicas and peer schedulers
    reach this process on a control port of its own (the address it registers), apart from
    the inference ports. With several ingress processes (``ingress_workers``), the inference
    ports are shared (SO_REUSEPORT) with workers this process starts and restarts. With
    ``zygote``, ingress workers and replicas are forked from it (``shoal.zygote``)."""
    check_transport(settings, "scheduler", "replica")
    check_ports(settings, SCHEDULER_PORTS)
    state_dir = Path(settings.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    if settings.data_plane == "socket" and not settings.hop_dir:
        # Its replicas' hop sockets (shoal.rpc.hop); its ingress workers get the same folder.
        settings = dataclasses.replace(settings, hop_dir=str(hop_dir(state_dir)))
        stack.callback(release_hop_dir, settings.hop_dir)  # last: after the replicas stop
    sid = scheduler_id(settings)
    node = SchedulerNode(
        settings,
        sid,
        GrpcHeadLink(head_address, settings),
        lambda addr: GrpcReplicaClient(addr, settings),
        launcher=zygote.launcher() if zygote else None,
    )
    processes = ingress_processes(settings)
    guard = AuthInterceptor(SCHEDULER_RULES, tls=bool(settings.tls_dir))
    credentials = server_credentials(settings, "scheduler")
    server = new_server(
        settings,
        [guard],
        reuse_port=processes > 1,
        budget=node.dataplane.inflight,
        refused=lambda model, err: node.dataplane.refused(model, "", "grpc", err),
    )
    pbg.add_SchedulerServicer_to_server(SchedulerService(node), server)
    # Blobs (blob:// models) come from peers or the head; peers fetch from this control port.
    blob_source = GrpcBlobSource(head_address, settings, sid)
    node.supervisor.artifacts.blob_source = blob_source
    stack.push_async_callback(blob_source.aclose)
    # The head keeps who holds which blob in memory: tell each head registered with.
    announcer = Announcer(blob_source, node.supervisor.artifacts.blobs)
    node.on_registered = announcer.registered
    node.supervisor.artifacts.on_evicted = announcer.released
    stack.push_async_callback(announcer.aclose)
    blob_service = SchedulerBlobService(node.supervisor.artifacts)
    repository = repository_of(settings, head_address, node, stack)
    inference = InferenceService(node.dataplane, node.inference_auth, settings, repository)
    oipg.add_GRPCInferenceServiceServicer_to_server(inference, server)
    registry = metrics.registry(metrics.SchedulerCollector(node))

    async def metrics_page() -> tuple[bytes, str]:
        return metrics.render(registry)

    port = bind(server, settings.host, settings.grpc_port, credentials)
    tls = tls_files(settings, "scheduler")
    http = HttpServer(
        scheduler_app(node, metrics_page, repository),
        settings.host,
        settings.http_port,
        tls,
        reuse_port=processes > 1,
        limits=HttpLimits.of(settings),
        refuse=refuse_when_full(node),
    )
    # The control port, a server of its own even with one ingress process: the head's calls,
    # replicas' registrations and reports and peers' blob fetches must not wait behind, or be
    # shut out by, clients of the inference port (holding its grpc_max_connections, say).
    control = new_server(settings, [guard])
    pbg.add_SchedulerServicer_to_server(SchedulerService(node), control)
    pbg.add_BlobServicer_to_server(blob_service, control)
    # The registered address answers inference too (shoal predict uses it; shoal bench only
    # when it cannot read the inference port from this machine's endpoints.json).
    oipg.add_GRPCInferenceServiceServicer_to_server(inference, control)
    if processes > 1:
        ingress = IngressService(
            node.hub,
            lambda: snapshot(node.router, node.catalog),
            lambda: node.table_version,
            node.table_changed,
            lambda: metrics.render(registry),
        )
        pbg.add_IngressServicer_to_server(ingress, control)
    # Credentials of its own: gRPC keeps a TLS context per port, which each asks to renew.
    control_port = bind(control, settings.host, 0, server_credentials(settings, "scheduler"))
    await control.start()
    stack.push_async_callback(control.stop, 1.0)
    await server.start()
    stack.push_async_callback(server.stop, 1.0)
    await http.start()
    stack.push_async_callback(http.stop)
    if processes > 1:
        _deal_connections(settings, processes, port, http.sock)
    stack.callback(shutdown_parser)
    public = _addr(settings.advertised, port)
    address = _addr(settings.advertised, control_port)
    http_address = _addr(settings.advertised, http.port)
    if processes > 1:
        workers = IngressWorkers(
            # head_address: a worker's repository extension applies models there.
            dataclasses.replace(settings, grpc_port=port, http_port=http.port, head_address=head_address),
            _addr(settings.host, control_port),
            sid,
            processes - 1,
            node.hub,
            zygote,
        )
        await workers.start()
        stack.push_async_callback(workers.aclose)
        node.ingress_drains.append(workers.drain)
        node.ingress_kills.append(workers.kill_now)
    blob_source.own_address = address
    node.start(address, http_address)
    # Closed before the servers stop: requests, then replicas, drain while ingress still answers.
    stack.push_async_callback(node.aclose)
    _write_endpoints(state_dir, scheduler=public, scheduler_http=http_address, scheduler_control=address)
    log.info(
        "scheduler %s listening on %s (gRPC) and %s://%s (HTTP) in %d process(es); control on %s",
        sid,
        public,
        http.scheme,
        http_address,
        processes,
        address,
    )
    return node, public, http_address


def pin_ingress(settings: Settings, node: SchedulerNode) -> None:
    """This process is a scheduler's (its ingress process 0): onto its CPU, with its
    workers on theirs (``ingress_pin_cpus``, ``shoal.core.affinity``), and the busiest
    replicas' event loops one on each (``replica_pin_loop``). Called by the commands that
    own their process (``shoal up``, ``shoal scheduler``), once the scheduler runs (every
    thread there is is moved), not by :func:`start_scheduler`, which a program may call in a
    process it also uses for other things."""
    processes = ingress_processes(settings)
    if not settings.ingress_pin_cpus or processes < 2:
        return
    everywhere, cpus = affinity.usable_cpus(), affinity.ingress_cpus(processes)
    cpu = affinity.pin_ingress(0, processes)
    if cpu is None:
        return
    log.info("each of the %d ingress processes runs on a CPU of its own; this one on %d", processes, cpu)
    if settings.replica_pin_loop:
        node.supervisor.pin_loops(affinity.LoopPins(cpus, everywhere))


def _deal_connections(settings: Settings, processes: int, grpc_port: int, http_sock: socket.socket) -> None:
    """New connections to the shared inference ports go to the ingress processes in turn
    (``shoal.core.reuseport``), not by the kernel's hash, when ``ingress_in_turn`` is on and
    the eBPF program loads; the log says which."""
    if not settings.ingress_in_turn:
        log.info("connections reach the %d ingress processes by the kernel's hash", processes)
        return
    why = deal_port_in_turn(grpc_port, processes, http_sock)
    if why is None:
        log.info("new connections go to the %d ingress processes in turn", processes)
    else:
        log.info("connections reach the %d ingress processes by the kernel's hash: %s", processes, why)


class IngressWorkers:
    """The ingress worker processes of one scheduler: started, restarted when they exit,
    stopped with it. Each runs ``python -m shoal.ingress_worker`` with the scheduler's
    settings (ports bound) in ``SHOAL_INGRESS_WORKER``: forked by ``zygote`` when there is
    one, a new process otherwise."""

    def __init__(
        self,
        settings: Settings,
        control: str,
        scheduler_id: str,
        count: int,
        hub: IngressHub,
        zygote: Zygote | None = None,
    ) -> None:
        self._settings = settings
        self._control = control
        self._scheduler_id = scheduler_id
        self._count = count
        self._hub = hub
        self._zygote = zygote
        self._procs: dict[str, Process] = {}
        self._index: dict[str, int] = {}
        self._tasks = TaskSet(f"ingress workers of {scheduler_id}")
        self._closing = False
        self._counted_from: dict[str, float] = {}
        self.restarts = 0

    SILENT_AFTER_S = 10.0
    """A worker whose process runs but has not reported its counts (every 0.5 s) this long
    is hung (stopped, deadlocked, its loop stuck): it is killed and so started again. Before,
    a worker stopped with SIGSTOP kept its share of the ports' new connections, which hung,
    for as long as it stayed stopped (3-5 of every 10 for 36 s and on)."""
    SILENT_AT_START_S = 60.0
    """The same for a worker that has not reported once since it was started."""

    async def start(self) -> None:
        for i in range(self._count):
            worker_id = f"{self._scheduler_id}/ingress-{i + 1}"
            self._index[worker_id] = i + 1  # 0 is the scheduler's own process
            await self._spawn(worker_id)
            self._tasks.spawn(self._watch(worker_id), f"ingress worker {worker_id}")
        if self._count:
            self._tasks.spawn(self._watch_silence(), "silent ingress workers")

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values()]

    async def _spawn(self, worker_id: str) -> None:
        doc = {
            "settings": settings_doc(self._settings),
            "control": self._control,
            "worker_id": worker_id,
            "scheduler_id": self._scheduler_id,
            # Gone (not only slow to answer), the worker leaves the shared ports at once.
            "main_pid": os.getpid(),
            # Which of the ingress processes it is, for its CPU (shoal.core.affinity).
            "index": self._index[worker_id],
            "processes": self._count + 1,
            # The file this process copies its log to (<state>/logs/up.log): the worker's lines too.
            "log_file": logs.file_copy(),
        }
        env = {**os.environ, "SHOAL_INGRESS_WORKER": json.dumps(doc)}
        argv = [sys.executable, "-m", "shoal.ingress_worker"]
        # Forked from the zygote when there is one (shoal.zygote: it shares their modules' pages).
        child = self._zygote.spawn(argv, env=env, out=None, new_session=False) if self._zygote else None
        self._procs[worker_id] = child or ChildProcess.spawn(argv, env=env, out=None, new_session=False)
        self._counted_from[worker_id] = time.monotonic()

    async def _watch_silence(self, every_s: float = 1.0) -> None:
        """Kill workers that run but no longer report (``SILENT_AFTER_S``); :meth:`_watch`
        starts them again."""
        last = time.monotonic()
        while not self._closing:
            await asyncio.sleep(every_s)
            now = time.monotonic()
            late, last = now - last - every_s, now
            if late > 1.0:
                # This process's own loop was held up: the workers' reports may be waiting
                # to be read. Count their silence from now.
                for worker_id in self._counted_from:
                    self._counted_from[worker_id] = now
                continue
            for worker_id, proc in list(self._procs.items()):
                if proc.returncode is not None or self._closing:
                    continue
                heard = self._hub.heard(worker_id, proc.pid)
                since = max(heard or 0.0, self._counted_from[worker_id])
                limit = self.SILENT_AT_START_S if heard is None else self.SILENT_AFTER_S
                if now - since > limit:
                    log.warning(
                        "ingress worker %s (pid %d) has not reported for %.0fs while its process "
                        "runs (stopped or hung); killing it",
                        worker_id,
                        proc.pid,
                        now - since,
                    )
                    proc.send_signal(signal.SIGKILL)  # a stopped process dies of it too

    async def _watch(self, worker_id: str) -> None:
        backoff = 0.2
        while True:
            proc = self._procs[worker_id]
            started = asyncio.get_running_loop().time()
            code = await proc.wait()
            self._hub.forget(worker_id)
            if asyncio.get_running_loop().time() - started > 10:
                backoff = 0.2
            # A signal to the whole group (systemctl stop, timeout, Ctrl-C) can end a worker
            # (one still starting, before its handlers are in place) before this process
            # runs its own handler: so it is judged after the pause. Before, it was reported
            # lost and started again while the scheduler stopped.
            await asyncio.sleep(backoff)
            if self._closing:
                return
            log.warning(
                "ingress worker %s (pid %d) exited with %s; starting it again", worker_id, proc.pid, code
            )
            backoff = min(backoff * 2, 5.0)
            self.restarts += 1
            await self._spawn(worker_id)

    async def drain(self, grace_s: float) -> None:
        """Shutting down, before the replicas drain: each worker refuses new requests, answers
        those it admitted (within ``grace_s``, its own ``shutdown_grace_s``), then exits.
        Returns once they have exited, or ``grace_s`` + 2 s later (:meth:`aclose` kills those
        left)."""
        self._closing = True
        procs = list(self._procs.values())
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        try:
            await wait_for(asyncio.gather(*(p.wait() for p in procs)), grace_s + 2.0)
        except TimeoutError:
            log.warning("ingress workers still running %gs after they were told to stop", grace_s + 2.0)

    def kill_now(self) -> None:
        """SIGKILL every worker, not to be started again (a second signal at shutdown)."""
        self._closing = True
        for proc in self._procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)

    async def aclose(self) -> None:
        self._closing = True
        for proc in self._procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs.values():
            try:
                await wait_for(proc.wait(), 5.0)
            except TimeoutError:
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
        await self._tasks.aclose()


async def _serve(
    setup: Callable[[AsyncExitStack], Awaitable[None]],
    stop: asyncio.Event | None = None,
    kill_now: Callable[[], None] | None = None,
) -> None:
    """Run what ``setup`` starts until SIGTERM, SIGINT or SIGHUP, then unwind it
    (gracefully). A second signal while shutting down stops at once, as a second Ctrl-C
    does in most tools: ``kill_now`` kills what this process started (replicas, ingress
    workers), and the process exits with 128 + the signal's number, requests in flight
    failing.

    SIGHUP is the terminal closing (or an ssh session dropped) under a foreground ``shoal
    up``: the process died of it at once, failing what was in flight, and its replicas, in
    sessions of their own, ran on until ``orphan_after_s``. It stops as on SIGTERM; run
    under a service manager, nohup or tmux to outlive the terminal."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            stop.set()
            return
        log.warning(
            "%s again while shutting down: stopping now, without waiting for requests or replicas",
            sig.name,
        )
        if kill_now is not None:
            kill_now()
        os._exit(128 + sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)
    async with AsyncExitStack() as stack:
        await setup(stack)
        await stop.wait()
        log.info("shutting down: refusing new requests, finishing those admitted, draining replicas")
    log.info("stopped")


LOST_LEADERSHIP_EXIT = 3
"""The exit status of a head on etcd that stopped because it no longer leads."""


async def run_head(settings: Settings) -> None:
    announce_transport(settings)
    stop, lost = asyncio.Event(), asyncio.Event()

    def on_lost() -> None:
        lost.set()
        stop.set()

    async def setup(stack: AsyncExitStack) -> None:
        await start_head(settings, stack, on_lost)

    await _serve(setup, stop)
    if lost.is_set():
        raise SystemExit(LOST_LEADERSHIP_EXIT)


def _kill_now(nodes: list[SchedulerNode]) -> None:
    for node in nodes:
        node.kill_now()


def _stop_when_refused(node: SchedulerNode, stop: asyncio.Event) -> None:
    """Stop the process when the head refuses ``node``'s id (``SchedulerNode.refused``)."""
    node.on_refused = stop.set
    if node.refused is not None:
        stop.set()


async def run_scheduler(settings: Settings, zygote: Zygote | None = None) -> None:
    """A scheduler until SIGTERM or Ctrl-C; ``AlreadyExists`` (one line from ``shoal
    scheduler``, exit 1) once it stopped because the head refused its id."""
    announce_transport(settings)
    stop = asyncio.Event()
    nodes: list[SchedulerNode] = []

    async def setup(stack: AsyncExitStack) -> None:
        node, _, _ = await start_scheduler(settings, stack, settings.head_address, zygote)
        nodes.append(node)
        _stop_when_refused(node, stop)
        pin_ingress(settings, node)

    await _serve(setup, stop, functools.partial(_kill_now, nodes))
    for node in nodes:
        if node.refused is not None:
            raise node.refused


async def run_up(
    settings: Settings,
    on_ready: Callable[[HeadNode, SchedulerNode, TaskSet], Awaitable[None]] | None = None,
    zygote: Zygote | None = None,
) -> None:
    """Head and one scheduler in this process; ``on_ready`` runs once both are up, and may
    start tasks in the TaskSet it gets (they are cancelled at shutdown). ``zygote``: see
    :func:`start_scheduler`."""
    check_ports(settings, HEAD_PORTS + SCHEDULER_PORTS)  # all four: before the head binds its own
    announce_transport(settings)

    stop = asyncio.Event()
    nodes: list[SchedulerNode] = []

    async def setup(stack: AsyncExitStack) -> None:
        head, head_address, _ = await start_head(settings, stack)
        scheduler, _, _ = await start_scheduler(settings, stack, head_address, zygote)
        nodes.append(scheduler)
        _stop_when_refused(scheduler, stop)
        pin_ingress(settings, scheduler)
        # Unwinds first: the head stops replacing replicas the scheduler is draining.
        stack.callback(head.pause)
        if on_ready is not None:
            tasks = TaskSet("up")
            stack.push_async_callback(tasks.aclose)
            await on_ready(head, scheduler, tasks)

    await _serve(setup, stop, functools.partial(_kill_now, nodes))
    for node in nodes:
        if node.refused is not None:
            raise node.refused

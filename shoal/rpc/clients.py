"""gRPC implementations of the seams in ``shoal.types``, plus the CLI's control client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from shoal.config import Settings
from shoal.core import limits
from shoal.core.clock import wait_for
from shoal.core.cluster import ReplicaReport
from shoal.core.payload import Tensors
from shoal.core.spec import DeploymentSpec, parse_spec_json
from shoal.core.status import ClusterStatus
from shoal.core.traffic import TrafficRoute
from shoal.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, ShoalError, Unavailable
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc import codec, convert, generate_codec
from shoal.rpc.channels import PeerChannel, Reachability, call
from shoal.rpc.convert import (
    capacity_to_pb,
    meta_from_pb,
    report_to_pb,
    state_name,
    state_value,
)
from shoal.rpc.hop import HopClient, socket_path
from shoal.rpc.status import STANDBY_METADATA, to_error
from shoal.rpc.task_stream import TaskStream, outcome_error
from shoal.rpc.wire import PARTS_FROM
from shoal.store.history import LifecycleEvent, Revision
from shoal.types import (
    Arrays,
    GenerateChunk,
    GenerateRequest,
    LoadReport,
    PingResult,
    ReplicaDescription,
    Route,
    RoutingTable,
    SchedulerRegistration,
)
from shoal.types import DeploymentRoutes as DomainRoutes

log = logging.getLogger("shoal.rpc")


def auth_metadata(token: str) -> tuple[tuple[str, str], ...] | None:
    """The call metadata that carries ``token`` (``authorization: Bearer ...``); None without one."""
    return (("authorization", f"Bearer {token}"),) if token else None


class GrpcReplicaClient:
    """Scheduler -> replica (data plane and health)."""

    def __init__(self, address: str, settings: Settings) -> None:
        self.address = address
        self._peer = PeerChannel(address, settings, "scheduler", server="replica")
        # Taken again from the peer channel by ping (each health check), not by each request:
        # a certificate renewed on disk reaches requests within a health interval.
        self._stub = self._peer.stub(pbg.ReplicaStub)
        self._stream: TaskStream | HopClient | None = None
        if settings.data_plane == "socket" and settings.hop_dir:
            # A replica on this machine listens on a hop socket too; a remote one does not.
            path = socket_path(settings.hop_dir, address)
            if path.exists():
                self._stream = HopClient(path, address, settings.max_message_bytes)
        if self._stream is None and settings.data_plane in ("socket", "stream"):
            self._stream = TaskStream(lambda: self._peer.stub(pbg.ReplicaStub), address)

    async def ping(self, timeout_s: float) -> PingResult:
        self._stub = self._peer.stub(pbg.ReplicaStub)
        try:
            reply = await self._stub.Ping(pb.PingRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            raise to_error(err) from None
        return PingResult(
            state_name(reply.state),
            reply.in_flight,
            reply.queued,
            dict(reply.batch_sizes),
            model_loads=dict(reply.model_loads),
            model_evictions=dict(reply.model_evictions),
            model_hits=dict(reply.model_hits),
        )

    async def push(
        self,
        request_id: str,
        inputs: Tensors,
        timeout_s: float,
        *,
        model_id: str = "",
        classify: Mapping[str, int] | None = None,
    ) -> Tensors:
        task = pb.Task(request_id=request_id, timeout_s=timeout_s, model_id=model_id)
        if classify:
            task.classification.update(classify)
        stream = self._stream
        if type(stream) is HopClient and sum(len(t.data) for t in inputs) >= PARTS_FROM:
            # Large tensors go to the socket as they are, not copied into the task twice.
            outcome = await stream.push(task, timeout_s + 0.5, inputs)
            error = outcome_error(outcome)
            if error is not None:
                raise error
            return codec.from_pb(outcome.outputs)
        codec.fill(task.inputs, inputs)
        if self._stream is not None:
            # A little slack over the replica's own deadline so its answer wins the race.
            outcome = await self._stream.push(task, timeout_s + 0.5)
            error = outcome_error(outcome)
            if error is not None:
                raise error
            return codec.from_pb(outcome.outputs)
        try:
            # A little slack over the replica's own deadline so its answer wins the race.
            reply = await self._stub.PushTask(task, timeout=timeout_s + 0.5)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(
                    f"request {limits.shown(request_id)} timed out after {timeout_s:g}s"
                ) from None
            raise to_error(err) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling() == 0:
                # Nobody cancelled this task: grpc.aio cancelled the call because close() closed
                # the channel (the replica died or left the routing table). Close fails pending
                # requests with Unavailable, as the stream does.
                raise Unavailable(
                    f"replica at {self.address} was removed during {limits.shown(request_id)}"
                ) from None
            raise
        return codec.from_pb(reply.outputs)

    async def generate(
        self, request_id: str, request: GenerateRequest, timeout_s: float
    ) -> AsyncGenerator[GenerateChunk, None]:
        call = self._stub.Generate(
            generate_codec.request_to_pb(request_id, request, timeout_s), timeout=timeout_s + 0.5
        )
        try:
            async for chunk in call:
                yield generate_codec.chunk_from_pb(chunk)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(
                    f"request {limits.shown(request_id)} timed out after {timeout_s:g}s"
                ) from None
            raise to_error(err) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling() == 0:
                # Nobody cancelled this task: grpc.aio cancelled the call because close() closed
                # the channel (the replica left the routing table).
                raise Unavailable(
                    f"replica at {self.address} was removed during {limits.shown(request_id)}"
                ) from None
            raise
        finally:
            call.cancel()  # a no-op once the stream ended; otherwise stops the generation

    async def drain(self, grace_s: float) -> None:
        try:
            await self._stub.Drain(pb.DrainRequest(grace_s=grace_s), timeout=5.0)
        except grpc.aio.AioRpcError as err:
            raise to_error(err) from None

    async def describe(self, timeout_s: float) -> ReplicaDescription:
        try:
            d = await self._stub.Describe(pb.Empty(), timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            raise to_error(err) from None
        return ReplicaDescription(
            inputs=tuple(meta_from_pb(t) for t in d.inputs),
            outputs=tuple(meta_from_pb(t) for t in d.outputs),
            batch_sizes=dict(d.batch_sizes),
            requests=d.requests,
            batches=d.batches,
            compute_ns=d.compute_ns,
        )

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()
        await self._peer.close()


class GrpcSchedulerClient:
    """Head -> scheduler."""

    def __init__(self, scheduler_id: str, address: str, settings: Settings) -> None:
        self._settings = settings
        self._peer = PeerChannel(address, settings, "head", server="scheduler")
        self._reach = Reachability(f"scheduler {scheduler_id} at {address}")

    @property
    def _stub(self) -> pbg.SchedulerAsyncStub:
        return self._peer.stub(pbg.SchedulerStub)

    async def create_replica(self, replica_id: str, spec: DeploymentSpec) -> int:
        req = pb.CreateReplicaRequest(replica_id=replica_id, deployment=spec.name, spec_json=spec.to_json())
        reply = await call(
            lambda: self._stub.CreateReplica(req, timeout=self._settings.rpc_timeout_s),
            attempts=self._settings.rpc_attempts,
            reach=self._reach,
        )
        return int(reply.registry_version)

    async def remove_replica(self, replica_id: str, graceful: bool) -> None:
        req = pb.RemoveReplicaRequest(replica_id=replica_id, graceful=graceful)
        await call(
            lambda: self._stub.RemoveReplica(req, timeout=self._settings.rpc_timeout_s),
            attempts=self._settings.rpc_attempts,
            reach=self._reach,
        )

    async def read_log(self, replica_id: str, tail_bytes: int, follow: bool) -> AsyncIterator[bytes]:
        stream = self._stub.ReadLog(
            pb.ReadLogRequest(replica_id=replica_id, tail_bytes=tail_bytes, follow=follow),
            timeout=None if follow else self._settings.rpc_timeout_s,
        )
        try:
            async for chunk in stream:
                yield chunk.data
        except grpc.aio.AioRpcError as err:
            raise to_error(err) from None
        finally:
            stream.cancel()

    async def close(self) -> None:
        await self._peer.close()


class RoutingTableDecoder:
    """Routing tables from the head as domain data, for one scheduler.

    An entry whose spec does not parse (a head of another version, a row written before
    specs were bounded) is left out of the table and logged once: one bad deployment must
    not stop the scheduler from applying the rest. Leaving it out, rather than keeping an
    older spec, fails closed: its inference tokens are never taken from a stale spec.
    Parsed specs are cached by their JSON (the same spec arrives in every push).
    """

    CACHE = 256

    def __init__(self) -> None:
        self._specs: dict[str, DeploymentSpec] = {}
        self._refused: dict[str, str] = {}
        self._last: dict[str, DomainRoutes] = {}  # the table so far, for tables sent as changes

    def decode(self, table: pb.RoutingTable) -> RoutingTable:
        """A whole table, or (``delta``) the table so far with the entries sent replaced and
        the names ``removed`` gone; an entry sent as ``routes_delta`` is the one so far with
        its ``removed_routes`` gone and its routes sent added or replaced. An entry that
        does not parse leaves the table."""
        deployments = dict(self._last) if table.delta else {}
        for name in table.removed:
            deployments.pop(name, None)
        for name, dep in table.deployments.items():
            spec = self._spec(name, dep.spec_json)
            if spec is None:
                deployments.pop(name, None)
                continue
            routes = tuple(
                Route(r.replica_id, r.address, r.scheduler_id, r.in_flight, r.revision) for r in dep.routes
            )
            before = deployments.get(name)
            if dep.routes_delta and before is not None:
                gone = set(dep.removed_routes)
                merged = {r.replica_id: r for r in before.routes if r.replica_id not in gone}
                merged.update((r.replica_id, r) for r in routes)
                routes = tuple(merged.values())
            deployments[name] = DomainRoutes(
                spec=spec,
                routes=routes,
                allowed_tokens=tuple(dep.allowed_token_hashes),
                revision=dep.revision,
                failed=dep.failed,
                unplaced=dep.unplaced,
            )
        self._last = deployments
        return RoutingTable(
            version=table.version,
            deployments=deployments,
            token_hashes=tuple(table.token_hashes),
            deleted=tuple(table.deleted),
            traffic=self._traffic(table),
            ack=table.ack,
            adopting=table.adopting,
        )

    def _traffic(self, table: pb.RoutingTable) -> dict[str, TrafficRoute]:
        """The table's traffic routes; one that does not parse is left out and logged (its
        clients get NotFound, as for a name the scheduler does not know)."""
        out = {}
        for name, msg in table.traffic.items():
            try:
                route = convert.traffic_from_pb(msg)
                if route.name != name:
                    raise InvalidArgument(f"the entry holds the route {route.name!r}")
            except InvalidArgument as err:
                if self._refused.get(f"route:{name}") != str(err):
                    log.error("routing table: skipping route %r: %s", name, err)
                    self._refused[f"route:{name}"] = str(err)
                continue
            out[name] = route
        return out

    def _spec(self, name: str, spec_json: str) -> DeploymentSpec | None:
        spec = self._specs.get(spec_json)
        if spec is not None or spec_json in self._refused:
            return spec
        try:
            spec = parse_spec_json(spec_json)
            if spec.name != name:
                raise InvalidArgument(f"the entry holds the spec of {spec.name!r}")
        except InvalidArgument as err:
            log.error("routing table: skipping deployment %r, its spec does not parse: %s", name, err)
            self._refused = {spec_json: str(err), **dict(list(self._refused.items())[: self.CACHE])}
            return None
        self._specs = {spec_json: spec, **dict(list(self._specs.items())[: self.CACHE])}
        return spec


def head_addresses(address: str) -> list[str]:
    """The heads in ``a:8470,b:8470`` (one address is a list of one)."""
    addresses = [a.strip() for a in address.split(",") if a.strip()]
    if not addresses:
        raise InvalidArgument(f"no head address in {address!r}")
    return addresses


class HeadChannels:
    """A channel to each of several heads (one leads, the others stand by, on etcd).

    Calls go to :attr:`stub`, the head last found leading; :meth:`failed` moves on to the
    next one after a call that could not be served there (UNAVAILABLE, which is also what a
    standby answers, or a deadline). Channels connect lazily: a head never tried costs nothing.
    Each is a :class:`PeerChannel`: :attr:`stub` is of a new channel once the certificate
    was renewed on disk.
    """

    def __init__(self, address: str, settings: Settings, role: str = "client") -> None:
        self.addresses = head_addresses(address)
        self._peers = [PeerChannel(a, settings, role, server="head") for a in self.addresses]
        self._current = 0
        # The head and channel of each stub handed out (a stub of a channel replaced may
        # still fail a call after the swap).
        self._handed: weakref.WeakKeyDictionary[pbg.HeadAsyncStub, tuple[int, grpc.aio.Channel]] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def stub(self) -> pbg.HeadAsyncStub:
        peer = self._peers[self._current]
        stub = peer.stub(pbg.HeadStub)
        if stub not in self._handed:
            self._handed[stub] = (self._current, peer.channel())
        return stub

    @property
    def address(self) -> str:
        return self.addresses[self._current]

    def failed(self, stub: pbg.HeadAsyncStub) -> None:
        """A call on ``stub`` found no leader there: use the next head (once per failure)."""
        handed = self._handed.get(stub)
        if len(self._peers) > 1 and handed is not None and handed[0] == self._current:
            self._current = (self._current + 1) % len(self._peers)
            log.debug("trying the head at %s", self.address)

    def connected(self, stub: pbg.HeadAsyncStub) -> bool:
        """Whether the channel of ``stub`` has a connection up (its head answered the HTTP/2
        handshake): a call that failed on one that has none never reached its head."""
        handed = self._handed.get(stub)
        return handed is not None and handed[1].get_state() == grpc.ChannelConnectivity.READY

    def went_round(self) -> bool:
        """Whether the last :meth:`failed` came back to the first head."""
        return self._current == 0

    async def close(self) -> None:
        for peer in self._peers:
            await peer.close()


_MOVE_ON = (Unavailable, DeadlineExceeded)  # errors after which another head may serve the call


def _refused_unseen(err: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call is known not to have been acted on: no connection was made, or
    a standby head refused it, or a deposed one whose write was fenced."""
    if err.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    return _standby(err) or "failed to connect to all addresses" in (err.details() or "")


def _standby(err: grpc.aio.AioRpcError) -> bool:
    """Whether a standby head refused the call (UNAVAILABLE with ``shoal-standby``)."""
    # grpc-stubs gives AioRpcError the sync error's _Metadatum; grpc.aio's are (key, value) pairs.
    trailing = tuple(err.trailing_metadata() or ())
    return err.code() == grpc.StatusCode.UNAVAILABLE and (STANDBY_METADATA, "1") in trailing  # type: ignore[comparison-overlap]


def _changed(name: str) -> str:
    """What a call that makes a revision of deployment ``name`` may have done (for ``once``)."""
    return f"made a new revision of deployment {name!r}: 'shoal history {name}' shows its revisions"


class GrpcHeadLink:
    """Scheduler -> head; to several heads, the one that leads (``HeadChannels``).

    Health updates go on one long-lived ``StreamHealth`` stream, a reply to each (a unary
    call per update cost the head twice the update's own work). A stream that fails is
    dropped and the update raises as a failed call would; the next update opens a new
    stream, to the next head after UNAVAILABLE or a deadline (a standby ends it so). A
    head without the stream (UNIMPLEMENTED: an older head) gets unary ``SendHealthUpdate``
    calls from then on. :meth:`health` is safe to call concurrently (one update at a time
    is on the stream)."""

    def __init__(self, address: str, settings: Settings) -> None:
        self._settings = settings
        self._heads = HeadChannels(address, settings, "scheduler")
        self.reach = Reachability(f"head at {address}", tls=bool(settings.tls_dir))
        self._decoder = RoutingTableDecoder()
        self._stream: tuple[pbg.HeadAsyncStub, Any] | None = None  # (its head, the call)
        self._stream_lock = asyncio.Lock()
        self.unary_health = False  # the head answered StreamHealth UNIMPLEMENTED
        self._followed = ""  # the head last registered with

    async def _call(self, method: str, req: object) -> Any:
        stub = self._heads.stub
        rpc = getattr(stub, method)
        try:
            return await call(
                lambda: rpc(req, timeout=self._settings.rpc_timeout_s), attempts=1, reach=self.reach
            )
        except _MOVE_ON:
            self._heads.failed(stub)
            raise

    async def register(self, reg: SchedulerRegistration) -> float:
        req = pb.RegisterSchedulerRequest(
            scheduler_id=reg.scheduler_id,
            address=reg.address,
            http_address=reg.http_address,
            capacity=capacity_to_pb(reg.capacity),
            pid=reg.pid,
            hostname=reg.hostname,
            replicas=[report_to_pb(r) for r in reg.replicas],
            max_replicas=reg.max_replicas,
            says_routes=reg.says_routes,
        )
        address = self._heads.address
        reply = await self._call("RegisterScheduler", req)
        if len(self._heads.addresses) > 1 and address != self._followed:
            # Which of the heads leads: the operator's first question after a failover.
            self._followed = address
            log.info("the head at %s leads: this scheduler registered with it", address)
        return float(reply.heartbeat_interval_s)

    async def health(
        self,
        scheduler_id: str,
        registry_version: int,
        replicas: list[ReplicaReport],
        load: Mapping[str, LoadReport],
        routes_version: int = 0,
    ) -> bool:
        req = pb.SchedulerHealth(
            scheduler_id=scheduler_id,
            registry_version=registry_version,
            routes_version=routes_version,
            replicas=[report_to_pb(r) for r in replicas],
            load={
                name: pb.DeploymentLoad(
                    in_flight=r.in_flight,
                    queued=r.queued,
                    requests=r.requests,
                    errors=r.errors,
                    latency_buckets=r.latency,
                )
                for name, r in load.items()
            },
        )
        if not self.unary_health:
            async with self._stream_lock:
                ack = await self._stream_health(req)
            if ack is not None:
                return ack
        reply = await self._call("SendHealthUpdate", req)
        return bool(reply.ack)

    async def _stream_health(self, req: pb.SchedulerHealth) -> bool | None:
        """``req`` on the health stream (opened when there is none); its reply's ack, or
        None when the head has no stream (then :attr:`unary_health`). Under the lock."""
        if self._stream is None:
            stub = self._heads.stub
            self._stream = (stub, stub.StreamHealth())  # type: ignore[call-arg]  # write()-fed stream
        stub, stream = self._stream
        req.sent_s = time.monotonic()
        error: ShoalError
        try:
            await stream.write(req)
            reply = await wait_for(stream.read(), self._settings.rpc_timeout_s)
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code == grpc.StatusCode.INTERNAL:
                # The write racing the head's UNIMPLEMENTED answer came back now and then as
                # INTERNAL "Internal error from Core" (1 in 45 runs of a test under load):
                # the call's own status says what the head answered.
                with contextlib.suppress(Exception):
                    code = await wait_for(stream.code(), 1.0)
            if code == grpc.StatusCode.UNIMPLEMENTED:
                self._drop_stream()
                log.info("the head at %s has no health stream: unary health updates", self._heads.address)
                self.unary_health = True
                return None
            error = to_error(err)
        except TimeoutError:
            error = DeadlineExceeded(f"no reply to a health update in {self._settings.rpc_timeout_s:g}s")
        except asyncio.InvalidStateError:  # written after the head ended the stream with OK
            error = Unavailable("the head ended the health stream")
        except BaseException:
            self._drop_stream()  # cancelled between a write and its reply: out of step
            raise
        else:
            if reply is not grpc.aio.EOF:  # type: ignore[attr-defined]
                self.reach.ok()
                return bool(reply.ack)
            error = Unavailable("the head ended the health stream")
        self._drop_stream()
        if isinstance(error, _MOVE_ON):
            self.reach.failed(error)
            self._heads.failed(stub)
        raise error

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream[1].cancel()
            self._stream = None

    async def watch_routes(self, scheduler_id: str) -> AsyncIterator[RoutingTable]:
        stub = self._heads.stub
        stream = stub.WatchRoutes(pb.WatchRoutesRequest(scheduler_id=scheduler_id, route_deltas=True))
        try:
            async for table in stream:
                yield self._decoder.decode(table)
        except grpc.aio.AioRpcError as err:
            error = to_error(err)
            if isinstance(error, _MOVE_ON):
                self._heads.failed(stub)
            raise error from None
        finally:
            stream.cancel()

    async def close(self) -> None:
        self._drop_stream()
        await self._heads.close()


class ReplicaSchedulerLink:
    """Replica -> its scheduler."""

    def __init__(self, address: str, settings: Settings) -> None:
        self._settings = settings
        self._peer = PeerChannel(address, settings, "replica", server="scheduler")
        self.reach = Reachability(f"scheduler at {address}")

    @property
    def _stub(self) -> pbg.SchedulerAsyncStub:
        return self._peer.stub(pbg.SchedulerStub)

    async def register(self, replica_id: str, address: str, pid: int) -> tuple[bool, float]:
        req = pb.RegisterReplicaRequest(replica_id=replica_id, address=address, pid=pid)
        reply = await call(
            lambda: self._stub.RegisterReplica(req, timeout=self._settings.rpc_timeout_s),
            attempts=self._settings.rpc_attempts,
            reach=self.reach,
        )
        return bool(reply.ack), float(reply.health_interval_s)

    async def health(self, replica_id: str, state: str, in_flight: int, queued: int) -> bool:
        req = pb.ReplicaHealth(
            replica_id=replica_id, state=state_value(state), in_flight=in_flight, queued=queued
        )
        reply = await call(
            lambda: self._stub.SendHealthUpdate(req, timeout=self._settings.rpc_timeout_s),
            attempts=1,
            reach=self.reach,
        )
        return bool(reply.ack)

    async def close(self) -> None:
        await self._peer.close()


async def call_leader(
    heads: HeadChannels,
    method: str,
    req: object,
    settings: Settings,
    metadata: Sequence[tuple[str, str]] | None,
    once: str = "",
) -> Any:
    """One control call (``method`` of the head's service) with ``metadata``. With several
    heads, a call no head can serve (UNAVAILABLE: down, or standing by) moves on to the
    next and goes round them until one leads, for up to twice ``dead_after_s`` (the time
    a standby takes to lead, with room to spare).

    ``once``: the call must not be sent twice (a second delete answers NOT_FOUND, a second
    token of one name ALREADY_EXISTS), and this says what it does and how to check whether
    it was done. It is sent again, to the same head or the next, only after a refusal that
    shows the head did nothing (no connection, a standby's answer, a deadline before any
    connection was up: a frozen head); after a deadline on a connection, or a connection
    lost during the call, it raises that error saying the head may have done it. Before, a
    delete that a head carried out but answered late went on to the next head, which
    answered NOT_FOUND. With one address, a ``once`` call refused unseen is sent again
    there: once after no connection, and after a standby's refusals for as long as calls go
    round several heads (several heads behind one name)."""
    if len(heads.addresses) == 1 and not once:
        rpc = getattr(heads.stub, method)
        return await call(
            lambda: rpc(req, timeout=settings.rpc_timeout_s, metadata=metadata),
            attempts=2,
        )
    deadline = time.monotonic() + 2 * settings.dead_after_s
    delay = 0.05
    tries = 0
    while True:
        tries += 1
        stub, address = heads.stub, heads.address
        try:
            return await getattr(stub, method)(req, timeout=settings.rpc_timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as err:
            error = to_error(err)
            if not isinstance(error, _MOVE_ON):
                raise error from None
            unseen = _refused_unseen(err) or (
                isinstance(error, DeadlineExceeded) and not heads.connected(stub)
            )
            if once and not unseen:
                raise type(error)(
                    f"the head at {address} did not answer ({error}), and may have {once}: "
                    "not sent again, where a repeat could report a wrong outcome"
                ) from None
            if len(heads.addresses) == 1:
                # One address (one head, or several behind one name): a call it refused unseen
                # is sent again, as any other call is once (``call``'s two attempts); a
                # standby's refusal (the name's head stands by; the leader is being chosen) for
                # as long as calls go round several heads. Before, such a call failed at once.
                if not unseen or (tries >= 2 and not (_standby(err) and time.monotonic() < deadline)):
                    raise error from None
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)
                continue
            heads.failed(stub)
            if time.monotonic() > deadline:
                raise error from None
        if heads.went_round():  # tried every head: wait a little
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


class ControlClient:
    """The CLI's client: the head's control API and a scheduler's native ingress."""

    def __init__(self, head_address: str, settings: Settings) -> None:
        self._settings = settings
        self._heads = HeadChannels(head_address, settings)
        self._metadata = auth_metadata(settings.token)
        self.head_address = head_address

    @property
    def _stub(self) -> pbg.HeadAsyncStub:
        return self._heads.stub

    async def _call(self, method: str, req: object, once: str = "") -> object:
        """One control call through the leading head (:func:`call_leader`)."""
        return await call_leader(self._heads, method, req, self._settings, self._metadata, once)

    async def create_token(self, role: str, name: str = "") -> pb.CreateTokenReply:
        reply = await self._call(
            "CreateToken",
            pb.CreateTokenRequest(name=name, role=role),
            once=f"created token {name!r} without this client getting its secret: 'shoal token list' "
            "shows it; revoke it and create it again",
        )
        assert isinstance(reply, pb.CreateTokenReply)
        return reply

    async def list_tokens(self) -> list[pb.TokenInfo]:
        reply = await self._call("ListTokens", pb.Empty())
        assert isinstance(reply, pb.ListTokensReply)
        return list(reply.tokens)

    async def revoke_token(self, name: str) -> None:
        await self._call(
            "RevokeToken",
            pb.RevokeTokenRequest(name=name),
            once=f"revoked token {name!r}: 'shoal token list'",
        )

    async def apply(self, spec: DeploymentSpec, if_revision: int | None = None) -> pb.ApplyDeploymentReply:
        """Create or update a deployment; with ``if_revision``, only if it is at that revision
        (0: only if it does not exist), else FailedPrecondition (``HeadNode.apply``)."""
        request = pb.ApplyDeploymentRequest(spec_json=spec.to_json(), if_revision=if_revision)
        once = "" if if_revision is None else _changed(spec.name)
        reply = await self._call("ApplyDeployment", request, once)
        assert isinstance(reply, pb.ApplyDeploymentReply)
        return reply

    async def scale(
        self, name: str, replicas: int, if_revision: int | None = None, if_replicas: int | None = None
    ) -> None:
        """Set the replica count; with ``if_revision``, only if the deployment is at that
        revision, with ``if_replicas`` only if it has that count, else FailedPrecondition
        (``HeadNode.scale``). Either makes it a call not to send twice: a second would be
        refused after the first went through."""
        request = pb.ScaleDeploymentRequest(
            name=name, replicas=replicas, if_revision=if_revision, if_replicas=if_replicas
        )
        guarded = if_revision is not None or if_replicas is not None
        once = f"scaled deployment {name!r}: 'shoal events {name}' shows each scale" if guarded else ""
        await self._call("ScaleDeployment", request, once)

    async def delete(self, name: str) -> None:
        await self._call(
            "DeleteDeployment",
            pb.DeleteDeploymentRequest(name=name),
            once=f"deleted deployment {name!r}: 'shoal status' shows whether it is there",
        )

    async def history(self, name: str) -> list[Revision]:
        """The deployment's revisions kept, oldest first. NotFound for an unknown name."""
        reply = await self._call("GetHistory", pb.DeploymentRequest(name=name))
        assert isinstance(reply, pb.HistoryReply)
        return [convert.revision_from_pb(r) for r in reply.revisions]

    async def rollback(self, name: str, revision: int = 0) -> Revision:
        """Apply an earlier revision again (0: the previous one); the revision this made."""
        reply = await self._call(
            "RollbackDeployment", pb.RollbackRequest(name=name, revision=revision), _changed(name)
        )
        assert isinstance(reply, pb.RevisionReply)
        return convert.revision_from_pb(reply.revision)

    async def restart(self, name: str) -> Revision:
        """Replace the deployment's replicas one at a time; the revision this made."""
        reply = await self._call("RestartDeployment", pb.DeploymentRequest(name=name), _changed(name))
        assert isinstance(reply, pb.RevisionReply)
        return convert.revision_from_pb(reply.revision)

    async def events(self, deployment: str = "", limit: int = 0) -> list[LifecycleEvent]:
        """Lifecycle events kept, oldest first: of one deployment when named, the last ``limit``."""
        reply = await self._call("ListEvents", pb.EventsRequest(deployment=deployment, limit=limit))
        assert isinstance(reply, pb.EventsReply)
        return [convert.lifecycle_from_pb(e) for e in reply.events]

    async def set_route(self, route: TrafficRoute) -> None:
        """Create or replace a traffic route. NotFound naming a target that is no deployment."""
        await self._call("SetRoute", convert.traffic_to_pb(route))

    async def delete_route(self, name: str) -> None:
        await self._call(
            "DeleteRoute", pb.DeploymentRequest(name=name), once=f"deleted route {name!r}: 'shoal route'"
        )

    async def routes(self) -> list[TrafficRoute]:
        """Every traffic route, by name."""
        reply = await self._call("ListRoutes", pb.Empty())
        assert isinstance(reply, pb.RoutesReply)
        return [convert.traffic_from_pb(r) for r in reply.routes]

    async def status(self, only: Collection[str] | None = None) -> ClusterStatus:
        """The cluster's status; with ``only``, of those deployments alone (and the schedulers
        and recent events): what watching a few deployments reads, at the cost of their
        replicas in the head, not the cluster's."""
        request = pb.StatusRequest() if only is None else pb.StatusRequest(deployments=only, only_named=True)
        reply = await self._call("GetStatus", request)
        assert isinstance(reply, pb.ClusterStatus)
        return convert.status_from_pb(reply)

    async def read_log(
        self, replica_id: str, tail_bytes: int = 0, follow: bool = False
    ) -> AsyncIterator[bytes]:
        """A replica's log through the head. With several heads, a stream that fails before
        its first chunk (a standby's refusal, a head down) goes to the next, as
        :meth:`_call` does; before, a standby named first ended it."""
        request = pb.ReadLogRequest(replica_id=replica_id, tail_bytes=tail_bytes, follow=follow)
        deadline = time.monotonic() + 2 * self._settings.dead_after_s
        delay = 0.05
        while True:
            stub = self._heads.stub
            stream = stub.ReadLog(
                request, timeout=None if follow else self._settings.rpc_timeout_s * 4, metadata=self._metadata
            )
            started = False
            try:
                async for chunk in stream:
                    started = True
                    yield chunk.data
                return
            except grpc.aio.AioRpcError as err:
                error = to_error(err)
                last = len(self._heads.addresses) == 1 or time.monotonic() > deadline
                if started or last or not isinstance(error, _MOVE_ON):
                    raise error from None
                self._heads.failed(stub)
            finally:
                stream.cancel()
            if self._heads.went_round():  # tried every head: wait a little
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def close(self) -> None:
        await self._heads.close()


MAX_CALL_DEADLINE_S = 1e9
"""The longest gRPC deadline :class:`NativeClient` gives a call (about 31 years): grpc keeps
a deadline as nanoseconds of the wall clock in 64 bits, so one more than about 7e9 s from
now wraps into the past and the call fails at once with DEADLINE_EXCEEDED. The request's own
``timeout_s``, whatever its size, still goes to the scheduler, which enforces it."""

DEFAULT_REQUEST_TIMEOUT_S = 60.0
"""A deployment's ``timeout_s`` when nothing else is known (``DeploymentSpec.timeout_s``)."""


class NativeClient:
    """A client of a scheduler's native ``SendRequest``; one channel, many calls, safe concurrently."""

    def __init__(self, address: str, settings: Settings) -> None:
        self._peer = PeerChannel(address, settings, server="scheduler")
        # Taken again after a call fails UNAVAILABLE (a handshake refused is one), not before
        # each request: the next request presents a certificate renewed on disk.
        self._stub = self._peer.stub(pbg.SchedulerStub)
        self._metadata = auth_metadata(settings.token)
        self._max_bytes = settings.max_message_bytes

    async def infer(
        self,
        deployment: str,
        inputs: Arrays,
        *,
        timeout_s: float = 0.0,
        request_id: str = "",
        model_id: str = "",
        default_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> tuple[Arrays, str]:
        """Returns (outputs, id of the replica that answered); ``model_id`` names a multiplexed
        deployment's model. ``default_timeout_s``: the deadline the scheduler gives a request
        with ``timeout_s`` 0 (the deployment's ``timeout_s``, when the caller knows it); the
        call waits that long and a few seconds more for the scheduler's answer. Raises
        ShoalError: InvalidArgument for a ``timeout_s`` that is negative or not finite, as the
        scheduler would; ResourceExhausted for a request over ``max_message_mb``, naming it.
        (gRPC's own words were ``CLIENT: Sent message larger than max``, which a composed
        model's client, whose own request was small, read as about its request.)"""
        limits.check_timeout(timeout_s)
        # The tensors' own bytes, known before anything is copied: before, a 400 MB array was
        # encoded whole (1.1 GB more memory, 1.4 s) only to be refused for its size.
        payload = sum(array.nbytes for array in inputs.values())
        if payload > self._max_bytes:
            raise self._too_large(deployment, f"at least {payload}")
        req = pb.InferRequest(
            deployment=deployment, request_id=request_id, timeout_s=timeout_s, model_id=model_id
        )
        codec.fill_arrays(req.inputs, inputs)
        size = req.ByteSize()
        if size > self._max_bytes:
            raise self._too_large(deployment, str(size))
        deadline = min((timeout_s or default_timeout_s) + 5.0, MAX_CALL_DEADLINE_S)
        try:
            reply = await self._stub.SendRequest(req, timeout=deadline, metadata=self._metadata)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                self._stub = self._peer.stub(pbg.SchedulerStub)
            raise to_error(err) from None
        return codec.decode(reply.outputs), reply.replica_id

    def _too_large(self, deployment: str, size: str) -> ResourceExhausted:
        return ResourceExhausted(
            f"the request to {deployment!r} is {size} bytes, over the limit of {self._max_bytes} "
            "(setting max_message_mb): send fewer rows per request, or raise the limit"
        )

    async def close(self) -> None:
        await self._peer.close()

    async def __aenter__(self) -> NativeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def send_request(
    address: str, deployment: str, inputs: Arrays, settings: Settings, *, timeout_s: float = 0.0
) -> tuple[Arrays, str]:
    """One native SendRequest to the scheduler at ``address``; returns (outputs, replica id)."""
    async with NativeClient(address, settings) as client:
        return await client.infer(deployment, inputs, timeout_s=timeout_s)

"""The head node: desired state in the store, actual state from schedulers, and
the loop that reconciles them.

All cluster state lives in one ``ClusterState`` guarded by ``self.lock``;
calls to schedulers happen outside the lock, and their outcomes are applied
under it again.

The store holds ``deployments/<name>`` (a spec as JSON) and ``tombstones/<name>`` (the
deployment was deleted, when, and its last revision number: a deployment of that name
created later numbers its revisions above it, ``shoal.store.history``). A replica whose
deployment the store does not know is removed only when a tombstone says its deployment
was deleted: a head started on an empty, truncated or foreign store removes nothing it
finds running. A stored spec that does not parse (written by another version, edited by
hand) does not stop the head: that deployment is *broken*, shown as such in the status
with its key, its replicas are kept, and applying a new spec or deleting it repairs it.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import json
import logging
import math
import operator
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

from shoal.auth import Role, TokenRecord, TokenRegistry, is_loopback, required_tokens
from shoal.config import Settings
from shoal.core import limits
from shoal.core.autoscale import Autoscaler
from shoal.core.clock import Clock, Signal, SystemClock, sleep_or_event
from shoal.core.cluster import (
    ALIVE,
    READY,
    REPLICA_ID,
    Action,
    Backlog,
    ClusterState,
    CreateReplica,
    RemoveReplica,
    ReplicaRecord,
    ReplicaReport,
)
from shoal.core.deploy_watch import NO_ROOM
from shoal.core.model_dirs import check_deployable
from shoal.core.placement import Capacity
from shoal.core.reports import (
    check_registration,
    check_scheduler_id,
    checked_load,
    checked_reports,
    kept_hostname,
)
from shoal.core.spec import DeploymentSpec, check_if_replicas, describe_change, parse_spec, parse_spec_json
from shoal.core.states import ReplicaState
from shoal.core.stats import Point, SeriesRecorder, Snapshot, Window, latest
from shoal.core.status import ClusterEvent, ClusterStatus, DeploymentStatus, ReplicaStatus, SchedulerStatus
from shoal.core.tasks import TaskSet, until
from shoal.core.traffic import TrafficRoute
from shoal.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LimitReached,
    NotFound,
    ReplicasConflict,
    ResourceExhausted,
    RevisionConflict,
    ShoalError,
    Unavailable,
)
from shoal.head.blobs import BlobStore
from shoal.head.traffic import TrafficRoutes
from shoal.store.base import MAX_COMMIT, Batch, Store, StoreError
from shoal.store.history import History, LifecycleEvent, Revision, StagedHistory, check_if_revision
from shoal.types import (
    DeploymentRoutes,
    LoadReport,
    Route,
    RoutingTable,
    SchedulerClient,
    SchedulerRegistration,
)

log = logging.getLogger("shoal.head")

ROUTES_GAP_S = (0.1, 1.0)
"""Table streams are woken at most every 0.1 s, or every ROUTES_GAP_PER_STREAM_S per open
stream when that is longer, up to 1 s; versions published in between go out together."""
ROUTES_GAP_PER_STREAM_S = 0.0005
"""Each stream's message costs the head a gRPC send: the more streams, the rarer the waves
(1,000 streams: a wake every 0.5 s at most), so that pushing tables cannot crowd out the
health updates however many schedulers watch."""
ROUTES_GAP_CONTROL_S = 0.005
"""The least gap between waves when a control call changed the table (it waits for the
wave, ``_routes_out``): applies back to back took 0.1 s each with the wave gap of health
changes. Still ROUTES_GAP_PER_STREAM_S per open stream when that is longer."""
ROUTES_OUT_S = 2.0
"""How long a control call that changed what schedulers route by (an apply, a rollback, a
restart, a delete, a traffic route, a token created or revoked) waits, at most, for every
scheduler to route by the new table before it answers (:meth:`HeadNode._routes_out`). A
scheduler that took longer is not waited for again until it has caught up (one that reads
slowly, or not at all, slows one call, not every one)."""
REAL_TIME = SystemClock()
LATE_WARNING_S = 1.0
"""Health updates waiting this long in the head before it reads them are logged (once)."""
DEATHS_TOGETHER_S = 0.2
"""The reconcile loop wakes this long after the next scheduler comes due to be declared
dead, so that schedulers dying together are declared dead, and their replicas placed, in one
pass: 100 of 1,000 schedulers killed at once end their health streams over about 40 ms, and
a pass woken by the first of them placed a fifth of their replicas, the next pass (after its
rest) the others 0.37 s later (bench/scale.py)."""
RECONCILE_REST_MAX_S = 1.0
"""The most the reconcile loop rests after a pass (twice the time it held the lock)."""

DEPLOYMENTS = "deployments/"
TOMBSTONES = "tombstones/"
TOMBSTONE_TTL_S = 7 * 86_400.0
"""A tombstone older than this, of a deployment no scheduler reports a replica of, is
dropped at the next delete. A replica that shows up later anyway (its scheduler was away
for a week) is kept and listed, like any replica the store does not know."""
TOMBSTONES_PER_DEPLOYMENT = 10
"""Tombstones kept, times ``max_deployments``: past it a delete drops the oldest (of
deployments no scheduler reports a replica of) before their TOMBSTONE_TTL_S."""
FOLLOW_CHECK_S = 1.0
"""How often a log follow checks that the replica's scheduler is still alive."""
FULL_LOG_EVERY_S = 60.0
"""Most often the head logs that it refused schedulers for want of room (max_schedulers)."""

SchedulerClientFactory = Callable[[str, str], SchedulerClient]
_STARTING = frozenset(
    {ReplicaState.PENDING, ReplicaState.DOWNLOADING, ReplicaState.QUEUED, ReplicaState.STARTING}
)
"""A replica on its way to READY: the autoscaler does not scale its deployment down meanwhile."""
_EntryInputs = tuple[DeploymentSpec, tuple[str, ...], int, dict[str, int], str, str]


@dataclass(frozen=True)
class ApplyResult:
    created: bool
    changed: bool
    revision: int = 0  # the deployment's revision after the apply (0: none kept)
    change: str = ""  # what changed, one line ("" when nothing did)


class HeadNode:
    """Scheduler membership, deployments, reconciliation, routing tables.

    Lifecycle: ``await start()`` (loads the store, starts the reconcile loop),
    ``await aclose()``. Public coroutines are safe to call concurrently.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        scheduler_client: SchedulerClientFactory,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self._client_factory = scheduler_client
        self.clock = clock or SystemClock()
        self.state = ClusterState(
            clock=self.clock,
            dead_after_s=settings.dead_after_s,
            stream_end_grace_s=min(settings.dead_after_stream_end_s, settings.dead_after_s),
            forget_after_s=settings.forget_dead_after_s,
            max_schedulers=settings.max_schedulers,
        )
        self.desired: dict[str, DeploymentSpec] = {}
        # Deployments whose stored spec does not parse: name -> what is wrong, naming the key.
        self.broken: dict[str, str] = {}
        # Deployments deleted (a tombstone in the store), with when: their replicas are removed.
        self.deleted: dict[str, float] = {}
        # Of those, the last revision number each had (from its tombstone; absent: none).
        self._last_revisions: dict[str, int] = {}
        self.lock = asyncio.Lock()
        # The status build that callers waiting for the lock share, by (only, brief): see status().
        self._status_builds: dict[tuple[frozenset[str] | None, bool], asyncio.Future[ClusterStatus]] = {}
        self._wake = asyncio.Event()
        self._clients: dict[str, tuple[str, SchedulerClient]] = {}
        # Version 1, not 0: a scheduler says 0 for "no word on this head's tables" (its
        # routes_version), so one routing by an empty first table of version 0 was taken
        # at the send at the first change after a start with nothing in the store.
        self._routes = RoutingTable(version=1)
        self._inputs: dict[str, _EntryInputs] = {}  # what each entry of the table was built from
        # Table streams wait on this event; set (and replaced) when they should look again
        # (_announce). Not per version: a burst of versions wakes them every ROUTES_GAP_S.
        self._routes_changed = asyncio.Event()
        self._announced_at = -math.inf
        self._streams = 0  # open watch_routes streams
        # Per open table stream (a number): the last version it sent; those late past
        # ROUTES_OUT_S once; and what wakes _routes_out (a send, a stream's end, a word).
        self._sent: dict[int, int] = {}
        self._lagging: set[int] = set()
        self._routes_taken = Signal()
        self._stream_keys = itertools.count()
        # The scheduler of each open table stream, the newest table each scheduler said it
        # routes by (health updates' routes_version), and the calls waiting on them.
        self._stream_of: dict[int, str] = {}
        self._routed: dict[str, int] = {}
        self._says_routes: set[str] = set()  # registered saying they will say (SchedulerRegistration)
        self._acks_wanted = 0
        self._log_streams = 0  # open read_log streams (max_log_streams)
        self._log_clients: collections.Counter[str] = collections.Counter()  # of them, by client
        self._log_refusing = False  # a refusal was logged since the count was last under the cap
        self._announcing: asyncio.TimerHandle | None = None
        self._tasks = TaskSet("head")
        self._stopping = asyncio.Event()
        self._paused = False
        # After every start (set by start()): no placing or removing until the schedulers
        # have had dead_after_s to register again with the replicas they run (none when
        # there is provably nothing to adopt: _nothing_to_adopt).
        self._adopt_until = 0.0
        self._held_s = 0.0  # how long the last reconcile pass held the lock
        self._backlog = Backlog(window_s=settings.dead_after_s)
        # Registrations refused for max_schedulers since the last line saying so, and when that was.
        self._full_refusals = 0
        self._full_logged_at = -math.inf
        # Heads on etcd: called when every scheduler went silent at once while a standby head
        # still reaches this one (``_check_isolated``); it steps down.
        self.on_isolated: Callable[[str], None] | None = None
        self._had_schedulers = False  # some scheduler was alive at the last pass
        self.autoscaler = Autoscaler(self.clock)
        self._loads: dict[str, dict[str, LoadReport]] = {}  # scheduler -> deployment -> load
        self.series = SeriesRecorder()
        self.targets: dict[str, int] = {}  # autoscaled deployments: the current replica count
        # Deployments loaded from the store at start whose count the autoscaler has not set yet:
        # what runs is their count then, none included (see _target).
        self._restored: set[str] = set()
        self._target_errors: dict[str, str] = {}  # deployments whose count failed: the error logged
        self.scale_decisions: collections.Counter[tuple[str, str]] = collections.Counter()  # (name, up|down)
        self.tokens = TokenRegistry(store, settings.max_tokens)
        self.history = History(store)
        self.traffic = TrafficRoutes(store, settings.max_routes)
        # The cluster's artifact store (shoal.head.blobs): a spec naming a blob it lacks is refused.
        self.blobs: BlobStore | None = None
        # Earlier revisions' specs, parsed once: (name, number, spec hash) -> spec.
        self._revision_specs: dict[tuple[str, int, str], DeploymentSpec] = {}
        # Replicas of a deployment deleted and created again before they were gone: drained
        # at each pass until their schedulers no longer report them (ClusterState.retire).
        self._leftovers: set[str] = set()

    # ------------------------------------------------------------ lifecycle

    async def start(self, *, new_store: bool = False) -> None:
        """Load tokens, deployments and tombstones from the store; start the reconcile loop.

        A deployment row that does not parse is logged and marked broken, never fatal.
        ``new_store``: the store was created by this start (its file did not exist), so that
        nothing ever ran against it; see :meth:`_nothing_to_adopt` for when that ends the
        adoption wait.
        """
        await self.tokens.load()
        await self.history.load()
        await self.traffic.load()
        for entry in await self.store.list(DEPLOYMENTS):
            name = entry.key.removeprefix(DEPLOYMENTS)
            try:
                spec = parse_spec_json(entry.value)
                if spec.name != name:
                    raise InvalidArgument(f"it holds the spec of {spec.name!r}")
            except InvalidArgument as err:
                self.broken[name] = f"the stored spec at {entry.key!r} cannot be read: {err}"
                log.error("deployment %s is broken: %s", name, self.broken[name])
                continue
            self.desired[spec.name] = spec
        self._restored = set(self.desired)
        tombstones = {e.key.removeprefix(TOMBSTONES): e.value for e in await self.store.list(TOMBSTONES)}
        self.deleted = {name: _deleted_at(value) for name, value in tombstones.items()}
        self._last_revisions = {n: r for n, v in tombstones.items() if (r := _last_revision(v))}
        log.info(
            "head loaded %d deployment(s) (%d broken) and %d tombstone(s) from the store",
            len(self.desired),
            len(self.broken),
            len(self.deleted),
        )
        self._warn_over_limits()
        # On every start, an empty store included (it may be new, truncated or not this
        # cluster's): otherwise the first scheduler to register looks like the whole cluster
        # and the head starts replicas that the others are already running. Not when no
        # scheduler can have replicas to register with (_nothing_to_adopt).
        if self._nothing_to_adopt(new_store):
            log.info(
                "the state store was created by this start, and the head's port was picked at "
                "start or no other machine reaches it: no scheduler can run replicas to register "
                "again; no wait before placing"
            )
            self._adopt_until = 0.0
        else:
            self._adopt_until = self.clock.now() + self.settings.dead_after_s
        self._tasks.spawn(self._run(), "reconcile")

    def _nothing_to_adopt(self, new_store: bool) -> bool:
        """Whether no scheduler can register with replicas this head does not know of, so
        that the adoption wait would wait for nothing: the store was created by this start
        and holds nothing (no head placed a replica from it), and the head's gRPC port was
        picked by the system when it bound (``head_port`` 0), so that no scheduler started
        before this head can have been given its address. A fresh ``shoal up --head-port 0``.

        A new store alone is not enough: a head whose state folder was lost or moved aside
        (a new disk, a container without a volume, ``rm -rf``), started again at the address
        it had, is told by schedulers on other machines of the replicas they still run; a
        deployment applied in its first seconds would start replicas beside them. A head that
        listens on loopback alone (the default, ``shoal up`` and ``make up`` included) is
        reached by no other machine, and a scheduler on its own registers with the replicas
        it runs before anything is placed on it: a new store there ends the wait too, even
        on a port given. What is left (two schedulers on the head's machine outliving its
        lost state, one registering first) costs replicas started and then removed again,
        not a wrong cluster."""
        reached_by_others = self.settings.head_port != 0 and not is_loopback(self.settings.host)
        return new_store and not reached_by_others and not (self.desired or self.broken or self.deleted)

    async def aclose(self) -> None:
        self._stopping.set()
        self._wake.set()
        await self._tasks.aclose()
        if self._announcing is not None:
            self._announcing.cancel()
        self._wake_streams()
        for _, client in self._clients.values():
            await client.close()
        self._clients.clear()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            wait = self.settings.reconcile_interval_s
            try:
                await self.reconcile_once(wait_acts=False)
            except ShoalError as err:
                log.warning("reconcile failed: %s", err)
            except Exception:
                # A bug must not end the loop that keeps the cluster at its replica counts.
                log.exception("reconcile failed")
            else:
                # The next pass comes when the next scheduler could be declared dead, if that
                # is sooner: its replacements then follow its death by a pass, not by up to an
                # interval (100 schedulers dying together fell into passes a second apart,
                # each placing those it had found dead so far). Not after a failed pass: it
                # may not have declared the overdue ones dead, and would come back at once.
                wait = min(wait, self._next_death_s())
                if self._adopt_until > self.clock.now():
                    # Its end is said at once: schedulers drop what no one registered again.
                    wait = min(wait, self._adopt_until - self.clock.now())
            # Woken again and again (schedulers registering, replicas changing state), passes
            # would follow each other back to back: rest twice as long as the last pass held
            # the lock (what health updates wait for), so reconciling keeps at most a third of
            # the time from them. Not the pass's whole time: that includes its calls to schedulers.
            rest = min(RECONCILE_REST_MAX_S, 2 * self._held_s)
            await asyncio.sleep(rest)
            await sleep_or_event(self._wake, max(0.0, wait - rest))
            self._wake.clear()

    def _next_death_s(self) -> float:
        """Seconds until the next live scheduler could be declared dead (``ClusterState.dies_at``:
        silent ``dead_after_s``, or its health stream ended ``dead_after_stream_end_s`` ago,
        plus ``late_s``), and ``DEATHS_TOGETHER_S`` more; inf without one. Linear in the
        schedulers (0.1 ms at 1,000)."""
        state = self.state
        due = min((state.dies_at(s) for s in state.schedulers.values() if s.state == ALIVE), default=math.inf)
        return due + DEATHS_TOGETHER_S - self.clock.now()

    def pause(self) -> None:
        """Stop placing and removing replicas (the cluster is shutting down)."""
        self._paused = True

    def wake(self) -> None:
        """Ask for a reconcile pass soon (after a change)."""
        self._wake.set()

    # ------------------------------------------------------------ membership

    async def register_scheduler(self, reg: SchedulerRegistration) -> float:
        """Take a scheduler's registration (a new one, a restarted one, one coming back after
        a NACK) with the replicas it runs. ``AlreadyExists``, changing nothing, when a live
        scheduler at another address holds its id (``ClusterState.holder``); InvalidArgument,
        naming the field, for an id, address or replica report past its bound
        (``shoal.core.reports``). Its hostname and replicas' messages are kept cut."""
        check_registration(reg.scheduler_id, reg.address, reg.http_address)
        reg = replace(
            reg, hostname=kept_hostname(reg.hostname), replicas=tuple(checked_reports(reg.replicas))
        )
        async with self.lock:
            try:
                self.state.register(
                    reg.scheduler_id,
                    reg.address,
                    reg.http_address,
                    reg.capacity,
                    pid=reg.pid,
                    hostname=reg.hostname,
                    peer=reg.peer,
                    replicas=reg.replicas,
                    max_replicas=reg.max_replicas,
                )
            except AlreadyExists as err:
                log.warning(
                    "refused scheduler %s from %s (pid %d): %s", reg.scheduler_id, reg.address, reg.pid, err
                )
                raise
            except LimitReached as err:
                # Said at most once a minute: a launcher looping on new ids must not flood the log.
                self._full_refusals += 1
                now = self.clock.now()
                if now - self._full_logged_at >= FULL_LOG_EVERY_S:
                    log.warning(
                        "%s (refused for want of room since the last such line: %d)", err, self._full_refusals
                    )
                    self._full_logged_at, self._full_refusals = now, 0
                raise
            self._backlog.forget(reg.scheduler_id)  # restarted, it may give another timeout
            # Restarted, it routes by no table yet. Ids of schedulers gone are dropped now and then.
            self._routed.pop(reg.scheduler_id, None)
            if reg.says_routes:
                self._says_routes.add(reg.scheduler_id)
            else:
                self._says_routes.discard(reg.scheduler_id)
            if len(self._routed) > 2 * len(self.state.schedulers):
                self._routed = {k: v for k, v in self._routed.items() if k in self.state.schedulers}
            if len(self._says_routes) > 2 * len(self.state.schedulers):
                self._says_routes &= set(self.state.schedulers)
            self._refresh_resources()
            if self.blobs is not None:
                # Its cache may have changed meanwhile (evicted, emptied): it tells again what it holds.
                self.blobs.forget_holder(reg.scheduler_id)
        log.info(
            "scheduler %s registered from %s with %d replica(s)",
            reg.scheduler_id,
            reg.address,
            len(reg.replicas),
        )
        await self._publish_routes()
        self.wake()
        return self.settings.heartbeat_interval_s

    async def scheduler_health(
        self,
        scheduler_id: str,
        registry_version: int,
        reports: list[ReplicaReport],
        load: Mapping[str, LoadReport] | None = None,
        deadline_left_s: float | None = None,
        waited_s: float | None = None,
        routes_version: int = 0,
    ) -> bool:
        """Apply a scheduler's health update; False (NACK) when the scheduler is unknown or
        dead. ``routes_version``: the newest routing table it routes by (:meth:`_routes_out`).
        ``deadline_left_s``: the time left of the update's deadline when the head reads
        it (see ``Backlog``), or ``waited_s``: how long it waited in the head, measured by the
        caller (a health stream): how late the head is gives schedulers that much longer
        before they are declared dead. InvalidArgument, naming the field, for an id, a
        deployment name or a replica report past its bound (``shoal.core.reports``), before
        anything is applied; replicas' messages are kept cut."""
        check_scheduler_id(scheduler_id)
        reports = checked_reports(reports)
        load = checked_load(load or {})
        async with self.lock:
            # What an update can change is its scheduler's replicas: compare those only (all
            # of the cluster's, at every update from every scheduler, was quadratic).
            before = {_route_key(r) for r in self.state.replicas.on(scheduler_id)}
            ack = self.state.health(scheduler_id, registry_version, reports)
            after = {_route_key(r) for r in self.state.replicas.on(scheduler_id)}
            if ack:
                if deadline_left_s is not None:
                    self._backlog.observe(scheduler_id, deadline_left_s, self.clock.now())
                elif waited_s is not None:
                    self._backlog.observe_wait(waited_s, self.clock.now())
                self._loads[scheduler_id] = dict(load or {})
                # The deployments of the store only (what the dashboard shows): a deleted one's
                # replicas, draining, would start its series again after ``delete`` dropped it.
                self.series.record(
                    self.clock.now(),
                    time.time(),
                    scheduler_id,
                    {
                        n: Snapshot(r.requests, r.errors, r.latency)
                        for n, r in self._loads[scheduler_id].items()
                        if n in self.desired
                    },
                )
                if any(r.queued for r in self._loads[scheduler_id].values()):
                    # Requests are waiting somewhere: let the autoscaler look now.
                    self.wake()
        if not ack:
            log.info("NACK health update from unknown scheduler %s", scheduler_id)
            return False
        # A version this head has not made is another head's (one before a restart or a
        # failover): not a word on this head's tables.
        if self._routed.get(scheduler_id, 0) < routes_version <= self._routes.version:
            self._routed[scheduler_id] = routes_version
            self._caught_up(scheduler_id=scheduler_id)
            self._routes_taken.fire()
        if before != after:
            # Routes change only with replicas' states, addresses and specs: nothing else here does.
            self.wake()
            await self._publish_routes()
        return True

    def health_stream_ended(self, scheduler_id: str, last_update: float) -> None:
        """A scheduler's health stream ended (``HeadService.StreamHealth``), ``last_update``
        (this head's clock) the last update read on it: it is dead ``dead_after_stream_end_s``
        later unless it sends an update again (``ClusterState.stream_ended``). A killed
        scheduler's connection closes at once, so schedulers killed together are found dead
        together, not over the heartbeat interval their last updates were spread over.
        Not a coroutine (it is called as the stream's handler unwinds, cancelled too): one
        field set, between two awaits of anything holding the lock."""
        self.state.stream_ended(scheduler_id, last_update)
        self.wake()  # the reconcile loop's next wake-up may be sooner now

    # ------------------------------------------------------------ deployments

    async def apply(self, spec: DeploymentSpec, if_revision: int | None = None) -> ApplyResult:
        """Create or update a deployment. InvalidArgument when its model lies outside
        ``allowed_model_dirs`` (the replica's own check, ``check_deployable``) or its
        ``auth.tokens`` names a token that does not exist.

        ``if_revision``: apply only if the deployment is at that revision now, checked under
        the lock (optimistic concurrency, as Kubernetes' ``resourceVersion``); 0: only if no
        deployment of that name exists. None: no check, the last writer wins.
        RevisionConflict (nothing changes) otherwise; InvalidArgument when it is negative."""
        if if_revision is not None:
            check_if_revision(if_revision)
        # In a thread: it may read and parse the model's module file.
        await asyncio.to_thread(
            check_deployable, spec, self.settings.allowed_model_dirs, self.settings.model_uri_prefixes
        )
        if self.blobs is not None:
            self.blobs.check_named(spec)
        unknown = [n for n in required_tokens(spec) if self.tokens.get(n) is None]
        if unknown:
            raise InvalidArgument(
                f"deployment {spec.name!r}: auth.tokens names unknown token(s) "
                f"{', '.join(map(repr, unknown))}; create them with "
                "'shoal token create --role infer --name NAME'"
            )
        async with self.lock:
            if if_revision is not None:
                self._check_revision(spec.name, if_revision)
            self.traffic.check_deployment_name(spec.name)
            self._check_room(spec.name)
            old = self.desired.get(spec.name)
            if old is not None:
                # The restart count is the head's (shoal restart): a spec file does not reset it.
                spec = spec.model_copy(update={"restarts": old.restarts})
            changed = old is None or not old.same_as(spec)
            change = describe_change(old, spec) if changed else ""
            if changed:
                self._check_spec_room(spec)
                # The spec, the tombstone lifted, the revision and the event: one commit, and
                # nothing in memory changes unless the store took all of it.
                batch = Batch()
                batch.put(DEPLOYMENTS + spec.name, spec.to_json())
                lifted = spec.name in self.deleted
                if lifted:
                    batch.delete(TOMBSTONES + spec.name)
                above = self._last_revisions.get(spec.name, 0)
                self._record_change(self.history.staged(batch), old, spec, change, above)
                await batch.commit(self.store)
                self.desired[spec.name] = spec
                self.broken.pop(spec.name, None)
                if lifted:
                    del self.deleted[spec.name]
                    self._last_revisions.pop(spec.name, None)
                    # The deleted one's replicas not removed yet: they are not this one's.
                    self._leftovers.update(r.id for r in self.state.replicas.of(spec.name))
                self._refresh_resources()
            # A deploy, even of the same spec, ends a FAILED state or a crash-loop backoff.
            retried = self.state.clear_start_failures(spec.name)
            current = self.history.current(spec.name)
        if changed:
            log.info("deployment %s %s: %s", spec.name, "created" if old is None else "updated", change)
            self.wake()
            await self._publish_and_send()
        else:
            if retried:
                log.info("deployment %s: starting its replicas again after failed starts", spec.name)
                self.wake()
            # Nothing new, but the table with this spec may still be on its way: the same spec
            # applied a moment ago by another call that still waits for it, or this call a
            # retry of one whose answer was lost. Before, this one answered at once.
            await self._publish_and_send(publish=False)
        number = current.number if current is not None else 0
        return ApplyResult(created=old is None, changed=changed, revision=number, change=change)

    def _check_revision(self, name: str, expected: int, verb: str = "apply") -> None:
        """RevisionConflict unless deployment ``name`` is at revision ``expected`` (0: unless
        it does not exist), its message for ``verb`` (``apply`` or ``scale``). Under the lock."""
        done, change, when = _REFUSED[verb]
        exists = name in self.desired or name in self.broken
        current = self.history.current(name) if exists else None
        number = current.number if current is not None else 0
        if exists and expected and number == expected:
            return
        if not exists and not expected:
            return
        if not exists:
            raise RevisionConflict(
                f"deployment {name!r} does not exist (expected revision {expected}): nothing was "
                "applied; it was deleted or never created: apply with if_revision 0 to create it"
            )
        if not expected:
            raise RevisionConflict(
                f"deployment {name!r} exists already, at {_revision_name(current)} (expected none): "
                f"nothing was {done}; look at its spec and history, and {verb} with if_revision "
                f"{number} to {change} it"
            )
        raise RevisionConflict(
            f"deployment {name!r} is at {_revision_name(current)}, not revision {expected}: nothing "
            f"was {done}; look at its history ('shoal history {name}') and {verb} again with "
            f"if_revision {number} {when}"
        )

    @staticmethod
    def _record_change(
        history: StagedHistory, old: DeploymentSpec | None, spec: DeploymentSpec, change: str, above: int = 0
    ) -> Revision | None:
        """Stage a revision when the change replaces replicas, and an event; ``above``: the last
        revision number of a deployment of that name deleted before. Under the lock."""
        name = spec.name
        kind = "created" if old is None else "updated"
        if old is not None and old.process_hash() == spec.process_hash():
            current = history.current(name)
            number = current.number if current is not None else None
            history.record(name, kind, f"{change} (replicas kept)", number)
            return None
        if old is not None:
            _keep_first_spec(history, name, old)
        rev = history.add_revision(name, kind, spec.to_json(), spec.process_hash(), change, above=above)
        history.record(name, kind, f"revision {rev.number}: {change}", rev.number)
        return rev

    async def restart(self, name: str) -> tuple[Revision, DeploymentSpec]:
        """Replace the deployment's replicas one at a time (a rolling update to the same spec
        with its restart count one higher: new processes load the model's code and files
        again). Ends a FAILED state. NotFound / FailedPrecondition (broken) like ``scale``."""
        async with self.lock:
            spec = self._get(name)
            new = spec.model_copy(update={"restarts": spec.restarts + 1})
            batch = Batch()
            batch.put(DEPLOYMENTS + name, new.to_json())
            history = self.history.staged(batch)
            _keep_first_spec(history, name, spec)
            rev = history.add_revision(
                name, "restarted", new.to_json(), new.process_hash(), f"restart {new.restarts}"
            )
            history.record(
                name, "restarted", f"revision {rev.number}: replicas replaced one at a time", rev.number
            )
            await batch.commit(self.store)
            self.state.clear_start_failures(name)
            self.desired[name] = new
        log.info("deployment %s restarting (revision %d)", name, rev.number)
        self.wake()
        await self._publish_and_send()
        return rev, new

    async def rollback(self, name: str, revision: int = 0) -> tuple[Revision, DeploymentSpec]:
        """Apply an earlier revision's spec again, as a rolling update; its replica count and
        autoscaling stay the current ones. ``revision`` 0: the latest earlier one that did not
        fail and differs from the current spec. Returns the new revision (kind ``rolled_back``).

        NotFound: no such deployment or revision kept. FailedPrecondition: no earlier revision
        to go back to, the current spec is already that one, or the deployment got a new
        revision (a deploy, restart or rollback) while the target was checked, outside the
        lock: nothing changes then. InvalidArgument: revision < 0.
        """
        if revision < 0:
            raise InvalidArgument(f"revision must be >= 1 (or 0 for the previous one), got {revision}")
        async with self.lock:
            spec = self._get(name)
            target = self._rollback_target(name, spec, revision)
            seen = self.history.current(name)
        # In a thread, outside the lock, like apply: it may read the model's module file.
        old_spec = _revision_spec(name, target)
        await asyncio.to_thread(
            check_deployable, old_spec, self.settings.allowed_model_dirs, self.settings.model_uri_prefixes
        )
        async with self.lock:
            spec = self._get(name)
            now = self.history.current(name)
            if _revision_key(now) != _revision_key(seen):
                # A deploy, restart or rollback came in between: applying the target now would undo
                # it unseen, and "the previous revision" may be another one now.
                raise FailedPrecondition(
                    f"deployment {name!r} got {_revision_name(now)} while the rollback was checked, "
                    f"after {_revision_name(seen)}: nothing was rolled back; look at its history "
                    "and roll back again"
                )
            batch = Batch()
            rev, new = self._roll_back(batch, self.history.staged(batch), name, spec, target, "asked for")
            await batch.commit(self.store)
        self.wake()
        await self._publish_and_send()
        return rev, new

    def _rollback_target(self, name: str, spec: DeploymentSpec, number: int) -> Revision:
        revisions = self.history.revisions(name)
        if number:
            target = self.history.get(name, number)
            if target is None:
                kept = f"{revisions[0].number} to {revisions[-1].number}" if revisions else "none"
                raise NotFound(f"deployment {name!r} has no revision {number} (kept: {kept})")
            return target
        found = self._previous(name, spec.process_hash())
        if found is None:
            raise FailedPrecondition(f"deployment {name!r} has no earlier revision to roll back to")
        return found

    def _previous(self, name: str, current_hash: str) -> Revision | None:
        """The latest revision before the current one that did not fail and runs another spec."""
        revisions = self.history.revisions(name)[:-1]
        for rev in reversed(revisions):
            if not rev.outcome.startswith("failed") and rev.spec_hash != current_hash:
                return rev
        return None

    def _roll_back(
        self,
        batch: Batch,
        history: StagedHistory,
        name: str,
        spec: DeploymentSpec,
        target: Revision,
        reason: str,
    ) -> tuple[Revision, DeploymentSpec]:
        """Stage making ``target``'s spec the desired one again (keeping the replica count);
        the head takes it once ``batch`` is committed. Under the lock."""
        new = _revision_spec(name, target).model_copy(
            update={
                "replicas": spec.replicas,
                "autoscaling": spec.autoscaling,
                "serve_revisions": spec.serve_revisions,
            }
        )
        if new.same_as(spec):
            raise FailedPrecondition(f"deployment {name!r} already runs the spec of revision {target.number}")
        batch.put(DEPLOYMENTS + name, new.to_json())
        rev = history.add_revision(
            name,
            "rolled_back",
            new.to_json(),
            new.process_hash(),
            f"rolled back to revision {target.number} ({reason})",
            rollback_to=target.number,
        )
        history.record(
            name,
            "rolled_back",
            f"rolled back to revision {target.number} ({reason}), as revision {rev.number}",
            target.number,
        )

        def rolled_back() -> None:
            self.state.clear_start_failures(name)
            self.desired[name] = new
            self._refresh_resources()
            log.warning("deployment %s rolled back to revision %d: %s", name, target.number, reason)

        batch.then(rolled_back)
        return rev, new

    async def _handle_failed(self) -> None:
        """Deployments that just became FAILED: an event, the revision's outcome, and for an
        update (not a rollback itself: no loops), a rollback to the previous revision, so that
        its old replicas, still serving, stay. Under the lock.

        One the store refuses to record (a full disk, a lock another process holds) is
        handled again at the next pass; this pass goes on. It used to end the pass there and
        drop the failure: the update was never rolled back."""
        for failed in self.state.take_failed():
            try:
                await self._handle_one_failed(*failed)
            except StoreError as err:
                log.error("deployment %s failed; recording it waits for the store: %s", failed[0], err)
                self.state.fail_again(failed)

    async def _handle_one_failed(self, name: str, spec_hash: str, message: str) -> None:
        spec = self.desired.get(name)
        if spec is None or spec.process_hash() != spec_hash:
            return  # replaced since
        current = self.history.current(name)
        number = current.number if current is not None and current.spec_hash == spec_hash else None
        # The outcome, the event and the rollback: one commit, so that one the store refuses
        # is handled again whole at the next pass.
        batch = Batch()
        history = self.history.staged(batch)
        if number is not None:
            history.set_outcome(name, number, f"failed: {message}"[:500])
        history.record(
            name, "failed", f"replicas keep crashing (before READY or soon after): {message}", number
        )
        target = None
        if number is not None and current is not None and current.kind != "rolled_back":
            target = self._previous(name, spec_hash)
        if target is not None:
            try:
                self._roll_back(batch, history, name, spec, target, f"revision {number} failed")
            except FailedPrecondition as err:  # its spec unreadable: the failure is still recorded
                log.error("deployment %s failed and cannot be rolled back: %s", name, err)
        await batch.commit(self.store)

    async def scale(
        self, name: str, replicas: int, if_revision: int | None = None, if_replicas: int | None = None
    ) -> None:
        """Set a deployment's fixed replica count. NotFound for an unknown name;
        FailedPrecondition for a broken deployment, and for an autoscaled one (the autoscaler
        owns its count: a stored ``replicas`` would change nothing); InvalidArgument for a
        count the spec does not allow.

        ``if_revision``: scale only if the deployment is at that revision now, as ``apply``
        checks it (RevisionConflict otherwise, nothing changes): a count chosen for a spec that
        has changed since is refused. A scale makes no revision, so it does not guard against
        another scale: ``if_replicas`` does. Scale only if the deployment's replica count (its
        spec's ``replicas``, the count it is scaled to, not how many run now) is that now
        (ReplicasConflict otherwise, nothing changes): of two scales from the same count, one
        goes through. Both are checked under the lock that the write is made under."""
        if if_revision is not None:
            check_if_revision(if_revision)
        if if_replicas is not None:
            check_if_replicas(if_replicas)
        async with self.lock:
            spec = self._get(name)
            if if_revision is not None:
                self._check_revision(name, if_revision, "scale")
            policy = spec.autoscaling
            if policy is not None:
                raise FailedPrecondition(
                    f"deployment {name!r} is autoscaled: the autoscaler sets its replica count between "
                    f"min_replicas {policy.min_replicas} and max_replicas {policy.max_replicas}; to change "
                    "that, edit autoscaling in its spec (or remove it for a fixed count) and deploy it"
                )
            if if_replicas is not None and spec.replicas != if_replicas:
                raise ReplicasConflict(
                    f"deployment {name!r} is scaled to {spec.replicas} "
                    f"{'replica' if spec.replicas == 1 else 'replicas'}, not {if_replicas}: "
                    f"nothing was scaled; its count changed since it was read ('shoal events {name}' "
                    f"shows what changed it): scale again with if_replicas {spec.replicas} if "
                    f"{replicas} still fits"
                )
            new = parse_spec({**spec.model_dump(mode="json"), "replicas": replicas})
            batch = Batch()
            batch.put(DEPLOYMENTS + name, new.to_json())
            if new.to_json() != spec.to_json():
                current = self.history.current(name)
                self.history.staged(batch).record(
                    name,
                    "scaled",
                    f"replicas {spec.replicas} → {replicas}",
                    current.number if current is not None else None,
                )
            await batch.commit(self.store)
            self.desired[name] = new
        log.info("deployment %s scaled to %d", name, replicas)
        self.wake()

    async def delete(self, name: str) -> None:
        """Delete a deployment and remove its replicas. Also for a broken deployment, and
        for a name the store does not know whose replicas schedulers report (the operator's
        way to remove them). NotFound when the name is none of these; FailedPrecondition
        while a traffic route sends to it (its share of the route's requests would fail)."""
        async with self.lock:
            running = any(r.deployment == name for r in self.state.replicas.values())
            if name not in self.desired and name not in self.broken and not running:
                raise NotFound(f"no deployment named {limits.shown(repr(name))}")
            route = next((r for r in self.traffic.routes.values() if name in r.deployments), None)
            if route is not None:
                raise FailedPrecondition(
                    f"deployment {name!r} gets requests from route {route.name!r} ({route.describe()}): "
                    f"send them elsewhere first ('shoal route {route.name} OTHER=100') "
                    f"or delete the route ('shoal route --delete {route.name}')"
                )
            # The tombstone, the spec, the revisions and the event: one commit. The tombstone
            # keeps the last revision number, so that one created again numbers above it: an
            # if_revision read before the delete never matches it.
            now = time.time()
            batch = Batch()
            batch.delete(DEPLOYMENTS + name)
            history = self.history.staged(batch)
            last = max(history.forget(name), self._last_revisions.get(name, 0))
            batch.put(TOMBSTONES + name, json.dumps({"deleted_at": now, "revision": last}))
            history.record(name, "deleted", "deleted; its replicas drain and stop")
            expired = self._expired_tombstones(name, now)
            # What the commit has room for (and the floor); the rest go at a later delete.
            expired = expired[: max(0, MAX_COMMIT - len(batch.puts) - len(batch.deletes) - 1)]
            for old in expired:
                batch.delete(TOMBSTONES + old)
            # Their numbers stay taken: any deployment with none kept numbers above them.
            history.raise_floor(max((self._last_revisions.get(old, 0) for old in expired), default=0))
            await batch.commit(self.store)
            self.deleted[name] = now
            if last:
                self._last_revisions[name] = last
            for old in expired:
                del self.deleted[old]
                self._last_revisions.pop(old, None)
            self.desired.pop(name, None)
            self.broken.pop(name, None)
            self.targets.pop(name, None)
            self._restored.discard(name)
            self.autoscaler.forget(name)
            for direction in ("up", "down"):  # a series for each deployment ever deleted, else
                self.scale_decisions.pop((name, direction), None)
            # Its charts go too: kept, every deleted deployment held up to an hour of points
            # for as long as the head ran, and one created again showed the old one's traffic.
            self.series.forget([name])
            self._revision_specs = {k: v for k, v in self._revision_specs.items() if k[0] != name}
        log.info("deployment %s deleted", name)
        self.wake()
        await self._publish_and_send()

    # ------------------------------------------------------------ traffic routes

    async def set_route(self, route: TrafficRoute) -> None:
        """Create or replace a traffic route (see ``shoal.head.traffic``): FailedPrecondition when
        a deployment has its name, NotFound naming a target that is no deployment."""
        async with self.lock:
            protected = {n for n, s in self.desired.items() if s.auth is not None}
            changed = await self.traffic.set(route, set(self.desired) | set(self.broken), protected)
        if changed:
            log.info("route %s: %s", route.name, route.describe())
            await self._publish_and_send()

    async def delete_route(self, name: str) -> None:
        """NotFound when there is no route ``name``."""
        async with self.lock:
            await self.traffic.delete(name)
        log.info("route %s deleted", name)
        await self._publish_and_send()

    # ------------------------------------------------------------ tokens

    async def create_token(self, role: Role, name: str = "") -> tuple[TokenRecord, str]:
        """A new token and its secret (see ``TokenRegistry.create``); schedulers learn its hash."""
        rec, secret = await self.tokens.create(role, name)
        log.info("token %s created with role %s", rec.name, rec.role)
        await self._publish_and_send()
        return rec, secret

    async def revoke_token(self, name: str) -> None:
        """Revoke a token; schedulers stop accepting it with the next routing table. NotFound if unknown."""
        await self.tokens.revoke(name)
        log.info("token %s revoked", name)
        await self._publish_and_send()

    def _get(self, name: str) -> DeploymentSpec:
        spec = self.desired.get(name)
        if spec is None and name in self.broken:
            raise FailedPrecondition(
                f"deployment {name!r} is broken ({self.broken[name]}); apply a new spec or delete it"
            )
        if spec is None:
            raise NotFound(f"no deployment named {limits.shown(repr(name))}")
        return spec

    def _expired_tombstones(self, name: str, now: float) -> list[str]:
        """The tombstones a delete of ``name`` drops, of deployments no scheduler reports a
        replica of: those older than TOMBSTONE_TTL_S, and, past TOMBSTONES_PER_DEPLOYMENT
        times ``max_deployments``, the oldest others. Each delete leaves one, and a client
        deleting and creating new names in a loop grew them for a week: at 100,000, each
        delete and each status took 7 ms more. Under the lock."""
        running = {r.deployment for r in self.state.replicas.values()}
        gone = [n for n in self.deleted if n not in running and n != name]
        expired = [n for n in gone if self.deleted[n] < now - TOMBSTONE_TTL_S]
        excess = len(self.deleted) + (name not in self.deleted) - len(expired)
        excess -= TOMBSTONES_PER_DEPLOYMENT * self.settings.max_deployments
        if excess > 0:
            old = set(expired)
            expired += heapq.nsmallest(
                excess, (n for n in gone if n not in old), key=self.deleted.__getitem__
            )
        return expired

    def _warn_over_limits(self) -> None:
        """Log each kind the store holds more of than its setting allows (the setting was
        lowered): all are kept and served; creating more is refused until some are deleted."""
        held = {
            "max_deployments": len(self.desired) + len(self.broken),
            "max_routes": len(self.traffic.routes),
            "max_tokens": len(self.tokens.list()) + len(self.tokens.unreadable),
        }
        for setting, count in held.items():
            limit = getattr(self.settings, setting)
            if count > limit:
                log.warning(
                    "the store holds %d of what setting %s bounds to %d: all are kept; creating more "
                    "is refused until fewer than %d are left",
                    count,
                    setting,
                    limit,
                    limit,
                )

    def _check_room(self, name: str) -> None:
        """LimitReached when deployment ``name`` is a new one and the head holds
        ``max_deployments`` already (broken ones count: they are in the store too). Under the
        lock, before anything is written."""
        held = len(self.desired) + len(self.broken)
        if name not in self.desired and name not in self.broken and held >= self.settings.max_deployments:
            raise LimitReached.count(
                "deployment",
                held,
                "max_deployments",
                name,
                "delete deployments no longer used ('shoal delete NAME')",
            )

    def _check_spec_room(self, spec: DeploymentSpec) -> None:
        """LimitReached when the specs the head keeps (each deployment's and its kept
        revisions') would pass ``max_specs_mb`` with ``spec`` (its row and its revision; an
        update's old row is counted too). Under the lock, before anything is written."""
        held = sum(len(s.to_json()) for s in self.desired.values()) + self.history.spec_chars()
        size = len(spec.to_json())
        if held + 2 * size > self.settings.max_specs_mb * 2**20:
            raise LimitReached(
                f"the head keeps {held / 2**20:.1f} MB of deployment specs (each deployment's and its "
                f"revisions'), and deployment {spec.name!r}'s spec of {size} bytes would pass its limit "
                f"(setting max_specs_mb, {self.settings.max_specs_mb} MB): nothing was applied; delete "
                "deployments no longer used ('shoal delete NAME': their revisions go with them), or "
                "raise max_specs_mb"
            )

    def _refresh_resources(self) -> None:
        self.state.resources_of = {n: Capacity.of(s.resources) for n, s in self.desired.items()}

    # ------------------------------------------------------------ reconcile

    async def reconcile_once(self, *, wait_acts: bool = True) -> list[Action]:
        """One pass: decide under the lock, then act on schedulers concurrently.

        ``wait_acts=False`` (the reconcile loop): the calls to schedulers run in a task of the
        head's own, and the pass returns once it has decided, so that the next pass (the next
        scheduler found dead) does not wait for the slowest call of this one, up to
        ``rpc_timeout_s`` for a scheduler that does not answer. What it placed is PENDING
        already: the next pass does not place it again."""
        async with self.lock:
            locked = time.perf_counter()
            self._refresh_resources()
            late = self._backlog.behind(self.clock.now())
            if late > LATE_WARNING_S >= self.state.late_s:
                log.warning(
                    "health updates wait %.1fs in this head before it reads them (it is short of "
                    "CPU): schedulers get that much longer before they are declared dead",
                    late,
                )
            self.state.late_s = late
            self._leftovers.intersection_update(self.state.replicas)
            # Known to be a deleted deployment's, they go in the adoption wait too.
            retired = [] if self._paused else self.state.retire(self._leftovers)
            wait = self._adopt_until - self.clock.now()
            if wait > 0:
                # Autoscaling targets wait too: afterwards they start from what runs.
                self.state.expire()
                actions: list[Action] = retired
                self.state.pending_reasons = {
                    n: f"waiting {wait:.0f}s for schedulers to register again after the head started"
                    for n in self.desired
                }
            else:
                await self._handle_failed()
                running = collections.Counter(r.deployment for r in self.state.replicas.values())
                alive = {s.id for s in self.state.schedulers.values() if s.state == ALIVE}
                desired = self._targets(running, alive)
                retained = {n: self._retained(s) for n, s in self.desired.items() if s.serve_revisions > 1}
                if self._paused:
                    self.state.expire()
                    actions = []
                else:
                    actions = retired + self.state.reconcile(desired, self.deleted, retained=retained)
                    if self.state.more_to_place:
                        self.wake()
            for sid in list(self._clients):
                sched = self.state.schedulers.get(sid)
                if sched is None or sched.address != self._clients[sid][0]:
                    await self._clients.pop(sid)[1].close()
            for sid in [s for s in self._loads if s not in self.state.schedulers]:
                del self._loads[sid]  # forgotten
                self._backlog.forget(sid)
                self.series.forget_scheduler(sid)
            if self.blobs is not None:
                self.blobs.keep_holders(self.state.schedulers)
            self._held_s = time.perf_counter() - locked
        self._check_isolated()
        if actions and not wait_acts:
            # The routes of replicas found gone now, not after the calls.
            await self._publish_routes()
            self._tasks.spawn(self._act_all(actions), "act")
        elif actions:
            await self._act_all(actions)
        else:
            await self._publish_routes()
        return actions

    async def _act_all(self, actions: list[Action]) -> None:
        await asyncio.gather(*(self._act(a) for a in actions))
        await self._publish_routes()

    def _check_isolated(self) -> None:
        """A leader that hears from no scheduler any more, all of them silent since the last
        pass, while a standby head still reaches it, is more likely cut from the schedulers
        than the schedulers all dead: it steps down (``on_isolated``) so that the standby,
        whose door the schedulers knock on, leads. Without a standby it stays: a lone head
        whose schedulers stopped must not stop too."""
        alive = any(s.state == ALIVE for s in self.state.schedulers.values())
        lost_all, self._had_schedulers = self._had_schedulers and not alive, alive
        standbys = self.blobs.standbys() if self.blobs is not None else 0
        if lost_all and standbys and self.on_isolated is not None:
            reason = (
                f"every scheduler went silent at once while {standbys} standby head(s) still "
                "reach this one: it is more likely cut from the schedulers than they all died"
            )
            log.warning("%s; stepping down so that a standby leads", reason)
            self.on_isolated(reason)

    def _retained(self, spec: DeploymentSpec) -> list[DeploymentSpec]:
        """The earlier revisions that keep serving beside the current one: of the kept
        revisions, newest first, up to ``serve_revisions - 1`` that did not fail, each the
        newest of its spec (a restart replaces the revision it restarts; a rollback is the
        revision it rolls back to, under its new number). Each runs the current replica
        count and ``serve_revisions``. Under the lock."""
        seen = {_identity(spec)}
        out: list[DeploymentSpec] = []
        for rev in reversed(self.history.revisions(spec.name)):
            if len(out) >= spec.serve_revisions - 1:
                break
            if rev.outcome.startswith("failed"):
                continue
            key = (spec.name, rev.number, rev.spec_hash)
            earlier = self._revision_specs.get(key)
            if earlier is None:
                try:
                    earlier = self._revision_specs[key] = _revision_spec(spec.name, rev)
                except FailedPrecondition:
                    continue
            if _identity(earlier) in seen:
                continue
            seen.add(_identity(earlier))
            out.append(
                earlier.model_copy(
                    update={"replicas": spec.replicas, "serve_revisions": spec.serve_revisions}
                )
            )
        return out

    def _targets(
        self, running: collections.Counter[str], alive: set[str]
    ) -> dict[str, tuple[DeploymentSpec, int]]:
        """Each deployment's spec and the replica count to reconcile it to (:meth:`_target`).
        A deployment whose count cannot be computed keeps its last one (what runs, or the
        spec's first count, when it has none) and its error is logged, once until it changes:
        before, an OverflowError in one deployment's autoscaling ended every pass, and for
        90 s no deployment was healed, placed or scaled. Called under the lock."""
        out: dict[str, tuple[DeploymentSpec, int]] = {}
        errors: dict[str, str] = {}
        for name, spec in self.desired.items():
            try:
                out[name] = (spec, self._target(spec, running[name], alive))
            except Exception as err:
                kept = self.targets.get(name, running[name] or spec.initial_replicas())
                errors[name] = f"{type(err).__name__}: {err}"
                if self._target_errors.get(name) != errors[name]:
                    log.exception(
                        "deployment %s: its replica count could not be computed; it keeps %d "
                        "replicas while the others are reconciled",
                        name,
                        kept,
                    )
                out[name] = (spec, kept)
        self._target_errors = errors
        return out

    def _target(self, spec: DeploymentSpec, running: int, alive: set[str]) -> int:
        """The replica count to reconcile to: the spec's, or the autoscaler's. ``running``: the
        deployment's replicas now; ``alive``: the live schedulers. Called under the lock."""
        policy = spec.autoscaling
        if policy is None:
            self._restored.discard(spec.name)
            self.targets.pop(spec.name, None)
            return spec.replicas
        current = self._kept(spec, running)
        self._restored.discard(spec.name)
        load = 0
        for sid, loads in self._loads.items():
            report = loads.get(spec.name)
            if sid in alive and report is not None:
                load += report.in_flight + report.queued
        self.autoscaler.observe(spec.name, load)
        starting = sum(1 for r in self.state.replicas.of(spec.name) if r.state in _STARTING)
        decision = self.autoscaler.decide(spec.name, policy, current, starting)
        if decision is not None and decision.desired != current:
            log.info(
                "autoscaling %s from %d to %d: %s", spec.name, current, decision.desired, decision.reason
            )
            self.state.event(
                "scaled",
                f"{spec.name}: {current} -> {decision.desired} replicas ({decision.reason})",
                deployment=spec.name,
            )
            self.scale_decisions[(spec.name, "up" if decision.desired > current else "down")] += 1
            current = decision.desired
        self.targets[spec.name] = current
        return current

    def _kept(self, spec: DeploymentSpec, running: int) -> int:
        """The count an autoscaled deployment's pass starts from: the autoscaler's last. Until
        it set one, after a head restart (``_restored``), what runs (``running``), none
        included, rather than the spec's start count: a head that took the start count for a
        deployment with no replica started one of every deployment scaled to zero at once. A
        new one starts at its first count."""
        current = self.targets.get(spec.name)
        if current is None:
            current = running if running or spec.name in self._restored else spec.initial_replicas()
        return current

    def target_of(self, spec: DeploymentSpec) -> int:
        """The replica count ``spec``'s deployment is reconciled to, as status, the metrics
        and the dashboard show it; decides nothing. An autoscaled one's is the count the head
        keeps (:meth:`_kept`), within its bounds, as its next pass takes it (the spec's count
        was shown after a head restart until the autoscaler decided: 1 for a deployment
        running 3, or min_replicas 2). Costs a lookup; the caller holds the lock."""
        policy = spec.autoscaling
        if policy is None:
            return spec.replicas
        current = self._kept(spec, self.state.replicas.count(spec.name))
        return max(policy.min_replicas, min(policy.max_replicas, current))

    async def _act(self, action: Action) -> None:
        client = self._client(action.scheduler_id)
        if client is None:
            return
        if isinstance(action, CreateReplica):
            log.info(
                "creating replica %s of %s on scheduler %s",
                action.replica_id,
                action.deployment,
                action.scheduler_id,
            )
            try:
                version = await client.create_replica(action.replica_id, action.spec)
            except ShoalError as err:
                async with self.lock:
                    self.state.create_failed(
                        action.replica_id, str(err), unavailable=isinstance(err, Unavailable)
                    )
                # Paused, the cluster is shutting down (shoal up stopped in its first seconds):
                # a scheduler refusing a start then is expected, not worth a warning.
                log.log(
                    logging.INFO if self._paused else logging.WARNING,
                    "could not create replica %s: %s",
                    action.replica_id,
                    err,
                )
                return
            async with self.lock:
                self.state.confirm_created(action.replica_id, version)
        elif isinstance(action, RemoveReplica):
            log.info("removing replica %s from scheduler %s", action.replica_id, action.scheduler_id)
            try:
                await client.remove_replica(action.replica_id, action.graceful)
            except ShoalError as err:
                log.warning("could not remove replica %s (will retry): %s", action.replica_id, err)
                async with self.lock:
                    self.state.remove_failed(action.replica_id)

    def _client(self, scheduler_id: str) -> SchedulerClient | None:
        sched = self.state.schedulers.get(scheduler_id)
        if sched is None:
            return None
        cached = self._clients.get(scheduler_id)
        if cached is None or cached[0] != sched.address:
            cached = (sched.address, self._client_factory(scheduler_id, sched.address))
            self._clients[scheduler_id] = cached
        return cached[1]

    # ------------------------------------------------------------ logs

    async def read_log(
        self, replica_id: str, tail_bytes: int, follow: bool, client: str = ""
    ) -> AsyncGenerator[bytes, None]:
        """A replica's log from its scheduler; the replica may have died (its log stays).

        Asks the scheduler the head knows it on, else every live scheduler. NotFound if none
        has it; InvalidArgument, asking none, for an id that cannot be a replica's (before, a
        path such as ``../../etc/passwd`` or a 10,000-character id went to every live
        scheduler, and came back whole in the 404).

        ResourceExhausted, asking none, while ``max_log_streams`` reads (follows or not) are
        open: each holds a stream to a scheduler on the head's one connection to it (where
        ``CreateReplica`` and ``RemoveReplica`` need one too), a file on the scheduler, and up
        to its gRPC windows (about 8 MB) of log in the head while its client does not read.
        Before, 1,100 follows that read nothing took the head to 4.5 GB as the replica wrote
        200 MB, and past 1,024 on one scheduler the head's ``CreateReplica`` to it waited
        behind them: a scale-up never happened.

        ResourceExhausted too while ``client`` (:func:`shoal.auth.client_key`: its token, else
        its address; "" counts as no one) holds ``max_log_streams_per_client`` of them: before,
        one client (a follow of a large deployment, a script that never ends its reads) could
        take every place and leave none for anyone else's.
        """
        if not REPLICA_ID.fullmatch(replica_id):
            raise InvalidArgument(
                f"{limits.quoted(replica_id)} is no replica id: lowercase letters, digits, '-', '_' "
                "and '.', at most 128"
            )
        cap = self.settings.max_log_streams
        if cap and self._log_streams >= cap:
            if not self._log_refusing:
                self._log_refusing = True  # logged once until the count goes below the cap again
                log.warning(
                    "refusing replica log reads: %d are open, the limit (setting max_log_streams)",
                    self._log_streams,
                )
            raise ResourceExhausted(
                f"the head relays {self._log_streams} replica log reads and follows at once, its "
                f"limit (setting max_log_streams): the log of {replica_id!r} cannot be read now; "
                "retry once another ends"
            )
        per_client = self.settings.max_log_streams_per_client
        if client and per_client and self._log_clients[client] >= per_client:
            kind, _, who = client.partition(":")
            whose = f"the token {who!r}" if kind == "token" else f"the address {who}"
            raise ResourceExhausted(
                f"{whose} holds {self._log_clients[client]} replica log reads and "
                f"follows, the limit for one client (setting max_log_streams_per_client): the log "
                f"of {replica_id!r} cannot be read now; retry once one of them ends"
            )
        self._log_streams += 1
        if client:
            self._log_clients[client] += 1
        try:
            async for data in self._read_log(replica_id, tail_bytes, follow):
                yield data
        finally:
            self._log_streams -= 1
            if client:
                self._log_clients[client] -= 1
                if not self._log_clients[client]:
                    del self._log_clients[client]
            if self._log_streams < cap:
                self._log_refusing = False

    async def _read_log(self, replica_id: str, tail_bytes: int, follow: bool) -> AsyncIterator[bytes]:
        async with self.lock:
            rec = self.state.replicas.get(replica_id)
            alive = [s.id for s in self.state.schedulers.values() if s.state == ALIVE]
            order = [rec.scheduler_id] if rec is not None else alive
        for sid in order:
            client = self._client(sid)
            if client is None:
                continue

            def gone(sid: str = sid) -> ShoalError | None:
                # A follow has no end of its own: one of a replica whose scheduler hung (a
                # machine that stopped answering, not one whose connection closed) went on
                # after the head declared the scheduler dead, for as long as the client waited.
                sched = self.state.schedulers.get(sid)
                if sched is None or sched.state != ALIVE:
                    return Unavailable(
                        f"scheduler {sid} of replica {replica_id!r} is "
                        f"{'gone' if sched is None else sched.state}: its log cannot be followed now"
                    )
                return None

            stream = client.read_log(replica_id, tail_bytes, follow)
            try:
                async for data in until(stream, gone, FOLLOW_CHECK_S) if follow else stream:
                    yield data
                return
            except NotFound:
                continue
            except Unavailable as err:
                # Its connection closed (a scheduler killed, restarted): gRPC's own words
                # ("Socket closed") named neither the scheduler nor what was lost.
                raise Unavailable(
                    f"scheduler {sid} of replica {replica_id!r} stopped answering: its log cannot "
                    f"be {'followed' if follow else 'read'} now ({err.message})"
                ) from err
        raise NotFound(f"no replica {replica_id!r} (and no log for it) on any live scheduler")

    # ------------------------------------------------------------ routes

    def _table(self) -> dict[str, DeploymentRoutes]:
        """The routing table's entries. An entry is rebuilt only when its deployment's
        replicas were touched (``ReplicaTable.take_touched``) or what else it shows changed
        (spec, tokens, revisions); the others are the current table's: at 10,000 replicas,
        rebuilding all of them at every registration and health change was most of the
        head's work. Under the lock."""
        touched = self.state.replicas.take_touched()
        old = self._routes.deployments
        inputs = {name: self._entry_inputs(name, spec) for name, spec in self.desired.items()}
        stale = [n for n in self.desired if n in touched or n not in old or self._inputs.get(n) != inputs[n]]
        routes = self.state.routes(stale)
        table = {}
        for name in self.desired:
            if name in stale:
                spec, allowed, revision, number, failed, unplaced = inputs[name]
                table[name] = DeploymentRoutes(
                    spec=spec,
                    # Without load (in_flight 0): a table that changed with every health update
                    # went to every scheduler every second. Load reaches the head in health updates.
                    routes=tuple(
                        Route(r.id, r.address, r.scheduler_id, 0, number.get(r.spec_hash, 0))
                        for r in routes.get(name, [])
                    ),
                    allowed_tokens=allowed,
                    revision=revision,
                    failed=failed,
                    unplaced=unplaced,
                )
            else:
                table[name] = old[name]
        self._inputs = inputs
        return table

    def _entry_inputs(self, name: str, spec: DeploymentSpec) -> _EntryInputs:
        """What a deployment's entry shows besides its replicas."""
        # A replica runs the newest revision of its spec (a rollback's number, not the
        # number it rolled back to): OIP version N reaches revision N.
        revisions = self.history.revisions(name)
        number = {rev.spec_hash: rev.number for rev in revisions}
        allowed = self.tokens.hashes(required_tokens(spec))
        failed = self.state.failed(spec)
        # Only placement's reasons: they hold still while nothing changes, where one that
        # counts down ("waiting 2s ...") would send the entry to every scheduler each pass.
        pending = self.state.pending_reasons.get(name, "")
        unplaced = pending if NO_ROOM.match(pending) else ""
        return (spec, allowed, revisions[-1].number if revisions else 0, number, failed, unplaced)

    async def _publish_routes(self, soon: bool = False) -> None:
        """A new table version when the routes changed, and the streams told (``soon``: see
        :meth:`_announce`)."""
        async with self.lock:
            table = self._table()
            token_hashes = self.tokens.hashes()
            deleted = tuple(sorted(self.deleted))
            traffic = dict(self.traffic.routes)
            # Schedulers keep the replicas of those not registered yet (RoutingTable.adopting).
            adopting = self.clock.now() < self._adopt_until
            # An entry that did not change stays the same object: the table's streams send
            # schedulers only the entries that are new objects (shoal.rpc.head_service).
            old = self._routes.deployments
            for name, entry in table.items():
                kept = old.get(name)
                if kept is not None and kept is not entry and kept == entry:
                    table[name] = kept  # rebuilt, but the same
            changed = len(table) != len(old) or any(old.get(n) is not e for n, e in table.items())
            if (
                changed
                or token_hashes != self._routes.token_hashes
                or deleted != self._routes.deleted
                or traffic != dict(self._routes.traffic)
                or adopting != self._routes.adopting
            ):
                self._routes = RoutingTable(
                    version=self._routes.version + 1,
                    deployments=table,
                    token_hashes=token_hashes,
                    deleted=deleted,
                    traffic=traffic,
                    ack=self._acks_wanted > 0,
                    adopting=adopting,
                )
                self._announce(soon)
            elif soon and self._announcing is not None:
                self._announce(soon)  # an earlier change still waits for its wave

    def _announce(self, soon: bool = False) -> None:
        """Wake the table streams: now, or, when they were woken less than ROUTES_GAP_S ago,
        that long after (once, for however many versions came meanwhile: each stream then sends
        the newest). 1,000 schedulers registering would otherwise send 1,000 streams a new
        version each: a million messages. Streams woken together also share their deltas.
        ``soon``: a control call waits for it; the least gap is ROUTES_GAP_CONTROL_S, and a
        wave set for later is brought forward."""
        loop = asyncio.get_running_loop()
        least = ROUTES_GAP_CONTROL_S if soon else ROUTES_GAP_S[0]
        gap = min(ROUTES_GAP_S[1], max(least, self._streams * ROUTES_GAP_PER_STREAM_S))
        at = self._announced_at + gap
        if self._announcing is not None:
            if not soon or self._announcing.when() <= at:
                return
            self._announcing.cancel()
            self._announcing = None
        if at <= loop.time():
            self._wake_streams()
        else:
            self._announcing = loop.call_at(at, self._wake_streams)

    def _wake_streams(self) -> None:
        self._announcing = None
        self._announced_at = asyncio.get_running_loop().time()
        woken, self._routes_changed = self._routes_changed, asyncio.Event()
        woken.set()

    async def watch_routes(self, scheduler_id: str) -> AsyncIterator[RoutingTable]:
        """The current routing table, then new versions, until the head stops: each time the
        streams are woken, the newest (versions that came meanwhile are skipped).
        InvalidArgument naming the field, before the first table, for an id that is no
        scheduler id (``shoal.core.reports``), as a registration's is checked."""
        check_scheduler_id(scheduler_id)
        seen = -1
        key = next(self._stream_keys)
        self._stream_of[key] = scheduler_id
        self._streams += 1
        try:
            while not self._stopping.is_set():
                wave = self._routes_changed  # set at the next wake
                if self._routes.version != seen:
                    table = self._routes
                    seen = table.version
                    yield table
                    # Resumed: the caller (HeadService.WatchRoutes) has written it to the stream.
                    self._stream_sent(key, seen)
                # Never sooner than the next wake, even when a version came while this stream
                # was sending: a stream sends at most once per wave.
                await wave.wait()
        finally:
            self._streams -= 1
            self._sent.pop(key, None)
            self._stream_of.pop(key, None)
            self._lagging.discard(key)
            self._routes_taken.fire()

    def _stream_sent(self, key: int, version: int) -> None:
        """Table stream ``key`` sent ``version``: wake _routes_out."""
        self._sent[key] = version
        self._caught_up(key)
        self._routes_taken.fire()

    def _caught_up(self, key: int = -1, scheduler_id: str = "") -> None:
        """Table stream ``key`` (or those of ``scheduler_id``) is waited for again once it has
        taken the current table (:meth:`_routes_out`)."""
        if not self._lagging:
            return
        keys = [key] if key >= 0 else [k for k, s in self._stream_of.items() if s == scheduler_id]
        for k in keys:
            if k in self._lagging and not self._stream_behind(k, self._routes.version):
                self._lagging.discard(k)

    def _stream_behind(self, key: int, version: int) -> bool:
        """Whether table stream ``key`` has not yet had ``version`` (or newer) taken: sent,
        and, for a live scheduler, said to be routed by (its health updates'
        ``routes_version``, which covers its ingress processes). A scheduler that never said
        and did not register saying it would (not registered, dead, or of a version that
        does not say) is taken at the send; one that registered so is waited for from its
        registration on (before, until its first word, up to a heartbeat, it was taken at
        the send: a deployment created then could be unknown to its workers)."""
        if self._sent.get(key, version) < version:
            return True
        sid = self._stream_of.get(key, "")
        sched = self.state.schedulers.get(sid)
        if sched is None or sched.state != ALIVE:
            return False
        routed = self._routed.get(sid, 0)
        if not routed:
            return sid in self._says_routes
        return routed < version

    async def _routes_out(self) -> None:
        """Wait until every table stream has sent the current table (or a newer one) and
        every scheduler that says which table it routes by routes by it (:meth:`_stream_behind`),
        at most ROUTES_OUT_S: so that a request right after the control call that changed the
        routes (a deployment just created, a token just revoked) meets the new table at every
        scheduler and ingress process, not the one before (tables go out at most every
        ``ROUTES_GAP_S``). Streams not yet sending their first table are not waited for
        until they have sent one."""
        version = self._routes.version
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ROUTES_OUT_S
        while True:
            behind = [k for k in self._sent if k not in self._lagging and self._stream_behind(k, version)]
            if not behind:
                return
            left = deadline - loop.time()
            if left <= 0:
                self._lagging.update(behind)
                log.warning(
                    "%d scheduler(s) do not route by routing table %d %.1fs after it was made "
                    "(reading it slowly, or not at all): not waited for until they catch up",
                    len(behind),
                    version,
                    ROUTES_OUT_S,
                )
                return
            # The loop's time, as the deadline: a fake clock in tests must not hold it.
            await self._routes_taken.wait(left, REAL_TIME)

    def routes_lagging(self) -> set[str]:
        """The schedulers one of whose table streams is lagging (:meth:`_routes_out`)."""
        return {self._stream_of[k] for k in self._lagging if k in self._stream_of}

    async def _publish_and_send(self, publish: bool = True) -> None:
        """:meth:`_publish_routes`, then :meth:`_routes_out`: for control calls whose caller
        may send requests by the new table the moment the call answers. Tables made while
        one waits ask schedulers to say at once that they route by them (``ack``).
        ``publish`` False: the current table, made by an earlier call (at once when every
        scheduler routes by it already)."""
        self._acks_wanted += 1
        try:
            if publish:
                await self._publish_routes(soon=True)
            await self._routes_out()
        finally:
            self._acks_wanted -= 1

    async def status(self, only: Collection[str] | None = None, *, brief: bool = False) -> ClusterStatus:
        """The cluster now: what ``shoal status`` and ``GET /api/status`` show; of the
        deployments named in ``only`` alone when given; names, targets and pending reasons
        alone when ``brief`` (see :func:`status_of`).

        Calls with the same ``only`` and ``brief`` that wait for the lock together share one
        build and get the same (frozen) status: the first of them builds it once it holds the
        lock, and a call joins only a build not yet begun, so that none is shown the cluster
        as it was before the call. A build runs in one step of the event loop, so nothing
        changes while it runs; a call made after it began waits for the next. N pollers of
        the whole cluster behind one long control call cost one build (30 ms at 10,000
        replicas), not N. A caller cancelled before it built leaves the build to those that
        joined it."""
        key = (None if only is None else frozenset(only), brief)
        while (shared := self._status_builds.get(key)) is not None:
            try:
                return await asyncio.shield(shared)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not shared.cancelled() or (task is not None and task.cancelling()):
                    raise
                # Its builder was cancelled or failed before building: build it here.
        mine: asyncio.Future[ClusterStatus] = asyncio.get_running_loop().create_future()
        self._status_builds[key] = mine
        try:
            async with self.lock:
                del self._status_builds[key]  # a call from now on waits for the next build
                built = status_of(self, only, brief=brief)
        except BaseException:
            if self._status_builds.get(key) is mine:
                del self._status_builds[key]
            mine.cancel()  # those that joined build for themselves
            raise
        mine.set_result(built)
        return built

    async def status_page(self, limit: int, contains: str = "") -> StatusPage:
        """The status of at most ``limit`` of the deployments whose names contain
        ``contains``: those that need a look (:func:`needs_look`) first, then by name; and
        what was left out. Costs the replicas of the deployments whose names match, and
        builds the status of those shown alone: the dashboard's poll read the whole
        cluster's (2.8 MB, 170 ms of the event loop at 10,000 replicas) to draw 200 rows."""
        async with self.lock:
            matching = sorted(n for n in _known(self) if contains in n)
            shown = matching
            if len(matching) > limit:
                picked = set(itertools.islice((n for n in matching if needs_look(self, n)), limit))
                picked.update(itertools.islice((n for n in matching if n not in picked), limit - len(picked)))
                shown = sorted(picked)
            kept = set(shown)
            counts = [self.state.replicas.count(n) for n in matching if n not in kept]
            return StatusPage(
                status=status_of(self, shown),
                more_deployments=len(counts),
                more_with_replicas=sum(1 for c in counts if c),
                more_replicas=sum(counts),
            )

    # The reads the adapters make, each under the node's own lock (they never take it).

    async def revisions(self, name: str) -> list[Revision]:
        """The kept revisions of ``name``, oldest first. NotFound when it has none and the
        head does not know the name."""
        async with self.lock:
            revisions = list(self.history.revisions(name))
            known = name in self.desired or name in self.broken
        if not known and not revisions:
            raise NotFound(f"no deployment named {limits.shown(repr(name))}")
        return revisions

    async def lifecycle_events(self, deployment: str = "", limit: int = 0) -> list[LifecycleEvent]:
        async with self.lock:
            return list(self.history.events(deployment, limit))

    async def traffic_routes(self) -> list[TrafficRoute]:
        async with self.lock:
            return sorted(self.traffic.routes.values(), key=lambda r: r.name)

    async def read_series(
        self,
        since: float,
        now: float,
        only: Collection[str] | None = None,
        *,
        limit: int = 0,
        contains: str = "",
        shown_after: float = -math.inf,
    ) -> SeriesView:
        """The time series the head keeps (the dashboard's charts): the points after ``since``
        (wall-clock seconds), oldest first, of the deployments named in ``only`` that have a
        series; or, when ``only`` is None, of at most ``limit`` of those whose names contain
        ``contains`` and that have a point after ``shown_after``: those with errors over the
        last minute before ``now`` first, then those with the most requests, then by name.
        And each deployment's latest rate and minute (:func:`shoal.core.stats.latest`): of
        those named, or of every deployment with a series.

        Read from the newest point back, so a 5 minute chart costs 5 minutes of points, not
        the hour kept; the deployments not charted cost their last minute of points alone
        (every deployment's chart was built: 2.8 s of the event loop and 16 MB at 2,000
        deployments with traffic)."""
        async with self.lock:
            kept = self.series.series
            names = [n for n in (kept if only is None else set(only)) if n in kept and n in self.desired]
            recent = {n: latest(kept[n], now) for n in names}
            if only is None:
                candidates = [n for n in names if contains in n and kept[n][-1].at > shown_after]
                ranked = sorted(
                    candidates, key=lambda n: (recent[n][1].errors == 0, -recent[n][1].requests, n)
                )
                charted = ranked[:limit]
                more = len(candidates) - len(charted)
            else:
                charted, more = sorted(names), 0
            points = {}
            for name in sorted(charted):
                newest = list(itertools.takewhile(lambda p: p.at > since, reversed(kept[name])))
                newest.reverse()
                points[name] = newest
            return SeriesView(points, dict(sorted(recent.items())), more)

    @property
    def routes(self) -> RoutingTable:
        return self._routes


@dataclass(frozen=True)
class SeriesView:
    """What :meth:`HeadNode.read_series` read."""

    points: dict[str, list[Point]]  # the charted deployments' points, oldest first, by name
    latest: dict[str, tuple[float | None, Window]]  # deployment -> its latest rate and minute
    more: int  # deployments that could have been charted, left out


@dataclass(frozen=True)
class StatusPage:
    """A bounded status (:meth:`HeadNode.status_page`) and what it left out."""

    status: ClusterStatus
    more_deployments: int  # deployments whose names matched, left out
    more_with_replicas: int  # of them, those with replicas
    more_replicas: int  # their replicas


def _keep_first_spec(history: StagedHistory, name: str, spec: DeploymentSpec) -> None:
    """A deployment from before revisions were kept: stage its spec as a revision, to roll
    back to."""
    if history.current(name) is None:
        history.add_revision(
            name, "created", spec.to_json(), spec.process_hash(), "the spec before revisions were kept"
        )


def _revision_spec(name: str, rev: Revision) -> DeploymentSpec:
    try:
        return parse_spec_json(rev.spec_json)
    except InvalidArgument as err:
        raise FailedPrecondition(f"revision {rev.number} of {name!r} cannot be read: {err}") from None


def _revision_key(rev: Revision | None) -> tuple[int, float] | None:
    """Which revision ``rev`` is, also across a delete and a new deploy: numbers go on from the
    tombstone's, but one written by an earlier shoal version holds none, and the time tells."""
    return None if rev is None else (rev.number, rev.time)


_REFUSED = {
    "apply": ("applied", "update", "once the spec has its changes"),
    "scale": ("scaled", "scale", "if the count still fits"),
}
"""What an if_revision refusal says of each call: what was not done, what to do, when."""


def _revision_name(rev: Revision | None) -> str:
    return "no revision" if rev is None else f"revision {rev.number} ({rev.kind})"


def _identity(spec: DeploymentSpec) -> str:
    """What makes two revisions the same version: their process hash, restarts aside."""
    return spec.model_copy(update={"restarts": 0}).process_hash()


def _route_key(rec: ReplicaRecord) -> tuple[str, str, str, str]:
    """What of a replica its deployment's routes show."""
    return (rec.id, rec.state, rec.address, rec.spec_hash)


def _last_revision(value: str) -> int:
    """The last revision number a tombstone holds; 0 when its row does not say."""
    try:
        number = json.loads(value)["revision"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return 0
    return number if isinstance(number, int) and not isinstance(number, bool) and number > 0 else 0


def _deleted_at(value: str) -> float:
    """When a tombstone was written; now when its row does not say (it is kept the longest)."""
    try:
        at = json.loads(value)["deleted_at"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return time.time()
    return float(at) if isinstance(at, int | float) and not isinstance(at, bool) else time.time()


def status_of(node: HeadNode, only: Collection[str] | None = None, *, brief: bool = False) -> ClusterStatus:
    """The cluster now, typed; the caller holds ``node.lock`` (others call ``HeadNode.status()``).
    ``only``: the deployments to show (those the head knows of them), costing their replicas
    alone; every deployment when None. ``GET /api/deployments/NAME`` built the whole cluster's
    status to show one deployment: 0.8 s of the head's event loop at 10,000 replicas.
    ``brief``: the deployments' names, targets and pending reasons alone (no replicas, specs,
    schedulers or events): what a model repository's index reads."""
    state = node.state
    now = node.clock.now()
    schedulers: tuple[SchedulerStatus, ...] = ()
    if not brief:
        allocated = state.allocations()
        lagging = node.routes_lagging()
        schedulers = tuple(
            SchedulerStatus(
                id=s.id,
                address=s.address,
                http_address=s.http_address,
                state=s.state,
                pid=s.pid,
                hostname=s.hostname,
                last_seen_s=round(max(0.0, now - s.last_seen), 3),
                capacity=s.capacity,
                allocated=allocated.get(s.id, Capacity()),
                max_replicas=s.max_replicas,
                replicas=state.replicas.count_on(s.id),
                routes_lagging=s.id in lagging,
            )
            for s in sorted(state.schedulers.values(), key=lambda s: s.id)
        )
    # The store's deployments; then broken ones, and ones only schedulers know, each saying why.
    if only is None:
        known = _known(node)
    else:
        known = {
            n
            for n in set(only)
            if n in node.desired or n in node.broken or (state.replicas.count(n) and n not in node.deleted)
        }
    deployments = []
    for name in sorted(known):
        spec = node.desired.get(name)
        broken = node.broken.get(name, "")
        # Each deployment's replicas sorted alone, as for ``only``: sorting all 10,000 by id
        # to group them took 2.4 ms, this 1.7 ms.
        replicas = [] if brief else sorted(state.replicas.of(name), key=_BY_ID)
        # Each replica's revision: the newest of the spec it runs (as in the routing table).
        revision = {rev.spec_hash: rev.number for rev in node.history.revisions(name)} if replicas else {}
        revision_of = revision.get
        current = node.history.current(name)
        if spec is not None:
            reason = state.pending_reasons.get(name, "")
        elif broken:
            reason = f"broken: {broken}; its replicas are kept until a new spec is applied or it is deleted"
        else:
            reason = (
                "not in the head's store (a new or damaged store?): its replicas are kept; "
                f"'shoal delete {name}' removes them"
            )
        deployments.append(
            DeploymentStatus(
                name=name,
                target_replicas=node.target_of(spec) if spec is not None else 0,
                pending_reason=reason,
                broken=broken,
                spec=_spec_doc(spec) if spec is not None and not brief else {},
                # By position, in ReplicaStatus's order of fields (id, scheduler, state, pid,
                # address, in_flight, queued, message, spec_hash, revision): naming each
                # cost 0.7 µs a replica more.
                replicas=tuple(
                    ReplicaStatus(
                        r.id,
                        r.scheduler_id,
                        r.state,
                        r.pid,
                        r.address,
                        r.in_flight,
                        r.queued,
                        r.message,
                        r.spec_hash,
                        revision_of(r.spec_hash, 0),
                    )
                    for r in replicas
                ),
                revision=current.number if current is not None else 0,
            )
        )
    events = tuple(
        ClusterEvent(
            at=e.wall,
            kind=e.kind,
            message=e.message,
            deployment=e.deployment,
            replica_id=e.replica_id,
            scheduler_id=e.scheduler_id,
        )
        for e in ([] if brief else list(state.events)[-50:])
    )
    return ClusterStatus(schedulers, tuple(deployments), events)


_BY_ID = operator.attrgetter("id")


def _spec_doc(spec: DeploymentSpec) -> dict[str, Any]:
    """``spec.model_dump(mode="json")``, dumped once per spec (a spec is frozen; a changed one
    is a new spec) and shared by every status built from it: dumping each of 2,000 specs
    was 8 ms of each whole-cluster status. Read, never changed (``DeploymentStatus.spec``)."""
    doc: dict[str, Any] | None = spec.derived.get("status_doc")
    if doc is None:
        doc = spec.derived["status_doc"] = spec.model_dump(mode="json")
    return doc


def _known(node: HeadNode) -> set[str]:
    """The deployments a status shows: the store's, broken ones, and ones only schedulers know."""
    return set(node.desired) | set(node.broken) | (node.state.replicas.deployments() - set(node.deleted))


def needs_look(node: HeadNode, name: str) -> bool:
    """Whether a deployment wants an operator's eye: a pending reason (FAILED, broken, not
    in the store), or fewer READY replicas than its target. Costs its replicas."""
    spec = node.desired.get(name)
    if spec is None or node.state.pending_reasons.get(name):
        return True
    target = node.target_of(spec)
    return sum(1 for r in node.state.replicas.of(name) if r.state == READY) < target


def cluster_status(node: HeadNode) -> dict[str, Any]:
    """``status_of`` as JSON (``shoal status --json``, ``GET /api/status``); the caller holds the lock."""
    return status_of(node).to_json()

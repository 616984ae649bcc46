"""The router: picks a READY replica for each request, bounds the queue, retries.

Handles come from two places: this scheduler's own replicas (the supervisor
adds them the moment they register) and other schedulers' replicas (from the
head's routing table). Only READY, non-draining replicas get requests.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, Callable, Collection, Mapping
from dataclasses import dataclass, field

from shoal.config import Settings
from shoal.core import limits
from shoal.core.clock import Clock, Signal, SystemClock
from shoal.core.ids import request_key
from shoal.core.payload import Tensors
from shoal.core.routing import Policy, default_revisions, make_policy, pick_for_model
from shoal.core.spec import DeploymentSpec
from shoal.core.stats import DeploymentStats
from shoal.core.traffic import TrafficRoute
from shoal.errors import (
    Code,
    DeadlineExceeded,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ShoalError,
    Unavailable,
)
from shoal.scheduler.handle import ReplicaGone, ReplicaHandle
from shoal.types import (
    DeploymentRoutes,
    GenerateChunk,
    GenerateRequest,
    LoadReport,
    ReplicaClient,
    RoutingTable,
)

log = logging.getLogger("shoal.router")

MAX_SHADOWS_IN_FLIGHT = 256
"""Most shadow copies (traffic routes' ``shadow``) in flight per router; past it a copy is
dropped (counted as such): a slow shadow must not hold the scheduler's memory."""

# How long a retry waits for the routing table to change when every replica left has
# already failed the request (and would be tried again). Not for a replica that said it is
# going (ReplicaGone): it is retired here, and the request waits, up to its deadline, for
# another one.
RETRY_PAUSE_S = 0.25

OUTCOME_OF = {
    Code.INVALID_ARGUMENT: "invalid",
    Code.NOT_FOUND: "not_found",
    Code.UNAUTHENTICATED: "unauthenticated",
    Code.PERMISSION_DENIED: "denied",
    Code.RESOURCE_EXHAUSTED: "overloaded",
    Code.DEADLINE_EXCEEDED: "timeout",
    Code.UNAVAILABLE: "unavailable",
}


def _held(handle: ReplicaHandle) -> Collection[str]:
    return handle.models.keys()


@dataclass
class _Deployment:
    spec: DeploymentSpec
    handles: dict[str, ReplicaHandle] = field(default_factory=dict)
    waiting: int = 0
    stats: DeploymentStats = field(default_factory=DeploymentStats)
    changed: Signal = field(default_factory=lambda: Signal())
    # Gone from the head's table while this machine's replicas of it still drain: it takes
    # no new request (NotFound at once, not a wait for a replica that will not come).
    deleted: bool = False
    revision: int = 0  # the current revision, from the head's table (0: none kept)
    # Why the deployment is FAILED, from the head's table ("": it is not): no replica of it
    # will start until the next deploy, so a request that finds none is refused, not held.
    failed: str = ""
    # Why replicas it wants cannot be placed, from the head's table ("": they can): a request
    # that waited in vain is told it, not that the start took too long.
    unplaced: str = ""
    # Ids of handles that left the table with requests on them (Router._leave), looked at as
    # requests end; kept apart so that a request's end costs no walk over the handles.
    leaving: set[str] = field(default_factory=set)


class Router:
    """Safe for concurrent ``send`` calls from many tasks (single event loop)."""

    def __init__(
        self,
        scheduler_id: str,
        settings: Settings,
        client_factory: Callable[[str], ReplicaClient],
        policy: str = "p2c",
        on_starved: Callable[[], None] | None = None,
        *,
        share: int = 1,
        table_only: bool = False,
        on_change: Callable[[], None] | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``share``: this router is one of that many processes routing to the same replicas
        (ingress workers), so it takes that share of ``max_ongoing_requests`` and
        ``max_queued_requests``, rounded up. ``table_only``: every replica, this machine's
        too, comes from :meth:`apply_table` (an ingress worker has no supervisor).
        ``on_change``: called whenever the set of replicas or specs changes. ``clock``: what
        deadlines and waits are measured by (the system's by default). ``rng``: draws traffic
        routes' targets (seeded in tests)."""
        self._clock: Clock = clock or SystemClock()
        self._on_starved = on_starved
        self._share = max(1, share)
        self._table_only = table_only
        self._on_change = on_change
        self.scheduler_id = scheduler_id
        self.settings = settings
        self._client_factory = client_factory
        self._policy: Policy = make_policy(policy)
        self._deployments: dict[str, _Deployment] = {}
        self._remote_specs_version = -1
        self._closing: set[asyncio.Future[None]] = set()
        self._watches: set[asyncio.Future[None]] = set()  # replicas that left (_watch_left)
        self._traffic: dict[str, TrafficRoute] = {}
        self._rng = rng or random.Random()
        self._shadows: set[asyncio.Task[None]] = set()
        # Set by the first apply_table. awaits_table: this router routes by the head's tables
        # (a scheduler's, an ingress worker's; set when it starts), so until the first one it
        # does not know which deployments exist (_live).
        self.tabled = asyncio.Event()
        self.awaits_table = False
        # Shutting down (drain): new requests are refused; those admitted before (``_active``,
        # queued or running) finish, until ``_closed``, when the grace ran out.
        self._active = 0
        self._idle = asyncio.Event()
        self.draining = False
        self._closed = False
        self._grace_s = 0.0
        self.routed: collections.Counter[tuple[str, str]] = collections.Counter()
        """Requests each traffic route sent to each target: (route, target) -> count."""
        self.shadowed: collections.Counter[tuple[str, str, str]] = collections.Counter()
        """Shadow copies by outcome: (route, shadow, ok|error|timeout|...|dropped) -> count."""

    # ------------------------------------------------------------ membership

    def set_spec(self, spec: DeploymentSpec) -> None:
        dep = self._deployments.get(spec.name)
        if dep is None:
            self._deployments[spec.name] = _Deployment(spec)
        elif dep.spec == spec:
            return
        else:
            dep.spec = spec
        if self._on_change is not None:
            self._on_change()

    def know(self, spec: DeploymentSpec) -> None:
        """``spec``'s deployment, unless this router knows it already. The head's routing table
        says which spec is current (:meth:`apply_table`); a replica's own spec is not it when
        the replica runs an earlier revision kept serving (``serve_revisions``), or when it was
        created before the table of its revision came: it used to become the deployment's
        spec here, and requests were checked against it until the next table."""
        if spec.name not in self._deployments:
            self.set_spec(spec)

    def add(self, replica_id: str, spec: DeploymentSpec, address: str, scheduler_id: str) -> None:
        """A READY replica joins the pool (a no-op if it is there already); ``spec``, the
        replica's, is the deployment's only while this router knows no other (:meth:`know`)."""
        self.know(spec)
        dep = self._deployments[spec.name]
        if replica_id in dep.handles:
            return
        handle = ReplicaHandle(
            replica_id,
            spec.name,
            address,
            scheduler_id,
            self._client_factory(address),
            local=scheduler_id == self.scheduler_id,
        )
        dep.handles[replica_id] = handle
        self._notify(dep)

    def retire(self, replica_id: str) -> None:
        """Draining: no new requests; those in flight finish."""
        for dep in self._deployments.values():
            handle = dep.handles.get(replica_id)
            if handle is not None:
                handle.retired = True
                self._notify(dep)

    async def remove(self, replica_id: str, *, failed: bool) -> None:
        """Drop a replica and close its client, which fails its pending requests with
        Unavailable, so they are retried elsewhere. ``failed``: it died (logged as such)."""
        for dep in list(self._deployments.values()):
            handle = dep.handles.pop(replica_id, None)
            if handle is None:
                continue
            if failed:
                n = await handle.fail_pending()
                if n:
                    log.info("replica %s died with %d request(s) in flight; retrying them", replica_id, n)
            else:
                handle.left = True
                await handle.close()
            self._notify(dep)
            if dep.deleted and not dep.handles:
                self._deployments.pop(dep.spec.name, None)

    @property
    def has_table(self) -> bool:
        """Whether this router knows the deployments: it had a routing table, or expects none.

        A scheduler registers, then gets its first table; until then it knows only the
        deployments its own replicas run. A request for another model then is refused
        UNAVAILABLE / 503 (:meth:`_live`), which clients retry, and the scheduler is not
        ready (``/v2/health/ready``). It was NOT_FOUND / 404, which clients take as final,
        for models that exist (a scheduler restarted under load; seen once in a loaded test
        run, a request right after a deploy to a scheduler just started:
        test_autoscale.py::test_requests_held_at_zero_are_refused_once_the_model_cannot_start)."""
        return self.tabled.is_set() or not self.awaits_table

    async def apply_table(self, table: RoutingTable) -> None:
        """Adopt the head's view of other schedulers' replicas (local ones come from the supervisor)."""
        await self._apply_table(table)
        self.tabled.set()

    async def _apply_table(self, table: RoutingTable) -> None:
        # A head that just started lists the replicas of the schedulers that registered with
        # it so far: those of the others still run, and are kept (RoutingTable.adopting).
        # Dropped, requests for a deployment whose replicas are all on such schedulers waited
        # (and timed out) until they registered again. None: every scheduler is heard.
        heard = (
            {r.scheduler_id for routes in table.deployments.values() for r in routes.routes}
            if table.adopting
            else None
        )
        if dict(table.traffic) != self._traffic:
            self._traffic = dict(table.traffic)
            if self._on_change is not None:
                self._on_change()
        for name, routes in table.deployments.items():
            self.set_spec(routes.spec)
            dep = self._deployments[name]
            if dep.deleted:
                dep.deleted = False
                self._notify(dep)
            self._set_revisions(dep, routes)
            if dep.failed != routes.failed:
                dep.failed = routes.failed
                self._notify(dep)  # requests held for a replica that will not start are refused
            dep.unplaced = routes.unplaced
            remote = {
                r.replica_id: r
                for r in routes.routes
                if self._table_only or r.scheduler_id != self.scheduler_id
            }
            for rid, handle in list(dep.handles.items()):
                if rid in remote:
                    if handle.left:  # listed again (a restarted head's schedulers registered)
                        handle.left = False
                        self._notify(dep)
                    continue
                if handle.local and not self._table_only:
                    continue  # this machine's: the supervisor says when they go
                if heard is None or handle.scheduler_id in heard:
                    await self._leave(dep, handle)
            for rid, r in remote.items():
                if rid not in dep.handles:
                    self.add(rid, routes.spec, r.address, r.scheduler_id)
                    dep.handles[rid].revision = r.revision
        for name in [n for n in self._deployments if n not in table.deployments]:
            dep = self._deployments[name]
            if self._table_only or not any(h.local for h in dep.handles.values()):
                # Requests waiting on this entry (or retrying off a handle closed here) must
                # not wait for it any more: it is gone.
                dep.deleted = True
                self._notify(dep)
                for handle in list(dep.handles.values()):
                    await self._leave(dep, handle)
                if not dep.handles:
                    self._deployments.pop(name, None)
            elif not dep.deleted and name in table.deleted:
                # Deleted at the head: this machine's replicas drain (their requests finish),
                # and new requests are NotFound now, everywhere, not after a timeout. (A name
                # the head does not know without a tombstone, say after its store was lost,
                # keeps serving from this machine's replicas.)
                dep.deleted = True
                for handle in list(dep.handles.values()):
                    if not handle.local:
                        await self._leave(dep, handle)
                self._notify(dep)

    async def _leave(self, dep: _Deployment, handle: ReplicaHandle) -> None:
        """The routing table dropped ``handle``'s replica. Idle, it goes now; with requests on
        it, it takes nothing new (``left``) and goes when they are done (:meth:`_release`),
        or stays if a table lists it again first.

        Not closed under its requests: the head drops a replica when it starts draining, and
        a draining replica answers what it took. Closing the client failed those requests
        here and they were sent to another replica, while the draining one went on with the
        calls it had begun: a model ran twice for one request, and a generation streaming
        from it was cut. A replica that died breaks its connection, which fails what is on
        it; one on a machine that froze or was cut off does not, so while requests are on a
        replica that left this router pings it (:meth:`_watch_left`). Either way those
        requests, on a handle that left, wait for another replica without spending an
        attempt."""
        if not handle.in_flight:
            await self.remove(handle.replica_id, failed=False)
        elif not handle.left:
            handle.left = True
            dep.leaving.add(handle.replica_id)
            self._notify(dep)
            watch = asyncio.ensure_future(self._watch_left(dep, handle))
            self._watches.add(watch)
            watch.add_done_callback(self._watches.discard)

    async def _watch_left(self, dep: _Deployment, handle: ReplicaHandle) -> None:
        """Ping a replica the table dropped, every ``ping_interval_s`` while requests are on
        it, and close its client (failing them, for a retry elsewhere) at the first ping not
        answered in ``ping_timeout_s``: a draining replica answers pings; one on a frozen or
        cut-off machine would hold them until gRPC's keepalive gave up (10-15 s)."""
        settings = self.settings
        while True:
            await self._clock.sleep(settings.ping_interval_s)
            if not handle.left or not handle.in_flight or handle.gone:
                return  # listed again, answered, or failed already
            try:
                await handle.client.ping(settings.ping_timeout_s)
            except (ShoalError, TimeoutError) as err:
                if not handle.left or handle.gone:
                    return
                log.warning(
                    "replica %s, dropped by the routing table, did not answer a ping (%s): "
                    "its %d request(s) here are sent elsewhere",
                    handle.replica_id,
                    err,
                    handle.in_flight,
                    extra={"replica_id": handle.replica_id},
                )
                if dep.handles.get(handle.replica_id) is handle:
                    del dep.handles[handle.replica_id]
                    self._forget_if_gone(dep)
                await handle.fail_pending()
                self._notify(dep)
                return

    def _forget_if_gone(self, dep: _Deployment) -> None:
        """A deleted deployment goes once the last of its replicas has (see :meth:`_leave`)."""
        if dep.deleted and not dep.handles and self._deployments.get(dep.spec.name) is dep:
            del self._deployments[dep.spec.name]

    def _set_revisions(self, dep: _Deployment, routes: DeploymentRoutes) -> None:
        """The revision each replica runs, this machine's too (they join before the head lists them)."""
        changed = dep.revision != routes.revision
        dep.revision = routes.revision
        for r in routes.routes:
            handle = dep.handles.get(r.replica_id)
            if handle is not None and handle.revision != r.revision:
                handle.revision = r.revision
                changed = True
        if changed:
            self._notify(dep)

    def versions(self, name: str) -> tuple[int, dict[int, int]]:
        """``name``'s current revision (0: none kept) and, per revision, how many replicas of it
        take requests (those of a revision not known yet left out). NotFound for an unknown
        deployment."""
        dep = self._live(name)
        counts = collections.Counter(h.revision for h in dep.handles.values() if h.accepting and h.revision)
        return dep.revision, dict(counts)

    def current_revision(self, name: str) -> int:
        """``name``'s current revision, the one its spec is (0: none kept, or unknown here)."""
        dep = self._deployments.get(name)
        return dep.revision if dep is not None else 0

    def revision_of(self, name: str, replica_id: str) -> int:
        """The revision replica ``replica_id`` of ``name`` runs (0: not known, or gone)."""
        dep = self._deployments.get(name)
        handle = dep.handles.get(replica_id) if dep is not None else None
        return handle.revision if handle is not None else 0

    def _live(self, name: str) -> _Deployment:
        dep = self._deployments.get(name)
        if dep is None or dep.deleted:
            if not self.has_table:
                # Not known yet is not unknown: UNAVAILABLE / 503, which clients retry.
                raise Unavailable(
                    f"model {limits.shown(repr(name))} is not known here yet: this scheduler has "
                    "had no routing table since it started; try again"
                )
            raise NotFound(f"no deployment named {limits.shown(repr(name))}")  # the client's string
        return dep

    def spec(self, name: str) -> DeploymentSpec:
        return self._live(name).spec

    def deployments(self) -> dict[str, DeploymentSpec]:
        return {n: d.spec for n, d in self._deployments.items() if not d.deleted}

    def ready_count(self, name: str) -> int:
        dep = self._deployments.get(name)
        return 0 if dep is None else sum(1 for h in dep.handles.values() if h.accepting)

    def load(self) -> dict[str, LoadReport]:
        """Per deployment: requests in flight to replicas and waiting for one, and cumulative counts."""
        return {
            name: LoadReport(
                in_flight=sum(h.in_flight for h in dep.handles.values()),
                queued=dep.waiting,
                requests=dep.stats.requests,
                errors=dep.stats.errors,
                latency=tuple(dep.stats.latency.counts),
            )
            for name, dep in self._deployments.items()
        }

    def handles(self, name: str) -> list[ReplicaHandle]:
        """The replicas of ``name`` that take new requests (for tables and descriptions)."""
        dep = self._deployments.get(name)
        return [] if dep is None else [h for h in dep.handles.values() if h.accepting]

    def _notify(self, dep: _Deployment) -> None:
        dep.changed.fire()
        if self._on_change is not None:
            self._on_change()

    # ------------------------------------------------------------ requests

    async def send(
        self,
        deployment: str,
        inputs: Tensors,
        *,
        request_id: str = "",
        timeout_s: float = 0.0,
        model_id: str = "",
        version: int = 0,
        classify: Mapping[str, int] | None = None,
    ) -> tuple[Tensors, str]:
        """Run one request on some READY replica; returns (outputs, replica id).

        Waits (up to the request's timeout) for a replica with room; raises
        ResourceExhausted at once when the deployment's queue is full,
        NotFound for an unknown deployment, DeadlineExceeded on timeout; a
        request whose replica dies is retried on another, up to
        ``settings.request_attempts`` replicas; one a replica refused because it is going
        (ReplicaGone: draining, stopped) goes to another without spending an attempt, and that
        replica gets nothing new from here. ``model_id`` (a multiplexed deployment's) goes
        to a replica that holds it when one has room (:func:`shoal.core.routing.pick_for_model`).
        ``version`` N > 0: only replicas of revision N (NotFound when none serves and N is not
        the current revision); 0: see :func:`shoal.core.routing.default_revisions`.
        ``classify``: output name -> k, the outputs the replica answers as their top k
        classes (:mod:`shoal.core.classify`).
        """
        dep = self._live(deployment)
        started = time.perf_counter()
        outcome = "error"
        request_id = request_id or request_key()
        self._active += 1
        try:
            if self.draining:
                raise self._refusal()
            result = await self._send(
                dep, inputs, request_id, timeout_s, started, model_id, version, classify
            )
            outcome = "ok"
            return result
        except ShoalError as err:
            outcome = OUTCOME_OF.get(err.code, "error")
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"  # its client went away (a gRPC cancel, an HTTP client gone)
            raise
        finally:
            self._done()
            elapsed = time.perf_counter() - started
            dep.stats.outcomes[outcome] += 1
            dep.stats.latency.observe(elapsed)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "request %s to %s: %s in %.2f ms",
                    limits.shown(request_id),
                    deployment,
                    outcome,
                    elapsed * 1000,
                    extra={"request_id": limits.shown(request_id), "deployment": deployment},
                )

    def _done(self) -> None:
        self._active -= 1
        if not self._active and self.draining:
            self._idle.set()

    def _refusal(self) -> Unavailable:
        if self._closed:
            return Unavailable(
                f"the scheduler is shutting down and its grace of {self._grace_s:g}s "
                "ran out before this request was answered: send it again (to another scheduler)"
            )
        return Unavailable("the scheduler is shutting down: send the request again (to another scheduler)")

    async def drain(self, timeout_s: float) -> int:
        """Shutting down, before the replicas drain: from now on every new request is refused
        (Unavailable, ``the scheduler is shutting down``); those already admitted, queued here
        for a replica or running on one, go on for up to ``timeout_s``. Returns once they are
        all answered, or when the time ran out: those left are then answered with the same
        refusal (queued ones at once, running ones as their replicas' clients close), and
        their number is returned. Call it once; the router serves no request after it.

        Why first: a replica drained while requests were queued here for it left them waiting
        for a replica that would never come, until the HTTP server cancelled them (a bare 500).
        """
        self.draining = True
        self._grace_s = timeout_s
        if self._active and not await self._clock.wait(self._idle.wait(), max(0.0, timeout_s)):
            left = self._active
            self._closed = True
            for dep in self._deployments.values():
                dep.changed.fire()  # the queued ones wake, and are refused
                for handle in list(dep.handles.values()):
                    await handle.fail_pending()  # the running ones fail, and are refused
            # The refusals reach their callers in a few loop passes: wait for them (bounded).
            await self._clock.wait(self._idle.wait(), 1.0)
            log.warning(
                "%d request(s) still unanswered when the grace of %gs ran out: refused", left, timeout_s
            )
            return left
        return 0

    def count(self, deployment: str, outcome: str, elapsed_s: float) -> None:
        """Count a request refused before it was routed (say an invalid one) as ``send`` counts
        the routed ones, so that statistics see every outcome. Unknown deployments are not
        counted (their names are the client's, and unbounded)."""
        dep = self._deployments.get(deployment)
        if dep is not None:
            dep.stats.outcomes[outcome] += 1
            dep.stats.latency.observe(elapsed_s)

    def recount(self, deployment: str, was: str, now: str) -> None:
        """Move one request of ``deployment`` from outcome ``was`` to ``now``: one ``send``
        counted a success whose answer its door then could not use (the request failed)."""
        dep = self._deployments.get(deployment)
        if dep is not None and dep.stats.outcomes[was] > 0:
            dep.stats.outcomes[was] -= 1
            dep.stats.outcomes[now] += 1

    def stats(self) -> dict[str, DeploymentStats]:
        """Per deployment: what this router has served since it started."""
        return {name: dep.stats for name, dep in self._deployments.items()}

    async def _send(
        self,
        dep: _Deployment,
        inputs: Tensors,
        request_id: str,
        timeout_s: float,
        started: float,
        model_id: str,
        version: int = 0,
        classify: Mapping[str, int] | None = None,
    ) -> tuple[Tensors, str]:
        timeout_s = timeout_s if timeout_s > 0 else dep.spec.timeout_s
        clock = self._clock
        deadline = clock.now() + timeout_s
        tried: set[str] = set()
        last: ShoalError | None = None
        attempts = max(1, self.settings.request_attempts)
        attempt = 0
        queued = True  # the time to the first replica not observed yet
        while attempt < attempts:
            if tried:
                # Every replica left may have failed this request (say a remote one that was
                # just killed, still in the routing table for a few ms): give the table a
                # moment to drop it or a replacement to join before trying one of them again.
                await self._pause_for_another(dep, tried, deadline)
            # A free replica at once, without a coroutine: ``_acquire``'s first step.
            handle = None if dep.deleted or dep.waiting else self._pick(dep, tried, model_id, version)
            if handle is not None:
                handle.in_flight += 1
            else:
                handle = await self._acquire(dep, deadline, tried, model_id, version)
            if queued:
                queued = False
                dep.stats.queue.observe(time.perf_counter() - started)
            try:
                remaining = deadline - clock.now()
                if remaining <= 0:
                    raise DeadlineExceeded(
                        f"request {limits.shown(request_id)} timed out after {timeout_s:g}s"
                    )
                if model_id and dep.spec.multiplexing is not None:
                    handle.touch(model_id, dep.spec.multiplexing.max_models_per_replica)
                outputs = await handle.send(
                    request_id, inputs, remaining, model_id=model_id, classify=classify
                )
                return outputs, handle.replica_id
            except (ReplicaGone, Unavailable) as err:
                if self._closed:
                    raise self._refusal() from err
                if not err.retry_elsewhere:
                    raise  # from further on (a deployment its model called): no replica here helps
                last = err
                if isinstance(err, ReplicaGone):
                    # The replica did not run it: it is draining or gone (a remote one still in
                    # this table until the head's next one comes). Nothing new goes there, and
                    # the request waits, up to its deadline, for another replica rather than
                    # being sent back there after RETRY_PAUSE_S; no attempt is spent.
                    self._going(dep, handle)
                elif not handle.left:
                    # (A replica the table dropped under the request, ``left``, costs no attempt
                    # either: the head's word is no proof that the request brought it down. A
                    # head just restarted lists no replica until their schedulers register
                    # again, and a request on two remote replicas failed as if it had killed
                    # both. It takes nothing new already; a table that lists it again undoes
                    # that.)
                    tried.add(handle.replica_id)
                    attempt += 1
                log.info(
                    "request %s: replica %s failed (%s); retrying",
                    limits.shown(request_id),
                    handle.replica_id,
                    err,
                    extra={"request_id": limits.shown(request_id), "replica_id": handle.replica_id},
                )
            finally:
                handle.in_flight -= 1
                self._release(dep)
        dep.stats.given_up += 1
        raise Unavailable(
            f"request {limits.shown(request_id)}: {len(tried)} replica(s) failed while serving it "
            f"({', '.join(sorted(tried))}); not retried again, since the request itself may be "
            f"what brings them down (setting request_attempts); last error: {last}"
        )

    async def _acquire(
        self, dep: _Deployment, deadline: float, tried: set[str], model_id: str = "", version: int = 0
    ) -> ReplicaHandle:
        if dep.deleted:
            raise NotFound(f"no deployment named {dep.spec.name!r}: it was deleted")
        # Behind those already queued, first come first served: a new request that took a
        # freed slot ahead of them kept some waiting for seconds under a flood.
        handle = None if dep.waiting else self._pick(dep, tried, model_id, version)
        if handle is not None:
            handle.in_flight += 1
            return handle
        self._check_failed(dep)
        full = self._queue_full(dep)
        if full is not None:
            raise full
        clock = self._clock
        dep.waiting += 1
        # The first to wait with no replica asks for a report now (the head scales up from
        # zero on it); those joining it add nothing the head does not know by then, and each
        # asking for one sent the head a health update per request arriving at zero.
        if (
            self._on_starved is not None
            and dep.waiting == 1
            and not any(h.accepting for h in dep.handles.values())
        ):
            self._on_starved()
        try:
            while True:
                if self._closed:
                    raise self._refusal()
                if dep.deleted:
                    raise NotFound(f"no deployment named {dep.spec.name!r}: it was deleted")
                self._check_failed(dep)
                if version and version != dep.revision and not self._serves(dep, version):
                    raise NotFound(f"model {dep.spec.name!r}: version {version} no longer serves")
                handle = self._pick(dep, tried, model_id, version)
                if handle is not None:
                    handle.in_flight += 1
                    return handle
                remaining = deadline - clock.now()
                if remaining <= 0:
                    raise DeadlineExceeded(
                        f"no replica of {dep.spec.name!r} could take the request in time "
                        f"({self._why_none(dep)})"
                    )
                await dep.changed.wait(remaining, clock)
        finally:
            dep.waiting -= 1

    def _why_none(self, dep: _Deployment) -> str:
        """How many replicas of ``dep`` are ready, and why no more came: the head's reason when
        the replicas it wants cannot be placed; else, at zero for a deployment that scales to
        zero, what its client can do: the request may have woken it."""
        ready = self.ready_count(dep.spec.name)
        policy = dep.spec.autoscaling
        if dep.unplaced:
            # A longer timeout would not help: the head has nowhere to start one.
            more = (
                "" if ready else (" it scales from zero, and" if policy and not policy.min_replicas else "")
            )
            return f"{ready} ready;{more} the replicas it wants cannot be placed: {dep.unplaced}"
        if ready or policy is None or policy.min_replicas:
            return f"{ready} ready"
        return (
            "0 ready: it scales from zero, and no replica was READY within the request's "
            "timeout; a longer timeout, or autoscaling.min_replicas 1, avoids the wait"
        )

    def _check_failed(self, dep: _Deployment) -> None:
        """Unavailable, saying why, when ``dep`` is FAILED and none of its replicas takes
        requests: none will start until the next deploy. Held requests used to wait out their
        timeout for one, then got DEADLINE_EXCEEDED '(0 ready)'."""
        if dep.failed and not any(h.accepting for h in dep.handles.values()):
            raise Unavailable(
                f"deployment {dep.spec.name!r} is FAILED: its replicas died starting, and none "
                f"is started again until it is deployed again; the last failure: {dep.failed}"
            )

    @property
    def share(self) -> int:
        """How many processes route to the same replicas (ingress workers): see ``__init__``."""
        return self._share

    def at_capacity(self, name: str) -> ShoalError | None:
        """The refusal a request to ``name`` would get now for a full queue (or a scheduler
        shutting down); None when it would be routed or queued (or ``name`` is unknown here).
        Lets an ingress refuse before it reads and parses the request."""
        dep = self._deployments.get(name)
        if dep is None or dep.deleted:
            return None
        if self.draining:
            return self._refusal()
        if not dep.waiting and self._pick(dep, set()) is not None:
            return None
        return self._queue_full(dep)

    def _queue_full(self, dep: _Deployment) -> ResourceExhausted | None:
        queue_limit = -(-dep.spec.max_queued_requests // self._share)
        if dep.waiting < queue_limit:
            return None
        share = f", this process's share of {queue_limit}" if self._share > 1 else ""
        return ResourceExhausted(
            f"deployment {dep.spec.name!r} is at capacity: {dep.waiting} request(s) queued "
            f"(max_queued_requests={dep.spec.max_queued_requests}{share})"
        )

    def _serves(self, dep: _Deployment, version: int) -> bool:
        return any(h.accepting and h.revision == version for h in dep.handles.values())

    def _pick(
        self, dep: _Deployment, tried: set[str], model_id: str = "", version: int = 0
    ) -> ReplicaHandle | None:
        limit = dep.spec.max_ongoing_requests
        if self._share > 1:
            limit = -(-limit // self._share)
        open_ = [h for h in dep.handles.values() if h.accepting and h.in_flight < limit]
        if version:
            open_ = [h for h in open_ if h.revision == version]
        elif dep.spec.serve_revisions > 1 and open_:
            serving = (h.revision for h in dep.handles.values() if h.accepting)
            allowed = default_revisions(serving, dep.spec.replicas)
            if allowed:  # else no revision is known (none kept, or no table yet): any replica
                open_ = [h for h in open_ if h.revision in allowed]
        if not open_:
            return None
        fresh = [h for h in open_ if h.replica_id not in tried] if tried else open_
        mux = dep.spec.multiplexing
        if model_id and mux is not None and self.settings.multiplex_affinity:
            return pick_for_model(fresh or open_, _held, model_id, mux.max_models_per_replica, self._policy)
        return self._policy.pick(fresh or open_)

    async def _pause_for_another(self, dep: _Deployment, tried: set[str], deadline: float) -> None:
        """When every replica that takes requests has failed this one already (``tried``),
        wait up to RETRY_PAUSE_S (within the deadline) for one that has not. Not cut short by
        a change that brings none: when an update drained a deployment's local replicas and
        a remote one had just stopped, each removal woke the pause, and the request went
        straight back to the stopped replica and was refused, two attempts in a few ms."""
        clock = self._clock
        end = min(clock.now() + RETRY_PAUSE_S, deadline)
        while not any(h.accepting and h.replica_id not in tried for h in dep.handles.values()):
            left = end - clock.now()
            if left <= 0 or dep.deleted or dep.failed or self._closed:
                return  # (the last three: refused at once by _acquire)
            await dep.changed.wait(left, clock)

    def _going(self, dep: _Deployment, handle: ReplicaHandle) -> None:
        """``handle``'s replica said it is going (ReplicaGone): it takes no new request from
        this router, as if retired; it stays until the supervisor or the head's table drops it.
        A replica that drains never takes requests again, so this is never undone."""
        if not handle.retired:
            handle.retired = True
            self._notify(dep)

    def _release(self, dep: _Deployment) -> None:
        if dep.waiting:
            dep.changed.fire()
        if not dep.leaving:
            return
        for rid in list(dep.leaving):
            h = dep.handles.get(rid)
            if h is None or not h.left:  # gone another way, or listed again
                dep.leaving.discard(rid)
            elif not h.in_flight:
                # Left the table while requests were on it (_leave); they are done now.
                dep.leaving.discard(rid)
                del dep.handles[rid]
                closing = asyncio.ensure_future(h.close())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
                self._forget_if_gone(dep)

    # ------------------------------------------------------------ traffic routes

    def traffic(self) -> dict[str, TrafficRoute]:
        """The traffic routes of the last routing table, by name."""
        return dict(self._traffic)

    def is_route(self, name: str) -> bool:
        return name in self._traffic

    def resolve(self, name: str) -> tuple[str, str]:
        """Where a request to ``name`` goes: ``(deployment, shadow)``. ``name`` itself and no
        shadow, unless ``name`` is a traffic route: then a target drawn by weight (counted in
        :attr:`routed`) and the route's shadow ("" for none). NotFound naming a drawn target
        that is no deployment (deleted after the route was set); PermissionDenied for a target
        that needs a token (``auth.tokens``: doors check tokens by the name called, so a route
        never opens such a deployment; its shadow gets no copies either)."""
        route = self._traffic.get(name)
        if route is None:
            return name, ""
        target = route.pick(self._rng)
        self.routed[(name, target)] += 1
        dep = self._deployments.get(target)
        if dep is None or dep.deleted:
            raise NotFound(f"route {name!r}: its target deployment {target!r} does not exist")
        if dep.spec.auth is not None:
            raise PermissionDenied(
                f"route {name!r}: its target deployment {target!r} needs a token; call it by its own name"
            )
        shadow = self._deployments.get(route.shadow)
        protected = shadow is not None and shadow.spec.auth is not None
        return target, "" if protected else route.shadow

    def shadow(self, route: str, deployment: str, inputs: Tensors, timeout_s: float = 0.0) -> None:
        """Send a copy of a request to ``deployment`` and discard the answer, counting its outcome
        in :attr:`shadowed`. Returns at once; never raises. The copies are this router's tasks:
        :meth:`aclose` cancels those still running."""
        if len(self._shadows) >= MAX_SHADOWS_IN_FLIGHT:
            self.shadowed[(route, deployment, "dropped")] += 1
            return
        task = asyncio.get_running_loop().create_task(self._shadow(route, deployment, inputs, timeout_s))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(self, route: str, deployment: str, inputs: Tensors, timeout_s: float) -> None:
        outcome = "error"
        try:
            await self.send(deployment, inputs, timeout_s=timeout_s)
            outcome = "ok"
        except ShoalError as err:
            outcome = OUTCOME_OF.get(err.code, "error")
        except Exception:  # a shadow's failure is counted, never the client's
            log.exception("shadow copy of a request to %s failed", route)
        finally:
            self.shadowed[(route, deployment, outcome)] += 1

    # ------------------------------------------------------------ streams (text generation)

    async def stream(
        self,
        deployment: str,
        request: GenerateRequest,
        *,
        request_id: str = "",
        timeout_s: float = 0.0,
        version: int = 0,
    ) -> AsyncGenerator[GenerateChunk, None]:
        """Run one text generation on some READY replica, yielding its chunks as they come.

        The replica is acquired as for :meth:`send`: one with room under
        ``max_ongoing_requests``, waiting up to the deadline (``timeout_s``, 0: the
        deployment's), ResourceExhausted at once when the queue is full, NotFound for an
        unknown deployment; ``version`` as for :meth:`send`. The deadline bounds the whole
        generation. A replica that fails before its first chunk is replaced by another (up to
        ``settings.request_attempts``; one that refused it because it is going, ReplicaGone,
        spends none and gets nothing new); after the first chunk the failure is the caller's
        (Unavailable): the client has seen part of an answer that another replica would not
        continue.

        The replica's slot is held until the stream ends: close this generator (``aclose``,
        ``contextlib.aclosing``) when the client goes away, which also stops the generation.
        """
        dep = self._live(deployment)
        started = time.perf_counter()
        request_id = request_id or request_key()
        timeout_s = timeout_s if timeout_s > 0 else dep.spec.timeout_s
        clock = self._clock
        deadline = clock.now() + timeout_s
        tried: set[str] = set()
        last: ShoalError | None = None
        outcome = "error"
        streamed = False
        self._active += 1
        try:
            if self.draining:
                raise self._refusal()
            attempts = max(1, self.settings.request_attempts)
            attempt = 0
            queued = True
            while attempt < attempts:
                if tried:
                    await self._pause_for_another(dep, tried, deadline)
                handle = await self._acquire(dep, deadline, tried, "", version)
                if queued:
                    queued = False
                    dep.stats.queue.observe(time.perf_counter() - started)
                try:
                    remaining = deadline - clock.now()
                    if remaining <= 0:
                        raise DeadlineExceeded(
                            f"request {limits.shown(request_id)} timed out after {timeout_s:g}s"
                        )
                    if handle.gone:
                        raise ReplicaGone(f"replica {handle.replica_id} is gone")
                    chunks = handle.client.generate(request_id, request, remaining)
                    async with contextlib.aclosing(chunks):
                        async for chunk in chunks:
                            streamed = True
                            yield chunk
                    outcome = "ok"
                    return
                except (ReplicaGone, Unavailable) as err:
                    if self._closed:
                        raise self._refusal() from err
                    if streamed or not err.retry_elsewhere:
                        raise
                    last = err
                    if isinstance(err, ReplicaGone):
                        # Draining or gone, it started nothing: retired, no attempt spent, and
                        # the generation waits within its deadline for another (as in send).
                        self._going(dep, handle)
                    elif not handle.left:  # (dropped by the table under it: no attempt, as in send)
                        tried.add(handle.replica_id)
                        attempt += 1
                    log.info(
                        "request %s: replica %s failed before streaming (%s); retrying",
                        limits.shown(request_id),
                        handle.replica_id,
                        err,
                        extra={"request_id": limits.shown(request_id), "replica_id": handle.replica_id},
                    )
                finally:
                    handle.in_flight -= 1
                    self._release(dep)
            raise Unavailable(f"request {limits.shown(request_id)} failed on {len(tried)} replica(s): {last}")
        except ShoalError as err:
            outcome = OUTCOME_OF.get(err.code, "error")
            raise
        except (GeneratorExit, asyncio.CancelledError):
            # The client went away: after part of an answer that is its choice, not a failure.
            outcome = "ok" if streamed else "cancelled"
            raise
        finally:
            self._done()
            dep.stats.outcomes[outcome] += 1
            dep.stats.latency.observe(time.perf_counter() - started)

    # ------------------------------------------------------------ describing (OIP metadata, statistics)

    def ready_clients(self, name: str, revision: int = 0) -> list[tuple[str, ReplicaClient]]:
        """(replica id, client) of every READY replica of ``name`` (of revision ``revision``
        only, when not 0), local ones first.

        For describing replicas (model metadata, batch statistics), not for requests:
        nothing is reserved, and the list may be empty. Raises NotFound for an unknown
        deployment.
        """
        dep = self._live(name)
        accepting = (
            h for h in dep.handles.values() if h.accepting and (not revision or h.revision == revision)
        )
        ready = sorted(accepting, key=lambda h: not h.local)
        return [(h.replica_id, h.client) for h in ready]

    async def aclose(self) -> None:
        for task in [*self._shadows, *self._watches]:
            task.cancel()
        if self._watches:
            await asyncio.gather(*self._watches, return_exceptions=True)
        if self._shadows:
            await asyncio.gather(*self._shadows, return_exceptions=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        for dep in self._deployments.values():
            for handle in list(dep.handles.values()):
                await handle.close()
            dep.handles.clear()

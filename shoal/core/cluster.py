"""The head's view of the cluster and the reconcile decision, over plain data.

``ClusterState`` holds the actual state (schedulers and the replicas they
report) and decides, given the desired deployments, which replicas to create
and which to remove. It does no I/O and takes time from a ``Clock``, so the
control loop is unit-tested without sockets. It is not safe for concurrent
use: the head calls it under one lock.
"""

from __future__ import annotations

import heapq
import ipaddress
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shoal.core.clock import Clock
from shoal.core.placement import Candidate, Capacity, choose, full
from shoal.core.spec import STABLE_AFTER_S, DeploymentSpec
from shoal.core.states import ReplicaState, SchedulerState
from shoal.errors import AlreadyExists, LimitReached

ALIVE = SchedulerState.ALIVE
DEAD = SchedulerState.DEAD

STARTING = ReplicaState.STARTING
READY = ReplicaState.READY
DRAINING = ReplicaState.DRAINING
STOPPED = ReplicaState.STOPPED
REPLICA_DEAD = ReplicaState.DEAD
PENDING = ReplicaState.PENDING  # asked of a scheduler, not yet confirmed by it

BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 30.0
FAILED_AFTER = 4
"""Replicas of one spec that crash in a row (before READY, or of their own doing within
``health.stable_after_s`` of it), after which its deployment is FAILED: no more starts (the crash loop
ends) until a deploy of another spec or a head restart. Four: about 10 s of backoff, room for
a model that flakes; ``shoal deploy`` already answered at two."""
# A spec's ``health.stable_after_s`` (default STABLE_AFTER_S, 60 s) is how long a replica
# must stay READY to prove its spec can run. One that crashes sooner (it exits with an error,
# a crash signal or over its memory limit: not a kill from outside, such as ``kill -9``, the
# OOM killer or a chaos run) counts as a failed start, so a model that dies just after
# loading backs off and ends FAILED instead of restarting for ever. A spec's run of failures
# ends once a replica started after the last one has stayed READY this long.
FAILED = "FAILED: "  # how the pending reason of a FAILED deployment starts
MAX_CREATES_PER_PASS = 1024
"""Most replicas one reconcile pass places: a pass is synchronous, and a spec asking for
thousands must not hold the head's event loop (the rest follow in the next passes). Placing
one costs about 20 µs (a heap of the schedulers): 1,024 (10% of 10,000 replicas lost at
once, replaced in one pass) hold the loop for tens of milliseconds."""


REPLICA_ID = re.compile(r"[a-z0-9][a-z0-9_.-]{0,127}")
"""What a replica id may be (``fullmatch``): its deployment's name and a suffix the head
makes. A scheduler names its replica's log file with it, so a log is asked for by an id
of this form only."""


def same_host(a: str, b: str) -> bool:
    """Whether two hosts that connections came from (IP addresses as the head saw them, or
    ``localhost``) are one machine: equal, or both loopback (``127.0.0.1`` and ``::1`` alike)."""
    return a == b or (_loopback(a) and _loopback(b))


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class SchedulerRecord:
    id: str
    address: str
    http_address: str
    capacity: Capacity
    max_replicas: int = 0  # replicas it runs at most (its ``max_replicas`` setting); 0: no bound
    pid: int = 0
    hostname: str = ""
    peer: str = ""  # the host its registration came from, as the head saw it
    state: SchedulerState = ALIVE
    last_seen: float = 0.0
    registry_version: int = 0
    # When its health stream ended with no update on another since (``stream_ended``); None
    # while one is open, or it never had one.
    stream_ended_at: float | None = None
    # It could not take a replica (shutting down, out of reach): placement passes it by
    # until then (``create_failed``), and why.
    refused_until: float = 0.0
    refused_why: str = ""


@dataclass
class ReplicaRecord:
    id: str
    deployment: str
    scheduler_id: str
    spec_hash: str
    state: ReplicaState = PENDING
    address: str = ""
    pid: int = 0
    in_flight: int = 0
    queued: int = 0
    message: str = ""
    resources: Capacity = field(default_factory=Capacity)  # what it holds on its scheduler
    reported_state: ReplicaState | None = None  # the state its scheduler last reported
    # The scheduler's registry version once it confirmed the creation; a health
    # report older than this does not yet know the replica.
    created_version: int = 0
    ready_at: float = 0.0
    ready_seen: float = 0.0  # when the head first saw it READY (its own clock; 0: not yet)


@dataclass
class ReplicaReport:
    """One replica as a scheduler reports it."""

    id: str
    deployment: str
    state: ReplicaState
    address: str = ""
    pid: int = 0
    in_flight: int = 0
    queued: int = 0
    spec_hash: str = ""
    message: str = ""
    ready_at: float = 0.0
    # DEAD of its own doing: it exited with an error or a crash signal, or went over its
    # memory limit (not killed from outside, nor for missed pings).
    crashed: bool = False


@dataclass(frozen=True)
class CreateReplica:
    scheduler_id: str
    replica_id: str
    deployment: str
    spec: DeploymentSpec


@dataclass(frozen=True)
class RemoveReplica:
    scheduler_id: str
    replica_id: str
    graceful: bool


Action = CreateReplica | RemoveReplica


@dataclass(frozen=True)
class ClusterEvent:
    at: float
    kind: str
    message: str
    deployment: str = ""
    replica_id: str = ""
    scheduler_id: str = ""
    wall: float = field(default_factory=time.time)


class ReplicaTable(dict[str, ReplicaRecord]):
    """The replicas by id, with indexes by scheduler and by deployment kept in step, so that
    what one scheduler's health update touches costs its own replicas, not the cluster's (at
    1,000 schedulers and 10,000 replicas each update walked all of them: bench/scale.py), and
    the routes of the deployments it touched cost those deployments' replicas.

    Add and remove through the dict (``table[id] = rec``, ``del``, ``pop``); move a record
    to another scheduler with :meth:`move`, never by setting its ``scheduler_id``.

    ``touched`` collects the deployments whose replicas were added, removed or moved, or
    marked with :meth:`touch` (a state, address or spec that routes show changed), so that
    the routing table rebuilds only theirs (``take_touched``).

    What each scheduler's replicas hold (:meth:`held`) is summed once and kept until a
    replica is added to it, removed from it or moved: a record's ``resources`` never change
    once it is in the table. Every status read and every ``/metrics`` scrape summed all the
    replicas (8 ms at 10,000) to show the schedulers' allocations."""

    def __init__(self) -> None:
        super().__init__()
        self._by_scheduler: dict[str, dict[str, ReplicaRecord]] = {}
        self._by_deployment: dict[str, dict[str, ReplicaRecord]] = {}
        self._held: dict[str, Capacity] = {}  # scheduler -> what its replicas hold, while unchanged
        self.summed = 0  # records summed into ``_held`` so far (what a read of it cost)
        self.touched: set[str] = set()

    def __setitem__(self, replica_id: str, rec: ReplicaRecord) -> None:
        old = super().get(replica_id)
        if old is not None:
            self._unindex(old)
        super().__setitem__(replica_id, rec)
        self._by_scheduler.setdefault(rec.scheduler_id, {})[replica_id] = rec
        self._held.pop(rec.scheduler_id, None)
        self._by_deployment.setdefault(rec.deployment, {})[replica_id] = rec
        self.touched.add(rec.deployment)

    def __delitem__(self, replica_id: str) -> None:
        rec = self[replica_id]
        super().__delitem__(replica_id)
        self._unindex(rec)

    def pop(self, replica_id: str, default: Any = None) -> Any:
        rec = super().pop(replica_id, None)
        if rec is None:
            return default
        self._unindex(rec)
        return rec

    def clear(self) -> None:
        self.touched.update(self._by_deployment)
        super().clear()
        self._by_scheduler.clear()
        self._by_deployment.clear()
        self._held.clear()

    def on(self, scheduler_id: str) -> list[ReplicaRecord]:
        """The replicas on ``scheduler_id`` (a copy: safe to change the table while iterating)."""
        return list(self._by_scheduler.get(scheduler_id, {}).values())

    def count_on(self, scheduler_id: str) -> int:
        """How many replicas ``scheduler_id`` holds (no copy)."""
        return len(self._by_scheduler.get(scheduler_id, ()))

    def count(self, deployment: str) -> int:
        """How many replicas ``deployment`` has."""
        return len(self._by_deployment.get(deployment, ()))

    def deployments(self) -> set[str]:
        """The deployments that have replicas in the table."""
        return set(self._by_deployment)

    def held(self) -> dict[str, Capacity]:
        """What the replicas on each scheduler that has any hold: summed again only for the
        schedulers whose replicas changed since the last call."""
        out = {}
        for sid, mine in self._by_scheduler.items():
            held = self._held.get(sid)
            if held is None:
                cpus = memory_mb = gpus = 0.0
                for rec in mine.values():
                    cpus += rec.resources.cpus
                    memory_mb += rec.resources.memory_mb
                    gpus += rec.resources.gpus
                self.summed += len(mine)
                # Rounded for those who read it (status, metrics): ten replicas of cpus 0.1 hold
                # 1, not 0.9999999999999999 (nor 0.30000000000000004 for three).
                held = self._held[sid] = Capacity(round(cpus, 9), round(memory_mb, 9), round(gpus, 9))
            out[sid] = held
        return out

    def touch(self, deployment: str) -> None:
        self.touched.add(deployment)

    def take_touched(self) -> set[str]:
        """The deployments touched since the last call."""
        touched, self.touched = self.touched, set()
        return touched

    def of(self, deployment: str) -> list[ReplicaRecord]:
        """The replicas of ``deployment`` (a copy)."""
        return list(self._by_deployment.get(deployment, {}).values())

    def move(self, rec: ReplicaRecord, scheduler_id: str) -> None:
        if rec.scheduler_id == scheduler_id:
            return
        self._unindex(rec, keep_deployment=True)
        rec.scheduler_id = scheduler_id
        if super().get(rec.id) is rec:
            self._by_scheduler.setdefault(scheduler_id, {})[rec.id] = rec
            self._held.pop(scheduler_id, None)

    def _unindex(self, rec: ReplicaRecord, *, keep_deployment: bool = False) -> None:
        self.touched.add(rec.deployment)
        mine = self._by_scheduler.get(rec.scheduler_id)
        if mine is not None:
            mine.pop(rec.id, None)
            self._held.pop(rec.scheduler_id, None)
            if not mine:
                del self._by_scheduler[rec.scheduler_id]
        same = self._by_deployment.get(rec.deployment)
        if not keep_deployment and same is not None:
            same.pop(rec.id, None)
            if not same:
                del self._by_deployment[rec.deployment]


@dataclass
class _StartFailures:
    count: int = 0
    not_before: float = 0.0
    last_message: str = ""
    spec_hash: str = ""  # the spec whose replicas failed: another spec starts afresh
    crashes: int = 0  # those that crashed (a failed create call is not the model's fault)
    last_at: float = 0.0  # when the last one failed


@dataclass
class ClusterState:
    clock: Clock
    dead_after_s: float = 5.0
    # How far behind the head is in reading health updates (``Backlog``): a scheduler is
    # dead after dead_after_s of silence plus this, not for the head's own lateness.
    late_s: float = 0.0
    # A scheduler whose health stream ended (its process exited: the connection closed) and
    # that sent no update since is dead after this (plus ``late_s``) instead of dead_after_s;
    # 0: only dead_after_s. Never longer than dead_after_s.
    stream_end_grace_s: float = 0.0
    # A DEAD scheduler silent this long is forgotten (0: never).
    forget_after_s: float = 3600.0
    # Most schedulers kept, ALIVE and DEAD (setting max_schedulers; 0: no bound): see register.
    max_schedulers: int = 0
    schedulers: dict[str, SchedulerRecord] = field(default_factory=dict)
    replicas: ReplicaTable = field(default_factory=ReplicaTable)
    pending_reasons: dict[str, str] = field(default_factory=dict)
    events: deque[ClusterEvent] = field(default_factory=lambda: deque(maxlen=200))
    # Set by reconcile when it stopped at its creation budget: call it again soon.
    more_to_place: bool = False
    _failures: dict[str, _StartFailures] = field(default_factory=dict)
    # Deployments that just became FAILED, (name, spec hash, message): see take_failed.
    _newly_failed: list[tuple[str, str, str]] = field(default_factory=list)
    # Earlier revisions kept serving (``serve_revisions``), by deployment: their process
    # hashes as of the last reconcile, and their own start failures, by (name, hash), which
    # back off their replacements without touching the current spec's.
    _retained: dict[str, frozenset[str]] = field(default_factory=dict)
    _retained_failures: dict[tuple[str, str], _StartFailures] = field(default_factory=dict)
    # Each desired deployment's ``health.stable_after_s`` as of the last reconcile (the
    # default for one not seen yet: a replica reported before the head's first pass).
    _stable_after: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------ membership

    def register(
        self,
        scheduler_id: str,
        address: str,
        http_address: str,
        capacity: Capacity,
        *,
        pid: int = 0,
        hostname: str = "",
        peer: str = "",
        replicas: Iterable[ReplicaReport] = (),
        max_replicas: int = 0,
    ) -> None:
        """A scheduler (re)joins; replicas it already runs are adopted.

        ``AlreadyExists`` (and nothing changes) when another scheduler holds the id: see
        :meth:`holder`. ``LimitReached`` (and nothing changes) for a new id when
        ``max_schedulers`` are kept and all are ALIVE; with some DEAD, the one silent longest
        is forgotten to make room (as ``forget_after_s`` would later). A known id (a
        scheduler restarting, or coming back after a NACK) is never refused for room."""
        was = self.schedulers.get(scheduler_id)
        if was is not None and self.holder(was, address, peer):
            now = self.clock.now()
            on = f" on {was.hostname}" if was.hostname else ""
            message = (
                f"scheduler id {scheduler_id!r} is in use by a live scheduler at {was.address} "
                f"(pid {was.pid}{on}, last health update {max(0.0, now - was.last_seen):.1f}s ago): "
                "give this scheduler another --scheduler-id, or remove <state>/scheduler_id for a "
                "new one (if that scheduler is gone, the id is free once the head declares it "
                f"dead, within {max(0.0, self.dies_at(was) - now):.1f}s)"
            )
            self.event(
                "scheduler_refused",
                f"scheduler {scheduler_id} at {address} refused: the id is in use at {was.address}",
                scheduler_id=scheduler_id,
            )
            raise AlreadyExists(message)
        if was is None:
            self._make_room(scheduler_id, address)
        self.schedulers[scheduler_id] = SchedulerRecord(
            id=scheduler_id,
            address=address,
            http_address=http_address,
            capacity=capacity,
            max_replicas=max_replicas,
            pid=pid,
            hostname=hostname,
            peer=peer,
            state=ALIVE,
            last_seen=self.clock.now(),
        )
        for rec in self.replicas.on(scheduler_id):
            del self.replicas[rec.id]
        for rep in replicas:
            self._adopt(scheduler_id, rep)
        kind = "scheduler_rejoined" if was is not None else "scheduler_joined"
        self.event(kind, f"scheduler {scheduler_id} at {address} registered", scheduler_id=scheduler_id)

    def _make_room(self, scheduler_id: str, address: str) -> None:
        """Room for new scheduler ``scheduler_id`` under ``max_schedulers``: the DEAD one silent
        longest is forgotten when they are all kept; ``LimitReached`` when none is DEAD. A
        launcher looping on new ids grew the head's state, status and routing work without end
        (2,000 of them: a status call 78 ms and 0.5 MB; 20,000: 490 ms and 5 MB)."""
        if not 0 < self.max_schedulers <= len(self.schedulers):
            return
        dead = [s for s in self.schedulers.values() if s.state == DEAD]
        if not dead:
            self.event(
                "scheduler_refused",
                f"scheduler {scheduler_id} at {address} refused: the head holds {len(self.schedulers)} "
                "live schedulers (setting max_schedulers)",
                scheduler_id=scheduler_id,
            )
            raise LimitReached(
                f"the head holds {len(self.schedulers)} live schedulers, its limit (setting "
                f"max_schedulers): scheduler {scheduler_id!r} at {address} was not registered; stop "
                "schedulers no longer used (a stopped one's place is free once the head declares it "
                "dead), or raise max_schedulers"
            )
        oldest = min(dead, key=lambda s: s.last_seen)
        del self.schedulers[oldest.id]
        self.event(
            "scheduler_forgotten",
            f"scheduler {oldest.id} (dead) forgotten to make room for scheduler {scheduler_id} "
            f"(setting max_schedulers, {self.max_schedulers})",
            scheduler_id=oldest.id,
        )

    def holder(self, sched: SchedulerRecord, address: str, peer: str = "") -> bool:
        """Whether ``sched`` still holds its id against a registration from ``address``
        (coming from host ``peer``, as the head saw its connection): it is ALIVE at another
        address, or at the same one from another host, its health stream has not ended and
        it is not yet due to be declared dead (``dies_at``). Two processes under one id (a
        cloned machine image carrying ``<state>/scheduler_id``, a copied ``--scheduler-id``)
        would otherwise take turns at one record: the head placing replicas on one and
        removing them from the other. The host counts because the address is the
        scheduler's own claim: a process holding the shared scheduler certificate named a
        live scheduler's address from another machine and took its id. Not a holder, so the
        registration is taken: the same address from the same host (a scheduler registering
        again after a NACK or a broken stream), a scheduler whose stream ended (its process
        exited: a restart, ``kill -9`` included), one silent past its time or DEAD, and any
        after a head restart (the head has no record)."""
        elsewhere = bool(peer and sched.peer and not same_host(peer, sched.peer))
        return (
            sched.state == ALIVE
            and (sched.address != address or elsewhere)
            and sched.stream_ended_at is None
            and self.clock.now() <= self.dies_at(sched)
        )

    def health(self, scheduler_id: str, registry_version: int, reports: Iterable[ReplicaReport]) -> bool:
        """Apply a scheduler's health update. False (NACK) when the scheduler is unknown or DEAD."""
        sched = self.schedulers.get(scheduler_id)
        if sched is None or sched.state != ALIVE:
            return False
        sched.last_seen = self.clock.now()
        sched.stream_ended_at = None
        sched.registry_version = max(sched.registry_version, registry_version)
        seen: set[str] = set()
        for rep in reports:
            seen.add(rep.id)
            if rep.state in (REPLICA_DEAD, STOPPED):
                self._lost(
                    rep.id,
                    rep.deployment,
                    scheduler_id,
                    rep.message or "replica exited",
                    was_ready=rep.ready_at > 0,
                    crashed=rep.crashed,
                )
                continue
            self._adopt(scheduler_id, rep)
        for rec in [r for r in self.replicas.on(scheduler_id) if r.id not in seen]:
            # Pending creations newer than this report are not known to it yet.
            if rec.state == PENDING or rec.created_version > registry_version:
                continue
            self._lost(
                rec.id,
                rec.deployment,
                scheduler_id,
                "no longer reported by its scheduler",
                was_ready=rec.ready_at > 0,
            )
        return True

    def expire(self) -> list[str]:
        """Mark schedulers silent for ``dead_after_s`` (plus ``late_s``) DEAD; returns their ids. DEAD
        schedulers silent for ``forget_after_s`` are forgotten."""
        now = self.clock.now()
        dead = []
        gone = [
            s
            for s in self.schedulers.values()
            if s.state == DEAD and self.forget_after_s > 0 and now - s.last_seen > self.forget_after_s
        ]
        for sched in gone:
            del self.schedulers[sched.id]
            self.event(
                "scheduler_forgotten",
                f"scheduler {sched.id} was silent for {self.forget_after_s:g}s; forgotten",
                scheduler_id=sched.id,
            )
        for sched in self.schedulers.values():
            if sched.state != ALIVE or now <= self.dies_at(sched):
                continue
            sched.state = DEAD
            dead.append(sched.id)
            lost = self.replicas.on(sched.id)
            for rec in lost:
                del self.replicas[rec.id]
            if sched.stream_ended_at is not None and now - sched.last_seen <= self.dead_after_s + self.late_s:
                why = f"its health stream ended and it sent no update for {self.stream_end_grace_s:g}s"
            else:
                why = f"missed health updates for {self.dead_after_s:g}s"
            self.event(
                "scheduler_dead",
                f"scheduler {sched.id} {why}; {len(lost)} replica(s) to place elsewhere",
                scheduler_id=sched.id,
            )
        return dead

    def stream_ended(self, scheduler_id: str, last_update: float) -> None:
        """A scheduler's health stream ended; ``last_update``: when the last update on it was
        read. A scheduler whose process exited ends it at once (its connection closes), where
        one that is only silent (a machine lost, a network cut) takes dead_after_s: after
        ``stream_end_grace_s`` with no update on a new stream, it is dead. Ignored when an
        update came on another stream since (a scheduler that reconnected before the old
        stream's end was seen). Recorded with ``stream_end_grace_s`` 0 too: it then only frees
        the scheduler's id for a restarted one (``holder``)."""
        sched = self.schedulers.get(scheduler_id)
        if sched is None or sched.state != ALIVE:
            return
        if sched.last_seen <= last_update:
            sched.stream_ended_at = self.clock.now()

    def dies_at(self, sched: SchedulerRecord) -> float:
        """When a live scheduler that sends nothing more is dead (``expire``): dead_after_s after
        its last update, or ``stream_end_grace_s`` after its stream ended, whichever is first;
        either plus ``late_s``. Past it, a scheduler dies."""
        due = sched.last_seen + self.dead_after_s
        if sched.stream_ended_at is not None and self.stream_end_grace_s > 0:
            due = min(due, sched.stream_ended_at + self.stream_end_grace_s)
        return due + self.late_s

    def confirm_created(self, replica_id: str, registry_version: int) -> None:
        rec = self.replicas.get(replica_id)
        if rec is not None and rec.state == PENDING:
            rec.state = STARTING
            self.replicas.touch(rec.deployment)
            rec.created_version = registry_version

    def remove_failed(self, replica_id: str) -> None:
        """A RemoveReplica call failed: back to what its scheduler reports, so the next pass decides again."""
        rec = self.replicas.get(replica_id)
        if rec is not None and rec.state == DRAINING and rec.reported_state != DRAINING:
            rec.state = rec.reported_state or STARTING
            self.replicas.touch(rec.deployment)

    def create_failed(self, replica_id: str, message: str, *, unavailable: bool = False) -> None:
        """A CreateReplica call failed. ``unavailable``: its scheduler is shutting down or out
        of reach, no fault of the spec's: placement passes that scheduler by for
        ``dead_after_s`` (by then it is DEAD, or answers again) and the replica goes elsewhere
        at the next pass. Otherwise (the scheduler refused the replica: no GPU with room) the
        deployment backs off, as after a failed start, without counting toward FAILED.

        Before, both backed the deployment off: the replicas of a scheduler shutting down were
        placed on it again (the emptiest), refused, and the deployment waited 1 s, 2 s, ...
        until the head declared it dead, and ``shoal deploy`` meanwhile failed on two
        "replica start failure(s)"."""
        rec = self.replicas.pop(replica_id, None)
        if rec is not None:
            sched = self.schedulers.get(rec.scheduler_id)
            if unavailable and sched is not None:
                sched.refused_until = self.clock.now() + self.dead_after_s
                sched.refused_why = message
            else:
                self._start_failed(rec.deployment, message, rec.spec_hash, crashed=False)
            self.event(
                "replica_create_failed",
                f"could not create {replica_id}: {message}",
                deployment=rec.deployment,
                replica_id=replica_id,
                scheduler_id=rec.scheduler_id,
            )

    # ------------------------------------------------------------ reconcile

    def retire(self, replica_ids: Iterable[str]) -> list[Action]:
        """Drain the replicas ``replica_ids`` that are known and not draining already, whatever
        their deployment wants: those of a deployment deleted, then created again before
        they were gone, which must not serve the new one (``HeadNode.apply``)."""
        recs = [self.replicas.get(rid) for rid in replica_ids]
        return [self._remove(rec, graceful=True) for rec in recs if rec is not None and rec.state != DRAINING]

    def reconcile(
        self,
        desired: Mapping[str, tuple[DeploymentSpec, int]],
        deleted: Container[str] = frozenset(),
        *,
        max_creates: int = MAX_CREATES_PER_PASS,
        retained: Mapping[str, Sequence[DeploymentSpec]] | None = None,
    ) -> list[Action]:
        """Actions that move the actual state toward ``desired`` (name -> (spec, replica count)).

        - missing replicas are placed on live schedulers with room (spread), at most
          ``max_creates`` in one call (``more_to_place`` then says to call again soon);
        - a changed spec rolls: new replicas start first (a few at a time), an
          old one is drained only once a new one is READY;
        - ``retained`` (name -> earlier specs, ``serve_revisions``): their replicas are kept,
          not rolled; each keeps the deployment's replica count, those missing placed again
          once the current spec has all of its replicas READY;
        - surplus replicas are removed, and so are replicas of deployments in ``deleted``
          (the store's tombstones). A replica of a deployment that is neither desired nor
          deleted (the store does not know it: a new or damaged store) is kept.
        Creations are recorded at once as PENDING so that a second call does
        not place them twice. Linear in the number of replicas, plus
        ``max_creates`` times the number of schedulers.
        """
        self.expire()
        actions: list[Action] = []
        self.pending_reasons = {}
        self.more_to_place = False
        for rec in list(self.replicas.values()):
            if rec.deployment not in desired and rec.state != DRAINING and rec.deployment in deleted:
                actions.append(self._remove(rec, graceful=True))
        index = _Index(self)
        budget = [max_creates]
        retained = retained or {}
        self._retained = {n: frozenset(s.process_hash() for s in retained.get(n, ())) for n in desired}
        for key in [k for k in self._retained_failures if k[1] not in self._retained.get(k[0], ())]:
            del self._retained_failures[key]
        self._stable_after = {n: s.health.stable_after_s for n, (s, _) in desired.items()}
        for _, (spec, count) in sorted(desired.items()):
            actions.extend(self._reconcile_one(spec, count, index, budget, retained.get(spec.name, ())))
        return actions

    def _reconcile_one(
        self,
        spec: DeploymentSpec,
        count: int,
        index: _Index,
        budget: list[int],
        retained: Sequence[DeploymentSpec] = (),
    ) -> list[Action]:
        actions: list[Action] = []
        want = spec.process_hash()
        kept = self._retained.get(spec.name, frozenset())
        mine = index.mine(spec.name)
        live = [r for r in mine if r.state != DRAINING]
        new = [r for r in live if r.spec_hash == want]
        old = [r for r in live if r.spec_hash != want and r.spec_hash not in kept]
        ready_new = [r for r in new if r.state == READY]

        actions.extend(self._surplus(new, count))
        if len(ready_new) >= count:
            for earlier in retained:
                actions.extend(self._keep_retained(earlier, count, live, index, budget))
        missing = count - len(new)
        starting = len(new) - len(ready_new)
        if old:
            # Rolling update: bound how many new processes start at once.
            surge = max(1, math.ceil(count / 4))
            missing = min(missing, surge - starting)
        no_room = False
        failures = self._failures.get(spec.name)
        if failures is not None and failures.spec_hash != want:
            del self._failures[spec.name]  # a deploy of another spec: its replicas get a fresh start
            failures = None
        if missing > 0:
            if failures is not None and failures.crashes >= FAILED_AFTER:
                self.pending_reasons[spec.name] = (
                    f"{FAILED}{failures.crashes} replicas in a row died before READY or within "
                    f"{spec.health.stable_after_s:g}s of it, not started again "
                    f"until the next deploy: {failures.last_message}"
                )
            elif failures is not None and self.clock.now() < failures.not_before:
                wait = failures.not_before - self.clock.now()
                self.pending_reasons[spec.name] = (
                    f"{failures.count} replica start failure(s), retrying in {wait:.0f}s: "
                    f"{failures.last_message}"
                )
            else:
                for _ in range(missing):
                    if budget[0] <= 0:
                        self.more_to_place = True
                        self.pending_reasons[spec.name] = "placing replicas a few hundred per pass"
                        break
                    action = self._place(spec, want, index)
                    if action is None:
                        no_room = True
                        break
                    budget[0] -= 1
                    actions.append(action)
        # Keep serving capacity: an old replica goes only as new ones are READY.
        removable = len(old) + len(ready_new) - count
        victims = sorted(old, key=lambda r: (r.state == READY, r.id))
        draining = any(r.state == DRAINING for r in mine)
        if removable <= 0 and no_room and old and not starting and not draining:
            # No room to start a new replica beside the old ones: rather than stall the update
            # for ever, drain one old replica first (like Kubernetes' maxUnavailable=1). The
            # only case where an update dips below the replica count. Only one whose room,
            # once freed, holds a new replica, which the next pass starts there (so nothing
            # more drains until it is READY): one drained for nothing left the next pass
            # with nothing starting or draining, which drained another, until none served
            # (a new replica too big for any scheduler took every old one).
            need = Capacity.of(spec.resources)
            victims = [r for r in victims if self._frees_room(index, r, need)]
            if victims:
                removable = 1
                self.pending_reasons[spec.name] += "; draining one old replica first to make room"
        for rec in victims[: max(0, removable)]:
            actions.append(self._remove(rec, graceful=True))
        return actions

    def _frees_room(self, index: _Index, rec: ReplicaRecord, need: Capacity) -> bool:
        """Whether ``rec``'s scheduler holds a replica needing ``need`` once ``rec`` is gone."""
        sched = self.schedulers.get(rec.scheduler_id)
        if sched is None or sched.state != ALIVE:
            return False
        return (sched.capacity - index.allocated(sched.id) + rec.resources).fits(need)

    def _surplus(self, recs: list[ReplicaRecord], count: int) -> list[Action]:
        """Remove what ``recs`` (one spec's live replicas) holds past ``count``: the ones doing
        least first (not yet ready, then the newest)."""
        if len(recs) <= count:
            return []  # the usual case: no sort of every replica at every pass
        surplus = sorted(recs, key=lambda r: (r.state == READY, -r.created_version, r.id))
        return [self._remove(rec, graceful=True) for rec in surplus[: max(0, len(recs) - count)]]

    def _keep_retained(
        self,
        spec: DeploymentSpec,
        count: int,
        live: list[ReplicaRecord],
        index: _Index,
        budget: list[int],
    ) -> list[Action]:
        """An earlier revision kept serving: ``count`` replicas of ``spec``, no more, no fewer
        (those that died placed again, backing off after failed starts)."""
        key = spec.process_hash()
        recs = [r for r in live if r.spec_hash == key]
        actions = self._surplus(recs, count)
        failures = self._retained_failures.get((spec.name, key))
        if failures is not None and (
            failures.crashes >= FAILED_AFTER or self.clock.now() < failures.not_before
        ):
            return actions
        for _ in range(count - len(recs)):
            if budget[0] <= 0:
                self.more_to_place = True
                break
            action = self._place(spec, key, index)
            if action is None:
                reason = self.pending_reasons[spec.name]
                self.pending_reasons[spec.name] = f"an earlier revision kept serving waits for room: {reason}"
                break
            budget[0] -= 1
            actions.append(action)
        return actions

    def _place(self, spec: DeploymentSpec, spec_hash: str, index: _Index) -> CreateReplica | None:
        need = Capacity.of(spec.resources)
        chosen, reason = index.choose(spec.name, need)
        if chosen is None:
            self.pending_reasons[spec.name] = reason
            return None
        rid = f"{spec.name}-{secrets.token_hex(3)}"
        while rid in self.replicas:
            # Ids are short: among a thousand replicas of one deployment, two draws collide
            # about once in thirty, and a collision would overwrite the other's record.
            rid = f"{spec.name}-{secrets.token_hex(3)}"
        rec = ReplicaRecord(
            id=rid,
            deployment=spec.name,
            scheduler_id=chosen,
            spec_hash=spec_hash,
            state=PENDING,
            resources=need,
        )
        self.replicas[rid] = rec
        index.placed(rec)
        return CreateReplica(chosen, rid, spec.name, spec)

    def _remove(self, rec: ReplicaRecord, *, graceful: bool) -> RemoveReplica:
        rec.state = DRAINING
        self.replicas.touch(rec.deployment)
        return RemoveReplica(rec.scheduler_id, rec.id, graceful)

    # The resources each replica holds are its deployment's; the head sets them
    # per deployment before reconciling.
    resources_of: dict[str, Capacity] = field(default_factory=dict)

    def allocated(self, scheduler_id: str) -> Capacity:
        """What the replicas on a scheduler hold: each its own spec's resources, old specs included."""
        return self.replicas.held().get(scheduler_id, Capacity())

    def allocations(self) -> dict[str, Capacity]:
        """``allocated`` of every scheduler that holds a replica: kept by the replica table,
        summed again for the schedulers whose replicas changed alone (``ReplicaTable.held``)."""
        return self.replicas.held()

    # ------------------------------------------------------------ views

    def routes(self, only: Iterable[str] | None = None) -> dict[str, list[ReplicaRecord]]:
        """READY replicas on live schedulers, by deployment, sorted by id: of every
        deployment, or of those in ``only`` (costing their replicas only)."""
        recs = self.replicas.values() if only is None else [r for n in only for r in self.replicas.of(n)]
        out: dict[str, list[ReplicaRecord]] = {}
        for rec in sorted(recs, key=lambda r: r.id):
            sched = self.schedulers.get(rec.scheduler_id)
            if rec.state == READY and sched is not None and sched.state == ALIVE:
                out.setdefault(rec.deployment, []).append(rec)
        return out

    # ------------------------------------------------------------ internals

    def _adopt(self, scheduler_id: str, rep: ReplicaReport) -> None:
        rec = self.replicas.get(rep.id)
        if rec is None:
            # Adopted (after a head restart): charge it what its deployment asks now.
            rec = ReplicaRecord(
                id=rep.id,
                deployment=rep.deployment,
                scheduler_id=scheduler_id,
                spec_hash=rep.spec_hash,
                resources=self.resources_of.get(rep.deployment, Capacity()),
            )
            self.replicas[rep.id] = rec
        if rec.state == DRAINING and rep.state != DRAINING:
            # The head asked it to go; the scheduler has not caught up yet.
            state = DRAINING
        else:
            state = rep.state
        if state == READY and rec.state != READY:
            self.event(
                "replica_ready",
                f"replica {rep.id} is READY",
                deployment=rep.deployment,
                replica_id=rep.id,
                scheduler_id=scheduler_id,
            )
            rec.ready_seen = self.clock.now()
        if (
            rec.state != state
            or rec.address != rep.address
            or (rep.spec_hash and rec.spec_hash != rep.spec_hash)
        ):
            self.replicas.touch(rec.deployment)
        rec.state = state
        rec.reported_state = rep.state
        self.replicas.move(rec, scheduler_id)
        rec.address = rep.address
        rec.pid = rep.pid
        rec.in_flight = rep.in_flight
        rec.queued = rep.queued
        rec.message = rep.message
        rec.ready_at = rep.ready_at
        if rep.spec_hash:
            rec.spec_hash = rep.spec_hash

    def _lost(
        self,
        replica_id: str,
        deployment: str,
        scheduler_id: str,
        message: str,
        *,
        was_ready: bool,
        crashed: bool = False,
    ) -> None:
        rec = self.replicas.pop(replica_id, None)
        if rec is None:
            return
        f = self._failures_of(deployment, rec.spec_hash)
        if f is not None and self._outlived(rec, f):
            f.count = f.crashes = 0  # it outlived the failures before it: they were not a crash loop
        if rec.state == DRAINING:
            self.event(
                "replica_stopped",
                f"replica {replica_id} stopped",
                deployment=deployment,
                replica_id=replica_id,
                scheduler_id=scheduler_id,
            )
            return
        if not was_ready:
            self._start_failed(deployment, message, rec.spec_hash, crashed=True)
        elif crashed:
            # READY but never seen so by the head: it came and went between two reports.
            up = self.clock.now() - rec.ready_seen if rec.ready_seen else 0.0
            if up < self.stable_after_s(deployment):
                reason = f"died {up:.0f}s after READY: {message}"
                self._start_failed(deployment, reason, rec.spec_hash, crashed=True)
        self.event(
            "replica_died",
            f"replica {replica_id} died: {message}",
            deployment=deployment,
            replica_id=replica_id,
            scheduler_id=scheduler_id,
        )

    def _start_failed(self, deployment: str, message: str, spec_hash: str, *, crashed: bool) -> None:
        if spec_hash in self._retained.get(deployment, ()):
            # An earlier revision kept serving: its replacements back off, and stop after
            # FAILED_AFTER, but the deployment (its current spec) is not FAILED for it.
            key = (deployment, spec_hash)
            f = self._retained_failures.setdefault(key, _StartFailures(spec_hash=spec_hash))
        else:
            f = self._failures.setdefault(deployment, _StartFailures(spec_hash=spec_hash))
        if any(self._outlived(r, f) for r in self.replicas.of(deployment) if r.state == READY):
            f.count = f.crashes = 0  # a replica outlived the earlier failures: a new run of them
        f.count += 1
        f.crashes += crashed
        f.last_message = message
        delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (f.count - 1))
        f.not_before = self.clock.now() + delay
        f.last_at = self.clock.now()
        if crashed and f.crashes == FAILED_AFTER and f is self._failures.get(deployment):
            self.event("deployment_failed", f"{deployment} FAILED: {message}", deployment=deployment)
            self._newly_failed.append((deployment, f.spec_hash, message))

    def _failures_of(self, deployment: str, spec_hash: str) -> _StartFailures | None:
        """The run of failures of ``deployment``'s replicas of ``spec_hash``, if any."""
        f = self._retained_failures.get((deployment, spec_hash)) or self._failures.get(deployment)
        return f if f is not None and f.spec_hash == spec_hash else None

    def _outlived(self, rec: ReplicaRecord, f: _StartFailures) -> bool:
        """Whether ``rec``, a replica of the failing spec started after its last failure, stayed
        READY ``health.stable_after_s``: the failures before it were no crash loop. Not for a
        FAILED spec: that one ends only with the next deploy."""
        return (
            f.crashes < FAILED_AFTER
            and rec.spec_hash == f.spec_hash
            and rec.ready_seen > 0
            and rec.ready_seen >= f.last_at
            and self.clock.now() - rec.ready_seen >= self.stable_after_s(rec.deployment)
        )

    def stable_after_s(self, deployment: str) -> float:
        """How long a replica of ``deployment`` must stay READY to end a run of failures
        (its spec's ``health.stable_after_s``)."""
        return self._stable_after.get(deployment, STABLE_AFTER_S)

    def take_failed(self) -> list[tuple[str, str, str]]:
        """The deployments that became FAILED since the last call, once each, in order:
        (name, the process hash of the spec whose replicas failed, the last failure's message)."""
        out, self._newly_failed = self._newly_failed, []
        return out

    def fail_again(self, failed: tuple[str, str, str]) -> None:
        """Give back an entry of :meth:`take_failed` its caller could not handle now."""
        self._newly_failed.append(failed)

    def failed(self, spec: DeploymentSpec) -> str:
        """Why ``spec``'s deployment is FAILED (the last failure's message), or "" when it is
        not: its replicas of this spec died starting ``FAILED_AFTER`` times in a row, and none
        is started again until the next deploy."""
        f = self._failures.get(spec.name)
        if f is None or f.crashes < FAILED_AFTER or f.spec_hash != spec.process_hash():
            return ""
        return f.last_message

    def clear_start_failures(self, deployment: str) -> bool:
        """Forget ``deployment``'s failed starts (a new deploy, even of the same spec, is a new
        try: the user may have fixed the model's code). True when there were any."""
        for key in [k for k in self._retained_failures if k[0] == deployment]:
            del self._retained_failures[key]
        return self._failures.pop(deployment, None) is not None

    def event(
        self, kind: str, message: str, *, deployment: str = "", replica_id: str = "", scheduler_id: str = ""
    ) -> None:
        self.events.append(
            ClusterEvent(
                at=self.clock.now(),
                kind=kind,
                message=message,
                deployment=deployment,
                replica_id=replica_id,
                scheduler_id=scheduler_id,
            )
        )


class Backlog:
    """How far behind the head is in reading health updates, from the deadlines they carry.

    A scheduler gives each health update the same timeout; the time left of it when the head
    reads the update, against the most ever left on one of that scheduler's updates, is how
    long the update waited in the head (its own backlog, not the network). A head short of
    CPU would otherwise take its own lateness for silent schedulers, declare them dead, and
    the re-registrations and replacements that follow would put it further behind
    (bench/scale.py at 1,000 schedulers on a busy machine). ``behind`` is the most any update
    read in the last ``window_s`` waited (or the last one, when none was read since)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._full: dict[str, float] = {}  # scheduler -> the most time ever left on its updates
        self._seen: deque[tuple[float, float]] = deque()  # (read at, waited)

    def observe(self, scheduler_id: str, left_s: float, now: float) -> None:
        if not math.isfinite(left_s):
            return
        full = max(self._full.get(scheduler_id, 0.0), left_s)
        self._full[scheduler_id] = full
        self.observe_wait(full - left_s, now)

    def observe_wait(self, waited: float, now: float) -> None:
        """An update that waited ``waited`` seconds, measured by its caller (a health stream
        carries no deadline per update: ``shoal.rpc.head_service``)."""
        if not math.isfinite(waited):
            return
        while self._seen and self._seen[-1][1] <= waited:
            self._seen.pop()  # a smaller wait read earlier never counts again
        self._seen.append((now, waited))

    def behind(self, now: float) -> float:
        while len(self._seen) > 1 and now - self._seen[0][0] > self.window_s:
            self._seen.popleft()
        return self._seen[0][1] if self._seen else 0.0

    def forget(self, scheduler_id: str) -> None:
        self._full.pop(scheduler_id, None)


class _Index:
    """One reconcile pass's view of the replicas for placing them, kept up to date as the
    pass places more: what keeps a pass linear in the number of replicas.

    The sums (plain floats, ``[cpus, memory_mb, gpus]``) take a walk over every replica, so
    they are built only when the pass first places one: a pass with nothing to place costs
    the deployments' own replicas (``ReplicaTable.of``), not the cluster's. Placing one
    deployment's replicas one after another takes a heap of its candidates (see
    :meth:`choose`), not a scan of every scheduler per replica."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.now = state.clock.now()
        self.sums: dict[str, list[float]] = {}  # scheduler -> what its replicas hold
        self.on_scheduler: dict[str, int] = {}
        self.of_deployment: dict[tuple[str, str], int] = {}  # (scheduler, deployment) -> replicas
        self._built = False
        self._heap_for: tuple[str, Capacity] | None = None
        self._heap: list[tuple[int, float, int, str]] = []
        # Every live scheduler by (-free cpus, replicas, id), shared by the deployments
        # (``_choose_unused``); a scheduler given a replica is pushed again, its older
        # entry left behind as stale.
        self._unused: list[tuple[float, int, str]] | None = None
        self._exhausted: tuple[str, Capacity] | None = None  # no unused scheduler has room

    @classmethod
    def build(cls, state: ClusterState) -> _Index:
        index = cls(state)
        index._build()
        return index

    def _build(self) -> None:
        if self._built:
            return
        self._built = True
        for rec in self.state.replicas.values():
            self._count(rec)

    def mine(self, deployment: str) -> list[ReplicaRecord]:
        """The deployment's replicas as the pass found them."""
        return self.state.replicas.of(deployment)

    def add(self, rec: ReplicaRecord) -> None:
        """A replica just placed (already in the state's table)."""
        if self._built:
            self._count(rec)

    def _count(self, rec: ReplicaRecord) -> None:
        sid = rec.scheduler_id
        held = self.sums.get(sid)
        if held is None:
            held = self.sums[sid] = [0.0, 0.0, 0.0]
        res = rec.resources
        held[0] += res.cpus
        held[1] += res.memory_mb
        held[2] += res.gpus
        self.on_scheduler[sid] = self.on_scheduler.get(sid, 0) + 1
        key = (sid, rec.deployment)
        self.of_deployment[key] = self.of_deployment.get(key, 0) + 1

    def allocated(self, scheduler_id: str) -> Capacity:
        self._build()
        return Capacity(*self.sums.get(scheduler_id, (0.0, 0.0, 0.0)))

    def has_room(self, sid: str, need: Capacity) -> bool:
        """Whether scheduler ``sid`` holds one more replica needing ``need``: free resources,
        and fewer replicas than its ``max_replicas``."""
        sched = self.state.schedulers[sid]
        return (sched.capacity - self.allocated(sid)).fits(need) and not full(
            self.on_scheduler.get(sid, 0), sched.max_replicas
        )

    def placeable(self, sched: SchedulerRecord) -> bool:
        """Alive, and not passed by for a create it could not take (``create_failed``)."""
        return sched.state == ALIVE and sched.refused_until <= self.now

    def candidates(self, schedulers: Iterable[SchedulerRecord], deployment: str) -> list[Candidate]:
        self._build()
        return [self._candidate(sched, deployment) for sched in schedulers if self.placeable(sched)]

    def _candidate(self, sched: SchedulerRecord, deployment: str) -> Candidate:
        return Candidate(
            scheduler_id=sched.id,
            free=sched.capacity - self.allocated(sched.id),
            replicas_of_deployment=self.of_deployment.get((sched.id, deployment), 0),
            replicas_total=self.on_scheduler.get(sched.id, 0),
            capacity=sched.capacity,
            max_replicas=sched.max_replicas,
        )

    def choose(self, deployment: str, need: Capacity) -> tuple[str | None, str]:
        """``placement.choose`` over the live schedulers, for the next replica of
        ``deployment``; the caller adds the replica (``placed``) before choosing again.

        The same choice as scanning them all, at log(schedulers) per replica: one after
        another, a deployment's replicas change only the chosen scheduler's key (it only
        grows), and a scheduler without room for ``need`` stays without. Keys are plain
        tuples: at 1,000 schedulers and 100 deployments a pass builds 100,000 of them.

        First among the schedulers with no replica of ``deployment`` (the first of the key),
        from one heap that every deployment shares (:meth:`_choose_unused`): after 100 of
        1,000 schedulers died, placing their replicas built a heap of 900 per deployment,
        100 times (0.26 s of the pass, holding the head's lock). Only when none of those
        has room does it take the deployment's own heap."""
        if self._exhausted != (deployment, need):
            sid = self._choose_unused(deployment, need)
            if sid is not None:
                self._heap_for = None  # the deployment's heap, if any, is stale now
                return sid, ""
            self._exhausted = (deployment, need)  # nor will one have room later in the pass
        if self._heap_for != (deployment, need):
            self._build()
            self._heap_for = (deployment, need)
            self._heap = [
                self._key(sched, deployment)
                for sched in self.state.schedulers.values()
                if self.placeable(sched)
            ]
            heapq.heapify(self._heap)
        while self._heap:
            sid = heapq.heappop(self._heap)[3]
            if self.has_room(sid, need):
                return sid, ""
        # No room anywhere: placement says why (over every live scheduler).
        candidates = self.candidates(self.state.schedulers.values(), deployment)
        passed_by = [s for s in self.state.schedulers.values() if s.state == ALIVE and not self.placeable(s)]
        if not candidates and passed_by:
            sched = min(passed_by, key=lambda s: s.refused_until)
            return None, (
                f"scheduler {sched.id} takes no replica now ({sched.refused_why}); "
                f"placing there again in {max(0.0, sched.refused_until - self.now):.0f}s"
            )
        return choose(candidates, need)

    def _choose_unused(self, deployment: str, need: Capacity) -> str | None:
        """The first by (-free cpus, replicas, id) of the live schedulers with none of
        ``deployment``'s replicas and room for ``need``: ``choose``'s answer when there is
        one. Costs the entries ahead of it (stale, or holding the deployment already)."""
        self._build()
        if self._unused is None:
            self._unused = [
                self._unused_key(sched.id)
                for sched in self.state.schedulers.values()
                if self.placeable(sched)
            ]
            heapq.heapify(self._unused)
        aside = []
        found = None
        while self._unused:
            entry = heapq.heappop(self._unused)
            sid = entry[2]
            if entry != self._unused_key(sid):
                continue  # stale: the scheduler got a replica since
            aside.append(entry)
            if self.of_deployment.get((sid, deployment), 0) == 0 and self.has_room(sid, need):
                found = sid
                break
        for entry in aside:
            heapq.heappush(self._unused, entry)
        return found

    def _unused_key(self, sid: str) -> tuple[float, int, str]:
        held = self.sums.get(sid)
        free_cpus = self.state.schedulers[sid].capacity.cpus - (held[0] if held is not None else 0.0)
        return (-free_cpus, self.on_scheduler.get(sid, 0), sid)

    def _key(self, sched: SchedulerRecord, deployment: str) -> tuple[int, float, int, str]:
        """``placement.choose``'s order among schedulers with room."""
        held = self.sums.get(sched.id)
        free_cpus = sched.capacity.cpus - (held[0] if held is not None else 0.0)
        ours = self.of_deployment.get((sched.id, deployment), 0)
        return (ours, -free_cpus, self.on_scheduler.get(sched.id, 0), sched.id)

    def placed(self, rec: ReplicaRecord) -> None:
        """``rec`` was placed where ``choose`` said: its scheduler goes back on the heap."""
        self.add(rec)
        if self._unused is not None:
            heapq.heappush(self._unused, self._unused_key(rec.scheduler_id))
        if self._heap_for == (rec.deployment, rec.resources):
            heapq.heappush(self._heap, self._key(self.state.schedulers[rec.scheduler_id], rec.deployment))

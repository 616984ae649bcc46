"""``shoal chaos NAME``: load a deployment while breaking the cluster under it, and measure.

    shoal chaos echo --kill-replicas-every 1 --duration 30
    shoal chaos echo --kill-scheduler 10 --duration 30 --json
    shoal chaos echo --restart-head 5 --head-restart-cmd "shoal head --state /srv/shoal" --duration 20

Load: ``--concurrency`` callers in a closed loop (or paced to ``--rate`` requests a second)
send shoal's native ``SendRequest`` to one scheduler's ingress: ``--url``, else the first
live scheduler the head names that is not about to be killed. Inputs are shaped from the
deployment's declared inputs (variable dimensions become 1).

Faults, on the clock of the run (seconds since the load started):

- ``--kill-replicas-every S``: every S seconds, ``kill -9`` a random READY replica of the
  deployment. Only replicas running on this machine can be killed: the pid the head
  reports must be a ``shoal.replica_main`` process with that replica id here.
- ``--kill-scheduler AT``: once, ``kill -9`` a scheduler (``--scheduler ID`` or a random
  live one other than the load's target) whose process runs on this machine.
- ``--restart-head AT``: ``kill -9`` the head (``--head-pid``, else the process on this
  machine listening on the head's port) and start it again with ``--head-restart-cmd``:
  only the operator knows how the head was started. Its output goes to ``--head-log``.

Faults are injected for ``--duration`` seconds; then the load goes on until every fault
has recovered (at most ``--recover-timeout``) and ``--settle`` seconds more.

Recovery: the n-th replica kill has recovered when the n-th replica started during the run
is READY (replacements are fungible: whichever kill the head started one for); other
faults when the head reports the deployment
at exactly its replica count, all READY, on live schedulers (and, for a killed scheduler,
that scheduler DEAD). The report gives requests, failed requests by error kind, each
fault's recovery time, and latency p50/p99 before the first fault, during faults (from a
fault to its recovery) and after, as a table or ``--json``; ``--max-failed N`` makes the
command fail when more requests failed.

The engine (:class:`Chaos`, :class:`Fault`) is importable: tests add faults of their own
(partitions, rolling updates) and get the same measurements. (One module past the usual
size on purpose: load, faults, recovery and report are one measurement and change together.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from shoal.config import Settings
from shoal.errors import FailedPrecondition, InvalidArgument, NotFound, ShoalError, Unavailable
from shoal.types import Arrays

EXIT_ERROR = 1

# ---------------------------------------------------------------- status helpers


def deployment_of(status: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    return next((d for d in status.get("deployments", []) if d["name"] == name), None)


def converged(status: Mapping[str, Any], name: str) -> bool:
    """The deployment has exactly its replica count, every replica READY on a live scheduler."""
    dep = deployment_of(status, name)
    if dep is None or not status.get("schedulers"):
        return False
    alive = {s["id"] for s in status["schedulers"] if s["state"] == "ALIVE"}
    reps = dep["replicas"]
    return len(reps) == dep["target_replicas"] and all(
        r["state"] == "READY" and r["scheduler"] in alive for r in reps
    )


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def local_replica(pid: int, replica_id: str) -> bool:
    """Whether ``pid`` is, on this machine, the replica process ``replica_id``."""
    cmd = _cmdline(pid) if pid > 0 else []
    return "shoal.replica_main" in cmd and replica_id in cmd


def local_scheduler(pid: int) -> bool:
    """Whether ``pid`` is, on this machine, a ``shoal scheduler`` process (not ``shoal up``)."""
    cmd = _cmdline(pid) if pid > 0 else []
    return "scheduler" in cmd and any("shoal" in part for part in cmd)


def find_head_pid(head_address: str) -> int | None:
    """The process on this machine that listens on the head's port and runs ``shoal head``."""
    port = int(head_address.rsplit(":", 1)[1])
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if "head" not in cmd or not any("shoal" in part for part in cmd):
            continue
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns):
            return proc.pid
    return None


def inputs_for(spec: Mapping[str, Any], seed: int = 0) -> Arrays:
    """A request for a deployment, shaped from its declared inputs (``-1`` dimensions become 1)."""
    from shoal.core.tensors import DATATYPES

    declared = spec.get("inputs") or []
    if not declared:
        raise InvalidArgument(
            f"deployment {spec.get('name')!r} declares no inputs; shoal chaos shapes its requests from them"
        )
    rng = np.random.default_rng(seed)
    out: Arrays = {}
    for t in declared:
        shape = tuple(1 if d < 0 else d for d in t.get("shape", [-1])) or (1,)
        datatype = t.get("datatype", "FP32")
        if datatype == "BYTES":
            arr = np.empty(shape, dtype=object)
            arr.flat[:] = [b"shoal-chaos"] * arr.size
        elif datatype == "BOOL":
            arr = rng.random(shape) < 0.5
        elif DATATYPES[datatype].kind in "iu":
            arr = rng.integers(0, 16, size=shape).astype(DATATYPES[datatype])
        else:
            arr = rng.random(shape).astype(DATATYPES[datatype])
        out[t["name"]] = arr
    return out


# ---------------------------------------------------------------- load


@dataclass(frozen=True)
class Sample:
    """One request: when it was sent (seconds since ``Load.t0``), how long it took, how it failed."""

    at: float
    latency_s: float
    error: str | None  # None when it succeeded, else its kind (UNAVAILABLE, DEADLINE_EXCEEDED, ...)
    replica: str = ""  # the replica that answered
    request_id: str = ""


class Load:
    """``concurrency`` callers sending one request each, again and again, to a scheduler's
    native ingress until stopped. ``rate`` > 0 paces the callers to that many requests a
    second in total. Records every request as a :class:`Sample`; never raises for a failed
    request. Lifecycle: ``async with Load(...)`` (or ``start()`` / ``stop()``)."""

    def __init__(
        self,
        address: str,
        deployment: str,
        inputs: Arrays,
        settings: Settings,
        *,
        concurrency: int = 8,
        timeout_s: float = 30.0,
        rate: float = 0.0,
    ) -> None:
        self.address = address
        self.deployment = deployment
        self.inputs = inputs
        self.settings = settings
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.rate = rate
        self.samples: list[Sample] = []
        self.examples: dict[str, str] = {}  # error kind -> first message
        self.t0 = time.monotonic()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._next_at = 0.0
        self._ids = itertools.count(1)
        self._client: Any = None

    async def start(self) -> None:
        from shoal.rpc.clients import NativeClient

        self._client = NativeClient(self.address, self.settings)
        self.t0 = time.monotonic()
        self._next_at = self.t0
        self._tasks = [
            asyncio.create_task(self._caller(), name=f"chaos-load-{i}") for i in range(self.concurrency)
        ]

    async def stop(self) -> None:
        self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks)
        self._tasks = []
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> Load:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def _caller(self) -> None:
        while not self._stop.is_set():
            if self.rate > 0:
                at = self._next_at = max(self._next_at + 1.0 / self.rate, time.monotonic() - 1.0)
                delay = at - time.monotonic()
                if delay > 0:
                    try:
                        await asyncio.wait_for(self._stop.wait(), delay)
                        return
                    except TimeoutError:
                        pass
            start = time.monotonic()
            error: str | None = None
            replica = ""
            # Named, so that a failed request can be followed through the schedulers' logs.
            request_id = f"chaos-{os.getpid()}-{next(self._ids)}"
            try:
                _, replica = await self._client.infer(
                    self.deployment, self.inputs, timeout_s=self.timeout_s, request_id=request_id
                )
            except ShoalError as err:
                error = err.code.name
                self.examples.setdefault(error, f"{request_id}: {str(err)[:300]}")
            except Exception as err:  # a failed request is a measurement, not a crash
                error = type(err).__name__
                self.examples.setdefault(error, f"{request_id}: {str(err)[:300]}")
            done = time.monotonic()
            self.samples.append(Sample(start - self.t0, done - start, error, replica, request_id))

    def failures(self) -> list[Sample]:
        return [s for s in self.samples if s.error is not None]


def latency_stats(samples: Sequence[Sample]) -> dict[str, Any]:
    """Requests, failures and latency percentiles (ms, of successful requests) of ``samples``."""
    ok = np.array([s.latency_s for s in samples if s.error is None]) * 1000

    def pct(q: float) -> float | None:
        return round(float(np.percentile(ok, q)), 2) if ok.size else None

    return {
        "requests": len(samples),
        "failed": sum(1 for s in samples if s.error is not None),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "max_ms": round(float(ok.max()), 2) if ok.size else None,
    }


# ---------------------------------------------------------------- faults


@dataclass
class FaultContext:
    """What a fault sees: the deployment, the head's last status before it, and a scratch dict."""

    deployment: str
    before: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)


REPLACEMENT = "replacement"
CONVERGED = "converged"

Recovery = str | Callable[[Mapping[str, Any], FaultContext], bool]


@dataclass
class Fault:
    """Something done to the cluster at ``at_s`` seconds into the run.

    ``inject`` does it and returns what it hit (for the report); raising ``Skip`` records
    the fault as skipped. Recovery is measured from the injection to the first status
    where ``recovery`` holds: ``"replacement"`` (the n-th such fault recovers when the n-th
    replica started during the run is READY), ``"converged"`` (see
    :func:`converged`), or a predicate over (status, context). A fault that is undone
    later (a partition and its healing) is two faults, each with its own recovery.
    """

    kind: str
    at_s: float
    inject: Callable[[FaultContext], Awaitable[str]]
    recovery: Recovery = CONVERGED


class Skip(Exception):
    """A fault that could not be injected (nothing to hit); the run goes on."""


@dataclass
class FaultRecord:
    kind: str
    at_s: float
    target: str = ""
    recovered_at_s: float | None = None
    injected_at_s: float = 0.0  # when inject returned: only statuses asked for later count
    replacement: str = ""  # for "replacement" recovery: the replica counted for this fault
    skipped: str = ""
    ctx: FaultContext | None = None
    recovery: Recovery = CONVERGED

    @property
    def pending(self) -> bool:
        return not self.skipped and self.recovered_at_s is None

    @property
    def recovered_s(self) -> float | None:
        if self.recovered_at_s is None:
            return None
        return round(self.recovered_at_s - self.at_s, 3)


class Chaos:
    """Load one deployment through one scheduler while faults are injected; measure.

    ``address`` is the scheduler ingress to load (default: the first live scheduler not
    in ``avoid``). Not reusable: one ``run`` per instance.
    """

    def __init__(
        self,
        head_address: str,
        deployment: str,
        settings: Settings,
        *,
        address: str = "",
        avoid: Sequence[str] = (),
        concurrency: int = 8,
        rate: float = 0.0,
        timeout_s: float = 30.0,
        poll_s: float = 0.2,
        inputs: Arrays | None = None,
        seed: int | None = None,
    ) -> None:
        self.head_address = head_address
        self.deployment = deployment
        # Status polls must not hang on a head that is away: short deadlines, one retry.
        self.settings = settings.replace(rpc_timeout_s=min(settings.rpc_timeout_s, 2.0))
        self.address = address
        self.avoid = set(avoid)
        self.concurrency = concurrency
        self.rate = rate
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.inputs = inputs
        self.rng = random.Random(seed)
        self.status: dict[str, Any] = {}
        self.records: list[FaultRecord] = []
        self.load: Load | None = None
        self._first_ready: dict[str, float] = {}
        self._initial: set[str] = set()
        # Every replica of the deployment the head listed: scheduler, first and last seen, READY since.
        self.timeline: dict[str, dict[str, Any]] = {}
        self._client: Any = None

    async def refresh(self) -> dict[str, Any]:
        """The head's status now (and remembered as ``self.status``). Raises ShoalError."""
        from shoal.rpc.clients import status_to_dict

        status = status_to_dict(await self._client.status())
        self.status = status
        now = self.load.now() if self.load is not None else 0.0
        dep = deployment_of(status, self.deployment)
        for r in dep["replicas"] if dep else []:
            seen = self.timeline.setdefault(
                r["id"], {"scheduler": r["scheduler"], "first_seen_s": round(now, 3), "ready_s": None}
            )
            seen["last_seen_s"] = round(now, 3)
            if r["state"] == "READY":
                self._first_ready.setdefault(r["id"], now)
                if seen["ready_s"] is None:
                    seen["ready_s"] = round(now, 3)
        return status

    async def run(
        self,
        faults: Sequence[Fault],
        *,
        duration_s: float,
        settle_s: float = 5.0,
        recover_timeout_s: float = 60.0,
    ) -> dict[str, Any]:
        """Inject ``faults`` (those at or before ``duration_s``) under load; returns the report."""
        from shoal.rpc.clients import ControlClient

        self._client = ControlClient(self.head_address, self.settings)
        try:
            status = await self.refresh()
            dep = deployment_of(status, self.deployment)
            if dep is None:
                raise NotFound(f"no deployment named {self.deployment!r}")
            if not self.address:
                alive = [
                    s for s in status["schedulers"] if s["state"] == "ALIVE" and s["id"] not in self.avoid
                ]
                if not alive:
                    raise Unavailable("no live scheduler to send requests to")
                self.address = alive[0]["address"]
            inputs = self.inputs if self.inputs is not None else inputs_for(dep["spec"])
            self.load = Load(
                self.address,
                self.deployment,
                inputs,
                self.settings,
                concurrency=self.concurrency,
                timeout_s=self.timeout_s,
                rate=self.rate,
            )
            # Replicas listed before the run (READY or not) are never replacements.
            self._initial = {r["id"] for r in dep["replicas"]}
            async with self.load:
                monitor = asyncio.create_task(self._monitor(), name="chaos-monitor")
                try:
                    await self._inject_all([f for f in faults if f.at_s <= duration_s], duration_s)
                    deadline = self.load.now() + recover_timeout_s
                    while any(r.pending for r in self.records) and self.load.now() < deadline:
                        await asyncio.sleep(self.poll_s)
                    await asyncio.sleep(settle_s)
                finally:
                    monitor.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await monitor
            return self.report(duration_s, settle_s)
        finally:
            await self._client.close()

    async def _inject_all(self, faults: Sequence[Fault], duration_s: float) -> None:
        assert self.load is not None
        for fault in sorted(faults, key=lambda f: f.at_s):
            await asyncio.sleep(max(0.0, fault.at_s - self.load.now()))
            rec = FaultRecord(fault.kind, round(self.load.now(), 3), recovery=fault.recovery)
            ctx = rec.ctx = FaultContext(self.deployment, json.loads(json.dumps(self.status)))
            try:
                rec.target = await fault.inject(ctx)
            except Skip as why:
                rec.skipped = str(why) or "nothing to hit"
            rec.injected_at_s = self.load.now()
            self.records.append(rec)
        await asyncio.sleep(max(0.0, duration_s - self.load.now()))

    async def _monitor(self) -> None:
        assert self.load is not None
        while True:
            asked = self.load.now()
            try:
                status = await self.refresh()
            except ShoalError:
                status = {}  # the head is away (restarting, partitioned): try again
            if status:
                self._judge(status, asked, self.load.now())
            await asyncio.sleep(self.poll_s)

    def _judge(self, status: Mapping[str, Any], asked: float, now: float) -> None:
        """Mark the faults whose recovery holds in ``status`` (asked for at ``asked``, seen at ``now``)."""
        # Replacements are fungible: the n-th replica that became READY during the run (in
        # order of readiness) answers the n-th "replacement" fault, whichever kill the head
        # started it for.
        kills = [r for r in self.records if r.recovery == REPLACEMENT and not r.skipped]
        fresh = sorted((t, rid) for rid, t in self._first_ready.items() if rid not in self._initial)
        for rec, (t, rid) in zip(kills, fresh, strict=False):
            if rec.pending:
                rec.recovered_at_s = round(max(t, rec.at_s), 3)
                rec.replacement = rid
        for rec in list(self.records):
            if not rec.pending or rec.ctx is None or asked < rec.injected_at_s:
                continue
            if rec.recovery == CONVERGED:
                if converged(status, self.deployment):
                    rec.recovered_at_s = round(now, 3)
            elif callable(rec.recovery) and rec.recovery(status, rec.ctx):
                rec.recovered_at_s = round(now, 3)

    # ------------------------------------------------------------ report

    def report(self, duration_s: float, settle_s: float) -> dict[str, Any]:
        assert self.load is not None
        samples = self.load.samples
        end = max((s.at for s in samples), default=0.0)
        windows = [
            (r.at_s, r.recovered_at_s if r.recovered_at_s is not None else end)
            for r in self.records
            if not r.skipped
        ]

        def within(s: Sample, lo: float, hi: float) -> bool:
            return lo <= s.at <= hi

        first = min((w[0] for w in windows), default=end)
        last = max((w[1] for w in windows), default=end)
        during = [s for s in samples if any(within(s, lo, hi) for lo, hi in windows)]
        before = [s for s in samples if s.at < first]
        after = [s for s in samples if s.at > last]
        errors = Counter(s.error for s in samples if s.error is not None)
        elapsed = max(end, 1e-9)
        faults = []
        for r in self.records:
            lo, hi = r.at_s, r.recovered_at_s if r.recovered_at_s is not None else end
            stats = latency_stats([s for s in samples if within(s, lo, hi)]) if not r.skipped else {}
            faults.append(
                {
                    "kind": r.kind,
                    "at_s": r.at_s,
                    "target": r.target,
                    "recovered_s": r.recovered_s,
                    "replacement": r.replacement or None,
                    "skipped": r.skipped or None,
                    "requests_during": stats.get("requests", 0),
                    "failed_during": stats.get("failed", 0),
                    "p99_during_ms": stats.get("p99_ms"),
                }
            )
        by_kind: dict[str, dict[str, Any]] = {}
        for kind in dict.fromkeys(r.kind for r in self.records):
            recs = [r for r in self.records if r.kind == kind and not r.skipped]
            times = [r.recovered_s for r in recs if r.recovered_s is not None]
            kind_samples = [
                s
                for s in samples
                if any(
                    within(s, r.at_s, r.recovered_at_s if r.recovered_at_s is not None else end) for r in recs
                )
            ]
            by_kind[kind] = {
                "injected": len(recs),
                "skipped": sum(1 for r in self.records if r.kind == kind and r.skipped),
                "recovered": len(times),
                "recovery_s": {
                    "median": round(float(np.median(times)), 3) if times else None,
                    "max": max(times) if times else None,
                },
                **latency_stats(kind_samples),
            }
        return {
            "deployment": self.deployment,
            "address": self.address,
            "concurrency": self.concurrency,
            "rate": self.rate or None,
            "duration_s": duration_s,
            "settle_s": settle_s,
            "elapsed_s": round(end, 3),
            "requests": len(samples),
            "ok": len(samples) - sum(errors.values()),
            "failed": sum(errors.values()),
            "errors_by_kind": dict(sorted(errors.items())),
            "error_examples": dict(sorted(self.load.examples.items())),
            "failures": [
                {
                    "at_s": round(s.at, 3),
                    "latency_s": round(s.latency_s, 3),
                    "error": s.error,
                    "request_id": s.request_id,
                }
                for s in samples
                if s.error is not None
            ][:50],
            "throughput_rps": round(len(samples) / elapsed, 1),
            "latency_ms": {
                "before": latency_stats(before),
                "during": latency_stats(during),
                "after": latency_stats(after),
                "all": latency_stats(samples),
            },
            "by_kind": by_kind,
            "faults": faults,
            "unrecovered": sum(1 for r in self.records if r.pending),
            "replicas": self.timeline,
        }

    # ------------------------------------------------------------ the built-in faults

    def kill_replica(self, at_s: float) -> Fault:
        """``kill -9`` a random READY replica of the deployment that runs on this machine."""

        async def inject(ctx: FaultContext) -> str:
            try:
                status = await self.refresh()
            except ShoalError:
                status = self.status
            ctx.before = json.loads(json.dumps(status))
            dep = deployment_of(status, self.deployment)
            local = [
                r
                for r in (dep["replicas"] if dep else [])
                if r["state"] == "READY" and local_replica(r["pid"], r["id"])
            ]
            if not local:
                raise Skip("no READY replica of the deployment runs on this machine")
            victim = self.rng.choice(local)
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim["pid"], signal.SIGKILL)
            return f"{victim['id']} (pid {victim['pid']})"

        return Fault("kill_replica", at_s, inject, recovery=REPLACEMENT)

    def kill_scheduler(self, at_s: float, scheduler_id: str = "") -> Fault:
        """``kill -9`` a scheduler running on this machine; recovered once the head has
        marked it DEAD and the deployment is whole again elsewhere."""

        async def inject(ctx: FaultContext) -> str:
            status = self.status
            candidates = [
                s
                for s in status.get("schedulers", [])
                if s["state"] == "ALIVE"
                and s["address"] != self.address
                and (not scheduler_id or s["id"] == scheduler_id)
                and local_scheduler(s["pid"])
            ]
            if not candidates:
                which = f"scheduler {scheduler_id}" if scheduler_id else "live scheduler"
                raise Skip(f"no {which} other than the load's target runs on this machine")
            victim = self.rng.choice(candidates)
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim["pid"], signal.SIGKILL)
            ctx.data["scheduler"] = victim["id"]
            return f"{victim['id']} (pid {victim['pid']})"

        def recovered(status: Mapping[str, Any], ctx: FaultContext) -> bool:
            gone = {s["id"]: s["state"] for s in status["schedulers"]}.get(ctx.data.get("scheduler", ""))
            return gone in (None, "DEAD") and converged(status, self.deployment)

        return Fault("kill_scheduler", at_s, inject, recovery=recovered)

    def restart_head(self, at_s: float, restart: Callable[[], Awaitable[str]]) -> Fault:
        """Restart the head with ``restart`` (which kills and starts it); recovered once the
        new head reports the deployment whole."""

        async def inject(ctx: FaultContext) -> str:
            return await restart()

        def recovered(status: Mapping[str, Any], ctx: FaultContext) -> bool:
            return converged(status, self.deployment)

        return Fault("restart_head", at_s, inject, recovery=recovered)


def head_restarter(head_address: str, cmd: str, pid: int, log_path: Path) -> Callable[[], Awaitable[str]]:
    """Kill the head process ``pid`` with SIGKILL, wait for it to go, then run ``cmd`` (a shell
    command, detached, its output appended to ``log_path``)."""

    async def restart() -> str:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(pid) and time.monotonic() < deadline:
            with contextlib.suppress(psutil.NoSuchProcess):
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            await asyncio.sleep(0.02)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                shell=True,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        return f"head pid {pid} killed; restarted as pid {proc.pid}: {cmd}"

    return restart


# ---------------------------------------------------------------- rendering


def render(doc: Mapping[str, Any]) -> str:
    """The human table."""

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}s"

    load = f"rate {doc['rate']:g}/s" if doc["rate"] else "closed loop"
    lines = [
        f"shoal chaos: {doc['deployment']} via {doc['address']}, {doc['concurrency']} callers ({load}), "
        f"{doc['duration_s']:g}s of faults, {doc['elapsed_s']:.1f}s in all",
        f"requests  {doc['requests']}  failed {doc['failed']}  ({doc['throughput_rps']:.0f} req/s)",
    ]
    for kind, n in doc["errors_by_kind"].items():
        lines.append(f"  {kind}: {n}  e.g. {doc['error_examples'].get(kind, '')[:120]}")
    lat = doc["latency_ms"]
    lines.append("")
    rows = [["latency", "requests", "failed", "p50 ms", "p99 ms", "max ms"]]
    for phase in ("before", "during", "after"):
        p = lat[phase]
        rows.append(
            [phase, str(p["requests"]), str(p["failed"]), ms(p["p50_ms"]), ms(p["p99_ms"]), ms(p["max_ms"])]
        )
    lines += _table(rows)
    if doc["by_kind"]:
        lines.append("")
        rows = [
            [
                "fault",
                "injected",
                "recovered",
                "recovery median",
                "recovery max",
                "requests",
                "failed",
                "p99 ms",
            ]
        ]
        for kind, k in doc["by_kind"].items():
            rows.append(
                [
                    kind,
                    str(k["injected"]) + (f" (+{k['skipped']} skipped)" if k["skipped"] else ""),
                    str(k["recovered"]),
                    s(k["recovery_s"]["median"]),
                    s(k["recovery_s"]["max"]),
                    str(k["requests"]),
                    str(k["failed"]),
                    ms(k["p99_ms"]),
                ]
            )
        lines += _table(rows)
        lines.append("")
        rows = [["at", "fault", "target", "recovered in", "requests", "failed", "p99 ms"]]
        for f in doc["faults"]:
            rows.append(
                [
                    f"{f['at_s']:.1f}s",
                    f["kind"],
                    f"skipped: {f['skipped']}" if f["skipped"] else f["target"],
                    s(f["recovered_s"]),
                    str(f["requests_during"]),
                    str(f["failed_during"]),
                    ms(f["p99_during_ms"]),
                ]
            )
        lines += _table(rows)
    if doc["unrecovered"]:
        lines.append(f"\n{doc['unrecovered']} fault(s) did not recover in time")
    return "\n".join(lines)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


# ---------------------------------------------------------------- command


def cmd_chaos(args: argparse.Namespace) -> int:
    """Run what the parsed ``args`` describe; prints the report."""
    if args.duration <= 0:
        raise InvalidArgument(f"--duration must be > 0, got {args.duration}")
    if args.kill_replicas_every is not None and args.kill_replicas_every <= 0:
        raise InvalidArgument(f"--kill-replicas-every must be > 0, got {args.kill_replicas_every}")
    if args.concurrency < 1:
        raise InvalidArgument("--concurrency must be >= 1")
    if args.restart_head is not None and not args.head_restart_cmd:
        raise InvalidArgument(
            "--restart-head needs --head-restart-cmd: the command that starts the head again "
            "(shoal chaos cannot know how it was started)"
        )
    if args.scheduler and args.kill_scheduler is None:
        raise InvalidArgument("--scheduler names the victim of --kill-scheduler")
    settings = Settings.load(flags={"head_address": args.head})
    address = args.url or ""
    for prefix in ("grpc://", "http://"):
        address = address.removeprefix(prefix)
    chaos = Chaos(
        settings.head_address,
        args.name,
        settings,
        address=address,
        avoid=[args.scheduler] if args.scheduler else [],
        concurrency=args.concurrency,
        rate=args.rate or 0.0,
        timeout_s=args.timeout,
        seed=args.seed,
    )
    faults: list[Fault] = []
    if args.kill_replicas_every:
        t = args.kill_replicas_every
        while t <= args.duration + 1e-9:
            faults.append(chaos.kill_replica(round(t, 3)))
            t += args.kill_replicas_every
    if args.kill_scheduler is not None:
        faults.append(chaos.kill_scheduler(args.kill_scheduler, args.scheduler or ""))
    if args.restart_head is not None:
        pid = args.head_pid or find_head_pid(settings.head_address)
        if not pid:
            raise FailedPrecondition(
                f"no process on this machine listens on the head's port ({settings.head_address}); "
                "give its pid with --head-pid"
            )
        faults.append(
            chaos.restart_head(
                args.restart_head,
                head_restarter(settings.head_address, args.head_restart_cmd, pid, Path(args.head_log)),
            )
        )

    async def go() -> dict[str, Any]:
        try:
            return await chaos.run(
                faults,
                duration_s=args.duration,
                settle_s=args.settle,
                recover_timeout_s=args.recover_timeout,
            )
        except Unavailable as err:
            raise Unavailable(
                f"cannot reach the head at {settings.head_address} ({err}); point --head / SHOAL_HEAD at it"
            ) from None

    doc = asyncio.run(go())
    print(json.dumps(doc, indent=2) if args.json else render(doc), flush=True)
    if args.max_failed is not None and doc["failed"] > args.max_failed:
        print(
            f"shoal chaos: {doc['failed']} request(s) failed (allowed: {args.max_failed})",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return 0


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="deployment to load")
    p.add_argument("--url", help="send requests to this scheduler's gRPC ingress (default: a live one)")
    p.add_argument("-c", "--concurrency", type=int, default=8, help="callers in flight (default 8)")
    p.add_argument("--rate", type=float, help="pace the callers to this many requests a second in total")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    p.add_argument(
        "-d", "--duration", type=float, default=30.0, help="seconds of fault injection (default 30)"
    )
    p.add_argument("--settle", type=float, default=5.0, help="seconds of load after recovery (default 5)")
    p.add_argument(
        "--recover-timeout", type=float, default=60.0, help="longest wait for faults to recover (default 60)"
    )
    p.add_argument(
        "--kill-replicas-every", type=float, metavar="S", help="kill -9 a random replica every S s"
    )
    p.add_argument("--kill-scheduler", type=float, metavar="AT", help="kill -9 a scheduler AT s into the run")
    p.add_argument("--scheduler", metavar="ID", help="the scheduler --kill-scheduler kills (default: random)")
    p.add_argument("--restart-head", type=float, metavar="AT", help="kill -9 and restart the head AT s in")
    p.add_argument("--head-restart-cmd", metavar="CMD", help="shell command that starts the head again")
    p.add_argument("--head-pid", type=int, help="the head's pid (default: found by its port)")
    p.add_argument(
        "--head-log", default="shoal-chaos-head.log", help="where the restarted head's output goes"
    )
    p.add_argument("--seed", type=int, help="seed for picking victims")
    p.add_argument("--max-failed", type=int, help="exit 1 when more requests than this failed")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``chaos`` on shoal's CLI; ``--head`` comes from the CLI's global options."""
    p = sub.add_parser("chaos", help="load a deployment while killing replicas, schedulers or the head")
    _add_options(p)
    p.set_defaults(fn=cmd_chaos)


def main(argv: Sequence[str] | None = None) -> None:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="python -m shoal.chaos",
        description=doc.split("\n")[0],
        epilog=doc.split("\n\n", 2)[-1] if doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--head", help="the head's gRPC address (default $SHOAL_HEAD or localhost:8470)")
    _add_options(parser)
    args = parser.parse_args(argv)
    try:
        code = cmd_chaos(args)
    except ShoalError as err:
        print(f"shoal: error: {err}", file=sys.stderr)
        code = EXIT_ERROR
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()

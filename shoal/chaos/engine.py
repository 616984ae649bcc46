"""The engine: :class:`Chaos` loads one deployment while it injects faults on a schedule,
follows the head's status, and marks each fault recovered when its recovery holds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from shoal.chaos.faults import (
    CONVERGED,
    REPLACEMENT,
    Fault,
    FaultContext,
    FaultRecord,
    Skip,
    converged,
    deployment_of,
)
from shoal.chaos.load import Load, inputs_for
from shoal.chaos.processes import listening_pids, local_replica, local_scheduler
from shoal.chaos.report import summarize
from shoal.config import Settings
from shoal.core.tasks import cancel_and_wait
from shoal.errors import NotFound, ShoalError, Unavailable
from shoal.types import Arrays


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

        status: dict[str, Any] = (await self._client.status()).to_json()
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
                    await cancel_and_wait(monitor)
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

    def report(self, duration_s: float, settle_s: float) -> dict[str, Any]:
        """The run's report (see :func:`shoal.chaos.report.summarize`)."""
        assert self.load is not None
        return summarize(self, duration_s, settle_s)

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
            # The load's target: the scheduler registered at its address, or (an inference
            # port: the registered one is the control port) the one listening on its port.
            target = await asyncio.to_thread(listening_pids, self.address)
            candidates = [
                s
                for s in status.get("schedulers", [])
                if s["state"] == "ALIVE"
                and s["address"] != self.address
                and s["pid"] not in target
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

"""Whether a deploy is done: the decision ``shoal deploy`` and ``shoal.api`` wait on, over
plain status dicts (the shape of ``shoal status --json``), so it is tested without a cluster.

It waits until the replicas of the new spec are READY (and, with ``min_ready_s``, have stayed
READY that long, as Kubernetes' ``minReadySeconds``), or until the head's answer is that they
will not be (no room, replicas that fail to start or crash soon after READY, FAILED). With
``serve_revisions`` N the replicas of the N-1 earlier revisions the head keeps serving beside
the new one are not waited for: they stay, by design.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shoal.core.cluster import FAILED
from shoal.core.spec import DeploymentSpec, parse_spec
from shoal.errors import ShoalError

Status = Mapping[str, Any]

# The head's pending reasons that are answers rather than waits (shoal/core/placement.py and
# shoal/core/cluster.py write them; tests/unit/test_cli.py checks they still match), and FAILED
# (shoal/core/cluster.py: replicas that kept dying before READY).
NO_ROOM = re.compile(r"^(no scheduler has room|no scheduler is big enough|no live scheduler)")
TOO_BIG = "no scheduler is big enough"  # no capacity could ever hold one replica: freeing room cannot help
START_FAILURES = re.compile(r"^(\d+) replica start failure\(s\), retrying in \d+s: (.*)$", re.S)
STILL_MOVING = "draining one old replica first"

FAIL_AFTER = 2
"""Start failures in a row after which a deploy is failed: one may be chance, two are the model."""
CONFIRM_S = 1.0
"""How long "no room" or FAILED must hold before it is the answer: the head's reason may predate
the apply by up to one reconcile pass (it reconciles at once on an apply)."""


@dataclass(frozen=True)
class Verdict:
    line: str  # one line of progress over every watched deployment
    done: bool = False
    failure: str = ""  # why the deploy failed, one paragraph; "" while it may still succeed
    dead: tuple[str, ...] = ()  # new replicas seen that are gone, most recent first: their logs say why
    # Deployments whose failure the head answers by itself, for an update, with a rollback: their
    # replicas fail to start (or are FAILED), or the spec at the head is another one already.
    # Not a deletion, nor no room: nothing rolls those back.
    rolls_back: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The line without its countdowns: what counts as a change worth a new line in a log."""
        return re.sub(r"\d+(\.\d+)?s\b", "Ns", self.line)


@dataclass
class _Watched:
    name: str
    old_replicas: frozenset[str]  # replicas of the previous process: a rollout ends when they are gone
    failures_before: int  # start failures the head counted before the apply
    failures_seen: int = -1  # the count last seen; -1 before the first look
    fresh_failures: int = 0  # rises of that count seen since the apply
    settled_since: float | None = None  # since when the head's reason has been an answer
    seen: dict[str, None] = field(default_factory=dict)  # new replicas seen, in order (a set that keeps it)
    want_hash: str = ""  # the process hash of the spec deployed: another one at the head ends the watch
    since: float = 0.0  # the newest event time (the head's clock) before the apply
    # Spec hashes of the earlier revisions the head keeps serving (``serve_revisions``): their
    # replicas, those replaced since too, are neither new nor old, and no rollout waits for them.
    kept: frozenset[str] = frozenset()
    kept_ids: set[str] = field(default_factory=set)  # replicas of those seen: not new ones that died
    ready_since: dict[str, float] = field(default_factory=dict)  # new replicas READY, since when (seen)


@dataclass
class DeployWatch:
    """Follows deployments just applied and says when they are done, or failed.

    Built from the status before the apply, so replicas of an older spec are not taken for
    new ones, and failures counted before are not taken for new ones either.
    """

    watched: list[_Watched] = field(default_factory=list)
    # How long each new replica must have been seen READY before the deploy is done: a model
    # that crashes soon after loading then fails the deploy (the head backs it off) instead
    # of passing it. 0: done as soon as they are READY.
    min_ready_s: float = 0.0

    @classmethod
    def after_apply(
        cls,
        before: Status,
        specs: Sequence[DeploymentSpec],
        *,
        from_file: bool = True,
        min_ready_s: float = 0.0,
    ) -> DeployWatch:
        """``from_file``: the specs come from files, whose restart count the head replaces with
        its own (``shoal restart``); False for the head's own specs (restart, rollback)."""
        old = {d["name"]: d for d in before.get("deployments", [])}
        since = max((e.get("at", 0.0) for e in before.get("events", [])), default=0.0)
        watched = []
        for spec in specs:
            dep = old.get(spec.name)
            replicas: frozenset[str] = frozenset()
            kept: frozenset[str] = frozenset()
            failures = 0
            want = spec.process_hash()
            if dep is not None:
                if from_file:
                    want = _as_the_head_keeps(spec, dep["spec"]).process_hash()
                if _process_hash(dep["spec"]) != want:
                    # Replicas already of the wanted spec (a rollback to them) are not old.
                    replicas = frozenset(r["id"] for r in dep["replicas"] if r.get("spec_hash") != want)
                failures = _start_failures(dep["pending_reason"])[0]
                kept = _kept_revisions(dep, spec, want)
            watched.append(_Watched(spec.name, replicas, failures, want_hash=want, since=since, kept=kept))
        return cls(watched, min_ready_s=min_ready_s)

    def observe(self, status: Status, now: float) -> Verdict:
        deployments = {d["name"]: d for d in status.get("deployments", [])}
        parts: list[str] = []
        failures: list[str] = []
        dead: list[str] = []
        rolls_back: list[str] = []
        done = True
        for w in self.watched:
            dep = deployments.get(w.name)
            if dep is None:
                parts.append(f"{w.name} deleted")
                failures.append(f"deployment {w.name} was deleted while it was being deployed")
                done = False
                continue
            # Replicas of the earlier revisions kept serving stay: counted apart, never waited for.
            kept = [r for r in dep["replicas"] if w.kept and r.get("spec_hash") in w.kept]
            w.kept_ids.update(r["id"] for r in kept)
            replicas = [r for r in dep["replicas"] if r["id"] not in w.kept_ids]
            now_ids = {r["id"] for r in replicas}
            w.seen.update((i, None) for i in sorted(now_ids - w.old_replicas))
            # A replica that dies within milliseconds (forked from the scheduler's zygote, it
            # imports nothing) can come and go between two looks: the status's events name it.
            w.seen.update(
                (e["replica_id"], None)
                for e in status.get("events", [])
                if e.get("kind") == "replica_died"
                and e.get("deployment") == w.name
                and e.get("replica_id")
                and e["replica_id"] not in w.old_replicas
                and e["replica_id"] not in w.kept_ids
                and e.get("at", 0.0) > w.since
            )
            dead.extend(reversed([i for i in w.seen if i not in now_ids]))
            target = dep["target_replicas"]
            ready_ids = [r["id"] for r in replicas if r["state"] == "READY" and r["id"] not in w.old_replicas]
            w.ready_since = {i: w.ready_since.get(i, now) for i in ready_ids}
            ready = len(ready_ids)
            left = sum(1 for r in replicas if r["id"] in w.old_replicas)
            hold = max((self.min_ready_s - (now - t) for t in w.ready_since.values()), default=0.0)
            done = done and ready >= target and len(replicas) == target and not left and hold <= 0
            reason = dep["pending_reason"]
            # Replicas of this spec on their way out (a lower count): neither new nor old.
            draining = sum(1 for r in replicas if r["state"] == "DRAINING" and r["id"] not in w.old_replicas)
            starting = len(replicas) - ready - left - draining
            more = (
                (f", {starting} starting" if starting else "")
                + (f", {draining} draining" if draining else "")
                + (f", {left} old" if left else "")
                + (f", {_kept_serving(kept)}" if kept else "")
                + (f", to stay READY {hold:.0f}s more" if hold > 0 else "")
            )
            parts.append(f"{w.name} {ready}/{target} ready{more}" + (f" ({reason})" if reason else ""))
            failure, failing = self._failure(w, reason, now)
            if failure:
                failures.append(failure)
                if failing:
                    rolls_back.append(w.name)
            elif w.want_hash and dep["spec"] and _process_hash(dep["spec"]) not in ("", w.want_hash):
                failures.append(
                    f"deployment {w.name} now runs another spec than the one deployed "
                    "(rolled back, or deployed again meanwhile)"
                )
                rolls_back.append(w.name)
        line = ", ".join(parts)
        if done:
            return Verdict(line, done=True)
        return Verdict(line, failure="\n".join(failures), dead=tuple(dead), rolls_back=tuple(rolls_back))

    def _failure(self, w: _Watched, reason: str, now: float) -> tuple[str, bool]:
        """Why the deploy of ``w`` failed ("" while it may still succeed), and whether its
        replicas fail (what the head answers with a rollback) rather than find no room."""
        count, message = _start_failures(reason)
        if count != w.failures_seen:
            if count > (w.failures_before if w.failures_seen < 0 else w.failures_seen):
                w.fresh_failures += 1
            w.failures_seen = count
        if w.fresh_failures and count >= FAIL_AFTER:
            return (
                f"deployment {w.name} failed: its replicas fail to start ({count} times in a row): {message}",
                True,
            )
        settled = ""
        if reason.startswith(FAILED):
            settled = f"deployment {w.name} failed: {_LOG_PREFIX.sub('', reason.removeprefix(FAILED))}"
        elif reason.startswith(TOO_BIG) and STILL_MOVING not in reason:
            settled = (
                f"deployment {w.name} cannot be placed: {reason}. Freeing room cannot help: lower its "
                "resources in the spec and deploy again, or add a scheduler big enough (it stays pending "
                f"until one joins); 'shoal delete {w.name}' removes it"
            )
        elif NO_ROOM.match(reason) and STILL_MOVING not in reason:
            settled = (
                f"deployment {w.name} cannot be placed: {reason}. It stays pending and is placed "
                f"when room appears (free some, or add a scheduler); 'shoal delete {w.name}' removes it"
            )
        if not settled:
            w.settled_since = None
            return "", False
        if w.settled_since is None:
            w.settled_since = now
        return (settled, reason.startswith(FAILED)) if now - w.settled_since >= CONFIRM_S else ("", False)


def _kept_revisions(dep: Status, spec: DeploymentSpec, want: str) -> frozenset[str]:
    """The spec hashes of the earlier revisions whose replicas the head keeps serving beside
    ``spec`` (process hash ``want``), from ``dep``, the deployment's status before the apply.

    The head's choice (``HeadNode._retained``, docs/operations.md "Versions"): of its
    revisions, newest first, up to ``serve_revisions - 1`` that did not fail, each spec once
    (restarts aside), none of the current spec's. Seen from a status: the spec current before
    the apply first, unless it failed (FAILED) or is ``spec`` but for its restart count (a
    restart replaces it); then the specs of the other replicas, by their revision, newest
    first. A replica of revision 0 runs no revision the head keeps; a DRAINING one is going.
    """
    slots = spec.serve_revisions - 1
    if slots <= 0:
        return frozenset()
    out: list[str] = []
    identity = _identity(spec)
    before = _parsed(dep.get("spec") or {})
    current = before.process_hash() if before is not None else ""
    if (
        before is not None
        and current != want
        and _identity(before) != identity
        and not str(dep.get("pending_reason", "")).startswith(FAILED)
    ):
        out.append(current)
    newest: dict[str, int] = {}
    for r in dep.get("replicas", []):
        h, number = r.get("spec_hash") or "", r.get("revision") or 0
        if h and h not in (want, current) and number > 0 and r.get("state") != "DRAINING":
            newest[h] = max(number, newest.get(h, 0))
    out += sorted(newest, key=lambda h: -newest[h])
    return frozenset(out[:slots])


def _kept_serving(kept: Sequence[Status]) -> str:
    """``1 of revision 1 kept serving``, ``4 of revisions 1 and 2 kept serving``."""
    numbers = sorted({r.get("revision") or 0 for r in kept} - {0})
    if not numbers:
        return f"{len(kept)} of earlier revisions kept serving"
    named = ", ".join(map(str, numbers[:-1])) + " and " if len(numbers) > 1 else ""
    plural = "s" if len(numbers) > 1 else ""
    return f"{len(kept)} of revision{plural} {named}{numbers[-1]} kept serving"


def _as_the_head_keeps(spec: DeploymentSpec, head_doc: Mapping[str, Any]) -> DeploymentSpec:
    """``spec`` with the head's restart count, as the head stores it on apply."""
    restarts = head_doc.get("restarts", 0)
    if isinstance(restarts, int) and not isinstance(restarts, bool) and restarts >= 0:
        return spec.model_copy(update={"restarts": restarts})
    return spec


def _process_hash(doc: Mapping[str, Any]) -> str:
    """The process hash of a spec the head shows; "" for one this CLI cannot read (then its
    replicas count as the previous revision's)."""
    parsed = _parsed(doc)
    return parsed.process_hash() if parsed is not None else ""


def _parsed(doc: Mapping[str, Any]) -> DeploymentSpec | None:
    """A spec the head shows; None for one this CLI cannot read."""
    try:
        return parse_spec(dict(doc))
    except ShoalError:
        return None


def _identity(spec: DeploymentSpec) -> str:
    """What makes two revisions the same for the head's choice of those kept: the process
    hash, restarts aside (``shoal.head.node._identity``)."""
    return spec.model_copy(update={"restarts": 0}).process_hash()


# A replica's log line quoted in a reason: the message is enough, without time, replica and logger.
_LOG_PREFIX = re.compile(r"\d\d:\d\d:\d\d replica \S+ [A-Z]+ [\w.]+: ")


def _start_failures(reason: str) -> tuple[int, str]:
    m = START_FAILURES.match(reason)
    return (int(m.group(1)), _LOG_PREFIX.sub("", m.group(2))) if m else (0, "")

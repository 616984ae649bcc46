"""``shoal deploy`` and how it waits: until the replicas of the new spec are READY, or until
the head's answer is that they will not be (no room, replicas that fail to start).

``DeployWatch`` is the decision, over plain status dicts (the shape of ``shoal status
--json``), so it is tested without a cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shoal.cli.common import EXIT_ERROR, ProgressLine, add_client_flags, with_client
from shoal.cli.model_hash import with_model_hash
from shoal.config import Settings
from shoal.core import traffic, triton_repo
from shoal.core.cluster import FAILED
from shoal.core.spec import DeploymentSpec, parse_spec
from shoal.core.traffic import TrafficRoute
from shoal.decorator import is_target, load_target
from shoal.errors import InvalidArgument, ShoalError

Status = Mapping[str, Any]

# The head's pending reasons that are answers rather than waits (shoal/core/placement.py and
# shoal/core/cluster.py write them; tests/unit/test_cli.py checks they still match), and FAILED
# (shoal/core/cluster.py: replicas that kept dying before READY).
NO_ROOM = re.compile(r"^(no scheduler has room|no live scheduler)")
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


@dataclass
class DeployWatch:
    """Follows deployments just applied and says when they are done, or failed.

    Built from the status before the apply, so replicas of an older spec are not taken for
    new ones, and failures counted before are not taken for new ones either.
    """

    watched: list[_Watched] = field(default_factory=list)

    @classmethod
    def after_apply(
        cls, before: Status, specs: Sequence[DeploymentSpec], *, from_file: bool = True
    ) -> DeployWatch:
        """``from_file``: the specs come from files, whose restart count the head replaces with
        its own (``shoal restart``); False for the head's own specs (restart, rollback)."""
        old = {d["name"]: d for d in before.get("deployments", [])}
        watched = []
        for spec in specs:
            dep = old.get(spec.name)
            replicas: frozenset[str] = frozenset()
            failures = 0
            want = spec.process_hash()
            if dep is not None:
                if from_file:
                    want = _as_the_head_keeps(spec, dep["spec"]).process_hash()
                if _process_hash(dep["spec"]) != want:
                    # Replicas already of the wanted spec (a rollback to them) are not old.
                    replicas = frozenset(r["id"] for r in dep["replicas"] if r.get("spec_hash") != want)
                failures = _start_failures(dep["pending_reason"])[0]
            watched.append(_Watched(spec.name, replicas, failures, want_hash=want))
        return cls(watched)

    def observe(self, status: Status, now: float) -> Verdict:
        deployments = {d["name"]: d for d in status.get("deployments", [])}
        parts: list[str] = []
        failures: list[str] = []
        dead: list[str] = []
        done = True
        for w in self.watched:
            dep = deployments.get(w.name)
            if dep is None:
                parts.append(f"{w.name} deleted")
                failures.append(f"deployment {w.name} was deleted while it was being deployed")
                continue
            replicas = dep["replicas"]
            now_ids = {r["id"] for r in replicas}
            w.seen.update((i, None) for i in sorted(now_ids - w.old_replicas))
            dead.extend(reversed([i for i in w.seen if i not in now_ids]))
            target = dep["target_replicas"]
            ready = sum(1 for r in replicas if r["state"] == "READY" and r["id"] not in w.old_replicas)
            left = sum(1 for r in replicas if r["id"] in w.old_replicas)
            done = done and ready >= target and len(replicas) == target and not left
            reason = dep["pending_reason"]
            starting = len(replicas) - ready - left
            more = (f", {starting} starting" if starting else "") + (f", {left} old" if left else "")
            parts.append(f"{w.name} {ready}/{target} ready{more}" + (f" ({reason})" if reason else ""))
            failure = self._failure(w, reason, now)
            if failure:
                failures.append(failure)
            elif w.want_hash and dep["spec"] and _process_hash(dep["spec"]) not in ("", w.want_hash):
                failures.append(
                    f"deployment {w.name} now runs another spec than the one deployed "
                    "(rolled back, or deployed again meanwhile)"
                )
        line = ", ".join(parts)
        if done:
            return Verdict(line, done=True)
        return Verdict(line, failure="\n".join(failures), dead=tuple(dead))

    def _failure(self, w: _Watched, reason: str, now: float) -> str:
        count, message = _start_failures(reason)
        if count != w.failures_seen:
            if count > (w.failures_before if w.failures_seen < 0 else w.failures_seen):
                w.fresh_failures += 1
            w.failures_seen = count
        if w.fresh_failures and count >= FAIL_AFTER:
            return (
                f"deployment {w.name} failed: its replicas fail to start ({count} times in a row): {message}"
            )
        settled = ""
        if reason.startswith(FAILED):
            settled = f"deployment {w.name} failed: {_LOG_PREFIX.sub('', reason.removeprefix(FAILED))}"
        elif NO_ROOM.match(reason) and STILL_MOVING not in reason:
            settled = (
                f"deployment {w.name} cannot be placed: {reason}. It stays pending and is placed "
                f"when room appears (free some, or add a scheduler); 'shoal delete {w.name}' removes it"
            )
        if not settled:
            w.settled_since = None
            return ""
        if w.settled_since is None:
            w.settled_since = now
        return settled if now - w.settled_since >= CONFIRM_S else ""


def _as_the_head_keeps(spec: DeploymentSpec, head_doc: Mapping[str, Any]) -> DeploymentSpec:
    """``spec`` with the head's restart count, as the head stores it on apply."""
    restarts = head_doc.get("restarts", 0)
    if isinstance(restarts, int) and not isinstance(restarts, bool) and restarts >= 0:
        return spec.model_copy(update={"restarts": restarts})
    return spec


def _process_hash(doc: Mapping[str, Any]) -> str:
    """The process hash of a spec the head shows; "" for one this CLI cannot read (then its
    replicas count as the previous revision's)."""
    try:
        return parse_spec(dict(doc)).process_hash()
    except ShoalError:
        return ""


# A replica's log line quoted in a reason: the message is enough, without time, replica and logger.
_LOG_PREFIX = re.compile(r"\d\d:\d\d:\d\d replica \S+ [A-Z]+ [\w.]+: ")


def _start_failures(reason: str) -> tuple[int, str]:
    m = START_FAILURES.match(reason)
    return (int(m.group(1)), _LOG_PREFIX.sub("", m.group(2))) if m else (0, "")


async def wait_for(
    read_status: Callable[[], Awaitable[Status]],
    watch: DeployWatch,
    timeout_s: float,
    line: ProgressLine | None = None,
    poll_s: float = 0.25,
    ready: str = "ready",
) -> tuple[int, Verdict]:
    """Poll ``read_status`` until ``watch`` says done or failed, or ``timeout_s`` passes.

    Returns the exit code and the last verdict; prints progress on ``line``, a new line only
    when something other than a countdown changed.
    """
    line = line or ProgressLine()
    start = time.monotonic()
    last = ""
    while True:
        verdict = watch.observe(await read_status(), time.monotonic())
        if verdict.key != last:
            line.show(verdict.line)
            last = verdict.key
        if verdict.done:
            line.end()
            print(f"{ready} after {time.monotonic() - start:.1f}s: {verdict.line}", flush=True)
            return 0, verdict
        error = verdict.failure
        if not error and time.monotonic() - start > timeout_s:
            error = f"not ready after {timeout_s:g}s: {verdict.line}"
        if error:
            line.end()
            print(f"shoal: error: {error}", file=sys.stderr, flush=True)
            return EXIT_ERROR, verdict
        await asyncio.sleep(poll_s)


async def _print_last_words(client: Any, replicas: Sequence[str]) -> None:
    """The end of the log of the most recent replica that died: its traceback, when it has one."""
    for rid in replicas:
        try:
            text = b"".join([c async for c in client.read_log(rid, tail_bytes=16384)]).decode(
                errors="replace"
            )
        except ShoalError:
            continue
        lines = text.rstrip().splitlines()
        if not lines:
            continue
        print(f"the end of replica {rid}'s log (shoal logs {rid}):", file=sys.stderr)
        for ln in traceback_excerpt(lines):
            print(f"  {ln}", file=sys.stderr)
        return


_TRACEBACK = "Traceback (most recent call last)"
_CHAINED = ("The above exception was the direct cause", "During handling of the above exception")


def traceback_excerpt(lines: Sequence[str], most: int = 20) -> list[str]:
    """The root cause of the last traceback in ``lines`` (where a chain of tracebacks starts: the
    model's own frames, not shoal's that wrapped its error), at most ``most`` lines of it;
    else the last few lines."""
    starts = [i for i, ln in enumerate(lines) if ln.lstrip().startswith(_TRACEBACK)]
    if not starts:
        return list(lines[-8:])
    k = len(starts) - 1
    while k > 0 and any(ln.strip().startswith(_CHAINED) for ln in lines[starts[k - 1] : starts[k]]):
        k -= 1
    end = starts[k + 1] if k + 1 < len(starts) else len(lines)
    block = [ln for ln in lines[starts[k] : end] if ln.strip() and not ln.strip().startswith(_CHAINED)]
    return block if len(block) <= most else [block[0], "  ...", *block[-(most - 2) :]]


def cmd_deploy(args: argparse.Namespace) -> int:
    # model_hash: the model's files as this machine sees them (bounded: shoal.cli.model_hash).
    found = [_specs_in(f) for f in args.files]
    specs = [with_model_hash(s) for f_specs, _ in found for s in f_specs]
    routes = [r for _, f_routes in found for r in f_routes]
    if args.model_repository:  # Triton's layout; its specs carry their files' hash already
        specs += triton_repo.load_all(args.model_repository)
    if not specs and not routes:
        raise InvalidArgument("shoal deploy: name spec files or a Triton repository (--model-repository DIR)")

    async def go(client: Any, settings: Settings) -> int:
        before = await status_reader(client)()
        watch = DeployWatch.after_apply(before, specs)
        revisions: dict[str, int] = {}
        for spec, w in zip(specs, watch.watched, strict=True):
            reply = await client.deploy(spec, wait=False)
            revisions[spec.name] = reply.revision
            print(f"deployment {spec.name} {_applied(reply, rolls=bool(w.old_replicas))}", flush=True)
        for route in routes:  # after the deployments: a route's targets must exist
            await client.route(route)
            print(f"route {route.name}: {route.describe()}", flush=True)
        if not args.wait or not specs:
            return 0
        code, verdict = await wait_for(status_reader(client), watch, args.timeout)
        if verdict.failure and verdict.dead:
            await _print_last_words(client, verdict.dead)
        if verdict.failure:
            # An update whose replicas fail is rolled back by the head once they have failed a few
            # times in a row (FAILED): wait for that, and say it.
            updates = [
                w.name for w in watch.watched if w.old_replicas and f"deployment {w.name} " in verdict.failure
            ]
            for name in updates:
                await _report_rollback(client, name, revisions[name], ROLLBACK_WAIT_S)
        return code

    return with_client(args, go)


def _specs_in(arg: str) -> tuple[list[DeploymentSpec], list[TrafficRoute]]:
    """The specs and traffic routes a ``shoal deploy`` argument names: a YAML file's, or a
    class's (``app.py:Model``, ``@shoal.deployment``)."""
    if is_target(arg):
        return [load_target(arg)], []
    return traffic.load_file(arg)


ROLLBACK_WAIT_S = 60.0
"""How long ``shoal deploy`` waits, after an update failed, for the head to roll it back."""


def status_reader(client: Any) -> Callable[[], Awaitable[Status]]:
    """Reads the head's status as JSON (the shape of ``shoal status --json``): the one place
    deploy, rollback and restart read it."""

    async def read_status() -> Status:
        status: Status = (await client.status()).to_json()
        return status

    return read_status


def _applied(reply: Any, *, rolls: bool) -> str:
    """What an apply did, for its line: created, updated (and how), unchanged."""
    if reply.created:
        return f"created (revision {reply.revision})"
    if not reply.changed:
        return "unchanged"
    return f"updated (revision {reply.revision}): {reply.change}" + ("; rolling update" if rolls else "")


async def _report_rollback(client: Any, name: str, revision: int, timeout_s: float) -> None:
    """Wait (at most ``timeout_s``) for the head to roll back revision ``revision`` of ``name``,
    then say to which revision, on stderr."""
    deadline = time.monotonic() + timeout_s
    while True:
        for rev in reversed(await client.history(name)):
            if rev.number > revision and rev.kind == "rolled_back":
                print(
                    f"deployment {name} rolled back to revision {rev.rollback_to} "
                    f"(as revision {rev.number}): its previous replicas keep serving",
                    file=sys.stderr,
                    flush=True,
                )
                return
        if time.monotonic() > deadline:
            print(
                f"deployment {name} is not rolled back after {timeout_s:g}s (the head rolls an update back "
                "once its replicas have failed to start several times in a row); "
                f"'shoal rollback {name}' does it now",
                file=sys.stderr,
                flush=True,
            )
            return
        await asyncio.sleep(0.25)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "deploy",
        help="create or update deployments from YAML files (or app.py:Class)",
        description="Create or update deployments, then wait until the new replicas are READY. Fails "
        "at once when the head answers that they will not be: no scheduler has room, or the replicas "
        "fail to start.",
    )
    p.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help="a YAML spec file, or FILE.py:Class for a class (decorated with @shoal.deployment or not)",
    )
    p.add_argument(
        "--no-wait",
        dest="wait",
        action="store_false",
        help="return once the head has the spec (a deployment with no room stays pending)",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for replicas (default 120)")
    p.add_argument(
        "--model-repository",
        metavar="DIR",
        help="also deploy every model of this Triton model repository (NAME/config.pbtxt, NAME/1/model.onnx)",
    )
    add_client_flags(p)
    p.set_defaults(fn=cmd_deploy)

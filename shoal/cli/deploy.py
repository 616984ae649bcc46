"""``shoal deploy`` and how it waits: until the replicas of the new spec are READY, or until
the head's answer is that they will not be (the decision is
``shoal.core.deploy_watch.DeployWatch``, shared with ``shoal.api``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

from shoal.cli.common import (
    EXIT_ERROR,
    INT32_MAX,
    ProgressLine,
    add_client_flags,
    in_range,
    seconds,
    with_client,
)
from shoal.cli.upload import upload_local_models
from shoal.config import Settings
from shoal.core import traffic, triton_repo
from shoal.core.deploy_watch import DeployWatch, Status, Verdict
from shoal.core.model_hash import with_model_hash
from shoal.core.spec import DeploymentSpec
from shoal.core.traffic import TrafficRoute
from shoal.decorator import is_target, load_target
from shoal.errors import InvalidArgument, ShoalError
from shoal.logs import escaped


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
            print(f"{ready} after {time.monotonic() - start:.1f}s: {escaped(verdict.line)}", flush=True)
            return 0, verdict
        error = verdict.failure
        if not error and time.monotonic() - start > timeout_s:
            error = f"not ready after {timeout_s:g}s: {verdict.line}"
        if error:
            line.end()
            print(f"shoal: error: {escaped(error)}", file=sys.stderr, flush=True)
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
            print(f"  {escaped(ln)}", file=sys.stderr)
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
    # model_hash: the model's files as this machine sees them (bounded: shoal.core.model_hash).
    found = [_specs_in(f) for f in args.files]
    found_specs = [with_model_hash(s) for f_specs, _ in found for s in f_specs]
    routes = [r for _, f_routes in found for r in f_routes]
    if args.model_repository:  # Triton's layout; its specs carry their files' hash already
        found_specs += triton_repo.load_all(args.model_repository)
    if not found_specs and not routes:
        raise InvalidArgument("shoal deploy: name spec files or a Triton repository (--model-repository DIR)")
    if args.if_revision is not None:
        in_range("--if-revision", args.if_revision, INT32_MAX)
        if len(found_specs) != 1:
            raise InvalidArgument(
                f"--if-revision is the revision of one deployment; these files name {len(found_specs)}"
            )

    async def go(client: Any, settings: Settings) -> int:
        before = await status_reader(client, [s.name for s in found_specs])()
        # Local model files and folders the schedulers may not see go to the head first.
        specs = await upload_local_models(found_specs, settings, args.upload, before)
        watch = DeployWatch.after_apply(before, specs, min_ready_s=args.min_ready)
        revisions: dict[str, int] = {}
        # Several at once: each apply answers once the schedulers were sent the table that
        # names it (a wave: 5 ms on a small cluster, 0.5 s at 1,000 schedulers), and applies
        # made together share waves. One after another, a Triton repository of 100 models
        # took 100 waves. Printed in the files' order, then the first failure is the command's.
        room = asyncio.Semaphore(APPLIES_AT_ONCE)

        async def apply(spec: DeploymentSpec) -> Any:
            async with room:
                return await client.deploy(spec, wait=False, if_revision=args.if_revision)

        replies = await asyncio.gather(*(apply(spec) for spec in specs), return_exceptions=True)
        failed: BaseException | None = None
        for spec, w, reply in zip(specs, watch.watched, replies, strict=True):
            if isinstance(reply, BaseException):
                failed = failed or reply
                continue
            revisions[spec.name] = reply.revision
            print(f"deployment {spec.name} {applied(reply, rolls=bool(w.old_replicas))}", flush=True)
        if failed is not None:
            raise failed  # after saying what was applied: the others were
        for route in routes:  # after the deployments: a route's targets must exist
            await client.route(route)
            print(f"route {route.name}: {route.describe()}", flush=True)
        if not args.wait or not specs:
            return 0
        code, verdict = await wait_for(status_reader(client, [s.name for s in specs]), watch, args.timeout)
        if verdict.failure and verdict.dead:
            await _print_last_words(client, verdict.dead)
        # An update whose replicas fail is rolled back by the head once they have failed a few
        # times in a row (FAILED): wait for that, and say it. A deletion or no room is not.
        for w in watch.watched:
            if w.old_replicas and w.name in verdict.rolls_back:
                await _report_rollback(client, w.name, revisions[w.name], ROLLBACK_WAIT_S)
        return code

    return with_client(args, go)


def _specs_in(arg: str) -> tuple[list[DeploymentSpec], list[TrafficRoute]]:
    """The specs and traffic routes a ``shoal deploy`` argument names: a YAML file's, or a
    class's (``app.py:Model``, ``@shoal.deployment``)."""
    if is_target(arg):
        return [load_target(arg)], []
    return traffic.load_file(arg)


APPLIES_AT_ONCE = 16
"""How many specs ``shoal deploy`` applies at once."""
ROLLBACK_WAIT_S = 60.0
"""How long ``shoal deploy`` waits, after an update failed, for the head to roll it back."""


def status_reader(client: Any, names: Collection[str]) -> Callable[[], Awaitable[Status]]:
    """Reads the head's status as JSON (the shape of ``shoal status --json``) of the deployments
    ``names``, the schedulers and the recent events: the one place deploy, rollback and restart
    read it. Read four times a second while they wait: the whole cluster's, at 10,000 replicas,
    held the head's event loop 0.14-0.27 s each time (and sent 1.7 MB)."""
    only = tuple(names)

    async def read_status() -> Status:
        status: Status = (await client.status(only)).to_json()
        return status

    return read_status


def applied(reply: Any, *, rolls: bool) -> str:
    """What an apply did, for its line: created, updated (and how), unchanged. ``shoal up``'s
    ``--deploy`` lines too."""
    if reply.created:
        return f"created (revision {reply.revision})"
    if not reply.changed:
        return "unchanged"
    return f"updated (revision {reply.revision}): {reply.change}" + ("; rolling update" if rolls else "")


async def _report_rollback(client: Any, name: str, revision: int, timeout_s: float) -> None:
    """Wait (at most ``timeout_s``) for the head to roll back revision ``revision`` of ``name``,
    then say to which revision, on stderr. When the next revision is not a rollback (another
    deploy, a restart) say that at once: rolling back would undo it."""
    deadline = time.monotonic() + timeout_s
    while True:
        rev = next((r for r in await client.history(name) if r.number > revision), None)
        if rev is not None and rev.kind == "rolled_back":
            print(
                f"deployment {name} rolled back to revision {rev.rollback_to} "
                f"(as revision {rev.number}): its previous replicas keep serving",
                file=sys.stderr,
                flush=True,
            )
            return
        if rev is not None:
            print(
                f"deployment {name} was changed again after this deploy's revision {revision}: "
                f"revision {rev.number} ({rev.kind}: {rev.change}) is the one rolling out now",
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
        "at once when the head answers that they will not be: no scheduler has room or none is big "
        "enough, or the replicas fail to start.",
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
    p.add_argument(
        "--timeout", type=seconds, default=120.0, help="seconds to wait for replicas (default 120)"
    )
    p.add_argument(
        "--min-ready",
        type=seconds,
        default=0.0,
        metavar="S",
        help="done only once each new replica has stayed READY S seconds: a model that crashes soon "
        "after loading fails the deploy instead of passing it (default 0: done once READY)",
    )
    p.add_argument(
        "--if-revision",
        type=int,
        metavar="N",
        help="apply only if the deployment is at revision N now (0: only if it does not exist yet); "
        "otherwise fail naming its revision, changing nothing. Without it the last deploy wins",
    )
    p.add_argument(
        "--model-repository",
        metavar="DIR",
        help="also deploy every model of this Triton model repository (NAME/config.pbtxt, NAME/1/model.onnx)",
    )
    p.add_argument(
        "--upload",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="upload local model files and folders to the head (--no-upload: never; default: when the "
        "head is not on this machine's loopback or a scheduler runs on another host)",
    )
    add_client_flags(p)
    p.set_defaults(fn=cmd_deploy)

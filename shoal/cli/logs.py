"""``shoal logs``: a deployment's replicas (merged), one replica, or this machine's head and
scheduler.

Replica logs come through the head from whichever scheduler runs the replica; the head's and
the scheduler's own logs are files in the local state folder (``<state>/logs/<role>.log``).

To a terminal, what the logs hold is shown with its control characters escaped (:class:`Shown`):
a replica's log is what its model printed, and a model must not be able to set the operator's
window title, clear the screen, plant a hyperlink or overwrite a line with a ``\r``. To a pipe
or a file, the bytes are written as they are (docs/operations.md says why).
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import heapq
import json
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from shoal.cli.common import INT64_MAX, add_client_flags, in_range, settings_of, with_client
from shoal.cli.processes import log_file
from shoal.config import Settings
from shoal.errors import NotFound, ResourceExhausted
from shoal.logs import escaped as escaped_line

COMPONENTS = {"head": ("head", "up"), "scheduler": ("scheduler", "up"), "up": ("up",)}
"""A component, and the process log files that hold its lines, in order of preference
(``shoal up`` runs both in one process)."""

_CLOCK = re.compile(r"^(\d\d):(\d\d):(\d\d)\b")


def escaped(text: str) -> str:
    """``text`` with each control character but tab and newline written escaped, as a text
    log line of shoal's own writes one (:func:`shoal.logs.escaped`): ``\\x1b`` (the four
    characters), ``\\r``, ``\\x07``, C1 controls (U+009B is CSI to some terminals) as
    ``\\x9b``, the Unicode line separators as ``\\u2028``. Newlines are kept: these are
    lines of a log, printed as lines."""
    return "\n".join(escaped_line(line) for line in text.split("\n"))


class Shown:
    """One stream of log bytes as shown on a terminal: decoded as UTF-8, a byte that is not
    part of valid UTF-8 written ``\\xNN`` (Python's ``backslashreplace``), control
    characters :func:`escaped`; encoded back as UTF-8. A character split between two chunks
    is decoded whole (the decoder keeps its first bytes until the rest come). Never raises."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("backslashreplace")

    def __call__(self, data: bytes, final: bool = False) -> bytes:
        return escaped(self._decoder.decode(data, final)).encode()


Show = Callable[[bytes, bool], bytes]
"""What becomes of a stream's bytes on their way out (``final``: the stream ends there)."""


def _as_is(data: bytes, final: bool = False) -> bytes:
    return data


def show_for(tty: bool) -> Callable[[], Show]:
    """A maker of what each stream is shown through: :class:`Shown` on a terminal, the bytes
    as they are elsewhere."""
    return Shown if tty else lambda: _as_is


def _is_tty(out: BinaryIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):  # no file behind it, or closed
        return False


def _stamp(line: str) -> float | None:
    """When a log line was written, as far as it says: text lines start HH:MM:SS, JSON lines carry ts."""
    m = _CLOCK.match(line)
    if m:
        h, mi, s = (int(g) for g in m.groups())
        return h * 3600 + mi * 60 + s
    if line.startswith("{"):
        try:
            ts = json.loads(line).get("ts")
        except (ValueError, AttributeError):
            return None
        return float(ts) % 86400 if isinstance(ts, int | float) else None
    return None


def merge_logs(logs: Mapping[str, str]) -> list[str]:
    """The lines of several replicas' logs in one list, ordered by time, each prefixed with its replica.

    A line without a time of its own (a model's print, a traceback) keeps the time of the line
    before it, so it stays beside it; lines of one replica keep their order. Lines end at
    ``\n`` only, as with ``--follow``: before, ``str.splitlines`` also ended one at a ``\r``
    (or a form feed, or U+0085), each piece printed as a line of its own.
    """

    def keyed(rid: str, text: str) -> Iterable[tuple[float, str]]:
        at = 0.0
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()  # what the last newline ends: no line
        for line in lines:
            at = _stamp(line) or at
            yield at, f"{rid} | {line}"

    streams = [keyed(rid, text) for rid, text in sorted(logs.items())]
    return [line for _, line in heapq.merge(*streams, key=lambda item: item[0])]


READS_AT_ONCE = 8
"""How many replicas' logs ``logs DEPLOYMENT`` reads at once. The head relays at most
``max_log_streams`` reads (128); reading every replica at once, a deployment of more
replicas than that (or fewer, while others read) failed the whole command."""
FULL_RETRY_S = (0.25, 2.0)
"""How long a read the head refused for want of room (``max_log_streams``) waits before it
asks again: the first wait, and the most (doubling)."""
FULL_GIVE_UP_S = 60.0
"""How long ``logs DEPLOYMENT`` (without ``--follow``) asks again for a replica's log the
head has no room to relay, before it fails saying so."""


async def _replica_text(
    client: Any, rid: str, tail_bytes: int, tty: bool = False, room: asyncio.Semaphore | None = None
) -> str:
    """The replica's log as text: to a terminal, :func:`escaped` (a byte that is not UTF-8 as
    ``\\xNN``); else each byte that is not UTF-8 as a surrogate, which ``encode`` with
    ``surrogateescape`` writes back as it was (before, as U+FFFD). ``room``: taken for the
    read. A read the head has no room for now is asked again, for up to FULL_GIVE_UP_S."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + FULL_GIVE_UP_S
    pause = FULL_RETRY_S[0]
    while True:
        try:
            async with room or contextlib.nullcontext():
                chunks = [c async for c in client.read_log(rid, tail_bytes=tail_bytes, follow=False)]
            break
        except ResourceExhausted:
            if loop.time() + pause > give_up:
                raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, FULL_RETRY_S[1])
    data = b"".join(chunks)
    return escaped(data.decode(errors="backslashreplace")) if tty else data.decode(errors="surrogateescape")


async def _follow_prefixed(
    client: Any, rid: str, tail_bytes: int, out: BinaryIO, show: Callable[[], Show] = show_for(False)
) -> None:
    pending = b""
    async for data in client.read_log(rid, tail_bytes=tail_bytes, follow=True):
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            out.write(rid.encode() + b" | " + show()(line, True) + b"\n")
        out.flush()
    if pending:  # its last line, which the replica ended before finishing
        out.write(rid.encode() + b" | " + show()(pending, True) + b"\n")
        out.flush()


RELIST_S = 2.0
"""How often ``logs DEPLOYMENT --follow`` asks the head for the deployment's replicas again."""


async def _replica_ids(client: Any, name: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The deployment ``name`` as the head's status shows it (None when there is none), and its replicas."""
    status = (await client.status((name,))).to_json()
    dep = next((d for d in status["deployments"] if d["name"] == name), None)
    return dep, [r["id"] for r in dep["replicas"]] if dep is not None else []


async def _follow_deployment(
    client: Any,
    name: str,
    replicas: list[str],
    tail_bytes: int,
    out: BinaryIO,
    relist_s: float = RELIST_S,
    show: Callable[[], Show] = show_for(False),
) -> int:
    """Follow the deployment's replicas, and those it gets later: every ``relist_s`` the head
    is asked for its replicas again, and a new one is followed from the start of its log
    (``replicas``, those running when the command started, from ``tail_bytes`` before the end).
    A replica that ended stays until its stream ends (all it wrote is printed). Returns once
    the deployment is gone and every stream has ended; Ctrl-C before.

    Before, the replicas were listed once: after ``shoal scale NAME 3``, or a replica replaced
    after a crash, the new replicas' lines never showed.
    """
    streams: dict[asyncio.Task[None], str] = {}
    ended: set[str] = set()  # streams that ended: all they will print is printed
    waiting: set[str] = set()  # replicas the head had no room to relay: asked again at each listing
    said = 0  # how many were waiting when it was last said

    def follow(rid: str, tail: int) -> None:
        streams[asyncio.create_task(_follow_prefixed(client, rid, tail, out, show))] = rid

    for rid in replicas:
        follow(rid, tail_bytes)
    loop = asyncio.get_running_loop()
    next_look = loop.time() + relist_s
    try:
        while True:
            wait_s = max(0.0, next_look - loop.time())
            if streams:
                finished, _ = await asyncio.wait(streams, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(wait_s)
                finished = set()
            for task in finished:
                rid = streams.pop(task)
                err = task.exception()
                if isinstance(err, NotFound):
                    continue  # placed but no log yet (not started): looked for at the next listing
                if isinstance(err, ResourceExhausted):
                    # The head relays max_log_streams reads at once (max_log_streams_per_client
                    # of one client's): this one waits for room
                    # (a deployment of more replicas than that failed the whole command).
                    waiting.add(rid)
                    continue
                if err is not None:
                    raise err
                ended.add(rid)
            if loop.time() < next_look:
                continue
            dep, listed = await _replica_ids(client, name)
            next_look = loop.time() + relist_s
            if dep is None and not streams:
                return 0  # deleted, and every replica's stream has ended
            waiting &= set(listed)
            if waiting and len(waiting) != said:
                print(
                    f"shoal: not following {len(waiting)} of {len(listed)} replicas of {name} yet: "
                    "the head relays at most max_log_streams log reads at once, and "
                    "max_log_streams_per_client of one client's; asking again "
                    f"every {relist_s:g}s (name a replica to follow it alone)",
                    file=sys.stderr,
                    flush=True,
                )
            said = len(waiting)
            following = set(streams.values())
            for rid in listed:
                if rid not in following and rid not in ended:
                    waiting.discard(rid)
                    follow(rid, 0 if rid not in replicas else tail_bytes)
    finally:
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)


async def _deployment_logs(client: Any, name: str, replicas: list[str], args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    tty = _is_tty(out)
    if args.follow:
        return await _follow_deployment(client, name, replicas, args.tail_bytes, out, show=show_for(tty))
    room = asyncio.Semaphore(READS_AT_ONCE)
    reads = (_replica_text(client, rid, args.tail_bytes, tty, room) for rid in replicas)
    texts = await asyncio.gather(*reads)
    for line in merge_logs(dict(zip(replicas, texts, strict=True))):
        out.write(line.encode(errors="surrogateescape") + b"\n")
    out.flush()
    return 0


def _component_log(settings: Settings, component: str) -> Path:
    files = [log_file(settings.state_dir, role) for role in COMPONENTS[component]]
    found = [f for f in files if f.exists()]
    if not found:
        raise NotFound(
            f"no {component} log in {Path(settings.state_dir) / 'logs'} on this machine: a head or "
            "scheduler writes one there while it runs (give --state if it runs with another state folder)"
        )
    return max(found, key=lambda f: f.stat().st_mtime)


async def _tail_file(path: Path, tail_bytes: int, follow: bool) -> AsyncIterator[bytes]:
    """The file from ``tail_bytes`` before its end (0: from its start), then, if ``follow``, what is
    appended; a file that shrinks (rotated) is read again from its start."""
    f = open(path, "rb")
    try:
        size = f.seek(0, 2)
        f.seek(max(0, size - tail_bytes) if tail_bytes else 0)
        while True:
            data = f.read(65536)
            if data:
                yield data
                continue
            if not follow:
                return
            await asyncio.sleep(0.2)
            try:
                rotated = path.stat().st_size < f.tell()
            except FileNotFoundError:
                continue  # between a rotation's rename and the new file: look again
            if rotated:
                f.close()
                f = open(path, "rb")
    finally:
        f.close()


def cmd_logs(args: argparse.Namespace) -> int:
    in_range("--tail-bytes", args.tail_bytes, INT64_MAX)
    target = args.target
    out = sys.stdout.buffer
    make_show = show_for(_is_tty(out))
    if target in COMPONENTS:
        path = _component_log(settings_of(args), target)

        async def local() -> int:
            show = make_show()
            async for data in _tail_file(path, args.tail_bytes, args.follow):
                out.write(show(data, False))
                out.flush()
            out.write(show(b"", True))  # what a character cut at the end left
            out.flush()
            return 0

        return _interruptible(lambda: asyncio.run(local()))

    async def go(client: Any, settings: Settings) -> int:

        dep, replicas = await _replica_ids(client, target)
        if dep is not None:
            if not replicas:
                why = f": {dep['pending_reason']}" if dep["pending_reason"] else ""
                raise NotFound(f"deployment {target!r} has no replicas now{why}")
            return await _deployment_logs(client, target, replicas, args)
        show = make_show()
        async for data in client.read_log(target, tail_bytes=args.tail_bytes, follow=args.follow):
            out.write(show(data, False))
            out.flush()
        out.write(show(b"", True))  # what a character cut at the end left
        out.flush()
        return 0

    return _interruptible(lambda: with_client(args, go))


def _interruptible(run: Any) -> int:
    try:
        code: int = run()
        return code
    except KeyboardInterrupt:
        return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "logs",
        help="print the logs of a deployment, a replica, or this machine's head or scheduler",
        description="TARGET is a deployment (the logs of all its replicas, merged by time, each line "
        "prefixed with its replica), a replica id (its log, wherever it runs, also after it died), or "
        "'head' or 'scheduler' (the log of that process on this machine, from the state folder). "
        "To a terminal, control characters but tab and newline are printed escaped (ESC as \\x1b, "
        "CR as \\r), and bytes that are not UTF-8 as \\xNN; to a pipe or a file, the bytes are written "
        "as they are (docs/operations.md, Logs).",
    )
    p.add_argument("target", metavar="TARGET", help="DEPLOYMENT, REPLICA_ID, head or scheduler")
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing what is written (a deployment: also by the replicas it gets later)",
    )
    p.add_argument(
        "--tail-bytes", type=int, default=0, help="start this many bytes before the end (of each log)"
    )
    p.add_argument("--state", help="state folder for head and scheduler logs (default ./.shoal)")
    add_client_flags(p)
    p.set_defaults(fn=cmd_logs)

"""Fetching a ``blob://`` model into the artifact cache: from a peer, else from the head.

The head knows which schedulers hold a blob whole (:meth:`BlobSource.locate`): each tells
it once it has fetched and verified one (:meth:`BlobSource.hold`). A fetch tries them in
random order (so that many schedulers starting one model spread over the ones that have
it), then the head; a source that fails, ends early or sends no byte for ``idle_s``
(:data:`shoal.core.blobs.IDLE_S`, as for a head's mirror) is left for the next, which
continues from the bytes already written, but for those of a source that ended NotFound
(the head found its copy damaged as it sent it, and deleted it): they are dropped.
When every source has failed it waits a little and asks again (a restarted head, a peer
back; the head fetching back a blob it lost, which it says once, at info), until no byte
has come for ``give_up_s``: its failure then names each source tried and why it failed
(logged as a warning, as is the first failure of each source; the ones that follow, at
debug). The bytes' hash is checked at
the end.

The head keeps which schedulers hold a blob in memory only, so a scheduler tells it again
every blob its cache holds each time it registers (:class:`Announcer`): a restarted head,
or a standby that took over, points peers at it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from shoal.core.blobs import IDLE_S, BlobRef, until_idle
from shoal.core.tasks import TaskSet
from shoal.errors import FailedPrecondition, NotFound, ShoalError, Unavailable

log = logging.getLogger("shoal.scheduler")

HEAD = ""
"""The address :meth:`BlobSource.download` takes for the head."""


@dataclass(frozen=True)
class Located:
    size: int  # 0 while ``fetching_back``
    holders: list[str] = field(default_factory=list)  # peers' addresses, this scheduler's left out
    fetching_back: bool = False  # the head lost its copy and fetches it back from a holder: wait


class BlobSource(Protocol):
    """Where blobs come from (``shoal.rpc.blobs.GrpcBlobSource``; fakes in tests)."""

    async def locate(self, sha256: str) -> Located:
        """The blob's size and the peers holding it (or that the head is fetching back the
        copy it lost from one of them). NotFound: the head has no such blob and no scheduler
        holds one; Unavailable: the head cannot be asked."""
        ...

    async def hold(self, sha256: str) -> None:
        """Tell the head this scheduler holds the blob whole (verified), so that it lists it
        among the holders. Raises ShoalError when the head cannot be told."""
        ...

    async def release(self, sha256: str) -> None:
        """Tell the head this scheduler no longer holds the blob (its cache evicted it).
        Raises ShoalError when the head cannot be told."""
        ...

    def download(self, address: str, sha256: str, offset: int) -> AsyncIterator[bytes]:
        """The blob's bytes from ``offset``, from the peer at ``address`` or the head
        (:data:`HEAD`). Raises ShoalError when the source fails."""
        ...


async def fetch(
    source: BlobSource,
    ref: BlobRef,
    dest: Path,
    *,
    admit: Callable[[int], Awaitable[None]],
    on_bytes: Callable[[int, int], None],
    stop: threading.Event,
    give_up_s: float,
    idle_s: float = IDLE_S,
    retry_s: float = 0.2,
) -> None:
    """Write blob ``ref`` to the file ``dest``, its hash verified. ``admit(size)`` is awaited
    once the size is known (it may refuse by raising); ``on_bytes(done, total)`` follows the
    progress. A source that sends no byte for ``idle_s`` is left for the next. Raises
    FailedPrecondition (the head has no such blob, or the bytes are not it), Unavailable (no
    source sent a byte for ``give_up_s``, the message naming each source tried and why it
    failed; the scheduler stops)."""
    digest = hashlib.sha256()
    have = 0
    size = -1
    holders: list[str] = []
    last_byte = time.monotonic()
    delay = retry_s
    failures: dict[str, str] = {}  # source -> why it failed last, for the give-up message
    warned: set[str] = set()  # sources whose failure was logged as a warning
    waiting = False  # for the head to fetch the blob back: said once
    with dest.open("wb") as out:
        while True:
            heads = [HEAD]
            try:
                located = await source.locate(ref.sha256)
            except NotFound as err:
                raise FailedPrecondition(f"{ref.uri}: {err}") from None
            except ShoalError as err:  # the head cannot be asked now: the peers known, then the head again
                _failed(failures, "the head", f"asking it for the blob: {err}")
            else:
                if located.fetching_back:  # nothing to ask the head for yet: wait for it
                    heads = []
                    _failed(failures, "the head", "it was fetching the blob back from a scheduler holding it")
                    if not waiting:
                        log.info("%s: waiting for the head to fetch it back (it lost its copy)", ref.uri)
                        waiting = True
                else:
                    if size < 0:
                        await admit(located.size)
                    size = located.size
                    holders = list(located.holders)
            random.shuffle(holders)
            for address in [*holders, *heads]:
                if stop.is_set():
                    raise Unavailable(f"{ref.uri}: the download was stopped (the scheduler is shutting down)")
                name = address or "the head"
                start, start_digest = have, digest.copy()
                try:
                    async for chunk in until_idle(source.download(address, ref.sha256, have), name, idle_s):
                        if 0 <= size < have + len(chunk):
                            raise FailedPrecondition(f"more than the blob's {size} bytes")
                        await asyncio.to_thread(out.write, chunk)
                        digest.update(chunk)
                        have += len(chunk)
                        last_byte = time.monotonic()
                        on_bytes(have, max(size, 0))
                except ShoalError as err:
                    _failed(failures, name, f"failed at byte {have}: {err}")
                    # Once per source: the rounds that follow would repeat it every 2 s.
                    level = logging.DEBUG if name in warned else logging.WARNING
                    warned.add(name)
                    log.log(level, "fetching %s from %s failed at byte %d: %s", ref.uri, name, have, err)
                    if isinstance(err, NotFound) and have > start:
                        # It found its copy damaged as it sent it (the head checks the hash as it
                        # serves a blob, and deletes a damaged copy): its bytes are dropped.
                        await asyncio.to_thread(_truncate, out, start)
                        have, digest = start, start_digest
                    continue
                if have == size:
                    break
                _failed(failures, name, f"ended the stream at byte {have} of {size}")
            else:
                if time.monotonic() - last_byte > give_up_s:
                    why = f"no source sent a byte for {give_up_s:g}s; tried {_tried(failures)}"
                    log.warning("gave up fetching %s: %s", ref.uri, why)
                    raise Unavailable(f"{ref.uri}: {why}")
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)
                continue
            break
    if digest.hexdigest() != ref.sha256:
        raise FailedPrecondition(f"{ref.uri}: the bytes fetched hash to sha256:{digest.hexdigest()}")
    try:
        await source.hold(ref.sha256)
    except ShoalError as err:  # peers will not be pointed here; nothing else is lost
        log.info("could not tell the head this scheduler holds %s: %s", ref.uri, err)


SHOWN_SOURCES = 5
"""Sources a fetch's failure names, each with why it failed (the rest are counted)."""


def _failed(failures: dict[str, str], name: str, why: str) -> None:
    failures.pop(name, None)  # to the end: the most recent last
    failures[name] = why


def _tried(failures: dict[str, str]) -> str:
    """``peer:1 (failed at byte 0: ...); the head (...)``: the sources that failed most
    recently first, each message cut to 300 characters."""
    if not failures:
        return "no source"
    recent = list(failures.items())[::-1]
    shown = "; ".join(f"{name} ({why[:300]})" for name, why in recent[:SHOWN_SOURCES])
    more = len(recent) - SHOWN_SOURCES
    return shown + (f"; and {more} more" if more > 0 else "")


def _truncate(out: BinaryIO, size: int) -> None:
    out.seek(size)
    out.truncate()


MAX_RELEASES = 1024
"""Evicted blobs waiting to be told to the head (:meth:`Announcer.released`); past it the
oldest are not told (the head lists this scheduler for them until it registers again)."""


class Announcer:
    """Tells the head every blob ``held()`` lists, one :meth:`BlobSource.hold` at a time,
    after each registration (:meth:`registered`, called by the scheduler). A registration
    that comes while it is telling starts it over; a failure ends the round (the next
    registration tells again). And each blob the cache evicts (:meth:`released`), one
    :meth:`BlobSource.release` at a time: one that fails waits for the next eviction, or is
    dropped at the next registration (the head then forgets every blob this scheduler held,
    and hears again what it holds). At most :data:`MAX_RELEASES` wait. Its tasks are its
    own: :meth:`aclose` ends them."""

    def __init__(self, source: BlobSource, held: Callable[[], Iterable[str]]) -> None:
        self._source = source
        self._held = held
        self._tasks = TaskSet("blob announcer")
        self._round: asyncio.Task[None] | None = None
        self._released: dict[str, None] = {}  # evicted, not yet told: oldest first
        self._releasing: asyncio.Task[None] | None = None

    def registered(self) -> None:
        self._released.clear()
        if self._round is not None:
            self._round.cancel()
        self._round = self._tasks.spawn(self._tell(), "announce")

    def released(self, sha256s: Iterable[str]) -> None:
        """The cache evicted ``sha256s``: tell the head."""
        for sha256 in sha256s:
            self._released[sha256] = None
        while len(self._released) > MAX_RELEASES:
            del self._released[next(iter(self._released))]
        idle = self._releasing is None or self._releasing.done()
        if self._released and idle and not self._tasks.closed:  # closed: the scheduler stops
            self._releasing = self._tasks.spawn(self._release(), "release")

    async def _tell(self) -> None:
        told = 0
        for sha256 in list(self._held()):
            try:
                await self._source.hold(sha256)
            except ShoalError as err:
                log.info("could not tell the head this scheduler holds sha256:%s: %s", sha256[:12], err)
                return
            told += 1
        if told:
            log.info("told the head this scheduler holds %d blob(s)", told)

    async def _release(self) -> None:
        while self._released:
            sha256 = next(iter(self._released))
            if sha256 not in set(self._held()):  # not fetched again meanwhile
                try:
                    await self._source.release(sha256)
                except ShoalError as err:
                    log.info("could not tell the head this scheduler evicted sha256:%s: %s", sha256[:12], err)
                    return
            self._released.pop(sha256, None)

    async def aclose(self) -> None:
        await self._tasks.aclose()

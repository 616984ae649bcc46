"""Standby heads keep a copy of every blob: an index in the shared store, and a mirror.

The index: the leader lists every blob it holds whole in the store, ``blobs/<sha256>`` =
``{"size": N}``: at once when an upload completes, and on every pass any it holds unlisted
(blobs from before it led). Once it has led for :data:`SETTLE_S` (time for the standbys and
schedulers to tell it what they hold), it drops the entries of blobs that neither it nor
any holder has and that no deployment or kept revision names (collected, or an upload never
acknowledged: its client sends it again).

Every head on the etcd store runs a :class:`BlobMirror`. On a standby, each pass (every
``every_s``) reads the index and fetches the blobs it lacks from the leader, resuming where
its partial copy ends, through :meth:`BlobStore.receive` (so with an upload's checks: the
size within ``max_blob_mb``, the sha256 at the end). Once a blob is whole it tells the
leader (:meth:`HeadPeers.hold`); and every ``every_s`` it tells the leader it is there
(:meth:`HeadPeers.hello`), so that the leader's uploads wait for its copy
(``BlobStore.wait_for_standby``). On the leader (after a failover: the standby that took
over), each pass fetches the listed blobs it still lacks from the schedulers and standby
heads that hold them (schedulers tell a new leader what their caches hold when they
register; standbys, what they hold when they see a new leader; a standby answers
``Download`` though it answers nothing else). The leader's passes come every
``10 * every_s`` unless an upload completes; a standby's, every ``every_s``.

The single head (the SQLite store) runs one too, leading always, the index in its own
store: a blob it lost from its disk while the index lists it (deleted, a disk cleanup, the
database restored without the blob folder; or deleted as damaged when it was served,
``BlobStore.read``) is fetched back from a scheduler that holds a verified copy, as a
leader that took over does. A pass comes every ``10 * every_s``, and at once when someone
asks the head for a blob it lacks (:meth:`BlobStore.on_missing`). Fetching it back used to
be left to the standbys' mirror: a single head that lost a blob failed every new replica
of the deployments naming it until the blob was uploaded again.

At most ``concurrency`` fetches run at once, one per blob; each writes at most the size the
index records and is kept only if its hash is the blob's (:meth:`BlobStore.receive`); a
source that sends no byte for ``idle_s`` (:data:`shoal.core.blobs.IDLE_S`, as for a
scheduler's fetch) is left for the next; a scheduler that answers NotFound (its cache
evicted the blob and the head did not hear of it) is dropped from the blob's holders
(``gone``). One that fails is tried again on a later pass,
after a pause that doubles (up to a minute). A blob over this head's size limit is not
fetched (logged once: give every head the same ``max_blob_mb``). Its loop and fetches run
in a TaskSet of its own (:meth:`start`, :meth:`aclose`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from shoal.core.blobs import HEX, IDLE_S, until_idle
from shoal.core.clock import wait_for
from shoal.core.tasks import TaskSet
from shoal.errors import NotFound, ShoalError
from shoal.head.blobs import STANDBY, STANDBY_ALIVE_S, BlobStore
from shoal.store.base import Store

log = logging.getLogger("shoal.head")

INDEX = "blobs/"
"""The store's keys of the blob index: ``blobs/<sha256>``."""

RETRY_MAX_S = 60.0
SETTLE_S = 2 * STANDBY_ALIVE_S
"""How long a new leader waits for the holders to speak before it drops index entries."""


class HeadPeers(Protocol):
    """Where a head fetches blobs from (``shoal.rpc.blobs.GrpcHeadPeers``; fakes in tests).
    Every method raises ShoalError when the other side fails."""

    async def hello(self, leader: str) -> None:
        """Tell the leader (its gRPC address) that this standby is there."""
        ...

    async def hold(self, leader: str, sha256: str) -> None:
        """Tell the leader that this standby holds ``sha256`` whole."""
        ...

    def download(self, address: str, sha256: str, offset: int, *, head: bool) -> AsyncIterator[bytes]:
        """The blob's bytes from ``offset``, from the head (``head``) or the scheduler at
        ``address``."""
        ...


class BlobMirror:
    """See the module's docstring.

    ``leading()``: whether this head leads and has loaded its state; ``leader()``: the
    leader's gRPC address while this head stands by (None when unknown); ``named()``: the
    blobs the deployments and kept revisions name (asked only while leading); ``holders(sha)``:
    the addresses of live schedulers holding a blob (asked only while leading);
    ``gone(sha, address)``: the scheduler at ``address`` answered it has no such blob (its
    eviction was not heard): it is no holder of it.
    """

    def __init__(
        self,
        blobs: BlobStore,
        store: Store,
        peers: HeadPeers,
        *,
        leading: Callable[[], bool],
        leader: Callable[[], str | None],
        named: Callable[[], set[str]],
        holders: Callable[[str], list[str]],
        every_s: float = 0.5,
        concurrency: int = 2,
        settle_s: float = SETTLE_S,
        idle_s: float = IDLE_S,
        gone: Callable[[str, str], None] = lambda sha256, address: None,
    ) -> None:
        if every_s <= 0 or concurrency < 1 or idle_s <= 0:
            raise ValueError("every_s and idle_s must be > 0, and concurrency >= 1")
        self.blobs = blobs
        self.store = store
        self.peers = peers
        self._leading = leading
        self._leader = leader
        self._named = named
        self._holders = holders
        self._gone = gone
        self.every_s = every_s
        self.settle_s = settle_s
        self.idle_s = idle_s
        self._slots = asyncio.Semaphore(concurrency)
        self._index: dict[str, int] = {}
        self._index_at = -1.0  # monotonic time of the last good read of the index
        self._fetching: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, tuple[int, float]] = {}  # blob -> (failures, retry after)
        self._refused: set[str] = set()  # over this head's limit: not fetched
        self._told = ""  # the leader last told every blob this standby holds
        self._leading_since: float | None = None  # monotonic, while this head leads
        self._wake = asyncio.Event()
        self._tasks = TaskSet("blob mirror")

    def start(self) -> None:
        self.blobs.on_whole = lambda sha256: self._wake.set()
        self.blobs.on_missing = lambda sha256: self._wake.set()
        self._tasks.spawn(self._loop(), "mirror")

    async def aclose(self) -> None:
        await self._tasks.aclose()

    def listed(self) -> set[str] | None:
        """The blobs the index lists, as last read; None when it has not been read lately
        (a standby then collects nothing)."""
        if time.monotonic() - self._index_at > 10 * self.every_s + 5:
            return None
        return set(self._index) | set(self._fetching)

    # ------------------------------------------------------------ passes

    async def _loop(self) -> None:
        quiet = False
        while True:
            try:
                await self.run_pass()
                quiet = False
            except ShoalError as err:
                if not quiet:
                    log.warning("blob mirror: %s (retrying)", err)
                    quiet = True
            pause = self.every_s * (10 if self._leading_since is not None else 1)
            with contextlib.suppress(TimeoutError):
                await wait_for(self._wake.wait(), pause)
            self._wake.clear()

    async def run_pass(self) -> None:
        """Read the index; as leader, bring it up to date; start fetching what this head
        lacks; as a standby, tell the leader it is there. Raises ShoalError (the store)."""
        self._index = await self._read_index()
        self._index_at = time.monotonic()
        have = self.blobs.whole()
        if self._leading():
            if self._leading_since is None:
                self._leading_since = time.monotonic()
            await self._publish(have)
        else:
            self._leading_since = None
            await self._hello(have)
        now = time.monotonic()
        for sha256, size in self._index.items():
            if sha256 in have or sha256 in self._fetching or sha256 in self._refused:
                continue
            if self._failures.get(sha256, (0, 0.0))[1] > now:
                continue
            if size > self.blobs.max_bytes:
                log.error(
                    "blob mirror: not copying sha256:%s: it is %d bytes, over this head's limit of %d MB "
                    "(setting max_blob_mb: give every head the same)",
                    sha256,
                    size,
                    self.blobs.max_bytes // 2**20,
                )
                self._refused.add(sha256)
                continue
            self._fetching[sha256] = self._tasks.spawn(self._fetch(sha256, size), f"fetch {sha256[:12]}")

    async def settle(self) -> None:
        """Return once the fetches started so far have ended."""
        await asyncio.gather(*self._fetching.values(), return_exceptions=True)

    async def _read_index(self) -> dict[str, int]:
        index = {}
        for entry in await self.store.list(INDEX):
            sha256 = entry.key.removeprefix(INDEX)
            try:
                size = int(json.loads(entry.value)["size"])
                if not HEX.match(sha256) or size < 0:
                    raise ValueError("not a sha256 and a size")
            except (ValueError, KeyError, TypeError) as err:
                if sha256 not in self._refused:
                    log.warning("blob index entry %r is unreadable (%s): skipped", entry.key, err)
                    self._refused.add(sha256)
                continue
            index[sha256] = size
        return index

    async def _publish(self, have: set[str]) -> None:
        for sha256 in sorted(have - self._index.keys()):
            info = self.blobs.stat(sha256)
            if info.complete:
                await self.store.put(INDEX + sha256, json.dumps({"size": info.size}))
                self._index[sha256] = info.size
        assert self._leading_since is not None
        lacking = self._index.keys() - have - self._fetching.keys()
        if not lacking or time.monotonic() - self._leading_since < self.settle_s:
            return
        named = self._named()  # parses every kept revision: only when something is lacking
        for sha256 in sorted(lacking - named):
            if self._sources(sha256):
                continue
            await self.store.delete(INDEX + sha256)
            del self._index[sha256]

    async def _hello(self, have: set[str]) -> None:
        leader = self._leader()
        if not leader:
            return
        try:
            await self.peers.hello(leader)
            if self._told != leader:  # a new leader: tell it every copy this standby holds
                for sha256 in sorted(have & self._index.keys()):
                    await self.peers.hold(leader, sha256)
                self._told = leader
        except ShoalError as err:
            # Down, perhaps restarting on the same address: tell it everything once it is back.
            self._told = ""
            log.debug("blob mirror: the leader at %s: %s", leader, err)

    def _sources(self, sha256: str) -> list[tuple[str, bool]]:
        """As leader: the live schedulers (False) and standby heads (True) that hold a blob,
        in random order."""
        if not self._leading():
            return []
        heads = [h.removeprefix(STANDBY) for h in self.blobs.holders(sha256) if h.startswith(STANDBY)]
        sources = [(h, False) for h in self._holders(sha256)] + [(h, True) for h in heads]
        random.shuffle(sources)
        return sources

    async def _fetch(self, sha256: str, size: int) -> None:
        try:
            async with self._slots:
                await self._fetch_from_sources(sha256, size)
        finally:
            self._fetching.pop(sha256, None)

    async def _fetch_from_sources(self, sha256: str, size: int) -> None:
        leader = None if self._leading() else self._leader()
        sources = [(leader, True)] if leader else self._sources(sha256)
        error = "no head or scheduler holds it now" if not sources else ""
        for address, head in sources:
            have = self.blobs.stat(sha256).have
            try:
                chunks = self.peers.download(address, sha256, have, head=head)
                chunks = until_idle(chunks, address, self.idle_s)
                info = await self.blobs.receive(sha256, size, have, chunks)
            except ShoalError as err:  # InvalidArgument too: bytes that are not the blob
                error = f"{address}: {err}"
                if isinstance(err, NotFound) and not head:
                    self._gone(sha256, address)  # its cache evicted it, unheard: no holder
                continue
            if info.complete:
                self._failures.pop(sha256, None)
                if leader:
                    log.info("blob mirror: copied sha256:%s (%d bytes) from %s", sha256[:12], size, address)
                else:
                    log.warning(
                        "fetched back blob sha256:%s (%d bytes) from %s: this head had lost it",
                        sha256[:12],
                        size,
                        address,
                    )
                if leader:
                    with contextlib.suppress(ShoalError):  # said again when the leader changes
                        await self.peers.hold(leader, sha256)
                return
            error = f"{address} ended the stream at byte {info.have} of {size}"
        failures = self._failures.get(sha256, (0, 0.0))[0] + 1
        pause = min(RETRY_MAX_S, self.every_s * 2**failures)
        self._failures[sha256] = (failures, time.monotonic() + pause)
        log.warning(
            "blob mirror: sha256:%s not copied (%s); trying again in %.1fs", sha256[:12], error, pause
        )

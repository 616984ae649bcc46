"""The head's blob store: uploads received, kept by hash, served to schedulers, collected.

Files under ``root`` (``<state_dir>/blobs``, beside the SQLite file; with the etcd store
the head still keeps them on its own disk):

* ``<sha256>``: a whole blob, its hash verified;
* ``partial/<sha256>``: an upload in progress or dropped. A new upload of the same blob
  continues where it ends (:meth:`BlobStore.stat` tells the CLI where).

Bounded: an upload is refused (ResourceExhausted, keeping nothing) when the blobs held
(whole, and partial uploads counted at the size they announced) would pass ``max_total``,
or when its bytes would leave less than ``keep_free`` free on the disk, where the state
file lies too; and (LimitReached) when ``max_count`` blobs, whole and partial, are held
besides it: announcing a byte and sending none kept a file each, without end.

Collected (:meth:`BlobStore.collect`): a blob that no deployment and no kept revision names
is deleted once it has gone unnamed for ``grace_s`` (counted from its upload, or from the
last time a collection found it named); a partial upload, once ``grace_s`` has passed
since its last byte.

Which schedulers hold a blob whole (they fetched it to the end) is remembered in memory
only: a restarted head, or a standby that takes over, learns it again as each scheduler
registers (it tells the head every blob its cache holds) and from their next fetches. The
records follow the caches: a scheduler tells the head each blob its cache evicts
(:meth:`BlobStore.drop_holder`); one that registers again is forgotten as a holder until it
tells again what it holds, and one the head forgets is forgotten here too
(:meth:`BlobStore.forget_holder`). At most :data:`MAX_HELD` blobs are recorded per holder.

A blob being read (a Download in progress, by a scheduler or a standby head) is not
collected until the read ends.

A blob lost from this disk while the blob index lists it (deleted by hand, say, or
deleted as damaged when it was served) is fetched back from a scheduler that holds it
(``shoal.head.blob_mirror``, which the single head runs too).

With standby heads (the etcd store), each keeps a copy (``shoal.head.blob_mirror``): it
tells the leader it is there (:meth:`BlobStore.standby_seen`) and which blobs it holds
(holders named :func:`standby_holder`), and the leader's upload answers once a live standby
holds the blob (:meth:`BlobStore.wait_for_standby`).

Call from one event loop; file work runs in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable, Container, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.core.blobs import CHUNK, HEX, check_hex, file_sha256, parse_uri, read_chunks
from shoal.core.clock import wait_for
from shoal.core.cluster import ALIVE
from shoal.core.spec import DeploymentSpec, parse_spec_json, uri_scheme
from shoal.core.tasks import TaskSet
from shoal.errors import InvalidArgument, LimitReached, NotFound, ResourceExhausted, Unavailable

if TYPE_CHECKING:
    from shoal.head.node import HeadNode

log = logging.getLogger("shoal.head")


@dataclass(frozen=True)
class BlobInfo:
    sha256: str
    size: int  # the whole blob's (0 when the head has none of it)
    complete: bool
    have: int  # bytes held: ``size`` when complete, else where an upload resumes


def _hash_prefix(path: Path, size: int, digest: hashlib._Hash) -> None:
    """Add the first ``size`` bytes of ``path`` to ``digest``."""
    with path.open("rb") as f:
        while size > 0 and (chunk := f.read(min(CHUNK, size))):
            digest.update(chunk)
            size -= len(chunk)


def blob_of(spec: DeploymentSpec) -> str:
    """The hash of the blob ``spec`` names; "" when it names none."""
    uri = spec.artifact_uri()
    if uri_scheme(uri) != "blob":
        return ""
    try:
        return parse_uri(uri).sha256
    except ValueError:
        return ""


def blobs_named(specs: Iterable[DeploymentSpec], spec_jsons: Iterable[str]) -> set[str]:
    """The blobs the ``specs`` and the specs in ``spec_jsons`` (kept revisions) name."""
    out = {blob_of(s) for s in specs}
    for text in spec_jsons:
        try:
            out.add(blob_of(parse_spec_json(text)))
        except Exception:  # an unreadable old revision names nothing collectable
            continue
    out.discard("")
    return out


def in_use(node: HeadNode) -> set[str]:
    """The blobs ``node``'s deployments and their kept revisions name."""
    names = {*node.desired, *node.broken}
    return blobs_named(node.desired.values(), (r.spec_json for n in names for r in node.history.revisions(n)))


def holder_addresses(node: HeadNode, store: BlobStore, sha256: str) -> list[str]:
    """The addresses of the live schedulers that hold ``sha256`` whole, sorted."""
    held = store.holders(sha256)
    return sorted(s.address for s in node.state.schedulers.values() if s.id in held and s.state == ALIVE)


def drop_holder_at(node: HeadNode, store: BlobStore, sha256: str, address: str) -> None:
    """The scheduler at ``address`` answered it has no ``sha256``: it holds it no more."""
    for sched in node.state.schedulers.values():
        if sched.address == address:
            store.drop_holder(sha256, sched.id)


STANDBY = "standby-head:"
"""How a standby head names itself as a holder (``BlobRef.holder``): never a scheduler id's
start, so schedulers are never pointed at a standby (which answers nothing)."""

NO_BLOB = "0" * 64
"""The hash a standby's Stat names when it only says it is there (it holds no such blob)."""

STANDBY_ALIVE_S = 5.0
"""A standby that has not said it is there for this long is not waited for."""


MAX_STANDBYS = 16
"""Standby heads counted at once; more are not waited for."""

MAX_HELD = 10_000
"""Blobs recorded per holder: a cache of 10 GB (``artifact_cache_mb``'s default) holding
models of 1 MB each. Past it a holder's further blobs are not recorded (logged once): peers
are not pointed at it for them."""


KEEP_FREE = 2**30
"""Bytes an upload must leave free on the blob store's disk: the head's state file is
beside it, and a disk the blobs filled refused every deploy, scale and delete."""


def standby_wait_s(size: int) -> float:
    """How long an upload of ``size`` bytes waits for a standby's copy before it answers
    anyway: 30 s, and a second per 50 MB."""
    return 30.0 + size / (50 * 2**20)


def standby_holder(head_address: str) -> str:
    """The holder name of the standby head at ``head_address``."""
    return STANDBY + head_address


class BlobStore:
    """See the module's docstring. ``max_bytes``: the largest blob an upload may send;
    ``max_total``: the most bytes of blobs held in all; ``max_count``: the most blobs held,
    whole and partial; ``keep_free``: the bytes an upload must leave free on the disk."""

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int,
        grace_s: float,
        max_total: int = 50 * 2**30,
        max_count: int = 10_000,
        keep_free: int = KEEP_FREE,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.grace_s = grace_s
        self.max_total = max_total
        self.max_count = max_count
        self.keep_free = keep_free
        self._sizes: dict[str, int] = {}  # partial uploads' declared sizes
        self._named_at: dict[str, float] = {}  # blob -> when it was last found named
        self._holders: dict[str, set[str]] = {}  # blob -> scheduler ids holding it whole
        self._held: dict[str, set[str]] = {}  # the same, by holder: holder -> blobs
        self._full: set[str] = set()  # holders past MAX_HELD (logged once)
        self._standbys: dict[str, float] = {}  # standby holder name -> when it said it is there
        self._changed = asyncio.Event()  # set (and replaced) when a holder or standby is added
        self._writing: set[str] = set()
        self._reading: Counter[str] = Counter()  # blob -> Downloads in progress
        self.on_whole: Callable[[str], None] = lambda sha256: None  # a blob just became whole
        # A blob asked for that this head lacks whole (lost from its disk, or just deleted as
        # damaged): the mirror (shoal.head.blob_mirror) fetches it back from a holder.
        self.on_missing: Callable[[str], None] = lambda sha256: None
        # Uploads of one blob take turns: its lock, while any upload of it runs or waits
        # (dropped after, or a refused hash would stay for good), and how many do.
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: Counter[str] = Counter()
        self._admitting = asyncio.Lock()  # one upload at a time is counted against the bounds
        self._tasks = TaskSet("blobs")

    # ------------------------------------------------------------ lifecycle

    def start(self, named: Callable[[], set[str] | None], every_s: float) -> None:
        """Collect every ``every_s`` seconds, ``named()`` telling which blobs are in use
        (``None``: it cannot tell now, collect nothing this time)."""
        (self.root / "partial").mkdir(parents=True, exist_ok=True)
        self._tasks.spawn(self._collect_loop(named, every_s), "collect")

    async def aclose(self) -> None:
        await self._tasks.aclose()

    async def _collect_loop(self, named: Callable[[], set[str] | None], every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            blobs = named()
            if blobs is None:
                continue
            try:
                await self.collect(blobs, time.time())
            except OSError as err:
                log.warning("collecting blobs in %s: %s", self.root, err)

    # ------------------------------------------------------------ reading

    def _whole(self, sha256: str) -> Path:
        return self.root / sha256

    def _partial(self, sha256: str) -> Path:
        return self.root / "partial" / sha256

    def stat(self, sha256: str) -> BlobInfo:
        """What the head has of ``sha256``. InvalidArgument for a malformed hash."""
        check_hex(sha256)
        try:
            size = self._whole(sha256).stat().st_size
            return BlobInfo(sha256, size, True, size)
        except FileNotFoundError:
            pass
        try:
            have = self._partial(sha256).stat().st_size
        except FileNotFoundError:
            have = 0
        return BlobInfo(sha256, self._sizes.get(sha256, 0), False, have)

    def whole(self) -> set[str]:
        """The hashes of the blobs this head holds whole."""
        if not self.root.is_dir():
            return set()
        return {p.name for p in self.root.iterdir() if HEX.match(p.name) and p.is_file()}

    async def read(self, sha256: str, offset: int) -> AsyncIterator[bytes]:
        """The blob's bytes from ``offset``, in chunks; not collected meanwhile. NotFound when
        the head lacks it whole; InvalidArgument for an offset past its end.

        The bytes' hash is checked as they are read (those before ``offset`` too), and the
        last chunk is held back until it is: a copy damaged on the head's disk is deleted
        (logged) and the read ends NotFound instead, so that the blob is fetched back from a
        scheduler holding it (:attr:`on_missing`), or a new upload replaces it. It used to be
        sent as it was: every scheduler's fetch failed its hash check, and ``shoal deploy
        --upload`` of the good file sent nothing (the head said it had it)."""
        check_hex(sha256)
        self._reading[sha256] += 1
        path = self._whole(sha256)
        try:
            digest = hashlib.sha256()
            if offset > 0:
                await asyncio.to_thread(_hash_prefix, path, offset, digest)
            held = b""
            async for chunk in read_chunks(path, offset):
                if held:
                    yield held
                await asyncio.to_thread(digest.update, chunk)
                held = chunk
            if digest.hexdigest() != sha256:
                await self._damaged(sha256, digest.hexdigest())
                self.on_missing(sha256)
                raise NotFound(
                    f"the head's copy of blob sha256:{sha256} was damaged on its disk (its bytes hash "
                    f"to sha256:{digest.hexdigest()}) and is deleted: it fetches it back from a scheduler "
                    "that holds it, else upload it again (shoal deploy --upload)"
                )
            if held:
                yield held
        except FileNotFoundError:
            self.on_missing(sha256)
            raise NotFound(f"the head has no blob sha256:{sha256}") from None
        finally:
            self._reading[sha256] -= 1
            if self._reading[sha256] <= 0:
                del self._reading[sha256]

    async def _damaged(self, sha256: str, actual: str) -> None:
        """The whole blob ``sha256`` on disk hashes to ``actual``: delete it (it is then
        fetched back from a scheduler that holds a verified copy, or a new upload replaces it)."""
        log.error(
            "blob sha256:%s in %s is damaged (its bytes hash to sha256:%s): deleted; fetching it back "
            "from a scheduler that holds it, else upload it again",
            sha256[:12],
            self.root,
            actual[:12],
        )
        with contextlib.suppress(FileNotFoundError):
            # Hashed again: another read may have found it first, and an upload replaced it.
            if await asyncio.to_thread(file_sha256, self._whole(sha256)) != sha256:
                self._whole(sha256).unlink()

    def check_named(self, spec: DeploymentSpec) -> None:
        """InvalidArgument when ``spec`` names a blob this head lacks; otherwise its grace
        starts again (a blob just named is not collected before the spec is stored)."""
        blob = blob_of(spec)
        if not blob:
            return
        if not self.stat(blob).complete:
            raise InvalidArgument(
                f"deployment {spec.name!r}: {spec.artifact_uri()} names a blob this head does not have "
                "(shoal deploy uploads a local model file or folder first)"
            )
        self._named_at[blob] = time.time()

    # ------------------------------------------------------------ holders

    def add_holder(self, sha256: str, holder: str) -> None:
        """``holder`` (a scheduler id, or a :func:`standby_holder`) holds ``sha256`` whole.
        Not recorded past :data:`MAX_HELD` blobs of that holder."""
        if holder.startswith(STANDBY):
            self.standby_seen(holder)
        held = self._held.setdefault(holder, set())
        if sha256 not in held and len(held) >= MAX_HELD:
            if holder not in self._full:
                self._full.add(holder)
                log.warning(
                    "%s says it holds more than %d blobs: the rest are not recorded (peers are not "
                    "pointed at it for them)",
                    holder,
                    MAX_HELD,
                )
            return
        held.add(sha256)
        self._holders.setdefault(sha256, set()).add(holder)
        self._notify()

    def drop_holder(self, sha256: str, holder: str) -> None:
        """``holder`` no longer holds ``sha256`` (its cache evicted it)."""
        self._held.get(holder, set()).discard(sha256)
        self._unlist(sha256, holder)
        self._full.discard(holder)

    def forget_holder(self, holder: str) -> None:
        """Drop every record of ``holder``: a scheduler that registers again (it then tells
        what its cache holds now), or one the head forgot."""
        for sha256 in self._held.pop(holder, set()):
            self._unlist(sha256, holder)
        self._full.discard(holder)

    def _unlist(self, sha256: str, holder: str) -> None:
        held_by = self._holders.get(sha256)
        if held_by is not None:
            held_by.discard(holder)
            if not held_by:
                del self._holders[sha256]

    def keep_holders(self, schedulers: Container[str]) -> None:
        """Forget the scheduler holders not in ``schedulers`` (the head forgot them); standby
        heads are kept."""
        for holder in [h for h in self._held if not h.startswith(STANDBY) and h not in schedulers]:
            self.forget_holder(holder)

    def holders(self, sha256: str) -> set[str]:
        return set(self._holders.get(sha256, ()))

    def standby_seen(self, holder: str) -> None:
        """The standby head ``holder`` (a :func:`standby_holder`) says it is there."""
        now = time.monotonic()
        self._standbys = {h: t for h, t in self._standbys.items() if now - t <= STANDBY_ALIVE_S}
        if holder not in self._standbys:
            if len(self._standbys) >= MAX_STANDBYS:
                return
            log.info("%s keeps copies of the blobs: uploads wait for its copy", holder.removeprefix(STANDBY))
        self._standbys[holder] = now
        self._notify()

    def standbys(self) -> int:
        """How many standby heads said they are there within STANDBY_ALIVE_S."""
        return len(self._live_standbys())

    def _live_standbys(self) -> set[str]:
        now = time.monotonic()
        return {h for h, seen in self._standbys.items() if now - seen <= STANDBY_ALIVE_S}

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for_standby(self, sha256: str, timeout_s: float) -> bool:
        """Wait until a live standby head holds ``sha256`` (True), or none is live (True:
        there is no copy to wait for), or ``timeout_s`` passed (False)."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    live = self._live_standbys()
                    if not live or live & self.holders(sha256):
                        return True
                    # Woken by a holder or a standby's word; and to notice a standby gone quiet.
                    with contextlib.suppress(TimeoutError):
                        await wait_for(self._changed.wait(), STANDBY_ALIVE_S)
        except TimeoutError:
            return False

    # ------------------------------------------------------------ writing

    async def receive(self, sha256: str, size: int, offset: int, chunks: AsyncIterable[bytes]) -> BlobInfo:
        """Add ``chunks``, the bytes of blob ``sha256`` (``size`` in all) from ``offset``, to
        what the head has of it; once all ``size`` bytes are in and their hash is ``sha256``,
        the blob is whole. ``offset`` may not pass the end of the partial upload (0 for a new
        one); bytes the head has already are skipped. Uploads of one blob take turns.

        InvalidArgument: a malformed hash, a size over ``max_bytes``, an offset past the end
        of the partial upload, more bytes than ``size``, a hash that is not ``sha256`` (the
        partial upload is then deleted). A dropped stream keeps what arrived, for the next
        upload to continue. A size unlike an earlier upload's is taken (the hash tells which
        was right); Unavailable when the head held more than it: the partial upload is
        deleted, and the client's next try starts from 0."""
        check_hex(sha256)
        if size < 0 or size > self.max_bytes:
            raise InvalidArgument(
                f"blob sha256:{sha256} is {size} bytes; this head takes blobs of at most "
                f"{self.max_bytes // 2**20} MB (setting max_blob_mb)"
            )
        lock = self._locks.setdefault(sha256, asyncio.Lock())
        self._lock_users[sha256] += 1
        try:
            async with lock:
                return await self._receive(sha256, size, offset, chunks)
        finally:
            self._lock_users[sha256] -= 1
            if self._lock_users[sha256] <= 0:
                del self._lock_users[sha256]
                self._locks.pop(sha256, None)

    async def _receive(self, sha256: str, size: int, offset: int, chunks: AsyncIterable[bytes]) -> BlobInfo:
        info = self.stat(sha256)
        if info.complete:
            if info.size != size:
                raise InvalidArgument(f"blob sha256:{sha256} is {info.size} bytes, not {size}")
            return info
        known = self._sizes.get(sha256)
        if known is not None and known != size and info.have:
            # An earlier upload announced another size and dropped: one of the two is wrong,
            # and the hash at the end tells which. This used to be refused until the partial
            # upload was collected (blob_grace_s): a dropped upload of a buggy client kept the
            # right one out for an hour.
            log.warning(
                "blob sha256:%s: an earlier upload announced %d bytes, this one %d: taking %d",
                sha256[:12],
                known,
                size,
                size,
            )
            if info.have > size:  # what it holds cannot be the start of this one
                self._partial(sha256).unlink(missing_ok=True)
                self._sizes.pop(sha256, None)
                raise Unavailable(
                    f"the head held {info.have} bytes of blob sha256:{sha256}, more than the {size} "
                    "announced: it dropped them; upload it again from the start"
                )
        if offset < 0 or offset > info.have:
            raise InvalidArgument(
                f"upload of blob sha256:{sha256} starts at offset {offset}, but the head has "
                f"{info.have} bytes of it: resume from there"
            )
        await self._admit(sha256, size, info.have)
        self._writing.add(sha256)  # no await since the admission: counted by the next one
        self._sizes[sha256] = size
        partial = self._partial(sha256)
        try:
            await asyncio.to_thread(partial.parent.mkdir, parents=True, exist_ok=True)
            f = await asyncio.to_thread(partial.open, "ab")
            written = info.have
            at = offset  # where the next chunk starts in the blob
            try:
                async for chunk in chunks:
                    if at + len(chunk) > size:
                        raise InvalidArgument(
                            f"upload of blob sha256:{sha256} sends more than its {size} bytes"
                        )
                    new = chunk[written - at :] if at < written else chunk
                    at += len(chunk)
                    if new:
                        await asyncio.to_thread(f.write, new)
                        written += len(new)
            finally:
                f.close()
            if written < size:
                return BlobInfo(sha256, size, False, written)
            actual = await asyncio.to_thread(file_sha256, partial)
            if actual != sha256:
                partial.unlink(missing_ok=True)
                self._sizes.pop(sha256, None)
                raise InvalidArgument(
                    f"the uploaded bytes hash to sha256:{actual}, not sha256:{sha256}: upload it again"
                )
            os.replace(partial, self._whole(sha256))
            self._sizes.pop(sha256, None)
            self._named_at[sha256] = time.time()
            log.info("blob sha256:%s received whole (%d bytes)", sha256[:12], size)
            self.on_whole(sha256)
            return BlobInfo(sha256, size, True, size)
        finally:
            self._writing.discard(sha256)

    async def admit(self, sha256: str, size: int) -> None:
        """Raises what :meth:`receive` would refuse an upload of ``sha256`` announcing
        ``size`` bytes for now, as :meth:`_admit` (asked by a ``Stat`` naming the size, before
        a byte is sent). A blob held whole passes."""
        info = self.stat(sha256)
        if not info.complete:
            await self._admit(sha256, size, info.have)

    async def _admit(self, sha256: str, size: int, have: int) -> None:
        """ResourceExhausted unless ``size`` bytes of ``sha256`` (``have`` of them here
        already) fit within ``max_total`` and leave ``keep_free`` on the disk; LimitReached
        when ``max_count`` other blobs (whole, and uploads in progress or dropped) are held."""
        async with self._admitting:
            # Counted from the names first (6 ms at 10,000): a client refused in a loop must
            # not hold the admission a stat of every file long (50 ms at 10,000) each time.
            count = await asyncio.to_thread(self._count, sha256)
            if count >= self.max_count:
                raise LimitReached(
                    f"the head holds {count} blobs (whole, and uploads in progress or dropped), its "
                    f"limit (setting max_blobs): blob sha256:{sha256} was not taken; delete the "
                    "deployments that name old ones (their blobs go blob_grace_s later, and a dropped "
                    "upload blob_grace_s after its last byte), or raise max_blobs"
                )
            held, coming = await asyncio.to_thread(self._usage, sha256)
            if held + size > self.max_total:
                raise ResourceExhausted(
                    f"the head holds {held} bytes of blobs (whole, and uploads in progress or "
                    f"dropped): blob sha256:{sha256} of {size} bytes would pass its limit of "
                    f"{self.max_total // 2**20} MB (setting max_blobs_mb); delete the deployments "
                    "that name old ones (their blobs go blob_grace_s later), or raise the limit"
                )
            usage = await asyncio.to_thread(shutil.disk_usage, self.root)
            if usage.free - coming - (size - have) < self.keep_free:
                raise ResourceExhausted(
                    f"blob sha256:{sha256} of {size} bytes would leave less than "
                    f"{self.keep_free // 2**20} MB free on the disk of {self.root} ({usage.free} "
                    "bytes free): the head's state file needs it; free space there, or delete the "
                    "deployments that name old blobs (they go blob_grace_s later)"
                )

    def _count(self, sha256: str) -> int:
        """How many blobs but ``sha256`` are held whole or partial, or being uploaded. Makes
        the root."""
        self.root.mkdir(parents=True, exist_ok=True)
        names = {n for n in os.listdir(self.root) if HEX.match(n)}
        partial = self.root / "partial"
        names.update(os.listdir(partial) if partial.is_dir() else ())
        return len((names | self._writing) - {sha256})

    def _usage(self, sha256: str) -> tuple[int, int]:
        """The bytes of the blobs held or being uploaded but ``sha256`` (a partial upload at
        the size it announced), and how many of them are still to come. Makes the root."""
        self.root.mkdir(parents=True, exist_ok=True)
        held = 0
        for path in self.root.iterdir():
            if HEX.match(path.name) and path.name != sha256:
                with contextlib.suppress(FileNotFoundError):
                    held += path.stat().st_size
        partial = {}
        for path in (self.root / "partial").iterdir() if (self.root / "partial").is_dir() else ():
            with contextlib.suppress(FileNotFoundError):
                partial[path.name] = path.stat().st_size
        coming = 0
        for blob in (set(partial) | self._writing) - {sha256}:
            announced = max(partial.get(blob, 0), self._sizes.get(blob, 0))
            held += announced
            if blob in self._writing:
                coming += announced - partial.get(blob, 0)
        return held, coming

    # ------------------------------------------------------------ collecting

    async def collect(self, named: set[str], now: float) -> list[str]:
        """Delete the blobs not in ``named`` that have gone unnamed for ``grace_s``, and the
        partial uploads idle that long; returns the hashes of the whole blobs deleted."""
        return await asyncio.to_thread(self._collect, named, now)

    def _collect(self, named: set[str], now: float) -> list[str]:
        gone = []
        for path in self.root.iterdir() if self.root.is_dir() else ():
            if not (path.is_file() and HEX.match(path.name)):
                continue
            blob = path.name
            if blob in self._reading:  # a Download in progress: its grace goes on
                continue
            if blob in named:
                self._named_at[blob] = now
                os.utime(path, (now, now))  # a restarted head counts the grace from here
                continue
            since = self._named_at.get(blob)
            if since is None:
                since = self._named_at[blob] = path.stat().st_mtime  # uploaded, or named, before this start
            if now - since >= self.grace_s:
                path.unlink(missing_ok=True)
                self._named_at.pop(blob, None)
                for holder in self._holders.pop(blob, set()):
                    self._held.get(holder, set()).discard(blob)
                gone.append(blob)
        partial = self.root / "partial"
        for path in partial.iterdir() if partial.is_dir() else ():
            if path.name in self._writing:
                continue
            try:
                if now - path.stat().st_mtime >= self.grace_s:
                    path.unlink(missing_ok=True)
                    self._sizes.pop(path.name, None)
            except FileNotFoundError:
                continue
        if gone:
            log.info("collected %d blob(s) no deployment or kept revision names", len(gone))
        return gone

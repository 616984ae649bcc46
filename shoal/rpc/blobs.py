"""The Blob service over gRPC: the head's (Upload, Stat, Download), a scheduler's
(Download from its artifact cache), the scheduler's client of both, a head's client of
the leader and the schedulers (standby copies), and the CLI's upload.

Who may call what is ``shoal.rpc.auth`` (Upload: role deploy; Stat: role deploy, a
scheduler or a head; Download: schedulers and heads); a Stat that speaks for a holder is
checked here too (:meth:`HeadBlobService._check_claim`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import grpc.aio

from shoal.config import Settings
from shoal.core.blobs import CHUNK, Packed, check_hex, read_chunks
from shoal.core.cluster import same_host
from shoal.core.limits import shown
from shoal.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ShoalError,
    Unavailable,
)
from shoal.head.blobs import NO_BLOB, STANDBY, BlobInfo, BlobStore, holder_addresses, standby_wait_s
from shoal.head.node import HeadNode
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.auth import is_peer, peer_host
from shoal.rpc.channels import PeerChannel, open_channel
from shoal.rpc.clients import auth_metadata, head_addresses
from shoal.rpc.status import Context, abort, to_error
from shoal.scheduler.artifacts import ArtifactCache
from shoal.scheduler.blob_fetch import HEAD, Located

log = logging.getLogger("shoal.rpc")


def _stat_pb(info: BlobInfo, max_size: int, holders: list[str] | None = None) -> pb.BlobStat:
    return pb.BlobStat(
        sha256=info.sha256,
        size=info.size,
        complete=info.complete,
        have=info.have,
        holders=holders or [],
        max_size=max_size,
    )


async def _chunks(sha256: str, offset: int, source: AsyncIterator[bytes]) -> AsyncIterator[pb.BlobChunk]:
    async for data in source:
        yield pb.BlobChunk(sha256=sha256, offset=offset, data=data)
        offset += len(data)


def uploads_refused(settings: Settings) -> str | None:
    """Why this head takes no upload, or None: with ``allowed_model_dirs`` or
    ``allowed_model_uris`` set and no ``blob://`` prefix among the URIs, a spec naming an
    uploaded blob is refused (``shoal.core.model_dirs``), so its upload is refused before
    its bytes are sent, not after (they used to be sent, kept, and the deploy refused)."""
    prefixes = settings.model_uri_prefixes
    if any(p.startswith("blob://") for p in prefixes):
        return None
    if prefixes:
        return (
            "this head takes no uploads: models come only from the URIs "
            f"{', '.join(prefixes)} (setting allowed_model_uris)"
        )
    if settings.allowed_model_dirs:
        return (
            "this head takes no uploads: models come only from the folders "
            f"{', '.join(settings.allowed_model_dirs)} (setting allowed_model_dirs)"
        )
    return None


class HeadBlobService(pbg.BlobServicer):
    def __init__(self, store: BlobStore, node: HeadNode) -> None:
        self.store = store
        self.node = node

    async def Upload(self, request_iterator: AsyncIterator[pb.BlobChunk], context: Context) -> pb.BlobStat:
        refusal = uploads_refused(self.node.settings)
        if refusal is not None:
            await abort(context, PermissionDenied(refusal))
        messages = aiter(request_iterator)
        try:
            first = await anext(messages)
        except StopAsyncIteration:
            await abort(context, InvalidArgument("an upload sends at least one message, naming the blob"))

        async def data() -> AsyncIterator[bytes]:
            if first.data:
                yield first.data
            async for msg in messages:
                if msg.sha256 and msg.sha256 != first.sha256:
                    raise InvalidArgument("every message of an upload is of the blob the first one names")
                yield msg.data

        try:
            info = await self.store.receive(first.sha256, first.size, first.offset, data())
        except ShoalError as err:
            await abort(context, err)
        except OSError as err:  # a full disk, say: the client may try again later
            log.warning("blob sha256:%s: cannot store it: %s", first.sha256[:12], err)
            await abort(context, Unavailable(f"the head cannot store the blob now: {err.strerror or err}"))
        # Durable before it is acknowledged: a standby head holds a copy too (when one is there).
        if info.complete and not await self.store.wait_for_standby(info.sha256, standby_wait_s(info.size)):
            log.warning(
                "blob sha256:%s: no standby head copied it in time; until one does it is on this head only",
                info.sha256[:12],
            )
        return _stat_pb(info, self.store.max_bytes)

    async def Stat(self, request: pb.BlobRef, context: Context) -> pb.BlobStat:
        try:
            info = self.store.stat(request.sha256)
            self._check_claim(request.holder, context)
            if 0 < request.size <= self.store.max_bytes and not request.holder:
                # A client about to upload (over max_blob_mb, the reply's max_size tells it,
                # and it names its file).
                await self.store.admit(request.sha256, request.size)
        except ShoalError as err:
            await abort(context, err)
        if request.released:
            # A scheduler's cache evicted it: peers are no longer pointed there, nor is the
            # head's fetch back.
            if request.holder:
                self.store.drop_holder(request.sha256, request.holder)
            return _stat_pb(info, self.store.max_bytes)
        if request.holder.startswith(STANDBY) and not info.complete:
            self.store.standby_seen(request.holder)  # a standby saying it is there (NO_BLOB)
        elif request.holder.startswith(STANDBY) or request.holder in self.node.state.schedulers:
            # A registered scheduler's copy counts even when this head lacks the blob: a head
            # that took over fetches the blobs it lacks from them (shoal.head.blob_mirror).
            # Another id is not recorded: it would be kept for good (a scheduler forgets
            # its claims when it registers, and tells them again after).
            self.store.add_holder(request.sha256, request.holder)
        if not info.complete and not request.holder.startswith(STANDBY):
            self.store.on_missing(request.sha256)  # lost from the head's disk: fetched back from a holder
        return _stat_pb(info, self.store.max_bytes, holder_addresses(self.node, self.store, request.sha256))

    def _check_claim(self, holder: str, context: Context) -> None:
        """Who may say ``holder`` holds a blob, or released it (PermissionDenied otherwise).
        A standby head: a head's certificate (with TLS). A scheduler: itself, as far as the head
        can tell without a key per scheduler: with TLS a scheduler's certificate (a ``deploy``
        token may ask what the head has, not speak for a scheduler), and the call must come
        from the host the scheduler registered from, as the head saw it (every scheduler
        holds the same certificate). Before, any caller ``Stat`` admits could add or drop any
        scheduler as a holder, pointing its peers at a scheduler without the blob, or away
        from one with it."""
        if not holder:
            return
        tls = bool(self.node.settings.tls_dir)
        if holder.startswith(STANDBY):
            if tls and not is_peer(context, "head"):
                raise PermissionDenied("only a head's certificate may speak for a standby head")
            return
        if tls and not is_peer(context, "scheduler"):
            raise PermissionDenied(
                f"only a scheduler, with a scheduler's certificate, says what it holds ({shown(holder)!r})"
            )
        sched = self.node.state.schedulers.get(holder)
        caller = peer_host(context)
        if sched is not None and sched.peer and not same_host(sched.peer, caller):
            raise PermissionDenied(
                f"scheduler {holder} registered from {sched.peer}, and this call comes from {caller}: "
                "a scheduler says what it holds from its own host"
            )

    async def Download(
        self, request: pb.BlobDownloadRequest, context: Context
    ) -> AsyncIterator[pb.BlobChunk]:
        try:
            async for chunk in _chunks(
                request.sha256, request.offset, self.store.read(request.sha256, request.offset)
            ):
                yield chunk
        except ShoalError as err:
            await abort(context, err)


class SchedulerBlobService(pbg.BlobServicer):
    """A scheduler's: Download of the blobs its artifact cache holds, for its peers."""

    def __init__(self, cache: ArtifactCache) -> None:
        self.cache = cache

    async def Upload(self, request_iterator: AsyncIterator[pb.BlobChunk], context: Context) -> pb.BlobStat:
        await abort(context, FailedPrecondition("blobs are uploaded to the head, not to a scheduler"))

    async def Stat(self, request: pb.BlobRef, context: Context) -> pb.BlobStat:
        await abort(context, FailedPrecondition("ask the head which blobs it has, not a scheduler"))

    async def Download(
        self, request: pb.BlobDownloadRequest, context: Context
    ) -> AsyncIterator[pb.BlobChunk]:
        try:
            path = self.cache.blob_file(check_hex(request.sha256))
            if path is None:
                raise NotFound(f"this scheduler's artifact cache has no blob sha256:{request.sha256}")
            async for chunk in _chunks(request.sha256, request.offset, read_chunks(path, request.offset)):
                yield chunk
        except FileNotFoundError:  # evicted meanwhile
            await abort(context, NotFound(f"blob sha256:{request.sha256} left this scheduler's cache"))
        except ShoalError as err:
            await abort(context, err)


class GrpcBlobSource:
    """A scheduler's :class:`shoal.scheduler.blob_fetch.BlobSource`: Stat at the head (the
    one of several that answers), Download from a peer's control port or the head; ``hold``
    tells the head this scheduler (``scheduler_id``) holds a blob, for the peers."""

    def __init__(self, head_address: str, settings: Settings, scheduler_id: str) -> None:
        self._settings = settings
        self._scheduler_id = scheduler_id
        self._heads = [
            PeerChannel(a, settings, "scheduler", server="head") for a in head_addresses(head_address)
        ]
        self._head = 0
        self._channels: dict[str, PeerChannel] = {}
        self.own_address = ""  # this scheduler's, left out of the holders

    async def _stat(self, ref: pb.BlobRef) -> pb.BlobStat:
        """Stat at the head that answers (the leader: standbys answer UNAVAILABLE)."""
        error: ShoalError = Unavailable("no head address")
        for i in [self._head, *(j for j in range(len(self._heads)) if j != self._head)]:
            try:
                stub = self._heads[i].stub(pbg.BlobStub)
                reply: pb.BlobStat = await stub.Stat(ref, timeout=self._settings.rpc_timeout_s)
            except grpc.aio.AioRpcError as err:
                error = to_error(err)
                continue
            self._head = i
            return reply
        raise error

    async def locate(self, sha256: str) -> Located:
        reply = await self._stat(pb.BlobRef(sha256=sha256))
        holders = [h for h in reply.holders if h != self.own_address]
        if not reply.complete and holders:
            # The head lost its copy; a scheduler holds one, and the head fetches it back.
            return Located(0, holders, fetching_back=True)
        if not reply.complete:
            raise NotFound(
                f"the head has no blob sha256:{sha256} (collected, lost from its disk, or uploaded to "
                "another head), and no scheduler holds a copy: upload it again (shoal deploy --upload)"
            )
        return Located(reply.size, holders)

    async def hold(self, sha256: str) -> None:
        await self._stat(pb.BlobRef(sha256=sha256, holder=self._scheduler_id))

    async def release(self, sha256: str) -> None:
        await self._stat(pb.BlobRef(sha256=sha256, holder=self._scheduler_id, released=True))

    async def download(self, address: str, sha256: str, offset: int) -> AsyncIterator[bytes]:
        peer = self._heads[self._head] if address == HEAD else self._channels.get(address)
        if peer is None:
            peer = self._channels[address] = PeerChannel(
                address, self._settings, "scheduler", server="scheduler"
            )
        stub = peer.stub(pbg.BlobStub)
        request = pb.BlobDownloadRequest(sha256=sha256, offset=offset, scheduler_id=self._scheduler_id)
        async for data in _download(stub, request):
            yield data

    async def aclose(self) -> None:
        await _close(self._channels)
        for head in self._heads:
            await head.close()


async def _download(stub: pbg.BlobAsyncStub, request: pb.BlobDownloadRequest) -> AsyncIterator[bytes]:
    try:
        async for chunk in stub.Download(request):
            yield chunk.data
    except grpc.aio.AioRpcError as err:
        raise to_error(err) from None


async def _close(channels: dict[Any, PeerChannel]) -> None:
    for channel in channels.values():
        await channel.close()
    channels.clear()


class GrpcHeadPeers:
    """A head's :class:`shoal.head.blob_mirror.HeadPeers`: the leader's Blob service (for a
    standby) and the schedulers' (for a leader missing a blob), with the head's certificate.
    ``me``: this head's holder name (``shoal.head.blobs.standby_holder``)."""

    def __init__(self, settings: Settings, me: str) -> None:
        self._settings = settings
        self.me = me
        self._channels: dict[tuple[str, str], PeerChannel] = {}

    def _stub(self, address: str, server: str) -> pbg.BlobAsyncStub:
        peer = self._channels.get((address, server))
        if peer is None:
            peer = self._channels[address, server] = PeerChannel(
                address, self._settings, "head", server=server
            )
        return peer.stub(pbg.BlobStub)

    async def _stat(self, leader: str, sha256: str) -> None:
        try:
            await self._stub(leader, "head").Stat(
                pb.BlobRef(sha256=sha256, holder=self.me), timeout=self._settings.rpc_timeout_s
            )
        except grpc.aio.AioRpcError as err:
            raise to_error(err) from None

    async def hello(self, leader: str) -> None:
        await self._stat(leader, NO_BLOB)

    async def hold(self, leader: str, sha256: str) -> None:
        await self._stat(leader, sha256)

    async def download(self, address: str, sha256: str, offset: int, *, head: bool) -> AsyncIterator[bytes]:
        stub = self._stub(address, "head" if head else "scheduler")
        request = pb.BlobDownloadRequest(sha256=sha256, offset=offset, scheduler_id=self.me)
        async for data in _download(stub, request):
            yield data

    async def aclose(self) -> None:
        await _close(self._channels)


UPLOAD_ATTEMPTS = 5
"""Tries of one upload, each continuing where the head's copy ends (a dropped connection)."""

REFUSED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # the head's blobs or disk full: trying again now would not help
)
"""What an upload's answer may say that ends it at once, without another try."""


async def upload(settings: Settings, packed: Packed, on_progress: Callable[[int, int], None]) -> bool:
    """Send ``packed`` to the head (``settings.head_address``; of several, the first that
    answers: one that does not answer a ``Stat`` in ``rpc_timeout_s`` is passed over),
    unless it has it already (False). After a dropped connection it asks the head
    again and continues from the bytes the head kept, up to :data:`UPLOAD_ATTEMPTS` times.
    Raises ShoalError: InvalidArgument for what the head refuses (over its size limit, a
    hash mismatch), PermissionDenied without a deploy token, Unavailable when the head
    cannot be reached."""
    metadata = auth_metadata(settings.token)
    # With its size: what the head has no room for is refused at the Stat, before a byte
    # is sent. Refused only at the upload's first message, the answer raced the chunks
    # still being written and came back now and then as INTERNAL "Internal error from
    # Core" instead (then the next try's Stat says why).
    blob = pb.BlobRef(sha256=packed.ref.sha256, size=packed.size)
    error: ShoalError = Unavailable("no head address")
    for address in head_addresses(settings.head_address):
        channel = open_channel(address, settings, server="head")
        stub = pbg.BlobStub(channel)
        try:
            for attempt in range(1, UPLOAD_ATTEMPTS + 1):
                try:
                    stat = await stub.Stat(blob, timeout=settings.rpc_timeout_s, metadata=metadata)
                except grpc.aio.AioRpcError as err:
                    error = to_error(err)
                    if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        # A frozen head (SIGSTOP, a hung machine): the next one, as the
                        # control client does. Before, it ended the upload.
                        break
                    if err.code() != grpc.StatusCode.UNAVAILABLE:
                        raise error from None
                    await asyncio.sleep(0.2 * attempt)
                    continue
                if stat.complete:
                    return attempt > 1  # sent by an earlier try whose answer was lost
                if packed.size > stat.max_size:
                    raise InvalidArgument(
                        f"{packed.ref.name} is {packed.size / 2**20:.1f} MB; the head takes blobs of at "
                        f"most {stat.max_size // 2**20} MB (setting max_blob_mb)"
                    )
                try:
                    reply = await stub.Upload(_messages(packed, stat.have, on_progress), metadata=metadata)
                    if reply.complete:
                        return True
                    error = Unavailable(f"the head kept {reply.have} of {packed.size} bytes")
                except grpc.aio.AioRpcError as err:
                    # Dropped, or refused while bytes were still on their way (then the next
                    # Stat says why not, or that another upload completed it).
                    error = to_error(err)
                    if err.code() in REFUSED:
                        raise error from None
                    log.info("upload of %s dropped (%s); resuming (try %d)", packed.ref.uri, error, attempt)
        finally:
            await channel.close(None)
    raise error


def _messages(packed: Packed, offset: int, on_progress: Callable[[int, int], None]) -> Iterator[pb.BlobChunk]:
    with packed.path.open("rb") as f:
        f.seek(offset)
        first = True
        while True:
            data = f.read(CHUNK)
            if not data and not first:
                return
            if first:
                yield pb.BlobChunk(sha256=packed.ref.sha256, size=packed.size, offset=offset, data=data)
                first = False
            else:
                yield pb.BlobChunk(data=data)
            offset += len(data)
            on_progress(offset, packed.size)
            if not data:
                return

"""Channels between components, and calls that retry with backoff.

A component that cannot reach a peer logs it once (and once when the peer is
back), not once per retry.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio

from shoal import certwatch
from shoal.certs import CLUSTER_NAME, role_name
from shoal.config import Settings
from shoal.errors import ShoalError, Unavailable
from shoal.rpc.status import to_error
from shoal.rpc.tls import channel_credentials, material_credentials, tls_hint

T = TypeVar("T")
S = TypeVar("S")
log = logging.getLogger("shoal.rpc")

RETRYABLE = {grpc.StatusCode.UNAVAILABLE}


def channel_options(settings: Settings) -> list[tuple[str, int]]:
    size = settings.max_message_bytes
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect fast after a peer restarts (the default backoff reaches minutes).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),
        ("grpc.enable_retries", 0),
    ]


def open_channel(
    address: str, settings: Settings, role: str = "client", *, server: str | None = None
) -> grpc.aio.Channel:
    """A channel to ``address``: mutual TLS with ``role``'s certificate when ``settings.tls_dir``
    is set, else plaintext. With TLS the server's certificate is checked for the name of role
    ``server`` (``head.shoal.cluster``, ...: a server with another role's key fails the
    handshake), or, with ``server`` None, for the cluster name any role's carries; whatever
    the address dialled. The channel presents the certificate on disk now for as long as it
    lives: one kept as long as its peer is a :class:`PeerChannel`, which follows renewals."""
    return _secure(address, settings, server, channel_credentials(settings, role))


def _secure(
    address: str, settings: Settings, server: str | None, credentials: grpc.ChannelCredentials | None
) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=channel_options(settings))
    name = CLUSTER_NAME if server is None else role_name(server)
    options = [*channel_options(settings), ("grpc.ssl_target_name_override", name)]
    return grpc.aio.secure_channel(address, credentials, options=options)


class PeerChannel:
    """A channel to a peer for as long as the peer lives, that presents ``role``'s
    certificate on disk now (``open_channel``'s arguments).

    gRPC cannot change a channel's credentials, and a channel made once would connect again
    (the peer restarted, a standby head took over, a network blip) with the certificate it
    was made with, which may have run out since it was renewed on disk: the peer refuses
    the handshake until the process restarts. So :meth:`channel` and :meth:`stub` look
    whether the files were renewed (:mod:`shoal.certwatch`: a clock read, and three
    ``stat`` calls at most once a second) and, when they were, make a new channel with the
    renewed files and hand that out from then on; stubs are made again with it. Files
    that fail their checks are not taken (certwatch warns, once), so the working channel
    stays. Without TLS nothing is looked at.

    The channel replaced is not closed at once: calls and streams on it go on, on the
    connection they have (a connection made keeps working after its certificate runs
    out). It is closed once it has no connection up (its streams ended with it; gRPC drops
    a connection left without calls after ``grpc.client_idle_timeout_ms``, 30 minutes),
    or by :meth:`close`, by a task this object owns. Not safe across event loops; safe
    for many tasks on one."""

    def __init__(
        self, address: str, settings: Settings, role: str = "client", *, server: str | None = None
    ) -> None:
        self.address = address
        self._settings = settings
        self._server = server
        self._watch = certwatch.watch(settings.tls_dir, role) if settings.tls_dir else None
        self._generation = -1
        self._channel = self._open()
        self._stubs: dict[Callable[[grpc.aio.Channel], Any], Any] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._retired: list[grpc.aio.Channel] = []  # replaced with no loop running, for close
        self.renewals = 0
        """How many times a new channel was made for renewed files."""

    def _open(self) -> grpc.aio.Channel:
        if self._watch is None:
            return _secure(self.address, self._settings, self._server, None)
        material = self._watch.poll()
        self._generation = material.generation
        return _secure(self.address, self._settings, self._server, material_credentials(material))

    def channel(self) -> grpc.aio.Channel:
        """The channel to call on now: a new one when the certificate was renewed on disk
        since the last was made."""
        if self._watch is not None and self._watch.poll().generation != self._generation:
            self._renew()
        return self._channel

    def stub(self, make: Callable[[grpc.aio.Channel], S]) -> S:
        """``make(channel)`` (a generated stub class) on :meth:`channel`, made once per channel."""
        channel = self.channel()
        found = self._stubs.get(make)
        if found is None:
            found = self._stubs[make] = make(channel)
        return found

    def _renew(self) -> None:
        old = self._channel
        self._channel = self._open()
        self._stubs = {}
        self.renewals += 1
        log.info("new channel to %s with the renewed certificate", self.address)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._retired.append(old)
            return
        task = loop.create_task(_retire(old), name=f"retire channel {self.address}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        """Close the channel, and those replaced (calls still on them are cancelled)."""
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for channel in [*self._retired, self._channel]:
            await channel.close(None)
        self._retired = []


async def _retire(channel: grpc.aio.Channel) -> None:
    """Close ``channel`` once it has no connection up: then no call is left on it that could
    still be answered (a connection lost fails its calls; gRPC drops one without calls)."""
    try:
        state = channel.get_state()
        while state == grpc.ChannelConnectivity.READY:
            await channel.wait_for_state_change(state)
            state = channel.get_state()
    finally:
        await channel.close(None)


class Reachability:
    """Logs that a peer is unreachable once, and once more when it is back."""

    def __init__(self, what: str, tls: bool | None = None) -> None:
        self.what = what
        self.tls = tls  # whether this side speaks TLS, for the hint (None: not said)
        self.down = False

    def failed(self, err: BaseException) -> None:
        if not self.down:
            self.down = True
            log.warning("cannot reach %s: %s (retrying quietly)", self.what, tls_hint(str(err), self.tls))

    def ok(self) -> None:
        if self.down:
            self.down = False
            log.info("reached %s again", self.what)


async def call(
    fn: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    reach: Reachability | None = None,
    base_delay_s: float = 0.05,
    max_delay_s: float = 1.0,
) -> T:
    """Run one gRPC call (``fn`` builds and awaits it, with its deadline).

    Retries UNAVAILABLE with jittered exponential backoff, up to ``attempts``
    tries; every failure surfaces as a ShoalError (Unavailable when the peer
    cannot be reached).
    """
    delay = base_delay_s
    for attempt in range(1, attempts + 1):
        try:
            result = await fn()
        except grpc.aio.AioRpcError as err:
            if err.code() in RETRYABLE and attempt < attempts:
                if reach is not None:
                    reach.failed(to_error(err))
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(max_delay_s, delay * 2)
                continue
            if reach is not None and err.code() in RETRYABLE:
                reach.failed(to_error(err))
            raise to_error(err) from None
        if reach is not None:
            reach.ok()
        return result
    raise Unavailable("no attempts made")  # attempts < 1


def as_shoal_error(err: BaseException) -> ShoalError:
    if isinstance(err, ShoalError):
        return err
    if isinstance(err, grpc.aio.AioRpcError):
        return to_error(err)
    return Unavailable(str(err))

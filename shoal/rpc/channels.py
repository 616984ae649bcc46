"""Channels between components, and calls that retry with backoff.

A component that cannot reach a peer logs it once (and once when the peer is
back), not once per retry.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import grpc.aio

from shoal.certs import CLUSTER_NAME, role_name
from shoal.config import Settings
from shoal.errors import ShoalError, Unavailable
from shoal.rpc.status import to_error
from shoal.rpc.tls import channel_credentials, tls_hint

T = TypeVar("T")
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
    the address dialled."""
    credentials = channel_credentials(settings, role)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=channel_options(settings))
    name = CLUSTER_NAME if server is None else role_name(server)
    options = [*channel_options(settings), ("grpc.ssl_target_name_override", name)]
    return grpc.aio.secure_channel(address, credentials, options=options)


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

"""The gRPC side of the etcd store: an :class:`aetcd.Client` over several endpoints, with TLS.

:class:`~shoal.store.etcd.EtcdStore` is domain code and never builds a channel; the
composition root builds the client here (the one place that may import grpc) and hands it
over. aetcd itself dials one ``host:port`` in plaintext; :class:`EtcdClient` replaces its
channel with one over every endpoint (gRPC's ``pick_first`` moves to the next member when
one goes away) and, with a TLS folder, a TLS channel.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aetcd
import grpc

from shoal.errors import InvalidArgument

CA_FILE = "ca.crt"
CLIENT_CERT = "client.crt"
CLIENT_KEY = "client.key"


@dataclass(frozen=True)
class EtcdTarget:
    """Where etcd is: ``(host, port)`` pairs, and a folder of TLS files or ``""``."""

    endpoints: tuple[tuple[str, int], ...]
    tls_dir: str = ""


def parse_store_url(url: str) -> tuple[tuple[str, int], ...]:
    """``etcd://HOST:PORT[,HOST:PORT...]`` as ``(host, port)`` pairs (port 2379 when left out).

    Raises :class:`InvalidArgument` naming what is wrong.
    """
    if not url.startswith("etcd://"):
        raise InvalidArgument(f"store {url!r}: an etcd store is etcd://HOST:PORT[,HOST:PORT...]")
    endpoints = []
    for part in url.removeprefix("etcd://").rstrip("/").split(","):
        try:
            split = urlsplit("//" + part.strip())
            host, port = split.hostname, split.port or 2379
        except ValueError as err:
            raise InvalidArgument(f"store {url!r}: bad endpoint {part!r}: {err}") from None
        if not host or split.path or split.query:
            raise InvalidArgument(f"store {url!r}: bad endpoint {part!r}, expected HOST:PORT")
        endpoints.append((host, port))
    return tuple(endpoints)


def _target(endpoints: tuple[tuple[str, int], ...]) -> str:
    """One gRPC target over every endpoint: ``ipv4:a:1,b:2`` (names resolved now)."""
    if len(endpoints) == 1:
        host, port = endpoints[0]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    v4: list[str] = []
    v6: list[str] = []
    for host, port in endpoints:
        for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            if family == socket.AF_INET:
                v4.append(f"{sockaddr[0]}:{port}")
            elif family == socket.AF_INET6:
                v6.append(f"[{sockaddr[0]}]:{port}")
    if v4:  # gRPC's address list takes one family
        return "ipv4:" + ",".join(dict.fromkeys(v4))
    return "ipv6:" + ",".join(dict.fromkeys(v6))


def _credentials(tls_dir: str) -> grpc.ChannelCredentials:
    folder = Path(tls_dir)
    try:
        ca = (folder / CA_FILE).read_bytes()
        cert = folder / CLIENT_CERT
        key = folder / CLIENT_KEY
        if cert.exists() != key.exists():
            raise InvalidArgument(f"store TLS folder {folder}: {CLIENT_CERT} and {CLIENT_KEY} go together")
        if cert.exists():
            return grpc.ssl_channel_credentials(ca, key.read_bytes(), cert.read_bytes())
    except OSError as err:
        raise InvalidArgument(f"store TLS folder {folder}: {err}") from None
    return grpc.ssl_channel_credentials(ca)


MAX_READ_BYTES = 2**31 - 1
"""The largest answer read from etcd (gRPC's most). A head taking over lists every
deployment and revision at once, and gRPC's default of 4 MiB failed that at 30 deployments
of 20 revisions of 10 KB; etcd's own quota (``--quota-backend-bytes``, 2 GiB by default)
bounds what a list can hold."""


class EtcdClient(aetcd.Client):  # type: ignore[misc]  # aetcd ships no types
    """An aetcd client over every endpoint of ``target``; TLS when ``target.tls_dir`` is set."""

    def __init__(self, target: EtcdTarget, *, timeout: float | None = 5.0) -> None:
        host, port = target.endpoints[0]
        super().__init__(host=host, port=port, timeout=timeout)
        self._shoal_target = target

    async def connect(self) -> None:
        # Replaces aetcd's connect, which dials one endpoint in plaintext; no await inside,
        # so concurrent first calls cannot see half-built stubs.
        if self._connected.is_set():
            return
        target = self._shoal_target
        options: list[tuple[str, Any]] = [
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.max_receive_message_length", MAX_READ_BYTES),
        ]
        address = _target(target.endpoints)
        if target.tls_dir:
            if len(target.endpoints) > 1:
                # Addresses were resolved: check certificates against the first name given.
                options.append(("grpc.ssl_target_name_override", target.endpoints[0][0]))
            channel = grpc.aio.secure_channel(address, _credentials(target.tls_dir), options=options)
        else:
            channel = grpc.aio.insecure_channel(address, options=options)
        self.channel = channel
        self.kvstub = aetcd.rpc.KVStub(channel)
        self.clusterstub = aetcd.rpc.ClusterStub(channel)
        self.leasestub = aetcd.rpc.LeaseStub(channel)
        self.maintenancestub = aetcd.rpc.MaintenanceStub(channel)
        self._watcher = aetcd.watcher.Watcher(
            aetcd.rpc.WatchStub(channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


def etcd_client(target: EtcdTarget) -> EtcdClient:
    """A client for ``target``; it dials on first use. Close it with ``await client.close()``."""
    return EtcdClient(target)

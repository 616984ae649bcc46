"""Who may tell the head that a scheduler holds a blob, or no longer does (``BlobRef.holder``,
``released``): that scheduler alone, as far as the head can tell without a key per scheduler.

The head's Blob servicers are called with a stand-in for gRPC's context, which gives the
caller's address and certificate as the TLS layer would. Before, any caller the ``Stat``
rule admits (a ``deploy`` token included) could add or drop any scheduler id as a holder,
and each new id it named was kept in the head's memory for good.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc
import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.head.blobs import BlobStore, holder_addresses
from shoal.head.node import HeadNode
from shoal.proto import shoal_pb2 as pb
from shoal.rpc.blobs import HeadBlobService
from shoal.rpc.head_service import HeadService
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers

pytestmark = pytest.mark.timeout(10)

DATA = os.urandom(5000)
SHA = hashlib.sha256(DATA).hexdigest()


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class Caller:
    """What a servicer sees of a call: the caller's address and, with TLS, its certificate's role."""

    def __init__(self, peer: str, role: str = "") -> None:
        self._peer, self._role = peer, role

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_common_name": [f"shoal-{self._role}".encode()]} if self._role else {}

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise Refused(code, details)


async def one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def cluster(tmp_path: Path, tls: bool) -> tuple[HeadNode, BlobStore, HeadBlobService]:
    settings = Settings(tls_dir=str(tmp_path / "certs") if tls else "")
    node = HeadNode(settings, MemoryStore(), FakeSchedulers(), FakeClock())
    store = BlobStore(tmp_path / "blobs", max_bytes=1_000_000, grace_s=100.0)
    node.blobs = store
    await store.receive(SHA, len(DATA), 0, one(DATA))
    register = pb.RegisterSchedulerRequest(scheduler_id="s1", address="10.0.0.6:8001", hostname="m6")
    await HeadService(node).RegisterScheduler(register, cast(Any, Caller("ipv4:10.0.0.6:41000", "scheduler")))
    return node, store, HeadBlobService(store, node)


async def stat(service: HeadBlobService, caller: Caller, holder: str, released: bool = False) -> None:
    await service.Stat(pb.BlobRef(sha256=SHA, holder=holder, released=released), cast(Any, caller))


@pytest.mark.parametrize("tls", [True, False])
async def test_only_a_scheduler_itself_says_it_holds_a_blob_or_released_it(tmp_path: Path, tls: bool) -> None:
    node, store, service = await cluster(tmp_path, tls)
    s1 = Caller("ipv4:10.0.0.6:41002", "scheduler")
    await stat(service, s1, "s1")
    assert holder_addresses(node, store, SHA) == ["10.0.0.6:8001"]

    # Another machine, with a scheduler's certificate (all schedulers share one): refused.
    with pytest.raises(Refused) as refused:
        await stat(service, Caller("ipv4:10.0.0.9:5000", "scheduler"), "s1", released=True)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "scheduler s1 registered from 10.0.0.6" in refused.value.details
    with pytest.raises(Refused):
        await stat(service, Caller("ipv4:10.0.0.9:5000", "scheduler"), "s1")
    assert holder_addresses(node, store, SHA) == ["10.0.0.6:8001"]
    if tls:
        # A client (a deploy token's holder) on the scheduler's own machine: it may ask what
        # the head has, not speak for a scheduler.
        client = Caller("ipv4:10.0.0.6:5000", "client")
        await stat(service, client, "")
        with pytest.raises(Refused) as refused:
            await stat(service, client, "s1", released=True)
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "a scheduler's certificate" in refused.value.details
        assert holder_addresses(node, store, SHA) == ["10.0.0.6:8001"]

    # Ids no scheduler registered are not recorded (each was kept for good before).
    for i in range(50):
        await stat(service, s1, f"ghost-{i}")
    assert store.holders(SHA) == {"s1"}

    # The scheduler itself releases it.
    await stat(service, s1, "s1", released=True)
    assert holder_addresses(node, store, SHA) == []

"""``ReplicaHandle``: one replica as the router sees it (the seed's ``Replica``).

It owns the client connection, counts requests in flight, and keeps the task
serving each pending request id, so that when the replica dies every pending
request fails at once with ``ReplicaGone`` (and is retried elsewhere) instead
of waiting for its deadline.
"""

from __future__ import annotations

import asyncio

from shoal.core.payload import Tensors
from shoal.errors import Unavailable
from shoal.types import ReplicaClient


class ReplicaGone(Unavailable):
    """The replica died or was removed before answering; safe to retry elsewhere."""


class ReplicaHandle:
    def __init__(
        self,
        replica_id: str,
        deployment: str,
        address: str,
        scheduler_id: str,
        client: ReplicaClient,
        *,
        local: bool,
    ) -> None:
        self.replica_id = replica_id
        self.deployment = deployment
        self.address = address
        self.scheduler_id = scheduler_id
        self.client = client
        self.local = local
        self.in_flight = 0  # reserved by the router before send, released after
        self.gone = False
        self.retired = False  # draining: no new requests, pending ones finish
        self._pending: dict[str, asyncio.Task[object]] = {}
        self._killed: set[str] = set()

    @property
    def accepting(self) -> bool:
        return not self.gone and not self.retired

    async def send(self, request_id: str, inputs: Tensors, timeout_s: float) -> Tensors:
        """Send one request. Raises ReplicaGone if the replica dies meanwhile."""
        if self.gone:
            raise ReplicaGone(f"replica {self.replica_id} is gone")
        task = asyncio.current_task()
        assert task is not None
        self._pending[request_id] = task
        try:
            return await self.client.push(request_id, inputs, timeout_s)
        except asyncio.CancelledError:
            if request_id in self._killed and task.uncancel() == 0:
                raise ReplicaGone(f"replica {self.replica_id} died before answering") from None
            if task.cancelling() == 0:
                # Nobody cancelled this task: grpc.aio cancelled the call under it because
                # close() closed the channel (the replica left the routing table while the
                # request was on it). Retry elsewhere instead of never answering.
                raise ReplicaGone(f"replica {self.replica_id} was removed before answering") from None
            raise
        finally:
            self._pending.pop(request_id, None)
            self._killed.discard(request_id)

    def fail_pending(self) -> int:
        """Mark the replica gone and fail its pending requests; returns how many."""
        self.gone = True
        for request_id, task in list(self._pending.items()):
            self._killed.add(request_id)
            task.cancel()
        return len(self._pending)

    async def close(self) -> None:
        await self.client.close()

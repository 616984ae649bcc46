"""``ReplicaHandle``: one replica as the router sees it (the seed's ``Replica``).

It owns the client connection and counts requests in flight. It does not track
its pending requests: failing them when the replica goes is the client's job
(see :meth:`ReplicaHandle.fail_pending`).
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Mapping

from shoal.core.payload import Tensors
from shoal.errors import ReplicaGone
from shoal.types import ReplicaClient

__all__ = ["ReplicaGone", "ReplicaHandle"]


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
        # Dropped by the routing table while requests were on it (the head's word, not the
        # replica's failure): no new requests, those on it finish, and what fails on it
        # spends no attempt; it goes once idle, or takes requests again if listed again
        # (Router._leave).
        self.left = False
        self.revision = 0  # of its deployment, from the head's table (0: not known yet)
        # Multiplexed deployments: the model ids this router sent here, least recent first, as
        # many as the replica holds: what it most likely has loaded (see Router._pick).
        self.models: collections.OrderedDict[str, None] = collections.OrderedDict()

    @property
    def accepting(self) -> bool:
        return not self.gone and not self.retired and not self.left

    def touch(self, model_id: str, capacity: int) -> None:
        """Model ``model_id`` is sent here now: the most recent of at most ``capacity`` held."""
        self.models[model_id] = None
        self.models.move_to_end(model_id)
        while len(self.models) > capacity:
            self.models.popitem(last=False)

    def send(
        self,
        request_id: str,
        inputs: Tensors,
        timeout_s: float,
        *,
        model_id: str = "",
        classify: Mapping[str, int] | None = None,
    ) -> Awaitable[Tensors]:
        """Send one request (to model ``model_id`` of a multiplexed deployment; ``classify``:
        as ``ReplicaClient.push``): await what this returns. Raises ReplicaGone if the
        replica is gone already, and Unavailable (the client's) if it goes while the request
        waits: both are retried elsewhere. (Not a coroutine of its own: one frame less on
        every request's way.)"""
        if self.gone:
            raise ReplicaGone(f"replica {self.replica_id} is gone")
        return self.client.push(request_id, inputs, timeout_s, model_id=model_id, classify=classify)

    async def fail_pending(self) -> int:
        """The replica died: take no more requests, and fail every pending one with Unavailable
        now, once each (the router retries them). Returns how many were in flight.

        One mechanism, the client's: closing it fails what waits on it (``ReplicaClient.close``;
        the gRPC client's ``TaskStream`` fails the futures of its stream, as it does when the
        stream breaks on its own). Cancelling the requests' tasks here as well, as this once
        did, raced the stream's own failure, and telling that cancellation from the caller's
        (a client that went away) needed a guess from ``Task.uncancel``.
        """
        self.gone = True
        pending = self.in_flight
        await self.client.close()
        return pending

    async def close(self) -> None:
        await self.client.close()

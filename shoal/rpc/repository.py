"""The head's control API as a scheduler's repository extension uses it
(:class:`shoal.scheduler.repository.Deployer`): apply and delete with the caller's token."""

from __future__ import annotations

from typing import Any

from shoal.config import Settings
from shoal.core.cluster import FAILED
from shoal.core.spec import DeploymentSpec
from shoal.errors import Unavailable
from shoal.proto import shoal_pb2 as pb
from shoal.rpc import convert
from shoal.rpc.channels import Reachability
from shoal.rpc.clients import HeadChannels, call_leader

_BRIEF = pb.StatusRequest(brief=True)
"""Names and pending reasons alone: the whole cluster's status, each replica and spec,
was read at each index request (130 ms of the head's event loop at 10,000 replicas)."""


class GrpcDeployer:
    """Scheduler -> head, for ``load`` / ``unload``: the call carries the caller's
    ``authorization`` (the head checks its role); the channel, the scheduler's certificate."""

    def __init__(self, head_address: str, settings: Settings) -> None:
        self._settings = settings
        # Several heads: the one that leads. Before, the list "a,b" was dialled as one
        # address, and every load and unload failed.
        self._heads = HeadChannels(head_address, settings, "scheduler")
        self._reach = Reachability(f"head at {head_address}")

    async def _call(self, method: str, req: object, authorization: str | None, once: str = "") -> Any:
        try:
            reply = await call_leader(
                self._heads, method, req, self._settings, self._metadata(authorization), once
            )
        except Unavailable as err:
            self._reach.failed(err)
            raise
        self._reach.ok()
        return reply

    def _metadata(self, authorization: str | None) -> tuple[tuple[str, str], ...] | None:
        return (("authorization", authorization),) if authorization else None

    async def apply(self, spec: DeploymentSpec, authorization: str | None) -> None:
        await self._call(
            "ApplyDeployment", pb.ApplyDeploymentRequest(spec_json=spec.to_json()), authorization
        )

    async def delete(self, name: str, authorization: str | None) -> None:
        await self._call(
            "DeleteDeployment",
            pb.DeleteDeploymentRequest(name=name),
            authorization,
            once=f"deleted deployment {name!r}",
        )

    async def failures(self, authorization: str | None) -> dict[str, str]:
        reply = await self._call("GetStatus", _BRIEF, authorization)
        deployments = convert.status_from_pb(reply).deployments
        return {d.name: d.pending_reason for d in deployments if d.pending_reason.startswith(FAILED)}

    async def names(self, authorization: str | None) -> set[str]:
        reply = await self._call("GetStatus", _BRIEF, authorization)
        return {d.name for d in convert.status_from_pb(reply).deployments}

    async def close(self) -> None:
        await self._heads.close()

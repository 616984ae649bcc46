"""The head's control API as a scheduler's repository extension uses it
(:class:`shoal.scheduler.repository.Deployer`): apply and delete with the caller's token."""

from __future__ import annotations

from shoal.config import Settings
from shoal.core.cluster import FAILED
from shoal.core.spec import DeploymentSpec
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc import convert
from shoal.rpc.channels import Reachability, call, open_channel

_BRIEF = pb.StatusRequest(brief=True)
"""Names and pending reasons alone: the whole cluster's status, each replica and spec,
was read at each index request (130 ms of the head's event loop at 10,000 replicas)."""


class GrpcDeployer:
    """Scheduler -> head, for ``load`` / ``unload``: the call carries the caller's
    ``authorization`` (the head checks its role); the channel, the scheduler's certificate."""

    def __init__(self, head_address: str, settings: Settings) -> None:
        self._settings = settings
        self._channel = open_channel(head_address, settings, "scheduler", server="head")
        self._stub = pbg.HeadStub(self._channel)
        self._reach = Reachability(f"head at {head_address}")

    def _metadata(self, authorization: str | None) -> tuple[tuple[str, str], ...] | None:
        return (("authorization", authorization),) if authorization else None

    async def apply(self, spec: DeploymentSpec, authorization: str | None) -> None:
        req = pb.ApplyDeploymentRequest(spec_json=spec.to_json())
        metadata = self._metadata(authorization)
        await call(
            lambda: self._stub.ApplyDeployment(req, timeout=self._settings.rpc_timeout_s, metadata=metadata),
            attempts=2,
            reach=self._reach,
        )

    async def delete(self, name: str, authorization: str | None) -> None:
        req = pb.DeleteDeploymentRequest(name=name)
        metadata = self._metadata(authorization)
        await call(
            lambda: self._stub.DeleteDeployment(req, timeout=self._settings.rpc_timeout_s, metadata=metadata),
            attempts=2,
            reach=self._reach,
        )

    async def failures(self, authorization: str | None) -> dict[str, str]:
        metadata = self._metadata(authorization)
        reply = await call(
            lambda: self._stub.GetStatus(_BRIEF, timeout=self._settings.rpc_timeout_s, metadata=metadata),
            attempts=1,
            reach=self._reach,
        )
        deployments = convert.status_from_pb(reply).deployments
        return {d.name: d.pending_reason for d in deployments if d.pending_reason.startswith(FAILED)}

    async def names(self, authorization: str | None) -> set[str]:
        metadata = self._metadata(authorization)
        reply = await call(
            lambda: self._stub.GetStatus(_BRIEF, timeout=self._settings.rpc_timeout_s, metadata=metadata),
            attempts=1,
            reach=self._reach,
        )
        return {d.name for d in convert.status_from_pb(reply).deployments}

    async def close(self) -> None:
        await self._channel.close(None)

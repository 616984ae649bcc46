"""The Open Inference Protocol's model repository extension over a Triton repository.

A scheduler started with ``--model-repository DIR`` answers ``index``, ``load`` and
``unload`` (``POST /v2/repository/...``, gRPC ``RepositoryIndex`` / ``RepositoryModelLoad``
/ ``RepositoryModelUnload``) from that folder, read again on every call (no polling):

* ``index``: every model of the folder, with the version that serves (or would) and its
  state: READY (a READY replica), UNAVAILABLE with a reason (``unloaded``, ``loading``, the
  head's FAILED reason once it gave up on the model's replicas, or why it cannot be served),
  then the cluster's other deployments as the catalog lists them.
* ``load NAME``: map ``DIR/NAME`` (:mod:`shoal.core.triton_repo`) and apply it at the
  head, as ``shoal deploy`` would; returns once a replica of it is READY, or fails when
  the head marks the deployment FAILED (its replicas keep crashing, before READY or soon
  after). Loading a model whose files changed replaces its replicas; loading one that did
  not is no change.
* ``unload NAME``: delete the deployment at the head; returns once this scheduler has
  stopped routing to it, or once the head has it again (a load that came after). Only
  models of the folder: deployments from specs are removed with ``shoal delete``.

Load and unload change what runs, so the head decides with the caller's token: they need
the ``deploy`` role once tokens exist. While no token exists the head takes changes from
callers the transport vouches for (``vouched``: gRPC, whose ports are loopback-only, TLS
with a cluster certificate, or ``--insecure``; HTTP from this machine without TLS); the
repository extension refuses the others here, as the head's own REST API does.

Plain Python: the head is reached through a :class:`Deployer` (``shoal.rpc.repository``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from shoal.core import triton_repo
from shoal.core.spec import DeploymentSpec
from shoal.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ShoalError,
    Unavailable,
)
from shoal.scheduler.models import NO_READY_REPLICA, ModelCatalog, ModelIndexEntry

FAILURE_CHECK_S = 1.0
"""How often a load that waits for a READY replica asks the head whether the deployment FAILED."""
FAILURE_LOOKUP_S = 2.0
"""Longest ``index`` waits for the head's FAILED reasons; past it (or with the head away) a
model without a READY replica is listed as loading."""
UNLOAD_TIMEOUT_S = 30.0
"""Longest an unload waits for this scheduler to stop routing to the model."""
_POLL_S = 0.05
_LOADING = "loading: no READY replica yet"


def check_parameters(action: str, names: Iterable[str]) -> None:
    """Refuse request parameters of ``load`` / ``unload`` that shoal does not honour: a
    ``config`` override or ``file:`` contents on load (the folder is the source of truth).
    ``unload_dependents`` is accepted: no model here has dependents."""
    allowed = {"unload_dependents"} if action == "unload" else set()
    for name in names:
        if name not in allowed:
            why = (
                "overriding the model's config or files in the request is not supported; edit the repository"
            )
            raise InvalidArgument(f"{action}: parameter {name!r}: {why}")


class Deployer(Protocol):
    """Changes the head's deployments with a caller's credentials."""

    async def apply(self, spec: DeploymentSpec, authorization: str | None) -> None:
        """Raises ShoalError: Unauthenticated, PermissionDenied, InvalidArgument, Unavailable."""
        ...

    async def delete(self, name: str, authorization: str | None) -> None:
        """Raises NotFound for a deployment the head does not have."""
        ...

    async def failures(self, authorization: str | None) -> dict[str, str]:
        """The deployments the head gave up on: name -> its FAILED reason."""
        ...

    async def names(self, authorization: str | None) -> set[str]:
        """The names of the deployments the head has."""
        ...


class ModelRepository:
    """``root``'s models, loaded and unloaded through ``deployer``, their states from ``catalog``.

    ``tokens_exist``: whether the cluster has tokens (the routing table says). Safe to call
    concurrently; two loads of one model both apply it (the second is no change).
    """

    def __init__(
        self,
        root: str | Path,
        catalog: ModelCatalog,
        deployer: Deployer,
        *,
        tokens_exist: Callable[[], bool] = lambda: False,
    ) -> None:
        self.root = Path(root).resolve()
        self._catalog = catalog
        self._deployer = deployer
        self._tokens_exist = tokens_exist

    async def index(
        self, *, ready_only: bool = False, authorization: str | None = None
    ) -> list[ModelIndexEntry]:
        """The folder's models, then the other deployments, sorted by name (see the module).
        ``authorization``: the caller's, for asking the head why a model has no READY replica."""
        models = await asyncio.to_thread(triton_repo.scan, self.root)
        router = self._catalog.router
        deployed = router.deployments()
        out = []
        for m in models:
            spec = deployed.get(m.name)
            version = triton_repo.served_version(self.root, spec) if spec is not None else 0
            if spec is not None and version and router.ready_count(m.name) > 0:
                out.append(ModelIndexEntry(m.name, str(version), "READY"))
            elif spec is not None and version:
                out.append(ModelIndexEntry(m.name, str(version), "UNAVAILABLE", _LOADING))
            elif spec is not None:
                reason = "a deployment of this name serves a model from elsewhere"
                out.append(ModelIndexEntry(m.name, "", "UNAVAILABLE", reason))
            else:
                reason = m.problem or "unloaded"
                out.append(ModelIndexEntry(m.name, str(m.version or ""), "UNAVAILABLE", reason))
        names = {e.name for e in out}
        out += [e for e in self._catalog.index() if e.name not in names]
        out.sort(key=lambda e: e.name)
        if ready_only:
            return [e for e in out if e.state == "READY"]
        if any(e.reason == _LOADING or e.reason == NO_READY_REPLICA for e in out):
            # Before, a model whose replicas the head gave up on stayed "loading" for ever:
            # a client polling the index for readiness waited for nothing.
            failed = await self._failures(authorization)
            out = [
                dataclasses.replace(e, reason=failed[e.name])
                if e.reason in (_LOADING, NO_READY_REPLICA) and e.name in failed
                else e
                for e in out
            ]
        return out

    async def _failures(self, authorization: str | None) -> dict[str, str]:
        try:
            async with asyncio.timeout(FAILURE_LOOKUP_S):
                return await self._deployer.failures(authorization)
        except (ShoalError, TimeoutError):
            return {}  # the head is away or slow: the models stay "loading"

    def _check_caller(self, what: str, authorization: str | None, vouched: bool) -> None:
        if vouched or (authorization and self._tokens_exist()):
            return
        raise PermissionDenied(
            f"{what}: changes what runs; send a token with role deploy ('Authorization: Bearer <token>'), "
            "or, while no token exists, call from the scheduler's machine (or over gRPC)"
        )

    async def load(self, name: str, authorization: str | None, *, vouched: bool) -> None:
        """Deploy ``name`` from the repository and wait (its ``health.start_timeout_s``) for a
        READY replica. NotFound, InvalidArgument (cannot be served, naming the field), the
        head's refusals, FailedPrecondition with the head's reason when it marks the
        deployment FAILED, Unavailable when no replica is READY in time."""
        self._check_caller(f"load {name!r}", authorization, vouched)
        # In a thread: it hashes the model file.
        model = await asyncio.to_thread(triton_repo.read_model, self.root, name)
        spec = model.spec
        assert spec is not None  # read_model raises instead
        await self._deployer.apply(spec, authorization)
        timeout = spec.health.start_timeout_s
        router = self._catalog.router

        def loaded() -> bool:
            current = router.deployments().get(name)
            return (
                current is not None
                and current.model_hash == spec.model_hash
                and current.model == spec.model
                and router.ready_count(name) > 0
            )

        deadline = time.monotonic() + timeout
        while not await _wait(loaded, min(FAILURE_CHECK_S, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"model {name!r} (version {model.version}) is deployed but has no READY replica after "
                    f"{timeout:g}s; see shoal status and shoal logs {name}"
                )
            try:
                reason = (await self._deployer.failures(authorization)).get(name, "")
            except ShoalError:
                continue  # the head is away: keep waiting for the replica
            if reason:
                raise FailedPrecondition(f"model {name!r} (version {model.version}) did not load: {reason}")

    async def unload(self, name: str, authorization: str | None, *, vouched: bool) -> None:
        """Delete ``name``'s deployment and wait until this scheduler no longer routes to it
        (or the head has it again: a load that came after this delete won).
        Unloading a model that is not loaded is no error; NotFound for a name the repository
        does not have."""
        self._check_caller(f"unload {name!r}", authorization, vouched)
        if name not in await asyncio.to_thread(triton_repo.model_names, self.root):
            raise NotFound(
                f"model repository {str(self.root)!r} has no model {name!r} "
                "(deployments from specs are removed with shoal delete)"
            )
        try:
            await self._deployer.delete(name, authorization)
        except NotFound:
            return
        router = self._catalog.router
        deadline = time.monotonic() + UNLOAD_TIMEOUT_S
        while not await _wait(
            lambda: name not in router.deployments(),
            min(FAILURE_CHECK_S, max(0.0, deadline - time.monotonic())),
        ):
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"model {name!r} was deleted at the head, but this scheduler still routes to it"
                )
            # A load that came after this delete (another client, another ingress process)
            # deployed it again: the table this scheduler gets may never lack the name. Before,
            # such an unload waited its whole UNLOAD_TIMEOUT_S and answered UNAVAILABLE.
            try:
                if name in await self._deployer.names(authorization):
                    return
            except ShoalError:
                continue  # the head is away: keep waiting for the table


async def _wait(condition: Callable[[], bool], timeout_s: float) -> bool:
    # The routing table arrives from the head on its own stream; this only looks at it.
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(_POLL_S)
    return True

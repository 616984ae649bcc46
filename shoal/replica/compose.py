"""Composition: a model calls other deployments through the cluster's router.

A python model reaches them as ``self.deployments["other"]`` (or the ``deployments``
argument of its constructor, when it takes one)::

    class Pipeline:
        def predict(self, inputs):
            tokens = self.deployments["tokenizer"].infer({"text": inputs["text"]})
            return self.deployments["model"].infer(tokens)

``infer`` blocks (for ``predict`` run on the model thread); ``await handle.ainfer(...)``
is the same for ``async def predict``. A call goes to the scheduler of this replica's
machine (native ``SendRequest``), which routes it like any other request: the target
scales, retries and reports on its own. It carries the calling request's deadline (what
is left of it: a call made with nothing left fails with DeadlineExceeded at once) and
its request id, so the target's log lines name the request that caused them. In a batch
the earliest deadline of the batch's requests counts. A blocking ``infer`` is cancelled
once every request it serves was given up (the client hung up, or its deadline passed in the
replica).

A deployment may not call itself (refused when the handle is taken). A longer cycle
(a -> b -> a) is not detected: each hop has only what is left of the first request's
deadline, so it ends with DeadlineExceeded, never a hang.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from shoal.errors import (
    BlocksLoop,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from shoal.types import Arrays


class GivenUp:
    """Set (on the event loop) once a request's caller gave it up; read by the model thread,
    which polls it. A plain flag, not a ``threading.Event``: one is made per request on the
    replica's hot path, and an Event (a lock and a condition) cost 3.3 µs to make."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


@dataclass(frozen=True)
class CallContext:
    """The requests a model call serves: their ids, the earliest deadline (monotonic) and,
    when the replica knows it, one event per request that is set once its caller gave it
    up (``given_up``; empty: not known)."""

    request_ids: tuple[str, ...]
    deadline: float
    given_up: tuple[GivenUp, ...] = field(default=(), compare=False)

    @property
    def abandoned(self) -> bool:
        """Whether every request it serves was given up (none waits for the answer)."""
        return bool(self.given_up) and all(e.is_set() for e in self.given_up)

    @classmethod
    def merge(cls, contexts: Iterable[CallContext | None]) -> CallContext | None:
        known = [c for c in contexts if c is not None]
        if not known:
            return None
        ids = tuple(i for c in known for i in c.request_ids)
        # Abandoned only when each request is: one without events keeps the batch wanted.
        given_up = tuple(e for c in known for e in c.given_up) if all(c.given_up for c in known) else ()
        return cls(ids, min(c.deadline for c in known), given_up)


_GIVEN_UP_CHECK_S = 0.05
"""How often a blocking ``infer`` looks whether its requests were given up."""

current_call: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "shoal_current_call", default=None
)
"""Set by the replica around each request (and by the batcher around each batch); read by
the handles. Backends copy it into their model thread."""


def given_up() -> bool:
    """Whether every request the running model call serves was given up: its deadline
    passed or its client went away (in a batch: each of its requests). For a python model's
    ``predict`` that works in steps (on the model thread or the event loop), to stop
    computing what nobody will read; false outside a model call. ``shoal.given_up``."""
    call = current_call.get()
    return call is not None and call.abandoned


class DeploymentCaller(Protocol):
    """How a replica reaches another deployment (gRPC to its scheduler, in ``replica_main``)."""

    async def infer(
        self,
        deployment: str,
        inputs: Arrays,
        *,
        timeout_s: float = 0.0,
        request_id: str = "",
        model_id: str = "",
    ) -> tuple[Arrays, str]: ...


class DeploymentHandle:
    """Calls one deployment. Safe from the model thread and from the replica's event loop."""

    def __init__(
        self, name: str, caller: DeploymentCaller, loop: asyncio.AbstractEventLoop, own: str = ""
    ) -> None:
        self.name = name
        self._caller = caller
        self._loop = loop
        self._own = own  # the calling deployment, for errors

    async def ainfer(self, inputs: Arrays, *, model_id: str = "") -> Arrays:
        """The deployment's outputs for ``inputs``; ``model_id``: which model of a multiplexed
        deployment. Raises ShoalError (the target's own errors, DeadlineExceeded when the
        calling request's deadline passes, FailedPrecondition when the target does not
        exist)."""
        call = current_call.get()
        timeout_s = 0.0
        request_id = ""
        if call is not None:
            timeout_s = call.deadline - time.monotonic()
            if timeout_s <= 0:
                raise DeadlineExceeded(
                    f"no time left of request {call.request_ids[0]}'s deadline to call {self.name!r}"
                )
            request_id = call.request_ids[0]
        try:
            outputs, _ = await self._caller.infer(
                self.name, inputs, timeout_s=timeout_s, request_id=request_id, model_id=model_id
            )
        except NotFound as err:
            # Passed up as it was, the client of this deployment got 404 "no deployment
            # named 'x'" for a request to a deployment that exists: a Triton or KServe client
            # concluded its own model was missing.
            caller = f"deployment {self._own!r}" if self._own else "this deployment"
            raise FailedPrecondition(f"{caller} calls {self.name!r}, which answered: {err.message}") from None
        except Unavailable as err:
            # The target's replicas were tried already (request_attempts): the replicas of
            # this deployment would fail the same way. Before, the caller's router retried the
            # whole request on another of them: one request failing 2 deep took 4 replicas
            # of the target down, and request_attempts ** depth in general.
            err.retry_elsewhere = False
            raise
        return outputs

    def infer(self, inputs: Arrays, *, model_id: str = "") -> Arrays:
        """``ainfer`` for a plain ``predict``, which runs on the model thread: blocks it until
        the answer. Called on the event loop itself it would block the replica: refused."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise BlocksLoop(
                f"deployments[{self.name!r}].infer() blocks: from async def predict, "
                f"await deployments[{self.name!r}].ainfer(...)"
            )
        # The calling thread's request (current_call) goes with the call to the loop.
        call = current_call.get()
        future = asyncio.run_coroutine_threadsafe(self._as(call, inputs, model_id), self._loop)
        if call is None or not call.given_up:
            return future.result()
        # Before, a call whose request's client hung up ran on to its answer or deadline, and
        # the model thread with it: the replica served no one else meanwhile (a caller of a
        # 3 s deployment stayed blocked 2.3 s after its client left).
        while True:
            try:
                return future.result(timeout=_GIVEN_UP_CHECK_S)
            except concurrent.futures.TimeoutError:
                if call.abandoned:
                    future.cancel()  # the call's gRPC request too: the target drops it
                    raise DeadlineExceeded(
                        f"request {call.request_ids[0]} was given up (its deadline passed or its caller "
                        f"went away): its call to {self.name!r} is cancelled"
                    ) from None

    async def _as(self, call: CallContext | None, inputs: Arrays, model_id: str) -> Arrays:
        current_call.set(call)  # in this task only
        return await self.ainfer(inputs, model_id=model_id)


class Deployments:
    """``deployments[name]``: a handle to the deployment ``name`` (taken lazily: the target
    need not exist until it is called, and is checked then)."""

    def __init__(self, own: str, caller: DeploymentCaller, loop: asyncio.AbstractEventLoop) -> None:
        self._own = own
        self._caller = caller
        self._loop = loop
        self._handles: dict[str, DeploymentHandle] = {}

    @property
    def taken(self) -> bool:
        """Whether the model has taken a handle (it calls other deployments)."""
        return bool(self._handles)

    def __getitem__(self, name: str) -> DeploymentHandle:
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"deployments[...] takes a deployment name, got {name!r}")
        if name == self._own:
            raise InvalidArgument(f"deployment {name!r} cannot call itself")
        handle = self._handles.get(name)
        if handle is None:
            handle = self._handles[name] = DeploymentHandle(name, self._caller, self._loop, self._own)
        return handle

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(name) and name != self._own

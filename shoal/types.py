"""Plain data that crosses component boundaries, and the seams to remote things.

Each Protocol here has a gRPC implementation in ``shoal.rpc.clients`` and an
in-memory twin in ``shoal.testing.fakes``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from shoal.core.cluster import ReplicaReport
from shoal.core.payload import Tensors
from shoal.core.placement import Capacity
from shoal.core.spec import DeploymentSpec, TensorSpec
from shoal.core.traffic import TrafficRoute

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class PingResult:
    state: str
    in_flight: int
    queued: int
    batch_sizes: Mapping[int, int] = field(default_factory=dict)
    # Multiplexed deployments: cumulative per model id (shoal.replica.multiplex.ModelCache).
    model_loads: Mapping[str, int] = field(default_factory=dict)
    model_evictions: Mapping[str, int] = field(default_factory=dict)
    model_hits: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ReplicaDescription:
    """What a replica serves (its model's inputs and outputs) and how it has batched."""

    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    batch_sizes: Mapping[int, int] = field(default_factory=dict)
    requests: int = 0
    batches: int = 0
    compute_ns: int = 0


@dataclass(frozen=True)
class LoadReport:
    """One deployment at one scheduler's router: load now, and cumulative counts."""

    in_flight: int = 0
    queued: int = 0
    requests: int = 0
    errors: int = 0
    latency: tuple[int, ...] = ()


@dataclass(frozen=True)
class Route:
    replica_id: str
    address: str
    scheduler_id: str
    in_flight: int = 0
    revision: int = 0
    """The revision of its deployment the replica runs (0: not known): OIP version N is revision N."""


@dataclass(frozen=True)
class DeploymentRoutes:
    spec: DeploymentSpec
    routes: tuple[Route, ...] = ()
    allowed_tokens: tuple[str, ...] = ()
    """Hashes of the tokens the spec's ``auth.tokens`` names (that exist)."""
    revision: int = 0
    """The deployment's current revision, the one ``spec`` is (0: none kept)."""
    failed: str = ""
    """Why the deployment is FAILED (its replicas died starting; none is started again until
    the next deploy), or "": a request that finds none of its replicas is refused with it."""
    unplaced: str = ""
    """Why replicas it wants cannot be placed (no scheduler has room or is big enough, no live
    scheduler), or "": a request that waited for a replica in vain is told it."""


@dataclass(frozen=True)
class RoutingTable:
    version: int
    deployments: Mapping[str, DeploymentRoutes] = field(default_factory=dict)
    token_hashes: tuple[str, ...] = ()
    """Hashes of every token: a scheduler tells an unknown token (401) from one not allowed (403)."""
    deleted: tuple[str, ...] = ()
    """Deployments deleted at the head: schedulers stop routing to them at once."""
    traffic: Mapping[str, TrafficRoute] = field(default_factory=dict)
    """Traffic routes (``shoal route``): names whose requests go to deployments by weight."""
    ack: bool = False
    """A control call waits until schedulers route by this table: say so at once (a health
    update with ``routes_version``; from a scheduler to its ingress workers, a report)."""
    adopting: bool = False
    """The head started less than ``dead_after_s`` ago and waits for schedulers to register
    again: one whose scheduler has no route in this table may not have registered yet, and
    its replicas are kept where they route until a table without this (``Router._apply_table``)."""


@dataclass(frozen=True)
class SchedulerRegistration:
    scheduler_id: str
    address: str
    http_address: str
    capacity: Capacity
    pid: int
    hostname: str
    replicas: tuple[ReplicaReport, ...] = ()
    max_replicas: int = 0  # replicas it runs at most (``Settings.max_replicas``); 0: no bound
    # It says which routing table it routes by (health updates' ``routes_version``): the
    # head waits for its word from its registration on (``HeadNode._routes_out``).
    says_routes: bool = False
    # The host the registration came from, as the head saw its connection (not the address
    # the scheduler advertises): blob claims in the scheduler's name must come from there.
    peer: str = ""


@dataclass(frozen=True)
class ChatMessage:
    """One message of a chat (OpenAI's ``messages``)."""

    role: str
    content: str


@dataclass(frozen=True)
class GenerateRequest:
    """One text generation: a ``prompt`` or a chat (``messages``), and its parameters.

    None (0 for ``max_tokens``, empty for ``stop``) leaves a parameter to the deployment's
    defaults; the replica validates the values (InvalidArgument).
    """

    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    max_tokens: int = 0
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = True
    """True: a chunk per text piece as it is made; False: one chunk with all the text."""


@dataclass(frozen=True)
class GenerateChunk:
    """A piece of a generation. The last chunk of a generation has ``finish_reason``
    (``stop``, ``length`` or ``abort``) and the token counts; its ``text`` may be empty."""

    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def last(self) -> bool:
        return bool(self.finish_reason)


class ReplicaClient(Protocol):
    """The scheduler's connection to one replica process."""

    async def ping(self, timeout_s: float) -> PingResult: ...

    async def push(
        self,
        request_id: str,
        inputs: Tensors,
        timeout_s: float,
        *,
        model_id: str = "",
        classify: Mapping[str, int] | None = None,
    ) -> Tensors:
        """Run one request, tensors as they came off the wire (nothing decoded here), on model
        ``model_id`` of a multiplexed deployment (empty for any other). ``classify``: output
        name -> k, outputs the replica answers as their top k classes (Triton's
        classification extension, :mod:`shoal.core.classify`); None for a request that
        asks for none.

        Raises ShoalError; Unavailable when the replica cannot be reached."""
        ...

    async def drain(self, grace_s: float) -> None: ...

    async def describe(self, timeout_s: float) -> ReplicaDescription: ...

    def generate(
        self, request_id: str, request: GenerateRequest, timeout_s: float
    ) -> AsyncGenerator[GenerateChunk, None]:
        """Run one text generation, chunk by chunk (see :class:`GenerateChunk`).

        An async generator: closing it (or cancelling its consumer) stops the generation on
        the replica. Raises ShoalError; Unavailable when the replica cannot be reached or goes
        away; InvalidArgument when its model does not generate text.
        """
        ...

    async def close(self) -> None:
        """Close the connection: every ``push`` still pending fails with Unavailable at once
        (the router closes the client of a replica that died, and retries those requests)."""
        ...


class SchedulerClient(Protocol):
    """The head's connection to one scheduler."""

    async def create_replica(self, replica_id: str, spec: DeploymentSpec) -> int:
        """Start a replica; returns the scheduler's registry version after adding it."""
        ...

    async def remove_replica(self, replica_id: str, graceful: bool) -> None: ...

    def read_log(self, replica_id: str, tail_bytes: int, follow: bool) -> AsyncIterator[bytes]:
        """A replica's log; NotFound if this scheduler has no log for it."""
        ...

    async def close(self) -> None: ...


class HeadLink(Protocol):
    """A scheduler's connection to the head."""

    async def register(self, reg: SchedulerRegistration) -> float:
        """Returns the heartbeat interval the head wants."""
        ...

    async def health(
        self,
        scheduler_id: str,
        registry_version: int,
        replicas: list[ReplicaReport],
        load: Mapping[str, LoadReport],
        routes_version: int = 0,
    ) -> bool:
        """False: NACK, register again. Raises ShoalError when the head cannot be reached.
        ``routes_version``: the newest routing table this scheduler and all its ingress
        processes route by (0: not said)."""
        ...

    def watch_routes(self, scheduler_id: str) -> AsyncIterator[RoutingTable]: ...

    async def close(self) -> None: ...

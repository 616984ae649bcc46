"""The Open Inference Protocol's view of a scheduler's deployments (KServe V2 / Triton).

Every deployment the scheduler's router knows is a *model*. Its versions are its
revisions (``shoal history``): version ``"N"`` is revision N, and the versions that
*serve* are the revisions whose replicas are READY (with ``serve_revisions`` above 1 the
latest few keep serving; see :meth:`ModelCatalog.revision`). A model file in Triton's
layout (``.../NAME/N/model.onnx``, from a model repository) has one version instead, its
folder's ``"N"`` (:func:`model_version`); so has a deployment from before revisions were
kept, ``"1"``.
:class:`ModelCatalog` answers what the protocol asks of models (readiness, metadata,
Triton's model configuration, statistics), checks inference requests against the
model's metadata and runs them through the :class:`~shoal.scheduler.router.Router`.

No wire types here: the gRPC servicer (``shoal.rpc.inference_service``) and the REST
routes (``shoal.http.scheduler``) decode a request into numpy arrays, call the catalog
and encode what it returns. Both transports share one catalog per scheduler, so
statistics count requests from either. Errors are :mod:`shoal.errors` (NotFound for an
unknown model or version, InvalidArgument naming the offending tensor, and what the
router raises: ResourceExhausted, DeadlineExceeded, Unavailable).

Metadata is the spec's declared ``inputs``/``outputs``; what a spec leaves out is asked
once of a READY replica of the current revision (``ReplicaClient.describe``: what its
backend derived from the model) and cached per spec hash. An earlier version that still
serves (``serve_revisions``) has its own tensors, which may differ from the current
spec's, and the router knows only the current spec: they are asked of a READY replica of
that revision (its spec's declared tensors, or what its backend derived) and cached per
revision while the replica that described them runs it. A request naming that version is
checked against them, and its metadata and configuration list them; a request naming
no version, or the current one, is checked against the current spec's as before.

Statistics follow Triton's ``ModelStatistics``. Request counts and durations
(``success``, ``fail``, ``inference_count``, ``last_inference``) are those of requests
sent through this scheduler's catalog; ``queue`` is the router's wait for a replica with
room (all requests through this scheduler); ``execution_count``, ``compute_infer`` and
``batch_stats`` add up what the deployment's READY replicas report of their own work,
whoever sent it: their successful model calls only, as Triton counts executions (a failed
batch, run again one request at a time, counts the calls that answered). Replicas count
model calls per batch size, not time per batch size, so a batch entry's
``compute_infer.ns`` is 0. ``docs/triton.md`` says what each count means.

Everything here runs on the scheduler's event loop; nothing is thread-safe.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import shoal
from shoal.core import limits, payload, triton_repo
from shoal.core.payload import Tensors
from shoal.core.spec import DeploymentSpec, TensorSpec
from shoal.errors import InvalidArgument, NotFound, ShoalError, Unavailable
from shoal.scheduler.generate import generates_text
from shoal.scheduler.router import Router
from shoal.types import ReplicaClient, ReplicaDescription

#: The one version of a deployment whose model file is not in Triton's layout.
VERSION = "1"

#: Protocol extensions that work end to end (both transports unless noted).
EXTENSIONS = (
    "model_configuration",
    "statistics",
    "binary_tensor_data",  # HTTP: Triton's binary tensor data extension
    "classification",  # an output's top k classes (shoal.core.classify)
)

#: Why the protocol's other extensions answer UNIMPLEMENTED (HTTP 501), worded alike on both.
NO_SHARED_MEMORY = "shared memory is not supported; send tensors in the request"
NO_TRACE = "tracing is not supported"
NO_LOG_SETTINGS = "log settings are not supported over the protocol; use the scheduler's --log-level"


# ---------------------------------------------------------------- plain answers


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "extensions": list(self.extensions)}


@dataclass(frozen=True)
class ModelMetadata:
    """A model's name, versions, platform (the backend) and tensors, shapes with the batch axis."""

    name: str
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    versions: tuple[str, ...] = (VERSION,)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": list(self.versions),
            "platform": self.platform,
            "inputs": [_tensor_json(t) for t in self.inputs],
            "outputs": [_tensor_json(t) for t in self.outputs],
        }


def _tensor_json(t: TensorSpec) -> dict[str, Any]:
    return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}


@dataclass(frozen=True)
class Duration:
    """Triton's ``StatisticDuration``: how many, and their total nanoseconds."""

    count: int = 0
    ns: int = 0

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(frozen=True)
class BatchStatistics:
    batch_size: int
    compute_infer: Duration

    def to_json(self) -> dict[str, Any]:
        # Input and output handling is not timed apart from the model call; their counts
        # must still equal compute_infer's (perf_analyzer checks that they agree).
        untimed = Duration(self.compute_infer.count, 0).to_json()
        return {
            "batch_size": self.batch_size,
            "compute_input": untimed,
            "compute_infer": self.compute_infer.to_json(),
            "compute_output": untimed,
        }


@dataclass(frozen=True)
class ModelStatistics:
    """One model's statistics, as Triton's ``ModelStatistics`` (see the module docstring)."""

    name: str
    version: str = VERSION
    last_inference: int = 0  # ms since the epoch
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute_infer: Duration = Duration()
    batch_stats: tuple[BatchStatistics, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Triton's JSON form (the REST body; the gRPC servicer parses it into protobuf)."""
        zero = Duration().to_json()
        # Same counts for input, infer and output (perf_analyzer aborts when they differ).
        untimed = Duration(self.compute_infer.count, 0).to_json()
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.to_json(),
                "fail": self.fail.to_json(),
                "queue": self.queue.to_json(),
                "compute_input": untimed,
                "compute_infer": self.compute_infer.to_json(),
                "compute_output": untimed,
                "cache_hit": zero,
                "cache_miss": zero,
            },
            "batch_stats": [b.to_json() for b in self.batch_stats],
            "memory_usage": [],
        }


NO_READY_REPLICA = "no READY replica"  # an index entry's reason: the model does not serve now


@dataclass(frozen=True)
class ModelIndexEntry:
    """One row of the model repository index."""

    name: str
    version: str
    state: str  # READY or UNAVAILABLE
    reason: str = ""

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "state": self.state, "reason": self.reason}


@dataclass(slots=True)
class InferResult:
    """What a model answered: its outputs as they came off the wire, and who answered.
    Not changed once made (not frozen: cheaper to make, and every request makes one)."""

    model_name: str
    model_version: str
    id: str
    outputs: Tensors
    replica_id: str = ""


# ---------------------------------------------------------------- pure rules


def model_version(spec: DeploymentSpec) -> str:
    """The version ``spec`` answers as: ``N`` when its model file is in Triton's layout
    (``.../NAME/N/FILE``), else :data:`VERSION`."""
    return str(triton_repo.layout_version(spec) or VERSION)


def check_version(spec: DeploymentSpec, version: str) -> None:
    """``""`` (the latest) and :func:`model_version` are the only versions; NotFound otherwise."""
    served = model_version(spec)
    if version not in ("", served):
        raise NotFound(f"model {spec.name!r} has no version {version!r}; its only version is {served!r}")


def version_number(spec: DeploymentSpec, version: str) -> int:
    """``version`` as a revision number: InvalidArgument unless a positive integer."""
    if not version.isascii() or not version.isdigit() or len(version) > 9 or int(version) == 0:
        raise InvalidArgument(
            f"model {spec.name!r}: version {version[:64]!r} is not a version number "
            "(a positive integer: the deployment's revision)"
        )
    return int(version)


def max_batch_size(spec: DeploymentSpec) -> int:
    """Triton's ``max_batch_size``: 0 when the deployment does not batch (shoal's 1)."""
    size = spec.batching.max_batch_size
    return size if size > 1 else 0


def _fmt_shape(shape: Iterable[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def check_inputs(metadata: ModelMetadata, inputs: Tensors) -> None:
    """Raise InvalidArgument naming the input when ``inputs`` do not fit ``metadata.inputs``.

    From the tensors' headers only (nothing is decoded), by the same rules as the
    replica's backends (:func:`shoal.core.payload.check_declared`). Nothing is checked
    when the model's inputs are unknown (empty).
    """
    payload.check_declared(metadata.inputs, payload.headers(inputs), metadata.name)


def check_outputs(metadata: ModelMetadata, requested: Sequence[str]) -> None:
    """Raise InvalidArgument for a duplicate requested output, or an unknown one when outputs are known."""
    seen: set[str] = set()
    known = {t.name for t in metadata.outputs}
    for name in requested:
        if name in seen:
            raise InvalidArgument(f"output {limits.quoted(name)} is requested twice")
        seen.add(name)
        if known and name not in known:
            returns = limits.shown(", ".join(repr(t.name) for t in metadata.outputs))
            raise InvalidArgument(
                f"unknown output {limits.quoted(name)}; model {metadata.name!r} returns {returns}"
            )


def _config_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def _config_tensor(t: TensorSpec, batched: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": t.name, "data_type": _config_type(t.datatype)}
    dims = list(t.shape[1:]) if batched else list(t.shape)
    if batched and not dims:
        # Triton's form for a tensor that is only the batch axis: one element per row,
        # reshaped to a scalar (so its metadata shape is [-1]).
        entry["dims"] = [1]
        entry["reshape"] = {"shape": []}
    else:
        entry["dims"] = dims
    return entry


def model_config(spec: DeploymentSpec, metadata: ModelMetadata, instances: int) -> dict[str, Any]:
    """Triton's model configuration for ``spec``, in its JSON form (``model_config.proto``).

    ``max_batch_size`` is 0 when the deployment does not batch, and then ``dims`` are the
    whole shape; when it batches, ``dims`` leave out axis 0 (the batch) and
    ``dynamic_batching`` carries the delay. ``instances`` is the number of READY replicas.
    """
    mbs = max_batch_size(spec)
    inputs = []
    for t in metadata.inputs:
        entry = _config_tensor(t, mbs > 0)
        entry.update(
            format="FORMAT_NONE", is_shape_tensor=False, allow_ragged_batch=False, optional=t.optional
        )
        inputs.append(entry)
    outputs = []
    for t in metadata.outputs:
        entry = _config_tensor(t, mbs > 0)
        entry.update(label_filename="", is_shape_tensor=False)
        outputs.append(entry)
    config: dict[str, Any] = {
        "name": spec.name,
        "platform": spec.backend,
        "backend": spec.backend,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": mbs,
        "input": inputs,
        "output": outputs,
        "instance_group": [
            {
                "name": spec.name,
                "kind": "KIND_GPU" if spec.resources.gpus > 0 else "KIND_CPU",
                "count": instances,
            }
        ],
        # Decoupled: ModelStreamInfer answers a generation with a response per piece of text.
        "model_transaction_policy": {"decoupled": generates_text(spec)},
    }
    if mbs:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": round(spec.batching.max_delay_ms * 1000),
            "preserve_ordering": False,
        }
    return config


# ---------------------------------------------------------------- the catalog


@dataclass
class _Counters:
    """Requests this catalog sent for one deployment."""

    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    inferences: int = 0  # rows when the model batches, requests otherwise (as Triton counts)
    last_ms: int = 0


class ModelCatalog:
    """The models a scheduler serves, over its router.

    ``ready`` answers server readiness (the scheduler's own state); ``describe_timeout_s``
    bounds each ``describe`` call to a replica.
    """

    def __init__(
        self,
        router: Router,
        *,
        ready: Callable[[], bool] = lambda: True,
        describe_timeout_s: float = 2.0,
        totals: Callable[[], Awaitable[Mapping[str, Any]]] | None = None,
    ) -> None:
        """``totals``: with ingress workers, every process's counts per deployment
        (``shoal.scheduler.ingress.Counts``), which statistics then report instead of this
        catalog's own."""
        self._totals = totals
        self._router = router
        self._ready = ready
        self._describe_timeout_s = describe_timeout_s
        self._described: dict[str, tuple[str, ReplicaDescription]] = {}  # name -> (spec hash, description)
        self._describing: dict[str, asyncio.Lock] = {}
        # (name, earlier revision) -> (the replica that described it, its metadata)
        self._earlier: dict[tuple[str, int], tuple[str, ModelMetadata]] = {}
        self._describing_earlier: dict[tuple[str, int], asyncio.Lock] = {}
        self._counters: dict[str, _Counters] = {}

    @property
    def router(self) -> Router:
        """The router requests go through (text generation streams use it directly)."""
        return self._router

    # -- server

    def server_live(self) -> bool:
        return True

    def server_ready(self) -> bool:
        return self._ready()

    def server_metadata(self, repository: bool = False) -> ServerMetadata:
        """``repository``: the scheduler serves a Triton model repository (load and unload work),
        so the list names the model_repository extension too."""
        extensions = (*EXTENSIONS, "model_repository") if repository else EXTENSIONS
        return ServerMetadata("shoal", shoal.__version__, extensions)

    # -- models

    def spec(self, name: str, version: str = "") -> DeploymentSpec:
        """The deployment behind model ``name``; NotFound for an unknown model or a version that
        does not serve, InvalidArgument for a version that is no number (see :meth:`revision`)."""
        try:
            spec = self._router.spec(name)
        except NotFound:
            raise NotFound(f"unknown model {limits.shown(repr(name))}: no deployment of that name") from None
        if version:
            self.revision(spec, version)
        return spec

    def revision(self, spec: DeploymentSpec, version: str) -> int:
        """The revision a request for ``version`` of ``spec`` goes to: 0 for any (``""``, and
        the one version of a model in Triton's layout or from before revisions were kept).

        A version N must serve: a replica of revision N is READY, or N is the current
        revision (its requests wait for a replica, as requests naming no version do).
        NotFound otherwise, naming the versions that serve; InvalidArgument for a version
        that is no positive integer.
        """
        if not version:
            return 0
        number = version_number(spec, version)
        if triton_repo.layout_version(spec):
            check_version(spec, version)
            return 0
        current, serving = self._router.versions(spec.name)
        if not current and not serving:
            check_version(spec, version)  # kept no revisions: its one version, "1"
            return 0
        if number != current and number not in serving:
            raise NotFound(
                f"model {spec.name!r} has no version {version!r} serving; versions that serve: "
                f"{', '.join(self.versions(spec)) or 'none'}"
            )
        return number

    def versions(self, spec: DeploymentSpec) -> tuple[str, ...]:
        """The versions of ``spec`` that serve, ascending: revisions with a READY replica; the
        current one alone when none has (see the module docstring for the other cases)."""
        if triton_repo.layout_version(spec):
            return (model_version(spec),)
        current, serving = self._router.versions(spec.name)
        if serving:
            return tuple(str(n) for n in sorted(serving))
        return (str(current or VERSION),)

    def served_version(self, spec: DeploymentSpec, replica_id: str) -> str:
        """The version a request that ``replica_id`` answered was served by."""
        revision = 0 if triton_repo.layout_version(spec) else self._router.revision_of(spec.name, replica_id)
        return str(revision) if revision else self.versions(spec)[-1]

    def model_ready(self, name: str, version: str = "") -> bool:
        """Whether ``name`` (of ``version``) has a READY replica; NotFound for an unknown model
        or a version that does not serve."""
        spec = self.spec(name)
        number = self.revision(spec, version)
        if number:
            return self._router.versions(name)[1].get(number, 0) > 0
        return self._router.ready_count(name) > 0

    def index(self, *, ready_only: bool = False) -> list[ModelIndexEntry]:
        """Every model, sorted by name, a row per version that serves (READY), or one row of
        its current version, UNAVAILABLE (no READY replica)."""
        out: list[ModelIndexEntry] = []
        for name, spec in sorted(self._router.deployments().items()):
            ready = self._router.ready_count(name) > 0
            if ready_only and not ready:
                continue
            reason = "" if ready else NO_READY_REPLICA
            state = "READY" if ready else "UNAVAILABLE"
            out.extend(ModelIndexEntry(name, v, state, reason) for v in self.versions(spec))
        return out

    async def metadata(self, name: str, version: str = "") -> ModelMetadata:
        """Name, versions, platform and tensors of ``name`` (the tensors of ``version``'s
        revision: an earlier one's as its replicas describe them; the platform is the current
        spec's backend).

        Raises NotFound for an unknown model or version, Unavailable when the spec
        declares no tensors (or the version is an earlier revision) and no READY replica
        can describe them.
        """
        spec = self.spec(name)
        number = self.revision(spec, version)
        if number and number != self._router.current_revision(name):
            metadata = await self._earlier_metadata(spec, number, wait=True)
        else:
            metadata = await self._metadata(spec, wait=True)
        assert metadata is not None  # wait=True raises instead
        return dataclasses.replace(metadata, versions=self.versions(spec))

    async def config(self, name: str, version: str = "") -> dict[str, Any]:
        """Triton's model configuration in its JSON form (see :func:`model_config`)."""
        spec = self.spec(name, version)
        metadata = await self.metadata(name, version)
        config = model_config(spec, metadata, self._router.ready_count(name))
        if not triton_repo.layout_version(spec):
            config["version_policy"] = {"latest": {"num_versions": spec.serve_revisions}}
        return config

    async def statistics(self, name: str = "", version: str = "") -> list[ModelStatistics]:
        """Statistics of ``name``, or of every model when ``name`` is empty (sorted by name)."""
        if name:
            specs = [self.spec(name, version)]
        else:
            specs = [spec for _, spec in sorted(self._router.deployments().items())]
        self._forget_gone()
        totals = await self._totals() if self._totals is not None else None
        return list(await asyncio.gather(*(self._statistics(spec, totals) for spec in specs)))

    # -- inference (the data plane's door, ``shoal.scheduler.dataplane``, runs requests)

    async def request_metadata(self, spec: DeploymentSpec, revision: int = 0) -> ModelMetadata:
        """The metadata a request to ``revision`` (as :meth:`revision` answers; 0: any, the
        current spec's) is checked against: declared, or described by a READY replica;
        only the declared part when no replica can describe it yet (the request then waits
        for one as usual, and the replica checks what is left).

        An earlier revision than the current one: what its replicas describe (cached, see
        the module docstring); nothing when none can (the request then finds no replica
        of it, or the replica checks)."""
        if revision and revision != self._router.current_revision(spec.name):
            return await self._earlier_metadata(spec, revision, wait=False) or _unchecked(spec)
        return await self._metadata(spec, wait=False) or _declared(spec)

    def known_metadata(self, spec: DeploymentSpec, revision: int = 0) -> ModelMetadata | None:
        """What :meth:`request_metadata` answers when it is at hand (declared, or described
        and kept), without a coroutine; None when a replica may have to be asked. Every
        request asks, so the usual case costs a lookup, not two coroutines."""
        if revision and revision != self._router.current_revision(spec.name):
            return self._earlier_kept(spec, revision)
        return self._kept(spec)

    def record(self, spec: DeploymentSpec, *, ok: bool, elapsed_ns: int, rows: int) -> None:
        """Count one request in Triton's statistics: ``success`` or ``fail`` with its duration;
        ``inference_count`` adds ``rows`` when the model batches (one otherwise)."""
        counters = self._counters_of(spec)
        if not ok:
            counters.fail += 1
            counters.fail_ns += elapsed_ns
            return
        counters.success += 1
        counters.success_ns += elapsed_ns
        counters.inferences += rows if max_batch_size(spec) else 1
        counters.last_ms = time.time_ns() // 1_000_000

    # -- internals

    async def _metadata(self, spec: DeploymentSpec, *, wait: bool) -> ModelMetadata | None:
        """The spec's tensors, completed by a replica's description when it declares none.

        With ``wait`` false, None when a description would be needed but no READY
        replica can give one (a request then queues for a replica as usual); with
        ``wait`` true, Unavailable instead.
        """
        kept = self._kept(spec)
        if kept is not None:
            return kept
        try:
            described = await self._describe(spec)
        except Unavailable:
            if wait:
                raise
            return None
        # Kept with the frozen spec for the description it completes: one per request was
        # built before (a request's path should build nothing it built for the last one).
        kept = spec.derived.get("described")
        if kept is not None and kept[0] is described:
            return cast(ModelMetadata, kept[1])
        metadata = ModelMetadata(
            name=spec.name,
            platform=spec.backend,
            inputs=spec.inputs or described.inputs,
            outputs=spec.outputs or described.outputs,
            versions=(model_version(spec),),
        )
        spec.derived["described"] = (described, metadata)
        return metadata

    def _kept(self, spec: DeploymentSpec) -> ModelMetadata | None:
        """``spec``'s metadata without asking a replica: declared, or completed by the
        description kept for this spec (None: a replica must describe it)."""
        if spec.inputs and spec.outputs:
            return _declared(spec)
        kept = spec.derived.get("described")
        described = self._described.get(spec.name)
        if (
            kept is not None
            and described is not None
            and kept[0] is described[1]
            and described[0] == spec.process_hash()
        ):
            return cast(ModelMetadata, kept[1])
        return None

    async def _describe(self, spec: DeploymentSpec) -> ReplicaDescription:
        key = spec.process_hash()
        hit = self._described.get(spec.name)
        if hit is not None and hit[0] == key:
            return hit[1]
        lock = self._describing.setdefault(spec.name, asyncio.Lock())
        async with lock:
            hit = self._described.get(spec.name)
            if hit is not None and hit[0] == key:
                return hit[1]
            clients = self._router.ready_clients(spec.name)
            current = self._router.current_revision(spec.name)
            if current:
                # A replica of an earlier revision that still serves would describe that
                # revision's tensors: one of the current revision, else one whose revision
                # the routing table has not told yet (it just joined).
                known = {rid: self._router.revision_of(spec.name, rid) for rid, _ in clients}
                clients = [c for c in clients if known[c[0]] == current] + [
                    c for c in clients if not known[c[0]]
                ]
            if not clients:
                raise Unavailable(
                    f"model {spec.name!r} has no READY replica to describe its inputs and outputs "
                    "(declare them in the deployment spec to have them without one)"
                )
            last: ShoalError | None = None
            for _, client in clients:
                try:
                    described = await client.describe(self._describe_timeout_s)
                except ShoalError as err:
                    last = err
                    continue
                self._described[spec.name] = (key, described)
                return described
            raise Unavailable(f"no replica of model {spec.name!r} could describe it: {last}")

    def _earlier_kept(self, spec: DeploymentSpec, revision: int) -> ModelMetadata | None:
        """The tensors of earlier ``revision`` as described and kept, while the replica that
        described them still runs it (None: ask one)."""
        hit = self._earlier.get((spec.name, revision))
        if hit is not None and self._router.revision_of(spec.name, hit[0]) == revision:
            return hit[1]
        return None

    async def _earlier_metadata(
        self, spec: DeploymentSpec, revision: int, *, wait: bool
    ) -> ModelMetadata | None:
        """The tensors of ``revision``, an earlier revision of ``spec``'s deployment than
        ``spec`` (the router knows only the current spec): what a READY replica of it
        describes, kept while that replica runs it (one lookup a request).

        With ``wait`` false, None when no replica of it can describe them; with ``wait``
        true, Unavailable instead.
        """
        key = (spec.name, revision)
        kept = self._earlier_kept(spec, revision)
        if kept is not None:
            return kept
        lock = self._describing_earlier.setdefault(key, asyncio.Lock())
        async with lock:
            kept = self._earlier_kept(spec, revision)
            if kept is not None:
                return kept
            last: ShoalError | None = None
            for rid, client in self._router.ready_clients(spec.name, revision):
                try:
                    described = await client.describe(self._describe_timeout_s)
                except ShoalError as err:
                    last = err
                    continue
                metadata = ModelMetadata(
                    name=spec.name,
                    platform=spec.backend,
                    inputs=described.inputs,
                    outputs=described.outputs,
                    versions=(model_version(spec),),
                )
                self._earlier[key] = (rid, metadata)
                return metadata
        if not wait:
            return None
        if last is None:
            raise Unavailable(
                f"model {spec.name!r} has no READY replica of version {revision} "
                "to describe its inputs and outputs"
            )
        raise Unavailable(
            f"no replica of version {revision} of model {spec.name!r} could describe it: {last}"
        )

    async def _statistics(self, spec: DeploymentSpec, totals: Mapping[str, Any] | None) -> ModelStatistics:
        clients = self._router.ready_clients(spec.name)
        described = await asyncio.gather(*(self._describe_quietly(c) for _, c in clients))
        sizes: collections.Counter[int] = collections.Counter()
        batches = requests = compute_ns = 0
        for d in described:
            if d is None:
                continue
            sizes.update(d.batch_sizes)
            batches += d.batches
            requests += d.requests
            compute_ns += d.compute_ns
        if max_batch_size(spec):
            batch_stats = tuple(
                BatchStatistics(size, Duration(count, 0)) for size, count in sorted(sizes.items()) if count
            )
        else:
            # Without batching every model call is one request: Triton's batch size 1.
            batch_stats = (BatchStatistics(1, Duration(batches, 0)),) if batches else ()
        c = self._counters.get(spec.name) or _Counters()
        routed = self._router.stats().get(spec.name)
        queue = Duration(routed.queue.count, int(routed.queue.total * 1e9)) if routed else Duration()
        summed = totals.get(spec.name) if totals is not None else None
        if summed is not None:
            # Ingress workers: every process's requests, not only this one's.
            c = _Counters(
                summed.success,
                summed.success_ns,
                summed.fail,
                summed.fail_ns,
                summed.inferences,
                summed.last_ms,
            )
            queue = Duration(summed.stats.queue.count, int(summed.stats.queue.total * 1e9))
        return ModelStatistics(
            name=spec.name,
            version=self.versions(spec)[-1],
            last_inference=c.last_ms,
            inference_count=c.inferences,
            execution_count=batches,
            success=Duration(c.success, c.success_ns),
            fail=Duration(c.fail, c.fail_ns),
            queue=queue,
            compute_infer=Duration(requests, compute_ns),
            batch_stats=batch_stats,
        )

    async def _describe_quietly(self, client: ReplicaClient) -> ReplicaDescription | None:
        try:
            return await client.describe(self._describe_timeout_s)
        except ShoalError:
            return None  # a replica going away does not fail the statistics of the others

    def counters(self, name: str) -> _Counters:
        """What this catalog counted for ``name`` (zeros for a deployment it has not seen)."""
        return self._counters.get(name) or _Counters()

    def _counters_of(self, spec: DeploymentSpec) -> _Counters:
        counters = self._counters.get(spec.name)
        if counters is None:
            counters = self._counters[spec.name] = _Counters()
        return counters

    def _forget_gone(self) -> None:
        known = self._router.deployments()
        for name in [n for n in self._counters if n not in known]:
            del self._counters[name]
        for name in [n for n in self._described if n not in known]:
            del self._described[name]
            self._describing.pop(name, None)
        for key in [k for k in self._earlier if k[0] not in known]:
            del self._earlier[key]
            self._describing_earlier.pop(key, None)


def _declared(spec: DeploymentSpec) -> ModelMetadata:
    found = spec.derived.get("declared")
    if found is None:
        found = spec.derived["declared"] = _declare(spec)
    return cast(ModelMetadata, found)


def _unchecked(spec: DeploymentSpec) -> ModelMetadata:
    """No tensors: a request checked against this is checked by the replica alone."""
    return ModelMetadata(name=spec.name, platform=spec.backend, inputs=(), outputs=())


def _declare(spec: DeploymentSpec) -> ModelMetadata:
    return ModelMetadata(
        name=spec.name,
        platform=spec.backend,
        inputs=spec.inputs,
        outputs=spec.outputs,
        versions=(model_version(spec),),
    )

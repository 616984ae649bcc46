"""Deployment specs: what a user asks shoal to serve.

A spec is YAML on disk or JSON over the API; both go through :func:`parse_spec`,
which raises :class:`shoal.errors.InvalidArgument` naming every problem.

Every number in a spec is bounded, so that no spec can make the head or a scheduler do
unbounded work: replica counts (``replicas``, ``autoscaling``) at most
:data:`MAX_REPLICAS`, ``resources.cpus`` at least :data:`MIN_CPUS`,
``autoscaling.target_ongoing_requests`` at least :data:`MIN_TARGET_ONGOING_REQUESTS`, every
duration finite and at most :data:`MAX_SECONDS`. Anywhere in the document, ``options``
included, numbers must be finite (JSON's ``Infinity``/``NaN``, YAML's ``.inf``/``.nan`` are
refused) and strings valid Unicode; ``options`` may nest :data:`MAX_OPTIONS_DEPTH` levels
and take :data:`MAX_OPTIONS_BYTES` as JSON. The whole document holds at most
:data:`MAX_VALUES` values, and as JSON takes at most :data:`MAX_SPEC_JSON` characters: both
are checked before anything else, so that refusing any spec costs the head little.
``multiplexing.max_models_per_replica`` is at most :data:`MAX_MODELS_PER_REPLICA`
(``multiplexing.load_timeout_s``, a duration, at most :data:`MAX_SECONDS`);
``serve_revisions`` at most :data:`MAX_SERVE_REVISIONS`.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from shoal.core import limits, yamldoc
from shoal.core.blobs import parse_uri as parse_blob_uri
from shoal.core.limits import is_unicode as _is_unicode
from shoal.errors import InvalidArgument

BACKENDS = ("python", "sklearn", "onnx", "transformers", "vllm")
DATATYPES = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
    "BYTES",
)
NAME_PATTERN = r"^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?$"

MAX_REPLICAS = 1000
"""Most replicas one deployment may ask for (``replicas``, ``autoscaling`` bounds)."""
MIN_CPUS = 0.01
"""Least ``resources.cpus`` a replica may take: with 0, every replica fits everywhere."""
MIN_GPUS = 0.01
"""Least ``resources.gpus`` a replica may take, besides 0 (none): below it, placement's
tolerance (1e-9) let 1e-10 of a GPU fit on every scheduler, one that had none included."""
MIN_MEMORY_MB = 1.0
"""Least ``resources.memory_mb`` a replica may take, besides 0 (not counted, no limit): 1e-10
was taken and, as the replica's memory limit (``shoal.scheduler.supervisor``), had each one
killed at its scheduler's first memory check, a crash loop no spec could mean."""
MIN_TARGET_ONGOING_REQUESTS = 0.01
"""Least ``autoscaling.target_ongoing_requests``: 100 replicas per request in flight. With
only ``> 0``, 5e-324 was taken, and any load over it was an infinite replica count, an
OverflowError in every reconcile pass."""
MAX_SECONDS = 86_400.0
"""Longest duration (timeouts, intervals, delays) a spec may set: a day."""
STABLE_AFTER_S = 60.0
"""Default ``health.stable_after_s``: how long a replica must stay READY to prove its spec
can run (``shoal.core.cluster``)."""
MIN_STABLE_AFTER_S = 1.0
"""Least ``health.stable_after_s``: below a second, any replica that reached READY would end
a run of failures before the head saw it die, and a crash loop would never be judged one."""
MAX_OPTIONS_BYTES = 64 * 1024
"""Largest ``options``, as compact JSON: they travel in every routing-table push."""
MAX_OPTIONS_DEPTH = 32
"""Deepest nesting of lists and mappings inside ``options``."""
MAX_TENSORS = 256
#: The longest tensor name (characters), in a spec and in what a model answers.
MAX_TENSOR_NAME = 256
"""Most ``inputs`` (and most ``outputs``) a spec may declare."""
MAX_ITEMS = 256
"""Most items of any list or mapping in a spec outside ``options`` (no field takes more:
``inputs``, ``outputs`` and ``auth.tokens`` take 256, a shape 32). Checked before the fields
are validated: pydantic validates every item of a list before it looks at the list's
length, and a spec of 100,000 inputs (5 MB of JSON) held the head's event loop 1.2 s to
be refused."""
MAX_VALUES = 65_536
"""Most values a spec document may hold: the items of every mapping and list, nested ones
included, each counted at every place it appears (a YAML alias as often as it is used). The
largest spec within the other bounds holds about 51,000: ``options`` at most 32,769 (each
value takes at least 2 of its :data:`MAX_OPTIONS_BYTES` as JSON), ``inputs`` and ``outputs``
about 9,500 each. Counted first: a 30 MB spec whose ``options`` held a list of 15,000,000
numbers held the head's event loop 12.5 s to be refused for its size, and a YAML file of nine
levels of nine-fold aliases (9**9 values from 1 KB) kept ``shoal deploy`` busy for good."""
MAX_SPEC_JSON = 2 * 1024 * 1024
"""Most characters of a spec as JSON (REST and gRPC), checked before it is parsed. The
largest spec within the other bounds takes about 570 KB written compactly, 1.3 MB indented
by 4. ``json.loads`` of 2 MiB takes about 0.08 s; of a 64 MiB message (``max_message_mb``),
1.8 s, which the head's event loop would wait."""
MAX_LABELS = 16_384
"""Most ``labels`` one output may declare (ImageNet's classifiers have 1,000; an output's
labels are the one list in a spec past :data:`MAX_ITEMS`, and count in :data:`MAX_VALUES`)."""
MAX_LABEL_CHARS = 256
"""Longest label."""
MAX_TEXT = 4096
"""Longest ``model`` or ``base_dir``."""
MAX_MODELS_PER_REPLICA = 1000
"""Most model ids one replica of a multiplexed deployment may hold loaded at once."""
MAX_SERVE_REVISIONS = 5
MAX_WARMUP = 100
"""Most revisions of one deployment that ``serve_revisions`` may keep serving at once."""
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
"""What a multiplexed model id may be: a plain name (it names a file, a metric label), never
a path: no ``/``, no leading ``.``, at most 128 characters."""


URI_SCHEMES = ("s3", "gs", "http", "https", "file", "blob")
"""Schemes a ``model`` (or a python deployment's ``base_dir``) may name: each scheduler fetches
the object or folder into its artifact cache before it starts a replica
(``shoal.scheduler.artifacts``). ``blob``: the cluster's own store (``shoal.core.blobs``)."""
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SHA256_FRAGMENT = re.compile(r"^sha256=[0-9a-f]{64}$")


def uri_scheme(text: str) -> str:
    """The scheme of ``text`` when it is a URI (``scheme://...``), lowercased; "" otherwise."""
    match = _URI.match(text)
    return match[1].lower() if match else ""


def _check_uri(text: str) -> str:
    scheme = uri_scheme(text)
    if not scheme:
        return text
    if scheme not in URI_SCHEMES:
        raise ValueError(f"URI scheme {scheme!r} is not supported (one of {', '.join(URI_SCHEMES)})")
    if scheme == "blob":
        parse_blob_uri(text)  # ValueError saying what is wrong
        return text
    rest = text[len(scheme) + 3 :]
    where, _, fragment = rest.partition("#")
    if not where.strip("/"):
        raise ValueError(f"URI {text!r} names no bucket, host or path")
    if fragment and not _SHA256_FRAGMENT.match(fragment):
        raise ValueError("a URI's fragment may only be '#sha256=' and 64 lowercase hex digits")
    return text


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """A number is a number: pydantic reads ``replicas: true`` as 1 and ``shape: [true]`` as
        ``[1]`` (a bool is an int to Python); other lax reads (``"3"``, ``2.0``) stay."""
        kind = cls.model_fields[info.field_name or ""].annotation
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(f"must be a number, got {str(value).lower()}")
        if (
            kind == tuple[int, ...]
            and isinstance(value, list | tuple)
            and any(isinstance(v, bool) for v in value)
        ):
            raise ValueError("must be a list of integers, got a boolean in it")
        return value


class TensorSpec(_Strict):
    """One named input or output of a model. ``-1`` in ``shape`` means any size.

    ``optional``: a request may leave this input out (Triton's ``ModelInput.optional``);
    only inputs may be optional (see ``DeploymentSpec``). It is serialised only when true,
    so the JSON and the process hash of a spec that declares no optional input are what
    they were before the field, and peers of that version still read them.

    ``labels``: an output's class names, ``labels[i]`` for class i, which Triton's
    classification extension appends to each class it answers (``"0.97:2:virginica"``;
    :mod:`shoal.core.classify`; Triton's ``label_filename``). At most :data:`MAX_LABELS`,
    each at most :data:`MAX_LABEL_CHARS` characters on one line; only outputs have labels.
    Serialised only when given, as ``optional``.
    """

    name: str = Field(min_length=1, max_length=MAX_TENSOR_NAME)
    datatype: Literal[DATATYPES] = "FP32"  # type: ignore[valid-type]
    shape: tuple[int, ...] = Field(default=(-1,), max_length=32)
    optional: StrictBool = False
    labels: tuple[Annotated[str, Field(max_length=MAX_LABEL_CHARS)], ...] = Field(
        default=(), max_length=MAX_LABELS
    )

    @model_serializer(mode="wrap")
    def _leave_out_required(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        doc: dict[str, Any] = handler(self)
        if not self.optional:
            doc.pop("optional", None)
        if not self.labels:
            doc.pop("labels", None)
        return doc

    @field_validator("labels")
    @classmethod
    def _one_line_each(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        for i, label in enumerate(labels):
            if "\n" in label or "\r" in label:
                raise ValueError(f"label {i} holds a line break; a label is one line")
        return labels

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < -1 for d in shape):
            raise ValueError("dimensions must be -1 (variable) or >= 0")
        if any(d >= 2**63 for d in shape):
            raise ValueError("dimensions must be below 2**63")
        return shape


class Resources(_Strict):
    """What one replica takes from its scheduler's machine. Fractions allowed."""

    cpus: float = Field(default=1.0, ge=MIN_CPUS, le=4096)
    memory_mb: float = Field(default=0.0, ge=0, le=2**24)  # 16 TiB
    gpus: float = Field(default=0.0, ge=0, le=1024)

    @field_validator("memory_mb")
    @classmethod
    def _none_or_a_megabyte(cls, memory_mb: float) -> float:
        if 0 < memory_mb < MIN_MEMORY_MB:
            raise ValueError(
                f"must be 0 (not counted, no limit) or at least {MIN_MEMORY_MB:g}, got {memory_mb:g}"
            )
        return memory_mb

    @field_validator("gpus")
    @classmethod
    def _whole_above_one(cls, gpus: float) -> float:
        # A replica gets whole devices, or a share of one (shoal.scheduler.gpus): 1.5 would
        # be counted as 1.5 by placement but take two devices, so it is refused.
        if 0 < gpus < MIN_GPUS:
            raise ValueError(f"must be 0 (no GPU) or at least {MIN_GPUS:g}, got {gpus:g}")
        if gpus > 1 and abs(gpus - round(gpus)) > 1e-9:
            raise ValueError(
                "above 1, gpus must be a whole number (a replica takes whole GPUs, or a share of one)"
            )
        return gpus


class Batching(_Strict):
    """Dynamic batching inside a replica. ``max_batch_size`` 1 turns it off.

    ``oversize``: what a request of more rows (axis 0) than ``max_batch_size`` gets.
    ``run_alone`` (the default): a model call of its own, however many rows. ``refuse``:
    InvalidArgument at the scheduler, before any replica sees it, as Triton refuses a
    request whose batch is above the model's ``max_batch_size``; what a deployment from a
    Triton ``config.pbtxt`` with ``max_batch_size`` > 0 gets, its author having declared
    the limit. The schedulers alone read it: changing it restarts no replica."""

    max_batch_size: int = Field(default=1, ge=1, le=4096)
    max_delay_ms: float = Field(default=0.0, ge=0, le=10_000)
    oversize: Literal["run_alone", "refuse"] = "run_alone"


class Multiplexing(_Strict):
    """Many model ids served by one pool of replicas: each replica loads an id on its first
    request (the backend's ``load_model``) and holds at most ``max_models_per_replica``,
    evicting the least recently used past that.

    ``load_timeout_s`` bounds how long requests wait for one id's load (None: the
    deployment's ``health.start_timeout_s``, the bound on the replica's own load). Past it
    they, and the id's next requests, are answered UNAVAILABLE; the thread running the load
    cannot be stopped, so the id keeps its slot until ``load_model`` returns, and is served
    if it then loaded."""

    max_models_per_replica: int = Field(ge=1, le=MAX_MODELS_PER_REPLICA)
    load_timeout_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS)


def check_model_id(model_id: str) -> str:
    """``model_id`` if it is a plain name (:data:`MODEL_ID_PATTERN`); InvalidArgument otherwise."""
    if not re.fullmatch(MODEL_ID_PATTERN, model_id):
        shown = model_id if len(model_id) <= 140 else model_id[:140] + "..."
        raise InvalidArgument(
            f"model id {shown!r} is not a plain name: letters, digits, '_', '-' and '.', "
            "starting with a letter or digit, at most 128 characters"
        )
    return model_id


class Autoscaling(_Strict):
    min_replicas: int = Field(default=1, ge=0, le=MAX_REPLICAS)
    max_replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS)
    target_ongoing_requests: float = Field(default=2.0, ge=MIN_TARGET_ONGOING_REQUESTS, le=1_000_000)
    upscale_delay_s: float = Field(default=3.0, ge=0, le=MAX_SECONDS)
    downscale_delay_s: float = Field(default=30.0, ge=0, le=MAX_SECONDS)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self


class Health(_Strict):
    """How a deployment's replicas are watched.

    ``stable_after_s``: how long a replica must stay READY before the crash-loop count of its
    spec starts again; one that crashes of its own doing sooner counts as a failed start
    (``shoal.core.cluster``). The head alone reads it: changing it restarts no replica."""

    ping_interval_s: float = Field(default=1.0, gt=0, le=MAX_SECONDS)
    ping_timeout_s: float = Field(default=2.0, gt=0, le=MAX_SECONDS)
    ping_failures: int = Field(default=3, ge=1, le=1000)
    start_timeout_s: float = Field(default=120.0, gt=0, le=MAX_SECONDS)
    stable_after_s: float = Field(default=STABLE_AFTER_S, ge=MIN_STABLE_AFTER_S, le=MAX_SECONDS)


class Auth(_Strict):
    """Who may send inference requests: the names of tokens (``shoal token create``) it accepts."""

    tokens: tuple[str, ...] = Field(min_length=1, max_length=256)

    @field_validator("tokens")
    @classmethod
    def _names(cls, tokens: tuple[str, ...]) -> tuple[str, ...]:
        for name in tokens:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"token name {name!r}: lowercase letters, digits, '-', '_' and '.'")
        return tokens


class DeploymentSpec(_Strict):
    """A deployment: which model, how many replicas, what each may take."""

    name: str = Field(pattern=NAME_PATTERN)
    backend: Literal[BACKENDS]  # type: ignore[valid-type]
    model: str = Field(min_length=1, max_length=MAX_TEXT)
    options: dict[str, Any] = Field(default_factory=dict)
    replicas: int = Field(default=1, ge=0, le=MAX_REPLICAS)
    autoscaling: Autoscaling | None = None
    resources: Resources = Field(default_factory=Resources)
    batching: Batching = Field(default_factory=Batching)
    max_ongoing_requests: int = Field(default=64, ge=1, le=100_000)
    max_queued_requests: int = Field(default=1024, ge=0, le=1_000_000)
    timeout_s: float = Field(default=60.0, gt=0, le=MAX_SECONDS)
    health: Health = Field(default_factory=Health)
    inputs: tuple[TensorSpec, ...] = Field(default=(), max_length=MAX_TENSORS)
    outputs: tuple[TensorSpec, ...] = Field(default=(), max_length=MAX_TENSORS)
    auth: Auth | None = None
    multiplexing: Multiplexing | None = None
    # How many revisions keep serving (OIP versions, /v2/models/NAME/versions/N): the current
    # one and the latest ones before it, each with ``replicas`` replicas; 1: an update replaces
    # the old replicas once the new ones are READY.
    serve_revisions: int = Field(default=1, ge=1, le=MAX_SERVE_REVISIONS)
    # Model calls a replica makes on inputs of its own (zeros, one row; b"warmup" for BYTES)
    # once its model is loaded and before it takes requests, so the first clients do not pay
    # for lazy initialisation (Triton's model_warmup). A call that fails fails the replica's
    # start, naming the call. 0: none. (shoal.replica.process.warmup_inputs)
    warmup: int = Field(default=0, ge=0, le=MAX_WARMUP)
    # The folder the spec file was read from: relative model paths resolve
    # against it and the python backend imports modules from it.
    base_dir: str = Field(default="", max_length=MAX_TEXT)
    # Kept by the head: ``shoal restart`` bumps it, which makes a new process hash and so
    # replaces the replicas one at a time. An apply keeps the head's count (see HeadNode.apply).
    restarts: int = Field(default=0, ge=0, le=2**31 - 1)
    # Set by the CLI: a hash of the model's files (shoal.core.model_hash), so that a deploy
    # after editing them is a change, and replaces the replicas.
    model_hash: str = Field(default="", max_length=128)

    @field_validator("name", mode="before")
    @classmethod
    def _a_name(cls, name: object) -> object:
        # Before the pattern's own check, whose words were the regular expression.
        if isinstance(name, str) and not re.match(NAME_PATTERN, name):
            raise ValueError(
                f"{limits.quoted(name)} is not a deployment name: lowercase letters, digits, '-', '_' "
                "and '.', starting and ending with a letter or digit, at most 63 characters"
            )
        return name

    @field_validator("name")
    @classmethod
    def _not_a_route(cls, name: str) -> str:
        # GET /v2/models/stats is every model's statistics (the protocol's route, Triton's
        # too): a deployment of that name served and answered /infer, but its metadata
        # could not be reached over HTTP.
        if name == "stats":
            raise ValueError("'stats' is the name of the route /v2/models/stats (every model's statistics)")
        return name

    @field_validator("model", "base_dir")
    @classmethod
    def _uri(cls, text: str) -> str:
        return _check_uri(text)

    @field_validator("outputs")
    @classmethod
    def _outputs_required(cls, outputs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        # A model returns every output it declares; "optional" is a request's choice.
        optional = [t.name for t in outputs if t.optional]
        if optional:
            raise ValueError(f"output {optional[0]!r} cannot be optional; only inputs may be")
        return outputs

    @field_validator("inputs")
    @classmethod
    def _no_input_labels(cls, inputs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        labelled = [t.name for t in inputs if t.labels]
        if labelled:
            raise ValueError(f"input {labelled[0]!r} cannot have labels; only outputs have classes")
        return inputs

    @model_validator(mode="after")
    def _uri_fields(self) -> DeploymentSpec:
        if self.backend == "python" and uri_scheme(self.model):
            raise ValueError("a python model is 'module:Class'; put its code's URI in base_dir")
        if self.backend != "python" and uri_scheme(self.base_dir):
            raise ValueError(
                "base_dir may be a URI only for the python backend; give the model's URI in model"
            )
        if self.serve_revisions > 1 and self.autoscaling is not None:
            raise ValueError(
                "serve_revisions above 1 needs a fixed replica count (replicas), not autoscaling: "
                "each revision kept serving runs that many replicas"
            )
        to_zero = self.autoscaling is not None and self.autoscaling.min_replicas == 0
        if to_zero and not self.max_queued_requests:
            # What scales it up from zero is a request waiting: with no queue, none ever does.
            raise ValueError(
                "autoscaling.min_replicas 0 needs max_queued_requests of at least 1: at zero "
                "replicas a request waits in the queue while a replica starts, and without one "
                "every request is refused and the deployment never scales up"
            )
        if self.warmup and self.multiplexing is not None:
            raise ValueError(
                "warmup needs one model per replica; a multiplexed deployment loads its models "
                "on demand, by model id"
            )
        return self

    def artifact_uri(self) -> str:
        """The URI its scheduler fetches before starting a replica: ``base_dir`` for ``python``
        (the code's folder), ``model`` otherwise; "" when it names none."""
        text = self.base_dir if self.backend == "python" else self.model
        return text if uri_scheme(text) else ""

    def localized(self, local: Path) -> DeploymentSpec:
        """This spec with its :meth:`artifact_uri` replaced by ``local``, the fetched copy."""
        field = "base_dir" if self.backend == "python" else "model"
        return self.model_copy(update={field: str(local)})

    def model_path(self) -> Path:
        """``model`` as a path, resolved against ``base_dir`` when relative."""
        path = Path(self.model)
        if not path.is_absolute() and self.base_dir:
            path = Path(self.base_dir) / path
        return path

    # A spec is frozen, so its JSON and its process hash are computed once: the head puts
    # every spec in every routing table it sends, and compares hashes in every reconcile pass
    # (at 3,000 replicas, model_dump_json was a fifth of the head's CPU). model_copy drops them.
    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        copy = super().model_copy(update=update, deep=deep)
        for key in ("cached_json", "cached_process_hash", "derived"):
            copy.__dict__.pop(key, None)
        return copy

    @functools.cached_property
    def derived(self) -> dict[str, Any]:
        """Values other modules compute from this (frozen) spec, kept with it so that the
        request path computes each once per spec, not once per request (see
        ``shoal.core.triton_repo.layout_version``)."""
        return {}

    @functools.cached_property
    def cached_json(self) -> str:
        return self.model_dump_json()

    def to_json(self) -> str:
        return self.cached_json

    def same_as(self, other: DeploymentSpec) -> bool:
        """Whether ``other`` is this spec, whatever the order of its mappings' keys (options
        from a YAML file re-rendered in another order): an apply of it changes nothing. A
        value of another JSON type (1.0 or true for 1) is another spec."""
        if self.to_json() == other.to_json():
            return True  # the usual answer, from the JSON each spec keeps
        return _canonical(self.model_dump(mode="json")) == _canonical(other.model_dump(mode="json"))

    def process_hash(self) -> str:
        """Hash of everything that needs new replica processes when it changes.

        Replica count and autoscaling bounds are left out: changing them
        scales, it does not restart; so are the inference tokens (schedulers check them),
        ``serve_revisions`` (which revisions keep serving, not how each runs) and
        ``health.stable_after_s`` (the head's crash-loop bookkeeping).
        """
        return self.cached_process_hash

    @functools.cached_property
    def cached_process_hash(self) -> str:
        left_out = dict.fromkeys(("replicas", "autoscaling", "auth", "serve_revisions"), True)
        doc = self.model_dump(
            mode="json", exclude={**left_out, "health": {"stable_after_s"}, "batching": {"oversize"}}
        )
        # Left out at their defaults: specs from before these fields keep their hash (and replicas).
        for key, default in (("restarts", 0), ("model_hash", ""), ("multiplexing", None), ("warmup", 0)):
            if doc[key] == default:
                del doc[key]
        if doc.get("multiplexing", {}).get("load_timeout_s", 0) is None:
            del doc["multiplexing"]["load_timeout_s"]
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]

    @functools.cached_property
    def max_request_rows(self) -> int:
        """Most rows (axis 0) a request may have: ``batching.max_batch_size`` when
        ``batching.oversize`` is ``refuse``; 0, no bound, otherwise. Kept with the spec: the
        scheduler reads it on every request."""
        return self.batching.max_batch_size if self.batching.oversize == "refuse" else 0

    def initial_replicas(self) -> int:
        if self.autoscaling is not None:
            return max(self.autoscaling.min_replicas, min(self.replicas, self.autoscaling.max_replicas))
        return self.replicas


MAX_PROBLEMS = 10
"""Problems one refusal of a spec names; it counts the rest. 250 inputs of a wrong datatype
and shape were each named twice: a refusal of 150 KB."""


def _explain(err: ValidationError) -> str:
    errors = err.errors()
    parts = []
    for e in errors[:MAX_PROBLEMS]:
        where = ".".join(str(p) for p in e["loc"]) or "spec"
        # A validator's own words, without pydantic's "Value error, " before them.
        msg = e["msg"].removeprefix("Value error, ") if e["type"] == "value_error" else e["msg"]
        parts.append(f"{limits.shown(where)}: {limits.shown(msg)}")
    if len(errors) > MAX_PROBLEMS:
        parts.append(f"and {len(errors) - MAX_PROBLEMS} more problems")
    return "; ".join(parts)


_JSON_TYPES = (str, int, float, bool, type(None), dict, list, tuple)
_PLAIN = frozenset(_JSON_TYPES)
"""What a spec's values may be: a spec travels as JSON (to the head, in routing tables, to
replicas). YAML also makes bytes (``!!binary``), sets (``!!set``) and dates (``2024-01-01``):
in ``options`` they were taken, and then bytes that are not UTF-8 failed the spec's JSON
(a PydanticSerializationError traceback from ``shoal deploy``), and the others reached the
model as strings or lists."""


def _yaml_kind(value: object) -> str:
    kind = type(value).__name__
    return {"bytes": "binary data (!!binary)", "set": "a set (!!set)"}.get(kind, f"a {kind}")


_LABELS = re.compile(r"^outputs\.\d+\.labels$")


def _document_problems(doc: dict[str, Any]) -> list[str]:
    """What no field's own validation can see: non-finite numbers, strings that are not
    valid Unicode and values JSON has no type for anywhere in ``doc``, nesting deeper than
    :data:`MAX_OPTIONS_DEPTH` under any field, lists and mappings of more than
    :data:`MAX_ITEMS` outside ``options``, more than :data:`MAX_VALUES` values in all, and
    the size of ``options``.

    Iterative, so that no nesting depth can exhaust the stack. The work is bounded by
    :data:`MAX_VALUES`, whatever ``doc`` holds: a container's items are counted before they
    are visited, and past the bound the walk stops with that one problem. The size of
    ``options`` (a ``json.dumps``) is measured only once the walk found nothing wrong.
    """
    if len(doc) > MAX_ITEMS:
        return [f"the spec has {len(doc)} fields, over the limit of {MAX_ITEMS}"]
    problems: set[str] = set()
    stack: list[tuple[str, str, Any, int]] = [(str(k), str(k), v, 0) for k, v in doc.items()]
    values = len(stack)
    while stack:
        field, where, value, depth = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            problems.add(f"{where}: must be a finite number, got {value}")
        elif isinstance(value, str) and not _is_unicode(value):
            problems.add(f"{where}: not valid Unicode (a lone surrogate)")
        elif type(value) not in _PLAIN and not isinstance(value, _JSON_TYPES):  # type(): fast
            problems.add(f"{where}: {_yaml_kind(value)} is not a JSON value; quote it to give a string")
        elif isinstance(value, dict | list | tuple):
            if depth >= MAX_OPTIONS_DEPTH:
                problems.add(f"{field}: nested deeper than {MAX_OPTIONS_DEPTH} levels")
                continue
            most = MAX_LABELS if _LABELS.match(where) else MAX_ITEMS
            if field != "options" and len(value) > most:
                problems.add(f"{where}: {len(value)} items, over the limit of {most}")
                continue
            values += len(value)
            if values > MAX_VALUES:
                return [
                    f"{field}: the spec holds more than {MAX_VALUES} values (items of its mappings "
                    f"and lists, an alias counted wherever it is used), over the limit of {MAX_VALUES}"
                ]
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and not _is_unicode(key):
                    problems.add(f"{where}: a key that is not valid Unicode (a lone surrogate)")
                    continue
                stack.append((field, f"{where}.{key}", item, depth + 1))
    options = doc.get("options")
    if not problems and isinstance(options, dict):
        try:
            size = len(json.dumps(options, separators=(",", ":"), default=str).encode())
        except (TypeError, ValueError):
            problems.add("options: not representable as JSON")
        else:
            if size > MAX_OPTIONS_BYTES:
                problems.add(f"options: {size} bytes as JSON, over the limit of {MAX_OPTIONS_BYTES}")
    return sorted(problems)


def parse_spec(doc: Any, *, base_dir: str | Path | None = None) -> DeploymentSpec:
    """Validate a spec document (a mapping). Raises InvalidArgument naming each problem."""
    if not isinstance(doc, dict):
        raise InvalidArgument(f"a deployment spec must be a mapping, got {type(doc).__name__}")
    name = doc.get("name", "?")
    if not isinstance(name, str) or not _is_unicode(name):
        name = "?"
    problems = _document_problems(doc)
    if problems:
        raise InvalidArgument(f"invalid deployment spec {limits.quoted(name)}: {'; '.join(problems)}")
    if base_dir is not None and not doc.get("base_dir"):
        doc = {**doc, "base_dir": str(Path(base_dir).resolve())}
    try:
        return DeploymentSpec.model_validate(doc)
    except ValidationError as err:
        raise InvalidArgument(f"invalid deployment spec {limits.quoted(name)}: {_explain(err)}") from None


def parse_spec_json(text: str | bytes) -> DeploymentSpec:
    """A spec from its JSON (``bytes`` as UTF-8). Raises InvalidArgument naming each problem,
    or that ``text`` is over :data:`MAX_SPEC_JSON` long, which is checked before it is parsed."""
    if len(text) > MAX_SPEC_JSON:
        unit = "bytes" if isinstance(text, bytes) else "characters"
        raise InvalidArgument(
            f"deployment spec: {len(text)} {unit} of JSON, over the limit of {MAX_SPEC_JSON}"
        )
    try:
        doc = json.loads(text)
    except ValueError as err:  # json.JSONDecodeError, and UnicodeDecodeError for bytes
        raise InvalidArgument(f"deployment spec is not valid JSON: {err}") from None
    except RecursionError:
        raise InvalidArgument("deployment spec is nested too deeply") from None
    return parse_spec(doc)


def load_spec_file(path: str | Path) -> list[DeploymentSpec]:
    """Read one YAML file holding one spec, or several separated by ``---``."""
    path = Path(path)
    specs = [parse_spec(d, base_dir=path.parent) for d in spec_documents(path)]
    check_names_once(path, specs)
    return specs


def spec_documents(path: Path) -> list[Any]:
    """The documents of a spec file, read once (``yamldoc.read_text``), empty ones left out.
    InvalidArgument naming the file when it cannot be read, is not YAML or holds none."""
    text = yamldoc.read_text(path)
    try:
        docs = [d for d in yamldoc.load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise InvalidArgument(f"{path} is not valid YAML: {yamldoc.problem(err)}") from None
    except RecursionError:
        raise InvalidArgument(f"{path} is nested too deeply") from None
    if not docs:
        raise InvalidArgument(f"{path} holds no deployment spec")
    return docs


def check_names_once(path: Path, specs: list[DeploymentSpec]) -> None:
    """InvalidArgument when two of a file's specs have one name: applied in turn, the last
    silently replaced the others. Linear: counting each name's copies in the whole list took
    39 s for a file of 40,000 specs (2 MB)."""
    twice = sorted(n for n, k in collections.Counter(s.name for s in specs).items() if k > 1)
    if twice:
        raise InvalidArgument(f"{path} holds more than one spec of deployment {', '.join(map(repr, twice))}")


def _canonical(value: Any) -> str:
    """JSON with sorted keys: the same for a document in any key order, another for 1, 1.0 and true."""
    return json.dumps(value, sort_keys=True)


def describe_change(old: DeploymentSpec | None, new: DeploymentSpec) -> str:
    """What differs from ``old`` to ``new``, one line: the fields changed, and the model files'
    hashes when they differ (``model files changed (hash a1b2c3d4 → c3d4e5f6)``)."""
    if old is None:
        return "created"
    before, after = old.model_dump(mode="json"), new.model_dump(mode="json")
    parts = []
    if before["model_hash"] != after["model_hash"]:
        was, now = before["model_hash"][:8] or "none", after["model_hash"][:8] or "none"
        parts.append(f"model files changed (hash {was} → {now})")
    if before["restarts"] != after["restarts"]:
        parts.append(f"restart {after['restarts']}")
    if before["replicas"] != after["replicas"]:
        parts.append(f"replicas {before['replicas']} → {after['replicas']}")
    others = [
        k
        for k in after
        if k not in ("model_hash", "restarts", "replicas")
        and _canonical(before.get(k)) != _canonical(after[k])
    ]
    if others:
        parts.append(f"{', '.join(others)} changed")
    return "; ".join(parts) or "unchanged"


def check_if_replicas(value: object) -> int:
    """A scale's ``if_replicas`` (the replica count the deployment must have for the scale to
    go through) as an integer; InvalidArgument for one that is no integer from 0 to
    :data:`MAX_REPLICAS`: no deployment can have that many, so the scale could never pass."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPLICAS:
        raise InvalidArgument(
            f"if_replicas must be an integer from 0 to {MAX_REPLICAS}, got {limits.short_repr(value)}"
        )
    return value

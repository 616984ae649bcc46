"""Deployment specs: what a user asks shoal to serve.

A spec is YAML on disk or JSON over the API; both go through :func:`parse_spec`,
which raises :class:`shoal.errors.InvalidArgument` naming every problem.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One named input or output of a model. ``-1`` in ``shape`` means any size."""

    name: str = Field(min_length=1)
    datatype: Literal[DATATYPES] = "FP32"  # type: ignore[valid-type]
    shape: tuple[int, ...] = (-1,)

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < -1 for d in shape):
            raise ValueError("dimensions must be -1 (variable) or >= 0")
        return shape


class Resources(_Strict):
    """What one replica takes from its scheduler's machine. Fractions allowed."""

    cpus: float = Field(default=1.0, ge=0)
    memory_mb: float = Field(default=0.0, ge=0)
    gpus: float = Field(default=0.0, ge=0)


class Batching(_Strict):
    """Dynamic batching inside a replica. ``max_batch_size`` 1 turns it off."""

    max_batch_size: int = Field(default=1, ge=1, le=4096)
    max_delay_ms: float = Field(default=0.0, ge=0, le=10_000)


class Autoscaling(_Strict):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    upscale_delay_s: float = Field(default=3.0, ge=0)
    downscale_delay_s: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class Health(_Strict):
    ping_interval_s: float = Field(default=1.0, gt=0)
    ping_timeout_s: float = Field(default=2.0, gt=0)
    ping_failures: int = Field(default=3, ge=1)
    start_timeout_s: float = Field(default=120.0, gt=0)


class Auth(_Strict):
    """Who may send inference requests: the names of tokens (``shoal token create``) it accepts."""

    tokens: tuple[str, ...] = Field(min_length=1)

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
    model: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)
    replicas: int = Field(default=1, ge=0, le=1000)
    autoscaling: Autoscaling | None = None
    resources: Resources = Field(default_factory=Resources)
    batching: Batching = Field(default_factory=Batching)
    max_ongoing_requests: int = Field(default=64, ge=1)
    max_queued_requests: int = Field(default=1024, ge=0)
    timeout_s: float = Field(default=60.0, gt=0)
    health: Health = Field(default_factory=Health)
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    auth: Auth | None = None
    # The folder the spec file was read from: relative model paths resolve
    # against it and the python backend imports modules from it.
    base_dir: str = ""

    def model_path(self) -> Path:
        """``model`` as a path, resolved against ``base_dir`` when relative."""
        path = Path(self.model)
        if not path.is_absolute() and self.base_dir:
            path = Path(self.base_dir) / path
        return path

    def to_json(self) -> str:
        return self.model_dump_json()

    def process_hash(self) -> str:
        """Hash of everything that needs new replica processes when it changes.

        Replica count and autoscaling bounds are left out: changing them
        scales, it does not restart; so are the inference tokens (schedulers check them).
        """
        doc = self.model_dump(mode="json", exclude={"replicas", "autoscaling", "auth"})
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]

    def initial_replicas(self) -> int:
        if self.autoscaling is not None:
            return max(self.autoscaling.min_replicas, min(self.replicas, self.autoscaling.max_replicas))
        return self.replicas


def _explain(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "spec"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def parse_spec(doc: Any, *, base_dir: str | Path | None = None) -> DeploymentSpec:
    """Validate a spec document (a mapping). Raises InvalidArgument naming each problem."""
    if not isinstance(doc, dict):
        raise InvalidArgument(f"a deployment spec must be a mapping, got {type(doc).__name__}")
    if base_dir is not None and not doc.get("base_dir"):
        doc = {**doc, "base_dir": str(Path(base_dir).resolve())}
    try:
        return DeploymentSpec.model_validate(doc)
    except ValidationError as err:
        name = doc.get("name", "?")
        raise InvalidArgument(f"invalid deployment spec {name!r}: {_explain(err)}") from None


def parse_spec_json(text: str) -> DeploymentSpec:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidArgument(f"deployment spec is not valid JSON: {err}") from None
    except RecursionError:
        raise InvalidArgument("deployment spec is nested too deeply") from None
    return parse_spec(doc)


def load_spec_file(path: str | Path) -> list[DeploymentSpec]:
    """Read one YAML file holding one spec, or several separated by ``---``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise InvalidArgument(f"cannot read {path}: {err.strerror}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise InvalidArgument(f"{path} is not valid YAML: {err}") from None
    if not docs:
        raise InvalidArgument(f"{path} holds no deployment spec")
    return [parse_spec(d, base_dir=path.parent) for d in docs]

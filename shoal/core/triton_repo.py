"""Triton's model repository, read as shoal deployments.

A repository is a folder holding one folder per model::

    REPO/NAME/config.pbtxt          Triton's ModelConfig, protobuf text format
    REPO/NAME/<version>/model.onnx  one folder per version (a positive integer)

:func:`read_model` maps one model to the :class:`~shoal.core.spec.DeploymentSpec` of the
version its version policy serves; :func:`scan` maps every model, keeping what cannot be
mapped as a problem instead of raising. Mapped (the rest of ``config.pbtxt`` is refused with
an InvalidArgument naming the field):

============================  ============================================================
``platform: onnxruntime_onnx``  backend ``onnx``; ``backend: "onnxruntime"`` too; without
 / ``backend: onnxruntime``      either, a version folder holding ``model.onnx``
``backend: "python"``           backend ``python`` running the version's ``model.py``
                                (:data:`PYTHON_TARGET`); inputs and outputs must be declared
``default_model_filename``      the file in the version folder (default ``model.onnx``,
                                ``model.py`` for python models)
``input`` / ``output``          ``inputs`` / ``outputs``: name, ``data_type`` (``TYPE_STRING``
                                is BYTES), ``dims``, with a ``-1`` batch axis in front when
                                ``max_batch_size`` > 0
``output.label_filename``       the output's ``labels``: the lines of that file in the model
                                folder (at most :data:`MAX_LABELS_BYTES`; the spec's bounds
                                on labels), for the classification extension
``max_batch_size``              ``batching.max_batch_size`` (0: no batching)
``dynamic_batching``            ``max_queue_delay_microseconds`` → ``batching.max_delay_ms``;
                                ``preferred_batch_size`` and ``preserve_ordering`` are accepted
                                and have no effect (each request gets its own answer)
``instance_group``              ``replicas``: the sum of ``count`` (default 1) times the
                                number of ``gpus`` listed (at least 1); ``KIND_GPU`` replicas
                                ask for ``1/count`` of a GPU each; every replica reserves
                                :data:`CPUS_PER_REPLICA`
``version_policy``              ``latest`` (default, 1), ``specific``, ``all``: it must select
                                exactly one version, the one that serves
============================  ============================================================

Without ``config.pbtxt`` a model folder whose versions hold ``model.onnx`` serves with the
inputs and outputs the ONNX file declares (Triton's auto-complete).

Pure: reads files, never the network. Errors are :class:`~shoal.errors.InvalidArgument`
(a model that cannot be served, naming the file and the field) and
:class:`~shoal.errors.NotFound` (no such model in the repository).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format

from shoal.core import yamldoc
from shoal.core.spec import MAX_LABEL_CHARS, MAX_LABELS, NAME_PATTERN, DeploymentSpec, parse_spec
from shoal.errors import InvalidArgument, NotFound
from shoal.proto import model_config_pb2 as mc

CONFIG = "config.pbtxt"
ONNX_FILE = "model.onnx"
PYTHON_FILE = "model.py"
PYTHON_TARGET = "shoal.backends.triton_python:TritonPython"
"""The python deployment a Triton python model becomes (:mod:`shoal.backends.triton_python`)."""
MAX_CONFIG_BYTES = 1024 * 1024
"""Largest ``config.pbtxt`` read."""
MAX_LABELS_BYTES = 1024 * 1024
"""Largest ``label_filename`` file read."""

CPUS_PER_REPLICA = 0.25
"""What each replica of a repository model reserves (``resources.cpus``): Triton reserves
no CPUs for an instance, and a repository of many models must fit on one machine as it does
under Triton; placement still spreads them by what is left."""

_ONNX_PLATFORM = "onnxruntime_onnx"
_ONNX_BACKEND = "onnxruntime"
_PYTHON_BACKEND = "python"
_TOP_FIELDS = frozenset(
    {
        "name",
        "platform",
        "backend",
        "version_policy",
        "max_batch_size",
        "input",
        "output",
        "dynamic_batching",
        "instance_group",
        "default_model_filename",
    }
)
_TENSOR_FIELDS = frozenset({"name", "data_type", "dims", "optional"})  # optional: ModelInput only
_BATCHING_FIELDS = frozenset({"max_queue_delay_microseconds", "preferred_batch_size", "preserve_ordering"})
_GROUP_FIELDS = frozenset({"name", "kind", "count", "gpus"})
_WHY = {
    "sequence_batching": "sequence batching (stateful models) is not supported",
    "ensemble_scheduling": "ensembles are not supported; deploy each model on its own",
    "optimization": "Triton's optimization settings (accelerators, graph levels) have no shoal equivalent",
    "parameters": "backend parameters have no shoal equivalent",
    "model_warmup": "warmup samples are not read (a shoal spec's warmup: N calls the model on zeros)",
    "model_transaction_policy": "decoupled models are not supported for ONNX",
    "response_cache": "the response cache is not supported",
    "batch_input": "batch inputs are not supported",
    "batch_output": "batch outputs are not supported",
    "label_filename": "only an output has classes to label",
    "reshape": "reshape is not supported: declare dims as the model takes them",
}


@dataclass(frozen=True)
class RepositoryModel:
    """One model folder of a repository, as shoal would serve it."""

    name: str
    versions: tuple[int, ...]
    """The version folders present, ascending."""
    version: int = 0
    """The version that serves (0 when the model cannot be served)."""
    spec: DeploymentSpec | None = None
    problem: str = ""
    """Why the model cannot be served ('' when it can)."""


def _refuse(where: str, field: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"{where}: {field}: {why}")


def read_config(path: Path) -> mc.ModelConfig:
    """Parse a ``config.pbtxt``; InvalidArgument naming the file and the line when it does not."""
    # At most MAX_CONFIG_BYTES are read: before, the size was taken from stat(), which says 0
    # for a link to /dev/zero, and the file was then read without end.
    text = yamldoc.read_text(path, most=MAX_CONFIG_BYTES)
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as err:
        # The message starts with "LINE:COLUMN : ".
        raise InvalidArgument(f"{path}:{err}") from None
    return config


def version_folders(folder: Path) -> tuple[int, ...]:
    """The numeric version folders of a model folder, ascending (Triton's: positive integers)."""
    found = []
    for child in folder.iterdir():
        if child.is_dir() and re.fullmatch(r"[0-9]{1,18}", child.name) and int(child.name) > 0:
            found.append(int(child.name))
    return tuple(sorted(found))


def _served_version(config: mc.ModelConfig, versions: tuple[int, ...], where: str) -> int:
    if not versions:
        raise InvalidArgument(f"{where}: no version folder (a folder named 1, 2, ... holding the model)")
    policy = config.version_policy.WhichOneof("policy_choice") if config.HasField("version_policy") else None
    if policy == "specific":
        chosen = sorted(set(config.version_policy.specific.versions))
        missing = [v for v in chosen if v not in versions]
        if missing:
            raise _refuse(where, "version_policy.specific", f"version {missing[0]} has no folder")
    elif policy == "all":
        chosen = list(versions)
    else:
        n = config.version_policy.latest.num_versions if policy == "latest" else 1
        chosen = list(versions[-max(n, 1) :])
    if len(chosen) != 1:
        shown = ", ".join(str(v) for v in chosen)
        raise _refuse(
            where,
            f"version_policy.{policy or 'latest'}",
            f"selects versions {shown}; shoal serves one version of a model "
            "(use latest { num_versions: 1 } or specific { versions: [N] })",
        )
    return chosen[0]


def _datatype(value: int, where: str, field: str) -> str:
    name = mc.DataType.Name(mc.DataType.ValueType(value)) if value in mc.DataType.values() else "TYPE_INVALID"
    if name == "TYPE_INVALID":
        raise _refuse(where, f"{field}.data_type", "missing or TYPE_INVALID")
    return "BYTES" if name == "TYPE_STRING" else name.removeprefix("TYPE_")


def _tensors(tensors: Any, kind: str, batched: bool, where: str, folder: Path) -> list[dict[str, Any]]:
    out = []
    allowed = _TENSOR_FIELDS | {"label_filename"} if kind == "output" else _TENSOR_FIELDS
    for i, t in enumerate(tensors):
        field = f"{kind}[{i}]" + (f" {t.name!r}" if t.name else "")
        for desc, _ in t.ListFields():
            if desc.name not in allowed:
                raise _refuse(where, f"{field}.{desc.name}", _WHY.get(desc.name, "not supported by shoal"))
        if not t.name:
            raise _refuse(where, f"{field}.name", "missing")
        dims = tuple(int(d) for d in t.dims)
        if any(d < -1 for d in dims):
            raise _refuse(where, f"{field}.dims", "dimensions must be -1 (variable) or >= 0")
        shape = (-1, *dims) if batched else dims
        tensor = {"name": t.name, "datatype": _datatype(t.data_type, where, field), "shape": list(shape)}
        if getattr(t, "optional", False):  # a request may leave it out, as in Triton
            tensor["optional"] = True
        if getattr(t, "label_filename", ""):
            tensor["labels"] = _labels(folder, t.label_filename, where, f"{field}.label_filename")
        out.append(tensor)
    return out


def _labels(folder: Path, filename: str, where: str, field: str) -> list[str]:
    """The lines of ``filename``, a file in the model's folder (as Triton reads a
    ``label_filename``: one label a line, label i on line i + 1); InvalidArgument naming the
    file when it is outside the folder, missing, over :data:`MAX_LABELS_BYTES`, not UTF-8,
    or past the spec's bounds on labels."""
    path = (folder / filename).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise _refuse(where, field, f"{filename!r} is outside the model's folder")
    try:
        size = path.stat().st_size
        if size > MAX_LABELS_BYTES:
            raise _refuse(where, field, f"{path}: {size} bytes, over the limit of {MAX_LABELS_BYTES}")
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise _refuse(where, field, f"cannot read {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise _refuse(where, field, f"{path}: not UTF-8 text") from None
    labels = [line.removesuffix("\r") for line in text.split("\n")]
    if labels and not labels[-1]:
        labels.pop()  # the last line's line break ends it; it starts no label
    if len(labels) > MAX_LABELS:
        raise _refuse(where, field, f"{path}: {len(labels)} labels, over the limit of {MAX_LABELS}")
    for number, label in enumerate(labels, 1):
        if len(label) > MAX_LABEL_CHARS:
            raise _refuse(
                where,
                field,
                f"{path}: line {number} holds {len(label)} characters, over the limit of {MAX_LABEL_CHARS}",
            )
    return labels


def _check_fields(message: Any, allowed: frozenset[str], prefix: str, where: str) -> None:
    for desc, _ in message.ListFields():
        if desc.name not in allowed:
            why = _WHY.get(desc.name, "not supported by shoal")
            raise _refuse(where, f"{prefix}{desc.name}", why)


def _replicas(config: mc.ModelConfig, where: str) -> tuple[int, float]:
    """Replicas, and GPUs each asks for, from ``instance_group``."""
    if not config.instance_group:
        return 1, 0.0
    kinds = set()
    replicas = 0
    gpu_share = 0.0
    for i, group in enumerate(config.instance_group):
        _check_fields(group, _GROUP_FIELDS, f"instance_group[{i}].", where)
        kind = mc.ModelInstanceGroup.Kind.Name(group.kind)
        if kind == "KIND_MODEL":
            raise _refuse(
                where, f"instance_group[{i}].kind", "KIND_MODEL is not supported (KIND_CPU, KIND_GPU)"
            )
        if group.count < 0:
            raise _refuse(where, f"instance_group[{i}].count", "must not be negative")
        count = group.count or 1
        gpu = kind == "KIND_GPU"
        kinds.add(gpu)
        replicas += count * (max(1, len(group.gpus)) if gpu else 1)
        if gpu:
            gpu_share = 1.0 / count
    if len(kinds) > 1:
        raise _refuse(
            where, "instance_group", "mixes GPU and CPU groups; shoal's replicas of a model are alike"
        )
    return replicas, gpu_share


def _backend(config: mc.ModelConfig, folder: Path, versions: tuple[int, ...], where: str) -> str:
    """``onnx`` or ``python`` (Triton's python backend); InvalidArgument for any other."""
    platform, backend = config.platform, config.backend
    if backend == _PYTHON_BACKEND and not platform:
        return "python"
    if platform and platform != _ONNX_PLATFORM:
        raise _refuse(
            where,
            "platform",
            f"{platform!r} cannot be served by shoal (only {_ONNX_PLATFORM!r}: ONNX models, "
            "and backend 'python')",
        )
    if backend and backend != _ONNX_BACKEND:
        raise _refuse(
            where, "backend", f"{backend!r} cannot be served by shoal (only {_ONNX_BACKEND!r} and 'python')"
        )
    if not platform and not backend:
        filename = config.default_model_filename or ONNX_FILE
        if not any((folder / str(v) / filename).is_file() for v in versions) or not filename.endswith(
            ".onnx"
        ):
            raise _refuse(where, "platform", f"not set, and no version folder holds {ONNX_FILE}")
    return "onnx"


def _python_doc(
    config: mc.ModelConfig, root: Path, name: str, version: int, model_file: Path, where: str
) -> dict[str, Any]:
    """The spec of a Triton python model: shoal's python backend running
    :class:`shoal.backends.triton_python.TritonPython` over its ``model.py``."""
    if not (config.input and config.output):
        raise _refuse(where, "input" if not config.input else "output", "a python model must declare it")
    doc = json_format.MessageToDict(config, preserving_proto_field_name=True)
    doc.update(name=name, max_batch_size=config.max_batch_size, backend=_PYTHON_BACKEND)
    for tensor in (*doc.get("input", []), *doc.get("output", [])):
        tensor["dims"] = [int(d) for d in tensor.get("dims", [])]  # Triton's JSON has numbers
    options = {
        "model_file": str(model_file),
        "model_config": json.dumps(doc),
        "model_name": name,
        "model_version": str(version),
        "model_repository": str(root / name),
        "max_batch_size": config.max_batch_size,
    }
    return {"name": name, "backend": "python", "model": PYTHON_TARGET, "options": options}


def model_file(spec: DeploymentSpec) -> str:
    """The model file a deployment serves: ``model``, or the ``model.py`` of a Triton python model."""
    if spec.backend == "python" and spec.model == PYTHON_TARGET:
        return str(spec.options.get("model_file", ""))
    return spec.model


def _file_hash(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path.is_file():
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def read_model(root: str | Path, name: str, *, hash_files: bool = True) -> RepositoryModel:
    """The model ``name`` of the repository at ``root``, mapped to a spec.

    ``hash_files``: put the hash of the model file and the config in ``model_hash`` (what a
    deploy needs; it reads the whole file); without it ``model_hash`` is empty.

    Raises NotFound when ``root`` has no folder ``name``, InvalidArgument naming the file
    and field when the model cannot be served.
    """
    root = Path(root).resolve()
    if not name or "/" in name or name in (".", "..") or not (root / name).is_dir():
        raise NotFound(f"model repository {str(root)!r} has no model {name!r}")
    folder = root / name
    config_path = folder / CONFIG
    where = str(config_path) if config_path.exists() else str(folder)
    config = read_config(config_path) if config_path.exists() else mc.ModelConfig()
    versions = version_folders(folder)
    if config.name and config.name != name:
        raise _refuse(where, "name", f"{config.name!r} differs from its folder's name {name!r}")
    if not re.match(NAME_PATTERN, name):
        raise _refuse(
            where,
            "name",
            f"{name!r} is not a shoal deployment name (lowercase letters, digits, '-', '_', '.'; "
            "at most 63 characters)",
        )
    _check_fields(config, _TOP_FIELDS, "", where)
    backend = _backend(config, folder, versions, where)
    version = _served_version(config, versions, where)
    filename = config.default_model_filename or (PYTHON_FILE if backend == "python" else ONNX_FILE)
    model_file = folder / str(version) / filename
    if not model_file.is_file():
        field = "default_model_filename" if config.default_model_filename else "version folder"
        raise _refuse(where, field, f"{model_file} is not a file")
    mbs = config.max_batch_size
    if not 0 <= mbs <= 4096:
        raise _refuse(where, "max_batch_size", f"{mbs} is out of range (0 to 4096)")
    if backend == "python":
        doc = _python_doc(config, root, name, version, model_file, where)
    else:
        doc = {"name": name, "backend": "onnx", "model": str(model_file)}
    if mbs > 0:
        # Triton refuses a request of more rows than its author declared: so does shoal.
        batching: dict[str, Any] = {"max_batch_size": max(mbs, 1), "oversize": "refuse"}
        if config.HasField("dynamic_batching"):
            _check_fields(config.dynamic_batching, _BATCHING_FIELDS, "dynamic_batching.", where)
            delay_ms = config.dynamic_batching.max_queue_delay_microseconds / 1000
            if delay_ms > 10_000:
                raise _refuse(where, "dynamic_batching.max_queue_delay_microseconds", "at most 10 seconds")
            batching["max_delay_ms"] = delay_ms
        doc["batching"] = batching
    elif config.HasField("dynamic_batching"):
        raise _refuse(where, "dynamic_batching", "needs max_batch_size > 0")
    if config.input or config.output:
        if not (config.input and config.output):
            missing = "output" if config.input else "input"
            raise _refuse(where, missing, "declare both inputs and outputs, or neither (read from the model)")
        doc["inputs"] = _tensors(config.input, "input", mbs > 0, where, folder)
        doc["outputs"] = _tensors(config.output, "output", mbs > 0, where, folder)
    replicas, gpus = _replicas(config, where)
    doc["replicas"] = replicas
    doc["resources"] = {"cpus": CPUS_PER_REPLICA, "gpus": gpus}
    # A load after the file or the config changed is a change, which replaces the replicas.
    if hash_files:
        doc["model_hash"] = _file_hash(model_file, config_path)
    try:
        spec = parse_spec(doc)
    except InvalidArgument as err:
        raise InvalidArgument(f"{where}: {err}") from None
    return RepositoryModel(name=name, versions=versions, version=version, spec=spec)


def model_names(root: str | Path) -> list[str]:
    """The model folders of the repository, sorted; InvalidArgument when ``root`` is not a folder."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidArgument(f"model repository {str(root)!r} is not a folder")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan(root: str | Path) -> list[RepositoryModel]:
    """Every model of the repository, sorted by name; one that cannot be served carries its
    problem. Specs without ``model_hash`` (no model file is read)."""
    models = []
    for name in model_names(root):
        try:
            models.append(read_model(root, name, hash_files=False))
        except (InvalidArgument, NotFound) as err:
            folder = Path(root) / name
            try:
                versions = version_folders(folder)
            except OSError:
                versions = ()
            models.append(RepositoryModel(name=name, versions=versions, problem=err.message))
    return models


def load_all(root: str | Path) -> list[DeploymentSpec]:
    """The specs of every model (``--model-repository`` at start); InvalidArgument naming each
    model that cannot be served, so that nothing is half deployed."""
    problems, specs = [], []
    for name in model_names(root):
        try:
            spec = read_model(root, name).spec
        except (InvalidArgument, NotFound) as err:
            problems.append(err.message)
            continue
        assert spec is not None
        specs.append(spec)
    if problems:
        raise InvalidArgument("; ".join(problems))
    return specs


def layout_version(spec: DeploymentSpec) -> int:
    """The version a deployment's model file has in Triton's layout: ``N`` for a file
    ``.../NAME/N/FILE`` of deployment NAME (N a positive integer), else 0. Computed once per
    spec: every request asks."""
    found = spec.derived.get("layout_version")
    if found is None:
        found = spec.derived["layout_version"] = _layout_version(spec)
    return int(found)


def _layout_version(spec: DeploymentSpec) -> int:
    path = Path(model_file(spec))
    folder = path.parent.name
    if path.parent.parent.name == spec.name and re.fullmatch(r"[0-9]{1,18}", folder) and int(folder) > 0:
        return int(folder)
    return 0


def served_version(root: str | Path, spec: DeploymentSpec) -> int:
    """The repository version a deployment serves (its model file's folder), 0 when its model
    is not a file of this repository."""
    try:
        relative = Path(model_file(spec)).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return 0
    parts = relative.parts
    if len(parts) == 3 and parts[0] == spec.name and parts[1].isdigit():
        return int(parts[1])
    return 0

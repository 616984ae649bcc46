"""Triton's model repository mapped to deployment specs (shoal.core.triton_repo)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.core.spec import parse_spec
from shoal.core.triton_repo import (
    MAX_CONFIG_BYTES,
    layout_version,
    load_all,
    read_model,
    scan,
    served_version,
)
from shoal.errors import InvalidArgument, NotFound

ONNX = """
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_INT64 dims: [ 1 ] }, { name: "s" data_type: TYPE_STRING dims: [ -1 ] } ]
"""


def model(root: Path, name: str, config: str | None, versions: tuple[int, ...] = (1,)) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.pbtxt").write_text(config)
    for v in versions:
        (folder / str(v)).mkdir()
        (folder / str(v) / "model.onnx").write_bytes(b"onnx bytes of version %d" % v)
    return folder


def refusal(root: Path, name: str) -> str:
    with pytest.raises(InvalidArgument) as err:
        read_model(root, name)
    return str(err.value)


def test_an_onnx_model_maps_inputs_outputs_batching_and_instances(tmp_path: Path) -> None:
    model(
        tmp_path,
        "iris",
        ONNX
        + "dynamic_batching { max_queue_delay_microseconds: 2500 preferred_batch_size: [4] }\n"
        + "instance_group [ { count: 2 kind: KIND_CPU }, { count: 1 } ]\n",
    )
    m = read_model(tmp_path, "iris")
    spec = m.spec
    assert spec is not None and m.version == 1
    assert spec.backend == "onnx" and spec.model == str((tmp_path / "iris/1/model.onnx").resolve())
    assert [(t.name, t.datatype, t.shape) for t in spec.inputs] == [("x", "FP32", (-1, 4))]
    assert [(t.name, t.datatype, t.shape) for t in spec.outputs] == [
        ("y", "INT64", (-1, 1)),
        ("s", "BYTES", (-1, -1)),
    ]
    assert spec.batching.max_batch_size == 8 and spec.batching.max_delay_ms == 2.5
    assert spec.max_request_rows == 8  # a request of more rows is refused, as Triton refuses it
    assert spec.replicas == 3 and spec.resources.gpus == 0 and spec.resources.cpus == 0.25


def test_an_optional_input_stays_optional(tmp_path: Path) -> None:
    """Triton's ModelInput.optional: a request may leave the input out (shoal checks
    requests against the spec, so a required one would refuse what Triton serves)."""
    two = 'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] }, '
    two += '{ name: "k" data_type: TYPE_INT32 dims: [ 1 ] optional: true } ]'
    model(tmp_path, "m", ONNX.replace('input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]', two))
    spec = read_model(tmp_path, "m").spec
    assert spec is not None
    assert [(t.name, t.optional) for t in spec.inputs] == [("x", False), ("k", True)]


def test_without_batching_dims_are_the_whole_shape_and_gpu_groups_share_a_gpu(tmp_path: Path) -> None:
    config = ONNX.replace("max_batch_size: 8", "max_batch_size: 0")
    model(tmp_path, "m", config + 'instance_group [ { count: 2 kind: KIND_GPU gpus: [0, 1] } ]\nname: "m"\n')
    spec = read_model(tmp_path, "m").spec
    assert spec is not None
    assert spec.inputs[0].shape == (4,) and spec.batching.max_batch_size == 1
    assert spec.max_request_rows == 0  # no batch axis: no bound on it
    assert spec.replicas == 4 and spec.resources.gpus == 0.5


def test_the_version_policy_decides_which_version_serves(tmp_path: Path) -> None:
    model(tmp_path, "latest", ONNX, versions=(1, 3, 2))
    model(tmp_path, "pinned", ONNX + "version_policy: { specific: { versions: [1] } }", versions=(1, 2))
    assert read_model(tmp_path, "latest").version == 3
    pinned = read_model(tmp_path, "pinned")
    assert pinned.version == 1 and pinned.versions == (1, 2)
    assert pinned.spec is not None and served_version(tmp_path, pinned.spec) == 1


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ("latest: { num_versions: 2 }", "version_policy.latest"),
        ("all: {}", "version_policy.all"),
        ("specific: { versions: [4] }", "version_policy.specific"),
    ],
)
def test_a_policy_not_selecting_one_existing_version_is_refused(
    tmp_path: Path, policy: str, field: str
) -> None:
    model(tmp_path, "m", ONNX + f"version_policy: {{ {policy} }}", versions=(1, 2))
    assert f": {field}: " in refusal(tmp_path, "m")


def test_without_a_config_an_onnx_model_serves_with_what_the_file_declares(tmp_path: Path) -> None:
    model(tmp_path, "plain", None, versions=(1, 2))
    m = read_model(tmp_path, "plain")
    assert m.version == 2 and m.spec is not None
    assert m.spec.inputs == () and m.spec.replicas == 1


LABELLED = ONNX.replace("dims: [ 1 ] }", 'dims: [ 1 ] label_filename: "labels.txt" }')


def test_an_outputs_label_file_becomes_its_labels(tmp_path: Path) -> None:
    """Triton's label_filename, a file in the model's folder, one label a line: the
    output's labels for the classification extension (a Windows line end is no part of one)."""
    folder = model(tmp_path, "m", LABELLED)
    (folder / "labels.txt").write_text("setosa\r\nversicolor\n\nvirginica\n")
    spec = read_model(tmp_path, "m").spec
    assert spec is not None
    assert [(t.name, t.labels) for t in spec.outputs] == [
        ("y", ("setosa", "versicolor", "", "virginica")),
        ("s", ()),
    ]


@pytest.mark.parametrize(
    ("filename", "content", "problem"),
    [
        ("labels.txt", None, "cannot read"),
        ("../labels.txt", "a\n", "'../labels.txt' is outside the model's folder"),
        ("labels.txt", "a\n" * 16_385, "16385 labels, over the limit of 16384"),
        ("labels.txt", "a" * 257 + "\n", "line 1 holds 257 characters, over the limit of 256"),
        ("labels.txt", "x" * (1024 * 1024 + 1), "1048577 bytes, over the limit of 1048576"),
    ],
)
def test_a_label_file_that_cannot_be_read_or_is_too_large_is_refused_naming_it(
    tmp_path: Path, filename: str, content: str | None, problem: str
) -> None:
    folder = model(tmp_path, "m", LABELLED.replace("labels.txt", filename))
    if content is not None:
        (folder / filename).write_text(content)
    message = refusal(tmp_path, "m")
    assert "config.pbtxt: output[0] 'y'.label_filename: " in message and problem in message


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ('platform: "ensemble"', "platform"),
        ('platform: "tensorrt_plan"', "platform"),
        ('backend: "pytorch"', "backend"),
        (ONNX + "sequence_batching { }", "sequence_batching"),
        (ONNX + 'parameters { key: "k" value: { string_value: "v" } }', "parameters"),
        (ONNX.replace("TYPE_FP32", "TYPE_INVALID"), "input[0] 'x'.data_type"),
        (ONNX.replace("dims: [ 4 ]", "dims: [ 4 ] reshape: { shape: [ ] }"), "input[0] 'x'.reshape"),
        (ONNX + "dynamic_batching { priority_levels: 2 }", "dynamic_batching.priority_levels"),
        (ONNX + "instance_group [ { kind: KIND_MODEL } ]", "instance_group[0].kind"),
        (ONNX + "instance_group [ { kind: KIND_CPU }, { kind: KIND_GPU } ]", "instance_group"),
        (ONNX + 'name: "other"', "name"),
        (ONNX.replace("max_batch_size: 8", "max_batch_size: 9000"), "max_batch_size"),
    ],
)
def test_what_cannot_be_mapped_is_refused_naming_the_field(tmp_path: Path, config: str, field: str) -> None:
    model(tmp_path, "m", config)
    message = refusal(tmp_path, "m")
    assert f"config.pbtxt: {field}: " in message


def test_names_that_are_not_deployment_names_are_refused(tmp_path: Path) -> None:
    model(tmp_path, "MyModel", ONNX)
    assert "MyModel/config.pbtxt: name: 'MyModel' is not a shoal deployment name" in refusal(
        tmp_path, "MyModel"
    )


def test_a_bad_config_names_the_file_and_the_line(tmp_path: Path) -> None:
    model(tmp_path, "m", 'platform: "onnxruntime_onnx"\nmax_batch_size: eight\n')
    message = refusal(tmp_path, "m")
    assert message.startswith(f"{tmp_path / 'm' / 'config.pbtxt'}:2:")


def test_a_config_that_never_ends_is_read_only_to_the_limit(tmp_path: Path) -> None:
    """Before, the size came from stat(), which says 0 for a link to /dev/zero, and the file
    was then read without end: a repository index took memory until the machine had none."""
    folder = model(tmp_path, "m", None)
    (folder / "config.pbtxt").symlink_to("/dev/zero")
    message = refusal(tmp_path, "m")
    assert message == f"cannot read {folder / 'config.pbtxt'}: over the limit of {MAX_CONFIG_BYTES} bytes"
    (folder / "config.pbtxt").unlink()
    (folder / "config.pbtxt").write_bytes(b'platform: "onnxruntime_onnx" # caf\xe9\n')
    assert refusal(tmp_path, "m").startswith(f"cannot read {folder / 'config.pbtxt'}: not UTF-8 (byte 0xe9")


def test_a_model_without_versions_and_an_unknown_model(tmp_path: Path) -> None:
    model(tmp_path, "m", ONNX, versions=())
    assert "no version folder" in refusal(tmp_path, "m")
    with pytest.raises(NotFound, match="has no model 'nope'"):
        read_model(tmp_path, "nope")
    with pytest.raises(NotFound):
        read_model(tmp_path, "..")


def test_scan_keeps_problems_and_load_all_refuses_them_all(tmp_path: Path) -> None:
    model(tmp_path, "a", ONNX)
    model(tmp_path, "b", 'platform: "ensemble"')
    models = scan(tmp_path)
    assert [(m.name, bool(m.spec), bool(m.problem)) for m in models] == [
        ("a", True, False),
        ("b", False, True),
    ]
    with pytest.raises(InvalidArgument, match=r"b/config\.pbtxt: platform"):
        load_all(tmp_path)
    with pytest.raises(InvalidArgument, match="is not a folder"):
        load_all(tmp_path / "missing")


def test_a_changed_model_file_changes_the_spec(tmp_path: Path) -> None:
    folder = model(tmp_path, "m", ONNX)
    before = read_model(tmp_path, "m").spec
    (folder / "1" / "model.onnx").write_bytes(b"retrained")
    after = read_model(tmp_path, "m").spec
    assert before is not None and after is not None
    assert before.process_hash() != after.process_hash()


@pytest.mark.parametrize(
    ("model", "version"),
    [
        ("/r/iris/3/model.onnx", 3),
        ("iris/12/m.onnx", 12),
        ("/r/other/3/model.onnx", 0),
        ("/r/iris/0/model.onnx", 0),
        ("/r/iris/v3/model.onnx", 0),
        ("model.onnx", 0),
    ],
)
def test_the_layout_version_is_the_folder_of_a_models_file(model: str, version: int) -> None:
    spec = parse_spec({"name": "iris", "backend": "onnx", "model": model})
    assert layout_version(spec) == version

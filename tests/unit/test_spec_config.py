"""Deployment specs (validation, files, process hash) and Settings precedence."""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any

import pytest

from shoal.config import Settings
from shoal.core import yamldoc
from shoal.core.spec import DeploymentSpec, check_names_once, load_spec_file, parse_spec, parse_spec_json
from shoal.core.traffic import load_file
from shoal.errors import InvalidArgument

pytestmark = pytest.mark.timeout(10)

BASE: dict[str, Any] = {"name": "echo", "backend": "python", "model": "model.py"}


def spec(**changes: Any) -> DeploymentSpec:
    return parse_spec({**BASE, **changes})


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {**BASE, "backend": "tensorflow"},
            "invalid deployment spec 'echo': backend: Input should be 'python', 'sklearn', 'onnx', "
            "'transformers' or 'vllm'",
        ),
        ({"name": "echo", "backend": "python"}, "invalid deployment spec 'echo': model: Field required"),
        (
            {**BASE, "replicas": -1},
            "invalid deployment spec 'echo': replicas: Input should be greater than or equal to 0",
        ),
        (
            {**BASE, "resources": {"cpus": -2}},
            "invalid deployment spec 'echo': resources.cpus: Input should be",
        ),
        ({**BASE, "replics": 2}, "invalid deployment spec 'echo': replics: Extra inputs are not permitted"),
        # pydantic's words were the regular expression: "String should match pattern '^[a-z0-9]...".
        (
            {**BASE, "name": "Bad Name"},
            "invalid deployment spec 'Bad Name': name: 'Bad Name' is not a deployment name: lowercase "
            "letters, digits, '-', '_' and '.', starting and ending with a letter or digit, "
            "at most 63 characters",
        ),
        (
            {**BASE, "autoscaling": {"min_replicas": 3, "max_replicas": 2}},
            "invalid deployment spec 'echo': autoscaling: min_replicas (3) must not exceed max_replicas (2)",
        ),
        (
            {**BASE, "inputs": [{"name": "x", "shape": [-2, 3]}]},
            "invalid deployment spec 'echo': inputs.0.shape: dimensions must be -1 (variable) or >= 0",
        ),
        (
            {**BASE, "timeout_s": 0},
            "invalid deployment spec 'echo': timeout_s: Input should be greater than 0",
        ),
        # A bool is an int to Python, and pydantic read these as 1 and 0.
        (
            {**BASE, "replicas": True},
            "invalid deployment spec 'echo': replicas: must be a number, got true",
        ),
        (
            {**BASE, "resources": {"cpus": True}},
            "invalid deployment spec 'echo': resources.cpus: must be a number, got true",
        ),
        (
            {**BASE, "batching": {"max_batch_size": False}},
            "invalid deployment spec 'echo': batching.max_batch_size: must be a number, got false",
        ),
        (
            {**BASE, "inputs": [{"name": "x", "shape": [True, 3]}]},
            "invalid deployment spec 'echo': inputs.0.shape: must be a list of integers, got a boolean",
        ),
    ],
)
def test_invalid_specs_raise_invalid_argument_naming_the_field(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_spec(doc)
    assert str(info.value).startswith(message)
    assert info.value.http_status == 400


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_spec({**BASE, "replicas": -1, "max_ongoing_requests": 0})
    assert "replicas: " in str(info.value)
    assert "max_ongoing_requests: " in str(info.value)


def test_a_spec_that_is_not_a_mapping_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match=r"^a deployment spec must be a mapping, got list$"):
        parse_spec(["echo"])


def test_defaults_of_a_minimal_spec() -> None:
    s = spec()
    assert (s.replicas, s.max_ongoing_requests, s.max_queued_requests, s.timeout_s) == (1, 64, 1024, 60.0)
    assert (s.resources.cpus, s.resources.memory_mb, s.resources.gpus) == (1.0, 0.0, 0.0)
    assert s.initial_replicas() == 1


def test_initial_replicas_is_clamped_to_the_autoscaling_bounds() -> None:
    assert spec(replicas=10, autoscaling={"min_replicas": 1, "max_replicas": 4}).initial_replicas() == 4
    assert spec(replicas=0, autoscaling={"min_replicas": 2, "max_replicas": 4}).initial_replicas() == 2
    assert spec(replicas=3, autoscaling={"min_replicas": 2, "max_replicas": 4}).initial_replicas() == 3


def test_invalid_json_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match=r"^deployment spec is not valid JSON: "):
        parse_spec_json("{name: echo")


def test_json_round_trip_keeps_the_spec_and_its_hash() -> None:
    s = spec(options={"b": 1, "a": [1, 2]}, batching={"max_batch_size": 8, "max_delay_ms": 5})
    back = parse_spec_json(s.to_json())
    assert back == s
    assert back.process_hash() == s.process_hash()


# ------------------------------------------------------------------ files


def test_a_relative_model_path_resolves_against_the_spec_files_folder(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "echo"
    folder.mkdir(parents=True)
    path = folder / "echo.yaml"
    path.write_text("name: echo\nbackend: python\nmodel: model.py\n")

    [s] = load_spec_file(path)

    assert s.model == "model.py"
    assert s.model_path() == folder.resolve() / "model.py"
    assert s.model_path().is_absolute()


def test_a_relative_spec_path_still_gives_an_absolute_model_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "echo.yaml").write_text("name: echo\nbackend: python\nmodel: sub/model.py\n")
    monkeypatch.chdir(tmp_path)

    [s] = load_spec_file("echo.yaml")

    assert s.model_path() == tmp_path.resolve() / "sub" / "model.py"


def test_an_absolute_model_path_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "echo.yaml"
    path.write_text("name: echo\nbackend: sklearn\nmodel: /srv/models/digits.joblib\n")
    [s] = load_spec_file(path)
    assert s.model_path() == Path("/srv/models/digits.joblib")


def test_a_multi_document_file_gives_every_spec_in_order(tmp_path: Path) -> None:
    path = tmp_path / "all.yaml"
    path.write_text(
        "---\nname: first\nbackend: python\nmodel: a.py\nreplicas: 2\n"
        "---\n"
        "---\nname: second\nbackend: sklearn\nmodel: b.joblib\n"
    )

    specs = load_spec_file(path)

    assert [(s.name, s.backend, s.replicas) for s in specs] == [
        ("first", "python", 2),
        ("second", "sklearn", 1),
    ]
    assert {s.base_dir for s in specs} == {str(tmp_path.resolve())}


def test_an_invalid_document_in_a_file_names_its_deployment(tmp_path: Path) -> None:
    path = tmp_path / "all.yaml"
    path.write_text(
        "name: good\nbackend: python\nmodel: a.py\n---\nname: bad\nbackend: python\nreplicas: x\n"
    )
    with pytest.raises(InvalidArgument) as info:
        load_spec_file(path)
    assert str(info.value).startswith("invalid deployment spec 'bad': model: Field required; replicas: ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no deployment spec"),
        ("---\n---\n", "holds no deployment spec"),
        ("name: [unclosed\n", "is not valid YAML"),
    ],
)
def test_empty_or_broken_files_are_invalid(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=f"^{re.escape(str(path))}.*{message}"):
        load_spec_file(path)


def test_a_key_given_twice_is_refused_naming_it(tmp_path: Path) -> None:
    """Before: the last one won, silently ('replicas: 1' then 'replicas: 2' deployed 2)."""
    path = tmp_path / "spec.yaml"
    path.write_text("name: echo\nbackend: python\nmodel: m:M\nreplicas: 1\nreplicas: 2\n")
    with pytest.raises(InvalidArgument, match=r"found the key 'replicas' twice \(first at line 4\)"):
        load_spec_file(path)
    # Merge keys may still be overridden: that is what they are for.
    path.write_text(
        "name: echo\nbackend: python\nmodel: m:M\nresources:\n  <<: {cpus: 1, memory_mb: 10}\n  cpus: 2\n"
    )
    (spec,) = load_spec_file(path)
    assert (spec.resources.cpus, spec.resources.memory_mb) == (2, 10)


def test_one_file_with_two_specs_of_one_name_is_refused(tmp_path: Path) -> None:
    """Before: both were applied in turn, and the second silently replaced the first."""
    path = tmp_path / "all.yaml"
    path.write_text("name: echo\nbackend: python\nmodel: a:M\n---\nname: echo\nbackend: python\nmodel: b:M\n")
    with pytest.raises(InvalidArgument, match="holds more than one spec of deployment 'echo'"):
        load_spec_file(path)


def test_a_config_file_nested_too_deeply_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "shoal.yaml"
    path.write_text("a: " + "[" * 100_000)
    with pytest.raises(InvalidArgument, match="is nested too deeply"):
        Settings.load(file=path, env={})


def test_a_setting_given_twice_in_a_config_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "shoal.yaml"
    path.write_text("grpc_port: 9001\ngrpc_port: 9002\n")
    with pytest.raises(InvalidArgument, match="found the key 'grpc_port' twice"):
        Settings.load(file=path, env={})


def test_a_missing_file_is_invalid_argument(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(
        InvalidArgument, match=f"^cannot read {re.escape(str(path))}: No such file or directory$"
    ):
        load_spec_file(path)


# ------------------------------------------------------------------ process hash


def test_process_hash_ignores_replicas_and_autoscaling() -> None:
    base = spec()
    assert spec(replicas=5).process_hash() == base.process_hash()
    assert spec(autoscaling={"min_replicas": 1, "max_replicas": 9}).process_hash() == base.process_hash()


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other.py"},
        {"backend": "sklearn"},
        {"options": {"threads": 2}},
        {"resources": {"cpus": 2}},
        {"batching": {"max_batch_size": 8}},
        {"max_ongoing_requests": 8},
    ],
)
def test_process_hash_changes_with_what_the_process_runs(change: dict[str, Any]) -> None:
    assert spec(**change).process_hash() != spec().process_hash()


def test_process_hash_does_not_depend_on_option_order() -> None:
    assert spec(options={"a": 1, "b": 2}).process_hash() == spec(options={"b": 2, "a": 1}).process_hash()


# ------------------------------------------------------------------ settings


def test_settings_defaults_without_any_source() -> None:
    s = Settings.load(env={})
    assert s == Settings()
    assert (s.head_address, s.grpc_port, s.dead_after_s) == ("localhost:8470", 8001, 5.0)


def test_settings_precedence_is_flags_then_env_then_file_then_defaults(tmp_path: Path) -> None:
    file = tmp_path / "shoal.yaml"
    file.write_text("grpc_port: 1001\nhttp_port: 1002\nhead_port: 1003\n")
    env = {"SHOAL_GRPC_PORT": "2001", "SHOAL_HTTP_PORT": "2002"}
    flags = {"grpc_port": 3001, "http_port": None}

    s = Settings.load(file=file, env=env, flags=flags)

    assert s.grpc_port == 3001  # flag over env and file
    assert s.http_port == 2002  # None flag is ignored: env over file
    assert s.head_port == 1003  # file over default
    assert s.head_http_port == 8471  # default


def test_settings_types_come_from_the_defaults(tmp_path: Path) -> None:
    s = Settings.load(
        env={"SHOAL_DEAD_AFTER_S": "2.5", "SHOAL_RPC_ATTEMPTS": "7", "SHOAL_LOG_LEVEL": "DEBUG"}
    )
    assert (s.dead_after_s, s.rpc_attempts, s.log_level) == (2.5, 7, "DEBUG")
    assert isinstance(s.rpc_attempts, int)


def test_head_address_comes_from_shoal_head() -> None:
    assert Settings.load(env={"SHOAL_HEAD": "10.0.0.1:9000"}).head_address == "10.0.0.1:9000"
    assert Settings.load(env={"SHOAL_HEAD_ADDRESS": "10.0.0.1:9000"}).head_address == "localhost:8470"


def test_a_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(
        InvalidArgument, match=r"^environment variable SHOAL_GRPC_PORT: grpc_port must be int, got 'abc'$"
    ):
        Settings.load(env={"SHOAL_GRPC_PORT": "abc"})


def test_a_bad_flag_value_names_the_flag() -> None:
    with pytest.raises(InvalidArgument, match=r"^--dead-after-s: dead_after_s must be float, got 'soon'$"):
        Settings.load(env={}, flags={"dead_after_s": "soon"})


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity"])
def test_a_setting_that_is_not_a_finite_number_is_refused(value: str) -> None:
    with pytest.raises(
        InvalidArgument,
        match=rf"^environment variable SHOAL_DEAD_AFTER_S: dead_after_s must be a finite number, "
        rf"got '{value}'$",
    ):
        Settings.load(env={"SHOAL_DEAD_AFTER_S": value})


def test_a_non_finite_number_in_a_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "shoal.yaml"
    file.write_text("dead_after_stream_end_s: .nan\n")
    with pytest.raises(InvalidArgument, match="dead_after_stream_end_s must be a finite number"):
        Settings.load(file=file, env={})


def test_a_bad_file_value_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "shoal.yaml"
    file.write_text("heartbeat_interval_s: often\n")
    with pytest.raises(InvalidArgument) as info:
        Settings.load(file=file, env={})
    assert str(info.value) == f"config file {file}: heartbeat_interval_s must be float, got 'often'"


def test_an_unknown_file_setting_is_named(tmp_path: Path) -> None:
    file = tmp_path / "shoal.yaml"
    file.write_text("grpc_prot: 9000\n")
    with pytest.raises(
        InvalidArgument, match=f"^config file {re.escape(str(file))}: unknown setting 'grpc_prot'$"
    ):
        Settings.load(file=file, env={})


def test_an_unknown_flag_is_named() -> None:
    with pytest.raises(InvalidArgument, match="unknown setting 'grpc_prot'"):
        Settings.load(env={}, flags={"grpc_prot": 1})


@pytest.mark.parametrize(
    ("text", "message"), [("- a\n- b\n", "must hold a mapping"), ("a: [\n", "cannot read")]
)
def test_a_config_file_that_is_not_a_mapping_is_invalid(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "shoal.yaml"
    file.write_text(text)
    with pytest.raises(InvalidArgument, match=message):
        Settings.load(file=file, env={})


def test_a_spec_or_config_file_that_is_not_utf8_is_one_clear_error(tmp_path: Path) -> None:
    """Before: a traceback ending in UnicodeDecodeError, from shoal deploy and shoal up --config."""
    data = b"name: nu\nbackend: python\nmodel: echo:Echo\n# caf\xe9 (latin-1)\n"
    where = f"not UTF-8 \\(byte 0xe9 at position {data.index(0xE9)}\\)$"
    spec = tmp_path / "latin1.yaml"
    spec.write_bytes(data)
    with pytest.raises(InvalidArgument, match=f"^cannot read {re.escape(str(spec))}: {where}"):
        load_spec_file(spec)
    with pytest.raises(InvalidArgument, match=f"^cannot read {re.escape(str(spec))}: {where}"):
        load_file(spec)
    config = tmp_path / "shoal.yaml"
    config.write_bytes(b"log_level: info  # caf\xe9\n")
    with pytest.raises(
        InvalidArgument, match=f"^cannot read config file {re.escape(str(config))}: not UTF-8"
    ):
        Settings.load(file=config, env={})


def test_a_missing_config_file_is_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"^cannot read config file"):
        Settings.load(file=tmp_path / "missing.yaml", env={})


def test_an_empty_config_file_means_defaults(tmp_path: Path) -> None:
    file = tmp_path / "shoal.yaml"
    file.write_text("")
    assert Settings.load(file=file, env={}) == Settings()


@pytest.mark.parametrize("value", ["8001.5", "true"])
def test_a_non_integer_for_an_integer_setting_is_refused(tmp_path: Path, value: str) -> None:
    # int(8001.5) == 8001 and int(True) == 1: the value must be refused, not changed.
    file = tmp_path / "shoal.yaml"
    file.write_text(f"grpc_port: {value}\n")
    with pytest.raises(InvalidArgument, match=f"^config file {re.escape(str(file))}: grpc_port must be int"):
        Settings.load(file=file, env={})


def test_a_null_in_the_config_file_does_not_become_the_string_none(tmp_path: Path) -> None:
    file = tmp_path / "shoal.yaml"
    file.write_text("advertise_host:\n")
    try:
        s = Settings.load(file=file, env={})
    except InvalidArgument as err:
        assert str(err).startswith(f"config file {file}: advertise_host")
    else:
        assert s.advertise_host == ""
        assert s.advertised == "127.0.0.1"


def test_dead_after_s_shorter_than_two_heartbeats_is_refused(tmp_path: Path) -> None:
    """With ``dead_after_s`` 0.5 and updates every second, ``shoal up`` declared its own
    scheduler dead between updates and re-registered it every second."""
    file = tmp_path / "shoal.yaml"
    file.write_text("dead_after_s: 0.5\n")
    with pytest.raises(
        InvalidArgument,
        match=r"^dead_after_s \(0.5\) must be at least twice heartbeat_interval_s \(1\), or a scheduler",
    ):
        Settings.load(file=file, env={})
    with pytest.raises(
        InvalidArgument, match=r"dead_after_s \(5\) must be at least twice heartbeat_interval_s \(3\)"
    ):
        Settings.load(env={"SHOAL_HEARTBEAT_INTERVAL_S": "3"})
    s = Settings.load(file=file, env={}, flags={"heartbeat_interval_s": 0.25})
    assert (s.dead_after_s, s.heartbeat_interval_s) == (0.5, 0.25)


def test_readme_port_variables_move_every_port_make_up_opens() -> None:
    """The README's line for moving ``make up``'s ports: each variable it names is a setting,
    and together they move all four ports the banner prints."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    line = re.search(r"`(SHOAL_HTTP_PORT=.*?) make up`", readme.replace("\n", " "))
    assert line, "the README no longer shows how to move make up's ports"
    env = dict(pair.split("=") for pair in line.group(1).split())

    s = Settings.load(env=env)

    ports = {"http_port": s.http_port, "grpc_port": s.grpc_port}
    ports |= {"head_port": s.head_port, "head_http_port": s.head_http_port}
    assert sorted(ports.values()) == sorted(int(v) for v in env.values())
    assert all(port != getattr(Settings(), name) for name, port in ports.items())


def _alias_bomb(levels: int) -> str:
    """A YAML list of ``levels`` levels of nine-fold aliases: 9**levels items from a few
    hundred bytes."""
    anchors = ['&a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    anchors += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"[{', '.join(anchors)}]"


def test_a_config_value_quoted_in_an_error_is_short_whatever_it_holds(tmp_path: Path) -> None:
    """Before, the error printed the value whole: seven levels of aliases (9**7 items from
    600 bytes) made a 24 MB message, and nine levels never finished."""
    path = tmp_path / "shoal.yaml"
    for text, got in [
        (f"host: {_alias_bomb(7)}\n", "host must be str, got [['x', "),
        (f"log_format: {'x' * 10_000}\n", "log_format must be text or json, got 'xxxx"),
        (f"head_port: {'9' * 4000}\n", "<an integer of 4000 digits>"),
        (f"? {'k' * 10_000}\n: 1\n", "unknown setting 'kkkk"),
    ]:
        path.write_text(text)
        with pytest.raises(InvalidArgument) as info:
            Settings.load(file=path, env={})
        message = str(info.value)
        assert message.startswith(f"config file {path}: ") and got in message
        assert len(message) < 600, len(message)


@pytest.mark.parametrize("what", ["config", "spec"])
def test_an_integer_too_long_for_python_is_refused_naming_the_file_and_line(
    tmp_path: Path, what: str
) -> None:
    """Before: a ValueError traceback ('Exceeds the limit (4300 digits) for integer string
    conversion'), naming neither the file nor the line."""
    path = tmp_path / f"{what}.yaml"
    key = "replicas" if what == "spec" else "head_port"
    path.write_text(f"name: echo\nbackend: python\nmodel: m:M\n{key}: {'9' * 5000}\n")
    with pytest.raises(InvalidArgument) as info:
        if what == "spec":
            load_spec_file(path)
        else:
            Settings.load(file=path, env={})
    message = str(info.value)
    assert "an integer of 5000 characters, too long to read" in message
    assert f'"{path}", line 4, column ' in message or f"{path}" in message.splitlines()[0]
    assert len(message) < 1000


@pytest.mark.parametrize("what", ["config", "spec"])
def test_a_file_over_the_size_limit_is_refused_before_it_is_parsed(tmp_path: Path, what: str) -> None:
    """Before, a file was read whole: ``shoal deploy /dev/zero`` (or ``--config /dev/zero``)
    took memory until the machine had none. Here a sparse file one byte over the limit."""
    path = tmp_path / f"{what}.yaml"
    with path.open("wb") as f:
        f.truncate(yamldoc.MAX_FILE_BYTES + 1)
    limit = yamldoc.MAX_FILE_BYTES
    with pytest.raises(InvalidArgument) as info:
        if what == "spec":
            load_spec_file(path)
        else:
            Settings.load(file=path, env={})
    assert str(info.value).endswith(f"{path}: over the limit of {limit} bytes")


class _CountedName(str):
    """A deployment name that counts the comparisons made with it."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        _CountedName.compared += 1
        return str.__eq__(self, other)

    def __hash__(self) -> int:
        return str.__hash__(self)


def test_the_names_of_a_file_of_many_specs_are_checked_in_linear_work(tmp_path: Path) -> None:
    """Before, each name was counted in the whole list: a file of 40,000 specs (2 MB) took
    39 s for this check alone, after its YAML was read. Here 1,000 names: a million
    comparisons before, none now (each name is hashed once)."""
    specs: Any = [types.SimpleNamespace(name=_CountedName(f"d{i}")) for i in range(1000)]
    _CountedName.compared = 0
    check_names_once(tmp_path / "all.yaml", specs)
    assert _CountedName.compared < len(specs)
    specs.append(types.SimpleNamespace(name=_CountedName("d7")))
    with pytest.raises(InvalidArgument, match=r"holds more than one spec of deployment 'd7'$"):
        check_names_once(tmp_path / "all.yaml", specs)


def test_a_yaml_value_json_has_no_kind_for_is_refused_naming_the_field(tmp_path: Path) -> None:
    """Before, ``options`` took them: bytes that are not UTF-8 then failed the spec's JSON, a
    PydanticSerializationError traceback from ``shoal deploy``; a set or a date reached the
    model as a list or a string."""
    path = tmp_path / "spec.yaml"
    path.write_text(
        "name: a\nbackend: python\nmodel: m:M\n"
        'options:\n  key: !!binary "/w=="\n  day: 2024-01-01\n  tags: !!set {a, b}\n  fine: "2024-01-01"\n'
    )
    with pytest.raises(InvalidArgument) as info:
        load_spec_file(path)
    assert str(info.value) == (
        "invalid deployment spec 'a': "
        "options.day: a date is not a JSON value; quote it to give a string; "
        "options.key: binary data (!!binary) is not a JSON value; quote it to give a string; "
        "options.tags: a set (!!set) is not a JSON value; quote it to give a string"
    )

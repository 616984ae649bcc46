"""Settings out of their range are refused, from every source, naming the setting, the
value and what it may be."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

import shoal.config
from shoal.config import _RANGES, Settings
from shoal.errors import InvalidArgument

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("grpc_port", -1, "from 0 to 65535"),
        ("grpc_port", 70000, "from 0 to 65535"),
        ("http_port", 70000, "from 0 to 65535"),
        ("head_port", 103870, "from 0 to 65535"),
        ("head_http_port", 65536, "from 0 to 65535"),
        ("cpus", -5, "-1 or >= 0"),
        ("memory_mb", -3, "-1 or >= 0"),
        ("gpus", -2, "-1 or >= 0"),
        ("dead_after_s", 0, "> 0"),
        ("heartbeat_interval_s", -1, "> 0"),
        ("replica_pin_interval_s", 0.01, "from 0.05 to 3600"),
        ("blob_grace_s", 0, "> 0"),
        ("dead_after_stream_end_s", -1, ">= 0"),
        ("shutdown_grace_s", -3, ">= 0"),
        ("ingress_workers", -4, "from 0 to 256"),
        ("ingress_workers", 100000, "from 0 to 256"),
        ("max_blob_mb", -1, ">= 0"),
        ("rpc_attempts", 0, ">= 1"),
        ("max_message_mb", 4096, "from 1 to 2047"),
        ("max_concurrent_streams", 0, "from 1 to 2147483647"),
        ("replica_oom_score_adj", 1001, "from -1000 to 1000"),
        ("replica_oom_score_adj", -1001, "from -1000 to 1000"),
    ],
)
def test_a_number_out_of_range_is_refused_from_every_source(
    tmp_path: Path, name: str, value: int, allowed: str
) -> None:
    file = tmp_path / "shoal.yaml"
    file.write_text(f"{name}: {value}\n")
    var = f"SHOAL_{name.upper()}"
    flag = f"--{name.replace('_', '-')}"
    sources: list[tuple[dict[str, Any], str]] = [
        ({"file": file, "env": {}}, f"config file {file}: {name} must be {allowed}, got {value}"),
        ({"env": {var: str(value)}}, f"environment variable {var}: {name} must be {allowed}, got '{value}'"),
        ({"env": {}, "flags": {name: value}}, f"{flag}: {name} must be {allowed}, got {value}"),
    ]
    for source, message in sources:
        with pytest.raises(InvalidArgument) as info:
            Settings.load(**source)
        assert str(info.value) == message


NOT_A_CHOICE = {
    "log_level": ("LOUD", "DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    "log_format": ("xml", "text or json"),
    "event_loop": ("trio", "auto or uvloop or asyncio"),
    "data_plane": ("pigeon", "socket or stream or unary"),
}
"""A setting that names one of a few choices: a name none of them, and the choices."""


@pytest.mark.parametrize("name", sorted(NOT_A_CHOICE))
def test_a_name_that_is_not_a_choice_is_refused(tmp_path: Path, name: str) -> None:
    value, allowed = NOT_A_CHOICE[name]
    file = tmp_path / "shoal.yaml"
    file.write_text(f"{name}: {value}\n")
    with pytest.raises(InvalidArgument) as info:
        Settings.load(file=file, env={})
    assert str(info.value) == f"config file {file}: {name} must be {allowed}, got '{value}'"


@pytest.mark.parametrize(
    "values",
    [
        # 0: a free port; -1: read the machine; 0: no limit, never, or none.
        {"grpc_port": 0, "http_port": 65535, "head_port": 0, "head_http_port": 1},
        {"cpus": -1, "memory_mb": -1, "gpus": -1},
        {"cpus": 0, "memory_mb": 0, "gpus": 0.5},
        {"max_inflight_mb": 0, "replica_log_max_mb": 0, "max_tensors_per_request": 0},
        {"max_tensor_elements": 0, "max_strings_per_request": 0, "http_max_connections": 0},
        {"http_header_timeout_s": 0, "control_rate_limit": 0, "dead_after_stream_end_s": 0},
        {"forget_dead_after_s": 0, "shutdown_grace_s": 0, "ingress_workers": 0},
        {"replica_oom_score_adj": -1000},
        {"replica_oom_score_adj": 1000},
        {"max_message_mb": 1, "rpc_attempts": 1, "dead_after_s": 0.2, "heartbeat_interval_s": 0.05},
        {"log_level": "debug", "log_format": "json", "event_loop": "asyncio", "data_plane": "unary"},
    ],
)
def test_the_values_at_the_ends_of_a_range_are_taken(values: dict[str, Any]) -> None:
    s = Settings.load(env={}, flags=values)
    assert {k: getattr(s, k) for k in values} == values


def test_every_number_setting_has_a_range() -> None:
    numbers = {f.name for f in fields(Settings) if type(f.default) in (int, float)}
    assert numbers == set(_RANGES)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:99999",
        "127.0.0.1:104006",
        "h:0",
        "localhost",
        ":8470",
        "a:8470,b:70000",
        "h:84x0",
        "h:\uff18\uff14\uff17\uff10",  # 8470 in full-width digits: str.isdigit() took them
    ],
)
def test_a_head_address_whose_port_gRPC_cannot_dial_is_refused(address: str) -> None:
    """Before, ``127.0.0.1:99999`` dialled port 34463 (gRPC keeps the low 16 bits), so
    P + 65536 silently reached P; and a port in digits other than ASCII's was taken, and
    gRPC failed to parse it at the first call."""
    with pytest.raises(InvalidArgument) as info:
        Settings.load(env={"SHOAL_HEAD": address})
    assert str(info.value).startswith("environment variable SHOAL_HEAD: head_address must be HOST:PORT")


@pytest.mark.parametrize(
    ("address", "why"),
    [
        (
            "http://127.0.0.1:8470",
            "is HOST:PORT (the head's gRPC port), not a URL; got "
            "'http://127.0.0.1:8470', did you mean '127.0.0.1:8470'?",
        ),
        (
            "a:8470,GRPC://h:1/x",
            "is HOST:PORT (the head's gRPC port), not a URL; got 'GRPC://h:1/x', did you mean 'h:1'?",
        ),
        ("::1:8470", "must put an IPv6 address in brackets, '[::1]:8470'; got '::1:8470'"),
    ],
)
def test_a_head_address_that_is_a_url_or_a_bare_ipv6_address_is_refused(address: str, why: str) -> None:
    """Before, both were taken: a URL failed at the first call ('Misformatted domain name'),
    and ``::1:8470`` dialled [::0.1.132.112]:443, gRPC reading it as one IPv6 address."""
    with pytest.raises(InvalidArgument) as info:
        Settings.load(env={"SHOAL_HEAD": address})
    assert str(info.value) == f"environment variable SHOAL_HEAD: head_address {why}"


@pytest.mark.parametrize("address", ["", " ", ",", " , "])
def test_a_head_address_naming_no_head_is_refused_naming_the_setting(address: str) -> None:
    """Before, it was taken and a command failed later with "no head address in ''"."""
    with pytest.raises(InvalidArgument, match=r"^--head: head_address must name a head"):
        Settings.load(env={}, flags={"head_address": address}, flag_names={"head_address": "--head"})
    if address.strip():  # "," names no head
        with pytest.raises(InvalidArgument) as info:
            Settings.load(env={"SHOAL_HEAD": address})
        assert str(info.value) == (
            "environment variable SHOAL_HEAD: head_address must name a head, HOST:PORT "
            f"(comma-separated for several); got {address!r}"
        )
    else:  # SHOAL_HEAD= clears an exported head: the default, as if unset
        assert Settings.load(env={"SHOAL_HEAD": address}).head_address == Settings.load(env={}).head_address


@pytest.mark.parametrize(
    "address", ["127.0.0.1:1", "h:65535", "[::1]:8470", "a:8470, b:8471", "dns:///h:8470", "h:1,[fe80::1]:2"]
)
def test_head_addresses_with_dialable_ports_are_taken(address: str) -> None:
    assert Settings.load(env={"SHOAL_HEAD": address}).head_address == address


def test_a_misspelt_environment_variable_is_named_once(caplog: pytest.LogCaptureFixture) -> None:
    """Before, ``SHOAL_INGRES_WORKERS=1`` was ignored without a word. Variables not close to
    a setting's (other tools', tests') and the ingress workers' own are left alone."""
    env = {"SHOAL_INGRES_WORKERS": "1", "SHOAL_RELIABILITY_OUT": "x", "SHOAL_INGRESS_WORKER": "{}"}
    with caplog.at_level("WARNING", logger="shoal"):
        settings = Settings.load(env=env)
        Settings.load(env=env)
    assert settings.ingress_workers == Settings().ingress_workers
    assert [r.getMessage() for r in caplog.records] == [
        "environment variable SHOAL_INGRES_WORKERS names no setting and is ignored; "
        "did you mean SHOAL_INGRESS_WORKERS?"
    ]


@pytest.mark.parametrize(
    ("token", "said"),
    [
        ("shoal_abc\r", "'\\r' at position 9"),
        ("shoal_abc\n", "'\\n' at position 9"),
        (" shoal", "' ' at position 0"),
        ("shoal_\u00e9", "'\u00e9' at position 6"),
    ],
)
def test_a_token_a_header_cannot_carry_is_refused_without_showing_it(token: str, said: str) -> None:
    """Before, a token read from a file with its line end (or any character outside visible
    ASCII) ended every command in a traceback from gRPC's insides (ExecuteBatchError)."""
    with pytest.raises(InvalidArgument) as info:
        Settings.load(env={"SHOAL_TOKEN": token})
    assert str(info.value) == (
        "environment variable SHOAL_TOKEN: token must be visible ASCII characters (as 'shoal token "
        f"create' makes them), got {said} (the token is not shown)"
    )


def test_a_variable_named_after_a_setting_or_its_flag_says_which_one_is_meant(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, ``SHOAL_HEAD_ADDRESS`` (SHOAL_<SETTING> for ``head_address``), ``SHOAL_GRACE``
    (``--grace``) and ``SHOAL_CONFIG`` were ignored without a word, and ``SHOAL_DASHBOARD_PORT``
    (``--dashboard-port``) was said to be close to SHOAL_HEAD_PORT, the head's gRPC port."""
    env = {
        "SHOAL_HEAD_ADDRESS": "h:1",
        "SHOAL_GRACE": "3",
        "SHOAL_DASHBOARD_PORT": "9",
        "SHOAL_CONFIG": "a.yaml",
    }
    monkeypatch.setattr(shoal.config, "_warned", set())  # each is said once a process
    with caplog.at_level("WARNING", logger="shoal"):
        settings = Settings.load(env=env)
    assert settings == Settings()
    assert sorted(r.getMessage().split("ignored; ")[1] for r in caplog.records) == [
        "did you mean SHOAL_HEAD?",
        "did you mean SHOAL_HEAD_HTTP_PORT?",
        "did you mean SHOAL_SHUTDOWN_GRACE_S?",
        "did you mean the flag --config?",
    ]

"""What the CLI refuses before it starts or sends anything, as the user sees it: a state folder
another process uses or that cannot be one, and numbers a protobuf field cannot carry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

import shoal.aio
import shoal.logs
import shoal.zygote
from shoal.cli import main
from shoal.cli.processes import pid_file

pytestmark = pytest.mark.timeout(10)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``shoal ARGV``: its exit status and stderr."""
    with pytest.raises(SystemExit) as exit:
        main(list(argv))
    return int(exit.value.code or 0), capsys.readouterr().err


# ------------------------------------------------------------------ state folders


@pytest.fixture
def nothing_runs(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """``shoal up``, ``head`` and ``scheduler`` as far as their pid file, then they return at
    once: no servers, no zygote, no logging set up. The list holds what would have run."""
    ran: list[object] = []

    def run(main: Any, event_loop: str = "auto") -> None:
        main.close()
        ran.append(main)

    @contextmanager
    def zygote() -> Iterator[None]:
        yield None

    monkeypatch.setattr(shoal.aio, "run", run)
    monkeypatch.setattr(shoal.zygote, "zygote", zygote)
    monkeypatch.setattr(shoal.logs, "setup", lambda *a, **k: None)
    return ran


def claim(state: Path, role: str) -> int:
    """A live ``role`` in ``state``, as its pid file says: this test's own process."""
    me = psutil.Process()
    state.mkdir(parents=True, exist_ok=True)
    pid_file(state, role).write_text(json.dumps({"pid": me.pid, "started": me.create_time()}))
    return me.pid


@pytest.mark.parametrize(
    ("live", "starting"),
    [
        ("up", "scheduler"),
        ("up", "head"),
        ("up", "up"),
        ("head", "head"),
        ("head", "up"),
        ("scheduler", "scheduler"),
        ("scheduler", "up"),
    ],
)
def test_a_process_is_refused_beside_one_it_would_share_the_state_folder_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nothing_runs: list[object], live: str, starting: str
) -> None:
    pid = claim(tmp_path, live)
    code, err = run_cli(capsys, starting, "--state", str(tmp_path))
    assert code == 1 and not nothing_runs
    assert err.splitlines() == [
        f"shoal: error: shoal {live} already runs with state folder {tmp_path} (pid {pid}); "
        f"'shoal down --state {tmp_path}' stops it, or give this {starting} a state folder of its own"
    ]
    assert not pid_file(tmp_path, starting).exists() or live == starting


@pytest.mark.parametrize(("live", "starting"), [("head", "scheduler"), ("scheduler", "head")])
def test_a_head_and_a_scheduler_may_share_a_state_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nothing_runs: list[object], live: str, starting: str
) -> None:
    claim(tmp_path, live)
    code, err = run_cli(capsys, starting, "--state", str(tmp_path))
    assert code == 0 and len(nothing_runs) == 1, err
    assert not pid_file(tmp_path, starting).exists()  # removed on the way out


@pytest.mark.parametrize(
    ("state", "why"),
    [
        ("afile", "state folder {} is a file, not a folder"),
        ("afile/sub", "cannot create state folder {}: Not a directory"),
    ],
)
@pytest.mark.parametrize("role", ["up", "head", "scheduler"])
def test_a_state_folder_that_cannot_be_one_is_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    nothing_runs: list[object],
    state: str,
    why: str,
    role: str,
) -> None:
    (tmp_path / "afile").write_text("not a folder")
    folder = tmp_path / state
    code, err = run_cli(capsys, role, "--state", str(folder))
    assert code == 1 and not nothing_runs
    assert err.splitlines() == [f"shoal: error: {why.format(folder)}"]


# ------------------------------------------------------------------ numbers for protobuf fields


@pytest.mark.parametrize(
    ("argv", "what", "high"),
    [
        (["scale", "echo", "2147483648"], "replicas", 2**31 - 1),
        (["scale", "echo", "99999999999999999999"], "replicas", 2**31 - 1),
        (["scale", "echo", "-1"], "replicas", 2**31 - 1),
        (["scale", "echo", "2", "--if-revision", "-1"], "--if-revision", 2**31 - 1),
        (["events", "--limit", "99999999999"], "--limit", 2**31 - 1),
        (["logs", "echo", "--tail-bytes", "99999999999999999999999"], "--tail-bytes", 2**63 - 1),
        (["logs", "head", "--tail-bytes", "-1"], "--tail-bytes", 2**63 - 1),
        (["rollback", "echo", "99999999999"], "revision", 2**31 - 1),
        # Revisions are numbered from 1: a 0 went to the previous revision, one not named.
        (["rollback", "echo", "0"], "revision", 2**31 - 1),
    ],
)
def test_a_number_its_protobuf_field_cannot_hold_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], what: str, high: int
) -> None:
    # No head listens at port 1: the refusal comes before any call.
    code, err = run_cli(capsys, "--head", "127.0.0.1:1", *argv)
    value = next(a for a in reversed(argv) if a.lstrip("-").isdigit())
    assert code == 1
    low = 1 if argv[0] == "rollback" else 0
    assert err.splitlines() == [f"shoal: error: {what} must be an integer from {low} to {high}, got {value}"]


WAITS = [["deploy", "spec.yaml"], ["rollback", "echo"], ["restart", "echo"], ["down"]]


@pytest.mark.parametrize("command", WAITS)
@pytest.mark.parametrize("timeout", ["-1", "nan", "inf", "soon"])
def test_a_wait_that_is_no_finite_number_of_seconds_is_refused_before_anything_is_sent(
    capsys: pytest.CaptureFixture[str], command: list[str], timeout: str
) -> None:
    """Before: 'shoal deploy --timeout -1' applied the spec, then failed 'not ready after -1s'."""
    code, err = run_cli(capsys, *command[:1], "--timeout", timeout, *command[1:])
    assert code == 2
    assert "argument --timeout: expected a" in err.splitlines()[-1] and repr(timeout) in err


# ------------------------------------------------------------------ files the CLI reads


def test_a_spec_file_that_is_not_utf8_or_an_alias_bomb_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a UnicodeDecodeError traceback; and for nine levels of nine-fold YAML aliases,
    no answer at all, at 100% CPU. No head listens at port 1: the refusal comes first."""
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"name: nu\nbackend: python\nmodel: echo:Echo\n# caf\xe9\n")
    code, err = run_cli(capsys, "--head", "127.0.0.1:1", "deploy", str(latin1))
    assert code == 1
    assert err.splitlines() == [f"shoal: error: cannot read {latin1}: not UTF-8 (byte 0xe9 at position 47)"]

    lines = ["name: bomb", "backend: python", "model: echo:Echo", f"a: &a [{', '.join('x' * 9)}]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    code, err = run_cli(capsys, "--head", "127.0.0.1:1", "deploy", str(bomb))
    assert code == 1 and len(err.splitlines()) == 1
    assert "the spec holds more than 65536 values" in err


def test_a_config_file_that_is_not_utf8_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nothing_runs: list[object]
) -> None:
    config = tmp_path / "shoal.yaml"
    config.write_bytes(b"log_level: info  # caf\xe9\n")
    code, err = run_cli(capsys, "up", "--state", str(tmp_path / "state"), "--config", str(config))
    assert code == 1 and not nothing_runs
    assert err.splitlines() == [
        f"shoal: error: cannot read config file {config}: not UTF-8 (byte 0xe9 at position 22)"
    ]


def test_a_yaml_error_is_one_line_naming_the_file_and_the_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nothing_runs: list[object]
) -> None:
    """Before: PyYAML's five lines, each place given as in "<unicode string>" with an excerpt,
    where every other refusal is one line."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: echo\nbackend: python\nmodel: m:M\nname: other\n")
    code, err = run_cli(capsys, "--head", "127.0.0.1:1", "deploy", str(spec))
    assert code == 1
    assert err.splitlines() == [
        f"shoal: error: {spec} is not valid YAML: line 4, column 1: found the key 'name' twice "
        "(first at line 1), while reading a mapping at line 1"
    ]
    config = tmp_path / "shoal.yaml"
    config.write_text(f"log_level: info\nhead_port: {'9' * 5000}\n")
    code, err = run_cli(capsys, "up", "--state", str(tmp_path / "state"), "--config", str(config))
    assert code == 1 and not nothing_runs
    assert err.splitlines() == [
        f"shoal: error: cannot read config file {config}: line 2, column 12: "
        "an integer of 5000 characters, too long to read"
    ]


def test_a_data_file_that_is_not_utf8_or_never_ends_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a UnicodeDecodeError traceback; and ``--data @/dev/zero`` took memory until
    the machine had none. A file is read up to four times ``max_message_mb`` (here 1 MiB,
    so 4 MiB: a sparse file one byte over). No head listens at port 1: nothing is sent."""
    latin1 = tmp_path / "inputs.json"
    latin1.write_bytes(b'{"x": ["caf\xe9"]}')
    code, err = run_cli(capsys, "--head", "127.0.0.1:1", "predict", "echo", "--data", f"@{latin1}")
    assert code == 1
    assert err.splitlines() == [
        f"shoal: error: cannot read --data file {latin1}: not UTF-8 (byte 0xe9 at position 11)"
    ]
    # Before, a ValueError traceback: Python reads integers of at most 4,300 digits.
    code, err = run_cli(
        capsys, "--head", "127.0.0.1:1", "predict", "echo", "--data", f'{{"x": [{"9" * 5000}]}}'
    )
    assert code == 1
    assert err.splitlines() == [
        "shoal: error: --data is not valid JSON: Exceeds the limit (4300 digits) for integer string "
        "conversion: value has 5000 digits"
    ]
    monkeypatch.setenv("SHOAL_MAX_MESSAGE_MB", "1")
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.truncate(4 * 1024 * 1024 + 1)
    code, err = run_cli(capsys, "--head", "127.0.0.1:1", "predict", "echo", "--data", f"@{big}")
    assert code == 1
    assert err.splitlines() == [
        f"shoal: error: cannot read --data file {big}: over the limit of 4194304 bytes"
    ]

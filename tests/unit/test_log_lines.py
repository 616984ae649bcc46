"""A log line is one line: what a client sent (a request id, a model name) cannot start a
line of its own in shoal's text log, nor reach a terminal as an escape sequence."""

from __future__ import annotations

import json
import logging

import pytest

from shoal import logs


@pytest.fixture(autouse=True)
def _restore_root() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_clients_newlines_and_escapes_are_written_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("text", "INFO", component="scheduler")
    forged = "g1\n09:00:00 ERROR shoal.head: FORGED\r\x1b[31mred\u2028\x85end"
    logging.getLogger("shoal.dataplane").info("request %s to %s (%s) refused", forged, "echo", "grpc")
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.endswith(
        "scheduler INFO shoal.dataplane: request g1\\n09:00:00 ERROR shoal.head: FORGED\\r\\x1b[31mred"
        "\\u2028\\x85end to echo (grpc) refused\n"
    )


def test_a_message_without_control_characters_and_a_traceback_are_as_they_were(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.setup("text", "INFO")
    log = logging.getLogger("shoal.test")
    log.info("plain %s\twith a tab", "text")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("INFO shoal.test: plain text\twith a tab")
    assert lines[1].endswith("ERROR shoal.test: failed")
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"


def test_json_lines_keep_the_text_exact(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("json", "INFO")
    logging.getLogger("shoal.test").info("id %s", "a\nb")
    [line] = capsys.readouterr().err.splitlines()
    assert json.loads(line)["msg"] == "id a\nb"


def test_an_exceptions_own_text_in_a_traceback_is_escaped_and_cut(capsys: pytest.CaptureFixture[str]) -> None:
    # A model's error often quotes its input: a client's newline started a forged line of
    # the log, its escape sequence reached a terminal, and a 2 MB input wrote 2 MB a request.
    logs.setup("text", "INFO")
    try:
        try:
            raise KeyError("inner\n09:00:00 ERROR shoal.head: FORGED")
        except KeyError as inner:
            raise ValueError("bad \x1b[31mred\r\n" + "x" * 5000) from inner
    except ValueError:
        logging.getLogger("shoal.replica").exception("request r1 failed")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("ERROR shoal.replica: request r1 failed")
    assert "KeyError: 'inner\\n09:00:00 ERROR shoal.head: FORGED'" in lines
    assert not any(line.startswith("09:00:00") for line in lines)
    last = lines[-1]
    assert last.startswith("ValueError: bad \\x1b[31mred\\r\\nxxx")
    extra = len("ValueError: bad \x1b[31mred\r\n") + 5000 - logs.EXCEPTION_TEXT_CHARS
    assert last.endswith(f"x... ({extra} more characters)")
    assert "\x1b" not in "".join(lines)


def test_json_tracebacks_are_cut_too(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("json", "INFO")
    try:
        raise ValueError("y" * 100_000)
    except ValueError:
        logging.getLogger("shoal.replica").exception("failed")
    [line] = capsys.readouterr().err.splitlines()
    exc = json.loads(line)["exc"]
    assert exc.startswith("Traceback (most recent call last):") and len(exc) < 3000
    assert exc.endswith(f"... ({100_000 + len('ValueError: ') - logs.EXCEPTION_TEXT_CHARS} more characters)")

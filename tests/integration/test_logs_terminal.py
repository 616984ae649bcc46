"""``shoal logs`` of a model that prints terminal escape sequences, against a real cluster:
to a terminal (a pty) its control characters come out escaped, so it cannot set the
operator's window title, clear the screen, plant a hyperlink or hide a line behind a
``\\r``; to a pipe its bytes come out as it wrote them, and bytes that are not UTF-8 crash
neither."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import subprocess
import sys
import time
import tty
from collections.abc import Mapping
from pathlib import Path

import pytest

from shoal.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(90)

MODEL = """\
import sys


class Loud:
    def __init__(self) -> None:
        print("title\\x1b]0;pwned\\x07\\x1b[2Jcleared", flush=True)
        print("link \\x1b]8;;http://evil\\x07click\\x1b]8;;\\x07", flush=True)
        print("rm -rf / is safe\\rall is well      ", flush=True)
        sys.stdout.buffer.write(b"bad \\xff\\xfe cut \\xe2\\x82 euro \\xe2\\x82\\xac c1 \\xc2\\x9b6n end\\n")
        sys.stdout.flush()

    def predict(self, inputs):
        return dict(inputs)
"""

WRITTEN = [  # the model's lines, as it wrote them
    b"title\x1b]0;pwned\x07\x1b[2Jcleared",
    b"link \x1b]8;;http://evil\x07click\x1b]8;;\x07",
    b"rm -rf / is safe\rall is well      ",
    b"bad \xff\xfe cut \xe2\x82 euro \xe2\x82\xac c1 \xc2\x9b6n end",
]
SHOWN = [  # the same on a terminal
    b"title\\x1b]0;pwned\\x07\\x1b[2Jcleared",
    b"link \\x1b]8;;http://evil\\x07click\\x1b]8;;\\x07",
    b"rm -rf / is safe\\rall is well      ",
    b"bad \\xff\\xfe cut \\xe2\\x82 euro \xe2\x82\xac c1 \\x9b6n end",
]


def on_a_terminal(
    argv: list[str], env: Mapping[str, str], until: bytes = b"", timeout_s: float = 30
) -> bytes:
    """What ``argv`` writes to its stdout when that is a terminal (a pty in raw mode: no
    newline translation), until it ends, or until ``until`` shows (then it is stopped)."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout_s
    try:
        while not (until and until in out) and time.monotonic() < deadline:
            if not select.select([master], [], [], 0.2)[0]:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the command closed its end
                break
            if not data:
                break
            out += data
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
        os.close(master)
    assert until in out, f"{until!r} not in {out!r}; stderr: {err.decode()[-2000:]}"
    if not until:
        assert proc.returncode == 0, err.decode()[-2000:]
    return out


def through_a_pipe(argv: list[str], env: Mapping[str, str]) -> bytes:
    """What ``argv`` writes to its stdout when that is a pipe (it must succeed)."""
    done = subprocess.run(argv, capture_output=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return done.stdout


def lines_of(out: bytes, prefix: bytes = b"") -> list[bytes]:
    """The model's lines in ``out`` (those after ``prefix``, which is cut)."""
    found = [line[len(prefix) :] for line in out.split(b"\n") if line.startswith(prefix)]
    return [line for line in found if line.startswith((b"title", b"link", b"rm -rf", b"bad"))]


async def test_a_model_s_escape_sequences_are_escaped_on_a_terminal_and_exact_in_a_pipe(
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "loud.py").write_text(MODEL)
    async with ProcessCluster(tmp_path / "cluster") as cluster:
        await cluster.deploy(
            {"name": "loud", "backend": "python", "model": "loud:Loud", "base_dir": str(models)}
        )
        [replica] = await cluster.wait_ready("loud", 1)
        rid = replica["id"]
        shoal = [sys.executable, "-m", "shoal.cli", "--head", cluster.head_address, "logs"]
        prefixed = f"{rid} | ".encode()

        # One replica, its log as a stream of bytes.
        shown = await asyncio.to_thread(on_a_terminal, [*shoal, rid], cluster.env)
        assert lines_of(shown) == SHOWN
        piped = await asyncio.to_thread(through_a_pipe, [*shoal, rid], cluster.env)
        assert lines_of(piped) == WRITTEN

        # The deployment: its replicas' lines merged, each prefixed. Before, to a pipe, the
        # bytes that are not UTF-8 came out as U+FFFD, and the \r ended a line.
        shown = await asyncio.to_thread(on_a_terminal, [*shoal, "loud"], cluster.env)
        assert lines_of(shown, prefixed) == SHOWN
        piped = await asyncio.to_thread(through_a_pipe, [*shoal, "loud"], cluster.env)
        assert lines_of(piped, prefixed) == WRITTEN

        # Followed: line by line, as they come.
        shown = await asyncio.to_thread(on_a_terminal, [*shoal, "loud", "-f"], cluster.env, until=b" end\n")
        assert lines_of(shown, prefixed) == SHOWN

        # Nothing of what the replicas wrote reached the terminal as a control character.
        assert b"\x1b" not in shown and b"\x07" not in shown and b"\r" not in shown


def test_the_head_s_log_file_is_escaped_on_a_terminal_too(tmp_path: Path) -> None:
    """``shoal logs head`` prints a file of this machine's state folder, which holds text that
    came from elsewhere (names, errors): the same rule, whether the file is read in one
    chunk or a character is cut between two."""
    from shoal.cli.processes import log_file

    path = log_file(str(tmp_path), "head")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"12:00:00 head INFO " + WRITTEN[0] + b" " + WRITTEN[3] + b"\n")
    argv = [sys.executable, "-m", "shoal.cli", "logs", "head", "--state", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    shown = on_a_terminal(argv, env)
    assert shown == b"12:00:00 head INFO " + SHOWN[0] + b" " + SHOWN[3] + b"\n"
    assert through_a_pipe(argv, env) == path.read_bytes()

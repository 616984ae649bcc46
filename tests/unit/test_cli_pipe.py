"""A CLI command whose reader goes away (``shoal status | head``) ends quietly with 141, as
a Unix tool killed by SIGPIPE does. Before, it ended with a BrokenPipeError traceback, two
runs in three."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(30)

PROGRAM = """
import argparse
from shoal.cli.common import run_command

def many_lines(args):
    for i in range(200_000):
        print("replica", i)
    return 0

run_command(argparse.Namespace(fn=many_lines))
"""


def test_a_closed_pipe_ends_the_command_quietly_with_141() -> None:
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(10)  # the reader takes a little, then goes away
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=20) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err

"""Shared fixtures: example models trained into a temporary folder, never committed."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

# anyio imports its modules on first use, and pytest compiles the modules of a plugin's
# distribution (anyio is one) through its assertion rewriter. Under CPython 3.11.7 that
# compile once raised "SystemError: AST constructor recursion depth mismatch" (CPython
# gh-106905) when the first file response imported anyio's file module inside a test's
# request; imported here, it is compiled once, before any test runs.
import anyio._core._fileio  # noqa: F401
import pytest

# The gRPC switches the shoal command runs with, for the servers tests start in this process
# too; before anything imports grpc (it reads them then).
import shoal.grpc_defaults  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def examples_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of examples/ with the digits model trained into it."""
    out = tmp_path_factory.mktemp("examples")
    for f in EXAMPLES.iterdir():
        if f.suffix in (".py", ".yaml"):
            shutil.copy(f, out / f.name)
    subprocess.run(
        [sys.executable, str(out / "train_digits.py"), str(out / "digits.joblib")],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never answers on them."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return  # closed: the test is over

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)
        for conn in held:
            conn.close()

"""Shared fixtures: example models trained into a temporary folder, never committed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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

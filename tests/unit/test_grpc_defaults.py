"""The gRPC switches the ``shoal`` command runs with (``shoal.grpc_defaults``): set before
grpc is imported (grpc reads ``GRPC_EXPERIMENTS`` then, and ignores later changes), and a
value the user set is kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shoal import grpc_defaults

pytestmark = pytest.mark.timeout(60)


def run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        timeout=50,
        env={**base, **env},
        check=True,
    )


def test_the_shoal_command_sets_grpc_experiments_before_grpc_is_imported() -> None:
    done = run("import os, shoal.cli; print(os.environ['GRPC_EXPERIMENTS'])")
    assert done.stdout.strip() == grpc_defaults.GRPC_EXPERIMENTS
    # -X importtime lists each module as its import completes; a package's own line comes
    # after its submodules'. grpc's first module must complete after the defaults were set.
    order = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line]
    assert "shoal.grpc_defaults" in order and "grpc" in order
    first_grpc = min(i for i, name in enumerate(order) if name == "grpc" or name.startswith("grpc."))
    assert order.index("shoal.grpc_defaults") < first_grpc


@pytest.mark.parametrize("value", ["", "fuse_filters"])
def test_a_value_the_user_set_is_kept(value: str) -> None:
    done = run("import os, shoal.cli; print(repr(os.environ['GRPC_EXPERIMENTS']))", GRPC_EXPERIMENTS=value)
    assert done.stdout.strip() == repr(value)

"""The committed gRPC modules are what the .proto sources generate, and shoal's copy of
Triton's protocol can live beside tritonclient's in one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_modules_are_current(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    generated = sorted((tmp_path / "shoal" / "proto").glob("*_pb2*"))
    assert len(generated) == 12  # 3 protos x (_pb2.py, .pyi, _grpc.py, _grpc.pyi)
    stale = [p.name for p in generated if p.read_text() != (ROOT / "shoal" / "proto" / p.name).read_text()]
    assert stale == [], f"run 'make protos' and commit: {stale}"


def test_shoal_and_tritonclient_protocol_modules_load_together() -> None:
    code = (
        "from shoal.proto import grpc_service_pb2 as ours\n"
        "import tritonclient.grpc\n"
        "from tritonclient.grpc import service_pb2 as theirs\n"
        "assert ours.ModelInferRequest.DESCRIPTOR is theirs.ModelInferRequest.DESCRIPTOR\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

"""Regenerate the Python modules for every .proto under shoal/proto/.

    python scripts/gen_protos.py            # write beside the .proto files
    python scripts/gen_protos.py --out DIR  # write under DIR (used by the test that
                                            # checks the committed modules are current)

Needs the dev extra (grpcio-tools, mypy-protobuf).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


PROTO_DIR = ROOT / "shoal" / "proto"
# Triton's protocol files keep their upstream names (package ``inference``): the
# descriptor pool then sees the same files tritonclient registers, instead of a
# clash on ``inference.*`` symbols when both are imported in one process.
UPSTREAM = ("grpc_service.proto", "model_config.proto")


def _protoc(include: Path, out: Path, files: list[str]) -> None:
    grpc_include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{include}",
        f"-I{grpc_include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generate(out: Path) -> list[Path]:
    protos = sorted(PROTO_DIR.glob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    # protoc finds the mypy plugins (protoc-gen-mypy, protoc-gen-mypy_grpc) on PATH: the venv's bin.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    ours = [str(p.relative_to(ROOT)) for p in protos if p.name not in UPSTREAM]
    _protoc(ROOT, out, ours)
    upstream_out = out / "shoal" / "proto"
    upstream_out.mkdir(parents=True, exist_ok=True)
    _protoc(PROTO_DIR, upstream_out, list(UPSTREAM))
    # Upstream-named modules import each other by bare name; make those imports absolute.
    for path in upstream_out.glob("*_pb2*.py*"):
        if path.name.split("_pb2")[0] + ".proto" not in UPSTREAM:
            continue
        text = path.read_text()
        fixed = re.sub(r"^import (\w+_pb2)\b", r"from shoal.proto import \1", text, flags=re.M)
        fixed = re.sub(r"^import (\w+_pb2) as ", r"from shoal.proto import \1 as ", fixed, flags=re.M)
        if fixed != text:
            path.write_text(fixed)
    return protos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT)
    args = parser.parse_args()
    for p in generate(args.out):
        print(f"generated {p.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

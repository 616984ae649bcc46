"""Regenerate the Python modules for every .proto under shoal/proto/.

    python scripts/gen_protos.py            # write beside the .proto files
    python scripts/gen_protos.py --out DIR  # write under DIR (used by the test that
                                            # checks the committed modules are current)

Needs the dev extra (grpcio-tools, mypy-protobuf).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def generate(out: Path) -> list[Path]:
    protos = sorted((ROOT / "shoal" / "proto").glob("*.proto"))
    rel = [str(p.relative_to(ROOT)) for p in protos]
    out.mkdir(parents=True, exist_ok=True)
    # protoc finds the mypy plugin (protoc-gen-mypy) on PATH: the venv's bin folder.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *rel,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return protos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT)
    args = parser.parse_args()
    for p in generate(args.out):
        print(f"generated {p.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

"""Install each peer into its own virtualenv under ``bench/.peers/``, reusing what is there.

    python bench/peers.py [ray mlserver pytriton perf-analyzer ...]    # default: all

A virtualenv counts as installed once its ``.installed`` stamp holds the same requirement
list; a changed list (or a failed install) reinstalls it. Nothing here touches the project's
own virtualenv. Installs run one after another: on two cores, parallel pip runs are no faster.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS = BENCH / ".peers"

# Pinned so that a rerun measures the same software; PEERS.md says why uvloop is capped.
REQUIREMENTS: dict[str, list[str]] = {
    "ray": ["ray[serve]==2.60.0", "scikit-learn", "joblib"],
    "mlserver": ["mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop<0.22", "scikit-learn", "joblib"],
    "pytriton": ["nvidia-pytriton==0.7.0", "scikit-learn", "joblib"],
}
PERF_ANALYZER = PEERS / "perf-analyzer" / "perf_analyzer"
INSTALL_PERF_ANALYZER = ROOT.parent / "shared" / "tools" / "install-perf-analyzer"


def base_python() -> str:
    """The interpreter that made the project's venv (so every venv runs the same CPython)."""
    cfg = ROOT / ".venv" / "pyvenv.cfg"
    if cfg.exists():
        for line in cfg.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home":
                for name in ("python3.11", "python3"):
                    exe = Path(value.strip()) / name
                    if exe.exists():
                        return str(exe)
    return sys.executable


def venv_python(name: str) -> Path:
    return PEERS / name / "bin" / "python"


def installed(name: str) -> bool:
    if name == "perf-analyzer":
        return PERF_ANALYZER.exists()
    stamp = PEERS / name / ".installed"
    return stamp.exists() and stamp.read_text() == "\n".join(REQUIREMENTS[name])


def install(name: str, log: Path | None = None) -> float:
    """Install one peer; returns the seconds it took (0 when it was already there)."""
    if installed(name):
        return 0.0
    start = time.monotonic()
    PEERS.mkdir(parents=True, exist_ok=True)
    out = open(log, "a") if log else None
    try:
        if name == "perf-analyzer":
            script = INSTALL_PERF_ANALYZER
            if not script.exists():
                raise SystemExit(f"{script} not found: perf_analyzer cannot be installed")
            subprocess.run(
                ["bash", str(script), str(PEERS / "perf-analyzer")], check=True, stdout=out, stderr=out
            )
        else:
            where = PEERS / name
            if where.exists():
                shutil.rmtree(where)
            subprocess.run([base_python(), "-m", "venv", str(where)], check=True, stdout=out, stderr=out)
            pip = [str(venv_python(name)), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            subprocess.run([*pip, *REQUIREMENTS[name]], check=True, stdout=out, stderr=out)
            (where / ".installed").write_text("\n".join(REQUIREMENTS[name]))
    finally:
        if out:
            out.close()
    return time.monotonic() - start


def versions(name: str) -> dict[str, str]:
    """The versions of a peer's main packages, for the results table."""
    if name == "perf-analyzer":
        if not PERF_ANALYZER.exists():
            return {}
        proc = subprocess.run([str(PERF_ANALYZER), "--version"], capture_output=True, text=True, timeout=30)
        text = (proc.stdout + proc.stderr).strip().splitlines()
        return {"perf_analyzer": text[0] if text else "?"}
    python = venv_python(name)
    if not python.exists():
        return {}
    wanted = {
        "ray": ["ray", "scikit-learn"],
        "mlserver": ["mlserver", "mlserver-sklearn", "uvloop", "scikit-learn"],
        "pytriton": ["nvidia-pytriton", "tritonclient", "scikit-learn"],
    }[name]
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([str(python), "-c", code, *wanted], capture_output=True, text=True, timeout=60)
    import json

    return dict(json.loads(proc.stdout)) if proc.returncode == 0 else {}


def main(argv: list[str]) -> int:
    known = [*REQUIREMENTS, "perf-analyzer"]
    parser = argparse.ArgumentParser(
        prog="bench/peers.py",
        description="Install the peers bench/run compares shoal with, each in its own venv.",
    )
    parser.add_argument("names", nargs="*", metavar="PEER", help=f"default: all ({', '.join(known)})")
    names = parser.parse_args(argv).names or known
    unknown = [n for n in names if n not in known]
    if unknown:  # not argparse's choices: with nargs="*" Python 3.11 refuses the empty default
        parser.error(f"unknown peer {', '.join(unknown)} (known: {', '.join(known)})")
    failed = []
    for name in names:
        print(f"peers: {name} ...", flush=True)
        try:
            took = install(name)
        except (subprocess.CalledProcessError, SystemExit) as err:
            print(f"peers: {name} FAILED: {err}", flush=True)
            failed.append(name)
            continue
        print(f"peers: {name} " + (f"installed in {took:.0f}s" if took else "already there"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    sys.exit(main(sys.argv[1:]))

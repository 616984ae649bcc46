"""How the suite starts, checks and stops each system, always on 127.0.0.1 with free ports.

A :class:`System` knows its command line, how to tell it is ready, which models answer each
workload in each of its variants, and which load tools can drive it. ``start`` returns a
:class:`Running` whose ``pids()`` is the whole process tree (for CPU and memory); ``stop``
ends that tree, politely first.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS = BENCH / ".peers"
PROJECT_PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
WORKLOADS = ("noop", "sklearn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return bool(r.status == 200)
    except (OSError, ValueError):
        return False


def grpc_live(address: str) -> bool:
    from shoal.errors import ShoalError
    from shoal.rpc.loadgen_client import grpc_server_live

    try:
        return bool(asyncio.run(grpc_server_live(address, timeout_s=2.0)))
    except ShoalError:
        return False


@dataclass
class Running:
    """A started system."""

    system: System
    work: Path
    log: Path
    grpc: str = ""
    http: str = ""
    started_s: float = 0.0
    oip_grpc: bool = True
    oip_http: bool = True
    notes: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] = field(init=False, repr=False)
    known: set[int] = field(default_factory=set)

    def pids(self) -> list[int]:
        try:
            root = psutil.Process(self.proc.pid)
            found = [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.Error:
            found = []
        self.known.update(found)
        return found

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class System:
    """One system under test and how to run it."""

    id: str
    label: str
    variants: dict[str, dict[str, str]]
    """variant -> workload -> model name."""
    tools: tuple[str, ...]
    """Load tools that can drive it: pa-grpc, pa-http, h2load, wrk, bench-grpc, bench-native."""
    venv: str = ""
    stop_signal: int = signal.SIGINT
    start_timeout_s: float = 90.0
    needs: tuple[str, ...] = ()
    """Peer virtualenvs (bench/peers.py names) that must be installed."""
    notes: tuple[str, ...] = ()
    """What is not measured for this system, and why (shown in the results)."""
    command: Callable[[System, Path, bool], tuple[list[str], dict[str, str], Running]] | None = None
    ready: Callable[[Running], bool] | None = None
    after_start: Callable[[Running], None] | None = None

    def python(self) -> str:
        return str(PEERS / self.venv / "bin" / "python") if self.venv else PROJECT_PYTHON

    def start(self, work: Path, *, only_noop: bool = False) -> Running:
        """Start it in ``work`` (created); returns once ready. Raises RuntimeError if it is not."""
        assert self.command is not None and self.ready is not None
        work.mkdir(parents=True, exist_ok=True)
        argv, env, run = self.command(self, work, only_noop)
        run.notes.extend(self.notes)
        t0 = time.monotonic()
        with open(run.log, "wb") as out:
            run.proc = subprocess.Popen(
                argv,
                cwd=work,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                start_new_session=True,
            )
        deadline = t0 + self.start_timeout_s
        why = ""
        while True:
            try:
                if self.ready(run):
                    break
            except Exception as err:  # a half-started server can fail a check in any way
                why = f"{type(err).__name__}: {err}"
            run.pids()
            if run.proc.poll() is not None:
                stop(run)
                raise RuntimeError(f"{self.id} exited with {run.proc.returncode}:\n{run.log_tail()}")
            if time.monotonic() > deadline:
                stop(run)
                raise RuntimeError(
                    f"{self.id} not ready after {self.start_timeout_s:.0f}s ({why or 'no error'}):\n"
                    + run.log_tail()
                )
            time.sleep(0.25)
        run.started_s = round(time.monotonic() - t0, 1)
        run.pids()
        if self.after_start is not None:
            self.after_start(run)
        return run


def stop(run: Running, grace_s: float = 20.0) -> None:
    """Stop the system's whole tree: its own signal first, then SIGKILL for what is left."""
    run.pids()
    if run.proc.poll() is None:
        try:
            run.proc.send_signal(run.system.stop_signal)
            run.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    for pid in run.known:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
        except psutil.Error:
            pass
    if run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait(5)


# ---------------------------------------------------------------- models


def digits_model(python: str, work: Path) -> Path:
    """The digits LogisticRegression, trained by ``python`` (so its scikit-learn reads it)."""
    out = work / "digits.joblib"
    if not out.exists():
        subprocess.run(
            [python, str(ROOT / "examples" / "train_digits.py"), str(out)],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return out


# ---------------------------------------------------------------- floors


def _floor_grpc(s: System, work: Path, only_noop: bool) -> tuple[list[str], dict[str, str], Running]:
    port = free_port()
    argv = [s.python(), str(BENCH / "floors" / "grpc_echo.py"), "--port", str(port)]
    if not only_noop:
        argv += ["--sklearn", str(digits_model(s.python(), work))]
    return argv, {}, Running(s, work, work / "server.log", grpc=f"127.0.0.1:{port}")


def _floor_grpc_split(s: System, work: Path, only_noop: bool) -> tuple[list[str], dict[str, str], Running]:
    """The grpc.aio floor in as many processes as shoal's default ingress, laid out as those
    are (``floors/grpc_echo.py --processes``): the ceiling of any ingress of that shape here."""
    from shoal.config import Settings
    from shoal.scheduler.ingress import ingress_processes

    argv, env, run = _floor_grpc(s, work, only_noop)
    processes = ingress_processes(Settings())
    run.notes.append(
        f"{processes} processes sharing the port, each on a CPU of its own when there are as many"
    )
    return [*argv, "--processes", str(processes)], env, run


def _floor_http(s: System, work: Path, only_noop: bool) -> tuple[list[str], dict[str, str], Running]:
    port = free_port()
    argv = [s.python(), str(BENCH / "floors" / "starlette_json.py"), "--port", str(port)]
    if not only_noop:
        argv += ["--sklearn", str(digits_model(s.python(), work))]
    return argv, {}, Running(s, work, work / "server.log", http=f"127.0.0.1:{port}")


# ---------------------------------------------------------------- shoal

SHOAL_SPECS = {
    "noop": "name: {name}\nbackend: python\nmodel: 'echo:Echo'\n"
    "inputs: [{{name: x, datatype: FP32, shape: [-1, 16]}}]\n"
    "outputs: [{{name: x, datatype: FP32, shape: [-1, 16]}}]\n",
    # The label alone, as every peer here answers it (the backend's default adds
    # ``probabilities``, which costs a predict_proba per call that no peer pays).
    "sklearn": "name: {name}\nbackend: sklearn\nmodel: digits.joblib\n"
    "outputs: [{{name: label, datatype: INT64, shape: [-1]}}]\n",
}
SHOAL_BATCHING = "batching: {max_batch_size: 32, max_delay_ms: 1}\n"


def _shoal(s: System, work: Path, only_noop: bool) -> tuple[list[str], dict[str, str], Running]:
    shutil.copy(ROOT / "examples" / "echo.py", work / "echo.py")
    digits_model(s.python(), work)
    docs = []
    for variant, models in s.variants.items():
        for workload, name in models.items():
            if only_noop and (workload != "noop" or variant != "nobatch"):
                continue
            spec = SHOAL_SPECS[workload].format(name=name) + "replicas: 1\nresources: {cpus: 0.25}\n"
            docs.append(spec + (SHOAL_BATCHING if variant == "batch" else ""))
    (work / "deploy.yaml").write_text("---\n".join(docs))
    state = work / "state"
    if state.exists():
        shutil.rmtree(state)
    argv = [
        s.python(),
        "-m",
        "shoal.cli",
        "up",
        "--state",
        str(state),
        "--head-port",
        "0",
        "--dashboard-port",
        "0",
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--deploy",
        str(work / "deploy.yaml"),
    ]
    run = Running(s, work, work / "server.log")
    run.notes.append("one replica per deployment; batching: max_batch_size 32, max_delay_ms 1")
    return argv, {"SHOAL_HEAD": ""}, run


def _shoal_ready(run: Running) -> bool:
    endpoints = run.work / "state" / "endpoints.json"
    if "shoal is up" not in run.log.read_text(errors="replace") or not endpoints.exists():
        return False
    doc = json.loads(endpoints.read_text())
    run.grpc, run.http = doc["scheduler"], doc["scheduler_http"]
    from shoal.config import Settings
    from shoal.rpc.clients import ControlClient

    async def ready() -> bool:
        settings = Settings.load(file=None, flags={"head_address": doc["head"]})
        client = ControlClient(doc["head"], settings)
        try:
            status = (await client.status()).to_json()
        finally:
            await client.close()
        deps = status["deployments"]
        return bool(deps) and all(
            sum(r["state"] == "READY" for r in d["replicas"]) >= d["target_replicas"] for d in deps
        )

    return asyncio.run(ready())


def _shoal_after(run: Running) -> None:
    """Record whether the Open Inference Protocol ingress is there yet."""
    from shoal.errors import ShoalError
    from shoal.rpc.loadgen_client import grpc_server_live

    try:
        live = asyncio.run(grpc_server_live(run.grpc, timeout_s=3.0))
    except ShoalError:
        live = None
    run.oip_grpc = bool(live)
    run.oip_http = http_ok(f"http://{run.http}/v2/models/noop") if run.oip_grpc else False
    if not run.oip_grpc:
        run.notes.append("the OIP gRPC ingress answers UNIMPLEMENTED: only the native protocol was measured")


# ---------------------------------------------------------------- MLServer


def _mlserver(
    workers: int | None,
) -> Callable[[System, Path, bool], tuple[list[str], dict[str, str], Running]]:
    def command(s: System, work: Path, only_noop: bool) -> tuple[list[str], dict[str, str], Running]:
        repo = work / "models"
        if repo.exists():
            shutil.rmtree(repo)
        (repo / "noop").mkdir(parents=True)
        shutil.copy(BENCH / "servers" / "mlserver_noop.py", repo / "noop" / "mlserver_noop.py")
        (repo / "noop" / "model-settings.json").write_text(
            json.dumps({"name": "noop", "implementation": "mlserver_noop.NoopRuntime"})
        )
        if not only_noop:
            (repo / "sklearn").mkdir()
            shutil.copy(digits_model(s.python(), work), repo / "sklearn" / "model.joblib")
            (repo / "sklearn" / "model-settings.json").write_text(
                json.dumps(
                    {
                        "name": "sklearn",
                        "implementation": "mlserver_sklearn.SKLearnModel",
                        "parameters": {"uri": "./model.joblib"},
                    }
                )
            )
        http, grpc, metrics = free_port(), free_port(), free_port()
        settings = {"host": "127.0.0.1", "http_port": http, "grpc_port": grpc, "metrics_port": metrics}
        if workers is not None:
            settings["parallel_workers"] = workers
        (repo / "settings.json").write_text(json.dumps(settings))
        argv = [str(PEERS / "mlserver" / "bin" / "mlserver"), "start", str(repo)]
        run = Running(s, work, work / "server.log", grpc=f"127.0.0.1:{grpc}", http=f"127.0.0.1:{http}")
        run.oip_http = False  # no Triton binary extension: JSON only
        return argv, {}, run

    return command


def _mlserver_ready(run: Running) -> bool:
    models = [m for m in ("noop", "sklearn") if (run.work / "models" / m).exists()]
    return all(http_ok(f"http://{run.http}/v2/models/{m}/ready") for m in models)


# ---------------------------------------------------------------- PyTriton


def _pytriton(s: System, work: Path, only_noop: bool) -> tuple[list[str], dict[str, str], Running]:
    http, grpc, metrics = free_port(), free_port(), free_port()
    argv = [
        s.python(),
        str(BENCH / "servers" / "pytriton_app.py"),
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc),
        "--metrics-port",
        str(metrics),
        "--workspace",
        str(work / "workspace"),
    ]
    argv += ["--only-noop"] if only_noop else ["--sklearn", str(digits_model(s.python(), work))]
    # PyTriton's Python backend loads libpython: it must be the one of the venv's own interpreter.
    home = _venv_home(PEERS / "pytriton")
    env = {"LD_LIBRARY_PATH": f"{home.parent / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}".rstrip(":")}
    run = Running(s, work, work / "server.log", grpc=f"127.0.0.1:{grpc}", http=f"127.0.0.1:{http}")
    return argv, env, run


def _venv_home(venv: Path) -> Path:
    for line in (venv / "pyvenv.cfg").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home":
            return Path(value.strip())
    return Path(sys.base_prefix) / "bin"


def _pytriton_ready(run: Running) -> bool:
    return "pytriton ready" in run.log.read_text(errors="replace") and http_ok(
        f"http://{run.http}/v2/health/ready"
    )


# ---------------------------------------------------------------- Ray Serve


def _ray(s: System, work: Path, only_noop: bool) -> tuple[list[str], dict[str, str], Running]:
    http = free_port()
    argv = [s.python(), str(BENCH / "servers" / "ray_app.py"), "--http-port", str(http)]
    argv += ["--only-noop"] if only_noop else ["--sklearn", str(digits_model(s.python(), work))]
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        # Keeps Ray's own gRPC on loopback on Linux (PEERS.md).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    run = Running(s, work, work / "server.log", http=f"127.0.0.1:{http}")
    run.oip_grpc = run.oip_http = False
    run.notes.append(
        "HTTP only: V2 JSON bodies to a plain Serve deployment (Ray Serve's gRPC proxy needs user"
        " protos and an application header that perf_analyzer and h2load do not send); dashboard off"
    )
    return argv, env, run


def _ray_ready(run: Running) -> bool:
    return "ray ready" in run.log.read_text(errors="replace")


# ---------------------------------------------------------------- the list

NOBATCH = {"noop": "noop", "sklearn": "sklearn"}
MLSERVER_NOTES = (
    "no perf_analyzer (MLServer has no ModelConfig): h2load replays the gRPC request instead",
    "no binary-tensor HTTP (MLServer lacks Triton's binary extension): JSON through wrk only",
    "no dynamic batching variant (MLServer's adaptive batching was not configured)",
)
BATCH = {"noop": "noop_batch", "sklearn": "sklearn_batch"}

SYSTEMS: dict[str, System] = {
    s.id: s
    for s in [
        System(
            "floor-grpc",
            "bare grpc.aio (floor)",
            {"-": NOBATCH},
            ("pa-grpc", "h2load", "bench-grpc"),
            command=_floor_grpc,
            ready=lambda r: grpc_live(r.grpc),
            start_timeout_s=60,
        ),
        System(
            "floor-grpc-split",
            "bare grpc.aio, one process per ingress CPU (ceiling)",
            {"-": NOBATCH},
            ("pa-grpc",),
            command=_floor_grpc_split,
            ready=lambda r: grpc_live(r.grpc),
            start_timeout_s=60,
        ),
        System(
            "floor-http",
            "bare Starlette/uvicorn JSON (floor)",
            {"-": NOBATCH},
            ("wrk",),
            command=_floor_http,
            ready=lambda r: http_ok(f"http://{r.http}/v2/health/live"),
            start_timeout_s=60,
        ),
        System(
            "shoal",
            "shoal",
            {"nobatch": NOBATCH, "batch": BATCH},
            ("bench-native", "pa-grpc", "pa-http", "wrk"),
            stop_signal=signal.SIGTERM,
            command=_shoal,
            ready=_shoal_ready,
            after_start=_shoal_after,
            start_timeout_s=120,
        ),
        System(
            "mlserver",
            "MLServer, default workers",
            {"default": NOBATCH},
            ("h2load", "wrk"),
            venv="mlserver",
            needs=("mlserver",),
            notes=MLSERVER_NOTES,
            command=_mlserver(None),
            ready=_mlserver_ready,
            start_timeout_s=120,
        ),
        System(
            "mlserver-pw0",
            "MLServer, parallel_workers: 0",
            {"pw0": NOBATCH},
            ("h2load", "wrk"),
            venv="mlserver",
            needs=("mlserver",),
            notes=MLSERVER_NOTES,
            command=_mlserver(0),
            ready=_mlserver_ready,
            start_timeout_s=120,
        ),
        System(
            "pytriton",
            "Triton via PyTriton",
            {"nobatch": NOBATCH, "batch": BATCH},
            ("pa-grpc", "pa-http", "wrk"),
            venv="pytriton",
            needs=("pytriton",),
            command=_pytriton,
            ready=_pytriton_ready,
            start_timeout_s=180,
        ),
        System(
            "ray",
            "Ray Serve",
            {
                "default": NOBATCH,
                "mo64": {"noop": "noop_mo64", "sklearn": "sklearn_mo64"},
                "batch": BATCH,
            },
            ("wrk",),
            venv="ray",
            needs=("ray",),
            command=_ray,
            ready=_ray_ready,
            start_timeout_s=240,
        ),
    ]
}

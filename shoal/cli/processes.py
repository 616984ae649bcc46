"""The commands that run cluster processes: ``up``, ``head``, ``scheduler``; and ``down``.

Each process writes ``<state>/<role>.pid`` while it runs, so ``shoal down`` in another shell
can stop it, and copies its log to ``<state>/logs/<role>.log``, which ``shoal logs head``
and ``shoal logs scheduler`` read.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil

from shoal import aio, logs
from shoal.cli.common import add_head_flag, seconds, settings_of
from shoal.cli.deploy import applied, wait_for
from shoal.config import Settings
from shoal.core import triton_repo
from shoal.core.clock import sleep_or_event
from shoal.core.deploy_watch import DeployWatch
from shoal.core.model_dirs import check_deployable
from shoal.core.model_hash import with_model_hash
from shoal.core.spec import load_spec_file
from shoal.errors import FailedPrecondition

ROLES = ("up", "head", "scheduler")


# ---------------------------------------------------------------- flags


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", help="state folder (SQLite store, logs); default ./.shoal")
    p.add_argument("--config", help="YAML settings file")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--advertise-host", help="address other machines use to reach this one")
    p.add_argument(
        "--log-format", choices=["text", "json"], help="text lines (default) or one JSON object per line"
    )
    p.add_argument("--log-level", help="a logging level, any case (default INFO)")
    p.add_argument("--grace", type=float, help="seconds a shutdown may take (requests, then replicas)")
    p.add_argument("--tls-dir", help="certificate folder (shoal certs init): mutual TLS, HTTPS")
    p.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        help="allow a non-loopback --host without TLS (plaintext: a trusted network only)",
    )
    p.add_argument(
        "--allow-model-dir",
        action="append",
        dest="allowed_model_dirs",
        metavar="DIR",
        help="model code and files may come only from here (repeatable; default: anywhere)",
    )


# Settings whose flag has another name than the setting (for messages: Settings.load).
_CLUSTER_FLAG_NAMES = {"shutdown_grace_s": "--grace", "allowed_model_dirs": "--allow-model-dir"}


def _cluster_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "state_dir": args.state,
        "host": args.host,
        "advertise_host": args.advertise_host,
        "log_format": args.log_format,
        "log_level": args.log_level,
        "shutdown_grace_s": args.grace,
        "insecure": args.insecure,
        "allowed_model_dirs": args.allowed_model_dirs,
    }


def _add_head_flags(p: argparse.ArgumentParser) -> None:
    """The head's own settings, on the commands that run a head (up, head): a scheduler took
    ``--max-blob-mb`` too, and nothing there reads it."""
    p.add_argument(
        "--max-blob-mb",
        type=int,
        help="largest model file or folder the head takes from shoal deploy (default 10240)",
    )


def _add_scheduler_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grpc-port", type=int, help="gRPC ingress port (default 8001)")
    p.add_argument("--http-port", type=int, help="HTTP ingress port (default 8000)")
    p.add_argument("--cpus", type=float, help="CPUs offered to replicas (default: all it may use)")
    p.add_argument("--memory-mb", type=float, help="memory offered to replicas (default: all it may use)")
    p.add_argument("--gpus", type=float, help="GPUs offered to replicas (default: counted)")
    p.add_argument(
        "--max-replicas",
        type=int,
        help="replicas this scheduler runs at most (default: one per 128 MB offered, at most 100; "
        "0: no bound)",
    )
    p.add_argument(
        "--max-concurrent-starts",
        type=int,
        help="replica processes this scheduler starts at once; the others wait QUEUED "
        "(default: one per CPU offered, at least 4; 0: no bound)",
    )
    p.add_argument(
        "--scheduler-id",
        help="stable id for this scheduler (default: generated): letters, digits, '-', '_' and '.', "
        "at most 253 characters",
    )
    p.add_argument(
        "--ingress-workers",
        type=int,
        help="processes serving the inference ports together (default 0: one per CPU, at most 4)",
    )
    p.add_argument(
        "--model-repository",
        metavar="DIR",
        help="a Triton model repository: the OIP repository extension (index, load, unload) serves it; "
        "shoal up also deploys every model in it at start",
    )


def _scheduler_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "grpc_port": args.grpc_port,
        "http_port": args.http_port,
        "cpus": args.cpus,
        "memory_mb": args.memory_mb,
        "gpus": args.gpus,
        "max_replicas": args.max_replicas,
        "max_concurrent_starts": args.max_concurrent_starts,
        "scheduler_id": args.scheduler_id,
        "ingress_workers": args.ingress_workers,
        "model_repository": str(Path(args.model_repository).resolve()) if args.model_repository else None,
    }


# ---------------------------------------------------------------- pid and log files


def pid_file(state_dir: str | Path, role: str) -> Path:
    return Path(state_dir) / f"{role}.pid"


def log_file(state_dir: str | Path, role: str) -> Path:
    return Path(state_dir) / "logs" / f"{role}.log"


def running(path: Path) -> psutil.Process | None:
    """The live process a pid file names; None when there is none (or the pid was reused)."""
    try:
        doc = json.loads(path.read_text())
        proc = psutil.Process(int(doc["pid"]))
        # Same pid, same start: not another process that got the number later.
        if abs(proc.create_time() - float(doc["started"])) > 1.0 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        return None


CONFLICTS = {"up": ROLES, "head": ("up", "head"), "scheduler": ("up", "scheduler")}
"""The processes a role may not start beside on one state folder: ``shoal up`` runs a head and
a scheduler, and two schedulers on one folder share its ``scheduler_id`` (the head would take
them for one), two heads its SQLite store. A head and a scheduler may share one."""


@contextmanager
def _running_as(settings: Settings, role: str) -> Iterator[None]:
    """Write this process's pid file and copy the log to a file.

    Raises FailedPrecondition, before it writes anything, when a process of :data:`CONFLICTS`
    runs with this state folder, or when the folder cannot be made or written.
    """
    state = settings.state_dir
    for other_role in CONFLICTS[role]:
        other = running(pid_file(state, other_role))
        if other is not None:
            raise FailedPrecondition(
                f"shoal {other_role} already runs with state folder {state} (pid {other.pid}); "
                f"'shoal down --state {state}' stops it, or give this {role} a state folder of its own"
            )
    path = pid_file(state, role)
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise FailedPrecondition(f"state folder {state} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FailedPrecondition(f"cannot create state folder {state}: {err.strerror or err}") from None
    me = psutil.Process()
    try:
        path.write_text(json.dumps({"pid": me.pid, "started": me.create_time()}))
        handler = _log_to_file(log_file(state, role))
    except OSError as err:
        with suppress(OSError):
            path.unlink(missing_ok=True)
        raise FailedPrecondition(f"cannot write in state folder {state}: {err.strerror or err}") from None
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        current = running(path)
        if current is not None and current.pid == me.pid:
            path.unlink(missing_ok=True)


def _log_to_file(path: Path) -> logging.Handler:
    """What the process logs, also in ``path`` (rotated), formatted as on stderr. Its ingress
    workers append their lines to the same file (``shoal.logs.SharedFileHandler``)."""
    return logs.copy_to_file(path)


# ---------------------------------------------------------------- processes


def cmd_up(args: argparse.Namespace) -> int:
    from shoal.core.subreaper import become_subreaper
    from shoal.run import run_up
    from shoal.zygote import zygote

    settings = settings_of(
        args,
        {**_CLUSTER_FLAG_NAMES, "head_http_port": "--dashboard-port"},
        **_cluster_flags(args),
        **_scheduler_flags(args),
        max_blob_mb=args.max_blob_mb,
        head_port=args.head_port,
        head_http_port=args.dashboard_port,
    )
    # With their model files' hash, like shoal deploy: deploying the same file later is no change.
    specs = [with_model_hash(s) for f in args.deploy for s in load_spec_file(f)]
    if settings.model_repository:
        # Every model of the repository, or none: one that cannot be served stops shoal up here.
        specs += triton_repo.load_all(settings.model_repository)
    # And the head's checks of their code and files, before any is applied: one refused after
    # others were applied stopped shoal up with those in the store.
    for spec in specs:
        check_deployable(spec, settings.allowed_model_dirs, settings.model_uri_prefixes)
    logs.setup(settings.log_format, settings.log_level)

    async def on_ready(head: Any, scheduler: Any, tasks: Any) -> None:
        # Its own scheduler first, briefly: a head with nothing to adopt places at once, and
        # its first line said "echo 0/1 ready (no live scheduler)" 0.2 s before it had one.
        await sleep_or_event(scheduler.registered, settings.dead_after_s)
        before = (await head.status()).to_json()
        for spec in specs:
            # As shoal deploy says it (it said "updated" for a spec that changed nothing). No
            # rolling update to announce: the scheduler starts with no replica.
            print(f"deployment {spec.name} {applied(await head.apply(spec), rolls=False)}", flush=True)
        if head.desired:
            # Every deployment, those from an earlier run too: "all ready" must be the truth.
            watch = DeployWatch.after_apply(before, list(head.desired.values()))
            tasks.spawn(_up_progress(head, watch), "progress")
        endpoints = json.loads((Path(settings.state_dir) / "endpoints.json").read_text())
        web = "https" if settings.tls_dir else "http"
        print(
            "\nshoal is up\n"
            f"  head (SHOAL_HEAD):   {endpoints['head']}\n"
            f"  dashboard, REST API: {web}://{endpoints['head_http']}/  (API docs: /docs)\n"
            f"  inference gRPC:      {endpoints['scheduler']}\n"
            f"  inference HTTP:      {web}://{endpoints['scheduler_http']}/v2\n"
            f"  logs:                shoal logs DEPLOYMENT|head|scheduler\n"
            f"  try:                 shoal status\n"
            "Ctrl-C (or 'shoal down' in another shell) stops the cluster and every replica.\n",
            flush=True,
        )

    # Forked before the event loop starts: replicas and ingress workers share its modules' pages.
    # What a replica killed with SIGKILL detached comes to us (shoal.scheduler.child.end_adopted).
    become_subreaper()
    with _running_as(settings, "up"), zygote() as forks:
        aio.run(run_up(settings, on_ready, forks), settings.event_loop)
    return 0


async def _up_progress(head: Any, watch: DeployWatch, timeout_s: float = 300.0) -> None:
    """``shoal up``: show the example deployments coming up, then whether they all are."""

    async def read_status() -> dict[str, Any]:
        status: dict[str, Any] = (await head.status()).to_json()
        return status

    await wait_for(read_status, watch, timeout_s, ready="all deployments ready")


def cmd_head(args: argparse.Namespace) -> int:
    from shoal.run import run_head

    settings = settings_of(
        args,
        {**_CLUSTER_FLAG_NAMES, "head_port": "--port", "head_http_port": "--http-port"},
        **_cluster_flags(args),
        max_blob_mb=args.max_blob_mb,
        head_port=args.port,
        head_http_port=args.http_port,
        store=args.store,
        store_tls_dir=args.store_tls_dir,
    )
    logs.setup(settings.log_format, settings.log_level, component="head")
    with _running_as(settings, "head"):
        aio.run(run_head(settings), settings.event_loop)
    return 0


def cmd_scheduler(args: argparse.Namespace) -> int:
    from shoal.core.subreaper import become_subreaper
    from shoal.run import run_scheduler
    from shoal.zygote import zygote

    settings = settings_of(args, _CLUSTER_FLAG_NAMES, **_cluster_flags(args), **_scheduler_flags(args))
    logs.setup(settings.log_format, settings.log_level, component="scheduler")
    become_subreaper()  # as shoal up
    with _running_as(settings, "scheduler"), zygote() as forks:
        aio.run(run_scheduler(settings, forks), settings.event_loop)
    return 0


# ---------------------------------------------------------------- down


def cmd_down(args: argparse.Namespace) -> int:
    """SIGTERM every shoal process that runs with this state folder, and wait for each to exit."""
    settings = settings_of(args)
    if getattr(args, "head", None):
        _check_down_head(args.head, Path(settings.state_dir))
    found = [(role, proc) for role in ROLES if (proc := running(pid_file(settings.state_dir, role)))]
    for role in ROLES:
        path = pid_file(settings.state_dir, role)
        if path.exists() and all(r != role for r, _ in found):
            path.unlink(missing_ok=True)  # its process is gone: a crash, or kill -9
    if not found:
        print(f"nothing to stop: no shoal up, head or scheduler runs with state folder {settings.state_dir}")
        return 0
    timeout = args.timeout if args.timeout is not None else settings.shutdown_grace_s + 15
    for role, proc in found:
        print(f"stopping shoal {role} (pid {proc.pid})", flush=True)
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.AccessDenied:
            raise FailedPrecondition(f"not allowed to stop pid {proc.pid} (another user's process)") from None
        except psutil.NoSuchProcess:
            pass  # it ended meanwhile
    alive = _wait_gone([p for _, p in found], timeout)
    if alive:
        pids = " ".join(str(p.pid) for p in alive)
        raise FailedPrecondition(f"still running after {timeout:g}s: pid {pids} ('kill -9 {pids}' forces it)")
    print("stopped")
    return 0


def _check_down_head(head: str, state_dir: Path) -> None:
    """``shoal down --head H`` stops the cluster of ``state_dir`` only if H is its head: down
    works by state folder, and stopping this machine's cluster for another head's address
    would stop the wrong one."""
    try:
        ours = str(json.loads((state_dir / "endpoints.json").read_text())["head"])
    except (OSError, ValueError, KeyError, TypeError):
        ours = ""
    if ours and _same_address(ours, head):
        return
    where = f"whose head is at {ours}" if ours else "where no head has run"
    raise FailedPrecondition(
        f"shoal down stops what runs on this machine with a state folder ({state_dir.resolve()}, "
        f"{where}), not the head at --head {head}: run 'shoal down --state DIR' on that head's "
        "machine, or leave --head out"
    )


def _same_address(a: str, b: str) -> bool:
    """``host:port`` strings naming one listener, loopback names taken as one."""
    loopback = {"127.0.0.1", "localhost", "::1", "[::1]", "0.0.0.0"}
    (ha, _, pa), (hb, _, pb) = a.rpartition(":"), b.rpartition(":")
    return pa == pb and (ha == hb or (ha in loopback and hb in loopback))


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until ``procs`` have exited; those still running after ``timeout_s``. An exited process
    that its parent has not reaped yet (a zombie) counts as gone: it runs nothing."""

    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout_s
    while (left := [p for p in procs if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("up", help="run a head and one scheduler in the foreground")
    _add_cluster_flags(p)
    _add_head_flags(p)
    _add_scheduler_flags(p)
    p.add_argument("--head-port", type=int, help="head gRPC port (default 8470)")
    p.add_argument("--dashboard-port", type=int, help="head HTTP port: dashboard, REST API (default 8471)")
    p.add_argument("--deploy", action="append", default=[], metavar="FILE", help="deploy this spec once up")
    p.set_defaults(fn=cmd_up)

    p = sub.add_parser("head", help="run a head node")
    _add_cluster_flags(p)
    _add_head_flags(p)
    p.add_argument("--port", type=int, help="gRPC port (default 8470)")
    p.add_argument("--http-port", type=int, help="HTTP port (default 8471)")
    p.add_argument(
        "--store",
        metavar="URL",
        help="state store: etcd://HOST:PORT[,HOST:PORT...] (heads on one etcd stand by for each other); "
        "default SQLite in the state folder",
    )
    p.add_argument("--store-tls-dir", metavar="DIR", help="TLS to etcd: ca.crt [client.crt client.key]")
    p.set_defaults(fn=cmd_head)

    p = sub.add_parser("scheduler", help="run a scheduler that joins a head")
    add_head_flag(p)
    _add_cluster_flags(p)
    _add_scheduler_flags(p)
    p.set_defaults(fn=cmd_scheduler)

    p = sub.add_parser(
        "down",
        help="stop the shoal up, head or scheduler running with this state folder",
        description="Send SIGTERM to the shoal up, head and scheduler processes started with this state "
        "folder (from any shell), then wait until they have drained their replicas and exited.",
    )
    p.add_argument("--state", help="state folder (default ./.shoal)")
    p.add_argument("--timeout", type=seconds, help="seconds to wait (default: shutdown_grace_s + 15)")
    # Taken, as by every command, so that 'shoal down --head H' is not a usage error; down
    # finds its processes by state folder, and says so (cmd_down).
    add_head_flag(p)
    p.set_defaults(fn=cmd_down)

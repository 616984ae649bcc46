"""``python -m shoal.replica_main``: one replica process, started by a scheduler.

The replica's composition root (``shoal.run`` is the head's and scheduler's): it wires
``shoal.replica.process.ReplicaProcess`` to its gRPC server and its link to the scheduler,
so ``shoal.replica`` and ``shoal.rpc`` do not import each other. Kept apart from
``shoal.run`` so a replica does not import the head, Starlette or uvicorn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from shoal import aio, logs
from shoal.config import Settings
from shoal.core import affinity
from shoal.core.alive import process_runs
from shoal.core.spec import DeploymentSpec, parse_spec_json
from shoal.core.subreaper import OrphanReaper, become_subreaper, end_descendants
from shoal.errors import ShoalError
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.replica.process import ReplicaProcess
from shoal.rpc.auth import REPLICA_RULES, AuthInterceptor
from shoal.rpc.clients import NativeClient, ReplicaSchedulerLink
from shoal.rpc.hop import HopServer, socket_path
from shoal.rpc.replica_service import ReplicaService
from shoal.rpc.server import bind, new_server
from shoal.rpc.tls import server_credentials

log = logging.getLogger("shoal.replica")


def first_for_the_oom_killer(adj: int) -> None:
    """Set this process's ``oom_score_adj`` to ``adj`` (setting ``replica_oom_score_adj``).

    Why: a replica is held to its ``memory_mb`` once per ping interval, and a model that
    allocates faster than that met the kernel's OOM killer first, which picked by size alone
    and could pick the scheduler, taking every replica on the machine with it. With 1000 (the
    default) the kernel picks among the replicas, the largest first, and the scheduler
    replaces the one it killed, as for any replica that dies."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(adj))
    except OSError as err:  # not Linux, or a value below the scheduler's without CAP_SYS_RESOURCE
        log.info("oom_score_adj not set to %d (setting replica_oom_score_adj): %s", adj, err)


ORPHAN_SCAN_S = 2.0
"""How often a replica looks for exited processes its model detached (one ``waitid``)."""


async def reap_orphans(after_s: float) -> None:
    """Reap, for good, the exited processes its model detached (setting
    ``replica_reap_orphans_s``; ``shoal.core.subreaper.OrphanReaper``). 0: none."""
    if after_s <= 0:
        return
    reaper = OrphanReaper(after_s)
    every = min(ORPHAN_SCAN_S, after_s / 2)
    said = False
    while True:
        await asyncio.sleep(every)
        count = reaper.scan(time.monotonic())
        if count and not said:
            said = True
            log.info(
                "reaped %d process(es) its model had detached, %gs after they exited (setting "
                "replica_reap_orphans_s); the next are reaped without a word",
                count,
                after_s,
            )


async def run_replica(
    settings: Settings,
    replica_id: str,
    scheduler: str,
    spec: DeploymentSpec,
    scheduler_pid: int = 0,
    stopping_file: str = "",
) -> int:
    """One replica process: load the model, serve the scheduler, report, drain on the way out.
    ``stopping_file`` (when given) is created once it stops of its own accord (asked to,
    NACKed, orphaned): its scheduler tells so an exit with status 0 that the model made
    (``os._exit(0)``, a library's ``exit(0)``), which it counts as a crash."""
    link = ReplicaSchedulerLink(scheduler, settings)
    # Other deployments, for a model that calls them: through this machine's scheduler.
    caller = NativeClient(scheduler, settings)
    replica = ReplicaProcess(
        replica_id, spec, settings, link, caller=caller, scheduler_runs=process_runs(scheduler_pid)
    )

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, replica.request_stop)
    # asyncio.to_thread and run_in_executor(None, ...) (a model's load, an async model's own
    # calls): threads started by the loop's, which its scheduler may pin to one CPU
    # (replica_pin_loop); they run on every CPU.
    loop.set_default_executor(ThreadPoolExecutor(initializer=affinity.free_thread))

    # Only the scheduler (its certificate, with TLS) may call a replica.
    server = new_server(settings, [AuthInterceptor(REPLICA_RULES, tls=bool(settings.tls_dir))])
    service = ReplicaService(replica)
    pbg.add_ReplicaServicer_to_server(service, server)
    port = bind(server, settings.host, 0, server_credentials(settings, "replica"))
    await server.start()
    address = f"{settings.advertised}:{port}"
    # The local hop: this machine's scheduler sends requests over a Unix socket (shoal.rpc.hop).
    hop = None
    if settings.data_plane == "socket" and settings.hop_dir:
        hop = HopServer(
            socket_path(settings.hop_dir, address),
            service.outcome,
            settings.max_message_bytes,
            begin=service.begin,
        )
        await hop.start()
    # The devices its scheduler gave it (shoal.scheduler.gpus); unset: it manages no GPU.
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    log.info(
        "replica %s of %s listening on %s (pid %d%s)",
        replica_id,
        spec.name,
        address,
        os.getpid(),
        "" if gpus is None else f", GPUs {gpus or 'none'}",
    )
    code = 0
    reaping = asyncio.create_task(reap_orphans(settings.replica_reap_orphans_s))
    try:
        await replica.load()
        await replica.run(address, os.getpid())
        log.info("replica %s stopping: %s", replica_id, replica.exit_reason or "asked to stop")
        if stopping_file:
            try:
                with open(stopping_file, "w") as f:
                    f.write(replica.exit_reason or "asked to stop")
            except OSError as err:
                log.warning("could not write %s: %s", stopping_file, err)
    except ShoalError as err:
        # The user's traceback (the cause of a load error) belongs in the replica's log.
        log.error("replica %s failed: %s", replica_id, err, exc_info=err.__cause__ and err)
        code = 1
    finally:
        reaping.cancel()
        await replica.drain()
        if hop is not None:
            await hop.stop()
        await server.stop(grace=1.0)
        await link.close()
        await caller.close()
    return code


def main() -> None:
    affinity.release()  # started by a pinned ingress thread: free to run on any CPU again
    parser = argparse.ArgumentParser(prog="python -m shoal.replica_main", description=__doc__)
    parser.add_argument("--replica-id", required=True)
    parser.add_argument("--scheduler", required=True, help="the scheduler's gRPC address")
    parser.add_argument("--spec-file", required=True)
    parser.add_argument("--settings-json", default="{}")
    parser.add_argument(
        "--scheduler-pid", type=int, default=0, help="the scheduler's process on this machine (0: unknown)"
    )
    parser.add_argument("--stopping-file", default="", help="created when it stops of its own accord")
    args = parser.parse_args()
    settings = Settings.load(env={}, flags=json.loads(args.settings_json))
    logs.setup(settings.log_format, settings.log_level, component=f"replica {args.replica_id}")
    first_for_the_oom_killer(settings.replica_oom_score_adj)
    # What its model detaches (setsid, a daemon forked twice) stays among its descendants,
    # for end_descendants (shoal.core.subreaper).
    become_subreaper()
    try:
        with open(args.spec_file) as f:
            spec = parse_spec_json(f.read())
        replica = run_replica(
            settings, args.replica_id, args.scheduler, spec, args.scheduler_pid, args.stopping_file
        )
        sys.exit(aio.run(replica, settings.event_loop))
    finally:
        # However it ends (drained, failed, orphaned): what its model started ends with it.
        # Before, a process the model had detached from its process group ran on.
        if ended := end_descendants():
            log.info("ended %d processes its model had started", ended)


if __name__ == "__main__":
    main()

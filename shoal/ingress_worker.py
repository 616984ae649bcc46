"""``python -m shoal.ingress_worker``: one ingress worker process of a scheduler.

Started by the scheduler (``shoal.run.IngressWorkers``) with its settings, control
address and ids in the ``SHOAL_INGRESS_WORKER`` environment variable (JSON); not a
command for users. The worker's composition root, apart from ``shoal.run`` so that a
worker does not import the head, the store clients or the blob service: it started in
about half the time and holds less memory (``docs/architecture.md``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
from contextlib import AsyncExitStack
from typing import Any

from shoal import aio, certs, logs
from shoal.config import Settings
from shoal.core import affinity
from shoal.core.alive import process_runs
from shoal.http.scheduler import refuse_when_full, scheduler_app, shutdown_parser
from shoal.http.server import HttpLimits, HttpServer
from shoal.proto import grpc_service_pb2_grpc as oipg
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.auth import SCHEDULER_RULES, AuthInterceptor
from shoal.rpc.clients import GrpcReplicaClient
from shoal.rpc.inference_service import InferenceService
from shoal.rpc.ingress import IngressLink
from shoal.rpc.repository import GrpcDeployer
from shoal.rpc.scheduler_service import NativeService
from shoal.rpc.server import bind, new_server
from shoal.rpc.tls import server_credentials
from shoal.scheduler.ingress import IngressNode, IngressWorker
from shoal.scheduler.repository import ModelRepository

log = logging.getLogger("shoal.ingress")


def tls_files(settings: Settings, role: str) -> certs.Files | None:
    return certs.files(settings.tls_dir, role) if settings.tls_dir else None


def repository_of(
    settings: Settings, head_address: str, node: IngressNode, stack: AsyncExitStack
) -> ModelRepository | None:
    """The Triton repository the scheduler's repository extension serves (``--model-repository``);
    None without one. Its channel to the head closes with ``stack``."""
    if not settings.model_repository:
        return None
    deployer = GrpcDeployer(head_address, settings)
    stack.push_async_callback(deployer.close)
    return ModelRepository(
        settings.model_repository, node.catalog, deployer, tokens_exist=node.inference_auth.tokens_exist
    )


def settings_doc(settings: Settings) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def settings_from_doc(doc: dict[str, Any]) -> Settings:
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in doc.items() if k in fields
    }
    return Settings(**values)


async def run_ingress_worker(
    settings: Settings, control: str, worker_id: str, sid: str, main_pid: int = 0
) -> None:
    """One ingress worker process: serves the shared inference ports until its main
    process (``main_pid``, 0: not known) goes away (or SIGTERM)."""
    link = IngressLink(control, settings, worker_id, os.getpid())
    worker = IngressWorker(
        settings, sid, link, lambda addr: GrpcReplicaClient(addr, settings), process_runs(main_pid)
    )
    guard = AuthInterceptor(SCHEDULER_RULES, tls=bool(settings.tls_dir))
    server = new_server(
        settings,
        [guard],
        reuse_port=True,
        budget=worker.dataplane.inflight,
        refused=lambda model, err: worker.dataplane.refused(model, "", "grpc", err),
    )
    pbg.add_SchedulerServicer_to_server(NativeService(worker), server)
    closing = AsyncExitStack()
    repository = repository_of(settings, settings.head_address, worker, closing)
    oipg.add_GRPCInferenceServiceServicer_to_server(
        InferenceService(worker.dataplane, worker.inference_auth, settings, repository), server
    )
    bind(server, settings.host, settings.grpc_port, server_credentials(settings, "scheduler"))
    tls = tls_files(settings, "scheduler")

    async def metrics_page() -> tuple[bytes, str]:
        await worker.refresh()  # so the page the main process renders has this worker's latest
        return await link.metrics()

    http = HttpServer(
        scheduler_app(worker, metrics_page, repository),
        settings.host,
        settings.http_port,
        tls,
        reuse_port=True,
        limits=HttpLimits.of(settings),
        refuse=refuse_when_full(worker),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Its scheduler stops it (SIGTERM) before the replicas drain: it refuses new requests and
    # answers those it admitted, then exits. Ctrl-C in a terminal, and SIGHUP when it
    # closes, reach every process of the group, the workers too: before, they stopped at
    # once, and the requests they held failed while the scheduler still drained.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    await server.start()
    await http.start()
    try:
        async with asyncio.TaskGroup() as tasks:
            running = tasks.create_task(worker.run())
            stopping = tasks.create_task(stop.wait())
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done():
                # Its table still comes (``running``): the replicas stay until these are answered.
                log.info("ingress worker %s: refusing new requests, finishing those admitted", worker_id)
                await worker.router.drain(settings.shutdown_grace_s)
            running.cancel()
            stopping.cancel()
    finally:
        await http.stop()
        await server.stop(1.0)
        shutdown_parser()
        await worker.aclose()
        await closing.aclose()


def main() -> None:
    doc = json.loads(os.environ["SHOAL_INGRESS_WORKER"])
    settings = settings_from_doc(doc["settings"])
    logs.setup(settings.log_format, settings.log_level, component="ingress")
    if doc.get("log_file"):
        # Its scheduler's log file (<state>/logs/up.log or scheduler.log), appended to with it.
        try:
            logs.copy_to_file(doc["log_file"])
        except OSError as err:
            log.warning("logging to stderr only: cannot write %s: %s", doc["log_file"], err.strerror or err)
    affinity.release()  # started by a pinned thread: back on every CPU first
    if settings.ingress_pin_cpus:
        # Before gRPC starts its threads: they run where the thread that starts them does.
        affinity.pin_ingress(doc.get("index", 0), doc.get("processes", 1))
    aio.run(
        run_ingress_worker(
            settings, doc["control"], doc["worker_id"], doc["scheduler_id"], doc.get("main_pid", 0)
        ),
        settings.event_loop,
    )


if __name__ == "__main__":
    main()

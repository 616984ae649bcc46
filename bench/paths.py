"""shoal's own CPU per request, without gRPC's server and without other processes: the
Python paths of one noop request, measured in one process on one event loop.

Why: on the shared two-core machines a throughput A/B moves by 10-30% from one minute to
the next (steal, other tenants), so a change worth 3% of a request's CPU cannot be seen in
``bench/run``. The CPU time of a fixed piece of work done in one thread can: it moves by a
few percent. This measures three paths, each ``--requests`` times per round, rounds in
turn, and prints the median CPU microseconds per request (``time.process_time``):

* ``replica``: what a replica does with one task from the local hop, without the socket:
  ``pb.Task`` parsed, ``ReplicaService.begin`` (checks, the batcher's idle path, the noop
  model inline, the answer encoded), the outcome serialized.
* ``ingress``: what a scheduler's ingress does with one OIP ``ModelInfer`` without gRPC's
  server: the request parsed, ``InferenceService.ModelInfer`` through the data plane and
  the router to a replica client that frames the task and parses an outcome as the local
  hop's client does, but answers at once; the response serialized.
* ``hop``: both, joined by the real local hop (``shoal.rpc.hop``, a Unix socket) in the same
  process, ``--concurrency`` requests in flight: the two paths above plus the socket's
  reads, writes and wake-ups on both sides.

Not part of ``make test``::

    .venv/bin/python bench/paths.py [--requests 20000] [--rounds 5] [--only hop]

The figures are what shoal's Python costs a request on top of the gRPC server that receives
it (``bench/floors/grpc_echo.py`` is that server alone, measured under load by
``bench/cpu_profile.py``); they add up to less than the CPU a request costs across processes
under load, where context switches and cache misses come on top.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shoal import aio  # noqa: E402 - the checkout's shoal, whatever is installed
from shoal.config import Settings  # noqa: E402
from shoal.core.payload import Tensors  # noqa: E402
from shoal.core.spec import DeploymentSpec, parse_spec  # noqa: E402
from shoal.proto import grpc_service_pb2 as oip  # noqa: E402
from shoal.proto import shoal_pb2 as pb  # noqa: E402
from shoal.replica.process import READY, ReplicaProcess  # noqa: E402
from shoal.rpc import codec  # noqa: E402
from shoal.rpc.clients import GrpcReplicaClient  # noqa: E402
from shoal.rpc.hop import HopServer, hop_dir, socket_path  # noqa: E402
from shoal.rpc.inference_service import InferenceService  # noqa: E402
from shoal.rpc.replica_service import ReplicaService  # noqa: E402
from shoal.rpc.wire import Framed  # noqa: E402
from shoal.scheduler.node import SchedulerNode  # noqa: E402
from shoal.scheduler.router import Router  # noqa: E402
from shoal.types import HeadLink  # noqa: E402

ADDRESS = "127.0.0.1:1"  # the replica's; nothing connects to it (the hop socket is named after it)
TENSOR = [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]


class _Link:
    """The replica's scheduler, which always agrees."""

    async def register(self, replica_id: str, address: str, pid: int) -> tuple[bool, float]:
        return True, 60.0

    async def health(self, replica_id: str, state: str, in_flight: int, queued: int) -> bool:
        return True


class _Context:
    """What the servicer uses of ``grpc.aio.ServicerContext``."""

    async def abort(self, code: Any, message: str) -> None:
        raise RuntimeError(f"{code}: {message}")

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


class _AtOnce:
    """A replica client that frames each task and parses an outcome as the local hop's
    client does (``GrpcReplicaClient.push``), answering at once with the inputs."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def push(
        self,
        request_id: str,
        inputs: Tensors,
        timeout_s: float,
        *,
        model_id: str = "",
        classify: Mapping[str, int] | None = None,
    ) -> Tensors:
        task = pb.Task(request_id=request_id, timeout_s=timeout_s, model_id=model_id, tag=1)
        if classify:
            task.classification.update(classify)
        codec.fill(task.inputs, inputs)
        task.SerializeToString()
        outcome = pb.TaskOutcome(request_id=request_id, tag=1)
        codec.fill(outcome.outputs, inputs)
        return codec.from_pb(pb.TaskOutcome.FromString(outcome.SerializeToString()).outputs)

    async def aclose(self) -> None:
        pass

    async def close(self) -> None:
        pass


def _spec(work: Path) -> DeploymentSpec:
    (work / "echo.py").write_text((ROOT / "examples" / "echo.py").read_text())
    doc = {"name": "noop", "backend": "python", "model": "echo:Echo", "base_dir": str(work)}
    return parse_spec({**doc, "inputs": TENSOR, "outputs": TENSOR})


def _request() -> bytes:
    request = oip.ModelInferRequest(model_name="noop", id="42")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(bytes(64))
    return request.SerializeToString()


async def _replica(work: Path, settings: Settings) -> tuple[ReplicaProcess, ReplicaService]:
    replica = ReplicaProcess("noop-000001", _spec(work), settings, cast(Any, _Link()))
    await replica.load()
    replica.state = READY
    return replica, ReplicaService(replica)


def _ingress(settings: Settings, spec: DeploymentSpec, clients: Callable[[str], Any]) -> InferenceService:
    router = Router("s1", settings, clients)
    node = SchedulerNode(settings, "s1", cast(HeadLink, None), clients, router=router)
    node.registered.set()
    router.add("noop-000001", spec, ADDRESS, "s1")
    # Revision 1, as the head's routing table says of a deployed model's replicas (without
    # one, every answer would count the deployment's serving versions to name its own).
    router.handles("noop")[0].revision = 1
    return InferenceService(node.dataplane, node.inference_auth, node.settings)


async def _per_request(one: Callable[[], Awaitable[None]], requests: int, concurrency: int) -> float:
    """CPU microseconds per request of ``requests`` calls of ``one``, ``concurrency`` at a time."""
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - started) / requests * 1e6


async def measure(paths: list[str], requests: int, rounds: int, concurrency: int) -> dict[str, list[float]]:
    work = Path(tempfile.mkdtemp(prefix="shoal-paths-"))
    settings = Settings(data_plane="socket", hop_dir=str(hop_dir(work / "state")))
    replica, service = await _replica(work, settings)
    raw_task = pb.Task(
        request_id="42~0123456789ab",
        tag=7,
        timeout_s=5.0,
        inputs=[pb.Tensor(name="x", datatype="FP32", shape=[1, 16], data=bytes(64))],
    ).SerializeToString()

    def reply(outcome: pb.TaskOutcome | Framed) -> None:
        if not isinstance(outcome, Framed):
            outcome.SerializeToString()

    async def replica_one() -> None:
        future = service.begin(pb.Task.FromString(raw_task), reply, True)
        if future is not None:
            await future

    raw = _request()
    context = _Context()
    at_once = _ingress(settings, replica.spec, _AtOnce)

    async def ingress_one() -> None:
        (await at_once.ModelInfer(oip.ModelInferRequest.FromString(raw), context)).SerializeToString()

    server = HopServer(
        socket_path(settings.hop_dir, ADDRESS),
        service.outcome,
        settings.max_message_bytes,
        begin=service.begin,
    )
    await server.start()
    clients: dict[str, GrpcReplicaClient] = {}
    over_hop = _ingress(
        settings, replica.spec, lambda a: clients.setdefault(a, GrpcReplicaClient(a, settings))
    )

    async def hop_one() -> None:
        (await over_hop.ModelInfer(oip.ModelInferRequest.FromString(raw), context)).SerializeToString()

    runs = {
        "replica": (replica_one, 1),
        "ingress": (ingress_one, 1),
        "hop": (hop_one, concurrency),
    }
    out: dict[str, list[float]] = {p: [] for p in paths}
    try:
        for one, c in (runs[p] for p in paths):  # warm up: the model goes inline after a few calls
            await _per_request(one, 2000, c)
        for _ in range(rounds):
            for p in paths:
                one, c = runs[p]
                out[p].append(await _per_request(one, requests, c))
    finally:
        await server.stop()
        for client in clients.values():
            await client.close()
        await replica.drain()
    return out


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--requests", type=int, default=20000)
    args.add_argument("--rounds", type=int, default=5)
    args.add_argument("--concurrency", type=int, default=32, help="requests in flight on the hop path")
    args.add_argument("--only", choices=["replica", "ingress", "hop"], action="append")
    opts = args.parse_args()
    paths = opts.only or ["replica", "ingress", "hop"]
    results = aio.run(measure(paths, opts.requests, opts.rounds, opts.concurrency))
    for path, values in results.items():
        spread = ", ".join(f"{v:.1f}" for v in values)
        median = statistics.median(values)
        print(f"{path:8s} {median:6.1f} us/request (median of {len(values)} rounds: {spread})")


if __name__ == "__main__":
    main()

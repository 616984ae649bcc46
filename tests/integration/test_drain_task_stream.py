"""A replica that drains answers the requests it took, refuses those that arrive after with
ReplicaGone (retried elsewhere, and nothing new sent to it), and ends its task streams once
it has stopped, so a scheduler does not open another to a replica on its way out. Real gRPC
on 127.0.0.1, port 0, a real ``ReplicaProcess`` in this process.

Seen in ``test_chaos_suite.py::test_rolling_update``: a draining replica on another
scheduler took requests until it stopped, refused the next as a plain Unavailable, and its
stream stayed open until the server's grace cut it; the router retried the refused request
on that same replica (still in its table), on a new stream to a process that was exiting,
and the request was lost."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc.aio
import numpy as np
import pytest

from shoal.config import Settings
from shoal.core import payload
from shoal.core.spec import parse_spec
from shoal.errors import ReplicaGone
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.replica.process import ReplicaProcess
from shoal.rpc.clients import GrpcReplicaClient
from shoal.rpc.replica_service import ReplicaService
from shoal.testing.wait import until
from shoal.types import GenerateRequest

pytestmark = pytest.mark.timeout(20)

# A module name of its own: tests that share a worker process share sys.modules, and a
# ``slow_model`` another test had loaded (one that answers at once) was taken for this one,
# so the request was never seen running. The model holds each request until the test
# releases it, rather than for a time the test must catch it within.
MODULE = "drain_gate_model"
MODEL = """
import asyncio

started = asyncio.Event()
release = asyncio.Event()

class Gate:
    async def predict(self, inputs):
        started.set()
        await release.wait()
        return {"y": inputs["x"] * 2}
"""

X = payload.from_arrays({"x": np.ones((1, 2), np.float32)})


class Link:
    """A scheduler that acknowledges everything."""

    async def register(self, replica_id: str, address: str, pid: int) -> tuple[bool, float]:
        return True, 0.05

    async def health(self, replica_id: str, state: str, in_flight: int, queued: int) -> bool:
        return True


async def test_a_draining_replica_answers_what_it_took_refuses_the_rest_and_ends_its_stream(
    tmp_path: Path,
) -> None:
    (tmp_path / f"{MODULE}.py").write_text(MODEL)
    sys.modules.pop(MODULE, None)
    spec = parse_spec(
        {"name": "slow", "backend": "python", "model": f"{MODULE}:Gate", "base_dir": str(tmp_path)}
    )
    replica = ReplicaProcess("slow-000001", spec, Settings(), Link())
    await replica.load()
    gate = sys.modules[MODULE]
    runner = asyncio.create_task(replica.run("127.0.0.1:1", 1))
    await until(lambda: replica.state == "READY", "registration")
    server = grpc.aio.server()
    pbg.add_ReplicaServicer_to_server(ReplicaService(replica), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = GrpcReplicaClient(f"127.0.0.1:{port}", Settings(data_plane="stream"))
    try:
        taken = asyncio.create_task(client.push("r1", X, 5.0))
        await asyncio.wait_for(gate.started.wait(), 10)  # r1 runs on the replica
        assert replica.in_flight == 1
        replica.request_stop(grace_s=5.0)
        await runner
        drained = asyncio.create_task(replica.drain())

        with pytest.raises(ReplicaGone, match="DRAINING"):
            await client.push("r2", X, 5.0)  # on the same stream, after the drain began
        gate.release.set()
        y = payload.to_arrays(await taken)["y"]
        np.testing.assert_array_equal(y, np.full((1, 2), 2.0, np.float32))
        await asyncio.wait_for(drained, 5.0)

        # Stopped: the replica ended the stream; nothing new goes there, on it or a new one.
        with pytest.raises(ReplicaGone, match="stopping"):
            await asyncio.wait_for(client.push("r3", X, 5.0), 5.0)
        with pytest.raises(ReplicaGone, match="stopping"):
            await asyncio.wait_for(client.push("r4", X, 5.0), 5.0)
    finally:
        await client.close()
        await server.stop(0)
        if not runner.done():
            runner.cancel()


async def serve(replica: ReplicaProcess) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pbg.add_ReplicaServicer_to_server(ReplicaService(replica), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_a_draining_replica_refuses_a_unary_push_as_going(tmp_path: Path) -> None:
    # data_plane: unary (one PushTask call a request) has no TaskOutcome to say it: the
    # refusal's trailing metadata does, so the router retires the replica there too.
    model = "class Echo:\n    def predict(self, x):\n        return x\n"
    (tmp_path / "drain_unary_model.py").write_text(model)
    sys.modules.pop("drain_unary_model", None)
    spec = parse_spec(
        {"name": "echo", "backend": "python", "model": "drain_unary_model:Echo", "base_dir": str(tmp_path)}
    )
    replica = ReplicaProcess("echo-000001", spec, Settings(), Link())
    await replica.load()
    runner = asyncio.create_task(replica.run("127.0.0.1:1", 1))
    await until(lambda: replica.state == "READY", "registration")
    server, address = await serve(replica)
    client = GrpcReplicaClient(address, Settings(data_plane="unary"))
    try:
        assert payload.to_arrays(await client.push("r1", X, 5.0))["x"].shape == (1, 2)
        replica.request_stop(grace_s=5.0)
        await runner
        with pytest.raises(ReplicaGone, match=r"DRAINING|STOPPED"):
            await client.push("r2", X, 5.0)
    finally:
        await client.close()
        await server.stop(0)
        if not runner.done():
            runner.cancel()


async def test_a_draining_replica_finishes_its_generation_and_refuses_a_new_one_as_going(
    tmp_path: Path,
) -> None:
    # A generation started on a replica on its way out could be cut by its grace; it went
    # there (the replica took generations while draining), and once it had stopped, the
    # refusal spent one of the request's attempts. Now a new one is refused as going.
    (tmp_path / "lm").mkdir()
    spec = parse_spec(
        {
            "name": "lm",
            "backend": "vllm",
            "model": "lm",
            "base_dir": str(tmp_path),
            "options": {"vllm_module": "shoal.testing.fake_vllm", "token_delay_s": 0.05},
        }
    )
    replica = ReplicaProcess("lm-000001", spec, Settings(), Link())
    await replica.load()
    runner = asyncio.create_task(replica.run("127.0.0.1:1", 1))
    await until(lambda: replica.state == "READY", "registration")
    server, address = await serve(replica)
    client = GrpcReplicaClient(address, Settings())
    words = "one two three four five six"
    try:
        first = client.generate("g1", GenerateRequest(prompt=words, max_tokens=16, stream=True), 10.0)
        chunk = await anext(first)  # g1 runs
        replica.request_stop(grace_s=5.0)
        await runner
        with pytest.raises(ReplicaGone, match="DRAINING"):
            await anext(client.generate("g2", GenerateRequest(prompt="a b", max_tokens=4), 5.0))
        text = chunk.text + "".join([c.text async for c in first])
        assert text.split() == words.split()  # the one it took ends whole
    finally:
        await client.close()
        await server.stop(0)
        if not runner.done():
            runner.cancel()

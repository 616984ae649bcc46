"""The Python API (``shoal.connect``, ``shoal.AsyncClient``, ``@shoal.deployment``) against a
real cluster: deploy a spec and a decorated class, status, scale, infer sync and async, delete,
and errors that say what went wrong; and the README's Python API example, run as written."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import shoal
from shoal.core.spec import parse_spec
from shoal.decorator import load_target
from shoal.errors import FailedPrecondition, NotFound, ShoalError, Unavailable
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc import codec
from shoal.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]

APP = """\
import numpy as np

import shoal


@shoal.deployment(
    name="triple", resources={"cpus": 0.1}, inputs=[{"name": "x", "datatype": "INT32", "shape": [-1, -1]}]
)
class Triple:
    def predict(self, inputs):
        return {"y": inputs["x"] * 3}
"""


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[ProcessCluster]:
    async with ProcessCluster(tmp_path / "cluster") as c:
        yield c


def readme_example() -> str:
    section = (ROOT / "README.md").read_text().split("\n## The Python API\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return str(code)


async def test_the_api_deploys_scales_infers_and_deletes(cluster: ProcessCluster, tmp_path: Path) -> None:
    folder = tmp_path / "app"
    folder.mkdir()
    module = f"shoal_api_{uuid.uuid4().hex[:8]}"  # imports are cached per process: a fresh name
    (folder / f"{module}.py").write_text(APP)
    spec_of_class = load_target(f"{folder / module}.py:Triple")
    assert (spec_of_class.name, spec_of_class.model, spec_of_class.base_dir) == (
        "triple",
        f"{module}:Triple",
        str(folder.resolve()),
    )
    echo = {
        "name": "echo",
        "backend": "python",
        "model": "echo:Echo",
        "base_dir": str(ROOT / "examples"),
        "resources": {"cpus": 0.1},
    }
    async with shoal.AsyncClient(cluster.head_address) as c:
        applied = await c.deploy(echo)  # returns once READY
        assert applied.created and applied.name == "echo"
        cls = sys.modules[module].Triple
        assert (await c.deploy(cls)).created
        status = await c.status()
        assert {d.name: d.ready_replicas for d in status.deployments} == {"echo": 1, "triple": 1}

        # Inference: typed by the spec's declared inputs (INT32 here), async and sync.
        out = await c.handle("triple").infer({"x": [[1, 2]]})
        assert out["y"].dtype == np.int32 and out["y"].tolist() == [[3, 6]]
        x = np.arange(16, dtype=np.float32).reshape(1, 16)
        reply = await c.handle("echo").request({"x": x})
        assert np.array_equal(reply.outputs["x"], x) and reply.replica_id

        # The synchronous client, called from inside a running loop (as in Jupyter).
        with shoal.connect(cluster.head_address) as sync:
            assert sync.handle("echo").infer({"x": x})["x"].tolist() == x.tolist()
            assert (await sync.handle("triple").ainfer({"x": [[2]]}))["y"].tolist() == [[6]]
            sync.scale("echo", 2)
            assert sync.status().deployment("echo").target_replicas == 2  # type: ignore[union-attr]

        await cluster.wait_ready("echo", 2)
        await c.delete("triple")
        assert (await c.status()).deployment("triple") is None

        # Errors: ShoalError subclasses that name the problem.
        with pytest.raises(NotFound, match="no deployment or traffic route named 'triple'"):
            await c.handle("triple").infer({"x": [[1]]})
        with pytest.raises(NotFound, match="nope"):
            await c.scale("nope", 1)
        # An autoscaled deployment's count is the autoscaler's (min 0: nothing starts).
        await c.apply(
            parse_spec({**echo, "name": "auto", "autoscaling": {"min_replicas": 0, "max_replicas": 2}})
        )
        with pytest.raises(
            FailedPrecondition, match="autoscaler sets its replica count between min_replicas 0"
        ):
            await c.scale("auto", 7)
        await c.delete("auto")
        with pytest.raises(NotFound, match="nope"):
            await c.delete("nope")
        with pytest.raises(ShoalError, match="ragged"):
            await c.handle("echo").infer({"x": [[1, 2], [3]]})

    await run_the_readme_example(cluster, tmp_path)

    # A scheduler that is gone: the handle tries the next live one.
    async with shoal.AsyncClient(cluster.head_address) as c:
        handle = c.handle("echo", scheduler="127.0.0.1:1")
        with pytest.raises(Unavailable):
            await handle.infer({"x": x})


async def test_the_head_that_does_not_answer_is_unavailable() -> None:
    async with shoal.AsyncClient("127.0.0.1:1") as c:
        with pytest.raises(Unavailable):
            await c.status()


async def run_the_readme_example(cluster: ProcessCluster, tmp_path: Path) -> None:
    """The README's Python API example, run as written (with this cluster's head address)."""
    app = tmp_path / "app.py"
    app.write_text(readme_example().replace("127.0.0.1:8470", cluster.head_address))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(app),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()[-3000:]
    lines = out.decode().splitlines()
    assert lines[0].startswith("Applied(name='doubler'") and "created=True" in lines[0]
    assert lines[1:] == ["{'y': array([[2., 4.]], dtype=float32)}", "1"]
    assert [d["name"] for d in (await cluster.status())["deployments"]] == ["echo"]  # doubler deleted


class _DeadlineScheduler(pbg.SchedulerServicer):
    """A scheduler's SendRequest that answers with the seconds its call had left."""

    async def SendRequest(self, request: pb.InferRequest, context: Any) -> pb.InferReply:
        reply = pb.InferReply(replica_id="deadline")
        codec.fill_arrays(reply.outputs, {"left": np.array([context.time_remaining()], dtype=np.float64)})
        return reply


async def test_a_handle_waits_as_long_as_the_deployment_s_timeout(cluster: ProcessCluster) -> None:
    """A call without a timeout gets the deployment's ``timeout_s`` from the scheduler, so the
    client must wait that long too: it used to give up after 65 s whatever the deployment said."""
    server = grpc.aio.server()
    scheduler = _DeadlineScheduler()  # type: ignore[abstract]  # the calls it does not serve answer UNIMPLEMENTED
    pbg.add_SchedulerServicer_to_server(scheduler, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    echo = {"name": "patient", "backend": "python", "model": "echo:Echo", "base_dir": str(ROOT / "examples")}
    try:
        async with shoal.AsyncClient(cluster.head_address) as c:
            await c.deploy({**echo, "resources": {"cpus": 0.1}, "timeout_s": 600})
            handle = c.handle("patient", scheduler=f"127.0.0.1:{port}")
            [left] = (await handle.infer({"x": [[1.0]]}))["left"]
            assert left == pytest.approx(605, abs=1)  # the deployment's 600 s and 5 for the answer
            [left] = (await handle.infer({"x": [[1.0]]}, timeout_s=2))["left"]
            assert left == pytest.approx(7, abs=1)
    finally:
        await server.stop(None)


async def test_a_fresh_handle_called_at_once_asks_the_head_once(
    cluster: ProcessCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, each caller of a fresh handle sent its own GetStatus to the head: 64
    coroutines sent 64; 64 threads sent 31 (those that came after the first answer used
    it). They now share the first look-up, from threads and from coroutines alike."""
    from shoal.rpc import clients

    calls = 0
    status = clients.ControlClient.status

    async def counted(self: clients.ControlClient, only: Any = None) -> Any:
        nonlocal calls
        calls += 1
        return await status(self, only)

    monkeypatch.setattr(clients.ControlClient, "status", counted)
    echo = {"name": "echo", "backend": "python", "model": "echo:Echo", "base_dir": str(ROOT / "examples")}
    await cluster.deploy({**echo, "resources": {"cpus": 0.1}})
    await cluster.wait_ready("echo", 1)
    x = np.arange(16, dtype=np.float32).reshape(1, 16)

    def from_threads(address: str) -> list[Any]:
        with shoal.connect(address) as c:
            handle = c.handle("echo")
            barrier = threading.Barrier(64)

            def call() -> Any:
                barrier.wait()
                return handle.infer({"x": x})["x"]

            with concurrent.futures.ThreadPoolExecutor(64) as pool:
                return list(pool.map(lambda _: call(), range(64)))

    calls = 0
    outputs = await asyncio.to_thread(from_threads, cluster.head_address)
    assert calls == 1 and len(outputs) == 64 and all(np.array_equal(o, x) for o in outputs)

    async with shoal.AsyncClient(cluster.head_address) as c:
        handle = c.handle("echo")
        calls = 0
        replies = await asyncio.gather(*(handle.infer({"x": x}) for _ in range(64)))
    assert calls == 1 and all(np.array_equal(r["x"], x) for r in replies)

"""Backpressure and deadlines at the Open Inference Protocol ingress, on a real cluster.

One replica that takes 300 ms per request, one request at a time
(``max_ongoing_requests: 1``), at most 4 waiting (``max_queued_requests: 4``): a flood
is answered at once with 503 / RESOURCE_EXHAUSTED past the bound while the admitted
requests complete, and a request whose timeout is shorter than the model's work gets
504 / DEADLINE_EXCEEDED without harming the replica.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
from tritonclient.utils import InferenceServerException

from shoal.testing.cluster import ProcessCluster

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio(loop_scope="module")]

DELAY_S = 0.3
QUEUE = 4
FLOOD = 40
TENSORS = [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(
    tmp_path_factory: pytest.TempPathFactory, examples_dir: Path
) -> AsyncIterator[ProcessCluster]:
    async with ProcessCluster(tmp_path_factory.mktemp("backpressure")) as c:
        await c.deploy(
            {
                "name": "slow",
                "backend": "python",
                "model": "echo:Echo",
                "base_dir": str(examples_dir),
                "options": {"delay_ms": DELAY_S * 1000},
                "resources": {"cpus": 0.1},
                "max_ongoing_requests": 1,
                "max_queued_requests": QUEUE,
                "inputs": TENSORS,
                "outputs": TENSORS,
            }
        )
        await c.wait_ready("slow", 1)
        yield c


@pytest_asyncio.fixture(loop_scope="module")
async def grpc_client(cluster: ProcessCluster) -> AsyncIterator[tgrpc_aio.InferenceServerClient]:
    client = tgrpc_aio.InferenceServerClient(cluster.scheduler_address())
    try:
        yield client
    finally:
        await client.close()


def grpc_input() -> tgrpc.InferInput:
    inp = tgrpc.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.array([[1, 2, 3, 4]], np.float32))
    return inp


async def timed(call: Awaitable[str]) -> tuple[str, float]:
    """``call``'s outcome and when it came, in seconds from now."""
    started = time.monotonic()
    outcome = await call
    return outcome, time.monotonic() - started


def check_flood(results: list[tuple[str, float]], ok: str, overloaded: str) -> None:
    outcomes = [o for o, _ in results]
    assert set(outcomes) <= {ok, overloaded}, outcomes
    admitted = [t for o, t in results if o == ok]
    refused = [t for o, t in results if o == overloaded]
    # One running and QUEUE waiting get in; a slot that frees up meanwhile may take one more.
    assert QUEUE + 1 <= len(admitted) <= QUEUE + 3, outcomes
    # Refusals come at once, long before the admitted requests are through.
    assert max(refused) < min(1.0, max(admitted) / 2), (refused, admitted)
    assert max(admitted) >= (QUEUE + 1) * DELAY_S * 0.9


async def test_http_flood_beyond_the_queue_is_503_at_once(cluster: ProcessCluster) -> None:
    limits = httpx.Limits(max_connections=FLOOD)
    async with httpx.AsyncClient(
        base_url=f"http://{cluster.http_address()}", timeout=30, limits=limits
    ) as http:
        await http.get("/v2/health/live")  # open one connection before the flood
        messages: list[str] = []

        async def one() -> str:
            r = await http.post("/v2/models/slow/infer", json=BODY)
            if r.status_code == 503:
                messages.append(r.json()["error"])
            elif r.status_code == 200:
                assert r.json()["outputs"][0]["data"] == [1, 2, 3, 4]
            return str(r.status_code)

        results = await asyncio.gather(*(timed(one()) for _ in range(FLOOD)))
    check_flood(results, "200", "503")
    assert all("max_queued_requests=4" in m for m in messages), messages[:3]


async def test_grpc_flood_beyond_the_queue_is_resource_exhausted_at_once(
    grpc_client: tgrpc_aio.InferenceServerClient,
) -> None:
    assert await grpc_client.is_model_ready("slow")

    async def one() -> str:
        try:
            result = await grpc_client.infer("slow", [grpc_input()])
        except InferenceServerException as err:
            assert "at capacity" in err.message()
            return str(err.status())
        np.testing.assert_array_equal(result.as_numpy("x"), [[1, 2, 3, 4]])
        return "OK"

    results = await asyncio.gather(*(timed(one()) for _ in range(FLOOD)))
    check_flood(results, "OK", "StatusCode.RESOURCE_EXHAUSTED")


async def test_timeout_shorter_than_the_model_is_504_and_the_replica_keeps_serving(
    cluster: ProcessCluster, grpc_client: tgrpc_aio.InferenceServerClient
) -> None:
    before = [r["id"] for r in await cluster.replicas("slow")]
    timeout_us = int(DELAY_S * 1e6 / 6)
    async with httpx.AsyncClient(base_url=f"http://{cluster.http_address()}", timeout=30) as http:
        started = time.monotonic()
        r = await http.post("/v2/models/slow/infer", json={**BODY, "parameters": {"timeout": timeout_us}})
        took = time.monotonic() - started
        assert r.status_code == 504, r.text
        assert "timed out" in r.json()["error"]
        assert took < DELAY_S, "the deadline, not the model, ends the request"

        # The protocol's timeout parameter (µs) over gRPC, and the call's own deadline.
        with pytest.raises(InferenceServerException) as err:
            await grpc_client.infer("slow", [grpc_input()], timeout=timeout_us)
        assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        with pytest.raises(InferenceServerException) as err:
            await grpc_client.infer("slow", [grpc_input()], client_timeout=DELAY_S / 6)
        assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"

        ok = await http.post("/v2/models/slow/infer", json=BODY)
        assert ok.status_code == 200, ok.text
        result = await grpc_client.infer("slow", [grpc_input()])
        np.testing.assert_array_equal(result.as_numpy("x"), [[1, 2, 3, 4]])
    replicas = await cluster.replicas("slow")
    assert [r["id"] for r in replicas] == before and replicas[0]["state"] == "READY"
    stats = (await grpc_client.get_inference_statistics("slow")).model_stats[0]
    assert stats.inference_stats.fail.count >= 3


COUNTING = """
import time
from pathlib import Path


class Counting:
    \"\"\"Echo, 0.6 s a call, one line in calls.txt per call it runs.\"\"\"

    def predict(self, inputs):
        with open(Path(__file__).with_name("calls.txt"), "a") as calls:
            calls.write("call\\n")
        time.sleep(0.6)
        return dict(inputs)
"""


async def test_requests_whose_clients_hang_up_are_dropped_in_the_router_and_the_replica(
    cluster: ProcessCluster, tmp_path: Path
) -> None:
    """Four REST clients of a model that runs one call at a time hang up while one call runs
    and three wait inside the replica: those three are dropped there (a ``cancel`` on the
    local hop), not computed for nobody. Before, the replica ran all four, and a client
    that came next waited for them (six such clients of a 2 s model: 11.5-13.5 s)."""
    (tmp_path / "counting.py").write_text(COUNTING)
    await cluster.deploy(
        {
            "name": "hangup",
            "backend": "python",
            "model": "counting:Counting",
            "base_dir": str(tmp_path),
            "resources": {"cpus": 0.1},
            "max_ongoing_requests": 4,
            "inputs": TENSORS,
            "outputs": TENSORS,
        }
    )
    await cluster.wait_ready("hangup", 1)
    body = json.dumps(BODY)
    head = (
        f"POST /v2/models/hangup/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    host, port = cluster.http_address().rsplit(":", 1)
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(4)]
    for _, writer in conns:
        writer.write(head)
        await writer.drain()
    calls = tmp_path / "calls.txt"
    async with asyncio.timeout(10):
        while not calls.exists():  # the first runs; the other three wait inside the replica
            await asyncio.sleep(0.02)
    for _, writer in conns:
        writer.close()
    async with httpx.AsyncClient(base_url=f"http://{cluster.http_address()}", timeout=30) as http:
        ok = await http.post("/v2/models/hangup/infer", json=BODY)
        assert ok.status_code == 200, ok.text
        metrics = (await http.get("/metrics")).text
    # The model ran the call that was running when its client left, and the next one.
    assert calls.read_text().count("call") == 2
    assert 'shoal_requests_total{deployment="hangup",outcome="cancelled"} 4.0' in metrics

"""Request bytes in flight are bounded per ingress process (``max_inflight_mb``,
shoal.core.budget): past the share a request waits for room, past twice it is refused
with RESOURCE_EXHAUSTED / 503 naming the setting, and small requests are never held back.
One budget for both transports: gRPC and HTTP requests wait in the same queue, each
before its message is parsed or its body read.

A real cluster: one ingress process with a 1 MB budget, an echo that takes 1 s a call,
and 700 KB requests, so one runs, one waits and the third is refused."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import httpx
import numpy as np
import pytest
import pytest_asyncio
import tritonclient.http as thttp
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpbg

from shoal.core import budget as budgets
from shoal.testing.cluster import ProcessCluster

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio(loop_scope="module")]

ROWS = 11_200  # x [11200, 16] FP32: 700 KB
SLOW_MS = 2000  # each call to "slow": long enough that the refusals below come while one runs


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(
    tmp_path_factory: pytest.TempPathFactory, examples_dir: Path
) -> AsyncIterator[ProcessCluster]:
    env = {"SHOAL_MAX_INFLIGHT_MB": "1", "SHOAL_INGRESS_WORKERS": "1", "SHOAL_MAX_MESSAGE_MB": "4"}
    async with ProcessCluster(tmp_path_factory.mktemp("inflight"), env=env) as c:
        await c.deploy(
            {
                "name": "slow",
                "backend": "python",
                "model": "echo:Echo",
                "base_dir": str(examples_dir),
                "options": {"delay_ms": SLOW_MS},
                "max_ongoing_requests": 8,
                "resources": {"cpus": 0.1},
            }
        )
        await c.deploy(
            {
                "name": "hurried",
                "backend": "python",
                "model": "echo:Echo",
                "base_dir": str(examples_dir),
                "timeout_s": 3,
                "resources": {"cpus": 0.1},
            }
        )
        await c.wait_ready("slow", 1)
        await c.wait_ready("hurried", 1)
        yield c


def request(rows: int, k: float) -> tpb.ModelInferRequest:
    req = tpb.ModelInferRequest(model_name="slow")
    req.inputs.add(name="x", datatype="FP32", shape=(rows, 16))
    req.raw_input_contents.append(np.full((rows, 16), k, np.float32).tobytes())
    return req


def binary_body(k: float) -> tuple[bytes, bytes]:
    """An OIP REST binary body of x [ROWS, 16] FP32: the JSON header, then the tensor."""
    data = np.full((ROWS, 16), k, np.float32).tobytes()
    entry = {
        "name": "x",
        "datatype": "FP32",
        "shape": [ROWS, 16],
        "parameters": {"binary_data_size": len(data)},
    }
    return json.dumps({"inputs": [entry]}).encode(), data


async def test_one_runs_one_waits_one_is_refused_small_ones_pass(cluster: ProcessCluster) -> None:
    async with grpc.aio.insecure_channel(
        cluster.scheduler_address(), options=[("grpc.max_send_message_length", 8 << 20)]
    ) as channel:
        stub = tpbg.GRPCInferenceServiceStub(channel)
        before = (await stub.ModelStatistics(tpb.ModelStatisticsRequest(name="slow"))).model_stats[0]

        def over_http() -> np.ndarray:
            client = thttp.InferenceServerClient(cluster.http_address(), network_timeout=30)
            try:
                inp = thttp.InferInput("x", [ROWS, 16], "FP32")
                inp.set_data_from_numpy(np.full((ROWS, 16), 2.0, np.float32), binary_data=True)
                out = client.infer("slow", [inp]).as_numpy("x")
                assert isinstance(out, np.ndarray)
                return out
            finally:
                client.close()

        started = time.monotonic()
        first = asyncio.ensure_future(stub.ModelInfer(request(ROWS, 1.0), timeout=30))
        await asyncio.sleep(0.5)  # first holds 700 KB of the 1 MB
        second = asyncio.create_task(asyncio.to_thread(over_http))  # no room: waits
        await asyncio.sleep(0.5)
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # the queue for room is full
            await stub.ModelInfer(request(ROWS, 3.0), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_inflight_mb" in (refused.value.details() or "")
        # Over HTTP too, before the body is read (and drained after, so the client gets it).
        header, data = binary_body(5.0)
        async with httpx.AsyncClient(timeout=30) as client:
            reply = await client.post(
                f"http://{cluster.http_address()}/v2/models/slow/infer",
                content=header + data,
                headers={"Inference-Header-Content-Length": str(len(header))},
            )
        assert reply.status_code == 503 and "max_inflight_mb" in reply.json()["error"]
        # Refused at once, not after waiting for room: the first request still runs. (A
        # wall-clock bound here failed on a loaded machine, and left its requests in flight
        # for the next test.)
        assert not first.done() and not second.done(), "refused at once, not after a wait"
        # A small request is not held back behind the waiting one (it still queues for the
        # replica, which runs one call at a time).
        small = await stub.ModelInfer(request(1, 4.0), timeout=30)
        assert np.frombuffer(small.raw_output_contents[0], np.float32).tolist() == [4.0] * 16

        answer = await first
        got = np.frombuffer(answer.raw_output_contents[0], np.float32)
        assert got.size == ROWS * 16 and (got == 1.0).all()
        waited = await second
        assert waited.shape == (ROWS, 16) and (waited == 2.0).all()
        assert time.monotonic() - started >= 2 * SLOW_MS / 1000  # the second ran after the first

        after = (await stub.ModelStatistics(tpb.ModelStatisticsRequest(name="slow"))).model_stats[0]
        assert after.inference_stats.success.count - before.inference_stats.success.count == 3
        assert after.inference_stats.fail.count - before.inference_stats.fail.count == 2


async def test_a_body_that_stalls_holds_its_room_until_the_deadline_only(cluster: ProcessCluster) -> None:
    """A REST client declares a 700 KB body and sends 1 KB of it: its room in the budget is
    held from before the body is read, so a gRPC request of 700 KB waits; at the
    deployment's deadline (timeout_s 3) the stalled request gets 504 and the other runs."""
    header, data = binary_body(1.0)
    host, port = cluster.http_address().rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /v2/models/hurried/infer HTTP/1.1\r\nHost: localhost\r\n"
            + f"Content-Length: {len(header) + len(data)}\r\n".encode()
            + f"Inference-Header-Content-Length: {len(header)}\r\n\r\n".encode()
            + header
            + data[:1000]
        )
        await writer.drain()
        await asyncio.sleep(0.3)
        started = time.monotonic()
        async with grpc.aio.insecure_channel(
            cluster.scheduler_address(), options=[("grpc.max_send_message_length", 8 << 20)]
        ) as channel:
            waiting = asyncio.ensure_future(
                tpbg.GRPCInferenceServiceStub(channel).ModelInfer(request(ROWS, 6.0), timeout=30)
            )
            status = await asyncio.wait_for(reader.readline(), 10)
            assert status.startswith(b"HTTP/1.1 504"), status
            answer = await waiting
        assert np.frombuffer(answer.raw_output_contents[0], np.float32)[0] == 6.0
        assert time.monotonic() - started >= 2.0, "the gRPC request waited for the stalled body's room"
    finally:
        writer.close()


async def test_chunked_and_compressed_bodies_are_held_as_they_arrive(cluster: ProcessCluster) -> None:
    """A body without a Content-Length (chunked) or compressed (its Content-Length is the
    compressed size) is held in the budget as it is read and decoded. Before, it held 0
    bytes or its compressed size: 20 chunked 60 MB bodies at once grew the ingress
    processes to 3.3 GB, none refused."""
    header, data = binary_body(7.0)
    body = header + data
    url = f"http://{cluster.http_address()}/v2/models/slow/infer"
    binary = {"Inference-Header-Content-Length": str(len(header))}

    async def chunked() -> AsyncIterator[bytes]:
        for at in range(0, len(body), 64 * 1024):
            yield body[at : at + 64 * 1024]

    async with httpx.AsyncClient(timeout=30) as client:
        # Alone, a chunked body runs (one request always does, whatever its size).
        reply = await client.post(url, content=chunked(), headers=binary)
        assert reply.status_code == 200, reply.text[:300]
        async with grpc.aio.insecure_channel(
            cluster.scheduler_address(), options=[("grpc.max_send_message_length", 8 << 20)]
        ) as channel:
            first = asyncio.ensure_future(
                tpbg.GRPCInferenceServiceStub(channel).ModelInfer(request(ROWS, 1.0), timeout=30)
            )
            await asyncio.sleep(0.5)  # first holds 700 KB of the 1 MB
            reply = await client.post(url, content=chunked(), headers=binary)
            assert reply.status_code == 503, reply.text[:300]
            assert "sent chunked or compressed" in reply.json()["error"]
            assert "max_inflight_mb" in reply.json()["error"]
            squeezed = gzip.compress(body)  # constant values: a few KB
            assert len(squeezed) < budgets.SMALL
            reply = await client.post(url, content=squeezed, headers={**binary, "Content-Encoding": "gzip"})
            assert reply.status_code == 503 and "max_inflight_mb" in reply.json()["error"], reply.text[:300]
            assert not first.done(), "refused at once, while the first request ran"
            answer = await first
        assert np.frombuffer(answer.raw_output_contents[0], np.float32)[0] == 1.0

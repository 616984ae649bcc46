"""Tensors straight through: every datatype comes back byte for byte from a real replica.

An echo model answers its inputs; the request goes in as ``raw_input_contents`` over the
Open Inference Protocol and as the native ``SendRequest``, through a scheduler that no
longer decodes tensors, to a replica (batched and not) and back. BYTES (with empty and
binary elements), BF16 and FP16, and empty batches (a zero-length axis 0) included.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import ml_dtypes
import numpy as np
import pytest
import pytest_asyncio

from shoal.proto import grpc_service_pb2 as oip
from shoal.proto import grpc_service_pb2_grpc as oipg
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.testing.cluster import ProcessCluster

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio(loop_scope="module")]


def _bytes_tensor(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


RNG = np.random.default_rng(7)
FIXED = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": RNG.integers(0, 2**8, (2, 3), dtype=np.uint8),
    "UINT16": RNG.integers(0, 2**16, (2, 3), dtype=np.uint16),
    "UINT32": RNG.integers(0, 2**32, (2, 3), dtype=np.uint32),
    "UINT64": np.array([[0, 2**64 - 1, 5], [1, 2, 3]], dtype=np.uint64),
    "INT8": RNG.integers(-(2**7), 2**7, (2, 3), dtype=np.int8),
    "INT16": RNG.integers(-(2**15), 2**15, (2, 3), dtype=np.int16),
    "INT32": RNG.integers(-(2**31), 2**31, (2, 3), dtype=np.int32),
    "INT64": np.array([[-(2**63), 2**63 - 1, 0], [1, -1, 7]], dtype=np.int64),
    "FP16": np.array([[0.5, -np.inf, 65504], [np.nan, 1e-7, -0.0]], dtype=np.float16),
    "FP32": np.array([[np.pi, -np.inf, 3.4e38], [np.nan, 1e-45, -0.0]], dtype=np.float32),
    "FP64": np.array([[np.e, np.inf, 1.8e308], [np.nan, 5e-324, -0.0]], dtype=np.float64),
    "BF16": np.array([[1.5, -2.25, 3.0e38], [np.inf, -0.0, 0.0078125]], dtype=ml_dtypes.bfloat16),
}
CASES: list[tuple[str, str, list[int], bytes]] = [
    (f"{dt}", dt, list(a.shape), a.tobytes()) for dt, a in FIXED.items()
]
CASES += [
    ("BYTES", "BYTES", [2, 2], _bytes_tensor([b"", b"\x00\xff binary", "ünïcode".encode(), b"x" * 300])),
    *((f"{dt} empty batch", dt, [0, 3], b"") for dt in ("FP32", "BF16", "INT64", "BOOL", "BYTES")),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(
    tmp_path_factory: pytest.TempPathFactory, examples_dir: Path
) -> AsyncIterator[ProcessCluster]:
    async with ProcessCluster(tmp_path_factory.mktemp("passthrough")) as c:
        base = {"backend": "python", "model": "echo:Echo", "base_dir": str(examples_dir)}
        await c.deploy({"name": "echo", **base, "resources": {"cpus": 0.1}})
        await c.deploy(
            {
                "name": "echo_batch",
                **base,
                "resources": {"cpus": 0.1},
                "batching": {"max_batch_size": 8, "max_delay_ms": 2},
            }
        )
        await c.wait_ready("echo", 1)
        await c.wait_ready("echo_batch", 1)
        yield c


@pytest.mark.parametrize("model", ["echo", "echo_batch"])
@pytest.mark.parametrize(("case", "datatype", "shape", "raw"), CASES, ids=[c[0] for c in CASES])
async def test_model_infer_is_byte_exact(
    cluster: ProcessCluster, model: str, case: str, datatype: str, shape: list[int], raw: bytes
) -> None:
    async with grpc.aio.insecure_channel(cluster.scheduler_address()) as channel:
        request = oip.ModelInferRequest(model_name=model, id=case)
        request.inputs.add(name="t", datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
        reply = await oipg.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    [out] = reply.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("t", datatype, shape)
    assert reply.raw_output_contents[0] == raw
    assert reply.id == case


@pytest.mark.parametrize(("case", "datatype", "shape", "raw"), CASES, ids=[c[0] for c in CASES])
async def test_send_request_is_byte_exact(
    cluster: ProcessCluster, case: str, datatype: str, shape: list[int], raw: bytes
) -> None:
    async with grpc.aio.insecure_channel(cluster.scheduler_address()) as channel:
        tensor = pb.Tensor(name="t", datatype=datatype, shape=shape, data=raw)
        reply = await pbg.SchedulerStub(channel).SendRequest(
            pb.InferRequest(deployment="echo_batch", inputs=[tensor]), timeout=30
        )
    [out] = reply.outputs
    assert (out.datatype, list(out.shape), out.data) == (datatype, shape, raw)


async def test_a_byte_length_that_does_not_fit_the_header_never_reaches_a_replica(
    cluster: ProcessCluster,
) -> None:
    async with grpc.aio.insecure_channel(cluster.scheduler_address()) as channel:
        request = oip.ModelInferRequest(model_name="echo")
        request.inputs.add(name="t", datatype="FP32", shape=[2, 3])
        request.raw_input_contents.append(b"\0" * 20)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await oipg.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected 24 bytes for FP32 [2,3], got 20" in (err.value.details() or "")

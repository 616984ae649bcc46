"""A scheduler's control port (the address it registers: the head's calls, its replicas'
registrations and health reports, blob fetches between peers) is a gRPC server of its
own, apart from the inference ports, with one ingress process as with several.

Before, with one ingress process (``--ingress-workers 1``, the default on a one-CPU
machine) the control calls shared the public gRPC server: clients holding its
``grpc_max_connections`` connections left no room for a replica to register, so a
scale-up or a replacement never became READY while they held them. Real processes, port 0.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import numpy as np
import pytest

from shoal.rpc.clients import send_request
from shoal.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(120)

CAP = 12


def echo_spec(replicas: int) -> dict[str, object]:
    return {
        "name": "echo",
        "backend": "python",
        "model": "echo:Echo",
        "base_dir": str(Path(__file__).resolve().parents[2] / "examples"),
        "replicas": replicas,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
        "outputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
        "resources": {"cpus": 0.1},
    }


def hold(address: str, n: int) -> list[socket.socket]:
    """``n`` TCP connections to ``address`` that say nothing (each counts toward the cap)."""
    host, port = address.rsplit(":", 1)
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=5)
        socks.append(s)
    return socks


async def test_a_full_inference_port_leaves_room_for_replicas_to_register(tmp_path: Path) -> None:
    env = {"SHOAL_INGRESS_WORKERS": "1", "SHOAL_GRPC_MAX_CONNECTIONS": str(CAP)}
    async with ProcessCluster(tmp_path, env=env) as cluster:
        await cluster.deploy(echo_spec(1))
        [first] = await cluster.wait_ready("echo", 1)
        endpoints = cluster.schedulers[0].endpoints
        public, control = endpoints["scheduler"], endpoints["scheduler_control"]
        assert public != control, endpoints
        status = await cluster.status()
        assert status["schedulers"][0]["address"] == control

        flood = hold(public, CAP + 4)  # the public gRPC server's every connection, and more
        try:
            await asyncio.sleep(0.5)
            # A second replica registers and reports over the control port, and serves.
            await cluster.client.scale("echo", 2)
            ready = await cluster.wait_ready("echo", 2, timeout_s=40)
            assert first["id"] in {r["id"] for r in ready}
            x = np.arange(16, dtype=np.float32).reshape(1, 16)
            # The control port answers inference too (shoal predict uses it).
            outputs, _ = await send_request(control, "echo", {"x": x}, cluster.settings)
            np.testing.assert_array_equal(outputs["x"], x)
        finally:
            for s in flood:
                s.close()

"""Heads on etcd across hosts (issue 16): the leading head is cut from etcd, but not from the
scheduler. It must stop acting (it cannot renew its lease) and exit; the standby on another
host leads, adopts the running replicas, and no request fails.

Hosts: etcd on host 0, head A on host 1, head B on host 2, the scheduler on host 3.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from shoal.config import Settings
from shoal.core.spec import parse_spec
from shoal.errors import ShoalError
from shoal.rpc.clients import ControlClient, send_request
from shoal.run import LOST_LEADERSHIP_EXIT
from shoal.testing.cluster import FAST
from shoal.testing.etcd import DEAD_AFTER_S, EtcdCluster, echo_spec, require_etcd, wait_ready
from shoal.testing.netns import Hosts
from shoal.testing.netns.cluster import NsComponent

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


async def test_the_leader_cut_from_etcd_stops_and_the_standby_takes_over(
    netns_ready: None, tmp_path: Path
) -> None:
    require_etcd()
    env = {
        **os.environ,
        **FAST,
        "SHOAL_INSECURE": "1",  # plaintext between the namespaces: a private test network
        "SHOAL_DEAD_AFTER_S": str(DEAD_AFTER_S),
        "SHOAL_STORE_ROOT": f"cluster-{uuid.uuid4().hex}/",
    }
    env.pop("SHOAL_HEAD", None)
    settings = Settings.load(env={}, flags={"dead_after_s": DEAD_AFTER_S, "rpc_timeout_s": 2.0})
    with Hosts(4) as hosts:
        etcd_host, a_host, b_host, sched_host = hosts[0], hosts[1], hosts[2], hosts[3]
        with EtcdCluster(tmp_path / "etcd", address=etcd_host.address, launch=etcd_host.popen) as etcd:
            store = ["--store", etcd.url]
            a = NsComponent(
                "head_a", ["head", "--port", "0", "--http-port", "0", *store], tmp_path / "a", env, a_host
            )
            b = NsComponent(
                "head_b", ["head", "--port", "0", "--http-port", "0", *store], tmp_path / "b", env, b_host
            )
            await asyncio.to_thread(a.start, ("head", "head_http"))
            client = ControlClient(a.endpoints["head"], settings)
            try:
                await client.status()  # alone, it leads
            finally:
                await client.close()
            await asyncio.to_thread(b.start, ("head", "head_http"))
            heads = f"{a.endpoints['head']},{b.endpoints['head']}"
            sched = NsComponent(
                "scheduler",
                ["--head", heads, "scheduler", "--grpc-port", "0", "--http-port", "0"],
                tmp_path / "scheduler",
                env,
                sched_host,
            )
            await asyncio.to_thread(sched.start, ("scheduler", "scheduler_http"))
            client = ControlClient(heads, settings)
            try:
                await client.apply(parse_spec(echo_spec("echo", 2, EXAMPLES)))
                before = await wait_ready(client, "echo", 2, timeout_s=60)

                ok = 0
                errors: list[str] = []
                stop = asyncio.Event()
                x = np.ones((1, 16), dtype=np.float32)

                async def infer() -> None:
                    nonlocal ok
                    while not stop.is_set():
                        try:
                            await send_request(
                                sched.endpoints["scheduler"], "echo", {"x": x}, settings, timeout_s=10
                            )
                            ok += 1
                        except ShoalError as err:
                            errors.append(repr(err))

                async with asyncio.TaskGroup() as tg:
                    for _ in range(3):
                        tg.create_task(infer())
                    async with asyncio.timeout(20):
                        while ok < 30:
                            await asyncio.sleep(0.05)
                    hosts.partition(a_host, etcd_host)  # A still reaches the scheduler
                    # A cannot renew its lease: it stops acting and exits ...
                    assert await asyncio.to_thread(a.wait, 60) == LOST_LEADERSHIP_EXIT
                    assert "leadership lost" in a.log.read_text()
                    # ... and B leads, with the replicas that ran: no more, no fewer, the same ones.
                    # (A deploy after the failover: tests/integration/test_standby_heads.py.)
                    assert await wait_ready(client, "echo", 2, timeout_s=60) == before
                    seen = ok
                    async with asyncio.timeout(20):
                        while ok < seen + 30:
                            await asyncio.sleep(0.05)
                    stop.set()
                assert errors == []
            finally:
                await client.close()
                hosts.heal_all()
                for comp in (sched, b, a):
                    comp.kill_all()

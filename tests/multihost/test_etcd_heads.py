"""Heads on etcd across hosts (issue 16): the leading head is cut from etcd but not from the
scheduler, or from the scheduler but not from etcd.

Cut from etcd, the leader must stop acting (it cannot renew its lease) and exit; the standby
on another host leads, adopts the running replicas, and no request fails. Cut from the
scheduler, the leader keeps its lease (it reaches etcd) but hears from no scheduler while
the standby still reaches it: it gives its lease up and exits; the standby leads, the
scheduler (serving from its last table meanwhile) registers with it with the replicas it
ran, and a deploy is carried out; no request fails.

Hosts: etcd on host 0, head A on host 1, head B on host 2, the scheduler on host 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from shoal.config import Settings
from shoal.core.spec import parse_spec
from shoal.errors import ShoalError, Unavailable
from shoal.rpc.clients import ControlClient, send_request
from shoal.run import LOST_LEADERSHIP_EXIT
from shoal.testing.cluster import FAST
from shoal.testing.etcd import DEAD_AFTER_S, EtcdCluster, echo_spec, require_etcd, wait_ready
from shoal.testing.netns import Hosts
from shoal.testing.netns.cluster import NsComponent

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@dataclass
class Setup:
    hosts: Hosts
    a: NsComponent
    b: NsComponent
    sched: NsComponent
    heads: str  # "a,b": what the scheduler and the control client are given
    settings: Settings
    before: list[tuple[str, int]]  # echo's replicas: (id, pid)


async def status_once_serving(client: ControlClient, timeout_s: float = 30.0) -> None:
    """``status`` once the head serves: a head just elected answers Unavailable while it
    loads the cluster state (a loaded machine made that last past the first call)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.status()
            return
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def two_heads_and_a_scheduler(tmp_path: Path) -> AsyncIterator[Setup]:
    """etcd, head A (it leads: it starts alone), head B (standing by) and a scheduler given
    both, each on a host of its own; ``echo`` applied, its 2 replicas READY."""
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
            sched: NsComponent | None = None
            try:
                await asyncio.to_thread(a.start, ("head", "head_http"))
                client = ControlClient(a.endpoints["head"], settings)
                try:
                    await status_once_serving(client)  # alone, it leads
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
                finally:
                    await client.close()
                yield Setup(hosts, a, b, sched, heads, settings, before)
            finally:
                hosts.heal_all()
                for comp in (sched, b, a):
                    if comp is not None:
                        comp.kill_all()


class Load:
    """Three callers in a closed loop on the scheduler's native SendRequest."""

    def __init__(self, setup: Setup) -> None:
        self.address = setup.sched.endpoints["scheduler"]
        self.settings = setup.settings
        self.ok = 0
        self.errors: list[str] = []
        self.stop = asyncio.Event()

    async def start(self, tg: asyncio.TaskGroup) -> None:
        """Start the callers in ``tg``; return once 30 requests succeeded."""
        for _ in range(3):
            tg.create_task(self.call())
        await self.more()

    async def call(self) -> None:
        x = np.ones((1, 16), dtype=np.float32)
        while not self.stop.is_set():
            try:
                await send_request(self.address, "echo", {"x": x}, self.settings, timeout_s=10)
                self.ok += 1
            except ShoalError as err:
                self.errors.append(repr(err))

    async def more(self, n: int = 30, timeout_s: float = 20) -> None:
        """Wait until ``n`` more requests succeeded."""
        seen = self.ok
        async with asyncio.timeout(timeout_s):
            while self.ok < seen + n:
                await asyncio.sleep(0.05)


async def test_the_leader_cut_from_etcd_stops_and_the_standby_takes_over(
    netns_ready: None, tmp_path: Path
) -> None:
    async with two_heads_and_a_scheduler(tmp_path) as setup:
        hosts, a = setup.hosts, setup.a
        client = ControlClient(setup.heads, setup.settings)
        try:
            load = Load(setup)
            async with asyncio.TaskGroup() as tg:
                await load.start(tg)
                hosts.partition(a.host, hosts[0])  # A still reaches the scheduler
                # A cannot renew its lease: it stops acting and exits ...
                assert await asyncio.to_thread(a.wait, 60) == LOST_LEADERSHIP_EXIT
                assert "leadership lost" in a.log.read_text()
                # ... and B leads, with the replicas that ran: no more, no fewer, the same ones.
                # (A deploy after the failover: tests/integration/test_standby_heads.py.)
                assert await wait_ready(client, "echo", 2, timeout_s=60) == setup.before
                await load.more()
                load.stop.set()
            assert load.errors == []
        finally:
            await client.close()


async def test_the_leader_cut_from_the_scheduler_steps_down_and_the_standby_leads(
    netns_ready: None, tmp_path: Path
) -> None:
    async with two_heads_and_a_scheduler(tmp_path) as setup:
        hosts, a, sched = setup.hosts, setup.a, setup.sched
        client = ControlClient(setup.heads, setup.settings)
        try:
            load = Load(setup)
            async with asyncio.TaskGroup() as tg:
                await load.start(tg)
                cut = time.monotonic()
                hosts.partition(a.host, sched.host)  # A still reaches etcd, and B

                # A still holds its lease, but hears from no scheduler while the standby B
                # reaches it: after dead_after_s it gives up its lease and stops ...
                assert await asyncio.to_thread(a.wait, 60) == LOST_LEADERSHIP_EXIT
                stepped_down = time.monotonic() - cut
                assert "leadership given up: every scheduler went silent" in a.log.read_text()
                # ... B leads, and the scheduler, which reaches B, registers with it with the
                # replicas it ran: the same ones, not replaced. The scheduler served all along.
                assert await wait_ready(client, "echo", 2, timeout_s=60) == setup.before
                adopted = time.monotonic() - cut
                await client.scale("echo", 3)  # and B deploys
                after = await wait_ready(client, "echo", 3, timeout_s=60)
                deployed = time.monotonic() - cut
                assert set(setup.before) <= set(after)
                await load.more()
                load.stop.set()
            assert load.errors == []
            print(
                f"\nleader cut from the scheduler: {load.ok} requests, 0 failed; the leader stepped "
                f"down after {stepped_down:.1f} s; the standby led with the replicas after "
                f"{adopted:.1f} s; a deploy READY after {deployed:.1f} s"
            )
        finally:
            await client.close()

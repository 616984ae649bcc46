"""Heads on etcd (issue 16): one leads, a standby names it, and takes over when it dies.

Real etcd processes (a 3-member cluster on loopback), real ``shoal head`` and ``shoal
scheduler`` processes. The timings of the failover are measured by
``scripts/failover_figures.py`` (docs/reliability.md), not asserted here.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
import pytest_asyncio

from shoal.core.spec import parse_spec
from shoal.errors import Unavailable
from shoal.head.leader import LeaderInfo, Leadership
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.clients import ControlClient, send_request
from shoal.rpc.etcd_client import EtcdTarget, etcd_client, parse_store_url
from shoal.rpc.standby import LEADER_METADATA
from shoal.run import LOST_LEADERSHIP_EXIT
from shoal.store.etcd import EtcdStore, Fenced
from shoal.testing.etcd import EtcdCluster, EtcdHeads, echo_spec, require_etcd, wait_ready

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    require_etcd()
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), size=3) as cluster:
        yield cluster


async def open_store(etcd: EtcdCluster, root: str) -> EtcdStore:
    return await EtcdStore(etcd_client(EtcdTarget(parse_store_url(etcd.url))), root=root).open()


# -- the election over real etcd -----------------------------------------------------------


async def test_a_dead_leaders_lease_runs_out_a_standby_leads_and_the_old_leader_cannot_write(
    etcd: EtcdCluster,
) -> None:
    root = f"elect-{uuid.uuid4().hex}/"
    a_store, b_store = await open_store(etcd, root), await open_store(etcd, root)
    try:
        a = Leadership(a_store, a_store.leader_key, LeaderInfo("a:1", "a:2"), ttl_s=1)
        b = Leadership(b_store, b_store.leader_key, LeaderInfo("b:1", "b:2"), ttl_s=1, poll_s=0.05)
        await a.campaign()
        assert await a_store.put("deployments/x", "from a") == 1
        standby = asyncio.ensure_future(b.campaign())
        async with asyncio.timeout(5):
            while b.leader != a.me:
                await asyncio.sleep(0.05)
        # a dies without resigning: nothing renews its lease; b leads once etcd ends it
        await asyncio.wait_for(standby, 10)
        assert b.leading
        with pytest.raises(Fenced, match="b:1"):
            await a_store.put("deployments/x", "from the deposed a")
        assert await b_store.put("deployments/x", "from b") == 2
        assert [(e.value, e.revision) for e in await a_store.list("deployments/")] == [("from b", 2)]
        await b.resign()
        assert await a_store.read_key(a_store.leader_key) is None  # resigned: a standby may claim now
    finally:
        await a_store.close()
        await b_store.close()


# -- heads as processes ----------------------------------------------------------------------


def http_get(address: str, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest_asyncio.fixture
async def heads(tmp_path: Path, etcd: EtcdCluster) -> AsyncIterator[EtcdHeads]:
    cluster = EtcdHeads(tmp_path, etcd)
    try:
        yield cluster
    finally:
        await asyncio.to_thread(cluster.close)


async def test_kill_the_leading_head_under_load(heads: EtcdHeads) -> None:
    a = await asyncio.to_thread(heads.start_head)
    first = ControlClient(a.endpoints["head"], heads.settings)
    try:
        async with asyncio.timeout(20):  # alone on the store, it leads
            while True:
                try:
                    await first.status()
                    break
                except Unavailable:
                    await asyncio.sleep(0.1)
    finally:
        await first.close()
    b = await asyncio.to_thread(heads.start_head)
    async with asyncio.timeout(10):  # until the standby has read who leads (its first poll)
        while (await asyncio.to_thread(http_get, b.endpoints["head_http"], "/healthz"))[1]["leader"] is None:
            await asyncio.sleep(0.05)

    # The standby answers every call saying where the leader is, over gRPC and REST.
    standby = ControlClient(b.endpoints["head"], heads.settings)
    try:
        with pytest.raises(Unavailable, match=f"stands by; the leader is at {a.endpoints['head']}"):
            await standby.status()
    finally:
        await standby.close()
    async with grpc.aio.insecure_channel(b.endpoints["head"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await pbg.HeadStub(channel).GetStatus(pb.StatusRequest(), timeout=5)
    assert raw.value.code() == grpc.StatusCode.UNAVAILABLE
    # grpc-stubs gives AioRpcError the sync error's _Metadatum; grpc.aio's are (key, value) pairs.
    trailing = tuple(raw.value.trailing_metadata() or ())
    assert (LEADER_METADATA, a.endpoints["head"]) in trailing  # type: ignore[comparison-overlap]
    code, body = await asyncio.to_thread(http_get, b.endpoints["head_http"], "/api/status")
    assert code == 503 and body["leader"]["grpc"] == a.endpoints["head"], body
    assert await asyncio.to_thread(http_get, b.endpoints["head_http"], "/healthz") == (
        200,
        {"status": "standby", "leader": {"grpc": a.endpoints["head"], "http": a.endpoints["head_http"]}},
    )

    await asyncio.to_thread(heads.start_scheduler)
    assert heads.scheduler is not None
    client = heads.client()
    try:
        await client.apply(parse_spec(echo_spec("echo", 2, EXAMPLES)))
        before = await wait_ready(client, "echo", 2)

        ok = failed = control_ok = control_failed = 0
        errors: list[str] = []
        stop = asyncio.Event()
        x = np.ones((1, 16), dtype=np.float32)
        scheduler = heads.scheduler.endpoints["scheduler"]

        async def infer() -> None:
            nonlocal ok, failed
            while not stop.is_set():
                try:
                    out, _ = await send_request(scheduler, "echo", {"x": x}, heads.settings, timeout_s=5)
                    assert np.array_equal(out["x"], x)
                    ok += 1
                except Exception as err:
                    failed += 1
                    errors.append(repr(err))

        async def control() -> None:  # the CLI's client, retrying across both heads
            nonlocal control_ok, control_failed
            while not stop.is_set():
                try:
                    await client.status()
                    control_ok += 1
                except Exception as err:
                    control_failed += 1
                    errors.append(repr(err))
                await asyncio.sleep(0.05)

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(infer()) for _ in range(4)] + [tg.create_task(control())]
            async with asyncio.timeout(20):
                while ok < 50:
                    await asyncio.sleep(0.05)
            seen = ok, control_ok
            a.kill_all()  # kill -9 the leader (no replicas are its children)
            # b takes over and adopts the replicas that run: same ids, same processes
            assert await wait_ready(client, "echo", 2, timeout_s=30) == before
            await client.apply(parse_spec(echo_spec("after", 1, EXAMPLES)))
            await wait_ready(client, "after", 1)
            async with asyncio.timeout(20):
                while ok < seen[0] + 50 or control_ok < seen[1] + 5:
                    await asyncio.sleep(0.05)
            stop.set()
        del tasks
        assert (failed, control_failed, errors) == (0, 0, [])
        followed = heads.scheduler.log.read_text()  # which head the scheduler follows, in turn
        assert followed.index(f"the head at {a.endpoints['head']} leads") < followed.index(
            f"the head at {b.endpoints['head']} leads"
        )
        code, body = await asyncio.to_thread(http_get, b.endpoints["head_http"], "/healthz")
        assert code == 200 and body.get("status") != "standby"
        # The CLI as a user runs it, given both heads, one of them dead.
        cli = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "shoal.cli", "--head", heads.addresses, "status"],
            capture_output=True,
            text=True,
            timeout=60,
            env=heads.env,
        )
        assert cli.returncode == 0, cli.stderr
        assert "echo" in cli.stdout and "after" in cli.stdout
    finally:
        await client.close()


async def test_a_leading_head_stopped_with_sigterm_gives_the_key_up(heads: EtcdHeads) -> None:
    """docs/operations.md: "A head stopped with SIGTERM gives the key up at once". Checked on
    etcd's state, not on timings: once the leading head has exited, its lease is revoked and
    the key no longer names it (left to run out, both would last up to the TTL, 2 s here)."""
    client = etcd_client(EtcdTarget(parse_store_url(heads.etcd.url)))
    key = (heads.env["SHOAL_STORE_ROOT"] + "leader").encode()

    async def holder() -> tuple[str | None, int]:
        """Whom the key names (gRPC address), and its lease."""
        got = await client.get(key)
        if got is None:
            return None, 0
        info = LeaderInfo.from_json(bytes(got.value).decode())
        return (info.grpc if info else None), int(got.lease)

    try:
        a = await asyncio.to_thread(heads.start_head)
        async with asyncio.timeout(20):  # alone on the store, it leads
            while (held := await holder())[0] != a.endpoints["head"]:
                await asyncio.sleep(0.05)
        lease = held[1]
        b = await asyncio.to_thread(heads.start_head)
        following = {"grpc": a.endpoints["head"], "http": a.endpoints["head_http"]}
        async with asyncio.timeout(10):  # the standby has read who leads
            while (await asyncio.to_thread(http_get, b.endpoints["head_http"], "/healthz"))[1] != {
                "status": "standby",
                "leader": following,
            }:
                await asyncio.sleep(0.05)
        await asyncio.to_thread(heads.start_scheduler)  # a leader with a scheduler, as in use

        a.signal(signal.SIGTERM)
        assert await asyncio.to_thread(a.wait, 30) == 0
        assert (await client.get_lease_info(lease)).TTL == -1  # revoked: etcd no longer knows it
        assert (await holder())[0] != a.endpoints["head"]
        async with asyncio.timeout(10):  # and the standby claims the key
            while (await holder())[0] != b.endpoints["head"]:
                await asyncio.sleep(0.05)
    finally:
        await client.close()


async def test_a_leader_cut_off_from_etcd_stops(tmp_path: Path) -> None:
    require_etcd()
    with EtcdCluster(tmp_path / "etcd") as own:  # its own etcd: this test stops it
        heads = EtcdHeads(tmp_path, own)
        try:
            a = await asyncio.to_thread(heads.start_head)
            client = heads.client()
            try:
                await client.status()  # retried until it leads
            finally:
                await client.close()
            own.stop()
            assert await asyncio.to_thread(a.wait, 30) == LOST_LEADERSHIP_EXIT
            assert "leadership lost" in a.log.read_text()
        finally:
            await asyncio.to_thread(heads.close)

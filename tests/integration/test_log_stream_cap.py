"""The head relays at most ``max_log_streams`` replica log reads at once, against a real
cluster: past it one more is refused, RESOURCE_EXHAUSTED over gRPC and 503 over REST, naming
the setting, and the follows already open go on. Before, every follow was taken: 1,100 that
read nothing took the head to 4.5 GB as their replica wrote 200 MB, and held every stream of
the head's connection to the scheduler, so the head's ``CreateReplica`` to it waited behind
them and a scale-up never happened."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest

from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.testing.cluster import ProcessCluster
from tests.integration.test_logs_follow import shoal

pytestmark = pytest.mark.timeout(90)

CAP = 3


async def one_echo(cluster: ProcessCluster, examples_dir: Path) -> dict[str, Any]:
    """Deploy one echo replica and return it, READY, as status shows it."""
    spec = {"name": "echo", "backend": "python", "model": "echo:Echo", "base_dir": str(examples_dir)}
    await cluster.deploy({**spec, "replicas": 1, "resources": {"cpus": 0.1}})
    [replica] = await cluster.wait_ready("echo", 1)
    return replica


async def served_once_free(start: Callable[[], Any], why: str) -> Any:
    """Start a ReadLog call with ``start()`` until one is served its first chunk (those
    refused RESOURCE_EXHAUSTED, for want of a place, are tried again for up to 20 s); the
    call. Fails saying ``why`` when none is."""
    for _ in range(200):
        call = start()
        try:
            assert isinstance(await asyncio.wait_for(call.read(), 20), pb.LogChunk)
            return call
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            await asyncio.sleep(0.1)
    pytest.fail(why)


async def test_log_reads_past_max_log_streams_are_refused_and_those_open_go_on(
    tmp_path: Path, examples_dir: Path
) -> None:
    async with ProcessCluster(tmp_path, env={"SHOAL_MAX_LOG_STREAMS": str(CAP)}) as cluster:
        replica = await one_echo(cluster, examples_dir)
        request = pb.ReadLogRequest(replica_id=replica["id"], tail_bytes=0, follow=True)
        async with grpc.aio.insecure_channel(cluster.head_address) as channel:
            stub = pbg.HeadStub(channel)
            # Follows that read their first chunk and then nothing more, as a stuck client's.
            follows = [stub.ReadLog(request) for _ in range(CAP)]
            try:
                for call in follows:
                    await asyncio.wait_for(call.read(), 20)
                refused = stub.ReadLog(request)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await asyncio.wait_for(refused.read(), 20)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "setting max_log_streams" in (err.value.details() or "")
                assert replica["id"] in (err.value.details() or "")

                assert cluster.head is not None
                async with httpx.AsyncClient(
                    base_url=f"http://{cluster.head.endpoints['head_http']}", timeout=20
                ) as rest:
                    answer = await rest.get(f"/api/replicas/{replica['id']}/logs")
                    assert answer.status_code == 503, answer.text
                    assert "setting max_log_streams" in answer.text
                    assert answer.headers.get("retry-after") == "1"

                    # The follows open were not disturbed, and the head still runs the cluster.
                    assert not any(call.done() for call in follows)
                    await cluster.client.scale("echo", 2)
                    await cluster.wait_ready("echo", 2)

                    # One ends: its place is free again, over either door.
                    follows.pop().cancel()
                    for _ in range(100):
                        answer = await rest.get(f"/api/replicas/{replica['id']}/logs")
                        if answer.status_code != 503:
                            break
                        await asyncio.sleep(0.1)
                    assert answer.status_code == 200, answer.text
                    again = stub.ReadLog(request)
                    assert isinstance(await asyncio.wait_for(again.read(), 20), pb.LogChunk)
                    again.cancel()
            finally:
                for call in follows:
                    call.cancel()


async def test_a_log_read_with_a_negative_tail_is_refused_naming_the_field(
    tmp_path: Path, examples_dir: Path
) -> None:
    async with ProcessCluster(tmp_path) as cluster:
        async with grpc.aio.insecure_channel(cluster.head_address) as channel:
            call = pbg.HeadStub(channel).ReadLog(pb.ReadLogRequest(replica_id="echo-1", tail_bytes=-5))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(call.read(), 20)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "tail_bytes must be >= 0 (0: the whole log), got -5"


async def test_a_log_read_whose_client_takes_nothing_is_ended_and_frees_its_place(
    tmp_path: Path, examples_dir: Path
) -> None:
    """A follow whose client stops reading while the log grows: once gRPC's windows are full
    (about 8 MB) the head's write waits. Before, it waited for as long as the client lived,
    holding that much log in the head and a place of max_log_streams (128 such held 1.2 GB).
    Now the read is ended after log_stream_stall_s; the client, reading again, gets what was
    sent and then RESOURCE_EXHAUSTED naming the setting, and the place is free."""
    env = {"SHOAL_MAX_LOG_STREAMS": "1", "SHOAL_LOG_STREAM_STALL_S": "1", "SHOAL_REPLICA_LOG_MAX_MB": "64"}
    async with ProcessCluster(tmp_path, env=env) as cluster:
        replica = await one_echo(cluster, examples_dir)
        (log,) = cluster.root.rglob(f"replica_{replica['id']}.log")
        request = pb.ReadLogRequest(replica_id=replica["id"], tail_bytes=0, follow=True)
        async with grpc.aio.insecure_channel(cluster.head_address) as channel:
            stub = pbg.HeadStub(channel)
            stuck = stub.ReadLog(request)
            try:
                await asyncio.wait_for(stuck.read(), 20)
                with log.open("a") as f:  # more than the windows hold, less than a rotation
                    for _ in range(24):
                        f.write(("x" * 1023 + "\n") * 1024)
                # The head ends the read and its place is free: a new read is served.
                probe = pb.ReadLogRequest(replica_id=replica["id"], tail_bytes=10)
                await served_once_free(lambda: stub.ReadLog(probe), "the stalled follow kept its place")
                got = 0
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    while True:
                        chunk = await asyncio.wait_for(stuck.read(), 20)
                        assert isinstance(chunk, pb.LogChunk), "the follow ended without a status"
                        got += len(chunk.data)
                assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "setting log_stream_stall_s" in (ended.value.details() or "")
                assert 0 < got < 24 * 2**20  # what the windows held, not the whole log
            finally:
                stuck.cancel()


async def test_a_rest_log_read_whose_client_takes_nothing_frees_its_place(
    tmp_path: Path, examples_dir: Path
) -> None:
    """Over REST the HTTP server's own bound ends such a read: a client that takes no byte
    of its answer for http_idle_timeout_s has its connection dropped, and the read its place
    of max_log_streams freed (docs/operations.md, "Long-lived streams")."""
    env = {"SHOAL_MAX_LOG_STREAMS": "1", "SHOAL_HTTP_IDLE_TIMEOUT_S": "1", "SHOAL_REPLICA_LOG_MAX_MB": "64"}
    async with ProcessCluster(tmp_path, env=env) as cluster:
        replica = await one_echo(cluster, examples_dir)
        (log,) = cluster.root.rglob(f"replica_{replica['id']}.log")
        with log.open("a") as f:  # more than the sockets' buffers hold
            for _ in range(24):
                f.write(("x" * 1023 + "\n") * 1024)
        assert cluster.head is not None
        host, port = cluster.head.endpoints["head_http"].rsplit(":", 1)
        _, writer = await asyncio.open_connection(host, int(port))
        try:
            path = f"/api/replicas/{replica['id']}/logs?tail_bytes=0"
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            await writer.drain()
            async with grpc.aio.insecure_channel(cluster.head_address) as channel:
                stub = pbg.HeadStub(channel)
                probe = pb.ReadLogRequest(replica_id=replica["id"], tail_bytes=10)

                async def served() -> bool:
                    try:
                        await asyncio.wait_for(stub.ReadLog(probe).read(), 20)
                        return True
                    except grpc.aio.AioRpcError as err:
                        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                        return False

                # The REST read holds the one place, then its connection is dropped and frees it.
                for want in (False, True):
                    for _ in range(200):
                        if await served() == want:
                            break
                        await asyncio.sleep(0.05)
                    else:
                        pytest.fail(f"a log read was {'never' if want else 'always'} served")
        finally:
            writer.close()


async def test_one_client_holds_at_most_max_log_streams_per_client_and_others_still_read(
    tmp_path: Path, examples_dir: Path
) -> None:
    """Before, one client could take every place of max_log_streams (a follow of a large
    deployment, a script that never ends its reads) and leave none to anyone else. Now a
    client (its token, else its address) holds at most max_log_streams_per_client: its next
    read is refused over either door, naming the setting and the token, while another token's
    reads are served, and once one of its reads ends it reads again."""
    env = {"SHOAL_MAX_LOG_STREAMS": "8", "SHOAL_MAX_LOG_STREAMS_PER_CLIENT": "2"}
    async with ProcessCluster(tmp_path, env=env) as cluster:
        replica = await one_echo(cluster, examples_dir)
        admin = (await shoal(cluster, "token", "create", "--role", "admin", "--name", "ops")).split()[-1]
        reader = ("token", "create", "--role", "read", "--name")
        alice, bob = [(await shoal(cluster, *reader, n, token=admin)).split()[-1] for n in "ab"]
        request = pb.ReadLogRequest(replica_id=replica["id"], tail_bytes=0, follow=True)
        async with grpc.aio.insecure_channel(cluster.head_address) as channel:
            stub = pbg.HeadStub(channel)

            def follow(secret: str) -> Any:
                return stub.ReadLog(request, metadata=(("authorization", f"Bearer {secret}"),))

            held = [follow(alice) for _ in range(2)]
            try:
                for call in held:
                    await asyncio.wait_for(call.read(), 20)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await asyncio.wait_for(follow(alice).read(), 20)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "setting max_log_streams_per_client" in (err.value.details() or "")
                assert "the token 'a'" in (err.value.details() or "")

                assert cluster.head is not None
                async with httpx.AsyncClient(
                    base_url=f"http://{cluster.head.endpoints['head_http']}", timeout=20
                ) as rest:
                    path = f"/api/replicas/{replica['id']}/logs"
                    answer = await rest.get(path, headers={"authorization": f"Bearer {alice}"})
                    assert answer.status_code == 503, answer.text
                    assert "max_log_streams_per_client" in answer.text
                    answer = await rest.get(path, headers={"authorization": f"Bearer {bob}"})
                    assert answer.status_code == 200, answer.text
                other = follow(bob)
                assert isinstance(await asyncio.wait_for(other.read(), 20), pb.LogChunk)
                other.cancel()

                held.pop().cancel()  # one of alice's ends: she reads again
                held.append(await served_once_free(lambda: follow(alice), "the ended read kept its place"))
            finally:
                for call in held:
                    call.cancel()

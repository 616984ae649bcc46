"""Security on real sockets: mutual TLS between processes, tokens on every control RPC and
route, inference tokens on every ingress, limits, and the plaintext-on-loopback rule.

The TLS test runs a real cluster (head, scheduler and a replica as processes); the others
run a head and a scheduler in the test's own event loop (real gRPC and HTTP on port 0),
with deployments of no replicas where the checks happen before any routing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc.aio as tgrpc
from tritonclient.utils import InferenceServerException

from shoal import certs
from shoal.auth import Role
from shoal.config import Settings
from shoal.core.spec import parse_spec
from shoal.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    ShoalError,
    Unauthenticated,
)
from shoal.proto import grpc_service_pb2 as oip
from shoal.proto import grpc_service_pb2_grpc as oipg
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.rpc.channels import open_channel
from shoal.rpc.clients import ControlClient, NativeClient
from shoal.run import start_head, start_scheduler
from shoal.scheduler import dataplane
from shoal.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")

MODEL = '''
import numpy as np


class Both:
    """Echoes tensors; answers an ``embedding`` for a ``text`` input (the OpenAI API's)."""

    def predict(self, inputs):
        if "text" in inputs:
            return {"embedding": np.ones((len(inputs["text"]), 3), dtype=np.float32)}
        return dict(inputs)
'''


async def eventually(fn: Callable[[], Awaitable[T]], timeout_s: float = 10.0) -> T:
    """``fn()`` once it stops failing with Unauthenticated (tokens reach schedulers with the next table)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await fn()
        except (Unauthenticated, InferenceServerException, openai.AuthenticationError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def tls_context(folder: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(folder / "ca.crt"))


async def test_tls_cluster_serves_with_tokens_and_refuses_strangers(tmp_path: Path) -> None:
    tls, other = tmp_path / "tls", tmp_path / "other"
    certs.init(tls)
    certs.init(other)
    models = tmp_path / "models"
    models.mkdir()
    (models / "both.py").write_text(MODEL)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    async with ProcessCluster(tmp_path / "cluster", env={"SHOAL_TLS_DIR": str(tls)}) as cluster:
        base = cluster.settings.replace(tls_dir=str(tls))
        # Bootstrap: no token yet, so the first (admin) one may be made from this machine.
        boot = ControlClient(cluster.head_address, base)
        admin = (await boot.create_token("admin", "root")).token
        with pytest.raises(Unauthenticated):
            await boot.status()  # tokens exist now
        await boot.close()
        cluster.settings = base.replace(token=admin)
        app = (await cluster.client.create_token("infer", "app")).token
        reader = (await cluster.client.create_token("read", "reader")).token
        spec = {
            "name": "both",
            "backend": "python",
            "model": "both:Both",
            "base_dir": str(models),
            "resources": {"cpus": 0.1},
            "auth": {"tokens": ["app"]},
        }
        await cluster.deploy(spec)
        await cluster.wait_ready("both", 1)
        grpc_address, http_address = cluster.scheduler_address(), cluster.http_address()

        # Native SendRequest over mutual TLS: the deployment's token, and only it.
        async with NativeClient(grpc_address, base.replace(token=app)) as native:
            outputs, _ = await eventually(lambda: native.infer("both", {"x": x}))
            np.testing.assert_array_equal(outputs["x"], x)
        for token, error in (("", Unauthenticated), (reader, PermissionDenied), ("shoal_x", Unauthenticated)):
            async with NativeClient(grpc_address, base.replace(token=token)) as native:
                with pytest.raises(error):
                    await native.infer("both", {"x": x})

        # tritonclient over gRPC with the client certificate.
        triton = tgrpc.InferenceServerClient(
            grpc_address,
            ssl=True,
            root_certificates=str(tls / "ca.crt"),
            private_key=str(tls / "client.key"),
            certificate_chain=str(tls / "client.crt"),
        )
        try:
            inp = tgrpc.InferInput("x", [2, 4], "FP32")
            inp.set_data_from_numpy(x)
            result = await triton.infer("both", [inp], headers={"authorization": f"Bearer {app}"})
            np.testing.assert_array_equal(result.as_numpy("x"), x)
            with pytest.raises(InferenceServerException, match="needs a token"):
                await triton.infer("both", [inp])
        finally:
            await triton.close()

        # HTTPS: the REST ingress and the OpenAI API, verified against the cluster CA.
        doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": x.ravel().tolist()}]}
        async with httpx.AsyncClient(verify=tls_context(tls), base_url=f"https://{http_address}") as web:
            r = await web.post("/v2/models/both/infer", json=doc, headers={"Authorization": f"Bearer {app}"})
            assert r.status_code == 200, r.text
            assert (await web.post("/v2/models/both/infer", json=doc)).status_code == 401
            head_http = cluster.head.endpoints["head_http"]  # type: ignore[union-attr]
            r = await web.get(
                f"https://{head_http}/api/status", headers={"Authorization": f"Bearer {reader}"}
            )
            assert r.status_code == 200 and r.json()["deployments"][0]["name"] == "both"
            assert (await web.get(f"https://{head_http}/api/status")).status_code == 401
        # The OpenAI client's own HTTP client, trusting the cluster CA.
        async with openai.DefaultAsyncHttpxClient(verify=tls_context(tls)) as http_client:
            refusals: list[tuple[str, type[openai.APIStatusError]]] = [
                ("shoal_x", openai.AuthenticationError),
                (reader, openai.PermissionDeniedError),
            ]
            for key, refused_with in refusals:
                client = openai.AsyncOpenAI(
                    base_url=f"https://{http_address}/v1", api_key=key, http_client=http_client, max_retries=0
                )
                with pytest.raises(refused_with):
                    await client.embeddings.create(model="both", input="hi")
            client = openai.AsyncOpenAI(
                base_url=f"https://{http_address}/v1", api_key=app, http_client=http_client, max_retries=0
            )
            result = await client.embeddings.create(model="both", input=["a", "b"])
            assert [d.embedding for d in result.data] == [[1.0, 1.0, 1.0]] * 2

        # A plaintext client cannot talk to a TLS port, gRPC or HTTP.
        async with grpc.aio.insecure_channel(grpc_address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as plain:
                await pbg.SchedulerStub(channel).SendRequest(pb.InferRequest(deployment="both"), timeout=3)
            assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
        async with httpx.AsyncClient() as web:
            # Plain HTTP is served nothing, and told why (docs/operations.md, Limits).
            plain_http = await web.get(f"http://{http_address}/v2/health/live")
            assert plain_http.status_code == 400
            assert "speaks HTTPS" in plain_http.json()["error"]
        # A certificate of the cluster CA, but not the scheduler's role, cannot join.
        async with open_channel(cluster.head_address, base) as channel:  # the client's certificate
            with pytest.raises(grpc.aio.AioRpcError) as wrong_role:
                await pbg.HeadStub(channel).RegisterScheduler(
                    pb.RegisterSchedulerRequest(scheduler_id="impostor", address="127.0.0.1:1"), timeout=3
                )
            assert wrong_role.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "for the scheduler" in str(wrong_role.value.details())

        # A scheduler with certificates from another CA cannot register, and says why.
        cluster.env = {**cluster.env, "SHOAL_TLS_DIR": str(other)}
        stranger = await asyncio.to_thread(cluster.add_scheduler)
        deadline = time.monotonic() + 15
        while "TLS handshake failed" not in stranger.log.read_text():
            assert time.monotonic() < deadline, stranger.log.read_text()[-2000:]
            await asyncio.sleep(0.1)
        assert "cannot reach head" in stranger.log.read_text()
        status = await cluster.status()
        assert len(status["schedulers"]) == 1


# ---------------------------------------------------------------- in-process head and scheduler


def local_settings(tmp_path: Path, **changes: Any) -> Settings:
    return Settings(
        head_port=0,
        head_http_port=0,
        grpc_port=0,
        http_port=0,
        state_dir=str(tmp_path / "state"),
        heartbeat_interval_s=0.2,
        reconcile_interval_s=0.2,
        cpus=1,
        memory_mb=1000,
        gpus=0,
        **changes,
    )


async def call_all(client: ControlClient) -> dict[str, BaseException | None]:
    """Every control RPC once; what each raised (None: it was allowed, even if it then failed
    for another reason, such as an unknown name)."""
    spec = parse_spec({"name": "idle", "backend": "python", "model": "m:M", "replicas": 0})

    async def logs() -> None:
        async for _ in client.read_log("idle-000000"):
            pass

    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "GetStatus": client.status,
        "ReadLog": logs,
        "ApplyDeployment": lambda: client.apply(spec),
        "ScaleDeployment": lambda: client.scale("idle", 0),
        "DeleteDeployment": lambda: client.delete("nope"),
        "GetHistory": lambda: client.history("nope"),
        "ListEvents": client.events,
        "RollbackDeployment": lambda: client.rollback("nope"),
        "RestartDeployment": lambda: client.restart("nope"),
        "ListTokens": client.list_tokens,
        "CreateToken": lambda: client.create_token("read", ""),
        "RevokeToken": lambda: client.revoke_token("nope"),
    }
    out: dict[str, BaseException | None] = {}
    for name, fn in calls.items():
        try:
            await fn()
            out[name] = None
        except (Unauthenticated, PermissionDenied, ResourceExhausted) as err:
            out[name] = err
        except ShoalError:
            out[name] = None  # NotFound and the like: past the guard
    return out


NEEDS = {
    "GetStatus": "read",
    "ReadLog": "read",
    "ApplyDeployment": "deploy",
    "ScaleDeployment": "deploy",
    "DeleteDeployment": "deploy",
    "GetHistory": "read",
    "ListEvents": "read",
    "RollbackDeployment": "deploy",
    "RestartDeployment": "deploy",
    "ListTokens": "admin",
    "CreateToken": "admin",
    "RevokeToken": "admin",
}
ORDER = ["infer", "read", "deploy", "admin"]


async def test_control_rpcs_need_tokens_by_role_and_are_rate_limited(tmp_path: Path) -> None:
    settings = local_settings(tmp_path, control_rate_limit=25)
    async with AsyncExitStack() as stack:
        node, address, http_address = await start_head(settings, stack)
        clients: dict[str, ControlClient] = {}

        def client(token: str) -> ControlClient:
            if token not in clients:
                clients[token] = ControlClient(address, settings.replace(token=token))
                stack.push_async_callback(clients[token].close)
            return clients[token]

        # Before any token: open, but token management needs the bootstrap.
        with pytest.raises(PermissionDenied, match="no token exists yet"):
            await client("").list_tokens()
        with pytest.raises(FailedPrecondition, match="first token must have role admin"):
            await client("").create_token("read")
        admin = (await client("").create_token("admin", "root")).token
        tokens = {"admin": admin}
        for role in ("infer", "read", "deploy"):
            tokens[role] = (await client(admin).create_token(role, role)).token

        for token, expected in (("", Unauthenticated), ("shoal_wrong", Unauthenticated)):
            results = await call_all(client(token))
            assert all(isinstance(e, expected) for e in results.values()), results
        for role, token in tokens.items():
            results = await call_all(client(token))
            for rpc, error in results.items():
                allowed = ORDER.index(role) >= ORDER.index(NEEDS[rpc])
                assert (error is None) == allowed, (role, rpc, error)
                if not allowed:
                    assert isinstance(error, PermissionDenied) and f"needs role {NEEDS[rpc]}" in str(error)

        # REST over a real socket: the same tokens.
        async with httpx.AsyncClient(base_url=f"http://{http_address}") as web:
            assert (await web.get("/api/deployments")).status_code == 401
            r = await web.get("/api/deployments", headers={"Authorization": f"Bearer {tokens['read']}"})
            assert r.status_code == 200
            r = await web.delete(
                "/api/deployments/idle", headers={"Authorization": f"Bearer {tokens['read']}"}
            )
            assert r.status_code == 403

        # The rate limit: a burst over 2 s worth of requests from one token is refused.
        outcomes = await asyncio.gather(
            *(client(tokens["read"]).status() for _ in range(60)), return_exceptions=True
        )
        limited = [e for e in outcomes if isinstance(e, ResourceExhausted)]
        assert limited and len(limited) < 60
        assert "rate limit of 25 requests/s on the control API" in str(limited[0])
        assert node.tokens.get("root") is not None


async def test_ingress_limits_and_tokens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="shoal.dataplane")
    monkeypatch.setattr(dataplane, "_REFUSALS_LOGGED_PER_S", 1000)  # this test's refusals all logged
    settings = local_settings(tmp_path, max_message_mb=1, max_tensor_elements=1000)
    cpus = os.sched_getaffinity(0)
    async with AsyncExitStack() as stack:
        head, head_address, _ = await start_head(settings, stack)
        scheduler, grpc_address, http_address = await start_scheduler(settings, stack, head_address)
        # A program that runs a scheduler in its own process keeps its CPUs: only the
        # commands that own their process pin it (shoal.run.pin_ingress).
        assert os.sched_getaffinity(0) == cpus
        await head.create_token(Role.ADMIN, "root")
        _, app = await head.create_token(Role.INFER, "app")
        _, other = await head.create_token(Role.INFER, "other")
        for name, extra in (("open", {}), ("locked", {"auth": {"tokens": ["app"]}})):
            await head.apply(
                parse_spec({"name": name, "backend": "python", "model": "m:M", "replicas": 0, **extra})
            )
        deadline = time.monotonic() + 10
        while set(scheduler.router.deployments()) != {"open", "locked"}:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)

        async with httpx.AsyncClient(base_url=f"http://{http_address}") as web:
            # Body over max_message_mb: 400 naming the setting (ingress and head REST alike).
            big = b"\0" * (1024 * 1024 + 10)
            r = await web.post("/v2/models/open/infer", content=big)
            assert r.status_code == 413 and "setting max_message_mb" in r.json()["error"]
            # Too many elements: 400 naming the setting, before the buffers are decoded.
            doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1001], "data": [0.0] * 1001}]}
            r = await web.post("/v2/models/open/infer", json=doc)
            assert r.status_code == 400 and "setting max_tensor_elements" in r.json()["error"]
            # Tokens: REST and the OpenAI API (checked before routing; no replica needed).
            small = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [0.0]}]}
            assert (await web.post("/v2/models/locked/infer", json=small)).status_code == 401
            r = await web.post(
                "/v2/models/locked/infer", json=small, headers={"Authorization": f"Bearer {other}"}
            )
            assert r.status_code == 403
            r = await web.post("/v1/chat/completions", json={"model": "locked", "messages": []})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"

        async with grpc.aio.insecure_channel(grpc_address) as channel:
            native, oip_stub = pbg.SchedulerStub(channel), oipg.GRPCInferenceServiceStub(channel)
            many = pb.Tensor(name="x", datatype="FP32", shape=[2000], data=b"\0" * 8000)
            with pytest.raises(grpc.aio.AioRpcError) as too_many:
                await native.SendRequest(pb.InferRequest(deployment="open", inputs=[many]), timeout=5)
            assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_tensor_elements" in str(too_many.value.details())
            request = oip.ModelInferRequest(model_name="open")
            request.inputs.add(name="x", datatype="FP32", shape=[2000])
            request.raw_input_contents.append(b"\0" * 8000)
            with pytest.raises(grpc.aio.AioRpcError) as too_many:
                await oip_stub.ModelInfer(request, timeout=5)
            assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            huge = pb.Tensor(
                name="x", datatype="UINT8", shape=[2 * 1024 * 1024], data=b"\0" * (2 * 1024 * 1024)
            )
            with pytest.raises(grpc.aio.AioRpcError) as too_big:
                await native.SendRequest(pb.InferRequest(deployment="open", inputs=[huge]), timeout=5)
            assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC's own size check
            # Tokens on gRPC: missing -> UNAUTHENTICATED, another deployment's -> PERMISSION_DENIED.
            locked = oip.ModelInferRequest(model_name="locked")
            locked.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(0.0)
            for metadata, code in (
                (None, grpc.StatusCode.UNAUTHENTICATED),
                ((("authorization", f"Bearer {other}"),), grpc.StatusCode.PERMISSION_DENIED),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await oip_stub.ModelInfer(locked, timeout=5, metadata=metadata)
                assert refused.value.code() == code
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await native.SendRequest(
                        pb.InferRequest(deployment="locked"), timeout=5, metadata=metadata
                    )
                assert refused.value.code() == code
            # With the token, the request passes the guard (and waits for a replica: none here).
            with pytest.raises(grpc.aio.AioRpcError) as waited:
                await native.SendRequest(
                    pb.InferRequest(deployment="locked", timeout_s=0.2),
                    timeout=5,
                    metadata=(("authorization", f"Bearer {app}"),),
                )
            assert waited.value.code() not in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
            )
        # Every inference refused for its token is counted and logged, whatever the door (they
        # were in neither): 401s from REST, OpenAI, OIP gRPC and native; 403s from REST, OIP
        # gRPC and native.
        outcomes = scheduler.router.stats()["locked"].outcomes
        assert (outcomes["unauthenticated"], outcomes["denied"]) == (4, 3)
        refusals = [r.getMessage() for r in caplog.records if "to locked" in r.getMessage()]
        for door in ("http", "openai", "grpc", "native"):
            assert any(f"({door}) refused" in line for line in refusals), (door, refusals)


async def test_plaintext_binds_loopback_only(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "shoal.cli", "head", "--port", "0", "--http-port", "0", "--host", "0.0.0.0"]
    refused = await asyncio.to_thread(
        subprocess.run, [*base, "--state", str(tmp_path / "a")], capture_output=True, text=True, timeout=30
    )
    assert refused.returncode == 1
    assert "refusing to listen on 0.0.0.0 in plaintext" in refused.stderr and "--tls-dir" in refused.stderr
    # Its one line only: it used to log "plaintext on loopback (0.0.0.0) only" first.
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    # --insecure: it starts, and says so once.
    proc = subprocess.Popen(
        [*base, "--insecure", "--state", str(tmp_path / "b")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "b" / "endpoints.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert out.count("PLAINTEXT on 0.0.0.0 (--insecure)") == 1, out


async def test_allowed_model_dirs_refuse_at_deploy(tmp_path: Path) -> None:
    allowed = tmp_path / "models"
    allowed.mkdir()
    # The head checks the module file too: it must exist and define M.
    (allowed / "m.py").write_text("class M:\n    def predict(self, inputs):\n        return inputs\n")
    settings = local_settings(tmp_path, allowed_model_dirs=(str(allowed),))
    async with AsyncExitStack() as stack:
        _, address, _ = await start_head(settings, stack)
        client = ControlClient(address, settings)
        stack.push_async_callback(client.close)
        with pytest.raises(InvalidArgument, match="allowed_model_dirs"):
            await client.apply(parse_spec({"name": "evil", "backend": "python", "model": "os:system"}))
        with pytest.raises(InvalidArgument, match="allowed_model_dirs"):
            await client.apply(
                parse_spec({"name": "evil", "backend": "python", "model": "m:M", "base_dir": str(tmp_path)})
            )
        await client.apply(
            parse_spec(
                {"name": "ok", "backend": "python", "model": "m:M", "base_dir": str(allowed), "replicas": 0}
            )
        )


async def test_under_tls_the_rest_bootstrap_needs_a_cluster_client_certificate(tmp_path: Path) -> None:
    """Issue 13, item 3: under TLS, before any token exists, a change over HTTPS needs the
    cluster's client (or head) certificate; the caller's address, loopback included, is not
    enough, and a replica's certificate (every scheduler machine holds one) vouches for nothing.
    Reading needs no certificate, so a browser still shows the dashboard."""
    tls, other = tmp_path / "tls", tmp_path / "other"
    certs.init(tls)
    certs.init(other)
    spec = {"name": "echo", "backend": "python", "model": "echo:Echo", "replicas": 0}
    settings = local_settings(tmp_path, tls_dir=str(tls))

    def web(folder: Path | None, role: str = "client") -> httpx.AsyncClient:
        context = tls_context(tls)
        if folder is not None:
            context.load_cert_chain(str(folder / f"{role}.crt"), str(folder / f"{role}.key"))
        return httpx.AsyncClient(verify=context, base_url=f"https://{head_http}")

    async with AsyncExitStack() as stack:
        node, _, head_http = await start_head(settings, stack)
        async with web(None) as anonymous, web(tls, "replica") as replica, web(tls) as client:
            assert (await anonymous.get("/api/status")).status_code == 200
            for caller in (anonymous, replica):
                r = await caller.post("/api/deployments", json=spec)
                assert r.status_code == 403 and "client certificate" in r.json()["error"], r.text
            assert node.desired == {}

            r = await client.post("/api/deployments", json=spec)
            assert r.status_code == 201, r.text
            assert set(node.desired) == {"echo"}

            # Once a token exists, tokens decide, with or without a certificate.
            await node.create_token(Role.ADMIN, "root")
            assert (await client.delete("/api/deployments/echo")).status_code == 401

        # A certificate from another cluster's CA is refused by TLS (with TLS 1.3 the client
        # learns it on its first read): no HTTP answer at all.
        async with web(other) as stranger:
            with pytest.raises((httpx.ConnectError, httpx.ReadError)):
                await stranger.get("/api/status")

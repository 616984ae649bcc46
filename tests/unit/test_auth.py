"""Tokens, roles, the rate limiter, inference tokens, certificates, model folders and the
transport rule, without sockets: the HTTP apps are called through httpx's ASGI transport."""

from __future__ import annotations

import datetime
import os
import stat
import sys
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import pytest
from cryptography import x509

from shoal import auth, certs
from shoal.auth import InferenceAuth, RateLimiter, Role, TokenRegistry, check_control
from shoal.backends.python import PythonBackend
from shoal.config import Settings
from shoal.core import limits
from shoal.core.model_dirs import check_model_dirs, inside
from shoal.core.spec import DeploymentSpec, parse_spec
from shoal.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from shoal.head.node import HeadNode
from shoal.http.auth import InferenceGuard, control_role, model_in_body, model_in_path
from shoal.http.head import MAX_CONTROL_BODY, head_app, openapi_schema
from shoal.http.scheduler import scheduler_app
from shoal.rpc.tls import check_transport, tls_hint
from shoal.scheduler.node import SchedulerNode
from shoal.scheduler.router import Router
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeReplicas, FakeSchedulers
from shoal.types import DeploymentRoutes, HeadLink, RoutingTable

pytestmark = pytest.mark.timeout(20)


def spec(name: str = "echo", **changes: Any) -> DeploymentSpec:
    return parse_spec({"name": name, "backend": "python", "model": "m:M", **changes})


# ---------------------------------------------------------------- secrets and roles


def test_secrets_hashes_and_bearer() -> None:
    a, b = auth.new_secret(), auth.new_secret()
    assert a != b and a.startswith("shoal_") and len(a) > 40
    assert auth.hash_secret(a) == auth.hash_secret(a) != auth.hash_secret(b)
    assert auth.matches(a, [auth.hash_secret(b), auth.hash_secret(a)])
    assert not auth.matches(a, [auth.hash_secret(b)]) and not auth.matches(a, [])
    assert auth.bearer("Bearer abc") == "abc" == auth.bearer("bearer  abc ")
    for bad in (None, "", "abc", "Basic abc", "Bearer", "Bearer a b"):
        assert auth.bearer(bad) is None
    assert Role.parse("Deploy") is Role.DEPLOY and str(Role.ADMIN) == "admin"
    assert Role.INFER < Role.READ < Role.DEPLOY < Role.ADMIN
    with pytest.raises(InvalidArgument, match="roles: infer, read, deploy, admin"):
        Role.parse("root")
    assert auth.is_loopback("127.0.0.1") and auth.is_loopback("::1") and auth.is_loopback("localhost")
    assert not auth.is_loopback("10.0.0.1") and not auth.is_loopback("0.0.0.0") and not auth.is_loopback("x")


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    yield s
    await s.close()


async def test_registry_bootstrap_create_revoke_and_reload(store: MemoryStore) -> None:
    tokens = TokenRegistry(store, Settings().max_tokens)
    await tokens.load()
    assert tokens.empty
    with pytest.raises(FailedPrecondition, match="first token must have role admin"):
        await tokens.create(Role.READ, "reader")
    admin, admin_secret = await tokens.create(Role.ADMIN, "root")
    reader, reader_secret = await tokens.create(Role.READ)
    assert reader.name.startswith("read-") and reader.role is Role.READ
    with pytest.raises(AlreadyExists):
        await tokens.create(Role.READ, "root")
    with pytest.raises(InvalidArgument, match="token name"):
        await tokens.create(Role.READ, "Bad Name")
    assert tokens.authenticate(admin_secret) == admin
    assert tokens.authenticate(reader_secret) == reader
    assert tokens.authenticate("shoal_nope") is None
    # Only hashes are stored.
    stored = " ".join(e.value for e in await store.list(auth.TOKENS))
    assert admin_secret not in stored and admin.hash in stored
    again = TokenRegistry(store, Settings().max_tokens)
    await again.load()
    assert [r.name for r in again.list()] == sorted(["root", reader.name])
    await again.revoke(reader.name)
    assert again.authenticate(reader_secret) is None
    with pytest.raises(NotFound):
        await again.revoke(reader.name)
    assert again.hashes(["root", "nope"]) == (admin.hash,)


async def test_check_control_bootstrap_and_roles(store: MemoryStore) -> None:
    tokens = TokenRegistry(store, Settings().max_tokens)
    await tokens.load()
    # No token yet: open, except token management, which only the first create from loopback may do.
    assert check_control(tokens, None, Role.DEPLOY, what="x", loopback=False) is None
    assert check_control(tokens, None, Role.ADMIN, what="x", loopback=True, creates_token=True) is None
    with pytest.raises(PermissionDenied, match="on the head's machine"):
        check_control(tokens, None, Role.ADMIN, what="x", loopback=False, creates_token=True)
    with pytest.raises(PermissionDenied):
        check_control(tokens, None, Role.ADMIN, what="ListTokens", loopback=True)
    _, admin = await tokens.create(Role.ADMIN, "root")
    _, reader = await tokens.create(Role.READ, "reader")
    _, infer = await tokens.create(Role.INFER, "app")
    with pytest.raises(Unauthenticated, match="GetStatus needs a token"):
        check_control(tokens, None, Role.READ, what="GetStatus", loopback=True)
    with pytest.raises(Unauthenticated, match="unknown or revoked"):
        check_control(tokens, "Bearer shoal_wrong", Role.READ, what="GetStatus", loopback=True)
    with pytest.raises(PermissionDenied, match="needs role read or higher; token 'app' has role infer"):
        check_control(tokens, f"Bearer {infer}", Role.READ, what="GetStatus", loopback=True)
    with pytest.raises(PermissionDenied, match="needs role deploy"):
        check_control(tokens, f"Bearer {reader}", Role.DEPLOY, what="ApplyDeployment", loopback=True)
    rec = check_control(tokens, f"Bearer {admin}", Role.ADMIN, what="CreateToken", loopback=False)
    assert rec is not None and rec.name == "root"


def test_rate_limiter_buckets_per_client() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(5)] == [True, True, True, True, False]
    assert limiter.allow("b")  # another client, another bucket
    now[0] += 0.5  # one request's worth refilled
    assert limiter.allow("a") and not limiter.allow("a")
    assert "rate limit of 2 requests/s on the control API" in limiter.message
    assert all(RateLimiter(0).allow("a") for _ in range(1000))


def test_inference_auth_from_routing_tables() -> None:
    app, other = auth.new_secret(), auth.new_secret()
    specs = {"open": spec("open"), "locked": spec("locked", auth={"tokens": ["app"]})}
    checker = InferenceAuth(specs.get)
    checker.check("open", None)
    checker.check("unknown", None)  # NotFound later, where it is routed
    with pytest.raises(Unauthenticated):  # no table yet: fails closed
        checker.check("locked", f"Bearer {app}")
    table = RoutingTable(
        version=1,
        deployments={
            "locked": DeploymentRoutes(spec=specs["locked"], allowed_tokens=(auth.hash_secret(app),))
        },
        token_hashes=(auth.hash_secret(app), auth.hash_secret(other)),
    )
    checker.apply_table(table)
    checker.check("locked", f"Bearer {app}")
    with pytest.raises(Unauthenticated, match="needs a token"):
        checker.check("locked", None)
    with pytest.raises(Unauthenticated, match="unknown or revoked"):
        checker.check("locked", "Bearer shoal_nope")
    with pytest.raises(PermissionDenied, match="may not call deployment 'locked'"):
        checker.check("locked", f"Bearer {other}")


def test_spec_auth_field() -> None:
    s = spec(auth={"tokens": ["app", "ci.bot"]})
    assert s.auth is not None and s.auth.tokens == ("app", "ci.bot")
    assert s.process_hash() == spec().process_hash()  # changing tokens restarts nothing
    bads: list[dict[str, Any]] = [
        {"tokens": []},
        {"tokens": ["Bad Name"]},
        {"tokens": "app"},
        {"names": ["app"]},
    ]
    for bad in bads:
        with pytest.raises(InvalidArgument, match="auth"):
            spec(auth=bad)


# ---------------------------------------------------------------- the head


@pytest.fixture
async def head(store: MemoryStore) -> AsyncIterator[HeadNode]:
    node = HeadNode(Settings(control_rate_limit=0), store, FakeSchedulers())
    await node.tokens.load()
    yield node
    await node.aclose()


async def test_head_ships_token_hashes_and_checks_spec_tokens(head: HeadNode) -> None:
    with pytest.raises(InvalidArgument, match="unknown token"):
        await head.apply(spec(auth={"tokens": ["app"]}))
    await head.create_token(Role.ADMIN, "root")
    rec, _ = await head.create_token(Role.INFER, "app")
    await head.apply(spec(auth={"tokens": ["app"]}))
    table = head.routes
    assert table.deployments["echo"].allowed_tokens == (rec.hash,)
    assert rec.hash in table.token_hashes
    version = table.version
    await head.revoke_token("app")
    assert head.routes.version > version
    assert head.routes.deployments["echo"].allowed_tokens == ()
    assert rec.hash not in head.routes.token_hashes


async def test_head_refuses_models_outside_allowed_dirs(store: MemoryStore, tmp_path: Path) -> None:
    allowed = tmp_path / "models"
    allowed.mkdir()
    node = HeadNode(Settings(allowed_model_dirs=(str(allowed),)), store, FakeSchedulers())
    write_model(allowed, "m")
    try:
        await node.apply(spec(base_dir=str(allowed)))
        for bad in (
            spec(model="os:system"),  # no base_dir: an installed or built-in module
            spec(base_dir=str(tmp_path)),
            spec(base_dir=str(allowed / ".." / "elsewhere")),
            parse_spec({"name": "skl", "backend": "sklearn", "model": "/etc/passwd"}),
        ):
            with pytest.raises(InvalidArgument, match="setting allowed_model_dirs"):
                await node.apply(bad)
    finally:
        await node.aclose()


def operations() -> list[tuple[str, str, Role]]:
    """Every REST operation the head documents, with the role it needs."""
    out = []
    for path, item in openapi_schema()["paths"].items():
        for method in item:
            if method == "parameters":
                continue
            # A route needs a name no deployment has; its target is the deployment "echo".
            named = "canary" if path.startswith("/api/routes/") else "echo"
            concrete = path.replace("{name}", named).replace("{replica_id}", "echo-000000")
            role = control_role(method.upper(), concrete)
            assert role is not None, path
            out.append((method.upper(), concrete, role))
    return out


async def test_rest_routes_refuse_missing_wrong_and_low_tokens(
    head: HeadNode, rest: httpx.AsyncClient
) -> None:
    # No token yet: open (bootstrap).
    assert (await rest.get("/api/status")).status_code == 200
    secrets = {}
    _, secrets[Role.ADMIN] = await head.create_token(Role.ADMIN, "root")
    for role in (Role.INFER, Role.READ, Role.DEPLOY):
        _, secrets[role] = await head.create_token(role, str(role))
    await head.apply(spec(options={"v": 1}))
    await head.apply(spec())  # two revisions: a rollback has one to go back to
    body = {"name": "echo", "backend": "python", "model": "m:M", "replicas": 0}
    ops = operations()
    assert len(ops) >= 10
    for method, path, need in ops:
        json_body = (
            {"replicas": 1}
            if path.endswith("/scale")
            else {}
            if path.endswith("/rollback")
            else {"targets": {"echo": 100}}
            if method == "PUT" and path.startswith("/api/routes/")
            else body
            if method == "POST"
            else None
        )
        r = await rest.request(method, path, json=json_body)
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["www-authenticate"] == "Bearer" and "needs a token" in r.json()["error"]
        r = await rest.request(method, path, json=json_body, headers={"Authorization": "Bearer shoal_nope"})
        assert r.status_code == 401, (method, path)
        for role, secret in secrets.items():
            r = await rest.request(
                method, path, json=json_body, headers={"Authorization": f"Bearer {secret}"}
            )
            if role < need:
                assert r.status_code == 403, (method, path, role, r.text)
                assert f"needs role {need}" in r.json()["error"]
            else:
                assert r.status_code < 400 or r.status_code == 404, (method, path, role, r.text)
        if method == "DELETE":
            await head.apply(spec(options={"v": 1}))
            await head.apply(spec())
    # The dashboard's page and files, the health check and the schema stay open.
    for path in ("/", "/static/vendor/uPlot.min.css", "/healthz", "/openapi.json", "/docs"):
        assert (await rest.get(path)).status_code == 200, path


async def test_rest_rate_limit_and_body_limit(store: MemoryStore) -> None:
    node = HeadNode(Settings(control_rate_limit=5, max_message_mb=1), store, FakeSchedulers())
    await node.tokens.load()
    transport = httpx.ASGITransport(app=head_app(node))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            big = b'{"name": "' + b"x" * (2 * 1024 * 1024) + b'"}'
            r = await client.post("/api/deployments", content=big)
            assert r.status_code == 413 and "setting max_message_mb" in r.json()["error"]
            codes = [(await client.get("/api/events")).status_code for _ in range(12)]
            assert 429 in codes and codes.count(200) >= 9
            r = await client.get("/api/events")
            assert r.status_code == 429
            assert "rate limit of 5 requests/s on the control API" in r.json()["error"]
            assert (await client.get("/healthz")).status_code == 200  # not the control API
    finally:
        await node.aclose()


async def test_a_control_body_without_a_spec_is_bounded_far_below_a_message(store: MemoryStore) -> None:
    """Scale, rollback and route bodies are parsed on the head's loop: before, each could
    take max_message_mb (64 MiB, 1.8 s of json.loads); now 64 KiB, refused before parsing."""
    node = HeadNode(Settings(), store, FakeSchedulers())
    await node.tokens.load()
    await node.apply(spec())
    transport = httpx.ASGITransport(app=head_app(node))
    big = b'{"replicas": 2, "pad": "' + b"x" * (MAX_CONTROL_BODY) + b'"}'
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            for path in ("/api/deployments/echo/scale", "/api/deployments/echo/rollback", "/api/routes/r"):
                method = client.put if path.startswith("/api/routes") else client.post
                r = await method(path, content=big)
                assert r.status_code == 413, (path, r.text)
                assert f"over the limit of {MAX_CONTROL_BODY} bytes" in r.json()["error"], r.text
            r = await client.post("/api/deployments/echo/scale", json={"replicas": 2})
            assert r.status_code == 200, r.text
    finally:
        await node.aclose()


# ---------------------------------------------------------------- scheduler ingress


@pytest.fixture
async def ingress() -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    fakes = FakeReplicas()
    router = Router("s1", Settings(), fakes, policy="round_robin")
    node = SchedulerNode(
        Settings(max_message_mb=1, max_tensor_elements=100), "s1", cast(HeadLink, None), fakes, router=router
    )
    node.registered.set()
    locked = spec("locked", auth={"tokens": ["app"]})
    router.add("a", spec("open"), "a:9000", "s1")
    router.add("b", locked, "b:9000", "s1")
    secrets = {"app": auth.new_secret(), "other": auth.new_secret()}
    node.inference_auth.apply_table(
        RoutingTable(
            version=1,
            deployments={
                "open": DeploymentRoutes(spec("open")),
                "locked": DeploymentRoutes(locked, allowed_tokens=(auth.hash_secret(secrets["app"]),)),
            },
            token_hashes=tuple(auth.hash_secret(s) for s in secrets.values()),
        )
    )
    app = scheduler_app(node)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost"
    ) as client:
        yield client, secrets
    await router.aclose()


def infer_doc(rows: int = 1) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 4], "data": [0.0] * rows * 4}]}


async def test_ingress_tokens_per_deployment(ingress: tuple[httpx.AsyncClient, dict[str, str]]) -> None:
    client, secrets = ingress
    assert (await client.post("/v2/models/open/infer", json=infer_doc())).status_code == 200
    r = await client.post("/v2/models/locked/infer", json=infer_doc())
    assert r.status_code == 401 and "needs a token" in r.json()["error"]
    for path in ("/v2/models/locked", "/v2/models/locked/versions/1/ready", "/v2/models/locked/config"):
        assert (await client.get(path)).status_code == 401, path
    bad = {"Authorization": f"Bearer {secrets['other']}"}
    assert (await client.post("/v2/models/locked/infer", json=infer_doc(), headers=bad)).status_code == 403
    good = {"Authorization": f"Bearer {secrets['app']}"}
    r = await client.post("/v2/models/locked/infer", json=infer_doc(), headers=good)
    assert r.status_code == 200, r.text
    # The OpenAI API: the model is in the body; errors in OpenAI's shape.
    body = {"model": "locked", "input": "hello"}
    r = await client.post("/v1/embeddings", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert (await client.post("/v1/embeddings", json=body, headers=bad)).status_code == 403
    r = await client.post("/v1/embeddings", json=body, headers=good)
    assert r.status_code not in (401, 403), r.text  # past the guard (the echo model has no embeddings)
    assert (await client.get("/v1/models/locked")).status_code == 401
    assert (await client.get("/v1/models/locked", headers=good)).status_code == 200
    assert (await client.get("/v1/models")).status_code == 200
    # An OpenAI body over the size limit is refused by the guard, naming the setting.
    r = await client.post("/v1/embeddings", content=b"x" * (1024 * 1024 + 1))
    assert r.status_code == 413 and "max_message_mb" in r.json()["error"]["message"]


async def test_ingress_tensor_element_limit(ingress: tuple[httpx.AsyncClient, dict[str, str]]) -> None:
    client, _ = ingress
    r = await client.post("/v2/models/open/infer", json=infer_doc(rows=26))  # 104 elements > 100
    assert r.status_code == 400 and "setting max_tensor_elements" in r.json()["error"]
    # Declared big, carrying nothing: refused before anything is decoded.
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [10**12, 4], "data": []}]}
    r = await client.post("/v2/models/open/infer", json=doc)
    assert r.status_code == 400 and "max_tensor_elements" in r.json()["error"]
    assert (await client.post("/v2/models/open/infer", json=infer_doc(rows=25))).status_code == 200


@pytest.mark.parametrize(
    ("tokens_named", "reads"),
    [(((),), 0), (((), ("app",)), 1), ((("app",),), 0)],
    ids=["no deployment names tokens", "some do", "all do, the caller has none"],
)
async def test_the_openai_guard_reads_a_body_only_when_it_can_matter(
    tokens_named: tuple[tuple[str, ...], ...], reads: int
) -> None:
    """The OpenAI API names its deployment in the body. The guard read (and parsed) every
    POST body for it, a second time beside the route's own parse, even with no deployment
    naming tokens; and from callers without a token when every deployment names tokens, up
    to max_message_mb of JSON parsed on the event loop, only to refuse them."""
    specs = {
        f"d{i}": spec(f"d{i}", **({"auth": {"tokens": list(t)}} if t else {}))
        for i, t in enumerate(tokens_named)
    }
    checker = InferenceAuth(specs.get)
    known = auth.new_secret()
    checker.apply_table(
        RoutingTable(
            version=1,
            deployments={n: DeploymentRoutes(s) for n, s in specs.items()},
            token_hashes=(auth.hash_secret(known),),
        )
    )
    received: list[Any] = []
    answered: list[int] = []

    async def receive() -> dict[str, Any]:
        received.append(1)
        return {"type": "http.request", "body": b'{"model": "d0"}', "more_body": False}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answered.append(message["status"])

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"content-length", b"200000")],
    }
    await InferenceGuard(app, checker, limit=2**20)(scope, receive, send)
    assert len(received) == reads
    assert answered == [401 if tokens_named == (("app",),) else 200]


def test_element_counting() -> None:
    assert limits.elements([2, 3]) == 6 and limits.elements(()) == 1
    for bad in ("x", [2, -1], [2, "3"], [True], None):
        assert limits.elements(bad) == 0
    limits.check_elements([[10, 10]], 100)
    limits.check_elements([[10**20]], 0)
    with pytest.raises(InvalidArgument, match="over 100 elements"):
        limits.check_elements([[10, 10], [1]], 100)


async def test_ingress_paths_and_bodies() -> None:
    assert model_in_path("/v2/models/echo/infer") == "echo"
    assert model_in_path("/v2/models/echo/versions/1/generate") == "echo"
    assert model_in_path("/v2/models/stats") is None
    assert model_in_path("/v2/models/stats/ready") == "stats"
    assert model_in_path("/v1/models/org/model") == "org/model"
    assert model_in_path("/v1/models") is None and model_in_path("/v2") is None
    assert await model_in_body(b'{"model": "m", "input": "x"}', 1024) == "m"
    for body in (b"", b"[", b"[1]", b'{"model": 3}', b"\xff", b"[" * 100_000):
        assert await model_in_body(body, 1 << 20) is None


# ---------------------------------------------------------------- certificates and transport


def test_certs_init(tmp_path: Path) -> None:
    folder = tmp_path / "tls"
    written = certs.init(folder, ("10.1.2.3", "node.example"))
    assert {p.name for p in written} == {
        "ca.crt", "ca.key", *(f"{r}.{ext}" for r in certs.ROLES for ext in ("crt", "key"))
    }  # fmt: skip
    for p in written:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o600 if p.suffix == ".key" else 0o644), p
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    cert = x509.load_pem_x509_certificate((folder / "scheduler.crt").read_bytes())
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(alt.get_values_for_type(x509.DNSName)) == {
        "scheduler.shoal.cluster",
        certs.CLUSTER_NAME,
        "localhost",
        "node.example",
    }
    assert {str(a) for a in alt.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.1.2.3"}
    assert cert.subject.rfc4514_string().startswith("CN=shoal-scheduler")
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    with pytest.raises(AlreadyExists):
        certs.init(folder)
    certs.init(folder, force=True)
    (folder / "replica.key").unlink()
    with pytest.raises(InvalidArgument, match=r"has no replica\.key"):
        certs.files(folder, "replica")


def test_transport_rule(tmp_path: Path) -> None:
    check_transport(Settings())
    check_transport(Settings(host="::1"))
    with pytest.raises(InvalidArgument, match=r"refusing to listen on 0\.0\.0\.0 in plaintext"):
        check_transport(Settings(host="0.0.0.0"))
    check_transport(Settings(host="0.0.0.0", insecure=True))
    with pytest.raises(InvalidArgument, match="shoal certs init"):
        check_transport(Settings(host="0.0.0.0", tls_dir=str(tmp_path)), "head")
    certs.init(tmp_path)
    check_transport(Settings(host="0.0.0.0", tls_dir=str(tmp_path)), "head", "scheduler")


def test_a_certificate_folder_that_would_fail_every_handshake_is_refused_at_start(tmp_path: Path) -> None:
    """Before, only the files' presence was checked: the head started with another cluster's
    certificate, or one past its end, and every peer failed its handshakes; a key that was
    not the certificate's failed as "cannot listen on 127.0.0.1:0: Failed to bind"."""
    tls, other = tmp_path / "tls", tmp_path / "other"
    certs.init(tls)
    certs.init(other)
    cert = x509.load_pem_x509_certificate((tls / "head.crt").read_bytes())
    assert certs.check(tls, "head") == cert.not_valid_after_utc
    settings = Settings(tls_dir=str(tls))

    def refused(match: str) -> None:
        with pytest.raises(InvalidArgument, match=match):
            check_transport(settings, "head")

    with pytest.raises(InvalidArgument, match=r"head\.crt expired on .*shoal certs init --force"):
        certs.check(tls, "head", cert.not_valid_after_utc + datetime.timedelta(days=1))
    with pytest.raises(InvalidArgument, match=r"head\.crt is valid only from .* check the clock"):
        certs.check(tls, "head", cert.not_valid_before_utc - datetime.timedelta(days=1))
    good = {name: (tls / name).read_bytes() for name in ("head.crt", "head.key")}
    (tls / "head.key").write_bytes((tls / "scheduler.key").read_bytes())
    refused(r"head\.key is not the key of .*head\.crt")
    (tls / "head.key").write_text("not a key\n")
    refused(r"head\.key holds no private key")
    (tls / "head.crt").write_text("")
    refused(r"head\.crt holds no PEM certificate")
    for name in ("head.crt", "head.key"):
        (tls / name).write_bytes((other / name).read_bytes())
    refused(r"head\.crt was not signed by the cluster CA in .*ca\.crt")
    # Another role's pair, key and certificate matching: peers take a role from the common
    # name, so a scheduler holding the client's had its registration refused for good.
    for role in ("client", "scheduler"):
        for suffix in ("crt", "key"):
            (tls / f"head.{suffix}").write_bytes((tls / f"{role}.{suffix}").read_bytes())
        refused(
            rf"head\.crt is the certificate of shoal-{role}, not of the head "
            r"\(its common name must be shoal-head\)"
        )
    for name, data in good.items():
        (tls / name).write_bytes(data)
    check_transport(settings, "head")


def test_a_certificate_that_does_not_name_the_host_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """tritonclient, curl and browsers check the address they dial against the certificate;
    shoal's own clients do not, so nothing else would show it before users' calls fail."""
    certs.init(tmp_path, ("node.example", "10.0.0.6"))
    names = certs.names(tmp_path, "scheduler")
    for host in ("node.example", "NODE.example", "10.0.0.6", "127.0.0.1", "[::1]", "localhost"):
        assert certs.names_host(names, host), host
    for host in ("other.example", "10.0.0.7", "example"):
        assert not certs.names_host(names, host), host
    assert certs.names_host(["*.example"], "node.example") and not certs.names_host(
        ["*.example"], "a.b.example"
    )
    for host, advertise in (("0.0.0.0", "10.0.0.9"), ("::", ""), ("10.0.0.6", ""), ("node.example", "")):
        check_transport(Settings(host=host, advertise_host=advertise, tls_dir=str(tmp_path)), "scheduler")
    assert "does not name" not in caplog.text  # on every interface, users may dial any name
    check_transport(Settings(host="10.0.0.9", tls_dir=str(tmp_path)), "replica")  # shoal's own peers only
    assert "does not name" not in caplog.text
    check_transport(Settings(host="10.0.0.9", tls_dir=str(tmp_path)), "scheduler")
    assert "the scheduler certificate in" in caplog.text and "does not name 10.0.0.9" in caplog.text
    assert f"shoal certs init {tmp_path} --force --host 10.0.0.9" in caplog.text


def test_a_failed_handshake_says_what_to_check() -> None:
    """What a component logs when it cannot reach a peer over TLS (``tls_hint``)."""
    expired = "SSL_ERROR_SSL: error:1000007d:SSL routines:CERTIFICATE_VERIFY_FAILED: certificate has expired"
    assert "the server's certificate has run out" in tls_hint(expired)
    plaintext = "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: WRONG_VERSION_NUMBER"
    assert "the server does not speak TLS" in tls_hint(plaintext)
    other_ca = "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate"
    assert "same cluster CA" in tls_hint(other_ca)
    assert tls_hint("Socket closed") == tls_hint("Socket closed", tls=True) == "Socket closed"
    assert "give this process its --tls-dir" in tls_hint("Socket closed", tls=False)


def test_security_settings_from_env_and_file(tmp_path: Path) -> None:
    env = {
        "SHOAL_TOKEN": "shoal_x",
        "SHOAL_INSECURE": "1",
        "SHOAL_ALLOWED_MODEL_DIRS": f"/a{os.pathsep}/b",
        "SHOAL_TLS_DIR": "/certs",
        "SHOAL_MAX_TENSOR_ELEMENTS": "7",
        "SHOAL_CONTROL_RATE_LIMIT": "0",
    }
    s = Settings.load(env=env)
    assert (s.token, s.insecure, s.tls_dir) == ("shoal_x", True, "/certs")
    assert s.allowed_model_dirs == ("/a", "/b") and s.max_tensor_elements == 7 and s.control_rate_limit == 0
    file = tmp_path / "s.yaml"
    file.write_text("allowed_model_dirs: [/m]\nmax_concurrent_streams: 8\n")
    s = Settings.load(file=file, env={}, flags={"allowed_model_dirs": ["/n", "/o"]})
    assert s.allowed_model_dirs == ("/n", "/o") and s.max_concurrent_streams == 8
    file.write_text("allowed_model_dirs: [1, 2]\n")
    with pytest.raises(InvalidArgument, match="list of strings"):
        Settings.load(file=file, env={})


# ---------------------------------------------------------------- model folders


def write_model(folder: Path, module: str = "mymodel") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text("class M:\n    def predict(self, inputs):\n        return inputs\n")


def test_model_dirs(tmp_path: Path) -> None:
    allowed = tmp_path / "ok"
    write_model(allowed)
    (tmp_path / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    assert inside(allowed / "mymodel.py", [str(allowed)])
    assert not inside(tmp_path / "link" / "x.py", [str(allowed)])
    check_model_dirs(spec(model="os:system"), [])  # no setting: anything goes
    check_model_dirs(spec(base_dir=str(allowed)), [str(allowed)])
    onnx = parse_spec({"name": "o", "backend": "onnx", "model": "m.onnx", "base_dir": str(allowed)})
    check_model_dirs(onnx, [str(allowed)])
    (allowed / "escape").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(InvalidArgument, match="allowed_model_dirs"):
        check_model_dirs(spec(base_dir=str(allowed / "escape")), [str(allowed)])


def load_python(model: str, base_dir: Path, allowed: tuple[str, ...]) -> PythonBackend:
    backend = PythonBackend(spec(model=model, base_dir=str(base_dir)))
    backend.allowed_dirs = allowed
    backend.load()
    return backend


def test_python_backend_imports_only_allowed_files(tmp_path: Path) -> None:
    allowed = tmp_path / "ok"
    write_model(allowed, "shoal_test_allowed_model")
    backend = load_python("shoal_test_allowed_model:M", allowed, (str(allowed),))
    assert backend.loaded
    backend.unload()
    # Names that resolve to installed or built-in modules are refused before anything runs.
    for target in ("os:system", "subprocess:Popen", "posix:system", "json:loads"):
        with pytest.raises(InvalidArgument, match="allowed_model_dirs"):
            load_python(target, allowed, (str(allowed),))
    # A file shadowing a module that is already imported still loads that module: refused.
    write_model(allowed, "json")
    with pytest.raises(InvalidArgument, match="loaded from"):
        load_python("json:M", allowed, (str(allowed),))
    sys.path.remove(str(allowed))


def test_no_request_path_unpickles() -> None:
    """Requests never reach pickle: only the sklearn backend loads a pickle, the spec's own file."""
    root = Path(__file__).resolve().parents[2] / "shoal"
    users = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if any(w in p.read_text() for w in ("import pickle", "pickle.load", "joblib.load", "torch.load"))
    )
    assert users == ["backends/sklearn.py"], users
    text = "".join(p.read_text() for p in root.rglob("*.py"))
    assert "allow_pickle=True" not in text and "import dill" not in text and "cloudpickle" not in text


def test_numpy_decoding_has_no_object_pickles() -> None:
    # tensors decode with frombuffer into fixed dtypes; BYTES become bytes objects, never unpickled.
    from shoal.core import tensors

    arr = tensors.from_bytes("BYTES", (1,), b"\x03\x00\x00\x00abc")
    assert arr.dtype == object and arr[0] == b"abc"
    assert np.frombuffer(b"\x00" * 4, dtype=np.float32).shape == (1,)


class _Context:
    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


def test_grpc_peer_addresses_and_rules() -> None:
    from shoal.rpc.auth import (
        DENY,
        HEAD_RULES,
        OPEN,
        REPLICA_RULES,
        SCHEDULER_RULES,
        Control,
        Peer,
        _rule,
        peer_host,
    )

    hosts = {
        "ipv4:127.0.0.1:5000": "127.0.0.1",
        "ipv6:[::1]:5000": "::1",
        "ipv6:%5B::1%5D:5000": "::1",
        "ipv4:10.0.0.7:1": "10.0.0.7",
        "unix:/tmp/sock": "localhost",
    }
    for peer, host in hosts.items():
        assert peer_host(cast(Any, _Context(peer))) == host, peer
    assert _rule(HEAD_RULES, "/shoal.v1.Head/GetStatus") == Control(Role.READ)
    assert _rule(HEAD_RULES, "/shoal.v1.Head/RegisterScheduler") == Peer("scheduler")
    assert _rule(HEAD_RULES, "/shoal.v1.Head/SomethingNew") is DENY  # fails closed
    assert _rule(SCHEDULER_RULES, "/shoal.v1.Scheduler/CreateReplica") == Peer("head")
    assert _rule(SCHEDULER_RULES, "/shoal.v1.Scheduler/SendRequest") is OPEN  # tokens per deployment
    assert _rule(SCHEDULER_RULES, "/shoal.v1.Scheduler/SomethingNew") is DENY  # fails closed
    assert _rule(REPLICA_RULES, "/shoal.v1.Replica/PushTasks") == Peer("scheduler")


def test_a_certificate_near_its_end_is_warned_of_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/security.md: a component warns at start when its certificate runs out within
    EXPIRY_WARNING_DAYS, and says how to renew it (renewed files are taken without a restart)."""
    certs.init(tmp_path)
    settings = Settings(tls_dir=str(tmp_path))
    with caplog.at_level("WARNING", logger="shoal"):
        check_transport(settings, "head")
    assert not [r for r in caplog.records if "runs out" in r.getMessage()]
    monkeypatch.setattr(certs, "EXPIRY_WARNING_DAYS", certs.VALID_DAYS + 1)
    with caplog.at_level("WARNING", logger="shoal"):
        check_transport(settings, "head")
    (warning,) = [r.getMessage() for r in caplog.records if "runs out" in r.getMessage()]
    assert warning.startswith(f"the head certificate in {tmp_path} runs out in ")
    assert f"shoal certs renew {tmp_path}" in warning and "without a restart" in warning

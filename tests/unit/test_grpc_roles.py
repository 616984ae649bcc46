"""Who may call each gRPC method, for every method of every service each server runs (read
from the services' descriptors, so a method added later is in the table or fails here), as
``docs/security.md`` states it: each caller (a certificate of each role, with TLS) with each
token (none, each role), through the servers' own interceptor checks.

Before, a method added to the scheduler's ``Scheduler`` service without a rule was open to
any cluster certificate (the head's services failed closed; the scheduler's did not).
"""

from __future__ import annotations

from typing import Any, cast

import pytest

from shoal.auth import Role, TokenRegistry
from shoal.errors import ShoalError
from shoal.proto import grpc_service_pb2 as oip
from shoal.proto import shoal_pb2 as pb
from shoal.rpc.auth import HEAD_RULES, REPLICA_RULES, SCHEDULER_RULES, AuthInterceptor, Rule, _rule
from shoal.store import MemoryStore

pytestmark = pytest.mark.timeout(10)

CERTS = ("head", "scheduler", "replica", "client")
TOKENS: tuple[Role | None, ...] = (None, *Role)

# What each method admits: ("cert", roles), ("token", role), ("cert or token", roles, role),
# "open" (the servicer checks the deployment's token) or "deny".
HEAD = "cert", ("head",)
SCHEDULER = "cert", ("scheduler",)
COMPONENTS = "cert", ("scheduler", "head")
READ, DEPLOY, ADMIN = ("token", Role.READ), ("token", Role.DEPLOY), ("token", Role.ADMIN)

EXPECTED: dict[str, dict[str, dict[str, Any]]] = {
    "head": {
        "shoal.v1.Head": {
            **dict.fromkeys(
                ("RegisterScheduler", "SendHealthUpdate", "StreamHealth", "WatchRoutes"), SCHEDULER
            ),
            **dict.fromkeys(("GetStatus", "ReadLog", "GetHistory", "ListEvents", "ListRoutes"), READ),
            **dict.fromkeys(
                (
                    "ApplyDeployment",
                    "ScaleDeployment",
                    "DeleteDeployment",
                    "RollbackDeployment",
                    "RestartDeployment",
                    "SetRoute",
                    "DeleteRoute",
                ),
                DEPLOY,
            ),
            **dict.fromkeys(("CreateToken", "ListTokens", "RevokeToken"), ADMIN),
        },
        "shoal.v1.Blob": {
            "Upload": DEPLOY,
            "Stat": ("cert or token", ("scheduler", "head"), Role.DEPLOY),
            "Download": COMPONENTS,
        },
    },
    "scheduler": {
        "shoal.v1.Scheduler": {
            **dict.fromkeys(("CreateReplica", "RemoveReplica", "ReadLog"), HEAD),
            **dict.fromkeys(("RegisterReplica", "SendHealthUpdate"), ("cert", ("replica",))),
            "SendRequest": "open",
        },
        "shoal.v1.Ingress": dict.fromkeys(("WatchIngress", "ReportIngress", "RenderMetrics"), SCHEDULER),
        "shoal.v1.Blob": {"Download": COMPONENTS, "Upload": "deny", "Stat": "deny"},
        "inference.GRPCInferenceService": dict.fromkeys(
            oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name, "open"
        ),
    },
    "replica": {
        "shoal.v1.Replica": dict.fromkeys(
            pb.DESCRIPTOR.services_by_name["Replica"].methods_by_name, SCHEDULER
        )
    },
}
RULES = {"head": HEAD_RULES, "scheduler": SCHEDULER_RULES, "replica": REPLICA_RULES}


def admits(expected: Any, cert: str, token: Role | None) -> bool:
    if expected in ("open", "deny"):
        return bool(expected == "open")
    kind, *args = expected
    by_cert = kind != "token" and cert in args[0]
    by_token = kind != "cert" and token is not None and token >= args[-1]
    return by_cert or by_token


class Caller:
    """A call's context as the interceptor reads it: a certificate of a role, maybe a token."""

    def __init__(self, cert: str, secret: str | None) -> None:
        self.cert, self.secret = cert, secret

    def peer(self) -> str:
        return "ipv4:10.0.0.9:5000"

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_common_name": [f"shoal-{self.cert}".encode()]}

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.secret}"),) if self.secret else ()


def allowed(guard: AuthInterceptor, rule: Rule | None, method: str, caller: Caller) -> bool:
    if rule is None:
        return True
    try:
        guard._check(rule, method, cast(Any, caller))
    except ShoalError:
        return False
    return True


async def test_every_method_of_every_served_service_admits_whom_the_docs_say() -> None:
    served = {
        "head": [pb.DESCRIPTOR.services_by_name[s] for s in ("Head", "Blob")],
        "scheduler": [
            *(pb.DESCRIPTOR.services_by_name[s] for s in ("Scheduler", "Ingress", "Blob")),
            oip.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        ],
        "replica": [pb.DESCRIPTOR.services_by_name["Replica"]],
    }
    tokens = TokenRegistry(MemoryStore(), limit=10)
    secrets: dict[Role | None, str | None] = {None: None}
    for role in reversed(Role):  # the first token is an admin's
        _, secrets[role] = await tokens.create(role, str(role))
    checked = 0
    for server, services in served.items():
        guard = AuthInterceptor(RULES[server], tls=True, tokens=tokens)
        for service in services:
            table = EXPECTED[server][service.full_name]
            assert set(table) == set(service.methods_by_name), (server, service.full_name)
            for name in service.methods_by_name:
                method = f"/{service.full_name}/{name}"
                rule = _rule(RULES[server], method)
                for cert in CERTS:
                    for token in TOKENS:
                        got = allowed(guard, rule, method, Caller(cert, secrets[token]))
                        assert got == admits(table[name], cert, token), (server, method, cert, token)
                        checked += 1
    assert checked > 500
    # A method no rule names fails closed on the head's and the scheduler's own services.
    for server, prefix in (("head", "/shoal.v1.Head/"), ("scheduler", "/shoal.v1.Scheduler/")):
        guard = AuthInterceptor(RULES[server], tls=True, tokens=tokens)
        rule = _rule(RULES[server], prefix + "SomethingNew")
        assert not allowed(guard, rule, prefix + "SomethingNew", Caller("head", secrets[Role.ADMIN]))

"""Who may call which gRPC method: a server interceptor over the rules in ``shoal.auth``.

Two kinds of rule:

* :class:`Control`: a call of the head's control API. It needs a bearer token of at least
  a role (``authorization`` metadata) once any token exists, and takes from the caller's
  rate-limit bucket.
* :class:`Peer`: a call between components. With TLS on, only a certificate of the named
  role may make it (its common name, ``shoal-<role>``); the TLS layer has already checked
  that the certificate comes from the cluster CA. Without TLS nothing is checked (the
  cluster listens on loopback only, or was told ``--insecure``).

* :class:`PeerOr`: either: a component of the role (its certificate), or a control client
  with a token of at least a role. Without TLS, nothing is checked, as for :class:`Peer`
  (the head's ``Blob/Stat``, which schedulers and ``shoal deploy`` both ask).

* :data:`OPEN`: no check here: the servicer checks (inference, per deployment, by
  ``InferenceAuth``, which knows the model a request names).

Calls no rule names pass untouched, except under a prefix marked :data:`DENY`: a method
added to the head's or the scheduler's service without a rule is refused, not opened (the
Open Inference Protocol's service has no rule: each of its methods is open or checked by
its servicer).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from shoal.auth import RateLimiter, Role, TokenRegistry, check_control, client_key, is_loopback
from shoal.certs import common_name
from shoal.errors import PermissionDenied, ResourceExhausted, ShoalError
from shoal.rpc.handlers import wrap_handler
from shoal.rpc.status import Context, abort


@dataclass(frozen=True)
class Control:
    role: Role
    creates_token: bool = False


@dataclass(frozen=True)
class Peer:
    role: str
    also: str = ""  # a second role that may call too

    def admits(self, names: list[str]) -> bool:
        return common_name(self.role) in names or bool(self.also and common_name(self.also) in names)


@dataclass(frozen=True)
class PeerOr:
    role: str
    control: Control
    also: str = ""  # a second role that may call too


@dataclass(frozen=True)
class Deny:
    pass


@dataclass(frozen=True)
class Open:
    pass


Rule = Control | Peer | PeerOr | Deny | Open
DENY = Deny()
OPEN = Open()

HEAD_RULES: dict[str, Rule] = {
    "/shoal.v1.Head/RegisterScheduler": Peer("scheduler"),
    "/shoal.v1.Head/SendHealthUpdate": Peer("scheduler"),
    "/shoal.v1.Head/StreamHealth": Peer("scheduler"),
    "/shoal.v1.Head/WatchRoutes": Peer("scheduler"),
    "/shoal.v1.Head/GetStatus": Control(Role.READ),
    "/shoal.v1.Head/ReadLog": Control(Role.READ),
    "/shoal.v1.Head/ApplyDeployment": Control(Role.DEPLOY),
    "/shoal.v1.Head/ScaleDeployment": Control(Role.DEPLOY),
    "/shoal.v1.Head/DeleteDeployment": Control(Role.DEPLOY),
    "/shoal.v1.Head/GetHistory": Control(Role.READ),
    "/shoal.v1.Head/ListEvents": Control(Role.READ),
    "/shoal.v1.Head/RollbackDeployment": Control(Role.DEPLOY),
    "/shoal.v1.Head/RestartDeployment": Control(Role.DEPLOY),
    "/shoal.v1.Head/SetRoute": Control(Role.DEPLOY),
    "/shoal.v1.Head/DeleteRoute": Control(Role.DEPLOY),
    "/shoal.v1.Head/ListRoutes": Control(Role.READ),
    "/shoal.v1.Head/CreateToken": Control(Role.ADMIN, creates_token=True),
    "/shoal.v1.Head/ListTokens": Control(Role.ADMIN),
    "/shoal.v1.Head/RevokeToken": Control(Role.ADMIN),
    "/shoal.v1.Head/": DENY,
    # The cluster's artifact store (shoal.rpc.blobs).
    "/shoal.v1.Blob/Upload": Control(Role.DEPLOY),
    # Heads too: a standby copies every blob from the leader (shoal.head.blob_mirror).
    "/shoal.v1.Blob/Stat": PeerOr("scheduler", Control(Role.DEPLOY), also="head"),
    "/shoal.v1.Blob/Download": Peer("scheduler", also="head"),
    "/shoal.v1.Blob/": DENY,
}
SCHEDULER_RULES: dict[str, Rule] = {
    "/shoal.v1.Scheduler/CreateReplica": Peer("head"),
    "/shoal.v1.Scheduler/RemoveReplica": Peer("head"),
    "/shoal.v1.Scheduler/ReadLog": Peer("head"),
    "/shoal.v1.Scheduler/RegisterReplica": Peer("replica"),
    "/shoal.v1.Scheduler/SendHealthUpdate": Peer("replica"),
    # Native inference: any cluster certificate, and the deployment's token when its spec
    # asks for one (checked by the servicer).
    "/shoal.v1.Scheduler/SendRequest": OPEN,
    "/shoal.v1.Scheduler/": DENY,
    # The scheduler's own ingress workers (they hold the scheduler's certificate).
    "/shoal.v1.Ingress/": Peer("scheduler"),
    # Peers fetching blobs from this scheduler's artifact cache (and a head missing one).
    "/shoal.v1.Blob/Download": Peer("scheduler", also="head"),
    "/shoal.v1.Blob/": DENY,
    # The Open Inference Protocol: any cluster certificate, and the deployment's token when
    # its spec asks for one (checked by the servicer).
}
REPLICA_RULES: dict[str, Rule] = {"/shoal.v1.Replica/": Peer("scheduler")}


def _rule(rules: Mapping[str, Rule], method: str) -> Rule | None:
    rule = rules.get(method)
    if rule is not None:
        return rule
    for prefix, r in rules.items():
        if prefix.endswith("/") and method.startswith(prefix):
            return r
    return None


def authorization(context: Context) -> str | None:
    """The call's ``authorization`` metadata, if any."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def peer_host(context: Context) -> str:
    """The caller's address without its port (``unix`` peers count as loopback)."""
    peer = urllib.parse.unquote(context.peer() or "")
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return "localhost"
    if kind == "ipv6":
        return rest.rpartition("]")[0].lstrip("[") if "]" in rest else rest
    return rest.rpartition(":")[0] or rest


def is_peer(context: Context, role: str) -> bool:
    """Whether the caller holds ``role``'s certificate (never, without TLS)."""
    return common_name(role) in _peer_names(context)


def _peer_names(context: Context) -> list[str]:
    names = context.auth_context().get("x509_common_name", [])
    return [n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in names]


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class AuthInterceptor(_Interceptor):
    """Applies ``rules`` (method -> rule; keys ending in ``/`` are prefixes) to every call.

    ``tokens`` and ``limiter`` are needed when a rule is :class:`Control` (the head).
    """

    def __init__(
        self,
        rules: Mapping[str, Rule],
        *,
        tls: bool,
        tokens: TokenRegistry | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self._rules = dict(rules)
        self._tls = tls
        self._tokens = tokens
        self._limiter = limiter

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        wrapped: grpc.RpcMethodHandler[Any, Any] = self.wrap(details.method, await continuation(details))
        return wrapped

    def wrap(self, method: str, handler: Any) -> Any:
        """``handler`` with ``method``'s rule checked on each call (the same wrapper for every
        call: ``shoal.rpc.server`` wraps each method once, when it is registered)."""
        rule = _rule(self._rules, method)
        if (
            handler is None
            or rule is None
            or isinstance(rule, Open)
            or (isinstance(rule, Peer | PeerOr) and not self._tls)
        ):
            return handler

        async def check(context: Context) -> None:
            try:
                self._check(rule, method, context)
            except ShoalError as err:
                await abort(context, err)

        return _wrap(handler, check)

    def _check(self, rule: Rule, method: str, context: Context) -> None:
        name = method.rsplit("/", 1)[-1]
        if isinstance(rule, Open):
            return
        if isinstance(rule, Deny):
            raise PermissionDenied(f"{name} is not open to callers")
        if isinstance(rule, Peer):
            names = _peer_names(context)
            if not rule.admits(names):
                who = ", ".join(names) or "none"
                whom = f"{rule.role} or the {rule.also}" if rule.also else rule.role
                raise PermissionDenied(f"{name} is for the {whom}; the caller's certificate is {who}")
            return
        if isinstance(rule, PeerOr):
            if Peer(rule.role, rule.also).admits(_peer_names(context)):
                return
            rule = rule.control
        assert self._tokens is not None
        host = peer_host(context)
        error: ShoalError | None = None
        token = None
        try:
            token = check_control(
                self._tokens,
                authorization(context),
                rule.role,
                what=name,
                loopback=is_loopback(host),
                creates_token=rule.creates_token,
            )
        except ShoalError as err:
            error = err
        if self._limiter is not None and not self._limiter.allow(client_key(token, host)):
            raise ResourceExhausted(self._limiter.message)
        if error is not None:
            raise error


def _wrap(handler: Any, check: Callable[[Context], Awaitable[None]]) -> Any:
    """``handler`` with ``check(context)`` run before its behaviour (it aborts the call to refuse it)."""

    async def before(request: Any, context: Context) -> None:
        await check(context)

    return wrap_handler(handler, before)

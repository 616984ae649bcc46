"""Who may do what: bearer tokens with roles, the rules of the control API, per-deployment
inference tokens, and the control API's rate limiter. Plain Python: the gRPC interceptor
(``shoal.rpc.auth``) and the HTTP middleware (``shoal.http.auth``) are thin adapters over it.

Tokens. A token is a random secret (``secrets.token_urlsafe``) shown once, when it is
created; the head keeps only its SHA-256 (``tokens/<name>`` in its store) and compares
hashes with ``hmac.compare_digest``. Each token has a name and a role; roles are ordered,
each allowing what the ones before it allow:

=========  =====================================================================
``infer``  inference on the deployments whose spec names the token (``auth.tokens``)
``read``   status, events, series, metrics, replica logs
``deploy`` + create, update, scale and delete deployments
``admin``  + create, list and revoke tokens
=========  =====================================================================

Bootstrap. While no token exists the control API is open to whoever can reach it (loopback
only in plaintext; holders of a cluster client certificate with TLS), except token
management: the first token must have role ``admin`` and be created from the head's own
machine (a loopback peer). From then on every control call needs a token.

Errors: :class:`~shoal.errors.Unauthenticated` (no token, or an unknown one) and
:class:`~shoal.errors.PermissionDenied` (the token's role is too low, or the token is not
one the deployment names).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from shoal.core.spec import DeploymentSpec
from shoal.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LimitReached,
    NotFound,
    PermissionDenied,
    ShoalError,
    Unauthenticated,
)
from shoal.store.base import Store
from shoal.types import RoutingTable

log = logging.getLogger("shoal.auth")

TOKENS = "tokens/"
TOKEN_PREFIX = "shoal_"
_NAME = re.compile(r"^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?$")


class Role(enum.IntEnum):
    """Ordered: a role allows everything the roles below it allow."""

    INFER = 0
    READ = 1
    DEPLOY = 2
    ADMIN = 3

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            known = ", ".join(str(r) for r in cls)
            raise InvalidArgument(f"unknown role {text!r}; roles: {known}") from None


# ---------------------------------------------------------------- secrets


def new_secret() -> str:
    """A fresh token: 256 random bits, URL-safe, with a recognisable prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """What the head stores and ships to schedulers: the hex SHA-256 of the secret.

    The secret is 256 random bits, so an unsalted fast hash is enough: nobody can guess
    a secret from its hash, and no password is ever hashed here.
    """
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, hashes: Iterable[str]) -> bool:
    """Whether ``secret`` hashes to one of ``hashes``; compares with every one, in constant time each."""
    digest = hash_secret(secret)
    found = False
    for h in hashes:
        found |= hmac.compare_digest(digest, h)
    return found


def bearer(authorization: str | None) -> str | None:
    """The token in an ``Authorization: Bearer <token>`` value; None when absent or malformed."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address or ``localhost``) is this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class TokenRecord:
    name: str
    role: Role
    hash: str
    created: float

    def to_json(self) -> str:
        doc = {"name": self.name, "role": str(self.role), "hash": self.hash, "created": self.created}
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> TokenRecord:
        doc = json.loads(text)
        return cls(doc["name"], Role.parse(doc["role"]), doc["hash"], float(doc["created"]))


class TokenRegistry:
    """The head's tokens, in its store under ``tokens/`` and cached in memory.

    ``load()`` once at start-up; then every method may be called concurrently (one event loop).
    """

    def __init__(self, store: Store, limit: int) -> None:
        self._store = store
        self.limit = limit  # setting max_tokens: ``create`` makes none past it
        self._by_name: dict[str, TokenRecord] = {}
        # Names of stored tokens whose rows do not parse: they authenticate nobody, but
        # count as tokens, so that a damaged row never reopens the bootstrap.
        self.unreadable: set[str] = set()
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        """Read the tokens from the store. A row that does not parse is logged and kept out
        (see ``unreadable``); ``revoke`` removes it."""
        self._by_name, self.unreadable = {}, set()
        for entry in await self._store.list(TOKENS):
            name = entry.key.removeprefix(TOKENS)
            try:
                rec = TokenRecord.from_json(entry.value)
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError, ShoalError) as err:
                log.error(
                    "token %s: the stored row %r cannot be read (%s); it authenticates nobody",
                    name,
                    entry.key,
                    err,
                )
                self.unreadable.add(name)
                continue
            self._by_name[rec.name] = rec

    @property
    def empty(self) -> bool:
        return not self._by_name and not self.unreadable

    def list(self) -> list[TokenRecord]:
        return sorted(self._by_name.values(), key=lambda r: r.name)

    def get(self, name: str) -> TokenRecord | None:
        return self._by_name.get(name)

    async def create(self, role: Role, name: str = "") -> tuple[TokenRecord, str]:
        """A new token; returns its record and its secret (which is not kept anywhere).

        The first token must have role admin (FailedPrecondition otherwise); AlreadyExists
        for a name in use; InvalidArgument for a bad name; LimitReached when ``limit`` tokens
        exist (unreadable rows count: they are in the store).
        """
        async with self._lock:
            if self.empty and role != Role.ADMIN:
                raise FailedPrecondition(
                    "the first token must have role admin (shoal token create --role admin)"
                )
            if not name:
                name = f"{role}-{secrets.token_hex(3)}"
            if not _NAME.match(name):
                raise InvalidArgument(
                    f"token name {name!r}: lowercase letters, digits, '-', '_' and '.', at most 63"
                )
            if name in self._by_name:
                raise AlreadyExists(f"a token named {name!r} exists; revoke it first or pick another name")
            held = len(self._by_name) + len(self.unreadable)
            if held >= self.limit:
                raise LimitReached.count(
                    "token",
                    held,
                    "max_tokens",
                    name,
                    "revoke tokens no longer used ('shoal token revoke NAME')",
                )
            secret = new_secret()
            rec = TokenRecord(name, role, hash_secret(secret), time.time())
            await self._store.put(TOKENS + name, rec.to_json())
            self._by_name[name] = rec
        return rec, secret

    async def revoke(self, name: str) -> None:
        async with self._lock:
            if name not in self._by_name and name not in self.unreadable:
                raise NotFound(f"no token named {name!r}")
            await self._store.delete(TOKENS + name)
            self._by_name.pop(name, None)
            self.unreadable.discard(name)

    def authenticate(self, secret: str) -> TokenRecord | None:
        """The token whose secret this is, or None. Compares with every token's hash."""
        digest = hash_secret(secret)
        found: TokenRecord | None = None
        for rec in self._by_name.values():
            if hmac.compare_digest(digest, rec.hash):
                found = rec
        return found

    def hashes(self, names: Iterable[str] | None = None) -> tuple[str, ...]:
        """Hashes of the named tokens that exist (every token when ``names`` is None), sorted."""
        recs = self._by_name.values() if names is None else (self._by_name.get(n) for n in names)
        return tuple(sorted(r.hash for r in recs if r is not None))


# ---------------------------------------------------------------- the control API


def check_control(
    tokens: TokenRegistry,
    authorization: str | None,
    need: Role,
    *,
    what: str,
    loopback: bool,
    creates_token: bool = False,
    vouched: bool = True,
) -> TokenRecord | None:
    """Whether a control call needing role ``need`` may go ahead; returns the caller's token
    (None while no token exists). Raises Unauthenticated or PermissionDenied.

    ``what`` names the call in the error; ``loopback``: the caller is on this machine;
    ``creates_token``: the call creates a token (the bootstrap exception); ``vouched``: the
    transport vouches for the caller without a token (gRPC: with TLS, a cluster client
    certificate; without, a loopback-only or ``--insecure`` server; HTTPS: a client or head
    certificate, which the server asks for but browsers need not send). While no token
    exists, a caller neither vouched for nor on this machine may only read.
    """
    if tokens.empty:
        if need >= Role.DEPLOY and need < Role.ADMIN and not (vouched or loopback):
            raise PermissionDenied(
                f"{what}: no token exists yet, and without one changes are taken only with a "
                "cluster client certificate (gRPC, or HTTPS with client.crt) or, without TLS, from "
                "the head's machine; create the first token (shoal token create --role admin) "
                "and send it"
            )
        if need < Role.ADMIN:
            return None
        if creates_token and loopback:
            return None
        raise PermissionDenied(
            f"{what}: no token exists yet; create the first one (role admin) on the head's machine: "
            "shoal token create --role admin"
        )
    secret = bearer(authorization)
    if secret is None:
        raise Unauthenticated(
            f"{what} needs a token: send 'Authorization: Bearer <token>' (--token, SHOAL_TOKEN)"
        )
    rec = tokens.authenticate(secret)
    if rec is None:
        raise Unauthenticated(f"{what}: unknown or revoked token")
    if rec.role < need:
        raise PermissionDenied(f"{what} needs role {need} or higher; token {rec.name!r} has role {rec.role}")
    return rec


# ---------------------------------------------------------------- inference


def required_tokens(spec: DeploymentSpec) -> tuple[str, ...]:
    """Names of the tokens that may call ``spec``'s deployment; empty: no token needed."""
    return spec.auth.tokens if spec.auth is not None else ()


class InferenceAuth:
    """A scheduler's check of inference tokens, fed by the head's routing tables.

    A deployment whose spec has ``auth.tokens`` accepts only those tokens (their hashes come
    with the routing table); until a table has named them, it accepts none (fails closed).
    """

    def __init__(self, spec_of: Callable[[str], DeploymentSpec | None]) -> None:
        self._spec_of = spec_of
        self._known: frozenset[str] = frozenset()
        self._allowed: dict[str, frozenset[str]] = {}
        self._any_locked = False
        self._all_locked = False

    def apply_table(self, table: RoutingTable) -> None:
        self._known = frozenset(table.token_hashes)
        self._allowed = {name: frozenset(d.allowed_tokens) for name, d in table.deployments.items()}
        locked = [bool(required_tokens(d.spec)) for d in table.deployments.values()]
        self._any_locked = any(locked)
        # A traffic route sends only to deployments that name no tokens (the head refuses others).
        self._all_locked = self._any_locked and all(locked) and not table.traffic

    def any_locked(self) -> bool:
        """Whether a deployment of the last routing table names tokens: if none does, no call
        needs a token, and a door that learns the deployment from the body (the OpenAI API)
        need not read the body to check it."""
        return self._any_locked

    def check_any(self, authorization: str | None) -> None:
        """For a call whose deployment is not known yet (named in a body not read yet):
        Unauthenticated when no deployment could take it, because every deployment of the last
        table names tokens and the call carries none the cluster knows. Then its body need not
        be read: before, the OpenAI API read and parsed up to ``max_message_mb`` of JSON on the
        event loop from callers without a token, only to refuse them."""
        if not self._all_locked:
            return
        secret = bearer(authorization)
        if secret is None:
            raise Unauthenticated("every deployment needs a token: send 'Authorization: Bearer <token>'")
        if not matches(secret, self._known):
            raise Unauthenticated("unknown or revoked token")

    def tokens_exist(self) -> bool:
        """Whether the cluster had tokens at the last routing table."""
        return bool(self._known)

    def needs_token(self, deployment: str) -> bool:
        """Whether calls to ``deployment`` must carry a token (so an adapter reads the call's
        headers only then: grpc.aio builds the metadata tuple anew on each read)."""
        spec = self._spec_of(deployment)
        return spec is not None and bool(required_tokens(spec))

    def check(self, deployment: str, authorization: str | None) -> None:
        """Raises Unauthenticated or PermissionDenied when the call may not use ``deployment``.

        An unknown deployment passes: the call then fails with NotFound where it is routed.
        """
        spec = self._spec_of(deployment)
        if spec is None or not required_tokens(spec):
            return
        secret = bearer(authorization)
        if secret is None:
            raise Unauthenticated(
                f"deployment {deployment!r} needs a token: send 'Authorization: Bearer <token>'"
            )
        if matches(secret, self._allowed.get(deployment, ())):
            return
        if matches(secret, self._known):
            raise PermissionDenied(f"this token may not call deployment {deployment!r}")
        raise Unauthenticated(f"deployment {deployment!r}: unknown or revoked token")


# ---------------------------------------------------------------- rate limit


class RateLimiter:
    """A token bucket per client: ``rate`` requests per second, bursts up to ``burst``.

    ``rate`` 0 allows everything. Buckets idle long enough to be full again are forgotten,
    so the map stays small. Not thread-safe (one event loop).
    """

    def __init__(
        self, rate: float, burst: float | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else 2 * rate)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    @property
    def message(self) -> str:
        return f"rate limit of {self.rate:g} requests/s on the control API exceeded; retry later"

    def allow(self, key: str) -> bool:
        if self.rate <= 0:
            return True
        now = self._clock()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > 4096:
            self._forget_full(now)
        return allowed

    def _forget_full(self, now: float) -> None:
        refill_s = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < refill_s}


def client_key(token: TokenRecord | None, address: str) -> str:
    """Whose bucket a call takes from: its token when it has a valid one, else its address."""
    return f"token:{token.name}" if token is not None else f"addr:{address}"


def client_of(tokens: TokenRegistry, authorization: str | None, address: str) -> str:
    """:func:`client_key` of a call from its ``Authorization`` value and its address."""
    secret = bearer(authorization)
    return client_key(tokens.authenticate(secret) if secret else None, address)

"""shoal's one error tree.

Every error that crosses a component boundary is a :class:`ShoalError` with a
:class:`Code`. Transports map codes once: ``shoal.rpc.status`` to gRPC status
codes, :data:`HTTP_STATUS` to HTTP. Nothing else converts errors.

    ShoalError
    +-- InvalidArgument      bad input from a client: never retried
    +-- NotFound             unknown deployment, replica or scheduler
    +-- AlreadyExists
    +-- FailedPrecondition   the call is valid but not now (e.g. replica draining)
    |   +-- RevisionConflict an apply's if_revision is not the deployment's revision (HTTP 409)
    |   +-- ReplicasConflict a scale's if_replicas is not the deployment's count (HTTP 409)
    +-- ResourceExhausted    a queue or limit is full: back off and retry later
    |   +-- LimitReached     the head holds as many of a kind as a setting allows (HTTP 409)
    +-- DeadlineExceeded     the request's timeout passed before an answer
    |   +-- HeadSilent       the head takes connections and does not answer
    +-- Unavailable          a peer cannot be reached; safe to retry elsewhere
    |   +-- ReplicaGone      the replica died or is draining: it did not run the request
    |   +-- HeadUnreachable  the head does not answer at all
    +-- Unauthenticated / PermissionDenied
    +-- Internal             a bug or a model that raised
        +-- Unimplemented    the server has no such call (another kind of server or version)
"""

from __future__ import annotations

import enum


class Code(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INTERNAL = "INTERNAL"


HTTP_STATUS: dict[Code, int] = {
    Code.INVALID_ARGUMENT: 400,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.FAILED_PRECONDITION: 400,
    Code.RESOURCE_EXHAUSTED: 503,
    Code.DEADLINE_EXCEEDED: 504,
    Code.UNAVAILABLE: 503,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.INTERNAL: 500,
}


class ShoalError(Exception):
    """Base of every error shoal raises on purpose. ``str(err)`` is the message for users."""

    code: Code = Code.INTERNAL
    # Unavailable only: whether another replica may serve the request. False for a failure
    # from further on (a deployment the model called, retried there already): retrying it
    # on each replica of each caller multiplied the attempts by request_attempts per hop.
    retry_elsewhere: bool = True
    # Unavailable only: the call was refused before it changed anything (a deposed head's
    # fenced write), so a client may send even a call that must not be carried out twice
    # to another head (shoal.rpc.status.abort says so to the client).
    nothing_done: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[object, ...]:
        """Pickled as its class, message and attributes, whatever its ``__init__`` takes:
        errors cross processes in users' code (multiprocessing). Before, a BodyTooLarge
        came back with its message taken for its limit."""
        return (_restored, (type(self), self.message), self.__dict__)

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    @property
    def http_headers(self) -> dict[str, str]:
        """Headers for its HTTP answer: ``Retry-After: 1`` on a 503 (a full queue, a limit,
        no replica now), as the ingress's early refusals already sent."""
        return {"Retry-After": "1"} if self.http_status == 503 else {}


def _restored(cls: type[ShoalError], message: str) -> ShoalError:
    err = cls.__new__(cls)
    ShoalError.__init__(err, message)
    return err


class InvalidArgument(ShoalError):
    code = Code.INVALID_ARGUMENT


class BodyTooLarge(InvalidArgument):
    """An HTTP request body over ``max_message_mb``: the client's to fix, so counted as an
    invalid request, and answered 413 (Payload Too Large) as HTTP has a status for it."""

    def __init__(
        self,
        limit: int,
        size: int | None = None,
        *,
        decoded: bool = False,
        why: str = "setting max_message_mb",
    ) -> None:
        of = "" if size is None else f" of {size} bytes"
        over = "decompresses to over" if decoded else "is over"
        super().__init__(f"request body{of} {over} the limit of {limit} bytes ({why})")

    @property
    def http_status(self) -> int:
        return 413


class NotFound(ShoalError):
    code = Code.NOT_FOUND


class AlreadyExists(ShoalError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(ShoalError):
    code = Code.FAILED_PRECONDITION


class RevisionConflict(FailedPrecondition):
    """An apply that names the revision it expects (``if_revision``) when the deployment is at
    another one, or exists when it should not: nothing was applied. FAILED_PRECONDITION over
    gRPC; 409 (Conflict) over HTTP, as Kubernetes answers a stale ``resourceVersion``."""

    @property
    def http_status(self) -> int:
        return 409


class ReplicasConflict(FailedPrecondition):
    """A scale that names the replica count it expects (``if_replicas``) when the deployment
    has another one: nothing was scaled. FAILED_PRECONDITION over gRPC; 409 (Conflict) over
    HTTP, as Kubernetes refuses ``kubectl scale --current-replicas`` that does not match."""

    @property
    def http_status(self) -> int:
        return 409


class BlocksLoop(FailedPrecondition):
    """A blocking call made on the event loop (a composing model's ``infer``): a backend
    that ran the model's call on the loop runs it again on its thread."""


class ResourceExhausted(ShoalError):
    code = Code.RESOURCE_EXHAUSTED


class LimitReached(ResourceExhausted):
    """A create past a bound on what the head keeps (``max_deployments``, ``max_routes``,
    ``max_tokens``, ``max_specs_mb``, ``max_schedulers``, ``max_blobs``): nothing was written.
    RESOURCE_EXHAUSTED over gRPC; 409 (Conflict) over HTTP, not 503 or 429: those say "retry
    shortly", and retrying cannot help until a client deletes something or an operator
    raises the setting. Clients retry neither 409 nor
    RESOURCE_EXHAUSTED by default (gRPC's retry policies, urllib3's ``Retry``, shoal's own
    channels, which retry UNAVAILABLE alone)."""

    @classmethod
    def count(cls, kind: str, held: int, setting: str, name: str, remedy: str) -> LimitReached:
        """The refusal of a new ``kind`` named ``name`` when the head holds ``held``."""
        return cls(
            f"the head holds {held} {kind}s, its limit (setting {setting}): {kind} {name!r} was not "
            f"created; {remedy}, or raise {setting}"
        )

    @property
    def http_status(self) -> int:
        return 409


class DeadlineExceeded(ShoalError):
    code = Code.DEADLINE_EXCEEDED


class HeadSilent(DeadlineExceeded):
    """The head takes connections and answers no call in time (hung, or the address is not a
    shoal head's gRPC port): the message names the address (``shoal.api.head_silent``)."""


class Unavailable(ShoalError):
    code = Code.UNAVAILABLE


class ReplicaGone(Unavailable):
    """The replica did not run the request because it is gone or going: it died, was removed,
    or is draining (it refuses what arrives once it drains, and ends its task streams when it
    stops). Always safe to retry elsewhere, and no reason to send that replica anything new."""


class HeadUnreachable(Unavailable):
    """The head itself does not answer (not running, another address): the message says
    where it was looked for and how to start or find one (``shoal.api.head_unreachable``)."""


class Unauthenticated(ShoalError):
    code = Code.UNAUTHENTICATED


class PermissionDenied(ShoalError):
    code = Code.PERMISSION_DENIED


class Internal(ShoalError):
    code = Code.INTERNAL


class Unimplemented(Internal):
    """The server has no such call: a server of another kind at that address (a scheduler's
    port given as the head's), or of another version of shoal. gRPC's UNIMPLEMENTED, carried
    as INTERNAL (``shoal.rpc.status.to_error``)."""


_BY_CODE: dict[Code, type[ShoalError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        DeadlineExceeded,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        Internal,
    )
}


def from_code(code: Code, message: str) -> ShoalError:
    """The error class for ``code``, built with ``message``."""
    return _BY_CODE[code](message)

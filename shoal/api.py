"""shoal's Python API: drive a cluster from Python, over the same gRPC services as the CLI
(which is built on this module, so the two cannot drift apart).

    import shoal

    c = shoal.connect("127.0.0.1:8470", token="...")   # a Client; no I/O until the first call
    c.deploy(spec)               # a DeploymentSpec, a mapping, or a (decorated) class; waits for READY
    c.scale("echo", 3)
    c.status().deployment("echo").ready_replicas
    c.handle("echo").infer({"x": [[1.0, 2.0]]})          # {"x": array([[1., 2.]], dtype=float32)}
    await c.handle("echo").ainfer({"x": [[1.0, 2.0]]})   # the same from a coroutine
    c.delete("echo")

:class:`Client` is synchronous: it runs its calls on an event loop of its own, in a thread,
so it works the same from a script and from Jupyter (whose loop is already running).
:class:`AsyncClient` is the same API as coroutines, on the caller's loop. Both are safe to
call concurrently. Every error is a :class:`shoal.errors.ShoalError` subclass:
``NotFound`` for an unknown deployment, ``Unavailable`` when the head (or every scheduler)
cannot be reached (``HeadUnreachable`` naming the head's address), ``HeadSilent`` (a
``DeadlineExceeded``) naming it when it takes connections and answers nothing in time,
``Unimplemented`` (an ``Internal``) naming it when the server there has no call of the head's,
``InvalidArgument`` for a bad spec or input, ``FailedPrecondition`` when a deploy fails (its
replicas fail to start, no scheduler has room or is big enough), ``DeadlineExceeded`` when it
is not ready in time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
import re
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from shoal.config import Settings
from shoal.core.limits import short_repr
from shoal.core.spec import DeploymentSpec, check_if_replicas
from shoal.core.states import SchedulerState
from shoal.decorator import spec_of
from shoal.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    HeadSilent,
    HeadUnreachable,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ShoalError,
    Unavailable,
    Unimplemented,
)

if TYPE_CHECKING:
    from shoal.core.status import ClusterStatus
    from shoal.core.traffic import TrafficRoute
    from shoal.proto.shoal_pb2 import CreateTokenReply, TokenInfo
    from shoal.rpc.clients import ControlClient, NativeClient
    from shoal.store.history import LifecycleEvent, Revision

T = TypeVar("T")

Deployable = DeploymentSpec | Mapping[str, Any] | type | Any
"""What ``deploy`` takes: a spec, a mapping as in a YAML file (or a dataclass instance with those
fields), or a class (``@shoal.deployment``)."""


@dataclass(frozen=True)
class Applied:
    """What the head did with a spec."""

    name: str
    revision: int
    created: bool
    changed: bool
    change: str  # what changed, one line ("replicas 1 → 2"); "" when unchanged


@dataclass(frozen=True)
class Reply:
    """An inference answer: the outputs, and the replica that computed them."""

    outputs: dict[str, np.ndarray]
    replica_id: str


def settings_for(
    address: str | None = None, *, token: str | None = None, tls_dir: str | None = None
) -> Settings:
    """Settings as the CLI builds them: these arguments, else ``SHOAL_HEAD`` / ``SHOAL_TOKEN`` /
    ``SHOAL_TLS_DIR``, else the defaults (``localhost:8470``)."""
    return Settings.load(flags={"head_address": address, "token": token, "tls_dir": tls_dir})


_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


def _whole(what: str, value: object, high: int, low: int = 0) -> int:
    """``value`` when it is an integer (not a bool) from ``low`` to ``high``, the most its
    protobuf field holds; InvalidArgument naming ``what`` otherwise. Before, a call could not
    build its message and raised what protobuf raises, no ShoalError: ``scale("echo", 2**40)``
    a ValueError ('Value out of range'), ``scale("echo", 1.5)`` a TypeError."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(f"{what} must be an integer from {low} to {high}, got {short_repr(value)}")
    return value


def _text(what: str, value: object) -> str:
    """``value`` when it is a str; InvalidArgument naming ``what`` otherwise. Before, a call
    could not build its message and raised protobuf's TypeError ('bad argument type for
    built-in operation'), or for None sent the empty name."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {short_repr(value)}")
    return value


def _names(only: Collection[str] | None) -> tuple[str, ...] | None:
    """``status``'s ``only`` as a tuple of names; a str is one name. Before, ``status("echo")``
    asked for the deployments 'e', 'c', 'h' and 'o', and answered about none."""
    if only is None:
        return None
    names = (only,) if isinstance(only, str) else tuple(only)
    if not all(isinstance(name, str) for name in names):
        raise InvalidArgument(f"only must be names of deployments, got {short_repr(only)}")
    return names


def _seconds(what: str, value: object) -> float:
    """``value`` when it is a finite number of seconds, 0 or more; InvalidArgument naming
    ``what`` otherwise. Before, ``deploy(..., timeout_s=nan)`` waited for good: no time is
    past a NaN deadline."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise InvalidArgument(
            f"{what} must be a finite number of seconds, 0 or more, got {short_repr(value)}"
        )
    return float(value)


_HTTP1 = re.compile(r"http1\.x server|Failed parsing HTTP/2")
"""What gRPC says when the server at an address speaks HTTP/1."""


def head_unreachable(settings: Settings, cause: object, *, point: str, tls: str) -> HeadUnreachable:
    """The one message for a head that does not answer, the CLI's and the Python API's: where
    it was looked for, why (``cause``), and how to start one or point at one. ``point``: how
    to give another address, ``tls``: how to give the certificate folder (said only when none
    was given), each as the caller's user gives them (``--head`` on the command line).
    When the TLS handshake failed, a head answered: the message says what to check of the
    certificates instead of how to start one."""
    from shoal.rpc.tls import handshake_failed, plaintext_peer, tls_hint

    if plaintext_peer(str(cause)):
        # Before: "... both sides need certificates from the same cluster CA ... A server
        # answers there: give --tls-dir", to a user who had given it.
        return HeadUnreachable(
            f"cannot reach the head at {settings.head_address}: it does not speak TLS (it runs "
            f"without --tls-dir), and this client used TLS (certificates in {settings.tls_dir}): "
            f"leave {tls} out to reach it; if the cluster runs with TLS, this is not its head: "
            f"{point}. ({cause})"
        )
    if handshake_failed(str(cause)):
        where = f" in {settings.tls_dir}" if settings.tls_dir else ""
        return HeadUnreachable(
            f"cannot reach the head at {settings.head_address}: {tls_hint(str(cause))}. A server "
            f"answers there: give {tls} the folder of the cluster's certificates it was started "
            f"with (this client used those{where}), or leave it out if that head runs without TLS"
        )
    if _HTTP1.search(str(cause)):
        # Before: 'is it running? Start one', where a server did answer, in HTTP/1.
        return HeadUnreachable(
            f"cannot reach the head at {settings.head_address}: a server answers there in HTTP/1, "
            "not gRPC (the head's dashboard and REST port, or a scheduler's HTTP port?); the head's "
            f"gRPC port is 8470 unless set: {point}. ({cause})"
        )
    hint = "" if settings.tls_dir else f" If the cluster runs with TLS, give {tls}."
    return HeadUnreachable(
        f"cannot reach the head at {settings.head_address} ({cause}); is it running? "
        f"Start one with 'shoal up' or {point}.{hint}"
    )


def not_a_head(settings: Settings, cause: object, *, point: str) -> Unimplemented:
    """The one message for a server that answers at the head's address but has no call of
    the head's control API: before, ``--head`` at a scheduler's inference port ended in
    'Method not found!', naming neither the address nor what was wrong."""
    return Unimplemented(
        f"the server at {settings.head_address} does not serve the head's control API ({cause}): "
        "is it a shoal head's gRPC port (8470 unless set; a scheduler's inference port is 8001), "
        f"and of this version of shoal? If not, {point}."
    )


def head_silent(settings: Settings, cause: object, *, point: str) -> HeadSilent:
    """The one message for a head that takes connections and answers no call in time, the
    CLI's and the Python API's: where it was looked for, and how to point at another
    (``point``, as :func:`head_unreachable` takes it)."""
    return HeadSilent(
        f"the head at {settings.head_address} did not answer in time ({cause}); is it a shoal "
        f"head's gRPC port, and is that head running normally? If not, {point}."
    )


def to_arrays(inputs: Mapping[str, Any], spec: DeploymentSpec | None = None) -> dict[str, np.ndarray]:
    """Inputs as arrays: numpy arrays as given; nested lists and object arrays (a pandas
    string column's) typed by the spec's declared inputs, else FP32 for numbers, BOOL for
    booleans, BYTES for strings and objects. InvalidArgument naming the input that cannot
    be a tensor (and its first element that cannot be of its type)."""
    from shoal.core import tensors

    if not isinstance(inputs, Mapping) or not inputs:
        raise InvalidArgument('inputs must be a mapping of input names to arrays, e.g. {"x": [[1, 2]]}')
    declared = {t.name: t.datatype for t in (spec.inputs if spec else ())}
    out = {}
    for name, value in inputs.items():
        if not isinstance(name, str):
            raise InvalidArgument(f"input names must be strings, got {short_repr(name)}")
        if isinstance(value, np.ndarray) and value.dtype != object:
            out[name] = value
            continue
        try:
            arr = np.asarray(value)
        except ValueError:  # numpy refuses ragged lists outright
            raise InvalidArgument(
                f"input {name!r}: ragged nested lists (every row must have the same length)"
            ) from None
        datatype = declared.get(name) or _datatype_of(arr)
        out[name] = tensors.from_json(datatype, list(arr.shape), arr.tolist(), name=name)
    return out


def _datatype_of(arr: np.ndarray) -> str:
    """The datatype of an input the spec does not declare: FP32 for numbers, BOOL for
    booleans, BYTES for strings; an object array (a pandas string column, or None among
    numbers) by its first element, so that ``tensors.from_json`` names the first one that is
    not of that type. Before, every object array was refused as "ragged nested lists"."""
    kind = arr.dtype.kind
    if kind == "O" and arr.size:
        first = arr.flat[0]
        kind = "b" if isinstance(first, bool | np.bool_) else "f" if isinstance(first, int | float) else "O"
    return "FP32" if kind in "iuf" else "BOOL" if kind == "b" else "BYTES"


def _check_if_revision(value: object) -> None:
    from shoal.store.history import check_if_revision  # the head's own check; loads the store late

    check_if_revision(value)


class AsyncClient:
    """The cluster's control API and inference, as coroutines on the caller's event loop.

    Opens its channel on the first call (constructors do no I/O); ``await close()`` (or
    ``async with``) closes it and the handles' channels. Its channels belong to the loop they
    were opened on: once that loop is closed, the next call opens new ones on its own (one
    ``asyncio.run`` after another works). A call the head does not answer at
    all (it is not running, or not at that address) raises HeadUnreachable (an Unavailable)
    that names the address and says how to start a head.
    """

    point_at_head: ClassVar[str] = "give its address to shoal.connect or AsyncClient (or set SHOAL_HEAD)"
    give_tls_dir: ClassVar[str] = "tls_dir (or SHOAL_TLS_DIR)"
    """How :func:`head_unreachable`'s message tells a user to give the head's address and the
    certificate folder (the CLI's client says --head and --tls-dir)."""

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        tls_dir: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.settings = settings or settings_for(address, token=token, tls_dir=tls_dir)
        self._control: ControlClient | None = None
        self._native: dict[str, NativeClient] = {}
        self._opened_on: asyncio.AbstractEventLoop | None = None  # the loop of the channels

    @property
    def address(self) -> str:
        """The head's gRPC address."""
        return self.settings.head_address

    def _on_this_loop(self) -> None:
        """Forget the channels when the event loop they were opened on is closed, so that
        new ones open on the caller's: gRPC binds a channel to its loop, and before, every
        call after a first ``asyncio.run`` ended in 'RuntimeError: Event loop is closed'.
        (They cannot be closed there any more; collected, they free their sockets.)"""
        opened_on = self._opened_on
        if opened_on is not None and opened_on.is_closed():
            self._control, self._native, self._opened_on = None, {}, None
        if self._opened_on is None:
            try:
                self._opened_on = asyncio.get_running_loop()
            except RuntimeError:  # no loop runs: gRPC binds the channel to the thread's loop
                pass

    @property
    def control(self) -> ControlClient:
        """The gRPC client of the head's control API under this one (the CLI's few extra calls)."""
        self._on_this_loop()
        if self._control is None:
            from shoal.rpc import clients  # looked up here: grpc is imported on first use only

            self._control = clients.ControlClient(self.settings.head_address, self.settings)
        return self._control

    def __reduce__(self) -> tuple[object, ...]:
        """Pickled as its settings (to a spawned worker): unpickled, it connects anew."""
        return (_client_of, (type(self), self.settings))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _head(self, call: Awaitable[T]) -> T:
        """``call``, to the head's control API; its Unavailable or DeadlineExceeded as
        :meth:`_blame` says."""
        try:
            return await call
        except (Unavailable, DeadlineExceeded) as err:
            blamed = await self._blame(err)
            if blamed is err:
                raise
            raise blamed from None
        except Unimplemented as err:
            raise not_a_head(self.settings, err, point=self.point_at_head) from None

    async def _blame(self, err: Unavailable | DeadlineExceeded) -> ShoalError:
        """An Unavailable or a DeadlineExceeded from the head: as it came when the head answers
        a status call now (what failed was a scheduler or a replica behind it, or a request's
        own deadline), else HeadUnreachable or HeadSilent, whose message names the head's
        address. Before, a head that took connections and never answered (hung, or an address
        that is no shoal head's) ended a call in a bare 'Deadline Exceeded'."""
        if isinstance(err, HeadUnreachable | HeadSilent):
            return err
        try:
            await self.control.status()
        except ShoalError:
            if isinstance(err, DeadlineExceeded):
                return head_silent(self.settings, err, point=self.point_at_head)
            return head_unreachable(self.settings, err, point=self.point_at_head, tls=self.give_tls_dir)
        return err

    async def close(self) -> None:
        self._opened_on = None
        natives, self._native = list(self._native.values()), {}
        for native in natives:
            await native.close()
        if self._control is not None:
            control, self._control = self._control, None
            await control.close()

    # ------------------------------------------------------------ deployments

    async def deploy(
        self,
        target: Deployable,
        *,
        wait: bool = True,
        timeout_s: float = 120.0,
        min_ready_s: float = 0.0,
        if_revision: int | None = None,
    ) -> Applied:
        """Create or update a deployment. With ``wait``, return once the replicas of this spec are
        READY (and an update's old ones gone), and with ``min_ready_s`` once each has stayed
        READY that long; FailedPrecondition when the head answers that they will not be (no
        room, replicas failing to start or crashing soon after READY), DeadlineExceeded after
        ``timeout_s``.

        ``if_revision``: apply only if the deployment is at that revision now (0: only if it
        does not exist), else FailedPrecondition naming its revision, and nothing changes.
        None (the default): no check, the last writer wins. InvalidArgument when negative."""
        from shoal.core.model_hash import with_model_hash

        _seconds("timeout_s", timeout_s)
        _seconds("min_ready_s", min_ready_s)
        if if_revision is not None:
            _check_if_revision(if_revision)
        spec = with_model_hash(spec_of(target))
        before = (await self.status((spec.name,))).to_json() if wait else {}
        reply = await self._head(self.control.apply(spec, if_revision))
        applied = Applied(spec.name, reply.revision, reply.created, reply.changed, reply.change)
        if wait:
            await self._wait(before, spec, timeout_s, min_ready_s)
        return applied

    async def _wait(
        self, before: Mapping[str, Any], spec: DeploymentSpec, timeout_s: float, min_ready_s: float = 0.0
    ) -> None:
        from shoal.core.deploy_watch import DeployWatch  # the decision the CLI waits on too

        watch = DeployWatch.after_apply(before, [spec], min_ready_s=min_ready_s)
        deadline = time.monotonic() + timeout_s
        while True:
            verdict = watch.observe((await self.status((spec.name,))).to_json(), time.monotonic())
            if verdict.done:
                return
            if verdict.failure:
                raise FailedPrecondition(verdict.failure)
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"not ready after {timeout_s:g}s: {verdict.line}")
            await asyncio.sleep(0.25)

    async def apply(self, spec: DeploymentSpec, *, if_revision: int | None = None) -> Applied:
        """Hand the head a spec as is and return at once (``deploy(spec, wait=False)`` without the
        model's file hash); ``if_revision`` as in :meth:`deploy`."""
        if if_revision is not None:
            _check_if_revision(if_revision)
        reply = await self._head(self.control.apply(spec, if_revision))
        return Applied(spec.name, reply.revision, reply.created, reply.changed, reply.change)

    async def scale(
        self, name: str, replicas: int, *, if_revision: int | None = None, if_replicas: int | None = None
    ) -> None:
        """Set the replica count; the head places or removes replicas. NotFound for an unknown name.

        ``if_revision``: scale only if the deployment is at that revision now (the ``revision``
        read with the spec the count was chosen for), else FailedPrecondition naming its
        revision, and nothing changes. A scale makes no revision: this refuses a count chosen
        for a spec that changed since, not a scale made since. InvalidArgument when negative.

        ``if_replicas``: scale only if the deployment's count is that now (its spec's
        ``replicas``, as read from ``status()``), else FailedPrecondition naming the count, and
        nothing changes: of two scales from the same count, one goes through. An autoscaled
        deployment is refused either way. InvalidArgument when not from 0 to 1000."""
        name = _text("name", name)
        replicas = _whole("replicas", replicas, _INT32_MAX)
        if if_revision is not None:
            _check_if_revision(if_revision)
        if if_replicas is not None:
            check_if_replicas(if_replicas)
        await self._head(self.control.scale(name, replicas, if_revision, if_replicas))

    async def delete(self, name: str) -> None:
        """Delete the deployment and stop its replicas. NotFound for an unknown name."""
        await self._head(self.control.delete(_text("name", name)))

    async def status(self, only: Collection[str] | None = None) -> ClusterStatus:
        """Schedulers, deployments, replicas and recent events, typed (``.to_json()`` is
        ``shoal status --json``). ``only``: of the deployments named alone (those the head
        knows; a str is one name), which costs the head their replicas, not the whole
        cluster's: to watch a few deployments of a large cluster."""
        return await self._head(self.control.status(_names(only)))

    async def history(self, name: str) -> list[Revision]:
        return await self._head(self.control.history(_text("name", name)))

    async def rollback(self, name: str, revision: int = 0) -> Revision:
        return await self._head(
            self.control.rollback(_text("name", name), _whole("revision", revision, _INT32_MAX))
        )

    async def restart(self, name: str) -> Revision:
        return await self._head(self.control.restart(_text("name", name)))

    async def events(self, deployment: str = "", limit: int = 0) -> list[LifecycleEvent]:
        return await self._head(
            self.control.events(_text("deployment", deployment), _whole("limit", limit, _INT32_MAX))
        )

    async def read_log(
        self, replica_id: str, tail_bytes: int = 0, follow: bool = False
    ) -> AsyncIterator[bytes]:
        _text("replica_id", replica_id)
        _whole("tail_bytes", tail_bytes, _INT64_MAX)
        try:
            async for data in self.control.read_log(replica_id, tail_bytes, follow):
                yield data
        except (Unavailable, DeadlineExceeded) as err:
            blamed = await self._blame(err)
            if blamed is err:
                raise
            raise blamed from None

    async def create_token(self, role: str, name: str = "") -> CreateTokenReply:
        return await self._head(self.control.create_token(_text("role", role), _text("name", name)))

    async def list_tokens(self) -> list[TokenInfo]:
        return await self._head(self.control.list_tokens())

    async def revoke_token(self, name: str) -> None:
        await self._head(self.control.revoke_token(_text("name", name)))

    # ------------------------------------------------------------ traffic routes

    async def route(self, route: TrafficRoute | Mapping[str, Any]) -> TrafficRoute:
        """Create or replace a traffic route: a route, or its document (``{"name": "clf",
        "targets": {"a": 90, "b": 10}, "shadow": "c"}``). NotFound naming a target that is no
        deployment, FailedPrecondition when a deployment has the route's name."""
        from shoal.core.traffic import TrafficRoute, parse_route

        if not isinstance(route, TrafficRoute):
            route = parse_route(route)
        await self._head(self.control.set_route(route))
        return route

    async def delete_route(self, name: str) -> None:
        """NotFound when there is no route ``name``."""
        await self._head(self.control.delete_route(_text("name", name)))

    async def routes(self) -> list[TrafficRoute]:
        return await self._head(self.control.routes())

    # ------------------------------------------------------------ inference

    def handle(self, name: str, *, scheduler: str = "") -> AsyncHandle:
        """A handle to call deployment ``name`` with. ``scheduler``: this scheduler's gRPC address
        only (what a token of role infer needs: it may not ask the head for the live ones; and
        what infers while the head is down); by default any live one, the next on UNAVAILABLE."""
        return AsyncHandle(self, _text("name", name), _text("scheduler", scheduler))

    def _native_client(self, address: str) -> NativeClient:
        self._on_this_loop()
        native = self._native.get(address)
        if native is None:
            from shoal.rpc import clients

            native = self._native[address] = clients.NativeClient(address, self.settings)
        return native


class AsyncHandle:
    """Calls one deployment (or traffic route) through a scheduler's router (native
    ``SendRequest``). The first call asks the head which schedulers are live and how the
    inputs are typed; later calls go straight to a scheduler, and ask the head again only
    when every scheduler known was unavailable. Safe for concurrent calls: calls that need
    the head's answer at once share one look-up (one status call, not one per call)."""

    def __init__(self, client: AsyncClient, name: str, scheduler: str = "") -> None:
        self.client = client
        self.name = name
        self.scheduler = scheduler
        self._spec: DeploymentSpec | None = None
        self._addresses: list[str] | None = None
        self._learning: asyncio.Task[None] | None = None  # the look-up in flight, if any

    def __reduce__(self) -> tuple[object, ...]:
        """Pickled as its client and name: unpickled, it learns the schedulers anew."""
        return (AsyncHandle, (self.client, self.name, self.scheduler))

    async def infer(self, inputs: Mapping[str, Any], *, timeout_s: float = 0.0) -> dict[str, np.ndarray]:
        """The outputs for ``inputs`` (input name → numpy array or nested lists).
        ``timeout_s``: the request's deadline (0: the deployment's ``timeout_s``).
        InvalidArgument, before anything is sent, naming an input the deployment does not
        take as given (another name, datatype or shape than its spec declares: numpy arrays
        are sent as they are, so a float64 array for an FP32 input needs ``.astype``)."""
        return (await self.request(inputs, timeout_s=timeout_s)).outputs

    async def request(self, inputs: Mapping[str, Any], *, timeout_s: float = 0.0) -> Reply:
        """As :meth:`infer`, with the id of the replica that answered."""
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
            raise InvalidArgument(f"timeout_s must be a number of seconds, got {short_repr(timeout_s)}")
        fresh = self._addresses is None
        if fresh:
            await self._learn()
        try:
            arrays = self._arrays(inputs)
        except InvalidArgument:
            if fresh:
                raise
            await self._learn()  # the deployment may take other inputs since: ask again
            arrays = self._arrays(inputs)
        try:
            return await self._send(arrays, timeout_s)
        except Unavailable:
            if fresh or self.scheduler:
                raise
        await self._learn()  # the schedulers known are gone: ask the head for the live ones
        return await self._send(arrays, timeout_s)

    def _arrays(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """``inputs`` as arrays, checked against the deployment's declared inputs as its
        scheduler would check them (not a traffic route's: its targets may differ).
        Before, a float64 array for an FP32 input was sent whole, to be refused there."""
        from shoal.core import payload, tensors

        arrays = to_arrays(inputs, self._spec)
        spec = self._spec
        if spec is not None and spec.name == self.name:
            headers = [(name, tensors.datatype_of(a), a.shape) for name, a in arrays.items()]
            payload.check_declared(spec.inputs, headers, spec.name)
        return arrays

    async def _learn(self) -> None:
        """:meth:`_look_up`, shared: a call that comes while one is in flight (on this loop)
        waits for its outcome instead of sending its own, and raises its error when it fails;
        the next call after it ended looks up again. Before, N threads (or coroutines)
        calling a fresh handle at once sent N status calls to the head, 64 for 64.

        The look-up is a task of its own, which each caller awaits shielded: a caller that is
        cancelled (Ctrl-C in its thread) leaves it running for the others, and it ends with
        its calls' deadlines (``rpc_timeout_s``), or when the loop it runs on is closed (a
        :class:`Client`'s ``close()`` cancels it, and so the calls waiting for it)."""
        loop = asyncio.get_running_loop()
        task = self._learning
        # One done already (its end not yet seen by _learned), or on another loop (an
        # AsyncClient serves one asyncio.run after another; that loop's task may never end):
        # not this call's to share.
        if task is None or task.done() or task.get_loop() is not loop:
            task = self._learning = loop.create_task(self._look_up(), name=f"shoal-handle-{self.name}")
            task.add_done_callback(self._learned)
        await asyncio.shield(task)

    def _learned(self, task: asyncio.Task[None]) -> None:
        if self._learning is task:
            self._learning = None
        if not task.cancelled():
            task.exception()  # retrieved: its callers may all have been cancelled meanwhile

    async def _look_up(self) -> None:
        """The live schedulers and the input types, from the head. NotFound for an unknown name.

        A token of role ``infer`` may call schedulers but not read the head's status: with a
        ``scheduler`` named, the handle then goes to it without the head, its inputs typed
        by their values (as for a name the head does not know) and the client's wait, for a
        call without ``timeout_s``, the default ``timeout_s`` (60 s) plus 5 s; without one,
        the PermissionDenied says to name one. So it does while the head does not answer
        (HeadUnreachable, HeadSilent): inference does not need the head."""
        try:
            status = await self.client.status((self.name,))
        except PermissionDenied as err:
            if not self.scheduler:
                raise PermissionDenied(
                    f"{err}: to find the schedulers a handle reads the head's status; with a token of "
                    "role infer, name a scheduler's gRPC address (handle(name, scheduler=...), "
                    "shoal predict --scheduler HOST:PORT)"
                ) from None
            self._spec, self._addresses = None, [self.scheduler]
            return
        except (HeadUnreachable, HeadSilent):
            if not self.scheduler:
                raise
            # Inference does not go through the head: before, a handle naming its scheduler
            # refused to infer while the head was down (restarting, failing over).
            self._spec, self._addresses = None, [self.scheduler]
            return
        dep = status.deployment(self.name)
        if dep is None:
            # A traffic route's name: typed by its first target's spec; the scheduler draws.
            route = next((r for r in await self.client.routes() if r.name == self.name), None)
            if route is None:
                raise NotFound(f"no deployment or traffic route named {self.name!r}")
            target = route.targets[0][0]
            dep = (await self.client.status((target,))).deployment(target)
        if dep is not None and dep.spec:
            from shoal.core.spec import parse_spec

            self._spec = parse_spec(dict(dep.spec))
        self._addresses = (
            [self.scheduler]
            if self.scheduler
            else [s.address for s in status.schedulers if s.state == SchedulerState.ALIVE]
        )

    def _default_timeout_s(self) -> float:
        """The deadline the scheduler gives a call without one: the deployment's ``timeout_s``
        (a traffic route's: its first target's, the spec this handle learned)."""
        spec = self._spec
        return spec.timeout_s if spec is not None else DeploymentSpec.model_fields["timeout_s"].default

    async def _send(self, arrays: dict[str, np.ndarray], timeout_s: float) -> Reply:
        """The reply of the first scheduler that takes the request, in the order of
        ``_addresses``, where those that failed are put last (before, a dead scheduler was
        dialled first at every call). Unavailable naming those tried when none does."""
        addresses = list(self._addresses or ())
        if not addresses:
            raise Unavailable(f"no live scheduler to send the request to {self.name!r} to")
        failed: list[str] = []
        last: Unavailable | None = None
        for address in addresses:
            native = self.client._native_client(address)
            try:
                outputs, replica = await native.infer(
                    self.name, arrays, timeout_s=timeout_s, default_timeout_s=self._default_timeout_s()
                )
            except Unavailable as err:
                last = err  # that scheduler is gone, or has no replica to give: try the next
                failed.append(address)
                continue
            if failed and self._addresses is not None:
                known = self._addresses
                self._addresses = [a for a in known if a not in failed] + [a for a in known if a in failed]
            return Reply(outputs, replica)
        assert last is not None
        raise Unavailable(
            f"no scheduler took the request to {self.name!r}: tried {', '.join(addresses)}; "
            f"the last said: {last}"
        )


_loop_pid: int | None = None
"""The process in which a :class:`Client` first started its loop, and gRPC its threads."""


def _check_not_forked() -> None:
    """FailedPrecondition in a process forked from one whose Client made calls. Before, such
    a client's call waited for good in the child (its loop's thread is not there), and a new
    client there crashed the child (SIGSEGV in gRPC's core, which does not survive a fork
    with its threads running)."""
    if _loop_pid is not None and _loop_pid != os.getpid():
        raise FailedPrecondition(
            "this process was forked from one that had used a shoal.Client: gRPC cannot run in a "
            "forked child. Start worker processes with multiprocessing's 'spawn' or 'forkserver' "
            "method, or make a client's first call in each child, none in the parent"
        )


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    """Run ``loop`` until it is stopped; then cancel the calls still on it, so that every
    caller's wait ends (before, ``close()`` while other threads were in calls left some of
    them waiting for good), and close it."""
    try:
        loop.run_forever()
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        # A task's end reaches its caller's future through a callback the loop runs next:
        # run those too (before, a caller could wait for good on a future they never set).
        loop.call_soon(loop.stop)
        loop.run_forever()
    finally:
        loop.close()


async def _close_then_stop(close: Callable[[], Awaitable[None]], loop: asyncio.AbstractEventLoop) -> None:
    try:
        await close()
    finally:
        loop.stop()


def _wind_down(loop: asyncio.AbstractEventLoop, close: Callable[[], Awaitable[None]], pid: int) -> None:
    """A dropped client's finalizer, on whichever thread collects it (its loop's too): close
    the channels on the loop, then stop it; the thread closes the loop and ends. Blocks on
    nothing. Before, a Client dropped without ``close()`` kept its thread and three
    descriptors for good."""
    if os.getpid() != pid:
        return  # a forked child's copy: that loop's thread runs in the parent only
    try:
        asyncio.run_coroutine_threadsafe(_close_then_stop(close, loop), loop)
    except RuntimeError:  # closed already
        pass


class _Loop:
    """An event loop in a daemon thread, for the synchronous client. ``close``: what to run on
    the loop before it stops when this is collected without :meth:`stop` (the client's
    channels' close); the handles hold this, so a handle outlives the client it came from."""

    def __init__(self, close: Callable[[], Awaitable[None]]) -> None:
        self._close = close
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._finalizer: weakref.finalize[..., _Loop] | None = None
        self.closed = False

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """``coro`` on the thread's loop (started if need be). Under the lock, so that no call
        lands on a loop after :meth:`stop` asked it to stop: each is cancelled there instead."""
        global _loop_pid
        try:
            _check_not_forked()
            with self._lock:
                if self.closed:
                    # Before, a call after close() started a loop again, and a call of another
                    # thread racing the close could then wait for good on a channel of the old.
                    raise FailedPrecondition("the client is closed: make another (shoal.connect)")
                if self._loop is None:
                    loop = asyncio.new_event_loop()
                    thread = threading.Thread(target=_serve, args=(loop,), name="shoal-client", daemon=True)
                    thread.start()
                    _loop_pid = os.getpid()
                    self._finalizer = weakref.finalize(self, _wind_down, loop, self._close, _loop_pid)
                    self._finalizer.atexit = False  # at exit the daemon thread just ends, as before
                    self._loop, self._thread = loop, thread
                return asyncio.run_coroutine_threadsafe(coro, self._loop)
        except BaseException:
            coro.close()
            raise

    @property
    def forked(self) -> bool:
        """Whether this runs in a process forked from the one that started the loop."""
        return _loop_pid is not None and _loop_pid != os.getpid()

    def submit(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run ``coro`` on the thread's loop; its result as a future of the caller's loop."""
        return asyncio.wrap_future(self._submit(coro))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the thread's loop and wait for it in this thread. FailedPrecondition
        when the client is closed (``stop``) before it ends."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a shoal.Client call from inside its own loop: use AsyncClient there")
        future = self._submit(coro)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise FailedPrecondition("the client was closed during this call") from None
        except BaseException:
            # Ctrl-C (Jupyter's interrupt) ends this wait: end the call too. Before, it ran
            # on, and its replica computed an answer nobody would read.
            future.cancel()
            raise

    def stop(self) -> None:
        """Stop the loop and wait for its thread to end (in a forked child: forget them); a
        later call raises FailedPrecondition."""
        with self._lock:
            self.closed = True
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
            finalizer, self._finalizer = self._finalizer, None
            forked = self.forked
            if loop is not None and not forked:
                loop.call_soon_threadsafe(loop.stop)  # after every call submitted before
        if finalizer is not None:
            finalizer.detach()
        if thread is not None and not forked:
            thread.join()


class Client:
    """The synchronous API (:func:`connect`): :class:`AsyncClient`'s calls, blocking, run on a
    loop of its own in a thread. Usable as a context manager; ``close()`` ends the thread, and
    so does dropping the client and its handles. A client cannot cross ``os.fork``: in a
    child forked after its first call, a call raises FailedPrecondition (so does a new
    client's: gRPC does not survive the fork); a client and its handles pickle (to a spawned
    worker) as their settings and name, and connect anew there. ``aio``: the
    :class:`AsyncClient` it runs (:func:`connect` builds one)."""

    def __init__(self, aio: AsyncClient | None = None) -> None:
        self.aio = aio or AsyncClient()
        self._loop = _Loop(self.aio.close)

    def __reduce__(self) -> tuple[object, ...]:
        """Pickled as its AsyncClient's settings (to a spawned worker): unpickled, it starts
        a thread and connects anew."""
        return (Client, (self.aio,))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channels and end the thread; a later call raises FailedPrecondition, and
        one of another thread in progress ends with it. In a forked child (where no call can
        be made), forget them. Closing again does nothing."""
        if self._loop.closed:
            return
        try:
            if not self._loop.forked:
                self._loop.run(self.aio.close())
        finally:
            self._loop.stop()

    def deploy(
        self,
        target: Deployable,
        *,
        wait: bool = True,
        timeout_s: float = 120.0,
        min_ready_s: float = 0.0,
        if_revision: int | None = None,
    ) -> Applied:
        """See :meth:`AsyncClient.deploy`."""
        return self._loop.run(
            self.aio.deploy(
                target, wait=wait, timeout_s=timeout_s, min_ready_s=min_ready_s, if_revision=if_revision
            )
        )

    def scale(
        self, name: str, replicas: int, *, if_revision: int | None = None, if_replicas: int | None = None
    ) -> None:
        """See :meth:`AsyncClient.scale`."""
        self._loop.run(self.aio.scale(name, replicas, if_revision=if_revision, if_replicas=if_replicas))

    def delete(self, name: str) -> None:
        self._loop.run(self.aio.delete(name))

    def status(self, only: Collection[str] | None = None) -> ClusterStatus:
        return self._loop.run(self.aio.status(only))

    def history(self, name: str) -> list[Revision]:
        return self._loop.run(self.aio.history(name))

    def rollback(self, name: str, revision: int = 0) -> Revision:
        return self._loop.run(self.aio.rollback(name, revision))

    def restart(self, name: str) -> Revision:
        return self._loop.run(self.aio.restart(name))

    def events(self, deployment: str = "", limit: int = 0) -> list[LifecycleEvent]:
        return self._loop.run(self.aio.events(deployment, limit))

    def route(self, route: TrafficRoute | Mapping[str, Any]) -> TrafficRoute:
        """See :meth:`AsyncClient.route`."""
        return self._loop.run(self.aio.route(route))

    def delete_route(self, name: str) -> None:
        self._loop.run(self.aio.delete_route(name))

    def routes(self) -> list[TrafficRoute]:
        return self._loop.run(self.aio.routes())

    def handle(self, name: str, *, scheduler: str = "") -> Handle:
        """A handle to call deployment ``name``: ``infer`` blocks, ``ainfer`` is awaited."""
        return Handle(self.aio.handle(name, scheduler=scheduler), self._loop)


class Handle:
    """:class:`AsyncHandle` for the synchronous client: ``infer`` blocks; ``ainfer`` may be
    awaited on any event loop (the call itself runs on the client's)."""

    def __init__(self, inner: AsyncHandle, loop: _Loop) -> None:
        self._inner = inner
        self._loop = loop
        self.name = inner.name

    def __reduce__(self) -> tuple[object, ...]:
        """Pickled as its client's settings and its name: unpickled, a handle of a client of
        its own (whose thread ends when the handle is dropped)."""
        return (_handle_of, (self._inner,))

    def infer(self, inputs: Mapping[str, Any], *, timeout_s: float = 0.0) -> dict[str, np.ndarray]:
        return self._loop.run(self._inner.infer(inputs, timeout_s=timeout_s))

    def request(self, inputs: Mapping[str, Any], *, timeout_s: float = 0.0) -> Reply:
        return self._loop.run(self._inner.request(inputs, timeout_s=timeout_s))

    async def ainfer(self, inputs: Mapping[str, Any], *, timeout_s: float = 0.0) -> dict[str, np.ndarray]:
        return await self._loop.submit(self._inner.infer(inputs, timeout_s=timeout_s))


def _client_of(cls: type[AsyncClient], settings: Settings) -> AsyncClient:
    return cls(settings=settings)


def _handle_of(inner: AsyncHandle) -> Handle:
    return Client(inner.client).handle(inner.name, scheduler=inner.scheduler)


def connect(address: str | None = None, *, token: str | None = None, tls_dir: str | None = None) -> Client:
    """A synchronous client of the head at ``address`` (``HOST:PORT``, its gRPC port; default
    ``SHOAL_HEAD`` or ``localhost:8470``). ``token``: a bearer token (default ``SHOAL_TOKEN``);
    ``tls_dir``: the cluster's certificate folder (default ``SHOAL_TLS_DIR``). No I/O until
    the first call."""
    return Client(AsyncClient(address, token=token, tls_dir=tls_dir))


__all__ = [
    "Applied",
    "AsyncClient",
    "AsyncHandle",
    "Client",
    "Deployable",
    "Handle",
    "Reply",
    "connect",
    "settings_for",
    "to_arrays",
]

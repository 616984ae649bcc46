"""Fixtures for tests of the head over in-memory twins: a clock that moves only when told,
a ``MemoryStore``, and fake schedulers; and ``on_each_loop``, which runs a test's body under
uvloop and under asyncio's own loop. A test module may define its own of the same name.

:func:`make_spec` builds the small deployment specs the unit tests share, and
:class:`FakeContext` stands for a gRPC servicer's context; import them from
``tests.unit.conftest``. ``rest`` is an HTTP client of the head app over a module's own
``head`` fixture."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import grpc
import httpx
import pytest

from shoal.core.clock import FakeClock
from shoal.core.spec import DeploymentSpec, parse_spec
from shoal.head.node import HeadNode
from shoal.http.head import head_app
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers

Run = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["uvloop", "asyncio"])
def on_each_loop(request: pytest.FixtureRequest) -> Run:
    """Runs a test's body under uvloop (what shoal runs on by default) and under asyncio's
    own loop: their servers, readers and timers are separate code, and they order due
    timers and queued callbacks differently."""
    import uvloop

    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run(body: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(body)

    return run


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    yield s
    await s.close()


@pytest.fixture
def fleet() -> FakeSchedulers:
    return FakeSchedulers()


def make_spec(
    name: str = "echo",
    replicas: int = 1,
    *,
    backend: str = "python",
    model: str = "m:M",
    cpus: float | None = None,
    **fields: Any,
) -> DeploymentSpec:
    """A valid spec: ``replicas`` of ``model`` on ``backend``, ``cpus`` each when given
    (else the default), and any other spec ``fields`` as given. Nothing is loaded: the
    model need not exist."""
    doc: dict[str, Any] = {"name": name, "backend": backend, "model": model, "replicas": replicas}
    if cpus is not None:
        doc["resources"] = {"cpus": cpus}
    return parse_spec({**doc, **fields})


@pytest.fixture
async def rest(head: HeadNode) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the head's app (``head_app``) over the module's ``head`` fixture."""
    transport = httpx.ASGITransport(app=head_app(head))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client


class Aborted(Exception):
    """What :meth:`FakeContext.abort` raises, as gRPC's ``abort`` raises to end the call."""


class FakeContext:
    """A gRPC servicer's context: it keeps the code and details a call aborts with."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Aborted(details)

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def peer(self) -> str:
        return "ipv4:10.1.2.3:5000"

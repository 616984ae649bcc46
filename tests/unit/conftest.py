"""Fixtures for tests of the head over in-memory twins: a clock that moves only when told,
a ``MemoryStore``, and fake schedulers. A test module may define its own of the same name.

:func:`make_spec` builds the small deployment specs the unit tests share; import it from
``tests.unit.conftest``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from shoal.core.clock import FakeClock
from shoal.core.spec import DeploymentSpec, parse_spec
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers


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

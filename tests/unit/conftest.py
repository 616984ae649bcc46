"""Fixtures for tests of the head over in-memory twins: a clock that moves only when told,
a ``MemoryStore``, and fake schedulers. A test module may define its own of the same name."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from shoal.core.clock import FakeClock
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

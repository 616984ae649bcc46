"""Test helpers for shoal and its users: in-memory fakes of every remote seam.

See :mod:`shoal.testing.fakes`. ``FakeClock`` lives in :mod:`shoal.core.clock` and is
re-exported here.
"""

from shoal.core.clock import FakeClock
from shoal.testing.fakes import (
    FakeHeadLink,
    FakeLauncher,
    FakeProcess,
    FakeReplicaClient,
    FakeReplicas,
    FakeSchedulerClient,
    FakeSchedulers,
    PushCall,
    echo,
)

__all__ = [
    "FakeClock",
    "FakeHeadLink",
    "FakeLauncher",
    "FakeProcess",
    "FakeReplicaClient",
    "FakeReplicas",
    "FakeSchedulerClient",
    "FakeSchedulers",
    "PushCall",
    "echo",
]

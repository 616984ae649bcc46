"""shoal: a distributed model serving system.

The Python API (``shoal.api``) is exported here lazily, so that ``import shoal`` stays cheap
(no grpc until a client makes its first call)::

    import shoal
    c = shoal.connect("127.0.0.1:8470")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from shoal.api import Applied, AsyncClient, AsyncHandle, Client, Handle, Reply, connect
    from shoal.core.spec import DeploymentSpec
    from shoal.decorator import deployment, spec_of
    from shoal.errors import ShoalError
    from shoal.replica.compose import given_up

_LAZY = {
    "connect": "shoal.api",
    "Client": "shoal.api",
    "AsyncClient": "shoal.api",
    "Handle": "shoal.api",
    "AsyncHandle": "shoal.api",
    "Applied": "shoal.api",
    "Reply": "shoal.api",
    "deployment": "shoal.decorator",
    "spec_of": "shoal.decorator",
    "DeploymentSpec": "shoal.core.spec",
    "ShoalError": "shoal.errors",
    "given_up": "shoal.replica.compose",
}

__all__ = [
    "Applied",
    "AsyncClient",
    "AsyncHandle",
    "Client",
    "DeploymentSpec",
    "Handle",
    "Reply",
    "ShoalError",
    "__version__",
    "connect",
    "deployment",
    "given_up",
    "spec_of",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shoal' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

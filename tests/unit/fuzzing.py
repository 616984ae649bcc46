"""What the fuzz tests share: hypothesis settings, and the check that a keep-alive HTTP
connection still serves the next request after whatever a test sent on it."""

from __future__ import annotations

import asyncio
import os

import httpx
from hypothesis import HealthCheck, settings


def fuzz_settings(default_examples: int) -> settings:
    """``default_examples`` per test, or ``SHOAL_FUZZ_EXAMPLES`` (see docs/security.md)."""
    return settings(
        max_examples=int(os.environ.get("SHOAL_FUZZ_EXAMPLES", str(default_examples))),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )


def still_served(
    loop: asyncio.AbstractEventLoop, client: httpx.AsyncClient, after: httpx.Response, health: str
) -> None:
    """The request after ``after`` on the same keep-alive connection is answered (unless
    the server said it would close it, as it may for a request that is not HTTP)."""
    if after.headers.get("connection", "").lower() == "close":
        return
    used = after.extensions["network_stream"].get_extra_info("client_addr")
    ok = loop.run_until_complete(client.get(health))
    assert ok.status_code == 200, ok.text
    assert ok.extensions["network_stream"].get_extra_info("client_addr") == used, "a new connection"

"""The dashboard's script as the head serves it, read where no browser runs (the browser's
checks are in tests/e2e/test_dashboard.py): it polls with setInterval no more, which started
a poll every 2 s while the last still waited on a slow head; each poll is chained after the
one before ends, and each request has a time limit."""

from __future__ import annotations

import httpx
import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.head.node import HeadNode
from shoal.http.head import head_app
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers

pytestmark = pytest.mark.timeout(10)


async def test_the_served_script_polls_once_at_a_time(store: MemoryStore, fleet: FakeSchedulers) -> None:
    node = HeadNode(Settings(), store, fleet, FakeClock())
    transport = httpx.ASGITransport(app=head_app(node))
    async with httpx.AsyncClient(transport=transport, base_url="http://head") as client:
        page = (await client.get("/")).text
        script = (await client.get("/static/dashboard.js")).text
    await node.aclose()

    assert '<script src="/static/dashboard.js">' in page and 'id="filter"' in page
    assert "setInterval(" not in script
    # The next poll is set once a poll has ended (after its await), and nowhere else.
    body = script[script.index("async function poll()") :]
    assert body.index("await refresh()") < body.index("setTimeout(poll, poller.gap)")
    assert script.count("setTimeout(poll,") == 1  # (the filter box's own timer polls through pollNow)
    assert "signal: AbortSignal.timeout(FETCH_TIMEOUT_MS)" in script


async def test_the_pages_cannot_be_framed_and_run_only_the_heads_scripts(
    store: MemoryStore, fleet: FakeSchedulers
) -> None:
    """The API docs page sends requests with the token the dashboard keeps (an admin's, say):
    another site could frame it and lead a click onto its "send" (a DELETE); and answers that
    quote what clients and models wrote (a replica's log) must be read as what they say
    they are, never sniffed as HTML. Before: none of these headers."""
    node = HeadNode(Settings(), store, fleet, FakeClock())
    transport = httpx.ASGITransport(app=head_app(node))
    async with httpx.AsyncClient(transport=transport, base_url="http://head") as client:
        answers = {
            path: await client.get(path)
            for path in ("/", "/docs", "/static/dashboard.js", "/api/status", "/api/deployments/nope")
        }
    await node.aclose()

    for path, r in answers.items():
        assert r.headers["x-content-type-options"] == "nosniff", path
        assert r.headers["x-frame-options"] == "DENY", path
        policy = dict(p.strip().split(" ", 1) for p in r.headers["content-security-policy"].split(";"))
        assert policy["frame-ancestors"] == "'none'", path
        assert policy["script-src"] == "'self'", path  # no inline script, nothing from elsewhere
        assert policy["default-src"] == "'self'", path
    assert answers["/api/deployments/nope"].status_code == 404
    # The docs page's script is a file of its own, so the policy can refuse inline ones.
    page = answers["/docs"].text
    assert "<script>" not in page and '<script src="/static/docs.js">' in page

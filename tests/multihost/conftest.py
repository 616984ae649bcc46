"""Fixtures of the multi-host tier: hosts in network namespaces, and a shoal cluster across them.

Every test here skips, saying why, where namespaces cannot be made (not root, no
``ip``/``iptables``, a kernel or container that refuses); ``make test`` installs iproute2
and iptables on Debian when it runs as root.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.testing.netns import Hosts, NetCluster, unavailable_reason
from tests.multihost.helpers import render_figures

MakeCluster = Callable[..., Awaitable[NetCluster]]


@pytest.fixture(scope="session")
def netns_ready() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")


@pytest.fixture
async def make_cluster(netns_ready: None, tmp_path: Path) -> AsyncIterator[MakeCluster]:
    """``await make_cluster(schedulers=2, scheduler_args=..., env=...)``: a head on host 0 and a
    scheduler on each further host, each in its own namespace; all of it is gone after the test."""
    made: list[tuple[Hosts, NetCluster]] = []

    async def make(
        schedulers: int = 2,
        scheduler_args: list[list[str]] | None = None,
        env: dict[str, str] | None = None,
    ) -> NetCluster:
        hosts = Hosts(schedulers + 1).start()
        cluster = NetCluster(hosts, tmp_path / f"cluster{len(made)}", scheduler_args=scheduler_args, env=env)
        made.append((hosts, cluster))
        await cluster.__aenter__()
        return cluster

    try:
        yield make
    finally:
        for hosts, cluster in reversed(made):
            try:
                await cluster.close()
            finally:
                hosts.close()


@pytest.fixture(scope="session")
def figures() -> Iterator[list[dict[str, Any]]]:
    """Rows of the reliability table (fault, requests, failed, recovery, p99 during) that the
    tests measure; printed at the end, and written to ``$SHOAL_RELIABILITY_OUT`` when set
    (docs/reliability.md is made from it)."""
    rows: list[dict[str, Any]] = []
    yield rows
    if rows:
        text = render_figures(rows)
        print("\n" + text)
        out = os.environ.get("SHOAL_RELIABILITY_OUT")
        if out:
            Path(out).write_text(text + "\n")

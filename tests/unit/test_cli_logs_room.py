"""``shoal logs DEPLOYMENT`` against a head that relays at most ``max_log_streams`` log reads
at once (128 by default), as a head does. Before, the command read every replica at once
and failed whole on the first refusal: a deployment of more replicas than the limit (4
here; or fewer, while a dashboard followed others) could not have its logs read or
followed at all ("the head relays 2 replica log reads and follows at once...")."""

from __future__ import annotations

import argparse
import asyncio
import io
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from shoal.cli import logs
from shoal.errors import ResourceExhausted

pytestmark = pytest.mark.timeout(20)

REPLICAS = [f"echo-{i:06x}" for i in range(12)]


class CappedHead:
    """The head as ``shoal logs`` sees it: deployment ``echo`` of ``replicas``, and at most
    ``cap`` log reads relayed at once (past it, ResourceExhausted, as ``max_log_streams``)."""

    def __init__(self, replicas: list[str], cap: int) -> None:
        self.replicas = replicas
        self.cap = cap
        self.open = 0
        self.most = 0

    async def status(self, only: Any = None) -> Any:
        doc = {"deployments": [{"name": "echo", "replicas": [{"id": r} for r in self.replicas]}]}
        return SimpleNamespace(to_json=lambda: doc)

    async def read_log(self, replica_id: str, tail_bytes: int, follow: bool) -> AsyncIterator[bytes]:
        if self.open >= self.cap:
            raise ResourceExhausted(
                f"the head relays {self.open} replica log reads and follows at once, its limit "
                "(setting max_log_streams)"
            )
        self.open += 1
        self.most = max(self.most, self.open)
        try:
            yield f"12:00:00 {replica_id} loaded\n".encode()
            await asyncio.sleep(3600 if follow else 0.01)  # a follow goes on until cancelled
        finally:
            self.open -= 1


async def test_the_logs_of_more_replicas_than_the_head_relays_at_once_are_all_read(
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    head = CappedHead(REPLICAS, cap=4)
    args = argparse.Namespace(follow=False, tail_bytes=1000)

    assert await logs._deployment_logs(head, "echo", REPLICAS, args) == 0

    out = capsysbinary.readouterr().out.decode()
    assert sorted(out.splitlines()) == [f"{r} | 12:00:00 {r} loaded" for r in REPLICAS]
    assert head.most <= logs.READS_AT_ONCE


async def test_a_read_refused_for_want_of_room_is_asked_again(
    capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "FULL_RETRY_S", (0.05, 0.2))
    head = CappedHead(REPLICAS, cap=0)  # others hold every place

    async def free_later() -> None:
        await asyncio.sleep(0.4)
        head.cap = 2

    freeing = asyncio.create_task(free_later())
    args = argparse.Namespace(follow=False, tail_bytes=1000)
    assert await logs._deployment_logs(head, "echo", REPLICAS, args) == 0
    await freeing
    assert len(capsysbinary.readouterr().out.decode().splitlines()) == len(REPLICAS)


async def test_a_follow_takes_the_room_there_is_says_so_and_follows_the_rest_once_there_is_more(
    capsys: pytest.CaptureFixture[str],
) -> None:
    head = CappedHead(REPLICAS, cap=4)
    out = io.BytesIO()
    follow = asyncio.create_task(logs._follow_deployment(head, "echo", REPLICAS, 1000, out, relist_s=0.05))
    try:
        await asyncio.sleep(0.3)
        assert not follow.done()  # following what it can, not failed
        assert len(out.getvalue().splitlines()) == 4
        assert "not following 8 of 12 replicas of echo yet" in capsys.readouterr().err

        head.cap = len(REPLICAS)  # room again: the rest join at the next listing
        await asyncio.sleep(0.3)
        assert sorted(line.split(b" | ")[0].decode() for line in out.getvalue().splitlines()) == REPLICAS
    finally:
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)

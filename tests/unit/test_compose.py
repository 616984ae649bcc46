"""Handles to other deployments (shoal.replica.compose) over a fake caller: what a call
carries, and what is refused before any call is made."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from shoal.config import Settings
from shoal.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from shoal.replica.batcher import Batcher
from shoal.replica.compose import CallContext, Deployments, GivenUp, current_call
from shoal.rpc.clients import NativeClient
from shoal.types import Arrays

pytestmark = pytest.mark.timeout(10)


class RecordingCaller:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, str]] = []
        self.model_ids: list[str] = []

    async def infer(
        self,
        deployment: str,
        inputs: Arrays,
        *,
        timeout_s: float = 0.0,
        request_id: str = "",
        model_id: str = "",
    ) -> tuple[Arrays, str]:
        if deployment == "missing":
            raise NotFound("no deployment named 'missing'")  # as the scheduler answers
        self.calls.append((deployment, timeout_s, request_id))
        self.model_ids.append(model_id)
        return {k: v * 2 for k, v in inputs.items()}, "r-1"


X = {"x": np.ones((1, 2), dtype=np.float32)}


async def test_a_call_carries_what_is_left_of_the_deadline_and_the_request_id() -> None:
    caller = RecordingCaller()
    handles = Deployments("front", caller, asyncio.get_running_loop())
    current_call.set(CallContext(("req-7",), time.monotonic() + 2.0))

    out = await handles["back"].ainfer(X)

    np.testing.assert_array_equal(out["x"], X["x"] * 2)
    [(name, timeout_s, request_id)] = caller.calls
    assert (name, request_id) == ("back", "req-7")
    assert 1.0 < timeout_s <= 2.0


async def test_the_blocking_call_from_the_model_thread_carries_the_request_too() -> None:
    caller = RecordingCaller()
    handles = Deployments("front", caller, asyncio.get_running_loop())

    def on_model_thread() -> Arrays:
        current_call.set(CallContext(("req-8",), time.monotonic() + 5.0))
        return handles["back"].infer(X)

    out = await asyncio.to_thread(on_model_thread)

    np.testing.assert_array_equal(out["x"], X["x"] * 2)
    assert caller.calls[0][2] == "req-8"


async def test_a_call_names_the_model_of_a_multiplexed_target() -> None:
    # Before, a handle had no way to name one: a multiplexed target refused every call.
    caller = RecordingCaller()
    handles = Deployments("front", caller, asyncio.get_running_loop())
    await handles["tenants"].ainfer(X, model_id="t2")
    await asyncio.to_thread(lambda: handles["tenants"].infer(X, model_id="t3"))
    await handles["plain"].ainfer(X)
    assert caller.model_ids == ["t2", "t3", ""]


async def test_a_missing_target_is_not_answered_as_the_caller_missing() -> None:
    # Before, the caller's client got NOT_FOUND (404) "no deployment named 'missing'" for a
    # request to a deployment that exists.
    handles = Deployments("front", RecordingCaller(), asyncio.get_running_loop())
    with pytest.raises(
        FailedPrecondition,
        match="deployment 'front' calls 'missing', which answered: no deployment named 'missing'",
    ):
        await handles["missing"].ainfer(X)


async def test_refused_before_any_call() -> None:
    caller = RecordingCaller()
    handles = Deployments("front", caller, asyncio.get_running_loop())
    with pytest.raises(InvalidArgument, match="cannot call itself"):
        handles["front"]
    with pytest.raises(FailedPrecondition, match="ainfer"):
        handles["back"].infer(X)  # blocking on the event loop would stall the replica
    current_call.set(CallContext(("late",), time.monotonic() - 0.1))
    with pytest.raises(DeadlineExceeded, match="no time left"):
        await handles["back"].ainfer(X)
    assert caller.calls == []


async def test_a_batch_serves_its_requests_earliest_deadline_and_every_id() -> None:
    seen: list[CallContext | None] = []
    release = asyncio.Event()

    async def run(inputs: Arrays) -> Arrays:
        seen.append(current_call.get())
        await release.wait()
        return inputs

    now = time.monotonic()
    async with Batcher(run, max_batch_size=8, max_delay_ms=50) as batcher:

        async def request(rid: str, deadline: float) -> Arrays:
            current_call.set(CallContext((rid,), deadline))
            return await batcher.submit({"x": np.ones((1, 2), dtype=np.float32)})

        # "a" finds the model idle and runs alone; "b" and "c" queue behind it and share a batch.
        first = asyncio.create_task(request("a", now + 9))
        while not seen:
            await asyncio.sleep(0)
        rest = [asyncio.create_task(request("b", now + 5)), asyncio.create_task(request("c", now + 7))]
        while batcher.queued < 2:
            await asyncio.sleep(0)
        release.set()
        await asyncio.gather(first, *rest)

    assert seen == [CallContext(("a",), now + 9), CallContext(("b", "c"), now + 5)]


async def test_a_call_over_the_message_limit_names_the_target_and_the_setting() -> None:
    """A model that sent 100 MB to another deployment got gRPC's ``CLIENT: Sent message larger
    than max (104857654 vs. 67108864)``, and its client, whose own request was small, read it
    as about its own. Now the handle's client (NativeClient) names the call and the setting;
    the scheduler is never asked (none listens at this address)."""
    client = NativeClient("127.0.0.1:9", Settings(max_message_mb=1))
    try:
        with pytest.raises(ResourceExhausted) as err:
            await client.infer("leaf", {"x": np.zeros(2 * 1024 * 1024 // 4 + 1, dtype=np.float32)})
    finally:
        await client.close()
    assert "the request to 'leaf' is" in str(err.value)
    assert "max_message_mb" in str(err.value)


class HangingCaller:
    """A target that never answers; records whether its call was cancelled."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancelled = threading.Event()

    async def infer(
        self,
        deployment: str,
        inputs: Arrays,
        *,
        timeout_s: float = 0.0,
        request_id: str = "",
        model_id: str = "",
    ) -> tuple[Arrays, str]:
        self.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return inputs, "r-1"


async def test_a_blocking_call_stops_when_every_request_it_serves_is_given_up() -> None:
    """A client that hung up left its model thread blocked in the call until the target
    answered (or the deadline, a minute by default), and the replica served no one else.
    Once each request of the call's batch is given up, the call is cancelled and the
    thread freed; while one request still waits, it goes on."""
    caller = HangingCaller()
    handles = Deployments("front", caller, asyncio.get_running_loop())
    first, second = GivenUp(), GivenUp()
    batch = CallContext.merge(
        [
            CallContext(("req-1",), time.monotonic() + 30, (first,)),
            CallContext(("req-2",), time.monotonic() + 30, (second,)),
        ]
    )

    def on_model_thread() -> Arrays:
        current_call.set(batch)
        return handles["back"].infer(X)

    running = asyncio.ensure_future(asyncio.to_thread(on_model_thread))
    await asyncio.to_thread(caller.started.wait, 5)
    first.set()  # one of the two given up: the other still waits for the answer
    await asyncio.sleep(0.3)
    assert not running.done() and not caller.cancelled.is_set()
    second.set()
    with pytest.raises(DeadlineExceeded, match="given up"):
        await asyncio.wait_for(running, 5)
    assert await asyncio.to_thread(caller.cancelled.wait, 5)


def test_shoal_given_up_says_whether_anyone_waits_for_the_running_call() -> None:
    """``shoal.given_up()``, for python models that work in steps: false outside a model
    call and while one request of the call still waits, true once each is given up."""
    import shoal

    assert shoal.given_up() is False
    first, second = GivenUp(), GivenUp()
    batch = CallContext.merge(
        [
            CallContext(("req-1",), time.monotonic() + 30, (first,)),
            CallContext(("req-2",), time.monotonic() + 30, (second,)),
        ]
    )
    token = current_call.set(batch)
    try:
        first.set()
        assert shoal.given_up() is False
        second.set()
        assert shoal.given_up() is True
    finally:
        current_call.reset(token)

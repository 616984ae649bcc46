"""The replica's dynamic batcher, driven with an in-memory model."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import pytest

from shoal.errors import Internal, InvalidArgument, Unavailable
from shoal.replica.batcher import Batcher

Tensors = dict[str, np.ndarray]


class Model:
    """Echoes its inputs; records each call; can be held at a gate to build a queue."""

    def __init__(self) -> None:
        self.calls: list[Tensors] = []
        self.tasks: list[asyncio.Task[object] | None] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.active = 0
        self.max_active = 0

    async def __call__(self, inputs: Tensors) -> Tensors:
        self.calls.append(inputs)
        self.tasks.append(asyncio.current_task())
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.entered.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            return {name: array.copy() for name, array in inputs.items()}
        finally:
            self.active -= 1

    @property
    def batch_rows(self) -> list[int]:
        return [next(iter(call.values())).shape[0] for call in self.calls]


def rows(tag: int, n: int = 1, width: int = 3, dtype: type = np.float32) -> Tensors:
    """``n`` rows that say which request they belong to."""
    return {"x": np.full((n, width), tag, dtype=dtype)}


async def test_concurrent_requests_share_one_call_and_get_their_own_rows() -> None:
    model = Model()
    sizes = [1, 2, 3, 1, 1]  # 8 rows in all: the batch is full, nobody waits for the delay
    async with Batcher(model, max_batch_size=8, max_delay_ms=5_000) as batcher:
        started = time.monotonic()
        results = await asyncio.gather(*(batcher.submit(rows(i, n)) for i, n in enumerate(sizes)))
        assert time.monotonic() - started < 1.0
    assert model.batch_rows == [8]
    for i, (n, out) in enumerate(zip(sizes, results, strict=True)):
        np.testing.assert_array_equal(out["x"], np.full((n, 3), i, dtype=np.float32))
    assert batcher.batch_sizes == {8: 1}
    assert (batcher.requests, batcher.batches) == (5, 1)


async def test_a_lone_request_at_an_idle_batcher_runs_at_once() -> None:
    # Holding it max_delay_ms would wait for nothing: c=1 with batching on must cost what
    # it costs with batching off.
    model = Model()
    async with Batcher(model, max_batch_size=64, max_delay_ms=5_000) as batcher:
        started = time.monotonic()
        await batcher.submit(rows(0))
        elapsed = time.monotonic() - started
    assert elapsed < 1.0
    assert model.batch_rows == [1]


async def wait_queued(batcher: Batcher, n: int) -> None:
    while batcher.queued < n:
        await asyncio.sleep(0)


async def test_requests_that_arrive_while_the_model_is_busy_share_the_next_batch() -> None:
    model = Model()
    model.gate = asyncio.Event()
    async with Batcher(model, max_batch_size=64, max_delay_ms=50) as batcher:
        first = asyncio.create_task(batcher.submit(rows(0)))
        await model.entered.wait()  # the first runs at once, alone, and holds the model
        second = asyncio.create_task(batcher.submit(rows(1)))
        third = asyncio.create_task(batcher.submit(rows(2, 2)))
        await asyncio.wait_for(wait_queued(batcher, 2), 2.0)
        model.gate.set()
        results = await asyncio.gather(first, second, third)
    assert model.batch_rows == [1, 3]
    np.testing.assert_array_equal(results[2]["x"], np.full((2, 3), 2, np.float32))


async def test_zero_delay_runs_at_once() -> None:
    model = Model()
    async with Batcher(model, max_batch_size=64, max_delay_ms=0) as batcher:
        started = time.monotonic()
        await batcher.submit(rows(0))
        assert time.monotonic() - started < 0.5


async def test_a_model_that_fails_every_request_fails_each_of_the_batch() -> None:
    async def broken(inputs: Tensors) -> Tensors:
        raise ValueError("boom")

    async with Batcher(broken, max_batch_size=3, max_delay_ms=20) as batcher:
        results = await asyncio.gather(*(batcher.submit(rows(i)) for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, ValueError) and str(r) == "boom" for r in results)
        # The batch failed, then each request failed alone too: no execution succeeded, so
        # none is counted (Triton's execution_count).
        assert model_calls(batcher) == (0, 0, {})
        # The batcher survives a failed batch.
        with pytest.raises(ValueError):
            await batcher.submit(rows(9))


@pytest.mark.parametrize(
    "answer",
    [
        {"y": np.zeros((2, 3))},  # too few rows
        {"y": np.float32(1.0)},  # a scalar
        {"y": [1, 2, 3]},  # not an array
    ],
)
async def test_outputs_without_one_row_per_input_row_are_internal(answer: dict[str, object]) -> None:
    async def wrong(inputs: Tensors) -> Tensors:
        return answer  # type: ignore[return-value]

    async with Batcher(wrong, max_batch_size=3, max_delay_ms=1_000) as batcher:
        results = await asyncio.gather(*(batcher.submit(rows(i)) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, Internal) for r in results), results
    assert "one row along axis 0 per input row" in str(results[0])


async def test_one_bad_request_in_a_batch_fails_alone() -> None:
    # Eight requests batched together, one of them poisoned: only that one gets the error.
    async def picky(inputs: Tensors) -> Tensors:
        if (inputs["x"] == 5).any():
            raise ValueError("row with a 5")
        return {"x": inputs["x"] * 2}

    async with Batcher(picky, max_batch_size=8, max_delay_ms=1_000) as batcher:
        results = await asyncio.gather(*(batcher.submit(rows(i)) for i in range(8)), return_exceptions=True)
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [5]
    assert isinstance(results[5], ValueError)
    for i, r in enumerate(results):
        if i != 5:
            assert isinstance(r, dict)
            np.testing.assert_array_equal(r["x"], np.full((1, 3), 2 * i, np.float32))
    # The failed batch is not an execution, nor is the offender's own call; the seven
    # others ran once each, alone (before: 9 calls counted, over 16 rows).
    assert model_calls(batcher) == (7, 7, {1: 7})


def model_calls(batcher: Batcher) -> tuple[int, int, dict[int, int]]:
    """What the batcher counted: requests answered, successful calls, rows per call."""
    return batcher.requests, batcher.batches, dict(batcher.batch_sizes)


async def test_a_request_of_no_rows_is_never_batched_with_rows() -> None:
    """The model sees a request of 0 rows as 0 rows under load too, so it gets the answer
    it gets alone (before: a model that refuses 0 rows answered it in a batch, not alone)."""

    async def refuses_empty(inputs: Tensors) -> Tensors:
        if inputs["x"].shape[0] == 0:
            raise ValueError("no rows")
        return {"x": inputs["x"] * 2}

    async with Batcher(refuses_empty, max_batch_size=16, max_delay_ms=50) as batcher:
        alone = await asyncio.gather(batcher.submit(rows(0, n=0)), return_exceptions=True)
        mixed = await asyncio.gather(
            *(batcher.submit(rows(i, n=0 if i % 4 == 0 else 1)) for i in range(12)), return_exceptions=True
        )
    assert isinstance(alone[0], ValueError)
    for i, r in enumerate(mixed):
        if i % 4 == 0:
            assert isinstance(r, ValueError), (i, r)
        else:
            assert isinstance(r, dict)
            np.testing.assert_array_equal(r["x"], np.full((1, 3), 2 * i, np.float32))


async def test_incompatible_requests_go_into_separate_batches() -> None:
    model = Model()
    requests: list[Tensors] = [
        rows(0),
        rows(1, width=4),  # other trailing shape
        rows(2, dtype=np.float64),  # other dtype
        {"z": np.full((1, 3), 3, np.float32)},  # other input name
        rows(4),
        rows(5, width=4),
    ]
    async with Batcher(model, max_batch_size=16, max_delay_ms=20) as batcher:
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
    for request, result in zip(requests, results, strict=True):
        assert result.keys() == request.keys()
        for name in request:
            assert result[name].dtype == request[name].dtype
            np.testing.assert_array_equal(result[name], request[name])
    assert sorted(model.batch_rows) == [1, 1, 2, 2]  # (0, 4), (1, 5), the float64 one, the 'z' one


async def test_a_caller_cancelled_while_queued_leaves_the_queue_and_hurts_nobody() -> None:
    model = Model()
    model.gate = asyncio.Event()
    async with Batcher(model, max_batch_size=8, max_delay_ms=0) as batcher:
        running = asyncio.create_task(batcher.submit(rows(0)))
        await model.entered.wait()  # the first batch holds the model
        queued = [asyncio.create_task(batcher.submit(rows(i))) for i in (1, 2, 3)]
        await wait_queued(batcher, 3)
        assert (batcher.queued, batcher.in_flight) == (3, 1)
        queued[1].cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued[1]
        assert batcher.queued == 2
        model.gate.set()
        first, third = await queued[0], await queued[2]
        await running
    np.testing.assert_array_equal(first["x"], np.full((1, 3), 1, np.float32))
    np.testing.assert_array_equal(third["x"], np.full((1, 3), 3, np.float32))
    assert model.batch_rows == [1, 2]  # the cancelled request's row never reached the model
    assert batcher.dropped == 1


async def test_a_caller_cancelled_while_its_batch_runs_does_not_break_the_batch() -> None:
    model = Model()
    model.gate = asyncio.Event()
    async with Batcher(model, max_batch_size=3, max_delay_ms=1_000) as batcher:
        tasks = [asyncio.create_task(batcher.submit(rows(i))) for i in range(3)]
        await model.entered.wait()
        tasks[0].cancel()
        await asyncio.sleep(0)
        model.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    for i in (1, 2):
        out = results[i]
        assert isinstance(out, dict)
        np.testing.assert_array_equal(out["x"], np.full((1, 3), i, np.float32))
    assert model.batch_rows == [3]


async def test_batches_run_one_at_a_time_and_the_next_gathers_meanwhile() -> None:
    model = Model()
    model.gate = asyncio.Event()
    async with Batcher(model, max_batch_size=4, max_delay_ms=0) as batcher:
        first = asyncio.create_task(batcher.submit(rows(0)))
        await model.entered.wait()
        rest = [asyncio.create_task(batcher.submit(rows(i))) for i in range(1, 7)]
        await wait_queued(batcher, 6)
        assert batcher.queued == 6
        model.gate.set()
        await asyncio.gather(first, *rest)
    assert model.max_active == 1
    assert model.batch_rows == [1, 4, 2]
    assert batcher.batch_sizes == {1: 1, 4: 1, 2: 1}


async def test_closed_loop_clients_run_as_soon_as_all_are_back_not_after_max_delay() -> None:
    """Clients answered together send their next requests together: once as many are queued
    as the last call served, every one is back and the batch runs. Holding it max_delay_ms
    waits for nothing (seen: with max_delay_ms 5, four such clients got a quarter of the
    requests a second they got unbatched)."""
    model = Model()
    async with Batcher(model, max_batch_size=32, max_delay_ms=60_000) as batcher:

        async def client(tag: int) -> None:
            for _ in range(3):
                await batcher.submit(rows(tag))

        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(4))), 10.0)
    assert model.batch_rows == [4, 4, 4]


async def test_two_groups_of_clients_answered_in_turn_merge_into_one_batch() -> None:
    """A group that queued while another's batch ran waits for that group to come back
    (both were in play when the call ended), so the two run as one batch from then on,
    not as two small ones for ever."""
    model = Model()
    model.gate = asyncio.Event()
    async with Batcher(model, max_batch_size=32, max_delay_ms=60_000) as batcher:

        async def client(tag: int, rounds: int) -> None:
            for _ in range(rounds):
                await batcher.submit(rows(tag))

        first = [asyncio.create_task(client(i, 2)) for i in range(4)]
        await model.entered.wait()  # the first group's batch holds the model
        second = [asyncio.create_task(client(i, 1)) for i in range(4, 8)]
        await wait_queued(batcher, 4)
        model.gate.set()
        await asyncio.wait_for(asyncio.gather(*first, *second), 10.0)
    assert model.batch_rows == [4, 8]


async def test_a_short_batch_does_not_lower_the_count_of_clients_to_wait_for() -> None:
    """The count of requests in play is the most over recent calls: when fewer clients come
    back than were in play (some are slow, or gone), their requests wait out max_delay_ms
    again next time rather than running at once as if everyone were back."""
    model = Model()
    async with Batcher(model, max_batch_size=32, max_delay_ms=100) as batcher:
        await asyncio.gather(*(batcher.submit(rows(i)) for i in range(8)))
        await asyncio.gather(*(batcher.submit(rows(i)) for i in range(6)))  # waits out the delay
        started = time.monotonic()
        await asyncio.gather(*(batcher.submit(rows(i)) for i in range(6)))
        assert time.monotonic() - started >= 0.09  # waited for the other two again
    assert model.batch_rows == [8, 6, 6]


async def test_a_slow_model_still_waits_for_stragglers_once_every_client_is_back() -> None:
    """All in play are back, but the model's last call took 0.3 s: a request that comes
    0.05 s later still joins the batch (the model has idled less than its call took), where
    a fast model would have run the four at once."""
    model = Model()
    model.gate = asyncio.Event()
    async with Batcher(model, max_batch_size=32, max_delay_ms=60_000) as batcher:

        async def client(tag: int) -> None:
            for _ in range(2):
                await batcher.submit(rows(tag))

        clients = [asyncio.create_task(client(i)) for i in range(4)]
        await model.entered.wait()
        await asyncio.sleep(0.3)  # the first call takes 0.3 s; later ones pass at once
        model.gate.set()
        await asyncio.wait_for(wait_queued(batcher, 4), 5.0)
        await asyncio.sleep(0.05)
        late = asyncio.create_task(batcher.submit(rows(9)))
        await asyncio.wait_for(asyncio.gather(*clients, late), 10.0)
    assert model.batch_rows == [4, 5]


def widths(call: Tensors) -> tuple[int, int]:
    """A model call's (rows, width)."""
    rows_, width = next(iter(call.values())).shape
    return rows_, width


async def test_requests_of_other_shapes_queued_behind_a_batch_do_not_wait_out_max_delay() -> None:
    """Sent together at an idle model: each shape runs as soon as the model is free. Before,
    the shapes left queued behind the first shape's batch were fewer than the requests in
    play at its end (that batch's among them), so they waited out max_delay_ms for clients
    whose requests could never join them (seen: 3.01 s with max_delay_ms 3000, or 504)."""
    model = Model()
    shapes = [(1, 4), (1, 4), (1, 3), (1, 3), (1, 5)]
    async with Batcher(model, max_batch_size=8, max_delay_ms=60_000) as batcher:
        for _ in range(2):  # the second time with these groups' counts in play remembered
            started = time.monotonic()
            results = await asyncio.wait_for(
                asyncio.gather(*(batcher.submit(rows(i, n, width)) for i, (n, width) in enumerate(shapes))),
                5.0,
            )
            assert time.monotonic() - started < 5.0
            for i, ((n, width), out) in enumerate(zip(shapes, results, strict=True)):
                np.testing.assert_array_equal(out["x"], np.full((n, width), i, np.float32))
    assert [widths(call) for call in model.calls] == [(2, 4), (2, 3), (1, 5)] * 2


async def test_requests_of_no_rows_sent_with_requests_of_rows_do_not_wait_out_max_delay() -> None:
    model = Model()
    sizes = [0, 1, 0, 1]
    async with Batcher(model, max_batch_size=8, max_delay_ms=60_000) as batcher:
        for _ in range(2):
            results = await asyncio.wait_for(
                asyncio.gather(*(batcher.submit(rows(i, n)) for i, n in enumerate(sizes))), 5.0
            )
            assert [len(out["x"]) for out in results] == sizes
    assert model.batch_rows == [0, 2] * 2


class SteppedModel(Model):
    """Its first ``held`` calls each wait until :meth:`release` lets them end, in turn."""

    def __init__(self, held: int) -> None:
        super().__init__()
        self.steps = [asyncio.Event() for _ in range(held)]
        self.started = [asyncio.Event() for _ in range(held)]

    async def __call__(self, inputs: Tensors) -> Tensors:
        n = len(self.calls)
        if n < len(self.steps):
            self.started[n].set()
            self.gate = self.steps[n]
        else:
            self.gate = None
        return await super().__call__(inputs)

    async def release(self, n: int) -> None:
        """Let call ``n`` (from 0) end, once it has started."""
        await asyncio.wait_for(self.started[n].wait(), 5.0)
        self.steps[n].set()


async def test_requests_queued_behind_one_that_ran_at_once_do_not_wait_for_its_client() -> None:
    """A request that found the model idle with nothing queued ran at once: its client is
    a lone one as far as the batcher knows, so the requests that queued behind it, of its
    shape or another, are not held max_delay_ms for that client's next request (before:
    as many as were in play, the first among them, had to be queued)."""
    model = SteppedModel(held=1)
    async with Batcher(model, max_batch_size=8, max_delay_ms=60_000) as batcher:
        first = asyncio.create_task(batcher.submit(rows(0, 1, 4)))
        await asyncio.wait_for(model.started[0].wait(), 5.0)
        rest = [asyncio.create_task(batcher.submit(rows(i, 1, w))) for i, w in ((1, 4), (2, 4), (3, 5))]
        await wait_queued(batcher, 3)
        await model.release(0)
        await asyncio.wait_for(asyncio.gather(first, *rest), 5.0)
    assert [widths(call) for call in model.calls] == [(1, 4), (2, 4), (1, 5)]


async def test_a_group_behind_a_head_that_waits_for_its_own_kind_runs_while_the_model_is_idle() -> None:
    """The head's group waits for the clients of its kind that the last call served (their
    next requests can join it); the groups of other shapes queued behind it have all of
    their kind queued, so they run meanwhile rather than with the head, max_delay_ms later."""
    model = SteppedModel(held=2)
    async with Batcher(model, max_batch_size=8, max_delay_ms=60_000) as batcher:
        first = asyncio.create_task(batcher.submit(rows(0, 1, 4)))  # runs at once, alone
        await asyncio.wait_for(model.started[0].wait(), 5.0)
        pair = [asyncio.create_task(batcher.submit(rows(i, 1, 4))) for i in (1, 2)]
        await wait_queued(batcher, 2)
        await model.release(0)
        await asyncio.wait_for(model.started[1].wait(), 5.0)  # the pair's call, both waited
        head = asyncio.create_task(batcher.submit(rows(3, 1, 4)))
        others = [asyncio.create_task(batcher.submit(rows(i, 1, w))) for i, w in ((4, 3), (5, 3), (6, 5))]
        await wait_queued(batcher, 4)
        await model.release(1)
        await asyncio.wait_for(asyncio.gather(first, *pair, *others), 5.0)
        assert not head.done()  # it waits for the pair's clients, whose next requests join it:
        back = [asyncio.create_task(batcher.submit(rows(i, 1, 4))) for i in (7, 8)]
        await asyncio.wait_for(asyncio.gather(head, *back), 5.0)
    assert [widths(call) for call in model.calls] == [(1, 4), (2, 4), (2, 3), (1, 5), (3, 4)]


async def test_who_was_in_play_is_forgotten_once_the_model_has_been_idle_max_delay() -> None:
    """Eight were in play; after the model has idled max_delay_ms nobody is on the way back,
    so two requests queued behind one that ran at once do not wait for eight (before:
    they waited out max_delay_ms, as for IN_PLAY_CALLS calls after any burst)."""
    model = SteppedModel(held=2)
    async with Batcher(model, max_batch_size=8, max_delay_ms=1_000) as batcher:
        burst = [asyncio.create_task(batcher.submit(rows(i))) for i in range(8)]
        await model.release(0)
        await asyncio.gather(*burst)
        await asyncio.sleep(1.1)
        first = asyncio.create_task(batcher.submit(rows(8)))
        await asyncio.wait_for(model.started[1].wait(), 5.0)
        rest = [asyncio.create_task(batcher.submit(rows(i))) for i in (9, 10)]
        await wait_queued(batcher, 2)
        started = time.monotonic()
        await model.release(1)
        await asyncio.gather(first, *rest)
        assert time.monotonic() - started < 0.5
    assert model.batch_rows == [8, 1, 2]


async def test_closed_loop_clients_of_two_shapes_run_as_two_full_batches() -> None:
    """Each shape's batch runs once all of its clients are back. Before, the shape queued
    behind the other's batch waited for the other's clients too, so its last round, with
    nobody left to come back, waited out max_delay_ms."""
    model = Model()
    async with Batcher(model, max_batch_size=32, max_delay_ms=60_000) as batcher:

        async def client(tag: int, width: int) -> None:
            for _ in range(3):
                await batcher.submit(rows(tag, 1, width))

        clients = [client(i, 3 + i % 2) for i in range(8)]
        await asyncio.wait_for(asyncio.gather(*clients), 10.0)
    assert sorted(model.batch_rows) == [4] * 6


async def test_the_batcher_forgets_shapes_no_longer_in_play() -> None:
    model = Model()
    async with Batcher(model, max_batch_size=8, max_delay_ms=60_000) as batcher:
        for width in range(1, 41):
            await asyncio.gather(*(batcher.submit(rows(i, 1, width)) for i in range(2)))
        assert len(batcher._groups) <= 16  # the groups of the last IN_PLAY_CALLS calls
    assert model.batch_rows == [2] * 40


async def test_a_request_bigger_than_max_batch_size_runs_alone() -> None:
    model = Model()
    async with Batcher(model, max_batch_size=4, max_delay_ms=10) as batcher:
        big, small = await asyncio.gather(batcher.submit(rows(0, 6)), batcher.submit(rows(1, 1)))
    assert big["x"].shape == (6, 3)
    assert small["x"].shape == (1, 3)
    assert model.batch_rows == [6, 1]


async def test_max_batch_size_one_calls_run_directly_and_counts() -> None:
    model = Model()
    async with Batcher(model, max_batch_size=1, max_delay_ms=50) as batcher:

        async def call(i: int) -> tuple[Tensors, asyncio.Task[object] | None]:
            return await batcher.submit(rows(i, 2)), asyncio.current_task()

        results = await asyncio.gather(*(call(i) for i in range(3)))
    # No hop: the model ran in each caller's own task, and did not wait for max_delay_ms.
    assert [task for _, task in results] == model.tasks
    for i, (out, _) in enumerate(results):
        np.testing.assert_array_equal(out["x"], np.full((2, 3), i, np.float32))
    assert batcher.batch_sizes == {2: 3}
    assert (batcher.requests, batcher.batches, batcher.in_flight) == (3, 3, 0)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "at least one input"),
        ({"x": np.float32(1.0)}, "scalar"),
        ({"x": np.zeros((2, 3)), "y": np.zeros((3, 3))}, "has 3 rows but 'x' has 2"),
    ],
)
async def test_inputs_that_cannot_be_batched_are_refused(inputs: Tensors, message: str) -> None:
    async with Batcher(Model(), max_batch_size=4, max_delay_ms=0) as batcher:
        with pytest.raises(InvalidArgument, match=message):
            await batcher.submit(inputs)


async def test_aclose_finishes_queued_work_then_refuses_new_requests() -> None:
    model = Model()
    batcher = Batcher(model, max_batch_size=2, max_delay_ms=5_000)
    await batcher.start()
    pending = [asyncio.create_task(batcher.submit(rows(i))) for i in range(3)]
    await wait_queued(batcher, 3)
    await batcher.aclose()  # does not wait out the 5 s delay for the third request
    assert [len(t.result()["x"]) for t in pending] == [1, 1, 1]
    assert model.batch_rows == [2, 1]
    with pytest.raises(Unavailable):
        await batcher.submit(rows(9))


async def test_cancelling_aclose_fails_what_is_left_with_unavailable() -> None:
    model = Model()
    model.gate = asyncio.Event()  # never opened: the model hangs
    batcher = Batcher(model, max_batch_size=1_000, max_delay_ms=0)
    await batcher.start()
    running = asyncio.create_task(batcher.submit(rows(0)))
    await model.entered.wait()
    queued = asyncio.create_task(batcher.submit(rows(1)))
    await wait_queued(batcher, 1)
    closing = asyncio.create_task(batcher.aclose())
    await asyncio.sleep(0)  # one turn of the loop: aclose runs up to its wait for the collector
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    for task in (running, queued):
        with pytest.raises(Unavailable):
            await task


async def test_submit_before_start_is_a_programming_error() -> None:
    batcher = Batcher(Model(), max_batch_size=4, max_delay_ms=0)
    with pytest.raises(RuntimeError, match="before start"):
        await batcher.submit(rows(0))


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(Model(), max_batch_size=0, max_delay_ms=0)
    with pytest.raises(ValueError, match="max_delay_ms"):
        Batcher(Model(), max_batch_size=2, max_delay_ms=-1)


class NowModel(Model):
    """A model whose calls may also run at once, synchronously (``Backend.predict_now``)."""

    def __init__(self, inline: bool = True) -> None:
        super().__init__()
        self.inline = inline
        self.now_calls: list[Tensors] = []

    def now(self, inputs: Tensors) -> Tensors | None:
        if not self.inline:
            return None
        self.now_calls.append(inputs)
        if float(inputs["x"].flat[0]) == 7:
            raise Internal("model raised ValueError: seven")
        return {name: array.copy() for name, array in inputs.items()}


async def test_a_lone_request_at_an_idle_batcher_runs_at_once_and_counts_as_a_batch_of_one() -> None:
    model = NowModel()
    async with Batcher(model, max_batch_size=8, max_delay_ms=5_000, run_now=model.now) as batcher:
        out = batcher.try_now(rows(1, n=2))
        assert out is not None
        np.testing.assert_array_equal(out["x"], rows(1, n=2)["x"])
        assert (batcher.requests, batcher.batches, dict(batcher.batch_sizes)) == (1, 1, {2: 1})
        assert model.calls == []  # no task, no collector: the synchronous call alone
        with pytest.raises(Internal, match="seven"):
            batcher.try_now(rows(7))
        with pytest.raises(InvalidArgument, match="scalar"):
            batcher.try_now({"x": np.float32(1.0)})  # type: ignore[dict-item]


async def test_try_now_declines_when_others_run_or_wait_or_the_model_runs_off_the_loop() -> None:
    model = NowModel()
    model.gate = asyncio.Event()
    async with Batcher(model, max_batch_size=8, max_delay_ms=5_000, run_now=model.now) as batcher:
        running = asyncio.create_task(batcher.submit(rows(1)))
        await model.entered.wait()
        assert batcher.try_now(rows(2)) is None  # the model is busy: it waits its turn
        queued = batcher.enqueue(rows(3))
        assert batcher.try_now(rows(4)) is None
        model.gate.set()
        await running
        await queued.future
        assert model.now_calls == []
    off = NowModel(inline=False)
    async with Batcher(off, max_batch_size=8, max_delay_ms=0, run_now=off.now) as batcher:
        assert batcher.try_now(rows(5)) is None  # its calls run on its thread: the queue's way
    async with Batcher(Model(), max_batch_size=8, max_delay_ms=0) as batcher:
        assert batcher.try_now(rows(6)) is None  # no run_now at all


async def test_try_now_declines_right_after_a_batch_of_several_whose_clients_come_back() -> None:
    """Closed-loop clients answered together send their next requests together: the first
    of them waits for the others (the burst rule), try_now does not run it alone."""
    model = NowModel()
    async with Batcher(model, max_batch_size=8, max_delay_ms=5_000, run_now=model.now) as batcher:
        await asyncio.gather(*(batcher.submit(rows(i)) for i in range(3)))
        assert model.batch_rows == [3]
        assert batcher.try_now(rows(9)) is None


async def test_a_failed_batch_logs_a_cut_of_the_models_error(caplog: pytest.LogCaptureFixture) -> None:
    """A model's error often quotes its input: before, a batch that failed on a client's 1 MB
    of text logged that 1 MB in the replica's log line, once per batch."""
    text = "x" * 1_000_000

    async def quoting(inputs: Tensors) -> Tensors:
        if len(inputs["x"]) > 1:
            raise ValueError(f"cannot read {text}")
        return inputs

    caplog.set_level(logging.INFO, logger="shoal.replica.batcher")
    async with Batcher(quoting, max_batch_size=8, max_delay_ms=1_000) as batcher:
        await asyncio.gather(*(batcher.submit(rows(i)) for i in range(8)))
    (line,) = [r.getMessage() for r in caplog.records if "one by one" in r.getMessage()]
    assert "a batch of 8 requests failed (cannot read xxx" in line
    assert len(line) < 3000 and "more characters" in line

"""Router.send over in-memory replicas: spreading, limits, queue bound, deadlines, retries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import numpy as np
import pytest

from shoal.config import Settings
from shoal.core import payload
from shoal.core.payload import Tensors
from shoal.core.spec import DeploymentSpec
from shoal.errors import DeadlineExceeded, NotFound, ResourceExhausted, Unavailable
from shoal.scheduler.handle import ReplicaGone
from shoal.scheduler.router import RETRY_PAUSE_S, Router
from shoal.testing.fakes import FakeReplicaClient, FakeReplicas, fake_generation
from shoal.testing.wait import until
from shoal.types import DeploymentRoutes, GenerateRequest, Route, RoutingTable
from tests.unit.conftest import make_spec

pytestmark = pytest.mark.timeout(10)


def x(value: float) -> Tensors:
    return payload.from_arrays({"x": np.array([value], dtype=np.float32)})


@pytest.fixture
def fakes() -> FakeReplicas:
    return FakeReplicas()


async def make_router(fakes: FakeReplicas, policy: str = "round_robin") -> Router:
    return Router("s1", Settings(), fakes, policy=policy)


@pytest.fixture
async def router(fakes: FakeReplicas) -> AsyncIterator[Router]:
    r = await make_router(fakes)
    yield r
    await r.aclose()


def add(router: Router, fakes: FakeReplicas, spec: DeploymentSpec, *rids: str) -> list[FakeReplicaClient]:
    """Add local READY replicas ``rid`` at address ``rid:9000``; returns their fakes."""
    for rid in rids:
        router.add(rid, spec, f"{rid}:9000", "s1")
    return [fakes.clients[f"{rid}:9000"] for rid in rids]


def gate(client: FakeReplicaClient) -> asyncio.Event:
    client.gate = asyncio.Event()
    return client.gate


async def test_outputs_come_back_with_the_replica_that_served_them(
    router: Router, fakes: FakeReplicas
) -> None:
    [a] = add(router, fakes, make_spec(), "a")

    outputs, rid = await router.send("echo", x(3.0), request_id="req-1")

    assert rid == "a"
    np.testing.assert_array_equal(payload.to_arrays(outputs)["x"], np.array([3.0], dtype=np.float32))
    assert [c.request_id for c in a.requests] == ["req-1"]
    assert 0 < a.requests[0].timeout_s <= 60.0


async def test_round_robin_spreads_requests_evenly(router: Router, fakes: FakeReplicas) -> None:
    clients = add(router, fakes, make_spec(), "a", "b", "c")

    served = [(await router.send("echo", x(i)))[1] for i in range(6)]

    assert served == ["a", "b", "c", "a", "b", "c"]
    assert [len(c.requests) for c in clients] == [2, 2, 2]


async def test_p2c_balances_concurrent_requests(fakes: FakeReplicas) -> None:
    router = await make_router(fakes, policy="p2c")
    try:
        a, b = add(router, fakes, make_spec(), "a", "b")
        opened = asyncio.Event()
        a.gate = b.gate = opened
        tasks = [asyncio.create_task(router.send("echo", x(i))) for i in range(4)]
        await a.wait_for_requests(2)
        await b.wait_for_requests(2)
        opened.set()
        served = [rid for _, rid in await asyncio.gather(*tasks)]
        assert sorted(served) == ["a", "a", "b", "b"]
    finally:
        await router.aclose()


async def test_max_ongoing_requests_bounds_each_replica(router: Router, fakes: FakeReplicas) -> None:
    a, b = add(router, fakes, make_spec(max_ongoing_requests=1), "a", "b")
    opened = asyncio.Event()
    a.gate = b.gate = opened

    tasks = [asyncio.create_task(router.send("echo", x(i))) for i in range(4)]
    await a.wait_for_requests(1)
    await b.wait_for_requests(1)
    await until(lambda: router.load()["echo"].queued == 2, "two requests waiting for room")
    assert (len(a.requests), len(b.requests)) == (1, 1)
    assert not any(t.done() for t in tasks)

    opened.set()
    results = await asyncio.gather(*tasks)

    assert [float(payload.to_arrays(out)["x"][0]) for out, _ in results] == [0.0, 1.0, 2.0, 3.0]
    assert (a.max_in_flight, b.max_in_flight) == (1, 1)
    assert len(a.requests) + len(b.requests) == 4


async def test_a_full_queue_rejects_at_once_while_admitted_requests_complete(
    router: Router, fakes: FakeReplicas
) -> None:
    [a] = add(router, fakes, make_spec(max_ongoing_requests=1, max_queued_requests=2), "a")
    opened = gate(a)

    tasks = [asyncio.create_task(router.send("echo", x(i))) for i in range(6)]
    await a.wait_for_requests(1)
    await until(lambda: router.load()["echo"].queued == 2, "two requests queued")
    await until(lambda: sum(t.done() for t in tasks) == 3, "three requests refused")

    rejected = [t for t in tasks if t.done()]
    assert tasks[3:] == rejected
    for t in rejected:
        err = t.exception()
        assert isinstance(err, ResourceExhausted)
        assert str(err) == "deployment 'echo' is at capacity: 2 request(s) queued (max_queued_requests=2)"

    opened.set()
    done = await asyncio.gather(*tasks[:3])
    assert [float(payload.to_arrays(out)["x"][0]) for out, _ in done] == [0.0, 1.0, 2.0]
    assert len(a.requests) == 3
    # The queue has drained: a new request is admitted again.
    assert (await router.send("echo", x(9)))[1] == "a"


async def test_a_request_waiting_for_a_busy_replica_times_out(router: Router, fakes: FakeReplicas) -> None:
    [a] = add(router, fakes, make_spec(max_ongoing_requests=1), "a")
    opened = gate(a)
    first = asyncio.create_task(router.send("echo", x(1)))
    await a.wait_for_requests(1)

    with pytest.raises(
        DeadlineExceeded, match=r"^no replica of 'echo' could take the request in time \(1 ready\)$"
    ):
        await router.send("echo", x(2), timeout_s=0.05)

    opened.set()
    assert (await first)[1] == "a"
    assert len(a.requests) == 1


async def test_the_replica_gets_the_time_left_and_a_slow_answer_times_out(
    router: Router, fakes: FakeReplicas
) -> None:
    [a] = add(router, fakes, make_spec(), "a")
    gate(a)

    with pytest.raises(DeadlineExceeded):
        await router.send("echo", x(1), timeout_s=0.05)

    [call] = a.requests
    assert 0 < call.timeout_s <= 0.05
    # The slot was given back.
    a.gate = None
    assert (await router.send("echo", x(2)))[1] == "a"


async def test_a_replica_that_dies_mid_request_hands_it_to_another(
    router: Router, fakes: FakeReplicas
) -> None:
    a, b = add(router, fakes, make_spec(), "a", "b")
    gate(a)  # never opens: a dies with the request pending

    task = asyncio.create_task(router.send("echo", x(7), request_id="req-7"))
    await a.wait_for_requests(1)
    await router.remove("a", failed=True)
    outputs, rid = await task

    assert rid == "b"
    assert float(payload.to_arrays(outputs)["x"][0]) == 7.0
    assert [c.request_id for c in a.requests] == ["req-7"]
    assert [c.request_id for c in b.requests] == ["req-7"]
    assert a.closed
    assert router.ready_count("echo") == 1


async def test_an_unreachable_replica_is_retried_on_another(router: Router, fakes: FakeReplicas) -> None:
    a, b = add(router, fakes, make_spec(), "a", "b")
    a.fail()

    _, rid = await router.send("echo", x(1))

    assert rid == "b"
    assert len(b.requests) == 1


async def test_a_retry_goes_to_a_replica_not_tried_yet(fakes: FakeReplicas) -> None:
    # Two attempts, two replicas, one unreachable: the second attempt must not pick it again.
    router = Router("s1", Settings(request_attempts=2), fakes, policy="p2c")
    try:
        a, b = add(router, fakes, make_spec(), "a", "b")
        a.fail()
        served = [(await router.send("echo", x(i)))[1] for i in range(20)]
        assert served == ["b"] * 20
        assert len(b.requests) == 20
    finally:
        await router.aclose()


async def test_when_every_replica_is_unreachable_the_caller_gets_unavailable(
    router: Router, fakes: FakeReplicas
) -> None:
    a, b = add(router, fakes, make_spec(), "a", "b")
    a.fail()
    b.fail()

    with pytest.raises(Unavailable, match=r"^request req-9: 2 replica\(s\) failed while serving it \(a, b\)"):
        await router.send("echo", x(1), request_id="req-9")


async def test_a_long_request_id_is_cut_in_retry_lines_and_the_error(
    router: Router, fakes: FakeReplicas, caplog: pytest.LogCaptureFixture
) -> None:
    # A client's id may be 1,024 characters; each retry line and the error quoted it whole.
    a, b = add(router, fakes, make_spec(), "a", "b")
    a.fail()
    b.fail()
    request_id = "r" * 1024

    with caplog.at_level("INFO", logger="shoal.router"):
        with pytest.raises(Unavailable) as caught:
            await router.send("echo", x(1), request_id=request_id)

    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2
    for line in [caught.value.message, *(r.getMessage() for r in retries)]:
        assert "r" * 200 + "... (824 more characters)" in line
        assert "r" * 201 not in line


async def test_a_request_refused_by_a_draining_remote_replica_waits_for_the_next_table(
    router: Router, fakes: FakeReplicas
) -> None:
    # Seen in test_rolling_update: another scheduler's replica, the only one this router
    # knew, drained; the head's table dropping it (and listing its replacement) came later
    # than RETRY_PAUSE_S, so both attempts went to the draining replica and the request
    # failed. It said it was going: the request waits for another replica instead.
    spec = make_spec()
    await router.apply_table(table(1, spec, Route("old", "old:9000", "s2")))
    fakes.clients["old:9000"].fail(ReplicaGone("replica old is DRAINING: it takes no new request"))

    task = asyncio.create_task(router.send("echo", x(5.0), request_id="req-1"))
    await asyncio.sleep(2 * RETRY_PAUSE_S)
    assert not task.done()
    await router.apply_table(table(2, spec, Route("new", "new:9000", "s3")))

    _, rid = await asyncio.wait_for(task, 5.0)
    assert rid == "new"
    assert [c.request_id for c in fakes.clients["new:9000"].requests] == ["req-1"]


async def test_requests_on_remote_replicas_a_table_drops_are_answered_there_and_sent_once(
    router: Router, fakes: FakeReplicas
) -> None:
    # A head just restarted lists a deployment with no replica until its schedulers register
    # again, and a head drops a replica from the table when it starts draining. Either way the
    # replica answers what it took. Seen before: the router closed its client at once, the
    # requests were sent to other replicas while the first went on with them (a model ran
    # twice for one request), and a request on two remote replicas was refused as if it had
    # brought down both (CI, test_head_killed_under_load_loses_nothing_and_adopts_replicas).
    spec = make_spec()
    routes = (Route("a", "a:9000", "s2"), Route("b", "b:9000", "s2"))
    await router.apply_table(table(1, spec, *routes))
    gates = gate(fakes.client("a:9000")), gate(fakes.client("b:9000"))
    tasks = [asyncio.create_task(router.send("echo", x(i), request_id=f"req-{i}")) for i in range(4)]
    await until(lambda: len(fakes.clients["a:9000"].requests) + len(fakes.clients["b:9000"].requests) == 4)

    await router.apply_table(table(1, spec, routes[1]))
    await router.apply_table(table(1, spec))  # the restarted head's first: no replica yet
    assert router.ready_count("echo") == 0
    late = asyncio.create_task(router.send("echo", x(9), request_id="late"))
    await asyncio.sleep(2 * RETRY_PAUSE_S)
    assert not any(t.done() for t in [*tasks, late]), [t.exception() for t in tasks if t.done()]
    assert not fakes.clients["a:9000"].closed and not fakes.clients["b:9000"].closed
    await router.apply_table(table(2, spec, *routes))  # listed again: they take requests again
    for g in gates:
        g.set()

    served = [rid for _, rid in await asyncio.wait_for(asyncio.gather(*tasks), 5.0)]
    assert sorted(served) == ["a", "a", "b", "b"]
    _, rid = await asyncio.wait_for(late, 5.0)
    assert rid in ("a", "b")
    sent = [c.request_id for address in ("a:9000", "b:9000") for c in fakes.clients[address].requests]
    assert sorted(sent) == ["late", "req-0", "req-1", "req-2", "req-3"]  # each once


async def hold_on_remote(
    router: Router, fakes: FakeReplicas, spec: DeploymentSpec
) -> tuple[FakeReplicaClient, asyncio.Event, asyncio.Task[tuple[Tensors, str]]]:
    """A table listing one remote replica, ``a``, and a request ``held`` in it: a's fake,
    the gate that releases it, and the request's task."""
    await router.apply_table(table(1, spec, Route("a", "a:9000", "s2")))
    a = fakes.client("a:9000")
    held = gate(a)
    task = asyncio.create_task(router.send("echo", x(1), request_id="held"))
    await a.wait_for_requests(1)
    return a, held, task


FAST_PINGS = Settings(ping_interval_s=0.02, ping_timeout_s=0.05)


async def test_a_replica_the_table_dropped_goes_once_its_requests_are_answered(
    fakes: FakeReplicas,
) -> None:
    router = Router("s1", FAST_PINGS, fakes, policy="round_robin")
    try:
        spec = make_spec()
        routes = (Route("a", "a:9000", "s2"), Route("b", "b:9000", "s2"))
        await router.apply_table(table(1, spec, *routes))
        a = fakes.client("a:9000")
        held = gate(a)
        task = asyncio.create_task(router.send("echo", x(1), request_id="held"))
        await a.wait_for_requests(1)
        await router.apply_table(table(1, spec, routes[1]))  # a drains: dropped from the table

        # Nothing new goes to a; it answers its pings, so what it holds is answered there,
        # and then its client is closed.
        outputs = [await router.send("echo", x(i)) for i in range(3)]
        assert [rid for _, rid in outputs] == ["b"] * 3
        await asyncio.sleep(10 * FAST_PINGS.ping_interval_s)
        assert not a.closed
        held.set()
        _, rid = await asyncio.wait_for(task, 5.0)
        assert rid == "a"
        await until(lambda: a.closed, "a's client closed once idle")
        assert [c.request_id for c in a.requests] == ["held"]
        assert router.ready_count("echo") == 1
    finally:
        await router.aclose()


async def test_a_dropped_replica_that_stops_answering_pings_has_its_requests_sent_elsewhere(
    fakes: FakeReplicas,
) -> None:
    # A machine that froze or was cut off breaks no connection: without the pings, requests
    # on its replica waited for gRPC's keepalive (10-15 s) after the head had dropped it.
    router = Router("s1", replace(FAST_PINGS, request_attempts=1), fakes, policy="round_robin")
    try:
        spec = make_spec()
        a, _, task = await hold_on_remote(router, fakes, spec)
        await router.apply_table(table(1, spec, Route("c", "c:9000", "s3")))
        a.fail()  # frozen: pings fail (the held request would hang)
        _, rid = await asyncio.wait_for(task, 5.0)
        assert rid == "c"  # no attempt spent on a
        assert a.closed
    finally:
        await router.aclose()


async def test_a_request_whose_dropped_replica_dies_under_it_spends_no_attempt(
    fakes: FakeReplicas,
) -> None:
    # One attempt only: the replica the table dropped breaks under the request (it died: the
    # head dropped it for that). The request waits for the next table, and is served there.
    router = Router("s1", Settings(request_attempts=1), fakes, policy="round_robin")
    try:
        spec = make_spec()
        a, held, task = await hold_on_remote(router, fakes, spec)
        await router.apply_table(table(1, spec))
        await a.close()  # its connection breaks: the request fails on it
        await asyncio.sleep(2 * RETRY_PAUSE_S)
        assert not task.done()
        await router.apply_table(table(2, spec, Route("c", "c:9000", "s3")))
        _, rid = await asyncio.wait_for(task, 5.0)
        assert rid == "c"
        held.set()
    finally:
        await router.aclose()


async def test_a_generation_streaming_from_a_replica_the_table_dropped_is_not_cut(
    router: Router, fakes: FakeReplicas
) -> None:
    spec = make_spec()
    await router.apply_table(table(1, spec, Route("a", "a:9000", "s2")))
    a = fakes.client("a:9000")
    a.piece_delay_s = 0.05
    chunks: list[str] = []
    request = GenerateRequest(prompt="one two three four five six", max_tokens=6, stream=True)

    async def generate() -> None:
        async for chunk in router.stream("echo", request):
            chunks.append(chunk.text)

    task = asyncio.create_task(generate())
    await until(lambda: len(chunks) >= 2, "the first pieces")
    await router.apply_table(table(1, spec))  # it drains: dropped from the table
    await asyncio.wait_for(task, 5.0)
    assert a.streams_closed == 0
    assert len(a.generations) == 1
    assert "".join(chunks) == "".join(fake_generation(request))
    await until(lambda: a.closed, "a's client closed once idle")


async def test_a_deleted_deployments_requests_on_remote_replicas_are_answered(
    router: Router, fakes: FakeReplicas
) -> None:
    spec = make_spec()
    a, held, task = await hold_on_remote(router, fakes, spec)
    await router.apply_table(RoutingTable(version=2, deleted=("echo",)))
    with pytest.raises(NotFound):
        await router.send("echo", x(2))
    held.set()
    _, rid = await asyncio.wait_for(task, 5.0)
    assert rid == "a"
    await until(lambda: a.closed, "a's client closed once idle")
    assert "echo" not in router.deployments()


async def test_a_replica_that_says_it_is_going_gets_nothing_new_and_costs_no_attempt(
    fakes: FakeReplicas,
) -> None:
    # One attempt only: the refusal of a draining replica is not one (it ran nothing).
    router = Router("s1", Settings(request_attempts=1), fakes, policy="round_robin")
    try:
        a, b = add(router, fakes, make_spec(), "a", "b")
        a.fail(ReplicaGone("replica a is DRAINING: it takes no new request"))
        served = [(await router.send("echo", x(i)))[1] for i in range(4)]
        assert served == ["b"] * 4
        assert len(b.requests) == 4
        assert router.ready_count("echo") == 1  # a: retired until the table or supervisor drops it
    finally:
        await router.aclose()


async def test_a_replica_whose_connection_broke_once_is_tried_again(
    router: Router, fakes: FakeReplicas
) -> None:
    # A blip (a broken stream, not a replica saying it is going): the only replica is still
    # used, after RETRY_PAUSE_S, and it serves the request.
    [a] = add(router, fakes, make_spec(), "a")
    a.fail()
    task = asyncio.create_task(router.send("echo", x(1.0), request_id="req-2"))
    await asyncio.sleep(RETRY_PAUSE_S / 5)
    a.recover()

    _, rid = await asyncio.wait_for(task, 5.0)
    assert rid == "a"
    assert [c.request_id for c in a.requests] == ["req-2"]


async def test_the_pause_before_trying_a_failed_replica_again_is_not_cut_by_other_changes(
    router: Router, fakes: FakeReplicas
) -> None:
    # Seen in test_chaos_suite.py::test_rolling_update (a loaded run): a request failed on
    # the one remote replica it could use, which had just stopped (its table entry not yet
    # dropped), and was to wait RETRY_PAUSE_S for the table. The deployment's own local
    # replicas, drained by the same update, were removed meanwhile; each removal woke the
    # pause, the request went straight back to the stopped replica, and was refused after
    # two attempts within the same few milliseconds.
    spec = make_spec()
    [a] = add(router, fakes, spec, "a")
    held = gate(a)
    task = asyncio.create_task(router.send("echo", x(1.0), request_id="req"))
    await a.wait_for_requests(1)
    a.fail()
    held.set()  # its answer fails: the first attempt
    await asyncio.sleep(0)
    for rid in ("b", "c"):  # changes that bring no replica to try
        router.add(rid, spec, f"{rid}:9000", "s1")
        router.retire(rid)
        await asyncio.sleep(0.01)
    assert not task.done(), task.exception()
    a.recover()

    _, rid = await asyncio.wait_for(task, 5.0)
    assert rid == "a"


async def test_a_query_of_death_costs_at_most_two_replicas(fakes: FakeReplicas) -> None:
    # A request that kills every replica it reaches: tried on two (the default
    # request_attempts), then it fails saying so, and it is counted.
    router = Router("s1", Settings(), fakes, policy="round_robin")
    try:
        clients = add(router, fakes, make_spec(), "a", "b", "c")
        gate = asyncio.Event()
        for c in clients:
            c.gate = gate
        task = asyncio.create_task(router.send("echo", x(1), request_id="qod"))
        killed: list[str] = []

        def next_attempt_arrived() -> bool:
            return sum(len(c.requests) for c in clients) == len(killed) + 1

        for attempt in (1, 2):
            await until(next_attempt_arrived, f"attempt {attempt}")
            # Whichever replica holds the request now dies.
            holder = next(
                rid for rid, c in zip("abc", clients, strict=True) if c.requests and rid not in killed
            )
            killed.append(holder)
            await router.remove(holder, failed=True)
        # A third attempt would wait at the gate of the third replica: no answer in time.
        with pytest.raises(Unavailable, match="not retried again"):
            await asyncio.wait_for(task, 2.0)
        assert router.stats()["echo"].given_up == 1
        assert sum(len(c.requests) for c in clients) == 2
    finally:
        await router.aclose()


async def test_with_no_replica_a_request_waits_for_one(router: Router, fakes: FakeReplicas) -> None:
    spec = make_spec()
    router.set_spec(spec)
    task = asyncio.create_task(router.send("echo", x(5), timeout_s=2.0))
    await until(lambda: router.load()["echo"].queued == 1, "the request waiting")
    assert not task.done()

    add(router, fakes, spec, "late")
    outputs, rid = await asyncio.wait_for(task, 1.0)

    assert rid == "late"
    assert float(payload.to_arrays(outputs)["x"][0]) == 5.0


async def test_a_replica_of_an_earlier_spec_does_not_make_its_spec_the_deployment_s(
    router: Router, fakes: FakeReplicas
) -> None:
    """The head's table names the current spec; a replica of an earlier revision kept serving
    (serve_revisions), placed again, used to make its own spec the deployment's here."""
    current = make_spec(model="m:New", inputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 4]}])
    earlier = make_spec(model="m:Old", inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 16]}])
    router.set_spec(current)  # as the routing table does
    add(router, fakes, earlier, "old-1")
    router.know(earlier)
    assert router.spec("echo") == current
    # A deployment the router knows nothing of yet takes the replica's spec, as before.
    add(router, fakes, make_spec("fresh"), "fresh-1")
    assert router.spec("fresh") == make_spec("fresh")


async def test_with_no_replica_in_time_the_request_times_out(router: Router) -> None:
    router.set_spec(make_spec())
    with pytest.raises(DeadlineExceeded, match=r"\(0 ready\)$"):
        await router.send("echo", x(5), timeout_s=0.03)


async def test_an_unknown_deployment_is_not_found(router: Router) -> None:
    with pytest.raises(NotFound, match=r"^no deployment named 'nope'$"):
        await router.send("nope", x(1))


async def test_a_retired_replica_finishes_its_request_and_gets_no_new_ones(
    router: Router, fakes: FakeReplicas
) -> None:
    a, _ = add(router, fakes, make_spec(), "a", "b")
    opened = gate(a)
    pending = asyncio.create_task(router.send("echo", x(1)))
    await a.wait_for_requests(1)

    router.retire("a")
    assert router.ready_count("echo") == 1
    later = [(await router.send("echo", x(i)))[1] for i in range(4)]

    opened.set()
    outputs, rid = await pending
    assert (rid, float(payload.to_arrays(outputs)["x"][0])) == ("a", 1.0)
    assert later == ["b", "b", "b", "b"]
    assert len(a.requests) == 1
    assert not a.closed


async def test_a_cancelled_caller_frees_its_slot(router: Router, fakes: FakeReplicas) -> None:
    [a] = add(router, fakes, make_spec(max_ongoing_requests=1), "a")
    gate(a)
    first = asyncio.create_task(router.send("echo", x(1)))
    await a.wait_for_requests(1)

    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first

    a.gate = None
    assert (await router.send("echo", x(2), timeout_s=0.5))[1] == "a"


@pytest.mark.parametrize("passes", [0, 1, 2, 3, 4])
async def test_a_queued_caller_cancelled_as_a_slot_frees_is_cancelled_not_sent(
    router: Router, fakes: FakeReplicas, passes: int
) -> None:
    """Clients that hang up together: the running request's cancel frees its slot, and the
    queued one's cancel comes a few loop passes later, when its wait for a slot may have
    ended already. Before, asyncio.wait_for (Python 3.11) then returned instead of raising,
    the cancel was lost, and the request went to the replica for nobody."""
    [a] = add(router, fakes, make_spec(max_ongoing_requests=1), "a")
    gate(a)
    running = asyncio.create_task(router.send("echo", x(1)))
    await a.wait_for_requests(1)
    queued = asyncio.create_task(router.send("echo", x(2)))
    await until(lambda: router.load()["echo"].queued == 1)
    running.cancel()
    for _ in range(passes):
        await asyncio.sleep(0)
    queued.cancel()
    for task in (running, queued):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(a.requests) == 1
    assert router.stats()["echo"].outcomes["cancelled"] == 2


def table(version: int, spec: DeploymentSpec, *routes: Route) -> RoutingTable:
    return RoutingTable(version, {spec.name: DeploymentRoutes(spec, routes)})


async def test_apply_table_adds_and_removes_remote_replicas_but_keeps_local_ones(
    router: Router, fakes: FakeReplicas
) -> None:
    spec = make_spec()
    [local] = add(router, fakes, spec, "mine")

    await router.apply_table(table(1, spec, Route("r1", "r1:9000", "s2"), Route("mine", "mine:9000", "s1")))
    assert router.ready_count("echo") == 2
    served = {(await router.send("echo", x(i)))[1] for i in range(2)}
    assert served == {"mine", "r1"}

    await router.apply_table(table(2, spec))
    assert router.ready_count("echo") == 1
    assert fakes.clients["r1:9000"].closed
    assert not local.closed
    assert (await router.send("echo", x(3)))[1] == "mine"


async def test_a_deployment_gone_from_the_table_is_forgotten(router: Router, fakes: FakeReplicas) -> None:
    spec = make_spec()
    await router.apply_table(table(1, spec, Route("r1", "r1:9000", "s2")))
    assert list(router.deployments()) == ["echo"]

    await router.apply_table(RoutingTable(2, {}))

    assert router.deployments() == {}
    assert fakes.clients["r1:9000"].closed
    with pytest.raises(NotFound):
        await router.send("echo", x(1))


async def test_a_deployment_deleted_at_the_head_is_not_found_at_once_while_its_replicas_drain(
    router: Router, fakes: FakeReplicas
) -> None:
    [a] = add(router, fakes, make_spec(), "mine")
    a.gate = asyncio.Event()
    in_flight = asyncio.create_task(router.send("echo", x(1)))
    await a.wait_for_requests(1)
    # A request waiting for room (max_ongoing_requests is 64: fill it by retiring instead).
    router.retire("mine")
    waiting = asyncio.create_task(router.send("echo", x(2), timeout_s=30))
    await until(lambda: router.load()["echo"].queued == 1, "the request waiting")
    await router.apply_table(RoutingTable(version=2, deleted=("echo",)))  # the head deleted it
    with pytest.raises(NotFound):
        await asyncio.wait_for(waiting, 1.0)  # at once, not after its 30 s deadline
    with pytest.raises(NotFound):
        await router.send("echo", x(3))
    assert "echo" not in router.deployments()
    a.gate.set()
    _, rid = await in_flight  # what was on the replica finishes
    assert rid == "mine"
    await router.remove("mine", failed=False)
    # Created again under the same name: found again.
    add(router, fakes, make_spec(), "again")
    await router.apply_table(
        RoutingTable(
            version=3, deployments={"echo": DeploymentRoutes(make_spec(), (Route("again", "again:1", "s1"),))}
        )
    )
    assert (await router.send("echo", x(4)))[1] == "again"


async def test_requests_held_for_a_failed_deployment_are_refused_with_why(
    router: Router, fakes: FakeReplicas
) -> None:
    """A deployment with no replica (scaled to zero) that the head marks FAILED: what waits for
    a replica is refused at once, saying why, and so is what comes after, until a replica joins
    or the head clears it; before, each waited out its deadline for a replica never started."""
    spec = make_spec()
    await router.apply_table(table(1, spec))
    waiting = asyncio.create_task(router.send("echo", x(1), timeout_s=30))
    await until(lambda: router.load()["echo"].queued == 1, "the request waiting")
    failed = DeploymentRoutes(spec, failed="process exited with code 1: ValueError: no weights")
    await router.apply_table(RoutingTable(2, {"echo": failed}))
    with pytest.raises(Unavailable, match=r"'echo' is FAILED.*no weights"):
        await asyncio.wait_for(waiting, 1.0)  # at once, not after its 30 s deadline
    with pytest.raises(Unavailable, match="no weights"):
        await router.send("echo", x(2), timeout_s=30)
    # Deployed again: the head clears it, and requests wait for the replica starting.
    await router.apply_table(table(3, spec))
    waiting = asyncio.create_task(router.send("echo", x(3), timeout_s=30))
    await until(lambda: router.load()["echo"].queued == 1, "the request waiting")
    add(router, fakes, spec, "a")
    assert (await waiting)[1] == "a"


async def test_requests_waiting_at_zero_replicas_ask_for_one_report_not_one_each(fakes: FakeReplicas) -> None:
    """The first request to wait for a deployment with no replica asks for a health update at
    once (``on_starved``: the head scales it up from zero); those that join it add nothing the
    head does not know by then. Each used to ask for its own: 500 requests arriving over a
    cold start sent the head 494 health updates, each waking a reconcile pass, where one
    does."""
    starved: list[int] = []
    router = Router("s1", Settings(), fakes, on_starved=lambda: starved.append(1))
    spec = make_spec()
    router.know(spec)
    waiting = [asyncio.create_task(router.send("echo", x(i), timeout_s=30)) for i in range(50)]
    await until(lambda: router.load()["echo"].queued == 50, "the requests waiting")
    assert len(starved) == 1
    add(router, fakes, spec, "a")
    await asyncio.gather(*waiting)
    # At zero again: the next request that waits asks again.
    await router.remove("a", failed=False)
    again = asyncio.create_task(router.send("echo", x(1), timeout_s=30))
    await until(lambda: router.load()["echo"].queued == 1, "the request waiting")
    assert len(starved) == 2
    add(router, fakes, spec, "b")
    assert (await again)[1] == "b"
    await router.aclose()


async def test_a_request_that_times_out_at_zero_replicas_is_told_the_deployment_scales_from_zero(
    router: Router,
) -> None:
    """A deployment scaled to zero whose replica did not start within the request's timeout:
    the client was told only '(0 ready)', not why none was, nor what avoids the wait."""
    router.know(make_spec(autoscaling={"min_replicas": 0, "max_replicas": 2}))
    with pytest.raises(DeadlineExceeded, match=r"\(0 ready: it scales from zero") as err:
        await router.send("echo", x(1), timeout_s=0.05)
    assert "autoscaling.min_replicas 1" in err.value.message


async def test_a_deployment_the_head_does_not_know_keeps_serving_from_local_replicas(
    router: Router, fakes: FakeReplicas
) -> None:
    # Gone from the table without a tombstone (say the head's store was lost): not deleted.
    add(router, fakes, make_spec(), "mine")
    await router.apply_table(RoutingTable(version=2))
    assert (await router.send("echo", x(1)))[1] == "mine"


async def test_draining_refuses_new_requests_and_answers_those_admitted(
    router: Router, fakes: FakeReplicas
) -> None:
    """Shutting down: one request running and two queued for the only replica all finish;
    a request that comes after the drain began is refused at once. Before, the replica was
    drained first and the queued ones waited for a replica that would never come."""
    [a] = add(router, fakes, make_spec(max_ongoing_requests=1), "a")
    opened = gate(a)
    admitted = [asyncio.create_task(router.send("echo", x(i))) for i in range(3)]
    await a.wait_for_requests(1)
    await until(lambda: router.load()["echo"].queued == 2, "two queued")

    drain = asyncio.create_task(router.drain(5.0))
    await asyncio.sleep(0)
    with pytest.raises(Unavailable, match=r"^the scheduler is shutting down: send the request again"):
        await router.send("echo", x(9))
    assert router.at_capacity("echo") is not None
    assert not drain.done()

    opened.set()
    done = await asyncio.gather(*admitted)
    assert [float(payload.to_arrays(out)["x"][0]) for out, _ in done] == [0.0, 1.0, 2.0]
    assert await drain == 0


async def test_requests_left_when_the_drains_grace_runs_out_are_refused(
    router: Router, fakes: FakeReplicas
) -> None:
    [a] = add(router, fakes, make_spec(max_ongoing_requests=1), "a")
    gate(a)  # never opened
    admitted = [asyncio.create_task(router.send("echo", x(i))) for i in range(2)]
    await a.wait_for_requests(1)

    assert await router.drain(0.1) == 2
    for task in admitted:
        with pytest.raises(Unavailable, match=r"^the scheduler is shutting down and its grace of .* ran out"):
            await task


async def test_a_head_waiting_for_schedulers_to_register_again_takes_no_replica_from_the_others(
    router: Router, fakes: FakeReplicas
) -> None:
    # A head that just started lists the replicas of the schedulers that registered with it
    # so far (RoutingTable.adopting). Seen: the router dropped the replicas of a scheduler
    # that had not registered again yet, and requests for a deployment with all its replicas
    # there waited (and timed out) until it did.
    spec = make_spec()
    a, b, c = Route("a", "a:9000", "s2"), Route("b", "b:9000", "s3"), Route("c", "c:9000", "s3")
    await router.apply_table(table(1, spec, a, b, c))

    # s3 registered again with b alone (c stopped meanwhile); s2 has not registered yet.
    await router.apply_table(replace(table(1, spec, b), adopting=True))
    assert sorted(h.replica_id for h in router.handles("echo")) == ["a", "b"]
    served = {(await router.send("echo", x(i)))[1] for i in range(4)}
    assert served == {"a", "b"}

    # The head's wait ended without s2: its replica goes.
    await router.apply_table(table(2, spec, b))
    assert [h.replica_id for h in router.handles("echo")] == ["b"]
    assert fakes.clients["a:9000"].closed

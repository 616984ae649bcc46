"""Model multiplexing (issue 18, item 1) without processes: the router's affinity under the fake
clock, the replica's least-recently-used model cache, the backends' ``model_backend``, the
door's checks of the model id, and the metrics' bounded labels."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import httpx
import joblib
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from shoal.backends.base import Backend, Tensors
from shoal.backends.python import PythonBackend
from shoal.backends.sklearn import SklearnBackend
from shoal.config import Settings
from shoal.core import payload
from shoal.core.clock import FakeClock
from shoal.core.spec import Batching, DeploymentSpec
from shoal.errors import InvalidArgument, NotFound, PermissionDenied, ShoalError, Unavailable
from shoal.http.scheduler import scheduler_app
from shoal.metrics import _multiplexed
from shoal.proto import grpc_service_pb2 as oip
from shoal.proto import shoal_pb2 as pb
from shoal.replica import multiplex
from shoal.replica.multiplex import ModelCache
from shoal.replica.process import ReplicaProcess
from shoal.rpc import codec
from shoal.rpc.inference_service import InferenceService
from shoal.rpc.scheduler_service import SchedulerService
from shoal.scheduler.node import SchedulerNode
from shoal.scheduler.router import Router
from shoal.scheduler.supervisor import ReplicaView
from shoal.testing.fakes import FakeReplicaClient, FakeReplicas
from shoal.types import HeadLink
from tests.unit.conftest import make_spec
from tests.unit.test_dataplane import Aborted, Context

pytestmark = pytest.mark.timeout(10)

MUX = {"max_models_per_replica": 2}
LOAD_S = 30.0  # the caches' load_timeout_s, unless a test needs a short one


def x(value: float = 1.0) -> payload.Tensors:
    return payload.from_arrays({"x": np.array([value], dtype=np.float32)})


# ------------------------------------------------------------------ router affinity


@pytest.fixture
def fakes() -> FakeReplicas:
    return FakeReplicas()


@pytest.fixture
async def router(fakes: FakeReplicas) -> AsyncIterator[Router]:
    r = Router("s1", Settings(), fakes, policy="p2c", clock=FakeClock())
    yield r
    await r.aclose()


def add(router: Router, fakes: FakeReplicas, spec: DeploymentSpec, *rids: str) -> list[FakeReplicaClient]:
    for rid in rids:
        router.add(rid, spec, f"{rid}:9000", "s1")
    return [fakes.clients[f"{rid}:9000"] for rid in rids]


async def test_a_model_id_keeps_going_to_the_replica_that_holds_it(
    router: Router, fakes: FakeReplicas
) -> None:
    a, b = add(router, fakes, make_spec(multiplexing=MUX), "a", "b")
    first = {m: (await router.send("echo", x(), model_id=m))[1] for m in ("m1", "m2")}
    assert sorted(first.values()) == ["a", "b"]  # two new ids: one on each replica
    for _ in range(10):
        for m in ("m1", "m2"):
            assert (await router.send("echo", x(), model_id=m))[1] == first[m]
    # The replica is told which model each request is for.
    assert {c.model_id for c in a.requests} | {c.model_id for c in b.requests} == {"m1", "m2"}
    assert all(c.model_id == next(iter({c.model_id for c in a.requests})) for c in a.requests)


async def test_without_affinity_the_same_ids_spread_over_both(fakes: FakeReplicas) -> None:
    router = Router("s1", Settings(multiplex_affinity=False), fakes, policy="round_robin")
    try:
        add(router, fakes, make_spec(multiplexing=MUX), "a", "b")
        served = {(await router.send("echo", x(), model_id="m1"))[1] for _ in range(4)}
        assert served == {"a", "b"}
    finally:
        await router.aclose()


async def test_when_the_holder_is_full_the_request_goes_to_another(
    router: Router, fakes: FakeReplicas
) -> None:
    spec = make_spec(multiplexing=MUX, max_ongoing_requests=1)
    a, b = add(router, fakes, spec, "a", "b")
    _, holder = await router.send("echo", x(), model_id="m1")
    held = a if holder == "a" else b
    held.gate = asyncio.Event()
    busy = asyncio.create_task(router.send("echo", x(), model_id="m1"))
    await held.wait_for_requests(2)
    _, other = await router.send("echo", x(), model_id="m1")  # the holder has no room
    assert other != holder
    held.gate.set()
    assert (await busy)[1] == holder


async def test_the_router_forgets_the_least_recent_id_past_the_replicas_capacity(
    router: Router, fakes: FakeReplicas
) -> None:
    add(router, fakes, make_spec(multiplexing=MUX), "a")
    for m in ("m1", "m2", "m3", "m2"):
        await router.send("echo", x(), model_id=m)
    [handle] = router.handles("echo")
    assert list(handle.models) == ["m3", "m2"]  # m1 was evicted there, as the replica's LRU does


# ------------------------------------------------------------------ the replica's model cache


class Ids(Backend):
    """A multiplexed parent: model id ``M`` answers ``M`` per row; ``missing`` is NotFound."""

    def __init__(self) -> None:
        super().__init__(make_spec(multiplexing=MUX))
        self.loaded_ids: list[str] = []
        self.unloaded: list[str] = []
        self.hold: dict[str, asyncio.Event] = {}
        self.load_started = threading.Event()
        self.load_gate: threading.Event | None = None  # set: loads wait for it (on their thread)
        self.id_gates: dict[str, threading.Event] = {}  # one id's load waits for its event
        self.load_starts: collections.Counter[str] = collections.Counter()
        self.one_at_a_time: set[str] = set()  # ids whose model says supports_batching false
        self.live = 0  # ids loading or loaded, as the backend sees them
        self.most_live = 0
        self._live_lock = threading.Lock()

    def _load(self) -> None:
        pass

    async def _predict(self, inputs: Tensors) -> Tensors:
        raise AssertionError("the parent never predicts")

    def model_backend(self, model_id: str) -> Backend:
        return One(self, model_id)


class One(Backend):
    def __init__(self, parent: Ids, model_id: str) -> None:
        super().__init__(parent.spec)
        self.parent, self.model_id = parent, model_id

    @property
    def supports_batching(self) -> bool:
        return self.model_id not in self.parent.one_at_a_time

    def _load(self) -> None:
        parent = self.parent
        with parent._live_lock:
            parent.load_starts[self.model_id] += 1
            parent.live += 1
            parent.most_live = max(parent.most_live, parent.live)
        try:
            self._load_gated()
        except BaseException:
            with parent._live_lock:
                parent.live -= 1
            raise

    def _load_gated(self) -> None:
        self.parent.load_started.set()
        if self.parent.load_gate is not None:
            self.parent.load_gate.wait(5)
        gate = self.parent.id_gates.get(self.model_id)
        if gate is not None:
            gate.wait(30)
        if self.model_id == "missing":
            raise NotFound("model id 'missing' does not exist")
        self.parent.loaded_ids.append(self.model_id)

    async def _predict(self, inputs: Tensors) -> Tensors:
        gate = self.parent.hold.get(self.model_id)
        if gate is not None:
            await gate.wait()
        rows = len(inputs["x"])
        return {"model": np.array([self.model_id] * rows, dtype=object)}

    def _unload(self) -> None:
        self.parent.unloaded.append(self.model_id)
        with self.parent._live_lock:
            self.parent.live -= 1


def rows(n: int = 1) -> Tensors:
    return {"x": np.zeros((n, 1), dtype=np.float32)}


@pytest.fixture
async def cache() -> AsyncIterator[tuple[ModelCache, Ids]]:
    parent = Ids()
    c = ModelCache(parent, 2, parent.spec.batching, LOAD_S)
    yield c, parent
    await c.aclose()


async def test_ids_load_on_first_use_and_the_least_recently_used_is_evicted(
    cache: tuple[ModelCache, Ids],
) -> None:
    c, parent = cache
    for m in ("a", "b", "a", "c"):  # a is used after b: b is the least recent when c comes
        out = await c.submit(m, rows())
        assert list(out["model"]) == [m]
    assert parent.loaded_ids == ["a", "b", "c"]
    assert parent.unloaded == ["b"]
    assert c.held() == ["a", "c"]
    assert dict(c.loads) == {"a": 1, "b": 1, "c": 1}
    assert dict(c.evictions) == {"b": 1}
    assert dict(c.hits) == {"a": 1}


async def test_concurrent_first_requests_share_one_load(cache: tuple[ModelCache, Ids]) -> None:
    c, parent = cache
    outs = await asyncio.gather(*(c.submit("a", rows()) for _ in range(5)))
    assert [list(o["model"]) for o in outs] == [["a"]] * 5
    assert parent.loaded_ids == ["a"]
    assert c.loads["a"] == 1


async def test_a_batch_never_mixes_model_ids() -> None:
    parent = Ids()
    c = ModelCache(parent, 2, Batching(max_batch_size=8, max_delay_ms=20), LOAD_S)
    try:
        ids = ["a", "b"] * 6
        outs = await asyncio.gather(*(c.submit(m, rows(2)) for m in ids))
        assert [list(o["model"]) for o in outs] == [[m, m] for m in ids]
        assert max(c.batch_sizes) > 2  # requests did share model calls, each with its own id's
    finally:
        await c.aclose()


async def test_an_id_whose_model_takes_one_request_at_a_time_gets_no_batch() -> None:
    parent = Ids()
    parent.one_at_a_time = {"solo"}
    c = ModelCache(parent, 2, Batching(max_batch_size=8, max_delay_ms=20), LOAD_S)
    try:
        ids = ["solo", "b"] * 6
        outs = await asyncio.gather(*(c.submit(m, rows(2)) for m in ids))
        assert [list(o["model"]) for o in outs] == [[m, m] for m in ids]
        sizes = {m: c._entries[m].batcher.batch_sizes for m in ("solo", "b")}
        assert set(sizes["solo"]) == {2}, sizes  # one request's two rows a call
        assert max(sizes["b"]) > 2, sizes  # the other id's requests did share calls
    finally:
        await c.aclose()


async def test_an_id_with_a_request_running_is_not_evicted(cache: tuple[ModelCache, Ids]) -> None:
    c, parent = cache
    await c.submit("a", rows())
    await c.submit("b", rows())
    parent.hold["a"] = asyncio.Event()
    busy = asyncio.create_task(c.submit("a", rows()))  # a is now the most recent and busy
    await asyncio.sleep(0)
    parent.hold["b"] = asyncio.Event()
    busy_b = asyncio.create_task(c.submit("b", rows()))
    await asyncio.sleep(0)
    parent.hold.pop("b").set()
    await busy_b
    # a is the least recently used now, but still running: b, idle, goes instead.
    await c.submit("c", rows())
    assert parent.unloaded == ["b"]
    parent.hold.pop("a").set()
    assert list((await busy)["model"]) == ["a"]


async def test_two_ids_loading_beside_a_busy_one_do_not_evict_each_other(
    cache: tuple[ModelCache, Ids],
) -> None:
    """Two slots, one busy: b and c, asked at once, each used to evict the other as soon as it
    loaded (before its request woke up to use it), thousands of loads a second, answering
    neither while a ran. Now the one just loaded stays for its request; the second waits
    for a (the least recently used of the busy ones) to finish."""
    c, parent = cache
    parent.hold["a"] = asyncio.Event()
    busy = asyncio.create_task(c.submit("a", rows()))
    await asyncio.sleep(0.05)
    both = asyncio.gather(c.submit("b", rows()), c.submit("c", rows()))
    await asyncio.sleep(0.2)
    parent.hold.pop("a").set()
    outs = await asyncio.wait_for(both, 5)
    assert [list(o["model"]) for o in outs] == [["b"], ["c"]]
    assert list((await busy)["model"]) == ["a"]
    assert dict(c.loads) == {"a": 1, "b": 1, "c": 1}
    assert dict(c.evictions) == {"a": 1}


async def loading(parent: Ids, *model_ids: str) -> None:
    """Until each of ``model_ids`` has begun loading."""
    deadline = time.monotonic() + 5
    while not all(parent.load_starts[m] for m in model_ids):
        assert time.monotonic() < deadline, f"{model_ids} did not begin loading: {parent.load_starts}"
        await asyncio.sleep(0.01)


def gate(parent: Ids, *model_ids: str) -> list[threading.Event]:
    """The loads of ``model_ids`` wait, on their threads, until their events are set."""
    for m in model_ids:
        parent.id_gates[m] = threading.Event()
    return [parent.id_gates[m] for m in model_ids]


@pytest.fixture
async def gated(cache: tuple[ModelCache, Ids]) -> AsyncIterator[tuple[ModelCache, Ids]]:
    """The cache, each gated load let go at the end (a thread cannot be stopped)."""
    yield cache
    for event in cache[1].id_gates.values():
        event.set()


async def test_a_stuck_load_does_not_hold_up_other_ids(gated: tuple[ModelCache, Ids]) -> None:
    """The finding: every load and eviction ran under one lock, so a load that hung (a model
    on a network share that did not answer) kept every other new id waiting until its
    deadline, though a slot was free. Now each load takes a slot of its own."""
    c, parent = gated
    [stuck_gate] = gate(parent, "stuck")
    stuck = asyncio.create_task(c.submit("stuck", rows()))
    await loading(parent, "stuck")
    out = await asyncio.wait_for(c.submit("b", rows()), 2)
    assert list(out["model"]) == ["b"]
    assert not stuck.done()
    assert c.waited_for("stuck") == "model id 'stuck' was still loading"
    stuck_gate.set()
    assert list((await asyncio.wait_for(stuck, 5))["model"]) == ["stuck"]
    assert dict(c.loads) == {"stuck": 1, "b": 1}


async def test_with_every_slot_loading_a_new_id_waits_for_one(gated: tuple[ModelCache, Ids]) -> None:
    """At most N ids are loaded or loading: a third id waits (no load of its own begins)
    until a slot frees, and a request that runs out of time waiting gives up alone."""
    c, parent = gated
    gate_a, gate_b = gate(parent, "a", "b")
    first = [asyncio.create_task(c.submit(m, rows())) for m in ("a", "b")]
    await loading(parent, "a", "b")
    third = asyncio.create_task(c.submit("c", rows()))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(c.submit("d", rows()), 0.2)  # its deadline
    assert not third.done() and not parent.load_starts["c"] and not parent.load_starts["d"]
    assert c.waited_for("d") == "all 2 model slots were loading other ids"
    gate_a.set()
    assert list((await asyncio.wait_for(first[0], 5))["model"]) == ["a"]
    assert list((await asyncio.wait_for(third, 5))["model"]) == ["c"]  # a, idle, made room
    assert not first[1].done()
    gate_b.set()
    assert list((await asyncio.wait_for(first[1], 5))["model"]) == ["b"]
    assert dict(c.loads) == {"a": 1, "b": 1, "c": 1}
    assert dict(c.evictions) == {"a": 1}
    assert parent.most_live == 2


async def test_a_load_past_its_time_bound_is_answered_and_keeps_its_slot_until_it_returns() -> None:
    """A load past ``load_timeout_s`` answers its requests UNAVAILABLE (so does the id's next
    one, at once: no second thread loads it); its thread keeps the slot; when every slot is
    held so, a new id is refused at once. A late load that succeeds is then served."""
    parent = Ids()
    c = ModelCache(parent, 2, parent.spec.batching, 0.2)
    gate_s, gate_t = gate(parent, "s", "t")
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable, match=r"model id 's' did not load within 0\.2s"):
            await c.submit("s", rows())
        assert time.monotonic() - started < 2
        with pytest.raises(Unavailable, match="did not load within"):
            await asyncio.wait_for(c.submit("s", rows()), 0.1)
        assert list((await c.submit("b", rows()))["model"]) == ["b"]  # the other slot
        with pytest.raises(Unavailable, match="model id 't' did not load"):
            await c.submit("t", rows())  # took b's slot
        with pytest.raises(Unavailable, match=r"all 2 model slots .* past 0\.2s .*: s, t"):
            await asyncio.wait_for(c.submit("u", rows()), 0.1)
        gate_s.set()
        deadline = time.monotonic() + 5
        while "s" not in c.held():
            assert time.monotonic() < deadline, "the late load of s was not kept"
            await asyncio.sleep(0.01)
        assert list((await c.submit("s", rows()))["model"]) == ["s"]
        assert dict(parent.load_starts) == {"s": 1, "b": 1, "t": 1}
        assert parent.most_live == 2
    finally:
        gate_s.set()
        gate_t.set()
        await c.aclose()


async def test_a_failed_load_is_the_clients_error_and_is_not_remembered(
    cache: tuple[ModelCache, Ids],
) -> None:
    c, _ = cache
    for _ in range(2):
        with pytest.raises(NotFound, match="'missing' does not exist"):
            await c.submit("missing", rows())
    assert "missing" not in c.loads
    with pytest.raises(InvalidArgument, match="not a plain name"):
        await c.submit("../a", rows())


async def test_a_request_waiting_for_a_load_gets_unavailable_when_the_replica_closes() -> None:
    parent = Ids()
    parent.load_gate = threading.Event()
    c = ModelCache(parent, 2, parent.spec.batching, LOAD_S)
    waiting = asyncio.create_task(c.submit("a", rows()))
    await asyncio.to_thread(parent.load_started.wait, 5)
    try:
        await c.aclose()
        with pytest.raises(Unavailable, match="shutting down"):
            await waiting
    finally:
        parent.load_gate.set()


async def test_counters_name_a_bounded_number_of_ids(
    cache: tuple[ModelCache, Ids], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(multiplex, "MAX_COUNTED_IDS", 2)
    c, _ = cache
    for m in ("a", "b", "c", "d"):
        await c.submit(m, rows())
    assert dict(c.loads) == {"a": 1, "b": 1, multiplex.OTHER: 2}


# ------------------------------------------------------------------ backends


MODELS = """
import numpy as np

class Tenants:
    def load_model(self, model_id):
        if model_id == "nobody":
            raise KeyError(model_id)
        return Scaled(float(len(model_id)))

class Scaled:
    def __init__(self, factor):
        self.factor = factor
    def predict(self, inputs):
        return {"y": inputs["x"] * self.factor}

class NoLoader:
    def predict(self, inputs):
        return inputs

class Listed(Tenants):
    def has_model(self, model_id):
        return model_id in ("a", "b")
"""


async def test_a_python_model_loads_each_id_through_load_model(tmp_path: Path) -> None:
    (tmp_path / "tenants.py").write_text(MODELS)
    spec = make_spec(model="tenants:Tenants", base_dir=str(tmp_path), multiplexing=MUX)
    parent = PythonBackend(spec)
    parent.load()
    one = parent.model_backend("abc")
    one.load()
    out = await one.predict({"x": np.ones((2, 1), np.float32)})
    assert out["y"].tolist() == [[3.0], [3.0]]
    one.unload()
    broken = parent.model_backend("nobody")
    with pytest.raises(Exception, match=r"load_model\('nobody'\) raised KeyError"):
        broken.load()
    no_loader = PythonBackend(make_spec(model="tenants:NoLoader", base_dir=str(tmp_path), multiplexing=MUX))
    with pytest.raises(InvalidArgument, match="has no load_model"):
        no_loader.load()


def test_an_unmultiplexed_backend_refuses_model_ids() -> None:
    with pytest.raises(InvalidArgument, match="does not serve multiplexed model ids"):
        PythonBackend(make_spec()).model_backend("a")


async def test_a_sklearn_model_id_names_a_file_in_the_model_folder(tmp_path: Path) -> None:
    X = np.array([[0.0], [1.0], [2.0], [3.0]], dtype=np.float32)
    joblib.dump(LogisticRegression().fit(X, [0, 0, 1, 1]), tmp_path / "small.joblib")
    spec = make_spec(backend="sklearn", model=str(tmp_path), multiplexing=MUX)
    parent = SklearnBackend(spec)
    parent.load()
    one = parent.model_backend("small")
    one.load()
    assert (await one.predict({"input": X}))["label"].tolist() == [0, 0, 1, 1]
    one.unload()
    with pytest.raises(NotFound, match=r"model id .absent.: no file absent\.joblib"):
        parent.model_backend("absent").load()
    with pytest.raises(InvalidArgument, match="not a plain name"):
        parent.model_backend("../small")


async def test_an_id_without_a_model_evicts_no_loaded_id(tmp_path: Path) -> None:
    """Requests for model ids that do not exist (a typo, a client sending random ids) are
    NOT_FOUND without taking a slot: each one used to evict a loaded id before its load
    failed, so a loop of them made every real id load again on its next request."""
    X = np.array([[0.0], [1.0], [2.0], [3.0]], dtype=np.float32)
    for name in ("a", "b"):
        joblib.dump(LogisticRegression().fit(X, [0, 0, 1, 1]), tmp_path / f"{name}.joblib")
    parent = SklearnBackend(make_spec(backend="sklearn", model=str(tmp_path), multiplexing=MUX))
    parent.load()
    c = ModelCache(parent, 2, parent.spec.batching, LOAD_S)
    try:
        for m in ("a", "b"):
            await c.submit(m, {"input": X})
        for i in range(5):
            with pytest.raises(NotFound, match=f"model id 'absent{i}': no file absent{i}.joblib"):
                await c.submit(f"absent{i}", {"input": X})
        assert c.held() == ["a", "b"]
        for m in ("a", "b"):
            await c.submit(m, {"input": X})
        assert dict(c.loads) == {"a": 1, "b": 1}
        assert dict(c.evictions) == {}
    finally:
        await c.aclose()


async def test_a_python_model_s_has_model_keeps_an_unknown_id_from_evicting(tmp_path: Path) -> None:
    """A python class may say which ids exist (``has_model``): an id it does not know is
    NOT_FOUND before a full replica evicts a loaded id for it, as a sklearn id without its
    file is. Without the hook the load tells, after the eviction."""
    (tmp_path / "tenants.py").write_text(MODELS)
    X = np.ones((1, 1), np.float32)
    for cls, evicted in (("Listed", {}), ("Tenants", {"a": 1})):
        parent = PythonBackend(make_spec(model=f"tenants:{cls}", base_dir=str(tmp_path), multiplexing=MUX))
        parent.load()
        c = ModelCache(parent, 2, parent.spec.batching, LOAD_S)
        try:
            for m in ("a", "b"):
                await c.submit(m, {"x": X})
            with pytest.raises(ShoalError) as refused:
                await c.submit("nobody", {"x": X})
            if cls == "Listed":
                assert isinstance(refused.value, NotFound)
                assert refused.value.message == "model id 'nobody': Listed.has_model('nobody') is false"
            else:
                assert "load_model('nobody') raised KeyError" in refused.value.message
            assert dict(c.evictions) == evicted
        finally:
            await c.aclose()


class _RunsCode:
    """Pickled, it runs ``code`` when loaded: what a hostile .joblib file holds."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (self.code,)


async def test_a_sklearn_model_id_whose_file_links_outside_the_allowed_folders_is_refused(
    tmp_path: Path,
) -> None:
    """The control-plane sweep's finding 4: ``<model>/t2.joblib``, a link to a pickle outside
    the allowed folders, was loaded (and its code ran) for a request naming id ``t2``, while a
    spec naming that file was refused. The replica gives its backend the allowed folders and
    the id's file is checked as it is opened."""
    allowed, outside = tmp_path / "models", tmp_path / "outside"
    (allowed / "tenants").mkdir(parents=True)
    outside.mkdir()
    marker = tmp_path / "pickle-ran"
    joblib.dump(_RunsCode(f"import pathlib; pathlib.Path({str(marker)!r}).touch()"), outside / "evil.joblib")
    (allowed / "tenants" / "t2.joblib").symlink_to(outside / "evil.joblib")
    X = np.array([[0.0], [1.0], [2.0], [3.0]], dtype=np.float32)
    joblib.dump(LogisticRegression().fit(X, [0, 0, 1, 1]), allowed / "t1.joblib")
    (allowed / "tenants" / "t1.joblib").symlink_to(allowed / "t1.joblib")  # a link inside: fine

    spec = make_spec(backend="sklearn", model=str(allowed / "tenants"), multiplexing=MUX)
    replica = ReplicaProcess("r-1", spec, Settings(allowed_model_dirs=(str(allowed),)), link=None)  # type: ignore[arg-type]
    await replica.load()
    assert replica.backend is not None
    try:
        with pytest.raises(PermissionDenied, match=r"model id 't2': its file t2\.joblib is outside") as err:
            replica.backend.model_backend("t2").load()
        assert str(outside) not in err.value.message and str(allowed) not in err.value.message
        assert not marker.exists(), "the pickle outside the allowed folders was loaded"
        one = replica.backend.model_backend("t1")
        one.load()
        assert (await one.predict({"input": X}))["label"].tolist() == [0, 0, 1, 1]
        one.unload()
    finally:
        await replica.drain()


# ------------------------------------------------------------------ the door


@pytest.fixture
async def node(fakes: FakeReplicas) -> AsyncIterator[SchedulerNode]:
    settings = Settings()
    router = Router("s1", settings, fakes, policy="round_robin")
    n = SchedulerNode(settings, "s1", cast(HeadLink, None), fakes, router=router)
    n.registered.set()
    router.add("a", make_spec("mux", multiplexing=MUX), "a:9000", "s1")
    router.add("p", make_spec("plain"), "p:9000", "s1")
    yield n
    await router.aclose()


def body(**params: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}], "parameters": params}


async def test_the_model_id_arrives_by_header_or_parameter_and_is_checked(
    node: SchedulerNode, fakes: FakeReplicas
) -> None:
    app = scheduler_app(node)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as http:
        r = await http.post("/v2/models/mux/infer", json=body(), headers={"shoal-multiplexed-model-id": "t1"})
        assert r.status_code == 200, r.text
        r = await http.post("/v2/models/mux/infer", json=body(multiplexed_model_id="t2"))
        assert r.status_code == 200, r.text
        assert [c.model_id for c in fakes.clients["a:9000"].requests] == ["t1", "t2"]

        r = await http.post("/v2/models/mux/infer", json=body())
        assert r.status_code == 400
        assert (
            "serves multiplexed models: name one with the request parameter 'multiplexed_model_id'" in r.text
        )
        r = await http.post("/v2/models/mux/infer", json=body(multiplexed_model_id="../etc"))
        assert r.status_code == 400 and "not a plain name" in r.text
        r = await http.post("/v2/models/plain/infer", json=body(multiplexed_model_id="t1"))
        assert r.status_code == 400 and "'plain' is not multiplexed" in r.text

    grpc_door = InferenceService(node.dataplane, node.inference_auth, node.settings)
    request = oip.ModelInferRequest(model_name="mux")
    request.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    request.parameters["multiplexed_model_id"].string_param = "t3"
    await grpc_door.ModelInfer(request, cast(Any, Context()))
    assert fakes.clients["a:9000"].requests[-1].model_id == "t3"
    request.parameters["multiplexed_model_id"].int64_param = 7
    with pytest.raises(Aborted, match="'multiplexed_model_id' must be a string"):
        await grpc_door.ModelInfer(request, cast(Any, Context()))

    native = SchedulerService(node)
    send = pb.InferRequest(
        deployment="mux", inputs=codec.encode({"x": np.ones(1, np.float32)}), model_id="t4"
    )
    await native.SendRequest(send, cast(Any, Context()))
    assert fakes.clients["a:9000"].requests[-1].model_id == "t4"


# ------------------------------------------------------------------ metrics


def test_metrics_name_the_busiest_ids_and_add_up_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    import shoal.metrics

    monkeypatch.setattr(shoal.metrics, "MAX_MODEL_ID_LABELS", 2)
    views = [
        ReplicaView(
            "r1", "mux", cast(Any, "READY"), 0, {}, {"a": 1, "b": 1, "c": 1}, {"c": 1}, {"a": 9, "b": 5}
        ),
        ReplicaView("r2", "mux", cast(Any, "READY"), 0, {}, {"a": 1}, {}, {"a": 1}),
    ]
    families = {f.name: {tuple(s.labels.values()): s.value for s in f.samples} for f in _multiplexed(views)}
    loads = families["shoal_multiplexed_model_loads"]
    assert loads == {("mux", "a"): 2, ("mux", "b"): 1, ("mux", "_other"): 1}
    assert families["shoal_multiplexed_model_evictions"] == {("mux", "_other"): 1}
    assert families["shoal_multiplexed_model_hits"] == {("mux", "a"): 10, ("mux", "b"): 5}


def test_what_exited_replicas_counted_names_a_bounded_set_of_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduler keeps what its exited replicas counted (so the counters never go down); each
    replica counted its own ids, and replicas after replicas must not add up to every id ever
    asked for: past EXITED_MODEL_IDS names, the rest is ``_other``."""
    from shoal.scheduler import supervisor

    monkeypatch.setattr(supervisor, "EXITED_MODEL_IDS", 2)
    kept = supervisor._added_ids({}, {"a": 3, "b": 1})
    kept = supervisor._added_ids(kept, {"c": 2, "a": 1, "_other": 4})
    assert kept == {"a": 4, "b": 1, "_other": 6}

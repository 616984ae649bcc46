"""Model multiplexing inside a replica: many model ids, at most N loaded, least recently used out.

A deployment with ``multiplexing: {max_models_per_replica: N}`` names a model id per request.
:class:`ModelCache` loads an id on its first request through the backend
(:meth:`shoal.backends.base.Backend.model_backend`, then ``load()`` in a worker thread),
serves it through a :class:`~shoal.replica.batcher.Batcher` of its own (so a batch never mixes
model ids), and past N loaded ids evicts the least recently used one that has no request
running (the least recently used of all when every one is busy): its batcher finishes what
it holds, then the backend is unloaded, before the new id loads, so at most N are ever loaded.
A request waiting for its id's load counts as running it, so a just-loaded id stays for it.

Concurrent first requests for one id share one load. A load runs in a task of the cache's own,
so a request that gives up (its deadline) does not cancel the load the others wait for. A
failed load is not remembered: the next request for the id tries again.

Counters (cumulative, per model id, for pings and ``/metrics``): :attr:`loads`,
:attr:`evictions`, :attr:`hits` (requests that found their id loaded). At most
:data:`MAX_COUNTED_IDS` ids are counted by name; the rest add up under :data:`OTHER`, so a
client sending endless ids cannot grow a replica's memory or a metric's label set.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass, field

from shoal.backends.base import Backend, Tensors
from shoal.core.spec import Batching, check_model_id
from shoal.core.tasks import TaskSet
from shoal.errors import Internal, ShoalError, Unavailable
from shoal.replica.batcher import Batcher

log = logging.getLogger("shoal.replica")

MAX_COUNTED_IDS = 256
"""Most model ids a replica counts by name; the others are counted under :data:`OTHER`."""
OTHER = "_other"
"""The counters' key for ids past :data:`MAX_COUNTED_IDS` (no model id can be it: ids start
with a letter or digit)."""


@dataclass(eq=False)
class _Entry:
    model_id: str
    backend: Backend
    batcher: Batcher
    users: int = 0  # requests submitted or about to be
    evicted: bool = False


@dataclass
class _Retired:
    """What evicted ids' batchers counted, so the replica's totals do not go down."""

    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    requests: int = 0
    batches: int = 0
    compute_ns: int = 0


class ModelCache:
    """The model ids one replica holds loaded. Safe for concurrent calls on one event loop."""

    def __init__(self, backend: Backend, capacity: int, batching: Batching) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._backend = backend
        self.capacity = capacity
        self._batching = batching
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()  # LRU first
        self._loading: dict[str, asyncio.Task[_Entry | ShoalError]] = {}
        # Requests waiting for their id's load: from the load's end until they wake up and
        # count as its users, its entry must not be the first to go.
        self._waiting: collections.Counter[str] = collections.Counter()
        self._lock = asyncio.Lock()  # one load or eviction at a time: at most N loaded
        self._tasks = TaskSet("model-cache")
        self._retired = _Retired()
        self._closed = False
        self.loads: collections.Counter[str] = collections.Counter()
        self.evictions: collections.Counter[str] = collections.Counter()
        self.hits: collections.Counter[str] = collections.Counter()

    # -- requests -----------------------------------------------------------------------

    async def submit(self, model_id: str, inputs: Tensors) -> Tensors:
        """Run ``inputs`` on model ``model_id``, loading it first if it is not loaded.

        Raises InvalidArgument for an id that is not a plain name, what the backend's load
        raises (NotFound for an id it does not have, say), and what the batcher raises.
        """
        check_model_id(model_id)
        while True:
            if self._closed:
                raise Unavailable("the replica is shutting down")
            entry = self._entries.get(model_id)
            if entry is not None:
                self._entries.move_to_end(model_id)
                self._count(self.hits, model_id)
            else:
                self._waiting[model_id] += 1
                try:
                    loaded = await self._wait_load(model_id)
                finally:
                    self._waiting[model_id] -= 1
                    if not self._waiting[model_id]:
                        del self._waiting[model_id]
                if isinstance(loaded, ShoalError):
                    raise loaded
                entry = loaded
            if not entry.evicted:
                break
            # Evicted between its load and this request's turn: load it again.
        entry.users += 1
        try:
            return await entry.batcher.submit(inputs)
        finally:
            entry.users -= 1

    def held(self) -> list[str]:
        """The loaded model ids, least recently used first."""
        return list(self._entries)

    async def _wait_load(self, model_id: str) -> _Entry | ShoalError:
        """The id's load, started if none runs; shielded, so a caller that gives up (its
        deadline) does not cancel the load others wait for."""
        task = self._load_task(model_id)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                # The load was cancelled, not this caller: the cache is closing.
                raise Unavailable("the replica is shutting down") from None
            raise

    def _load_task(self, model_id: str) -> asyncio.Task[_Entry | ShoalError]:
        task = self._loading.get(model_id)
        if task is None or task.done():
            task = self._tasks.spawn(self._load(model_id), f"load model {model_id}")
            self._loading[model_id] = task
            task.add_done_callback(lambda done: self._forget_load(model_id, done))
        return task

    def _forget_load(self, model_id: str, task: asyncio.Task[_Entry | ShoalError]) -> None:
        if self._loading.get(model_id) is task:
            del self._loading[model_id]

    async def _load(self, model_id: str) -> _Entry | ShoalError:
        """The loaded entry, or the error loading it raised: returned, not raised, since a
        model id that does not exist is the client's mistake, not a task failure to log."""
        async with self._lock:
            while len(self._entries) >= self.capacity:
                await self._evict()
            try:
                backend = self._backend.model_backend(model_id)
                await asyncio.to_thread(backend.load)
            except ShoalError as err:
                log.info("model id %s did not load: %s", model_id, err)
                return err
            except Exception as err:  # a bug in a backend: the request still gets an answer
                log.exception("model id %s did not load", model_id)
                return Internal(f"loading model id {model_id!r} failed: {type(err).__name__}: {err}")
            batcher = Batcher(backend.predict, self._batching.max_batch_size, self._batching.max_delay_ms)
            await batcher.start()
            entry = _Entry(model_id, backend, batcher)
            self._entries[model_id] = entry
            self._count(self.loads, model_id)
            log.info("model id %s loaded (%d of %d held)", model_id, len(self._entries), self.capacity)
            return entry

    async def _evict(self) -> None:
        # An id just loaded whose requests have not woken up yet has no users but is wanted:
        # evicting it sent them to load it again, evicting the next such id, and two ids
        # loading at once beside a busy one evicted each other forever, serving neither.
        entries = self._entries.values()
        victim = next((e for e in entries if e.users == 0 and not self._waiting[e.model_id]), None)
        if victim is None:
            victim = next((e for e in entries if not self._waiting[e.model_id]), None)
        if victim is None:
            victim = next(iter(entries))
        del self._entries[victim.model_id]
        victim.evicted = True
        await self._release(victim)
        self._count(self.evictions, victim.model_id)
        log.info("model id %s evicted (least recently used)", victim.model_id)

    async def _release(self, entry: _Entry) -> None:
        b = entry.batcher
        await b.aclose()  # finishes what it holds
        await asyncio.to_thread(entry.backend.unload)
        self._retired.batch_sizes.update(b.batch_sizes)
        self._retired.requests += b.requests
        self._retired.batches += b.batches
        self._retired.compute_ns += b.compute_ns

    def _count(self, counter: collections.Counter[str], model_id: str) -> None:
        key = model_id if model_id in counter or len(counter) < MAX_COUNTED_IDS else OTHER
        counter[key] += 1

    # -- totals over every id, evicted ones included ------------------------------------

    @property
    def queued(self) -> int:
        return sum(e.batcher.queued for e in self._entries.values())

    @property
    def batch_sizes(self) -> dict[int, int]:
        sizes = collections.Counter(self._retired.batch_sizes)
        for e in self._entries.values():
            sizes.update(e.batcher.batch_sizes)
        return dict(sizes)

    @property
    def requests(self) -> int:
        return self._retired.requests + sum(e.batcher.requests for e in self._entries.values())

    @property
    def batches(self) -> int:
        return self._retired.batches + sum(e.batcher.batches for e in self._entries.values())

    @property
    def compute_ns(self) -> int:
        return self._retired.compute_ns + sum(e.batcher.compute_ns for e in self._entries.values())

    # -- lifecycle ----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop loading, finish what each loaded id holds, unload every one."""
        if self._closed:
            return
        self._closed = True
        await self._tasks.aclose()
        async with self._lock:
            while self._entries:
                _, entry = self._entries.popitem(last=False)
                entry.evicted = True
                await self._release(entry)

"""Model multiplexing inside a replica: many model ids, at most N loaded, least recently used out.

A deployment with ``multiplexing: {max_models_per_replica: N}`` names a model id per request.
:class:`ModelCache` loads an id on its first request through the backend
(:meth:`shoal.backends.base.Backend.model_backend`, then ``load()`` on a thread of its own),
serves it through a :class:`~shoal.replica.batcher.Batcher` of its own (so a batch never mixes
model ids), and holds N slots: an id loaded or loading holds one. A new id takes a free slot,
else evicts the least recently used loaded id that has no request running (the least
recently used of the busy ones when every one is busy): its batcher finishes what it holds,
then the backend is unloaded, before the new id loads, so at most N are ever loaded or
loading. A request waiting for its id's load counts as running it, so a just-loaded id stays
for it: a new id waits for those requests to wake up rather than evict it. Before a new id
evicts one, the backend looks whether its model exists (``Backend.check_exists``: a file's
presence), so that an id without one (a typo, random ids) is NOT_FOUND and evicts nothing.

Loads of different ids run at once, each in its slot: one that takes minutes, or never
returns, holds up no other id (under one lock, it held up every new id until its deadline).
When every slot is loading, a request for yet another id waits for one (up to its deadline);
it is refused at once (UNAVAILABLE, so the router tries another replica) when every slot is
held by a load past its time bound.

Concurrent first requests for one id share one load. A load runs in a task of the cache's own,
so a request that gives up (its deadline) does not cancel the load the others wait for. A
failed load is not remembered: the next request for the id tries again. A load has
``load_timeout_s``: past it, the requests waiting for it and the id's next ones are answered
UNAVAILABLE. A thread cannot be stopped, so the overdue load keeps its slot until ``load()``
returns; then the id is served if it loaded, and forgotten if not.

Counters (cumulative, per model id, for pings and ``/metrics``): :attr:`loads`,
:attr:`evictions`, :attr:`hits` (requests that found their id loaded). At most
:data:`MAX_COUNTED_IDS` ids are counted by name; the rest add up under :data:`OTHER`, so a
client sending endless ids cannot grow a replica's memory or a metric's label set.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from shoal.backends.base import Backend, Tensors
from shoal.core import affinity
from shoal.core.clock import wait_for
from shoal.core.limits import error_text
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


@dataclass(eq=False)
class _Load:
    """A load in progress. It holds a slot from its start (its victim's unload included)
    until its id is loaded or ``load()`` fails."""

    model_id: str
    outcome: asyncio.Future[_Entry | ShoalError]  # what the requests waiting for it get
    overdue: bool = False  # past load_timeout_s: its requests were answered, its thread runs on


@dataclass
class _Retired:
    """What evicted ids' batchers counted, so the replica's totals do not go down."""

    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    requests: int = 0
    batches: int = 0
    compute_ns: int = 0


class ModelCache:
    """The model ids one replica holds loaded. Safe for concurrent calls on one event loop."""

    def __init__(self, backend: Backend, capacity: int, batching: Batching, load_timeout_s: float) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not load_timeout_s > 0:
            raise ValueError(f"load_timeout_s must be > 0, got {load_timeout_s}")
        self._backend = backend
        self.capacity = capacity
        self.load_timeout_s = load_timeout_s
        self._batching = batching
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()  # LRU first
        self._loading: dict[str, _Load] = {}  # with _entries, the slots taken: at most capacity
        # Requests waiting for their id's load: from the load's end until they wake up and
        # count as its users, its entry must not be the first to go.
        self._waiting: collections.Counter[str] = collections.Counter()
        self._changed = asyncio.Event()  # set (and replaced) when a load ends or runs overdue
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
        raises (NotFound for an id it does not have, say), Unavailable for a load past
        ``load_timeout_s`` or when every slot is held by such loads, and what the batcher
        raises. Waits for a slot while every one is loading: the caller's deadline bounds it.
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
                if model_id not in self._loading and len(self._entries) + len(self._loading) >= self.capacity:
                    # Before its load evicts a loaded id: one without a model takes no slot.
                    await self._check_exists(model_id)
                self._waiting[model_id] += 1
                try:
                    loaded = await self._wait_load(model_id)
                finally:
                    self._waiting[model_id] -= 1
                    if not self._waiting[model_id]:
                        del self._waiting[model_id]
                        if model_id in self._entries:
                            self._changes()  # it may be evicted now, for an id waiting for a slot
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

    async def _check_exists(self, model_id: str) -> None:
        """NotFound when the backend finds no model for ``model_id`` (``check_exists``), on a
        thread of its own: a file system that does not answer holds up this request only."""
        check = _on_own_thread(self._backend.model_backend(model_id).check_exists, f"find model {model_id}")
        try:
            await check
        except ShoalError:
            raise
        except Exception as err:  # a bug in a backend's look: the load tells what it finds
            log.warning("model id %s: checking that it exists failed: %r", model_id, err)

    def held(self) -> list[str]:
        """The loaded model ids, least recently used first."""
        return list(self._entries)

    def waited_for(self, model_id: str) -> str:
        """What a request for ``model_id`` that ran out of time was most likely waiting for
        here, to say in its error; empty when nothing of the cache's."""
        if model_id in self._loading:
            return f"model id {model_id!r} was still loading"
        if model_id not in self._entries and len(self._loading) >= self.capacity:
            return f"all {self.capacity} model slots were loading other ids"
        return ""

    async def _wait_load(self, model_id: str) -> _Entry | ShoalError:
        """The id's entry once loaded (by a load started if none runs), or the error its load
        gave. The load is shielded, so a caller that gives up (its deadline) does not cancel
        the load others wait for; a caller waiting for a slot gives up nothing but its turn."""
        while True:
            if self._closed:
                raise Unavailable("the replica is shutting down")
            entry = self._entries.get(model_id)
            if entry is not None:
                return entry
            load = self._loading.get(model_id) or self._start_load(model_id)
            if load is not None:
                break
            self._check_slots_move()
            await self._changed.wait()
        try:
            return await asyncio.shield(load.outcome)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if load.outcome.cancelled() and current is not None and not current.cancelling():
                # The load was cancelled, not this caller: the cache is closing.
                raise Unavailable("the replica is shutting down") from None
            raise

    def _start_load(self, model_id: str) -> _Load | None:
        """A load of ``model_id`` in a free slot or an evicted id's; None when no slot can be
        had now (every one loading, or loaded with requests waiting for it)."""
        victim = None
        if len(self._entries) + len(self._loading) >= self.capacity:
            victim = self._victim()
            if victim is None:
                return None
            del self._entries[victim.model_id]
            victim.evicted = True
        load = _Load(model_id, asyncio.get_running_loop().create_future())
        self._loading[model_id] = load
        self._tasks.spawn(self._load(load, victim), f"load model {model_id}")
        return load

    def _check_slots_move(self) -> None:
        """Unavailable when every slot is held by a load past its time bound: none of them
        may ever end (a thread cannot be stopped), so waiting for one is waiting for ever."""
        if len(self._loading) == self.capacity and all(load.overdue for load in self._loading.values()):
            ids = ", ".join(sorted(self._loading))
            raise Unavailable(
                f"all {self.capacity} model slots of this replica are held by loads that ran past "
                f"{self.load_timeout_s:g}s (multiplexing.load_timeout_s) and have not returned: {ids}"
            )

    def _changes(self) -> None:
        """Wake the requests waiting for a slot, to look again."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _load(self, load: _Load, victim: _Entry | None) -> None:
        """Unload ``victim`` (whose slot this load takes), then load the id: its entry, or the
        error loading it raised, is ``load.outcome``: returned, not raised, since a model id
        that does not exist is the client's mistake, not a task failure to log."""
        model_id, outcome = load.model_id, load.outcome
        try:
            if victim is not None:
                await self._release(victim)
                self._count(self.evictions, victim.model_id)
                log.info("model id %s evicted (least recently used)", victim.model_id)
            loaded = await self._load_backend(load)
            if not outcome.done():
                outcome.set_result(loaded)
        finally:
            if not outcome.done():
                outcome.cancel()  # the cache is closing: its waiters are told so
            del self._loading[model_id]
            self._changes()

    async def _load_backend(self, load: _Load) -> _Entry | ShoalError:
        model_id = load.model_id
        try:
            backend = self._backend.model_backend(model_id)
            loading = _on_own_thread(backend.load, f"load model {model_id}")
            try:
                await wait_for(asyncio.shield(loading), self.load_timeout_s)
            except asyncio.CancelledError:
                loading.cancel()  # the cache is closing: what the thread ends with is moot
                raise
            except TimeoutError:
                load.overdue = True
                load.outcome.set_result(
                    Unavailable(
                        f"model id {model_id!r} did not load within {self.load_timeout_s:g}s "
                        "(multiplexing.load_timeout_s); it is not served by this replica until "
                        "that load returns"
                    )
                )
                log.warning(
                    "model id %s did not load within %gs; its load still runs, holding one of %d slots",
                    model_id,
                    self.load_timeout_s,
                    self.capacity,
                )
                self._changes()
                await loading
        except ShoalError as err:
            log.info("model id %s did not load: %s", model_id, err)
            return err
        except Exception as err:  # a bug in a backend: the request still gets an answer
            log.exception("model id %s did not load", model_id)
            return Internal(f"loading model id {model_id!r} failed: {error_text(err)}")
        # A model that takes one request at a time (supports_batching false) gets no batch:
        # concatenated requests gave each client values computed over the others' too.
        size = self._batching.max_batch_size if backend.supports_batching else 1
        batcher = Batcher(backend.predict, size, self._batching.max_delay_ms)
        await batcher.start()
        entry = _Entry(model_id, backend, batcher)
        self._entries[model_id] = entry
        self._count(self.loads, model_id)
        late = ", past its load_timeout_s" if load.overdue else ""
        log.info("model id %s loaded (%d of %d held%s)", model_id, len(self._entries), self.capacity, late)
        return entry

    def _victim(self) -> _Entry | None:
        """The least recently used loaded id with no request running, else the least recently
        used with no request waiting for it; None when every one has requests waiting."""
        # An id just loaded whose requests have not woken up yet has no users but is wanted:
        # evicting it sent them to load it again, evicting the next such id, and two ids
        # loading at once beside a busy one evicted each other forever, serving neither.
        # They wake up at once, so the new id waits for that instead.
        entries = self._entries.values()
        victim = next((e for e in entries if e.users == 0 and not self._waiting[e.model_id]), None)
        if victim is None:
            victim = next((e for e in entries if not self._waiting[e.model_id]), None)
        return victim

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
        self._changes()
        await self._tasks.aclose()
        for load in self._loading.values():  # a load cancelled before it began: no finally ran
            load.outcome.cancel()
        self._loading.clear()
        while self._entries:
            _, entry = self._entries.popitem(last=False)
            entry.evicted = True
            await self._release(entry)


def _on_own_thread(fn: Callable[[], object], name: str) -> asyncio.Future[None]:
    """``fn()`` on a new daemon thread. A load that never returns must not take a worker of
    the loop's executor (a few per CPU: the other loads and the unloads would queue behind
    it, as silently as under one lock) nor keep the process from exiting."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    context = contextvars.copy_context()  # as asyncio.to_thread does

    def settle(err: BaseException | None) -> None:
        if future.done():  # cancelled: the cache closed
            return
        if err is None:
            future.set_result(None)
        else:
            future.set_exception(err)

    def run() -> None:
        affinity.free_thread()  # the loop's thread may be pinned to one CPU
        err: BaseException | None = None
        try:
            context.run(fn)
        except BaseException as e:  # handed to the loop, which raises it in the load
            err = e
        with contextlib.suppress(RuntimeError):  # the loop closed while the load ran
            loop.call_soon_threadsafe(settle, err)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future

"""What every model backend is: load, predict, unload, and the tensors it takes.

A backend wraps one model inside one replica process. The replica builds it with
:func:`shoal.backends.load_backend` (no I/O), calls :meth:`Backend.load` once in a worker
thread, then awaits :meth:`Backend.predict` from its event loop, possibly many times
concurrently, and finally calls :meth:`Backend.unload`.

Writing a backend means implementing two hooks: ``_load()`` (blocking) and
``async _predict(inputs)``. A model whose work is synchronous runs it through
:meth:`Backend.run_sync`, which uses one dedicated thread per backend: the event loop stays
free for health checks, and the model never sees two predictions at once. An optional
``_unload()`` releases what ``_load()`` took.

**Multiplexing.** A deployment with a ``multiplexing`` section serves many model ids from one
backend. The replica loads the backend once as usual (for a multiplexed spec ``_load()``
checks what the models share: a folder, the user's class), then asks
:meth:`Backend.model_backend` for each model id on its first request: that returns another
backend, constructed but not loaded, which the replica loads (``load()``, in a worker thread),
predicts with, and unloads when it evicts the id. The model id has passed
:func:`shoal.core.spec.check_model_id` (a plain name, never a path). Backends that serve
multiplexed models: ``python`` (the class's ``load_model(model_id)``) and ``sklearn`` (the
file ``<model>/<model_id>.joblib``).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextvars
import logging
import resource
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

import numpy as np

from shoal.core import affinity, limits, payload, tensors
from shoal.core.spec import MAX_TENSOR_NAME, DeploymentSpec, TensorSpec
from shoal.errors import BlocksLoop, FailedPrecondition, Internal, InvalidArgument

T = TypeVar("T")

log = logging.getLogger("shoal.replica")

# Short synchronous calls run on the event loop. Handing a call to the model thread and
# back costs two thread wake-ups: in one process with the hop (noop python model, c=1),
# 216-295 us of CPU per request with the thread, 133-171 us without it, and at c=32 with
# batching 69 us against 58. A backend that allows it (``inline_calls``) runs its calls on
# its thread until, of the last INLINE_AFTER calls there, at most one in INLINE_LONG_SHARE
# was long: a call is short when it computed for at most INLINE_MAX_S (the thread's own
# CPU time) and was done within INLINE_BAIL_S. Then on the loop, until over half of the
# last INLINE_SLOW_WINDOW calls there took longer than INLINE_BAIL_S, or one held the loop
# over INLINE_STALL_S because of the model (it computed or blocked that long:
# held_the_loop); then on the thread again. It comes back to the loop as it first came,
# after a window of twice as many calls each time; the INLINE_STRIKES-th time keeps every
# later call on the thread for good.
#
# Why shares and not single calls: on a busy machine every clock a call can read lies now
# and then. On the thread, a call's wall time counts its waits for the GIL, which the busy
# event loop holds for up to the switch interval. Under perf_analyzer c=32 the digits
# scikit-learn pipeline (0.4 ms a call alone) took 0.62 ms on the wall at the median, over
# 0.5 ms in 74% of calls and 4.6 ms at p99: the old rule (under 0.5 ms on the wall, the
# count halved by each longer call) never let it onto the loop, and the thread hop cost its
# replica 270-310 us of CPU a request against 190-220 on the loop. On the loop, its calls
# read 2.2-7.2 ms on the wall and up to 4.4 ms of CPU (this virtual machine's CPU time counts
# time its host took away), several a second: one such call sent it back to the thread, and
# the third kept it there. A profiler that stops the process for a sample (py-spy) looks
# the same: one sample had left a noop model on the thread for good (at perf_analyzer c=32,
# 120-198 us of replica CPU a request against 82-119).
INLINE_AFTER = 64
INLINE_LONG_SHARE = 8
INLINE_MAX_S = 0.001
INLINE_BAIL_S = 0.002
INLINE_SLOW_WINDOW = 16
INLINE_STALL_S = 0.02
INLINE_STRIKES = 3


def held_the_loop(took_s: float, cpu_s: float, waits: int) -> bool:
    """Whether an inline call that took ``took_s`` (wall) held the loop past INLINE_STALL_S
    because of the model: it computed most of that time (``cpu_s``, the thread's CPU time in
    the call) or it blocked (``waits``: the thread's voluntary context switches in the call:
    a sleep, a lock, I/O). A short call that the kernel preempted on a busy machine does
    neither: with the wall clock alone, one 3 ms preemption of a noop model under load sent
    every later call to the thread for good (seen in bench runs: "a call took 3.7 ms")."""
    return took_s > INLINE_STALL_S and (cpu_s > INLINE_STALL_S / 2 or waits > 0)


def _thread_usage() -> tuple[float, int]:
    """This thread's CPU seconds and voluntary context switches so far."""
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime, usage.ru_nvcsw


Tensors = dict[str, np.ndarray]

#: What a user's code (a model's import, constructor, ``predict``, ``load_model``) may raise
#: that is its own failure: any Exception, and also SystemExit and KeyboardInterrupt, which
#: the replica's signal handlers never raise (shoal.replica_main). Left alone, a model's
#: ``sys.exit()`` ended its replica: the request was retried on a second replica, which
#: died too, and two such requests put the deployment into its restart backoff, every
#: other client answered "no replica ... could take the request" for minutes.
MODEL_FAILURES: tuple[type[BaseException], ...] = (Exception, SystemExit, KeyboardInterrupt)


def datatype_of(dtype: np.dtype[Any]) -> str | None:
    """The Open Inference Protocol datatype of a numpy dtype, or None if it has none.

    Strings and bytes (numpy kinds ``O``, ``S``, ``U``) are ``BYTES``.
    """
    try:
        return tensors.datatype_of_dtype(dtype)
    except InvalidArgument:
        return None


def check_inputs(declared: tuple[TensorSpec, ...], inputs: Mapping[str, np.ndarray]) -> None:
    """Check ``inputs`` against ``declared`` with the scheduler's own rules
    (:func:`shoal.core.payload.check_declared`): names, datatypes, shapes (-1 is any size).

    Nothing is checked when ``declared`` is empty. Raises InvalidArgument naming the input.
    """
    if not declared:
        return
    given = [(name, datatype_of(a.dtype) or str(a.dtype), tuple(a.shape)) for name, a in inputs.items()]
    payload.check_declared(declared, given)


def coerce_outputs(result: object) -> Tensors:
    """A model's return value as ``dict[str, np.ndarray]``, converting values with ``np.asarray``.

    Raises Internal when the result is not a mapping of names to arrays (or things
    ``np.asarray`` turns into numeric, boolean or string arrays), when a name is longer
    than a spec may name a tensor (:data:`~shoal.core.spec.MAX_TENSOR_NAME`: before, a
    100,000-character name went whole into answers, logs and error messages), or when an
    array's dtype has no Open Inference Protocol datatype (complex, datetime64, structured, ...).
    """
    if not isinstance(result, Mapping):
        raise Internal(f"model returned {type(result).__name__}; predict must return a dict of name -> array")
    outputs: Tensors = {}
    for name, value in result.items():
        if not isinstance(name, str) or len(name) > MAX_TENSOR_NAME:
            raise Internal(_bad_output_name(name))
        try:
            array = np.asarray(value)
        except (ValueError, TypeError) as err:
            raise Internal(f"model output {name!r} is not an array: {err}") from None
        if array.dtype.kind == "O" and not all(isinstance(v, (str, bytes)) for v in array.flat):
            # An object array is only meaningful on the wire as BYTES; anything else
            # (None, dicts, ragged lists) is a bug in the model.
            raise Internal(
                f"model output {name!r} is not an array: got a {type(value).__name__} of non-string objects"
            )
        if datatype_of(array.dtype) is None:
            # Checked here, not where the answer is encoded: there it was the client's 400
            # ("numpy dtype complex128 has no Open Inference Protocol datatype") and the
            # replica logged nothing, when it is the model's bug.
            raise Internal(
                f"model output {name!r} has numpy dtype {array.dtype}, "
                "which has no Open Inference Protocol datatype"
            )
        outputs[name] = array
    return outputs


def _bad_output_name(name: object) -> str:
    if not isinstance(name, str):
        what = limits.shown(repr(name))
        return f"model returned an output named {what}; output names must be strings"
    return (
        f"model returned an output name of {len(name)} characters ({limits.quoted(name, 40)}); "
        f"output names are at most {MAX_TENSOR_NAME}, as in a spec"
    )


class Backend(abc.ABC):
    """One model inside one replica.

    Thread and task safety: :meth:`load` and :meth:`unload` are blocking and are called
    once each, from any one thread. :meth:`predict` is a coroutine that may be awaited
    concurrently from the replica's event loop; sync model work is serialised on the
    backend's own thread. Predictions are batched along axis 0 when
    :attr:`supports_batching` is true: a model given N rows returns N rows.
    """

    def __init__(self, spec: DeploymentSpec) -> None:
        self.spec = spec
        # The allowed_model_dirs setting (shoal.core.model_dirs), set by the replica before
        # load(): the folders whose code and files the backend may load (any when empty).
        self.allowed_dirs: tuple[str, ...] = ()
        self._loaded = False
        # Metadata a backend learns from the model in _load(); used when the spec declares none.
        self._derived_inputs: tuple[TensorSpec, ...] = ()
        self._derived_outputs: tuple[TensorSpec, ...] = ()
        # Built by load(): constructing a backend starts nothing.
        self._executor: ThreadPoolExecutor | None = None
        # Short calls on the event loop (see INLINE_AFTER): the state of that choice.
        self._inline = False
        self._inline_banned = False
        self._inline_strikes = 0  # times calls left the loop (INLINE_STRIKES: for good)
        # Of the latest thread calls (up to INLINE_AFTER << strikes), which were long.
        self._thread_long: collections.deque[bool] = collections.deque(maxlen=INLINE_AFTER)
        # Of the latest calls on the loop, which took over INLINE_BAIL_S, and how many did.
        self._loop_slow: collections.deque[bool] = collections.deque(maxlen=INLINE_SLOW_WINDOW)
        self._loop_slow_count = 0
        self._thread_calls = 0

    inline_calls = False
    """Whether a short synchronous call may run on the event loop (:meth:`run_sync`): for
    backends whose calls depend neither on their thread nor on the loop being free."""

    def _may_inline(self) -> bool:
        """Whether calls may go on the loop now (a backend can say no for a while)."""
        return self.inline_calls and not self._inline_banned

    # -- the contract -------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def supports_batching(self) -> bool:
        """Whether the model takes several rows along axis 0 and returns as many."""
        return True

    def inputs(self) -> tuple[TensorSpec, ...]:
        """The spec's declared inputs, else what the backend derived at load (may be empty)."""
        return self.spec.inputs or self._derived_inputs

    def outputs(self) -> tuple[TensorSpec, ...]:
        """The spec's declared outputs, else what the backend derived at load (may be empty)."""
        return self.spec.outputs or self._derived_outputs

    def load(self) -> None:
        """Load the model. Blocking; call it once, off the event loop.

        Raises InvalidArgument when the spec names a model that cannot be loaded.
        """
        if self._loaded:
            return
        self._load()
        # One thread, so a sync model never runs two predictions at once; it starts on
        # the first prediction.
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"shoal-model-{self.spec.name}",
            # Started by the event loop's thread, perhaps pinned to one CPU (replica_pin_loop):
            # the model's thread, and those it starts (BLAS, torch), run on every CPU.
            initializer=affinity.free_thread,
        )
        self._loaded = True

    async def predict(self, inputs: Tensors) -> Tensors:
        """Run the model on ``inputs``.

        Raises InvalidArgument for inputs the model does not take, Internal when the model
        raises or returns something malformed, FailedPrecondition before load or after unload.
        """
        if not self._loaded:
            raise FailedPrecondition(f"model {self.spec.name!r} is not loaded")
        self.check_inputs(inputs)
        return await self._predict(inputs)

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Raise InvalidArgument if ``inputs`` do not fit :meth:`inputs`. Cheap; no model work."""
        check_inputs(self.inputs(), inputs)

    def unload(self) -> None:
        """Release the model. Blocking: waits for a running prediction, drops queued ones."""
        if not self._loaded:
            return
        self._loaded = False
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._unload()

    def predict_now(self, inputs: Tensors) -> Tensors | None:
        """:meth:`predict` at once, on the event loop, when this backend's calls run there
        now (see INLINE_AFTER): its outputs; None when they do not (call :meth:`predict`).
        Raises as :meth:`predict` does. For the batcher's idle path: a lone request then
        needs no task, no collector and no future to be answered."""
        if not self._loaded or not self._inline or self._thread_calls:
            return None
        call = self._blocking(inputs)
        if call is None:
            return None
        self.check_inputs(inputs)
        fn, args = call
        ran, result = self._call_inline(fn, args)
        return result if ran else None

    def _blocking(self, inputs: Tensors) -> tuple[Callable[..., Tensors], tuple[Any, ...]] | None:
        """The blocking call :meth:`_predict` would make for ``inputs`` through
        :meth:`run_sync` (function and arguments; the inputs already checked), or None when
        it makes none (an async model)."""
        return None

    def model_backend(self, model_id: str) -> Backend:
        """A backend for one model id of a multiplexed deployment, constructed, not loaded.

        Called on the event loop: no I/O here (``load()`` on the result does it). Raises
        InvalidArgument when this backend does not serve multiplexed models.
        """
        raise InvalidArgument(f"the {self.spec.backend} backend does not serve multiplexed model ids")

    def check_exists(self) -> None:  # noqa: B027 - optional hook: most backends cannot tell
        """For the backend of one model id (:meth:`model_backend`): NotFound when its model
        does not exist, by a look far cheaper than a load (a file's presence), so that a
        replica whose slots are full evicts no loaded id for a load bound to fail. Blocking
        (a file system may be slow): called on a thread of its own. By default it finds
        nothing missing, and the load tells."""

    # -- for backends -------------------------------------------------------------------

    @abc.abstractmethod
    def _load(self) -> None:
        """Load the model and set ``_derived_inputs``/``_derived_outputs`` if known."""

    @abc.abstractmethod
    async def _predict(self, inputs: Tensors) -> Tensors:
        """Run the model; ``inputs`` already passed :meth:`check_inputs`."""

    def _unload(self) -> None:  # noqa: B027 - optional hook: most models need nothing
        """Release what ``_load()`` took. Called after the last prediction finished."""

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking ``fn(*args)`` on this backend's one model thread (or, for a short call
        of a backend that allows it, on the event loop: INLINE_AFTER); what it raises
        propagates. Never two calls at once, either way."""
        executor = self._executor
        if executor is None:
            raise FailedPrecondition(f"model {self.spec.name!r} is not loaded")
        if self._inline and not self._thread_calls:
            ran, result = self._call_inline(fn, args)
            if ran:
                return cast(T, result)
        return await self._on_thread(executor, fn, args)

    def _call_inline(self, fn: Callable[..., T], args: tuple[Any, ...]) -> tuple[bool, Any]:
        """``fn(*args)`` on the loop: (True, its result), or (False, None) when it called
        another deployment (it must run on the thread: from now on, every call does)."""
        cpu_before, waits_before = _thread_usage()
        started = time.perf_counter()
        try:
            result = fn(*args)
        except BlocksLoop:
            self._stop_inline("it calls other deployments")
            return False, None
        took = time.perf_counter() - started
        slow = took > INLINE_BAIL_S
        window = self._loop_slow
        if len(window) == INLINE_SLOW_WINDOW:
            self._loop_slow_count -= window[0]
        window.append(slow)
        self._loop_slow_count += slow
        if slow:
            cpu_after, waits_after = _thread_usage()
            if held_the_loop(took, cpu_after - cpu_before, waits_after - waits_before):
                self._leave_loop(f"a call held the event loop {took * 1000:.1f} ms")
            elif self._loop_slow_count * 2 > INLINE_SLOW_WINDOW:
                self._leave_loop(
                    f"{self._loop_slow_count} of its last {INLINE_SLOW_WINDOW} calls took over "
                    f"{INLINE_BAIL_S * 1000:.0f} ms"
                )
        return True, result

    async def _on_thread(
        self, executor: ThreadPoolExecutor, fn: Callable[..., T], args: tuple[Any, ...]
    ) -> T:
        def timed() -> tuple[T, float, float]:
            started = time.perf_counter()
            cpu = time.thread_time()
            result = fn(*args)
            return result, time.perf_counter() - started, time.thread_time() - cpu

        try:
            # With the caller's context (the request a composing model serves: shoal.replica.compose).
            context = contextvars.copy_context()
            future = asyncio.get_running_loop().run_in_executor(executor, context.run, timed)
        except RuntimeError as err:  # unload() shut the executor down after our check
            raise FailedPrecondition(f"model {self.spec.name!r} is not loaded") from err
        self._thread_calls += 1
        try:
            result, took, cpu = await future
        finally:
            self._thread_calls -= 1
        if self._may_inline() and not self._inline:
            window = self._thread_long
            window.append(cpu > INLINE_MAX_S or took > INLINE_BAIL_S)
            if len(window) == window.maxlen and sum(window) * INLINE_LONG_SHARE <= len(window):
                self._inline = True
                self._loop_slow.clear()
                self._loop_slow_count = 0
                log.info(
                    "model %s: its calls compute for under %.1f ms; they run on the event loop",
                    self.spec.name,
                    INLINE_MAX_S * 1000,
                )
        return result

    def _stop_inline(self, why: str) -> None:
        self._inline = False
        self._inline_banned = True
        log.info("model %s: %s; its calls run on the model thread from now on", self.spec.name, why)

    def _leave_loop(self, why: str) -> None:
        """Calls held the loop: they go to the thread again, for good at the
        INLINE_STRIKES-th time (see INLINE_AFTER)."""
        self._inline_strikes += 1
        if self._inline_strikes >= INLINE_STRIKES:
            self._stop_inline(f"{why} ({self._inline_strikes} times on the event loop)")
            return
        self._inline = False
        self._thread_long = collections.deque(maxlen=INLINE_AFTER << self._inline_strikes)
        log.info(
            "model %s: %s; its calls run on the model thread until %d more there show them short",
            self.spec.name,
            why,
            INLINE_AFTER << self._inline_strikes,
        )

"""One replica: loads its model, serves requests through the batcher, reports
to its scheduler, and shuts itself down when NACKed or orphaned."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import numpy as np

from shoal.backends import load_backend
from shoal.backends.base import Backend
from shoal.backends.generate import Completion, TextGenerator
from shoal.backends.python import PythonBackend
from shoal.config import Settings
from shoal.core import limits, tensors
from shoal.core.clock import Clock, SystemClock, wait_for
from shoal.core.cluster import DRAINING, READY, STARTING, STOPPED
from shoal.core.model_dirs import check_deployable
from shoal.core.spec import DeploymentSpec, TensorSpec
from shoal.errors import (
    Code,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ReplicaGone,
    ShoalError,
    Unavailable,
)
from shoal.replica.batcher import Batcher
from shoal.replica.compose import CallContext, DeploymentCaller, Deployments, GivenUp, current_call
from shoal.replica.multiplex import ModelCache
from shoal.types import Arrays, GenerateChunk, GenerateRequest, ReplicaDescription

log = logging.getLogger("shoal.replica")

#: How many times ``orphan_after_s`` a replica waits for a scheduler whose process still runs
#: but does not answer (a flood of requests starving its event loop, a CPU-starved machine)
#: before it leaves: a scheduler that is gone is left after ``orphan_after_s``, as before.
BUSY_SCHEDULER_FACTOR = 6

#: How much of a failed request's error message the replica's log line quotes: a model that
#: put its 2 MB input in its exception wrote it to the log twice a request, in this line and
#: in the traceback after it.
LOGGED_ERROR_CHARS = 2000


class SchedulerLink(Protocol):
    async def register(self, replica_id: str, address: str, pid: int) -> tuple[bool, float]: ...

    async def health(self, replica_id: str, state: str, in_flight: int, queued: int) -> bool: ...


class ReplicaProcess:
    def __init__(
        self,
        replica_id: str,
        spec: DeploymentSpec,
        settings: Settings,
        link: SchedulerLink,
        *,
        clock: Clock | None = None,
        caller: DeploymentCaller | None = None,
        scheduler_runs: Callable[[], bool] | None = None,
    ) -> None:
        """``scheduler_runs``: whether the scheduler's process still runs (None: not known).
        A scheduler that runs but answers late (its loop starved by a flood of requests) is
        given ``BUSY_SCHEDULER_FACTOR`` times ``orphan_after_s`` before this replica leaves."""
        self.id = replica_id
        self._scheduler_runs = scheduler_runs
        self.clock: Clock = clock or SystemClock()
        self.spec = spec
        self.settings = settings
        self.link = link
        self.caller = caller  # how its model reaches other deployments (None: it cannot)
        self.state = STARTING
        self._registering = False  # its registration is on the way (run)
        self.in_flight = 0
        self.backend: Backend | None = None
        self.batcher: Batcher | None = None
        self.models: ModelCache | None = None  # a multiplexed deployment's loaded model ids
        self._stop = asyncio.Event()
        # Set once drained (STOPPED): the task streams end then (ReplicaService.PushTasks).
        self.stopped = asyncio.Event()
        self._grace_s = settings.shutdown_grace_s
        self.exit_reason = ""

    @property
    def queued(self) -> int:
        queued = self.batcher.queued if self.batcher is not None else 0
        return queued + (self.models.queued if self.models is not None else 0)

    async def load(self) -> None:
        """Load the model (in a worker thread) and start the batcher. Raises ShoalError."""
        started = time.monotonic()
        allowed = self.settings.allowed_model_dirs
        # Again here, where the files are, before anything is imported or loaded: with
        # allowed folders, a python base_dir must be an existing folder on this machine.
        check_deployable(self.spec, allowed, files_here=True)
        backend = load_backend(self.spec)
        backend.allowed_dirs = allowed
        if isinstance(backend, PythonBackend):
            if self.caller is not None:
                backend.deployments = Deployments(self.spec.name, self.caller, asyncio.get_running_loop())
        await asyncio.to_thread(backend.load)
        if self.spec.warmup:
            await warm_up(backend, self.spec.warmup)
        self.backend = backend
        batching = self.spec.batching
        max_batch_size = batching.max_batch_size
        if max_batch_size > 1 and not backend.supports_batching:
            # A model that takes one request's tensors at a time (a python class's
            # ``supports_batching = False``, an ONNX model whose axis 0 is fixed): requests
            # concatenated for it gave each client values computed over the others' too (a
            # model dividing its vector by its sum answered [1, 1, 1, 1] with 0.05 each, not
            # 0.25, beside five other requests).
            log.warning(
                "deployment %s: its model %s takes one request at a time (supports_batching is "
                "false): max_batch_size %d is not used",
                self.spec.name,
                self.spec.model,
                max_batch_size,
            )
            max_batch_size = 1
        self.batcher = Batcher(
            backend.predict, max_batch_size, batching.max_delay_ms, run_now=backend.predict_now
        )
        await self.batcher.start()
        mux = self.spec.multiplexing
        if mux is not None:
            load_timeout_s = mux.load_timeout_s or self.spec.health.start_timeout_s
            self.models = ModelCache(backend, mux.max_models_per_replica, batching, load_timeout_s)
        log.info(
            "model %s (%s) loaded in %.2fs", self.spec.model, self.spec.backend, time.monotonic() - started
        )

    async def infer(self, request_id: str, inputs: Arrays, timeout_s: float, model_id: str = "") -> Arrays:
        """Run one request (on model ``model_id`` of a multiplexed deployment, which needs one)."""
        # While its registration is on the way, a loaded replica serves: the scheduler routes
        # here as soon as it accepts the registration, and over the local hop that request
        # can arrive before the acknowledgement does (a chaos run saw "replica X is STARTING").
        registering = self.state == STARTING and self._registering
        if self.batcher is None or not (registering or self.state == READY):
            raise self._refusal()
        self.in_flight += 1
        started = time.perf_counter()
        try:
            timeout = timeout_s if timeout_s > 0 else self.spec.timeout_s
            # Which request a model call serves, for models that call other deployments.
            given_up = GivenUp()
            current_call.set(CallContext((request_id,), time.monotonic() + timeout, (given_up,)))
            try:
                outputs = await wait_for(self._submit(inputs, model_id), timeout)
            except TimeoutError:
                given_up.set()  # nobody waits for what its model still computes for it
                waited = self.models.waited_for(model_id) if self.models is not None else ""
                waited = f" ({waited})" if waited else ""
                raise _timed_out(request_id, timeout, waited) from None
            except asyncio.CancelledError:
                given_up.set()  # its model's calls to other deployments stop
                self._given_up(request_id)
                raise
        except ShoalError as err:
            self._failed(request_id, err)
            raise
        finally:
            self.in_flight -= 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request %s done in %.2f ms",
                request_id,
                (time.perf_counter() - started) * 1000,
                extra={"request_id": request_id, "replica_id": self.id},
            )
        return outputs

    def begin(
        self, request_id: str, inputs: Arrays, timeout_s: float, model_id: str = "", *, alone: bool = True
    ) -> asyncio.Future[Arrays]:
        """:meth:`infer` without a coroutine per request: the same checks, deadline, counts
        and log lines, its outputs (or error) in the future returned. For the local hop,
        which answers from the future's callback. A lone request (``alone``: no other
        arrived with it) whose model runs on the event loop is answered at once
        (``Batcher.try_now``: the future comes back done);
        else a batched deployment's request goes straight into the batcher's queue, its
        deadline a timer; any other runs ``infer`` as a task. Cancelling the future gives
        the request up.

        Why: in a profile of a replica under perf_analyzer (noop, c=32, with batching) the
        tasks of ``infer`` (the hop's task per frame, ``wait_for``'s task, ``submit``'s
        coroutine) were most of its Python time per request.
        """
        batcher = self.batcher
        registering = self.state == STARTING and self._registering
        if batcher is None or self.models is not None or model_id or not (registering or self.state == READY):
            return asyncio.ensure_future(self.infer(request_id, inputs, timeout_s, model_id))
        loop = asyncio.get_running_loop()
        timeout = timeout_s if timeout_s > 0 else self.spec.timeout_s
        given_up = GivenUp()
        call = CallContext((request_id,), time.monotonic() + timeout, (given_up,))
        answer: asyncio.Future[Arrays] = loop.create_future()
        try:
            # A lone request (idle model, nothing queued) whose model runs on the loop: now.
            outputs = batcher.try_now(inputs, call) if alone or batcher.max_batch_size == 1 else None
            if outputs is not None:
                answer.set_result(outputs)
                return answer
            if batcher.max_batch_size == 1:  # no queue: infer runs it (concurrently)
                return asyncio.ensure_future(self.infer(request_id, inputs, timeout_s, model_id))
            request = batcher.enqueue(inputs, call)
        except ShoalError as err:
            self._failed(request_id, err)
            answer.set_exception(err)
            return answer
        self.in_flight += 1
        started = time.perf_counter()
        timer = loop.call_later(timeout, _expire, batcher, request, request_id, timeout)

        def done(future: asyncio.Future[Arrays]) -> None:
            timer.cancel()
            self.in_flight -= 1
            # Answered, expired or cancelled: nobody waits for what the model computes for it
            # any more, so its calls to other deployments stop, and a model that works in
            # steps (an encoder's passes) stops at the next one once its batch is all such.
            given_up.set()
            if future.cancelled():
                batcher.cancel(request)  # the caller gave up: out of the queue, if still there
                self._given_up(request_id)
                return
            err = future.exception()
            if isinstance(err, ShoalError):
                self._failed(request_id, err)
            elif err is None and log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "request %s done in %.2f ms",
                    request_id,
                    (time.perf_counter() - started) * 1000,
                    extra={"request_id": request_id, "replica_id": self.id},
                )

        request.future.add_done_callback(done)
        return request.future

    def refused(self, request_id: str, err: ShoalError) -> None:
        """Log a request its adapter failed after the model answered (an answer too big to send)."""
        self._failed(request_id, err)

    def _given_up(self, request_id: str) -> None:
        # As a failure is: the log names every request that did not end in an answer. Before,
        # a call from another deployment whose caller's deadline passed first (its cancel came
        # before this replica's own timer) left no line naming the request that caused it.
        log.info(
            "request %s was given up by its caller (its deadline passed or it went away)",
            request_id,
            extra={"request_id": request_id, "replica_id": self.id},
        )

    def _failed(self, request_id: str, err: ShoalError) -> None:
        # The model's own failures are the operator's business; a client's bad input is the client's.
        level = logging.WARNING if err.code is Code.INTERNAL else logging.INFO
        # The model's own exception, with its traceback, for the operator reading the log.
        trace = err.__cause__ if err.code is Code.INTERNAL else None
        log.log(
            level,
            "request %s failed: %s: %s",
            request_id,
            err.code.value,
            limits.shown(err.message, LOGGED_ERROR_CHARS),
            extra={"request_id": request_id, "replica_id": self.id},
            exc_info=trace,
        )

    # ------------------------------------------------------------ text generation

    async def generate(
        self, request_id: str, request: GenerateRequest, timeout_s: float
    ) -> AsyncGenerator[GenerateChunk, None]:
        """Run one text generation on the backend, chunk by chunk (see :class:`GenerateChunk`).

        Bypasses the batcher: a text generator schedules its own work (transformers one
        generation at a time on its model thread, vLLM continuously). Closing this generator
        (or cancelling its consumer) stops the generation. Raises Unavailable when the replica
        does not take requests (ReplicaGone once it drains), InvalidArgument when its model
        does not generate text or a parameter is out of range, DeadlineExceeded after
        ``timeout_s`` (0: the deployment's).
        """
        if self.state != READY or self.backend is None:
            # Draining, it starts no generation it may not finish within its grace: the
            # router retries it elsewhere (ReplicaGone), as for a task.
            raise self._refusal()
        backend = self.backend
        if not isinstance(backend, TextGenerator) or not backend.generates_text:
            raise InvalidArgument(f"model {self.spec.name!r} does not generate text")
        params = backend.default_params.with_(
            max_tokens=request.max_tokens or None,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=request.stop or None,
            seed=request.seed,
        )
        prompt = backend.render_chat(request.messages) if request.messages else request.prompt
        ids = {"request_id": limits.shown(request_id), "replica_id": self.id}
        timeout = timeout_s if timeout_s > 0 else self.spec.timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.in_flight += 1
        try:
            async with contextlib.aclosing(backend.stream_completion(prompt, params)) as steps:
                while True:
                    try:
                        # Per step, not around the loop: a timeout scope must not span a yield.
                        step = await wait_for(anext(steps), max(0.0, deadline - loop.time()))
                    except StopAsyncIteration:
                        raise Internal(f"model {self.spec.name!r} ended a generation early") from None
                    except TimeoutError:
                        raise _timed_out(request_id, timeout) from None
                    if isinstance(step, Completion):
                        yield GenerateChunk(
                            text="" if request.stream else step.text,
                            finish_reason=step.finish_reason,
                            prompt_tokens=step.prompt_tokens,
                            completion_tokens=step.completion_tokens,
                        )
                        return
                    if request.stream:
                        yield GenerateChunk(text=step)
        except ShoalError as err:
            level = logging.WARNING if err.code is Code.INTERNAL else logging.INFO
            log.log(
                level,
                "generation %s failed: %s: %s",
                limits.shown(request_id),
                err.code.value,
                err,
                extra=ids,
            )
            raise
        finally:
            self.in_flight -= 1

    def _submit(self, inputs: Arrays, model_id: str) -> Awaitable[Arrays]:
        if self.models is not None:
            if not model_id:
                raise InvalidArgument(f"deployment {self.spec.name!r} is multiplexed: name a model id")
            return self.models.submit(model_id, inputs)
        if model_id:
            raise InvalidArgument(f"deployment {self.spec.name!r} is not multiplexed; it takes no model id")
        assert self.batcher is not None
        return self.batcher.submit(inputs)

    def _refusal(self) -> Unavailable:
        """Why a request is not run now. Draining (or stopped), the replica answers what it took
        before and refuses what arrives after with ReplicaGone: the router that sent it retries
        it elsewhere and sends this replica nothing more. (It used to take them while draining,
        then refuse them stopped, as a plain Unavailable the router retried on it again.)"""
        if self.state in (DRAINING, STOPPED):
            return ReplicaGone(f"replica {self.id} is {self.state}: it takes no new request")
        return Unavailable(f"replica {self.id} is {self.state}")

    def describe(self) -> ReplicaDescription:
        b: Batcher | ModelCache | None = self.models or self.batcher
        return ReplicaDescription(
            inputs=self.backend.inputs() if self.backend is not None else self.spec.inputs,
            outputs=self.backend.outputs() if self.backend is not None else self.spec.outputs,
            batch_sizes=dict(b.batch_sizes) if b is not None else {},
            requests=b.requests if b is not None else 0,
            batches=b.batches if b is not None else 0,
            compute_ns=b.compute_ns if b is not None else 0,
        )

    def request_stop(self, grace_s: float | None = None) -> None:
        """Drain, then exit (SIGTERM, a Drain call, a NACK, or losing the scheduler)."""
        if grace_s is not None:
            self._grace_s = grace_s
        if self.state != STOPPED:
            self.state = DRAINING
        self._stop.set()

    async def run(self, address: str, pid: int) -> None:
        """Register, then send health updates until told to stop."""
        self._registering = True
        try:
            ack, interval = await self.link.register(self.id, address, pid)
        finally:
            self._registering = False
        if not ack:
            self.exit_reason = "the scheduler does not know this replica (NACK at registration)"
            return
        self.state = READY
        interval = interval or self.settings.replica_health_interval_s
        last_ok = self.clock.now()
        warned = False  # that the scheduler runs but does not answer
        while not self._stop.is_set():
            if await self.clock.wait(self._stop.wait(), interval):
                break
            try:
                ack = await self.link.health(self.id, self.state, self.in_flight, self.queued)
            except ShoalError as err:
                silent = self.clock.now() - last_ok
                if silent < self.settings.orphan_after_s:
                    continue
                busy = self._scheduler_runs is not None and self._scheduler_runs()
                if busy and silent < self.settings.orphan_after_s * BUSY_SCHEDULER_FACTOR:
                    if not warned:
                        warned = True
                        log.warning(
                            "scheduler has not answered for %.1fs (%s), but its process runs: "
                            "serving on for up to %.0fs",
                            silent,
                            err,
                            self.settings.orphan_after_s * BUSY_SCHEDULER_FACTOR,
                        )
                    continue
                why = "its process runs but does not answer" if busy else "no orphans"
                self.exit_reason = f"scheduler unreachable for {silent:.1f}s ({err}); {why}"
                self._grace_s = min(self._grace_s, 1.0)
                return
            warned = False
            last_ok = self.clock.now()
            if not ack:
                self.exit_reason = "NACKed by the scheduler"
                return

    async def drain(self) -> None:
        """Stop taking requests, let those in flight finish (within the grace period), stop."""
        self.state = DRAINING
        deadline = self.clock.now() + self._grace_s
        while self.in_flight and self.clock.now() < deadline:
            await self.clock.sleep(0.02)
        if self.in_flight:
            log.warning("%d request(s) still in flight after %.1fs grace", self.in_flight, self._grace_s)
        self.state = STOPPED
        self.stopped.set()
        if self.models is not None:
            await self.models.aclose()
        if self.batcher is not None:
            await self.batcher.aclose()
        if self.backend is not None:
            self.backend.unload()


def _expire(batcher: Batcher, request: Any, request_id: str, timeout_s: float) -> None:
    """A queued or running request's deadline passed (its error made only then)."""
    batcher.cancel(request, _timed_out(request_id, timeout_s))


def _timed_out(request_id: str, timeout_s: float, waited: str = "") -> DeadlineExceeded:
    # To the millisecond: the timeout a router sends is what is left of the client's, and
    # "timed out after 19.9999s" read as a bug.
    return DeadlineExceeded(
        f"request {limits.shown(request_id)} timed out after {round(timeout_s, 3):g}s{waited}"
    )


async def warm_up(backend: Backend, calls: int) -> None:
    """Call ``backend``'s model ``calls`` times on :func:`warmup_inputs`, before the replica
    takes requests. Raises InvalidArgument when there are no inputs to make, a ShoalError
    naming the call that failed otherwise (the replica does not start)."""
    if isinstance(backend, TextGenerator) and backend.generates_text:
        raise InvalidArgument("warmup is for models that answer tensors; a text generator warms itself")
    inputs = warmup_inputs(backend.inputs())
    took: list[float] = []
    for i in range(1, calls + 1):
        started = time.perf_counter()
        try:
            await backend.predict(inputs)
        except ShoalError as err:
            raise Internal(f"warmup call {i} of {calls} failed: {err.code.value}: {err.message}") from err
        took.append((time.perf_counter() - started) * 1000)
    log.info(
        "model warmed up with %d call(s): the first took %.1f ms, the last %.1f ms", calls, took[0], took[-1]
    )


def warmup_inputs(specs: Sequence[TensorSpec]) -> Arrays:
    """One request's inputs for a warmup call: each required input of ``specs`` as zeros
    (``b"warmup"`` for BYTES, False for BOOL), any size (-1) as 1. InvalidArgument when
    there are none: a model whose inputs are not declared (in the spec, or by its backend)
    cannot be warmed up."""
    required = [t for t in specs if not t.optional]
    if not required:
        raise InvalidArgument(
            "warmup needs the model's inputs: declare them in the spec (inputs:), or set warmup: 0"
        )
    out: Arrays = {}
    for t in required:
        shape = tuple(1 if d < 0 else d for d in t.shape)
        if t.datatype == "BYTES":
            out[t.name] = np.full(shape, b"warmup", dtype=object)
        else:
            out[t.name] = np.zeros(shape, dtype=tensors.DATATYPES[t.datatype])
    return out

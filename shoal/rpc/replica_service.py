"""The replica's gRPC servicer: Ping, PushTask, Generate, Drain."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import overload

from shoal.core import classify, limits, payload
from shoal.core.payload import Tensors
from shoal.core.spec import MAX_SECONDS
from shoal.errors import Internal, InvalidArgument, ReplicaGone, ShoalError
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.replica.process import ReplicaProcess
from shoal.rpc import codec, generate_codec, wire
from shoal.rpc.convert import meta_to_pb, state_value
from shoal.rpc.status import Context, abort, details
from shoal.rpc.wire import PARTS_FROM, Framed
from shoal.types import Arrays

log = logging.getLogger("shoal.replica")


#: Room left in a message for everything of an answer but its tensors' bytes (ids, names,
#: shapes): an answer whose bytes take more than ``max_message_mb`` less this is refused.
ANSWER_HEADROOM = 64 * 1024


class ReplicaService(pbg.ReplicaServicer):
    def __init__(self, replica: ReplicaProcess) -> None:
        self.replica = replica
        self.max_answer_bytes = replica.settings.max_message_bytes - ANSWER_HEADROOM

    @overload
    def answer(self, task: pb.Task, outputs: Arrays) -> pb.TaskOutcome: ...
    @overload
    def answer(self, task: pb.Task, outputs: Arrays, *, framed: bool) -> pb.TaskOutcome | Framed: ...

    def answer(self, task: pb.Task, outputs: Arrays, *, framed: bool = False) -> pb.TaskOutcome | Framed:
        """The outcome that carries ``outputs``; an error outcome instead when they would not
        fit in one message (:meth:`sendable`). ``framed`` (the local hop): with 64 KiB of
        tensors or more, the outcome in parts, its tensors' bytes not copied into it
        (``shoal.rpc.wire``). Outputs the task asks the classes of are answered as
        those (:meth:`classified`)."""
        try:
            if task.classification:
                outputs = self.classified(task, outputs)
            encoded = self.sendable(task.request_id, outputs)
        except ShoalError as err:
            return _failure(task, err)
        outcome = pb.TaskOutcome(request_id=task.request_id, tag=task.tag)
        if framed and sum(len(t.data) for t in encoded) >= PARTS_FROM:
            return wire.framed(
                outcome.SerializeToString(), 2, ((t.name, t.datatype, t.shape, t.data) for t in encoded)
            )
        codec.fill(outcome.outputs, encoded)
        return outcome

    def classified(self, task: pb.Task, outputs: Arrays) -> Arrays:
        """``outputs`` with each output in ``task.classification`` replaced by its top k
        classes (:func:`shoal.core.classify.classified`): row by row when the deployment
        batches (Triton's ``max_batch_size`` > 0), the whole output otherwise, with the labels
        its spec declares. InvalidArgument (logged) for one that has none to rank (BOOL, BYTES)."""
        spec = self.replica.spec
        labels = {t.name: t.labels for t in spec.outputs if t.labels}
        try:
            return classify.classified(
                outputs, task.classification, batched=spec.batching.max_batch_size > 1, labels=labels
            )
        except ShoalError as err:
            self.replica.refused(task.request_id, err)
            raise

    def sendable(self, request_id: str, outputs: Arrays) -> Tensors:
        """``outputs`` as wire tensors; InvalidArgument (logged) when their bytes would not
        fit in one message. Why: the local hop ends a connection that sends a frame over the
        limit (as a gRPC stream fails), and with it every request waiting on that connection;
        one request whose answer was 5 MB over a 4 MB limit broke both replicas' connections
        and came back as "2 replica(s) failed while serving it"."""
        encoded = payload.from_arrays(outputs)
        size = sum(len(t.data) for t in encoded)
        if size > self.max_answer_bytes:
            err = InvalidArgument(
                f"the answer holds {size} bytes of tensors, over the limit of {self.max_answer_bytes} "
                "(setting max_message_mb): ask for fewer rows per request, or raise the limit"
            )
            self.replica.refused(request_id, err)
            raise err
        return encoded

    async def Ping(self, request: pb.PingRequest, context: Context) -> pb.PingReply:
        r = self.replica
        batch_sizes = r.describe().batch_sizes
        models = r.models
        return pb.PingReply(
            state=state_value(r.state),
            in_flight=r.in_flight,
            queued=r.queued,
            batch_sizes=batch_sizes,
            model_loads=models.loads if models is not None else {},
            model_evictions=models.evictions if models is not None else {},
            model_hits=models.hits if models is not None else {},
        )

    async def PushTask(self, request: pb.Task, context: Context) -> pb.TaskResult:
        try:
            inputs = codec.decode(request.inputs)
            outputs = await self.replica.infer(
                request.request_id, inputs, request.timeout_s, request.model_id
            )
            if request.classification:
                outputs = self.classified(request, outputs)
            encoded = self.sendable(request.request_id, outputs)
        except ShoalError as err:
            await abort(context, err)
        result = pb.TaskResult(request_id=request.request_id)
        codec.fill(result.outputs, encoded)
        return result

    async def Describe(self, request: pb.Empty, context: Context) -> pb.ReplicaDescription:
        d = self.replica.describe()
        return pb.ReplicaDescription(
            inputs=[meta_to_pb(t) for t in d.inputs],
            outputs=[meta_to_pb(t) for t in d.outputs],
            batch_sizes=d.batch_sizes,
            requests=d.requests,
            batches=d.batches,
            compute_ns=d.compute_ns,
        )

    async def outcome(self, task: pb.Task) -> pb.TaskOutcome:
        """Run one task: its outputs, or the error that stopped it (never raises). Shared by
        ``PushTasks`` and the local hop (``shoal.rpc.hop``)."""
        try:
            inputs = codec.decode(task.inputs)
            outputs = await self.replica.infer(task.request_id, inputs, task.timeout_s, task.model_id)
            return self.answer(task, outputs)
        except ShoalError as err:
            return _failure(task, err)
        except Exception as err:  # a bug here must answer the request, not leave it to its deadline
            log.exception("request %s failed in the replica's adapter", limits.shown(task.request_id))
            return _failure(task, Internal(limits.error_text(err)))

    def begin(
        self, task: pb.Task, reply: Callable[[pb.TaskOutcome | Framed], None], alone: bool = True
    ) -> asyncio.Future[Arrays] | None:
        """Start one task and ``reply`` with its outcome when it ends: what :meth:`outcome`
        answers, without a coroutine (the local hop's path; see ``ReplicaProcess.begin``).
        ``alone``: no other task came with it (several are batched, not run one by one).
        Returns the running request, to cancel when the caller goes away; None when the
        task was answered at once."""
        try:
            inputs = codec.decode(task.inputs)
            future = self.replica.begin(task.request_id, inputs, task.timeout_s, task.model_id, alone=alone)
        except ShoalError as err:
            reply(_failure(task, err))
            return None
        except Exception as err:  # a bug here must answer the request, as outcome() does
            log.exception("request %s failed in the replica's adapter", limits.shown(task.request_id))
            reply(_failure(task, Internal(limits.error_text(err))))
            return None

        def done(future: asyncio.Future[Arrays]) -> None:
            if future.cancelled():
                return
            err = future.exception()
            if err is None:
                try:
                    outcome = self.answer(task, future.result(), framed=True)
                except ShoalError as encode_err:
                    reply(_failure(task, encode_err))
                    return
                except Exception as encode_err:  # answered, as outcome() does
                    log.exception("request %s failed in the replica's adapter", limits.shown(task.request_id))
                    reply(_failure(task, Internal(f"{type(encode_err).__name__}: {encode_err}")))
                    return
                reply(outcome)
            elif isinstance(err, ShoalError):
                reply(_failure(task, err))
            else:
                log.error(
                    "request %s failed in the replica's adapter",
                    task.request_id,
                    exc_info=(type(err), err, err.__traceback__),
                )
                reply(_failure(task, Internal(limits.error_text(err))))

        if future.done():
            done(future)
            return None
        future.add_done_callback(done)
        return future

    async def PushTasks(
        self, request_iterator: AsyncIterator[pb.TaskBatch], context: Context
    ) -> AsyncIterator[pb.OutcomeBatch]:
        """Tasks run concurrently (so the batcher sees them together); outcomes go back as
        they finish, all those ready at each write in one message.

        Once the replica has drained (stopped), the stream ends as soon as the tasks it runs
        are answered: the scheduler fails what it sent after with ReplicaGone, retries it
        elsewhere, and sends this replica nothing new. (The stream used to stay open until
        the server's grace cut it; the scheduler then opened a new one to a replica on its
        way out, and a request retried there was lost.)"""
        outcomes: list[pb.TaskOutcome] = []
        ready = asyncio.Event()
        ended = False
        running: dict[int, asyncio.Task[None]] = {}  # by tag
        stopped = self.replica.stopped

        async def watch() -> None:
            await stopped.wait()
            ready.set()

        async def run(task: pb.Task) -> None:
            outcomes.append(await self.outcome(task))
            ready.set()

        async def read() -> None:
            nonlocal ended
            try:
                async for batch in request_iterator:
                    for task in batch.tasks:
                        if task.cancel:  # its caller went away: dropped, unanswered
                            dropped = running.pop(task.tag, None)
                            if dropped is not None:
                                dropped.cancel()
                            continue
                        t = asyncio.create_task(run(task))
                        running[task.tag] = t
                        t.add_done_callback(functools.partial(running.pop, task.tag))
                if running:
                    await asyncio.gather(*running.values(), return_exceptions=True)
            finally:
                ended = True
                ready.set()

        reader = asyncio.create_task(read())
        watcher = asyncio.create_task(watch())
        try:
            while True:
                if not outcomes:
                    # A finished task has added its outcome already (its removal from
                    # ``running`` comes a loop pass later).
                    if ended or (stopped.is_set() and all(t.done() for t in running.values())):
                        return
                    ready.clear()
                    await ready.wait()
                    continue
                batch = list(outcomes)
                outcomes.clear()
                yield pb.OutcomeBatch(outcomes=batch)
        finally:
            # The stream is gone (the scheduler went away): stop its work too.
            reader.cancel()
            watcher.cancel()
            for t in list(running.values()):
                t.cancel()
            await asyncio.gather(reader, watcher, *running.values(), return_exceptions=True)

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateChunk]:
        """Text generation; when the caller cancels (or its deadline passes), grpc cancels this
        handler, which closes the generation and so stops the model."""
        try:
            chunks = self.replica.generate(
                request.request_id, generate_codec.request_from_pb(request), request.timeout_s
            )
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield generate_codec.chunk_to_pb(chunk)
        except ShoalError as err:
            await abort(context, err)

    async def Drain(self, request: pb.DrainRequest, context: Context) -> pb.Empty:
        grace_s = request.grace_s
        # NaN or a negative grace would cut the requests in flight at once, an infinite one
        # let a stuck request keep the replica from exiting.
        if not 0 <= grace_s <= MAX_SECONDS:
            await abort(
                context, InvalidArgument(f"grace_s must be in [0, {MAX_SECONDS:g}] seconds, got {grace_s:g}")
            )
        self.replica.request_stop(grace_s=grace_s)
        return pb.Empty()


def _failure(task: pb.Task, err: ShoalError) -> pb.TaskOutcome:
    # Cut as a gRPC status message is: a model's exception travels in a task's outcome, not
    # in a trailer, and one of 2 MB (a model quoting its whole input) reached REST clients
    # as a 2,000,037-byte error body.
    return pb.TaskOutcome(
        request_id=task.request_id,
        tag=task.tag,
        error_code=err.code.value,
        error_message=details(err.message),
        final=not err.retry_elsewhere,
        going=isinstance(err, ReplicaGone),
    )

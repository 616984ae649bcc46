"""The Open Inference Protocol over gRPC: Triton's ``inference.GRPCInferenceService``.

A thin adapter over :class:`shoal.scheduler.models.ModelCatalog`: decode the request
into numpy arrays (``raw_input_contents``, or the typed ``contents`` fields), call the
catalog, encode the answer (outputs always as ``raw_output_contents``, which tritonclient
reads). Errors go through :func:`shoal.rpc.status.abort`.

Request parameters: ``timeout`` is in microseconds, as Triton's clients send it; the
call's gRPC deadline bounds the request too, whichever is shorter. ``multiplexed_model_id``
(a string) names a multiplexed deployment's model id. A requested output's
``classification`` (``int64_param``, k) answers its top k classes (Triton's
classification extension: :mod:`shoal.core.classify`). Sequence batching and shared
memory are not supported and are refused with INVALID_ARGUMENT. The model repository
extension serves the scheduler's ``--model-repository`` (``shoal.scheduler.repository``);
without one, index lists the deployments and load/unload answer UNIMPLEMENTED. RPCs left
to the generated base class (shared memory, trace and log settings) answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, cast

import grpc
import numpy as np
from google.protobuf import json_format

from shoal.auth import InferenceAuth
from shoal.config import Settings
from shoal.core import budget as budgets
from shoal.core import classify, limits, payload, tensors
from shoal.core.limits import RequestLimits
from shoal.core.payload import Tensor, Tensors
from shoal.errors import DeadlineExceeded, InvalidArgument, NotFound, ShoalError
from shoal.proto import grpc_service_pb2 as oip
from shoal.proto import grpc_service_pb2_grpc as oipg
from shoal.proto import model_config_pb2 as mc
from shoal.rpc import generate_stream
from shoal.rpc.auth import authorization
from shoal.rpc.handlers import DeferredAbort
from shoal.rpc.status import Context, abort
from shoal.scheduler.dataplane import (
    MODEL_ID_PARAMETER,
    DataPlane,
    InferCall,
    check_priority,
    check_sequence_flags,
)
from shoal.scheduler.models import NO_LOG_SETTINGS, NO_SHARED_MEMORY, NO_TRACE, InferResult
from shoal.scheduler.repository import ModelRepository, check_parameters
from shoal.types import Arrays

# The InferTensorContents field that carries each datatype (FP16 and BF16 have none:
# they travel only as raw contents).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# A gRPC deadline further away than this (seconds) is no deadline.
_NO_DEADLINE_S = 365 * 24 * 3600.0
_UNSUPPORTED_PARAMETERS = {
    "shared_memory_region": "shared memory is not supported; send the data in the request",
}

Parameters = Any  # protobuf map<string, InferParameter>
_DONE = object()  # ModelStreamInfer: one request has sent its last answer
STREAM_SHARE = 4
"""One ``ModelStreamInfer`` stream reads no more requests while its unwritten answers hold
over 1/STREAM_SHARE of the process's ``max_inflight_mb`` share: a client that writes and
never reads then stops at a quarter, and other clients' requests still find room. Before,
one such stream could hold the whole share: large requests of every other client waited
or were refused while small ones passed."""


@dataclass(frozen=True)
class _Failed:
    """ModelStreamInfer: reading the client's stream ended with ``error``."""

    error: BaseException


def _leaf(err: BaseException) -> BaseException:
    """The first error a TaskGroup gathered (the first of a group's, recursively)."""
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    return err


_NO_LIMITS = RequestLimits()

_REPOSITORY = (
    "this scheduler serves no model repository (start it with --model-repository DIR); "
    "use shoal deploy / shoal delete"
)


async def _unimplemented(context: Context, method: str, why: str) -> NoReturn:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented: {why}")
    raise AssertionError("unreachable")  # context.abort raises


def _parameter(params: Parameters, key: str) -> bool | int | float | str | None:
    if key not in params:
        return None
    p = params[key]
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def _refuse_unsupported(params: Parameters, where: str) -> None:
    for key, why in _UNSUPPORTED_PARAMETERS.items():
        if key in params:
            raise InvalidArgument(f"{where}{why}")


def _timeout_s(request: oip.ModelInferRequest, context: Context, params: Parameters | None = None) -> float:
    """The request's timeout: its ``timeout`` parameter (µs) and the call's deadline, the
    shorter. ``params``: the request's parameters, when the caller has them at hand."""
    timeout = 0.0
    if params is None:
        params = request.parameters
    value = _parameter(params, "timeout") if params else None
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(
                f"parameter 'timeout' must be a non-negative integer (µs) below 2^64, got {value!r}"
            )
        timeout = value / 1e6
    remaining = context.time_remaining()
    if remaining is not None and math.isfinite(remaining) and remaining < _NO_DEADLINE_S:
        if remaining <= 0:
            raise DeadlineExceeded("the call's deadline passed before the request was routed")
        timeout = min(timeout, remaining) if timeout > 0 else remaining
    return timeout


def _from_contents(t: oip.ModelInferRequest.InferInputTensor) -> Tensor:
    """A tensor sent in the typed ``contents`` fields, as raw bytes (the rare path: clients
    send ``raw_input_contents``)."""
    where = f"input {limits.quoted(t.name)}: "
    field = _CONTENTS_FIELD.get(t.datatype)
    used = [f.name for f, _ in t.contents.ListFields()]
    if field is None:
        if t.datatype not in tensors.DATATYPES:
            # from_json names the known datatypes
            tensors.from_json(t.datatype, tuple(t.shape), [], name=t.name)
        raise InvalidArgument(f"{where}{t.datatype} data must be sent in raw_input_contents")
    wrong = [f for f in used if f != field]
    if wrong:
        raise InvalidArgument(
            f"{where}{t.datatype} data belongs in contents.{field}, got contents.{wrong[0]}"
        )
    values = getattr(t.contents, field)
    if t.datatype in _PACKED_TAG:
        data = _packed_bytes(t.contents, _PACKED_TAG[t.datatype])
        if data is not None:  # the door checks its length against the shape, as for raw contents
            return Tensor(t.name, t.datatype, tuple(t.shape), data)
    if len(values) > MAX_TYPED_ELEMENTS:
        raise InvalidArgument(
            f"{where}{len(values)} elements in contents.{field}, over the {MAX_TYPED_ELEMENTS} typed "
            "contents may carry; send large tensors in raw_input_contents (tritonclient does)"
        )
    if t.datatype == "BYTES":
        array = tensors.from_json(t.datatype, tuple(t.shape), list(values), name=t.name)
    else:
        flat: np.ndarray[Any, Any] = np.fromiter(values, _VALUES_DTYPE[field], count=len(values))
        array = tensors.from_values(t.datatype, tuple(t.shape), flat, name=t.name)
    return payload.from_array(t.name, array)


#: Typed (``contents``) elements of one input that are turned into raw bytes one by one on
#: the event loop: integers, booleans, strings (about 40 ns each: 40 ms at this many).
#: Floats need no work per element (below); past this, other types are refused. Before this
#: bound, a request of 8,000,000 typed elements (32 MB) held every other request on its
#: ingress process for 2.3 s.
MAX_TYPED_ELEMENTS = 1 << 20
# The numpy dtype np.fromiter reads each typed field's values as.
_VALUES_DTYPE = {
    "bool_contents": np.bool_,
    "int_contents": np.int64,
    "int64_contents": np.int64,
    "uint_contents": np.uint64,
    "uint64_contents": np.uint64,
    "fp32_contents": np.float32,  # when _packed_bytes cannot take the bytes as they are
    "fp64_contents": np.float64,
}
# FP32 and FP64 contents are packed fixed-width fields: their wire bytes are the tensor's
# raw little-endian bytes. The first byte of the field as serialized (field number << 3 | 2).
_PACKED_TAG = {"FP32": 6 << 3 | 2, "FP64": 7 << 3 | 2}


def _packed_bytes(contents: oip.InferTensorContents, tag: int) -> bytes | None:
    """The values of ``contents``'s one packed field, as bytes, taken from its serialized
    form (a copy at memory speed, where reading the values one by one took 100 ns each);
    None if the serialized form is not the one field expected."""
    wire = contents.SerializeToString()
    if not wire:
        return b""
    if wire[0] != tag:
        return None
    length, shift, i = 0, 0, 1
    while i < len(wire):
        byte = wire[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            break
        shift += 7
    return wire[i:] if i + length == len(wire) else None


def request_tensors(request: oip.ModelInferRequest, bounds: RequestLimits = _NO_LIMITS) -> Tensors:
    """The request's inputs as wire tensors, raw contents taken as they are (not decoded).

    Raises InvalidArgument naming the input, or a limit of ``bounds``: the number of inputs
    before any is looked at, the elements (all inputs together) before typed contents are
    copied out. Raw contents are not copied: their element count is checked by the data
    plane's door (``DataPlane.check``) or :func:`decode_inputs`.
    """
    inputs = request.inputs
    bounds.check_counts(len(inputs), len(request.outputs))
    return _tensors(inputs, request.raw_input_contents, bounds)


def _tensors(
    inputs: Sequence[oip.ModelInferRequest.InferInputTensor], raw: Sequence[bytes], bounds: RequestLimits
) -> Tensors:
    """:func:`request_tensors` once the counts are checked (each field read once: a read of
    a repeated field costs as much as a small check)."""
    if not raw:  # typed contents are copied out below: check first (raw bytes: the door does)
        bounds.check_elements(list(t.shape) for t in inputs)
        return tuple(_checked_typed(t) for t in inputs)
    if len(raw) != len(inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(inputs)} inputs; "
            "give raw contents for every input or for none"
        )
    out: list[Tensor] = []
    for t, data in zip(inputs, raw):  # noqa: B905 - the lengths are equal
        if t.parameters:
            _refuse_unsupported(t.parameters, f"input {limits.quoted(t.name)}: ")
        if t.HasField("contents"):
            raise InvalidArgument(
                f"input {limits.quoted(t.name)}: give either raw_input_contents or contents, not both"
            )
        out.append(Tensor(t.name, t.datatype, tuple(t.shape[:]), data))
    return tuple(out)


def _checked_typed(t: oip.ModelInferRequest.InferInputTensor) -> Tensor:
    if t.parameters:
        _refuse_unsupported(t.parameters, f"input {limits.quoted(t.name)}: ")
    return _from_contents(t)


def decode_inputs(request: oip.ModelInferRequest, bounds: RequestLimits = _NO_LIMITS) -> Arrays:
    """The request's inputs as numpy arrays (text generation's prompt needs them decoded)."""
    items = request_tensors(request, bounds)
    bounds.check_elements(t.shape for t in items)
    payload.check_all(items)
    return payload.to_arrays(items)


def infer_call(
    request: oip.ModelInferRequest, context: Context, bounds: RequestLimits, door: str
) -> InferCall:
    """A ``ModelInferRequest`` as the data plane's :class:`InferCall`."""
    if not request.model_name:
        raise InvalidArgument("model_name is required")
    inputs, outputs = request.inputs, request.outputs
    bounds.check_counts(len(inputs), len(outputs))  # before any is looked at
    params = request.parameters
    model_id: object = None
    if params:
        sequence = _parameter(params, "sequence_id")
        if sequence not in (None, 0, ""):
            raise InvalidArgument("sequence batching (parameter 'sequence_id') is not supported")
        check_priority(_parameter(params, "priority"))
        check_sequence_flags(_parameter(params, "sequence_start"), _parameter(params, "sequence_end"))
        model_id = _parameter(params, MODEL_ID_PARAMETER)
        if model_id is not None and not isinstance(model_id, str):
            raise InvalidArgument(
                f"parameter {MODEL_ID_PARAMETER!r} must be a string, got {limits.shown(repr(model_id))}"
            )
    wanted: tuple[str, ...] = ()
    counts: dict[str, int] | None = None
    if outputs:
        for out in outputs:
            if out.parameters:
                _refuse_unsupported(out.parameters, f"output {limits.quoted(out.name)}: ")
                if classify.PARAMETER in out.parameters:
                    if counts is None:
                        counts = {}
                    counts[out.name] = classify.check_count(
                        out.name, _parameter(out.parameters, classify.PARAMETER)
                    )
        wanted = tuple(out.name for out in outputs)
    return InferCall(
        model=request.model_name,
        inputs=_tensors(inputs, request.raw_input_contents, bounds),
        id=request.id,
        version=request.model_version,
        timeout_s=_timeout_s(request, context, params),
        outputs=wanted,
        door=door,
        model_id=cast(str, model_id) or "",
        classify=counts,
    )


def infer_response(result: InferResult) -> oip.ModelInferResponse:
    reply = oip.ModelInferResponse(
        model_name=result.model_name, model_version=result.model_version, id=result.id
    )
    for t in result.outputs:
        reply.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        reply.raw_output_contents.append(t.data)
    return reply


class InferenceService(oipg.GRPCInferenceServiceServicer):
    """Safe for concurrent calls (one event loop)."""

    def __init__(
        self,
        dataplane: DataPlane,
        auth: InferenceAuth | None,
        settings: Settings,
        repository: ModelRepository | None = None,
    ) -> None:
        """``repository``: the Triton repository load/unload serve (None: UNIMPLEMENTED)."""
        self.repository = repository
        self.dataplane = dataplane
        self.catalog = dataplane.catalog
        self.auth = auth
        self.bounds = RequestLimits.of(settings)
        self.max_stream_pending = max(1, settings.max_stream_pending)

    def _authorize(self, model: str, context: Context) -> None:
        """Raises Unauthenticated or PermissionDenied when ``model`` needs a token this call lacks."""
        if self.auth is not None and model and self.auth.needs_token(model):
            self.auth.check(model, authorization(context))

    async def ServerLive(self, request: oip.ServerLiveRequest, context: Context) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=self.catalog.server_live())

    async def ServerReady(self, request: oip.ServerReadyRequest, context: Context) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self.catalog.server_ready())

    async def ModelReady(self, request: oip.ModelReadyRequest, context: Context) -> oip.ModelReadyResponse:
        # As Triton: an unknown model is not ready, not an error.
        try:
            self._authorize(request.name, context)
        except ShoalError as err:
            await abort(context, err)
        try:
            ready = self.catalog.model_ready(request.name, request.version)
        except NotFound:
            ready = False
        except ShoalError as err:  # a version that is no version number
            await abort(context, err)
        return oip.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: Context
    ) -> oip.ServerMetadataResponse:
        meta = self.catalog.server_metadata(repository=self.repository is not None)
        return oip.ServerMetadataResponse(name=meta.name, version=meta.version, extensions=meta.extensions)

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: Context
    ) -> oip.ModelMetadataResponse:
        try:
            self._authorize(request.name, context)
            meta = await self.catalog.metadata(request.name, request.version)
        except ShoalError as err:
            await abort(context, err)
        tensor = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=meta.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
        )

    async def ModelConfig(self, request: oip.ModelConfigRequest, context: Context) -> oip.ModelConfigResponse:
        try:
            self._authorize(request.name, context)
            config = await self.catalog.config(request.name, request.version)
        except ShoalError as err:
            await abort(context, err)
        return oip.ModelConfigResponse(config=json_format.ParseDict(config, mc.ModelConfig()))

    async def ModelStatistics(
        self, request: oip.ModelStatisticsRequest, context: Context
    ) -> oip.ModelStatisticsResponse:
        try:
            self._authorize(request.name, context)
            stats = await self.catalog.statistics(request.name, request.version)
        except ShoalError as err:
            await abort(context, err)
        doc = {"model_stats": [s.to_json() for s in stats]}
        return json_format.ParseDict(doc, oip.ModelStatisticsResponse())

    async def RepositoryIndex(
        self, request: oip.RepositoryIndexRequest, context: Context
    ) -> oip.RepositoryIndexResponse:
        if request.repository_name:
            await abort(context, NotFound(f"unknown repository {request.repository_name!r}"))
        try:
            if self.repository is not None:
                entries = await self.repository.index(
                    ready_only=request.ready, authorization=authorization(context)
                )
            else:
                entries = self.catalog.index(ready_only=request.ready)
        except ShoalError as err:
            await abort(context, err)
        return oip.RepositoryIndexResponse(
            models=[
                oip.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=e.state, reason=e.reason
                )
                for e in entries
            ]
        )

    async def ModelInfer(self, request: oip.ModelInferRequest, context: Context) -> oip.ModelInferResponse:
        try:
            self._authorize_inference(request, context)
            return await self._infer(request, context)
        except ShoalError as err:
            await abort(context, err)

    def _authorize_inference(self, request: oip.ModelInferRequest, context: Context) -> None:
        """As :meth:`_authorize`, and an inference refused for its token is counted and logged."""
        try:
            self._authorize(request.model_name, context)
        except ShoalError as err:
            self.dataplane.refused(request.model_name, request.id, "grpc", err)
            raise

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[oip.ModelInferRequest], context: Context
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        """Requests of one stream run concurrently; each answer (or its error) is sent when ready.
        A generation deployment answers a response per piece of text (decoupled).

        Bounded: at most ``max_stream_pending`` requests of the stream are running or
        answered but not yet written; past that the stream stops reading requests until
        the client reads answers (a client that writes and never reads holds that many,
        not every answer). And across streams: an answer's tensor bytes count in the
        process's ``max_inflight_mb`` until it is written (``ByteBudget.keep``), and while
        answers put the process over that, no stream reads another request. Before, 32
        streams of 1 MiB echo requests that were never read grew one ingress process past
        4 GB, and on. One stream holds at most 1/STREAM_SHARE of that share (its requests
        until they end, its answers until written), so one client that never reads leaves
        room for the others."""
        slots = asyncio.Semaphore(self.max_stream_pending)
        budget = self.dataplane.inflight
        mine = budget.limit // STREAM_SHARE  # what this stream may hold
        # The bytes this stream holds: its requests' until they end, its answers' until written.
        holds = [0]
        freed = asyncio.Event()  # set when ``holds`` went down
        # An answer with the bytes it holds, or _DONE once a request has sent its last
        # answer (its slot is free).
        answers: asyncio.Queue[tuple[oip.ModelStreamInferResponse, int] | object | None] = asyncio.Queue()

        async def answer(request: oip.ModelInferRequest, size: int) -> None:
            try:
                await respond(request)
            finally:
                holds[0] -= size
                freed.set()
                answers.put_nowait(_DONE)  # after its last answer in the queue

        async def respond(request: oip.ModelInferRequest) -> None:
            try:
                self._authorize_inference(request, context)
                if generate_stream.wants_generation(self.catalog, request):
                    # Decoupled: a response per piece of text (shoal.rpc.generate_stream). Its
                    # refusals before routing are counted and logged as the data plane's are.
                    def refused(err: ShoalError) -> None:
                        self.dataplane.refused(request.model_name, request.id, "grpc", err)

                    try:
                        limits.check_request_id(request.id)  # as the data plane checks an inference's
                        inputs = decode_inputs(request, self.bounds)
                        timeout_s = _timeout_s(request, context)
                    except ShoalError as err:
                        refused(err)
                        raise
                    pieces = generate_stream.stream_responses(
                        self.catalog, request, inputs, timeout_s, refused
                    )
                    async with contextlib.aclosing(pieces):
                        async for piece in pieces:
                            answers.put_nowait((piece, 0))
                    return
                # The request's bytes are held from here until its answer's take their place,
                # and those until the answer is written.
                size = sum(map(len, request.raw_input_contents))
                if not budget.try_take(size):
                    try:
                        await budget.take(size, _timeout_s(request, context) or budgets.DEFAULT_WAIT_S)
                    except ShoalError as err:
                        self.dataplane.refused(request.model_name, request.id, "grpc", err)
                        raise
                held = budgets.HELD.set(True)
                try:
                    done = await self._infer(request, context)
                except BaseException:
                    budget.give(size)
                    raise
                finally:
                    budgets.HELD.reset(held)
                # As Triton marks every stream response: this request's only one is its last.
                done.parameters["triton_final_response"].bool_param = True
                reply = oip.ModelStreamInferResponse(infer_response=done)
                kept = sum(map(len, done.raw_output_contents))
                budget.keep(kept)  # before the request's bytes go: no room opens in between
                budget.give(size)
                holds[0] += kept
                answers.put_nowait((reply, kept))
                return
            except ShoalError as err:
                failed = oip.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                )
                failed.parameters["triton_final_response"].bool_param = True
                reply = oip.ModelStreamInferResponse(error_message=err.message, infer_response=failed)
            answers.put_nowait((reply, 0))

        async def read() -> None:
            refused: DeferredAbort | None = None
            try:
                async with asyncio.TaskGroup() as requests:
                    try:
                        async for request in request_iterator:
                            await slots.acquire()
                            await budget.under_limit()  # unwritten answers hold the process's room
                            size = sum(map(len, request.raw_input_contents))
                            # And this stream its own part (any one request, alone).
                            while mine > 0 and holds[0] and holds[0] + size > mine:
                                freed.clear()
                                await freed.wait()
                            holds[0] += size
                            requests.create_task(answer(request, size))
                    except DeferredAbort as err:
                        # A message that does not decode ends the stream, after the answers
                        # of the requests before it: raised here, it would cancel them (one
                        # run in two lost the answer of a request sent just before it).
                        refused = err
            except BaseException as err:  # the call cancelled
                answers.put_nowait(_Failed(_leaf(err)))
                return
            # The client closed its side, or sent a message refused; every request is answered.
            answers.put_nowait(None if refused is None else _Failed(refused))

        # Not a TaskGroup around the ``yield``: its cancel of this task on a failed read
        # could land while gRPC wrote the last answer, be taken as gRPC's own, and leave the
        # stream waiting here for ever (2 of 30 streams with one undecodable message did);
        # and a client that closed the stream made it log "Task exception was never
        # retrieved" (GeneratorExit) for every cancelled stream. The reader reports its end
        # in ``answers``, and is cancelled with its requests when the stream ends first.
        reader = asyncio.create_task(read())
        try:
            while (item := await answers.get()) is not None:
                if item is _DONE:
                    slots.release()  # every answer of that request has been written
                    continue
                if isinstance(item, _Failed):
                    raise item.error  # a refusal: shoal.rpc.handlers sends its status from this task
                reply, size = cast(tuple[oip.ModelStreamInferResponse, int], item)
                try:
                    yield reply
                finally:
                    budget.give(size)
                    holds[0] -= size
                    freed.set()
        finally:
            reader.cancel()
            await asyncio.wait([reader])
            while not answers.empty():  # answers never written give their bytes back
                item = answers.get_nowait()
                if type(item) is tuple:
                    budget.give(item[1])

    async def RepositoryModelLoad(
        self, request: oip.RepositoryModelLoadRequest, context: Context
    ) -> oip.RepositoryModelLoadResponse:
        await self._change("load", request, context)
        return oip.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: oip.RepositoryModelUnloadRequest, context: Context
    ) -> oip.RepositoryModelUnloadResponse:
        await self._change("unload", request, context)
        return oip.RepositoryModelUnloadResponse()

    async def _change(
        self,
        action: str,
        request: oip.RepositoryModelLoadRequest | oip.RepositoryModelUnloadRequest,
        context: Context,
    ) -> None:
        if self.repository is None:
            await _unimplemented(context, f"RepositoryModel{action.title()}", _REPOSITORY)
        change = self.repository.load if action == "load" else self.repository.unload
        try:
            if request.repository_name:
                raise NotFound(
                    f"unknown repository {request.repository_name!r}: a scheduler serves one, unnamed"
                )
            check_parameters(action, request.parameters)
            # gRPC callers are vouched for: loopback-only ports, TLS client certificates, or --insecure.
            await change(request.model_name, authorization(context), vouched=True)
        except ShoalError as err:
            await abort(context, err)

    # -- not supported: UNIMPLEMENTED, saying why

    async def SystemSharedMemoryStatus(
        self, request: oip.SystemSharedMemoryStatusRequest, context: Context
    ) -> oip.SystemSharedMemoryStatusResponse:
        await _unimplemented(context, "SystemSharedMemoryStatus", NO_SHARED_MEMORY)

    async def SystemSharedMemoryRegister(
        self, request: oip.SystemSharedMemoryRegisterRequest, context: Context
    ) -> oip.SystemSharedMemoryRegisterResponse:
        await _unimplemented(context, "SystemSharedMemoryRegister", NO_SHARED_MEMORY)

    async def SystemSharedMemoryUnregister(
        self, request: oip.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> oip.SystemSharedMemoryUnregisterResponse:
        await _unimplemented(context, "SystemSharedMemoryUnregister", NO_SHARED_MEMORY)

    async def CudaSharedMemoryStatus(
        self, request: oip.CudaSharedMemoryStatusRequest, context: Context
    ) -> oip.CudaSharedMemoryStatusResponse:
        await _unimplemented(context, "CudaSharedMemoryStatus", NO_SHARED_MEMORY)

    async def CudaSharedMemoryRegister(
        self, request: oip.CudaSharedMemoryRegisterRequest, context: Context
    ) -> oip.CudaSharedMemoryRegisterResponse:
        await _unimplemented(context, "CudaSharedMemoryRegister", NO_SHARED_MEMORY)

    async def CudaSharedMemoryUnregister(
        self, request: oip.CudaSharedMemoryUnregisterRequest, context: Context
    ) -> oip.CudaSharedMemoryUnregisterResponse:
        await _unimplemented(context, "CudaSharedMemoryUnregister", NO_SHARED_MEMORY)

    async def TraceSetting(
        self, request: oip.TraceSettingRequest, context: Context
    ) -> oip.TraceSettingResponse:
        await _unimplemented(context, "TraceSetting", NO_TRACE)

    async def LogSettings(self, request: oip.LogSettingsRequest, context: Context) -> oip.LogSettingsResponse:
        await _unimplemented(context, "LogSettings", NO_LOG_SETTINGS)

    async def _infer(self, request: oip.ModelInferRequest, context: Context) -> oip.ModelInferResponse:
        try:
            call = infer_call(request, context, self.bounds, "grpc")
        except ShoalError as err:
            # Refused before the door could see it: count it there all the same.
            self.dataplane.refused(request.model_name, request.id, "grpc", err)
            raise
        return infer_response(await self.dataplane.infer(call))

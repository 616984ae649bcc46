"""The data plane's one door: every ingress runs its requests through :class:`DataPlane`.

OIP gRPC (``ModelInfer``, ``ModelStreamInfer``), OIP REST (``/v2/models/M/infer``), the
native ``SendRequest`` and the OpenAI API's ``/v1/embeddings`` are thin adapters: they
decode their wire form into an :class:`InferCall` (tensors as raw bytes with their
headers, :mod:`shoal.core.payload`), call :meth:`DataPlane.infer` or
:meth:`DataPlane.embed`, and encode what comes back. So the rules are the same whatever
door a request came in by, and they live here:

* **ids**: the client's id is echoed; internally every request gets a unique id (the
  client's plus a random suffix), so two requests reusing one id never share a pending
  entry;
* **deadlines**: the call's ``timeout_s`` (0: the deployment's ``timeout_s``);
* **versions**: a request naming version N goes only to replicas of revision N, which must
  serve (NotFound naming the versions that do; InvalidArgument for a version that is no
  number: :meth:`ModelCatalog.revision`), and is checked against revision N's inputs and
  outputs (an earlier revision's may differ from the current spec's); one naming none, to
  any (the newest with ``serve_revisions`` above 1), checked against the current spec's;
* **model ids**: a multiplexed deployment's request names its model id (OIP parameter
  :data:`MODEL_ID_PARAMETER`, HTTP header :data:`MODEL_ID_HEADER`), a plain name; any other
  deployment's names none;
* **limits**: tensor elements per request (``max_tensor_elements``), strings per
  embeddings request (``max_strings_per_request``); body size is the transport's;
* **bytes in flight**: the request tensor bytes this process holds at once, its share of
  ``max_inflight_mb`` (:class:`shoal.core.budget.ByteBudget`: a request waits for room
  until its deadline, or is refused when the queue for room is full);
* **validation**: tensor headers and byte lengths, then names, datatypes and shapes
  against the model's metadata, from the headers alone (nothing is decoded here), and a
  request's rows against ``max_batch_size`` where the spec says ``batching.oversize:
  refuse`` (:attr:`DeploymentSpec.max_request_rows`: Triton's rule); an output's
  ``classification`` (``InferCall.classify``) against its declared datatype; the replica
  computes the classes (:mod:`shoal.core.classify`);
* **accounting**: every outcome, a refusal included, is counted in the router's
  per-deployment statistics (``shoal_requests_total``, the dashboard, the autoscaler)
  and Triton's model statistics, and logged; so is an answer the door cannot use
  (``InferCall.answer_check``: ``/v1/embeddings``' rows), a failure though the replica
  answered.

Everything here runs on the scheduler's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from shoal.config import Settings
from shoal.core import budget, classify, limits, payload
from shoal.core.budget import ByteBudget
from shoal.core.ids import request_key
from shoal.core.payload import Tensor, Tensors
from shoal.core.spec import DeploymentSpec, TensorSpec, check_model_id
from shoal.errors import Code, Internal, InvalidArgument, ShoalError
from shoal.scheduler.generate import InvalidParameter
from shoal.scheduler.models import InferResult, ModelCatalog, check_inputs, check_outputs
from shoal.scheduler.router import OUTCOME_OF, Router

log = logging.getLogger("shoal.dataplane")

# Refusals are logged at INFO, at most this many a second (a flood of bad requests must
# not become a flood of log lines); the rest are counted and summarised.
_REFUSALS_LOGGED_PER_S = 10

MODEL_ID_PARAMETER = "multiplexed_model_id"
"""The OIP request parameter (gRPC and REST) naming a multiplexed deployment's model id."""
MODEL_ID_HEADER = "shoal-multiplexed-model-id"
"""The HTTP header naming it (REST; the parameter wins when both are given)."""

_MAX_PRIORITY = 2**64 - 1


def check_priority(value: object) -> None:
    """Triton's ``priority`` request parameter (tritonclient's ``priority=``, sent as a
    uint64): accepted and not used, as Triton does for a model without ``priority_levels``:
    requests are served in the order they arrive (docs/triton.md). A value that is not an
    integer in [0, 2^64) is refused, naming it, rather than ignored."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_PRIORITY:
        raise InvalidArgument(
            f"parameter 'priority' must be an integer in [0, 2^64), got {limits.shown(repr(value))}"
        )


def check_sequence_flags(start: object, end: object) -> None:
    """Triton's ``sequence_start`` and ``sequence_end`` request parameters (tritonclient's
    ``sequence_start=``, ``sequence_end=``, sent as booleans): without a ``sequence_id``,
    the only request served here, they say nothing and are accepted, as Triton accepts
    them for a model without sequence batching. A value that is not a boolean is refused,
    naming it, as Triton refuses it (before, ``"sequence_start": "yes"`` was taken)."""
    for key, value in (("sequence_start", start), ("sequence_end", end)):
        if value is not None and type(value) is not bool:
            raise InvalidArgument(f"parameter {key!r} must be true or false, got {limits.shown(repr(value))}")


@dataclass(slots=True)
class InferCall:
    """One inference request, whatever door it came in by. Not changed once made (not
    frozen: a frozen dataclass of these nine fields took 1.3 µs to make, every request)."""

    model: str
    inputs: Tensors
    id: str = ""  # the client's, echoed in the answer
    version: str = ""
    timeout_s: float = 0.0  # 0: the deployment's own
    outputs: tuple[str, ...] = ()  # requested outputs, in order; empty: all
    door: str = ""  # which ingress, for log lines: grpc, http, native, openai
    model_id: str = ""  # a multiplexed deployment's model id
    # The door's own rules on the answer (``/v1/embeddings``: one finite row per text):
    # what it raises fails the request, counted as such though the replica answered.
    answer_check: Callable[[Tensors], None] | None = None
    # Triton's classification extension: requested output -> k, its top k classes wanted
    # instead of its values (checked by the door: ``classify.check_count``); None: none.
    classify: dict[str, int] | None = None


@dataclass(frozen=True)
class Embeddings:
    """What :meth:`DataPlane.embed` answers: the embeddings, one array of rows per routed
    part, and how many tokens the model read for them all (0: it did not say)."""

    parts: list[np.ndarray]
    tokens: int


class DataPlane:
    """Safe for concurrent calls from many tasks on one event loop."""

    def __init__(self, router: Router, catalog: ModelCatalog, settings: Settings) -> None:
        self.router = router
        self.catalog = catalog
        self.settings = settings
        self.bounds = limits.RequestLimits.of(settings)
        share = router.share
        self.inflight = ByteBudget(-(-max(0, settings.max_inflight_mb) * (1 << 20) // share))
        self._log_window = 0.0
        self._logged = 0
        self._suppressed = 0
        self._tell_later: asyncio.TimerHandle | None = None  # says how many were not logged

    async def infer(self, call: InferCall) -> InferResult:
        """Check ``call``, run it on a replica, return the outputs it asked for.

        Raises NotFound (model or version), InvalidArgument (naming the tensor or the
        limit), and what :meth:`Router.send` raises (ResourceExhausted, DeadlineExceeded,
        Unavailable, or the replica's own error).
        """
        started = time.perf_counter_ns()
        spec: DeploymentSpec | None = None
        try:
            # A traffic route's name: the target drawn for this request (``Router.resolve``).
            target, shadow = self.router.resolve(call.model)
            spec = self.catalog.spec(target)
            revision = self.catalog.revision(spec, call.version)
            self.check(call)
            _check_model_id(spec, call.model_id)
            metadata = self.catalog.known_metadata(spec, revision) or await self.catalog.request_metadata(
                spec, revision
            )
            check_inputs(metadata, call.inputs)
            check_outputs(metadata, call.outputs)
            if call.classify is not None:
                _check_classify(metadata.outputs, call.classify)
            if spec.max_request_rows and call.inputs and call.inputs[0].rows > spec.max_request_rows:
                # Triton's words, which its clients (and their retry logic) know.
                raise InvalidArgument(
                    f"inference request batch-size must be <= {spec.max_request_rows} for "
                    f"{spec.name!r} (it has {call.inputs[0].rows} rows)"
                )
        except ShoalError as err:
            self._refused(call, spec, err, started)
            raise
        timeout_s = call.timeout_s if call.timeout_s > 0 else spec.timeout_s
        # A transport that took the request's bytes before parsing it holds them (budget.HELD).
        size = 0 if budget.HELD.get() else sum(len(t.data) for t in call.inputs)
        try:
            waited = 0.0 if self.inflight.try_take(size) else await self.inflight.take(size, timeout_s)
        except ShoalError as err:
            self._refused(call, spec, err, started)
            raise
        # Clients reuse ids (or send none); the router keys in-flight requests by id.
        internal_id = f"{call.id}~{request_key()}" if call.id else ""
        if shadow:
            self.router.shadow(call.model, shadow, call.inputs, call.timeout_s)
        try:
            outputs, replica_id = await self.router.send(
                spec.name,
                call.inputs,
                request_id=internal_id,
                timeout_s=max(1e-3, timeout_s - waited) if waited else call.timeout_s,
                model_id=call.model_id,
                version=revision,
                classify=call.classify,
            )
            outputs = self._answer(call, spec.name, outputs, metadata.outputs)
        except BaseException:
            self.catalog.record(spec, ok=False, elapsed_ns=time.perf_counter_ns() - started, rows=0)
            raise
        finally:
            self.inflight.give(size)
        rows = call.inputs[0].rows if call.inputs else 1
        self.catalog.record(spec, ok=True, elapsed_ns=time.perf_counter_ns() - started, rows=rows)
        return InferResult(
            call.model, self.catalog.served_version(spec, replica_id), call.id, outputs, replica_id
        )

    def _answer(
        self, call: InferCall, deployment: str, outputs: Tensors, declared: Sequence[TensorSpec]
    ) -> Tensors:
        """The outputs ``call`` asked for (:func:`_select`), checked by its door's
        ``answer_check``. When either fails, the request the router counted a success is
        counted as what failed it, and logged: INFO when the client erred (it asked for an
        output the model does not answer), WARNING otherwise (the model's fault)."""
        try:
            outputs = _select(deployment, outputs, call.outputs, declared)
            if call.answer_check is not None:
                call.answer_check(outputs)
        except ShoalError as err:
            self.router.recount(deployment, "ok", OUTCOME_OF.get(err.code, "error"))
            if self._may_log():
                log.log(
                    logging.INFO if err.code is Code.INVALID_ARGUMENT else logging.WARNING,
                    "request %s to %s (%s) failed on its answer: %s",
                    limits.shown(call.id) or "-",
                    deployment,
                    call.door or "-",
                    limits.shown(err.message, 2 * limits.SHOWN_CHARS),
                    extra={"request_id": limits.shown(call.id), "deployment": deployment},
                )
            raise
        return outputs

    def check(self, call: InferCall) -> None:
        """The checks that need no model metadata: the id, headers, byte lengths, the limits."""
        limits.check_request_id(call.id)
        self.bounds.check_counts(len(call.inputs), len(call.outputs))
        self.bounds.check_elements(t.shape for t in call.inputs)
        payload.check_all(call.inputs)

    async def embed(self, model: str, texts: Sequence[str], *, door: str = "openai") -> Embeddings:
        """Embeddings of ``texts`` from ``model`` (a BYTES input ``text``, an ``embedding``
        output of one row per text), one array of rows per routed part, all of one width
        and finite: Internal (500) when the model answers otherwise. With them the tokens
        the model read, the sum of its ``tokens`` output (one count per text, what the
        ``transformers`` backend answers); 0 for a model that answers no usable one.

        At most ``max_strings_per_request`` texts (InvalidArgument past it, before any
        work). A long list is cut into parts of the deployment's ``max_batch_size``, run
        concurrently so they spread over replicas; each part is one request through
        :meth:`infer`, counted as such.
        """
        self.check_strings(model, len(texts), door=door)
        spec = self.catalog.spec(model)
        size = max(1, spec.batching.max_batch_size)
        parts = [list(texts[i : i + size]) for i in range(0, len(texts), size)]
        vectors: list[np.ndarray | None] = [None] * len(parts)
        tokens = [0] * len(parts)
        widths: list[int] = []  # the first answered part's: each later one must match it

        def rows_of(index: int, rows: int) -> Callable[[Tensors], None]:
            def check(outputs: Tensors) -> None:
                found = [t for t in outputs if t.name == "embedding"]
                if not found:
                    # A model that declares no outputs (python) shows only now that it does
                    # not embed: asked of it, as of any model that does not, the client erred.
                    names = limits.shown(", ".join(repr(t.name) for t in outputs)) or "none"
                    raise InvalidArgument(
                        f"model {model!r} does not compute embeddings: it answered no 'embedding' "
                        f"output (its outputs: {names})"
                    )
                vectors[index] = _embedding(model, found[0], rows, widths)
                tokens[index] = _token_count(outputs, rows)

            return check

        calls = [
            InferCall(model, (_texts("text", p),), door=door, answer_check=rows_of(i, len(p)))
            for i, p in enumerate(parts)
        ]
        results = await asyncio.gather(*(self.infer(c) for c in calls), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result  # the first failure answers the request (a ShoalError: its status)
        return Embeddings([v for v in vectors if v is not None], sum(tokens))

    def check_strings(
        self, model: str, count: int, *, door: str = "openai", param: str = "input", what: str = "strings"
    ) -> None:
        """InvalidArgument (counted and logged) when one request carries more than
        ``max_strings_per_request`` strings in its ``param`` (``count`` ``what``): checked
        on the parsed body's list length, before any string is looked at."""
        limit = self.settings.max_strings_per_request
        if limit > 0 and count > limit:
            err = InvalidArgument(
                f"'{param}' holds {count} {what}, over the limit of {limit} (setting max_strings_per_request)"
            )
            self.refused(model, "", door, err)
            raise err

    # -- accounting of refusals ---------------------------------------------------------

    def refused(self, model: str, request_id: str, door: str, err: ShoalError) -> None:
        """Count and log a request that its adapter refused before it became an
        :class:`InferCall` (a malformed body, say), as :meth:`infer` counts its own refusals."""
        try:
            spec: DeploymentSpec | None = self.router.spec(model) if model else None
        except ShoalError:
            spec = None
        self._refused(InferCall(model, (), id=request_id, door=door), spec, err, time.perf_counter_ns())

    def _refused(self, call: InferCall, spec: DeploymentSpec | None, err: ShoalError, started: int) -> None:
        elapsed_ns = time.perf_counter_ns() - started
        if spec is not None:
            self.catalog.record(spec, ok=False, elapsed_ns=elapsed_ns, rows=0)
            self.router.count(spec.name, OUTCOME_OF.get(err.code, "error"), elapsed_ns / 1e9)
        if not self._may_log():
            return
        log.info(
            "request %s to %s (%s) refused: %s",
            limits.shown(call.id) or "-",
            limits.shown(call.model) or "-",
            call.door or "-",
            limits.shown(err.message, 2 * limits.SHOWN_CHARS),
            extra={"request_id": limits.shown(call.id), "deployment": limits.shown(call.model)},
        )

    def _may_log(self) -> bool:
        """Whether one more refusal or failure may be logged this second (at most
        ``_REFUSALS_LOGGED_PER_S``; how many were not is logged once the second is over,
        whether or not more come: before, only the next refusal said it, so the last second
        of a flood was never told)."""
        now = time.monotonic()
        if now - self._log_window >= 1.0:
            self._tell_suppressed()
            self._log_window, self._logged = now, 0
        if self._logged >= _REFUSALS_LOGGED_PER_S:
            if not self._suppressed:
                self._tell_at_window_end(1.0 - (now - self._log_window))
            self._suppressed += 1
            return False
        self._logged += 1
        return True

    def _tell_at_window_end(self, delay_s: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called off a loop: the next refusal tells it
            return
        self._tell_later = loop.call_later(max(0.0, delay_s), self._tell_suppressed)

    def _tell_suppressed(self) -> None:
        if self._tell_later is not None:
            self._tell_later.cancel()
            self._tell_later = None
        if self._suppressed:
            log.info("%d more request(s) refused in the last second", self._suppressed)
            self._suppressed = 0


def _check_model_id(spec: DeploymentSpec, model_id: str) -> None:
    """InvalidArgument unless a multiplexed deployment gets a plain model id and any other none."""
    if spec.multiplexing is None:
        if model_id:
            raise InvalidArgument(
                f"model {spec.name!r} is not multiplexed; it takes no model id ({MODEL_ID_PARAMETER})"
            )
        return
    if not model_id:
        raise InvalidArgument(
            f"model {spec.name!r} serves multiplexed models: name one with the request parameter "
            f"{MODEL_ID_PARAMETER!r} or the HTTP header {MODEL_ID_HEADER!r}"
        )
    check_model_id(model_id)


def _check_classify(declared: Sequence[TensorSpec], counts: dict[str, int]) -> None:
    """InvalidArgument when the request asks for the classes of a declared output that has
    none to rank (BOOL, BYTES). An output the model does not declare is checked by the
    replica, on what the model answered."""
    datatypes = {t.name: t.datatype for t in declared}
    for name in counts:
        datatype = datatypes.get(name)
        if datatype is not None:
            classify.check_datatype(name, datatype)


def _embedding(model: str, output: Tensor, rows: int, widths: list[int]) -> np.ndarray:
    """``output`` as ``rows`` embeddings as wide as ``widths[0]`` (the first part checked;
    set from this one when empty). Internal (the model's fault, not the client's: 500) when
    it is not numbers, not one row per text, not finite (JSON has no NaN; base64 would
    carry it silently) or of another width."""
    if output.datatype in ("BYTES", "BOOL"):
        raise Internal(f"model {model!r} answered a non-numeric 'embedding' output ({output.datatype})")
    array = payload.to_array(output)
    if array.ndim != 2 or array.shape[0] != rows:
        raise Internal(
            f"model {model!r} did not answer an 'embedding' output of one row per input: "
            f"shape {list(array.shape)} for {rows} input(s)"
        )
    if not np.isfinite(array).all():
        raise Internal(f"model {model!r} answered non-finite values in output 'embedding'")
    if not widths:
        widths.append(array.shape[1])
    elif widths[0] != array.shape[1]:
        raise Internal(
            f"model {model!r} answered embeddings of different widths ({widths[0]} and {array.shape[1]})"
        )
    return array


def _token_count(outputs: Tensors, rows: int) -> int:
    """The sum of a ``tokens`` output of one non-negative integer per text; 0 when there is
    none or it is not that (a ``python`` model may answer an output of that name for its
    own ends: a usage figure is not worth failing its embeddings for)."""
    found = [t for t in outputs if t.name == "tokens"]
    if not found or found[0].datatype not in _COUNTS:
        return 0
    array = payload.to_array(found[0])
    if array.shape != (rows,) or (array < 0).any():
        return 0
    return int(array.sum())


_COUNTS = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})


def _texts(name: str, texts: Sequence[str]) -> Tensor:
    """A BYTES tensor of ``texts``, one row each."""
    array = np.empty(len(texts), dtype=object)
    try:
        array[:] = [t.encode("utf-8") for t in texts]
    except UnicodeEncodeError as err:
        # Named, so that /v1/embeddings' error names its param (before: none).
        raise InvalidParameter(
            "input", f"'input' holds a string that is not valid Unicode text: {err.reason}"
        ) from None
    return payload.from_array(name, array)


def _select(model: str, outputs: Tensors, wanted: Sequence[str], declared: Sequence[TensorSpec]) -> Tensors:
    """The outputs the client asked for, in its order; all of them, in the model's order
    (``declared``; as the replica answered when none are known), otherwise."""
    if not wanted and (not declared or _named_as(outputs, declared)):
        return outputs  # the usual case: all of them, in the model's order already
    order = [t.name for t in declared]
    by_name = {t.name: t for t in outputs}
    if wanted:
        missing = [o for o in wanted if o not in by_name]
        if missing:
            returned = limits.shown(", ".join(repr(n) for n in by_name))
            raise InvalidArgument(
                f"unknown output {limits.quoted(missing[0])}; model {model!r} returned {returned}"
            )
        return tuple(by_name[o] for o in wanted)
    if order:
        first = [by_name[o] for o in order if o in by_name]
        named = set(order)
        return (*first, *(t for t in outputs if t.name not in named))
    return outputs


def _named_as(outputs: Tensors, declared: Sequence[TensorSpec]) -> bool:
    if len(outputs) != len(declared):
        return False
    return all(t.name == d.name for t, d in zip(outputs, declared))  # noqa: B905 - same length


__all__ = ["DataPlane", "InferCall", "InferResult", "Tensor"]

"""The scheduler's REST inference route, ``POST /v2/models/NAME[/versions/V]/infer``
(the Open Inference Protocol, KServe V2 / Triton): reading and decoding its body, the
data plane's call, and writing its answer, compressed when the client asks
(:mod:`shoal.http.coding`). :func:`shoal.http.scheduler.scheduler_app` mounts it ahead
of its Starlette app (:class:`Dispatch`).

Bodies are JSON (``inputs: [{name, datatype, shape, data}]``) or Triton's binary tensor
data extension; see :mod:`shoal.http.scheduler` for the whole REST API.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from shoal.core import budget as budgets
from shoal.core import classify, limits, payload, tensors
from shoal.core.limits import RequestLimits
from shoal.core.payload import Tensor, Tensors
from shoal.errors import (
    BodyTooLarge,
    Code,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ShoalError,
    from_code,
)
from shoal.http import coding
from shoal.http.auth import drain
from shoal.http.offload import in_parser
from shoal.http.server import ClientGone, client_gone, unless_gone
from shoal.scheduler.dataplane import (
    MODEL_ID_HEADER,
    MODEL_ID_PARAMETER,
    InferCall,
    check_priority,
    check_sequence_flags,
)
from shoal.scheduler.ingress import IngressNode
from shoal.scheduler.models import InferResult

log = logging.getLogger("shoal.http")

_JSON = "application/json"
_UNSUPPORTED_PARAMETERS = {
    "shared_memory_region": "shared memory is not supported; send the data in the request",
}


# ---------------------------------------------------------------- bodies


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decoded (gzip, x-gzip, deflate), at most ``limit`` bytes; InvalidArgument otherwise.

    An oversized body is still read to its end (and dropped), so that the client, which
    sends it all before reading the answer, gets the 400 and not a broken connection.
    """
    headers = request.headers
    # Several Content-Encoding lines are one list (RFC 9110 5.3); Starlette's get() is the first.
    encoding = ", ".join(headers.getlist("content-encoding"))
    return await read_asgi_body(request.receive, headers.get("content-length"), encoding, limit)


async def read_asgi_body(
    receive: Receive,
    declared: str | None,
    encoding: str,
    limit: int,
    hold: Callable[[int], None] | None = None,
) -> bytes:
    """:func:`read_body` from the ASGI ``receive`` and the request's Content-Length and
    Content-Encoding headers. ``hold(n)``, when given, is told the bytes the body takes so
    far, as they arrive and once decoded, and raises to refuse it (the rest of the body is
    still read, and dropped, so that the client gets the answer)."""
    too_big = False
    refused: ShoalError | None = None
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise InvalidArgument(
                f"Content-Length must be an integer, got {limits.quoted(declared)}"
            ) from None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client went away: what came is all there is
        chunk = message.get("body", b"")
        size += len(chunk)
        if too_big or size > limit:
            too_big = True
        elif refused is None and chunk:
            if hold is not None:
                try:
                    hold(size)
                except ShoalError as err:
                    refused = err
                    chunks.clear()
            if refused is None:
                chunks.append(chunk)
        if not message.get("more_body", False):
            break
    if too_big:
        raise BodyTooLarge(limit, size)
    if refused is not None:
        raise refused
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if not encoding:
        return body
    out = coding.decode(body, encoding, limit)
    if hold is not None:
        hold(len(out))
    return out


def _refuse_unsupported(params: dict[str, Any], where: str) -> None:
    for key, why in _UNSUPPORTED_PARAMETERS.items():
        if key in params:
            raise InvalidArgument(f"{where}{why}")


def _params(doc: dict[str, Any], where: str) -> dict[str, Any]:
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidArgument(f"{where}'parameters' must be an object, got {type(params).__name__}")
    return params


def bool_param(params: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise InvalidArgument(
            f"{where}parameter {key!r} must be true or false, got {limits.shown(repr(value))}"
        )
    return value


Answer = tuple[bytes, str, dict[str, str]]
"""An answer's body, media type and headers."""


_NO_LIMITS = RequestLimits()
_MAX_TIMEOUT_US = 2**64 - 1


class InferRequest:
    """A decoded REST inference request."""

    def __init__(self, header: dict[str, Any], tail: memoryview, bounds: RequestLimits = _NO_LIMITS) -> None:
        request_id = header.get("id", "")
        if not isinstance(request_id, str) or not limits.is_unicode(request_id):
            raise InvalidArgument(
                f"'id' must be a string of valid Unicode, got {limits.shown(repr(request_id))}"
            )
        limits.check_request_id(request_id)
        self.id = request_id
        params = _params(header, "")
        timeout = params.get("timeout", 0)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 <= timeout <= _MAX_TIMEOUT_US:
            # A uint64, as Triton and gRPC carry it; before, one past float range (1e310) was a
            # 500 (OverflowError) and one past 2^64 taken.
            raise InvalidArgument(
                f"parameter 'timeout' must be a non-negative integer (µs) below 2^64, "
                f"got {limits.shown(repr(timeout))}"
            )
        self.timeout_s = timeout / 1e6
        if params.get("sequence_id") not in (None, 0, ""):
            raise InvalidArgument("sequence batching (parameter 'sequence_id') is not supported")
        check_priority(params.get("priority"))
        if params:
            check_sequence_flags(params.get("sequence_start"), params.get("sequence_end"))
        self.binary_default = bool_param(params, "binary_data_output", False, "")
        model_id = params.get(MODEL_ID_PARAMETER, "")
        if not isinstance(model_id, str):
            raise InvalidArgument(
                f"parameter {MODEL_ID_PARAMETER!r} must be a string, got {limits.shown(repr(model_id))}"
            )
        self.model_id = model_id
        if "inputs" not in header:
            raise InvalidArgument("the request has no 'inputs'")
        requested = header.get("outputs", [])
        if not isinstance(requested, list):
            raise InvalidArgument(f"'outputs' must be a list, got {type(requested).__name__}")
        if isinstance(header["inputs"], list):  # before any tensor is decoded
            bounds.check_counts(len(header["inputs"]), len(requested))
            bounds.check_elements(e.get("shape") for e in header["inputs"] if isinstance(e, dict))
        self.inputs = self._decode_inputs(header["inputs"], tail)
        self.outputs: list[str] = []
        self.binary: dict[str, bool] = {}
        # Triton's classification extension: output -> k (shoal.core.classify); None: none.
        self.classify: dict[str, int] | None = None
        for i, entry in enumerate(requested):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
                raise InvalidArgument(f"outputs[{i}] must be an object with a 'name'")
            name = entry["name"]
            where = f"output {limits.quoted(name)}: "
            out_params = _params(entry, where)
            _refuse_unsupported(out_params, where)
            if classify.PARAMETER in out_params:
                if self.classify is None:
                    self.classify = {}
                self.classify[name] = classify.check_count(name, out_params[classify.PARAMETER])
            self.outputs.append(name)
            self.binary[name] = bool_param(out_params, "binary_data", self.binary_default, where)

    @staticmethod
    def _decode_inputs(entries: object, tail: memoryview) -> Tensors:
        """Wire tensors: binary data as it came (not decoded), JSON data through numpy."""
        slices = tensors.binary_input_slices(entries, tail)  # checks that entries is a list of objects
        assert isinstance(entries, list)
        out: dict[str, Tensor] = {}
        for i, (entry, raw) in enumerate(zip(entries, slices, strict=True)):
            name = entry.get("name")
            if not isinstance(name, str) or not name:
                raise InvalidArgument(f"inputs[{i}] has no 'name'")
            if not limits.is_unicode(name):
                raise InvalidArgument(f"inputs[{i}]: the name {limits.quoted(name)} is not valid Unicode")
            if name in out:
                raise InvalidArgument(f"input {limits.quoted(name)} is given twice")
            where = f"input {limits.quoted(name)}: "
            _refuse_unsupported(_params(entry, where), where)
            for key in ("datatype", "shape"):
                if key not in entry:
                    raise InvalidArgument(f"{where}'{key}' is missing")
            if raw is not None:
                if "data" in entry:
                    raise InvalidArgument(f"{where}give either 'data' or binary_data_size, not both")
                datatype = entry["datatype"]
                if not isinstance(datatype, str):
                    raise InvalidArgument(f"{where}datatype must be a string, got {type(datatype).__name__}")
                shape = tensors.check_shape(entry["shape"], where)
                out[name] = Tensor(name, datatype, shape, bytes(raw))
            elif "data" in entry:
                array = tensors.from_json(entry["datatype"], entry["shape"], entry["data"], name=name)
                out[name] = payload.from_array(name, array)
            else:
                raise InvalidArgument(f"{where}no data: give 'data' or parameters.binary_data_size")
        return tuple(out.values())

    def call(self, model: str, version: str, model_id: str = "") -> InferCall:
        """The data plane's call; ``model_id`` from the HTTP header, unless the body's
        parameter names one."""
        return InferCall(
            model=model,
            inputs=self.inputs,
            id=self.id,
            version=version,
            timeout_s=self.timeout_s,
            outputs=tuple(self.outputs),
            door="http",
            model_id=self.model_id or model_id,
            classify=self.classify,
        )

    def json_elements(self, result: InferResult) -> int:
        """How many output elements go back as JSON (what makes a response slow to write)."""
        return sum(t.elements for t in result.outputs if not self.binary.get(t.name, self.binary_default))

    def render(self, result: InferResult) -> Answer:
        """The response body, its media type and headers."""
        header: dict[str, Any] = {"model_name": result.model_name, "model_version": result.model_version}
        if result.id:
            header["id"] = result.id
        blobs: list[bytes] = []
        outputs = []
        for t in result.outputs:
            entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
            if self.binary.get(t.name, self.binary_default):
                entry["parameters"] = {"binary_data_size": len(t.data)}
                blobs.append(t.data)
            else:
                entry["data"] = tensors.to_json(payload.to_array(t), name=t.name)
            outputs.append(entry)
        header["outputs"] = outputs
        if not blobs:
            return _dumps(header), _JSON, {}
        body, length = tensors.build_binary_response(header, blobs)
        return body, "application/octet-stream", {"Inference-Header-Content-Length": str(length)}


_NO_TAIL = memoryview(b"")


def _dumps(doc: dict[str, Any]) -> bytes:
    """``doc`` as compact JSON. orjson writes it unless it holds a non-finite float, which
    orjson writes as null: then json.dumps, which writes NaN and Infinity as Triton does (a
    response header has no null of its own, so a ``null`` in orjson's text is one of those, or
    text inside a string)."""
    try:
        out = orjson.dumps(doc)
    except orjson.JSONEncodeError:  # an integer past 64 bits
        out = b"null"
    if b"null" not in out:
        return out
    return json.dumps(doc, separators=(",", ":")).encode()


def _parse_infer(body: bytes, header_length: str | None, bounds: RequestLimits) -> InferRequest:
    if header_length is None:
        # orjson first: it reads a small body in a tenth of json.loads's time. A body orjson
        # refuses and json takes (NaN, lone surrogates, UTF-16), and any request refused
        # once orjson read it, go through json, so that what is served and every error
        # message are json's. (orjson reads an integer past 64 bits as a float: as float
        # data it is the same number, and anywhere else a float is refused, so json reads
        # that request again.)
        try:
            header = orjson.loads(body)
        except orjson.JSONDecodeError:
            header = None
        if type(header) is dict:
            try:
                return InferRequest(header, _NO_TAIL, bounds)
            except InvalidArgument:
                pass
    header, tail = tensors.split_binary_body(body, header_length)
    return InferRequest(header, tail, bounds)


def _parse_in_child(
    body: bytes, header_length: str | None, bounds: RequestLimits
) -> InferRequest | tuple[str, str]:
    """:func:`_parse_infer` in the parsing process; an error comes back as (code, message)."""
    try:
        return _parse_infer(body, header_length, bounds)
    except ShoalError as err:
        return (err.code.value, err.message)


async def parse_infer(
    body: bytes, header_length: str | None, bounds: RequestLimits, on_loop: int
) -> InferRequest:
    """The request in ``body``. A JSON body over ``on_loop`` bytes is parsed in a separate
    process: json.loads holds the GIL for its whole run (a thread would not help), and a
    49 MB body parsed on the event loop held every other request up for seconds. The
    parsed tensors come back as raw bytes (a memory copy, not a parse)."""
    if len(body) <= on_loop or (header_length is not None and int_or(header_length, 0) <= on_loop):
        return _parse_infer(body, header_length, bounds)
    result = await in_parser(_parse_in_child, body, header_length, bounds)
    if isinstance(result, tuple):
        raise from_code(Code(result[0]), result[1])
    return result


def _render_in_child(req: InferRequest, result: InferResult, used: str | None) -> Answer:
    answer = req.render(result)
    return answer if used is None else _encoded(answer, used)


async def respond(req: InferRequest, result: InferResult, on_loop: int, accept: str | None = None) -> Answer:
    """``req``'s answer: body, media type and headers, compressed as ``accept`` (the
    request's Accept-Encoding; None: none was sent) asks (:func:`coding.negotiate`).

    One with many output elements as JSON is written in the parsing process: turning
    millions of numbers into JSON text on the event loop held every other request up for
    seconds; it is compressed there too. Any other body over ``on_loop`` bytes is compressed
    in a thread (zlib lets go of the GIL), so that it does not hold the event loop either."""
    used = None if accept is None else coding.negotiate(accept)
    if req.json_elements(result) * 8 > on_loop:  # about 8 bytes of JSON per number
        req.inputs = ()  # sent, and not needed to write the answer
        return await in_parser(_render_in_child, req, result, used)
    answer = req.render(result)
    if used is None:
        return answer
    if used and len(answer[0]) > on_loop:
        return await asyncio.to_thread(_encoded, answer, used)
    return _encoded(answer, used)


def _encoded(answer: Answer, used: str) -> Answer:
    """``answer`` in coding ``used`` ("": as it is), for a request that sent Accept-Encoding.
    Triton's Inference-Header-Content-Length stays the length of the JSON header in the
    uncompressed body, as Triton sends it and tritonclient reads it once decompressed."""
    body, media_type, headers = answer
    headers = {**headers, "Vary": "Accept-Encoding"}
    if used and len(body) >= coding.MIN_BYTES:
        body = coding.encode(body, used)
        headers["Content-Encoding"] = used
    return body, media_type, headers


def int_or(text: str, default: int) -> int:
    try:
        return int(text)
    except ValueError:
        return default


def _infer_path(path: str) -> dict[str, str] | None:
    """The path parameters of ``/v2/models/NAME[/versions/V]/infer``; None for any other path."""
    parts = path.split("/")
    if len(parts) == 5 and parts[3]:
        return {"name": parts[3]} if parts[:3] == ["", "v2", "models"] and parts[4] == "infer" else None
    if len(parts) == 7 and parts[3] and parts[5] and parts[4] == "versions" and parts[6] == "infer":
        return {"name": parts[3], "version": parts[5]} if parts[:3] == ["", "v2", "models"] else None
    return None


class Dispatch:
    """Inference requests (``POST /v2/models/NAME[/versions/V]/infer``) to ``infer``, the
    rest to the Starlette app.

    Why: for a small REST inference, Starlette's error and exception middleware, its router,
    Request and Response objects and the send wrappers each layer adds were a fifth of the
    ingress's CPU in the app (py-spy, wrk c=32 V2 JSON). ``infer`` answers errors as the
    app does: ``{"error": ...}`` with the status of :data:`shoal.errors.HTTP_STATUS`, and
    500 ``internal error: ...`` for a bug."""

    def __init__(self, infer: ASGIApp, app: ASGIApp) -> None:
        self.infer = infer
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/infer"):
            params = _infer_path(scope["path"])
            if params is not None:
                scope["path_params"] = params
                await self.infer(scope, receive, send)
                return
        await self.app(scope, receive, send)


#: The request headers :class:`_Infer` reads.
_INFER_HEADERS = frozenset(
    {
        b"content-length",
        b"content-encoding",
        b"accept-encoding",
        b"inference-header-content-length",
        MODEL_ID_HEADER.encode(),
    }
)


def _read_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The :data:`_INFER_HEADERS` of a request. A header in several field lines is their
    values joined by commas (RFC 9110 5.3): before, the last line alone was read, so
    ``Accept-Encoding: gzip`` then ``Accept-Encoding: br`` went uncompressed. A header that
    takes one value (a length, the model id) repeated so is refused where it is read."""
    headers: dict[str, str] = {}
    for k, v in raw:
        if k in _INFER_HEADERS:
            name = k.decode()
            value = v.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


class Infer:
    """``POST /v2/models/NAME[/versions/V]/infer`` as an ASGI app, over the data plane."""

    def __init__(self, node: IngressNode) -> None:
        self.node = node
        self.limit = node.settings.max_message_bytes
        self.on_loop = node.settings.max_json_on_loop_kb * 1024
        self.bounds = RequestLimits.of(node.settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            status = 200
            body, media_type, extra = await self.answer(scope, receive)
        except ShoalError as err:
            status, media_type, extra = err.http_status, _JSON, err.http_headers
            body = json.dumps({"error": err.message}, ensure_ascii=False, separators=(",", ":")).encode()
        except Exception as exc:  # a bug: the client still gets the protocol's JSON error
            log.exception("inference request %s failed", scope["path"])
            status, media_type, extra = 500, _JSON, {}
            body = json.dumps(
                {"error": f"internal error: {type(exc).__name__}: {exc}"}, separators=(",", ":")
            ).encode()
        headers = [(b"content-length", b"%d" % len(body)), (b"content-type", media_type.encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def answer(self, scope: Scope, receive: Receive) -> Answer:
        node = self.node
        params = scope["path_params"]
        name, version = params["name"], params.get("version", "")
        headers = _read_headers(scope["headers"])
        timeout_s = budgets.DEFAULT_WAIT_S
        try:
            if not node.router.is_route(name):  # a traffic route's target is drawn in the data plane
                timeout_s = node.catalog.spec(name, version).timeout_s  # 404 before reading the body
        except ShoalError as err:
            node.dataplane.refused(name, "", "http", err)
            raise
        # The body's bytes are held in flight (max_inflight_mb) from before it is read: a
        # request that waits for room leaves its body unread, in the client's socket. A
        # Content-Length over the body limit holds nothing (the read refuses it), and the
        # body must come within the request's deadline: a client that declares a large
        # body and sends it slowly, or never, holds its room that long at most.
        budget = node.dataplane.inflight
        size = int_or(headers.get("content-length", ""), 0)
        if size > self.limit:
            size = 0
        try:
            if not budget.try_take(size):
                await unless_gone(scope, budget.take(size, timeout_s))
        except ShoalError as err:
            node.dataplane.refused(name, "", "http", err)
            await drain(receive, self.limit)  # so that the client gets the answer
            raise
        held = budgets.HELD.set(True)

        def hold(n: int) -> None:
            # A body sent without a Content-Length (chunked) or compressed is held as it
            # arrives and once decoded. Before, it held its declared length only: 20
            # chunked 60 MB bodies at once grew the ingress processes to 3.3 GB where the
            # same bodies with a Content-Length were held to 1.7 GB, some refused.
            nonlocal size
            if n > size:
                if not budget.try_grow(size, n - size):
                    raise ResourceExhausted(
                        f"this request's body takes {budgets.mb(n)} (sent chunked or compressed, its "
                        f"size shows as it is read); beside the {budgets.mb(budget.held)} in flight "
                        f"on this ingress process it would pass {budgets.mb(budget.limit)} "
                        "(max_inflight_mb, this process's share): retry shortly"
                    )
                size = n

        try:
            try:
                try:
                    async with asyncio.timeout(timeout_s):
                        body = await read_asgi_body(
                            receive,
                            headers.get("content-length"),
                            headers.get("content-encoding", ""),
                            self.limit,
                            hold,
                        )
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"the request body did not arrive within {timeout_s:g}s (the deployment's timeout_s)"
                    ) from None
                if client_gone(scope):
                    raise ClientGone  # part of a body, maybe: nobody waits for its answer
                req = await parse_infer(
                    body,
                    headers.get("inference-header-content-length"),
                    self.bounds,
                    self.on_loop,
                )
            except ShoalError as err:
                node.dataplane.refused(name, "", "http", err)
                raise
            # A client that hangs up takes its request out of the queue, or off its replica's
            # slot (its answer, if the replica sends one, is dropped), as a gRPC cancel does.
            call = req.call(name, version, headers.get(MODEL_ID_HEADER, ""))
            result = await unless_gone(scope, node.dataplane.infer(call))
            return await respond(req, result, self.on_loop, headers.get("accept-encoding"))
        finally:
            budgets.HELD.reset(held)
            budget.give(size)

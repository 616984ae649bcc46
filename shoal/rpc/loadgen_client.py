"""The wire side of ``shoal bench``: requests serialized once, then sent as raw bytes.

Three transports, one shape. :func:`open_target` builds a :class:`Target` for
``grpc`` (Open Inference Protocol ``ModelInfer``), ``http`` (``POST
/v2/models/NAME/infer`` with Triton's binary tensor extension) or ``native``
(shoal's ``SendRequest``). A target hands out *senders*: coroutine functions that
send the prebuilt request once and return ``None`` on success or the kind of
error (a gRPC status name such as ``"UNAVAILABLE"``, ``"HTTP 503"``, or
``"connection"``/``"timeout"``). Senders never raise for a failed request, so
the load loop stays a tight loop of awaits.

gRPC senders share the target's channels (HTTP/2 multiplexes); each HTTP sender
owns one keep-alive HTTP/1.1 connection over raw asyncio streams, so give one
sender to each concurrent caller. Nothing here is safe to use from two event loops.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import numpy as np

from shoal.core import tensors
from shoal.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from shoal.proto import grpc_service_pb2 as oip
from shoal.proto import grpc_service_pb2_grpc as oipg
from shoal.proto import shoal_pb2 as pb
from shoal.rpc import codec

Sender = Callable[[], Awaitable[str | None]]
"""Sends the request once; ``None`` when it succeeded, else the kind of error."""

PROTOCOLS = ("grpc", "http", "native")
OIP_INFER = "/inference.GRPCInferenceService/ModelInfer"
NATIVE_INFER = "/shoal.v1.Scheduler/SendRequest"
_MAX_MESSAGE = 256 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """A model input as its metadata describes it; ``-1`` marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def _options(private: bool) -> list[tuple[str, int]]:
    opts = [("grpc.max_send_message_length", _MAX_MESSAGE), ("grpc.max_receive_message_length", _MAX_MESSAGE)]
    if private:
        # Channels with equal arguments share one TCP connection unless told otherwise.
        opts.append(("grpc.use_local_subchannel_pool", 1))
    return opts


def _hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgument(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


# ---------------------------------------------------------------- request bodies


def oip_grpc_request(model: str, inputs: Mapping[str, np.ndarray]) -> bytes:
    """A serialized ``ModelInferRequest`` carrying ``inputs`` as raw contents."""
    req = oip.ModelInferRequest(model_name=model)
    for name, arr in inputs.items():
        req.inputs.add(name=name, datatype=tensors.datatype_of(arr), shape=arr.shape)
        req.raw_input_contents.append(tensors.to_bytes(arr))
    return req.SerializeToString()


def native_request(deployment: str, inputs: Mapping[str, np.ndarray], timeout_s: float) -> bytes:
    """A serialized native ``InferRequest``."""
    req = pb.InferRequest(deployment=deployment, timeout_s=timeout_s)
    codec.fill_arrays(req.inputs, inputs)
    return req.SerializeToString()


def oip_http_body(inputs: Mapping[str, np.ndarray]) -> tuple[bytes, int]:
    """A binary-extension inference body (JSON header, then tensors) and the header's length."""
    blobs = [tensors.to_bytes(arr) for arr in inputs.values()]
    header = {
        "inputs": [
            {
                "name": name,
                "shape": list(arr.shape),
                "datatype": tensors.datatype_of(arr),
                "parameters": {"binary_data_size": len(blob)},
            }
            for (name, arr), blob in zip(inputs.items(), blobs, strict=True)
        ],
        "parameters": {"binary_data_output": True},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b"".join(blobs), len(text)


# ---------------------------------------------------------------- gRPC


class GrpcTarget:
    """OIP ``ModelInfer`` or native ``SendRequest`` over ``connections`` gRPC channels."""

    def __init__(self, address: str, method: str, payload: bytes, connections: int, timeout_s: float) -> None:
        self.address = address
        self._payload = payload
        self._timeout = timeout_s
        self._channels = [
            grpc.aio.insecure_channel(address, options=_options(connections > 1))
            for _ in range(max(1, connections))
        ]
        # No serializers: the request goes out as the bytes built once, the reply stays bytes.
        self._calls = [
            ch.unary_unary(method, request_serializer=None, response_deserializer=None)
            for ch in self._channels
        ]
        self._next = 0

    def sender(self) -> Sender:
        call = self._calls[self._next % len(self._calls)]
        self._next += 1
        payload, timeout = self._payload, self._timeout

        async def send() -> str | None:
            try:
                await call(payload, timeout=timeout)
            except grpc.aio.AioRpcError as err:
                return str(err.code().name)
            return None

        return send

    async def probe(self) -> str | None:
        """One request whose failure is explained: ``None`` or ``"CODE: details"``."""
        try:
            await self._calls[0](self._payload, timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            return f"{err.code().name}: {err.details()}"
        return None

    async def aclose(self) -> None:
        for ch in self._channels:
            await ch.close(None)


# ---------------------------------------------------------------- HTTP/1.1


class _HttpConnection:
    """One keep-alive HTTP/1.1 connection sending the same prebuilt request."""

    def __init__(self, host: str, port: int, request: bytes, timeout_s: float) -> None:
        self._host, self._port = host, port
        self._request = request
        self._timeout = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.last_body = b""

    async def _exchange(self) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        assert self._reader is not None
        self._writer.write(self._request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = -1
        chunked, keep = False, True
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            key = key.strip().lower()
            if key == b"content-length":
                length = int(value)
            elif key == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif key == b"connection" and value.strip().lower() == b"close":
                keep = False
        if chunked:
            parts = []
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self._reader.readuntil(b"\r\n")
                    break
                parts.append(await self._reader.readexactly(size + 2))
            body = b"".join(p[:-2] for p in parts)
        elif length >= 0:
            body = await self._reader.readexactly(length)
        else:
            body = await self._reader.read()
            keep = False
        if not keep:
            self._drop()
        return status, body

    def _drop(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def send(self) -> str | None:
        try:
            async with asyncio.timeout(self._timeout):
                status, self.last_body = await self._exchange()
        except TimeoutError:
            self._drop()
            return "timeout"
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            self._drop()
            return "connection"
        return None if status == 200 else f"HTTP {status}"

    def close(self) -> None:
        self._drop()


class HttpTarget:
    """``POST /v2/models/NAME/infer`` with binary tensors, one connection per sender."""

    def __init__(self, address: str, model: str, inputs: Mapping[str, np.ndarray], timeout_s: float) -> None:
        self.address = address
        self._host, self._port = _hostport(address)
        body, header_length = oip_http_body(inputs)
        self._request = (
            f"POST /v2/models/{model}/infer HTTP/1.1\r\n"
            f"Host: {address}\r\n"
            "Content-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {header_length}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "\r\n"
        ).encode() + body
        self._timeout = timeout_s
        self._conns: list[_HttpConnection] = []

    def sender(self) -> Sender:
        conn = _HttpConnection(self._host, self._port, self._request, self._timeout)
        self._conns.append(conn)
        return conn.send

    async def probe(self) -> str | None:
        conn = _HttpConnection(self._host, self._port, self._request, self._timeout)
        try:
            failed = await conn.send()
        finally:
            conn.close()
        if failed is None:
            return None
        return f"{failed}: {conn.last_body[:300].decode(errors='replace')}"

    async def aclose(self) -> None:
        for conn in self._conns:
            conn.close()
        self._conns.clear()


Target = GrpcTarget | HttpTarget


def open_target(
    protocol: str,
    address: str,
    model: str,
    inputs: Mapping[str, np.ndarray],
    *,
    connections: int = 1,
    timeout_s: float = 60.0,
) -> Target:
    """A target sending ``inputs`` to ``model`` at ``address`` (HOST:PORT) over ``protocol``.

    Opens nothing yet: channels connect on the first call. Raises InvalidArgument for an
    unknown protocol or a bad address.
    """
    _hostport(address)
    if protocol == "grpc":
        return GrpcTarget(address, OIP_INFER, oip_grpc_request(model, inputs), connections, timeout_s)
    if protocol == "native":
        payload = native_request(model, inputs, timeout_s)
        return GrpcTarget(address, NATIVE_INFER, payload, connections, timeout_s + 5.0)
    if protocol == "http":
        return HttpTarget(address, model, inputs, timeout_s)
    raise InvalidArgument(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")


# ---------------------------------------------------------------- metadata and liveness


async def grpc_server_live(address: str, timeout_s: float = 5.0) -> bool | None:
    """OIP ``ServerLive`` over gRPC: True/False, or None when the server lacks the service."""
    async with grpc.aio.insecure_channel(address, options=_options(False)) as channel:
        stub = oipg.GRPCInferenceServiceStub(channel)
        try:
            reply = await stub.ServerLive(oip.ServerLiveRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"cannot reach {address}: {err.details()}") from None
            return False
        return bool(reply.live)


async def grpc_model_metadata(address: str, model: str, timeout_s: float = 10.0) -> list[TensorInfo]:
    """The model's inputs from OIP ``ModelMetadata``. Raises NotFound, Unavailable when the
    server cannot be reached, FailedPrecondition when it does not answer the call."""
    async with grpc.aio.insecure_channel(address, options=_options(False)) as channel:
        stub = oipg.GRPCInferenceServiceStub(channel)
        try:
            reply = await stub.ModelMetadata(oip.ModelMetadataRequest(name=model), timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"model {model!r}: {err.details()}") from None
            what = f"ModelMetadata at {address}: {err.code().name} {err.details()}"
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(what) from None
            raise FailedPrecondition(what) from None
    return [TensorInfo(t.name, t.datatype, tuple(int(d) for d in t.shape)) for t in reply.inputs]


async def grpc_model_config(address: str, model: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """The model's configuration from OIP ``ModelConfig`` (Triton's extension) as JSON-style
    data, ``{}`` when the server does not offer it. Raises Unavailable when unreachable."""
    from google.protobuf.json_format import MessageToDict

    async with grpc.aio.insecure_channel(address, options=_options(False)) as channel:
        stub = oipg.GRPCInferenceServiceStub(channel)
        try:
            reply = await stub.ModelConfig(oip.ModelConfigRequest(name=model), timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"ModelConfig at {address}: {err.details()}") from None
            return {}
    return dict(MessageToDict(reply.config, preserving_proto_field_name=True))


async def grpc_model_statistics(address: str, model: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """OIP ``ModelStatistics`` for ``model`` as JSON-style data, ``{}`` when not offered."""
    from google.protobuf.json_format import MessageToDict

    async with grpc.aio.insecure_channel(address, options=_options(False)) as channel:
        stub = oipg.GRPCInferenceServiceStub(channel)
        try:
            reply = await stub.ModelStatistics(oip.ModelStatisticsRequest(name=model), timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"ModelStatistics at {address}: {err.details()}") from None
            return {}
    return dict(MessageToDict(reply, preserving_proto_field_name=True))


async def http_get_json(address: str, path: str, timeout_s: float = 10.0) -> tuple[int, Any]:
    """``GET path`` on HOST:PORT; the status and the decoded JSON body (None if not JSON)."""
    host, port = _hostport(address)
    request = f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode()
    conn = _HttpConnection(host, port, request, timeout_s)
    try:
        failed = await conn.send()
    finally:
        conn.close()
    if failed in ("timeout", "connection"):
        raise Unavailable(f"GET http://{address}{path}: {failed}")
    status = 200 if failed is None else int(failed.split()[1])
    try:
        return status, json.loads(conn.last_body)
    except ValueError:
        return status, None


async def http_model_metadata(address: str, model: str, timeout_s: float = 10.0) -> list[TensorInfo]:
    """The model's inputs from ``GET /v2/models/NAME``."""
    status, doc = await http_get_json(address, f"/v2/models/{model}", timeout_s)
    if status == 404:
        raise NotFound(f"model {model!r} not found at http://{address}")
    if status != 200 or not isinstance(doc, dict):
        raise FailedPrecondition(f"GET http://{address}/v2/models/{model} answered {status}")
    try:
        return [
            TensorInfo(str(t["name"]), str(t["datatype"]), tuple(int(d) for d in t["shape"]))
            for t in doc.get("inputs", [])
        ]
    except (KeyError, TypeError, ValueError) as err:
        raise FailedPrecondition(f"model metadata from http://{address} is malformed: {err}") from None


async def model_metadata(protocol: str, address: str, model: str) -> Sequence[TensorInfo]:
    """Inputs over the OIP flavour matching ``protocol`` (native asks the gRPC OIP service)."""
    if protocol == "http":
        return await http_model_metadata(address, model)
    return await grpc_model_metadata(address, model)

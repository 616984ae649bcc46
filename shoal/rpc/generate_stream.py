"""Decoupled ``ModelStreamInfer`` for deployments that generate text (Triton's decoupled models).

A request to a generation deployment on ``ModelStreamInfer`` is answered with one
``ModelStreamInferResponse`` per piece of text as the model makes it, as Triton answers
for a decoupled model (its model config says ``model_transaction_policy.decoupled``).

The request: input ``text`` (or ``text_input``), BYTES, one element, the prompt; the
generation parameters as optional one-element inputs (``max_tokens`` INT32/INT64,
``temperature`` and ``top_p`` FP32/FP64, ``seed`` INT32/INT64, ``stop`` BYTES, any number
of elements) or as request parameters of the same names (``stop`` a string). Parameters
left out are the deployment's defaults.

Each response carries one output, BYTES ``[1]``: the piece of text. It is named ``text``
(the model's output in its metadata), or ``text_output`` when the request asks for that
name. As in Triton, the last response has parameter ``triton_final_response`` true (the
others false), and here also ``finish_reason`` and the ``prompt_tokens`` /
``completion_tokens`` counts. With request parameter ``triton_enable_empty_final_response``
true, the last response is an extra one without outputs.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.core import tensors
from shoal.errors import InvalidArgument, NotFound, ShoalError, Unavailable
from shoal.proto import grpc_service_pb2 as oip
from shoal.scheduler.generate import generate_request, generates_text, internal_id, start_stream
from shoal.scheduler.models import ModelCatalog
from shoal.types import Arrays, GenerateChunk, GenerateRequest

_TEXT_INPUTS = ("text", "text_input")
_OUTPUT_NAMES = ("text", "text_output")
_NUMBER_INPUTS = {"max_tokens": "iu", "seed": "iu", "temperature": "f", "top_p": "f"}


def wants_generation(catalog: ModelCatalog, request: oip.ModelInferRequest) -> bool:
    """Whether ``request`` is for a deployment that generates text (False for an unknown model,
    or one not known yet: the ordinary path answers NOT_FOUND, or UNAVAILABLE)."""
    try:
        return generates_text(catalog.spec(request.model_name, request.model_version))
    except (NotFound, Unavailable):
        return False


def _parameters(params: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in params:
        kind = params[key].WhichOneof("parameter_choice")
        if kind is not None:
            out[key] = getattr(params[key], kind)
    return out


def _scalar(name: str, array: np.ndarray, kinds: str) -> Any:
    if array.dtype.kind not in kinds:
        raise InvalidArgument(f"input {name!r}: expected {'an integer' if kinds == 'iu' else 'a number'}")
    if array.size != 1:
        raise InvalidArgument(f"input {name!r}: expected one element, got {array.size}")
    return array.reshape(-1)[0].item()


def _strings(name: str, array: np.ndarray) -> list[str]:
    if array.dtype.kind not in "OSU":
        raise InvalidArgument(f"input {name!r}: expected BYTES, got {array.dtype}")
    out = []
    for value in array.reshape(-1).tolist():
        try:
            out.append(value.decode() if isinstance(value, bytes) else str(value))
        except UnicodeDecodeError:
            raise InvalidArgument(f"input {name!r} is not valid UTF-8") from None
    return out


def _output_name(request: oip.ModelInferRequest) -> str:
    wanted = [o.name for o in request.outputs]
    if not wanted:
        return "text"
    if len(wanted) == 1 and wanted[0] in _OUTPUT_NAMES:
        return wanted[0]
    raise InvalidArgument(f"a generation answers one output, 'text' (or 'text_output'); asked for {wanted}")


def _with(response: oip.ModelInferResponse, values: Mapping[str, bool | int | str]) -> None:
    for key, value in values.items():
        if isinstance(value, bool):
            response.parameters[key].bool_param = value
        elif isinstance(value, int):
            response.parameters[key].int64_param = value
        else:
            response.parameters[key].string_param = value


@dataclass(frozen=True)
class _Plan:
    """What a generation request asks, read before it is routed."""

    generation: GenerateRequest
    output: str  # the name of the text output
    empty_final: bool  # triton_enable_empty_final_response
    revision: int  # 0: any
    version: str  # as each response names it


def _plan(catalog: ModelCatalog, request: oip.ModelInferRequest, inputs: Arrays) -> _Plan:
    """The generation ``request`` asks for; ShoalError when it asks for none shoal can run."""
    params = _parameters(request.parameters)
    prompt: str | None = None
    for name, array in inputs.items():
        if name in _TEXT_INPUTS:
            if prompt is not None:
                raise InvalidArgument("give the prompt once, as input 'text' or 'text_input'")
            texts = _strings(name, array)
            if len(texts) != 1:
                raise InvalidArgument(f"input {name!r}: a generation takes one prompt, got {len(texts)}")
            prompt = texts[0]
        elif name in _NUMBER_INPUTS:
            params[name] = _scalar(name, array, _NUMBER_INPUTS[name])
        elif name == "stop":
            params[name] = _strings(name, array)
        else:
            raise InvalidArgument(
                f"unknown input {name!r}; a generation takes 'text' and optionally "
                f"{', '.join(repr(n) for n in (*_NUMBER_INPUTS, 'stop'))}"
            )
    if prompt is None:
        raise InvalidArgument("missing input 'text' (the prompt, BYTES, one element)")
    output = _output_name(request)
    empty_final = params.get("triton_enable_empty_final_response") is True
    generation = generate_request(params, prompt=prompt, stream=True)
    spec = catalog.spec(request.model_name)
    revision = catalog.revision(spec, request.model_version)
    version = str(revision) if revision else catalog.versions(spec)[-1]
    return _Plan(generation, output, empty_final, revision, version)


async def stream_responses(
    catalog: ModelCatalog,
    request: oip.ModelInferRequest,
    inputs: Arrays,
    timeout_s: float,
    refused: Callable[[ShoalError], None] | None = None,
) -> AsyncGenerator[oip.ModelStreamInferResponse, None]:
    """The responses to one generation request (see the module docstring), given its decoded
    ``inputs`` and the timeout it allows. Raises ShoalError (before or between responses);
    one raised before the request is routed is also told to ``refused``, so that it is
    counted and logged as the other doors' refusals are (the router counts the rest)."""
    try:
        plan = _plan(catalog, request, inputs)
    except ShoalError as err:
        if refused is not None:
            refused(err)
        raise
    output, empty_final, version = plan.output, plan.empty_final, plan.version

    def response(piece: str | None, final: GenerateChunk | None) -> oip.ModelStreamInferResponse:
        reply = oip.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
        if piece is not None:
            reply.outputs.add(name=output, datatype="BYTES", shape=[1])
            reply.raw_output_contents.append(tensors.to_bytes(np.array([piece.encode()], dtype=object)))
        _with(reply, {"triton_final_response": final is not None})
        if final is not None:
            _with(
                reply,
                {
                    "finish_reason": final.finish_reason,
                    "prompt_tokens": final.prompt_tokens,
                    "completion_tokens": final.completion_tokens,
                },
            )
        return oip.ModelStreamInferResponse(infer_response=reply)

    chunks = await start_stream(
        catalog,
        request.model_name,
        plan.generation,
        request_id=internal_id(request.id),
        timeout_s=timeout_s,
        version=plan.revision,
    )
    # One piece is held back, so that the last piece can say it is the last (Triton's
    # triton_final_response) without an extra empty response, unless the client wants one.
    held: str | None = None
    try:
        async for chunk in chunks:
            if chunk.last:
                if empty_final:
                    if held is not None:
                        yield response(held, None)
                    yield response(None, chunk)
                else:
                    yield response((held or "") + chunk.text, chunk)
                return
            if chunk.text:
                if held is not None:
                    yield response(held, None)
                held = chunk.text
    finally:
        await chunks.aclose()

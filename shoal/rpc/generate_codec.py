"""Text generation on the wire: ``GenerateRequest`` and ``GenerateChunk`` to and from protobuf.

Proto3 cannot tell 0 from unset for plain scalars, so the parameters where 0 means
something (``temperature`` 0 is greedy, ``seed`` 0 is a seed) are ``optional`` fields;
``max_tokens`` 0 and an empty ``stop`` mean "the deployment's default".
"""

from __future__ import annotations

from shoal.proto import shoal_pb2 as pb
from shoal.types import ChatMessage, GenerateChunk, GenerateRequest


def request_to_pb(request_id: str, request: GenerateRequest, timeout_s: float) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(
        request_id=request_id,
        prompt=request.prompt,
        messages=[pb.ChatMessage(role=m.role, content=m.content) for m in request.messages],
        max_tokens=request.max_tokens,
        stop=list(request.stop),
        stream=request.stream,
        timeout_s=timeout_s,
    )
    if request.temperature is not None:
        msg.temperature = request.temperature
    if request.top_p is not None:
        msg.top_p = request.top_p
    if request.seed is not None:
        msg.seed = request.seed
    return msg


def request_from_pb(msg: pb.GenerateRequest) -> GenerateRequest:
    return GenerateRequest(
        prompt=msg.prompt,
        messages=tuple(ChatMessage(role=m.role, content=m.content) for m in msg.messages),
        max_tokens=msg.max_tokens,
        temperature=msg.temperature if msg.HasField("temperature") else None,
        top_p=msg.top_p if msg.HasField("top_p") else None,
        stop=tuple(msg.stop),
        seed=msg.seed if msg.HasField("seed") else None,
        stream=msg.stream,
    )


def chunk_to_pb(chunk: GenerateChunk) -> pb.GenerateChunk:
    return pb.GenerateChunk(
        text=chunk.text,
        finish_reason=chunk.finish_reason,
        prompt_tokens=chunk.prompt_tokens,
        completion_tokens=chunk.completion_tokens,
    )


def chunk_from_pb(msg: pb.GenerateChunk) -> GenerateChunk:
    return GenerateChunk(
        text=msg.text,
        finish_reason=msg.finish_reason,
        prompt_tokens=msg.prompt_tokens,
        completion_tokens=msg.completion_tokens,
    )

"""Local hop messages with large tensors written as parts: the protobuf wire form of a
``Task`` or ``TaskOutcome``, with each tensor's bytes handed to the socket as they are.

Building a message with a large tensor copies its bytes twice before the socket sees them:
into the message (``codec.fill``) and again into its serialized form. A py-spy profile of
a 16 MiB echo (c=1) put those two copies at 27 ms of the scheduler's 149 ms a request and
21 ms of the replica's 65 (``SerializeToString`` alone: 20 ms and 13 ms). Here the small
fields are serialized by protobuf and each tensor's bytes follow their field header
unjoined: the transport writes them with ``writelines``. The receiver parses the same
message it would have got from ``SerializeToString``: fields are written in field number
order within each tensor, and a message's fields may come in any order (protobuf's rule),
so the head's fields, then the tensors, parse as one message.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shoal.proto import shoal_pb2 as pb

Buffer = bytes | memoryview

#: Below this many bytes of tensors a message is built and serialized as usual: joining
#: small parts costs less than handing the transport several.
PARTS_FROM = 64 * 1024

_DATA = bytes([4 << 3 | 2])  # Tensor.data: field 4, length-delimited


def varint(n: int) -> bytes:
    """``n`` (not negative) as a protobuf varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Framed:
    """One serialized message as parts, ``size`` bytes in all."""

    parts: tuple[Buffer, ...]
    size: int


def tensor_parts(
    field: int, name: str, datatype: str, shape: Sequence[int], data: Buffer
) -> tuple[bytes, Buffer]:
    """A ``Tensor`` in repeated field ``field`` of the enclosing message: its header
    (field tag, length, name, datatype, shape, the data field's tag and length), then
    ``data`` itself (a ``bytes`` or a byte-format ``memoryview``)."""
    n = len(data)
    inner = pb.Tensor(name=name, datatype=datatype, shape=shape).SerializeToString() + _DATA + varint(n)
    return bytes([field << 3 | 2]) + varint(len(inner) + n) + inner, data


def framed(head: bytes, field: int, tensors: Iterable[tuple[str, str, Sequence[int], Buffer]]) -> Framed:
    """``head`` (a serialized message without its tensors) and ``tensors`` in its repeated
    ``Tensor`` field ``field``, as one message in parts."""
    parts: list[Buffer] = [head]
    size = len(head)
    for name, datatype, shape, data in tensors:
        header, body = tensor_parts(field, name, datatype, shape, data)
        parts += (header, body)
        size += len(header) + len(body)
    return Framed(tuple(parts), size)

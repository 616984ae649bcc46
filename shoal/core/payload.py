"""The wire-neutral tensor: what travels from ingress to replica and back.

A :class:`Tensor` is a name, a protocol datatype, a shape and the raw bytes of the
Open Inference Protocol's wire form (little-endian row-major; ``BYTES``: each element a
4-byte length and its bytes). The scheduler never turns one into numpy: it checks the
header and the byte length (:func:`check`), routes, and hands the bytes on. numpy
appears in the replica, which decodes them for the model, and at the HTTP ingress only
when a JSON body must be decoded or a JSON answer written (:func:`from_array`,
:func:`to_array`).

Why: one gRPC inference used to convert its tensors seven times between bytes and
numpy on its way through the scheduler and back; raw bytes pass each hop as they came.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.core import limits, tensors
from shoal.core.spec import TensorSpec
from shoal.errors import InvalidArgument

#: Bytes per element of each fixed-size datatype (BYTES has none: its elements vary).
ITEMSIZE: Mapping[str, int] = {
    name: dtype.itemsize for name, dtype in tensors.DATATYPES.items() if name != "BYTES"
}


@dataclass(frozen=True, slots=True)
class Tensor:
    """One tensor on the wire. ``data`` is the raw form; nothing here is decoded."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Axis 0's length (1 for a scalar): a batched model's row count."""
        return self.shape[0] if self.shape else 1


Tensors = tuple[Tensor, ...]


def check(t: Tensor, role: str = "input") -> None:
    """InvalidArgument, naming the tensor, unless its header and byte length agree.

    Checked without decoding: a known datatype, non-negative dimensions, and exactly
    ``elements * itemsize`` bytes for fixed-size types. ``BYTES`` needs at least the
    4-byte length prefix of every element; whether the prefixes add up is the replica's
    to find out when it decodes them (it answers InvalidArgument the same way).
    """
    if t.datatype not in tensors.DATATYPES:
        raise InvalidArgument(
            f"{_where(t, role)}unknown datatype {t.datatype[:40]!r}; "
            f"expected one of {', '.join(tensors.DATATYPES)}"
        )
    for d in t.shape:
        if d < 0:
            raise InvalidArgument(f"{_where(t, role)}negative dimension {d} in shape {_fmt_shape(t.shape)}")
    count = math.prod(t.shape)
    size = ITEMSIZE.get(t.datatype)
    if size is None:
        if len(t.data) < 4 * count or (count == 0 and t.data):
            raise InvalidArgument(
                f"{_where(t, role)}BYTES {_fmt_shape(t.shape)} needs a 4-byte length for each of its "
                f"{count} element(s), got {len(t.data)} bytes"
            )
        return
    if len(t.data) != count * size:
        raise InvalidArgument(
            f"{_where(t, role)}expected {count * size} bytes for {t.datatype} {_fmt_shape(t.shape)}, "
            f"got {len(t.data)}"
        )


def _where(t: Tensor, role: str) -> str:
    """How an error names the tensor (built only when there is an error to name it in)."""
    return f"{role} {limits.quoted(t.name)}: " if t.name else f"{role}: "


def check_all(items: Iterable[Tensor], role: str = "input") -> None:
    """:func:`check` each tensor, and InvalidArgument for a missing or repeated name."""
    seen: set[str] = set()
    for i, t in enumerate(items):
        if not t.name:
            raise InvalidArgument(f"{role} #{i} has no name")
        if t.name in seen:
            raise InvalidArgument(f"{role} {limits.quoted(t.name)} is given twice")
        seen.add(t.name)
        check(t, role)


def from_array(name: str, array: Any) -> Tensor:
    """A numpy array (or anything ``np.asarray`` takes) as a wire tensor."""
    arr = np.asarray(array)
    datatype = tensors.datatype_of(arr)
    return Tensor(name, datatype, arr.shape, tensors.to_bytes(arr, datatype))


def from_arrays(arrays: Mapping[str, Any]) -> Tensors:
    return tuple(from_array(name, arr) for name, arr in arrays.items())


def to_array(t: Tensor, role: str = "input") -> np.ndarray[Any, Any]:
    """Decode ``t`` for numpy (no copy for fixed-size types). InvalidArgument when it is malformed."""
    del role  # from_bytes names inputs; outputs decode only where shoal wrote them itself
    return tensors.from_bytes(t.datatype, t.shape, t.data, name=t.name)


def to_arrays(items: Iterable[Tensor]) -> dict[str, np.ndarray[Any, Any]]:
    return {t.name: to_array(t) for t in items}


def element_count(items: Sequence[Tensor]) -> int:
    return sum(t.elements for t in items)


#: What a check of inputs against a model's declared tensors needs of each: name, datatype, shape.
Header = tuple[str, str, tuple[int, ...]]


def headers(items: Iterable[Tensor]) -> list[Header]:
    return [(t.name, t.datatype, t.shape) for t in items]


def _fmt_shape(shape: Iterable[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _shape_fits(declared: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    if len(shape) != len(declared):
        return False
    for d, a in zip(declared, shape):  # noqa: B905 - the lengths are equal
        if d != a and d != -1:
            return False
    return True


def check_declared(declared: Sequence[TensorSpec], given: Iterable[Header], model: str = "") -> None:
    """The one check of a request's inputs against a model's declared inputs, shared by the
    scheduler (from tensor headers, nothing decoded) and the replica's backends (from arrays).

    Raises InvalidArgument naming the input: an unknown name, a missing input that is not
    ``optional``, another datatype, another rank or size (``-1`` in a declared shape matches
    any size). Nothing is checked when ``declared`` is empty (the model's inputs are not known).
    """
    if not declared:
        return
    if _in_order(declared, given):
        return
    by_name = {t.name: t for t in declared}
    of_model = f" of model {model!r}" if model else ""
    seen: set[str] = set()
    for name, datatype, shape in given:
        spec = by_name.get(name)
        if spec is None:
            takes = ", ".join(repr(n) for n in by_name)
            who = f"model {model!r}" if model else "the model"
            raise InvalidArgument(f"unknown input {limits.quoted(name)}; {who} takes {takes}")
        if datatype != spec.datatype:
            raise InvalidArgument(
                f"input {limits.quoted(name)}: expected datatype {spec.datatype}, got {datatype}"
            )
        if not _shape_fits(spec.shape, shape):
            raise InvalidArgument(
                f"input {limits.quoted(name)}: expected shape {_fmt_shape(spec.shape)}, "
                f"got {_fmt_shape(shape)}"
            )
        seen.add(name)
    for name, spec in by_name.items():
        if name not in seen and not spec.optional:
            raise InvalidArgument(f"missing input {limits.quoted(name)}{of_model}")


def _in_order(declared: Sequence[TensorSpec], given: Iterable[Header]) -> bool:
    """Whether ``given`` is every declared input, in the declared order, each of its
    datatype and shape: what almost every request sends, so :func:`check_declared`
    answers it without building a lookup (False: the full check decides, and names
    what is wrong)."""
    if not isinstance(given, Sequence) or len(given) != len(declared):
        return False
    for spec, (name, datatype, shape) in zip(declared, given):  # noqa: B905 - same length
        if name != spec.name or datatype != spec.datatype or not _shape_fits(spec.shape, shape):
            return False
    return True

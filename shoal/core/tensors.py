"""Tensors on the Open Inference Protocol (KServe V2 / Triton) wire, as numpy arrays.

Pure functions, no I/O, no protobuf: the gRPC and HTTP adapters hand this module the
pieces of a request (a datatype string, a shape, raw bytes or JSON data) and get numpy
arrays back, and the reverse for responses. Everything here is safe to call
concurrently.

Wire forms:

* **raw bytes** (gRPC ``raw_input_contents`` / ``raw_output_contents`` and Triton's HTTP
  binary data extension): fixed-size types are the little-endian, row-major buffer;
  ``BYTES`` is each element as a 4-byte little-endian length followed by its bytes.
* **JSON** (the HTTP ``data`` field): a flat or nested list in row-major order. ``BOOL``
  elements are ``true``/``false``, integers are JSON integers, floats JSON numbers,
  ``BYTES`` elements strings.
* **binary HTTP bodies** (Triton's binary tensor data extension): a JSON header of
  ``Inference-Header-Content-Length`` bytes followed by the tensors' bytes, back to back,
  in the order of the inputs (or outputs) that carry ``parameters.binary_data_size``.

Every error is :class:`shoal.errors.InvalidArgument` with a message naming the tensor
and the problem. The decoders (:func:`from_bytes`, :func:`from_json`,
:func:`split_binary_body`, :func:`binary_input_slices`) raise nothing else, whatever
they are given.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import reprlib
import struct
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import ml_dtypes
import numpy as np

from shoal.errors import InvalidArgument

__all__ = [
    "DATATYPES",
    "binary_input_slices",
    "build_binary_response",
    "datatype_of",
    "datatype_of_dtype",
    "from_bytes",
    "from_json",
    "split_binary_body",
    "to_bytes",
    "to_json",
]

DATATYPES: Mapping[str, np.dtype[Any]] = MappingProxyType(
    {
        "BOOL": np.dtype("|b1"),
        "UINT8": np.dtype("|u1"),
        "UINT16": np.dtype("<u2"),
        "UINT32": np.dtype("<u4"),
        "UINT64": np.dtype("<u8"),
        "INT8": np.dtype("|i1"),
        "INT16": np.dtype("<i2"),
        "INT32": np.dtype("<i4"),
        "INT64": np.dtype("<i8"),
        "FP16": np.dtype("<f2"),
        "FP32": np.dtype("<f4"),
        "FP64": np.dtype("<f8"),
        "BF16": np.dtype(ml_dtypes.bfloat16),
        "BYTES": np.dtype(object),
    }
)
"""The protocol's datatypes and the numpy dtype each decodes to (``BYTES``: object
arrays whose elements are ``bytes``; ``BF16``: ``ml_dtypes.bfloat16``)."""

# The datatypes whose bytes decode as they are (from_bytes's quick way).
_FIXED = {name: dt for name, dt in DATATYPES.items() if name not in ("BOOL", "BYTES")}
# numpy's limit on the number of dimensions of an array.
_MAX_NDIM = 64
# Dimensions travel as int64 on the wire.
_MAX_DIM = 2**63 - 1
# A BYTES element's length prefix is a uint32.
_MAX_ELEMENT = 2**32 - 1
_LEN = struct.Struct("<I")
_INT_RANGES = {
    name: (int(np.iinfo(dt).min), int(np.iinfo(dt).max)) for name, dt in DATATYPES.items() if dt.kind in "iu"
}
_FLOATS = frozenset({"FP16", "FP32", "FP64", "BF16"})


class _BoundedRepr(reprlib.Repr):
    """reprlib's bounded repr, also safe for integers too long for ``str()`` to print."""

    def repr_int(self, x: int, level: int) -> str:
        if abs(x) >= 10**30:
            return f"<integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_REPR = _BoundedRepr()
_REPR.maxstring = _REPR.maxother = 40


def _short(x: object) -> str:
    """A short repr of a client's value for an error message, whatever the value."""
    # Fast path: from_bytes builds its message prefix on every call (py-spy: reprlib was
    # ~3% of the scheduler's loop under load), and names and dims are short.
    if type(x) is str and len(x) <= 40:
        return repr(x)
    if type(x) is int and -(10**15) < x < 10**15:
        return str(x)
    try:
        return _REPR.repr(x)
    except Exception:  # a hostile __repr__; the message must still be built
        return f"<{type(x).__name__}>"


def _where(role: str, name: str | None) -> str:
    return f"{role} {_short(name)}: " if name else ""


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(_short(d) for d in shape) + "]"


def _check_datatype(datatype: object, where: str) -> str:
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise InvalidArgument(
            f"{where}unknown datatype {_short(datatype)}; expected one of {', '.join(DATATYPES)}"
        )
    return datatype


def _check_shape(shape: object, where: str) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints, or InvalidArgument."""
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise InvalidArgument(f"{where}shape must be a list of integers, got {_short(shape)}")
    dims: list[int] = []
    for d in shape:
        if isinstance(d, bool):
            raise InvalidArgument(f"{where}shape must be a list of integers, got {_short(d)} in it")
        try:
            dim = operator.index(d)
        except TypeError:
            raise InvalidArgument(f"{where}shape must be a list of integers, got {_short(d)} in it") from None
        dims.append(dim)
        if len(dims) > _MAX_NDIM:
            raise InvalidArgument(f"{where}shape has more than {_MAX_NDIM} dimensions")
    for dim in dims:
        if dim < 0:
            raise InvalidArgument(f"{where}negative dimension {_short(dim)} in shape {_fmt_shape(dims)}")
        if dim > _MAX_DIM:
            raise InvalidArgument(
                f"{where}dimension {_short(dim)} in shape {_fmt_shape(dims)} does not fit in int64"
            )
    return tuple(dims)


def check_shape(shape: object, where: str = "") -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints that fit int64, or InvalidArgument."""
    return _check_shape(shape, where)


def _byte_view(data: object, where: str) -> memoryview:
    """``data`` as a flat view of unsigned bytes, or InvalidArgument if it is no buffer."""
    try:
        view = memoryview(data)  # type: ignore[arg-type]  # checked at runtime, right here
    except TypeError:
        raise InvalidArgument(f"{where}expected bytes, got {type(data).__name__}") from None
    if view.ndim == 1 and view.format == "B":
        return view
    return view.cast("B") if view.c_contiguous else memoryview(view.tobytes())


def _reshape(arr: np.ndarray[Any, Any], shape: tuple[int, ...], where: str) -> np.ndarray[Any, Any]:
    try:
        return arr.reshape(shape)
    except ValueError as e:  # e.g. [0, 2**62]: no elements, but too big for numpy's index type
        raise InvalidArgument(f"{where}shape {_fmt_shape(shape)} is too large: {e}") from None


# dtype -> its datatype, as datatype_of found it: a replica asks for every tensor of every
# request, and the comparisons below cost 2 to 4 µs a time (a dict lookup: 0.1). Bounded:
# string dtypes differ by their length.
_DATATYPE_OF: dict[np.dtype[Any], str] = {}
_DATATYPE_OF_MAX = 64


def datatype_of(arr: np.ndarray[Any, Any]) -> str:
    """The protocol datatype of ``arr``'s dtype.

    Object, ``bytes`` (``S``) and ``str`` (``U``) arrays are ``BYTES``; byte order does not
    matter (:func:`to_bytes` writes little-endian). Raises InvalidArgument for dtypes the
    protocol cannot carry (complex, datetime, structured, ...).
    """
    return datatype_of_dtype(arr.dtype)


def datatype_of_dtype(dt: np.dtype[Any]) -> str:
    """:func:`datatype_of` for a dtype."""
    found = _DATATYPE_OF.get(dt)
    if found is None:
        found = _find_datatype(dt)
        if len(_DATATYPE_OF) < _DATATYPE_OF_MAX:
            _DATATYPE_OF[dt] = found
    return found


def _find_datatype(dt: np.dtype[Any]) -> str:
    if dt.kind in "OSU":
        return "BYTES"
    if dt == DATATYPES["BF16"]:
        return "BF16"
    if dt.kind in "biuf":
        native = dt.newbyteorder("<")
        for name, candidate in DATATYPES.items():
            if candidate == native:
                return name
    raise InvalidArgument(f"numpy dtype {dt} has no Open Inference Protocol datatype")


def _element_bytes(item: object, index: int) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    raise InvalidArgument(f"BYTES element {index} is {type(item).__name__}, not bytes or str")


def to_bytes(arr: np.ndarray[Any, Any], datatype: str | None = None) -> bytes:
    """The raw wire form of ``arr`` (row-major, whatever its memory layout).

    Fixed-size types: the little-endian buffer. ``BYTES``: each element as a 4-byte
    little-endian length and its bytes; ``str`` elements are UTF-8 encoded, ``bytes``
    taken as they are (numpy drops trailing NULs of ``S`` arrays, as tritonclient does).
    Raises InvalidArgument for unsupported dtypes, BYTES elements that are neither
    ``bytes`` nor ``str``, or an element over 4 GiB. ``datatype``: ``datatype_of(arr)``,
    when the caller has it already.
    """
    if datatype is None:
        datatype = datatype_of(arr)
    if datatype != "BYTES":
        return np.asarray(arr, dtype=DATATYPES[datatype]).tobytes(order="C")
    parts: list[bytes] = []
    for i, item in enumerate(arr.flat):
        b = _element_bytes(item, i)
        if len(b) > _MAX_ELEMENT:
            raise InvalidArgument(f"BYTES element {i} is {len(b)} bytes, over the 4 GiB limit")
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def from_bytes(
    datatype: str,
    shape: Sequence[int],
    data: bytes | bytearray | memoryview,
    *,
    name: str | None = None,
) -> np.ndarray[Any, Any]:
    """Decode the raw wire form of a tensor; the inverse of :func:`to_bytes`.

    Fixed-size types are decoded without a copy (``np.frombuffer``), so the array may be
    read-only and keeps ``data`` alive. ``BYTES`` gives an object array of ``bytes``.
    Raises InvalidArgument, naming ``name`` if given, when the datatype is unknown, the
    shape has a negative dimension, the byte count does not match the shape exactly
    (``BYTES``: fewer elements than the shape needs, a length prefix running past the
    end, or bytes left over), or a ``BOOL`` byte is neither 0 nor 1.
    """
    # What a replica decodes for every request: a fixed-size datatype, a tuple shape of
    # ints and bytes of the right length, checked here without building the error
    # messages' prefix (3 to 4 us a tensor); anything else, or any doubt, takes the checks
    # below, which say what is wrong.
    dtype = _FIXED.get(datatype) if type(datatype) is str else None
    if dtype is not None and type(data) is bytes and type(shape) is tuple and len(shape) <= _MAX_NDIM:
        count = 1
        for d in shape:
            if type(d) is not int or d < 0 or d > _MAX_DIM:
                break
            count *= d
        else:
            if len(data) == count * dtype.itemsize:
                try:
                    return np.frombuffer(data, dtype=dtype).reshape(shape)
                except ValueError:
                    pass
    where = _where("input", name)
    datatype = _check_datatype(datatype, where)
    dims = _check_shape(shape, where)
    view = _byte_view(data, where)
    count = math.prod(dims)
    if datatype == "BYTES":
        return _reshape(_decode_bytes(view, count, dims, where), dims, where)
    dtype = DATATYPES[datatype]
    expected = count * dtype.itemsize
    if len(view) != expected:
        raise InvalidArgument(
            f"{where}expected {expected} bytes for {datatype} {_fmt_shape(dims)}, got {len(view)}"
        )
    if datatype == "BOOL":
        raw = np.frombuffer(view, dtype=np.uint8)
        if raw.size and int(raw.max()) > 1:
            raise InvalidArgument(f"{where}BOOL data holds a byte other than 0 or 1")
    return _reshape(np.frombuffer(view, dtype=dtype), dims, where)


def _decode_bytes(view: memoryview, count: int, dims: tuple[int, ...], where: str) -> np.ndarray[Any, Any]:
    what = f"BYTES {_fmt_shape(dims)}"
    if count * _LEN.size > len(view):  # cheap bound before allocating `count` slots
        raise InvalidArgument(
            f"{where}{what} needs {count} elements of at least 4 bytes each, got {len(view)} bytes"
        )
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + _LEN.size > len(view):
            raise InvalidArgument(f"{where}{what} needs {count} elements, the data holds {i}")
        (length,) = _LEN.unpack_from(view, offset)
        offset += _LEN.size
        if offset + length > len(view):
            raise InvalidArgument(
                f"{where}{what} element {i} declares {length} bytes, only {len(view) - offset} remain"
            )
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(view):
        raise InvalidArgument(
            f"{where}{what}: {len(view) - offset} bytes left over after its {count} elements"
        )
    return out


def _flatten(data: object, dims: tuple[int, ...], where: str) -> list[Any]:
    """Row-major flattening of a list nested at most as deep as ``dims`` (or flat)."""
    if not isinstance(data, list):
        if not dims:  # a scalar tensor may come bare, as numpy's 0-d ``tolist()`` gives it
            return [data]
        raise InvalidArgument(f"{where}data must be a list, got {type(data).__name__}")
    flat: list[Any] = data
    for _ in range(len(dims) - 1):
        types = set(map(type, flat))
        if list not in types:
            return flat
        if types == {list}:
            flat = list(itertools.chain.from_iterable(flat))
        else:
            flat = [y for x in flat for y in (x if type(x) is list else (x,))]
    if list in set(map(type, flat)):
        raise InvalidArgument(f"{where}data is nested deeper than shape {_fmt_shape(dims)} allows")
    return flat


def _first_bad(flat: list[Any], ok: tuple[type, ...]) -> tuple[int, Any]:
    """The first element whose exact type is not in ``ok`` (``bool`` is no ``int`` here)."""
    for i, x in enumerate(flat):
        if type(x) not in ok:
            return i, x
    raise AssertionError("unreachable: the caller saw a type outside ok")


def from_json(
    datatype: str,
    shape: Sequence[int],
    data: object,
    *,
    name: str | None = None,
) -> np.ndarray[Any, Any]:
    """Decode the JSON form of a tensor (the REST ``data`` field, already JSON-decoded).

    ``data`` is a flat or nested list in row-major order, nested no deeper than the
    shape's rank (a scalar, shape ``[]``, may also be the bare value). Only the element
    count has to match the shape. ``BOOL`` takes
    ``true``/``false``; integer types take JSON integers within the type's range; float
    types take numbers (``NaN``/``Infinity`` included) but not finite values that would
    overflow the type; ``BYTES`` takes strings (UTF-8 encoded into ``bytes``). Raises
    InvalidArgument naming ``name`` and the first offending element otherwise.
    """
    where = _where("input", name)
    datatype = _check_datatype(datatype, where)
    dims = _check_shape(shape, where)
    flat = _flatten(data, dims, where)
    count = math.prod(dims)
    if len(flat) != count:
        raise InvalidArgument(f"{where}shape {_fmt_shape(dims)} needs {count} elements, data has {len(flat)}")
    types = set(map(type, flat))
    if datatype == "BYTES":
        if not types <= {str, bytes}:
            i, x = _first_bad(flat, (str, bytes))
            raise InvalidArgument(f"{where}BYTES element {i} is {_short(x)}, not a string")
        out = np.empty(count, dtype=object)
        try:
            out[:] = [x.encode("utf-8") if type(x) is str else x for x in flat]
        except UnicodeEncodeError:
            raise InvalidArgument(f"{where}BYTES data holds a string that is not valid Unicode") from None
        return _reshape(out, dims, where)
    dtype = DATATYPES[datatype]
    if datatype == "BOOL":
        if not types <= {bool}:
            i, x = _first_bad(flat, (bool,))
            raise InvalidArgument(f"{where}BOOL element {i} is {_short(x)}, not true or false")
        return _reshape(np.array(flat, dtype=dtype), dims, where)
    if datatype in _FLOATS:
        return _reshape(_json_floats(flat, types, datatype, where), dims, where)
    if not types <= {int}:
        i, x = _first_bad(flat, (int,))
        raise InvalidArgument(f"{where}{datatype} element {i} is {_short(x)}, not an integer")
    try:
        arr = np.array(flat, dtype=dtype)
    except OverflowError:
        lo, hi = _INT_RANGES[datatype]
        i = next((i for i, x in enumerate(flat) if not lo <= x <= hi), -1)
        raise InvalidArgument(
            f"{where}{datatype} element {i} is {_short(flat[i])}, outside [{lo}, {hi}]"
        ) from None
    return _reshape(arr, dims, where)


def from_values(
    datatype: str, shape: Sequence[int], values: np.ndarray[Any, Any], *, name: str | None = None
) -> np.ndarray[Any, Any]:
    """A tensor from a flat numpy array of its values as a typed protocol field holds them
    (gRPC's ``contents``: int64 for the signed integer types, uint64 for the unsigned, bool),
    checked as :func:`from_json` checks: the count against the shape, integers within the
    type's range. Raises InvalidArgument naming ``name`` and the first offending element."""
    where = _where("input", name)
    datatype = _check_datatype(datatype, where)
    dims = _check_shape(shape, where)
    count = math.prod(dims)
    if values.size != count:
        raise InvalidArgument(
            f"{where}shape {_fmt_shape(dims)} needs {count} elements, data has {values.size}"
        )
    if datatype in _INT_RANGES:
        lo, hi = _INT_RANGES[datatype]
        bad = np.flatnonzero((values < lo) | (values > hi))
        if bad.size:
            i = int(bad[0])
            raise InvalidArgument(f"{where}{datatype} element {i} is {values[i]}, outside [{lo}, {hi}]")
    return _reshape(values.astype(DATATYPES[datatype], copy=False), dims, where)


_FLOAT_MAX = {
    "FP16": float(np.finfo(np.float16).max),
    "FP32": float(np.finfo(np.float32).max),
    "BF16": float(ml_dtypes.finfo(ml_dtypes.bfloat16).max),  # type: ignore[no-untyped-call]
}


def _fits_float(x: float) -> bool:
    try:
        float(x)
    except OverflowError:
        return False
    return True


def _json_floats(flat: list[Any], types: set[type], datatype: str, where: str) -> np.ndarray[Any, Any]:
    if not types <= {int, float}:
        i, x = _first_bad(flat, (int, float))
        raise InvalidArgument(f"{where}{datatype} element {i} is {_short(x)}, not a number")
    try:
        wide = np.array(flat, dtype=np.float64)
    except OverflowError:  # an integer beyond float64
        i = next((i for i, x in enumerate(flat) if not _fits_float(x)), -1)
        raise InvalidArgument(
            f"{where}{datatype} element {i} is {_short(flat[i])}, too large for {datatype}"
        ) from None
    if datatype == "FP64":
        return wide
    # Every element within the type's range (NaN compares false and takes the careful path):
    # cast at once. The careful path cost most of a small REST request's decoding.
    peak = float(np.abs(wide).max()) if wide.size else 0.0
    if peak <= _FLOAT_MAX[datatype]:
        return wide.astype(DATATYPES[datatype])
    # Casting warns on overflow (and on signalling NaNs); detect overflow instead, so callers
    # that turn warnings into errors stay quiet.
    with np.errstate(over="ignore", invalid="ignore"):
        arr = wide.astype(DATATYPES[datatype])
        overflow = np.isinf(arr.astype(np.float64)) & np.isfinite(wide)
    if overflow.any():
        i = int(np.argmax(overflow))
        raise InvalidArgument(f"{where}{datatype} element {i} is {_short(flat[i])}, too large for {datatype}")
    return arr


def to_json(arr: np.ndarray[Any, Any], *, name: str | None = None) -> list[Any]:
    """The flat, row-major JSON ``data`` list for ``arr``.

    Numbers become Python ``int``/``float`` (non-finite floats stay ``nan``/``inf``; the
    JSON encoder decides how to write them), ``BOOL`` becomes ``bool``. ``BYTES`` elements
    become ``str``, as Triton returns them: ``bytes`` are decoded as UTF-8 and an element
    that is not valid UTF-8 raises InvalidArgument naming output ``name`` (such outputs
    must be requested as binary data). No base64: a client could not tell it from text.
    """
    datatype = datatype_of(arr)
    if datatype == "BF16":
        with np.errstate(invalid="ignore"):  # signalling NaNs warn when widened; they stay NaN
            return list(arr.astype(np.float32).ravel().tolist())
    if datatype != "BYTES":
        return list(arr.ravel().tolist())
    out: list[Any] = []
    for i, item in enumerate(arr.flat):
        if isinstance(item, str):
            out.append(str(item))
            continue
        b = _element_bytes(item, i)
        try:
            out.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"{_where('output', name)}BYTES element {i} is not valid UTF-8; "
                "request this output as binary data"
            ) from None
    return out


def split_binary_body(
    body: bytes | bytearray | memoryview, header_length: int | str | None
) -> tuple[dict[str, Any], memoryview]:
    """Split an HTTP inference body into its JSON header and the binary tail after it.

    ``header_length`` is the ``Inference-Header-Content-Length`` header (an int, or the
    header's text); ``None`` means the whole body is JSON and the tail is empty. The tail
    is a zero-copy ``memoryview`` of ``body``. Raises InvalidArgument when the length is
    not a non-negative integer within the body (its text: decimal digits only, as
    Content-Length's), or the header is not a JSON object.
    """
    view = _byte_view(body, "request body: ")
    if header_length is None:
        length = len(view)
    else:
        try:
            length = header_length if isinstance(header_length, int) else int(header_length, 10)
        except (TypeError, ValueError):
            raise InvalidArgument(
                f"Inference-Header-Content-Length must be an integer, got {_short(header_length)}"
            ) from None
        if isinstance(header_length, str) and not (header_length.isascii() and header_length.isdigit()):
            # int() also takes '+7', ' 7', '-7' and '1_0' (as 10); the header, as
            # Content-Length, is decimal digits (before, '1_01' was read as 101)
            raise InvalidArgument(
                f"Inference-Header-Content-Length must be decimal digits, got {_short(header_length)}"
            )
        if isinstance(length, bool) or not 0 <= length <= len(view):
            raise InvalidArgument(
                f"Inference-Header-Content-Length is {_short(header_length)}, "
                f"but the body has {len(view)} bytes"
            )
    try:
        header = json.loads(bytes(view[:length]))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise InvalidArgument(f"request body is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise InvalidArgument(f"request JSON must be an object, got {type(header).__name__}")
    return header, view[length:]


def binary_input_slices(inputs: object, tail: bytes | bytearray | memoryview) -> list[memoryview | None]:
    """Per-input views into the binary tail, in the order of ``inputs``.

    ``inputs`` is the request's JSON ``inputs`` list. An input whose
    ``parameters.binary_data_size`` is set gets the next that many bytes of ``tail``
    (zero-copy); one without gets ``None`` (its data is in JSON). Raises InvalidArgument
    when ``inputs`` is not a list of objects, a size is not a non-negative integer, the
    sizes run past the tail, or bytes are left over.
    """
    if not isinstance(inputs, list):
        raise InvalidArgument(f"'inputs' must be a list, got {type(inputs).__name__}")
    view = _byte_view(tail, "binary data: ")
    out: list[memoryview | None] = []
    offset = 0
    for i, entry in enumerate(inputs):
        if not isinstance(entry, dict):
            raise InvalidArgument(f"inputs[{i}] must be an object, got {type(entry).__name__}")
        label = entry.get("name")
        where = _where("input", label if isinstance(label, str) else f"#{i}")
        params = entry.get("parameters")
        if params is None:
            out.append(None)
            continue
        if not isinstance(params, dict):
            raise InvalidArgument(f"{where}'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is None:
            out.append(None)
            continue
        if type(size) is not int or size < 0:
            raise InvalidArgument(
                f"{where}binary_data_size must be a non-negative integer, got {_short(size)}"
            )
        if offset + size > len(view):
            raise InvalidArgument(
                f"{where}binary_data_size {_short(size)} runs past the binary data "
                f"({len(view) - offset} of {len(view)} bytes left)"
            )
        out.append(view[offset : offset + size])
        offset += size
    if offset != len(view):
        raise InvalidArgument(
            f"the body has {len(view) - offset} bytes of binary data beyond what the inputs declare"
        )
    return out


def build_binary_response(
    header: Mapping[str, Any], blobs: Sequence[bytes | bytearray | memoryview]
) -> tuple[bytes, int]:
    """The HTTP response body for ``header`` followed by ``blobs``, and the header's length.

    The caller sets ``parameters.binary_data_size`` on each output whose data is in a
    blob, in blob order (the function checks that they agree). The length goes into the
    ``Inference-Header-Content-Length`` response header; when ``blobs`` is empty the body
    is plain JSON and that header may be left out. Raises InvalidArgument if ``header``
    is not JSON-serializable or disagrees with ``blobs``.
    """
    declared: list[Any] = []
    outputs = header.get("outputs", [])
    for out in outputs if isinstance(outputs, list) else []:
        params = out.get("parameters") if isinstance(out, dict) else None
        if isinstance(params, dict) and "binary_data_size" in params:
            declared.append(params["binary_data_size"])
    sizes = [memoryview(b).nbytes for b in blobs]
    if declared != sizes:
        raise InvalidArgument(
            f"outputs declare binary_data_size {_short(declared)}, the blobs are {sizes} bytes"
        )
    try:
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"response header is not JSON-serializable: {e}") from None
    return b"".join([text, *blobs]), len(text)

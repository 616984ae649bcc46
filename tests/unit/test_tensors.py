"""The tensor codec: what a client sends must come out as the array it meant, and junk must be
refused with InvalidArgument naming the problem -- never another exception.

tritonclient (the reference client) is used as the oracle for the wire formats.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as triton_http
import tritonclient.utils as triton_utils
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from shoal.core.tensors import (
    DATATYPES,
    binary_input_slices,
    build_binary_response,
    datatype_of,
    from_bytes,
    from_json,
    split_binary_body,
    to_bytes,
    to_json,
)
from shoal.errors import InvalidArgument

FIXED = [d for d in DATATYPES if d != "BYTES"]
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Values that stress each type: extremes, zero, signed zero, non-finite floats.
SAMPLES: dict[str, list[Any]] = {
    "BOOL": [True, False, True, True, False, False],
    "UINT8": [0, 1, 127, 128, 254, 255],
    "UINT16": [0, 1, 255, 256, 65534, 65535],
    "UINT32": [0, 1, 2**16, 2**31, 2**32 - 2, 2**32 - 1],
    "UINT64": [0, 1, 2**32, 2**63, 2**64 - 2, 2**64 - 1],
    "INT8": [-128, -1, 0, 1, 126, 127],
    "INT16": [-(2**15), -1, 0, 1, 2**15 - 2, 2**15 - 1],
    "INT32": [-(2**31), -1, 0, 1, 2**31 - 2, 2**31 - 1],
    "INT64": [-(2**63), -1, 0, 1, 2**63 - 2, 2**63 - 1],
    "FP16": [-65504.0, -0.0, 1.5, 6e-8, math.inf, math.nan],
    "FP32": [-3.4e38, -0.0, 1.5, 1e-45, -math.inf, math.nan],
    "FP64": [-1.7e308, -0.0, 1.5, 5e-324, math.inf, math.nan],
    "BF16": [-3.0e38, -0.0, 1.5, 2.0**-133, math.inf, math.nan],
}


def sample(datatype: str) -> np.ndarray[Any, Any]:
    return np.array(SAMPLES[datatype], dtype=DATATYPES[datatype]).reshape(2, 3)


def assert_same(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> None:
    """Same dtype, shape and bits (so NaN equals NaN and -0.0 differs from 0.0)."""
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    if got.dtype == object:
        assert got.tolist() == want.tolist()
    else:
        assert got.tobytes() == want.tobytes()


def assert_same_values(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> None:
    """Same dtype, shape and values, for JSON, which keeps signed zeros but not NaN payloads."""
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    if got.dtype.kind in "biu":
        assert got.tolist() == want.tolist()
        return
    with np.errstate(invalid="ignore"):  # widening a signalling NaN warns
        g, w = got.astype(np.float64), want.astype(np.float64)
    np.testing.assert_array_equal(g, w)
    assert (np.signbit(g) == np.signbit(w))[~np.isnan(w)].all()


def bytes_tensor(items: list[Any], shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr.reshape(shape)


# --------------------------------------------------------------------------- raw bytes


@pytest.mark.parametrize("datatype", FIXED)
def test_fixed_types_round_trip_through_bytes(datatype: str) -> None:
    arr = sample(datatype)
    assert datatype_of(arr) == datatype
    raw = to_bytes(arr)
    assert len(raw) == 6 * DATATYPES[datatype].itemsize
    assert_same(from_bytes(datatype, [2, 3], raw), arr)


def test_datatypes_are_the_protocols_with_little_endian_dtypes() -> None:
    assert list(DATATYPES) == [
        "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
        "FP16", "FP32", "FP64", "BF16", "BYTES",
    ]  # fmt: skip
    assert DATATYPES["BF16"] == np.dtype(ml_dtypes.bfloat16)
    assert DATATYPES["BYTES"] == np.dtype(object)
    assert all(dt.byteorder in "<|=" for dt in DATATYPES.values())


def test_to_bytes_writes_little_endian_row_major() -> None:
    assert to_bytes(np.array([1, 2], dtype=">i4")) == b"\x01\0\0\0\x02\0\0\0"
    assert to_bytes(np.array([1.0], dtype=np.float32)) == struct.pack("<f", 1.0)
    transposed = np.arange(6, dtype=np.int16).reshape(2, 3).T
    assert to_bytes(transposed) == struct.pack("<6h", 0, 3, 1, 4, 2, 5)


def test_from_bytes_does_not_copy() -> None:
    buf = bytearray(struct.pack("<2f", 1.0, 2.0))
    arr = from_bytes("FP32", [2], buf)
    buf[0:4] = struct.pack("<f", 9.0)
    assert arr.tolist() == [9.0, 2.0]


def test_from_bytes_accepts_a_memoryview_slice() -> None:
    body = b"junk" + struct.pack("<3H", 7, 8, 9)
    assert from_bytes("UINT16", [3, 1], memoryview(body)[4:]).tolist() == [[7], [8], [9]]


def test_empty_tensors() -> None:
    assert from_bytes("FP32", [0, 3], b"").shape == (0, 3)
    assert from_bytes("BYTES", [2, 0], b"").shape == (2, 0)
    assert to_bytes(np.zeros((0, 3), dtype=np.float32)) == b""
    assert from_bytes("INT8", [], b"\x05").tolist() == 5  # a scalar: shape [] holds one element


def test_bytes_elements_are_length_prefixed() -> None:
    arr = bytes_tensor([b"ab", "", "é"], (3,))
    assert to_bytes(arr) == b"\x02\0\0\0ab" + b"\0\0\0\0" + b"\x02\0\0\0\xc3\xa9"


def test_bytes_round_trip_with_empty_binary_and_non_ascii_elements() -> None:
    items: list[Any] = [b"", "héllo wörld", b"\x00\xff\x00", "日本語", "", b"plain"]
    got = from_bytes("BYTES", [2, 3], to_bytes(bytes_tensor(items, (2, 3))))
    assert got.shape == (2, 3)
    assert got.dtype == object
    want = [x.encode() if isinstance(x, str) else x for x in items]
    assert got.ravel().tolist() == want
    assert all(type(x) is bytes for x in got.ravel())


def test_numpy_string_arrays_are_bytes() -> None:
    words = np.array(["a", "ünï"])
    assert datatype_of(words) == "BYTES"
    assert to_bytes(words) == to_bytes(bytes_tensor(["a", "ünï"], (2,)))
    assert datatype_of(np.array([b"x"])) == "BYTES"


@pytest.mark.parametrize(
    "dtype", [np.complex64, np.dtype("datetime64[s]"), np.float128, ml_dtypes.float8_e4m3fn]
)
def test_unsupported_dtypes_are_refused(dtype: Any) -> None:
    with pytest.raises(InvalidArgument, match="no Open Inference Protocol datatype"):
        datatype_of(np.zeros(2, dtype=dtype))
    with pytest.raises(InvalidArgument):
        to_bytes(np.zeros(2, dtype=dtype))


def test_bytes_elements_must_be_bytes_or_str() -> None:
    with pytest.raises(InvalidArgument, match="element 1 is int"):
        to_bytes(bytes_tensor([b"a", 3], (2,)))


def test_wrong_length_buffer_names_input_and_sizes() -> None:
    with pytest.raises(InvalidArgument) as err:
        from_bytes("FP32", [1, 16], b"\0" * 60, name="x")
    assert str(err.value) == "input 'x': expected 64 bytes for FP32 [1,16], got 60"
    with pytest.raises(InvalidArgument, match="expected 8 bytes for INT64 \\[1\\], got 9"):
        from_bytes("INT64", [1], b"\0" * 9)


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "message"),
    [
        ("FP33", [1], b"\0" * 4, "input 'x': unknown datatype 'FP33'"),
        ("fp32", [1], b"\0" * 4, "unknown datatype 'fp32'"),
        ("FP32", [2, -1], b"\0" * 4, "negative dimension -1 in shape \\[2,-1\\]"),
        ("FP32", [1.5], b"\0" * 4, "shape must be a list of integers"),
        ("FP32", [True], b"\0" * 4, "shape must be a list of integers"),
        ("FP32", [2**64], b"", "does not fit in int64"),
        ("FP32", [10**5000], b"", "dimension <integer of 16610 bits> in shape"),  # too long for str()
        ("FP32", [1] * 65, b"\0" * 4, "more than 64 dimensions"),
        ("BOOL", [2], b"\x01\x02", "BOOL data holds a byte other than 0 or 1"),
        ("BYTES", [2], b"\x01\0\0\0a", "BYTES \\[2\\] needs 2 elements of at least 4 bytes"),
        ("BYTES", [2], b"\x01\0\0\0a\0\0\0", "BYTES \\[2\\] needs 2 elements, the data holds 1"),
        ("BYTES", [1], b"\x09\0\0\0abc", "element 0 declares 9 bytes, only 3 remain"),
        ("BYTES", [1], b"\x01\0\0\0ab", "1 bytes left over after its 1 elements"),
        ("FP32", [1], "abcd", "expected bytes, got str"),
    ],
)
def test_bad_raw_tensors_are_refused(datatype: str, shape: list[Any], data: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        from_bytes(datatype, shape, data, name="x")


# --------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("datatype", FIXED)
def test_fixed_types_round_trip_through_json(datatype: str) -> None:
    arr = sample(datatype)
    data = to_json(arr)
    json.dumps(data)  # plain Python values a JSON encoder takes
    assert len(data) == 6
    assert_same_values(from_json(datatype, [2, 3], data), arr)


def test_json_bytes_are_strings() -> None:
    arr = bytes_tensor([b"caf\xc3\xa9", "", "x"], (3,))
    assert to_json(arr) == ["café", "", "x"]
    assert from_json("BYTES", [3], ["café", "", "x"]).tolist() == [b"caf\xc3\xa9", b"", b"x"]


def test_json_bytes_that_are_not_utf8_must_go_binary() -> None:
    with pytest.raises(InvalidArgument, match="output 'y': BYTES element 1 is not valid UTF-8"):
        to_json(bytes_tensor([b"ok", b"\xff\xfe"], (2,)), name="y")


def test_json_data_may_be_nested_row_major() -> None:
    got = from_json("INT32", [2, 3], [[1, 2, 3], [4, 5, 6]])
    assert got.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert from_json("INT32", [2, 3], [1, 2, 3, 4, 5, 6]).tolist() == got.tolist()
    assert to_json(got) == [1, 2, 3, 4, 5, 6]


def test_json_scalar_tensors() -> None:
    assert from_json("FP64", [], [2.5]).shape == ()
    scalar = np.array(7, dtype=np.int16)
    assert_same(from_json("INT16", [], scalar.tolist()), scalar)  # 0-d tolist() is the bare value
    assert to_json(scalar) == [7]


def test_json_floats_accept_integers_and_non_finite_values() -> None:
    got = from_json("FP32", [4], [1, 2.5, math.inf, math.nan])
    assert got.dtype == np.float32
    assert got[:3].tolist() == [1.0, 2.5, math.inf]
    assert math.isnan(got[3])


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "message"),
    [
        ("INT32", [2, 2], [1, 2, 3], "input 'x': shape \\[2,2\\] needs 4 elements, data has 3"),
        ("INT32", [2, 2], [[1, 2], [3]], "shape \\[2,2\\] needs 4 elements, data has 3"),
        ("INT32", [2], [1, "2"], "input 'x': INT32 element 1 is '2', not an integer"),
        ("INT32", [2], [1, 2.0], "INT32 element 1 is 2.0, not an integer"),
        ("INT64", [1], [True], "INT64 element 0 is True, not an integer"),
        ("UINT8", [2], [1, 300], "input 'x': UINT8 element 1 is 300, outside \\[0, 255\\]"),
        ("UINT8", [1], [-1], "UINT8 element 0 is -1, outside \\[0, 255\\]"),
        ("INT8", [1], [128], "outside \\[-128, 127\\]"),
        ("UINT64", [1], [2**64], "outside \\[0, 18446744073709551615\\]"),
        ("INT64", [1], [10**400], "<integer of 1329 bits>, outside"),
        ("FP16", [1], [70000.0], "FP16 element 0 is 70000.0, too large for FP16"),
        ("FP32", [1], [1e39], "too large for FP32"),
        ("FP64", [1], [10**400], "too large for FP64"),
        ("FP32", [1], [None], "FP32 element 0 is None, not a number"),
        ("BOOL", [2], [True, 1], "BOOL element 1 is 1, not true or false"),
        ("BYTES", [2], ["a", 1], "BYTES element 1 is 1, not a string"),
        ("INT32", [3], [[1, 2, 3]], "data is nested deeper than shape \\[3\\] allows"),
        ("INT32", [1], {"a": 1}, "data must be a list, got dict"),
        ("INT32", [1], 5, "data must be a list, got int"),
        ("INT32", [-1], [], "negative dimension"),
        ("NOPE", [1], [1], "unknown datatype 'NOPE'"),
    ],
)
def test_bad_json_tensors_are_refused(datatype: str, shape: list[int], data: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        from_json(datatype, shape, data, name="x")


# --------------------------------------------------------------------------- binary HTTP bodies


def test_split_binary_body() -> None:
    header, tail = split_binary_body(b'{"inputs":[]}\x01\x02\x03', 13)
    assert header == {"inputs": []}
    assert bytes(tail) == b"\x01\x02\x03"
    header, tail = split_binary_body(b'{"id":"1"}', None)
    assert header == {"id": "1"}
    assert bytes(tail) == b""
    assert split_binary_body(b'{"a":1}xy', "7")[0] == {"a": 1}  # the HTTP header's text


@pytest.mark.parametrize(
    ("body", "length", "message"),
    [
        (b'{"a":1}', 8, "Inference-Header-Content-Length is 8, but the body has 7 bytes"),
        (b'{"a":1}', -1, "Inference-Header-Content-Length is -1"),
        (b'{"a":1}', "seven", "must be an integer, got 'seven'"),
        (b'{"a":1}xy', "-7", "must be decimal digits, got '-7'"),
        (b'{"a":1}xy', "+7", "must be decimal digits, got '\\+7'"),
        (b'{"a":1}xyz' + b"x" * 10, "1_0", "must be decimal digits, got '1_0'"),
        (b'{"a":1}xy', " 7", "must be decimal digits, got ' 7'"),
        (b'{"a":1}xy', "\u0667", "must be an integer|must be decimal digits"),
        (b'{"a":1}', 3, "not valid JSON"),
        (b"\xff\xfe\x00", None, "not valid JSON"),
        (b"[1, 2]", None, "must be an object, got list"),
        (b"", None, "not valid JSON"),
    ],
)
def test_bad_binary_bodies_are_refused(body: bytes, length: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        split_binary_body(body, length)


def test_binary_input_slices_follow_input_order() -> None:
    inputs = [
        {"name": "a", "parameters": {"binary_data_size": 2}},
        {"name": "b", "data": [1]},
        {"name": "c", "parameters": {"binary_data_size": 0}},
        {"name": "d", "parameters": {"binary_data_size": 3}},
    ]
    got = binary_input_slices(inputs, b"AAddd")
    assert [None if s is None else bytes(s) for s in got] == [b"AA", None, b"", b"ddd"]


@pytest.mark.parametrize(
    ("inputs", "tail", "message"),
    [
        (
            [{"name": "a", "parameters": {"binary_data_size": 4}}],
            b"abc",
            "input 'a': binary_data_size 4 runs past",
        ),
        ([{"name": "a", "parameters": {"binary_data_size": 2}}], b"abc", "1 bytes of binary data beyond"),
        ([{"name": "a"}], b"abc", "3 bytes of binary data beyond"),
        ([{"name": "a", "parameters": {"binary_data_size": -1}}], b"", "non-negative integer, got -1"),
        ([{"name": "a", "parameters": {"binary_data_size": "3"}}], b"abc", "non-negative integer, got '3'"),
        ([{"name": "a", "parameters": {"binary_data_size": True}}], b"a", "non-negative integer, got True"),
        ([{"parameters": {"binary_data_size": 1.0}}], b"a", "input '#0': binary_data_size"),
        ([{"name": "a", "parameters": [1]}], b"", "'parameters' must be an object"),
        ([7], b"", "inputs\\[0\\] must be an object"),
        ({"name": "a"}, b"", "'inputs' must be a list"),
    ],
)
def test_bad_binary_sizes_are_refused(inputs: Any, tail: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        binary_input_slices(inputs, tail)


def test_build_binary_response() -> None:
    header = {
        "outputs": [{"name": "o", "datatype": "UINT8", "shape": [3], "parameters": {"binary_data_size": 3}}]
    }
    body, length = build_binary_response(header, [b"\x01\x02\x03"])
    assert json.loads(body[:length]) == header
    assert body[length:] == b"\x01\x02\x03"
    body, length = build_binary_response({"outputs": []}, [])
    assert length == len(body)


def test_build_binary_response_checks_sizes_against_blobs() -> None:
    header = {"outputs": [{"name": "o", "parameters": {"binary_data_size": 3}}]}
    with pytest.raises(InvalidArgument, match="declare binary_data_size \\[3\\], the blobs are \\[2\\]"):
        build_binary_response(header, [b"ab"])
    with pytest.raises(InvalidArgument, match="declare binary_data_size \\[\\]"):
        build_binary_response({"outputs": []}, [b"ab"])


# --------------------------------------------------------------------------- tritonclient agrees


@pytest.mark.parametrize(
    "items",
    [[b"", "héllo", b"\x00\xff", "日本語"], ["only"], [], [b"a" * 1000, b""]],
)
def test_tritonclient_bytes_serialization_agrees(items: list[Any]) -> None:
    arr = bytes_tensor(items, (len(items),))
    theirs = triton_utils.serialize_byte_tensor(arr)
    assert (theirs.item() if theirs.size else b"") == to_bytes(arr)
    want = [x.encode() if isinstance(x, str) else x for x in items]
    assert triton_utils.deserialize_bytes_tensor(to_bytes(arr)).tolist() == want


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_tritonclient_dtype_mapping_agrees(datatype: str) -> None:
    assert triton_utils.np_to_triton_dtype(DATATYPES[datatype]) == datatype
    assert np.dtype(triton_utils.triton_to_np_dtype(datatype)).newbyteorder("<") == DATATYPES[datatype]


def test_tritonclient_http_request_body_decodes() -> None:
    """A binary-data request exactly as tritonclient.http builds it."""
    tensors = {
        "img": np.arange(12, dtype=np.float32).reshape(3, 4),
        "text": bytes_tensor([b"caf\xc3\xa9", b""], (1, 2)),
        "mask": np.array([[True, False]]),
        "half": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16),
    }
    inputs = []
    for name, arr in tensors.items():
        inp = triton_http.InferInput(name, list(arr.shape), datatype_of(arr))
        inputs.append(inp.set_data_from_numpy(arr, binary_data=True))
    as_json = np.array([[7, 8]], dtype=np.int64)
    inputs.append(
        triton_http.InferInput("ids", [1, 2], "INT64").set_data_from_numpy(as_json, binary_data=False)
    )

    body, header_length = triton_http.InferenceServerClient.generate_request_body(inputs)
    header, tail = split_binary_body(body, header_length)
    slices = binary_input_slices(header["inputs"], tail)
    got = {}
    for entry, raw in zip(header["inputs"], slices, strict=True):
        name, dt, shape = entry["name"], entry["datatype"], entry["shape"]
        got[name] = (
            from_json(dt, shape, entry["data"], name=name)
            if raw is None
            else from_bytes(dt, shape, raw, name=name)
        )
    for name, arr in tensors.items():
        assert_same(got[name], arr)
    assert_same(got["ids"], as_json)


def test_tritonclient_http_reads_binary_response() -> None:
    outputs = {
        "scores": np.array([[0.25, -1.0, math.inf]], dtype=np.float32),
        "labels": bytes_tensor([b"cat", b"\xffraw"], (2, 1)),
        "bf": np.array([3.0], dtype=ml_dtypes.bfloat16),
    }
    blobs = [to_bytes(a) for a in outputs.values()]
    header = {
        "model_name": "m",
        "outputs": [
            {
                "name": n,
                "datatype": datatype_of(a),
                "shape": list(a.shape),
                "parameters": {"binary_data_size": len(b)},
            }
            for (n, a), b in zip(outputs.items(), blobs, strict=True)
        ]
        + [
            {
                "name": "count",
                "datatype": "INT32",
                "shape": [2],
                "data": to_json(np.array([4, 5], dtype=np.int32)),
            }
        ],
    }
    body, header_length = build_binary_response(header, blobs)
    result = triton_http.InferenceServerClient.parse_response_body(body, header_length=header_length)
    for name, arr in outputs.items():
        assert_same(result.as_numpy(name), arr)
    assert result.as_numpy("count").tolist() == [4, 5]


# --------------------------------------------------------------------------- properties


@st.composite
def fixed_arrays(draw: st.DrawFn) -> tuple[str, np.ndarray[Any, Any]]:
    """Any fixed-size datatype, any shape, any bit pattern (NaNs, infinities, subnormals)."""
    datatype = draw(st.sampled_from(FIXED))
    dtype = DATATYPES[datatype]
    shape = draw(array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))
    n = math.prod(shape)
    if datatype == "BOOL":
        return datatype, np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool).reshape(
            shape
        )
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    return datatype, np.frombuffer(raw, dtype=dtype).reshape(shape)


@PROPERTY
@given(fixed_arrays())
def test_property_fixed_round_trip(case: tuple[str, np.ndarray[Any, Any]]) -> None:
    datatype, arr = case
    assert datatype_of(arr) == datatype
    assert_same(from_bytes(datatype, arr.shape, to_bytes(arr)), arr)


@PROPERTY
@given(fixed_arrays())
def test_property_fixed_json_round_trip(case: tuple[str, np.ndarray[Any, Any]]) -> None:
    datatype, arr = case
    assert_same_values(from_json(datatype, list(arr.shape), to_json(arr)), arr)


@PROPERTY
@given(
    st.lists(st.one_of(st.binary(max_size=20), st.text(max_size=10)), max_size=12),
    st.sampled_from([(-1,), (1, -1), (-1, 1)]),
)
def test_property_bytes_round_trip(items: list[Any], layout: tuple[int, ...]) -> None:
    shape = tuple(len(items) if d == -1 else d for d in layout)
    arr = bytes_tensor(items, shape)
    got = from_bytes("BYTES", shape, to_bytes(arr))
    assert got.shape == shape
    assert got.ravel().tolist() == [x.encode() if isinstance(x, str) else x for x in items]


# Arbitrary-input properties. Each strategy mixes near-valid input (right datatype, small
# shape, nearly the right data) with junk, so both the decode and the refuse paths run.

junk_shapes = st.one_of(
    st.lists(st.integers(-2, 6), max_size=4),
    st.lists(st.integers(-(2**70), 2**70), max_size=3),
    st.lists(
        st.one_of(st.integers(0, 3), st.floats(), st.booleans(), st.text(max_size=2), st.none()), max_size=3
    ),
    st.text(max_size=3),
    st.none(),
)
junk_datatypes = st.one_of(st.text(max_size=6), st.none(), st.integers())
small_shapes = st.lists(st.integers(0, 4), max_size=3)
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=4),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=8,
)


def near(n: int) -> st.SearchStrategy[int]:
    """Usually ``n``, sometimes one or two off."""
    return st.one_of(st.just(n), st.just(n), st.integers(max(0, n - 2), n + 2))


@st.composite
def raw_tensors(draw: st.DrawFn) -> tuple[Any, Any, bytes]:
    if draw(st.integers(0, 3)) == 0:
        return (
            draw(st.one_of(junk_datatypes, st.sampled_from(list(DATATYPES)))),
            draw(junk_shapes),
            draw(st.binary(max_size=32)),
        )
    datatype = draw(st.sampled_from(list(DATATYPES)))
    shape = draw(small_shapes)
    n = math.prod(shape)
    if datatype == "BYTES":
        good = to_bytes(bytes_tensor(draw(st.lists(st.binary(max_size=5), min_size=n, max_size=n)), (n,)))
        cut = draw(st.one_of(st.just(0), st.integers(-len(good), 3)))
        return datatype, shape, good[:cut] if cut < 0 else good + draw(st.binary(min_size=cut, max_size=cut))
    size = draw(near(n * DATATYPES[datatype].itemsize))
    if datatype == "BOOL":
        return datatype, shape, bytes(draw(st.lists(st.integers(0, 2), min_size=size, max_size=size)))
    return datatype, shape, draw(st.binary(min_size=size, max_size=size))


@PROPERTY
@given(raw_tensors())
def test_property_from_bytes_returns_the_shape_or_invalid_argument(case: tuple[Any, Any, bytes]) -> None:
    datatype, shape, buf = case
    try:
        arr = from_bytes(datatype, shape, buf, name="p")
    except InvalidArgument as e:
        assert str(e).startswith("input 'p': ")
        event("refused")
        return
    event("decoded")
    assert arr.shape == tuple(shape)
    assert arr.dtype == DATATYPES[datatype]


ELEMENTS: dict[str, st.SearchStrategy[Any]] = {
    **{d: st.integers(-300, 300) for d in FIXED if d[0] in "IU"},
    **{
        d: st.one_of(st.integers(-(2**20), 2**20), st.floats()) for d in FIXED if d[0] in "FB" and d != "BOOL"
    },
    "BOOL": st.booleans(),
    "BYTES": st.text(max_size=3),
}


def nest(flat: list[Any], shape: list[int]) -> list[Any]:
    """``flat`` as nested lists of ``shape`` (row-major)."""
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


@st.composite
def json_tensors(draw: st.DrawFn) -> tuple[Any, Any, Any]:
    if draw(st.integers(0, 3)) == 0:
        return (
            draw(st.one_of(junk_datatypes, st.sampled_from(list(DATATYPES)))),
            draw(junk_shapes),
            draw(json_values),
        )
    datatype = draw(st.sampled_from(list(DATATYPES)))
    shape = draw(small_shapes)
    n = math.prod(shape)
    element = st.one_of(ELEMENTS[datatype], ELEMENTS[datatype], ELEMENTS[datatype], json_values)
    flat = draw(st.lists(element, min_size=n, max_size=n))
    if draw(st.booleans()):
        return datatype, shape, nest(flat, shape)
    return datatype, shape, flat[: draw(near(n))]


@PROPERTY
@given(json_tensors())
def test_property_from_json_returns_the_shape_or_invalid_argument(case: tuple[Any, Any, Any]) -> None:
    datatype, shape, data = case
    try:
        arr = from_json(datatype, shape, data, name="p")
    except InvalidArgument as e:
        assert str(e).startswith("input 'p': ")
        event("refused")
        return
    event("decoded")
    assert arr.shape == tuple(shape)
    assert arr.dtype == DATATYPES[datatype]


@st.composite
def binary_bodies(draw: st.DrawFn) -> tuple[bytes, Any]:
    if draw(st.integers(0, 3)) == 0:
        junk_length = st.one_of(st.none(), st.integers(-3, 60), st.text(max_size=3), st.just(True))
        return draw(st.binary(max_size=40)), draw(junk_length)
    header = json.dumps(
        draw(st.one_of(st.dictionaries(st.text(max_size=3), json_values), json_values))
    ).encode()
    tail = draw(st.binary(max_size=8))
    length = draw(st.one_of(st.just(len(header)), st.just(str(len(header))), near(len(header))))
    return header + tail, None if not tail and draw(st.booleans()) else length


@PROPERTY
@given(binary_bodies())
def test_property_split_binary_body_splits_or_refuses(case: tuple[bytes, Any]) -> None:
    body, length = case
    try:
        header, tail = split_binary_body(body, length)
    except InvalidArgument:
        event("refused")
        return
    event("split")
    assert isinstance(header, dict)
    assert body.endswith(bytes(tail))
    assert json.loads(body[: len(body) - len(tail)]) == header


@st.composite
def declared_inputs(draw: st.DrawFn) -> tuple[Any, bytes]:
    if draw(st.integers(0, 3)) == 0:
        return draw(json_values), draw(st.binary(max_size=16))
    sizes = draw(
        st.lists(st.one_of(st.none(), st.integers(0, 4), st.integers(0, 4), json_values), max_size=4)
    )
    inputs = [
        {"name": f"i{k}"} if size is None else {"name": f"i{k}", "parameters": {"binary_data_size": size}}
        for k, size in enumerate(sizes)
    ]
    total = sum(size for size in sizes if type(size) is int and 0 < size <= 4)
    return inputs, draw(st.binary(min_size=draw(near(total)), max_size=total + 2))


@PROPERTY
@given(declared_inputs())
def test_property_binary_input_slices_cover_the_tail_or_refuse(case: tuple[Any, bytes]) -> None:
    inputs, tail = case
    try:
        slices = binary_input_slices(inputs, tail)
    except InvalidArgument:
        event("refused")
        return
    event("sliced")
    assert len(slices) == len(inputs)
    assert b"".join(bytes(s) for s in slices if s is not None) == tail

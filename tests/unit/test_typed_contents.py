"""gRPC inputs sent in the typed ``contents`` fields: the same raw bytes as the values would
have in ``raw_input_contents``, the same checks, and no per-element work for floats."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import pytest

from shoal.core import payload
from shoal.errors import InvalidArgument
from shoal.proto import grpc_service_pb2 as oip
from shoal.rpc import inference_service
from shoal.rpc.inference_service import request_tensors


def typed(datatype: str, shape: list[int], field: str, values: Sequence[object]) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="m")
    getattr(request.inputs.add(name="x", datatype=datatype, shape=shape).contents, field).extend(values)
    return request


FLOATS = [0.5, -0.0, float("inf"), float("-inf"), 1e-38, 3.0e38, -7.25]


@pytest.mark.parametrize(
    ("datatype", "field", "dtype"), [("FP32", "fp32_contents", "<f4"), ("FP64", "fp64_contents", "<f8")]
)
def test_float_contents_become_the_raw_bytes_of_the_values(datatype: str, field: str, dtype: str) -> None:
    for values in (FLOATS, [float("nan")], []):
        [t] = request_tensors(typed(datatype, [len(values)], field, values))
        assert (t.datatype, t.shape) == (datatype, (len(values),))
        assert t.data == np.array(values, dtype).tobytes()
        payload.check_all((t,))


def test_float_contents_that_do_not_fit_the_shape_are_refused_by_the_byte_check() -> None:
    [t] = request_tensors(typed("FP32", [2, 2], "fp32_contents", [1.0, 2.0, 3.0]))
    with pytest.raises(InvalidArgument, match=r"input 'x': expected 16 bytes for FP32 \[2,2\], got 12"):
        payload.check_all((t,))


@pytest.mark.parametrize(
    ("datatype", "field", "values", "raw"),
    [
        ("INT8", "int_contents", [-128, 0, 127], np.array([-128, 0, 127], np.int8).tobytes()),
        ("INT32", "int_contents", [-(2**31), 2**31 - 1], np.array([-(2**31), 2**31 - 1], "<i4").tobytes()),
        ("INT64", "int64_contents", [-(2**63), 2**63 - 1], np.array([-(2**63), 2**63 - 1], "<i8").tobytes()),
        ("UINT16", "uint_contents", [0, 65535], np.array([0, 65535], "<u2").tobytes()),
        ("UINT64", "uint64_contents", [2**64 - 1], np.array([2**64 - 1], "<u8").tobytes()),
        ("BOOL", "bool_contents", [True, False, True], b"\x01\x00\x01"),
        ("BYTES", "bytes_contents", [b"ab", b""], struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)),
    ],
)
def test_other_contents_become_the_same_raw_bytes(
    datatype: str, field: str, values: list[object], raw: bytes
) -> None:
    [t] = request_tensors(typed(datatype, [len(values)], field, values))
    assert t.data == raw


@pytest.mark.parametrize(
    ("datatype", "field", "values", "message"),
    [
        ("INT8", "int_contents", [1, 1000], r"input 'x': INT8 element 1 is 1000, outside \[-128, 127\]"),
        ("UINT8", "uint_contents", [256], r"input 'x': UINT8 element 0 is 256, outside \[0, 255\]"),
        ("INT64", "int64_contents", [1, 2, 3], r"input 'x': shape \[2\] needs 2 elements, data has 3"),
    ],
)
def test_contents_out_of_range_or_count_are_refused_naming_the_element(
    datatype: str, field: str, values: list[int], message: str
) -> None:
    shape = [2] if datatype == "INT64" else [len(values)]
    with pytest.raises(InvalidArgument, match=message):
        request_tensors(typed(datatype, shape, field, values))


def test_integer_contents_past_the_bound_are_refused_floats_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    # Integers, booleans and strings are read one by one on the event loop: bounded (a request
    # of 8,000,000 held every other request on its ingress for 2.3 s). Floats are their bytes.
    monkeypatch.setattr(inference_service, "MAX_TYPED_ELEMENTS", 4)
    with pytest.raises(InvalidArgument, match=r"5 elements in contents\.int64_contents, over the 4 typed"):
        request_tensors(typed("INT64", [5], "int64_contents", [1, 2, 3, 4, 5]))
    with pytest.raises(InvalidArgument, match="send large tensors in raw_input_contents"):
        request_tensors(typed("BYTES", [5], "bytes_contents", [b"a"] * 5))
    [t] = request_tensors(typed("FP32", [5], "fp32_contents", [1.0] * 5))
    assert t.data == np.ones(5, np.float32).tobytes()


def test_a_huge_input_name_is_quoted_cut_as_over_rest() -> None:
    request = oip.ModelInferRequest(model_name="m")
    t = request.inputs.add(name="n" * (1 << 20), datatype="FP32", shape=[1])
    t.parameters["shared_memory_region"].string_param = "r"
    request.raw_input_contents.append(b"\0" * 4)
    with pytest.raises(InvalidArgument) as refused:
        request_tensors(request)
    message = refused.value.message
    assert len(message) < 1000 and "... (1048376 more characters): shared memory is not supported" in message

"""Local hop messages written in parts (shoal.rpc.wire) are, joined, messages protobuf
parses to the same contents: for any names, datatypes, shapes and tensor bytes."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.proto import shoal_pb2 as pb
from shoal.rpc.wire import framed, varint

tensors = st.lists(
    st.tuples(
        st.text(max_size=40),
        st.sampled_from(["FP32", "BYTES", "INT64", "BF16", "BOOL", ""]),
        st.lists(st.integers(min_value=0, max_value=1 << 40), max_size=5),
        st.binary(max_size=3000),
    ),
    max_size=6,
)


def rows(message: pb.Task | pb.TaskOutcome) -> list[tuple[str, str, list[int], bytes]]:
    field = message.inputs if isinstance(message, pb.Task) else message.outputs
    return [(t.name, t.datatype, list(t.shape), t.data) for t in field]


@settings(max_examples=200, deadline=None)
@given(tensors, st.text(max_size=100), st.integers(min_value=0, max_value=1 << 62), st.booleans())
def test_a_task_in_parts_parses_as_the_task(
    items: list[tuple[str, str, list[int], bytes]], request_id: str, tag: int, views: bool
) -> None:
    head = pb.Task(request_id=request_id, timeout_s=2.5, tag=tag, model_id="m")
    message = framed(
        head.SerializeToString(),
        2,
        ((n, d, s, memoryview(b) if views else b) for n, d, s, b in items),
    )
    raw = b"".join(message.parts)
    assert len(raw) == message.size
    got = pb.Task.FromString(raw)
    assert (got.request_id, got.timeout_s, got.tag, got.model_id) == (request_id, 2.5, tag, "m")
    assert rows(got) == items
    whole = pb.Task(request_id=request_id, timeout_s=2.5, tag=tag, model_id="m")
    for n, d, s, b in items:
        whole.inputs.add(name=n, datatype=d, shape=s, data=b)
    assert got == whole


@settings(max_examples=100, deadline=None)
@given(tensors, st.integers(min_value=0, max_value=1 << 62))
def test_an_outcome_in_parts_parses_as_the_outcome(
    items: list[tuple[str, str, list[int], bytes]], tag: int
) -> None:
    head = pb.TaskOutcome(request_id="r", tag=tag).SerializeToString()
    got = pb.TaskOutcome.FromString(b"".join(framed(head, 2, items).parts))
    assert (got.request_id, got.tag, got.error_code) == ("r", tag, "")
    assert rows(got) == items


def test_large_tensor_bytes_are_not_copied_into_the_parts() -> None:
    data = np.arange(1 << 20, dtype=np.float32).tobytes()  # 4 MiB: a 4-byte length varint
    message = framed(b"", 2, [("x", "FP32", [1 << 20], data)])
    assert message.parts[-1] is data
    assert pb.Task.FromString(b"".join(message.parts)).inputs[0].data == data


@given(st.integers(min_value=1, max_value=(1 << 63) - 1))
def test_varint_is_protobufs(n: int) -> None:
    # Task.tag is int64 field 4: its tag byte (4 << 3 | 0), then the value as a varint.
    assert pb.Task(tag=n).SerializeToString() == b"\x20" + varint(n)

"""Triton's classification extension, the replica's part (shoal.core.classify): what an
output's top k classes look like, checked against Triton's own example and its rules."""

from __future__ import annotations

from typing import cast

import ml_dtypes
import numpy as np
import pytest

from shoal.config import Settings
from shoal.core import classify
from shoal.core.spec import DeploymentSpec
from shoal.errors import InvalidArgument, ShoalError
from shoal.proto import shoal_pb2 as pb
from shoal.replica.process import ReplicaProcess
from shoal.rpc import codec
from shoal.rpc.replica_service import ReplicaService
from shoal.rpc.status import Context
from shoal.types import Arrays
from tests.unit.conftest import make_spec

pytestmark = pytest.mark.timeout(10)


def strings(array: np.ndarray) -> list[object]:
    decoded: list[object] = np.vectorize(bytes.decode, otypes=[object])(array).tolist()
    return decoded


def test_tritons_example_with_values_as_its_servers_write_them() -> None:
    """Triton's docs: [1.1, 3.3, 0.5, 2.4], k=2 -> 3.3 at index 1, then 2.4 at index 3;
    its server writes a float with C's %f (std::to_string)."""
    values = np.array([1.1, 3.3, 0.5, 2.4], dtype=np.float32)
    top = classify.top_k("y", values, 2, batched=False)
    assert top.shape == (2,) and strings(top) == ["3.300000:1", "2.400000:3"]


def test_batched_rows_are_classified_one_by_one_with_their_labels() -> None:
    values = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], dtype=np.float64)
    top = classify.top_k("y", values, 2, batched=True, labels=["a", "b"])
    assert strings(top) == [["0.700000:1:b", "0.200000:2"], ["0.500000:0:a", "0.300000:2"]]


def test_a_model_that_does_not_batch_has_its_whole_output_ranked() -> None:
    values = np.array([[3, 1], [2, 9]], dtype=np.int32)
    assert strings(classify.top_k("y", values, 3, batched=False)) == ["9:3", "3:0", "2:2"]


def test_k_above_the_classes_gives_them_all_and_equal_values_the_lower_index_first() -> None:
    values = np.array([[7, 9, 7, 7]], dtype=np.uint8)
    top = classify.top_k("y", values, 10, batched=True)
    assert top.shape == (1, 4) and strings(top) == [["9:1", "7:0", "7:2", "7:3"]]


def test_large_unsigned_and_half_precision_values_keep_their_order() -> None:
    """No negation (it would wrap an unsigned value); FP16 and BF16 rank as numbers too."""
    big = np.array([[2**64 - 1, 0, 2**63]], dtype=np.uint64)
    assert strings(classify.top_k("y", big, 2, batched=True)) == [[f"{2**64 - 1}:0", f"{2**63}:2"]]
    for dtype in (np.float16, ml_dtypes.bfloat16):
        half = np.array([[0.25, 0.5]], dtype=dtype)
        assert strings(classify.top_k("y", half, 1, batched=True)) == [["0.500000:1"]]


@pytest.mark.parametrize("values", [np.array([[True, False]]), np.array([b"a", b"b"], dtype=object)])
def test_outputs_without_an_order_are_refused(values: np.ndarray) -> None:
    with pytest.raises(InvalidArgument, match="output 'y': classification needs a numeric output"):
        classify.top_k("y", values, 1, batched=True)


@pytest.mark.parametrize("k", [0, -3, True, 2.0, "2", None, 2**32])
def test_a_count_must_be_a_positive_integer(k: object) -> None:
    with pytest.raises(InvalidArgument, match="parameter 'classification' must be a positive integer"):
        classify.check_count("y", k)
    assert classify.check_count("y", 1) == 1 and classify.check_count("y", 2**32 - 1) == 2**32 - 1


def test_an_answer_of_no_rows_has_no_classes() -> None:
    top = classify.top_k("y", np.zeros((0, 3), dtype=np.float32), 2, batched=True)
    assert top.shape == (0, 2)


def test_only_the_outputs_asked_for_are_replaced() -> None:
    outputs = {"p": np.array([[0.2, 0.8]]), "label": np.array([1])}
    out = classify.classified(outputs, {"p": 1, "gone": 2}, batched=True, labels={"p": ("no", "yes")})
    assert strings(out["p"]) == [["0.800000:1:yes"]] and out["label"] is outputs["label"]
    assert "gone" not in out and outputs["p"].dtype == np.float64  # the model's dict is left alone


class EchoReplica:
    """What ``ReplicaService`` asks of a replica: its spec, and answers its inputs."""

    def __init__(self, spec: DeploymentSpec) -> None:
        self.settings = Settings()
        self.spec = spec
        self.refusals: list[str] = []

    async def infer(self, request_id: str, inputs: Arrays, timeout_s: float, model_id: str = "") -> Arrays:
        return inputs

    def refused(self, request_id: str, err: ShoalError) -> None:
        self.refusals.append(err.message)


async def test_the_replica_answers_the_classes_over_every_transport() -> None:
    """``outcome`` (the gRPC stream, the local hop's coroutine path) and ``PushTask`` (unary)
    rank the outputs a task asks for, with the spec's labels; a task that asks none is
    answered as it was."""
    spec = make_spec(
        batching={"max_batch_size": 4},
        outputs=[
            {"name": "x", "shape": [-1, 3], "labels": ["a", "b", "c"]},
            {"name": "s", "datatype": "BYTES"},
        ],
    )
    replica = EchoReplica(spec)
    service = ReplicaService(cast(ReplicaProcess, replica))
    x = np.array([[0.1, 0.9, 0.5]], dtype=np.float32)
    s = np.array([b"t"], dtype=object)
    task = pb.Task(request_id="r", timeout_s=1.0, inputs=codec.encode({"x": x, "s": s}))
    plain = codec.decode((await service.outcome(task)).outputs)
    assert plain["x"].tolist() == x.tolist()
    task.classification["x"] = 2
    ranked = codec.decode((await service.outcome(task)).outputs)
    assert strings(ranked["x"]) == [["0.900000:1:b", "0.500000:2:c"]] and ranked["s"].tolist() == [b"t"]
    unary = await service.PushTask(task, cast(Context, None))
    assert strings(codec.decode(unary.outputs)["x"]) == [["0.900000:1:b", "0.500000:2:c"]]
    task.classification["s"] = 1
    refused = await service.outcome(task)
    assert refused.error_code == "INVALID_ARGUMENT" and "'s' is BYTES" in refused.error_message
    assert replica.refusals == [refused.error_message]

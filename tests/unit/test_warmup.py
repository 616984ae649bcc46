"""Warmup (``DeploymentSpec.warmup``): the inputs a replica makes for its warmup calls, and
the spec's rules. The calls themselves, in a real replica: tests/integration/test_warmup.py."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.core.spec import TensorSpec, parse_spec
from shoal.errors import InvalidArgument
from shoal.replica.process import warmup_inputs

BASE = {"name": "m", "backend": "python", "model": "m:M"}


def test_inputs_are_one_row_of_zeros_of_each_required_input() -> None:
    inputs = warmup_inputs(
        (
            TensorSpec(name="x", datatype="FP32", shape=(-1, 16)),
            TensorSpec(name="ids", datatype="INT64", shape=(-1, -1)),
            TensorSpec(name="text", datatype="BYTES", shape=(-1,)),
            TensorSpec(name="mask", datatype="BOOL", shape=(2,)),
            TensorSpec(name="temperature", datatype="FP32", shape=(1,), optional=True),
        )
    )

    assert set(inputs) == {"x", "ids", "text", "mask"}  # the optional one is left out
    assert inputs["x"].shape == (1, 16) and inputs["x"].dtype == np.float32 and not inputs["x"].any()
    assert inputs["ids"].shape == (1, 1) and inputs["ids"].dtype == np.int64
    assert inputs["text"].tolist() == [b"warmup"]
    assert inputs["mask"].dtype == np.bool_ and inputs["mask"].tolist() == [False, False]


def test_a_model_without_declared_inputs_cannot_be_warmed_up() -> None:
    with pytest.raises(InvalidArgument, match=r"warmup needs the model's inputs: declare them"):
        warmup_inputs(())
    with pytest.raises(InvalidArgument, match="warmup needs the model's inputs"):
        warmup_inputs((TensorSpec(name="t", shape=(1,), optional=True),))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"warmup": -1}, "warmup"),
        ({"warmup": 101}, "warmup"),
        (
            {"warmup": 2, "multiplexing": {"max_models_per_replica": 2}},
            "warmup needs one model per replica",
        ),
    ],
)
def test_the_spec_refuses_a_bad_warmup(extra: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_spec({**BASE, **extra})


def test_warmup_restarts_replicas_only_when_set() -> None:
    plain = parse_spec(BASE)
    assert parse_spec({**BASE, "warmup": 0}).process_hash() == plain.process_hash()
    assert parse_spec({**BASE, "warmup": 3}).process_hash() != plain.process_hash()

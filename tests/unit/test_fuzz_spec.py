"""Fuzzing spec parsing: whatever document arrives (YAML file, REST body, gRPC JSON), parsing
either returns a spec or raises InvalidArgument, nothing else.

``SHOAL_FUZZ_EXAMPLES`` sets the examples per test (default: a short run for ``make test``;
CI nights run thousands, see docs/security.md).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.core.spec import BACKENDS, DATATYPES, DeploymentSpec, parse_spec, parse_spec_json
from shoal.errors import InvalidArgument

pytestmark = pytest.mark.timeout(300)

EXAMPLES = int(os.environ.get("SHOAL_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
FIELDS = list(DeploymentSpec.model_fields)


def nearly_valid() -> st.SearchStrategy[dict[str, Any]]:
    """Documents with the spec's own keys, some values right and some anything."""
    base = {
        "name": st.sampled_from(["echo", "a", "x" * 70, "Bad", "", "a-b.c_d"]) | st.text(max_size=8),
        "backend": st.sampled_from(BACKENDS) | st.text(max_size=8),
        "model": st.sampled_from(["m:M", "model.onnx", ""]) | json_values,
        "replicas": st.integers(-2, 2000) | json_values,
        "inputs": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "name": st.text(max_size=4) | json_values,
                    "datatype": st.sampled_from(DATATYPES) | json_values,
                    "shape": st.lists(st.integers(-3, 10**20), max_size=4) | json_values,
                },
            ),
            max_size=3,
        )
        | json_values,
        "auth": st.fixed_dictionaries({}, optional={"tokens": st.lists(st.text(max_size=8)) | json_values})
        | json_values,
        "batching": st.fixed_dictionaries(
            {}, optional={"max_batch_size": json_values, "max_delay_ms": json_values}
        )
        | json_values,
        "autoscaling": st.fixed_dictionaries(
            {}, optional={"min_replicas": json_values, "max_replicas": json_values}
        )
        | json_values,
    }
    others = {name: json_values for name in FIELDS if name not in base}
    return st.fixed_dictionaries({}, optional={**base, **others}).flatmap(
        lambda doc: st.dictionaries(st.text(max_size=8), json_values, max_size=2).map(
            lambda extra: {**extra, **doc}
        )
    )


def parses_or_refuses(doc: Any) -> None:
    try:
        spec = parse_spec(doc)
    except InvalidArgument:
        return
    # What parsed survives its own JSON and the head's store.
    assert parse_spec_json(spec.to_json()) == spec
    spec.process_hash()


@FUZZ
@given(json_values)
def test_any_json_value(doc: Any) -> None:
    parses_or_refuses(doc)


@FUZZ
@given(nearly_valid())
def test_nearly_valid_documents(doc: dict[str, Any]) -> None:
    parses_or_refuses(doc)


@FUZZ
@given(st.text(max_size=200) | json_values.map(json.dumps))
def test_any_json_text(text: str) -> None:
    try:
        parse_spec_json(text)
    except InvalidArgument:
        pass


def test_regression_deep_nesting_is_refused_not_crashed() -> None:
    text = "[" * 100_000 + "]" * 100_000
    with pytest.raises(InvalidArgument):
        parse_spec_json(text)

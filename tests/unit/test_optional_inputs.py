"""Optional inputs (``TensorSpec.optional``, Triton's ``ModelInput.optional``): declared in a
spec or by a backend, carried to the scheduler, and left out of a request without a 400.

No sockets: the scheduler's REST app over in-memory replicas, as in ``test_models``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import numpy as np
import pytest

from shoal.backends.generate import GENERATION_INPUTS, GENERATION_OUTPUTS
from shoal.config import Settings
from shoal.core import payload
from shoal.core.spec import TensorSpec
from shoal.errors import InvalidArgument
from shoal.http.scheduler import scheduler_app
from shoal.rpc.convert import meta_from_pb, meta_to_pb
from shoal.scheduler.node import SchedulerNode
from shoal.scheduler.router import Router
from shoal.testing.fakes import FakeReplicas
from shoal.types import Arrays, HeadLink, ReplicaDescription
from tests.unit.conftest import make_spec

pytestmark = pytest.mark.timeout(10)

TEXT = TensorSpec(name="text", datatype="BYTES", shape=(-1,))
LIMIT = TensorSpec(name="limit", datatype="INT32", shape=(-1,), optional=True)


def headers(**arrays: Any) -> list[payload.Header]:
    return payload.headers(payload.from_arrays({k: np.asarray(v) for k, v in arrays.items()}))


def test_a_missing_optional_input_passes_the_check_a_missing_required_one_does_not() -> None:
    declared = (TEXT, LIMIT)
    payload.check_declared(declared, headers(text=[b"a"]))
    payload.check_declared(declared, headers(text=[b"a"], limit=np.array([3], np.int32)))
    with pytest.raises(InvalidArgument, match="missing input 'text' of model 'm'"):
        payload.check_declared(declared, headers(limit=np.array([3], np.int32)), "m")
    # Optional is about presence only: given, it is checked like any other input.
    with pytest.raises(InvalidArgument, match="input 'limit': expected datatype INT32, got FP32"):
        payload.check_declared(declared, headers(text=[b"a"], limit=np.array([3.0], np.float32)))


def test_generation_sampling_inputs_are_optional_and_text_is_not() -> None:
    assert [(t.name, t.optional) for t in GENERATION_INPUTS] == [
        ("text", False),
        ("max_tokens", True),
        ("temperature", True),
        ("top_p", True),
    ]


def test_a_spec_declares_optional_inputs_only() -> None:
    spec = make_spec(inputs=[{"name": "text", "datatype": "BYTES"}, {"name": "limit", "optional": True}])
    assert [t.optional for t in spec.inputs] == [False, True]
    with pytest.raises(InvalidArgument, match="output 'y' cannot be optional"):
        make_spec(outputs=[{"name": "y", "optional": True}])
    with pytest.raises(InvalidArgument, match="optional"):
        make_spec(inputs=[{"name": "x", "optional": "yes"}])


def test_optional_is_serialised_only_when_true() -> None:
    """A spec without optional inputs keeps the JSON (and so the process hash) it had before
    the field, and a peer that predates it still parses it."""
    plain = make_spec(inputs=[{"name": "x"}], outputs=[{"name": "y"}])
    assert "optional" not in plain.to_json()
    assert make_spec(inputs=[{"name": "x", "optional": False}], outputs=[{"name": "y"}]) == plain
    assert '"optional":true' in make_spec(inputs=[{"name": "x", "optional": True}]).to_json()


def test_optional_survives_a_replicas_description_over_grpc() -> None:
    for t in (TEXT, LIMIT):
        assert meta_from_pb(meta_to_pb(t)) == t


# ---------------------------------------------------------------- over the scheduler's REST app


def complete(inputs: Arrays) -> Arrays:
    """A fake generation model: each prompt with the row's max_tokens, when given, appended."""
    limits = inputs.get("max_tokens")
    texts = [
        t.decode() + ("" if limits is None else f" [{int(limits[i])}]") for i, t in enumerate(inputs["text"])
    ]
    out = np.empty(len(texts), dtype=object)
    out[:] = [t.encode() for t in texts]
    return {"text": out}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """A generation deployment whose spec declares nothing: its tensors are what the (fake)
    replica's backend describes, as for ``examples/tiny-lm.yaml``."""
    fakes = FakeReplicas()
    router = Router("s1", Settings(), fakes, policy="round_robin")
    spec = make_spec("tiny-lm", batching={"max_batch_size": 8})
    router.add("a", spec, "a:9000", "s1")
    replica = fakes.clients["a:9000"]
    replica.handler = complete
    replica.description = ReplicaDescription(inputs=GENERATION_INPUTS, outputs=GENERATION_OUTPUTS)
    node = SchedulerNode(Settings(), "s1", cast(HeadLink, None), fakes, router=router)
    node.registered.set()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=scheduler_app(node)), base_url="http://shoal"
    ) as client:
        yield client
    await router.aclose()


def text_input(*prompts: str) -> dict[str, Any]:
    return {"name": "text", "datatype": "BYTES", "shape": [len(prompts)], "data": list(prompts)}


async def test_generation_infer_with_text_alone_is_answered(http: httpx.AsyncClient) -> None:
    r = await http.post("/v2/models/tiny-lm/infer", json={"inputs": [text_input("Hi")]})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == ["Hi"]
    some = {
        "inputs": [
            text_input("Hi", "Yo"),
            {"name": "max_tokens", "datatype": "INT32", "shape": [2], "data": [3, 4]},
        ]
    }
    r = await http.post("/v2/models/tiny-lm/infer", json=some)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == ["Hi [3]", "Yo [4]"]
    r = await http.post("/v2/models/tiny-lm/infer", json={"inputs": []})
    assert r.status_code == 400 and "missing input 'text'" in r.json()["error"], r.text


async def test_config_says_optional_and_metadata_keeps_the_protocols_fields(http: httpx.AsyncClient) -> None:
    config = (await http.get("/v2/models/tiny-lm/config")).json()
    assert {i["name"]: i["optional"] for i in config["input"]} == {
        "text": False,
        "max_tokens": True,
        "temperature": True,
        "top_p": True,
    }
    metadata = (await http.get("/v2/models/tiny-lm")).json()
    assert all(set(i) == {"name", "datatype", "shape"} for i in metadata["inputs"]), metadata

"""Triton's classification extension on a real cluster, asked by tritonclient as Triton's
own examples ask it (``InferRequestedOutput(name, class_count=k)``), over gRPC and HTTP.

``iris``: a scikit-learn classifier whose ``probabilities`` output declares its labels;
the answers are checked against the model's own ``predict_proba``. ``batched``: an echo
that batches (its first call takes 50 ms, so the requests sent with it wait and share the
next), whose top k are those of the rows sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from tritonclient.utils import InferenceServerException

from shoal.testing.cluster import ProcessCluster
from tests.integration.test_oip import over_http

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio(loop_scope="module")]

LABELS = ["setosa", "versicolor", "virginica"]
ROWS = load_iris().data[::40].astype(np.float32)  # 4 rows, of all three species


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(
    tmp_path_factory: pytest.TempPathFactory, examples_dir: Path
) -> AsyncIterator[tuple[ProcessCluster, LogisticRegression]]:
    root = tmp_path_factory.mktemp("classification")
    x, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500).fit(x.astype(np.float32), y)
    joblib.dump(model, root / "iris.joblib")
    rows = [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    async with ProcessCluster(root / "cluster") as c:
        await c.deploy(
            {
                "name": "iris",
                "backend": "sklearn",
                "model": str(root / "iris.joblib"),
                "resources": {"cpus": 0.1},
                "batching": {"max_batch_size": 8},
                "inputs": rows,
                "outputs": [
                    {"name": "label", "datatype": "INT64", "shape": [-1]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3], "labels": LABELS},
                ],
            }
        )
        await c.deploy(
            {
                "name": "batched",
                "backend": "python",
                "model": "echo:Echo",
                "base_dir": str(examples_dir),
                "options": {"delay_ms": 50},
                "resources": {"cpus": 0.1},
                "batching": {"max_batch_size": 8, "max_delay_ms": 20},
                "inputs": rows,
                "outputs": rows,
            }
        )
        for name in ("iris", "batched"):
            await c.wait_ready(name, 1)
        yield c, model


@pytest_asyncio.fixture(loop_scope="module")
async def grpc_client(
    cluster: tuple[ProcessCluster, LogisticRegression],
) -> AsyncIterator[tgrpc_aio.InferenceServerClient]:
    client = tgrpc_aio.InferenceServerClient(cluster[0].scheduler_address())
    try:
        yield client
    finally:
        await client.close()


def expected(values: np.ndarray, k: int, labels: list[str] | None = None) -> list[list[str]]:
    """Triton's answer for ``values`` (rows of classes), worked out here: each row's k
    highest values, highest first, as ``%f`` of the value, its index, and its label."""
    out = []
    for row in values:
        order = sorted(range(len(row)), key=lambda i: (-float(row[i]), i))[:k]
        out.append([f"{float(row[i]):f}:{i}" + (f":{labels[i]}" if labels else "") for i in order])
    return out


def decoded(array: Any) -> list[list[str]]:
    """BYTES as text (tritonclient answers bytes, or str from a JSON answer)."""
    return [[v.decode() if isinstance(v, bytes) else v for v in row] for row in array]


async def test_grpc_answers_the_top_classes_with_their_labels(
    cluster: tuple[ProcessCluster, LogisticRegression], grpc_client: tgrpc_aio.InferenceServerClient
) -> None:
    model = cluster[1]
    x = tgrpc_aio.InferInput("x", list(ROWS.shape), "FP32")
    x.set_data_from_numpy(ROWS)
    outputs = [
        tgrpc_aio.InferRequestedOutput("probabilities", class_count=2),
        tgrpc_aio.InferRequestedOutput("label"),
    ]
    result = await grpc_client.infer("iris", [x], outputs=outputs)
    proba = model.predict_proba(ROWS).astype(np.float32)
    top = result.as_numpy("probabilities")
    assert top.shape == (4, 2) and result.get_output("probabilities").datatype == "BYTES"
    assert decoded(top) == expected(proba, 2, LABELS)
    assert result.as_numpy("label").tolist() == model.predict(ROWS).tolist()  # asked as it is
    # More classes than the output has: all of them, as Triton answers.
    result = await grpc_client.infer(
        "iris", [x], outputs=[tgrpc_aio.InferRequestedOutput("probabilities", class_count=5)]
    )
    assert decoded(result.as_numpy("probabilities")) == expected(proba, 3, LABELS)


@pytest.mark.parametrize("binary", [True, False])
async def test_http_answers_the_top_classes_as_binary_data_or_json(
    cluster: tuple[ProcessCluster, LogisticRegression], binary: bool
) -> None:
    c, model = cluster

    def call(client: thttp.InferenceServerClient) -> thttp.InferResult:
        x = thttp.InferInput("x", list(ROWS.shape), "FP32")
        x.set_data_from_numpy(ROWS)
        wanted = [thttp.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)]
        return client.infer("iris", [x], outputs=wanted)

    result = await over_http(c, call)
    proba = model.predict_proba(ROWS).astype(np.float32)
    assert decoded(result.as_numpy("probabilities")) == expected(proba, 3, LABELS)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["probabilities"]


@pytest.mark.parametrize(
    ("output", "k", "error"),
    [
        (
            "probabilities",
            -1,
            "output 'probabilities': parameter 'classification' must be a positive integer",
        ),
        ("nope", 2, "unknown output 'nope'"),
    ],
)
async def test_both_doors_refuse_a_bad_count_or_output_alike(
    cluster: tuple[ProcessCluster, LogisticRegression],
    grpc_client: tgrpc_aio.InferenceServerClient,
    output: str,
    k: int,
    error: str,
) -> None:
    c = cluster[0]
    x = tgrpc_aio.InferInput("x", list(ROWS.shape), "FP32")
    x.set_data_from_numpy(ROWS)
    with pytest.raises(InferenceServerException) as over_grpc:
        await grpc_client.infer("iris", [x], outputs=[tgrpc_aio.InferRequestedOutput(output, class_count=k)])
    assert over_grpc.value.status() == "StatusCode.INVALID_ARGUMENT"

    def call(client: thttp.InferenceServerClient) -> None:
        hx = thttp.InferInput("x", list(ROWS.shape), "FP32")
        hx.set_data_from_numpy(ROWS)
        client.infer("iris", [hx], outputs=[thttp.InferRequestedOutput(output, class_count=k)])

    with pytest.raises(InferenceServerException) as over_http_:
        await over_http(c, call)
    assert over_http_.value.status() == "400"
    assert over_grpc.value.message() == over_http_.value.message()
    assert over_grpc.value.message().startswith(error)


@pytest.mark.parametrize("k", [True, 2.5, "2", 0])
async def test_rest_refuses_a_count_that_is_not_a_positive_integer(
    cluster: tuple[ProcessCluster, LogisticRegression], k: object
) -> None:
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ROWS[0].tolist()}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": k}}],
    }
    async with httpx.AsyncClient(base_url=f"http://{cluster[0].http_address()}") as client:
        r = await client.post("/v2/models/iris/infer", json=body)
    assert r.status_code == 400
    assert r.json()["error"].startswith(
        "output 'probabilities': parameter 'classification' must be a positive integer"
    )


async def test_requests_batched_together_each_get_their_own_answer(
    cluster: tuple[ProcessCluster, LogisticRegression], grpc_client: tgrpc_aio.InferenceServerClient
) -> None:
    """Five requests at once to a model that batches; only the third asks for classes."""
    rng = np.random.default_rng(7)
    rows = [rng.random((2, 4), dtype=np.float32) for _ in range(5)]

    async def ask(i: int) -> Any:
        x = tgrpc_aio.InferInput("x", [2, 4], "FP32")
        x.set_data_from_numpy(rows[i])
        wanted = [tgrpc_aio.InferRequestedOutput("x", class_count=2 if i == 2 else 0)]
        return (await grpc_client.infer("batched", [x], outputs=wanted)).as_numpy("x")

    answers = await asyncio.gather(*(ask(i) for i in range(5)))
    for i, answer in enumerate(answers):
        if i == 2:
            assert decoded(answer) == expected(rows[i], 2)
        else:
            assert answer.dtype == np.float32 and answer.tolist() == rows[i].tolist()

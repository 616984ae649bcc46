"""The HTTP floor: a bare Starlette app under uvicorn answering V2 JSON inference requests.

    python bench/floors/starlette_json.py --port 8000 [--sklearn digits.joblib]

``POST /v2/models/noop/infer`` echoes the inputs back; ``/v2/models/sklearn/infer`` runs
``predict`` and answers ``label``. JSON in, JSON out, one process: the least an HTTP
server in Python does per request.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def app(estimator: Any) -> Starlette:
    async def infer(request: Request) -> Response:
        doc = json.loads(await request.body())
        name = request.path_params["name"]
        if name == "noop":
            outputs = doc["inputs"]
        elif name == "sklearn" and estimator is not None:
            t = doc["inputs"][0]
            x = np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
            label = estimator.predict(x).tolist()
            outputs = [{"name": "label", "datatype": "INT64", "shape": [len(label)], "data": label}]
        else:
            return Response(status_code=404)
        body = {"model_name": name, "outputs": outputs}
        return Response(json.dumps(body), media_type="application/json")

    async def live(request: Request) -> Response:
        return Response(status_code=200)

    return Starlette(
        routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"]), Route("/v2/health/live", live)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--sklearn", help="joblib file of a fitted estimator, served as model 'sklearn'")
    args = parser.parse_args()
    estimator = None
    if args.sklearn:
        import joblib

        estimator = joblib.load(args.sklearn)
    # h11, uvicorn's pure-Python parser, whatever else the venv has (uvicorn would pick httptools,
    # which shoal depends on): the floor stays the one docs/benchmarks.md has always measured.
    uvicorn.run(
        app(estimator), host=args.host, port=args.port, http="h11", log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()

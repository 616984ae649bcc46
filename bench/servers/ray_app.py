"""Ray Serve: ``noop`` and ``sklearn`` over HTTP (V2 JSON bodies), in three configurations.

    python bench/servers/ray_app.py --http-port P --sklearn digits.joblib

``NAME`` keeps Ray Serve's defaults (``max_ongoing_requests=5``), ``NAME_mo64`` allows 64
requests in flight per replica, ``NAME_batch`` adds ``@serve.batch`` (32 rows, 1 ms).
Each is one application with one replica, routed at ``/v2/models/NAME``. Prints
``ray ready`` once every application is up; stop with SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any

import numpy as np
import ray  # type: ignore[import-not-found]
from ray import serve  # type: ignore[import-not-found]


def _rows(doc: dict[str, Any]) -> np.ndarray:
    t = doc["inputs"][0]
    return np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])


def _label(label: Any) -> dict[str, Any]:
    data = [int(v) for v in label]
    return {
        "model_name": "sklearn",
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [len(data)], "data": data}],
    }


class Noop:
    async def __call__(self, request: Any) -> dict[str, Any]:
        doc = await request.json()
        return {"model_name": "noop", "outputs": doc["inputs"]}


class NoopBatch:
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)  # type: ignore[misc]
    async def run(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"model_name": "noop", "outputs": d["inputs"]} for d in docs]

    async def __call__(self, request: Any) -> dict[str, Any]:
        return await self.run(await request.json())  # type: ignore[no-any-return]


class Sklearn:
    def __init__(self, path: str) -> None:
        import joblib

        self.estimator = joblib.load(path)

    async def __call__(self, request: Any) -> dict[str, Any]:
        return _label(self.estimator.predict(_rows(await request.json())))


class SklearnBatch(Sklearn):
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)  # type: ignore[misc]
    async def run(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = [_rows(d) for d in docs]
        labels = self.estimator.predict(np.concatenate(rows))
        out, at = [], 0
        for r in rows:
            out.append(_label(labels[at : at + len(r)]))
            at += len(r)
        return out

    async def __call__(self, request: Any) -> dict[str, Any]:
        return await self.run(await request.json())  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--sklearn", help="joblib file of a fitted estimator")
    parser.add_argument("--only-noop", action="store_true", help="one application, defaults (idle memory)")
    args = parser.parse_args()

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
    apps: list[tuple[str, Any, tuple[Any, ...], int]] = [("noop", Noop, (), 5)]
    if not args.only_noop:
        apps += [("noop_mo64", Noop, (), 64), ("noop_batch", NoopBatch, (), 64)]
        if args.sklearn:
            apps += [
                ("sklearn", Sklearn, (args.sklearn,), 5),
                ("sklearn_mo64", Sklearn, (args.sklearn,), 64),
                ("sklearn_batch", SklearnBatch, (args.sklearn,), 64),
            ]
    for name, cls, init, ongoing in apps:
        # num_cpus 0: Ray reserves a CPU per replica by default, and two cores hold only two.
        deployment = serve.deployment(
            cls, name=name, num_replicas=1, max_ongoing_requests=ongoing, ray_actor_options={"num_cpus": 0}
        )
        serve.run(deployment.bind(*init), name=name, route_prefix=f"/v2/models/{name}")
    print("ray ready", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()

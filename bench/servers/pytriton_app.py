"""Triton through PyTriton: ``noop`` and ``sklearn``, each without and with dynamic batching.

    python bench/servers/pytriton_app.py --http-port P --grpc-port G --metrics-port M \
        --sklearn digits.joblib --workspace /tmp/x

Models ``noop``/``sklearn`` run every request alone (``batching=False``);
``noop_batch``/``sklearn_batch`` let Triton's dynamic batcher gather up to 32 rows.
Statistics are left unprotected so perf_analyzer can poll them. Stop with SIGINT.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from pytriton.decorators import batch  # type: ignore[import-not-found]
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor  # type: ignore[import-not-found]
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig  # type: ignore[import-not-found]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--sklearn", help="joblib file of a fitted estimator")
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--only-noop", action="store_true", help="one model, no batching (idle memory)")
    args = parser.parse_args()

    @batch  # type: ignore[misc]
    def noop(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"x": x}

    estimator: Any = None
    if args.sklearn:
        import joblib

        estimator = joblib.load(args.sklearn)

    @batch  # type: ignore[misc]
    def classify(input: np.ndarray) -> dict[str, np.ndarray]:
        return {"label": np.asarray(estimator.predict(input), dtype=np.int64).reshape(-1, 1)}

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
    )
    security = TritonSecurityConfig(
        restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"]
    )
    unbatched = ModelConfig(batching=False)
    batched = ModelConfig(batching=True, max_batch_size=32, batcher=DynamicBatcher())
    with Triton(config=config, workspace=args.workspace, security_config=security) as triton:
        for name, cfg, shape in [("noop", unbatched, (-1, 16)), ("noop_batch", batched, (16,))]:
            if args.only_noop and name != "noop":
                continue
            triton.bind(
                model_name=name,
                infer_func=noop,
                inputs=[Tensor(name="x", dtype=np.float32, shape=shape)],
                outputs=[Tensor(name="x", dtype=np.float32, shape=shape)],
                config=cfg,
            )
        if estimator is not None and not args.only_noop:
            for name, cfg, shape, out in [
                ("sklearn", unbatched, (-1, 64), (-1, 1)),
                ("sklearn_batch", batched, (64,), (1,)),
            ]:
                triton.bind(
                    model_name=name,
                    infer_func=classify,
                    inputs=[Tensor(name="input", dtype=np.float32, shape=shape)],
                    outputs=[Tensor(name="label", dtype=np.int64, shape=out)],
                    config=cfg,
                )
        print("pytriton ready", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()

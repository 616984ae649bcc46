"""Convert the digits classifier to ONNX for the onnx backend.

    python examples/convert_digits_onnx.py [OUT]    # OUT defaults to examples/digits.onnx

Converts ``examples/digits.joblib`` (trained by ``train_digits.py``; trained here first if
it is missing) with skl2onnx. The ONNX model has the interface of the sklearn deployment:
input ``input`` FP32 ``[-1, 64]``, outputs ``label`` INT64 ``[-1]`` and ``probabilities``
FP32 ``[-1, 10]``, so ``digits`` and ``digits-onnx`` answer the same requests the same way.
Needs the ``onnx`` extra (skl2onnx, onnx, onnxruntime); runs offline in a few seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import joblib
from skl2onnx import convert_sklearn  # type: ignore[import-untyped]
from skl2onnx.common.data_types import FloatTensorType, Int64TensorType  # type: ignore[import-untyped]

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "digits.joblib"
DEFAULT_OUT = HERE / "digits.onnx"
N_FEATURES = 64


def convert(estimator: Any, out: Path) -> Path:
    """Write ``estimator`` (a fitted classifier taking 64 features) to ``out`` as ONNX; returns ``out``."""
    n_classes = len(estimator.classes_)
    onnx_model = convert_sklearn(
        estimator,
        name="digits",
        initial_types=[("input", FloatTensorType([None, N_FEATURES]))],
        final_types=[
            ("label", Int64TensorType([None])),
            ("probabilities", FloatTensorType([None, n_classes])),
        ],
        # zipmap=False: probabilities as a plain [N, classes] tensor, not a list of dicts.
        options={id(estimator): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(onnx_model.SerializeToString())
    return out


def main(argv: list[str] | None = None) -> Path:
    """Convert ``digits.joblib`` (training it first if missing) and write the ONNX file; returns its path."""
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else DEFAULT_OUT
    if not DEFAULT_MODEL.is_file():
        sys.path.insert(0, str(HERE))
        import train_digits

        train_digits.main([str(DEFAULT_MODEL)])
    convert(joblib.load(DEFAULT_MODEL), out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()

"""Train a digits classifier for the sklearn backend and save it with joblib.

    python examples/train_digits.py [OUT]      # OUT defaults to examples/digits.joblib

The model takes FP32 rows of 64 pixel values (8x8 images, 0-16) and answers ``label``
(INT64, the digit) and ``probabilities`` (FP32, 10 per row). Uses the digits data set
bundled with scikit-learn: no download. Takes a few seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import joblib
import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

DEFAULT_OUT = Path(__file__).resolve().parent / "digits.joblib"


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed train/test split: X_train, X_test, y_train, y_test, features as float32."""
    digits = load_digits()
    # Trained on the dtype clients send (FP32), so serving does not change the numbers.
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    return x_train, x_test, y_train, y_test


def main(argv: list[str] | None = None) -> float:
    """Train, print the test accuracy, write the model; returns the accuracy."""
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else DEFAULT_OUT
    x_train, x_test, y_train, y_test = split()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(x_train, y_train)
    accuracy = float(model.score(x_test, y_test))
    out.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, out)
    print(f"test accuracy {accuracy:.4f} on {len(y_test)} images; wrote {out}")
    return accuracy


if __name__ == "__main__":
    main()

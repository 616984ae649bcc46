"""A model that answers its inputs unchanged: for trying shoal's plumbing.

``delay_ms`` (an option in the spec) makes each call sleep that long, to stand in for
model work when trying batching, queueing and timeouts.
"""

from __future__ import annotations

import time

import numpy as np


class Echo:
    def __init__(self, delay_ms: float = 0.0) -> None:
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
        self.delay_s = delay_ms / 1000

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.delay_s:
            time.sleep(self.delay_s)
        return dict(inputs)

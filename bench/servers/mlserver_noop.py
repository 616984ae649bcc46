"""MLServer's ``noop`` model: a custom runtime answering its inputs unchanged.

Loaded by MLServer from ``model-settings.json`` (``"implementation":
"mlserver_noop.NoopRuntime"``); the suite copies this file beside that settings file.
"""

from __future__ import annotations

from mlserver import MLModel  # type: ignore[import-not-found]
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput  # type: ignore[import-not-found]


class NoopRuntime(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        outputs = [
            ResponseOutput(name=t.name, shape=t.shape, datatype=t.datatype, data=t.data)
            for t in payload.inputs
        ]
        return InferenceResponse(model_name=self.name, outputs=outputs)

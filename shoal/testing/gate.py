"""A model that holds calls until the test lets them go, for tests that need a request
provably in flight inside a real replica process (a drain, a delete, a restart).

    folder = tmp_path / "gate"
    await cluster.deploy({"name": "echo", **gate_model(folder)})
    hold(folder)                                   # calls from now on wait in the model
    pending = asyncio.create_task(client.infer(...))
    await until(lambda: entered(folder))           # one is inside predict
    ...                                            # stop, delete, kill around it
    release(folder)                                # it answers (its inputs, unchanged)

The replica and the test share nothing but files in ``folder``: the model's source, the
``hold`` flag, ``entered``, which a held call creates, and ``calls``, a line per call
begun (its inputs' first values: :func:`calls`), so a test can tell a request that ran
twice. Without ``hold`` the model answers at once, like ``examples/echo.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SOURCE = """
import time
from pathlib import Path

import numpy as np


class Gate:
    def __init__(self, folder: str, max_hold_s: float = 60.0) -> None:
        self.folder = Path(folder)
        self.max_hold_s = max_hold_s

    def predict(self, inputs):
        firsts = {k: np.asarray(v).ravel()[:1].tolist() for k, v in sorted(inputs.items())}
        with open(self.folder / "calls", "a") as out:
            out.write(repr(firsts) + "\\n")
        if (self.folder / "hold").exists():
            (self.folder / "entered").touch()
            deadline = time.monotonic() + self.max_hold_s
            while (self.folder / "hold").exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("the test never released the gate")
                time.sleep(0.01)
        return dict(inputs)
"""


def gate_model(folder: Path) -> dict[str, Any]:
    """Write the model into ``folder`` (created) and return the spec fields that deploy it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gate.py").write_text(SOURCE)
    return {
        "backend": "python",
        "model": "gate:Gate",
        "base_dir": str(folder),
        "options": {"folder": str(folder)},
    }


def hold(folder: Path) -> None:
    """Make calls from now on wait in the model (and forget earlier ``entered`` marks)."""
    (folder / "entered").unlink(missing_ok=True)
    (folder / "hold").touch()


def entered(folder: Path) -> bool:
    """Whether a call has reached the model since :func:`hold`."""
    return (folder / "entered").exists()


def calls(folder: Path) -> list[str]:
    """One line per model call begun, in every replica of the model, oldest first: its
    inputs' first values, as ``{'x': [1.0]}``."""
    path = folder / "calls"
    return path.read_text().splitlines() if path.exists() else []


def release(folder: Path) -> None:
    """Let the held calls (and every later one) answer."""
    (folder / "hold").unlink(missing_ok=True)

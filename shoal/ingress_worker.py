"""``python -m shoal.ingress_worker``: one ingress worker process of a scheduler.

Started by the scheduler (``shoal.run.IngressWorkers``) with its settings, control
address and ids in the ``SHOAL_INGRESS_WORKER`` environment variable (JSON); not a
command for users.
"""

from __future__ import annotations

import json
import os

from shoal import aio, logs
from shoal.run import run_ingress_worker, settings_from_doc


def main() -> None:
    doc = json.loads(os.environ["SHOAL_INGRESS_WORKER"])
    settings = settings_from_doc(doc["settings"])
    logs.setup(settings.log_format, settings.log_level, component="ingress")
    aio.run(
        run_ingress_worker(settings, doc["control"], doc["worker_id"], doc["scheduler_id"]),
        settings.event_loop,
    )


if __name__ == "__main__":
    main()

"""The gRPC switches shoal's processes run with, set on import: imported by the ``shoal``
command (``shoal.cli``) before anything imports grpc, so that the processes it starts
(ingress workers, replicas: they inherit its environment) run with them too.

``GRPC_EXPERIMENTS=pollset_alternative`` (grpcio is pinned, so the experiment's code is
fixed): gRPC core's completion queues wait without the older pollset layer. perf_analyzer
noop gRPC c=32 against the same cluster without it, each cluster in a session of its own
(``bench/env_ab.py``, 2-CPU VM, 2026-12-04): 1.053x (four rounds, 1.036-1.064x; an
unchanged pair in the same run 0.991-1.011x). Set ``GRPC_EXPERIMENTS`` yourself (empty for
none) and it is left as it is.
"""

from __future__ import annotations

import os

GRPC_EXPERIMENTS = "pollset_alternative"

os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)

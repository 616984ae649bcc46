"""The gRPC switches shoal's processes run with, set on import: imported by the ``shoal``
command (``shoal.cli``) before anything imports grpc, so that the processes it starts
(ingress workers, replicas: they inherit its environment) run with them too.

``GRPC_EXPERIMENTS=pollset_alternative`` (grpcio is pinned, so the experiment's code is
fixed): gRPC core's completion queues wait without the older pollset layer. perf_analyzer
noop gRPC c=32 against the same cluster without it, each cluster in a session of its own
(``bench/env_ab.py``, 2-CPU VM, 2026-12-04): 1.053x (four rounds, 1.036-1.064x; an
unchanged pair in the same run 0.991-1.011x). Set ``GRPC_EXPERIMENTS`` yourself (empty for
none) and it is left as it is.

``GRPC_VERBOSITY=ERROR``: gRPC core writes its own lines to stderr, past shoal's logging;
at its default it wrote INFO ones, so ``shoal status --tls-dir certs`` against a head
without TLS printed ``I1205 ... Handshake failed ...`` twice around shoal's one-line
error, and a head with TLS wrote the same for each client with other certificates. Errors still
show; set ``GRPC_VERBOSITY`` yourself (``INFO``, ``DEBUG``) to see the rest.
"""

from __future__ import annotations

import os

GRPC_EXPERIMENTS = "pollset_alternative"

os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

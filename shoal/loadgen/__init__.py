"""``shoal bench NAME``: a load generator for shoal and any Open Inference Protocol server.

    shoal bench echo --protocol grpc --concurrency 32 --duration 10
    shoal bench digits --url 127.0.0.1:8000 --protocol http --rate 500 --requests 5000 --json

Closed loop by default (``--concurrency`` callers, each sending its next request when the
last one is answered); ``--rate R`` makes it an open loop: requests start on a Poisson (or
``--arrival fixed``) schedule whatever the server does, at most ``--concurrency`` in flight,
and latency counts from the scheduled start, so a server that falls behind shows it.

The request is serialized once and sent as raw bytes (``shoal.rpc.loadgen_client``), so one
process keeps up with most servers on the same machine; ``--workers K`` runs K processes
and merges their results. The final table gives requests, errors by kind (gRPC status or
HTTP status), throughput, latency percentiles and the generator's own CPU use: a
generator near 100% of a core is measuring itself; add workers.

This package knows nothing of the wire; ``add_parser`` registers the ``bench`` subcommand
on shoal's CLI, and ``python -m shoal.loadgen`` runs it alone.
"""

# The package, by job: loops (a plan, its result, the closed and open loops), workers
# (a plan split over processes), inputs (random or from files), report (the numbers, the
# table, the progress line), cli (``shoal bench``). This docstring is the command's help.

from shoal.loadgen.cli import add_parser, cmd_bench, main
from shoal.loadgen.loops import Plan, Result, closed_loop, run_plan
from shoal.loadgen.report import render, summarize
from shoal.loadgen.workers import run_workers

__all__ = [
    "Plan",
    "Result",
    "add_parser",
    "closed_loop",
    "cmd_bench",
    "main",
    "render",
    "run_plan",
    "run_workers",
    "summarize",
]

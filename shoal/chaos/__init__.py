"""``shoal chaos NAME``: load a deployment while breaking the cluster under it, and measure.

    shoal chaos echo --kill-replicas-every 1 --duration 30
    shoal chaos echo --kill-scheduler 10 --duration 30 --json
    shoal chaos echo --restart-head 5 --head-restart-cmd "shoal head --state /srv/shoal" --duration 20

Load: ``--concurrency`` callers in a closed loop (or paced to ``--rate`` requests a second)
send shoal's native ``SendRequest`` to one scheduler's ingress: ``--url``, else the first
live scheduler the head names that is not about to be killed. Inputs are shaped from the
deployment's declared inputs (variable dimensions become 1).

Faults, on the clock of the run (seconds since the load started):

- ``--kill-replicas-every S``: every S seconds, ``kill -9`` a random READY replica of the
  deployment. Only replicas running on this machine can be killed: the pid the head
  reports must be a ``shoal.replica_main`` process with that replica id here.
- ``--kill-scheduler AT``: once, ``kill -9`` a scheduler (``--scheduler ID`` or a random
  live one other than the load's target) whose process runs on this machine.
- ``--restart-head AT``: ``kill -9`` the head (``--head-pid``, else the process on this
  machine listening on the head's port) and start it again with ``--head-restart-cmd``:
  only the operator knows how the head was started. Its output goes to ``--head-log``.

Faults are injected for ``--duration`` seconds; then the load goes on until every fault
has recovered (at most ``--recover-timeout``) and ``--settle`` seconds more.

Recovery: the n-th replica kill has recovered when the n-th replica started during the run
is READY (replacements are fungible: whichever kill the head started one for); other
faults when the head reports the deployment
at exactly its replica count, all READY, on live schedulers (and, for a killed scheduler,
that scheduler DEAD). The report gives requests, failed requests by error kind, each
fault's recovery time, and latency p50/p99 before the first fault, during faults (from a
fault to its recovery) and after, as a table or ``--json``; ``--max-failed N`` makes the
command fail when more requests failed.

The engine (:class:`Chaos`, :class:`Fault`) is importable: tests add faults of their own
(partitions, rolling updates) and get the same measurements.
"""

# The package, by job: load (the requests and their samples), faults (what a fault is and
# when it has recovered), processes (finding, killing and restarting shoal's processes on
# this machine), engine (Chaos: faults on a schedule under load), report (the numbers and
# the table), cli (``shoal chaos``). This docstring is the command's help.

from shoal.chaos.cli import add_parser, cmd_chaos, main
from shoal.chaos.engine import Chaos
from shoal.chaos.faults import CONVERGED, REPLACEMENT, Fault, FaultContext, Skip, converged, deployment_of
from shoal.chaos.load import Load, Sample, inputs_for, latency_stats

__all__ = [
    "CONVERGED",
    "REPLACEMENT",
    "Chaos",
    "Fault",
    "FaultContext",
    "Load",
    "Sample",
    "Skip",
    "add_parser",
    "cmd_chaos",
    "converged",
    "deployment_of",
    "inputs_for",
    "latency_stats",
    "main",
]

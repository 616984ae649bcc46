"""Each ingress process on a CPU of its own (``ingress_pin_cpus``).

One request through a grpc.aio server passes between three threads of its process: a gRPC
event-engine thread reads it, the poller thread hands its completion to the event loop,
the loop's thread runs the handler (and back the same way). When those threads sit on
different CPUs every hand-over is a wake-up on another CPU, an inter-processor interrupt,
which on a virtual machine is an exit to the hypervisor. With every thread of an ingress
process kept on one CPU, the hand-overs stay on it. Measured on a 2-CPU VM (perf_analyzer
noop gRPC, two ingress processes, pinned and free in turn on the same running scheduler,
median ratio of requests a second): c=32 1.10x, 1.06x and 1.10x in three runs of 8 to 10
pairs; c=1 1.37x and 1.27x (6 pairs each; p50 1.17 ms against 1.54 ms).

Only ingress processes are pinned, each to a different CPU of those this process may use
(``os.sched_getaffinity``), and only when there are at least two of them and no more than
those CPUs. Replicas, the zygote and a head of its own are not: the kernel keeps moving
them to whichever CPU is free (the head ``shoal up`` runs in the scheduler's main process
shares its CPU). A process started by a pinned thread inherits its CPU; a replica
started that way puts itself back on every CPU its scheduler could use (:func:`release`,
from ``SHOAL_CPUS``).
"""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger("shoal")

#: The CPUs a pinned scheduler could use before it pinned itself, for the processes it starts.
CPUS_ENV = "SHOAL_CPUS"


def usable_cpus() -> list[int]:
    """The CPUs this process may run on, ascending."""
    return sorted(os.sched_getaffinity(0))


def cpu_for(index: int, processes: int, cpus: list[int]) -> int | None:
    """The CPU ingress process ``index`` (0: the scheduler's own) of ``processes`` runs on, or
    None when they are not pinned: fewer than two, or more of them than ``cpus``."""
    if processes < 2 or processes > len(cpus) or not 0 <= index < processes:
        return None
    return cpus[index]


def pin(cpus: set[int]) -> int:
    """Keep every thread of this process, those running and those they start, on ``cpus``.
    Returns how many threads were moved; a thread that ends meanwhile is skipped."""
    moved = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):
            continue
        moved += 1
    return moved


def pin_ingress(index: int, processes: int) -> int | None:
    """Pin this ingress process (``index`` of ``processes``) as the module docstring says;
    the CPU it went to, or None (then it says why in the log when it could have been)."""
    cpus = usable_cpus()
    cpu = cpu_for(index, processes, cpus)
    if cpu is None:
        if processes > len(cpus):
            log.info(
                "ingress processes not pinned: %d of them for %d CPU(s) (setting ingress_pin_cpus)",
                processes,
                len(cpus),
            )
        return None
    os.environ.setdefault(CPUS_ENV, ",".join(str(c) for c in cpus))
    try:
        pin({cpu})
    except OSError as err:  # a seccomp profile or an odd kernel: serve unpinned
        log.info("ingress process not pinned to CPU %d: %s", cpu, err)
        return None
    return cpu


def release() -> None:
    """Put this process back on the CPUs in ``SHOAL_CPUS`` (those its pinned scheduler could
    use), when it inherited one pinned CPU from the thread that started it. Nothing without
    the variable, or when it names no CPU this process may be given."""
    named = os.environ.get(CPUS_ENV, "")
    try:
        cpus = {int(c) for c in named.split(",") if c}
    except ValueError:
        return
    if not cpus or os.sched_getaffinity(0) == cpus:
        return
    with contextlib.suppress(OSError):  # not ours to run on any more (a changed cpuset)
        pin(cpus)

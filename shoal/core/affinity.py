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

Of whole processes, only ingress processes are pinned, each to a different CPU of those
this process may use (``os.sched_getaffinity``), and only when there are at least two of
them and no more than those CPUs. The zygote and a head of its own are not: the kernel keeps moving them to
whichever CPU is free (the head ``shoal up`` runs in the scheduler's main process shares its
CPU). A process started by a pinned thread inherits its CPU; a replica started that way
puts itself back on every CPU its scheduler could use (:func:`release`, from
``SHOAL_CPUS``).

Of a replica, one thread may be pinned: its event loop's (``replica_pin_loop``,
:class:`LoopPins`), one replica per ingress CPU, the busiest. Free, the loop thread of a
replica that both ingress processes wake in turn is moved by the kernel from one CPU to the
other again and again; kept on one, half its wake-ups stay on that CPU. Measured on a 2-CPU
VM (perf_analyzer c=32, two ingress processes, the one replica's loop thread pinned and free
in turn on the same running cluster, six pairs each): noop 1.10x the requests a second,
batched sklearn 1.02-1.03x; noop c=1 1.14x (1.28-1.33x when the client's connection is on the
replica's CPU, 0.97-1.01x when it is on the other). The replica's other threads (the model's
thread, BLAS, torch, ...) stay free: the threads it starts for its model put themselves back
on every CPU (:func:`free_thread`), since a thread inherits the CPUs of the one that starts
it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence

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


# The CPUs this process started with (after release): where free_thread puts a thread.
_started_on: set[int] | None = None


def release() -> None:
    """Put this process back on the CPUs in ``SHOAL_CPUS`` (those its pinned scheduler could
    use), when it inherited one pinned CPU from the thread that started it. Nothing without
    the variable, or when it names no CPU this process may be given. Either way, what it
    runs on then is where :func:`free_thread` puts threads."""
    global _started_on
    named = os.environ.get(CPUS_ENV, "")
    try:
        cpus = {int(c) for c in named.split(",") if c}
    except ValueError:
        cpus = set()
    if cpus and os.sched_getaffinity(0) != cpus:
        with contextlib.suppress(OSError):  # not ours to run on any more (a changed cpuset)
            pin(cpus)
    _started_on = os.sched_getaffinity(0)


def free_thread() -> None:
    """Put the calling thread on the CPUs its process started with (:func:`release`), though
    the thread that started it may be pinned: a replica's event loop (:class:`LoopPins`)
    starts its model's threads. An executor's ``initializer``. Nothing before
    :func:`release` ran."""
    if _started_on is not None and os.sched_getaffinity(0) != _started_on:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, _started_on)


def ingress_cpus(processes: int) -> list[int]:
    """The CPUs the ``processes`` ingress processes run on, one each, when :func:`cpu_for`
    pins them; empty when it does not."""
    cpus = usable_cpus()
    if cpu_for(0, processes, cpus) is None:
        return []
    return cpus[:processes]


_TICKS = os.sysconf("SC_CLK_TCK")


def replica_cpu_seconds(pid: int) -> tuple[float, float] | None:
    """The CPU seconds (user and system) of process ``pid``'s first thread, where a replica
    runs its event loop, and of the whole process; None when it is gone."""
    try:
        seconds = []
        for stat in (f"/proc/{pid}/task/{pid}/stat", f"/proc/{pid}/stat"):
            with open(stat, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            seconds.append((int(fields[11]) + int(fields[12])) / _TICKS)
    except (OSError, IndexError, ValueError):
        return None
    return seconds[0], seconds[1]


def threads_on(pid: int, cpu: int) -> list[int]:
    """The threads of process ``pid`` but its first that may run on ``cpu`` alone: those a
    pinned loop thread started (they inherit its CPU) and that did not free themselves."""
    found = []
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/task"):
            tid = int(name)
            with contextlib.suppress(OSError):
                if tid != pid and os.sched_getaffinity(tid) == {cpu}:
                    found.append(tid)
    return found


class LoopPins:
    """Replicas' event-loop threads on the ingress processes' CPUs (``replica_pin_loop``).

    At most one replica's loop thread per CPU in ``cpus`` (the ingress processes' CPUs), so
    that a loop never shares its CPU with another pinned loop the kernel could not move
    away; the rest run free. A replica that becomes READY takes a CPU no loop holds, the
    first first (the scheduler's own process's: on the 2-CPU VM a lone noop replica served
    1.09x with its loop there and 1.04x on the worker's CPU, against free, two runs). Every
    :meth:`rebalance` (every ``replica_pin_interval_s``) the CPU each loop thread used since the
    last one decides: a free loop that used more than 1.5x the CPU of the least busy pinned
    one, and 2% of a CPU more, takes its place; an empty CPU goes to the busiest free loop;
    and a pinned loop busier by those margins than the one on an earlier CPU trades places
    with it, so that the busiest holds the first. Unpinned, a thread goes back on
    ``everywhere``. The kernel counts CPU time in clock ticks (10 ms), so over a short
    interval the margin is at least MARGIN_TICKS ticks: an idle loop that happened to be
    running at one tick does not take an idle one's place.

    Only while the replicas' other threads (their models' threads, BLAS, ...) are nearly idle:
    once they used over MODELS_BUSY of a CPU together, every loop runs free until they use
    under MODELS_IDLE. That is judged over MODELS_WINDOW_S at least, however often
    :meth:`rebalance` runs, so that a burst of a model's work does not free every loop. A
    pinned loop cannot move off a CPU a model's thread computes on, and the kernel's free
    choice served a noop replica beside two CPU-bound ones better (c=1 p99 1.0-1.1 ms free
    against 2.6-3.2 ms with the noop loop pinned, four pairs).
    """

    SWAP_RATIO = 1.5
    SWAP_MARGIN = 0.02  # of a CPU
    MARGIN_TICKS = 2  # of the kernel's clock ticks over the interval, at least
    MODELS_BUSY = 0.5  # of a CPU, the replicas' threads but their loops' together
    MODELS_IDLE = 0.25
    MODELS_WINDOW_S = 1.0

    def __init__(
        self,
        cpus: Sequence[int],
        everywhere: Iterable[int],
        *,
        set_affinity: Callable[[int, set[int]], None] = os.sched_setaffinity,
        cpu_seconds: Callable[[int], tuple[float, float] | None] = replica_cpu_seconds,
        pinned_threads: Callable[[int, int], list[int]] = threads_on,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cpus = list(cpus)
        self.everywhere = set(everywhere)
        self.on: dict[int, int] = {}  # replica pid -> the CPU its loop thread runs on
        self.models_busy = False  # every loop free until the models' threads quieten
        self._set_affinity = set_affinity
        self._cpu_seconds = cpu_seconds
        self._pinned_threads = pinned_threads
        self._clock = clock
        # replica pid -> its (loop, process) CPU seconds at the last rebalance
        self._seen: dict[int, tuple[float, float]] = {}
        self._at = clock()
        # the models' CPU seconds since the window began, and when it began
        self._models_seconds = 0.0
        self._models_since = self._at

    def add(self, pid: int) -> int | None:
        """Replica ``pid`` is READY: its loop thread onto a CPU no loop holds; that CPU, or None."""
        cpu = None if self.models_busy else self._empty()
        if cpu is None or not self._move(pid, cpu):
            return None
        return cpu

    def remove(self, pid: int) -> None:
        """Replica ``pid`` exited."""
        self.on.pop(pid, None)
        self._seen.pop(pid, None)

    def rebalance(self, pids: Iterable[int]) -> list[tuple[int, int | None]]:
        """``pids``: the READY replicas now. Moves loops as the class docstring says; returns
        the moves, (pid, its CPU or None for free)."""
        now = self._clock()
        elapsed, self._at = now - self._at, now
        live = set(pids)
        for gone in [p for p in [*self._seen, *self.on] if p not in live]:
            self.remove(gone)
        use: dict[int, float] = {}  # pid -> its loop thread's share of a CPU
        models = 0.0  # the replicas' other threads' shares, together
        for pid in live:
            seconds = self._cpu_seconds(pid)
            if seconds is None:
                self.remove(pid)
                continue
            before = self._seen.get(pid)
            self._seen[pid] = seconds
            if before is not None and elapsed > 0:
                loop, process = seconds[0] - before[0], seconds[1] - before[1]
                use[pid] = max(0.0, loop) / elapsed
                models += max(0.0, process - loop) / elapsed
        moves: list[tuple[int, int | None]] = []
        self._models_seconds += models * elapsed
        window = now - self._models_since
        if window >= self.MODELS_WINDOW_S:
            models, self._models_seconds, self._models_since = self._models_seconds / window, 0.0, now
            if self.models_busy and models < self.MODELS_IDLE:
                self.models_busy = False
            elif not self.models_busy and models > self.MODELS_BUSY:
                self.models_busy = True
                for pid in list(self.on):
                    if self._free(pid):
                        moves.append((pid, None))
        if self.models_busy:
            return moves
        margin = max(self.SWAP_MARGIN, self.MARGIN_TICKS / _TICKS / elapsed) if elapsed > 0 else 1.0
        for pid in sorted((p for p in use if p not in self.on), key=lambda p: use[p], reverse=True):
            cpu = self._empty()
            if cpu is None:
                idlest = min(self.on, key=lambda p: use.get(p, 0.0), default=None)
                if idlest is None:
                    break
                if not self._busier(use[pid], use.get(idlest, 0.0), margin):
                    break  # the rest are less busy still
                cpu = self.on[idlest]
                if self._free(idlest):
                    moves.append((idlest, None))
            if self._move(pid, cpu):
                moves.append((pid, cpu))
        return moves + self._order(use, margin)

    def _order(self, use: dict[int, float], margin: float) -> list[tuple[int, int | None]]:
        """The busiest pinned loop on the first CPU, the next on the second, ...: a loop
        busier (by the same margins) than the one on an earlier CPU trades places with it."""
        moves: list[tuple[int, int | None]] = []
        for i, cpu in enumerate(self.cpus):
            holder = next((p for p, c in self.on.items() if c == cpu), None)
            later = [p for p, c in self.on.items() if c in self.cpus[i + 1 :]]
            if holder is None or not later:
                continue
            busiest = max(later, key=lambda p: use.get(p, 0.0))
            if not self._busier(use.get(busiest, 0.0), use.get(holder, 0.0), margin):
                continue
            other = self.on[busiest]
            if self._move(busiest, cpu) and self._move(holder, other):
                moves += [(busiest, cpu), (holder, other)]
        return moves

    def _busier(self, one: float, than: float, margin: float) -> bool:
        """Whether a loop that used ``one`` of a CPU should take the place of one that used
        ``than``: by enough (``margin``, of a CPU, at least) that two loops about as busy do
        not trade places at every look."""
        return one > self.SWAP_RATIO * than and one - than >= margin

    def _empty(self) -> int | None:
        held = set(self.on.values())
        return next((cpu for cpu in self.cpus if cpu not in held), None)

    def _move(self, pid: int, cpu: int) -> bool:
        try:
            self._set_affinity(pid, {cpu})  # the thread whose id is the pid: the loop's alone
        except ProcessLookupError:
            self.remove(pid)
            return False
        except OSError as err:  # not allowed here (a seccomp profile): leave every loop free
            log.info("replica event loops not pinned: %s (setting replica_pin_loop)", err)
            self.cpus = []
            return False
        self.on[pid] = cpu
        return True

    def _free(self, pid: int) -> bool:
        """The loop thread back on every CPU, and any thread it started that inherited its CPU
        (a model's code may start threads from the loop, where short calls run)."""
        cpu = self.on.pop(pid, None)
        try:
            self._set_affinity(pid, self.everywhere)
        except OSError:
            return False
        for tid in self._pinned_threads(pid, cpu) if cpu is not None else ():
            with contextlib.suppress(OSError):
                self._set_affinity(tid, self.everywhere)
        return True

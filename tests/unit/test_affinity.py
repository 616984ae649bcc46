"""Ingress processes on CPUs of their own (``shoal.core.affinity``): which CPU each gets, and
that pinning moves every thread of the process, those it starts later too, and that a
process started by a pinned thread can go back to every CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from shoal.core import affinity

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("index", "processes", "cpus", "expected"),
    [
        (0, 2, [0, 1], 0),
        (1, 2, [0, 1], 1),
        (1, 2, [2, 5, 7], 5),  # the CPUs this process may use, in order (a cpuset)
        (0, 1, [0, 1], None),  # one ingress process: free
        (0, 3, [0, 1], None),  # more processes than CPUs: free
        (2, 2, [0, 1], None),  # no such process
    ],
)
def test_each_ingress_process_gets_a_cpu_of_its_own(
    index: int, processes: int, cpus: list[int], expected: int | None
) -> None:
    assert affinity.cpu_for(index, processes, cpus) == expected


PROBE = """
import json, os, sys, threading, time
from shoal.core import affinity

stop = threading.Event()
def idle():
    stop.wait()

def masks():
    return sorted(sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task"))

before = threading.Thread(target=idle); before.start()
mode, cpu = sys.argv[1], int(sys.argv[2])
if mode == "pin":
    moved = affinity.pin({cpu})
    after = threading.Thread(target=idle); after.start()  # started once pinned
    out = {"moved": moved, "masks": masks()}
else:
    affinity.pin({cpu})  # as if started by a pinned thread
    affinity.release()
    after = threading.Thread(target=idle); after.start()
    out = {"masks": masks()}
stop.set()
print(json.dumps(out))
"""


def probe(mode: str, cpu: int, env: dict[str, str] | None = None) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(cpu)],
        capture_output=True,
        text=True,
        timeout=20,
        env={**os.environ, **(env or {})},
        check=True,
    )
    found: dict[str, object] = json.loads(done.stdout)
    return found


def test_pinning_moves_every_thread_and_those_started_after() -> None:
    cpu = affinity.usable_cpus()[-1]
    out = probe("pin", cpu)
    assert out["moved"] == 2  # the main thread and the one started before
    assert out["masks"] == [[cpu]] * 3


def test_a_process_started_pinned_goes_back_to_the_cpus_its_scheduler_could_use() -> None:
    cpus = affinity.usable_cpus()
    out = probe("release", cpus[0], {affinity.CPUS_ENV: ",".join(map(str, cpus))})
    assert out["masks"] == [cpus] * 3  # main, started before, started after


def test_without_the_variable_a_pinned_process_stays_as_it_is() -> None:
    cpu = affinity.usable_cpus()[0]
    env = {k: v for k, v in os.environ.items() if k != affinity.CPUS_ENV}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "release", str(cpu)],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
        check=True,
    )
    assert json.loads(done.stdout)["masks"] == [[cpu]] * 3


# ---------------------------------------------------------------- replicas' event loops


class Machine:
    """What LoopPins sees of replica processes: their loop threads' CPU seconds and masks."""

    def __init__(self) -> None:
        self.now = 0.0
        self.seconds: dict[int, float] = {}
        self.model_seconds: dict[int, float] = {}
        self.threads: dict[int, list[int]] = {}  # pid -> its other threads' ids
        self.masks: dict[int, set[int]] = {}
        self.refuse: type[OSError] | None = None

    def set_affinity(self, pid: int, cpus: set[int]) -> None:
        if pid not in self.seconds and not any(pid in t for t in self.threads.values()):
            raise ProcessLookupError(pid)
        if self.refuse is not None:
            raise self.refuse("Operation not permitted")
        self.masks[pid] = set(cpus)

    def cpu_seconds(self, pid: int) -> tuple[float, float] | None:
        if pid not in self.seconds:
            return None
        return self.seconds[pid], self.seconds[pid] + self.model_seconds.get(pid, 0.0)

    def run(self, seconds: float, use: dict[int, float], models: dict[int, float] | None = None) -> None:
        """``seconds`` pass; each replica's loop uses ``use[pid]`` of a CPU meanwhile, its
        other threads ``models[pid]``."""
        self.now += seconds
        for pid, share in use.items():
            self.seconds[pid] += share * seconds
        for pid, share in (models or {}).items():
            self.model_seconds[pid] = self.model_seconds.get(pid, 0.0) + share * seconds

    def pins(self, cpus: list[int]) -> affinity.LoopPins:
        return affinity.LoopPins(
            cpus,
            cpus,
            set_affinity=self.set_affinity,
            cpu_seconds=self.cpu_seconds,
            pinned_threads=lambda pid, cpu: sorted(
                t for t in self.threads.get(pid, ()) if self.masks.get(t) == {cpu}
            ),
            clock=lambda: self.now,
        )


def test_ready_replicas_take_the_empty_cpus_in_order_then_run_free() -> None:
    machine = Machine()
    machine.seconds = {101: 0.0, 102: 0.0, 103: 0.0}
    pins = machine.pins([0, 1])
    assert pins.add(101) == 0
    assert pins.add(102) == 1
    assert pins.add(103) is None  # no CPU without a loop: the kernel places it
    assert machine.masks == {101: {0}, 102: {1}}
    pins.remove(101)  # it exited: its CPU goes to the next replica
    assert pins.add(103) == 0


def test_a_busier_free_loop_takes_the_cpu_of_the_idlest_pinned_one() -> None:
    machine = Machine()
    machine.seconds = {101: 0.0, 102: 0.0, 103: 0.0}
    pins = machine.pins([0, 1])
    pins.add(101)
    pins.add(102)
    pins.rebalance([101, 102, 103])  # the first look: nothing to compare yet
    machine.run(1.0, {101: 0.30, 102: 0.01, 103: 0.40})
    assert pins.rebalance([101, 102, 103]) == [(102, None), (103, 1)]
    assert pins.on == {101: 0, 103: 1}
    assert machine.masks[102] == {0, 1}  # back on every CPU
    # Close calls stay as they are: no loop moves back and forth between pings.
    machine.run(1.0, {101: 0.30, 102: 0.35, 103: 0.30})
    assert pins.rebalance([101, 102, 103]) == []


def test_the_busiest_pinned_loop_takes_the_first_cpu() -> None:
    machine = Machine()
    machine.seconds = {101: 0.0, 102: 0.0}
    pins = machine.pins([0, 1])
    pins.add(101)  # READY first: the first CPU, though it will be the idle one
    pins.add(102)
    pins.rebalance([101, 102])
    machine.run(1.0, {101: 0.01, 102: 0.25})
    assert pins.rebalance([101, 102]) == [(102, 0), (101, 1)]
    assert machine.masks == {101: {1}, 102: {0}}
    machine.run(1.0, {101: 0.2, 102: 0.25})  # close: they stay
    assert pins.rebalance([101, 102]) == []


def test_a_small_difference_in_idle_loops_moves_nothing() -> None:
    machine = Machine()
    machine.seconds = {101: 0.0, 102: 0.0}
    pins = machine.pins([0])
    pins.add(101)
    pins.rebalance([101, 102])
    machine.run(1.0, {101: 0.0, 102: 0.015})  # 1.5x of nothing, but under 2% of a CPU
    assert pins.rebalance([101, 102]) == []
    assert pins.on == {101: 0}


def test_an_empty_cpu_goes_to_the_busiest_free_loop() -> None:
    machine = Machine()
    machine.seconds = {101: 0.0, 102: 0.0, 103: 0.0}
    pins = machine.pins([0, 1])
    for pid in (101, 102, 103):
        pins.add(pid)
    pins.rebalance([101, 102, 103])
    machine.run(2.0, {101: 0.2, 102: 0.2, 103: 0.5})
    del machine.seconds[101]  # exited between two pings
    assert pins.rebalance([102, 103]) == [(103, 0)]
    assert pins.on == {102: 1, 103: 0}


def test_while_models_keep_cpus_busy_every_loop_runs_free() -> None:
    machine = Machine()
    machine.seconds = {101: 0.0, 102: 0.0, 103: 0.0, 104: 0.0}
    pins = machine.pins([0, 1])
    pins.add(101)
    pins.add(102)
    pins.rebalance([101, 102, 103])
    # Two replicas' models compute on their own threads: a pinned loop could not move off.
    # One of 102's was started from its pinned loop (a model's code may), so shares its CPU.
    machine.threads[102] = [1021, 1022]
    machine.masks[1021], machine.masks[1022] = {1}, {0, 1}
    machine.run(1.0, {101: 0.2, 102: 0.02, 103: 0.02}, models={102: 0.4, 103: 0.3})
    assert sorted(pins.rebalance([101, 102, 103])) == [(101, None), (102, None)]
    assert pins.on == {} and machine.masks[101] == machine.masks[102] == {0, 1}
    assert machine.masks[1021] == {0, 1}  # freed with the loop that started it
    assert pins.add(104) is None  # nor does a replica that becomes READY meanwhile
    # Between the two marks nothing changes; under the lower one loops are pinned again.
    machine.run(1.0, {101: 0.2, 102: 0.02, 103: 0.02}, models={102: 0.2, 103: 0.1})
    assert pins.rebalance([101, 102, 103]) == [] and pins.models_busy
    machine.run(1.0, {101: 0.2, 102: 0.02, 103: 0.02}, models={102: 0.1, 103: 0.1})
    assert pins.rebalance([101, 102, 103])[0] == (101, 0)
    assert not pins.models_busy and pins.on[101] == 0


def test_looked_at_every_quarter_second_a_moved_load_is_followed_and_a_stray_tick_is_not() -> None:
    machine = Machine()
    machine.seconds = {101: 0.0, 102: 0.0}
    pins = machine.pins([0])
    pins.add(101)
    pins.rebalance([101, 102])
    # One clock tick (10 ms) of an idle loop in a quarter second is 4% of a CPU: not a move.
    machine.run(0.25, {101: 0.0, 102: 0.04})
    assert pins.rebalance([101, 102]) == []
    # The load moved from 101's model to 102's: one quarter second later its loop follows.
    machine.run(0.25, {101: 0.0, 102: 0.3})
    assert pins.rebalance([101, 102]) == [(101, None), (102, 0)]


def test_a_burst_of_model_work_shorter_than_a_second_leaves_the_loops_pinned() -> None:
    machine = Machine()
    machine.seconds = {101: 0.0, 102: 0.0}
    pins = machine.pins([0, 1])
    pins.add(101)
    pins.rebalance([101, 102])
    machine.run(0.25, {101: 0.2}, models={102: 0.9})  # a quarter second of a model computing
    pins.rebalance([101, 102])
    assert not pins.models_busy
    for _ in range(3):
        machine.run(0.25, {101: 0.2})
        pins.rebalance([101, 102])
    assert not pins.models_busy and pins.on == {101: 0, 102: 1}  # 0.23 of a CPU over the second
    for _ in range(4):  # over a whole second: every loop runs free
        machine.run(0.25, {101: 0.2}, models={102: 0.9})
        pins.rebalance([101, 102])
    assert pins.models_busy and pins.on == {}


def test_where_pinning_is_not_allowed_every_loop_stays_free() -> None:
    machine = Machine()
    machine.seconds = {101: 0.0, 102: 0.0}
    machine.refuse = PermissionError
    pins = machine.pins([0, 1])
    assert pins.add(101) is None
    machine.refuse = None
    assert pins.add(102) is None  # it gave up for good, rather than pin some and not others
    assert pins.on == {} and machine.masks == {}


def spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_loop_thread_uses_cpu_seconds_as_the_kernel_counts_them() -> None:
    before = affinity.replica_cpu_seconds(os.getpid())
    assert before is not None
    spin(0.2)
    model = threading.Thread(target=spin, args=(0.2,))
    model.start()
    model.join()
    after = affinity.replica_cpu_seconds(os.getpid())
    assert after is not None
    loop, process = after[0] - before[0], after[1] - before[1]
    assert loop >= 0.1  # this (the first) thread's 0.2 s
    assert process - loop >= 0.1  # and the other thread's, in the process's alone
    assert affinity.replica_cpu_seconds(2**22 + 12345) is None  # no such process


def test_threads_on_finds_the_threads_kept_on_one_cpu() -> None:
    cpus = affinity.usable_cpus()
    if len(cpus) < 2:
        pytest.skip("one CPU: nothing to pin")
    pinned, done = threading.Event(), threading.Event()
    ids: list[int] = []

    def kept() -> None:
        ids.append(threading.get_native_id())
        os.sched_setaffinity(0, {cpus[-1]})
        pinned.set()
        done.wait(10)

    thread = threading.Thread(target=kept)
    thread.start()
    try:
        assert pinned.wait(10)
        assert affinity.threads_on(os.getpid(), cpus[-1]) == ids
        assert affinity.threads_on(os.getpid(), cpus[0]) == []
    finally:
        done.set()
        thread.join()
    assert affinity.threads_on(2**22 + 12345, 0) == []  # no such process


FREE_PROBE = """
import json, os, sys, threading
from concurrent.futures import ThreadPoolExecutor
from shoal.core import affinity

affinity.release()  # as a replica starts: records the CPUs it started with
every = sorted(os.sched_getaffinity(0))
os.sched_setaffinity(0, {every[0]})  # its scheduler pins the loop's thread
masks = {}
def mask(name):
    masks[name] = sorted(os.sched_getaffinity(0))
with ThreadPoolExecutor(initializer=affinity.free_thread) as pool:
    pool.submit(mask, "executor").result()
thread = threading.Thread(target=mask, args=("plain",))
thread.start(); thread.join()
mask("loop")
print(json.dumps({"every": every, **masks}))
"""


def test_threads_a_pinned_loop_starts_for_its_model_run_on_every_cpu() -> None:
    if len(affinity.usable_cpus()) < 2:
        pytest.skip("one CPU: nothing to pin")
    done = subprocess.run(
        [sys.executable, "-c", FREE_PROBE], capture_output=True, text=True, timeout=20, check=True
    )
    out = json.loads(done.stdout)
    assert out["loop"] == out["every"][:1]
    assert out["executor"] == out["every"]  # free_thread as the executor's initializer
    assert out["plain"] == out["every"][:1]  # what free_thread is for: a plain thread inherits

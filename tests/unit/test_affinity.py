"""Ingress processes on CPUs of their own (``shoal.core.affinity``): which CPU each gets, and
that pinning moves every thread of the process, those it starts later too, and that a
process started by a pinned thread can go back to every CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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

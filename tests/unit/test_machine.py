"""What a scheduler offers when not told: the least of the machine, its CPU affinity and its
control group's limits (``shoal.scheduler.machine``), over fake cgroup files.

Before, it read the machine alone: in a container limited to 2 CPUs and 4 GB on a large
host it offered the host's CPUs and memory, and placement filled them."""

from __future__ import annotations

import os

import psutil
import pytest

from shoal.scheduler.machine import (
    Bound,
    Read,
    cgroup_cpus,
    cgroup_memory_mb,
    oom_kills,
    usable_cpus,
    usable_memory_mb,
)
from shoal.scheduler.node import MAX_REPLICAS_DEFAULT, replica_slots

pytestmark = pytest.mark.timeout(10)

GiB = 2**30


def files(tree: dict[str, str]) -> Read:
    return tree.get


def test_a_v2_container_offers_its_cpu_max_and_memory_max() -> None:
    read = files({"/sys/fs/cgroup/cpu.max": "200000 100000\n", "/sys/fs/cgroup/memory.max": f"{4 * GiB}\n"})

    assert cgroup_cpus("0::/\n", read) == Bound(2.0, "cgroup / cpu.max")
    assert cgroup_memory_mb("0::/\n", read) == Bound(4096.0, "cgroup / memory.max")


def test_the_least_limit_along_the_groups_ancestors_holds() -> None:
    read = files(
        {
            "/sys/fs/cgroup/shoal.slice/cpu.max": "150000 100000\n",
            "/sys/fs/cgroup/shoal.slice/scheduler.service/cpu.max": "max 100000\n",
            "/sys/fs/cgroup/shoal.slice/memory.max": "max\n",
            "/sys/fs/cgroup/shoal.slice/scheduler.service/memory.max": f"{GiB}\n",
            "/sys/fs/cgroup/memory.max": "max\n",
        }
    )
    group = "0::/shoal.slice/scheduler.service\n"

    assert cgroup_cpus(group, read) == Bound(1.5, "cgroup /shoal.slice cpu.max")
    assert cgroup_memory_mb(group, read) == Bound(1024.0, "cgroup /shoal.slice/scheduler.service memory.max")


def test_a_v1_container_reads_its_own_group_at_the_mount_root() -> None:
    # docker without a cgroup namespace: /proc/self/cgroup names the host's path, while the
    # container's own group is what is mounted.
    proc = "11:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"
    read = files(
        {
            "/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "50000\n",
            "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes": f"{2 * GiB}\n",
        }
    )

    assert cgroup_cpus(proc, read) == Bound(0.5, "cgroup / cpu.cfs_quota_us")
    assert cgroup_memory_mb(proc, read) == Bound(2048.0, "cgroup / memory.limit_in_bytes")


def test_groups_without_limits_leave_the_machine() -> None:
    proc = "4:memory:/user.slice\n3:cpu,cpuacct:/user.slice\n0::/user.slice\n"
    read = files(
        {
            "/proc/self/cgroup": proc,
            "/sys/fs/cgroup/cpu/user.slice/cpu.cfs_quota_us": "-1\n",
            "/sys/fs/cgroup/cpu/user.slice/cpu.cfs_period_us": "100000\n",
            "/sys/fs/cgroup/memory/user.slice/memory.limit_in_bytes": "9223372036854771712\n",
            "/sys/fs/cgroup/user.slice/cpu.max": "max 100000\n",
            "/sys/fs/cgroup/user.slice/memory.max": "max\n",
        }
    )

    assert cgroup_cpus(proc, read) is None
    assert cgroup_memory_mb(proc, read) is None
    machine = float(min(psutil.cpu_count() or 1, len(os.sched_getaffinity(0))))
    assert usable_cpus(read).value == machine
    assert usable_memory_mb(read) == Bound(psutil.virtual_memory().total / 2**20, "the machine")


def test_a_limit_below_the_machine_is_what_is_offered() -> None:
    read = files({"/proc/self/cgroup": "0::/\n", "/sys/fs/cgroup/cpu.max": "10000 100000\n"})

    assert usable_cpus(read) == Bound(0.1, "cgroup / cpu.max")


def test_max_replicas_by_default_is_one_per_128_mb_offered_from_1_to_100() -> None:
    # Without a bound, a 2-CPU scheduler took 200 replicas of cpus 0.01 (50 MB and more each).
    assert replica_slots(-1, 4096) == 32  # a container of 4 GB
    assert replica_slots(-1, 24_000) == MAX_REPLICAS_DEFAULT == 100
    assert replica_slots(-1, 0) == 1  # --memory-mb 0 still runs one
    assert replica_slots(5, 4096) == 5  # as set
    assert replica_slots(0, 4096) == 0  # no bound


def test_oom_kills_are_counted_by_the_nearest_memory_group_else_the_machine() -> None:
    v2 = files(
        {
            "/proc/self/cgroup": "0::/docker/abc\n",
            "/sys/fs/cgroup/docker/abc/memory.events": "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n",
            "/sys/fs/cgroup/docker/memory.events": "oom_kill 7\n",
            "/proc/vmstat": "nr_free_pages 1\noom_kill 9\n",
        }
    )
    v1 = files(
        {
            "/proc/self/cgroup": "4:memory:/abc\n0::/\n",
            "/sys/fs/cgroup/memory/abc/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
            "/proc/vmstat": "oom_kill 9\n",
        }
    )
    machine_only = files({"/proc/self/cgroup": "0::/\n", "/proc/vmstat": "pgfault 5\noom_kill 9\n"})

    assert oom_kills(v2) == Bound(2, "cgroup /docker/abc memory.events")
    assert oom_kills(v1) == Bound(3, "cgroup /abc memory.oom_control")
    assert oom_kills(machine_only) == Bound(9, "/proc/vmstat")
    assert oom_kills(files({})) is None

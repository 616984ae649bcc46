"""What this machine lets a scheduler's process use: the CPUs and memory a scheduler offers
its replicas when not told (``--cpus``, ``--memory-mb``).

The least of what the machine has and what bounds the process: its CPU affinity
(``taskset``, ``numactl``) and its control group's limits (``docker run --cpus 2 --memory
4g``, a systemd unit's ``CPUQuota=``/``MemoryMax=``, a Kubernetes container's limits),
cgroup v2 (``cpu.max``, ``memory.max``) or v1 (``cpu.cfs_quota_us`` over
``cpu.cfs_period_us``, ``memory.limit_in_bytes``), the least along the group's ancestors.
Reading the machine alone, a scheduler in a container limited to 2 CPUs on a 64-CPU host
offered 64, and placement put 32 times the replicas there that the container could run.

Pure functions over file contents; ``read`` is the seam (``read_file`` on a real machine).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import psutil

CGROUP_ROOT = "/sys/fs/cgroup"
MACHINE = "the machine"
"""The source of a :class:`Bound` that is the machine's own amount."""

Read = Callable[[str], "str | None"]
"""A file's text, or None when it cannot be read."""


def read_file(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class Bound:
    """A limit on this process, and what set it (``cgroup /docker/abc cpu.max``)."""

    value: float
    source: str


def _ancestors(path: str) -> list[str]:
    """``/a/b`` -> ``/a/b``, ``/a``, ``/``. In a container whose cgroup is not namespaced
    (v1), ``/proc/self/cgroup`` names the host's path while the container's own group is
    mounted at the root: the paths that do not exist there read as no limit."""
    p = PurePosixPath(path if path.startswith("/") else "/" + path)
    return [str(p), *(str(a) for a in p.parents)]


def _groups(proc_cgroup: str) -> tuple[str | None, dict[str, str]]:
    """``/proc/self/cgroup``: (the v2 path, or None; v1 controller -> path)."""
    v2 = None
    v1: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            v2 = path
        for name in controllers.split(","):
            if name:
                v1[name] = path
    return v2, v1


def _number(text: str | None) -> float | None:
    try:
        return float(text.strip()) if text is not None else None
    except ValueError:
        return None


def cgroup_cpus(proc_cgroup: str, read: Read, root: str = CGROUP_ROOT) -> Bound | None:
    """The CPUs this process's control group may use (a quota over a period), the least
    along its ancestors; None when no group sets one."""
    v2, v1 = _groups(proc_cgroup)
    found: list[Bound] = []
    if v2 is not None:
        for group in _ancestors(v2):
            text = read(f"{root}{group.rstrip('/')}/cpu.max")
            fields = text.split() if text else []
            if len(fields) == 2 and fields[0] != "max":
                quota, period = _number(fields[0]), _number(fields[1])
                if quota is not None and period:
                    found.append(Bound(quota / period, f"cgroup {group} cpu.max"))
    if "cpu" in v1:
        for group in _ancestors(v1["cpu"]):
            folder = f"{root}/cpu{group.rstrip('/')}"  # "cpu": a link to "cpu,cpuacct" where joined
            quota = _number(read(f"{folder}/cpu.cfs_quota_us"))  # -1: none
            period = _number(read(f"{folder}/cpu.cfs_period_us"))
            if quota is not None and quota > 0 and period:
                found.append(Bound(quota / period, f"cgroup {group} cpu.cfs_quota_us"))
    return min(found, key=lambda b: b.value, default=None)


def cgroup_memory_mb(proc_cgroup: str, read: Read, root: str = CGROUP_ROOT) -> Bound | None:
    """The memory this process's control group may use, in MB, the least along its
    ancestors; None when no group sets one."""
    v2, v1 = _groups(proc_cgroup)
    found: list[Bound] = []
    if v2 is not None:
        for group in _ancestors(v2):
            limit = _number(read(f"{root}{group.rstrip('/')}/memory.max"))  # "max": None
            if limit is not None:
                found.append(Bound(limit / 2**20, f"cgroup {group} memory.max"))
    if "memory" in v1:
        for group in _ancestors(v1["memory"]):
            limit = _number(read(f"{root}/memory{group.rstrip('/')}/memory.limit_in_bytes"))
            if limit is not None and limit < 2**62:  # no limit reads as about 2**63
                found.append(Bound(limit / 2**20, f"cgroup {group} memory.limit_in_bytes"))
    return min(found, key=lambda b: b.value, default=None)


def usable_cpus(read: Read = read_file) -> Bound:
    """The CPUs this process may use: the machine's, or fewer where its affinity or its
    control group says (the least, and what says so)."""
    bounds = [Bound(float(psutil.cpu_count() or 1), MACHINE)]
    if hasattr(os, "sched_getaffinity"):
        bounds.append(Bound(float(len(os.sched_getaffinity(0))), "its CPU affinity"))
    cgroup = cgroup_cpus(read("/proc/self/cgroup") or "", read)
    if cgroup is not None:
        bounds.append(cgroup)
    return min(bounds, key=lambda b: b.value)


def usable_memory_mb(read: Read = read_file) -> Bound:
    """The memory this process may use, in MB: the machine's, or less where its control
    group says."""
    bounds = [Bound(psutil.virtual_memory().total / 2**20, MACHINE)]
    cgroup = cgroup_memory_mb(read("/proc/self/cgroup") or "", read)
    if cgroup is not None:
        bounds.append(cgroup)
    return min(bounds, key=lambda b: b.value)


def _counter(text: str | None, key: str) -> float | None:
    """The value of ``key`` in a ``key value`` file (``memory.events``, ``/proc/vmstat``)."""
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return _number(parts[1])
    return None


def oom_kills(read: Read = read_file, root: str = CGROUP_ROOT) -> Bound | None:
    """How many processes the kernel's OOM killer has killed, and what counts them: this
    process's memory control group (the nearest along its ancestors that counts: cgroup v2
    ``memory.events``, v1 ``memory.oom_control``; its replicas are in it), else the machine
    (``/proc/vmstat``, Linux 4.13 on). None where nothing counts them. The kernel counts a kill
    before its SIGKILL lands: a replica that died of SIGKILL as this rose was the OOM killer's.
    ``dmesg`` says more but needs a privilege a container seldom has."""
    v2, v1 = _groups(read("/proc/self/cgroup") or "")
    if v2 is not None:
        for group in _ancestors(v2):
            count = _counter(read(f"{root}{group.rstrip('/')}/memory.events"), "oom_kill")
            if count is not None:
                return Bound(count, f"cgroup {group} memory.events")
    if "memory" in v1:
        for group in _ancestors(v1["memory"]):
            count = _counter(read(f"{root}/memory{group.rstrip('/')}/memory.oom_control"), "oom_kill")
            if count is not None:
                return Bound(count, f"cgroup {group} memory.oom_control")
    count = _counter(read("/proc/vmstat"), "oom_kill")
    return Bound(count, "/proc/vmstat") if count is not None else None

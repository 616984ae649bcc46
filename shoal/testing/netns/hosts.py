"""The test network: namespaces on a private bridge (see :mod:`shoal.testing.netns`), and
the faults injected between them: partitions (iptables), slow links (tc netem, or an
NFQUEUE loop), hung hosts (SIGSTOP)."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

PREFIX = "shoal-"
_NAME = re.compile(r"^shoal-(\d+)-(\d+)-(br|h\d+)$")
_GW_LINK = re.compile(r"^shg(\d+)n(\d+)$")
_seq = itertools.count()


class NetnsError(RuntimeError):
    """A command that builds or changes the test network failed."""


def _run(
    args: Sequence[str], *, check: bool = True, timeout: float = 10.0
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def unavailable_reason() -> str | None:
    """Why namespaces cannot be built here (``None`` when they can): not root, no ``ip``,
    no ``iptables``, or the kernel refuses. Creates and deletes one probe namespace."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root; try sudo)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed (Debian: apt-get install iproute2 iptables; make test does it)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", probe])
        try:
            _run(["ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
            _run(["ip", "netns", "exec", probe, "iptables", "-w", "-S"])
        finally:
            _run(["ip", "netns", "del", probe], check=False)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as err:
        return f"cannot build network namespaces here: {err}"
    return None


@dataclass
class Host:
    """One machine of the test network: a namespace with one address."""

    index: int
    netns: str
    address: str
    dev: str = "eth0"
    helpers: set[int] = field(default_factory=set)  # our own processes inside (nfqueue loops)
    delay_mechanism: str = ""  # "netem" or "nfqueue" while a delay is on
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)  # reaped by Hosts.close

    def cmd(self, *args: str) -> list[str]:
        """``args`` as a command that runs inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *args]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(self.cmd(*args), check=check)

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a process in this namespace (``ip netns exec`` execs it: the pid is the process's)."""
        proc = subprocess.Popen(self.cmd(*args), **kwargs)
        self.started.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process whose network namespace is this host's (replicas included)."""
        out = _run(["ip", "netns", "pids", self.netns], check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def __str__(self) -> str:
        return f"host {self.index} ({self.address})"


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_pids(pids: Sequence[int], timeout_s: float = 5.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGCONT)  # a stopped process dies of SIGKILL too; be explicit
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def sweep_stale() -> list[str]:
    """Delete namespaces and gateway links left by runs whose process is gone; returns their names."""
    swept = []
    for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = _NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            pids = [int(p) for p in _run(["ip", "netns", "pids", name], check=False).stdout.split()]
            _kill_pids(pids)
            _run(["ip", "netns", "del", name], check=False)
            swept.append(name)
    for line in _run(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        parts = line.split(":")
        link = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        m = _GW_LINK.match(link)
        if m and not _pid_alive(int(m.group(1))):
            _run(["ip", "link", "del", link], check=False)
            swept.append(link)
    return swept


def _routed_subnets() -> set[str]:
    """``10.77.X`` prefixes the root namespace already has routes or addresses for."""
    text = _run(["ip", "-4", "route", "show"], check=False).stdout
    text += _run(["ip", "-4", "addr", "show"], check=False).stdout
    return set(re.findall(r"\b10\.77\.(\d+)\.", text))


class Hosts:
    """``count`` hosts on one private bridge. Not safe for use from several threads at once.

    Lifecycle: ``start()`` / ``close()``, or ``with Hosts(n) as hosts``. ``close()`` is
    idempotent and also runs when ``start()`` fails half way.
    """

    def __init__(self, count: int, *, gateway: bool = True) -> None:
        if count < 1:
            raise ValueError("at least one host")
        self.count = count
        self.gateway = gateway
        pid = os.getpid()
        seq = next(_seq)
        self.tag = f"{PREFIX}{pid}-{seq}"
        self.bridge_ns = f"{self.tag}-br"
        self.gateway_link = f"shg{pid}n{seq}"
        self.run = 0
        self.hosts: list[Host] = []
        self.gateway_address = ""
        self._namespaces: list[str] = []
        self._partitions: set[tuple[int, int]] = set()
        self._paused: set[int] = set()
        self._nfq_loops: dict[int, subprocess.Popen[bytes]] = {}
        self._started = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Hosts:
        sweep_stale()
        self._started = True
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        taken = _routed_subnets() if self.gateway else set()
        base = os.getpid() % 250
        for k in range(250):
            run = (base + k) % 250 + 1
            if str(run) not in taken:
                break
        else:
            raise NetnsError("every subnet 10.77.1-250.0/24 is in use in the root namespace")
        self.run = run
        prefix = f"10.77.{run}"
        br = self.bridge_ns
        self._add_ns(br)
        _run(["ip", "-n", br, "link", "set", "lo", "up"])
        _run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", br, "link", "set", "br0", "up"])
        for i in range(self.count):
            host = Host(index=i, netns=f"{self.tag}-h{i}", address=f"{prefix}.{i + 1}")
            self._add_ns(host.netns)
            port = f"p{i}"
            _run(
                [
                    "ip",
                    "-n",
                    host.netns,
                    "link",
                    "add",
                    host.dev,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    port,
                    "netns",
                    br,
                ]
            )
            _run(["ip", "-n", br, "link", "set", port, "master", "br0"])
            _run(["ip", "-n", br, "link", "set", port, "up"])
            _run(["ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", host.dev])
            _run(["ip", "-n", host.netns, "link", "set", host.dev, "up"])
            _run(["ip", "-n", host.netns, "link", "set", "lo", "up"])
            self.hosts.append(host)
        if self.gateway:
            self.gateway_address = f"{prefix}.254"
            _run(["ip", "link", "add", self.gateway_link, "type", "veth", "peer", "name", "gw", "netns", br])
            _run(["ip", "-n", br, "link", "set", "gw", "master", "br0"])
            _run(["ip", "-n", br, "link", "set", "gw", "up"])
            _run(["ip", "addr", "add", f"{self.gateway_address}/24", "dev", self.gateway_link])
            _run(["ip", "link", "set", self.gateway_link, "up"])

    def _add_ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._namespaces.append(name)

    def close(self) -> None:
        """Kill every process in the namespaces, then delete them (links, rules and qdiscs go with them)."""
        if not self._started:
            return
        self._started = False
        pids = [p for ns in self._namespaces for p in _ns_pids(ns)]
        _kill_pids(pids)
        for host in self.hosts:
            for proc in host.started:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.kill()
                    proc.wait(5)
                for pipe in (proc.stdin, proc.stdout, proc.stderr):
                    if pipe is not None:
                        pipe.close()
            host.started.clear()
        if self.gateway:
            _run(["ip", "link", "del", self.gateway_link], check=False)
        for ns in reversed(self._namespaces):
            _run(["ip", "netns", "del", ns], check=False)
        self._namespaces.clear()
        self._partitions.clear()
        self._paused.clear()

    def __enter__(self) -> Hosts:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    # ------------------------------------------------------------ partitions

    def partition(self, a: Host, b: Host) -> None:
        """Cut ``a`` from ``b`` both ways: each drops every packet from the other. Idempotent."""
        key = (min(a.index, b.index), max(a.index, b.index))
        if key in self._partitions:
            return
        for me, peer in ((a, b), (b, a)):
            me.run("iptables", "-w", "-I", "INPUT", *self._drop_rule(peer))
        self._partitions.add(key)

    def heal(self, a: Host, b: Host) -> None:
        """Undo :meth:`partition`. Idempotent."""
        key = (min(a.index, b.index), max(a.index, b.index))
        if key not in self._partitions:
            return
        for me, peer in ((a, b), (b, a)):
            me.run("iptables", "-w", "-D", "INPUT", *self._drop_rule(peer))
        self._partitions.discard(key)

    def isolate(self, a: Host) -> None:
        """Partition ``a`` from every other host (it still reaches the gateway, i.e. the test's clients)."""
        for b in self.hosts:
            if b is not a:
                self.partition(a, b)

    def heal_all(self) -> None:
        for i, j in sorted(self._partitions):
            self.heal(self.hosts[i], self.hosts[j])

    @staticmethod
    def _drop_rule(peer: Host) -> list[str]:
        return ["-s", peer.address, "-m", "comment", "--comment", "shoal-partition", "-j", "DROP"]

    # ------------------------------------------------------------ slow links

    def delay(self, host: Host, ms: float, loss_pct: float = 0.0) -> str:
        """Delay every packet ``host`` sends on the test network by ``ms`` and drop ``loss_pct``
        percent of them. Replaces an earlier delay. Returns the mechanism: ``netem``, or
        ``nfqueue`` where the kernel has no netem."""
        self.undelay(host)
        netem = ["tc", "qdisc", "replace", "dev", host.dev, "root", "netem", "delay", f"{ms:g}ms"]
        if loss_pct:
            netem += ["loss", f"{loss_pct:g}%"]
        proc = host.run(*netem, check=False)
        if proc.returncode == 0:
            host.delay_mechanism = "netem"
            return "netem"
        if "unknown" not in proc.stderr.lower() and "no such file" not in proc.stderr.lower():
            raise NetnsError(f"tc netem in {host}: {proc.stderr.strip()}")
        # No sch_netem in this kernel: hold each outgoing packet in an NFQUEUE and let a
        # small loop in the namespace give its verdict (accept, or drop for loss) later.
        queue = 7
        loop = host.popen(
            [
                sys.executable,
                "-m",
                "shoal.testing.netns",
                "nfqueue",
                "--queue",
                str(queue),
                "--delay-ms",
                f"{ms:g}",
                "--loss-pct",
                f"{loss_pct:g}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        host.helpers.add(loop.pid)
        assert loop.stdout is not None
        line = loop.stdout.readline().decode().strip()
        if line != "bound":
            loop.kill()
            err = loop.stderr.read().decode() if loop.stderr else ""
            host.helpers.discard(loop.pid)
            raise NetnsError(f"nfqueue delay loop in {host} did not start: {line} {err.strip()}")
        loop.stdout.close()
        if loop.stderr is not None:
            loop.stderr.close()
        self._nfq_loops[host.index] = loop
        # --queue-bypass: if the loop dies, packets flow instead of vanishing.
        host.run("iptables", "-w", "-I", "OUTPUT", *self._nfq_rule(host, queue))
        host.delay_mechanism = "nfqueue"
        return "nfqueue"

    def undelay(self, host: Host) -> None:
        """Remove the delay and loss of :meth:`delay` (a no-op when none is on)."""
        if host.delay_mechanism == "netem":
            host.run("tc", "qdisc", "del", "dev", host.dev, "root", check=False)
        elif host.delay_mechanism == "nfqueue":
            host.run("iptables", "-w", "-D", "OUTPUT", *self._nfq_rule(host, 7), check=False)
            loop = self._nfq_loops.pop(host.index, None)
            if loop is not None:
                loop.kill()
                loop.wait(5)
                host.helpers.discard(loop.pid)
        host.delay_mechanism = ""

    @staticmethod
    def _nfq_rule(host: Host, queue: int) -> list[str]:
        return ["-o", host.dev, "-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass"]

    # ------------------------------------------------------------ hung hosts

    def pause(self, host: Host) -> list[int]:
        """SIGSTOP every process in ``host`` (its sockets stay open, nothing answers); returns the pids."""
        pids = [p for p in host.pids() if p not in host.helpers]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        self._paused.add(host.index)
        return pids

    def resume(self, host: Host) -> None:
        """SIGCONT every process in ``host``."""
        for pid in host.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._paused.discard(host.index)

    def calm(self) -> None:
        """Undo every fault: heal partitions, remove delays, resume paused hosts."""
        self.heal_all()
        for host in self.hosts:
            self.undelay(host)
        for i in sorted(self._paused):
            self.resume(self.hosts[i])


def _ns_pids(netns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", netns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]
